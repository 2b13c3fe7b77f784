"""Ray Train: the tiny preset on 2 CPU workers (gloo) through ``run_ray``, checked by what it leaves behind.

The driver-side path handling is tested without Ray (fast); the Ray run itself is
``distributed`` + ``integration`` (about 1.5 minutes on 2 cores, most of it Ray start-up).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_env
from layerwise_dist.config import ConfigError, load_config
from layerwise_dist.ray_train import prepare_loop_config


def test_loop_config_makes_paths_absolute(tmp_path, monkeypatch):
    """Workers run in another cwd: relative output_dir/ds_config/data paths reach them absolute."""
    monkeypatch.chdir(REPO)
    loop = prepare_loop_config(
        "distill", "tiny", ["output_dir=results/x", "tracking.tracking_uri=sqlite:///results/mlflow.db"]
    )
    assert loop["command"] == "distill" and loop["preset"] == "tiny"
    cfg = load_config(loop["preset"], loop["overrides"])
    assert cfg.output_dir == str(REPO / "results/x")
    assert cfg.ds_config == str(REPO / "ds_configs/zero3.json")
    assert cfg.teacher.model == "tiny"  # a model name, not a path: left alone
    assert cfg.tracking.tracking_uri == f"sqlite:///{REPO / 'results/mlflow.db'}"


def test_loop_config_yaml_preset_travels_absolute(tmp_path, monkeypatch):
    (tmp_path / "mine.yaml").write_text((REPO / "layerwise_dist/presets/tiny.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    loop = prepare_loop_config("fisher", "mine.yaml", [f"ds_config={REPO / 'ds_configs/zero3.json'}"])
    assert loop["preset"] == str(tmp_path / "mine.yaml")
    assert load_config(loop["preset"], loop["overrides"]).output_dir == str(tmp_path / "results/tiny")


def test_loop_config_errors_before_any_worker(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ds_configs/zero3.json is not here
    with pytest.raises(ConfigError, match="ds_config"):
        prepare_loop_config("distill", "tiny")
    with pytest.raises(ConfigError, match="unknown command"):
        prepare_loop_config("train", "tiny")


def test_launcher_help_shows_its_command():
    out = subprocess.run(
        [sys.executable, "launchers/ray_distill.py", "--help"], cwd=REPO, env=run_env(), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "python launchers/ray_distill.py --num_workers 2" in out.stdout


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.mark.distributed
@pytest.mark.integration
def test_ray_distill_two_cpu_workers(local_ray, tmp_path):
    """TorchTrainer, 2 gloo workers: ZeRO-3 spans both, rank 0's checkpoint is a loadable HF student."""
    from ray.train import Checkpoint
    from transformers import AutoModelForCausalLM

    from layerwise_dist.ray_train import run_ray

    run = tmp_path / "run"
    result = run_ray(
        "distill",
        "tiny",
        [
            f"output_dir={run}",
            f"ds_config={REPO / 'ds_configs/zero3.json'}",
            "train.max_steps=2",
            "tracking.enabled=false",
        ],
        num_workers=2,
        use_gpu=False,
        storage_path=tmp_path / "ray",
    )
    assert result.error is None
    metrics = result.metrics
    assert metrics["world_size"] == 2 and metrics["rank"] == 0
    assert metrics["student/n"] == 16 and 0.0 <= metrics["student/hr@10"] <= 1.0
    assert "teacher/hr@10" not in metrics  # distill scores the student only

    # Both workers were ranks of one group: the ZeRO-3 teacher was split in two, evaluation summed 2 ranks.
    results = json.loads((run / "results.json").read_text())
    assert results["config"]["ranks"] == 2
    teacher = results["setup"]["teacher"]
    assert teacher["world_size"] == 2 and teacher["zero3_partitioned"] is True
    assert teacher["local_param_fraction"] == pytest.approx(0.5, abs=0.01)
    assert len(json.loads((run / "train_history.json").read_text())) == 2

    # The checkpoint is Ray's copy of output_dir/student, in storage_path; the original stays.
    assert isinstance(result.checkpoint, Checkpoint)
    ckpt = Path(result.checkpoint.path)
    assert ckpt.is_relative_to(tmp_path / "ray")
    assert (run / "student" / "config.json").exists()
    student = AutoModelForCausalLM.from_pretrained(ckpt)
    assert student.config.num_hidden_layers == 2
    with torch.no_grad():
        logits = student(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
