"""Position bias of a listwise ranker: shown, and corrected by permutation (LLMRank's bootstrapping).

A listwise prompt puts candidates behind letters A, B, C...; a small model often
prefers a letter whatever stands behind it (zero-shot SmolLM2 answers "A" for every
user). Two statistics of the score vectors **in presented order** (position q = the
q-th letter) show it:

* ``top1``: the distribution of the top-scored position (counts and shares per
  position, the modal position and its share, and the total-variation distance of
  the shares from uniform, 0 = no preferred position, 1 - 1/C = always the same one).
* ``profile_correlation``: the Pearson correlation of each score vector with the
  mean position profile of the OTHER vectors (leave-one-out, so a vector is not
  compared with itself); each vector is centred first. A ranker that scores by
  position alone has correlation 1; one that scores by content alone has about 0
  (the candidates are shuffled, so content is unrelated to position). Constant
  vectors (no preference) have no correlation and are counted in ``constant``.

Correction (``eval.permutations=P``, P >= 2): every example is scored under P candidate
orders, each a permutation drawn with ``random.Random(stable_seed(seed,
"permutation", user, split, position, p))`` (P = 1 is the order as built, nothing
drawn: the original order is NOT one of the P >= 2, so a target placed first by the
candidate file gains nothing); a candidate's final score is the sum
of its P scores (log-probabilities for a listwise model: the product of its
probabilities), and the target's rank is taken on the sums. It costs P prompts per
example; :func:`permutation_cost` reports it. A position-only ranker then ranks at
chance level whatever the target's position; a content ranker's ranking does not
change (its P scores are equal).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from typing import Any

import numpy as np

from .data.examples import stable_seed
from .data.prompts import RankExample

__all__ = [
    "aggregate_permutation_scores",
    "permutation_cost",
    "permutation_orders",
    "permute_examples",
    "position_bias",
]


def permutation_orders(examples: Sequence[RankExample], permutations: int, seed: int) -> list[list[list[int]]]:
    """``orders[i][p][q]`` = the index (in example i's candidate list) of the candidate shown at position q
    under permutation p. Seeded per example (user, split, target position), so any subset of the
    examples gets the same orders. ``permutations=1``: the identity (the order as built)."""
    if not isinstance(permutations, int) or permutations < 1:
        raise ValueError(f"permutations must be a positive integer; got {permutations!r}")
    if permutations == 1:
        return [[list(range(len(ex.candidates)))] for ex in examples]
    out = []
    for ex in examples:
        where = ex.meta.get("position", 0)
        orders = []
        for p in range(permutations):
            order = list(range(len(ex.candidates)))
            random.Random(stable_seed(seed, "permutation", ex.user_id, ex.split, where, p)).shuffle(order)
            orders.append(order)
        out.append(orders)
    return out


def permute_examples(
    examples: Sequence[RankExample], permutations: int, seed: int
) -> tuple[list[RankExample], list[list[list[int]]]]:
    """(the P reordered copies of every example, example by example: ``expanded[i * P + p]``; the orders)."""
    orders = permutation_orders(examples, permutations, seed)
    expanded = []
    for ex, ex_orders in zip(examples, orders):
        for p, order in enumerate(ex_orders):
            expanded.append(
                dataclasses.replace(
                    ex,
                    candidates=[ex.candidates[j] for j in order],
                    candidate_titles=[ex.candidate_titles[j] for j in order],
                    target_index=order.index(ex.target_index),
                    meta={**ex.meta, "permutation": p},
                )
            )
    return expanded, orders


def aggregate_permutation_scores(
    expanded_scores: Sequence[Sequence[float]] | np.ndarray, orders: Sequence[Sequence[Sequence[int]]]
) -> list[np.ndarray]:
    """Per example, each candidate's scores summed over its P presentations, in the example's own order.

    ``expanded_scores[i * P + p][q]`` is the score of the candidate shown at position q of
    permutation p of example i; ``orders`` as from :func:`permutation_orders`."""
    expected = sum(len(ex_orders) for ex_orders in orders)
    if expected != len(expanded_scores):
        raise ValueError(f"{len(expanded_scores)} scored vectors for {expected} permuted examples")
    out = []
    k = 0
    for ex_orders in orders:
        total = np.zeros(len(ex_orders[0]), dtype=np.float64)
        for order in ex_orders:
            row = np.asarray(expanded_scores[k], dtype=np.float64)
            if row.shape != (len(order),):
                raise ValueError(f"scored vector {k} has {row.shape[0]} values for {len(order)} candidates")
            total[np.asarray(order)] += row
            k += 1
        out.append(total)
    return out


def position_bias(position_scores: Sequence[Sequence[float]] | np.ndarray) -> dict[str, Any]:
    """Top-1 position distribution and correlation with the mean position profile (module docstring).

    ``position_scores``: score vectors in presented order. With mixed candidate counts the
    statistics use the vectors of the most common count (``vectors`` says how many)."""
    rows = [np.asarray(r, dtype=np.float64) for r in position_scores]
    if not rows:
        raise ValueError("position_bias needs at least one score vector")
    widths: dict[int, int] = {}
    for r in rows:
        widths[len(r)] = widths.get(len(r), 0) + 1
    c = max(widths, key=lambda w: (widths[w], w))
    m = np.stack([r for r in rows if len(r) == c])
    n = m.shape[0]
    counts = np.bincount(m.argmax(axis=1), minlength=c)
    shares = counts / n
    centred = m - m.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1)
    constant = norms <= 1e-12 * np.maximum(1.0, np.abs(m).max(axis=1))
    out: dict[str, Any] = {
        "candidates": c,
        "vectors": n,
        "top1_counts": counts.tolist(),
        "top1_shares": shares.tolist(),
        "top1_modal_position": int(counts.argmax()),
        "top1_modal_share": float(shares.max()),
        "top1_chance_share": 1.0 / c,
        "top1_tv_from_uniform": float(0.5 * np.abs(shares - 1.0 / c).sum()),
        "mean_profile": centred.mean(axis=0).tolist(),
        "constant": int(constant.sum()),
    }
    corr = np.full(n, np.nan)
    if n > 1:
        total = centred.sum(axis=0)
        for i in np.flatnonzero(~constant):
            other = (total - centred[i]) / (n - 1)
            on = np.linalg.norm(other)
            if on > 1e-12:
                corr[i] = float(centred[i] @ other / (norms[i] * on))
    valid = corr[np.isfinite(corr)]
    out["profile_correlation_mean"] = float(valid.mean()) if valid.size else None
    out["profile_correlation_median"] = float(np.median(valid)) if valid.size else None
    out["profile_correlation_n"] = int(valid.size)
    return out


def permutation_cost(examples: int, permutations: int, seconds: float, tokens_per_prompt: float) -> dict[str, Any]:
    """What P orders cost: prompts scored (examples x P), the factor over one order, time and tokens."""
    return {
        "permutations": permutations,
        "examples": examples,
        "prompts_scored": examples * permutations,
        "cost_factor": float(permutations),
        "seconds": seconds,
        "tokens_per_prompt_mean": tokens_per_prompt,
        "tokens_scored": tokens_per_prompt * examples * permutations,
    }
