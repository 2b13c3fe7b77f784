"""Answer-only scoring (decoder at answer_pos x the candidates' head rows) equals the full-vocabulary path."""

from __future__ import annotations

import pytest
import torch
from fisher_worker import make_batches

from layerwise_dist.evaluation import _logits, _prompt_only, forward_scores, target_ranks
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
        full = forward_scores(model, batch)
        fast = answer_only_scores(model, batch)
        torch.testing.assert_close(fast, full, rtol=0, atol=1e-5)
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
    full = forward_scores(model, batch)
    assert torch.equal(raw.argsort(dim=1), full.argsort(dim=1))  # the normaliser does not change the ranking


def test_bad_batches_are_refused():
    model = tiny_llama(vocab_size=256, num_layers=1, hidden=32)
    batch = make_batches(2, 2)[0]
    bad = dict(batch, candidate_token_ids=batch["candidate_token_ids"] + 1000)
    with pytest.raises(HeadError, match="out of the vocabulary"):
        answer_only_scores(model, bad)
    with pytest.raises(HeadError, match="listwise"):
        answer_only_scores(model, dict(batch, packed=object()))
