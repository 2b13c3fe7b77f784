"""Shared test helpers: paths, free ports, running the real launchers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run_deepspeed(script: str, args: list[str], nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """The real `deepspeed` launcher, 2 CPU ranks (gloo) on 127.0.0.1."""
    cmd = [
        str(VENV_BIN / "deepspeed"),
        "--num_gpus",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        script,
        *args,
    ]
    return subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=timeout)


def shm_buffers(port: int) -> list[str]:
    """DeepSpeed's CPU all-reduce buffers in /dev/shm of a job on rendezvous port ``port`` (none after it ends)."""
    import glob

    return glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*")


def run_cli(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [str(VENV_BIN / "layerwise-dist"), *args]
    return subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=timeout)
