"""Ray Train: the tiny preset on 2 CPU workers (gloo), checked by what it leaves behind.

The driver-side config handling is tested without Ray (fast). Two runs are ``distributed`` +
``integration``, with one schedule (4 steps, a checkpoint every 2, no Fisher pass):

* ``run_ray`` on a local Ray instance started in this process, uninterrupted: a report every
  step, Ray checkpoints that are complete DeepSpeed checkpoints, a loadable student;
* the same job as Ray users run it, on a cluster this module starts (``ray start --head`` on
  127.0.0.1, dashboard and job server included) through ``ray job submit``, with one worker
  SIGKILLed after step 3 (``ray.fault_kill_step``) and ``ray.max_failures=1``: Ray restarts the
  workers from the step-2 checkpoint, the step counter continues at 3, and every loss after the
  restart equals the uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import REPO, VENV_BIN, free_port, run_env
from layerwise_dist.checkpoint import CheckpointStore
from layerwise_dist.config import ConfigError, RunConfig, load_config
from layerwise_dist.ray_train import FAULT_MARKER, MANIFEST, REPORT_LOG, prepare_loop_config

# One schedule for both Ray runs (their losses are compared step by step).
SCHEDULE = [
    "train.max_steps=4",
    "train.save_every=2",
    "student.selection=uniform",  # no Fisher pass: the runs are about the loop
    "distill.layer_weighting=linear",
    "tracking.enabled=false",
]
LOSS_KEYS = ("train/total", "train/ce", "train/kd", "train/align", "train/lr")


def test_loop_config_makes_paths_absolute(tmp_path, monkeypatch):
    """Workers run in another cwd: the resolved config they receive has absolute output_dir/ds_config/data paths."""
    monkeypatch.chdir(REPO)
    loop = prepare_loop_config(
        "distill", "tiny", ["output_dir=results/x", "tracking.tracking_uri=sqlite:///results/mlflow.db"]
    )
    assert loop["command"] == "distill" and set(loop) == {"command", "config"}
    cfg = loop["config"]  # the resolved object itself: workers never parse preset + overrides again
    assert isinstance(cfg, RunConfig)
    assert cfg.output_dir == str(REPO / "results/x")
    assert cfg.ds_config == str(REPO / "ds_configs/zero3.json")
    assert cfg.teacher.model == "tiny"  # a model name, not a path: left alone
    assert cfg.tracking.tracking_uri == f"sqlite:///{REPO / 'results/mlflow.db'}"
    assert cfg.ray.storage_path == str(REPO / "results/ray")  # the schema's default, made absolute
    assert cfg.train == load_config("tiny").train  # everything else as resolved on the driver
    assert pickle.loads(pickle.dumps(cfg)) == cfg  # what Ray does to train_loop_config


def test_ray_section_reaches_the_run_config(tmp_path, monkeypatch):
    """ray.* are schema keys with checks; a storage URI is passed as given, a local folder made absolute."""
    monkeypatch.chdir(tmp_path)
    ds = f"ds_config={REPO / 'ds_configs/zero3.json'}"
    cfg = prepare_loop_config(
        "distill", "tiny", [ds, "ray.storage_path=s3://bucket/runs", "ray.max_failures=3", "ray.num_workers=4"]
    )["config"]
    assert cfg.ray.storage_path == "s3://bucket/runs"
    assert (cfg.ray.max_failures, cfg.ray.num_workers, cfg.ray.num_to_keep) == (3, 4, 2)
    cfg = prepare_loop_config("distill", "tiny", [ds, "ray.storage_path=~/ray_runs"])["config"]
    assert cfg.ray.storage_path == str(Path("~/ray_runs").expanduser())
    for bad, message in [
        ("ray.max_failures=-2", "ray.max_failures must be >= -1"),
        ("ray.num_workers=0", "ray.num_workers must be > 0"),
        ("ray.storage_path=", "ray.storage_path must not be empty"),
        ("ray.num_gpus=1", "unknown config key 'ray.num_gpus'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            prepare_loop_config("distill", "tiny", [ds, bad])


def test_model_names_are_not_resolved_against_the_working_directory(tmp_path, monkeypatch):
    """A folder called ``tiny`` (or ``smollm2-135m``) in the cwd does not turn the name into a path;
    a model written as a path (./name) is made absolute for the workers."""
    monkeypatch.chdir(tmp_path)
    ds = f"ds_config={REPO / 'ds_configs/zero3.json'}"
    for name in ("tiny", "smollm2-135m", "mine"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    assert prepare_loop_config("distill", "tiny", [ds])["config"].teacher.model == "tiny"
    cfg = prepare_loop_config("distill", "tiny", [ds, "teacher.model=smollm2-135m"])["config"]
    assert cfg.teacher.model == "smollm2-135m"
    assert prepare_loop_config("distill", "tiny", [ds, "teacher.model=./mine"])["config"].teacher.model == str(
        tmp_path / "mine"
    )


def test_loop_config_yaml_preset_travels_absolute(tmp_path, monkeypatch):
    (tmp_path / "mine.yaml").write_text((REPO / "layerwise_dist/presets/tiny.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    loop = prepare_loop_config("fisher", "mine.yaml", [f"ds_config={REPO / 'ds_configs/zero3.json'}"])
    assert loop["config"].output_dir == str(tmp_path / "results/tiny")


def test_loop_config_errors_before_any_worker(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ds_configs/zero3.json is not here: the package's own copy is used
    shipped = REPO / "layerwise_dist" / "ds_configs" / "zero3.json"
    assert prepare_loop_config("distill", "tiny")["config"].ds_config == str(shipped)
    with pytest.raises(ConfigError, match="ds_config: mine.json does not exist"):
        prepare_loop_config("distill", "tiny", ["ds_config=mine.json"])
    with pytest.raises(ConfigError, match="unknown command"):
        prepare_loop_config("train", "tiny")


def test_launcher_help_shows_its_command():
    out = subprocess.run(
        [sys.executable, "launchers/ray_distill.py", "--help"], cwd=REPO, env=run_env(), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "python launchers/ray_distill.py --num_workers 2" in out.stdout
    assert "ray job submit --address http://127.0.0.1:8265" in out.stdout


def test_launcher_bad_config_is_one_line_before_ray_starts(tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / "launchers/ray_distill.py"), "--preset", "tiny", "--max_failures", "-5"],
        cwd=tmp_path,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "error: ConfigError: ray.max_failures must be >= -1 (-1 = unlimited); got -5"
    )


# ------------------------------------------------------------------------------------------ Ray runs
def _reports(run: Path) -> list[dict]:
    """ray_reports.jsonl, written by the controller: every report (rank 0's metrics) and worker failure."""
    return [json.loads(line) for line in (run / REPORT_LOG).read_text().splitlines()]


def _ray_checkpoints(storage: Path) -> list[Path]:
    return [p for p in storage.glob("*/checkpoint_*") if p.is_dir()]


def _step_reports(events: list[dict]) -> list[dict]:
    return [e for e in events if e["event"] == "report" and "step" in e]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """run_ray on a local Ray instance started here (no address, no RAY_ADDRESS): 4 steps, no fault."""
    import ray  # a required dependency: missing must fail, not skip

    from layerwise_dist.ray_train import init_ray, run_ray

    tmp = tmp_path_factory.mktemp("ray_uninterrupted")
    run = tmp / "run"
    env_address = os.environ.pop("RAY_ADDRESS", None)
    init_ray("", num_cpus=2)
    try:
        result = run_ray(
            "distill",
            "tiny",
            [
                f"output_dir={run}",
                f"ds_config={REPO / 'ds_configs/zero3.json'}",
                f"ray.storage_path={tmp / 'ray'}",
                "ray.num_to_keep=0",  # keep every Ray checkpoint (the default keeps the newest 2)
                *SCHEDULE,
            ],
        )
    finally:
        ray.shutdown()
        if env_address is not None:
            os.environ["RAY_ADDRESS"] = env_address
    return result, run, tmp / "ray"


@pytest.mark.distributed
@pytest.mark.integration
def test_ray_distill_two_cpu_workers(uninterrupted):
    """TorchTrainer, 2 gloo workers: ZeRO-3 spans both, a report every step, Ray checkpoints that are
    complete DeepSpeed checkpoints, and rank 0's final checkpoint is a loadable HF student."""
    from ray.train import Checkpoint
    from transformers import AutoModelForCausalLM

    result, run, storage = uninterrupted
    assert result.error is None
    metrics = result.metrics
    assert metrics["world_size"] == 2 and metrics["rank"] == 0
    # 5 candidates (tiny preset): every target ranks in the top 5, so hr@10 = hr@5 = 1, ndcg@10 = ndcg@5, and
    # 1/log2(r+1) >= 1/r >= [r == 1] gives ndcg >= mrr >= hr@1, with mrr >= 1/5.
    m = {k.removeprefix("student/"): v for k, v in metrics.items() if k.startswith("student/")}
    assert m["n"] == 16 and m["hr@10"] == m["hr@5"] == 1.0 and m["ndcg@10"] == m["ndcg@5"], m
    assert m["ndcg@10"] >= m["mrr"] >= max(m["hr@1"], 1 / 5), m
    assert "teacher/hr@10" not in metrics  # distill scores the student only

    # Both workers were ranks of one group: the ZeRO-3 teacher was split in two, evaluation summed 2 ranks.
    results = json.loads((run / "results.json").read_text())
    assert results["config"]["ranks"] == 2
    teacher = results["setup"]["teacher"]
    assert teacher["world_size"] == 2 and teacher["zero3_partitioned"] is True
    assert teacher["local_param_fraction"] == pytest.approx(0.5, abs=0.01)
    history = json.loads((run / "train_history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3, 4]

    # Ray got a report at every step (train.log_every=1), with the loop's own losses; checkpoints at 2 and 4.
    events = _reports(run)
    assert [e["event"] for e in events] == ["report"] * 5, events
    steps = _step_reports(events)
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    for report, h in zip(steps, history):
        assert all(report[k] == h[k.removeprefix("train/")] for k in LOSS_KEYS), (report, h)
    assert [e["checkpoint"] is not None for e in steps] == [False, True, False, True]
    assert len(_ray_checkpoints(storage)) == 3  # ray.num_to_keep=0: all kept
    assert events[-1]["checkpoint"] is not None and "step" not in events[-1]  # the final one: the student

    # The step-2 Ray checkpoint is the DeepSpeed checkpoint of both ranks, merged: it checks out complete.
    step2 = Path(steps[1]["checkpoint"])
    assert step2.is_relative_to(storage)
    manifest = json.loads((step2 / MANIFEST).read_text())
    assert manifest["tag"] == "step2" and manifest["step"] == 2 and manifest["world_size"] == 2
    assert {p.name for p in (step2 / "step2").glob("rank*.done")} == {"rank0.done", "rank1.done"}
    assert CheckpointStore(step2).check(step2 / "step2") == ""
    assert not (run / ".ray_staging").exists()  # each upload removed its staged links, the run the folder

    # The final checkpoint is Ray's copy of output_dir/student, in storage_path; the original stays.
    assert isinstance(result.checkpoint, Checkpoint)
    ckpt = Path(result.checkpoint.path)
    assert ckpt.is_relative_to(storage)
    assert (run / "student" / "config.json").exists()
    student = AutoModelForCausalLM.from_pretrained(ckpt)
    assert student.config.num_hidden_layers == 2
    with torch.no_grad():
        logits = student(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def _cluster_processes(temp_dir: str) -> list[psutil.Process]:
    """The processes of the cluster this module started (their command lines name its temp dir), with children."""
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in p.info["cmdline"] or []):
                found[p.pid] = p
                found.update((c.pid, c) for c in p.children(recursive=True))
        except psutil.Error:
            continue
    return list(found.values())


@pytest.fixture(scope="module")
def ray_cluster():
    """``ray start --head`` on 127.0.0.1 with the dashboard (job server) on a free port; stopped afterwards.

    Its own --temp-dir tells its processes apart: teardown runs ``ray stop`` for its address and then
    kills only those processes (never another Ray on the machine)."""
    temp_dir = tempfile.mkdtemp(prefix="ldray", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    port, dashboard = free_port(), free_port()
    env = {**run_env(), "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    start = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        "--include-dashboard=true",
        "--num-cpus=2",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    out = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
    try:
        assert out.returncode == 0, out.stdout + out.stderr
        yield f"http://127.0.0.1:{dashboard}", port, env
    finally:
        procs = _cluster_processes(temp_dir)
        for p in procs:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=5)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=10)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.distributed
@pytest.mark.integration
def test_ray_job_submit_restarts_from_the_last_checkpoint_after_a_worker_is_killed(
    ray_cluster, uninterrupted, tmp_path
):
    """`ray job submit ... -- python launchers/ray_distill.py --preset tiny`: the job joins the running cluster
    (RAY_ADDRESS), the last rank SIGKILLs itself after step 3, Ray restarts both workers from the step-2
    checkpoint (ray.max_failures=1) and the job succeeds with the uninterrupted run's losses."""
    address, gcs_port, env = ray_cluster
    run = tmp_path / "run"
    excludes = [".git", ".venv", "results", "gpu_wheels", ".pytest_cache", ".ruff_cache", "*.egg-info"]
    cmd = [
        str(VENV_BIN / "ray"),
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(REPO),
        "--runtime-env-json",
        json.dumps({"excludes": excludes}),
        "--",
        str(VENV_BIN / "python"),  # the job's driver runs in the uploaded copy of the repo, with this venv
        "launchers/ray_distill.py",
        "--command",
        "distill",
        "--preset",
        "tiny",
        f"output_dir={run}",
        f"ray.storage_path={tmp_path / 'ray'}",
        "ray.max_failures=1",
        "ray.fault_kill_step=3",
        *SCHEDULE,
    ]
    t0 = time.monotonic()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    assert "succeeded" in log.lower(), log[-3000:]
    assert "Ray report, step 4" in log  # the controller's per-report line reaches the job's log

    # The job joined the running cluster (not a local instance of its own) and wrote what an uninterrupted run writes.
    joined = re.search(r"Ray cluster: (\S+)", log)
    assert joined and joined.group(1).endswith(f":{gcs_port}"), log[-3000:]  # the head's GCS port
    assert f"Ray run:    {tmp_path / 'ray'}" in log, log[-3000:]
    for name in ("results.json", "train_history.json", "student/config.json", "report.md"):
        assert (run / name).is_file(), name
    assert json.loads((run / FAULT_MARKER).read_text())["rank"] == 1  # the fault really fired, on the last rank

    # Reports: step 1, step 2 (checkpoint), the killed worker, then the restart continues at step 3.
    events = _reports(run)
    kinds = [e["event"] for e in events]
    assert kinds.count("worker_failure") == 1, events
    cut = kinds.index("worker_failure")
    before, after = _step_reports(events[:cut]), _step_reports(events[cut:])
    assert [e["step"] for e in before][:2] == [1, 2] and before[1]["checkpoint"], events
    assert [e["step"] for e in after] == [3, 4], events  # no gap, no repeat of a checkpointed step
    assert [e["step"] for e in before] in ([1, 2], [1, 2, 3])  # step 3's report may die with its worker

    # Every loss after the restart equals the uninterrupted run's at that step (same seed, same ranks).
    _, reference_run, _ = uninterrupted
    reference = {e["step"]: e for e in _step_reports(_reports(reference_run))}
    for report in [*before, *after]:
        for key in LOSS_KEYS:
            assert report[key] == pytest.approx(reference[report["step"]][key], rel=1e-6, abs=1e-9), (
                report["step"],
                key,
            )
    history = json.loads((run / "train_history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3, 4]  # the resumed history carries the steps before the kill
    assert len(_ray_checkpoints(tmp_path / "ray")) == 2  # CheckpointConfig(num_to_keep=2), the default
    print(f"job with one restart: {time.monotonic() - t0:.0f} s")
