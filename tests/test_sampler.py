"""The one data-parallel layer: RankSampler, used by Fisher, training, validation and evaluation."""

from __future__ import annotations

import pytest
import torch

from layerwise_dist.data import DataError, RankSampler


def _all_ranks(n: int, bs: int, world: int, **kw) -> list[list[list[int]]]:
    return [RankSampler(n, bs, rank=r, world_size=world, **kw).epoch_batches() for r in range(world)]


@pytest.mark.parametrize(("n", "bs", "world"), [(10, 2, 3), (16, 4, 2), (7, 1, 2), (33, 5, 4)])
def test_equal_batches_same_count_disjoint_full(n, bs, world):
    ranks = _all_ranks(n, bs, world)
    counts = {len(b) for b in ranks}
    assert counts == {(n // world) // bs}  # same number of batches on every rank (collective forwards)
    assert all(len(batch) == bs for b in ranks for batch in b)  # full batches only
    seen = [i for b in ranks for batch in b for i in batch]
    assert len(seen) == len(set(seen)) and set(seen) <= set(range(n))


@pytest.mark.parametrize(("n", "bs", "world"), [(10, 3, 3), (5, 4, 2), (1, 4, 2), (17, 4, 4), (0, 2, 2)])
def test_evaluation_split_scores_every_example_once(n, bs, world):
    ranks = _all_ranks(n, bs, world, equal_batches=False)
    seen = [i for b in ranks for batch in b for i in batch]
    assert seen == list(range(n))  # contiguous blocks in rank order, nothing dropped or repeated
    assert all(0 < len(batch) <= bs for b in ranks for batch in b)


def test_shuffle_same_permutation_on_every_rank_and_new_each_epoch():
    n, bs, world, seed = 24, 3, 2, 7
    samplers = [RankSampler(n, bs, rank=r, world_size=world, shuffle=True, seed=seed) for r in range(world)]
    for epoch in range(3):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + epoch)).tolist()
        for r, s in enumerate(samplers):
            flat = [i for batch in s.epoch_batches(epoch) for i in batch]
            assert flat == perm[r * (n // world) : (r + 1) * (n // world)]
    assert samplers[0].epoch_batches(0) != samplers[0].epoch_batches(1)


def test_step_indexed_batches_run_across_epochs_and_resume_exactly():
    s = RankSampler(10, 2, rank=1, world_size=2, shuffle=True, seed=3)
    per_epoch = len(s)
    assert per_epoch == 2  # 5 examples per rank -> 2 full batches, 1 dropped
    run = [s.batch(i) for i in range(7)]
    assert run[:per_epoch] == s.epoch_batches(0) and run[per_epoch : 2 * per_epoch] == s.epoch_batches(1)
    # A resumed run rebuilds the sampler from the config and asks for the same step: same batch.
    resumed = RankSampler(10, 2, rank=1, world_size=2, shuffle=True, seed=3)
    assert [resumed.batch(i) for i in range(4, 7)] == run[4:7]


def test_bad_shapes_are_clear_errors():
    with pytest.raises(DataError, match="rank"):
        RankSampler(10, 2, rank=2, world_size=2)
    with pytest.raises(DataError, match="cannot give each of 2 ranks a full batch of 4"):
        RankSampler(7, 4, rank=0, world_size=2)
    with pytest.raises(DataError, match="batch_size"):
        RankSampler(7, 0)


def test_seeded_sample_keeps_order_and_depends_on_the_seed_only():
    from layerwise_dist.data import seeded_sample

    items = [f"user{i}" for i in range(200)]
    a = seeded_sample(items, 30, seed=1234)
    assert len(a) == 30 and len(set(a)) == 30
    assert a == sorted(a, key=items.index)  # split order, not draw order
    assert a == seeded_sample(list(items), 30, seed=1234)  # a pure function of (items, n, seed)
    assert a != seeded_sample(items, 30, seed=1235)
    assert seeded_sample(items, 0, seed=1) == items  # 0: every item
    assert seeded_sample(items, 500, seed=1) == items  # more than there are: every item


def _padded_cost(samplers, lengths, steps):
    """Tokens a step costs when every rank waits for the slowest: max over ranks of batch size x longest row."""
    return sum(max(len(b) * max(lengths[i] for i in b) for b in (s.batch(k) for s in samplers)) for k in range(steps))


def test_length_grouped_batches_train_each_rank_on_the_same_examples_with_less_padding():
    import random

    from layerwise_dist.data.sampler import GROUP_BATCHES

    rnd = random.Random(3)
    n, bs, world = 403, 2, 2  # 403: a remainder dropped, a last group shorter than GROUP_BATCHES
    lengths = tuple(rnd.randint(60, 340) for _ in range(n))
    plain = [RankSampler(n, bs, rank=r, world_size=world, shuffle=True, seed=5) for r in range(world)]
    grouped = [
        RankSampler(n, bs, rank=r, world_size=world, shuffle=True, seed=5, lengths=lengths) for r in range(world)
    ]
    for epoch in (0, 1):
        for p, g in zip(plain, grouped):
            pb, gb = p.epoch_batches(epoch), g.epoch_batches(epoch)
            assert len(gb) == len(pb) and all(len(b) == bs for b in gb)
            assert sorted(i for b in gb for i in b) == sorted(i for b in pb for i in b)  # the same examples
            assert gb != pb
        # within a group the ranks' batches at a step hold the same length rank of their groups
        for start in range(0, len(pb), GROUP_BATCHES):
            ranks_at_step = []
            for g in grouped:
                group = g.epoch_batches(epoch)[start : start + GROUP_BATCHES]
                order = sorted(range(len(group)), key=lambda j: -max(lengths[i] for i in group[j]))
                ranks_at_step.append([order.index(j) for j in range(len(group))])
            assert ranks_at_step[0] == ranks_at_step[1]
    # a batch index alone fixes the batch (resume), across epochs too
    again = RankSampler(n, bs, rank=1, world_size=world, shuffle=True, seed=5, lengths=lengths)
    assert [again.batch(k) for k in (0, 7, 150, 250)] == [grouped[1].batch(k) for k in (0, 7, 150, 250)]
    steps = plain[0].batches_per_epoch
    assert _padded_cost(grouped, lengths, steps) < 0.9 * _padded_cost(plain, lengths, steps)


def test_length_grouping_refuses_what_it_cannot_group():
    with pytest.raises(DataError, match="3 lengths for 4 examples"):
        RankSampler(4, 2, shuffle=True, lengths=(1, 2, 3))
    with pytest.raises(DataError, match="only the shuffled, equal batches"):
        RankSampler(4, 2, lengths=(1, 2, 3, 4))
