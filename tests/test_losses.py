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


# --------------------------------------------------------------------------- pointwise

PV = 48  # vocabulary of the pointwise tiny models


def _pointwise_users(seed: int = 0):
    """Two users: prefix token ids, candidates' token ids (varied lengths and counts), target index."""
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, PV, (n,), generator=g).tolist()

    prefixes = [ids(7), ids(5)]
    candidates = [[ids(3), ids(1), ids(4)], [ids(2), ids(5), ids(2), ids(3)]]
    return prefixes, candidates, torch.tensor([2, 1]), ids(4)  # the last: an unconditional prefix for pmi


def _sharp(model, scale: float):
    """Scale the LM head so that the random model's next-token distributions are far from uniform."""
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


@pytest.fixture(scope="module")
def pointwise_models():
    from layerwise_dist.losses import expose_layer_outputs
    from layerwise_dist.models.student import build_student
    from layerwise_dist.models.tiny import tiny_llama

    teacher = _sharp(tiny_llama(vocab_size=PV, num_layers=4, seed=0), 8.0)
    student, layer_map = build_student(teacher, [0, 3])
    student.eval()
    _sharp(student, 0.5)  # the student differs from the teacher in its last layer input and its head
    for model in (teacher, student):
        model.config._attn_implementation = "sdpa"
        expose_layer_outputs(model)
    return teacher, student, layer_map


def _packed_batch(score: str = "mean"):
    from layerwise_dist.pointwise import pack_candidates_batch

    prefixes, candidates, target, uncond = _pointwise_users()
    packed = pack_candidates_batch(prefixes, candidates, 0, uncond if score == "pmi" else None)
    return {"packed": packed, "target_index": target}, prefixes, candidates, uncond


def _separate_token_logits(model, prefix, cand) -> torch.Tensor:
    """Logits [T, V] predicting the candidate's T tokens, from an ordinary forward of ``prefix + cand``."""
    ids = torch.tensor([list(prefix) + list(cand)])
    return model(input_ids=ids).logits[0, len(prefix) - 1 : -1]


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    p = torch.distributions.Categorical(logits=p_logits.double())
    q = torch.distributions.Categorical(logits=q_logits.double())
    return torch.distributions.kl_divergence(p, q)


@pytest.mark.parametrize("score", ["mean", "sum", "pmi"])
@pytest.mark.parametrize("kd_loss", ["forward_kl", "reverse_kl"])
def test_pointwise_terms_equal_their_definitions_on_separate_sequences(pointwise_models, score, kd_loss):
    """Every term of the packed loss against C separate ``prefix + candidate`` forwards per user."""
    from layerwise_dist.losses import PointwiseDistillationLoss, packed_forward
    from layerwise_dist.pointwise import score_candidates_separately

    teacher, student, layer_map = pointwise_models
    temp, tau = 2.0, 3.0
    cfg = DistillConfig(
        ce_weight=0.7,
        kd_weight=1.3,
        list_kd_weight=0.9,
        align_weight=0.4,
        kd_loss=kd_loss,
        temperature=temp,
        list_temperature=tau,
    )
    loss = PointwiseDistillationLoss(cfg, [0.25, 0.75], layer_map, 64, 64, score=score)
    batch, prefixes, candidates, uncond = _packed_batch(score)
    with torch.no_grad():
        total, comp = loss(packed_forward(student, batch["packed"]), packed_forward(teacher, batch["packed"]), batch)
        # Brute force: one ordinary forward per (prefix, candidate), per model.
        kd_terms, ce_terms, list_terms = [], [], []
        for b, (prefix, cands) in enumerate(zip(prefixes, candidates)):
            groups = [prefix] + ([uncond] if score == "pmi" else [])
            token_lp = {"s": [[] for _ in groups], "t": [[] for _ in groups]}  # [group][candidate] -> [T_c]
            for g, group_prefix in enumerate(groups):
                for cand in cands:
                    s_tok = _separate_token_logits(student, group_prefix, cand)
                    t_tok = _separate_token_logits(teacher, group_prefix, cand)
                    p_q = (t_tok, s_tok) if kd_loss == "forward_kl" else (s_tok, t_tok)
                    kd_terms += list(temp**2 * _kl(p_q[0] / temp, p_q[1] / temp))  # every candidate token
                    for who, z in (("s", s_tok), ("t", t_tok)):
                        lp = F.log_softmax(z.double(), -1).gather(-1, torch.tensor(cand)[:, None]).squeeze(-1)
                        token_lp[who][g].append(lp)
            ce_terms.append(-token_lp["s"][0][int(batch["target_index"][b])].mean())
            scores = {}
            for who, model in (("s", student), ("t", teacher)):
                sums = [torch.stack([lp.sum() for lp in group]) for group in token_lp[who]]
                if score == "mean":
                    scores[who] = torch.stack([lp.mean() for lp in token_lp[who][0]])
                else:
                    scores[who] = sums[0] if score == "sum" else sums[0] - sums[1]
                # The same scores as the package's separate-sequence scorer.
                reference = score_candidates_separately(model, prefix, cands, score, uncond if score == "pmi" else None)
                torch.testing.assert_close(scores[who], reference.double(), rtol=1e-5, atol=1e-5)
            list_terms.append(tau**2 * _kl(scores["t"] / tau, scores["s"] / tau))

        # Alignment: per mapped layer, mean over the real (non-padding) positions of the packed rows.
        packed = batch["packed"]
        s_hidden = student(
            input_ids=packed.input_ids,
            attention_mask=packed.additive_attention_mask(torch.float32),
            position_ids=packed.position_ids,
            output_hidden_states=True,
        ).hidden_states
        t_hidden = teacher(
            input_ids=packed.input_ids,
            attention_mask=packed.additive_attention_mask(torch.float32),
            position_ids=packed.position_ids,
            output_hidden_states=True,
        ).hidden_states
        align_terms = []
        for i, t_layer in enumerate(layer_map):
            per_token = [
                (
                    (s_hidden[i + 1][b, j] - t_hidden[t_layer + 1][b, j]).pow(2).sum()
                    / t_hidden[t_layer + 1][b, j].pow(2).sum()
                )
                for b in range(len(prefixes))
                for j in range(packed.lengths[b])
            ]
            align_terms.append(torch.stack(per_token).mean())

    n_tokens = len(packed.token_target)
    assert len(kd_terms) == n_tokens and n_tokens == sum(map(len, sum(candidates, []))) * packed.num_groups
    expected = {
        "ce": torch.stack(ce_terms).mean(),
        "kd": torch.stack(kd_terms).mean(),
        "list_kd": torch.stack(list_terms).mean(),
        "align_l0": align_terms[0],
        "align_l1": align_terms[1],
    }
    expected["align"] = 0.25 * align_terms[0] + 0.75 * align_terms[1]
    assert set(comp) == set(expected)
    for key, value in expected.items():
        assert comp[key].item() == pytest.approx(value.item(), rel=1e-4, abs=1e-6), key
        assert comp[key].dtype == torch.float32
    assert comp["kd"].item() > 1e-3 and comp["list_kd"].item() > 1e-3 and comp["align_l1"].item() > 1e-3
    weighted = 0.7 * expected["ce"] + 1.3 * expected["kd"] + 0.9 * expected["list_kd"] + 0.4 * expected["align"]
    assert total.item() == pytest.approx(weighted.item(), rel=1e-4)


def test_pointwise_loss_on_random_tensors_equals_a_per_token_loop():
    """Random logits at the kept positions and random hidden states: the loss against plain loops."""
    from layerwise_dist.losses import PointwiseDistillationLoss, packed_logit_positions

    batch, prefixes, candidates, _ = _packed_batch("sum")
    packed = batch["packed"]
    keep, index = packed_logit_positions(packed)
    # The kept positions, in (row, position) order, are exactly the distinct predicting positions.
    kept = sorted({(int(r), int(p)) for r, p in zip(packed.token_row, packed.token_pred_pos)})
    assert keep.nonzero().tolist() == [list(x) for x in kept]
    g = torch.Generator().manual_seed(3)
    u, length = len(kept), packed.input_ids.shape[1]
    outs = [
        SimpleNamespace(
            logits=torch.randn(u, PV, generator=g) * 3,
            hidden_states=tuple(torch.randn(2, length, 8, generator=g) for _ in range(layers + 1)),
            raw_layer_outputs=True,
        )
        for layers in (2, 3)
    ]
    cfg = DistillConfig(kd_loss="jsd", jsd_beta=0.3, temperature=1.5, align_loss="cosine", list_temperature=3.0)
    loss = PointwiseDistillationLoss(cfg, [0.5, 0.5], [1, 2], 8, 8, score="sum")
    _, comp = loss(outs[0], outs[1], batch)

    row_of = {pos: k for k, pos in enumerate(kept)}
    s_logits, t_logits = outs[0].logits.double(), outs[1].logits.double()
    jsd_terms, slot_lp = [], {"s": {}, "t": {}}
    for k in range(len(packed.token_target)):
        r = row_of[(int(packed.token_row[k]), int(packed.token_pred_pos[k]))]
        assert int(index[k]) == r
        p_s, p_t = F.softmax(s_logits[r] / 1.5, -1), F.softmax(t_logits[r] / 1.5, -1)
        m = 0.3 * p_t + 0.7 * p_s
        jsd_terms.append(1.5**2 * (0.3 * (p_t * (p_t / m).log()).sum() + 0.7 * (p_s * (p_s / m).log()).sum()))
        slot = int(packed.token_slot[k])
        for who, z in (("s", s_logits), ("t", t_logits)):
            slot_lp[who][slot] = slot_lp[who].get(slot, 0.0) + F.log_softmax(z[r], -1)[packed.token_target[k]]
    ce_terms, list_terms, slot = [], [], 0
    for b, cands in enumerate(candidates):
        s_scores = torch.stack([slot_lp["s"][slot + c] for c in range(len(cands))])
        t_scores = torch.stack([slot_lp["t"][slot + c] for c in range(len(cands))])
        y = int(batch["target_index"][b])
        ce_terms.append(-s_scores[y] / len(cands[y]))
        list_terms.append(9.0 * _kl(t_scores / 3.0, s_scores / 3.0))
        slot += len(cands)
    real = [(b, j) for b in range(2) for j in range(packed.lengths[b])]
    align = [
        torch.stack(
            [
                1 - F.cosine_similarity(outs[0].hidden_states[i + 1][b, j], outs[1].hidden_states[t + 1][b, j], 0)
                for b, j in real
            ]
        ).mean()
        for i, t in enumerate([1, 2])
    ]
    assert comp["kd"].item() == pytest.approx(torch.stack(jsd_terms).mean().item(), rel=1e-5)
    assert comp["ce"].item() == pytest.approx(torch.stack(ce_terms).mean().item(), rel=1e-5)
    assert comp["list_kd"].item() == pytest.approx(torch.stack(list_terms).mean().item(), rel=1e-4)
    assert comp["align_l0"].item() == pytest.approx(align[0].item(), rel=1e-5)
    assert comp["align_l1"].item() == pytest.approx(align[1].item(), rel=1e-5)
    # Padding positions do not count: garbage there changes nothing.
    for out in outs:
        for h in out.hidden_states:
            h[1, packed.lengths[1] :] = 1e4
    assert loss(outs[0], outs[1], batch)[1]["align"].item() == pytest.approx(comp["align"].item(), rel=1e-6)


def test_pointwise_student_equal_to_teacher_has_zero_kd_list_kd_and_align(pointwise_models):
    from layerwise_dist.losses import PointwiseDistillationLoss, packed_forward

    teacher, _, _ = pointwise_models
    for score in ("mean", "sum", "pmi"):
        batch = _packed_batch(score)[0]
        with torch.no_grad():
            out = packed_forward(teacher, batch["packed"])
        loss = PointwiseDistillationLoss(DistillConfig(), [0.25] * 4, [0, 1, 2, 3], 64, 64, score=score)
        total, comp = loss(out, out, batch)
        assert comp["kd"].item() == pytest.approx(0.0, abs=1e-6)
        assert comp["list_kd"].item() == pytest.approx(0.0, abs=1e-6)
        assert comp["align"].item() == pytest.approx(0.0, abs=1e-6)
        assert comp["ce"].item() > 0 and total.item() == pytest.approx(comp["ce"].item(), rel=1e-6)


def test_pointwise_gradients_reach_the_student_only(pointwise_models):
    from layerwise_dist.losses import PointwiseDistillationLoss, packed_forward

    teacher, student, layer_map = pointwise_models
    batch = _packed_batch("mean")[0]
    for model in (teacher, student):
        model.zero_grad(set_to_none=True)
        model.requires_grad_(True)
    try:
        # The teacher forward is deliberately run with autograd on: the loss must still detach it.
        t_out, s_out = packed_forward(teacher, batch["packed"]), packed_forward(student, batch["packed"])
        cfg = DistillConfig(kd_weight=1.0, list_kd_weight=1.0, align_weight=1.0)
        total, _ = PointwiseDistillationLoss(cfg, [0.5, 0.5], layer_map, 64, 64)(s_out, t_out, batch)
        total.backward()
        assert all(p.grad is None for p in teacher.parameters())
        for name, p in student.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        # Each term alone reaches the student's LM head (CE, KD, list KD) or its layers (alignment).
        for part in ("ce", "kd", "list_kd"):
            student.zero_grad(set_to_none=True)
            only = DistillConfig(ce_weight=0.0, kd_weight=0.0, list_kd_weight=0.0, align_weight=0.0)
            setattr(only, f"{part}_weight", 1.0)
            s_out = packed_forward(student, batch["packed"])
            PointwiseDistillationLoss(only, [0.5, 0.5], layer_map, 64, 64)(s_out, t_out, batch)[0].backward()
            assert student.lm_head.weight.grad.abs().sum() > 0, part
    finally:
        for model in (teacher, student):
            model.zero_grad(set_to_none=True)
            model.requires_grad_(False)


def test_pointwise_ce_and_kd_coincide_with_the_listwise_loss_on_prefix_plus_target(pointwise_models):
    """One user: pointwise CE is the listwise TaskCrossEntropy of ``prefix + target title`` (labels on the title);
    with the target as the only candidate, pointwise token KD is the listwise answer-masked KD of that sequence."""
    from layerwise_dist.losses import PointwiseDistillationLoss, packed_forward
    from layerwise_dist.pointwise import pack_candidates

    teacher, student, layer_map = pointwise_models
    prefixes, candidates, targets, _ = _pointwise_users()
    cfg = DistillConfig(kd_loss="forward_kl", temperature=2.0)
    for prefix, cands, y in zip(prefixes, candidates, targets.tolist()):
        title = cands[y]
        ids = torch.tensor([prefix + title])
        labels = torch.tensor([[-100] * len(prefix) + title])
        lm_batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
        with torch.no_grad():
            _, listwise = DistillationLoss(cfg, [0.5, 0.5], layer_map, 64, 64)(
                student(input_ids=ids, output_hidden_states=True),
                teacher(input_ids=ids, output_hidden_states=True),
                lm_batch,
            )
            for cand_set, target in ((cands, y), ([title], 0)):
                batch = {"packed": pack_candidates(prefix, cand_set), "target_index": torch.tensor([target])}
                _, pointwise = PointwiseDistillationLoss(cfg, [0.5, 0.5], layer_map, 64, 64)(
                    packed_forward(student, batch["packed"]), packed_forward(teacher, batch["packed"]), batch
                )
                assert pointwise["ce"].item() == pytest.approx(listwise["ce"].item(), rel=1e-5)
        assert pointwise["kd"].item() == pytest.approx(listwise["kd"].item(), rel=1e-5)  # target-only candidate set
        assert pointwise["list_kd"].item() == 0.0  # one candidate: both softmaxes are 1


def test_packed_forward_applies_the_lm_head_at_candidate_positions_only(pointwise_models):
    from layerwise_dist.losses import packed_forward, packed_logit_positions

    teacher, _, _ = pointwise_models
    packed = _packed_batch("pmi")[0]["packed"]
    seen = []
    handle = teacher.lm_head.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    try:
        with torch.no_grad():
            out = packed_forward(teacher, packed)
    finally:
        handle.remove()
    keep, index = packed_logit_positions(packed)
    u = int(keep.sum())
    assert seen == [(u, 64)] and tuple(out.logits.shape) == (u, PV)
    assert u < len(packed.token_target) < packed.input_ids.numel()
    assert len(out.hidden_states) == 5 and getattr(out, "raw_layer_outputs", False)
    # The kept logits are the ones of a full forward at those positions.
    with torch.no_grad():
        full = teacher(
            input_ids=packed.input_ids,
            attention_mask=packed.additive_attention_mask(torch.float32),
            position_ids=packed.position_ids,
        ).logits
    torch.testing.assert_close(out.logits, full[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits[index], full[packed.token_row, packed.token_pred_pos], rtol=1e-5, atol=1e-5)


def test_pointwise_loss_refuses_inconsistent_inputs(pointwise_models):
    from layerwise_dist.config import load_config
    from layerwise_dist.losses import PointwiseDistillationLoss, distillation_loss, packed_forward
    from layerwise_dist.models.tiny import tiny_llama

    teacher, _, _ = pointwise_models
    batch = _packed_batch("mean")[0]
    with torch.no_grad():
        out = packed_forward(teacher, batch["packed"])
    with pytest.raises(LossInputError, match="unconditional"):
        PointwiseDistillationLoss(DistillConfig(), [1.0], [0], 64, 64, score="pmi")(out, out, batch)
    pmi_batch = _packed_batch("pmi")[0]
    mean_loss = PointwiseDistillationLoss(DistillConfig(), [1.0], [0], 64, 64)
    with pytest.raises(LossInputError, match="scored_packed"):  # mean/sum distil the history group only
        mean_loss(out, out, pmi_batch)
    assert mean_loss.scored_packed(pmi_batch["packed"]).num_groups == 1
    assert (
        PointwiseDistillationLoss(DistillConfig(), [1.0], [0], 64, 64, "pmi").scored_packed(pmi_batch["packed"])
        is pmi_batch["packed"]
    )
    with pytest.raises(LossInputError, match="listwise option"):
        PointwiseDistillationLoss(DistillConfig(mask="all"), [1.0], [0], 64, 64)
    with pytest.raises(LossInputError, match="score must be one of"):
        PointwiseDistillationLoss(DistillConfig(), [1.0], [0], 64, 64, score="max")
    full = SimpleNamespace(logits=torch.zeros(2, 17, PV), hidden_states=out.hidden_states)
    with pytest.raises(LossInputError, match="packed_forward"):
        PointwiseDistillationLoss(DistillConfig(), [1.0], [0], 64, 64)(full, out, batch)
    with pytest.raises(LossInputError, match="out of range"):
        PointwiseDistillationLoss(DistillConfig(), [1.0], [0], 64, 64)(
            out, out, {**batch, "target_index": torch.tensor([3, 4])}
        )
    flash = tiny_llama(vocab_size=PV, num_layers=1, attn_implementation="eager")
    flash.config._attn_implementation = "flash_attention_2"
    with pytest.raises(LossInputError, match="sdpa"):
        packed_forward(flash, batch["packed"])
    # The factory follows data.formulation and data.pointwise_score.
    cfg = load_config("tiny", ["data.formulation=pointwise", "data.pointwise_score=pmi", "tracking.enabled=false"])
    made = distillation_loss(cfg, [1.0], [0], 64, 64)
    assert isinstance(made, PointwiseDistillationLoss) and made.score == "pmi"
    listwise = distillation_loss(load_config("tiny", ["tracking.enabled=false"]), [1.0], [0], 64, 64)
    assert type(listwise) is DistillationLoss


@pytest.mark.parametrize("score", ["mean", "sum", "pmi"])
def test_pointwise_list_loss_equals_its_definition_on_separate_sequences(pointwise_models, score):
    """Adaptation's title + list CE from one packed forward against C separate forwards per user."""
    from layerwise_dist.losses import PointwiseListLoss, packed_forward
    from layerwise_dist.pointwise import score_candidates_separately

    teacher, _, _ = pointwise_models
    loss = PointwiseListLoss(0.6, score=score)
    batch, prefixes, candidates, uncond = _packed_batch(score)
    with torch.no_grad():
        total, comp = loss(packed_forward(teacher, batch["packed"]).logits, batch["packed"], batch["target_index"])
        titles, lists = [], []
        for b, (prefix, cands) in enumerate(zip(prefixes, candidates)):
            y = int(batch["target_index"][b])
            z = _separate_token_logits(teacher, prefix, cands[y])
            lp = F.log_softmax(z.double(), -1).gather(-1, torch.tensor(cands[y])[:, None]).squeeze(-1)
            titles.append(-lp.mean())
            scores = score_candidates_separately(teacher, prefix, cands, score, uncond if score == "pmi" else None)
            lists.append(-F.log_softmax(scores.double(), -1)[y])
    title, listwise = torch.stack(titles).mean(), torch.stack(lists).mean()
    assert comp["title"].item() == pytest.approx(title.item(), rel=1e-4)
    assert comp["list"].item() == pytest.approx(listwise.item(), rel=1e-4)
    assert listwise.item() > 0.1  # the candidates are not all equally likely
    assert total.item() == pytest.approx((title + 0.6 * listwise).item(), rel=1e-4)


def test_pointwise_list_loss_gradients_and_errors():
    from layerwise_dist.losses import LossInputError, PointwiseListLoss, packed_forward
    from layerwise_dist.models.tiny import tiny_llama

    teacher = tiny_llama(vocab_size=PV, num_layers=2, seed=5)  # its own: the shared fixture is frozen by others
    teacher.config._attn_implementation = "sdpa"
    batch, *_ = _packed_batch("mean")
    total, _ = PointwiseListLoss(1.0)(packed_forward(teacher, batch["packed"]).logits, batch["packed"],
                                      batch["target_index"])  # fmt: skip
    total.backward()
    grad = teacher.model.layers[0].self_attn.q_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    teacher.zero_grad(set_to_none=True)
    with pytest.raises(LossInputError, match="unconditional group"):
        PointwiseListLoss(1.0, "pmi")(torch.zeros(1, PV), batch["packed"], batch["target_index"])
    with pytest.raises(LossInputError, match=">= 0"):
        PointwiseListLoss(-1.0)
    with pytest.raises(LossInputError, match="out of range"):
        with torch.no_grad():
            logits = packed_forward(teacher, batch["packed"]).logits
        PointwiseListLoss(1.0)(logits, batch["packed"], batch["target_index"] + 100)


@pytest.mark.parametrize("mask_supported", [True, False])
@pytest.mark.parametrize("kd_loss", ["forward_kl", "jsd"])
def test_listwise_answer_only_logits_give_the_full_path_losses_and_gradients(monkeypatch, mask_supported, kd_loss):
    """distill.mask=answer: the LM heads run at the answer positions only (``listwise_forward``); CE, KD,
    alignment, the total and every student gradient equal the full [B, T, V] path (1e-6), on both
    transformers paths of ``forward_keeping`` (boolean mask and 1D positions)."""
    from fisher_worker import make_batches

    import layerwise_dist.heads as heads
    from layerwise_dist.losses import expose_layer_outputs, listwise_forward
    from layerwise_dist.models.tiny import tiny_llama

    monkeypatch.setattr(heads, "_mask_logits_to_keep_supported", lambda: mask_supported)
    teacher = tiny_llama(vocab_size=256, num_layers=4, hidden=32, seed=1).eval()
    student = tiny_llama(vocab_size=256, num_layers=2, hidden=32, seed=2).double()
    teacher = teacher.double()
    for m in (teacher, student):
        expose_layer_outputs(m)
    batch = make_batches(6, 3, seed=5)[0]
    keep = shifted_label_mask(batch["labels"])
    assert 0 < int(keep.sum()) < keep.numel() // 4  # a few answer tokens among many prompt tokens
    cfg = DistillConfig(ce_weight=0.7, kd_weight=1.3, align_weight=0.5, kd_loss=kd_loss, temperature=2.0)
    loss = DistillationLoss(cfg, [0.4, 0.6], layer_map=[1, 3], student_dim=32, teacher_dim=32)

    def run(mask: str) -> tuple:
        student.zero_grad()
        with torch.no_grad():
            t_out = listwise_forward(teacher, batch, mask)
        s_out = listwise_forward(student, batch, mask)
        total, comp = loss(s_out, t_out, batch)
        total.backward()
        return s_out.logits.shape, total.detach(), comp, {n: p.grad.clone() for n, p in student.named_parameters()}

    full_shape, full_total, full_comp, full_grads = run("all")
    kept_shape, kept_total, kept_comp, kept_grads = run("answer")
    assert full_shape == (*batch["input_ids"].shape, 256) and kept_shape == (int(keep.sum()), 256)
    torch.testing.assert_close(kept_total, full_total, rtol=1e-6, atol=1e-6)
    for name in full_comp:
        torch.testing.assert_close(kept_comp[name], full_comp[name], rtol=1e-6, atol=1e-6)
    assert full_comp["kd"] > 0 and full_comp["ce"] > 0
    for name, grad in full_grads.items():
        torch.testing.assert_close(kept_grads[name], grad, rtol=1e-6, atol=1e-9, msg=name)


def test_answer_position_logits_need_the_answer_mask_and_the_right_rows():
    batch = _batch()
    count = int(shifted_label_mask(batch["labels"]).sum())
    kept = SimpleNamespace(logits=torch.randn(count, V), hidden_states=None)
    loss = DistillationLoss(DistillConfig(mask="all"), [], layer_map=[], student_dim=8, teacher_dim=8)
    with pytest.raises(LossInputError, match="mask='all'"):
        loss(kept, kept, batch)
    loss = DistillationLoss(DistillConfig(), [], layer_map=[], student_dim=8, teacher_dim=8)
    short = SimpleNamespace(logits=torch.randn(count - 1, V), hidden_states=None)
    with pytest.raises(LossInputError, match=f"U = {count} answer positions"):
        loss(short, kept, batch)
    total, comp = loss(kept, kept, batch)  # identical answer logits: no KD, CE only
    assert comp["kd"].item() == pytest.approx(0.0, abs=1e-6) and total.item() == pytest.approx(comp["ce"].item())
