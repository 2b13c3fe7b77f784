"""The one data-parallel split of examples across ranks, for every stage.

Fisher, training, validation and evaluation all take their batches from a
:class:`RankSampler`. Two rules decide its shape:

* ``equal_batches=True`` (Fisher, training, validation): every rank gets the same
  number of full batches, because ZeRO-3 forwards are collective (a rank with one
  batch more would wait forever for the others). The remainder is dropped.
* ``equal_batches=False`` (evaluation of replicated models): every example is
  scored exactly once; ranks may differ by a batch and the last batch may be short.

With ``shuffle=True`` the order of an epoch is a permutation drawn from
``(seed, epoch)`` only, identical on every rank, so batch ``i`` of the run is a
pure function of the seed and ``i``: a resumed run needs only its step number to
continue on exactly the data an uninterrupted run would have seen.

With ``lengths`` as well (``train.group_by_length``), each rank's share of the epoch is cut into groups of
:data:`GROUP_BATCHES` batches; a group's examples are batched longest first and its batches then put in an
order drawn from ``(seed, epoch)``, the same on every rank. A rank trains on the same examples as without
``lengths``, but a batch pads less and the ranks' batches at one step are alike in length, so a step waits
less for the slower rank (HF Trainer's ``group_by_length`` does the first half of this). Still a pure
function of the seed and the batch index.

Scoring (evaluation, the learning curve's ranking) may regroup a rank's batches by length
(:func:`length_sorted`): the same examples in batches of the same sizes, so each batch pads to
about its own examples' length; ``evaluate_per_example(positions=...)`` puts the per-example
results back in dataset order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import DataError

GROUP_BATCHES = 16  # batches per length group (``lengths``): the longer, the less padding, the less random a step


@dataclass(frozen=True)
class RankSampler:
    """This rank's batches of ``num_examples`` examples (indices into the dataset)."""

    num_examples: int
    batch_size: int
    rank: int = 0
    world_size: int = 1
    shuffle: bool = False
    seed: int = 0
    equal_batches: bool = True
    lengths: tuple[int, ...] | None = None  # each example's tokens: with shuffle, batches grouped by length

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise DataError(f"RankSampler needs 0 <= rank < world_size; got rank={self.rank}, world={self.world_size}")
        if self.batch_size < 1:
            raise DataError(f"RankSampler batch_size must be >= 1; got {self.batch_size}")
        if self.lengths is not None:
            if len(self.lengths) != self.num_examples:
                raise DataError(f"RankSampler got {len(self.lengths)} lengths for {self.num_examples} examples")
            if not (self.shuffle and self.equal_batches):
                raise DataError("RankSampler groups by length only the shuffled, equal batches of training")
        if self.equal_batches and self.batches_per_epoch == 0:
            raise DataError(
                f"{self.num_examples} examples cannot give each of {self.world_size} ranks "
                f"a full batch of {self.batch_size}"
            )

    @classmethod
    def for_rank(cls, num_examples: int, batch_size: int, **kwargs: Any) -> RankSampler:
        """A sampler for this process's rank and world size (the process group, or a group of one)."""
        from ..distributed import rank, world_size

        return cls(num_examples, batch_size, rank=rank(), world_size=world_size(), **kwargs)

    @property
    def batches_per_epoch(self) -> int:
        if self.equal_batches:
            return (self.num_examples // self.world_size) // self.batch_size
        return -(-len(self._share(0)) // self.batch_size)

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_examples))
        import torch

        # The same permutation on every rank: each takes its own slice of it.
        gen = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
        return torch.randperm(self.num_examples, generator=gen).tolist()

    def _share(self, epoch: int) -> list[int]:
        order = self._order(epoch)
        if self.equal_batches:
            per = self.num_examples // self.world_size
            return order[self.rank * per : (self.rank + 1) * per]
        per = -(-self.num_examples // self.world_size)
        return order[self.rank * per : min(self.num_examples, (self.rank + 1) * per)]

    def epoch_batches(self, epoch: int = 0) -> list[list[int]]:
        """Every batch of one epoch on this rank, in order."""
        share = self._share(epoch)
        bs = self.batch_size
        if self.equal_batches:
            share = share[: self.batches_per_epoch * bs]
        if self.lengths is not None:
            return self._length_grouped(share, epoch)
        return [share[i : i + bs] for i in range(0, len(share), bs)]

    def _length_grouped(self, share: list[int], epoch: int) -> list[list[int]]:
        """``share`` (whole batches) in groups of GROUP_BATCHES batches, each batched longest first (ties in
        share order), its batches in an order drawn from ``(seed, epoch)``: every rank draws the same orders,
        so at each step the ranks hold their groups' batches of the same length rank."""
        import torch

        lengths, bs = self.lengths, self.batch_size
        gen = torch.Generator().manual_seed(self.seed * 1000003 + epoch + 7919)
        out: list[list[int]] = []
        size = GROUP_BATCHES * bs
        for start in range(0, len(share), size):
            group = sorted(share[start : start + size], key=lambda i: -lengths[i])
            batches = [group[i : i + bs] for i in range(0, len(group), bs)]
            out.extend(batches[j] for j in torch.randperm(len(batches), generator=gen).tolist())
        return out

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.epoch_batches(0))

    def __len__(self) -> int:
        return self.batches_per_epoch

    def batch(self, index: int) -> list[int]:
        """Batch ``index`` counted from the start of the run over all epochs (for step-indexed loops)."""
        epoch, pos = divmod(index, self.batches_per_epoch)
        return self.epoch_batches(epoch)[pos]


def seeded_sample(items: Sequence[Any], n: int, seed: int) -> list[Any]:
    """``n`` of ``items`` drawn with ``seed`` and kept in their order (all of them when ``n`` is 0 or not
    fewer): the rule that picks a run's evaluation users, so every model and baseline of a run, and every
    run with the same data and seed, scores the same users."""
    if not n or n >= len(items):
        return list(items)
    import random

    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), n))]


def example_length(example: Any) -> int:
    """The tokens an example's row holds in a batch: a pointwise example's prefix and candidates (packed in one
    row), else its ``input_ids``."""
    if example.get("prefix_ids") is not None and example.get("candidate_ids") is not None:
        return len(example["prefix_ids"]) + sum(len(c) for c in example["candidate_ids"])
    return len(example["input_ids"])


def length_sorted(batches: Sequence[Sequence[int]], data: Sequence[Any]) -> list[list[int]]:
    """The examples of ``batches`` regrouped longest first into batches of the same sizes (so a rank passes
    as many batches as before: ZeRO-3 forwards stay collective), ties in their order.

    A batch is padded to its longest row: on the experiment's Video_Games users (packed rows of 264-532
    tokens) batches of 4 in dataset order are 11.0% padding, sorted ones 0.2%, and score 1.10x faster
    (``benchmarks/bench_eval_length_sorted.py``). Only for scoring, whose per-example results are put back
    in order (``evaluate_per_example(positions=...)``); training keeps its seeded order."""
    flat = [int(i) for b in batches for i in b]
    order = sorted(flat, key=lambda i: -example_length(data[i]))
    out, start = [], 0
    for b in batches:
        out.append(order[start : start + len(b)])
        start += len(b)
    return out


def load_batch(data: Sequence[dict[str, Any]], indices: Sequence[int], pad_token_id: int, device: Any = None) -> dict:
    """Collate the examples at ``indices`` into one padded batch, moved to ``device`` when given."""
    from .tokenize import collate

    batch = collate([data[i] for i in indices], pad_token_id)
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    return batch
