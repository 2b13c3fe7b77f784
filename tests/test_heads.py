"""Answer-only scoring (decoder at answer_pos x the candidates' head rows) equals the full-vocabulary path."""

from __future__ import annotations

import pytest
import torch
from fisher_worker import make_batches

from layerwise_dist.evaluation import _logits, _prompt_only, forward_scores, full_forward_scores, target_ranks
from layerwise_dist.heads import HeadError, answer_only_scores
from layerwise_dist.models.tiny import tiny_llama


@pytest.mark.parametrize("tied", [False, True])
def test_answer_only_scores_equal_the_full_path(tied):
    model = tiny_llama(vocab_size=256, num_layers=3, hidden=64, seed=1)
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    batches = make_batches(12, 4, seed=5)
    assert any(len(set(b["attention_mask"].sum(1).tolist())) > 1 for b in batches)  # right padding exercised
    for batch in batches:
        full = full_forward_scores(model, batch)
        fast = answer_only_scores(model, batch)
        torch.testing.assert_close(fast, full, rtol=0, atol=1e-5)
        torch.testing.assert_close(forward_scores(model, batch), full, rtol=0, atol=1e-5)  # evaluation's path
        assert torch.equal(target_ranks(fast, batch["target_index"]), target_ranks(full, batch["target_index"]))


def test_unnormalised_scores_are_the_candidate_logits():
    model = tiny_llama(vocab_size=256, num_layers=2, hidden=64, seed=2)
    batch = make_batches(4, 4, seed=7)[0]
    raw = answer_only_scores(model, batch, normalize=False)
    ids, mask = _prompt_only(batch, torch.device("cpu"))
    with torch.no_grad():
        logits = _logits(model(input_ids=ids, attention_mask=mask))
    at = logits[torch.arange(4), batch["answer_pos"]]
    torch.testing.assert_close(raw, at.gather(1, batch["candidate_token_ids"]), rtol=0, atol=1e-5)
    full = full_forward_scores(model, batch)
    assert torch.equal(raw.argsort(dim=1), full.argsort(dim=1))  # the normaliser does not change the ranking


def test_bad_batches_are_refused():
    model = tiny_llama(vocab_size=256, num_layers=1, hidden=32)
    batch = make_batches(2, 2)[0]
    bad = dict(batch, candidate_token_ids=batch["candidate_token_ids"] + 1000)
    with pytest.raises(HeadError, match="out of the vocabulary"):
        answer_only_scores(model, bad)
    with pytest.raises(HeadError, match="listwise"):
        answer_only_scores(model, dict(batch, packed=object()))


@pytest.mark.parametrize("mask_supported", [True, False])
def test_forward_keeping_gives_the_kept_logits_on_any_transformers(monkeypatch, mask_supported):
    """Transformers <= 5.17 takes no boolean [B, L] ``logits_to_keep`` (IndexError inside the model: seen on
    the GPU machine's 5.17): the 1D-positions fallback must return the same [U, V] logits, in (row, pos) order,
    and the Fisher targets and the packed pointwise forward built on it must agree with the full path."""
    import layerwise_dist.heads as heads
    from layerwise_dist.fisher.targets import answer_log_probs, answer_targets

    monkeypatch.setattr(heads, "_mask_logits_to_keep_supported", lambda: mask_supported)
    model = tiny_llama(vocab_size=256, num_layers=2, hidden=32, seed=4).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 256, (3, 11), generator=gen)
    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[0, [2, 9]] = True
    keep[2, [0, 5, 9, 10]] = True  # row 1 keeps nothing; positions shared and not shared across rows
    with torch.no_grad():
        full = model(input_ids=ids).logits
        kept = heads.forward_keeping(model, keep, input_ids=ids).logits
    assert kept.shape == (int(keep.sum()), 256)
    torch.testing.assert_close(kept, full[keep], rtol=1e-5, atol=1e-5)

    batch = make_batches(6, 1, seed=2)[0]
    rows, pos, tok = answer_targets(batch)
    with torch.no_grad():
        ref = torch.log_softmax(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[rows, pos].float(), -1
        )
        want = torch.zeros(batch["input_ids"].shape[0]).index_add(0, rows, ref.gather(1, tok[:, None]).squeeze(1))
        torch.testing.assert_close(answer_log_probs(model, batch), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(HeadError, match="bool mask"):
        heads.forward_keeping(model, keep.long(), input_ids=ids)
