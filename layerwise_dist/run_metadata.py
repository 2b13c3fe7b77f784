"""What a run records about itself in MLflow, beside its metrics: where it came from (git commit, entry
point), the data set it used (``mlflow.log_input`` with a digest of the data), the Fisher profile as one chart
and one table, and the run file that lets a resumed job continue its MLflow runs.

The tracker (:mod:`layerwise_dist.tracking`) delivers; this module decides what a run says.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from layerwise_dist.config import TrackingConfig
from layerwise_dist.tracking import RUN_FILE, Tracker, default_tracking_uri

log = logging.getLogger(__name__)

FISHER_COLUMNS = ("layer", "fisher", "share", "rank", "block_influence", "angular_distance")


def git_commit(folder: str | Path | None = None) -> tuple[str, bool] | None:
    """``(commit, dirty)`` of the git checkout holding ``folder`` (default: this package's source), or of the
    working directory; ``None`` outside git (an installed wheel run from elsewhere) or without ``git``."""
    import subprocess

    for where in (Path(folder) if folder else Path(__file__).resolve().parent, Path.cwd()):
        try:
            commit = subprocess.run(
                ["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
            )
            if commit.returncode != 0:
                continue
            status = subprocess.run(
                ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return commit.stdout.strip(), bool(status.stdout.strip())
    return None


def entry_point_name(job: str, argv0: str | None = None) -> str:
    """What started the run: ``layerwise-dist pipeline`` (the CLI, also its deepspeed workers), or the script
    a launcher ran (``launchers/pipeline.py``), relative to the working directory when under it."""
    import sys

    script = Path(argv0 if argv0 is not None else (sys.argv[0] if sys.argv and sys.argv[0] else "python"))
    if script.name in ("layerwise-dist", "worker.py", "cli.py", "__main__.py", "-c", "python", ""):
        return f"layerwise-dist {job}".strip()
    try:
        return str(script.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(script)


def source_tags(job: str) -> dict[str, str]:
    """MLflow's own source tags: entry point (``mlflow.source.name``, ``mlflow.project.entryPoint``), git commit
    (``mlflow.source.git.commit``, with ``git.dirty`` when tracked files differ from it)."""
    tags = {
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": entry_point_name(job),
        "mlflow.project.entryPoint": job,
    }
    found = git_commit()
    if found is not None:
        tags["mlflow.source.git.commit"] = found[0]
        tags["git.dirty"] = str(found[1]).lower()
    return tags


# The libraries whose version changes a run's numbers (kernels, defaults) or its behaviour.
ENVIRONMENT_PACKAGES = (
    "torch",
    "transformers",
    "deepspeed",
    "peft",
    "bitsandbytes",
    "accelerate",
    "flash-attn",
    "numpy",
    "mlflow",
    "ray",
)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere), ``""`` when unknown."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def environment_record() -> dict[str, str]:
    """Where this process runs: Python, the platform, the CPU (model, cores), the GPU when there is one, and
    the versions of :data:`ENVIRONMENT_PACKAGES` that are installed. Two sittings of a run on other versions
    or another CPU can differ in the last bits of every float (another kernel, another summation order), so
    results.json carries it and MLflow gets it as ``env.*`` tags."""
    import platform
    from importlib import metadata

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": str(os.cpu_count() or ""),
    }
    for package in ENVIRONMENT_PACKAGES:
        try:
            env[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    try:
        import torch

        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["cuda"] = str(torch.version.cuda)
    except ImportError:
        pass
    return env


def dataset_record(splits: Any, data_cfg: Any) -> dict[str, str]:
    """The run's data set as MLflow records it (``mlflow.log_input``): name, digest of the split's content
    (users' sequences, held-out items, titles: any change of data or split changes it), source and profile."""
    content = json.dumps(
        [splits.category, splits.train, splits.valid, splits.test, splits.titles], sort_keys=True, ensure_ascii=True
    )
    digest = hashlib.sha256(content.encode()).hexdigest()[:16]
    where = data_cfg.reviews or data_cfg.source
    profile = {
        "users": len(splits.train),
        "items": len(splits.all_items),
        "train_interactions": sum(len(v) for v in splits.train.values()),
        "category": splits.category,
    }
    return {
        "name": f"{data_cfg.source}:{splits.category}",
        "digest": digest,
        "source_type": "local" if data_cfg.reviews else "code",
        "source": json.dumps({"uri": str(where), "meta": data_cfg.meta or None}),
        "profile": json.dumps(profile),
    }


def save_run_file(run_dir: str | Path, tracker: Tracker, stages: Mapping[str, str] | None = None) -> Path | None:
    """Write ``<run_dir>/mlflow_run.json``: the store, the run id and its nested stage runs (a resumed job
    continues them). Nothing when the tracker has no run id (disabled, another rank, store not reached yet)."""
    run_id = getattr(tracker, "run_id", None)
    if not run_id:
        return None
    path = Path(run_dir) / RUN_FILE
    data = {"tracking_uri": getattr(tracker, "tracking_uri", ""), "run_id": run_id, "stages": dict(stages or {})}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
    return path


def read_run_file(run_dir: str | Path, tracking_uri: str) -> dict[str, Any] | None:
    """The runs ``save_run_file`` recorded in ``run_dir`` for this store; ``None`` when there are none, or they
    belong to another store (a new run is made there)."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("tracking: %s unreadable (%s); a new MLflow run is made", path, exc)
        return None
    if str(data.get("tracking_uri", "")).rstrip("/") != tracking_uri.rstrip("/"):
        log.warning(
            "tracking: %s is for %s, not %s; a new MLflow run is made", path, data.get("tracking_uri"), tracking_uri
        )
        return None
    data.setdefault("stages", {})
    return data


def effective_uri(cfg: TrackingConfig, results_dir: str | Path) -> str:
    """The store a run with this config and results folder logs to."""
    return cfg.tracking_uri or default_tracking_uri(results_dir)


def fisher_table(profile: Any) -> list[dict[str, Any]]:
    """The Fisher profile as table rows, one per teacher layer: score, share of the total, rank (1 = most
    Fisher information), and the redundancy controls when measured (else empty)."""
    scores = [float(x) for x in profile.scores]
    total = sum(scores)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    rank = {layer: r + 1 for r, layer in enumerate(order)}
    rows = []
    for i, score in enumerate(scores):
        row = {"layer": i, "fisher": score, "share": score / total if total > 0 else None, "rank": rank[i]}
        for name in ("block_influence", "angular_distance"):
            values = getattr(profile, name, None) or []
            row[name] = float(values[i]) if values else None
        for module, values in sorted((getattr(profile, "module_scores", None) or {}).items()):
            row[f"fisher_{module}"] = float(values[i])
        rows.append(row)
    return rows


def log_fisher_profile(tracker: Tracker, profile: Any, folder: str | Path) -> dict[str, Path]:
    """The Fisher profile as one chart and one table: ``<folder>/fisher_profile.{json,png,csv}`` written (the
    JSON and PNG when missing) and logged under the run's ``fisher/`` artifacts, plus two scalars
    (``fisher/top30_share``, ``fisher/bottom30_share``) rather than one metric per layer."""
    import csv

    folder = Path(folder)
    paths = {"json": folder / "fisher_profile.json", "png": folder / "fisher_profile.png"}
    if not paths["json"].is_file():
        profile.save_json(paths["json"])
    if not paths["png"].is_file():
        profile.plot(paths["png"])
    rows = fisher_table(profile)
    paths["csv"] = folder / "fisher_profile.csv"
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else list(FISHER_COLUMNS))
        writer.writeheader()
        writer.writerows([{k: "" if v is None else v for k, v in row.items()} for row in rows])
    for path in paths.values():
        tracker.log_artifact(path, "fisher")
    top, bottom = profile.depth_shares(0.3)
    tracker.log_metrics({"fisher": {"top30_share": top, "bottom30_share": bottom}})
    return paths
