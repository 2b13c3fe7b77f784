"""Teacher-vs-student report: a markdown file, a PNG chart and the plain-text table the CLI prints.

``results`` is a dict::

    {
        "teacher": {...},         # evaluate_model(...) | measure_cost(...) of the teacher
        "student": {...},         # the same for the student (one of the two may be missing)
        "comparison": {...},      # optional: evaluation.compare(teacher, student), computed when absent
        "fisher": FisherProfile or its dict,   # optional
        "title": "...",           # optional
        "notes": ["..."],         # optional free lines (setup, caveats)
    }

Figures that were not measured (``None``) are printed as "n/a", never filled in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from layerwise_dist.evaluation import LATENCY_KEY, QUALITY_PREFIXES, compare

COST_ROWS = (
    ("latency_ms_per_example_median", "latency per example, median (ms)"),
    ("latency_ms_per_batch_median", "latency per batch, median (ms)"),
    ("throughput_examples_per_s", "throughput (examples/s)"),
    ("num_parameters", "parameters"),
    ("memory_model_bytes", "parameter + buffer memory (MiB)"),
    ("cuda_peak_allocated_bytes", "CUDA peak allocated (MiB)"),
    ("cpu_peak_rss_increase_bytes", "CPU peak RSS increase during inference (MiB)"),
    ("cpu_peak_rss_bytes", "CPU process peak RSS (MiB, whole process)"),
)


def _fmt(value: Any, key: str = "") -> str:
    if value is None:
        return "n/a"
    if key.endswith("_bytes"):
        return f"{value / 2**20:,.1f}"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if abs(value) <= 1:
            return f"{value:.4f}"
        return f"{value:,.2f}" if abs(value) < 1000 else f"{value:,.1f}"
    return str(value)


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)  # NaN: matplotlib draws no bar


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _quality_keys(teacher: Mapping[str, Any], student: Mapping[str, Any]) -> list[str]:
    keys = {k for side in (teacher, student) for k in side if k.startswith(QUALITY_PREFIXES)}
    order = {"hr@": 0, "ndcg@": 1, "mrr": 2}
    return sorted(
        keys, key=lambda k: (order[next(p for p in order if k.startswith(p))], int(k.split("@")[1]) if "@" in k else 0)
    )


def _sides(results: Mapping[str, Any]) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """(teacher, student) metric dicts; one of them may be missing (then shown as n/a)."""
    teacher, student = results.get("teacher") or {}, results.get("student") or {}
    if not teacher and not student:
        raise KeyError("results needs a 'teacher' or 'student' metric dict (or both)")
    return teacher, student


def _comparison(results: Mapping[str, Any]) -> dict[str, Any]:
    return dict(results.get("comparison") or compare(*_sides(results)))


def _rows(results: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    """(name, teacher, student, student relative to teacher) rows shared by the text and markdown tables."""
    teacher, student = _sides(results)
    comp = _comparison(results)
    rows = []
    for key in _quality_keys(teacher, student):
        retained = comp.get("retained", {}).get(key)
        rows.append(
            (
                key.upper() if key == "mrr" else key.replace("hr", "HR").replace("ndcg", "NDCG"),
                _fmt(teacher.get(key)),
                _fmt(student.get(key)),
                f"{_pct(retained)} retained" if key in teacher and key in student else "",
            )
        )
    if "n" in teacher or "n" in student:
        rows.append(("examples", _fmt(teacher.get("n")), _fmt(student.get("n")), ""))
    memory = comp.get("memory_reduction", {})
    for key, name in COST_ROWS:
        if teacher.get(key) is None and student.get(key) is None:
            continue
        rel = ""
        if key == LATENCY_KEY and comp.get("speedup") is not None:
            rel = f"{comp['speedup']:.2f}x faster"
        elif key in memory:
            rel = f"{_pct(memory[key])} less"
        elif key == "num_parameters" and comp.get("parameter_reduction") is not None:
            rel = f"{_pct(comp['parameter_reduction'])} fewer"
        rows.append((name, _fmt(teacher.get(key), key), _fmt(student.get(key), key), rel))
    return rows


def results_table(results: Mapping[str, Any]) -> str:
    """Plain-text teacher/student table (what the CLI prints)."""
    header = ("metric", "teacher", "student", "student vs teacher")
    rows = [header, *_rows(results)]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for n, row in enumerate(rows):
        lines.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


#: Rankers in the order the quality table shows them, with their human names.
RANKERS = (
    ("random", "random (exact expectation)"),
    ("popularity", "popularity (train counts)"),
    ("teacher_zero_shot", "teacher, zero-shot"),
    ("teacher", "teacher"),
    ("student", "student"),
)


def _ranker_metrics(results: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    adapted = "teacher_zero_shot" in results
    out = []
    for key, name in RANKERS:
        metrics = (results.get("baselines") or {}).get(key) or results.get(key)
        if isinstance(metrics, Mapping) and "n" in metrics:
            out.append((f"{name}{', adapted' if key == 'teacher' and adapted else ''}", metrics))
            ties = metrics.get("random_ties") if key == "popularity" else None
            if isinstance(ties, Mapping) and "n" in ties:  # counts tie often: the same ranker, ties at random
                out.append((f"popularity, ties at random ({metrics.get('targets_tied', 0):.0%} of targets tied)", ties))
    return out


def _with_ci(metrics: Mapping[str, Any], key: str) -> str:
    if key not in metrics:
        return "n/a"
    lo_hi = (metrics.get("ci95") or {}).get(key)
    if not lo_hi or lo_hi[0] == lo_hi[1]:
        return f"{metrics[key]:.4f}"
    return f"{metrics[key]:.4f} [{lo_hi[0]:.4f}, {lo_hi[1]:.4f}]"


def quality_rows(results: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """(ranker, NDCG@10 [95% CI], HR@10 [95% CI], MRR [95% CI], users) for every ranker of the run."""
    return [
        (name, _with_ci(m, "ndcg@10"), _with_ci(m, "hr@10"), _with_ci(m, "mrr"), str(m.get("n")))
        for name, m in _ranker_metrics(results)
    ]


def paired_rows(results: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """(a - b, NDCG@10 difference [95% paired CI], HR@10 difference [...]) rows."""
    rows = []
    for pair, metrics in (results.get("paired") or {}).items():
        cells = []
        for key in ("ndcg@10", "hr@10"):
            d = metrics.get(key)
            cells.append("n/a" if d is None else f"{d['difference']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]")
        rows.append((pair, *cells))
    return rows


def quality_table(results: Mapping[str, Any]) -> str:
    """Plain-text table of every ranker with its 95% bootstrap interval over users (what the CLI prints)."""
    rows = quality_rows(results)
    if not rows:
        return ""
    header = ("ranker", "NDCG@10 [95% CI]", "HR@10 [95% CI]", "MRR [95% CI]", "users")
    table = [header, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _profile(fisher: Any) -> Any:
    from layerwise_dist.fisher.profile import FisherProfile

    if isinstance(fisher, FisherProfile):
        return fisher
    if isinstance(fisher, Mapping):
        return FisherProfile(**dict(fisher))
    raise TypeError(f"results['fisher'] must be a FisherProfile or its dict; got {type(fisher).__name__}")


def _fisher_lines(profile: Any, top_k: int = 5) -> list[str]:
    weights = profile.normalized()
    upper, lower = profile.depth_shares()
    lines = [
        "## Fisher profile",
        "",
        f"{profile.num_layers} teacher layers, {profile.form} form, {profile.labels} labels, "
        f"{profile.num_examples} examples{f' ({profile.model_id})' if profile.model_id else ''}.",
        "",
        f"- top layers by Fisher score: {profile.top_layers(min(top_k, profile.num_layers))}",
        f"- depth shares: the upper 30% of layers hold {upper:.1%} of the Fisher mass, the lower 30% hold {lower:.1%}",
    ]
    if profile.block_influence:
        lines.append(
            f"- Spearman(Fisher, Block Influence) = {profile.spearman(profile.block_influence):+.3f} "
            "(Block Influence: 1 - cos(layer input, layer output), ShortGPT)"
        )
    lines.append("")
    lines += _md_table(
        ("layer", "F_l", "share"),
        [(str(i), f"{s:.5g}", f"{w:.2%}") for i, (s, w) in enumerate(zip(profile.scores, weights))],
    )
    return lines + [""]


LOSS_NAMES = {
    "total": "total",
    "kd": "logit KD",
    "list_kd": "list KD (candidate scores)",
    "align": "hidden-state alignment (weighted)",
    "ce": "task cross-entropy",
    "title": "target-title NLL",
    "list": "list CE",
}


def _student_lines(results: Mapping[str, Any]) -> list[str]:
    info = results.get("student_layers") or {}
    if not info.get("layer_map"):
        return []
    lines = [
        "## Student layers and their alignment weights",
        "",
        f"Layer selection `{info.get('selection')}`, layer-loss weighting `{info.get('weighting')}`: student layer i "
        "is initialised from teacher layer `layer_map[i]` and aligned to its output with weight w_i.",
        "",
    ]
    weights = info.get("weights") or []
    rows = [(str(i), str(t), f"{weights[i]:.4f}" if i < len(weights) else "-") for i, t in enumerate(info["layer_map"])]
    return lines + _md_table(("student layer", "teacher layer", "alignment weight"), rows) + [""]


def _history(out: Path) -> list[dict[str, Any]]:
    import json

    path = out / "train_history.json"
    try:
        history = json.loads(path.read_text()) if path.is_file() else []
    except (OSError, ValueError):
        return []
    return [h for h in history if isinstance(h, dict) and "step" in h]


def _training_lines(history: list[dict[str, Any]], chart: str | None) -> list[str]:
    if not history:
        return []
    first, last = history[0], history[-1]
    keys = [k for k in LOSS_NAMES if k in first and k in last]
    lines = [f"## Training ({last['step']} steps)", ""]
    rows = [(LOSS_NAMES[k], f"{first[k]:.4f}", f"{last[k]:.4f}", f"{min(h.get(k, float('inf')) for h in history):.4f}")
            for k in keys]  # fmt: skip
    lines += _md_table(("loss component", f"step {first['step']}", f"step {last['step']}", "lowest"), rows)
    valid = [h for h in history if "valid/total" in h or "valid/ndcg@10" in h]
    if valid:
        lines += ["", "Validation (held-out validation users, every `train.eval_every` steps):", ""]
        cols = [k for k in ("valid/total", "valid/ndcg@10", "valid/hr@10", "valid/mrr") if any(k in h for h in valid)]
        lines += _md_table(
            ("step", *[c.replace("valid/", "") for c in cols]),
            [(str(h["step"]), *[f"{h[c]:.4f}" if c in h else "-" for c in cols]) for h in valid],
        )
    if chart:
        lines += ["", f"![training curves]({chart})"]
    return lines + [""]


def _plot_training(history: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure

    valid = [h for h in history if "valid/ndcg@10" in h]
    fig = Figure(figsize=(11 if valid else 5.5, 4.2))
    axes = fig.subplots(1, 2 if valid else 1)
    ax = axes[0] if valid else axes
    steps = [h["step"] for h in history]
    for key, name in LOSS_NAMES.items():
        if all(key in h for h in history):
            ax.plot(steps, [h[key] for h in history], label=name, lw=1.6 if key == "total" else 1.0)
    ax.set_xlabel("training step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title("training loss components")
    ax.legend(fontsize=7)
    if valid:
        ax = axes[1]
        ax.plot([h["step"] for h in valid], [h["valid/ndcg@10"] for h in valid], marker="o", color="tab:green")
        ax.set_xlabel("training step")
        ax.set_ylabel("validation NDCG@10")
        ax.set_title("validation ranking quality")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _position_bias_lines(results: Mapping[str, Any]) -> list[str]:
    """Per model: where its top-1 candidate sits, and how much its score vectors follow a position profile."""
    rows = []
    for name in ("teacher_zero_shot", "teacher", "student"):
        bias = (results.get(name) or {}).get("position_bias")
        if not bias:
            continue
        shares = bias.get("top1_shares") or []
        letters = [chr(ord("A") + i) if i < 26 else str(i + 1) for i in range(len(shares))]
        top = sorted(range(len(shares)), key=lambda i: -shares[i])[:3]
        spread = ", ".join(f"{letters[i]} {shares[i]:.0%}" for i in top)
        corr = bias.get("profile_correlation_mean")
        rows.append(
            (
                name,
                f"{bias.get('top1_modal_share', 0):.0%} at {letters[bias.get('top1_modal_position', 0)]}"
                f" (chance {bias.get('top1_chance_share', 0):.0%})",
                spread,
                "n/a" if corr is None else f"{corr:+.2f}",
            )
        )
    if not rows:
        return []
    lines = [
        "## Position bias (top-1 candidate position; correlation of score vectors with the mean position profile)",
        "",
    ]
    lines += _md_table(
        ("model", "most common top-1 position", "top-1 positions (largest shares)", "profile correlation"), rows
    )
    return lines + [
        "",
        "_A correlation near 1 and one dominant position: the model scores by position, not by content; "
        "`eval.permutations=P` sums scores over P seeded candidate orders._",
        "",
    ]


def _stage_lines(memory: Mapping[str, Any]) -> list[str]:
    """The run's stages: wall seconds and peak resident set per rank (``results["memory"]``)."""
    stages = memory.get("stages") or {}
    if not stages:
        return []

    def per_rank(values: Sequence[Any], unit: str) -> str:
        return " / ".join("n/a" if v is None else f"{v:,.0f}{unit}" for v in values)

    rows = [
        (name, per_rank(f["wall_s"], " s"), per_rank(f["peak_rss_mib"], " MiB"), per_rank(f["end_rss_mib"], " MiB"))
        for name, f in stages.items()
    ]
    lines = ["## Stages (per rank: rank 0 / rank 1 / ...)", ""]
    lines += _md_table(("stage", "wall time", "peak RSS during the stage", "RSS at its end"), rows)
    return lines + ["", f"_{memory.get('note', '')}_", ""]


def write_report(results: Mapping[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.png`` into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md_path, png_path = out / "report.md", out / "report.png"
    comp = _comparison(results)
    profile = _profile(results["fisher"]) if results.get("fisher") is not None else None

    lines = [f"# {results.get('title') or 'Layerwise distillation: teacher vs student'}", ""]
    for note in results.get("notes") or []:
        lines.append(f"- {note}")
    if results.get("notes"):
        lines.append("")
    quality = quality_rows(results)
    if quality:
        config = results.get("config") or {}
        lines += ["## Ranking quality, every ranker on the same users", ""]
        lines.append(
            f"{config.get('examples', '?')} test users, {config.get('candidates', '?')} candidates each "
            f"({config.get('formulation', 'listwise')} formulation); 95% bootstrap intervals over users."
        )
        lines.append("")
        lines += _md_table(("ranker", "NDCG@10 [95% CI]", "HR@10 [95% CI]", "MRR [95% CI]", "users"), quality)
        lines.append("")
    paired = paired_rows(results)
    if paired:
        lines += ["### Paired differences (same users; 95% paired bootstrap interval)", ""]
        lines += _md_table(("a - b", "NDCG@10", "HR@10"), paired)
        lines.append("")
    lines += ["## Teacher vs student", ""]
    lines += _md_table(("metric", "teacher", "student", "student vs teacher"), _rows(results))
    lines.append("")
    lines += ["## Summary", ""]
    retained = {k: v for k, v in comp.get("retained", {}).items() if v is not None}
    if retained:
        lines.append("- quality retained: " + ", ".join(f"{k} {_pct(v)}" for k, v in retained.items()))
    speedup = comp.get("speedup")
    lines.append(f"- speedup (median latency per example): {'n/a' if speedup is None else f'{speedup:.2f}x'}")
    for key, value in comp.get("memory_reduction", {}).items():
        lines.append(f"- memory reduction ({key}): {_pct(value)}")
    if comp.get("parameter_reduction") is not None:
        lines.append(f"- parameter reduction: {_pct(comp['parameter_reduction'])}")
    for side in ("teacher", "student"):
        missing = (results.get(side) or {}).get("unavailable") or {}
        for key, why in missing.items():
            lines.append(f"- {side} {key}: not measured ({why})")
    if results.get("mlflow_run_id"):
        lines.append(f"- MLflow run: `{results['mlflow_run_id']}`")
    lines.append("")
    lines += _student_lines(results)
    history = _history(out)
    training_png = out / "training.png"
    if history:
        _plot_training(history, training_png)
    lines += _training_lines(history, training_png.name if history else None)
    if profile is not None:
        lines += _fisher_lines(profile)
    lines += _position_bias_lines(results)
    lines += _stage_lines(results.get("memory") or {})
    lines += [f"![comparison]({png_path.name})", ""]
    md_path.write_text("\n".join(lines))
    _plot(results, comp, profile, png_path)
    return md_path, png_path


def _plot(results: Mapping[str, Any], comp: Mapping[str, Any], profile: Any, path: Path) -> None:
    # The object API draws without pyplot and without choosing a backend (a global setting):
    # savefig renders the PNG with Agg whatever backend the caller's process uses.
    from matplotlib.figure import Figure

    teacher, student = _sides(results)
    keys = _quality_keys(teacher, student)
    panels = 3 if profile is not None else 2
    fig = Figure(figsize=(5.2 * panels, 4.2))
    axes = fig.subplots(1, panels)

    ax = axes[0]
    x = range(len(keys))
    for shift, name, side in ((-0.2, "teacher", teacher), (0.2, "student", student)):
        if side:
            ax.bar([i + shift for i in x], [_num(side.get(k)) for k in keys], width=0.4, label=name)
    ax.set_xticks(list(x), keys, rotation=30)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("metric value (higher is better)")
    ax.set_title(f"ranking quality (n={student.get('n', teacher.get('n', '?'))})")
    ax.legend()

    ax = axes[1]
    names, values = [], []
    for key, value in comp.get("retained", {}).items():
        if value is not None:
            names.append(f"{key} kept")
            values.append(value)
    if comp.get("speedup") is not None:
        names.append("speedup (x)")
        values.append(comp["speedup"])
    for key, value in comp.get("memory_reduction", {}).items():
        names.append(f"mem. less: {key.replace('_bytes', '')}")
        values.append(value)
    bars = ax.barh(range(len(names)), values, color="tab:green")
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=7, padding=2)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.invert_yaxis()
    ax.set_xlabel("ratio (student / teacher; 1 = equal)")
    ax.set_title("student relative to teacher")

    if profile is not None:
        ax = axes[2]
        ax.bar(range(profile.num_layers), profile.normalized(), color="tab:purple")
        ax.set_xlabel("teacher layer")
        ax.set_ylabel("share of Fisher mass")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title("Fisher share per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
