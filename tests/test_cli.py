"""The command line: --help on every command, and bad input as one clear line (exit 2, no traceback)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import run_cli

COMMANDS = ["adapt", "fisher", "distill", "evaluate", "pipeline"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command):
    out = run_cli([command, "--help"], timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--preset" in out.stdout and "--nproc" in out.stdout and "key=value" in out.stdout


def test_the_command_line_parses_and_helps_without_importing_the_jobs():
    """`layerwise-dist --help` and each command's help stay light (no torch, transformers, DeepSpeed, MLflow, Ray): the
    jobs are imported to run one. Every job has its one-line help, every help line a job."""
    import subprocess
    import sys

    from conftest import REPO
    from layerwise_dist.commands import DESCRIPTIONS
    from layerwise_dist.recipes.jobs import JOBS

    assert set(DESCRIPTIONS) == set(JOBS)
    heavy = ("torch", "transformers", "deepspeed", "mlflow", "ray", "peft", "bitsandbytes")
    code = (
        "import contextlib, io, sys\nfrom layerwise_dist.cli import main\n"
        "for argv in (['--help'], ['distill', '--help'], ['ablation', '--help']):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        main(argv)\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr[-2000:])
    # A bad command line is one line without the jobs either: --nproc needs torch (CUDA or not), nothing more.
    code = (
        "import sys\nfrom layerwise_dist.cli import main\n"
        "rc = main(['distill', '--preset', 'tiny', '--nproc', '0'])\n"
        f"print(rc, sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "2 ['torch']", (out.stdout, out.stderr[-2000:])
    assert out.stderr.strip() == "error: ConfigError: --nproc must be at least 1; got 0", out.stderr[-2000:]


def test_known_errors_match_only_what_was_imported_and_all_of_them_when_asked():
    """except known_errors() names the bad-input classes of the modules already imported (an error of a module
    never imported cannot be raised); KNOWN_ERRORS imports them all."""
    import subprocess
    import sys

    from conftest import REPO

    code = (
        "from layerwise_dist import errors\nfrom layerwise_dist.config import ConfigError\n"
        "light = {c.__name__ for c in errors.known_errors()}\n"
        "full = {c.__name__ for c in errors.KNOWN_ERRORS}\n"
        "print(sorted(light)); print(sorted(full - light))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    light, rest = out.stdout.strip().splitlines()
    assert light == str(sorted(["ConfigError", "ExportError", "FileNotFoundError", "JSONDecodeError"])), out.stderr
    assert rest == str(
        sorted(
            ["CacheError", "DataError", "LossInputError", "ModelLoadError", "PlanError", "RunLockedError",
             "StoppedBySignal", "StudentError", "TrackingError", "TrainingDivergedError", "WeightingError"]
        )
    ), out.stderr[-2000:]  # fmt: skip


def test_config_show_and_keys():
    out = run_cli(["config", "--preset", "tiny", "train.max_steps=9"], timeout=120)
    assert out.returncode == 0, out.stderr
    assert "max_steps: 9" in out.stdout
    keys = run_cli(["config", "--keys"], timeout=120)
    assert "train.micro_batch_size=" in keys.stdout


def _one_line_error(out, *needles):
    assert out.returncode == 2, (out.returncode, out.stdout[-2000:], out.stderr[-2000:])
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_wrong_type_in_preset_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: lots\n")
    _one_line_error(
        run_cli(["distill", "--preset", str(bad), "--nproc", "1"], timeout=120), "train.max_steps expects an integer"
    )


def test_invalid_ds_config_json(tmp_path):
    bad = tmp_path / "zero3.json"
    bad.write_text('{"zero_optimization": {"stage": 3}')
    out = run_cli(
        ["distill", "--preset", "tiny", "--nproc", "1", "--ds_config", str(bad), f"output_dir={tmp_path}/run"]
    )
    _one_line_error(out, "not valid JSON")


def test_missing_ds_config(tmp_path):
    out = run_cli(["fisher", "--preset", "tiny", "--ds_config", str(tmp_path / "nope.json")], timeout=120)
    _one_line_error(out, "does not exist")


@pytest.mark.parametrize(
    "overrides, needles",
    [
        (["teacher.model={tmp}/no_model"], ["ModelLoadError", "no_model"]),  # missing model path
        (["data.source=amazon2023", "data.reviews={tmp}/All_Beauty.jsonl"], ["All_Beauty.jsonl"]),  # unreadable data
    ],
    ids=["missing-model", "unreadable-data"],
)
def test_bad_paths_in_one_process(tmp_path, overrides, needles):
    args = [o.format(tmp=tmp_path) for o in overrides]
    out = run_cli(["fisher", "--preset", "tiny", "--nproc", "1", *args, f"output_dir={tmp_path}/run"])
    _one_line_error(out, *needles)


def test_data_prepare_writes_splits(tmp_path):
    reviews = tmp_path / "All_Beauty.jsonl"
    meta = tmp_path / "meta_All_Beauty.jsonl"
    rows, items = [], set()
    for u in range(12):
        for k in range(6):
            item = f"I{(u + k) % 9}"
            items.add(item)
            rows.append(
                {"user_id": f"U{u}", "parent_asin": item, "asin": item, "rating": 5.0, "timestamp": 1000 * (u * 10 + k)}
            )
    reviews.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    meta.write_text("\n".join(json.dumps({"parent_asin": i, "title": f"Item {i}"}) for i in sorted(items)) + "\n")
    out = run_cli(
        ["data", "prepare", "--reviews", str(reviews), "--meta", str(meta), "--out", str(tmp_path / "prep")],
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    stats = json.loads((tmp_path / "prep" / "stats.json").read_text())
    assert stats["users"] == 12


def test_cpu_ranks_get_one_thread_and_heap_only_allocation_unless_set():
    from layerwise_dist.cli import rank_env
    from layerwise_dist.distributed import CPU_ALLOCATOR_ENV

    env = rank_env({"PATH": "/bin", "OMP_NUM_THREADS": "4", "MALLOC_MMAP_MAX_": "65536"}, cpu=True)
    assert env["OMP_NUM_THREADS"] == "4" and env["MALLOC_MMAP_MAX_"] == "65536"  # what the user set wins
    assert (
        env["MKL_NUM_THREADS"] == "1" and env["MALLOC_TRIM_THRESHOLD_"] == CPU_ALLOCATOR_ENV["MALLOC_TRIM_THRESHOLD_"]
    )
    assert rank_env({"PATH": "/bin"}, cpu=False) == {"PATH": "/bin"}  # GPU ranks: nothing added


def test_ranks_get_the_visible_gpus_through_deepspeeds_launcher():
    """--nproc N on GPU: the first N ids of CUDA_VISIBLE_DEVICES (a SLURM job's GPUs), not 0..N-1; DeepSpeed's
    launcher turns the world info into each rank's CUDA_VISIBLE_DEVICES (its CUDA accelerator's own code)."""
    import base64
    import json

    from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

    from layerwise_dist.cli import launch_command, launch_devices

    assert launch_devices(2, {"CUDA_VISIBLE_DEVICES": "2,3,5"}, gpu=True) == [2, 3]
    assert launch_devices(1, {"CUDA_VISIBLE_DEVICES": "GPU-1a2b, 4"}, gpu=True) == ["GPU-1a2b"]
    assert launch_devices(2, {}, gpu=True) == [0, 1]
    assert launch_devices(2, {"CUDA_VISIBLE_DEVICES": "3"}, gpu=True) == [0, 1]  # too few named: DeepSpeed's rule
    assert launch_devices(2, {"CUDA_VISIBLE_DEVICES": "2,3"}, gpu=False) == [0, 1]  # CPU ranks: ids only count
    cmd = launch_command("distill", Path("/r/config.yaml"), 29500, True, [2, 3])
    assert cmd[1:4] == ["-u", "-m", "layerwise_dist.ds_launch"] and "--quiet" in cmd
    assert cmd[-5:] == ["--module", "layerwise_dist.worker", "distill", "--config", "/r/config.yaml"]
    world = json.loads(base64.urlsafe_b64decode(next(a for a in cmd if a.startswith("--world_info=")).split("=", 1)[1]))
    assert world == {"localhost": [2, 3]} and "--master_port=29500" in cmd
    env: dict[str, str] = {}
    CUDA_Accelerator().set_visible_devices_envs(env, world["localhost"])  # what launch.py does with them
    assert env == {"CUDA_VISIBLE_DEVICES": "2,3"}


def test_the_launcher_runs_deepspeeds_without_mlflow_and_its_ranks_with_it(tmp_path):
    """layerwise_dist.ds_launch (what launch_command starts) is DeepSpeed's launcher: it starts the rank module
    with --local_rank, passes the rank's exit code on; MLflow is blocked in the launcher's process only (the
    rank imports it and tracks as usual)."""
    import base64
    import subprocess
    import sys

    from conftest import run_env
    from layerwise_dist.distributed import free_port

    (tmp_path / "probe_rank.py").write_text(
        "import os, sys\n"
        "import mlflow, psutil\n"
        "print('rank', os.environ['RANK'], sys.argv[1], 'mlflow', mlflow.__version__, flush=True)\n"
        "print('parent', ' '.join(psutil.Process(os.getppid()).cmdline()[1:4]), flush=True)\n"
        "sys.exit(int(sys.argv[-1]))\n"
    )
    world = base64.urlsafe_b64encode(json.dumps({"localhost": [0]}).encode()).decode()
    env = run_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-u", "-m", "layerwise_dist.ds_launch", f"--world_info={world}", "--master_addr=127.0.0.1"]
    out = subprocess.run(
        [*cmd, f"--master_port={free_port()}", "--module", "probe_rank", "3"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 3, out.stdout[-3000:] + out.stderr[-3000:]
    assert "rank 0 --local_rank=0 mlflow " in out.stdout, out.stdout[-3000:]
    assert "parent -u -m layerwise_dist.ds_launch" in out.stdout, out.stdout[-3000:]
    # In the launcher's own process `import mlflow` fails, so DeepSpeed's autotuner goes without it.
    code = (
        "import sys, runpy\n"
        "runpy.run_module = lambda *a, **k: None\n"
        "from layerwise_dist.ds_launch import main\n"
        "main()\n"
        "import deepspeed.autotuning.autotuner as t\n"
        "print('has_mlflow', t.has_mlflow)\n"
    )
    probe = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0 and "has_mlflow False" in probe.stdout, probe.stdout + probe.stderr[-3000:]


def test_heap_only_allocation_stops_the_page_faults_of_big_tensors():
    """What CPU_ALLOCATOR_ENV is for: big tensors made and freed in a loop (a training step's logits) are faulted
    in by the kernel again in every round under glibc's defaults (mmap'd, unmapped at free); with the heap-only
    settings the heap settles after a few rounds and later rounds fault nothing (for more resident memory)."""
    import os
    import subprocess
    import sys

    from conftest import run_env
    from layerwise_dist.distributed import CPU_ALLOCATOR_ENV

    script = (
        "import resource, torch\n"
        "def step():\n"
        "    x = torch.ones(960, 49152); y = torch.ones(960, 49152); del x\n"
        "    z = torch.ones(500, 49152); del y, z\n"
        "for _ in range(20):\n"
        "    step()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(10):\n"
        "    step()\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )
    # "runtime": a rank started without the settings (a bare deepspeed launch) gets them at init_distributed.
    runtime = "from layerwise_dist.distributed import heap_only_allocation\nprint(heap_only_allocation())\n"
    faults, applied = {}, None
    for name, extra, prefix in (("default", {}, ""), ("heap", CPU_ALLOCATOR_ENV, ""), ("runtime", {}, runtime)):
        env = {k: v for k, v in run_env().items() if k not in CPU_ALLOCATOR_ENV} | extra
        out = subprocess.run(
            [sys.executable, "-c", prefix + script], env=env, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr[-2000:]
        faults[name] = int(out.stdout.strip().splitlines()[-1])
        if prefix:
            applied = out.stdout.strip().splitlines()[0]
    pages = 960 * 49152 * 4 // os.sysconf("SC_PAGE_SIZE")  # one 190 MB tensor
    assert faults["default"] > 10 * pages, faults  # every round faults its tensors in again
    assert faults["heap"] < pages // 10, faults
    assert faults["runtime"] < pages // 10, (faults, applied)
    assert applied == str({"MALLOC_MMAP_MAX_": 0, "MALLOC_TRIM_THRESHOLD_": 2**31 - 1})
