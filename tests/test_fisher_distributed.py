"""2 ranks under DeepSpeed ZeRO-3 (the real launcher, gloo on CPU) give the 1-rank profile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fisher_worker import CASES, make_examples

from conftest import free_port
from layerwise_dist.data import collate
from layerwise_dist.fisher import compute_fisher_profile
from layerwise_dist.models.tiny import tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def _run_two_ranks(out: Path, extra: list[str]) -> list[dict]:
    launcher = Path(sys.executable).parent / "deepspeed"  # a required dependency: missing fails, never skips
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [str(launcher), "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    cmd += ["tests/fisher_worker.py", "--out", str(out), "--num-examples", "8", "--batch-size", "2", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.distributed
def test_two_rank_zero3_nf4_profile_equals_one_rank(tmp_path):
    """The 4-bit teacher partitioned by ZeRO-3 on 2 ranks gives the 1-rank (unpartitioned 4-bit) profile."""
    from layerwise_dist.config import TeacherConfig
    from layerwise_dist.models.teacher import load_teacher

    folder = tmp_path / "tiny"
    tiny_llama(seed=0).save_pretrained(folder)
    results = _run_two_ranks(tmp_path / "out", ["--nf4-model", str(folder)])
    assert results[0]["profiles"] == results[1]["profiles"]
    assert all(r["norms_unchanged"] for r in results)
    model = load_teacher(TeacherConfig(model=str(folder), quantization="nf4", placement="replicate"))
    assert "Linear4bit" in {type(m).__name__ for m in model.modules()}
    examples = make_examples(8)
    batches = [collate(examples[i : i + 2]) for i in range(0, 8, 2)]
    for form, labels in CASES:
        got = results[0]["profiles"][f"{form}/{labels}"]
        ref = compute_fisher_profile(model, batches, form, labels, seed=3, progress=False)
        torch.testing.assert_close(
            torch.tensor(got["scores"], dtype=torch.float64),
            torch.tensor(ref.scores, dtype=torch.float64),
            rtol=1e-5,
            atol=0,
        )


@pytest.mark.distributed
def test_two_rank_zero3_profile_equals_one_rank(tmp_path):
    results = _run_two_ranks(tmp_path, [])

    for res in results:
        assert res["world"] == 2 and res["norms_unchanged"]
        # ZeRO-3 really partitioned the weights: each rank holds half of every parameter.
        assert res["partition"]["shard_numel"] * 2 <= res["partition"]["full_numel"] + 2 * 64
    assert results[0]["profiles"] == results[1]["profiles"], "the all-reduced profile must be identical on every rank"

    model = tiny_llama(seed=0)
    examples = make_examples(8)
    batches = [collate(examples[i : i + 2]) for i in range(0, 8, 2)]
    for form, labels in CASES:
        got = results[0]["profiles"][f"{form}/{labels}"]
        ref = compute_fisher_profile(model, batches, form, labels, seed=3, progress=False)
        assert got["num_examples"] == ref.num_examples == 8 and got["num_tokens"] == ref.num_tokens
        for key in ("scores", "block_influence", "angular_distance"):
            torch.testing.assert_close(
                torch.tensor(got[key], dtype=torch.float64),
                torch.tensor(getattr(ref, key), dtype=torch.float64),
                rtol=1e-5,
                atol=0,
            )
        for group, values in ref.module_scores.items():
            torch.testing.assert_close(
                torch.tensor(got["module_scores"][group], dtype=torch.float64),
                torch.tensor(values, dtype=torch.float64),
                rtol=1e-5,
                atol=0,
            )
