"""GPU paths (NCCL, bf16, flash-attention, 4-bit on CUDA). Written for real; skipped without CUDA."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math

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


# --------------------------------------------------------------------------- the GPU check (issue 16)
# Run by `make gpu-check` (scripts/gpu_check.py); values a reader needs are recorded as junit properties.


def _tiny_folder(tmp_path, layers=8, hidden=128, vocab=256):
    from layerwise_dist.models.tiny import tiny_llama

    folder = tmp_path / f"tiny-{layers}-{hidden}"
    tiny_llama(vocab_size=vocab, num_layers=layers, hidden=hidden, seed=0).save_pretrained(folder)
    return folder


def test_world1_nccl_zero3_engine_step_of_the_student(monkeypatch):
    """The student in a DeepSpeed ZeRO-3 engine (bf16) on one NCCL rank: partitioned, and three steps learn."""
    deepspeed = pytest.importorskip("deepspeed")
    import torch.distributed as dist

    from layerwise_dist.distributed import free_port
    from layerwise_dist.models.student import build_student
    from layerwise_dist.models.teacher import resolve_model_dir

    importlib.import_module("torch._dynamo")  # before deepspeed.zero.Init (DESIGN.md)
    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    deepspeed.init_distributed(dist_backend="nccl")
    try:
        assert dist.get_backend() == "nccl"
        student, _ = build_student(resolve_model_dir(TeacherConfig(model="tiny")), [0, 3])
        ds = {
            "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": 1,
            "bf16": {"enabled": True},
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
        }
        opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
        engine, *_ = deepspeed.initialize(model=student, optimizer=opt, config=ds)
        assert all(hasattr(p, "ds_tensor") for p in student.parameters())
        assert engine.device.type == "cuda"
        ids = torch.randint(3, 1000, (2, 32), device=engine.device, generator=None)
        losses = []
        for _ in range(3):
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
        assert losses[-1] < losses[0], losses
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_nf4_teacher_on_cuda_matches_the_bf16_teacher(tmp_path, record_property):
    """NF4 (bitsandbytes, double quantization) vs bf16, same weights, on CUDA.

    Tolerances (random weights, 8 layers; on CPU fp32 vs NF4 gives Spearman 1.0, logits cosine 0.97 and
    relative L2 error 0.22): Fisher profile Spearman >= 0.9; logits cosine >= 0.95 and relative L2 error <= 0.35."""
    pytest.importorskip("bitsandbytes")
    from fisher_worker import make_batches

    from layerwise_dist.fisher import compute_fisher_profile
    from layerwise_dist.fisher.profile import spearman
    from layerwise_dist.models.teacher import load_teacher

    folder = _tiny_folder(tmp_path)
    bf16 = load_teacher(TeacherConfig(model=str(folder), quantization="none", placement="replicate")).to("cuda")
    nf4 = load_teacher(TeacherConfig(model=str(folder), quantization="nf4", placement="replicate"))
    assert "Linear4bit" in {type(m).__name__ for m in nf4.modules()}
    assert next(bf16.parameters()).dtype == torch.bfloat16
    batches = [{k: v.to("cuda") for k, v in b.items()} for b in make_batches(16, 4, seed=3)]
    p_bf16 = compute_fisher_profile(bf16, batches, progress=False).scores
    p_nf4 = compute_fisher_profile(nf4, batches, progress=False).scores
    rho = spearman(p_bf16, p_nf4)
    with torch.no_grad():
        a = bf16(input_ids=batches[0]["input_ids"]).logits.float()
        b = nf4(input_ids=batches[0]["input_ids"]).logits.float()
    cos = float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))
    rel = float((a - b).norm() / a.norm())
    record_property("fisher_spearman_nf4_vs_bf16", rho)
    record_property("logits_cosine_nf4_vs_bf16", cos)
    record_property("logits_rel_l2_nf4_vs_bf16", rel)
    assert rho >= 0.9, (p_bf16, p_nf4)
    assert cos >= 0.95 and rel <= 0.35, (cos, rel)


@pytest.mark.parametrize("attention", ["sdpa_flash", "flash_attention_2"])
def test_distillation_step_bf16_with_forced_attention(attention, record_property):
    """Teacher forward + student step with the package's DistillationLoss in bf16, the attention kernel forced:
    SDPA's FlashAttention backend (fails loudly if it cannot run) or flash-attn 2 when that package is present.
    No padding mask (flash kernels take causal masks only)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from layerwise_dist.config import DistillConfig
    from layerwise_dist.losses import DistillationLoss, expose_layer_outputs
    from layerwise_dist.models.tiny import tiny_llama

    if attention == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("the flash-attn package is not installed (no wheel; SDPA's flash backend is tested instead)")
    impl = "sdpa" if attention == "sdpa_flash" else "flash_attention_2"
    teacher = tiny_llama(vocab_size=256, num_layers=8, hidden=128, attn_implementation=impl).to("cuda", torch.bfloat16)
    student = tiny_llama(vocab_size=256, num_layers=2, hidden=128, seed=1, attn_implementation=impl)
    student = student.to("cuda", torch.bfloat16).train()
    teacher.requires_grad_(False)
    expose_layer_outputs(teacher)
    expose_layer_outputs(student)
    loss_fn = DistillationLoss(DistillConfig(), [0.5, 0.5], [3, 7], 128, 128).to("cuda")
    opt = torch.optim.AdamW(list(student.parameters()) + list(loss_fn.parameters()), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 256, (4, 48), generator=gen).to("cuda")
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    context = sdpa_kernel(SDPBackend.FLASH_ATTENTION) if impl == "sdpa" else contextlib.nullcontext()
    losses = []
    with context:
        for _ in range(5):
            with torch.no_grad():
                t_out = teacher(input_ids=ids, output_hidden_states=True)
            s_out = student(input_ids=ids, output_hidden_states=True)
            assert s_out.logits.dtype == torch.bfloat16
            total, _ = loss_fn(s_out, t_out, batch)
            total.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(total))
    record_property(f"distill_losses_{attention}", losses)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_answer_only_scores_equal_the_full_path_on_cuda(dtype, record_property):
    """fp32: equal within 1e-5 (as on CPU). bf16: the candidates' logits are read from the same one-position
    head, so the only difference is the matmul's shape (B x H vs B*T x H): within 0.05 in log-probability."""
    from fisher_worker import make_batches

    from layerwise_dist.evaluation import full_forward_scores
    from layerwise_dist.heads import answer_only_scores
    from layerwise_dist.models.tiny import tiny_llama

    model = tiny_llama(vocab_size=256, num_layers=3, hidden=64, seed=1).to("cuda", dtype)
    worst = 0.0
    for batch in make_batches(12, 4, seed=5):
        batch = {k: v.to("cuda") for k, v in batch.items()}
        full = full_forward_scores(model, batch)
        fast = answer_only_scores(model, batch)
        worst = max(worst, float((full - fast).abs().max()))
    record_property(f"answer_only_max_abs_diff_{str(dtype).split('.')[-1]}", worst)
    assert worst <= (1e-5 if dtype == torch.float32 else 0.05), worst
