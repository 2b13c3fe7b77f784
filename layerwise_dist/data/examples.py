"""Candidate-ranking examples (LlamaRec / LLMRank style) from a leave-one-out split.

For a target item the example shows the last ``history_len`` items before it and
``num_candidates`` candidates (``train_candidates`` in training examples, when set): the target plus negatives sampled from items the
user never touched (in train, valid or test), uniformly or by train popularity,
then shuffled. All randomness comes from a per-example RNG seeded with a stable
hash of ``(seed, user_id, split, position)`` (BLAKE2b, never Python's ``hash()``), so
every rank and every run builds the same examples, in the same order.

Targets per split:

- train: the last ``train_targets_per_user`` items of the train sequence (at least
  one, each needs one earlier item as history), history = the train items before it;
- valid: the valid item, history = the whole train sequence;
- test: the test item, history = train + valid.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from typing import Any

from ..config import DataConfig
from .errors import DataError
from .prompts import RankExample, TitleCutter
from .splits import SplitData

SPLITS = ("train", "valid", "test")


def stable_seed(*parts: Any) -> int:
    """A 64-bit seed from the parts' text (identical across processes, machines and runs)."""
    text = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


class NegativeSampler:
    """Samples ``n`` distinct items outside a user's ``touched`` set, uniform or by popularity."""

    def __init__(self, items: list[str], mode: str, counts: dict[str, int] | None = None) -> None:
        if mode not in ("uniform", "popularity"):
            raise DataError(f"negative sampling must be uniform or popularity; got {mode!r}")
        self.items = items
        self.mode = mode
        if mode == "popularity":
            # +1 so items seen only in valid/test can still be drawn.
            counts = counts or {}
            total, cum = 0, []
            for item in items:
                total += counts.get(item, 0) + 1
                cum.append(total)
            self.cum, self.total = cum, total

    def sample(self, rng: random.Random, touched: set[str], n: int, who: str) -> list[str]:
        free = len(self.items) - len(touched)
        if free < n:
            raise DataError(f"user {who}: only {free} untouched items for {n} negatives (lower data.num_candidates)")
        chosen: list[str] = []
        taken: set[str] = set()
        for _ in range(50 * n + 100):
            if len(chosen) == n:
                return chosen
            if self.mode == "uniform":
                item = self.items[int(rng.random() * len(self.items))]
            else:
                item = self.items[bisect.bisect_right(self.cum, rng.random() * self.total)]
            if item not in touched and item not in taken:
                taken.add(item)
                chosen.append(item)
        # Rejection is slow only when the user touched most of the mass: draw from what is left.
        rest = [x for x in self.items if x not in touched and x not in taken]
        if self.mode == "uniform":
            chosen += rng.sample(rest, n - len(chosen))
        else:
            counts = [self.cum[0]] + [b - a for a, b in zip(self.cum, self.cum[1:])]
            weight = dict(zip(self.items, counts))
            while len(chosen) < n:
                pick = rng.choices(rest, weights=[weight[x] for x in rest])[0]
                rest.remove(pick)
                chosen.append(pick)
        return chosen


def split_targets(splits: SplitData, split: str, user: str, per_user: int = 1) -> list[tuple[int, list[str], str]]:
    """(position, history, target) triples of one user for one split: THE history rule.

    ``position`` is the target's index in the user's whole sequence (train + valid +
    test) and ``history`` every item before it, oldest first (a prompt shows its last
    ``history_len``). valid: one triple, history = train; test: one triple, history =
    train + valid; train: the last ``per_user`` train items (each with at least one
    earlier item). :func:`build_examples` and
    :func:`layerwise_dist.data.candidates.examples_from_candidates` both use it.
    """
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    train = splits.train[user]
    if split == "valid":
        return [(len(train), train, splits.valid[user])]
    if split == "test":
        return [(len(train) + 1, [*train, splits.valid[user]], splits.test[user])]
    first = max(1, len(train) - per_user)
    return [(p, train[:p], train[p]) for p in range(first, len(train))]


def make_example(
    splits: SplitData,
    split: str,
    user: str,
    history: list[str],
    candidates: list[str],
    target: str,
    cfg: DataConfig,
    cut: TitleCutter,
    meta: dict[str, Any] | None = None,
) -> RankExample:
    """A :class:`RankExample` showing the last ``cfg.history_len`` items of ``history`` and ``candidates``
    in the given order (``target`` must be one of them), titles cut by ``cut``."""
    shown = history[-cfg.history_len :]
    return RankExample(
        user_id=user,
        history=shown,
        history_titles=cut.many(shown, splits.titles),
        candidates=candidates,
        candidate_titles=cut.many(candidates, splits.titles),
        target_index=candidates.index(target),
        split=split,
        category=splits.category,
        meta=dict(meta or {}),
    )


def build_examples(
    splits: SplitData, split: str, cfg: DataConfig, tokenizer: Any = None, users: Any = None
) -> list[RankExample]:
    """Ranking examples of ``split`` (train, valid or test), users in split order.

    Titles are cut to ``cfg.title_max_tokens`` tokens of ``tokenizer`` (whitespace
    words when None). ``cfg.max_train_examples`` / ``cfg.max_eval_examples`` keep a
    seeded subset (the examples with the smallest stable hash, in their original
    order; a smaller limit gives a subset of a larger one). ``users`` (optional): only
    these users' examples, with no subset limit; each is the same example as in the
    full list (every example's candidates come from its own seeded RNG).
    """
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    sampler = NegativeSampler(
        splits.all_items,
        cfg.negative_sampling,
        splits.item_counts() if cfg.negative_sampling == "popularity" else None,
    )
    cut = TitleCutter(tokenizer, cfg.title_max_tokens)
    n_neg = (cfg.train_candidates if split == "train" and cfg.train_candidates else cfg.num_candidates) - 1
    per_user = cfg.train_targets_per_user
    limit = cfg.max_train_examples if split == "train" else cfg.max_eval_examples
    if users is not None:
        unknown = [u for u in users if u not in splits.train]
        if unknown:
            raise DataError(f"user {unknown[0]} is not in the loaded data ({len(splits.train)} users)")
        wanted_users = set(users)
        limit = 0
    keys: list[tuple[str, int]] = [
        (user, pos)
        for user in splits.train
        if users is None or user in wanted_users
        for pos, _, _ in split_targets(splits, split, user, per_user)
    ]
    if limit and limit < len(keys):
        ranked = sorted(keys, key=lambda k: (stable_seed(cfg.seed, "subset", split, *k), k))
        chosen = set(ranked[:limit])
        keys = [k for k in keys if k in chosen]
    wanted: dict[str, set[int]] = {}
    for user, pos in keys:
        wanted.setdefault(user, set()).add(pos)

    examples = []
    for user, positions in wanted.items():
        touched = set(splits.sequence(user))
        for pos, history, target in split_targets(splits, split, user, per_user):
            if pos not in positions:
                continue
            rng = random.Random(stable_seed(cfg.seed, user, split, pos))
            candidates = [target, *sampler.sample(rng, touched, n_neg, user)]
            rng.shuffle(candidates)
            examples.append(make_example(splits, split, user, history, candidates, target, cfg, cut, {"position": pos}))
    if not examples:
        raise DataError(f"no {split} examples: every user's train sequence is too short")
    return examples
