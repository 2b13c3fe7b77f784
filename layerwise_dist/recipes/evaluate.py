"""Recipe: every ranker of the run scored on the same test users, with 95% bootstrap intervals.

Rankers: the random and popularity baselines, the zero-shot teacher, the adapted teacher
(when the run adapted it) and the student; each gets HR@K, NDCG@K and MRR with a
bootstrap interval over users, and each model its latency and memory. Paired
differences (student - teacher, teacher - popularity, ...) come with paired intervals.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from ..data.sampler import RankSampler, load_batch
from ..distributed import device, get_logger
from .session import RunSession

log = get_logger()

#: (a, b) pairs whose per-user difference is reported with a paired bootstrap interval, when both exist.
PAIRS = (
    ("student", "teacher"),
    ("student", "teacher_zero_shot"),
    ("teacher", "teacher_zero_shot"),
    ("teacher", "popularity"),
    ("teacher_zero_shot", "popularity"),
    ("student", "popularity"),
    ("teacher", "random"),
    ("student", "random"),
)


class EvaluateRecipe:
    """``setup`` (batches, which models) -> ``run`` (baselines, then each model loaded, scored, timed, freed) -> ``save``.

    Models are evaluated replicated (each rank holds a whole model and scores its own
    share of the users; per-user results are gathered): that is how a recommender is
    served, and it keeps the latency figures free of ZeRO-3 all-gathers.
    """

    def __init__(self, session: RunSession, student_dir: str | Path | None = None, with_teacher: bool = True) -> None:
        self.session = session
        self.cfg = session.cfg
        self.student_dir = Path(student_dir) if student_dir is not None else None
        self.with_teacher = with_teacher
        self.results: dict[str, Any] = {}
        self.per_example: dict[str, Any] = {}

    def setup(self) -> EvaluateRecipe:
        self.batches = self._setup_data()
        self.models = self._setup_models()
        return self

    def _setup_data(self) -> list[dict[str, Any]]:
        cfg = self.cfg.eval
        data = self.session.examples(cfg.split)
        # Every example exactly once (ranks may differ by one batch: replicated models, no collective forward).
        sampler = RankSampler.for_rank(len(data), cfg.batch_size, equal_batches=False)
        self.results["config"] = {
            "examples": len(data),
            "ranks": sampler.world_size,
            "batch_size": cfg.batch_size,
            "formulation": self.cfg.data.formulation,
            "pointwise_score": self.cfg.data.pointwise_score,
            "candidates": self.cfg.data.num_candidates,
        }
        return [load_batch(data, indices, self.session.pad_token_id) for indices in sampler]

    def _setup_models(self) -> list[tuple[str, Any]]:
        from ..models.teacher import load_teacher

        cfg, session = self.cfg, self.session
        models: list[tuple[str, Any]] = []
        if self.with_teacher:
            adapted = session.cfg.teacher.model != session.base_teacher.model
            if adapted:  # the zero-shot teacher too, so the value of adaptation is visible
                base = dataclasses.replace(
                    session.base_teacher, placement="replicate", attn_implementation=cfg.teacher.attn_implementation
                )
                models.append(("teacher_zero_shot", lambda: load_teacher(base).to(device())))
            replicated = dataclasses.replace(cfg.teacher, placement="replicate")
            models.append(("teacher", lambda: load_teacher(replicated).to(device())))
        if self.student_dir is not None:
            if not (self.student_dir / "config.json").exists():
                raise FileNotFoundError(f"no student model folder at {self.student_dir} (run the distill stage first)")
            quant = cfg.eval.student_quantization
            quant = cfg.teacher.quantization if quant == "teacher" else quant
            served = dataclasses.replace(
                cfg.teacher, model=str(self.student_dir), quantization=quant, placement="replicate"
            )
            self.results["student_quantization"] = quant
            models.append(("student", lambda: load_teacher(served).to(device())))
        return models

    def run(self) -> dict[str, Any]:
        from ..evaluation import compare, evaluate_per_example, measure_cost

        cfg, session = self.cfg, self.session
        self._run_baselines()
        timed = self.batches[: cfg.eval.latency_batches + 1]  # one warm-up batch, then the timed ones
        warmup = 1 if len(timed) > 1 else 0
        score = cfg.data.pointwise_score
        for name, load in self.models:
            model = load()
            t0 = time.perf_counter()
            result = evaluate_per_example(model, self.batches, cfg.eval.ks, progress=True, pointwise_score=score)
            session.timings[f"eval_{name}_s"] = time.perf_counter() - t0
            cost = measure_cost(model, timed, warmup=warmup, pointwise_score=score)
            self.per_example[name] = result
            self.results[name] = {**result.summary(), **cost}
            session.tracker.log_metrics(
                {f"{name}/{k}": v for k, v in self.results[name].items() if isinstance(v, (int, float))}
            )
            log.info("%s: %s", name, _line(result))
            del model
        if "teacher" in self.results and "student" in self.results:
            self.results["comparison"] = compare(self.results["teacher"], self.results["student"])
            session.tracker.log_metrics({"comparison": self.results["comparison"]})
        self.results["paired"] = self._paired()
        return self.results

    def _run_baselines(self) -> None:
        from ..baselines import evaluate_baselines

        examples = self.session.rank_examples(self.cfg.eval.split)
        baselines = evaluate_baselines(self.session.splits, examples, self.cfg.eval.ks)
        self.results["baselines"] = {}
        for name, result in baselines.items():
            self.per_example[name] = result
            self.results["baselines"][name] = result.summary()
            self.session.tracker.log_metrics({f"baseline/{name}/{k}": v for k, v in result.metrics.items()})
            log.info("%s: %s", name, _line(result))

    def _paired(self) -> dict[str, Any]:
        out = {}
        for a, b in PAIRS:
            if a in self.per_example and b in self.per_example:
                metrics = [m for m in ("ndcg@10", "hr@10", "mrr") if m in self.per_example[a].values]
                out[f"{a} - {b}"] = {m: self.per_example[a].paired_difference(self.per_example[b], m) for m in metrics}
        return out

    def save(self) -> dict[str, Any]:
        self.session.results.update(self.results)
        return self.results


def _line(result: Any) -> str:
    m, ci = result.metrics, result.intervals
    parts = []
    for key in ("ndcg@10", "hr@10", "mrr"):
        if key in m:
            lo, hi = ci.get(key, (float("nan"), float("nan")))
            parts.append(f"{key}={m[key]:.4f} [{lo:.4f}, {hi:.4f}]")
    return ", ".join(parts) + f" (n={m.get('n')})"
