"""Recipe: teacher and student scored on the test split (HR@K, NDCG@K, MRR, latency, memory)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from ..data.sampler import RankSampler, load_batch
from ..distributed import device, get_logger
from .session import RunSession

log = get_logger()


class EvaluateRecipe:
    """``setup`` (batches, which models) -> ``run`` (each model loaded, scored, timed, freed) -> ``save``.

    Both models are evaluated replicated (each rank holds a whole model and scores
    its own share of the examples, sums all-reduced): that is how a recommender
    is served, and it keeps the latency figures free of ZeRO-3 all-gathers.
    """

    def __init__(self, session: RunSession, student_dir: str | Path | None = None, with_teacher: bool = True) -> None:
        self.session = session
        self.cfg = session.cfg
        self.student_dir = Path(student_dir) if student_dir is not None else None
        self.with_teacher = with_teacher
        self.results: dict[str, Any] = {}

    def setup(self) -> EvaluateRecipe:
        self.batches = self._setup_data()
        self.models = self._setup_models()
        return self

    def _setup_data(self) -> list[dict[str, Any]]:
        cfg = self.cfg.eval
        data = self.session.examples(cfg.split)
        # Every example exactly once (ranks may differ by one batch: replicated models, no collective forward).
        sampler = RankSampler.for_rank(len(data), cfg.batch_size, equal_batches=False)
        self.results["config"] = {"examples": len(data), "ranks": sampler.world_size, "batch_size": cfg.batch_size}
        return [load_batch(data, indices, self.session.pad_token_id) for indices in sampler]

    def _setup_models(self) -> list[tuple[str, Any]]:
        from ..models.teacher import load_teacher

        cfg = self.cfg
        models: list[tuple[str, Any]] = []
        if self.with_teacher:
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
        from ..evaluation import compare, evaluate_model, measure_cost

        cfg, session = self.cfg, self.session
        timed = self.batches[: cfg.eval.latency_batches + 1]  # one warm-up batch, then the timed ones
        warmup = 1 if len(timed) > 1 else 0
        for name, load in self.models:
            model = load()
            t0 = time.perf_counter()
            metrics = evaluate_model(model, self.batches, cfg.eval.ks, progress=True)
            session.timings[f"eval_{name}_s"] = time.perf_counter() - t0
            cost = measure_cost(model, timed, warmup=warmup)
            self.results[name] = {**metrics, **cost}
            session.tracker.log_metrics(
                {f"{name}/{k}": v for k, v in self.results[name].items() if isinstance(v, (int, float))}
            )
            log.info("%s: %s", name, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
            del model
        if "teacher" in self.results and "student" in self.results:
            self.results["comparison"] = compare(self.results["teacher"], self.results["student"])
            session.tracker.log_metrics({"comparison": self.results["comparison"]})
        return self.results

    def save(self) -> dict[str, Any]:
        self.session.results.update(self.results)
        return self.results
