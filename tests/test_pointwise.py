"""Pointwise title-likelihood scoring: template, packing mask, packed == separate forwards."""

from __future__ import annotations

import pytest
import torch

from layerwise_dist.models.tiny import tiny_llama
from layerwise_dist.pointwise import (
    candidate_continuation,
    pack_candidates,
    pack_candidates_batch,
    render_history_prefix,
    score_candidates,
    score_candidates_batch,
    score_candidates_separately,
    tokenize_pointwise,
    unconditional_prefix,
)

ATOL = 1e-5
MODES = ["mean", "sum", "pmi"]


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def model(request):
    return tiny_llama(num_layers=3, hidden=64, seed=1, attn_implementation=request.param)


@pytest.fixture(scope="module")
def user():
    """A prefix of 19 tokens, the unconditional prefix (6), 5 candidates of 1 to 9 tokens."""
    prefix = _ids(19, 0)
    unconditional = _ids(6, 1)
    candidates = [_ids(n, 10 + i) for i, n in enumerate([3, 1, 9, 5, 1])]
    return prefix, unconditional, candidates


# --------------------------------------------------------------------------- text


def test_template_exact():
    text = render_history_prefix(["Zelda  Breath\nof the Wild", "Mario Kart 8"], "video games")
    assert text == (
        "Video games a customer bought, oldest first:\n"
        "- Zelda Breath of the Wild\n"
        "- Mario Kart 8\n"
        "The next video game the customer bought:\n-"
    )
    assert candidate_continuation("  Halo \t 3 ") == " Halo 3\n"
    assert render_history_prefix(["a", "b", "c"], "beauty products", max_history=2).splitlines() == [
        "Beauty products a customer bought, oldest first:",
        "- b",
        "- c",
        "The next beauty product the customer bought:",
        "-",
    ]
    assert render_history_prefix(["a"], max_history=0) == unconditional_prefix()
    assert unconditional_prefix("glasses", item_phrase="pair of glasses") == (
        "Glasses a customer bought, oldest first:\nThe next pair of glasses the customer bought:\n-"
    )
    with pytest.raises(ValueError, match="candidate title is empty"):
        candidate_continuation(" \n ")
    with pytest.raises(ValueError, match="history title 1 is empty"):
        render_history_prefix(["ok", ""])


class _CharTokenizer:
    """One id per character, plus a BOS (id 1) when special tokens are asked for."""

    def __call__(self, text: str, add_special_tokens: bool = True):
        ids = [ord(ch) % 250 + 3 for ch in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_tokenize_pointwise_separates_prefix_and_continuations():
    prefix, cands = tokenize_pointwise(_CharTokenizer(), "ab\n-", ["x", "yz"])
    assert prefix == [1, ord("a") + 3, ord("b") + 3, ord("\n") + 3, ord("-") + 3]
    assert cands == [[ord(" ") + 3, ord("x") + 3, ord("\n") + 3], [ord(" ") + 3, ord("y") + 3, ord("z") + 3, 13]]


# --------------------------------------------------------------------------- packing


def test_pack_block_structure():
    # prefix p0 p1 p2 | cand A: a0 a1 | cand B: b0 | cand C: c0 c1 c2
    packed = pack_candidates([11, 12, 13], [[21, 22], [31], [41, 42, 43]], pad_id=0)
    assert packed.input_ids.tolist() == [[11, 12, 13, 21, 22, 31, 41, 42, 43]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 3, 4, 5]]
    m = packed.attention_mask
    assert m.shape == (1, 1, 9, 9) and m.dtype == torch.bool
    m = m[0, 0]
    expected = torch.zeros(9, 9, dtype=torch.bool)
    for q in range(3):
        expected[q, : q + 1] = True  # prefix: causal over the prefix
    for start, n in [(3, 2), (5, 1), (6, 3)]:
        for k in range(n):
            expected[start + k, :3] = True  # whole prefix
            expected[start + k, start : start + k + 1] = True  # own earlier tokens and itself
    assert torch.equal(m, expected)
    # A few entries spelled out: a1 sees a0, not b0; c2 sees c0 but not a0/a1/b0; p1 does not see p2.
    assert m[4, 3] and not m[5, 3] and m[8, 6] and not m[8, 3] and not m[8, 5] and not m[1, 2] and m[8, 2]
    # First candidate token predicted from the last prefix position, the others from the previous one.
    assert packed.token_pred_pos.tolist() == [2, 3, 2, 2, 6, 7]
    assert packed.token_target.tolist() == [21, 22, 31, 41, 42, 43]
    assert packed.token_slot.tolist() == [0, 0, 1, 2, 2, 2]
    assert packed.num_tokens == 9
    add = packed.additive_attention_mask(torch.float32)[0, 0]
    assert add[4, 3] == 0 and add[5, 3] == torch.finfo(torch.float32).min


def test_pack_batch_padding_and_unconditional_group():
    packed = pack_candidates_batch([[5, 6], [7]], [[[8], [9, 10]], [[11]]], pad_id=0, unconditional_prefix_ids=[3])
    # row 0: 5 6 | 8 | 9 10 || 3 | 8 | 9 10  (length 9); row 1: 7 | 11 || 3 | 11, padded to 9
    assert packed.lengths == [9, 4]
    assert packed.input_ids.tolist() == [[5, 6, 8, 9, 10, 3, 8, 9, 10], [7, 11, 3, 11, 0, 0, 0, 0, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 2, 3, 0, 1, 1, 2], [0, 1, 0, 1, 0, 0, 0, 0, 0]]
    m = packed.attention_mask[:, 0]
    # The unconditional group never sees the history group, and vice versa.
    assert not m[0, 5:, :5].any() and not m[0, :5, 5:].any()
    assert m[0, 8].tolist() == [False] * 5 + [True, False, True, True]
    # Padding attends only to itself and nobody attends to padding.
    assert torch.equal(m[1, 4:, :], torch.eye(9, dtype=torch.bool)[4:])
    assert not m[1, :4, 4:].any()
    assert packed.slot_row.tolist() == [0, 0, 0, 0, 1, 1]
    assert packed.slot_group.tolist() == [0, 0, 1, 1, 0, 1]
    assert packed.slot_candidate.tolist() == [0, 1, 0, 1, 0, 0]
    assert packed.token_pred_pos.tolist() == [1, 1, 3, 5, 5, 7, 0, 2]


@pytest.mark.parametrize(
    ("prefix", "candidates", "match"),
    [
        ([1, 2], [], "candidates list is empty"),
        ([1, 2], [[3], []], "candidate 1 has no tokens"),
        ([], [[3]], "prefix has no tokens"),
    ],
)
def test_pack_errors(prefix, candidates, match):
    with pytest.raises(ValueError, match=match):
        pack_candidates(prefix, candidates)


def test_score_errors(model, user):
    prefix, unconditional, cands = user
    with pytest.raises(ValueError, match="candidates list is empty"):
        score_candidates(model, prefix, [])
    with pytest.raises(ValueError, match="candidate 0 has no tokens"):
        score_candidates(model, prefix, [[], [5]])
    with pytest.raises(ValueError, match="candidates list is empty"):
        score_candidates_separately(model, prefix, [])
    with pytest.raises(ValueError, match="needs unconditional_prefix_ids"):
        score_candidates(model, prefix, cands, mode="pmi")
    with pytest.raises(ValueError, match="unknown pointwise score mode"):
        score_candidates(model, prefix, cands, mode="max")
    with pytest.raises(ValueError, match="2 prefixes but 1 candidate lists"):
        score_candidates_batch(model, [prefix, prefix], [cands])


def test_unsupported_attention_refused(user):
    prefix, _, cands = user
    m = tiny_llama(num_layers=1, hidden=32, seed=0)
    m.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation"):
        score_candidates(m, prefix, cands)


# --------------------------------------------------------------------------- packed == separate


@pytest.mark.parametrize("mode", MODES)
def test_packed_equals_separate(model, user, mode):
    prefix, unconditional, cands = user
    packed = score_candidates(model, prefix, cands, mode, unconditional)
    separate = score_candidates_separately(model, prefix, cands, mode, unconditional)
    assert packed.shape == (len(cands),) and packed.dtype == torch.float32
    torch.testing.assert_close(packed, separate, atol=ATOL, rtol=0)
    if mode == "mean":  # the mean is the sum over the continuation's length
        sums = score_candidates_separately(model, prefix, cands, "sum")
        torch.testing.assert_close(packed, sums / torch.tensor([3.0, 1, 9, 5, 1]), atol=ATOL, rtol=0)


def test_scores_are_not_trivial(model, user):
    """The block mask matters: naive causal packing (one plain sequence) gives different scores."""
    prefix, _, cands = user
    reference = score_candidates_separately(model, prefix, cands, "sum")
    assert reference.unique().numel() == len(cands)
    naive = []
    seq = list(prefix)
    for cand in cands:
        ids = torch.tensor([seq + cand])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        naive.append(sum(logp[len(seq) - 1 + k, t].item() for k, t in enumerate(cand)))
        seq += cand
    assert (torch.tensor(naive)[1:] - reference[1:]).abs().max() > 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_batch_of_three_users(model, mode):
    prefixes = [_ids(n, 100 + n) for n in (7, 23, 12)]
    candidates = [[_ids(n, 200 + i) for i, n in enumerate(lengths)] for lengths in ([4, 1, 6], [2, 8, 1, 3, 5, 1], [1])]
    unconditional = _ids(4, 300)
    batch = score_candidates_batch(model, prefixes, candidates, mode, unconditional)
    assert [s.shape[0] for s in batch] == [3, 6, 1]
    for prefix, cands, scores in zip(prefixes, candidates, batch, strict=True):
        separate = score_candidates_separately(model, prefix, cands, mode, unconditional)
        torch.testing.assert_close(scores, separate, atol=ATOL, rtol=0)
        single = score_candidates(model, prefix, cands, mode, unconditional)
        torch.testing.assert_close(scores, single, atol=ATOL, rtol=0)


def test_candidate_score_independent_of_other_candidates(model, user):
    prefix, unconditional, cands = user
    for mode in MODES:
        full = score_candidates(model, prefix, cands, mode, unconditional)
        alone = torch.stack([score_candidates(model, prefix, [c], mode, unconditional)[0] for c in cands])
        torch.testing.assert_close(full, alone, atol=ATOL, rtol=0)
        order = [3, 0, 4, 2, 1]
        shuffled = score_candidates(model, prefix, [cands[i] for i in order], mode, unconditional)
        torch.testing.assert_close(shuffled, full[order], atol=ATOL, rtol=0)
        extra = [_ids(12, 50), *cands[:2], _ids(2, 51), *cands[2:]]
        more = score_candidates(model, prefix, extra, mode, unconditional)
        torch.testing.assert_close(more[[1, 2, 4, 5, 6]], full, atol=ATOL, rtol=0)


def test_lm_head_only_at_candidate_positions(model, user):
    prefix, _, cands = user
    rows: list[int] = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    try:
        score_candidates(model, prefix, cands, "sum")
    finally:
        handle.remove()
    assert rows == [sum(len(c) for c in cands)]  # one LM-head call, on the 19 candidate tokens only


# --------------------------------------------------------------------------- other architectures


def _other_model(name: str, impl: str):
    import transformers

    shape = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    if name == "qwen2":
        if not hasattr(transformers, "Qwen2ForCausalLM"):
            pytest.skip("transformers has no Qwen2")
        config = transformers.Qwen2Config(**shape)
        cls = transformers.Qwen2ForCausalLM
    else:
        if not hasattr(transformers, "Gemma3ForCausalLM"):
            pytest.skip("transformers has no Gemma3")
        config = transformers.Gemma3TextConfig(
            **shape,
            head_dim=16,
            sliding_window=512,  # longer than any test sequence: the packed mask is the whole story
            final_logit_softcapping=30.0,
        )
        cls = transformers.Gemma3ForCausalLM
    config._attn_implementation = impl
    torch.manual_seed(0)
    return cls(config).eval()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["qwen2", "gemma3"])
def test_other_architectures(name, impl, user):
    m = _other_model(name, impl)
    prefix, unconditional, cands = user
    for mode in MODES:
        packed = score_candidates(m, prefix, cands, mode, unconditional)
        separate = score_candidates_separately(m, prefix, cands, mode, unconditional)
        torch.testing.assert_close(packed, separate, atol=ATOL, rtol=0)
