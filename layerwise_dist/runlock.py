"""One writer per ``output_dir``: an exclusive lock held for the whole job.

The lock is ``<output_dir>/.layerwise_dist.lock``: an ``flock`` on the file (released
by the kernel when the holder dies, so a crashed run never leaves a stale lock that
blocks the next one) plus a JSON record of the holder (pid, host, start time, command)
for the error message a second run gets. When ``layerwise-dist`` starts the ranks it
takes the lock itself and hands rank 0 a token (``LAYERWISE_DIST_LOCK``) so the job's
own ranks do not lock themselves out.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

LOCK_NAME = ".layerwise_dist.lock"
TOKEN_ENV = "LAYERWISE_DIST_LOCK"


class RunLockedError(RuntimeError):
    """Another run holds the lock on this output_dir."""


class RunLock:
    """``with RunLock(output_dir): ...`` (or ``acquire()`` / ``release()``)."""

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / LOCK_NAME
        self._fd: int | None = None
        self.token = ""

    def acquire(self) -> RunLock:
        inherited = os.environ.get(TOKEN_ENV, "")
        if inherited and self._holder().get("token") == inherited:
            self.token = inherited  # the launching CLI holds it for this job
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = self._holder()
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("start", 0)))
                raise RunLockedError(
                    f"{self.path.parent} is in use by another run (pid {holder.get('pid', '?')} on "
                    f"{holder.get('host', '?')} since {since}: {holder.get('command', '?')}); "
                    "wait for it or choose another output_dir"
                ) from None
            # The holder we waited for may have removed the file just before releasing: lock the live one.
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self.token = uuid.uuid4().hex
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "start": time.time(),
            "command": " ".join(sys.argv)[:300],
            "token": self.token,
        }
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def _holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it (see acquire's inode check)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
