"""A real one-node SLURM cluster for the tests: munged, slurmctld and slurmd started in a temp dir.

Debian's ``slurm-wlm`` (22.05) and ``munge`` (``make slurm-deps`` installs them as root).
The cluster is private to the test session: its own munge key and socket, its own
slurm.conf (``SLURM_CONF``), free ports on 127.0.0.1, state and spool under the temp
dir; nothing in /etc is read or changed. The node is ``localhost`` with the CPUs and
memory ``slurmd -C`` reports. Teardown cancels whatever is still queued, stops the three
daemons it started and removes the temp dir.

Without the binaries, or not as root (the config runs everything as ``SlurmUser=root``),
the fixture skips with the reason.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import free_port, run_env

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "sinfo", "squeue", "scontrol", "scancel")
NODE = "localhost"
# The states a job ends in (squeue(1), JOB STATE CODES).
ENDED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}
# The daemons live in /usr/sbin, which a non-login shell's PATH may lack.
PATH = os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/sbin", "/sbin"])


def missing_reason() -> str | None:
    """Why no cluster can be started here, or None when it can."""
    missing = [b for b in BINARIES if shutil.which(b, path=PATH) is None]
    if missing:
        return f"SLURM not installed ({', '.join(missing)} not on PATH): `make slurm-deps` as root installs slurm-wlm and munge"
    if os.geteuid() != 0:
        return "the test cluster runs its daemons as SlurmUser=root: run the slurm tests as root"
    return None


def _tail(path: Path, n: int = 40) -> str:
    if not path.exists():
        return f"({path.name} absent)"
    return f"--- {path.name} ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-n:])


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        """A SLURM client command (sinfo, scontrol, ...) against this cluster."""
        kw.setdefault("env", self.env)
        out = subprocess.run(list(args), capture_output=True, text=True, timeout=kw.pop("timeout", 60), **kw)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(args)}: exit {out.returncode}\n{out.stdout}\n{out.stderr}\n{self.logs()}")
        return out

    def sbatch_wait(
        self,
        script: Path,
        options: list[str],
        args: list[str],
        *,
        cwd: Path,
        env: dict[str, str] | None = None,
        timeout: int = 1800,
    ) -> tuple[int, int, float]:
        """``sbatch --parsable [options] script [args]`` from ``cwd``, then wait for the job to end: (job id, exit
        status = the job's, as ``sbatch --wait`` returns it, seconds).

        Waits by polling ``scontrol`` every 0.25 s rather than with ``--wait``, whose poll interval grows
        2 -> 8 -> 32 s (sbatch.c ``_job_wait``): test_failing_job_fails_sbatch took 42 s with it, 14 s so."""
        start = time.monotonic()
        out = subprocess.run(
            ["sbatch", "--parsable", *options, str(script), *args],
            cwd=cwd,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=60,
        )
        first = out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""
        if out.returncode != 0 or not first.split(";")[0].isdigit():
            raise AssertionError(f"sbatch did not submit: exit {out.returncode}\n{out.stdout}\n{out.stderr}")
        job_id = int(first.split(";")[0])
        while True:
            job = self.job(job_id)
            if job.get("JobState") in ENDED:
                break
            if time.monotonic() - start > timeout:
                self.run("scancel", str(job_id), check=False)
                raise AssertionError(f"job {job_id} still {job.get('JobState')} after {timeout} s\n{self.logs()}")
            time.sleep(0.25)
        code, _, sig = job.get("ExitCode", "0:0").partition(":")  # exit status : signal
        rc = int(code) or (128 + int(sig) if int(sig or 0) else 0)
        if rc == 0 and job["JobState"] != "COMPLETED":  # ended otherwise (cancelled, timed out): not a success
            rc = 1
        return job_id, rc, time.monotonic() - start

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, NodeList, WorkDir, StdOut, ...)."""
        text = self.run("scontrol", "-o", "show", "job", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def completion_record(self, job_id: int) -> dict[str, str]:
        """The job's line in the jobcomp/filetxt log slurmctld writes when a job ends."""
        path = self.root / "jobcomp.txt"
        for line in path.read_text().splitlines() if path.exists() else []:
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            if fields.get("JobId") == str(job_id):
                return fields
        raise AssertionError(f"job {job_id} not in {path}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(_tail(self.root / name) for name in ("slurmctld.log", "slurmd.log", "munged.log"))


def _node_line() -> str:
    """``slurmd -C``'s NodeName line for this machine, renamed to localhost on 127.0.0.1."""
    out = subprocess.run(
        ["slurmd", "-C"], env={**os.environ, "PATH": PATH}, capture_output=True, text=True, timeout=60, check=True
    ).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("NodeName="))
    hardware = " ".join(w for w in line.split() if not w.startswith("NodeName="))
    return f"NodeName={NODE} NodeAddr=127.0.0.1 {hardware} State=UNKNOWN"


def write_conf(root: Path) -> Path:
    ctld_port = free_port()
    slurmd_port = free_port()
    while slurmd_port == ctld_port:
        slurmd_port = free_port()
    conf = root / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=ldtest",
                f"SlurmctldHost={NODE}",
                f"SlurmctldPort={ctld_port}",
                f"SlurmdPort={slurmd_port}",
                "SlurmUser=root",
                "SlurmdUser=root",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                f"AuthInfo=socket={root / 'munge' / 'munge.sock'}",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "MpiDefault=none",
                "ReturnToService=2",
                "MailProg=/bin/true",
                "KillWait=10",
                "MinJobAge=3600",  # finished jobs stay visible to scontrol for the session
                f"StateSaveLocation={root / 'state'}",
                f"SlurmdSpoolDir={root / 'spool'}",
                f"SlurmctldPidFile={root / 'slurmctld.pid'}",
                f"SlurmdPidFile={root / 'slurmd.pid'}",
                f"SlurmctldLogFile={root / 'slurmctld.log'}",
                f"SlurmdLogFile={root / 'slurmd.log'}",
                "AccountingStorageType=accounting_storage/none",
                "JobAcctGatherType=jobacct_gather/none",
                "JobCompType=jobcomp/filetxt",
                f"JobCompLoc={root / 'jobcomp.txt'}",
                _node_line(),
                f"PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )
    )
    return conf


def _start(cluster: SlurmCluster, name: str, cmd: list[str]) -> None:
    log = open(cluster.root / f"{name}.out", "wb")  # noqa: SIM115  (closed with the process)
    cluster.procs[name] = subprocess.Popen(cmd, env=cluster.env, stdout=log, stderr=subprocess.STDOUT)
    log.close()


def _wait(cluster: SlurmCluster, what: str, ready, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        dead = {n: p.returncode for n, p in cluster.procs.items() if p.poll() is not None}
        if dead or time.monotonic() > deadline:
            outs = "\n".join(_tail(cluster.root / f"{n}.out") for n in cluster.procs)
            raise RuntimeError(f"SLURM test cluster: {what} not ready (exited: {dead})\n{outs}\n{cluster.logs()}")
        time.sleep(0.5)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def _node_idle(cluster: SlurmCluster) -> bool:
    out = cluster.run("sinfo", "-h", "-n", NODE, "-o", "%t", check=False, timeout=20)
    return out.returncode == 0 and out.stdout.strip() == "idle"


def _queue_empty(cluster: SlurmCluster) -> bool:
    out = cluster.run("squeue", "-h", "-o", "%i", check=False, timeout=20)
    return out.returncode == 0 and not out.stdout.strip()


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    # munged wants every folder above its socket searchable by all: a 0755 temp dir, not pytest's 0700 one.
    root = Path(tempfile.mkdtemp(prefix="ld-slurm-"))
    root.chmod(0o755)
    for sub in ("state", "spool", "munge"):
        (root / sub).mkdir()
    key = root / "munge" / "munge.key"  # this cluster's own key: the system's munged (if any) is not involved
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    env = {**run_env(), "PATH": PATH, "SLURM_CONF": str(write_conf(root))}
    cluster = SlurmCluster(root=root, conf=root / "slurm.conf", env=env)
    try:
        sock = root / "munge" / "munge.sock"
        _start(
            cluster,
            "munged",
            [
                "munged",
                "--foreground",
                f"--socket={sock}",
                f"--key-file={key}",
                f"--pid-file={root / 'munge' / 'munged.pid'}",
                f"--seed-file={root / 'munge' / 'munged.seed'}",
                f"--log-file={root / 'munged.log'}",
            ],
        )
        _wait(cluster, "munged", sock.exists)
        _start(cluster, "slurmctld", ["slurmctld", "-D", "-i"])
        _start(cluster, "slurmd", ["slurmd", "-D", "-N", NODE])
        _wait(cluster, "node localhost idle in sinfo", lambda: _node_idle(cluster))
        yield cluster
    finally:
        if "slurmctld" in cluster.procs and cluster.procs["slurmctld"].poll() is None:
            ids = cluster.run("squeue", "-h", "-o", "%i", check=False, timeout=20).stdout.split()
            if ids:
                cluster.run("scancel", *ids, check=False, timeout=20)
                deadline = time.monotonic() + 60
                while not _queue_empty(cluster) and time.monotonic() < deadline:
                    time.sleep(1)
        for name in ("slurmd", "slurmctld", "munged"):
            if name in cluster.procs:
                _stop(cluster.procs[name])
        shutil.rmtree(root, ignore_errors=True)
