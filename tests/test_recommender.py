"""BaseRecommender: retrieval then LLM re-ranking (listwise and pointwise) against brute-force oracles,
CLI and API giving identical rankings, errors, loading by name."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

from conftest import run_cli
from layerwise_dist.cli import main
from layerwise_dist.config import DataConfig, ServeConfig
from layerwise_dist.data import RankExample, SplitData, label_token_ids, render_pointwise, render_prompt
from layerwise_dist.models.tiny import tiny_llama
from layerwise_dist.pointwise import score_candidates_separately
from layerwise_dist.recommender import BaseRecommender, RecommendError

CFG = DataConfig(history_len=3, num_candidates=4, title_max_tokens=40)  # no title is cut
POINTWISE = DataConfig(history_len=3, num_candidates=4, title_max_tokens=40, formulation="pointwise")
EVERY_ITEM = ServeConfig(num_candidates=0)  # no retrieval: every untouched item is scored


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
    train = {"u1": ["i0", "i1", "i2"], "u2": ["i3", "i4"], "u3": ["i0", "i9", "i10"]}
    return SplitData(
        train=train,
        valid={"u1": "i5", "u2": "i6", "u3": "i11"},
        test={"u1": "i7", "u2": "i8", "u3": "i12"},
        titles=titles,
        category="All_Beauty",
        all_items=items,
    )


@pytest.fixture(scope="module")
def rec(model, tokenizer, split):
    return BaseRecommender(
        model=model, tokenizer=tokenizer, data=split, data_config=CFG, serve_config=EVERY_ITEM, batch_size=4
    )


def brute_force(model, tokenizer, split, user, history, chunk, system_prompt: str = "") -> list[float]:
    """Score one chunk the direct way: full prompt, last-token logits, log-softmax at each letter."""
    example = RankExample(
        user, history, [split.titles[i] for i in history], chunk, [split.titles[i] for i in chunk], 0, "x"
    )
    example.category = split.category
    prompt, _ = render_prompt(example, tokenizer, system_prompt)
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)
    return logp[label_token_ids(tokenizer, len(chunk))].tolist()


def test_pool_is_untouched_items_and_history_is_recent(rec):
    history, pool = rec.candidates("u1")
    assert history == ["i2", "i5", "i7"]  # last 3 of train + valid + test
    assert [c.item_id for c in pool] == ["i3", "i4", "i6", "i8", "i9", "i10", "i11", "i12", "i13"]
    assert {c.source for c in pool} == {"catalogue"}


def test_retrieval_proposes_the_candidates(model, tokenizer, split):
    """u1 shares i0 with u3, whose i9 and i10 followed it: co-occurrence first, then popular items."""
    rec = BaseRecommender(
        model=model, tokenizer=tokenizer, data=split, data_config=CFG, serve_config=ServeConfig(num_candidates=4)
    )
    _, pool = rec.candidates("u1")
    assert [(c.item_id, c.source) for c in pool] == [
        ("i9", "co-occurrence"),
        ("i10", "co-occurrence"),
        ("i3", "popularity"),  # training count 1, the untouched items of highest count
        ("i4", "popularity"),
    ]
    out = rec.recommend("u1", top_k=4)
    assert {(r["item_id"], r["source"]) for r in out} == {(c.item_id, c.source) for c in pool}
    # at least top_k candidates are retrieved, whatever serve.num_candidates says
    assert len(rec.recommend("u1", top_k=6)) == 6


def test_scores_match_brute_force_per_chunk(rec, model, tokenizer, split):
    history, candidates = rec.candidates("u1")
    pool = [c.item_id for c in candidates]
    got = rec.score_items("u1")
    assert [item for item, _ in got] == pool
    expected = []
    for start in range(0, len(pool), CFG.num_candidates):  # chunks of 4, 4, 1
        expected += brute_force(model, tokenizer, split, "u1", history, pool[start : start + CFG.num_candidates])
    torch.testing.assert_close(torch.tensor([s for _, s in got]), torch.tensor(expected), atol=1e-5, rtol=1e-5)
    # padding in a batch changes nothing: one prompt per forward gives the same scores
    one = BaseRecommender(
        model=model, tokenizer=tokenizer, data=split, data_config=CFG, serve_config=EVERY_ITEM, batch_size=1
    )
    torch.testing.assert_close(
        torch.tensor([s for _, s in one.score_items("u1")]), torch.tensor(expected), atol=1e-5, rtol=1e-5
    )


def test_listwise_scores_follow_the_system_prompt(model, tokenizer, split):
    """data.system_prompt reaches the prompts recommend scores (as it does in evaluation)."""
    import dataclasses

    cfg = dataclasses.replace(CFG, system_prompt="You rank products for a shop.")
    rec = BaseRecommender(model=model, tokenizer=tokenizer, data=split, data_config=cfg, serve_config=EVERY_ITEM)
    history, candidates = rec.candidates("u1")
    pool = [c.item_id for c in candidates][: CFG.num_candidates]
    got = [s for _, s in rec.score_items("u1")][: len(pool)]
    want = brute_force(model, tokenizer, split, "u1", history, pool, cfg.system_prompt)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(
        torch.tensor(got), torch.tensor(brute_force(model, tokenizer, split, "u1", history, pool))
    )


def test_recommend_top_k(rec, split):
    out = rec.recommend(user_id="u2", category="All_Beauty", top_k=3)
    assert len(out) == 3 and set(out[0]) == {"item_id", "title", "score", "source"}
    scores = [r["score"] for r in out]
    assert scores == sorted(scores, reverse=True)
    touched = set(split.sequence("u2"))
    assert not touched & {r["item_id"] for r in out}
    assert all(r["title"] == split.titles[r["item_id"]] for r in out)
    all_scores = sorted((s for _, s in rec.score_items("u2")), reverse=True)
    assert scores == all_scores[:3]
    assert len(rec.recommend("u2", top_k=100)) == 14 - len(touched)
    assert {r["source"] for r in out} == {"catalogue"}


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
    by_name = BaseRecommender(
        model_name=str(tmp_path / "student"), data=split, data_config=CFG, serve_config=EVERY_ITEM
    )
    a, b = by_name.recommend("u1", top_k=5), rec.recommend("u1", top_k=5)
    assert [r["item_id"] for r in a] == [r["item_id"] for r in b]
    assert [r["score"] for r in a] == pytest.approx([r["score"] for r in b], abs=1e-5)


def test_embedded_all_beauty_by_default(model, tokenizer):
    cfg = DataConfig(history_len=5, num_candidates=26, title_max_tokens=12)
    rec = BaseRecommender(model=model, tokenizer=tokenizer, data_config=cfg, batch_size=8)
    user = next(iter(rec.data["All_Beauty"].train))
    out = rec.recommend(user, category="All_Beauty", top_k=3)
    assert len(out) == 3 and all(r["title"] for r in out)


def test_pointwise_scores_match_separate_forwards(model, tokenizer, split):
    """Pointwise re-ranking: every retrieved candidate's title likelihood, equal to one forward per candidate."""
    rec = BaseRecommender(
        model=model, tokenizer=tokenizer, data=split, data_config=POINTWISE, serve_config=ServeConfig(num_candidates=6)
    )
    history, candidates = rec.candidates("u1")
    items = [c.item_id for c in candidates]
    got = rec.score_items("u1")
    assert [item for item, _ in got] == items and len(items) == 6
    example = RankExample(
        "u1", history, [split.titles[i] for i in history], items, [split.titles[i] for i in items], 0, "x"
    )
    example.category = split.category
    prefix, continuations, _ = render_pointwise(example)
    expected = score_candidates_separately(
        model,
        tokenizer(prefix)["input_ids"],
        [tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations],
        mode="mean",
    )
    torch.testing.assert_close(torch.tensor([s for _, s in got]), expected, atol=1e-5, rtol=1e-5)
    out = rec.recommend("u1", top_k=3)
    assert [r["score"] for r in out] == sorted((s for _, s in got), reverse=True)[:3]
    assert "title as the next item" in rec.score_meaning and "pointwise" in rec.score_meaning


def _saved(tmp_path, model, tokenizer, data_config: DataConfig):
    """A model folder that records its prompt settings, as a distilled student does."""
    folder = tmp_path / f"model-{data_config.formulation}"
    model.config.layerwise_dist = {"prompt": data_config.prompt_settings()}
    try:
        model.save_pretrained(folder)
    finally:
        del model.config.layerwise_dist
    tokenizer.save_pretrained(folder)
    return folder


def _cli_ranking(stdout: str) -> list[tuple[str, str, str]]:
    rows = [line.split() for line in stdout.splitlines() if line[:1].isdigit()]
    return [(r[1], r[2], r[3]) for r in rows]  # item_id, score (4 decimals), source


@pytest.mark.parametrize("formulation", ["pointwise", "listwise"])
def test_cli_and_api_give_identical_rankings(tmp_path, capsys, model, tokenizer, formulation):
    """Embedded All_Beauty data, default serve settings: `layerwise-dist recommend` and the API agree."""
    recorded = DataConfig(history_len=3, num_candidates=20, title_max_tokens=8, formulation=formulation)
    folder = _saved(tmp_path, model, tokenizer, recorded)
    api_rec = BaseRecommender(model_name=str(folder))  # default DataConfig: the recorded settings win
    assert api_rec.data_config.formulation == formulation and api_rec.data_config.history_len == 3
    user = sorted(api_rec.data["All_Beauty"].train)[3]
    api = api_rec.recommend(user, category="All_Beauty", top_k=5)
    assert len(api) == 5 and {r["source"] for r in api} <= {"co-occurrence", "popularity"}
    code = main(["recommend", "--model", str(folder), "--user", user, "--top-k", "5"])
    out = capsys.readouterr().out
    assert code == 0
    assert _cli_ranking(out) == [(r["item_id"], f"{r['score']:.4f}", r["source"]) for r in api]
    header = [line for line in out.splitlines() if line.startswith("# score:")]
    assert header == [f"# score: {api_rec.score_meaning}"]
    assert f"formulation: {formulation}" in out and "50 retrieved" in out


def test_cli_subprocess_matches_the_api(tmp_path, model, tokenizer):
    """The installed entry point, in its own process, ranks as the API does."""
    folder = _saved(tmp_path, model, tokenizer, POINTWISE)
    api_rec = BaseRecommender(model_name=str(folder))
    user = sorted(api_rec.data["All_Beauty"].train)[0]
    api = api_rec.recommend(user, category="All_Beauty", top_k=3)
    out = run_cli(["recommend", "--model", str(folder), "--user", user, "--top-k", "3"], timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [row[0] for row in _cli_ranking(out.stdout)] == [r["item_id"] for r in api]
    assert "# score: mean log-probability per token" in out.stdout


def test_cli_errors_are_one_line(tmp_path, capsys, model, tokenizer):
    folder = _saved(tmp_path, model, tokenizer, POINTWISE)
    assert main(["recommend", "--model", str(folder), "--user", "nobody"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "unknown user 'nobody'" in err[0]
    assert main(["recommend", "--model", str(folder), "--user", "x", "serve.num_candidates=-1"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "serve.num_candidates must be >= 0" in err[0]


def test_prompt_settings_file_is_what_the_recommender_reads(tmp_path, model, tokenizer):
    folder = _saved(tmp_path, model, tokenizer, POINTWISE)
    stored = json.loads((folder / "config.json").read_text())["layerwise_dist"]["prompt"]
    assert stored["formulation"] == "pointwise"
    assert BaseRecommender(model_name=str(folder)).data_config.prompt_settings() == POINTWISE.prompt_settings()


def test_new_and_cold_users_are_served_from_a_given_history(model, tokenizer, split):
    rec = BaseRecommender(
        model=model, tokenizer=tokenizer, data=split, data_config=POINTWISE, serve_config=ServeConfig(num_candidates=4)
    )
    # a known user's own record given as history: the same ranking as by user id
    assert rec.recommend("anyone", top_k=3, history=split.sequence("u1")) == rec.recommend("u1", top_k=3)
    # a new user who bought i0: what followed i0 in the training sequences first
    _, pool = rec.candidates("new", history=["i0"])
    assert [(c.item_id, c.source) for c in pool[:4]] == [
        ("i1", "co-occurrence"),
        ("i9", "co-occurrence"),
        ("i2", "co-occurrence"),
        ("i10", "co-occurrence"),
    ]
    # a cold user: the most popular training items, re-ranked by the model over an empty history
    cold = rec.recommend("new", top_k=4, history=[])
    assert {r["source"] for r in cold} == {"popularity"}
    assert {r["item_id"] for r in cold} == {"i0", "i1", "i2", "i3"}
    with pytest.raises(RecommendError, match="unknown item 'nope'"):
        rec.recommend("new", history=["nope"])
    with pytest.raises(RecommendError, match="give the user's history"):
        rec.recommend("new")


def test_cli_serves_a_cold_user(tmp_path, capsys, model, tokenizer):
    folder = _saved(tmp_path, model, tokenizer, POINTWISE)
    api = BaseRecommender(model_name=str(folder)).recommend("newcomer", top_k=3, history=[])
    assert main(["recommend", "--model", str(folder), "--user", "newcomer", "--history", "", "--top-k", "3"]) == 0
    out = capsys.readouterr().out
    assert _cli_ranking(out) == [(r["item_id"], f"{r['score']:.4f}", "popularity") for r in api]
    assert "0 by co-occurrence" in out and "50 by popularity" in out
