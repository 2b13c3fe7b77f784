"""The same stages on Ray Train workers: ``TorchTrainer`` + ``train_func(config)``.

    python launchers/ray_distill.py --num_workers 2 [--address auto] [--preset tiny] [--command pipeline] [key=value ...]

Ray's ``TorchConfig`` makes the process group (gloo on CPU, NCCL on GPU) and sets
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR before ``train_func`` runs; DeepSpeed
then wraps that group on first use instead of making its own, so ZeRO-3 and our
all-reduces share it. Each worker runs the same job function of
:mod:`layerwise_dist.recipes.jobs` as a ``deepspeed``-launched rank, on the resolved
config object the driver sends; afterwards every rank reports its metrics and rank 0
hands the HF student folder to Ray as the run's checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig, load_config
from .ds_config import ds_config_path
from .recipes.jobs import JOBS

#: Config keys that hold filesystem paths. Ray workers run in another working
#: directory (and on SLURM on other nodes), so the driver makes them absolute.
PATH_KEYS = (
    "output_dir",
    "ds_config",
    "data.reviews",
    "data.meta",
    "data.cache_dir",
    "fisher.profile",
    "student.model",
    "teacher.model",
    "tracking.artifact_root",
)


def _with_value(cfg: Any, key: str, value: Any) -> Any:
    """A copy of the (nested dataclass) config with ``key`` (dotted) set to ``value``."""
    head, _, rest = key.partition(".")
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    return dataclasses.replace(cfg, **{head: _with_value(getattr(cfg, head), rest, value)})


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def with_absolute_paths(cfg: RunConfig, base: Path | None = None) -> RunConfig:
    """cfg with every relative path made absolute against base (default: cwd).

    ``teacher.model`` is rewritten only when it names an existing local path (not
    ``tiny``, ``embedded:smollm2`` or a hub id); a relative ``sqlite:///`` tracking
    URI is made absolute too.
    """
    base = (base or Path.cwd()).resolve()
    for key in PATH_KEYS:
        value = _get(cfg, key)
        if not value:
            continue
        path = Path(value).expanduser()
        if key == "teacher.model" and not (base / path).exists():
            continue
        if key == "ds_config":
            path = ds_config_path(path)  # the working directory's file, else the package's own copy
        if not path.is_absolute():
            path = base / path
        if str(path) != value:
            cfg = _with_value(cfg, key, str(path))
    uri = cfg.tracking.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        cfg = _with_value(cfg, "tracking.tracking_uri", "sqlite:///" + str(base / uri[len("sqlite:///") :]))
    return cfg


def prepare_loop_config(
    command: str, preset: str = "default", overrides: list[str] | tuple[str, ...] = (), base: Path | None = None
) -> dict[str, Any]:
    """Resolve and check the config on the driver (one clear error before any worker starts).

    Returns the ``train_loop_config`` every worker gets: the command and the resolved
    :class:`RunConfig` itself (paths made absolute), which workers use as is.
    """
    if command not in JOBS:
        raise ConfigError(f"unknown command {command!r} (commands: {', '.join(JOBS)})")
    cfg = with_absolute_paths(load_config(preset, list(overrides)), base)
    return {"command": command, "config": cfg}


def report_metrics(results: dict[str, Any], command: str) -> dict[str, Any]:
    """Flat metrics for ``ray.train.report``: ``student/hr@10``, ``teacher/mrr``, ``comparison/...``, world size."""
    from .distributed import rank, world_size

    metrics: dict[str, Any] = {"command": command, "rank": rank(), "world_size": world_size()}
    for section in ("teacher", "student", "comparison"):
        for key, value in (results.get(section) or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[f"{section}/{key}"] = value
    if "fisher" in results:
        metrics["fisher/num_layers"] = len(results["fisher"].get("scores", []))
    return metrics


def train_func(config: dict[str, Any]) -> None:
    """Run on each Ray Train worker; everything it needs comes from ``config`` (see :func:`prepare_loop_config`)."""
    import ray.train
    import torch

    if not torch.cuda.is_available():
        # One thread per rank: ranks sharing a few cores crawl when each spawns a full pool.
        threads = int(config.get("cpu_threads", 1))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    from .distributed import barrier, get_logger, is_main

    # Ray's TorchConfig already made the torch group; RunSession -> init_distributed()
    # has DeepSpeed wrap it (no second group), so ZeRO-3 sees the real world size.
    command, cfg = config["command"], config["config"]
    results = JOBS[command](cfg)
    # Rank 0 writes the student folder and results.json; every rank waits here so the
    # folder Ray copies is complete and no rank's report races ahead of the others.
    barrier()
    metrics = report_metrics(results, command)
    metrics["output_dir"] = cfg.output_dir
    student = Path(cfg.output_dir) / "student"
    checkpoint = None
    if is_main() and (student / "config.json").exists():
        checkpoint = ray.train.Checkpoint.from_directory(str(student))
    get_logger().info("reporting %d metrics%s", len(metrics), f", checkpoint {student}" if checkpoint else "")
    # Keep output_dir/student: it is the pipeline's own output, Ray gets a copy.
    ray.train.report(metrics, checkpoint=checkpoint, delete_local_checkpoint_after_upload=False)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to a cluster (``address``, e.g. ``auto`` inside a SLURM allocation) or start a local one."""
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)  # never a stale cluster


def run_ray(
    command: str,
    preset: str = "default",
    overrides: list[str] | tuple[str, ...] = (),
    num_workers: int = 2,
    use_gpu: bool = False,
    storage_path: str | Path = "results/ray",
    name: str | None = None,
    cpus_per_worker: int = 1,
):
    """Run ``command`` (fisher | distill | evaluate | pipeline) on ``num_workers`` Ray Train workers.

    Starts a local Ray instance when none is connected (call :func:`init_ray`
    first to join a cluster). Returns the ``ray.train.Result``: rank 0's metrics
    and, when a student was written, its HF folder as ``result.checkpoint``.
    A failed worker raises ``ray.train.TrainingFailedError``.
    """
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    loop_config = prepare_loop_config(command, preset, overrides)
    loop_config["cpu_threads"] = cpus_per_worker
    init_ray()
    output_dir = Path(loop_config["config"].output_dir)
    env = {"PYTHONUNBUFFERED": "1"}
    if not use_gpu:
        env.update(OMP_NUM_THREADS=str(cpus_per_worker), MKL_NUM_THREADS=str(cpus_per_worker))
    trainer = TorchTrainer(
        train_func,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=name or f"{command}-{output_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(Path(storage_path).resolve()),
            worker_runtime_env={"env_vars": env},
        ),
    )
    return trainer.fit()
