"""The ablation's report: every ranker on the same users, paired differences, verdicts on the claims.

``write_ablation_report(run_dir)`` reads what ``layerwise-dist ablation`` wrote (``results.json``,
``cells/*/results.json``, the per-example parquet files, the Fisher profiles, the first cell's
``train_history.json``) and writes ``ablation_report.md``, ``ablation.json`` and
``ablation_quality.png`` / ``ablation_curve.png`` into ``run_dir``. Nothing is re-measured: every
figure comes from those files, every average with its 95% bootstrap interval over users, every
difference between two rankers with a paired bootstrap interval over the same users.

Verdicts (whatever they show): H1 (upper layers matter more: the Fisher mass in the top 30% of depth
against the bottom 30%, zero-shot and adapted teacher, beside Block Influence); H3 (Fisher-weighted
layer losses beat uniform / linear ones: the paired interval of the NDCG@10 difference, per layer
selection); the Layerwise-Adapter headline (92% quality, 3.2x speed, 68% memory at 32 -> 8) beside
the measured figures.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

HEADLINE = {"retention": 0.92, "speedup": 3.2, "memory_reduction": 0.68, "layers": "32 -> 8"}
METRICS = ("ndcg@10", "hr@10", "mrr")


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _per_example(run: Path, results: Mapping[str, Any], ranker: str) -> Path | None:
    """The ranker's per-example file: the run folder's own first (``results.json`` records the path the run
    wrote, which names another run once the folder is renamed or copied), else the recorded one."""
    own = run / "per_example" / f"{ranker}.parquet"
    if own.is_file():
        return own
    path = (results.get("per_example_files") or {}).get(ranker)
    return Path(path) if path and Path(path).is_file() else None


def _values(path: Path, metric: str = "ndcg@10") -> dict[tuple[str, str], float]:
    from .evaluation import read_per_example

    table = read_per_example(path)
    if metric not in table:
        raise ValueError(f"{path}: no per-example column {metric!r}")
    return {(u, t): float(v) for u, t, v in zip(table["user"], table["target"], table[metric])}


def ratio_interval(
    num: Mapping[Any, float], den: Mapping[Any, float], n_boot: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """``mean(num) / mean(den)`` over the users both hold, with a 95% percentile bootstrap over those users."""
    keys = sorted(set(num) & set(den))
    if not keys:
        raise ValueError("no common users")
    a = np.array([num[k] for k in keys])
    b = np.array([den[k] for k in keys])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(keys), size=(n_boot, len(keys)))
    with np.errstate(divide="ignore", invalid="ignore"):
        boots = a[idx].mean(1) / b[idx].mean(1)
    boots = boots[np.isfinite(boots)]
    point = float(a.mean() / b.mean()) if b.mean() else float("nan")
    if not len(boots):
        return point, float("nan"), float("nan")
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return point, float(lo), float(hi)


def _multiplicity(n: int) -> list[str]:
    """The reading note under a table of ``n`` paired intervals: each is a 95% interval on its own."""
    if n < 2:
        return []
    return [
        "",
        f"{n} intervals above, each at 95% on its own (no correction for multiple comparisons): with no true "
        f"difference anywhere, about {n * 0.05:.1f} of them would still exclude 0 by chance, so a lone interval "
        "that just excludes 0 is weak evidence.",
    ]


def _verdict(lo: float, hi: float, better: str, worse: str) -> str:
    if lo > 0:
        return f"{better} better (interval above 0)"
    if hi < 0:
        return f"{worse} better (interval below 0)"
    return "no difference shown (interval contains 0)"


def _fmt_ci(point: Any, ci: Sequence[Any] | None, digits: int = 4) -> str:
    if point is None:
        return "n/a"
    if not ci or ci[0] is None:
        return f"{point:.{digits}f}"
    return f"{point:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def collect(run_dir: str | Path, n_boot: int = 1000) -> dict[str, Any]:
    """Everything the report shows, as one dict (written as ``ablation.json``)."""
    from .evaluation import compare_per_example
    from .fisher import FisherProfile

    run = Path(run_dir)
    top = _load(run / "results.json")
    if not top:
        raise FileNotFoundError(f"{run / 'results.json'}: the ablation has not finished its final evaluation")
    config = top.get("config") or {}
    rankers: dict[str, dict[str, Any]] = {}
    files: dict[str, Path] = {}
    for name, res in (top.get("baselines") or {}).items():
        rankers[name] = {"kind": "baseline", **{k: res.get(k) for k in (*METRICS, "n", "ci95")}}
        if (p := _per_example(run, top, name)) is not None:
            files[name] = p
        if isinstance(res.get("random_ties"), Mapping):  # popularity with ties broken at random (no paired figures)
            ties = res["random_ties"]
            rankers[f"{name}_random_ties"] = {
                "kind": "baseline",
                "targets_tied": res.get("targets_tied"),
                **{k: ties.get(k) for k in (*METRICS, "n", "ci95")},
            }
    for name in ("teacher_zero_shot", "teacher"):
        if name in top:
            rankers[name] = {"kind": "teacher", **{k: top[name].get(k) for k in (*METRICS, "n", "ci95")}}
            if (p := _per_example(run, top, name)) is not None:
                files[name] = p
    cells = []
    for cell_dir in sorted((run / "cells").glob("*/")):
        res = _load(cell_dir / "results.json")
        if "student" not in res:
            continue
        name = cell_dir.name
        cell = res.get("cell") or {}
        weights = _load(cell_dir / "layer_weights.json")
        rankers[name] = {
            "kind": "student",
            "selection": cell.get("selection"),
            "weighting": "task_only" if cell.get("task_only") else cell.get("weighting"),
            "teacher_layers": weights.get("layer_map"),
            "layer_weights": [round(w, 4) for w in weights.get("weights", [])],
            **{k: res["student"].get(k) for k in (*METRICS, "n", "ci95")},
        }
        if (p := _per_example(cell_dir, res, "student")) is not None:
            files[name] = p
        cells.append(name)

    # Retention of each student against the (adapted) teacher, same users, bootstrap over users.
    if "teacher" in files:
        teacher_values = _values(files["teacher"])
        for name in cells:
            if name in files:
                point, lo, hi = ratio_interval(_values(files[name]), teacher_values, n_boot)
                rankers[name]["retention_ndcg@10"] = point
                rankers[name]["retention_ci95"] = [lo, hi]

    def paired(a: str, b: str) -> dict[str, Any] | None:
        if a not in files or b not in files:
            return None
        out = compare_per_example(files[a], files[b], ks=(10,), n_boot=n_boot)
        return {"a": a, "b": b, "n": out["n"], "ndcg@10": out["metrics"]["ndcg@10"]}

    pairs: list[dict[str, Any]] = []
    students = {n: rankers[n] for n in cells}
    best = max(
        (n for n in cells if students[n]["weighting"] != "task_only"),
        key=lambda n: students[n]["ndcg@10"] or 0,
        default=None,
    )  # the best distilled cell (the task-loss-only student is the baseline it is compared with)
    best_student = max(cells, key=lambda n: students[n]["ndcg@10"] or 0, default=None)  # any 8-layer student
    for a, b in (("teacher", "teacher_zero_shot"), ("teacher", "popularity"), ("teacher_zero_shot", "popularity")):
        if (p := paired(a, b)) is not None:
            pairs.append({**p, "question": "adaptation" if b == "teacher_zero_shot" else "teacher vs popularity"})
    if best is not None:
        for other, question in (
            ("teacher", "best distilled student vs teacher"),
            ("popularity", "best distilled student vs popularity"),
        ):
            if (p := paired(best, other)) is not None:
                pairs.append({**p, "question": question})
        task_only = next((n for n in cells if students[n]["weighting"] == "task_only"), None)
        if task_only and (p := paired(best, task_only)) is not None:
            pairs.append({**p, "question": "value of distillation (best distilled cell vs task loss alone)"})

    def contrasts(fixed: str, varied: str, pairs_of: Sequence[tuple[str, str]], skip: set[str]) -> list[dict]:
        """Per value of ``fixed`` (selection or weighting), the paired difference of each pair of ``varied``."""
        out = []
        for value in sorted({students[n][fixed] for n in cells} - skip):
            by = {students[n][varied]: n for n in cells if students[n][fixed] == value}
            for a, b in pairs_of:
                if a in by and b in by and (p := paired(by[a], by[b])) is not None:
                    lo, hi = ((p["ndcg@10"] or {}).get("ci95") or [float("nan"), float("nan")])[:2]
                    out.append({**p, fixed: value, "verdict": _verdict(lo, hi, a, b)})
        return out

    h3 = contrasts(
        "selection", "weighting", (("fisher", "uniform"), ("fisher", "linear"), ("linear", "uniform")), set()
    )
    selection_pairs = contrasts(
        "weighting",
        "selection",
        (("fisher-topk", "uniform"), ("fisher-topk", "first"), ("uniform", "first")),
        {"task_only"},
    )

    h1 = {}
    adapted = "teacher_zero_shot" in top
    profiles = (
        ("zero_shot", run / "zero_shot" / "fisher_profile.json"),
        ("adapted" if adapted else "zero_shot", run / "fisher_profile.json"),
    )
    for label, path in profiles:
        if path.is_file():
            prof = FisherProfile.load_json(path)
            topshare, bottom = prof.depth_shares(0.3)
            h1[label] = {
                "top30_share": topshare,
                "bottom30_share": bottom,
                "top_layers": sorted(range(len(prof.scores)), key=lambda i: -prof.scores[i])[:5],
                "spearman_block_influence": prof.spearman(prof.block_influence) if prof.block_influence else None,
                "verdict": "upper layers hold more Fisher mass"
                if topshare > bottom
                else "lower layers hold more Fisher mass",
            }
    if adapted and not (run / "zero_shot" / "fisher_profile.json").is_file():
        h1["note"] = "no profile of the zero-shot teacher (ablation.zero_shot_fisher=false)"

    comparison = top.get("comparison") or {}
    headline = {
        "original": HEADLINE,
        "measured": {
            "retention_ndcg@10_best": rankers.get(best, {}).get("retention_ndcg@10") if best else None,
            "retention_ci95_best": rankers.get(best, {}).get("retention_ci95") if best else None,
            "best_cell": best,
            "retention_ndcg@10_best_student": rankers.get(best_student, {}).get("retention_ndcg@10")
            if best_student
            else None,
            "retention_ci95_best_student": rankers.get(best_student, {}).get("retention_ci95")
            if best_student
            else None,
            "best_student_cell": best_student,
            "speedup": comparison.get("speedup"),
            "memory_reduction": (comparison.get("memory_reduction") or {}).get("memory_model_bytes"),
            "layers": None,
        },
    }
    curve = []
    order = [n for n in (top.get("cells") or {}) if n in cells] or cells
    first = order[0] if order else None  # the first cell of the run validates every ablation.curve_every steps
    history = _load(run / "cells" / first / "train_history.json") if first else []
    for h in history or []:
        if "valid/ndcg@10" in h:
            curve.append({"step": h["step"], "valid_ndcg@10": h["valid/ndcg@10"], "valid_total": h.get("valid/total")})
    valid_ranks = _load(run / "cells" / first / "valid_ranks.json") if first else None
    if valid_ranks:
        # Each point's own 95% interval over the validation users (their target ranks at that step): the
        # chart and the table show how much of a step-to-step move the users' sample alone could make.
        from .evaluation import bootstrap_ci, per_example_metrics

        for pt in curve:
            r = valid_ranks.get(str(pt["step"]))
            if r:
                pt["valid_ndcg@10_ci95"] = list(bootstrap_ci(per_example_metrics(r, (10,))["ndcg@10"]))
    cfg = _load_yaml(run / "config.yaml")
    if cfg:
        n_teacher = (top.get("fisher") or {}).get("scores")
        headline["measured"]["layers"] = f"{len(n_teacher) if n_teacher else '?'} -> {cfg['student']['num_layers']}"
    transfer = {}
    t = _load(run / "transfer" / "results.json")
    if t:
        transfer = {"cell": (t.get("transfer") or {}).get("cell"), "data": t.get("transfer"), "rankers": {}}
        for name, res in [
            *(t.get("baselines") or {}).items(),
            *((k, t[k]) for k in ("teacher_zero_shot", "teacher", "student") if k in t),
        ]:
            transfer["rankers"][name] = {k: res.get(k) for k in (*METRICS, "n", "ci95")}
            if isinstance(res.get("random_ties"), Mapping):
                ties = res["random_ties"]
                transfer["rankers"][f"{name}_random_ties"] = {
                    "targets_tied": res.get("targets_tied"),
                    **{k: ties.get(k) for k in (*METRICS, "n", "ci95")},
                }
        transfer["paired"] = {k: v.get("ndcg@10") for k, v in (t.get("paired") or {}).items()}
    data = {
        "run": str(run),
        "transfer": transfer,
        "setup": {
            "data": {
                **(
                    {k: cfg.get("data", {}).get(k) for k in ("source", "reviews", "category", "num_candidates", "seed")}
                    if cfg
                    else {}
                ),
                # the category the data really had (the config's is a default for sources naming their own)
                **{k: v for k, v in (top.get("data") or {}).items() if k in ("category", "users", "items") and v},
            },
            "test_users": config.get("examples"),
            "formulation": config.get("formulation"),
            "teacher": (cfg.get("teacher") or {}).get("model") if cfg else None,
            "adapted": "teacher_zero_shot" in top,
            "budget": {
                k: (cfg.get("train") or {}).get(k) for k in ("max_steps", "micro_batch_size", "grad_accum", "lr")
            }
            if cfg
            else {},
        },
        "rankers": rankers,
        "paired": pairs,
        "h1": h1,
        "h3": h3,
        "selection": selection_pairs,
        "headline": headline,
        # the teacher each cell was distilled from (cell.json; cells finished before it was recorded have none)
        "cell_teachers": {n: t for n in cells if (t := _load(run / "cells" / n / "cell.json").get("teacher"))},
        # the software and CPU each cell ran on (results.json; cells finished before it was recorded have none)
        "cell_environments": {
            n: e for n in cells if (e := _load(run / "cells" / n / "results.json").get("environment"))
        },
        "curve": {
            "cell": first,
            "points": curve,
            **plateau(curve, ranks=valid_ranks),
        },
        "speed_memory": {
            # the cell whose student the final evaluation loaded (older runs: the first cell)
            "measured_on": top.get("final_student_cell") or (order[0] if order else None),
            "speedup": comparison.get("speedup"),
            "memory_reduction": (comparison.get("memory_reduction") or {}).get("memory_model_bytes"),
        },
        "wall_s": _wall(run, order),
    }
    data["budget"] = budget_check(run, cfg, cells, n_boot)
    data["goals"] = goals(data)
    return data


def budget_reference_dir(run: Path, ref_s: str) -> Path:
    """The ``ablation.budget_reference`` run folder (or a sibling of ``run`` of that name, for a path given
    relative to another working directory); FileNotFoundError when it holds no ablation run."""
    ref = Path(ref_s)
    if not ref.is_dir() and not ref.is_absolute() and (run.parent / ref.name).is_dir():
        ref = run.parent / ref.name
    if not (ref / "config.yaml").is_file():
        raise FileNotFoundError(f"ablation.budget_reference={ref_s}: no finished ablation run there (no config.yaml)")
    return ref


def budget_check(run: Path, cfg: Mapping[str, Any], cells: Sequence[str], n_boot: int = 1000) -> dict[str, Any]:
    """Each cell's paired test NDCG@10 difference between this run and ``ablation.budget_reference``.

    The reference is a finished ablation of the same cells on the same users and candidates with another
    step budget. On every test user this sees a change the learning curve's few dozen validation users
    cannot (their noise is a few hundredths). {} without a reference; a reference that cannot be read or
    whose examples differ is an error naming it.
    """
    from .evaluation import compare_per_example

    ref_s = ((cfg or {}).get("ablation") or {}).get("budget_reference") or ""
    if not ref_s:
        return {}
    ref = budget_reference_dir(run, ref_s)
    ref_cfg = _load_yaml(ref / "config.yaml")
    steps = ((cfg.get("train") or {}).get("max_steps"), (ref_cfg.get("train") or {}).get("max_steps"))
    out: dict[str, Any] = {"reference": str(ref), "steps": list(steps), "cells": []}
    for name in cells:
        a = _per_example(run / "cells" / name, _load(run / "cells" / name / "results.json"), "student")
        b = _per_example(ref / "cells" / name, _load(ref / "cells" / name / "results.json"), "student")
        if a is None or b is None:
            continue
        d = compare_per_example(a, b, ks=(10,), n_boot=n_boot)
        out["cells"].append({"cell": name, "n": d["n"], "ndcg@10": d["metrics"]["ndcg@10"]})
    return out


def _load_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    import yaml

    return yaml.safe_load(path.read_text()) or {}


COMPUTE_BUDGET_S = 5 * 3600.0


def _wall(run: Path, cells: Sequence[str]) -> dict[str, Any]:
    """Wall seconds per stage over every sitting, and their total against the 5-hour budget.

    Each stage's figure is the larger of its compute-ledger entry (``compute.json``: every sitting's
    seconds that did work on it, added as they ran, also for a sitting stopped in the middle of the
    stage) and its own files, which count only the sitting that finished it: ``zero_shot/results.json``,
    ``adapt/summary.json`` (steps x seconds per step + load + export), ``cells/<name>/cell.json``,
    ``transfer/results.json`` and the final evaluation's timings. A stage neither records is listed as
    not recorded, so the total is a lower bound then and says so.

    ``compute.json``'s ``lost`` section (``{"note": why, "stages": {name: {"wall_s", "sittings"}}}``, written by
    hand) holds sittings whose outputs were lost before they were committed (a machine reset: student folders,
    cache and uncommitted cells are untracked) and done again: the results come from the redone work, which
    is in ``stages``; the lost seconds are reported beside the total, not in it.
    """
    raw = _load(run / "compute.json")
    ledger = raw.get("stages") or {}
    lost_section = raw.get("lost") or {}
    lost = []
    for name, e in (lost_section.get("stages") or {}).items():
        seconds = e.get("wall_s") if isinstance(e, dict) else None
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
            raise ValueError(
                f"{run / 'compute.json'}: lost.stages.{name} needs wall_s, a number of seconds >= 0; got {e!r}"
            )
        lost.append({"stage": name, "wall_s": float(seconds), "sittings": int(e.get("sittings", 1))})
    top = _load(run / "results.json")
    timings = top.get("timings") or {}
    summary = _load(run / "adapt" / "summary.json")
    fallbacks: dict[str, tuple[float | None, str]] = {
        "fisher_zero_shot": (
            (_load(run / "zero_shot" / "results.json").get("timings") or {}).get("total_s"),
            "zero_shot/results.json",
        ),
        "adapt": (
            (
                summary["seconds_per_step"] * summary["steps"]
                + summary.get("base_load_s", 0)
                + summary.get("export_s", 0)
            )
            if summary.get("complete") and summary.get("seconds_per_step")
            else None,
            "adapt/summary.json",
        ),
        "fisher": (timings.get("fisher_s"), "results.json timings"),
        **{f"cell:{n}": (_load(run / "cells" / n / "cell.json").get("wall_s"), f"cells/{n}/cell.json") for n in cells},
        "transfer": (
            (_load(run / "transfer" / "results.json").get("timings") or {}).get("total_s"),
            "transfer/results.json",
        ),
        "final_evaluation": (
            sum(v for k, v in timings.items() if k.startswith("eval_")) or None,
            "results.json timings (eval_*)",
        ),
    }
    wanted = ["fisher_zero_shot", "adapt", "fisher", *(f"cell:{n}" for n in cells), "transfer", "final_evaluation"]
    if not summary:
        wanted.remove("adapt")
    if not (run / "zero_shot").is_dir() and "fisher_zero_shot" not in ledger:
        wanted.remove("fisher_zero_shot")
    if not (run / "transfer").is_dir() and "transfer" not in ledger:
        wanted.remove("transfer")
    stages = []
    for name in [*wanted, *(n for n in ledger if n not in wanted)]:
        seconds, source = fallbacks.get(name, (None, ""))
        entry = ledger.get(name)
        # The larger of the two: a ledger entry holds every sitting since the ledger existed, a stage's
        # own file only the sitting that finished it (and a stage begun before the ledger is in neither whole).
        if entry is not None and (seconds is None or entry["wall_s"] >= seconds):
            seconds, source = entry["wall_s"], f"compute.json ({entry['sittings']} sittings)"
        stages.append({"stage": name, "wall_s": seconds, "source": source if seconds is not None else "not recorded"})
    total = sum(s["wall_s"] for s in stages if s["wall_s"] is not None)
    missing = [s["stage"] for s in stages if s["wall_s"] is None]
    # The teacher cache is built once, by the first cell; a cell that built it again ran in a later sitting
    # that did not have it (a fresh checkout: the cache is not committed). Inside those cells' figures.
    builds = []
    for n in cells:
        res = _load(run / "cells" / n / "results.json")
        seconds = (res.get("timings") or {}).get("teacher_cache_s")
        if (res.get("teacher_cache") or {}).get("built_examples_rank0") and seconds:
            builds.append({"cell": n, "seconds": float(seconds)})
    # Teacher scores read from another run (eval.reuse_teacher_scores; the transfer check reads that run's
    # transfer check): computed there, not in this ledger.
    transfer = _load(run / "transfer" / "results.json")
    reused = [
        {
            "model": name if stage == "final_evaluation" else f"{name} (transfer check)",
            "from": r["reused_from"],
            "seconds": r.get("reused_compute_s"),
            "check": r["reuse_check"],
        }
        for stage, res in (("final_evaluation", top), ("transfer", transfer))
        for name, r in ((n, res.get(n) or {}) for n in ("teacher_zero_shot", "teacher"))
        if r.get("reuse_check") is not None and r.get("reused_from")
    ]
    reused_s = sum(x["seconds"] or 0.0 for x in reused)
    return {
        "stages": stages,
        "total_s": total,
        "reused": reused,
        "reused_s": reused_s,
        "total_with_reused_s": total + reused_s,
        "within_budget_with_reused": total + reused_s <= COMPUTE_BUDGET_S,
        "cache_builds": builds,
        "lost": lost,
        "lost_s": sum(x["wall_s"] for x in lost),
        "lost_note": str(lost_section.get("note", "")),
        "cache_rebuild_s": sum(b["seconds"] for b in builds[1:]),
        "complete": not missing,
        "not_recorded": missing,
        "budget_s": COMPUTE_BUDGET_S,
        "within_budget": total <= COMPUTE_BUDGET_S,
        "cells_s": {n: next(s["wall_s"] for s in stages if s["stage"] == f"cell:{n}") for n in cells},
    }


def plateau(
    points: Sequence[Mapping[str, Any]],
    tolerance: float = 0.02,
    ranks: Mapping[str, Sequence[int]] | None = None,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Has validation NDCG@10 stopped rising by the end of the step budget?

    With ``ranks`` (the cell's ``valid_ranks.json``: each validation user's target rank at each point)
    the verdict is paired over the last quarter of the budget: the rise from the point at three quarters of
    it (the last at or before it) to the last point, user by user, with its 95% bootstrap interval.
    ``plateau`` is true when the interval lies below ``tolerance`` and holds 0 (no rise the users can tell
    from none, and none as large as the tolerance), false when it lies above 0 (still rising), and None
    otherwise (too few users to tell); ``paired`` holds the figures. ``paired_half`` gives the rise from the
    point at half the budget (the first at or after it) to the last, for information. Why both conditions:
    the experiment's 300-step curves rose by less than the tolerance over their last quarter, significantly
    above 0, and those students still gained 0.026-0.037 test NDCG@10 from more training
    (``results/probes.md``).

    Without them (runs written before the ranks were kept): true when the last point is within
    ``tolerance`` of the best one and the points of the second half rise by less than ``tolerance``
    (least-squares slope x the half's length). With a few dozen validation users the curve moves by a
    few hundredths from noise alone, so a tolerance below that would call noise a trend.
    """
    if len(points) < 3:
        return {"plateau": None, "reason": f"{len(points)} validation points; at least 3 are needed"}
    steps = np.array([p["step"] for p in points], dtype=float)
    vals = np.array([p["valid_ndcg@10"] for p in points], dtype=float)
    half = steps >= (steps[0] + steps[-1]) / 2
    if half.sum() >= 2:
        slope = float(np.polyfit(steps[half], vals[half], 1)[0])
        rise = slope * float(steps[half][-1] - steps[half][0])
    else:
        rise = 0.0
    gap = float(vals.max() - vals[-1])
    flat = gap <= tolerance and rise < tolerance
    out: dict[str, Any] = {
        "plateau": bool(flat),
        "best_step": int(steps[int(vals.argmax())]),
        "best": float(vals.max()),
        "last": float(vals[-1]),
        "rise_second_half": rise,
        "tolerance": tolerance,
    }
    last = int(steps[-1])
    half = int(steps[steps >= last / 2][0])  # the point at half the budget (or the first after it)
    quarter = int(steps[steps <= 0.75 * last][-1])  # the point at three quarters of it (or the last before it)

    def paired(start: int) -> dict[str, Any] | None:
        a, b = (ranks or {}).get(str(last)), (ranks or {}).get(str(start))
        if a is None or b is None or start == last or len(a) != len(b) or not a:
            return None
        from .evaluation import paired_bootstrap_ci, per_example_metrics

        na, nb = (per_example_metrics(r, (10,))["ndcg@10"] for r in (a, b))
        lo, hi = paired_bootstrap_ci(na, nb, n_boot=n_boot)
        return {
            "from_step": start,
            "to_step": last,
            "n": len(a),
            "rise": float(na.mean() - nb.mean()),
            "ci95": [lo, hi],
        }

    last_quarter = paired(quarter)
    if last_quarter is not None:
        out["paired"] = last_quarter
        if (second_half := paired(half)) is not None and half != quarter:
            out["paired_half"] = second_half
        lo, hi = last_quarter["ci95"]
        out["plateau"] = False if lo > 0 else True if hi < tolerance else None
        if out["plateau"] is None:
            out["reason"] = (
                f"the rise's interval [{lo:+.4f}, {hi:+.4f}] holds both 0 and the tolerance {tolerance}: "
                f"{last_quarter['n']} validation users are too few to tell"
            )
    return out


def goals(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Issue 11's goal figures, met or not, from the collected figures."""
    out = []
    teacher = "the adapted teacher" if data["setup"].get("adapted") else "the teacher"
    layers = str(data["headline"]["measured"].get("layers") or "")
    student = f"{layers.split('->')[-1].strip()}-layer student" if "->" in layers else "student"
    pair = next((p for p in data["paired"] if p["a"] == "teacher" and p["b"] == "popularity"), None)
    if pair and pair.get("ndcg@10"):
        d = pair["ndcg@10"]
        lo = (d.get("ci95") or [float("nan")])[0]
        out.append(
            {
                "goal": f"{teacher} beats popularity (paired NDCG@10 difference above 0)",
                "measured": _diff_cell(d),
                "met": bool(lo > 0),
            }
        )
    m = data["headline"]["measured"]
    # Any student counts, the task-loss-only one included (the goal is about the student, not the method);
    # runs recorded before best_student_cell existed fall back to the best distilled cell.
    if m.get("retention_ndcg@10_best_student") is not None:
        value, ci, cell = m["retention_ndcg@10_best_student"], m["retention_ci95_best_student"], m["best_student_cell"]
    else:
        value, ci, cell = m.get("retention_ndcg@10_best"), m.get("retention_ci95_best"), m.get("best_cell")
    if value is not None:
        out.append(
            {
                "goal": f"the best {student} keeps at least 95% of {teacher}'s NDCG@10",
                "measured": f"{_fmt_ci(value, ci, 3)} ({cell})",
                "met": bool(value >= 0.95),
            }
        )
    return out


def _ties_note(rankers: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """What the ``*_random_ties`` rows are, and how often the target's count was tied."""
    return [
        f"\n{name}: the `{name[: -len('_random_ties')]}` counts with ties broken at random (the exact expectation "
        f"per user) instead of against the target; {r['targets_tied']:.1%} of the targets share their count with "
        "another candidate."
        for name, r in rankers.items()
        if name.endswith("_random_ties") and r.get("targets_tied") is not None
    ]


def _diff_cell(d: Mapping[str, Any] | None) -> str:
    if not d:
        return "n/a"
    ci = d.get("ci95") or [None, None]
    return _fmt_ci(d.get("difference"), ci)


def write_ablation_report(run_dir: str | Path, n_boot: int = 1000) -> tuple[Path, Path]:
    """``ablation_report.md`` + ``ablation.json`` (+ charts) in ``run_dir``; returns (md, json) paths."""
    run = Path(run_dir)
    data = collect(run, n_boot)
    (run / "ablation.json").write_text(json.dumps(data, indent=2, default=str))
    s = data["setup"]
    lines = [
        "# Ablation: layer selection x layer-loss weighting, one teacher, same budget",
        "",
        f"- data: {s['data'].get('source')} {s['data'].get('category') or ''} ({Path(s['data']['reviews']).name if s['data'].get('reviews') else 'embedded'}), "
        f"{s['test_users']} test users, {s['data'].get('num_candidates')} candidates each, seed {s['data'].get('seed')}",
        f"- teacher: {s['teacher']} ({'adapted' if s['adapted'] else 'zero-shot'}), {s['formulation']} formulation",
        f"- budget per student: {s['budget']}",
        "- every figure: 95% bootstrap interval over users; differences: paired bootstrap over the same users",
        "",
        "## Every ranker on the same users",
        "",
        "| ranker | teacher layers | NDCG@10 | HR@10 | MRR | NDCG@10 retained vs teacher |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in data["rankers"].items():
        ci = r.get("ci95") or {}
        retained = "" if "retention_ndcg@10" not in r else _fmt_ci(r["retention_ndcg@10"], r["retention_ci95"], 3)
        layers = r.get("teacher_layers") or ""
        lines.append(
            f"| {name} | {layers} | {_fmt_ci(r.get('ndcg@10'), ci.get('ndcg@10'))} | "
            f"{_fmt_ci(r.get('hr@10'), ci.get('hr@10'))} | {_fmt_ci(r.get('mrr'), ci.get('mrr'))} | {retained} |"
        )
    lines += _ties_note(data["rankers"])
    for x in data["wall_s"].get("reused") or []:
        check = x.get("check") or {}
        lines += [
            "",
            f"{x['model']}: its scores are read from `{x['from']}` (an earlier run's, the same users and candidates), "
            f"not computed again; loaded here, it scored {check.get('examples', '?')} "
            f"examples of its first batches as the file does (max |difference| {check.get('max_abs_diff', float('nan')):.2g}).",
        ]
    teachers = data.get("cell_teachers") or {}
    if len(set(teachers.values())) > 1:
        groups: dict[str, list[str]] = {}
        for name, ident in teachers.items():
            groups.setdefault(ident, []).append(name)
        lines += [
            "",
            f"**Mixed teachers**: the cells were distilled from {len(groups)} different teachers (by the contents of "
            "their weights, `cell.json`): "
            + "; ".join(f"{', '.join(names)} from `{ident}`" for ident, names in groups.items())
            + ". Compare the cells with that in mind.",
        ]
    lines += _environments_note(data.get("cell_environments") or {})
    sm = data["speed_memory"]
    if sm["measured_on"] and sm["speedup"] is not None:
        mem = sm["memory_reduction"]
        lines += [
            "",
            f"Speed and memory: every student has the same architecture ({data['headline']['measured']['layers']} "
            f"layers of the teacher), so they are measured once, on {sm['measured_on']}'s student beside the teacher "
            f"in one process: rec-scoring speedup {sm['speedup']:.2f}x, memory reduction (parameters + buffers) "
            f"{'n/a' if mem is None else f'{mem:.1%}'}.",
        ]
    lines += [
        "",
        "## Paired differences (NDCG@10, a - b)",
        "",
        "| question | a | b | difference [95% CI] |",
        "|---|---|---|---|",
    ]
    for p in data["paired"]:
        lines.append(f"| {p['question']} | {p['a']} | {p['b']} | {_diff_cell(p['ndcg@10'])} |")
    lines += ["", "## H3: Fisher-weighted layer losses vs linear / uniform (per layer selection)", ""]
    lines += ["| selection | a | b | NDCG@10 a - b [95% CI] | verdict |", "|---|---|---|---|---|"]
    for p in data["h3"]:
        lines.append(f"| {p['selection']} | {p['a']} | {p['b']} | {_diff_cell(p['ndcg@10'])} | {p['verdict']} |")
    if data["selection"]:
        lines += ["", "## Layer selection (per weighting)", ""]
        lines += ["| weighting | a | b | NDCG@10 a - b [95% CI] | verdict |", "|---|---|---|---|---|"]
        for p in data["selection"]:
            lines.append(f"| {p['weighting']} | {p['a']} | {p['b']} | {_diff_cell(p['ndcg@10'])} | {p['verdict']} |")
    lines += _multiplicity(len(data["h3"]) + len(data["selection"]))
    lines += ["", "## H1: where the Fisher mass sits", ""]
    for label, h in data["h1"].items():
        if label == "note":
            lines.append(f"- {h}")
            continue
        rho = h["spearman_block_influence"]
        lines.append(
            f"- {label} teacher: top 30% of depth {h['top30_share']:.1%}, bottom 30% {h['bottom30_share']:.1%} "
            f"-> {h['verdict']}; top layers {h['top_layers']}; "
            f"Spearman(Fisher, Block Influence) {'n/a' if rho is None else f'{rho:+.3f}'}"
        )
    m, o = data["headline"]["measured"], data["headline"]["original"]
    lines += ["", "## The Layerwise-Adapter headline beside the measurement", ""]
    lines += ["| | original (32 -> 8) | measured |", "|---|---|---|"]
    ret = (
        "n/a"
        if m["retention_ndcg@10_best"] is None
        else _fmt_ci(m["retention_ndcg@10_best"], m["retention_ci95_best"], 3)
    )
    lines.append(f"| quality retained (NDCG@10, best distilled cell {m['best_cell']}) | {o['retention']:.0%} | {ret} |")
    speed, mem = m["speedup"], m["memory_reduction"]
    speed_s = "n/a" if speed is None else f"{speed:.2f}x"
    mem_s = "n/a" if mem is None else f"{mem:.1%}"
    lines.append(f"| rec-scoring speedup | {o['speedup']}x | {speed_s} |")
    lines.append(f"| memory reduction (parameters + buffers) | {o['memory_reduction']:.0%} | {mem_s} |")
    lines.append(f"| layers | {o['layers']} | {m['layers']} |")
    if data["goals"]:
        lines += ["", "## Goal figures", "", "| goal | measured | met |", "|---|---|---|"]
        for g in data["goals"]:
            lines.append(f"| {g['goal']} | {g['measured']} | {'yes' if g['met'] else 'no'} |")
    curve = data["curve"]
    if curve["points"]:
        lines += ["", f"## Learning curve ({curve['cell']}, validation users)", ""]
        lines += ["| step | valid NDCG@10 [95% CI] | valid loss |", "|---|---|---|"]
        for pt in curve["points"]:
            loss = pt["valid_total"]
            ci = pt.get("valid_ndcg@10_ci95")
            value = f"{pt['valid_ndcg@10']:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")
            lines.append(f"| {pt['step']} | {value} | {'n/a' if loss is None else f'{loss:.4f}'} |")
        paired = curve.get("paired")
        if paired:
            lo, hi = paired["ci95"]
            verdict = {True: "reached", False: "not reached", None: "not decided"}[curve["plateau"]]
            half = curve.get("paired_half")
            lines += [
                "",
                f"Plateau: {verdict}. Rise of validation NDCG@10 over the last quarter of the budget, from step "
                f"{paired['from_step']} to step {paired['to_step']}, paired over the same {paired['n']} validation "
                f"users: {paired['rise']:+.4f} [{lo:+.4f}, {hi:+.4f}] (95% bootstrap interval); reached means the "
                f"interval holds 0 and lies below the tolerance {curve['tolerance']}, not reached that it lies above 0."
                + (f" {curve['reason']}." if curve.get("reason") else "")
                + (
                    f" From step {half['from_step']} (half the budget): {half['rise']:+.4f} "
                    f"[{half['ci95'][0]:+.4f}, {half['ci95'][1]:+.4f}]."
                    if half
                    else ""
                ),
            ]
        elif curve.get("plateau") is None:
            lines += ["", f"Plateau: not judged ({curve.get('reason')})."]
        else:
            lines += [
                "",
                f"Plateau: {'no rise beyond the noise' if curve['plateau'] else 'not reached'} (best {curve['best']:.4f} at step "
                f"{curve['best_step']}, last {curve['last']:.4f}; rise over the second half of the budget "
                f"{curve['rise_second_half']:+.4f}; tolerance {curve['tolerance']}: below it the validation "
                "sample's noise, not training, moves the curve).",
            ]
    bud = data.get("budget") or {}
    if bud:
        here, there = bud["steps"]
        lines += ["", f"## Step budget: {here} steps here against {there} in {bud['reference']} (test users)", ""]
        lines += ["| cell | NDCG@10 here | NDCG@10 there | here - there [95% CI] | verdict |", "|---|---|---|---|---|"]
        for c in bud["cells"]:
            d = c["ndcg@10"]
            lo, hi = d["ci95"]
            lines.append(
                f"| {c['cell']} | {d['a']:.4f} | {d['b']:.4f} | {_diff_cell(d)} | "
                f"{_verdict(lo, hi, f'{here} steps', f'{there} steps')} |"
            )
        lines += _multiplicity(len(bud["cells"]))
        lines += [
            "",
            "Paired over every test user, this is a finer check of the plateau than the learning curve above: "
            "an interval that excludes 0 means the students had not stopped improving at the smaller budget.",
        ]
    tr = data.get("transfer") or {}
    if tr:
        d = tr.get("data") or {}
        lines += ["", f"## Transfer check: {d.get('source')} {d.get('category') or ''} (cell {tr['cell']})", ""]
        lines += ["| ranker | NDCG@10 | HR@10 | MRR | users |", "|---|---|---|---|---|"]
        for name, r in tr["rankers"].items():
            ci = r.get("ci95") or {}
            lines.append(
                f"| {name} | {_fmt_ci(r.get('ndcg@10'), ci.get('ndcg@10'))} | {_fmt_ci(r.get('hr@10'), ci.get('hr@10'))}"
                f" | {_fmt_ci(r.get('mrr'), ci.get('mrr'))} | {r.get('n')} |"
            )
        lines += _ties_note(tr["rankers"])
        for pair, d in tr.get("paired", {}).items():
            if d and pair.startswith("student - "):
                lines.append(f"\n- {pair} (NDCG@10, paired): {_diff_cell(d)}")
    wall = data["wall_s"]
    lines += ["", "## Compute (wall time, 2 ranks, every sitting)", "", "| stage | wall s | from |", "|---|---|---|"]
    for st in wall["stages"]:
        sec = "not recorded" if st["wall_s"] is None else f"{st['wall_s']:,.0f}"
        lines.append(f"| {st['stage']} | {sec} | {st['source']} |")
    bound = "" if wall["complete"] else f" (a lower bound: {', '.join(wall['not_recorded'])} not recorded)"
    lines += [
        "",
        f"Total: {wall['total_s']:,.0f} s = {wall['total_s'] / 3600:.2f} h{bound}; budget "
        f"{wall['budget_s'] / 3600:.0f} h: {'within' if wall['within_budget'] else 'over'}.",
        "",
    ]
    reused = wall.get("reused") or []
    if reused:
        unknown = [x["model"] for x in reused if x["seconds"] is None]
        with_reused = wall["total_with_reused_s"]
        lines += [
            "Not in the total: the scores of "
            + ", ".join(
                f"{x['model']} ({x['from']}, scored there in "
                + ("an unrecorded time" if x["seconds"] is None else f"{x['seconds']:,.0f} s")
                + ")"
                for x in reused
            )
            + " were read from an earlier run's per-example files of the same users and candidates (each teacher, "
            "loaded here, scored its first batch as the file does). Counting them, a run "
            f"from scratch takes {with_reused:,.0f} s = {with_reused / 3600:.2f} h"
            + (f" or more ({', '.join(unknown)} unrecorded)" if unknown else "")
            + f": {'within' if wall['within_budget_with_reused'] else 'over'} the budget.",
            "",
        ]
    builds = wall.get("cache_builds") or []
    if len(builds) > 1:
        once = wall["total_s"] - wall["cache_rebuild_s"]
        lines += [
            f"The teacher cache was built {len(builds)} times ("
            + ", ".join(f"{b['cell']} {b['seconds']:,.0f} s" for b in builds)
            + f"): the first is the design, the others rebuilt it in sittings on fresh checkouts, which do not "
            f"have the uncommitted cache. They are in the total above; without them it is {once:,.0f} s = "
            f"{once / 3600:.2f} h.",
            "",
        ]
    lost = wall.get("lost") or []
    if lost:
        spent = wall["total_s"] + wall["lost_s"]
        lines += [
            f"Not in the total either: {wall['lost_s']:,.0f} s of work whose outputs were lost before they were "
            "committed, and done again ("
            + ", ".join(f"{x['stage']} {x['wall_s']:,.0f} s" for x in lost)
            + "; `compute.json`, `lost`"
            + (f": {wall['lost_note']}" if wall.get("lost_note") else "")
            + f"). Everything this run spent, those included: {spent:,.0f} s = {spent / 3600:.2f} h.",
            "",
        ]
    _charts(data, run)
    lines += ["![quality](ablation_quality.png)", ""]
    if curve["points"]:
        lines += ["![curve](ablation_curve.png)", ""]
    md = run / "ablation_report.md"
    md.write_text("\n".join(lines))
    return md, run / "ablation.json"


def _environments_note(envs: Mapping[str, Mapping[str, str]]) -> list[str]:
    """A note when the cells ran on other software or CPUs (sittings on other machines): which keys differ and
    which cells had which value. Nothing when they all agree (``platform`` aside: a kernel update alone changes
    no number) or none recorded it."""
    keys = sorted({k for e in envs.values() for k in e} - {"platform"})
    differ = [k for k in keys if len({e.get(k, "(none)") for e in envs.values()}) > 1]
    if not differ:
        return []
    parts = []
    for k in differ:
        groups: dict[str, list[str]] = {}
        for name, e in envs.items():
            groups.setdefault(e.get(k, "(none)"), []).append(name)
        parts.append(f"{k}: " + "; ".join(f"{v} ({', '.join(names)})" for v, names in groups.items()))
    return [
        "",
        f"**Cells on other environments** ({len(envs)} cells recorded one): "
        + " | ".join(parts)
        + ". On another environment the same computation can differ in the last bits of its floats (other "
        "kernels, other summation orders), which training can amplify: compare those cells with that in mind.",
    ]


def _charts(data: Mapping[str, Any], run: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = list(data["rankers"])
    vals = [data["rankers"][n].get("ndcg@10") or 0 for n in names]
    ci = [(data["rankers"][n].get("ci95") or {}).get("ndcg@10") or [v, v] for n, v in zip(names, vals)]
    err = np.array([[max(0, v - c[0]) for v, c in zip(vals, ci)], [max(0, c[1] - v) for v, c in zip(vals, ci)]])
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(names)), 4))
    colors = {"baseline": "#999999", "teacher": "#1f77b4", "student": "#2ca02c"}
    ax.bar(range(len(names)), vals, yerr=err, capsize=3, color=[colors[data["rankers"][n]["kind"]] for n in names])
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_ylabel("NDCG@10 (95% bootstrap interval)")
    ax.set_title("Every ranker on the same test users")
    fig.tight_layout()
    fig.savefig(run / "ablation_quality.png", dpi=120)
    plt.close(fig)
    points = data["curve"]["points"]
    if points:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        steps = [p["step"] for p in points]
        vals = [p["valid_ndcg@10"] for p in points]
        if all(p.get("valid_ndcg@10_ci95") for p in points):
            err = [
                [v - p["valid_ndcg@10_ci95"][0] for v, p in zip(vals, points)],
                [p["valid_ndcg@10_ci95"][1] - v for v, p in zip(vals, points)],
            ]
            ax.errorbar(steps, vals, yerr=err, marker="o", capsize=3)
            ax.set_ylabel("validation NDCG@10 (95% bootstrap interval)")
        else:
            ax.plot(steps, vals, marker="o")
            ax.set_ylabel("validation NDCG@10")
        ax.set_xlabel("training step")
        title = f"Learning curve: {data['curve']['cell']}"
        paired = data["curve"].get("paired")
        if paired:  # the verdict is paired user by user, far tighter than the points' own intervals
            lo, hi = paired["ci95"]
            title += (
                f"\nsteps {paired['from_step']}->{paired['to_step']}, paired over users: "
                f"{paired['rise']:+.4f} [{lo:+.4f}, {hi:+.4f}]"
            )
        ax.set_title(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(run / "ablation_curve.png", dpi=120)
        plt.close(fig)
