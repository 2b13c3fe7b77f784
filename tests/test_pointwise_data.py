"""Pointwise formulation through the data pipeline: tokenized rows, cache, collate's packed batch, evaluation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import layerwise_dist.data.tokenize as tokenize_module
from layerwise_dist.config import DataConfig
from layerwise_dist.data.errors import DataError
from layerwise_dist.data.prompts import RankExample, pointwise_phrases, render_pointwise
from layerwise_dist.data.sampler import load_batch
from layerwise_dist.data.tokenize import IGNORE_INDEX, collate, examples_fingerprint, tokenize_examples
from layerwise_dist.evaluation import evaluate_model, evaluate_per_example, rank_metrics, target_ranks
from layerwise_dist.models.tiny import tiny_llama
from layerwise_dist.pointwise import (
    PackedBatch,
    pack_candidates_batch,
    packed_scores,
    render_history_prefix,
    score_candidates_separately,
    unconditional_prefix,
)

GAMES = [
    "Zelda Breath of the Wild",
    "Mario Kart 8 Deluxe",
    "Halo 3",
    "Super Smash Bros Ultimate",
    "Minecraft",
    "Dark Souls Remastered",
    "Pokemon Sword",
    "Tetris Effect",
    "Forza Horizon 4",
    "Animal Crossing New Horizons",
    "The Witcher 3 Wild Hunt",
    "Stardew Valley",
]
CFG = DataConfig(formulation="pointwise", num_candidates=4)
ATOL = 1e-5


@pytest.fixture(scope="module")
def tokenizer():
    """A real byte-level BPE trained in code (no download): spaces and newlines survive decoding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = [render_history_prefix(GAMES[i : i + 3], "video games") + f" {GAMES[i]}\n" for i in range(10)] * 5
    backend.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<pad>", "<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>")
    # A chat template must NOT be used by the pointwise formulation (plain text).
    tok.chat_template = "<s>{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
    return tok


@pytest.fixture(scope="module")
def model(tokenizer):
    assert len(tokenizer) <= 320
    return tiny_llama(vocab_size=320, num_layers=2, hidden=64, seed=3)


def make_examples(n: int = 5, n_cand: int = 4) -> list[RankExample]:
    out = []
    for u in range(n):
        g = torch.Generator().manual_seed(u)
        order = torch.randperm(len(GAMES), generator=g).tolist()
        hist, cands = order[: 2 + u % 3], order[5 : 5 + n_cand]
        out.append(
            RankExample(
                user_id=f"U{u}",
                history=[f"I{i}" for i in hist],
                history_titles=[GAMES[i] for i in hist],
                candidates=[f"I{i}" for i in cands],
                candidate_titles=[GAMES[i] for i in cands],
                target_index=u % n_cand,
                split="test",
                category="Video_Games",
            )
        )
    return out


def test_category_phrases():
    assert pointwise_phrases("Video_Games") == ("video games", "video game")
    assert pointwise_phrases("All_Beauty") == ("beauty products", "beauty product")
    assert pointwise_phrases("Pet_Supplies") == ("pet supplies items", "pet supplies item")
    assert pointwise_phrases("All_Beauty", "  board  games ") == ("board games", "board game")
    prefix, conts, uncond = render_pointwise(make_examples(1)[0])
    assert prefix.startswith("Video games a customer bought, oldest first:\n- ")
    assert prefix.endswith("\nThe next video game the customer bought:\n-")
    assert conts[0] == f" {make_examples(1)[0].candidate_titles[0]}\n"
    assert uncond == unconditional_prefix("video games")


def test_pointwise_rows(tokenizer, tmp_path: Path):
    examples = make_examples()
    ds = tokenize_examples(examples, tokenizer, CFG, cache_dir=tmp_path)
    wanted = {"input_ids", "attention_mask", "labels", "answer_pos", "target_index", "prefix_ids", "candidate_ids"}
    assert wanted | {"unconditional_ids"} <= set(ds.column_names)
    assert "candidate_token_ids" not in ds.column_names
    for ex, row in zip(examples, ds):
        prefix, cands, t = row["prefix_ids"], row["candidate_ids"], row["target_index"]
        assert t == ex.target_index and len(cands) == len(ex.candidates)
        # plain text (no chat template), the prefix's ids as the tokenizer gives them
        assert tokenizer.decode(prefix) == render_history_prefix(ex.history_titles, "video games")
        assert prefix == tokenizer(render_pointwise(ex)[0])["input_ids"]
        assert [tokenizer.decode(c) for c in cands] == [f" {title}\n" for title in ex.candidate_titles]
        assert tokenizer.decode(row["unconditional_ids"]) == unconditional_prefix("video games")
        ids, labels, pos = row["input_ids"], row["labels"], row["answer_pos"]
        assert ids == prefix + cands[t] and row["attention_mask"] == [1] * len(ids)
        assert labels == [IGNORE_INDEX] * len(prefix) + cands[t]
        assert pos == len(prefix) - 1 and ids[pos + 1] == cands[t][0] == labels[pos + 1]


def test_pointwise_cache_and_fingerprint(tokenizer, tmp_path: Path, monkeypatch):
    examples = make_examples()
    ds = tokenize_examples(examples, tokenizer, CFG, cache_dir=tmp_path)
    listwise = dataclasses.replace(CFG, formulation="listwise")
    other_phrase = dataclasses.replace(CFG, category_phrase="console games")
    fps = {examples_fingerprint(examples, tokenizer, c) for c in (CFG, listwise, other_phrase)}
    assert len(fps) == 3

    def fail(*args, **kwargs):
        raise AssertionError("re-tokenized although the cache holds this dataset")

    monkeypatch.setattr(tokenize_module, "_encode_pointwise_batch", fail)
    again = tokenize_examples(examples, tokenizer, CFG, cache_dir=tmp_path)
    assert again["candidate_ids"] == ds["candidate_ids"]
    with pytest.raises(AssertionError, match="re-tokenized"):  # another template: another fingerprint
        tokenize_examples(examples, tokenizer, other_phrase, cache_dir=tmp_path)


def test_pointwise_too_long_is_an_error(tokenizer, tmp_path: Path):
    with pytest.raises(DataError, match=r"user=U0 split=test is \d+ tokens \(prefix \+ longest candidate\)"):
        tokenize_examples(make_examples(1), tokenizer, dataclasses.replace(CFG, max_length=12), cache_dir=tmp_path)


def test_collate_packs_and_moves(tokenizer, tmp_path: Path):
    ds = tokenize_examples(make_examples(3), tokenizer, CFG, cache_dir=tmp_path)
    batch = load_batch(ds, [0, 1, 2], tokenizer.pad_token_id, device="cpu")
    packed = batch["packed"]
    assert isinstance(packed, PackedBatch) and packed.num_groups == 2 and packed.num_candidates == [4, 4, 4]
    rows = [ds[i] for i in range(3)]
    expected = pack_candidates_batch(
        [r["prefix_ids"] for r in rows],
        [r["candidate_ids"] for r in rows],
        tokenizer.pad_token_id,
        rows[0]["unconditional_ids"],
    )
    assert torch.equal(packed.input_ids, expected.input_ids)
    assert torch.equal(packed.attention_mask, expected.attention_mask)
    assert batch["input_ids"].shape[0] == 3 and batch["labels"].shape == batch["input_ids"].shape
    assert batch["target_index"].tolist() == [r["target_index"] for r in rows]
    moved = packed.to("meta")
    assert moved.input_ids.device.type == "meta" and moved.token_slot.device.type == "meta"
    assert packed.input_ids.device.type == "cpu"  # .to returns a new batch


@pytest.mark.parametrize("mode", ["mean", "sum", "pmi"])
def test_collated_scores_equal_separate_forwards(tokenizer, model, tmp_path: Path, mode):
    ds = tokenize_examples(make_examples(3), tokenizer, CFG, cache_dir=tmp_path)
    batch = collate([ds[i] for i in range(3)], tokenizer.pad_token_id)
    got = packed_scores(model, batch["packed"], mode)
    for b in range(3):
        row = ds[b]
        want = score_candidates_separately(
            model, row["prefix_ids"], row["candidate_ids"], mode, unconditional_prefix_ids=row["unconditional_ids"]
        )
        torch.testing.assert_close(got[b], want, atol=ATOL, rtol=0)
        assert got[b].std() > 1e-3  # the scores do differ between candidates


def test_history_only_drops_the_unconditional_group(tokenizer, tmp_path: Path):
    ds = tokenize_examples(make_examples(3), tokenizer, CFG, cache_dir=tmp_path)
    rows = [ds[i] for i in range(3)]
    with_uncond = collate(rows, tokenizer.pad_token_id)["packed"]
    plain = pack_candidates_batch([r["prefix_ids"] for r in rows], [r["candidate_ids"] for r in rows], 0)
    cut = with_uncond.history_only()
    assert cut.num_groups == 1 and cut.lengths == plain.lengths
    for name in ("input_ids", "position_ids", "attention_mask", "token_row", "token_pred_pos", "token_target"):
        assert torch.equal(getattr(cut, name), getattr(plain, name)), name
    assert torch.equal(cut.token_slot, plain.token_slot) and torch.equal(cut.slot_row, plain.slot_row)


def test_pmi_needs_the_unconditional_group(model, tokenizer, tmp_path: Path):
    ds = tokenize_examples(make_examples(2), tokenizer, CFG, cache_dir=tmp_path)
    rows = [{k: v for k, v in ds[i].items() if k != "unconditional_ids"} for i in range(2)]
    packed = collate(rows, tokenizer.pad_token_id)["packed"]
    assert packed.num_groups == 1
    with pytest.raises(ValueError, match="unconditional"):
        packed_scores(model, packed, "pmi")


@pytest.mark.parametrize("mode", ["mean", "pmi"])
def test_evaluate_pointwise_equals_separate_ranking(tokenizer, model, tmp_path: Path, mode):
    examples = make_examples(7)
    ds = tokenize_examples(examples, tokenizer, CFG, cache_dir=tmp_path)
    batches = [collate([ds[j] for j in range(i, min(i + 3, len(ds)))], tokenizer.pad_token_id) for i in (0, 3, 6)]
    separate = torch.stack(
        [
            score_candidates_separately(model, r["prefix_ids"], r["candidate_ids"], mode, r["unconditional_ids"])
            for r in ds
        ]
    )
    targets = torch.tensor(ds["target_index"])
    result = evaluate_per_example(model, batches, ks=[1, 2, 10, 20], progress=False, pointwise_score=mode, n_boot=50)
    assert result.ranks.tolist() == target_ranks(separate, targets).tolist()
    assert result.target_index.tolist() == targets.tolist()
    torch.testing.assert_close(torch.from_numpy(result.scores), separate, atol=ATOL, rtol=0)
    assert len(set(result.ranks.tolist())) > 1  # not a degenerate ranking
    expected = rank_metrics(separate, targets, ks=[1, 2, 10, 20])
    metrics = evaluate_model(model, batches, ks=[1, 2, 10, 20], progress=False, pointwise_score=mode)
    assert metrics == result.metrics
    assert metrics.keys() == expected.keys()
    for key in expected:
        assert metrics[key] == pytest.approx(expected[key], abs=1e-12)
    assert metrics["hr@20"] == 1.0  # 4 candidates: every target within 20
    # tokens: prefix once + every candidate (+ the unconditional group for pmi)
    lengths = [len(r["prefix_ids"]) + sum(len(c) for c in r["candidate_ids"]) for r in ds]
    if mode == "pmi":
        lengths = [
            n + len(r["unconditional_ids"]) + sum(len(c) for c in r["candidate_ids"]) for n, r in zip(lengths, ds)
        ]
    assert result.extra["tokens_per_example_mean"] == pytest.approx(sum(lengths) / len(lengths))


def test_length_sorted_batches_score_every_example_alike_and_pad_less(tokenizer, model, tmp_path: Path):
    """Batches regrouped longest first: the same examples in batches of the same sizes, less padding, and with
    ``positions`` the per-example results come back in dataset order, equal to the in-order batches'."""
    from layerwise_dist.data.sampler import example_length, length_sorted, load_batch

    examples = make_examples(10)
    ds = tokenize_examples(examples, tokenizer, CFG, cache_dir=tmp_path)
    in_order = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    regrouped = length_sorted(in_order, ds)
    assert [len(b) for b in regrouped] == [3, 3, 3, 1]
    assert sorted(i for b in regrouped for i in b) == list(range(10))
    lengths = [example_length(ds[i]) for b in regrouped for i in b]
    assert lengths == sorted(lengths, reverse=True) and len(set(lengths)) > 3

    def padded_tokens(batches):  # every row padded to its batch's longest
        return sum(len(b) * max(example_length(ds[i]) for i in b) for b in batches)

    assert padded_tokens(regrouped) < padded_tokens(in_order)
    kw = {"ks": [1, 2], "progress": False, "n_boot": 50}
    pad = tokenizer.pad_token_id
    plain = evaluate_per_example(model, [load_batch(ds, b, pad) for b in in_order], **kw)
    positions = [i for b in regrouped for i in b]
    assert positions != list(range(10))
    sorted_result = evaluate_per_example(model, [load_batch(ds, b, pad) for b in regrouped], positions=positions, **kw)
    assert sorted_result.ranks.tolist() == plain.ranks.tolist()
    assert sorted_result.target_index.tolist() == plain.target_index.tolist() == ds["target_index"]
    torch.testing.assert_close(
        torch.from_numpy(sorted_result.scores), torch.from_numpy(plain.scores), atol=ATOL, rtol=0
    )
    assert sorted_result.metrics == pytest.approx(plain.metrics, abs=1e-12)
    # Without positions the results would be in batch order: not the dataset's.
    unordered = evaluate_per_example(model, [load_batch(ds, b, pad) for b in regrouped], **kw)
    assert unordered.target_index.tolist() == [ds["target_index"][i] for i in positions]
    with pytest.raises(ValueError, match="positions gives 9 indices for 10 scored examples"):
        evaluate_per_example(model, [load_batch(ds, b, pad) for b in regrouped], positions=positions[:9], **kw)
