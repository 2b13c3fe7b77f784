"""GPU paths (NCCL, bf16, flash-attention, 4-bit on CUDA). Written for real; skipped without CUDA."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from layerwise_dist.config import TeacherConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (this machine has none)"),
]


def test_gpu_choices():
    from layerwise_dist.distributed import backend
    from layerwise_dist.models.teacher import compute_dtype, select_attn_implementation
    from layerwise_dist.precision import use_bf16

    assert backend() == "nccl"
    assert compute_dtype() == torch.bfloat16
    assert use_bf16("auto") is torch.cuda.is_bf16_supported()
    expected = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"
    assert select_attn_implementation("auto") == expected


def test_nf4_teacher_on_cuda_bf16():
    from layerwise_dist.models.teacher import load_teacher

    model = load_teacher(TeacherConfig(model="tiny", quantization="nf4", placement="replicate"))
    assert "Linear4bit" in {type(m).__name__ for m in model.modules()}
    ids = torch.tensor([[1, 2, 3, 4]], device="cuda")
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.device.type == "cuda" and torch.isfinite(logits).all()


def test_student_bf16_step_on_cuda(tmp_path):
    from layerwise_dist.models.student import build_student
    from layerwise_dist.models.teacher import resolve_model_dir

    student, _ = build_student(resolve_model_dir(TeacherConfig(model="tiny")), [0, 3])
    student = student.to("cuda", torch.bfloat16).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, fused=True)
    ids = torch.randint(0, 1000, (2, 32), device="cuda")
    losses = []
    for _ in range(3):
        loss = student(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
