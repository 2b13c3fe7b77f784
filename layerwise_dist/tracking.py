"""One small tracker interface for runs, with an MLflow implementation.

Launchers talk to a :class:`Tracker` only. :func:`make_tracker` gives an
:class:`MLflowTracker` on rank 0 when tracking is enabled and a
:class:`NullTracker` everywhere else, so training code calls the tracker on
every rank without ``if rank == 0`` guards.

By default runs go to a SQLite store inside the results folder,
``sqlite:///<results_dir>/mlflow.db``, with artifacts in
``<results_dir>/mlartifacts``; :func:`mlflow_ui_command` prints the command that
browses them.

Metric names: MLflow accepts letters, digits, ``_ - . / :`` and spaces, so
``hr@10`` is logged as ``hr_at_10`` (:func:`metric_name`). Nested dicts are
flattened to ``section.key``; a ``None`` metric (a figure this machine could not
measure) is not logged.
"""

from __future__ import annotations

import json
import numbers
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from layerwise_dist import distributed
from layerwise_dist.config import TrackingConfig

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
_BATCH = 100  # MLflow's limit on params (and tags) per log_batch call
_BAD_NAME_CHARS = re.compile(r"[^\w\-./: ]")


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}``; lists and scalars are leaves."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def metric_name(key: str) -> str:
    """An MLflow-safe metric or param name: ``@`` -> ``_at_``, other disallowed characters -> ``_``."""
    return _BAD_NAME_CHARS.sub("_", key.replace("@", "_at_"))


def default_tracking_uri(results_dir: str | Path) -> str:
    return f"sqlite:///{Path(results_dir).resolve() / 'mlflow.db'}"


def default_artifact_root(results_dir: str | Path) -> Path:
    return Path(results_dir).resolve() / "mlartifacts"


def mlflow_ui_command(results_dir: str | Path, port: int = 5000) -> str:
    """The exact command that opens the MLflow UI on the runs stored under ``results_dir``."""
    uri = default_tracking_uri(results_dir)
    return f"mlflow ui --backend-store-uri {shlex.quote(uri)} --port {port}"


class Tracker:
    """Where a run's params, metrics and artifacts go. This base class discards everything.

    Used as a context manager, a run ends ``FINISHED``, or ``FAILED`` when the
    block raises (the exception still propagates).
    """

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def end(self, status: str = "FINISHED") -> None:
        pass

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.end("FAILED" if exc_type is not None else "FINISHED")


class NullTracker(Tracker):
    """Tracking disabled, or a rank other than 0: every call is a no-op."""


class MLflowTracker(Tracker):
    """An MLflow run, written by rank 0 only (other ranks hold a no-op tracker).

    Args:
        cfg: the ``tracking`` section: URI (empty = SQLite in ``results_dir``),
            experiment name, run name, run id to resume, artifact root.
        results_dir: folder of the default store and artifacts.
        run_name: name of a new run (``cfg.run_name`` wins when set).
        run_id: resume this run instead of starting one (``cfg.run_id`` when empty).
        rank: process rank (default: from the process group or ``RANK``).
    """

    def __init__(
        self,
        cfg: TrackingConfig,
        results_dir: str | Path,
        run_name: str = "",
        run_id: str | None = None,
        rank: int | None = None,
    ) -> None:
        self.rank = distributed.rank() if rank is None else rank
        self.run_id = None
        self._ended = True
        if self.rank != 0:
            return
        import mlflow

        self.results_dir = Path(results_dir).resolve()
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = cfg.tracking_uri or default_tracking_uri(self.results_dir)
        self.client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        run_id = run_id or cfg.run_id or None
        if run_id:
            run = self.client.get_run(run_id)  # raises if the store has no such run
            self.experiment_id = run.info.experiment_id
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
        else:
            self.experiment_id = self._experiment(cfg)
            run = self.client.create_run(self.experiment_id, run_name=cfg.run_name or run_name or None)
            self.run_id = run.info.run_id
        self._ended = False

    def _experiment(self, cfg: TrackingConfig) -> str:
        found = self.client.get_experiment_by_name(cfg.experiment)
        if found is not None:
            return found.experiment_id
        if cfg.artifact_root:
            root: Path | None = Path(cfg.artifact_root).resolve()
        elif not cfg.tracking_uri:
            root = default_artifact_root(self.results_dir)
        else:
            root = None  # the tracking server decides
        location = root.as_uri() if root is not None else None
        return self.client.create_experiment(cfg.experiment, artifact_location=location)

    @property
    def active(self) -> bool:
        return self.run_id is not None and not self._ended

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log (nested) params as ``section.key``; values longer than MLflow's limit are cut with a marker."""
        if not self.active:
            return
        from mlflow.entities import Param

        items = []
        for key, value in flatten(params).items():
            text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
            if len(text) > MAX_PARAM_CHARS:
                text = text[: MAX_PARAM_CHARS - 20] + "...[truncated]"
            items.append(Param(metric_name(key), text))
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _BATCH])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numeric metrics (nested dicts flattened, ``None`` skipped, bools as 0/1)."""
        if not self.active:
            return
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        items = []
        for key, value in flatten(metrics).items():
            if value is None:
                continue
            if hasattr(value, "item") and callable(value.item):  # 0-d tensors and numpy scalars
                value = value.item()
            if not isinstance(value, numbers.Real):
                raise TypeError(f"metric {key!r} must be a number; got {type(value).__name__} {value!r}")
            items.append(Metric(metric_name(key), float(value), now, step or 0))
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file or a whole folder into the run's artifacts."""
        if not self.active:
            return
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path)
        else:
            raise FileNotFoundError(f"artifact {path} does not exist")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import RunTag

        items = [RunTag(metric_name(k), str(v)) for k, v in flatten(tags).items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, tags=items[i : i + _BATCH])

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run FINISHED, FAILED or KILLED; later calls do nothing."""
        if not self.active:
            return
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"run status must be FINISHED, FAILED or KILLED; got {status!r}")
        self.client.set_terminated(self.run_id, status=status)
        self._ended = True


def make_tracker(cfg: TrackingConfig, results_dir: str | Path, run_name: str = "", rank: int | None = None) -> Tracker:
    """An :class:`MLflowTracker` on rank 0 with tracking enabled, else a :class:`NullTracker`."""
    rank = distributed.rank() if rank is None else rank
    if not cfg.enabled or rank != 0:
        return NullTracker()
    return MLflowTracker(cfg, results_dir, run_name=run_name, rank=rank)
