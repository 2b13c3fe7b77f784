"""MLflow tracking against a real SQLite store (one store for the module: its first init takes seconds)."""

from __future__ import annotations

import os
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
from layerwise_dist.tracking import (
    MLflowTracker,
    NullTracker,
    default_tracking_uri,
    flatten,
    make_tracker,
    metric_name,
    mlflow_ui_command,
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
    assert run.data.params["eval.ks"] == "[1, 5, 10]"
    assert run.data.params["data.num_candidates"] == "20"
    assert run.data.tags["strategy"] == "fisher"
    assert run.data.metrics["hr_at_1"] == 0.5 and "memory" not in run.data.metrics
    history = client.get_metric_history(run_id, "loss.total")
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
    found = client.search_runs([exp.experiment_id], order_by=["metrics.`comparison.retained.hr_at_1` DESC"])
    assert [r.info.run_name for r in found] == ["fisher", "linear"]
    best = client.get_run(runs["fisher"])
    assert best.data.metrics["comparison.retained.hr_at_1"] == pytest.approx(0.9)
    assert best.data.metrics["comparison.speedup"] == pytest.approx(3.0)
    assert best.data.metrics["comparison.memory_reduction.memory_model_bytes"] == pytest.approx(0.75)
    assert best.data.metrics["extra"] == 1.0 and best.info.status == "FINISHED"
    assert {"report/report.md", "report/report.png"} <= _artifacts(client, runs["fisher"])


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
    results = {"teacher": teacher, "student": student, "fisher": fisher}
    table = results_table(results)
    assert "HR@1" in table and "0.0% retained" in table and "4.00x faster" in table and "75.0% less" in table
    assert "CUDA" not in table  # not measured on either side: no row
    md, png = write_report(results, tmp_path)
    text = md.read_text()
    assert "| HR@5 | 0.9000 | 0.8000 | 88.9% retained |" in text
    assert "top layers by Fisher score: [3, 2, 0, 1]" in text
    assert "teacher cuda_peak_allocated_bytes: not measured (model runs on cpu)" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


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
