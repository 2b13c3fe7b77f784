"""The sbatch files, submitted for real to a one-node SLURM cluster the test session starts.

Without SLURM (cheap, always run): every script is valid bash, has exactly one
work-launching ``srun`` (helpers may only run ``ray start`` in the background) and the
module / launcher / DeepSpeed config it names exists.

With SLURM (``slurm`` marker; ``tests/slurm_cluster.py`` starts munged, slurmctld and
slurmd, ``make slurm-deps`` installs them as root): ``sbatch`` of
``cpu_smoke.sbatch`` runs the whole tiny pipeline on 2 ranks and leaves a loadable
student and results; a failing job ends FAILED with the ranks' status; ``deepspeed_multinode.sbatch``
(1 node, 2 CPU ranks) rendezvouses on the host ``scontrol`` names and measures the Fisher
profile; ``ray_cluster.sbatch`` (1 node, CPU) starts Ray, joins it and runs the Fisher
pass on 2 Ray Train workers.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401  (the fixture)

from conftest import REPO, free_port

SLURM = REPO / "slurm"
SCRIPTS = sorted(p.name for p in SLURM.glob("*.sbatch"))
VENV = Path(sys.prefix)  # the venv running the tests: the jobs activate the same one


def _lines(path: Path) -> list[str]:
    text = re.sub(r"\\\n", " ", path.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def _srun_lines(path: Path) -> list[str]:
    return [line for line in _lines(path) if line.split()[0] == "srun"]


def _is_work(line: str) -> bool:
    return "layerwise_dist.worker" in line or re.search(r"launchers/\w+\.py", line) is not None


def test_scripts_found():
    assert {"cpu_smoke.sbatch", "deepspeed_multinode.sbatch", "ray_cluster.sbatch"} <= set(SCRIPTS)


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
    assert all(" ray start " in h and h.endswith("&") for h in helpers), helpers


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


# ---------------------------------------------------------------- real jobs


def _submit(cluster: SlurmCluster, tmp_path: Path, script: str, *args: str, env: dict[str, str] | None = None):
    """sbatch from the repository root, waited for, log in tmp_path: (job id, exit status, log text, seconds)."""
    log = tmp_path / "slurm-%x-%j.out"
    opts = [a for a in args if a.startswith("--")]
    overrides = [a for a in args if not a.startswith("--")]
    job_id, rc, seconds = cluster.sbatch_wait(
        SLURM / script, [f"--output={log}", *opts], overrides, cwd=REPO, env={"VENV": str(VENV), **(env or {})}
    )
    logs = list(tmp_path.glob(f"slurm-*-{job_id}.out"))
    text = logs[0].read_text(errors="replace") if logs else "(no job log)"
    print(f"{script}: job {job_id} exit {rc} in {seconds:.0f} s")
    return job_id, rc, text, seconds


def _completed(cluster: SlurmCluster, job_id: int, rc: int, log: str) -> None:
    assert rc == 0, f"job {job_id} exit {rc}\n{log[-6000:]}\n{cluster.logs()}"
    job = cluster.job(job_id)
    assert (job["JobState"], job["ExitCode"], job["NodeList"]) == ("COMPLETED", "0:0", "localhost"), job
    record = cluster.completion_record(job_id)
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), record


@pytest.mark.slurm
@pytest.mark.integration
@pytest.mark.slow
def test_cpu_smoke_job_runs_the_pipeline(slurm_cluster, tmp_path):  # noqa: F811
    """sbatch slurm/cpu_smoke.sbatch: 2 ranks, whole tiny pipeline, student and results left behind."""
    out = tmp_path / "smoke"
    job_id, rc, log, _ = _submit(slurm_cluster, tmp_path, "cpu_smoke.sbatch", env={"OUTPUT_DIR": str(out)})
    _completed(slurm_cluster, job_id, rc, log)
    assert f"ranks=2 output_dir={out}" in log, log[-3000:]
    job = slurm_cluster.job(job_id)
    assert job["NumCPUs"] == "2" and job["WorkDir"] == str(REPO), job

    results = json.loads((out / "results.json").read_text())
    assert results["config"]["ranks"] == 2
    for who in ("teacher", "student"):
        m = results[who]
        # 5 candidates (tiny preset), 16 test examples summed over both ranks: every target is in the top 5.
        assert m["n"] == 16 and m["hr@10"] == m["hr@5"] == 1.0 and m["ndcg@10"] >= m["mrr"] >= 1 / 5, (who, m)
    assert results["setup"]["teacher"]["world_size"] == 2
    assert (out / "fisher_profile.json").exists() and (out / "report.md").exists()
    assert len(json.loads((out / "train_history.json").read_text())) == 4  # tiny preset: train.max_steps=4

    from transformers import AutoModelForCausalLM

    assert (out / "student" / "config.json").exists()
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    assert student.config.num_hidden_layers == 2


@pytest.mark.slurm
@pytest.mark.integration
def test_failing_job_fails_sbatch(slurm_cluster, tmp_path):  # noqa: F811
    """A config error on the ranks: the work srun's status is the job's exit status."""
    out = tmp_path / "bad"
    job_id, rc, log, _ = _submit(
        slurm_cluster, tmp_path, "cpu_smoke.sbatch", "train.max_steps=0", env={"OUTPUT_DIR": str(out)}
    )
    assert rc != 0, log[-3000:]
    assert "train.max_steps must be > 0" in log, log[-3000:]
    assert slurm_cluster.job(job_id)["JobState"] == "FAILED"
    assert slurm_cluster.completion_record(job_id)["JobState"] == "FAILED"
    assert not (out / "results.json").exists()


@pytest.mark.slow  # ~2 min; the single-node sbatch script runs in make test
@pytest.mark.slurm
@pytest.mark.distributed
@pytest.mark.integration
def test_multinode_script_on_one_cpu_node(slurm_cluster, tmp_path):  # noqa: F811
    """deepspeed_multinode.sbatch without GPUs: 1 node x 2 CPU ranks, c10d rendezvous on the node scontrol names."""
    out = tmp_path / "fisher"
    port = free_port()
    job_id, rc, log, _ = _submit(
        slurm_cluster,
        tmp_path,
        "deepspeed_multinode.sbatch",
        "--nodes=1",
        "--gpus-per-node=0",
        "--cpus-per-task=2",
        f"output_dir={out}",
        "tracking.enabled=false",
        env={"COMMAND": "fisher", "PRESET": "tiny", "GPUS_PER_NODE": "2", "MASTER_PORT": str(port)},
    )
    _completed(slurm_cluster, job_id, rc, log)
    assert f"nodes=1 gpus/node=2 rendezvous=localhost:{port} command=fisher preset=tiny" in log, log[-3000:]
    _two_rank_fisher(out)


def _two_rank_fisher(out: Path) -> None:
    """The Fisher pass ran on 2 ranks of one group: ZeRO-3 split the teacher, the profile summed both ranks."""
    profile = json.loads((out / "fisher_profile.json").read_text())
    assert len(profile["scores"]) == 4 and all(s > 0 for s in profile["scores"]), profile  # tiny teacher: 4 layers
    assert profile["num_examples"] == 8, profile  # tiny preset fisher.num_examples, all-reduced over the ranks
    teacher = json.loads((out / "results.json").read_text())["setup"]["teacher"]
    assert teacher["world_size"] == 2 and teacher["zero3_partitioned"] is True, teacher
    assert teacher["local_param_fraction"] == pytest.approx(0.5, abs=0.01), teacher


@pytest.mark.slurm
@pytest.mark.distributed
@pytest.mark.integration
@pytest.mark.slow
def test_ray_script_on_one_cpu_node(slurm_cluster, tmp_path):  # noqa: F811
    """ray_cluster.sbatch without GPUs: Ray head on the node, the driver joins it, 2 Ray Train workers."""
    out = tmp_path / "fisher"
    job_id, rc, log, _ = _submit(
        slurm_cluster,
        tmp_path,
        "ray_cluster.sbatch",
        "--nodes=1",
        "--gpus-per-node=0",
        "--cpus-per-task=2",
        f"output_dir={out}",
        "tracking.enabled=false",
        env={
            "COMMAND": "fisher",
            "PRESET": "tiny",
            "USE_GPU": "0",
            "WORKERS_PER_NODE": "2",
            "RAY_PORT": str(free_port()),
            "RAY_STORAGE": str(tmp_path / "ray"),
            "RAY_AUTH_TOKEN_PATH": str(tmp_path / "auth" / "ray_token"),  # made by the script (not in ~/.ray)
        },
    )
    _completed(slurm_cluster, job_id, rc, log)
    assert len((tmp_path / "auth" / "ray_token").read_text()) == 64
    assert "Ray cluster up: 1 nodes" in log, log[-3000:]
    _two_rank_fisher(out)
    assert any((tmp_path / "ray").iterdir())
