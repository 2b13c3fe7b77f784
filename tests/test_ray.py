"""Ray Train: the tiny preset on 2 CPU workers (gloo) through ``run_ray``, checked by what it leaves behind.

The driver-side path handling is tested without Ray (fast); the Ray run itself is
``distributed`` + ``integration`` (about 1.5 minutes on 2 cores, most of it Ray start-up).
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_env
from layerwise_dist.config import ConfigError, RunConfig, load_config
from layerwise_dist.ray_train import prepare_loop_config


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
    assert cfg.train == load_config("tiny").train  # everything else as resolved on the driver
    assert pickle.loads(pickle.dumps(cfg)) == cfg  # what Ray does to train_loop_config


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


@pytest.fixture(scope="module")
def local_ray():
    import ray  # a required dependency: missing must fail, not skip

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
