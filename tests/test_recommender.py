"""BaseRecommender: candidate pool, chunked scoring against a brute-force oracle, errors, loading by name."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

from layerwise_dist.config import DataConfig
from layerwise_dist.data import RankExample, SplitData, label_token_ids, render_prompt
from layerwise_dist.models.tiny import tiny_llama
from layerwise_dist.recommender import BaseRecommender, RecommendError

CFG = DataConfig(history_len=3, num_candidates=4, title_max_tokens=40)  # no title is cut


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character (a BPE without merges): every letter label is one token."""
    vocab = {"<pad>": 0, "<unk>": 1}
    for c in "\n" + "".join(chr(i) for i in range(32, 127)):
        vocab[c] = len(vocab)
    tok = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=128, num_layers=2, hidden=32, seed=1)


@pytest.fixture(scope="module")
def split() -> SplitData:
    items = [f"i{n}" for n in range(14)]
    titles = {i: f"Item {i} lotion" for i in items}
    train = {"u1": ["i0", "i1", "i2"], "u2": ["i3", "i4"]}
    return SplitData(
        train=train,
        valid={"u1": "i5", "u2": "i6"},
        test={"u1": "i7", "u2": "i8"},
        titles=titles,
        category="All_Beauty",
        all_items=items,
    )


@pytest.fixture(scope="module")
def rec(model, tokenizer, split):
    return BaseRecommender(model=model, tokenizer=tokenizer, data=split, data_config=CFG, batch_size=4)


def brute_force(model, tokenizer, split, user, history, chunk) -> list[float]:
    """Score one chunk the direct way: full prompt, last-token logits, log-softmax at each letter."""
    example = RankExample(
        user, history, [split.titles[i] for i in history], chunk, [split.titles[i] for i in chunk], 0, "x"
    )
    example.category = split.category
    prompt, _ = render_prompt(example, tokenizer)
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)
    return logp[label_token_ids(tokenizer, len(chunk))].tolist()


def test_pool_is_untouched_items_and_history_is_recent(rec):
    history, pool = rec.candidates("u1")
    assert history == ["i2", "i5", "i7"]  # last 3 of train + valid + test
    assert pool == ["i3", "i4", "i6", "i8", "i9", "i10", "i11", "i12", "i13"]


def test_scores_match_brute_force_per_chunk(rec, model, tokenizer, split):
    history, pool = rec.candidates("u1")
    got = rec.score_items("u1")
    assert [item for item, _ in got] == pool
    expected = []
    for start in range(0, len(pool), CFG.num_candidates):  # chunks of 4, 4, 1
        expected += brute_force(model, tokenizer, split, "u1", history, pool[start : start + CFG.num_candidates])
    torch.testing.assert_close(torch.tensor([s for _, s in got]), torch.tensor(expected), atol=1e-5, rtol=1e-5)
    # padding in a batch changes nothing: one prompt per forward gives the same scores
    one = BaseRecommender(model=model, tokenizer=tokenizer, data=split, data_config=CFG, batch_size=1)
    torch.testing.assert_close(
        torch.tensor([s for _, s in one.score_items("u1")]), torch.tensor(expected), atol=1e-5, rtol=1e-5
    )


def test_recommend_top_k(rec, split):
    out = rec.recommend(user_id="u2", category="All_Beauty", top_k=3)
    assert len(out) == 3 and set(out[0]) == {"item_id", "title", "score"}
    scores = [r["score"] for r in out]
    assert scores == sorted(scores, reverse=True)
    touched = set(split.sequence("u2"))
    assert not touched & {r["item_id"] for r in out}
    assert all(r["title"] == split.titles[r["item_id"]] for r in out)
    all_scores = sorted((s for _, s in rec.score_items("u2")), reverse=True)
    assert scores == all_scores[:3]
    assert len(rec.recommend("u2", top_k=100)) == 14 - len(touched)


def test_clear_errors(rec):
    with pytest.raises(RecommendError, match="unknown user 'nobody'"):
        rec.recommend("nobody")
    with pytest.raises(RecommendError, match="unknown category 'Electronics'"):
        rec.recommend("u1", category="Electronics")
    with pytest.raises(RecommendError, match="top_k"):
        rec.recommend("u1", top_k=0)
    with pytest.raises(RecommendError, match="model_name"):
        BaseRecommender()


def test_load_by_model_name(tmp_path, model, tokenizer, split, rec):
    model.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    by_name = BaseRecommender(model_name=str(tmp_path / "student"), data=split, data_config=CFG)
    a, b = by_name.recommend("u1", top_k=5), rec.recommend("u1", top_k=5)
    assert [r["item_id"] for r in a] == [r["item_id"] for r in b]
    assert [r["score"] for r in a] == pytest.approx([r["score"] for r in b], abs=1e-5)


def test_embedded_all_beauty_by_default(model, tokenizer):
    cfg = DataConfig(history_len=5, num_candidates=26, title_max_tokens=12)
    rec = BaseRecommender(model=model, tokenizer=tokenizer, data_config=cfg, batch_size=8)
    user = next(iter(rec.data["All_Beauty"].train))
    out = rec.recommend(user, category="All_Beauty", top_k=3)
    assert len(out) == 3 and all(r["title"] for r in out)
