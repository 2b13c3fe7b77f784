"""Recipe: every ranker of the run scored on the same test users, with 95% bootstrap intervals.

Rankers: the random and popularity baselines, the zero-shot teacher, the adapted teacher
(when the run adapted it) and the student; each gets HR@K, NDCG@K and MRR with a
bootstrap interval over users, and each model its latency and memory. Paired
differences (student - teacher, teacher - popularity, ...) come with paired intervals.

Candidates: sampled by :func:`~layerwise_dist.data.build_examples`, or read from a fixed
file (``eval.candidates``, :mod:`layerwise_dist.data.candidates`). Each model's scores also
give its position bias (:mod:`layerwise_dist.position_bias`); ``eval.permutations=P`` scores
every example under P seeded candidate orders and sums the scores. Every ranker with
per-example ranks (all but the ``random`` expectation) is written to
``<output_dir>/per_example/<ranker>.parquet`` (:func:`~layerwise_dist.evaluation.write_per_example`);
``layerwise-dist compare A.parquet B.parquet`` gives the paired difference of two of them.

``eval.reuse_teacher_scores=<run folder>``: the teachers' scores are read from that run's per-example
files instead of computed again (each teacher takes ~15 minutes on 1,000 users on two CPU cores), when
the file holds exactly these users and candidates and the teacher, loaded here anyway for its speed and
memory, gives the file's scores on its first batch (a spot check; otherwise it is scored, with a warning).
The reused file's compute, recorded there, is reported beside this run's (``reused_compute_s``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from ..data.sampler import RankSampler, length_sorted, load_batch
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

    def __init__(
        self,
        session: RunSession,
        student_dir: str | Path | None = None,
        with_teacher: bool = True,
        reuse: dict[str, str | Path] | None = None,
        measure_cost: bool = True,
    ) -> None:
        """``reuse={"student": "<cell>/per_example/student.parquet"}``: that model's quality is read from a
        per-example file of the same users and candidates (scored earlier, e.g. by an ablation cell) instead
        of scored again; the model is still loaded and its latency and memory measured here. A file of other
        users or candidates (or ``eval.permutations`` > 1) is not reused: the model is scored, with a warning.
        ``measure_cost=False``: quality only, no latency or memory figures (the ablation's transfer check:
        speed does not depend on the data set, and the final evaluation measures it).
        """
        self.session = session
        self.cfg = session.cfg
        self.student_dir = Path(student_dir) if student_dir is not None else None
        self.with_teacher = with_teacher
        self.reuse = {k: Path(v) for k, v in (reuse or {}).items()}
        # Models whose reuse file was scored by another run: reused only if the model scores its first
        # batch as the file says (``reuse`` entries from the caller name that model's own file: not checked).
        self.spot_checked: dict[str, float | None] = {}
        source = session.cfg.eval.reuse_teacher_scores
        if source and with_teacher:
            for name, path in reused_teacher_files(source).items():
                self.reuse.setdefault(name, path)
                self.spot_checked[name] = _source_seconds(Path(source), name)
        self.measure_cost = measure_cost
        self.results: dict[str, Any] = {}
        self.per_example: dict[str, Any] = {}

    def setup(self) -> EvaluateRecipe:
        self.models = self._setup_models()
        self.batches = self._setup_data()
        return self

    def _rank_examples(self) -> list[Any]:
        """The examples every ranker is scored on: sampled candidates, or those of ``eval.candidates``."""
        cfg, session = self.cfg, self.session
        if not cfg.eval.candidates:
            return session.rank_examples(cfg.eval.split)
        from ..data import seeded_sample
        from ..data.candidates import examples_from_candidates

        examples = examples_from_candidates(
            session.splits,
            cfg.eval.candidates,
            cfg.data,
            cfg.eval.split,
            include_target=cfg.eval.include_target,
            tokenizer=session.tokenizer,
            fmt=cfg.eval.candidates_format,
        )
        lines = len(examples)
        n = cfg.eval.max_examples
        if n and n < len(examples):  # the same seeded sample rule as RunSession.rank_examples
            examples = seeded_sample(examples, n, cfg.data.seed)
            log.info(
                "%s: scoring a seeded sample of %d of its %d lines (eval.max_examples=%d; 0 scores every line)",
                cfg.eval.candidates,
                n,
                lines,
                n,
            )
        self.results["candidate_file"] = {
            "path": str(cfg.eval.candidates),
            "format": cfg.eval.candidates_format,
            "rule": "as_given (first N, unshuffled)"
            if cfg.eval.include_target
            else "llmrank (drop target, first N-1, append target, shuffle)",
            "lines": lines,
            "scored": len(examples),
            "num_candidates": cfg.data.num_candidates,
            "shuffle_seed": None if cfg.eval.include_target else "stable_seed(data.seed, 'candidates', user, split)",
            "data_seed": cfg.data.seed,
        }
        return examples

    def _setup_data(self) -> list[dict[str, Any]]:
        from ..data import tokenize_examples
        from ..position_bias import permute_examples

        cfg = self.cfg.eval
        self.examples = self._rank_examples()
        self.orders = None
        self.timed_batches: list[dict[str, Any]] = []
        scored = self.examples
        if cfg.permutations > 1:
            scored, self.orders = permute_examples(self.examples, cfg.permutations, self.cfg.data.seed)
        self.results["config"] = {
            "examples": len(self.examples),
            "batch_size": cfg.batch_size,
            "formulation": self.cfg.data.formulation,
            "pointwise_score": self.cfg.data.pointwise_score,
            "candidates": self.cfg.data.num_candidates,
            "permutations": cfg.permutations,
            "prompts": len(scored),
        }
        if not self.models:  # baselines only: no tokens, no batches
            return []
        data = tokenize_examples(
            scored, self.session.tokenizer, self.cfg.data, cache_dir=self.cfg.data.cache_dir or None
        )
        # Every example exactly once (ranks may differ by one batch: replicated models, no collective forward).
        sampler = RankSampler.for_rank(len(data), cfg.batch_size, equal_batches=False)
        self.results["config"]["ranks"] = sampler.world_size
        in_order = [list(indices) for indices in sampler]
        # Latency is timed on the first batches in dataset order (lengths as they come); quality is scored
        # on the same examples regrouped longest first (less padding), its results put back in order.
        self.timed_batches = [
            load_batch(data, ix, self.session.pad_token_id) for ix in in_order[: cfg.latency_batches + 1]
        ]
        self.batch_indices = length_sorted(in_order, data)
        return [load_batch(data, indices, self.session.pad_token_id) for indices in self.batch_indices]

    def _setup_models(self) -> list[tuple[str, Any]]:
        from ..models.teacher import load_teacher

        cfg, session = self.cfg, self.session
        models: list[tuple[str, Any]] = []
        if not cfg.eval.models:
            return models
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
            models.append(("student", lambda: load_teacher(served, role="student").to(device())))
        return models

    def run(self) -> dict[str, Any]:
        from ..evaluation import compare, evaluate_per_example, measure_cost

        cfg, session = self.cfg, self.session
        self._run_baselines()
        timed = self.timed_batches  # one warm-up batch, then the timed ones
        warmup = 1 if len(timed) > 1 else 0
        score = cfg.data.pointwise_score
        for name, load in self.models:
            model = load()
            result = self._reused(name, model)
            if result is None:
                t0 = time.perf_counter()
                positions = [i for indices in self.batch_indices for i in indices]
                result = evaluate_per_example(
                    model, self.batches, cfg.eval.ks, progress=True, pointwise_score=score, positions=positions
                )
                session.timings[f"eval_{name}_s"] = time.perf_counter() - t0
                result = self._debias(result, session.timings[f"eval_{name}_s"])
            cost = measure_cost(model, timed, warmup=warmup, pointwise_score=score) if self.measure_cost else {}
            self.per_example[name] = result
            self.results[name] = {**result.summary(), **cost}
            session.tracker.log_metrics(
                {f"eval/{name}/{k}": v for k, v in self.results[name].items() if isinstance(v, (int, float))}
            )
            log.info("%s: %s", name, _line(result))
            log.info("%s: %s", name, _bias_line(result.extra["position_bias"]))
            del model
        if "teacher" in self.results and "student" in self.results:
            self.results["comparison"] = compare(self.results["teacher"], self.results["student"])
            session.tracker.log_metrics({"eval": {"comparison": self.results["comparison"]}})
        self.results["paired"] = self._paired()
        return self.results

    def _reused(self, name: str, model: Any = None) -> Any:
        """``name``'s result from its ``reuse`` file when that file holds exactly these users and candidates
        (and, for a file another run scored, when ``model`` gives its scores on the first batch).

        Every rank decides alike (the rows are the same everywhere; the spot check's differences are summed
        over ranks), so either all ranks read the file or all score the model."""
        from ..evaluation import read_per_example, result_from_scores
        from ..position_bias import position_bias

        path = self.reuse.get(name)
        if path is None:
            return None
        why = ""
        if self.orders is not None:
            why = "eval.permutations > 1"
        elif not path.is_file():
            why = "no such file"
        else:
            try:
                table = read_per_example(path)
            except (OSError, ValueError) as e:  # unreadable or not a per-example file: score anew
                why = f"unreadable: {e}"
            else:
                if not {"scores", "target_index"} <= table.keys():
                    why = "no scores in it"
        if not why:
            ours = [(str(ex.user_id), str(ex.target), [str(c) for c in ex.candidates]) for ex in self.examples]
            theirs = list(zip(table["user"], table["target"], table["candidates"]))
            theirs = [(u, t, list(c)) for u, t, c in theirs]
            if ours != theirs:
                why = f"other users or candidates ({len(theirs)} rows against {len(ours)} examples here)"
        check = None
        if name in self.spot_checked:  # collective: every rank runs it, whatever its rows said
            check = self._spot_check(model, table if not why else None)
            if not why and check["max_abs_diff"] > SPOT_CHECK_ATOL:
                why = (
                    f"the model scores its first batch otherwise than the file (max |difference| "
                    f"{check['max_abs_diff']:.3g} over {check['examples']} examples > {SPOT_CHECK_ATOL:g}): another model"
                )
        if why:
            log.warning("%s: not reusing %s (%s); scoring it", name, path, why)
            return None
        cfg = self.cfg.eval
        extra: dict[str, Any] = {"reused_from": str(path)}
        if check is not None:
            extra["reuse_check"] = check
            extra["reused_compute_s"] = self.spot_checked[name]
            log.info(
                "%s: the model scores %d examples of its first batches as %s does (max |difference| %.3g)",
                name,
                check["examples"],
                path,
                check["max_abs_diff"],
            )
        result = result_from_scores(table["scores"], table["target_index"], cfg.ks, extra=extra)
        result.extra["position_bias"] = position_bias(result.scores)
        log.info("%s: quality read from %s (the same %d users and candidates, scored earlier)", name, path, len(ours))
        return result

    def _spot_check(self, model: Any, table: dict[str, Any] | None) -> dict[str, Any]:
        """The largest |score here - score in ``table``| over every rank's first batch (summed over ranks, so
        every rank gets the same figure; ``inf`` when ``table`` is None on any rank or a rank has no batch)."""
        import numpy as np
        import torch

        from ..distributed import all_reduce_sum
        from ..evaluation import forward_scores

        diff, count = float("inf"), 0
        if table is not None and self.batches:
            was_training = model.training
            model.eval()
            with torch.no_grad():
                here = forward_scores(model, self.batches[0], device(), self.cfg.data.pointwise_score).float().cpu()
            model.train(was_training)
            indices = self.batch_indices[0]
            theirs = np.asarray([np.asarray(table["scores"][i], dtype=np.float32) for i in indices])
            diff, count = float(np.abs(here.numpy() - theirs).max()), len(indices)
        sums = all_reduce_sum(torch.tensor([min(diff, 1e30), float(count)], dtype=torch.float64))
        total = float(sums[0])
        return {"max_abs_diff": float("inf") if total >= 1e30 else total, "examples": int(sums[1])}

    def _debias(self, result: Any, seconds: float) -> Any:
        """Position bias of the scores as presented; with permutations, the summed scores' result."""
        from ..evaluation import result_from_scores
        from ..position_bias import aggregate_permutation_scores, permutation_cost, position_bias

        bias = position_bias(result.scores)
        tokens = result.extra.get("tokens_per_example_mean")
        if self.orders is not None:
            summed = aggregate_permutation_scores(result.scores, self.orders)
            targets = [ex.target_index for ex in self.examples]
            result = result_from_scores(
                summed, targets, result.ks, result.n_boot, result.seed, result.level, extra=dict(result.extra)
            )
        cost = permutation_cost(len(self.examples), self.cfg.eval.permutations, seconds, tokens or 0.0)
        result.extra.update(position_bias=bias, permutation_cost=cost)
        return result

    def _run_baselines(self) -> None:
        from ..baselines import evaluate_baselines

        self.results["baselines"] = {}
        if not self.cfg.eval.baselines:
            return
        baselines = evaluate_baselines(self.session.splits, self.examples, self.cfg.eval.ks, self.cfg.eval.baselines)
        for name, result in baselines.items():
            self.per_example[name] = result
            self.results["baselines"][name] = result.summary()
            self.session.tracker.log_metrics({f"eval/baseline/{name}/{k}": v for k, v in result.metrics.items()})
            log.info("%s: %s", name, _line(result))
            ties = result.extra.get("random_ties")
            if ties:  # popularity's counts tie often: the same ranker with ties broken at random
                numbers = {k: v for k, v in ties.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                self.session.tracker.log_metrics(
                    {f"eval/baseline/{name}_random_ties/{k}": v for k, v in numbers.items()}
                )
                log.info(
                    "%s, ties broken at random (%.1f%% of targets tied): ndcg@10=%.4f, hr@10=%.4f, mrr=%.4f",
                    name,
                    100 * result.extra.get("targets_tied", 0.0),
                    *(ties.get(m, float("nan")) for m in ("ndcg@10", "hr@10", "mrr")),
                )

    def _paired(self) -> dict[str, Any]:
        out = {}
        for a, b in PAIRS:
            if a in self.per_example and b in self.per_example:
                metrics = [m for m in ("ndcg@10", "hr@10", "mrr") if m in self.per_example[a].values]
                out[f"{a} - {b}"] = {m: self.per_example[a].paired_difference(self.per_example[b], m) for m in metrics}
        return out

    def save(self) -> dict[str, Any]:
        """Results into the session; rank 0 writes ``per_example/<ranker>.parquet`` for every ranking ranker."""
        from ..distributed import is_main
        from ..evaluation import write_per_example

        files = {}
        if is_main():
            for name, result in self.per_example.items():
                if result.ranks is not None:
                    path = self.session.out / "per_example" / f"{name}.parquet"
                    files[name] = write_per_example(result, self.examples, path)
        self.results["per_example_files"] = files
        self.session.results.update(self.results)
        return self.results


# Scores are fp32 mean log-probabilities (~ -1 to -10); the same model on other batch shapes or another CPU
# differs by ~1e-6, another model (other weights, another adaptation) by far more than this.
SPOT_CHECK_ATOL = 1e-4
REUSABLE_TEACHERS = ("teacher", "teacher_zero_shot")


def reused_teacher_files(source: str | Path) -> dict[str, Path]:
    """``eval.reuse_teacher_scores``' per-example files of the teachers, by ranker name; a clear error when the
    folder holds none (checked when a run starts, not when its last stage reaches it)."""
    folder = Path(source) / "per_example"
    files = {name: folder / f"{name}.parquet" for name in REUSABLE_TEACHERS}
    found = {name: path for name, path in files.items() if path.is_file()}
    if not found:
        raise FileNotFoundError(
            f"eval.reuse_teacher_scores={source}: no {' or '.join(p.name for p in files.values())} in {folder} "
            "(a finished run's folder, whose evaluation wrote per_example/; empty to score the teachers here)"
        )
    return found


def _source_seconds(source: Path, name: str) -> float | None:
    """The seconds ``source`` spent scoring ``name`` (its results.json timings), when it recorded them."""
    try:
        timings = json.loads((source / "results.json").read_text()).get("timings") or {}
    except (OSError, ValueError):
        return None
    seconds = timings.get(f"eval_{name}_s")
    return float(seconds) if isinstance(seconds, (int, float)) else None


def _bias_line(bias: dict[str, Any]) -> str:
    corr = bias.get("profile_correlation_mean")
    return (
        f"top-1 at position {bias['top1_modal_position']} in {bias['top1_modal_share']:.0%} of "
        f"{bias['vectors']} prompts (chance {bias['top1_chance_share']:.0%}); "
        f"correlation with the mean position profile {'n/a' if corr is None else f'{corr:.2f}'}"
    )


def _line(result: Any) -> str:
    m, ci = result.metrics, result.intervals
    parts = []
    for key in ("ndcg@10", "hr@10", "mrr"):
        if key in m:
            lo, hi = ci.get(key, (float("nan"), float("nan")))
            parts.append(f"{key}={m[key]:.4f} [{lo:.4f}, {hi:.4f}]")
    return ", ".join(parts) + f" (n={m.get('n')})"
