"""Candidate retrieval for serving: a short list of items for the LLM to re-rank.

Scoring every untouched item with the LLM does not survive a real catalogue, so
:class:`~layerwise_dist.recommender.BaseRecommender` first proposes a candidate set
of ``serve.num_candidates`` items from two cheap sources, each candidate marked with
the source that proposed it:

``co-occurrence``
    Item-to-item counts over the **training** interactions (``SplitData.train``; the
    held-out valid/test items never build the index). In every user's chronological
    sequence, item ``b`` at position ``j`` and item ``a`` at position ``i < j`` with
    ``j - i <= serve.cooccurrence_window`` add ``1 / (j - i)`` to ``C[a][b]`` (``b``
    followed ``a``) and ``serve.backward_weight / (j - i)`` to ``C[b][a]`` (``a``
    came before ``b``). A user's candidate ``c`` scores

        sum over the last ``serve.seed_items`` history items h (r = 0 for the most recent)
            of ``serve.recency_decay ** r * C[h][c] / sqrt(n_h * n_c)``

    with ``n`` the items' training counts (cosine-style normalisation, so that
    popular items do not win every list on their count alone).
``popularity``
    The most frequent training items, proposed for a cold user (no history item
    with a co-occurring neighbour) and to fill the list up when co-occurrence
    proposes fewer than ``num_candidates`` items.

Items the user already touched are never proposed. Ties are broken by training
count, then by catalogue order, so the candidate list is deterministic.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from layerwise_dist.config import ServeConfig
    from layerwise_dist.data import SplitData

COOCCURRENCE = "co-occurrence"
POPULARITY = "popularity"
SOURCES: tuple[str, ...] = (COOCCURRENCE, POPULARITY)

__all__ = [
    "COOCCURRENCE",
    "POPULARITY",
    "SOURCES",
    "Candidate",
    "CandidateRetriever",
    "RetrievalError",
    "hit_rate",
]


class RetrievalError(ValueError):
    """Bad retrieval settings or request."""


@dataclass(frozen=True)
class Candidate:
    """A proposed item: its id, the source that proposed it and that source's score
    (normalised co-occurrence weight, or training count for ``popularity``)."""

    item_id: str
    source: str
    retrieval_score: float


class CandidateRetriever:
    """Co-occurrence + popularity candidate generation from chronological training sequences.

    Args:
        sequences: user -> items, oldest first (the training interactions).
        catalogue: every servable item in a fixed order (ties are broken by it);
            default: items in first-appearance order of ``sequences``.
        window, backward_weight, seed_items, recency_decay: see the module docstring.
    """

    def __init__(
        self,
        sequences: Mapping[str, Sequence[str]],
        catalogue: Sequence[str] | None = None,
        *,
        window: int = 5,
        backward_weight: float = 0.0,
        seed_items: int = 10,
        recency_decay: float = 0.5,
    ) -> None:
        if window < 1:
            raise RetrievalError(f"co-occurrence window must be >= 1; got {window}")
        if seed_items < 1:
            raise RetrievalError(f"seed_items must be >= 1; got {seed_items}")
        if not 0.0 < recency_decay <= 1.0:
            raise RetrievalError(f"recency_decay must be in (0, 1]; got {recency_decay}")
        if backward_weight < 0:
            raise RetrievalError(f"backward_weight must be >= 0; got {backward_weight}")
        self.window = window
        self.backward_weight = backward_weight
        self.seed_items = seed_items
        self.recency_decay = recency_decay
        self.counts: Counter[str] = Counter()
        for seq in sequences.values():
            self.counts.update(seq)
        if catalogue is None:
            catalogue = list(dict.fromkeys(i for seq in sequences.values() for i in seq))
        self.catalogue = list(dict.fromkeys(catalogue))
        self._order = {item: n for n, item in enumerate(self.catalogue)}
        raw: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for seq in sequences.values():
            for j, b in enumerate(seq):
                for i in range(max(0, j - window), j):
                    a = seq[i]
                    if a == b:
                        continue
                    raw[a][b] += 1.0 / (j - i)
                    if backward_weight:
                        raw[b][a] += backward_weight / (j - i)
        self.neighbours: dict[str, dict[str, float]] = {
            a: {b: w / math.sqrt(self.counts[a] * self.counts[b]) for b, w in row.items()} for a, row in raw.items()
        }
        # Popularity order: training count, then catalogue order (items never trained on come last).
        self.popular = sorted(self.catalogue, key=lambda i: (-self.counts.get(i, 0), self._order[i]))

    @classmethod
    def from_split(cls, split: SplitData, serve: ServeConfig | None = None) -> CandidateRetriever:
        """The retriever of a split's training sequences, with ``serve.*`` settings (defaults: ``ServeConfig()``)."""
        from layerwise_dist.config import ServeConfig

        serve = serve or ServeConfig()
        return cls(
            split.train,
            split.all_items,
            window=serve.cooccurrence_window,
            backward_weight=serve.backward_weight,
            seed_items=serve.seed_items,
            recency_decay=serve.recency_decay,
        )

    def cooccurrence_scores(self, history: Sequence[str]) -> dict[str, float]:
        """Every item co-occurring with the last ``seed_items`` history items -> its summed weight."""
        scores: dict[str, float] = defaultdict(float)
        seeds = list(history)[-self.seed_items :]
        for r, h in enumerate(reversed(seeds)):
            weight = self.recency_decay**r
            for b, w in self.neighbours.get(h, {}).items():
                scores[b] += weight * w
        return dict(scores)

    def retrieve(self, history: Sequence[str], n: int, exclude: Iterable[str] = ()) -> list[Candidate]:
        """Up to ``n`` candidates, best first: co-occurring items, then popular ones to fill up.

        ``exclude`` (and the history itself) is never proposed; fewer than ``n`` come back
        only when the catalogue has fewer items left."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise RetrievalError(f"number of candidates must be a positive integer; got {n!r}")
        banned = set(exclude) | set(history)
        end = len(self._order)
        cooc = self.cooccurrence_scores(history)
        ranked = sorted(
            (b for b in cooc if b not in banned),
            key=lambda b: (-cooc[b], -self.counts.get(b, 0), self._order.get(b, end)),
        )
        out = [Candidate(b, COOCCURRENCE, float(cooc[b])) for b in ranked[:n]]
        chosen = {c.item_id for c in out}
        for item in self.popular:
            if len(out) >= n:
                break
            if item not in banned and item not in chosen:
                out.append(Candidate(item, POPULARITY, float(self.counts.get(item, 0))))
        return out


def hit_rate(
    retriever: CandidateRetriever, split: SplitData, n: int, target: str = "test", users: Sequence[str] | None = None
) -> dict[str, Any]:
    """How often the held-out ``target`` item (``valid`` or ``test``) is among the ``n`` retrieved candidates.

    The query is what a recommender knows before the target: the training sequence
    (plus the valid item for ``test``), with those items excluded, as at serving time.
    Returns ``{"hit_rate", "users", "hits", "from_cooccurrence"}`` where
    ``from_cooccurrence`` counts the hits proposed by co-occurrence."""
    if target not in ("valid", "test"):
        raise RetrievalError(f"target must be valid or test; got {target!r}")
    users = list(split.train) if users is None else list(users)
    if not users:
        raise RetrievalError("no users to measure the hit rate on")
    hits = cooc_hits = 0
    for user in users:
        history = list(split.train[user]) + ([split.valid[user]] if target == "test" else [])
        held = getattr(split, target)[user]
        proposed = {c.item_id: c.source for c in retriever.retrieve(history, n, exclude=history)}
        if held in proposed:
            hits += 1
            cooc_hits += proposed[held] == COOCCURRENCE
    return {"hit_rate": hits / len(users), "users": len(users), "hits": hits, "from_cooccurrence": cooc_hits}
