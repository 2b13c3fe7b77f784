"""MLflow tracking against a real SQLite store (one store for the module: its first init takes seconds)."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from conftest import REPO, VENV_BIN, free_port, run_env
from layerwise_dist.config import RunConfig, TrackingConfig
from layerwise_dist.evaluation import compare
from layerwise_dist.report import results_table, write_report
from layerwise_dist.run_metadata import (
    dataset_record,
    entry_point_name,
    fisher_table,
    git_commit,
    log_fisher_profile,
    read_run_file,
    save_run_file,
    source_tags,
)
from layerwise_dist.tracking import (
    BUFFER_NAME,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    RUN_FILE,
    MLflowTracker,
    NullTracker,
    TrackingError,
    default_tracking_uri,
    flatten,
    make_tracker,
    metric_name,
    mlflow_ui_command,
    replay,
    run_in_store,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("results")


@pytest.fixture(scope="module")
def client(store) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=default_tracking_uri(store))


def _artifacts(client: mlflow.MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def test_names_and_flatten():
    assert metric_name("hr@10") == "hr_at_10"
    assert metric_name("retained.ndcg@5") == "retained.ndcg_at_5"
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": 1, "a.c.d": [1, 2], "e": None}
    assert flatten({"eval": {"student": {"ndcg@10": 0.5}}}, sep="/") == {"eval/student/ndcg@10": 0.5}


def _stop_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the process group this test started (the server, its workers and job runners), then SIGKILL."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def test_ui_command_serves_the_logged_runs(tmp_path, monkeypatch):
    """The printed command, run as printed by a shell (the store path has a space), serves the run."""
    store = tmp_path / "my results"
    with MLflowTracker(TrackingConfig(experiment="ui"), store, run_name="shown", rank=0) as tracker:
        tracker.log_metrics({"hr@1": 0.5})
    port = free_port()
    cmd = mlflow_ui_command(store, port=port)
    assert cmd.startswith("mlflow ui ") and f"--port {port}" in cmd
    env = run_env() | {"PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no background job runners: the UI needs none
    log = tmp_path / "ui.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["bash", "-c", f"exec {cmd}"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # 30-40 s on 2 busy cores
        while True:
            assert proc.poll() is None, f"mlflow ui exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"mlflow ui did not answer in 180 s:\n{log.read_text()[-3000:]}"
            time.sleep(1)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        client = mlflow.MlflowClient(tracking_uri=url)
        exp = client.get_experiment_by_name("ui")
        assert exp is not None
        [run] = client.search_runs([exp.experiment_id])
        assert (run.info.run_id, run.info.run_name, run.info.status) == (tracker.run_id, "shown", "FINISHED")
        assert run.data.metrics == {"hr_at_1": 0.5}
    finally:
        _stop_group(proc)


def test_log_and_read_back(store, client, tmp_path):
    cfg = RunConfig()
    with MLflowTracker(TrackingConfig(), store, run_name="tiny-fisher", rank=0) as tracker:
        tracker.log_params(cfg.to_dict())
        tracker.set_tags({"strategy": "fisher"})
        for step in range(3):
            tracker.log_metrics({"loss": {"total": 1.0 / (step + 1)}, "lr": 1e-3}, step=step)
        tracker.log_metrics({"hr@1": 0.5, "mrr": 0.25, "memory": None})
        note = tmp_path / "note.txt"
        note.write_text("hello")
        tracker.log_artifact(note)
        tracker.log_artifact(note, "notes")
        run_id = tracker.run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny-fisher"
    assert run.data.params["train.lr"] == str(cfg.train.lr)
    assert run.data.params["eval.ks"] == "[1, 5, 10, 20]"  # a list param, as MLflow shows it
    assert run.data.params["data.num_candidates"] == "20"
    assert run.data.tags["strategy"] == "fisher"
    assert run.data.metrics["hr_at_1"] == 0.5 and "memory" not in run.data.metrics
    history = client.get_metric_history(run_id, "loss/total")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    assert _artifacts(client, run_id) == {"note.txt", "notes/note.txt"}
    local = client.download_artifacts(run_id, "notes/note.txt", str(tmp_path / "download"))
    assert Path(local).read_text() == "hello"
    # artifacts live beside the default store
    assert run.info.artifact_uri.startswith((store.resolve() / "mlartifacts").as_uri())


def test_failed_block_ends_run_failed(store, client):
    with pytest.raises(RuntimeError, match="boom"):
        with MLflowTracker(TrackingConfig(), store, run_name="crash", rank=0) as tracker:
            tracker.log_metrics({"loss": 1.0}, step=0)
            raise RuntimeError("boom")
    assert client.get_run(tracker.run_id).info.status == "FAILED"


def test_resume_and_compare_runs(store, client, tmp_path):
    teacher = {"hr@1": 0.5, "mrr": 0.4, "n": 8, "latency_ms_per_example_median": 30.0, "memory_model_bytes": 4000}
    runs = {}
    for name, hr in (("linear", 0.30), ("fisher", 0.45)):
        student = {"hr@1": hr, "mrr": 0.3, "n": 8, "latency_ms_per_example_median": 10.0, "memory_model_bytes": 1000}
        with make_tracker(TrackingConfig(experiment="compare"), store, run_name=name, rank=0) as tracker:
            tracker.log_params({"distill": {"layer_weighting": name}})
            tracker.log_metrics({"student": student, "comparison": compare(teacher, student)})
            runs[name] = tracker.run_id
    # resume one run and add to it
    with MLflowTracker(TrackingConfig(experiment="compare", run_id=runs["fisher"]), store, rank=0) as tracker:
        tracker.log_metrics({"extra": 1.0})
        md, png = write_report({"teacher": teacher, "student": student}, tmp_path / "report")
        tracker.log_artifact(md.parent, "report")
    exp = client.get_experiment_by_name("compare")
    found = client.search_runs([exp.experiment_id], order_by=["metrics.`comparison/retained/hr_at_1` DESC"])
    assert [r.info.run_name for r in found] == ["fisher", "linear"]
    best = client.get_run(runs["fisher"])
    assert best.data.metrics["comparison/retained/hr_at_1"] == pytest.approx(0.9)
    assert best.data.metrics["comparison/speedup"] == pytest.approx(3.0)
    assert best.data.metrics["comparison/memory_reduction/memory_model_bytes"] == pytest.approx(0.75)
    assert best.data.metrics["extra"] == 1.0 and best.info.status == "FINISHED"
    assert {"report/report.md", "report/report.png"} <= _artifacts(client, runs["fisher"])


def test_run_in_store_tells_a_live_run_from_a_missing_or_deleted_one(store, client, tmp_path):
    uri = default_tracking_uri(store)
    with make_tracker(TrackingConfig(experiment="exists"), store, run_name="kept", rank=0) as tracker:
        kept = tracker.run_id
    with make_tracker(TrackingConfig(experiment="exists"), store, run_name="gone", rank=0) as tracker:
        gone = tracker.run_id
    client.delete_run(gone)
    assert run_in_store(uri, kept) is True
    assert run_in_store(uri, gone) is False  # deleted: a restore makes a new one
    assert run_in_store(uri, "0" * 32) is False
    assert run_in_store(default_tracking_uri(tmp_path / "other"), kept) is False  # another store
    assert run_in_store(f"http://127.0.0.1:{free_port()}", kept) is None  # nobody there: not a "no"


def test_non_zero_rank_and_disabled_are_no_ops(tmp_path):
    for tracker in (
        make_tracker(TrackingConfig(), tmp_path, rank=1),
        make_tracker(TrackingConfig(enabled=False), tmp_path, rank=0),
        MLflowTracker(TrackingConfig(), tmp_path, rank=1),
    ):
        with tracker:
            tracker.log_params({"a": 1})
            tracker.log_metrics({"b": 2.0})
        assert tracker.run_id is None
    assert isinstance(make_tracker(TrackingConfig(), tmp_path, rank=1), NullTracker)
    assert not (tmp_path / "mlflow.db").exists()


def test_report_and_table(tmp_path):
    teacher = {"hr@1": 0.5, "hr@5": 0.9, "ndcg@5": 0.7, "mrr": 0.6, "n": 16}
    teacher |= {"latency_ms_per_example_median": 40.0, "memory_model_bytes": 8 * 2**20, "num_parameters": 2_000_000}
    teacher |= {"cuda_peak_allocated_bytes": None, "unavailable": {"cuda_peak_allocated_bytes": "model runs on cpu"}}
    student = {"hr@1": 0.0, "hr@5": 0.8, "ndcg@5": 0.35, "mrr": 0.3, "n": 16}
    student |= {"latency_ms_per_example_median": 10.0, "memory_model_bytes": 2 * 2**20, "num_parameters": 500_000}
    student |= {"cuda_peak_allocated_bytes": None}
    fisher = {"scores": [1.0, 1.0, 2.0, 4.0], "num_examples": 8, "model_id": "tiny"}
    memory = {"stages": {"fisher": {"wall_s": [3.2, 3.1], "peak_rss_mib": [812.4, None], "end_rss_mib": [700, 690]}}}
    teacher["position_bias"] = {"top1_shares": [0.75, 0.25, 0.0], "top1_modal_position": 0, "top1_modal_share": 0.75}
    teacher["position_bias"] |= {"top1_chance_share": 1 / 3, "profile_correlation_mean": 0.91}
    results = {"teacher": teacher, "student": student, "fisher": fisher, "memory": memory | {"note": "per rank"}}
    table = results_table(results)
    assert "HR@1" in table and "0.0% retained" in table and "4.00x faster" in table and "75.0% less" in table
    assert "CUDA" not in table  # not measured on either side: no row
    md, png = write_report(results, tmp_path)
    text = md.read_text()
    assert "| HR@5 | 0.9000 | 0.8000 | 88.9% retained |" in text
    assert "top layers by Fisher score: [3, 2, 0, 1]" in text
    assert "teacher cuda_peak_allocated_bytes: not measured (model runs on cpu)" in text
    assert "| fisher | 3 s / 3 s | 812 MiB / n/a | 700 MiB / 690 MiB |" in text
    assert "| teacher | 75% at A (chance 33%) | A 75%, B 25%, C 0% | +0.91 |" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "## Training" not in text and "MLflow run" not in text  # no history, no run: no empty sections


def test_report_tells_the_whole_story(tmp_path):
    """Student layers with their alignment weights, loss components and the validation curve from the run's
    history (with a chart), Spearman(Fisher, Block Influence) and the MLflow run id (issue 13, item 5)."""
    history = [
        {"step": 1, "total": 9.0, "kd": 2.0, "align": 1.0, "ce": 6.0, "lr": 1e-4},
        {
            "step": 2,
            "total": 7.0,
            "kd": 1.5,
            "align": 0.8,
            "ce": 4.7,
            "lr": 1e-4,
            "valid/total": 7.5,
            "valid/ndcg@10": 0.31,
        },
        {"step": 3, "total": 6.0, "kd": 1.2, "align": 0.7, "ce": 4.1, "lr": 1e-4},
        {
            "step": 4,
            "total": 5.5,
            "kd": 1.1,
            "align": 0.6,
            "ce": 3.8,
            "lr": 1e-4,
            "valid/total": 6.9,
            "valid/ndcg@10": 0.36,
        },
    ]
    (tmp_path / "train_history.json").write_text(json.dumps(history))
    fisher = {"scores": [1.0, 2.0, 3.0, 4.0], "num_examples": 8, "block_influence": [0.1, 0.2, 0.4, 0.3]}
    results = {
        "student": {"hr@1": 0.25, "mrr": 0.5, "n": 4},
        "fisher": fisher,
        "student_layers": {
            "selection": "fisher-topk",
            "weighting": "fisher",
            "layer_map": [1, 3],
            "weights": [0.25, 0.75],
        },
        "mlflow_run_id": "abc123",
    }
    md, _ = write_report(results, tmp_path)
    text = md.read_text()
    assert "| 0 | 1 | 0.2500 |" in text and "| 1 | 3 | 0.7500 |" in text
    assert "Layer selection `fisher-topk`, layer-loss weighting `fisher`" in text
    assert "## Training (4 steps)" in text and "| logit KD | 2.0000 | 1.1000 | 1.1000 |" in text
    assert "| 2 | 7.5000 | 0.3100 |" in text and "| 4 | 6.9000 | 0.3600 |" in text
    assert "Spearman(Fisher, Block Influence) = +0.800" in text
    assert "MLflow run: `abc123`" in text
    chart = tmp_path / "training.png"
    assert "![training curves](training.png)" in text and chart.read_bytes()[:4] == b"\x89PNG"


def test_report_with_student_only(tmp_path):
    student = {"hr@1": 0.25, "mrr": 0.5, "n": 4, "latency_ms_per_example_median": 12.5}
    table = results_table({"student": student})
    assert "n/a" in table and "0.2500" in table
    md, png = write_report({"student": student, "config": {"ranks": 1}}, tmp_path)
    assert "| HR@1 | n/a | 0.2500 |  |" in md.read_text() and png.exists()
    with pytest.raises(KeyError):
        results_table({})


def test_report_leaves_the_matplotlib_backend_alone(tmp_path):
    """write_report draws with the object API: the caller's backend stays and pyplot is never imported."""
    code = (
        "import sys, matplotlib\n"
        "matplotlib.use('svg')\n"
        "from layerwise_dist.report import write_report\n"
        "teacher, student = {'hr@1': 0.5, 'n': 4}, {'hr@1': 0.25, 'n': 4}\n"
        "fisher = {'scores': [1.0, 2.0, 4.0], 'num_examples': 2}\n"
        "md, png = write_report({'teacher': teacher, 'student': student, 'fisher': fisher}, sys.argv[1])\n"
        "pyplot = 'matplotlib.pyplot' in sys.modules\n"
        "print(matplotlib.rcParams['backend'], pyplot, png.read_bytes()[:4] == b'\\x89PNG')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=REPO,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["svg", "False", "True"]


# --- tracking never kills or stalls training (issue 14.3): a real `mlflow server` that goes away ---------


def _tracking_cfg(uri: str, **extra) -> TrackingConfig:
    """A tracking section with settings that may be newer than TrackingConfig (required, flush_timeout_s)."""
    cfg = TrackingConfig(tracking_uri=uri, experiment="outage")
    for key, value in extra.items():
        setattr(cfg, key, value)
    return cfg


class _Server:
    """A real `mlflow server` (SQLite backend, local artifacts) on 127.0.0.1 that a test can kill and restart."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        env = run_env() | {"PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        env.pop("MLFLOW_TRACKING_URI", None)
        cmd = [
            str(VENV_BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.folder / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.folder / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        self.starts += 1
        self.log = self.folder / f"server-{self.starts}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=self.folder, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def healthy(self, timeout: float = 0.5) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=timeout) as resp:
                return resp.status == 200
        except OSError:
            return False

    def wait_up(self, limit: float = 150.0) -> None:
        deadline = time.monotonic() + limit
        while not self.healthy():
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"mlflow server not up in {limit} s:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.25)

    def kill(self) -> None:
        """SIGKILL the server's whole process group: a crash, not a shutdown."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # children of the group (uvicorn workers) gone too
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            _stop_group(self.proc, grace=10)
            self.proc = None


@pytest.fixture(scope="module")
def _module_server(tmp_path_factory):
    srv = _Server(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def server(_module_server):
    """One server for the module (a start takes 10-30 s on 2 busy cores), up at the start of each test."""
    if _module_server.proc is None or _module_server.proc.poll() is not None:
        _module_server.start()
    _module_server.wait_up()
    return _module_server


def _buffer_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_unreachable_server_buffers_and_required_fails_in_one_line(tmp_path, caplog):
    """Nothing listens on the port: the tracker starts at once with one warning and buffers to the run
    folder; each call returns at once; end() waits flush_timeout_s and leaves the buffer, saying how to
    replay it. With tracking.required=true the same start is one TrackingError line."""
    uri = f"http://127.0.0.1:{free_port()}"
    run_dir = tmp_path / "run"
    caplog.set_level(logging.WARNING, logger="layerwise_dist.tracking")
    t0 = time.monotonic()
    tracker = make_tracker(
        _tracking_cfg(uri, flush_timeout_s=1.0), tmp_path, run_name="offline", rank=0, run_dir=run_dir
    )
    started_s = time.monotonic() - t0
    assert started_s < 10, started_s  # was ~6 minutes of MLflow retries
    assert isinstance(tracker, MLflowTracker) and tracker.offline and tracker.run_id is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unreachable" in warnings[0] and str(run_dir / BUFFER_NAME) in warnings[0]
    assert "\n" not in warnings[0]
    slowest = 0.0
    for step in range(20):
        t = time.perf_counter()
        tracker.log_metrics({"train": {"loss": 1.0 / (step + 1)}}, step=step)
        slowest = max(slowest, time.perf_counter() - t)
    tracker.log_params({"train": {"lr": 1e-3}})
    tracker.set_tags({"stage": "distill"})
    assert slowest < 0.05, slowest
    t0 = time.monotonic()
    tracker.end()
    assert time.monotonic() - t0 < 5
    buffer = run_dir / BUFFER_NAME
    records = _buffer_records(buffer)
    assert records[0]["t"] == "run" and records[0]["uri"] == uri and records[0]["run_name"] == "offline"
    steps = [m[3] for r in records if r["t"] == "metrics" for m in r["m"]]
    assert steps == list(range(20))
    assert {"t": "params", "p": [["train.lr", "0.001"]]} in records
    assert records[-1]["t"] == "end" and records[-1]["status"] == "FINISHED"
    last = caplog.records[-1].getMessage()
    assert "tracking replay" in last and str(buffer) in last
    print(f"unreachable: start {started_s:.2f} s, slowest call {slowest * 1000:.2f} ms")

    caplog.clear()
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match=r"unreachable .*tracking.required=true") as err:
        make_tracker(_tracking_cfg(uri, required=True), tmp_path, rank=0, run_dir=tmp_path / "run2")
    assert time.monotonic() - t0 < 10 and "\n" not in str(err.value)
    assert not (tmp_path / "run2" / BUFFER_NAME).exists()


def test_server_killed_and_restarted_mid_run_loses_nothing(tmp_path, server, caplog):
    """A run logs every ~50 ms; its MLflow server is SIGKILLed at step 10 and restarted (same port, same
    store) at step 25. No call waits on the network, the tracker reconnects by itself while the run goes
    on, and after end() every metric of every step is in the server with its step and original timestamp."""
    caplog.set_level(logging.WARNING, logger="layerwise_dist.tracking")
    cfg = _tracking_cfg(server.url, flush_timeout_s=60.0)
    run_dir = tmp_path / "run"
    tracker = make_tracker(cfg, tmp_path / "results", run_name="outage", rank=0, run_dir=run_dir)
    assert tracker.run_id and not tracker.offline
    run_id = tracker.run_id
    tracker.log_params({"train": {"lr": 1e-3}})
    calls: list[float] = []
    stamps: dict[int, tuple[int, int]] = {}
    step, back_at = 0, None
    t_loop = time.monotonic()
    while back_at is None or step < max(40, back_at + 15):
        if step == 10:
            server.kill()
        if step == 25:
            server.start()
        if step > 25 and back_at is None and step % 5 == 0 and server.healthy(0.2):
            back_at = step
        before = int(time.time() * 1000)
        t = time.perf_counter()
        tracker.log_metrics({"train": {"loss": 1.0 / (step + 1)}, "step_twice": 2.0 * step}, step=step)
        calls.append(time.perf_counter() - t)
        stamps[step] = (before, int(time.time() * 1000))
        if step == 24:
            assert tracker.offline  # it noticed the outage, and training did not
        step += 1
        time.sleep(0.05)
        assert time.monotonic() - t_loop < 150, "mlflow server did not come back"
    loop_s = time.monotonic() - t_loop
    t0 = time.monotonic()
    tracker.end()
    end_s = time.monotonic() - t0
    print(
        f"outage: {step} steps in {loop_s:.1f} s (server back at step {back_at}), slowest call "
        f"{max(calls) * 1000:.2f} ms, end() {end_s:.2f} s"
    )
    assert max(calls) < 0.05, max(calls)
    assert end_s < 10, end_s
    client = mlflow.MlflowClient(tracking_uri=server.url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"train.lr": "0.001"}
    for key, value in (("train/loss", lambda s: 1.0 / (s + 1)), ("step_twice", lambda s: 2.0 * s)):
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == list(range(step)), key  # every step once: none lost, none doubled
        assert [m.value for m in history] == pytest.approx([value(s) for s in range(step)])
        for m in history:  # the time of the call, not of the (late) delivery
            assert stamps[m.step][0] <= m.timestamp <= stamps[m.step][1], (key, m.step)
    assert not (run_dir / BUFFER_NAME).exists()  # delivered in full: the buffer is gone
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warnings if "stopped answering" in w]) == 1
    assert len([w for w in warnings if "answers again" in w]) == 1


def test_replay_a_left_buffer_into_a_server(tmp_path, server, caplog):
    """A run whose server never answered leaves its buffer; replay() sends it to a server later: a new run
    with the original name, start time, steps, timestamps, params, tags, artifact and status."""
    dead = f"http://127.0.0.1:{free_port()}"
    run_dir = tmp_path / "run"
    note = tmp_path / "note.txt"
    note.write_text("hello")
    tracker = make_tracker(_tracking_cfg(dead, flush_timeout_s=0.5), tmp_path, run_name="late", rank=0, run_dir=run_dir)
    tracker.log_params({"train": {"lr": 1e-3}})
    tracker.set_tags({"stage": "distill"})
    for step in range(5):
        tracker.log_metrics({"loss": float(step)}, step=step)
    tracker.log_artifact(note, "notes")
    tracker.end("FAILED")
    buffer = run_dir / BUFFER_NAME
    records = _buffer_records(buffer)
    stamps = [m[2] for r in records if r["t"] == "metrics" for m in r["m"]]

    with pytest.raises(TrackingError, match="unreachable"):
        replay(buffer)  # still the dead server it was recorded for: one line, buffer kept
    assert buffer.exists()
    t0 = time.monotonic()
    run_id = replay(buffer, server.url)
    replay_s = time.monotonic() - t0
    print(f"replay: {len(records)} records in {replay_s:.2f} s")
    assert not buffer.exists() and not buffer.with_name(BUFFER_NAME + ".state.json").exists()
    client = mlflow.MlflowClient(tracking_uri=server.url)
    run = client.get_run(run_id)
    assert run.info.run_name == "late" and run.info.status == "FAILED"
    assert run.info.start_time == records[0]["start_time"] and run.info.end_time == records[-1]["time"]
    assert run.data.params == {"train.lr": "0.001"} and run.data.tags["stage"] == "distill"
    history = client.get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value, m.timestamp) for m in history) == [(s, float(s), stamps[s]) for s in range(5)]
    assert _artifacts(client, run_id) == {"notes/note.txt"}
    with pytest.raises(TrackingError, match="no tracking buffer"):
        replay(buffer, server.url)


def test_replay_continues_the_run_it_was_cut_from(tmp_path, server):
    """A process SIGKILLed mid-run leaves its buffer: records the server already has, then records it never
    got (here appended as if written while the server was away) and a line cut mid-write. replay() continues
    that same run with only the rest and ends it FAILED (the buffer has no end record)."""
    run_dir = tmp_path / "run"
    code = (
        "import sys, time\n"
        "from layerwise_dist.config import TrackingConfig\n"
        "from layerwise_dist.tracking import make_tracker\n"
        "cfg = TrackingConfig(tracking_uri=sys.argv[1], experiment='outage')\n"
        "t = make_tracker(cfg, sys.argv[2], run_name='killed', rank=0, run_dir=sys.argv[2])\n"
        "for step in range(3):\n"
        "    t.log_metrics({'loss': float(step)}, step=step)\n"
        "assert t.flush(60)\n"
        "print(t.run_id, flush=True)\n"
        "time.sleep(300)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, server.url, str(run_dir)],
        cwd=REPO,
        env=run_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        run_id = proc.stdout.readline().strip()
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert run_id, "the tracking process did not start its run"
    buffer = run_dir / BUFFER_NAME
    with open(buffer, "a") as f:
        for step in range(3, 6):
            f.write(json.dumps({"t": "metrics", "m": [["loss", float(step), 1_700_000_000_000 + step, step]]}) + "\n")
        f.write('{"t":"metrics","m":[["loss",9')  # cut mid-write by the kill
    assert replay(buffer) == run_id
    client = mlflow.MlflowClient(tracking_uri=server.url)
    history = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(s, float(s)) for s in range(6)]  # none twice, none lost
    assert client.get_run(run_id).info.status == "FAILED" and not buffer.exists()


# --- MLflow that reads well in the UI (issue 13.4) ---------------------------------------------------------


def test_experiment_is_tagged_for_model_training(store, client):
    """New experiments open in MLflow 3's model-training view; an old untagged one gets the tag, a chosen
    kind is kept."""
    with MLflowTracker(TrackingConfig(experiment="kind-new"), store, rank=0) as tracker:
        tracker.log_metrics({"x": 1.0})
    assert client.get_experiment_by_name("kind-new").tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert EXPERIMENT_KIND == "custom_model_development"
    client.create_experiment("kind-old")  # as an earlier version made it: no kind
    client.create_experiment("kind-genai", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    for name in ("kind-old", "kind-genai"):
        with MLflowTracker(TrackingConfig(experiment=name), store, rank=0) as tracker:
            tracker.log_metrics({"x": 1.0})
    assert client.get_experiment_by_name("kind-old").tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert client.get_experiment_by_name("kind-genai").tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_fisher_profile_is_one_chart_and_one_table(store, client, tmp_path):
    from layerwise_dist.fisher import FisherProfile

    profile = FisherProfile(
        scores=[1.0, 4.0, 3.0, 2.0],
        block_influence=[0.1, 0.2, 0.3, 0.4],
        angular_distance=[0.5, 0.6, 0.7, 0.8],
        model_id="tiny",
    )
    rows = fisher_table(profile)
    assert [r["rank"] for r in rows] == [4, 1, 2, 3]
    assert [r["share"] for r in rows] == pytest.approx([0.1, 0.4, 0.3, 0.2])
    assert rows[2]["block_influence"] == 0.3 and rows[0]["angular_distance"] == 0.5
    with MLflowTracker(TrackingConfig(experiment="fisher"), store, rank=0) as tracker:
        paths = log_fisher_profile(tracker, profile, tmp_path)
    assert _artifacts(client, tracker.run_id) == {
        "fisher/fisher_profile.json",
        "fisher/fisher_profile.png",
        "fisher/fisher_profile.csv",
    }
    lines = paths["csv"].read_text().splitlines()
    assert lines[0] == "layer,fisher,share,rank,block_influence,angular_distance"
    assert lines[2] == "1,4.0,0.4,1,0.2,0.6"
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert set(client.get_run(tracker.run_id).data.metrics) == {"fisher/top30_share", "fisher/bottom30_share"}


def test_nested_run_dataset_input_and_run_file(store, client, tmp_path):
    """A nested stage run under its job's run, the data set as a run input with its digest, and the run file
    that a resumed job reads (only for the store it was written for)."""
    from layerwise_dist.config import DataConfig
    from layerwise_dist.data.splits import SplitData

    splits = SplitData(
        train={"u1": ["a", "b"], "u2": ["b"]},
        valid={"u1": "c", "u2": "a"},
        test={"u1": "d", "u2": "c"},
        titles={i: i.upper() for i in "abcd"},
        category="Toys",
    )
    record = dataset_record(splits, DataConfig())
    assert record["name"] == "embedded:Toys" and len(record["digest"]) == 16
    changed = SplitData(**{**splits.__dict__, "test": {"u1": "d", "u2": "b"}, "all_items": []})
    assert dataset_record(changed, DataConfig())["digest"] != record["digest"]  # the digest follows the data
    assert json.loads(record["profile"]) == {"users": 2, "items": 4, "train_interactions": 3, "category": "Toys"}

    run_dir = tmp_path / "run"
    with MLflowTracker(TrackingConfig(experiment="nested"), store, run_name="job", rank=0, run_dir=run_dir) as job:
        job.log_input(record, context="train")
        with pytest.raises(ValueError, match="digest"):
            job.log_input({**record, "digest": ""})
        stage = job.nested("distill", run_dir, buffer_name="tracking_buffer.distill.jsonl", tags={"stage": "distill"})
        with stage:
            stage.log_metrics({"train": {"kd": 0.5}}, step=1)
        path = save_run_file(run_dir, job, {"distill": stage.run_id})
    assert path == run_dir / RUN_FILE
    parent, child = client.get_run(job.run_id), client.get_run(stage.run_id)
    assert child.data.tags["mlflow.parentRunId"] == job.run_id and child.data.tags["stage"] == "distill"
    assert child.info.run_name == "distill" and child.info.experiment_id == parent.info.experiment_id
    assert child.data.metrics == {"train/kd": 0.5}
    [given] = parent.inputs.dataset_inputs
    assert (given.dataset.name, given.dataset.digest) == ("embedded:Toys", record["digest"])
    assert [(t.key, t.value) for t in given.tags] == [("mlflow.data.context", "train")]
    found = read_run_file(run_dir, default_tracking_uri(store))
    assert found == {
        "tracking_uri": default_tracking_uri(store),
        "run_id": job.run_id,
        "stages": {"distill": stage.run_id},
    }
    assert read_run_file(run_dir, "http://127.0.0.1:1") is None  # another store: a new run there
    assert save_run_file(run_dir, NullTracker()) is None


def test_resume_from_the_run_file_continues_the_run(store, client, tmp_path):
    """The run id a resumed job found in its folder: the same run goes RUNNING again, then FINISHED; an id the
    store does not have gives a new run (a warning), where tracking.run_id given by hand is an error."""
    with MLflowTracker(TrackingConfig(experiment="resume"), store, run_name="first", rank=0) as tracker:
        tracker.log_metrics({"train/total": 2.0}, step=1)
    first = client.get_run(tracker.run_id)
    again = make_tracker(TrackingConfig(experiment="resume"), store, rank=0, run_id=tracker.run_id, strict_resume=False)
    assert again.run_id == tracker.run_id and client.get_run(tracker.run_id).info.status == "RUNNING"
    again.log_metrics({"train/total": 1.0}, step=2)
    again.end()
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.end_time >= first.info.end_time
    assert [m.step for m in client.get_metric_history(tracker.run_id, "train/total")] == [1, 2]
    missing = "0" * 32
    lenient = make_tracker(TrackingConfig(experiment="resume"), store, rank=0, run_id=missing, strict_resume=False)
    with lenient:
        assert lenient.run_id not in (None, missing)
    with pytest.raises(TrackingError, match="no such run"):
        make_tracker(TrackingConfig(experiment="resume", run_id=missing), store, rank=0)


def test_a_resumed_run_given_another_param_value_keeps_the_first_and_tags_the_change(store, client, caplog):
    """MLflow refuses to change a logged param (a rerun that spells output_dir relative where the first sitting
    gave it absolute): the resumed run keeps the first value, records the new one as changed_param.<key>, logs
    the params it did not have, and says so once at INFO, not as a param 'not logged' warning."""
    import logging

    with MLflowTracker(TrackingConfig(experiment="changed"), store, run_name="first", rank=0) as tracker:
        tracker.log_params({"output_dir": "/abs/results/x", "train": {"lr": 0.001}})
    again = make_tracker(
        TrackingConfig(experiment="changed"), store, rank=0, run_id=tracker.run_id, strict_resume=False
    )
    with caplog.at_level(logging.INFO, logger="layerwise_dist"), again:
        again.log_params({"output_dir": "results/x", "train": {"lr": 0.001, "max_steps": 4}})
    run = client.get_run(tracker.run_id)
    assert run.data.params == {"output_dir": "/abs/results/x", "train.lr": "0.001", "train.max_steps": "4"}
    assert run.data.tags["changed_param.output_dir"] == "/abs/results/x -> results/x"
    assert not [k for k in run.data.tags if k == "changed_param.train.lr"]  # the same value is no change
    assert run.info.status == "FINISHED"
    assert "not logged" not in caplog.text and "kept as changed_param.* tags: output_dir" in caplog.text


def test_source_tags_name_the_commit_and_entry_point(tmp_path):
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    tags = source_tags("pipeline")
    assert tags["mlflow.source.git.commit"] == head and tags["git.dirty"] in ("true", "false")
    assert tags["mlflow.project.entryPoint"] == "pipeline" and tags["mlflow.source.type"] == "LOCAL"
    assert git_commit(tmp_path) is None or git_commit(tmp_path)[0] == head  # tmp: not git, so the cwd's checkout
    assert entry_point_name("pipeline", "/x/.venv/bin/layerwise-dist") == "layerwise-dist pipeline"
    assert entry_point_name("pipeline", str(REPO / "layerwise_dist" / "worker.py")) == "layerwise-dist pipeline"
    assert entry_point_name("distill", "/elsewhere/train.py") == "/elsewhere/train.py"


class _Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: list[str], params=None) -> list[str]:  # noqa: ANN001
        return [f"echo {x}" for x in model_input]


def test_log_model_is_a_run_artifact_and_one_logged_model(store, client, tmp_path, monkeypatch):
    """A model folder becomes the run's model/ artifacts and one MLflow logged model of the run (logging it
    again, as a resumed run does, updates that model); both load with mlflow.pyfunc."""
    folder = tmp_path / "mlflow_model"
    mlflow.pyfunc.save_model(str(folder), python_model=_Echo(), pip_requirements=["mlflow"])
    with MLflowTracker(TrackingConfig(experiment="models"), store, rank=0) as tracker:
        with pytest.raises(FileNotFoundError, match="no MLmodel"):
            tracker.log_model(tmp_path)
        tracker.log_model(folder)
        tracker.log_model(folder)
    run = client.get_run(tracker.run_id)
    assert "model/MLmodel" in _artifacts(client, tracker.run_id)
    [model] = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{tracker.run_id}'")
    assert model.name == "student" and str(model.status) in ("READY", "LoggedModelStatus.READY")
    assert [o.model_id for o in run.outputs.model_outputs] == [model.model_id]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", default_tracking_uri(store))
    for uri in (f"runs:/{tracker.run_id}/model", f"models:/{model.model_id}"):
        assert mlflow.pyfunc.load_model(uri).predict(["a"]) == ["echo a"]


def test_save_student_model_needs_a_saved_student(tmp_path):
    from layerwise_dist.mlflow_model import save_student_model

    with pytest.raises(FileNotFoundError, match="no saved student"):
        save_student_model(tmp_path, tmp_path / "model", {})


@pytest.mark.integration
def test_pipeline_reads_well_in_the_mlflow_ui(tmp_path, server, monkeypatch):
    """The tiny pipeline against a real `mlflow server` on 127.0.0.1, stopped after 2 of 4 steps and resumed,
    checked through MlflowClient: experiment kind, one job run with a nested run per stage, source, teacher,
    student and data set tags, the data set as a run input with its digest, the Fisher profile as chart and
    table (no per-layer metrics), metric names of one scheme, the student as a loadable pyfunc model, and the
    resumed job continuing the same runs."""
    import pandas as pd

    from conftest import run_cli
    from layerwise_dist.config import load_config
    from layerwise_dist.data import load_splits

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    out_dir = tmp_path / "results" / "tiny"
    common = [
        "pipeline",
        "--preset",
        "tiny",
        "--nproc",
        "1",
        f"output_dir={out_dir}",
        "tracking.enabled=true",
        f"tracking.tracking_uri={server.url}",
        "tracking.experiment=ui-check",
        "tracking.required=true",
    ]
    t0 = time.monotonic()
    first = run_cli([*common, "train.stop_at_step=2"])
    assert first.returncode == 0, first.stderr[-4000:]
    saved = json.loads((out_dir / RUN_FILE).read_text())
    client = mlflow.MlflowClient(tracking_uri=server.url)
    first_end = client.get_run(saved["run_id"]).info.end_time
    resumed = run_cli([*common, "train.resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    print(f"two pipeline parts: {time.monotonic() - t0:.0f} s")
    assert json.loads((out_dir / RUN_FILE).read_text()) == saved  # the resumed job continued the same runs
    assert not list(out_dir.glob("tracking_buffer*"))  # every record delivered

    exp = client.get_experiment_by_name("ui-check")
    assert exp.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    runs = client.search_runs([exp.experiment_id])
    [job] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    stages = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == job.info.run_id}
    assert len(runs) == 4 and set(stages) == {"fisher", "distill", "evaluate"}
    assert job.info.run_id == saved["run_id"] and {n: r.info.run_id for n, r in stages.items()} == saved["stages"]
    assert all(r.info.status == "FINISHED" for r in runs) and job.info.end_time > first_end

    tags = job.data.tags
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert tags["mlflow.source.git.commit"] == head
    assert tags["mlflow.source.name"] == "layerwise-dist pipeline" and tags["mlflow.project.entryPoint"] == "pipeline"
    assert tags["teacher"] == "tiny" and tags["student.num_layers"] == "2" and tags["resumed"] == "true"
    assert json.loads(tags["student.layers"]) == json.loads((out_dir / "layer_weights.json").read_text())["layer_map"]
    [given] = job.inputs.dataset_inputs
    assert given.dataset.name == tags["dataset"] == "embedded:All_Beauty"
    assert given.dataset.digest == tags["dataset.digest"]
    assert (
        given.dataset.digest
        == dataset_record(load_splits(load_config("tiny").data), load_config("tiny").data)["digest"]
    )
    assert job.data.params["train.max_steps"] == "4" and "train.resume" in job.data.params
    # The software and machine it ran on, as tags and in results.json.
    import torch

    assert tags["env.torch"] == torch.__version__ and tags["env.cpu_count"] == str(os.cpu_count())
    assert json.loads((out_dir / "results.json").read_text())["environment"]["torch"] == torch.__version__

    fisher = stages["fisher"]
    assert {"fisher/fisher_profile.png", "fisher/fisher_profile.csv", "fisher/fisher_profile.json"} <= _artifacts(
        client, fisher.info.run_id
    )
    every_metric = [k for r in runs for k in r.data.metrics]
    assert set(fisher.data.metrics) == {"fisher/top30_share", "fisher/bottom30_share"}
    assert not [k for k in every_metric if k.startswith("fisher/layer")]
    scheme = re.compile(r"^(train|valid|eval|fisher|adapt)(/[a-z0-9_]+)+$")
    assert [k for k in every_metric if not scheme.match(k)] == []
    distill = stages["distill"].info.run_id
    assert [m.step for m in client.get_metric_history(distill, "train/kd")] == [1, 2, 3, 4]  # both parts, once
    assert "valid/ndcg_at_10" in stages["distill"].data.metrics
    for name in ("eval/student/ndcg_at_10", "eval/teacher/ndcg_at_10", "eval/comparison/retained/ndcg_at_10"):
        assert name in job.data.metrics and name in stages["evaluate"].data.metrics
    assert {"config.yaml", "results.json", "report.md", "model/MLmodel"} <= _artifacts(client, job.info.run_id)
    # one logged model for the job, though both parts logged it
    [logged] = client.search_logged_models([exp.experiment_id])
    assert logged.name == "student" and logged.source_run_id == job.info.run_id
    assert [o.model_id for o in job.outputs.model_outputs] == [logged.model_id]

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    user = next(iter(load_splits(load_config("tiny").data).train))
    for uri in (f"runs:/{job.info.run_id}/model", f"models:/{logged.model_id}"):
        recs = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"user_id": [user], "top_k": [3]}))
        assert list(recs.columns) == ["user_id", "rank", "item_id", "title", "score", "source"]
        assert recs["rank"].tolist() == [1, 2, 3] and (recs["user_id"] == user).all()
        assert recs["score"].is_monotonic_decreasing


def test_restore_child_makes_one_nested_run_from_a_finished_folder(tmp_path):
    """A finished child (here a zero-shot Fisher child) whose run the store lacks gets one nested run from its
    folder: params, the Fisher profile's depth shares and files, the scores of results.json; a second call,
    the store now having it, adds nothing."""
    from layerwise_dist.config import load_config
    from layerwise_dist.fisher.profile import FisherProfile
    from layerwise_dist.recipes.session import RunSession

    results_dir = tmp_path / "results"
    cfg = load_config("tiny", [f"output_dir={results_dir / 'abl'}", "tracking.enabled=true"])
    child = results_dir / "abl" / "zero_shot"
    profile = FisherProfile(scores=[1.0, 2.0, 3.0, 10.0])
    profile.save_json(child / "fisher_profile.json")
    scores = {"student": {"ndcg@10": 0.25, "n": 16, "ci95": {"ndcg@10": [0.2, 0.3]}}}
    (child / "results.json").write_text(json.dumps({**scores, "baselines": {"random": {"ndcg@10": 0.2}}}))
    (child / "train_history.json").write_text(json.dumps([{"step": 1, "total": 3.0}, {"step": 2, "total": 2.5}]))
    session = object.__new__(RunSession)  # the parts restore_child reads: the job's folder and its run
    session.out = results_dir / "abl"
    with make_tracker(cfg.tracking, results_dir, run_name="abl", rank=0) as parent:
        session.run_tracker = parent
        run_id = session.restore_child(child, cfg, "abl-zero-shot")
        assert run_id and session.restore_child(child, cfg, "abl-zero-shot") is None
    client = mlflow.MlflowClient(tracking_uri=default_tracking_uri(results_dir))
    run = client.get_run(run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id and run.info.status == "FINISHED"
    assert run.data.tags["restored_from"] == str(child) and run.info.run_name == "abl-zero-shot"
    assert run.data.metrics["fisher/top30_share"] == pytest.approx(profile.depth_shares(0.3)[0])
    assert run.data.metrics["eval/student/ndcg_at_10"] == 0.25 and "eval/student/ci95" not in run.data.metrics
    assert run.data.metrics["eval/baseline/random/ndcg_at_10"] == 0.2
    assert [m.value for m in client.get_metric_history(run_id, "train/total")] == [3.0, 2.5]
    assert {"results.json", "train_history.json", "fisher/fisher_profile.png"} <= _artifacts(client, run_id)
    assert read_run_file(child, default_tracking_uri(results_dir))["run_id"] == run_id
    experiment = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    assert len(client.search_runs([experiment])) == 2  # the parent and one restored child
