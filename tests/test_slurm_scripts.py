"""The sbatch files: valid bash, one work-launching srun each, and what they launch exists.

Rule tested: after joining backslash continuations and dropping comments, every line
whose command is ``srun`` either launches work (runs ``layerwise_dist.worker`` or a
``launchers/*.py`` script) or is a helper that only runs ``ray start`` in the
background; each script has exactly one work line, and only the Ray script has helpers.
No SLURM installation is needed.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO

SLURM = REPO / "slurm"
SCRIPTS = ("cpu_smoke.sbatch", "deepspeed_multinode.sbatch", "ray_cluster.sbatch")


def _lines(path: Path) -> list[str]:
    text = re.sub(r"\\\n", " ", path.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def _srun_lines(path: Path) -> list[str]:
    return [line for line in _lines(path) if line.split()[0] == "srun"]


def _is_work(line: str) -> bool:
    return "layerwise_dist.worker" in line or re.search(r"launchers/\w+\.py", line) is not None


def test_every_topology_has_a_script():
    assert sorted(p.name for p in SLURM.glob("*.sbatch")) == sorted(SCRIPTS)
    assert (SLURM / "README.md").exists()


@pytest.mark.parametrize("name", SCRIPTS)
def test_bash_syntax(name):
    bash = shutil.which("bash")
    assert bash is not None
    out = subprocess.run([bash, "-n", str(SLURM / name)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_one_srun_launches_work(name):
    lines = _srun_lines(SLURM / name)
    work = [line for line in lines if _is_work(line)]
    helpers = [line for line in lines if not _is_work(line)]
    assert len(work) == 1, work
    assert not work[0].endswith("&"), "the work srun runs in the foreground: its exit status is the job's"
    if name == "ray_cluster.sbatch":
        assert len(helpers) == 2 and all(" ray start " in h and h.endswith("&") for h in helpers), helpers
    else:
        assert helpers == [], helpers


@pytest.mark.parametrize("name", SCRIPTS)
def test_sections_and_sbatch_header(name):
    text = (SLURM / name).read_text()
    assert text.startswith("#!/bin/bash\n")
    assert "#SBATCH --job-name=" in text and "#SBATCH --nodes=" in text
    for section in ("# ---------------------------------------------------------------- environment", "launch"):
        assert section in text
    assert "set -euo pipefail" in text


@pytest.mark.parametrize("name", SCRIPTS)
def test_named_modules_and_files_exist(name):
    (work,) = [line for line in _srun_lines(SLURM / name) if _is_work(line)]
    words = shlex.split(work)
    for i, word in enumerate(words):
        if word == "-m":
            assert importlib.util.find_spec(words[i + 1]) is not None, words[i + 1]
        if word.endswith(".py"):
            assert (REPO / word).is_file(), word
        if word == "--ds_config" and not words[i + 1].startswith("$"):
            assert (REPO / words[i + 1]).is_file(), words[i + 1]
    text = (SLURM / name).read_text()
    for default in re.findall(r"DS_CONFIG:-([\w./]+)\}", text):
        assert (REPO / default).is_file(), default


def test_multinode_rendezvous_from_the_node_list():
    text = (SLURM / "deepspeed_multinode.sbatch").read_text()
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in text
    (work,) = [line for line in _srun_lines(SLURM / "deepspeed_multinode.sbatch") if _is_work(line)]
    for flag in ("--nnodes", "--nproc_per_node", "--rdzv_backend c10d", '--rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT"'):
        assert flag in work


def test_ray_driver_joins_the_cluster():
    (work,) = [line for line in _srun_lines(SLURM / "ray_cluster.sbatch") if _is_work(line)]
    assert "launchers/ray_distill.py" in work and "--address auto" in work and "--num_workers" in work
