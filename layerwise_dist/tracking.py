"""One small tracker interface for runs, with an MLflow implementation.

Launchers talk to a :class:`Tracker` only. :func:`make_tracker` gives an
:class:`MLflowTracker` on rank 0 when tracking is enabled and a
:class:`NullTracker` everywhere else, so training code calls the tracker on
every rank without ``if rank == 0`` guards.

By default runs go to a SQLite store inside the results folder,
``sqlite:///<results_dir>/mlflow.db``, with artifacts in
``<results_dir>/mlartifacts``; :func:`mlflow_ui_command` prints the command that
browses them.

Names: MLflow accepts letters, digits, ``_ - . / :`` and spaces, so ``hr@10`` is
logged as ``hr_at_10`` (:func:`metric_name`). Metrics follow one scheme,
``<phase>/<what>``, nested dicts joined with ``/``: ``train/kd``, ``valid/ndcg_at_10``,
``eval/student/ndcg_at_10``, ``eval/comparison/retained/ndcg_at_10``,
``fisher/top30_share``, ``adapt/loss``. Params keep the config's dotted keys
(``train.lr``, as on the command line). A ``None`` metric (a figure this machine
could not measure) is not logged.

The experiment is tagged ``mlflow.experimentKind=custom_model_development``, so
MLflow 3's UI opens it in the model-training view (runs, charts, compare), not the
GenAI one. :meth:`MLflowTracker.nested` opens a run under this one (a pipeline
stage, an ablation cell); :meth:`MLflowTracker.log_input` records a data set with
its digest; :meth:`MLflowTracker.log_model` an MLflow model folder as the run's
artifacts and as an MLflow logged model. What a run records about itself (source
tags, data set, Fisher table, the run file that a resumed job continues from) is
in :mod:`layerwise_dist.run_metadata`.

Tracking never kills or stalls training:

* An ``http(s)`` tracking URI is checked at start with one short request
  (``tracking.connect_timeout_s``, 3 s, no MLflow retries). Unreachable: one
  warning line and the run goes on offline, or one :class:`TrackingError` line
  when ``tracking.required=true``. SQLite and file stores are local: no check.
* Every call (``log_metrics``, ``log_params``, ``set_tags``, ``log_artifact``)
  only turns its arguments into records and queues them: it never waits on the
  network. One background thread appends the records to an append-only JSONL
  buffer in the run folder (``<run_dir>/tracking_buffer.jsonl``, state beside it
  in ``tracking_buffer.jsonl.state.json``) and sends them in order to MLflow.
  When the server stops answering, records stay in the buffer and the thread
  retries with backoff (at most ``_MAX_BACKOFF_S`` apart); when it answers again
  the buffer is replayed with each metric's original step and timestamp (and the
  run's original start time when it had to be created late).
* :meth:`MLflowTracker.end` waits at most ``tracking.flush_timeout_s`` (30 s) for
  the buffer to drain. Drained: the buffer files are removed. Otherwise one
  warning line names the buffer, which :func:`replay` (CLI: ``layerwise-dist
  tracking replay BUFFER``) sends later. A buffer left by a killed process is
  replayable the same way; resending records already delivered is harmless
  (MLflow keeps one copy of an identical metric, params and tags are idempotent).
* Artifacts are recorded by path and uploaded from that path when delivered.

For ``http(s)`` URIs the tracker sets ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` and
``MLFLOW_HTTP_REQUEST_TIMEOUT=tracking.request_timeout_s`` (30 s) in the process
environment unless already set: retries are the buffer thread's job.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import numbers
import os
import re
import shlex
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from layerwise_dist import distributed
from layerwise_dist.config import TrackingConfig

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
_BATCH = 100  # MLflow's limit on params (and tags) per log_batch call
_METRIC_BATCH = 1000  # MLflow's limit on metrics per log_batch call
_BAD_NAME_CHARS = re.compile(r"[^\w\-./: ]")
_MAX_BACKOFF_S = 4.0  # longest wait between two delivery attempts while the server is away
BUFFER_NAME = "tracking_buffer.jsonl"
RUN_FILE = "mlflow_run.json"  # a run folder's MLflow run ids: a resumed job continues those runs
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # MLflow 3's UI picks the experiment's view by it
EXPERIMENT_KIND = "custom_model_development"  # the model-training view (the other: "genai_development")

log = logging.getLogger(__name__)


class TrackingError(RuntimeError):
    """Tracking that cannot go on as asked: ``tracking.required=true`` and the server does not answer,
    a run to resume that the store does not have, or a buffer that cannot be replayed."""


def flatten(data: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}`` (``sep="/"``: ``train/lr``); lists and scalars
    are leaves."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + sep, sep))
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

    def log_input(self, dataset: Mapping[str, Any], context: str = "train") -> None:
        pass

    def log_model(self, path: str | Path, name: str = "student", artifact_path: str = "model") -> None:
        pass

    def nested(
        self,
        run_name: str,
        run_dir: str | Path,
        run_id: str | None = None,
        buffer_name: str = BUFFER_NAME,
        tags: Mapping[str, Any] | None = None,
    ) -> Tracker:
        return NullTracker()

    def flush(self, timeout_s: float | None = None) -> bool:
        return True

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


def _now_ms() -> int:
    return int(time.time() * 1000)


def _cfg(cfg: Any, name: str, default: Any) -> Any:
    """A ``tracking`` setting, with its default where the config predates it."""
    return getattr(cfg, name, default)


def is_remote(uri: str) -> bool:
    """An ``http(s)`` tracking server (as opposed to a local SQLite or file store)."""
    return urllib.parse.urlparse(uri).scheme in ("http", "https")


def unreachable_reason(uri: str, timeout: float = 3.0) -> str | None:
    """``None`` when the tracking server at ``uri`` answers ``GET /health`` within ``timeout`` seconds, else why not.

    Any answer below 500 (even 401 or 404) counts as reachable: something is serving there.
    Local stores (SQLite, files) are always reachable.
    """
    if not is_remote(uri):
        return None
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (http(s) only, checked above)
            resp.read(64)
        return None
    except urllib.error.HTTPError as exc:
        return None if exc.code < 500 else f"HTTP {exc.code} from {url}"
    except (OSError, ValueError) as exc:  # URLError, timeouts, refused connections, bad hosts
        reason = getattr(exc, "reason", exc)
        return f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__


def run_in_store(uri: str, run_id: str) -> bool | None:
    """Does the store at ``uri`` hold ``run_id`` as a live run? ``None`` when it could not be asked (a server away
    or failing): the caller must not take that for "no"."""
    from mlflow.exceptions import MlflowException

    if is_remote(uri):
        if unreachable_reason(uri):
            return None
        _http_defaults(30.0)
    import mlflow

    try:
        run = mlflow.MlflowClient(tracking_uri=uri).get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        log.warning("tracking: could not ask %s for run %s (%s)", uri, run_id, _short(exc))
        return None
    return run.info.lifecycle_stage == "active"


def _http_defaults(request_timeout_s: float) -> None:
    """No MLflow-level retries (the buffer thread retries) and a bounded request time, unless the user chose."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, int(request_timeout_s))))


class _Journal:
    """A run's append-only JSONL buffer of tracking records, plus a small state file beside it.

    The first record (``"t": "run"``) says which store, experiment and run the records belong to;
    the state file holds the run id on that store and how many bytes of the buffer it has received.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.state_path = self.path.with_name(self.path.name + ".state.json")
        self.state: dict[str, Any] = {"uri": None, "run_id": None, "offset": 0}
        if self.state_path.is_file():
            try:
                self.state.update(json.loads(self.state_path.read_text()))
            except (OSError, ValueError):
                pass  # a state file cut by a crash: resend from the start (idempotent)
        self._out: Any = None

    def append(self, records: Iterable[Mapping[str, Any]]) -> None:
        if self._out is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._out = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open for the run)
        self._out.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
        self._out.flush()

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def done(self) -> bool:
        return int(self.state["offset"]) >= self.size()

    def header(self) -> dict[str, Any]:
        with open(self.path, encoding="utf-8") as f:
            first = json.loads(f.readline())
        if first.get("t") != "run":
            raise TrackingError(f"{self.path} is not a tracking buffer (first record is not a run record)")
        return first

    def pending(self, max_records: int = 5000) -> list[tuple[int, dict[str, Any] | None]]:
        """Up to ``max_records`` undelivered records, each with the buffer offset just past it
        (``None`` for a line that is not JSON). A last line without its newline is left out."""
        out: list[tuple[int, dict[str, Any] | None]] = []
        pos = int(self.state["offset"])
        with open(self.path, "rb") as f:
            f.seek(pos)
            while len(out) < max_records:
                line = f.readline()
                if not line.endswith(b"\n"):
                    break
                pos += len(line)
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                out.append((pos, record))
        return out

    def mark(self, **state: Any) -> None:
        self.state.update(state)
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        tmp.write_text(json.dumps(self.state))
        os.replace(tmp, self.state_path)

    def close(self) -> None:
        out, self._out = self._out, None
        if out is not None:
            out.close()

    def remove(self) -> None:
        self.close()
        for p in (self.path, self.state_path):
            p.unlink(missing_ok=True)


_PERMANENT_CODES = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST", "INVALID_STATE"}


def _short(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text[:300]}"


def _permanent(exc: BaseException) -> bool:
    """An error that resending cannot fix (a param logged again with another value, a bad name, a
    missing artifact file): the record is skipped with a warning. Anything else (server away,
    timeouts, 5xx, a locked SQLite file, refused credentials) is retried."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code in _PERMANENT_CODES and "failed with exception" not in str(exc)
    return isinstance(exc, (FileNotFoundError, NotADirectoryError))


def _experiment_id(client: Any, name: str, artifact_location: str | None) -> str:
    """The experiment's id, created when missing; tagged as model training (MLflow 3's classic view) unless
    it already says what kind it is."""
    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(
                name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
            )
        except Exception:
            found = client.get_experiment_by_name(name)  # created meanwhile by another run
            if found is None:
                raise
    if EXPERIMENT_KIND_TAG not in (found.tags or {}):  # made by an older version, or by hand
        client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return found.experiment_id


class _Sender:
    """Sends a journal's pending records, in order, to one tracking store."""

    def __init__(self, journal: _Journal, uri: str, on_run: Any = None, strict_resume: bool = False) -> None:
        import mlflow

        self.journal = journal
        self.uri = uri
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        if (journal.state.get("uri") or "").rstrip("/") != uri.rstrip("/"):  # another store: all again, new run
            journal.state = {"uri": uri, "run_id": None, "offset": 0}
        self.run_id: str | None = journal.state.get("run_id")
        self.on_run = on_run
        self.strict_resume = strict_resume

    def deliver(self) -> int:
        """Send every pending record; returns how many were sent. Raises when the store fails in a way
        that resending may fix (the records stay pending)."""
        sent = 0
        while True:
            batch = self.journal.pending()
            if not batch:
                return sent
            for offset, kind, items in _groups(batch):
                self._send(kind, items)
                self.journal.mark(offset=offset, run_id=self.run_id, uri=self.uri)
                sent += len(items)

    def _send(self, kind: str, items: list[Any]) -> None:
        if kind == "run":
            self._open_run(items[0])
            return
        if kind == "none":
            return
        if kind == "bad":
            log.warning("tracking: %d unreadable line(s) in %s skipped", len(items), self.journal.path)
            return
        if self.run_id is None:
            self._open_run(self.journal.header())
        try:
            self._send_items(kind, items)
        except Exception as exc:
            if not _permanent(exc):
                raise
            if len(items) == 1:
                log.warning("tracking: %s %s not logged: %s", kind, _describe(kind, items[0]), _short(exc))
                return
            for item in items:  # find the bad one(s); idempotent for the others
                self._send(kind, [item])

    def _send_items(self, kind: str, items: list[Any]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        client, run_id = self.client, self.run_id
        if kind == "metrics":
            client.log_batch(run_id, metrics=[Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in items])
        elif kind == "params":
            # MLflow refuses to change a logged param; a resumed run given another value (a path spelled
            # relative where it was absolute, a setting changed on purpose) keeps the first value as the param
            # and records the new one as the tag `changed_param.<key>` ("old -> new") instead of failing the batch.
            logged = client.get_run(run_id).data.params
            fresh = [Param(k, v) for k, v in items if k not in logged]
            changed = {k: v for k, v in items if k in logged and logged[k] != v}
            if changed:
                log.info("tracking: %d param(s) differ from the run's first values, kept as changed_param.* tags: %s",
                         len(changed), ", ".join(changed))  # fmt: skip
            if fresh or changed:
                tags = [RunTag(f"changed_param.{k}", f"{logged[k]} -> {v}") for k, v in changed.items()]
                client.log_batch(run_id, params=fresh, tags=tags)
        elif kind == "tags":
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in items])
        elif kind == "artifact":
            [(path, artifact_path)] = items
            if Path(path).is_dir():
                client.log_artifacts(run_id, path, artifact_path)
            elif Path(path).is_file():
                client.log_artifact(run_id, path, artifact_path)
            else:
                raise FileNotFoundError(f"artifact {path} no longer exists")
        elif kind == "input":
            from mlflow.entities import Dataset, DatasetInput, InputTag

            [record] = items
            d = record["dataset"]
            dataset = Dataset(d["name"], d["digest"], d["source_type"], d["source"], d.get("schema"), d.get("profile"))
            tags = [InputTag("mlflow.data.context", record["context"])] if record.get("context") else []
            client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=tags)])
        elif kind == "model":
            [record] = items
            self._send_model(Path(record["path"]), record["name"], record["artifact_path"])
        elif kind == "end":
            [(status, end_time)] = items
            client.set_terminated(run_id, status=status, end_time=end_time)
        else:
            log.warning("tracking: unknown record kind %r skipped", kind)

    def _send_model(self, path: Path, name: str, artifact_path: str) -> None:
        """An MLflow model folder as the run's ``artifact_path`` artifacts and as an MLflow 3 logged model of
        the run (the UI's Models tab; ``models:/<model_id>``). A resent or resumed run updates its model."""
        from mlflow.entities import LoggedModelOutput

        if not (path / "MLmodel").is_file():
            raise FileNotFoundError(f"model folder {path} (no MLmodel file) no longer exists")
        client, run_id = self.client, self.run_id
        client.log_artifacts(run_id, str(path), artifact_path)
        experiment = client.get_run(run_id).info.experiment_id
        found = client.search_logged_models(
            [experiment], filter_string=f"source_run_id = '{run_id}' AND name = '{name}'", max_results=1
        )
        model = found[0] if found else client.create_logged_model(experiment, name=name, source_run_id=run_id)
        client.log_model_artifacts(model.model_id, str(path))
        client.finalize_logged_model(model.model_id, "READY")
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])

    def _open_run(self, record: Mapping[str, Any]) -> None:
        """Create the run the records belong to (with its original start time), or reopen the one to resume."""
        if self.run_id is not None:
            return
        from mlflow.exceptions import MlflowException

        resume = record.get("run_id")
        if resume:
            try:
                self.client.get_run(resume)
                self.client.update_run(resume, status="RUNNING")
                self._opened(resume)
                return
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                if self.strict_resume:
                    raise TrackingError(f"tracking.run_id {resume}: no such run in {self.uri}") from None
                log.warning("tracking: run %s to resume is not in %s; logging to a new run", resume, self.uri)
        experiment = _experiment_id(self.client, record["experiment"], record.get("artifact_location"))
        run = self.client.create_run(
            experiment, start_time=record.get("start_time"), run_name=record.get("run_name"), tags=record.get("tags")
        )
        self._opened(run.info.run_id)

    def _opened(self, run_id: str) -> None:
        self.run_id = run_id
        self.journal.mark(run_id=run_id, uri=self.uri)
        if self.on_run is not None:
            self.on_run(run_id)


def _describe(kind: str, item: Any) -> str:
    return repr(item[0]) if isinstance(item, (list, tuple)) and item else repr(item)


def _groups(batch: list[tuple[int, dict[str, Any] | None]]) -> Iterable[tuple[int, str, list[Any]]]:
    """Consecutive records merged into MLflow-sized calls, in order: ``(offset past the group, kind, items)``."""
    limits = {"metrics": _METRIC_BATCH, "params": _BATCH, "tags": _BATCH}
    kind, items, offset = "", [], 0
    for end, record in batch:
        if record is None:
            new_kind, new_items = "bad", [None]
        else:
            new_kind = record.get("t", "")
            if new_kind == "metrics":
                new_items = record["m"]
            elif new_kind in ("params", "tags"):
                new_items = record["p"]
            elif new_kind == "artifact":
                new_items = [(record["path"], record.get("artifact_path"))]
            elif new_kind == "end":
                new_items = [(record["status"], record.get("time"))]
            else:
                new_items = [record]
        mergeable = new_kind in limits and new_kind == kind
        if items and not mergeable:
            yield offset, kind, items
            items = []
        kind = new_kind
        for item in new_items:
            if len(items) >= limits.get(kind, 1) and kind in limits:
                # a record split across calls: mark only after its last part (resending parts is harmless)
                yield offset, kind, items
                items = []
            items.append(item)
        offset = end
    if items:
        yield offset, kind, items
    elif batch:
        yield offset, "none", []  # the last records held nothing to send


_ACTIVE_BUFFERS: set[Path] = set()  # buffers of this process's open trackers
_ACTIVE_LOCK = threading.Lock()


def _claim_buffer(folder: Path, fixed_name: bool, name: str = BUFFER_NAME) -> Path:
    """The buffer file of a new run: ``<folder>/<name>`` (``fixed_name``: the run folder) or a
    name of its own; a buffer a previous process left behind is moved aside (and said so), never mixed in."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with _ACTIVE_LOCK:
        candidates = [folder / name] if fixed_name else [folder / f"tracking_buffer-{stamp}-{os.getpid()}.jsonl"]
        candidates += [folder / f"tracking_buffer-{stamp}-{os.getpid()}-{i}.jsonl" for i in range(1, 1000)]
        for path in candidates:
            if path in _ACTIVE_BUFFERS:
                continue
            if path.exists():
                old = _Journal(path)
                if old.done():
                    old.remove()  # delivered in full; its process ended before removing it
                else:
                    aside = path.with_name(f"tracking_buffer.left-{stamp}-{os.getpid()}.jsonl")
                    os.replace(path, aside)
                    if old.state_path.exists():
                        os.replace(old.state_path, aside.with_name(aside.name + ".state.json"))
                    log.warning(
                        "tracking: %s holds records an earlier run did not deliver; moved to %s "
                        "(send them with `layerwise-dist tracking replay %s`)",
                        path,
                        aside,
                        aside,
                    )
            _ACTIVE_BUFFERS.add(path)
            return path
    raise TrackingError(f"no free tracking buffer name in {folder}")


def _release_buffer(path: Path) -> None:
    with _ACTIVE_LOCK:
        _ACTIVE_BUFFERS.discard(path)


class MLflowTracker(Tracker):
    """An MLflow run, written by rank 0 only (other ranks hold a no-op tracker), that never blocks training.

    Calls queue records and return; a background thread journals them to ``buffer_path`` and delivers
    them (see the module docstring). ``run_id`` is known at once when the store answers at start, and
    set by the thread as soon as it could create the run otherwise (``None`` until then).

    Args:
        cfg: the ``tracking`` section: URI (empty = SQLite in ``results_dir``), experiment name, run name,
            run id to resume, artifact root, ``required``, ``flush_timeout_s``, ``connect_timeout_s``,
            ``request_timeout_s``.
        results_dir: folder of the default store and artifacts.
        run_name: name of a new run (``cfg.run_name`` wins when set).
        run_id: resume this run instead of starting one (``cfg.run_id`` when empty).
        rank: process rank (default: from the process group or ``RANK``).
        run_dir: the run's own folder; the buffer is ``<run_dir>/<buffer_name>``. Without it the
            buffer is ``<results_dir>/tracking_buffer-<time>-<pid>.jsonl``.
        parent_run_id: make the new run a nested run of this one (``mlflow.parentRunId``).
        tags: tags the new run is created with.
        strict_resume: a ``run_id`` the store does not have is an error (True) or gives a new run with a
            warning (False: the run id a resumed job found in its folder, perhaps from another store).
        buffer_name: the buffer's file name inside ``run_dir``.

    Raises:
        TrackingError: ``tracking.required`` and the server does not answer at start, or ``run_id`` names a
            run the (reachable) store does not have (``strict_resume``).
    """

    def __init__(
        self,
        cfg: TrackingConfig,
        results_dir: str | Path,
        run_name: str = "",
        run_id: str | None = None,
        rank: int | None = None,
        run_dir: str | Path | None = None,
        parent_run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
        strict_resume: bool = True,
        buffer_name: str = BUFFER_NAME,
    ) -> None:
        self.rank = distributed.rank() if rank is None else rank
        self.run_id = None
        self.cfg = cfg
        self._ended = True
        self._journal: _Journal | None = None
        if self.rank != 0:
            return
        self.results_dir = Path(results_dir).resolve()
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = cfg.tracking_uri or default_tracking_uri(self.results_dir)
        self.required = bool(_cfg(cfg, "required", False))
        self.flush_timeout_s = float(_cfg(cfg, "flush_timeout_s", 30.0))
        remote = is_remote(self.tracking_uri)
        if remote:
            _http_defaults(float(_cfg(cfg, "request_timeout_s", 30.0)))
        if cfg.artifact_root:
            root: Path | None = Path(cfg.artifact_root).resolve()
        elif not cfg.tracking_uri:
            root = default_artifact_root(self.results_dir)
        else:
            root = None  # the tracking server decides
        header = {
            "t": "run",
            "uri": self.tracking_uri,
            "experiment": cfg.experiment,
            "run_name": cfg.run_name or run_name or None,
            "run_id": run_id or cfg.run_id or None,
            "artifact_location": root.as_uri() if root is not None else None,
            "start_time": _now_ms(),
            "tags": {metric_name(k): str(v) for k, v in (tags or {}).items()},
        }
        if parent_run_id:
            header["tags"]["mlflow.parentRunId"] = parent_run_id
        reason = None
        if remote:
            reason = unreachable_reason(self.tracking_uri, float(_cfg(cfg, "connect_timeout_s", 3.0)))
            if reason and self.required:
                raise TrackingError(
                    f"tracking server {self.tracking_uri} unreachable ({reason}) and tracking.required=true"
                )
        self.buffer_path = _claim_buffer(
            Path(run_dir).resolve() if run_dir else self.results_dir, bool(run_dir), buffer_name
        )
        journal = _Journal(self.buffer_path)
        try:
            journal.append([header])
            self._sender = _Sender(journal, self.tracking_uri, on_run=self._set_run_id, strict_resume=strict_resume)
            if reason is None:
                try:
                    self._sender.deliver()  # opens the run now, so run_id is known at once
                except TrackingError:
                    raise
                except Exception as exc:
                    if self.required:
                        raise TrackingError(
                            f"tracking store {self.tracking_uri} failed ({_short(exc)}) and tracking.required=true"
                        ) from None
                    reason = _short(exc)
        except BaseException:
            journal.remove()
            _release_buffer(self.buffer_path)
            raise
        self._sender.strict_resume = False
        self._journal = journal
        self._offline = reason is not None
        if reason is not None:
            log.warning(
                "tracking: %s unreachable (%s); training goes on, records are buffered in %s and sent when it "
                "answers (tracking.required=true makes this an error)",
                self.tracking_uri,
                reason,
                self.buffer_path,
            )
        self._items: list[dict[str, Any]] = []
        self._cv = threading.Condition()
        self._closing = self._kick = False
        self._abandon = False
        self._drained = threading.Event()
        self._thread = threading.Thread(target=self._work, name="layerwise-dist-tracking", daemon=True)
        self._ended = False
        self._thread.start()

    def _set_run_id(self, run_id: str) -> None:
        self.run_id = run_id

    @property
    def active(self) -> bool:
        return self._journal is not None and not self._ended

    @property
    def offline(self) -> bool:
        """The last attempt to reach the store failed; records wait in the buffer."""
        return self._journal is not None and self._offline

    def _put(self, record: dict[str, Any]) -> None:
        with self._cv:
            self._items.append(record)
            self._cv.notify_all()

    def _work(self) -> None:
        """The one thread that writes the buffer and talks to MLflow."""
        journal = self._journal
        assert journal is not None
        failures, next_try, disk_warned = 0, 0.0, False
        try:
            while True:
                with self._cv:
                    if not self._items and not self._abandon:
                        pending = not journal.done()
                        self._cv.wait(max(0.0, next_try - time.monotonic()) if pending else None)
                    records, self._items = self._items, []
                    if records:
                        try:
                            journal.append(records)
                        except OSError as exc:  # a full disk must not stop training either
                            if not disk_warned:
                                log.warning("tracking: cannot write %s (%s); records dropped", journal.path, exc)
                                disk_warned = True
                    if self._abandon:
                        return
                    if self._kick:  # end() waits: try at once rather than after the backoff
                        self._kick, next_try = False, 0.0
                if not journal.done() and time.monotonic() >= next_try:
                    try:
                        self._sender.deliver()
                    except Exception as exc:
                        failures += 1
                        next_try = time.monotonic() + min(_MAX_BACKOFF_S, 0.25 * 2**failures)
                        if not self._offline:
                            self._offline = True
                            log.warning(
                                "tracking: %s stopped answering (%s); training goes on, records are buffered "
                                "in %s and resent when it answers",
                                self.tracking_uri,
                                _short(exc),
                                journal.path,
                            )
                        continue
                    if self._offline:
                        self._offline = False
                        log.warning("tracking: %s answers again; buffered records delivered", self.tracking_uri)
                    failures = 0
                    # a last line without its newline (a failed disk write) cannot be sent: don't spin on it
                    next_try = 0.0 if journal.done() else time.monotonic() + _MAX_BACKOFF_S
                with self._cv:
                    if not self._items and journal.done():
                        self._cv.notify_all()  # for flush()
                        if self._closing:
                            self._drained.set()
                            return
        except BaseException as exc:  # a bug here must not take training down
            log.warning("tracking: background thread stopped (%s); records stay in %s", _short(exc), journal.path)
        finally:
            journal.close()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every record so far reached the store (at most ``timeout_s``); True when it did."""
        if not self.active:
            return True
        assert self._journal is not None
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cv:
            while self._items or not self._journal.done():
                if not self._thread.is_alive():
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(0.5 if left is None else min(0.5, left))
        return True

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log (nested) params as ``section.key``; values longer than MLflow's limit are cut with a marker."""
        if not self.active:
            return
        items = []
        for key, value in flatten(params).items():
            text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
            if len(text) > MAX_PARAM_CHARS:
                text = text[: MAX_PARAM_CHARS - 20] + "...[truncated]"
            items.append([metric_name(key), text])
        if items:
            self._put({"t": "params", "p": items})

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numeric metrics (nested dicts flattened, ``None`` skipped, bools as 0/1), stamped now."""
        if not self.active:
            return
        now = _now_ms()
        items = []
        for key, value in flatten(metrics, sep="/").items():
            if value is None:
                continue
            if hasattr(value, "item") and callable(value.item):  # 0-d tensors and numpy scalars
                value = value.item()
            if not isinstance(value, numbers.Real):
                raise TypeError(f"metric {key!r} must be a number; got {type(value).__name__} {value!r}")
            items.append([metric_name(key), float(value), now, int(step or 0)])
        if items:
            self._put({"t": "metrics", "m": items})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file or a whole folder into the run's artifacts (uploaded from ``path`` when delivered)."""
        if not self.active:
            return
        path = Path(path).resolve()
        if not path.exists():
            raise FileNotFoundError(f"artifact {path} does not exist")
        self._put({"t": "artifact", "path": str(path), "artifact_path": artifact_path})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.active:
            return
        items = [[metric_name(k), str(v)] for k, v in flatten(tags).items()]
        if items:
            self._put({"t": "tags", "p": items})

    def log_input(self, dataset: Mapping[str, Any], context: str = "train") -> None:
        """Record a data set the run used (``mlflow.log_input``): ``dataset`` as :func:`dataset_record` gives it."""
        if not self.active:
            return
        missing = [k for k in ("name", "digest", "source_type", "source") if not dataset.get(k)]
        if missing:
            raise ValueError(f"dataset record lacks {', '.join(missing)}")
        self._put({"t": "input", "dataset": dict(dataset), "context": context})

    def log_model(self, path: str | Path, name: str = "student", artifact_path: str = "model") -> None:
        """An MLflow model folder (``MLmodel`` inside, e.g. from :func:`layerwise_dist.mlflow_model.save_student_model`)
        as the run's ``artifact_path`` artifacts and as an MLflow logged model ``name`` of this run."""
        if not self.active:
            return
        path = Path(path).resolve()
        if not (path / "MLmodel").is_file():
            raise FileNotFoundError(f"{path} is not an MLflow model folder (no MLmodel file)")
        self._put({"t": "model", "path": str(path), "name": name, "artifact_path": artifact_path})

    def nested(
        self,
        run_name: str,
        run_dir: str | Path,
        run_id: str | None = None,
        buffer_name: str = BUFFER_NAME,
        tags: Mapping[str, Any] | None = None,
    ) -> Tracker:
        """A run nested under this one (a pipeline stage), in the same store and experiment; ``run_id``: continue
        that nested run (a resumed job). Its buffer is ``<run_dir>/<buffer_name>``. Waits until this run exists
        in the store (at most ``tracking.flush_timeout_s``); when it does not yet (server away) the nested run
        is made without a parent link, with a warning."""
        if not self.active:
            return NullTracker()
        self.flush(self.flush_timeout_s)
        if self.run_id is None:
            log.warning("tracking: run not created yet (store unreachable); %r is logged as a top-level run", run_name)
        cfg = dataclasses.replace(self.cfg, tracking_uri=self.tracking_uri, run_id="", run_name="")
        return MLflowTracker(
            cfg,
            self.results_dir,
            run_name=run_name,
            run_id=run_id,
            rank=self.rank,
            run_dir=run_dir,
            parent_run_id=self.run_id,
            tags=tags,
            strict_resume=False,
            buffer_name=buffer_name,
        )

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run FINISHED, FAILED or KILLED and wait at most ``tracking.flush_timeout_s`` for the buffer
        to reach the store; what did not stays in the buffer (one warning line says how to send it).
        Later calls do nothing."""
        if not self.active:
            return
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"run status must be FINISHED, FAILED or KILLED; got {status!r}")
        assert self._journal is not None
        self._ended = True
        with self._cv:
            self._items.append({"t": "end", "status": status, "time": _now_ms()})
            self._closing = self._kick = True
            self._cv.notify_all()
        if self._drained.wait(self.flush_timeout_s):
            self._thread.join(timeout=5)
            self._journal.remove()
        else:
            with self._cv:  # the thread stops at its next look; what it has not written yet is written here
                self._abandon = True
                records, self._items = self._items, []
                if records:
                    self._journal.append(records)
                self._cv.notify_all()
            self._thread.join(timeout=1)
            if not self._thread.is_alive():
                self._journal.close()
            log.warning(
                "tracking: %s did not take every record within %.0f s (tracking.flush_timeout_s); they are kept "
                "in %s: send them with `layerwise-dist tracking replay %s`",
                self.tracking_uri,
                self.flush_timeout_s,
                self.buffer_path,
                self.buffer_path,
            )
        _release_buffer(self.buffer_path)


def replay(buffer_path: str | Path, tracking_uri: str | None = None, end_status: str = "FAILED") -> str:
    """Send a tracking buffer a run left behind (``tracking_buffer*.jsonl``) to MLflow; returns the run id.

    Records go in their original order with their original steps and timestamps, to ``tracking_uri`` or,
    when empty, the store the run was using. Into that same store they continue the run the buffer belongs
    to (records it already received are skipped); into another store they make a new run. A buffer without
    an end record (its process was killed) ends the run with ``end_status``. When every record got through,
    the buffer and its state file are removed.

    Raises:
        TrackingError: no such buffer, the store does not answer, or it failed part-way (run it again:
            the rest is still in the buffer).
    """
    path = Path(buffer_path).resolve()
    if not path.is_file():
        raise TrackingError(f"no tracking buffer at {path}")
    with _ACTIVE_LOCK:
        if path in _ACTIVE_BUFFERS:
            raise TrackingError(f"{path} belongs to a run that is still open")
    journal = _Journal(path)
    header = journal.header()
    uri = tracking_uri or header.get("uri") or ""
    if not uri:
        raise TrackingError(f"{path} does not say which tracking store it was for: pass tracking_uri")
    if is_remote(uri):
        _http_defaults(30.0)
        reason = unreachable_reason(uri)
        if reason:
            raise TrackingError(f"cannot replay {path}: {uri} unreachable ({reason})")
    sender = _Sender(journal, uri)
    ended = False
    with open(path, encoding="utf-8", errors="replace") as f:
        ended = any('"t":"end"' in line for line in f)
    try:
        count = sender.deliver()
        if sender.run_id is None:
            sender._open_run(header)
        if not ended and end_status:
            sender.client.set_terminated(sender.run_id, status=end_status)
    except TrackingError:
        raise
    except Exception as exc:
        left = journal.size() - int(journal.state["offset"])
        raise TrackingError(
            f"replay of {path} into {uri} stopped ({_short(exc)}); {left} bytes are left in it: run it again"
        ) from None
    if not journal.done():
        log.warning("tracking: the last record of %s was cut short (its process was killed) and is skipped", path)
    journal.remove()
    log.info("tracking: %d records of %s replayed into run %s at %s", count, path, sender.run_id, uri)
    return str(sender.run_id)


def make_tracker(
    cfg: TrackingConfig,
    results_dir: str | Path,
    run_name: str = "",
    rank: int | None = None,
    run_dir: str | Path | None = None,
    run_id: str | None = None,
    strict_resume: bool = True,
) -> Tracker:
    """An :class:`MLflowTracker` on rank 0 with tracking enabled, else a :class:`NullTracker`.

    ``run_dir``: the run's folder, home of its buffer ``tracking_buffer.jsonl`` (see :class:`MLflowTracker`).
    ``run_id``: continue this run (``tracking.run_id`` when empty); ``strict_resume``: one the store does not
    have is an error (else a new run, with a warning).
    """
    rank = distributed.rank() if rank is None else rank
    if not cfg.enabled or rank != 0:
        return NullTracker()
    return MLflowTracker(
        cfg, results_dir, run_name=run_name, run_id=run_id, rank=rank, run_dir=run_dir, strict_resume=strict_resume
    )
