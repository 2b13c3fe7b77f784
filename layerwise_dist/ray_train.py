"""The same stages on Ray Train workers: ``TorchTrainer`` + ``train_func(config)``.

    python launchers/ray_distill.py [--preset tiny] [--command pipeline] [ray.num_workers=2] [key=value ...]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python launchers/ray_distill.py ...

Ray's ``TorchConfig`` makes the process group (gloo on CPU, NCCL on GPU) and sets
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR before ``train_func`` runs; DeepSpeed
then wraps that group on first use instead of making its own, so ZeRO-3 and our
all-reduces share it. Each worker runs the same job function of
:mod:`layerwise_dist.recipes.jobs` as a ``deepspeed``-launched rank, on the resolved
config object the driver sends. Everything Ray is told comes from the ``ray`` section
of the schema (:class:`~layerwise_dist.config.RayConfig`): ``ScalingConfig``,
``RunConfig`` (``storage_path`` a local folder or a URI, passed as given),
``FailureConfig(max_failures)`` and ``CheckpointConfig(num_to_keep)``.

Reports. Every step the distillation loop logs (``train.log_every``) every worker calls
``ray.train.report`` with the step's losses; every ``train.save_every`` steps the report
carries a Ray checkpoint: each worker's own files of the step's DeepSpeed checkpoint
(:class:`~layerwise_dist.checkpoint.CheckpointStore` tag: shards, RNG state in the client
state, completion markers), which Ray merges into one folder, plus a manifest from rank 0.
At the end every rank reports the run's metrics and rank 0 hands the HF student folder to
Ray as the final checkpoint. On the controller, :class:`ReportLog` appends each report
(rank 0's metrics) and each worker failure to ``<output_dir>/ray_reports.jsonl``.

Restarts. When a worker dies, Ray restarts the worker group (up to
``ray.max_failures`` times) and ``ray.train.get_checkpoint()`` gives the last reported
checkpoint: :func:`restore_from_ray` puts it back into ``<output_dir>/checkpoints`` (local
tags newer than it, never acknowledged by Ray, are removed) and the job continues with
``train.resume=true``, which resumes exactly (same step counter, data order and losses as
an uninterrupted run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from ray.train import UserCallback

from .checkpoint import MARKER, CheckpointStore, _rank_files, _write_atomic
from .config import ConfigError, RunConfig, load_config
from .distributed import CPU_ALLOCATOR_ENV, barrier, get_logger, is_main, rank, world_size
from .ds_config import ds_config_path
from .models.teacher import model_path
from .recipes.jobs import JOBS

log = get_logger()

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
    "ray.storage_path",
)

#: rank 0's file in every step checkpoint it reports: which DeepSpeed tag the folder holds.
MANIFEST = "layerwise_dist_checkpoint.json"
#: <output_dir>/REPORT_LOG: one JSON line per report (rank 0's metrics) and per worker failure.
REPORT_LOG = "ray_reports.jsonl"
#: <output_dir>/STAGING/rank<r>-step<n>: a worker's files of a step checkpoint until Ray has uploaded them.
STAGING = ".ray_staging"
#: <output_dir>/FAULT_MARKER: written by the rank that ray.fault_kill_step kills (so it dies only once).
FAULT_MARKER = "ray_fault_injected"


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


def is_uri(value: str) -> bool:
    """``s3://...``, ``gs://...``, ``file:///...``: a storage location Ray resolves itself."""
    return "://" in value


def with_absolute_paths(cfg: RunConfig, base: Path | None = None) -> RunConfig:
    """cfg with every relative path made absolute against base (default: cwd).

    ``teacher.model`` is rewritten only when it is written as a path
    (:func:`layerwise_dist.models.teacher.model_path`): ``tiny``, ``smollm2-135m`` or a hub
    id stay names whatever folders the working directory holds. ``ray.storage_path`` given
    as a URI (``s3://bucket/prefix``) is left as it is. A relative ``sqlite:///`` tracking
    URI is made absolute too.
    """
    base = (base or Path.cwd()).resolve()
    for key in PATH_KEYS:
        value = _get(cfg, key)
        if not value:
            continue
        if key == "ray.storage_path" and is_uri(value):
            continue
        if key == "teacher.model":
            named = model_path(value)
            if named is None:
                continue
            path = named
        else:
            path = Path(value).expanduser()
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
    metrics: dict[str, Any] = {"command": command, "rank": rank(), "world_size": world_size()}
    for section in ("teacher", "student", "comparison"):
        for key, value in (results.get(section) or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[f"{section}/{key}"] = value
    if "fisher" in results:
        metrics["fisher/num_layers"] = len(results["fisher"].get("scores", []))
    return metrics


def step_metrics(step: int, metrics: dict[str, float]) -> dict[str, Any]:
    """One training step's report: ``step``, ``train/<loss part>``, ``train/lr`` and any ``valid/...``."""
    out: dict[str, Any] = {"step": step, "rank": rank(), "world_size": world_size()}
    for key, value in metrics.items():
        if key != "step":
            out[key if "/" in key else f"train/{key}"] = value
    return out


# ------------------------------------------------------------------------------------------ worker side
class StepReporter:
    """The distillation loop's step listener on a Ray worker (:func:`layerwise_dist.trainer.step_listener`).

    Called on every rank at the same steps, it calls ``ray.train.report`` (a barrier across
    workers) with the step's metrics and, at a checkpointed step, a Ray checkpoint made of this
    rank's files of the DeepSpeed tag (hard links in ``<output_dir>/.ray_staging``, removed by
    Ray after the upload); rank 0 adds the :data:`MANIFEST`.
    """

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)

    def __call__(self, step: int, metrics: dict[str, float], tag_dir: Path | None) -> None:
        import ray.train

        checkpoint = None
        if tag_dir is not None:
            checkpoint = ray.train.Checkpoint.from_directory(str(self._stage(step, Path(tag_dir))))
        ray.train.report(step_metrics(step, metrics), checkpoint=checkpoint, delete_local_checkpoint_after_upload=True)
        self._maybe_fault(step)

    def _stage(self, step: int, tag_dir: Path) -> Path:
        staging = self.out / STAGING / f"rank{rank()}-step{step}"
        shutil.rmtree(staging, ignore_errors=True)
        (staging / tag_dir.name).mkdir(parents=True)
        for src in [*_rank_files(tag_dir, rank()), tag_dir / MARKER.format(rank())]:
            dst = staging / tag_dir.name / src.name
            try:
                os.link(src, dst)  # the tag's files are never rewritten in place: a link is a snapshot
            except OSError:
                shutil.copy2(src, dst)
        if is_main():
            manifest = {"tag": tag_dir.name, "step": step, "world_size": world_size(), "output_dir": str(self.out)}
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
        return staging

    def _maybe_fault(self, step: int) -> None:
        """ray.fault_kill_step (tests): the last rank dies by SIGKILL after this step's report, once per output_dir.

        It first waits until the controller has committed every checkpoint reported so far: Ray
        registers a report only when its controller polls the workers, and a report still queued
        in a dead worker is lost (the restart would then begin from an older checkpoint).
        """
        import ray.train

        if step != self.cfg.ray.fault_kill_step or rank() != world_size() - 1:
            return
        marker = self.out / FAULT_MARKER
        if marker.exists():
            return  # a restarted attempt: run on
        ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=300
        )
        marker.write_text(json.dumps({"step": step, "rank": rank(), "pid": os.getpid(), "time": time.time()}))
        log.warning("ray.fault_kill_step=%d: rank %d kills itself (SIGKILL)", step, rank())
        os.kill(os.getpid(), signal.SIGKILL)


def _tag_dirs(folder: Path) -> list[Path]:
    return [p for p in folder.glob("step*") if p.is_dir() and p.name[4:].isdigit()]


def restore_from_ray(cfg: RunConfig, checkpoint: Any) -> RunConfig:
    """Continue from Ray's last checkpoint: its DeepSpeed tag back into ``<output_dir>/checkpoints``, resume on.

    Collective (every rank copies its own files). A step checkpoint (with :data:`MANIFEST`) is
    the resume point: local tags newer than it are removed, so ``train.resume=true`` loads
    exactly it. The final checkpoint (the HF student, no manifest) means training had
    finished: the job resumes from ``output_dir``'s own final checkpoint.
    """
    store = CheckpointStore(Path(cfg.output_dir) / "checkpoints")
    resumed = _with_value(cfg, "train.resume", True)
    with checkpoint.as_directory() as folder:
        src = Path(folder)
        if not (src / MANIFEST).is_file():
            log.info("Ray checkpoint %s is the final student: continuing from %s", checkpoint.path, store.folder)
            return resumed
        manifest = json.loads((src / MANIFEST).read_text())
        tag, step = manifest["tag"], int(manifest["step"])
        if int(manifest["world_size"]) != world_size():
            raise ConfigError(
                f"Ray checkpoint {checkpoint.path} was written by {manifest['world_size']} workers, this run has "
                f"{world_size()}: set ray.num_workers={manifest['world_size']}"
            )
        dst = store.folder / tag
        if is_main():
            for stale in _tag_dirs(store.folder):
                if int(stale.name[4:]) > step:
                    log.warning("checkpoint %s is newer than Ray's last checkpoint (%s): removed", stale, tag)
                    shutil.rmtree(stale)
            if dst.exists() and not _same_checkpoint(src / tag, dst):
                shutil.rmtree(dst)
        barrier()
        if not dst.exists() or not _same_checkpoint(src / tag, dst):
            dst.mkdir(parents=True, exist_ok=True)
            for name in [*(p.name for p in _rank_files(src / tag, rank())), MARKER.format(rank())]:
                shutil.copy2(src / tag / name, dst / name)
        barrier()
        if is_main():
            problem = store.check(dst)
            if problem:
                raise RuntimeError(f"Ray checkpoint {checkpoint.path} restored into {dst} is incomplete: {problem}")
            _write_atomic(store.folder / "latest", tag)
        barrier()
    log.info("restarting from Ray checkpoint %s (%s, step %d)", checkpoint.path, tag, step)
    return resumed


def _same_checkpoint(a: Path, b: Path) -> bool:
    """Both tag folders hold the same complete checkpoint (equal completion markers, b verified)."""
    markers = sorted(p.name for p in a.glob("rank*.done"))
    if not markers or sorted(p.name for p in b.glob("rank*.done")) != markers:
        return False
    if any((a / m).read_text() != (b / m).read_text() for m in markers):
        return False
    return not CheckpointStore(b.parent).check(b)


def train_func(config: dict[str, Any]) -> None:
    """Run on each Ray Train worker; everything it needs comes from ``config`` (see :func:`prepare_loop_config`)."""
    import ray.train
    import torch

    command, cfg = config["command"], config["config"]
    if not torch.cuda.is_available():
        # One thread per rank: ranks sharing a few cores crawl when each spawns a full pool.
        threads = cfg.ray.cpus_per_worker
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    from .trainer import step_listener

    # Ray's TorchConfig already made the torch group; RunSession -> init_distributed()
    # has DeepSpeed wrap it (no second group), so ZeRO-3 sees the real world size.
    previous = ray.train.get_checkpoint()
    if previous is not None:
        cfg = restore_from_ray(cfg, previous)
    with step_listener(StepReporter(cfg)):
        results = JOBS[command](cfg)
    # Rank 0 writes the student folder and results.json; every rank waits here so the
    # folder Ray copies is complete and no rank's report races ahead of the others.
    barrier()
    if is_main():
        with contextlib.suppress(OSError):  # emptied by Ray after each upload
            (Path(cfg.output_dir) / STAGING).rmdir()
    metrics = report_metrics(results, command)
    metrics["output_dir"] = cfg.output_dir
    student = Path(cfg.output_dir) / "student"
    checkpoint = None
    if is_main() and (student / "config.json").exists():
        checkpoint = ray.train.Checkpoint.from_directory(str(student))
    log.info("reporting %d metrics%s", len(metrics), f", checkpoint {student}" if checkpoint else "")
    # Keep output_dir/student: it is the pipeline's own output, Ray gets a copy.
    ray.train.report(metrics, checkpoint=checkpoint, delete_local_checkpoint_after_upload=False)


# ------------------------------------------------------------------------------------------ driver side
class ReportLog(UserCallback):
    """On the Ray Train controller: one JSON line per report (rank 0's metrics, the checkpoint's path)
    and per worker failure in ``path``, and a one-line summary of each on the console."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _write(self, record: dict[str, Any]) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        first = dict(metrics[0]) if metrics else {}
        self._write({"event": "report", "time": time.time(), **first, "checkpoint": checkpoint and checkpoint.path})
        losses = ", ".join(f"{k}={v:.5g}" for k, v in first.items() if k.startswith("train/"))
        what = f"step {first['step']}: {losses}" if "step" in first else "final metrics"
        print(f"[layerwise_dist] Ray report, {what}{f' (checkpoint {checkpoint.path})' if checkpoint else ''}")

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        errors = {str(r): f"{type(e).__name__}: {e}"[:500] for r, e in worker_exceptions.items()}
        self._write({"event": "worker_failure", "time": time.time(), "errors": errors})
        print(f"[layerwise_dist] Ray workers failed: {sorted(errors)}")


def init_ray(address: str = "", num_cpus: int | None = None) -> None:
    """Connect to Ray: ``address`` (``auto``, ``head-ip:6379``); else ``RAY_ADDRESS`` through a plain
    ``ray.init()`` (``ray job submit`` sets it for the job's driver); else start a local instance."""
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init()  # honours RAY_ADDRESS
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)  # never a stale cluster


def run_ray(command: str, preset: str = "default", overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Run ``command`` (fisher | distill | evaluate | pipeline | ...) as one Ray Train run, configured by ``ray.*``.

    Joins the cluster :func:`init_ray` finds (``ray.address``, ``RAY_ADDRESS``) or starts a
    local instance. Returns the ``ray.train.Result``: rank 0's final metrics and, when a
    student was written, its HF folder as ``result.checkpoint``. A run that still fails after
    ``ray.max_failures`` restarts raises ``ray.train.TrainingFailedError``.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    loop_config = prepare_loop_config(command, preset, overrides)
    cfg: RunConfig = loop_config["config"]
    r = cfg.ray
    init_ray(r.address)
    output_dir = Path(cfg.output_dir)
    env = {"PYTHONUNBUFFERED": "1"}
    if not r.use_gpu:
        env.update(OMP_NUM_THREADS=str(r.cpus_per_worker), MKL_NUM_THREADS=str(r.cpus_per_worker))
        env.update({k: os.environ.get(k, v) for k, v in CPU_ALLOCATOR_ENV.items()})  # see distributed.py
    trainer = TorchTrainer(
        train_func,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=r.num_workers, use_gpu=r.use_gpu, resources_per_worker={"CPU": r.cpus_per_worker}
        ),
        torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo"),
        run_config=RunConfig(
            name=r.name or f"{command}-{output_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=r.storage_path,  # absolute (prepare_loop_config) or a URI, as given
            failure_config=FailureConfig(max_failures=r.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=r.num_to_keep or None),
            callbacks=[ReportLog(str(output_dir / REPORT_LOG))],
            worker_runtime_env={"env_vars": env},
        ),
    )
    return trainer.fit()
