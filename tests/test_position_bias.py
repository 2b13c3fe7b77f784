"""Position bias shown (top-1 positions, profile correlation) and corrected (seeded permutations, summed scores)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from layerwise_dist.baselines import random_expected_values
from layerwise_dist.config import DataConfig, TeacherConfig
from layerwise_dist.data import build_examples, load_splits
from layerwise_dist.evaluation import evaluate_per_example, result_from_scores
from layerwise_dist.position_bias import (
    aggregate_permutation_scores,
    permutation_orders,
    permute_examples,
    position_bias,
)

C = 10


@pytest.fixture(scope="module")
def examples_target_first():
    """Every test user with C candidates and the target at position 0 (the worst case for a position-biased ranker)."""
    splits = load_splits(DataConfig())
    out = []
    for ex in build_examples(splits, "test", DataConfig(num_candidates=C, history_len=3, title_max_tokens=6)):
        order = [ex.target_index] + [j for j in range(C) if j != ex.target_index]
        out.append(
            dataclasses.replace(
                ex,
                candidates=[ex.candidates[j] for j in order],
                candidate_titles=[ex.candidate_titles[j] for j in order],
                target_index=0,
            )
        )
    return out


def _position_scores(examples):
    return [np.arange(len(ex.candidates), 0, -1, dtype=np.float64) for ex in examples]  # A best, then B, ...


def _content_scores(examples):
    """A content ranker: each item's score is a fixed function of (user, item), the target a bit favoured."""
    rows = []
    for ex in examples:
        rng = [np.random.default_rng(abs(hash((ex.user_id, c))) % 2**32).normal() for c in ex.candidates]
        rows.append(np.asarray(rng) + 1.5 * (np.arange(len(ex.candidates)) == ex.target_index))
    return rows


def _score_permuted(examples, scorer, p, seed=3, ks=(1, 5, 10)):
    expanded, orders = permute_examples(examples, p, seed)
    presented = scorer(expanded)
    summed = aggregate_permutation_scores(presented, orders)
    return result_from_scores(summed, [ex.target_index for ex in examples], ks), position_bias(presented)


def test_orders_are_seeded_permutations_and_aggregation_maps_back(examples_target_first):
    ex = examples_target_first[:5]
    orders = permutation_orders(ex, 4, seed=1)
    assert orders == permutation_orders(ex, 4, seed=1) != permutation_orders(ex, 4, seed=2)
    assert all(sorted(o) == list(range(C)) for per in orders for o in per)
    assert permutation_orders(ex[2:3], 4, seed=1) == orders[2:3]  # per example, not per list
    expanded, orders = permute_examples(ex, 4, seed=1)
    for i, e in enumerate(ex):
        for p in range(4):
            shown = expanded[i * 4 + p]
            assert shown.target == e.target and sorted(shown.candidates) == sorted(e.candidates)
            assert shown.candidates == [e.candidates[j] for j in orders[i][p]]
    # an item's score under every order, summed, is P times its score
    item_score = {c: float(k) for k, c in enumerate(sorted({c for e in ex for c in e.candidates}))}
    presented = [[item_score[c] for c in e.candidates] for e in expanded]
    for e, total in zip(ex, aggregate_permutation_scores(presented, orders)):
        assert total.tolist() == [4 * item_score[c] for c in e.candidates]
    with pytest.raises(ValueError, match="scored vectors"):
        aggregate_permutation_scores(presented[:-1], orders)


def test_position_only_ranker_is_at_chance_under_permutations(examples_target_first):
    ex = examples_target_first
    chance = {k: float(v.mean()) for k, v in random_expected_values([C] * len(ex), (1, 5, 10)).items()}
    one, bias1 = _score_permuted(ex, _position_scores, 1)
    assert one.metrics["hr@1"] == 1.0  # the target is always at A: the bias looks like perfect ranking
    assert bias1["profile_correlation_mean"] == pytest.approx(1.0)
    assert bias1["top1_modal_position"] == 0 and bias1["top1_modal_share"] == 1.0
    for p in (3, 5):
        res, bias = _score_permuted(ex, _position_scores, p)
        assert bias["profile_correlation_mean"] == pytest.approx(1.0) and bias["vectors"] == p * len(ex)
        for m in ("hr@1", "hr@5", "mrr"):
            lo, hi = res.intervals[m]
            assert lo <= chance[m] <= hi, (p, m, res.metrics[m], chance[m])
            assert abs(res.metrics[m] - chance[m]) < 0.08


def test_content_ranker_is_unaffected(examples_target_first):
    ex = examples_target_first
    one, bias1 = _score_permuted(ex, _content_scores, 1)
    three, bias3 = _score_permuted(ex, _content_scores, 3)
    assert one.ranks.tolist() == three.ranks.tolist()
    assert one.metrics == three.metrics
    assert 0.3 < one.metrics["hr@1"] < 1.0
    # presented with the target at A it looks position-biased; shuffled it does not
    assert abs(bias3["profile_correlation_mean"]) < 0.3
    assert bias3["top1_tv_from_uniform"] < 0.15


def test_position_bias_statistics_by_hand():
    rows = [[3.0, 1.0, 2.0], [5.0, 4.0, 4.5], [1.0, 1.0, 1.0]]
    b = position_bias(rows)
    assert b["top1_counts"] == [3, 0, 0] and b["top1_modal_share"] == 1.0
    assert b["constant"] == 1 and b["profile_correlation_n"] == 2
    assert b["top1_tv_from_uniform"] == pytest.approx(2 / 3)
    # vector 0 against vector 1's centred profile (and vice versa): same shape -> 1.0
    assert b["profile_correlation_mean"] == pytest.approx(1.0)


class PositionModel(torch.nn.Module):
    """A causal LM that ignores its input: the same logits everywhere, letter A highest, then B, ..."""

    def __init__(self, vocab: int, letter_ids: list[int]) -> None:
        super().__init__()
        bias = torch.zeros(vocab)
        bias[torch.tensor(letter_ids)] = torch.arange(len(letter_ids), 0, -1, dtype=torch.float32)
        self.bias = torch.nn.Parameter(bias)

    def forward(self, input_ids, attention_mask=None):
        return self.bias.expand(*input_ids.shape, -1)


@pytest.fixture(scope="module")
def tok():
    from layerwise_dist.models.teacher import load_tokenizer

    return load_tokenizer(TeacherConfig(model="tiny"))


def test_system_prompt_is_in_the_tokens_and_the_cache_key(examples_target_first, tok, tmp_path):
    from layerwise_dist.data import tokenize_examples

    ex = examples_target_first[:3]
    plain = tokenize_examples(ex, tok, DataConfig(num_candidates=C), cache_dir=tmp_path)
    custom = tokenize_examples(ex, tok, DataConfig(num_candidates=C, system_prompt="Rank games."), cache_dir=tmp_path)
    a, b = tok.decode(plain[0]["input_ids"]), tok.decode(custom[0]["input_ids"])
    assert "named SmolLM" in a and "Rank games." not in a
    assert b.startswith("<|im_start|>system\nRank games.<|im_end|>") and "named SmolLM" not in b
    assert a.split("<|im_end|>", 1)[1] == b.split("<|im_end|>", 1)[1]
    assert plain[0]["target_index"] == custom[0]["target_index"] == 0


def test_position_model_through_tokens_and_evaluation(examples_target_first, tok, tmp_path):
    """The real path (prompts, tokens, letter log-probs): a letter-A model is at chance once permuted."""
    from layerwise_dist.data import collate, label_token_ids, tokenize_examples

    cfg = DataConfig(num_candidates=C, history_len=3, title_max_tokens=6, cache_dir=str(tmp_path))
    ex = examples_target_first[:120]
    model = PositionModel(len(tok), label_token_ids(tok, C))
    out = {}
    for p in (1, 4):
        expanded, orders = permute_examples(ex, p, seed=0)
        ds = tokenize_examples(expanded, tok, cfg, cache_dir=tmp_path)
        batches = [
            collate([ds[j] for j in range(i, min(i + 16, len(ds)))], tok.pad_token_id) for i in range(0, len(ds), 16)
        ]
        res = evaluate_per_example(model, batches, ks=[1, 5], progress=False)
        bias = position_bias(res.scores)
        summed = aggregate_permutation_scores(res.scores, orders)
        out[p] = (result_from_scores(summed, [e.target_index for e in ex], [1, 5]), bias)
    assert out[1][0].metrics["hr@1"] == 1.0 and out[1][1]["top1_modal_share"] == 1.0
    assert out[4][1]["profile_correlation_mean"] == pytest.approx(1.0)
    lo, hi = out[4][0].intervals["hr@1"]
    assert lo <= 1 / C <= hi and out[4][0].metrics["hr@1"] < 0.25
