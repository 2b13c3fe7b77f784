"""Reference rankers on the same examples and candidates as a model: ``random`` and ``popularity``.

Both give per-example values, so their averages get the same bootstrap
intervals as a model's (:mod:`layerwise_dist.evaluation`), and paired differences
against a model are taken on the same examples.

* ``random``: every order of the C candidates equally likely. No draw is made:
  each example's values are the exact expectations over a uniformly random rank r
  in 1..C of the target,

      E[HR@K]   = min(K, C) / C
      E[NDCG@K] = (1/C) * sum_{r=1}^{min(K, C)} 1 / log2(r + 1)
      E[RR]     = (1/C) * sum_{r=1}^{C} 1 / r = H_C / C

  They depend on C only, so with equal candidate counts the interval of the
  average is a point: the expected score of a random ranker has no sampling
  error (one realised random ranking would scatter around it with the binomial
  spread of a model at that level).
* ``popularity``: a candidate's score is its number of interactions in the
  TRAINING sequences only (``SplitData.train``; validation and test items are not
  counted, so the held-out target is not favoured by its own interaction). Items
  never seen in training score 0. Ties count against the target, as in
  evaluation: a target tied with other candidates ranks below all of them.
  Counts tie often (on sparse data most targets share their count with another
  candidate, e.g. 0 for items unseen in training), so the result also carries
  ``random_ties``: the same ranker with ties broken uniformly at random, as exact
  per-example expectations (with g candidates above the target and t others tied
  with it, its rank is uniform on g+1..g+t+1), and ``targets_tied``, the share of
  targets tied with at least one other candidate.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .data.prompts import RankExample
from .data.splits import SplitData
from .evaluation import EvalResult, _check_ks, per_example_metrics, result_from_values, target_ranks

BASELINES = ("random", "popularity")

__all__ = [
    "BASELINES",
    "evaluate_baselines",
    "popularity_result",
    "popularity_scores",
    "random_expected_values",
    "random_result",
    "random_tie_values",
    "train_item_counts",
]


def random_expected_values(num_candidates: Sequence[int], ks: Sequence[int]) -> dict[str, np.ndarray]:
    """Exact per-example expectations of HR@K, NDCG@K and RR under a uniformly random order of C candidates."""
    ks = _check_ks(ks)
    counts = np.asarray(list(num_candidates), dtype=np.int64)
    if counts.ndim != 1 or counts.size == 0 or counts.min() < 1:
        raise ValueError("num_candidates must be a non-empty list of positive counts")
    out: dict[str, np.ndarray] = {}
    expectations: dict[int, dict[str, float]] = {}
    for c in np.unique(counts).tolist():
        r = np.arange(1, c + 1, dtype=np.float64)
        e = {f"hr@{k}": min(k, c) / c for k in ks}
        e |= {f"ndcg@{k}": float((1.0 / np.log2(r[:k] + 1.0)).sum()) / c for k in ks}
        e["mrr"] = float((1.0 / r).sum()) / c
        expectations[c] = e
    for name in [f"hr@{k}" for k in ks] + [f"ndcg@{k}" for k in ks] + ["mrr"]:
        out[name] = np.asarray([expectations[c][name] for c in counts.tolist()], dtype=np.float64)
    return out


def random_tie_values(
    scores: Sequence[np.ndarray], target_index: Sequence[int], ks: Sequence[int]
) -> dict[str, np.ndarray]:
    """Exact per-example expectations of HR@K, NDCG@K and RR when ties are broken uniformly at random."""
    ks = _check_ks(ks)
    if len(scores) != len(target_index):
        raise ValueError(f"{len(scores)} score vectors for {len(target_index)} targets")
    names = [f"hr@{k}" for k in ks] + [f"ndcg@{k}" for k in ks] + ["mrr"]
    out = {name: np.empty(len(scores), dtype=np.float64) for name in names}
    for i, (row, target) in enumerate(zip(scores, target_index)):
        s = np.asarray(row, dtype=np.float64)
        if np.isnan(s).any():
            raise ValueError(f"example {i}: NaN score")
        x = s[int(target)]
        above, tied = int((s > x).sum()), int((s == x).sum()) - 1
        r = np.arange(above + 1, above + tied + 2, dtype=np.float64)  # each equally likely
        for k in ks:
            out[f"hr@{k}"][i] = float((r <= k).mean())
            out[f"ndcg@{k}"][i] = float(np.where(r <= k, 1.0 / np.log2(r + 1.0), 0.0).mean())
        out["mrr"][i] = float((1.0 / r).mean())
    return out


def train_item_counts(splits: SplitData) -> Counter[str]:
    """Interactions per item in the training sequences only."""
    return splits.item_counts()


def popularity_scores(counts: Mapping[str, int], examples: Sequence[RankExample]) -> list[np.ndarray]:
    """Each example's candidate scores: the candidate's training interaction count (0 if unseen)."""
    return [np.asarray([float(counts.get(item, 0)) for item in ex.candidates], dtype=np.float64) for ex in examples]


def _check_examples(examples: Sequence[RankExample]) -> None:
    if not examples:
        raise ValueError("no examples: baselines need the examples the models were scored on")
    for ex in examples:
        if not 0 <= ex.target_index < len(ex.candidates):
            raise ValueError(f"user {ex.user_id}: target_index {ex.target_index} outside its {len(ex.candidates)}")


def random_result(
    examples: Sequence[RankExample], ks: Sequence[int] = (1, 5, 10, 20), n_boot: int = 1000, seed: int = 0
) -> EvalResult:
    """The ``random`` baseline (exact expectations, see the module docstring) on ``examples``."""
    _check_examples(examples)
    values = random_expected_values([len(ex.candidates) for ex in examples], ks)
    return result_from_values(values, ks, n_boot, seed, extra={"baseline": "random", "exact_expectation": True})


def popularity_result(
    splits: SplitData,
    examples: Sequence[RankExample],
    ks: Sequence[int] = (1, 5, 10, 20),
    n_boot: int = 1000,
    seed: int = 0,
) -> EvalResult:
    """The ``popularity`` baseline (training interaction counts, ties against the target) on ``examples``;
    ``extra["random_ties"]`` is its summary with ties broken at random, ``extra["targets_tied"]`` how often."""
    _check_examples(examples)
    ks = _check_ks(ks)
    scores = popularity_scores(train_item_counts(splits), examples)
    ranks = np.asarray(
        [
            int(target_ranks(torch.from_numpy(s)[None], torch.tensor([ex.target_index]))[0])
            for s, ex in zip(scores, examples)
        ],
        dtype=np.int64,
    )
    values = per_example_metrics(ranks, ks)
    targets = [ex.target_index for ex in examples]
    ties = result_from_values(random_tie_values(scores, targets, ks), ks, n_boot, seed).summary()
    tied = float(np.mean([(s == s[t]).sum() > 1 for s, t in zip(scores, targets)]))
    extra = {"baseline": "popularity", "counts": "train", "random_ties": ties, "targets_tied": tied}
    result = result_from_values(values, ks, n_boot, seed, extra=extra)
    result.ranks = ranks
    widths = {len(s) for s in scores}
    result.scores = np.stack(scores).astype(np.float32) if len(widths) == 1 else [s.astype(np.float32) for s in scores]
    result.target_index = np.asarray([ex.target_index for ex in examples], dtype=np.int64)
    return result


def evaluate_baselines(
    splits: SplitData,
    examples: Sequence[RankExample],
    ks: Sequence[int] = (1, 5, 10, 20),
    names: Sequence[str] = BASELINES,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, EvalResult]:
    """Baseline results on exactly ``examples`` (their candidates and targets), by name.

    ``splits`` is the split the examples were built from (its training sequences give
    the popularity counts). Each value is an :class:`~layerwise_dist.evaluation.EvalResult`:
    ``.metrics`` (HR@K, NDCG@K, MRR, n), ``.intervals`` (95% bootstrap over examples,
    the same ``n_boot``/``seed`` as a model's), ``.values`` (per example) and
    ``.summary()`` for JSON.
    """
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; expected some of {BASELINES}")
    out: dict[str, EvalResult] = {}
    for name in names:
        if name == "random":
            out[name] = random_result(examples, ks, n_boot, seed)
        else:
            out[name] = popularity_result(splits, examples, ks, n_boot, seed)
    return out


def baseline_summaries(results: Mapping[str, EvalResult]) -> dict[str, dict[str, Any]]:
    """``{name: result.summary()}`` (JSON-friendly)."""
    return {name: r.summary() for name, r in results.items()}
