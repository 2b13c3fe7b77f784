"""Every stage on more than Llama: tiny random Gemma3, Qwen2 and Qwen3 models beside the tiny Llama.

Per architecture: the parameter- and activation-form Fisher against their brute-force definitions, the
student built from chosen layers against the teacher's own computation with the other layers bypassed
(so sliding/global attention, rotary bases and per-layer config lists must follow the chosen layers),
save/reload with ``from_pretrained``, and distillation steps that lower the loss. Plus the one-line
errors for a model whose decoder layers cannot be located and for an unknown per-layer config list.
"""

from __future__ import annotations

import pytest
import torch
from fisher_worker import make_batches
from torch import nn
from transformers import AutoModelForCausalLM

from layerwise_dist.config import DistillConfig
from layerwise_dist.fisher import compute_fisher_profile, decoder_layers
from layerwise_dist.fisher.hooks import has_sandwich_norms
from layerwise_dist.losses import DistillationLoss, expose_layer_outputs
from layerwise_dist.models.student import (
    StudentError,
    build_student,
    decoder_layers_path,
    load_layer_map,
)
from layerwise_dist.models.tiny import TINY_SLIDING_WINDOW, tiny_model

ARCHS = ("llama", "gemma3", "qwen2", "qwen3")
# Chosen layers per architecture: a mix of sliding and full attention, with a gap (skipped layers).
CHOSEN = {"llama": [0, 2], "gemma3": [1, 2, 4], "qwen2": [0, 3], "qwen3": [1, 3]}


def _model(arch: str):
    return tiny_model(arch, num_layers=6 if arch == "gemma3" else 4, seed=0)


@pytest.fixture(scope="module")
def batches():
    out = make_batches(6, 3, seed=1)
    assert max(b["input_ids"].shape[1] for b in out) > TINY_SLIDING_WINDOW  # the window matters
    return out


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(3, 256, (2, 11), generator=torch.Generator().manual_seed(0))


def _attention_param(layer: nn.Module, name: str) -> bool:
    """Brute-force grouping, written out: attention = self_attn.* + the norm(s) around attention."""
    around_attention = ["input_layernorm."]
    if has_sandwich_norms(layer):  # Gemma: post_attention_layernorm normalises the attention output
        around_attention.append("post_attention_layernorm.")
    return name.startswith(("self_attn.", *around_attention))


def _brute_parameter(model, batches):
    """(1/N) sum_n ||d log p_n / d theta_l||^2 per layer and attention/MLP group, by per-example autograd."""
    from layerwise_dist.fisher import answer_log_probs

    layers = decoder_layers(model)
    total = torch.zeros(len(layers), 2, dtype=torch.float64)
    n = 0
    for p in model.parameters():
        p.requires_grad_(True)
    for batch in batches:
        logp = answer_log_probs(model, batch)
        for i in range(logp.shape[0]):
            for idx, layer in enumerate(layers):
                named = list(layer.named_parameters())
                grads = torch.autograd.grad(logp[i], [p for _, p in named], retain_graph=True)
                for (name, _), g in zip(named, grads):
                    total[idx, 0 if _attention_param(layer, name) else 1] += g.double().pow(2).sum()
            n += 1
    return total / n


def _brute_activation(model, batches):
    from layerwise_dist.fisher import answer_log_probs

    layers = decoder_layers(model)
    fisher = torch.zeros(len(layers), dtype=torch.float64)
    n = 0
    for p in model.parameters():
        p.requires_grad_(True)
    for batch in batches:
        outs = {}

        def keep(idx, outs=outs):
            def hook(module, args, kwargs, output):
                outs[idx] = output[0] if isinstance(output, tuple) else output

            return hook

        handles = [layer.register_forward_hook(keep(i), with_kwargs=True) for i, layer in enumerate(layers)]
        try:
            logp = answer_log_probs(model, batch)
        finally:
            for h in handles:
                h.remove()
        for i in range(logp.shape[0]):
            grads = torch.autograd.grad(logp[i], [outs[j] for j in range(len(layers))], retain_graph=True)
            for j, g in enumerate(grads):
                fisher[j] += g.double().pow(2).sum()
            n += 1
    return fisher / n


def _close(actual, expected, rtol=1e-4):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64), expected, rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_fisher_equals_brute_force(arch, batches):
    expected = _brute_parameter(_model(arch), batches)
    assert (expected > 0).all(), expected  # every layer and group receives gradient
    for method in ("gram", "explicit"):
        prof = compute_fisher_profile(_model(arch), batches, "parameter", progress=False, linear_method=method)
        _close(prof.scores, expected.sum(1))
        _close(prof.module_scores["attention"], expected[:, 0])
        _close(prof.module_scores["mlp"], expected[:, 1])


@pytest.mark.parametrize("arch", ARCHS)
def test_activation_fisher_equals_brute_force(arch, batches):
    expected = _brute_activation(_model(arch), batches)
    prof = compute_fisher_profile(_model(arch), batches, "activation", progress=False)
    _close(prof.scores, expected)
    assert prof.num_examples == 6 and len(prof.block_influence) == len(expected)


def _bypassed_forward(teacher, keep: list[int], input_ids):
    """Oracle: the teacher's own forward (its masks and rotary tables per layer type) with every layer not in
    ``keep`` replaced by the identity; ``keep`` is increasing, so this is exactly the chosen-layer computation."""

    def identity(module, args, kwargs, output):
        h = args[0] if args else kwargs["hidden_states"]
        return (h, *output[1:]) if isinstance(output, tuple) else h

    layers = decoder_layers(teacher)
    handles = [
        layer.register_forward_hook(identity, with_kwargs=True) for i, layer in enumerate(layers) if i not in keep
    ]
    try:
        with torch.no_grad():
            return teacher(input_ids=input_ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("arch", ARCHS)
def test_student_equals_chosen_layer_computation_and_reloads(arch, input_ids, tmp_path):
    teacher = _model(arch)
    chosen = CHOSEN[arch]
    student, layer_map = build_student(teacher, chosen)
    assert layer_map == chosen and student.config.num_hidden_layers == len(chosen)
    assert type(student) is type(teacher)
    types = getattr(teacher.config, "layer_types", None)
    if arch != "llama":
        assert student.config.layer_types == [types[t] for t in chosen]
        assert len(set(student.config.layer_types)) == 2  # both kinds of attention survive in this choice
    student.eval()
    with torch.no_grad():
        logits = student(input_ids=input_ids, use_cache=False).logits
    oracle = _bypassed_forward(teacher, chosen, input_ids)
    torch.testing.assert_close(logits, oracle, rtol=1e-5, atol=1e-5)

    if arch != "llama":  # the test can fail: the teacher's first layer types instead of the chosen ones differ
        wrong_cfg = student.config.__class__.from_dict(
            {**student.config.to_dict(), "layer_types": types[: len(chosen)]}
        )
        assert wrong_cfg.layer_types != student.config.layer_types
        wrong = type(teacher)(wrong_cfg).eval()
        wrong.load_state_dict(student.state_dict())
        with torch.no_grad():
            assert not torch.allclose(wrong(input_ids=input_ids, use_cache=False).logits, oracle, atol=1e-4)

    student.save_pretrained(tmp_path / "student")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    assert type(reloaded) is type(teacher)
    assert getattr(reloaded.config, "layer_types", None) == getattr(student.config, "layer_types", None)
    assert load_layer_map(tmp_path / "student") == chosen
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids, use_cache=False).logits, logits, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_distillation_steps_lower_the_loss(arch, batches):
    teacher = _model(arch)
    teacher.requires_grad_(False)
    student, layer_map = build_student(teacher, CHOSEN[arch])
    for m in (teacher, student):
        expose_layer_outputs(m)
    hidden = teacher.config.hidden_size
    loss_fn = DistillationLoss(DistillConfig(), [1 / len(layer_map)] * len(layer_map), layer_map, hidden, hidden)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    batch = batches[0]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    with torch.no_grad():
        teacher_out = teacher(**inputs, output_hidden_states=True)
    totals = []
    for _ in range(4):
        total, comp = loss_fn(student(**inputs, output_hidden_states=True), teacher_out, batch)
        opt.zero_grad()
        total.backward()
        grads = [p.grad for p in student.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        opt.step()
        totals.append(total.item())
    assert comp["kd"] >= 0 and all(t == t for t in totals)
    assert totals[-1] < totals[0], totals


def test_unlocatable_decoder_layers_is_one_line_error():
    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Cfg", (), {"num_hidden_layers": 3})()
            self.stack = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))  # 2 blocks, config says 3

    with pytest.raises(StudentError) as err:
        decoder_layers_path(Blocks())
    message = str(err.value)
    assert "\n" not in message and "cannot locate the decoder layers of Blocks" in message
    assert "num_hidden_layers=3" in message and "model.layers" in message
    with pytest.raises(ValueError, match="cannot locate the decoder layers"):
        compute_fisher_profile(Blocks(), [], progress=False)
    assert decoder_layers_path(_model("gemma3")) == "model.layers"


def test_unknown_per_layer_config_list_is_refused():
    teacher = _model("qwen3")
    teacher.config.per_layer_mystery = [1, 2, 3, 4]
    with pytest.raises(StudentError, match="config.per_layer_mystery .* one entry per teacher layer"):
        build_student(teacher, [0, 2])
    del teacher.config.per_layer_mystery
    student, _ = build_student(teacher, [0, 1, 2, 3])  # all layers: nothing to carry over
    assert student.config.num_hidden_layers == 4


def test_qwen_window_threshold_follows_the_chosen_layers():
    teacher = _model("qwen2")  # layers 0,1 full, 2,3 sliding (max_window_layers=2)
    student, _ = build_student(teacher, [1, 2, 3])
    assert student.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert student.config.max_window_layers == 1
    assert [layer.self_attn.sliding_window for layer in student.model.layers] == [None, 4, 4]


@pytest.mark.parametrize("arch", ["gemma3", "qwen2"])
def test_nf4_teacher_fisher_and_student_equal_the_dequantized_model(arch, batches, input_ids, tmp_path):
    """A 4-bit NF4 teacher: the Gram-trick Fisher equals the brute force on an fp32 model holding the dequantized
    weights, and the student built from the 4-bit teacher computes what that model's chosen layers compute."""
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    _model(arch).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_quant_storage=torch.float32,
    )
    q4 = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, dtype=torch.float32).eval()
    ref = _model(arch)
    ref_modules = dict(ref.named_modules())
    n4 = 0
    for name, mod in q4.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float()
            ref_modules[name].weight.data.copy_(w.reshape_as(ref_modules[name].weight))
            n4 += 1
    assert n4 == 7 * len(decoder_layers(q4))
    prof = compute_fisher_profile(q4, batches[:1], "parameter", progress=False, linear_method="gram")
    expected = _brute_parameter(ref, batches[:1])
    _close(prof.scores, expected.sum(1))
    _close(prof.module_scores["attention"], expected[:, 0])

    chosen = CHOSEN[arch]
    student, _ = build_student(q4, chosen)
    student.eval()
    with torch.no_grad():
        logits = student(input_ids=input_ids, use_cache=False).logits
    torch.testing.assert_close(logits, _bypassed_forward(ref, chosen, input_ids), rtol=1e-4, atol=1e-4)


def test_recommend_with_a_gemma3_student(tmp_path):
    """recommend() serves a student built from a Gemma3 teacher's layers (saved, loaded by folder name)."""
    import math

    from layerwise_dist.config import TeacherConfig
    from layerwise_dist.models.teacher import resolve_model_dir
    from layerwise_dist.recommender import BaseRecommender

    teacher_dir = resolve_model_dir(TeacherConfig(model="tiny:gemma3"))
    student, _ = build_student(teacher_dir, [0, 1])
    student.save_pretrained(tmp_path / "student")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(tmp_path / "student")
    rec = BaseRecommender(model_name=str(tmp_path / "student"), quantization="none")
    assert type(rec.model).__name__ == "Gemma3ForCausalLM"
    user = next(iter(rec.data["All_Beauty"].train))
    out = rec.recommend(user, category="All_Beauty", top_k=3)
    assert len(out) == 3 and all(r["title"] and math.isfinite(r["score"]) for r in out)
    assert [r["score"] for r in out] == sorted((r["score"] for r in out), reverse=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_pointwise_scores_respect_sliding_windows(arch):
    """Pointwise scoring packs a user's prefix and every candidate into one row under a custom mask; with
    sliding-window layers (window 4 here, prompts of 9+ tokens) each layer type gets its own mask, so packed
    scores equal one ordinary forward per candidate, for the scorer and for the distillation forward."""
    from layerwise_dist.losses import packed_forward, packed_logit_positions
    from layerwise_dist.pointwise import pack_candidates_batch, score_candidates, score_candidates_separately

    model = _model(arch)
    gen = torch.Generator().manual_seed(3)
    prefix = torch.randint(3, 256, (9,), generator=gen).tolist()
    cands = [torch.randint(3, 256, (k,), generator=gen).tolist() for k in (2, 3, 5)]
    packed = score_candidates(model, prefix, cands, "sum")
    separate = score_candidates_separately(model, prefix, cands, "sum")
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-5)

    batch = pack_candidates_batch([prefix], [cands])
    keep, index = packed_logit_positions(batch)
    with torch.no_grad():
        logits = packed_forward(model, batch).logits.reshape(-1, model.config.vocab_size)
        first = torch.log_softmax(model(input_ids=torch.tensor([prefix])).logits[0, -1], -1)
    # The prefix's last position predicts every candidate's first token: the same distribution as alone.
    torch.testing.assert_close(torch.log_softmax(logits[index[0]], -1), first, rtol=1e-5, atol=1e-5)
