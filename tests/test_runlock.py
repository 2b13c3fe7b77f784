"""One writer per output_dir (issue 14, point 4): the run lock, and the student folder swapped in atomically."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import pytest

from conftest import REPO, run_cli, run_env
from layerwise_dist.export import swap_in
from layerwise_dist.runlock import LOCK_NAME, RunLock, RunLockedError

HOLD = textwrap.dedent(
    """
    import sys, time
    from layerwise_dist.runlock import RunLock
    lock = RunLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(120)
    """
)


def _holder(folder):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], cwd=REPO, env=run_env(), stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_is_refused_naming_the_holder_and_a_dead_holder_leaves_no_stale_lock(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(RunLockedError, match=rf"in use by another run \(pid {proc.pid} on "):
            RunLock(tmp_path).acquire()
    finally:
        proc.kill()  # SIGKILL: no release; the kernel drops the flock with the process
        proc.wait()
    assert (tmp_path / LOCK_NAME).exists()  # the dead holder's record is still there...
    with RunLock(tmp_path):  # ...but it is not a lock
        with pytest.raises(RunLockedError):
            RunLock(tmp_path).acquire()  # a second holder in this process is refused too
    assert not (tmp_path / LOCK_NAME).exists()  # released: nothing left behind


def test_cli_refuses_a_second_run_on_the_same_output_dir(tmp_path):
    run = tmp_path / "run"
    proc = _holder(run)
    try:
        out = run_cli(["fisher", "--preset", "tiny", "--nproc", "2", f"output_dir={run}"], timeout=120)
    finally:
        proc.kill()
        proc.wait()
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and f"pid {proc.pid}" in lines[0], out.stderr[-2000:]
    assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # not one file of the run was written


def test_swap_in_never_leaves_the_folder_missing(tmp_path):
    folder = tmp_path / "student"
    folder.mkdir()
    (folder / "config.json").write_text("0")
    missing, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            if not (folder / "config.json").exists():
                missing.append(time.perf_counter())

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for version in range(1, 200):
            new = tmp_path / "student.tmp"
            new.mkdir()
            (new / "config.json").write_text(str(version))
            swap_in(new, folder)
    finally:
        stop.set()
        watcher.join()
    assert not missing, f"student/ was missing {len(missing)} times"
    assert (folder / "config.json").read_text() == "199"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]  # no .tmp or .old left
