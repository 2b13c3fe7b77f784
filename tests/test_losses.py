"""Properties of the distillation losses (zero at identity, masking, T^2 scaling, JSD symmetry, oracles)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from layerwise_dist.config import DistillConfig
from layerwise_dist.losses import (
    DistillationLoss,
    ForwardKLLoss,
    HiddenAlignmentLoss,
    JSDLoss,
    LossInputError,
    ReverseKLLoss,
    TaskCrossEntropy,
    shifted_label_mask,
    token_mask,
)

B, T, V = 2, 6, 11
KD_LOSSES = [ForwardKLLoss(2.0), ReverseKLLoss(2.0), JSDLoss(0.5, 2.0), JSDLoss(0.1), JSDLoss(0.0), JSDLoss(1.0)]


def _logits(seed: int, v: int = V) -> torch.Tensor:
    return torch.randn(B, T, v, generator=torch.Generator().manual_seed(seed)) * 3


def _batch() -> dict[str, torch.Tensor]:
    labels = torch.full((B, T), -100)
    labels[0, 4] = 5
    labels[1, 3:5] = torch.tensor([7, 2])
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, 5:] = 0
    return {"input_ids": torch.randint(0, V, (B, T)), "attention_mask": attention_mask, "labels": labels}


def test_shifted_label_mask_follows_hf_shift():
    mask = shifted_label_mask(_batch()["labels"])
    expected = torch.zeros(B, T, dtype=torch.bool)
    expected[0, 3] = True
    expected[1, 2:4] = True
    assert torch.equal(mask, expected)
    assert torch.equal(token_mask(_batch(), "all"), _batch()["attention_mask"].bool())


@pytest.mark.parametrize("loss", KD_LOSSES, ids=repr)
def test_kd_identical_inputs_give_zero(loss):
    z = _logits(0)
    assert loss(z, z.clone(), torch.ones(B, T, dtype=torch.bool)).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("loss", KD_LOSSES, ids=repr)
def test_kd_all_masked_is_exactly_zero_with_zero_grad(loss):
    z_s = _logits(0).requires_grad_(True)
    z_t = _logits(1)
    z_t[0, 0, 0] = float("-inf")  # garbage at a masked position must not leak a NaN
    out = loss(z_s, z_t, torch.zeros(B, T, dtype=torch.bool))
    out.backward()
    assert out.item() == 0.0 and not torch.isnan(out)
    assert torch.equal(z_s.grad, torch.zeros_like(z_s))


def test_forward_kl_matches_torch_distributions_and_t2_scaling():
    z_s, z_t, temp = _logits(0), _logits(1), 3.0
    mask = token_mask(_batch(), "answer")
    p_t = torch.distributions.Categorical(logits=z_t / temp)
    p_s = torch.distributions.Categorical(logits=z_s / temp)
    kl = torch.distributions.kl_divergence(p_t, p_s)  # [B, T]
    oracle = kl[mask].mean()
    assert ForwardKLLoss(temp)(z_s, z_t, mask).item() == pytest.approx(temp**2 * oracle.item(), rel=1e-5)
    # T^2 scaling: at T equals T^2 times the unscaled (T=1) KL of the tempered logits.
    assert ForwardKLLoss(temp)(z_s, z_t, mask).item() == pytest.approx(
        temp**2 * ForwardKLLoss(1.0)(z_s / temp, z_t / temp, mask).item(), rel=1e-5
    )


def test_reverse_kl_matches_manual():
    z_s, z_t = _logits(0), _logits(1)
    mask = torch.ones(B, T, dtype=torch.bool)
    log_s, log_t = F.log_softmax(z_s, -1), F.log_softmax(z_t, -1)
    oracle = (log_s.exp() * (log_s - log_t)).sum(-1).mean()
    assert ReverseKLLoss(1.0)(z_s, z_t, mask).item() == pytest.approx(oracle.item(), rel=1e-5)


def test_jsd_symmetric_at_half_and_matches_manual():
    z_s, z_t, mask = _logits(0), _logits(1), token_mask(_batch(), "all")
    jsd = JSDLoss(0.5)
    assert jsd(z_s, z_t, mask).item() == pytest.approx(jsd(z_t, z_s, mask).item(), rel=1e-6)
    beta = 0.3
    p_s, p_t = F.softmax(z_s, -1), F.softmax(z_t, -1)
    m = beta * p_t + (1 - beta) * p_s
    kl = lambda p, q: (p * (p.log() - q.log())).sum(-1)  # noqa: E731
    oracle = (beta * kl(p_t, m) + (1 - beta) * kl(p_s, m))[mask].mean()
    assert JSDLoss(beta)(z_s, z_t, mask).item() == pytest.approx(oracle.item(), rel=1e-5)
    assert JSDLoss(0.3)(z_s, z_t, mask).item() != pytest.approx(JSDLoss(0.3)(z_t, z_s, mask).item(), rel=1e-3)
    # End points: forward and reverse KL.
    assert JSDLoss(0.0)(z_s, z_t, mask).item() == pytest.approx(ForwardKLLoss(1.0)(z_s, z_t, mask).item())
    assert JSDLoss(1.0)(z_s, z_t, mask).item() == pytest.approx(ReverseKLLoss(1.0)(z_s, z_t, mask).item())


def test_losses_upcast_bf16_to_fp32():
    z_s, z_t = _logits(0).bfloat16(), _logits(1).bfloat16()
    out = ForwardKLLoss(2.0)(z_s, z_t, torch.ones(B, T, dtype=torch.bool))
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(ForwardKLLoss(2.0)(z_s.float(), z_t.float(), torch.ones(B, T)).item())


def test_task_ce_matches_hf_shifted_cross_entropy_and_all_masked_is_zero():
    z, batch = _logits(0), _batch()
    labels = batch["labels"]
    oracle = F.cross_entropy(z[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert TaskCrossEntropy()(z, labels).item() == pytest.approx(oracle.item(), rel=1e-6)
    empty = TaskCrossEntropy()(z, torch.full_like(labels, -100))
    assert empty.item() == 0.0


@pytest.mark.parametrize("kind", ["mse", "nmse", "cosine"])
def test_alignment_identity_zero_and_masking(kind):
    h = torch.randn(B, T, 8)
    loss = HiddenAlignmentLoss(kind, 8, 8)
    assert loss.proj is None and not list(loss.parameters())
    assert loss(h, h.clone(), torch.ones(B, T)).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(h, torch.randn(B, T, 8), torch.zeros(B, T)).item() == 0.0
    # Padding positions do not count.
    att = _batch()["attention_mask"]
    noisy = h.clone()
    noisy[1, 5:] += 100.0
    assert loss(h, noisy, att).item() == pytest.approx(0.0, abs=1e-6)


def test_alignment_nmse_is_scale_free():
    h_s, h_t, att = torch.randn(B, T, 8), torch.randn(B, T, 8), _batch()["attention_mask"]
    oracle = (((h_s - h_t) ** 2).sum(-1) / (h_t**2).sum(-1))[att.bool()].mean()
    loss = HiddenAlignmentLoss("nmse")
    assert loss(h_s, h_t, att).item() == pytest.approx(oracle.item(), rel=1e-5)
    assert loss(1000 * h_s, 1000 * h_t, att).item() == pytest.approx(oracle.item(), rel=1e-5)


def test_alignment_mse_is_mean_over_real_tokens():
    h_s, h_t, att = torch.randn(B, T, 8), torch.randn(B, T, 8), _batch()["attention_mask"]
    oracle = ((h_s - h_t) ** 2).mean(-1)[att.bool()].mean()
    assert HiddenAlignmentLoss("mse")(h_s, h_t, att).item() == pytest.approx(oracle.item(), rel=1e-6)


def test_alignment_projection_when_widths_differ_gets_gradients():
    loss = HiddenAlignmentLoss("mse", student_dim=6, teacher_dim=10)
    params = list(loss.parameters())
    assert loss.proj is not None and [p.shape for p in params] == [torch.Size([10, 6])]
    out = loss(torch.randn(B, T, 6), torch.randn(B, T, 10), torch.ones(B, T))
    out.backward()
    assert params[0].grad is not None and params[0].grad.abs().sum() > 0
    with pytest.raises(LossInputError, match="width"):
        HiddenAlignmentLoss("mse")(torch.randn(B, T, 6), torch.randn(B, T, 10), torch.ones(B, T))


def _outputs(seed: int, layers: int, dim: int, v: int = V) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)
    hidden = tuple(torch.randn(B, T, dim, generator=g) for _ in range(layers + 1))
    return SimpleNamespace(logits=_logits(seed, v).requires_grad_(True), hidden_states=hidden)


@pytest.mark.parametrize("kd_loss", ["forward_kl", "reverse_kl", "jsd"])
def test_distillation_components_sum_to_total(kd_loss):
    cfg = DistillConfig(ce_weight=0.7, kd_weight=1.3, align_weight=0.5, kd_loss=kd_loss, temperature=2.0)
    weights = [0.25, 0.75]
    loss = DistillationLoss(cfg, weights, layer_map=[1, 3], student_dim=8, teacher_dim=8)
    total, comp = loss(_outputs(0, 2, 8), _outputs(1, 4, 8), _batch())
    assert set(comp) == {"ce", "kd", "align", "align_l0", "align_l1"}
    assert comp["align"].item() == pytest.approx(0.25 * comp["align_l0"].item() + 0.75 * comp["align_l1"].item())
    expected = 0.7 * comp["ce"] + 1.3 * comp["kd"] + 0.5 * comp["align"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert all(v.dtype == torch.float32 and v.dim() == 0 for v in comp.values())


def test_distillation_identical_student_and_teacher_has_only_ce():
    cfg = DistillConfig(mask="all")
    out = _outputs(0, 2, 8)
    loss = DistillationLoss(cfg, [0.5, 0.5], layer_map=[0, 1], student_dim=8, teacher_dim=8)
    total, comp = loss(out, out, _batch())
    assert comp["kd"].item() == pytest.approx(0.0, abs=1e-6) and comp["align"].item() == pytest.approx(0.0, abs=1e-6)
    assert total.item() == pytest.approx(comp["ce"].item(), rel=1e-6)


def test_distillation_projection_parameters_are_exposed_and_trained():
    cfg = DistillConfig()
    loss = DistillationLoss(cfg, [1.0], layer_map=[2], student_dim=6, teacher_dim=8)
    params = list(loss.parameters())
    assert len(params) == 1 and params[0].requires_grad
    total, _ = loss(_outputs(0, 1, 6), _outputs(1, 3, 8), _batch())
    total.backward()
    assert params[0].grad is not None and params[0].grad.abs().sum() > 0


def test_distillation_vocab_mismatch():
    student, teacher = _outputs(0, 1, 8, v=11), _outputs(1, 1, 8, v=13)
    with pytest.raises(LossInputError, match="shared_vocab_only"):
        DistillationLoss(DistillConfig(), [1.0], [0], 8, 8)(student, teacher, _batch())
    cfg = DistillConfig(shared_vocab_only=True, mask="all", kd_weight=1.0)
    _, comp = DistillationLoss(cfg, [1.0], [0], 8, 8)(student, teacher, _batch())
    oracle = ForwardKLLoss(cfg.temperature)(student.logits, teacher.logits[..., :11], token_mask(_batch(), "all"))
    assert comp["kd"].item() == pytest.approx(oracle.item(), rel=1e-6)


def test_distillation_checks_layer_map_against_hidden_states():
    loss = DistillationLoss(DistillConfig(), [0.5, 0.5], layer_map=[0, 9], student_dim=8, teacher_dim=8)
    with pytest.raises(LossInputError, match="past the teacher"):
        loss(_outputs(0, 2, 8), _outputs(1, 4, 8), _batch())
    with pytest.raises(LossInputError, match="2 layer weights for 1"):
        DistillationLoss(DistillConfig(), [0.5, 0.5], layer_map=[0], student_dim=8, teacher_dim=8)


def test_distillation_all_masked_batch_is_finite():
    batch = _batch()
    batch["labels"].fill_(-100)
    batch["attention_mask"].zero_()
    loss = DistillationLoss(DistillConfig(), [1.0], layer_map=[0], student_dim=8, teacher_dim=8)
    total, comp = loss(_outputs(0, 1, 8), _outputs(1, 1, 8), batch)
    assert total.item() == 0.0 and all(v.item() == 0.0 for v in comp.values())


def test_expose_layer_outputs_on_real_models():
    from layerwise_dist.losses import expose_layer_outputs
    from layerwise_dist.models.student import build_student
    from layerwise_dist.models.tiny import tiny_llama

    teacher = tiny_llama(num_layers=4, vocab_size=V)
    student, layer_map = build_student(teacher, [0, 2])
    student.eval()
    ids = torch.randint(3, V, (B, T), generator=torch.Generator().manual_seed(0))
    batch = {**_batch(), "input_ids": ids}
    loss = DistillationLoss(DistillConfig(), [0.5, 0.5], layer_map, student_dim=64, teacher_dim=64)
    with torch.no_grad():
        plain_s = student(ids, output_hidden_states=True)
        plain_t = teacher(ids, output_hidden_states=True)
    # HF's last entry is post-norm: pairing it with a raw teacher layer is refused.
    with pytest.raises(LossInputError, match="expose_layer_outputs"):
        loss(plain_s, plain_t, batch)
    # Last student layer with the last teacher layer: both post-norm, consistent.
    DistillationLoss(DistillConfig(), [0.5, 0.5], [0, 3], 64, 64)(plain_s, plain_t, batch)

    handles = [expose_layer_outputs(student), expose_layer_outputs(teacher)]
    with torch.no_grad():
        raw_s = student(ids, output_hidden_states=True)
        raw_t = teacher(ids, output_hidden_states=True)
    torch.testing.assert_close(raw_s.logits, plain_s.logits, rtol=0, atol=0)
    torch.testing.assert_close(student.model.norm(raw_s.hidden_states[-1]), plain_s.hidden_states[-1])
    torch.testing.assert_close(raw_t.hidden_states[3], plain_t.hidden_states[3], rtol=0, atol=0)
    _, comp = loss(raw_s, raw_t, batch)
    # Student layer 0 is teacher layer 0 on the same input; layer 1 (teacher 2) misses teacher layer 1.
    assert comp["align_l0"].item() == 0.0 and comp["align_l1"].item() > 0
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(student(ids, output_hidden_states=True).hidden_states[-1], plain_s.hidden_states[-1])
