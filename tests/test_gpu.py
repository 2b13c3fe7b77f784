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


def test_gpu_choices_reach_the_loaded_model(tmp_path):
    """On CUDA the chosen backend, dtype and attention are the ones a real process group and model get."""
    import torch.distributed as dist

    from layerwise_dist.distributed import backend
    from layerwise_dist.models.teacher import ModelLoadError, load_teacher

    # backend(): NCCL, and a one-rank NCCL group really all-reduces a CUDA tensor.
    dist.init_process_group(backend(), store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        assert dist.get_backend() == "nccl"
        t = torch.full((3,), 2.0, device="cuda")
        dist.all_reduce(t)
        assert t.tolist() == [2.0, 2.0, 2.0]
    finally:
        dist.destroy_process_group()

    # compute_dtype() and select_attn_implementation("auto"): what the loaded teacher really uses.
    model = load_teacher(TeacherConfig(model="tiny", quantization="none", placement="replicate"))
    has_flash = importlib.util.find_spec("flash_attn") is not None
    assert model.config._attn_implementation == ("flash_attention_2" if has_flash else "sdpa")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model.to("cuda")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3, 4]], device="cuda")).logits
    assert torch.isfinite(logits).all()
    if not has_flash:
        with pytest.raises(ModelLoadError, match="flash-attn"):
            load_teacher(TeacherConfig(model="tiny", attn_implementation="flash_attention_2", placement="replicate"))


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
