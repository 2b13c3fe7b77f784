"""``layerwise-dist compare``: several models on the same examples, one table.

The original project compared teacher LLMs (llama3, qwen3, gpt-oss) by response time, recommendation
quality and Fisher score. Here every model named with ``--models`` (a registry name such as
``smollm2-135m`` or ``gemma3-270m``, ``tiny:<arch>``, a HF folder, e.g. an adapted teacher's
``adapt/merged`` or a distilled ``student``, a ``.gguf`` file; ``LABEL=SPEC`` names its row) is, in turn:

1. given the same users, candidates and targets (``data.*`` and ``eval.max_examples`` with ``data.seed``,
   exactly as a run's evaluation picks them; checked: a model that would see other examples is an error);
   only the tokens differ, each model reading the prompts with its own tokenizer;
2. scored with :func:`layerwise_dist.evaluation.evaluate_per_example`: HR@10, NDCG@10 and MRR with 95%
   percentile bootstrap intervals over users, and the paired difference to the first model on the same users;
3. timed one user per request (``--latency-examples`` after one warm-up): latency p50 and p95; examples/s
   over the batched evaluation pass; parameters and memory from :func:`~layerwise_dist.evaluation.measure_cost`;
4. profiled with the layerwise Fisher pass (:func:`layerwise_dist.fisher.compute_fisher_profile`,
   ``fisher.form``/``fisher.labels`` on ``fisher.num_examples`` training examples): depth shares (top and
   bottom 30% of layers) and the top layers.

Writes ``compare.md``, ``compare.csv``, ``compare.png``, ``compare.json`` and each model's Fisher profile into
``--out``; with ``tracking.enabled=true`` one MLflow run holds the metrics (``<label>/<metric>``) and the files.
Runs in this process, one model at a time (each freed before the next is loaded).
"""

from __future__ import annotations

import csv
import dataclasses
import gc
import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .config import ConfigError, RunConfig

#: The columns of compare.csv, in order.
CSV_FIELDS = (
    "label",
    "model",
    "architecture",
    "layers",
    "parameters",
    "examples",
    "hr@10",
    "hr@10_lo",
    "hr@10_hi",
    "ndcg@10",
    "ndcg@10_lo",
    "ndcg@10_hi",
    "mrr",
    "mrr_lo",
    "mrr_hi",
    "ndcg@10_diff_vs_first",
    "ndcg@10_diff_lo",
    "ndcg@10_diff_hi",
    "latency_ms_p50",
    "latency_ms_p95",
    "examples_per_s",
    "memory_model_mib",
    "peak_memory_increase_mib",
    "fisher_top30_share",
    "fisher_bottom30_share",
    "fisher_top_layers",
    "load_s",
    "eval_s",
    "fisher_s",
)
QUALITY = ("hr@10", "ndcg@10", "mrr")


class CompareError(ConfigError):
    """Bad input to the comparison (no models, a repeated label, models that would see different examples)."""


@dataclasses.dataclass
class ModelSpec:
    label: str
    model: str


def split_models_and_overrides(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """``--models`` items: ``section.key=value`` (a config section of :class:`RunConfig`) or a top-level
    ``key=value`` of RunConfig is a config override; everything else (``SPEC``, ``LABEL=SPEC``) is a model."""
    top = {f.name for f in dataclasses.fields(RunConfig)}
    models, overrides = [], []
    for item in items:
        name = item.partition("=")[0]
        if "=" in item and (name in top or name.split(".", 1)[0] in top and "." in name):
            overrides.append(item)
        else:
            models.append(item)
    return models, overrides


def run_folder_models(label: str, folder: Path) -> list[ModelSpec]:
    """The models of a run folder (``output_dir`` of a pipeline): its zero-shot teacher, its adapted teacher
    where adapters exist (``adapt/merged``) and its student, each as a row ``<label>/<kind>``."""
    import yaml

    raw = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    teacher = (raw.get("teacher") or {}).get("model")
    out = [ModelSpec(f"{label}/zero-shot", str(teacher))] if teacher else []
    if (folder / "adapt" / "merged" / "config.json").is_file():
        out.append(ModelSpec(f"{label}/adapted", str(folder / "adapt" / "merged")))
    if (folder / "student" / "config.json").is_file():
        out.append(ModelSpec(f"{label}/student", str(folder / "student")))
    if not out:
        raise CompareError(f"--models: run folder {folder} names no teacher and holds no adapted teacher or student")
    return out


def parse_models(specs: Sequence[str]) -> list[ModelSpec]:
    """``SPEC`` or ``LABEL=SPEC`` per model; a run folder (``config.yaml``, no ``config.json``) stands for its
    zero-shot teacher, adapted teacher and student (:func:`run_folder_models`); labels must be distinct."""
    if not specs:
        raise CompareError("compare needs at least one model: --models A B ...")
    out = []
    for spec in specs:
        label, sep, model = spec.partition("=")
        if not sep:
            label, model = spec, spec
        if not label or not model:
            raise CompareError(f"--models: {spec!r} is not SPEC or LABEL=SPEC")
        folder = Path(model).expanduser()
        if folder.is_dir() and (folder / "config.yaml").is_file() and not (folder / "config.json").is_file():
            out += run_folder_models(label if sep else folder.name, folder)
        else:
            out.append(ModelSpec(label, model))
    labels = [m.label for m in out]
    if len(set(labels)) != len(labels):
        dup = sorted({x for x in labels if labels.count(x) > 1})
        raise CompareError(f"--models: labels {dup} appear twice (name rows with LABEL=SPEC)")
    return out


def eval_examples(splits: Any, cfg: RunConfig, tokenizer: Any, split: str) -> list[Any]:
    """The evaluation users of a run (as :meth:`RunSession.rank_examples`): ``eval.max_examples`` of ``split``
    drawn with ``data.seed``, in split order; candidates and targets depend on the data and seed only."""
    from .data import build_examples, seeded_sample

    return seeded_sample(build_examples(splits, split, cfg.data, tokenizer), cfg.eval.max_examples, cfg.data.seed)


def examples_key(examples: Sequence[Any]) -> tuple[list[tuple], str]:
    """(user, candidate ids, target) of each example, and a short hash of the whole list."""
    key = [(e.user_id, tuple(e.candidates), int(e.target_index)) for e in examples]
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]
    return key, digest


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def request_latencies(model: Any, data: Any, count: int, pad_token_id: int, pointwise_score: str) -> list[float]:
    """Milliseconds to rank one user's candidates (batch of one), for the first ``count`` examples after one
    untimed warm-up request."""
    from .data.sampler import load_batch
    from .evaluation import forward_scores

    n = min(len(data), count + 1)
    if n < 2:
        raise CompareError(f"latency needs at least 2 examples (one warm-up); got {len(data)}")
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = []
    for i in range(n):
        batch = load_batch(data, [i], pad_token_id)
        sync()
        t0 = time.perf_counter()
        forward_scores(model, batch, None, pointwise_score)
        sync()
        if i:
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _fisher_batches(session_cfg: RunConfig, splits: Any, tokenizer: Any) -> list[dict[str, Any]]:
    from .data import build_examples, tokenize_examples
    from .data.sampler import load_batch

    cfg = session_cfg
    examples = build_examples(splits, "train", cfg.data, tokenizer)[: cfg.fisher.num_examples]
    if not examples:
        raise CompareError("the Fisher pass needs training examples; the train split is empty")
    data = tokenize_examples(examples, tokenizer, cfg.data, cache_dir=cfg.data.cache_dir or None)
    size = cfg.fisher.batch_size
    return [
        load_batch(data, range(i, min(i + size, len(data))), tokenizer.pad_token_id) for i in range(0, len(data), size)
    ]


def evaluate_one(
    spec: ModelSpec,
    cfg: RunConfig,
    splits: Any,
    split: str,
    latency_examples: int,
    with_fisher: bool,
    out: Path,
    log: Any,
) -> dict[str, Any]:
    """Every figure of one model; the EvalResult under ``"_result"`` and its examples' key under ``"_key"``."""
    import torch

    from .data import tokenize_examples
    from .data.sampler import load_batch
    from .distributed import device
    from .evaluation import evaluate_per_example, measure_cost
    from .fisher import compute_fisher_profile
    from .models.student import decoder_layers_of
    from .models.teacher import load_teacher, load_tokenizer

    tcfg = dataclasses.replace(cfg.teacher, model=spec.model, gguf_file="", placement="replicate")
    mcfg = dataclasses.replace(cfg, teacher=tcfg)
    tokenizer = load_tokenizer(tcfg)
    examples = eval_examples(splits, mcfg, tokenizer, split)
    if not examples:
        raise CompareError(f"no {split} examples: the data has no users with a {split} item")
    key, digest = examples_key(examples)
    data = tokenize_examples(examples, tokenizer, cfg.data, cache_dir=cfg.data.cache_dir or None)
    pad = tokenizer.pad_token_id
    size = cfg.eval.batch_size
    batches = [load_batch(data, range(i, min(i + size, len(data))), pad) for i in range(0, len(data), size)]

    t0 = time.perf_counter()
    model = load_teacher(tcfg).to(device())  # replicated, as a run's evaluation serves it
    load_s = time.perf_counter() - t0
    score = cfg.data.pointwise_score
    t0 = time.perf_counter()
    ks = sorted(set(cfg.eval.ks) | {10})  # the table's cut-off is always there
    result = evaluate_per_example(model, batches, ks, progress=False, pointwise_score=score)
    eval_s = time.perf_counter() - t0
    latencies = request_latencies(model, data, latency_examples, pad, score)
    single = [load_batch(data, [i], pad) for i in range(min(len(data), 3))]
    cost = measure_cost(model, single, warmup=1 if len(single) > 1 else 0, pointwise_score=score)

    row: dict[str, Any] = {
        "label": spec.label,
        "model": spec.model,
        "architecture": type(model).__name__,
        "layers": len(decoder_layers_of(model)),
        "parameters": cost["num_parameters"],
        "quantization": tcfg.quantization,
        "examples": int(result.metrics["n"]),
        "examples_hash": digest,
        "latency_ms_p50": _percentile(latencies, 50),
        "latency_ms_p95": _percentile(latencies, 95),
        "latency_requests": len(latencies),
        "examples_per_s": result.metrics["n"] / eval_s,
        "memory_model_bytes": cost["memory_model_bytes"],
        "peak_memory_increase_bytes": cost["cuda_peak_allocated_bytes"]
        if cost["cuda_peak_allocated_bytes"] is not None
        else cost["cpu_peak_rss_increase_bytes"],
        "load_s": load_s,
        "eval_s": eval_s,
        "summary": result.summary(),
    }
    for m in QUALITY:
        row[m] = float(result.metrics[m])
        row[f"{m}_lo"], row[f"{m}_hi"] = (float(v) for v in result.intervals[m])
    if with_fisher:
        fisher_batches = _fisher_batches(mcfg, splits, tokenizer)
        t0 = time.perf_counter()
        profile = compute_fisher_profile(
            model,
            fisher_batches,
            form=cfg.fisher.form,
            labels=cfg.fisher.labels,
            seed=cfg.fisher.seed,
            model_id=spec.model,
            progress=False,
            linear_method=cfg.fisher.linear_method,
        )
        row["fisher_s"] = time.perf_counter() - t0
        top, bottom = profile.depth_shares(0.3)
        row["fisher_top30_share"], row["fisher_bottom30_share"] = top, bottom
        row["fisher_top_layers"] = profile.top_layers(min(3, profile.num_layers))
        row["fisher_weights"] = profile.normalized()
        row["fisher_form"] = f"{profile.form}/{profile.labels}, {profile.num_examples} examples"
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in spec.label)
        profile.save_json(out / f"fisher_{safe}.json")
        log.info("%s Fisher profile:\n%s", spec.label, profile.summary())
    row["_result"], row["_key"] = result, key
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def _ci(row: dict[str, Any], m: str) -> str:
    return f"{row[m]:.4f} [{row[m + '_lo']:.4f}, {row[m + '_hi']:.4f}]"


def _mib(value: Any) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.1f}"


def _opt(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    return "n/a" if value is None else format(value, fmt)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The full table, then the original project's view (model, response time, quality, Fisher score)."""
    first = rows[0]["label"]
    header = [
        "model",
        "architecture",
        "layers",
        "parameters",
        "HR@10 [95% CI]",
        "NDCG@10 [95% CI]",
        "MRR [95% CI]",
        f"NDCG@10 - {first} [95% CI]",
        "latency p50 / p95 (ms)",
        "examples/s",
        "memory (MiB)",
        "peak increase (MiB)",
        "Fisher: top-30% / bottom-30% depth share",
        "Fisher top layers",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        diff = r.get("paired_ndcg@10")
        diff_text = (
            "-" if diff is None else f"{diff['difference']:+.4f} [{diff['ci95'][0]:+.4f}, {diff['ci95'][1]:+.4f}]"
        )
        fisher = (
            "n/a"
            if r.get("fisher_top30_share") is None
            else f"{r['fisher_top30_share']:.1%} / {r['fisher_bottom30_share']:.1%}"
        )
        cells = [
            f"{r['label']}" + (f" (`{r['model']}`)" if r["model"] != r["label"] else ""),
            r["architecture"],
            str(r["layers"]),
            f"{r['parameters'] / 1e6:,.1f}M",
            _ci(r, "hr@10"),
            _ci(r, "ndcg@10"),
            _ci(r, "mrr"),
            diff_text,
            f"{r['latency_ms_p50']:,.0f} / {r['latency_ms_p95']:,.0f}",
            f"{r['examples_per_s']:.2f}",
            _mib(r["memory_model_bytes"]),
            _mib(r["peak_memory_increase_bytes"]),
            fisher,
            str(r.get("fisher_top_layers", "n/a")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "The original project's view:", ""]
    lines += ["| model | response time, p50 (ms) | quality (NDCG@10) | Fisher score (top-30% depth share) |"]
    lines += ["|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['latency_ms_p50']:,.0f} | {r['ndcg@10']:.4f} | {_opt(r, 'fisher_top30_share', '.1%')} |"
        )
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in rows:
            diff = r.get("paired_ndcg@10") or {}
            flat = {
                **{k: r.get(k) for k in CSV_FIELDS},
                "ndcg@10_diff_vs_first": diff.get("difference"),
                "ndcg@10_diff_lo": (diff.get("ci95") or [None, None])[0],
                "ndcg@10_diff_hi": (diff.get("ci95") or [None, None])[1],
                "memory_model_mib": None if r["memory_model_bytes"] is None else r["memory_model_bytes"] / 2**20,
                "peak_memory_increase_mib": None
                if r["peak_memory_increase_bytes"] is None
                else r["peak_memory_increase_bytes"] / 2**20,
                "fisher_top_layers": " ".join(str(i) for i in r.get("fisher_top_layers", [])),
            }
            writer.writerow(flat)
    return path


def plot(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Quality with 95% intervals, latency p50/p95, and each Fisher profile over relative depth."""
    from matplotlib.figure import Figure

    with_fisher = any("fisher_weights" in r for r in rows)
    fig = Figure(figsize=(15 if with_fisher else 10, 4.5))
    axes = fig.subplots(1, 3 if with_fisher else 2)
    x = np.arange(len(QUALITY))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        means = [r[m] for m in QUALITY]
        err = [[r[m] - r[m + "_lo"] for m in QUALITY], [r[m + "_hi"] - r[m] for m in QUALITY]]
        axes[0].bar(x + i * width, means, width, yerr=err, capsize=3, label=r["label"])
    axes[0].set_xticks(x + width * (len(rows) - 1) / 2, ["HR@10", "NDCG@10", "MRR"])
    axes[0].set_title(f"quality, 95% bootstrap CI (n={rows[0]['examples']} users)")
    axes[0].legend(fontsize=8)
    labels = [r["label"] for r in rows]
    xs = np.arange(len(rows))
    axes[1].bar(xs - 0.2, [r["latency_ms_p50"] for r in rows], 0.4, label="p50")
    axes[1].bar(xs + 0.2, [r["latency_ms_p95"] for r in rows], 0.4, label="p95")
    axes[1].set_xticks(xs, labels, fontsize=8)
    axes[1].set_ylabel("ms per user (one request)")
    axes[1].set_title("latency")
    axes[1].legend(fontsize=8)
    if with_fisher:
        for r in rows:
            w = r.get("fisher_weights")
            if w:
                depth = np.linspace(0.0, 1.0, len(w)) if len(w) > 1 else np.array([1.0])
                axes[2].plot(depth, w, marker="o", ms=3, label=f"{r['label']} ({len(w)} layers)")
        axes[2].set_xlabel("relative depth (first layer 0, last layer 1)")
        axes[2].set_ylabel("Fisher share of the layer")
        axes[2].set_title("layerwise Fisher profile")
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def run_compare(
    models: Sequence[str],
    cfg: RunConfig,
    out: str | Path,
    split: str | None = None,
    latency_examples: int = 8,
    with_fisher: bool = True,
) -> dict[str, Any]:
    """Evaluate ``models`` on the same examples and write the table files into ``out``; returns the results."""
    from .data import load_splits
    from .distributed import get_logger
    from .tracking import make_tracker

    log = get_logger()
    specs = parse_models(models)
    if latency_examples < 1:
        raise CompareError(f"--latency-examples must be at least 1; got {latency_examples}")
    split = split or cfg.eval.split
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # Resolve every model first: a wrong name is one line before anything is loaded or converted twice.
    from .models.teacher import resolve_model_dir

    for spec in specs:
        resolve_model_dir(dataclasses.replace(cfg.teacher, model=spec.model, gguf_file=""))
    splits = load_splits(cfg.data)
    tracker = make_tracker(
        cfg.tracking, out.parent, run_name=cfg.tracking.run_name or f"compare-{out.name}", rank=0, run_dir=out
    )
    status = "FAILED"
    try:
        tracker.log_params(
            {
                "models": " ".join(f"{s.label}={s.model}" for s in specs),
                "split": split,
                "data.source": cfg.data.source,
                "data.category": cfg.data.category,
                "data.formulation": cfg.data.formulation,
                "data.seed": cfg.data.seed,
                "eval.max_examples": cfg.eval.max_examples,
                "teacher.quantization": cfg.teacher.quantization,
            }
        )
        rows: list[dict[str, Any]] = []
        for spec in specs:
            log.info("compare: %s (%s)", spec.label, spec.model)
            row = evaluate_one(spec, cfg, splits, split, latency_examples, with_fisher, out, log)
            if rows and row["_key"] != rows[0]["_key"]:
                raise CompareError(
                    f"{spec.label} would be scored on other examples than {rows[0]['label']} "
                    f"({row['examples_hash']} vs {rows[0]['examples_hash']}): the comparison needs the same users"
                )
            if rows:
                base = rows[0]["_result"]
                for m in QUALITY:
                    row[f"paired_{m}"] = row["_result"].paired_difference(base, m)
            rows.append(row)
            tracker.log_metrics(
                {
                    f"eval/{spec.label}/{k}": v  # the scheme of every run: eval/<model>/<metric>
                    for k, v in row.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("_")
                }
            )
            log.info(
                "compare: %s: HR@10 %s, NDCG@10 %s, MRR %s, p50 %.0f ms",
                spec.label,
                _ci(row, "hr@10"),
                _ci(row, "ndcg@10"),
                _ci(row, "mrr"),
                row["latency_ms_p50"],
            )
        table = markdown_table(rows)
        setup = (
            f"{rows[0]['examples']} {split} users of {cfg.data.source}/{cfg.data.category} "
            f"(examples {rows[0]['examples_hash']}, the same for every model), {cfg.data.formulation} formulation"
            + (f" ({cfg.data.pointwise_score} score)" if cfg.data.formulation == "pointwise" else "")
            + f", {cfg.data.num_candidates} candidates, data.seed={cfg.data.seed}, "
            f"teacher.quantization={cfg.teacher.quantization}; latency: one user per request, "
            f"{rows[0]['latency_requests']} requests after a warm-up; examples/s: batches of {cfg.eval.batch_size}."
        )
        md = out / "compare.md"
        md.write_text(f"# Model comparison\n\n{setup}\n\n{table}")
        csv_path = write_csv(rows, out / "compare.csv")
        png = plot(rows, out / "compare.png")
        public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
        js = out / "compare.json"
        js.write_text(json.dumps({"setup": setup, "split": split, "models": public}, indent=2, default=str))
        for path in (md, csv_path, png, js):
            tracker.log_artifact(path)
        status = "FINISHED"
        return {"setup": setup, "table": table, "models": public, "files": [str(md), str(csv_path), str(png), str(js)]}
    finally:
        tracker.end(status)
