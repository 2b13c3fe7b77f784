"""The offline teacher cache: the losses it gives equal the online teacher's (exactly, with fp32 hidden states and
k = V; a lower bound of the KD term with k < V), per-example storage survives any batch composition, and a cache
that does not match the run is refused."""

from __future__ import annotations

import math

import pytest
import torch

from layerwise_dist.config import DistillConfig, load_config
from layerwise_dist.losses import ForwardKLLoss, JSDLoss, ReverseKLLoss, distillation_loss
from layerwise_dist.teacher_cache import CachedLogits, CacheError, TeacherCache, student_binned


@pytest.mark.parametrize("kd", [ForwardKLLoss(2.0), ReverseKLLoss(2.0), JSDLoss(0.5, 2.0)], ids=["fkl", "rkl", "jsd"])
def test_binned_kd_is_the_full_kd_at_k_equal_v_and_a_lower_bound_below(kd):
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(7, 50, generator=gen) * 3, torch.randn(7, 50, generator=gen) * 3
    every = torch.ones(1, 7, dtype=torch.bool)
    full = kd(s[None], t[None], every)

    def binned(k: int) -> torch.Tensor:
        cached = CachedLogits.from_logits(t, k, 2.0)
        return kd((2.0 * student_binned(s, cached))[None], (2.0 * cached.binned())[None], every)

    torch.testing.assert_close(binned(50), full, rtol=1e-5, atol=1e-6)
    small = [binned(k).item() for k in (1, 5, 20, 49)]
    assert all(b <= full.item() + 1e-6 for b in small)  # coarse-graining never adds divergence
    assert small == sorted(small)  # more bins, closer to the full KD
    cached = CachedLogits.from_logits(t, 5, 2.0)
    mass = cached.binned().exp().sum(-1)
    torch.testing.assert_close(mass, torch.ones(7), rtol=1e-5, atol=1e-6)


def _tiny(formulation: str) -> tuple:
    from layerwise_dist.data import build_examples, load_splits, tokenize_examples
    from layerwise_dist.losses import expose_layer_outputs
    from layerwise_dist.models.student import build_student
    from layerwise_dist.models.teacher import load_teacher, load_tokenizer, resolve_model_dir

    cfg = load_config(
        "tiny", [f"data.formulation={formulation}", "teacher.placement=replicate", "teacher.attn_implementation=sdpa"]
    )
    tok = load_tokenizer(cfg.teacher)
    data = tokenize_examples(build_examples(load_splits(cfg.data), "train", cfg.data, tok)[:6], tok, cfg.data)
    teacher = load_teacher(cfg.teacher).eval()
    student, layer_map = build_student(resolve_model_dir(cfg.teacher), [1, 3])
    for m in (teacher, student):
        m.config._attn_implementation = "sdpa"
        expose_layer_outputs(m)
    return cfg, tok, data, teacher, student, layer_map


def _batch(data, indices, tok, loss):
    from layerwise_dist.data.sampler import load_batch

    batch = load_batch(data, indices, tok.pad_token_id)
    if "packed" in batch:
        batch = {**batch, "packed": loss.scored_packed(batch["packed"])}
    return batch


def _student_out(student, batch):
    from layerwise_dist.losses import listwise_forward, packed_forward

    if "packed" in batch:
        return packed_forward(student, batch["packed"])
    return listwise_forward(student, batch, "answer")


@pytest.mark.parametrize("full", [True, False], ids=["full_vocab", "topk_V"])
@pytest.mark.parametrize("formulation", ["listwise", "pointwise"])
def test_cached_teacher_gives_the_online_losses_and_gradients(tmp_path, formulation, full):
    """fp32 storage, full-vocabulary logits (cache_topk=0) or top-k with k = V: every loss term and every student
    gradient from the cache equals the online teacher's (1e-5), on a batch composed differently from the ones
    the cache was built from."""
    cfg, tok, data, teacher, student, layer_map = _tiny(formulation)
    vocab = teacher.config.vocab_size
    cfg.distill.align_weight = 1.0
    loss = distillation_loss(cfg, [0.5, 0.5], layer_map, 64, 64)
    topk = 0 if full else vocab
    cache = TeacherCache(tmp_path, layer_map, 4, topk, cfg.distill.temperature, formulation, "tiny", "fp32").open()
    built = [[0, 1], [2, 3], [4, 5]]
    stats = cache.build(teacher, ((g, _batch(data, g, tok, loss)) for g in built), 64, progress=False)
    assert stats["examples"] == 6 and stats["bytes"] > 0 and cache.missing(range(6)) == []
    estimate = sum(cache.estimate_bytes(_batch(data, g, tok, loss), 64, vocab) for g in built)
    assert 0.8 < stats["bytes"] / estimate < 1.25  # the size printed before writing is the size written

    for indices in ([5, 0, 3], [2]):
        batch = _batch(data, indices, tok, loss)
        with torch.no_grad():
            online = cache.teacher_outputs(teacher, batch)
        cached = cache.outputs(indices, batch)
        assert isinstance(cached.logits, torch.Tensor) == full
        assert [h is None for h in cached.hidden_states] == [i - 1 not in layer_map for i in range(5)]
        results = []
        for teacher_out in (online, cached):
            student.zero_grad()
            total, parts = loss(_student_out(student, batch), teacher_out, batch)
            total.backward()
            results.append((total.detach(), parts, {n: p.grad.clone() for n, p in student.named_parameters()}))
        (t_on, p_on, g_on), (t_ca, p_ca, g_ca) = results
        torch.testing.assert_close(t_ca, t_on, rtol=1e-5, atol=1e-5)
        for name in p_on:
            torch.testing.assert_close(p_ca[name], p_on[name], rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        assert p_on["kd"] > 0 and p_on["align"] > 0
        for name, grad in g_on.items():
            torch.testing.assert_close(g_ca[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_small_topk_and_bf16_stay_close_and_below_the_online_kd(tmp_path):
    cfg, tok, data, teacher, student, layer_map = _tiny("pointwise")
    loss = distillation_loss(cfg, [0.5, 0.5], layer_map, 64, 64)
    cache = TeacherCache(tmp_path, layer_map, 4, 8, cfg.distill.temperature, "pointwise", "tiny").open()
    batch = _batch(data, [0, 1], tok, loss)
    cache.build(teacher, [([0, 1], batch)], 64, progress=False)
    with torch.no_grad():
        student_out = _student_out(student, batch)
        _, online = loss(student_out, cache.teacher_outputs(teacher, batch), batch)
        _, cached = loss(student_out, cache.outputs([0, 1], batch), batch)
    assert cached["kd"] <= online["kd"] + 1e-6
    for name in ("ce", "list_kd"):  # exact: the cache keeps the teacher's candidate-token log-probs in fp32
        torch.testing.assert_close(cached[name], online[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached["align"], online["align"], rtol=2e-2, atol=1e-4)  # bf16 hidden states

    # The default: full-vocabulary logits in bf16: KD as online, up to bf16's rounding of the logits.
    full = TeacherCache(tmp_path / "full", layer_map, 4, 0, cfg.distill.temperature, "pointwise", "tiny").open()
    full.build(teacher, [([0, 1], batch)], 64, progress=False)
    assert full.outputs([0, 1], batch).logits.dtype == torch.float32
    with torch.no_grad():
        _, from_full = loss(student_out, full.outputs([0, 1], batch), batch)
    torch.testing.assert_close(from_full["kd"], online["kd"], rtol=2e-2, atol=1e-4)
    assert abs(from_full["kd"] - online["kd"]) < abs(cached["kd"] - online["kd"]) or cached["kd"] == online["kd"]


def test_a_cache_that_does_not_match_the_run_is_refused(tmp_path):
    cfg, tok, data, teacher, student, layer_map = _tiny("listwise")
    loss = distillation_loss(cfg, [0.5, 0.5], layer_map, 64, 64)
    args = (tmp_path, layer_map, 4, 16, 2.0, "listwise", "tiny")
    cache = TeacherCache(*args).open()
    cache.build(teacher, [([0, 1], _batch(data, [0, 1], tok, loss))], 64, progress=False)
    with pytest.raises(CacheError, match="other settings"):
        TeacherCache(tmp_path, layer_map, 4, 32, 2.0, "listwise", "tiny").open()
    with pytest.raises(CacheError, match="aligns to"):
        TeacherCache(tmp_path, [0], 4, 16, 2.0, "listwise", "tiny").open()
    with pytest.raises(CacheError, match="no outputs for examples \\[2\\]"):
        cache.outputs([0, 2], _batch(data, [0, 2], tok, loss))
    with pytest.raises(CacheError, match="other tokens"):  # example 0's file read for example 3's tokens
        cache.path(3).write_bytes(cache.path(0).read_bytes())
        cache.outputs([3], _batch(data, [3], tok, loss))
    with pytest.raises(CacheError, match="outside the teacher"):
        TeacherCache(tmp_path / "x", [4], 4, 16, 2.0, "listwise", "tiny")
    cache.path(3).write_bytes(cache.path(0).read_bytes()[:100])  # truncated: one line naming the file
    with pytest.raises(CacheError, match="3.safetensors is corrupt"):
        cache.outputs([3], _batch(data, [3], tok, loss))
    (tmp_path / "file").write_text("x")
    with pytest.raises(CacheError, match="is a file, not a folder"):
        TeacherCache(tmp_path / "file", [0], 4, 16, 2.0, "listwise", "tiny").open()
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match="unreadable"):
        TeacherCache(*args).open()
    cached = cache.outputs([1], _batch(data, [1], tok, loss))
    bad = DistillConfig(temperature=1.0)
    with pytest.raises(ValueError, match="temperature 2.0"):
        type(loss)(bad, [0.5, 0.5], layer_map, 64, 64)(
            _student_out(student, _batch(data, [1], tok, loss)), cached, _batch(data, [1], tok, loss)
        )
    assert math.isfinite(float(cached.logits.tail.max()))


def test_a_teacher_folder_is_known_by_its_contents_not_its_path(tmp_path, monkeypatch):
    """The cache key of a local teacher (an adapted, merged one) survives another working directory or a moved
    output folder, and changes when the weights change in place (a teacher adapted again into the same folder)."""
    import shutil

    import safetensors.torch
    import torch

    from layerwise_dist.config import TeacherConfig
    from layerwise_dist.recipes.distill import teacher_identity

    a = tmp_path / "run" / "adapt" / "merged"
    a.mkdir(parents=True)
    (a / "config.json").write_text('{"num_hidden_layers": 2}')
    (a / "tokenizer.json").write_text("{}")
    weights = {"w": torch.randn(300_000), "b": torch.randn(17)}
    safetensors.torch.save_file(weights, a / "model.safetensors")
    monkeypatch.chdir(tmp_path)
    relative = teacher_identity(TeacherConfig(model="run/adapt/merged"))
    assert relative == teacher_identity(TeacherConfig(model=str(a)))  # absolute or relative: one key
    b = tmp_path / "moved" / "merged"
    shutil.copytree(a, b)
    assert teacher_identity(TeacherConfig(model=str(b))) == relative
    (b / "tokenizer.json").write_text('{"x": 1}')  # not weights nor config: the same teacher
    assert teacher_identity(TeacherConfig(model=str(b))) == relative
    weights["w"][150_000] += 1.0  # trained again (one weight changed: this small file is read whole)
    safetensors.torch.save_file(weights, b / "model.safetensors")
    assert teacher_identity(TeacherConfig(model=str(b))) != relative
    assert teacher_identity(TeacherConfig(model=str(a), quantization="none")) != relative
    assert teacher_identity(TeacherConfig(model="smollm2-135m")).startswith("smollm2-135m|")
