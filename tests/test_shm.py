"""DeepSpeed's CPU all-reduce buffers (66 MB per rank in /dev/shm) do not outlive a run, finished or killed."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from conftest import REPO, VENV_BIN, free_port, run_env, shm_buffers

pytestmark = [pytest.mark.distributed, pytest.mark.integration]


# A finished run leaves none either: test_integration.py::test_pipeline_cli_tracks_in_mlflow checks it on its
# 2-rank pipeline (conftest.shm_buffers), rather than a run of its own here.


def test_killed_run_leaves_no_shm_buffers(tmp_path):
    """SIGKILL to the whole tree once training runs: nothing of DeepSpeed's shm names is left behind."""
    port = free_port()
    cmd = [str(VENV_BIN / "layerwise-dist"), "distill", "--preset", "tiny", "--nproc", "2", "--master_port", str(port)]
    cmd += ["train.max_steps=500", "student.selection=uniform", "distill.layer_weighting=linear"]
    cmd += [f"output_dir={tmp_path}/r"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=run_env(), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and not (tmp_path / "r" / "layer_weights.json").exists():
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            time.sleep(0.5)
        assert (tmp_path / "r" / "layer_weights.json").exists(), "training never started"
        time.sleep(2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(1)
    assert shm_buffers(port) == []


def test_stale_build_lock_is_removed_not_waited_on():
    """A process killed while loading the op leaves torch's baton ``<build dir>/lock``; torch alone then
    waits on it forever (a CI run hung 90 minutes so). The next load removes it and goes on."""
    env = run_env()
    code = "from layerwise_dist.distributed import extensions_dir; print(extensions_dir())"
    root = subprocess.run([str(VENV_BIN / "python"), "-c", code], env=env, capture_output=True, text=True, check=True)
    baton = os.path.join(root.stdout.strip(), "deepspeed_shm_comm", "lock")
    os.makedirs(os.path.dirname(baton), exist_ok=True)
    with open(baton, "w"):
        pass
    code = "from layerwise_dist.distributed import prepare_shm_op; prepare_shm_op(); print('loaded')"
    try:
        out = subprocess.run([str(VENV_BIN / "python"), "-c", code], env=env, capture_output=True, text=True,
                             timeout=600)  # fmt: skip
    finally:
        stale = os.path.exists(baton)
        if stale:
            os.unlink(baton)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("loaded")
    assert "build lock left by a process killed" in out.stderr
    assert not stale
