"""Ranking metrics against hand-computed values, answer-leak freedom, 2-rank equality, cost figures,
per-example results with bootstrap intervals, and the random / popularity baselines."""

from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from layerwise_dist.evaluation import (
    bootstrap_ci,
    candidate_scores,
    compare,
    evaluate_model,
    evaluate_per_example,
    forward_scores,
    measure_cost,
    model_bytes,
    paired_bootstrap_ci,
    parameter_count,
    per_example_metrics,
    rank_metrics,
    target_ranks,
)
from layerwise_dist.models.tiny import tiny_llama

VOCAB = 64
LETTERS = [40, 41, 42, 43, 44]  # token ids standing for the labels A..E


def make_batch(batch_size: int = 4, seq_len: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random prompts, right padded; each ends with an answer letter after answer_pos."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, seq_len + 1, (batch_size,), generator=g)
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
    mask = torch.zeros(batch_size, seq_len, dtype=torch.long)
    labels = torch.full((batch_size, seq_len), -100, dtype=torch.long)
    target = torch.randint(0, len(LETTERS), (batch_size,), generator=g)
    for b, n in enumerate(lengths.tolist()):
        ids[b, : n - 1] = torch.randint(3, 40, (n - 1,), generator=g)
        ids[b, n - 1] = LETTERS[target[b]]
        mask[b, :n] = 1
        labels[b, n - 1] = ids[b, n - 1]
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "answer_pos": lengths - 2,
        "target_index": target,
        "candidate_token_ids": torch.tensor(LETTERS).repeat(batch_size, 1),
    }


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=VOCAB, num_layers=2, hidden=32, seed=0)


def test_rank_metrics_hand_computed():
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.5, 0.3],  # target 0: rank 1
            [0.2, 0.8, 0.5, 0.1],  # target 2: rank 2
            [0.4, 0.3, 0.2, 0.1],  # target 3: rank 4
            [0.5, 0.5, 0.1, 0.0],  # target 1: tied with index 0 -> pessimistic rank 2
        ]
    )
    targets = torch.tensor([0, 2, 3, 1])
    assert target_ranks(scores, targets).tolist() == [1, 2, 4, 2]
    m = rank_metrics(scores, targets, ks=[1, 3])
    assert m["n"] == 4
    assert m["hr@1"] == pytest.approx(1 / 4)
    assert m["hr@3"] == pytest.approx(3 / 4)
    assert m["ndcg@1"] == pytest.approx(1 / 4)
    assert m["ndcg@3"] == pytest.approx((1 + 2 / math.log2(3)) / 4)
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 4 + 1 / 2) / 4)


def test_all_tied_scores_rank_last():
    m = rank_metrics(torch.zeros(3, 5), torch.tensor([0, 2, 4]), ks=[1, 5])
    assert m["hr@1"] == 0.0 and m["hr@5"] == 1.0
    assert m["mrr"] == pytest.approx(1 / 5)


def test_rank_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        rank_metrics(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="out of range"):
        rank_metrics(torch.zeros(1, 2), torch.tensor([2]))
    with pytest.raises(ValueError, match="ks"):
        rank_metrics(torch.zeros(1, 2), torch.tensor([0]), ks=[0])


def test_candidate_scores_gathers_label_log_probs():
    batch = make_batch(batch_size=3)
    logits = torch.randn(3, 12, VOCAB, dtype=torch.bfloat16)
    scores = candidate_scores(logits, batch)
    assert scores.dtype == torch.float32 and scores.shape == (3, len(LETTERS))
    for b in range(3):
        expected = torch.log_softmax(logits[b, batch["answer_pos"][b]].float(), -1)[LETTERS]
        torch.testing.assert_close(scores[b], expected)


def test_answer_token_does_not_leak(model):
    batch = make_batch(batch_size=4)
    full = candidate_scores(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch)
    changed = {k: v.clone() for k, v in batch.items()}
    rows = torch.arange(4)
    changed["input_ids"][rows, batch["answer_pos"] + 1] = (
        batch["input_ids"][rows, batch["answer_pos"] + 1] - 40 + 1
    ) % 5 + 40
    assert not torch.equal(changed["input_ids"], batch["input_ids"])
    again = candidate_scores(
        model(input_ids=changed["input_ids"], attention_mask=changed["attention_mask"]).logits, changed
    )
    torch.testing.assert_close(full, again)
    # evaluate_model (which also drops tokens after the last answer position) agrees with the full forward
    m1 = evaluate_model(model, [batch], ks=[1, 3], progress=False)
    m2 = evaluate_model(model, [changed], ks=[1, 3], progress=False)
    assert m1 == m2 == rank_metrics(full, batch["target_index"], ks=[1, 3])


def test_evaluate_model_restores_training_mode(model):
    model.train()
    evaluate_model(model, [make_batch()], ks=[1], progress=False)
    assert model.training
    model.eval()


def _worker(rank: int, port: int, batches: list, result_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = tiny_llama(vocab_size=VOCAB, num_layers=2, hidden=32, seed=0)
        metrics = evaluate_model(model, batches[rank::2], ks=[1, 3], progress=False)
        torch.save(metrics, f"{result_file}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_equal_one_rank(model, tmp_path):
    batches = [make_batch(batch_size=3, seed=s) for s in range(4)]
    single = evaluate_model(model, batches, ks=[1, 3], progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children reuse the imported torch/transformers (spawn re-imports them: ~30 s on 2 cores)
    mp.start_processes(_worker, args=(port, batches, str(tmp_path / "m")), nprocs=2, join=True, start_method="fork")
    for rank in range(2):
        got = torch.load(tmp_path / f"m.{rank}")
        assert got["n"] == single["n"] == 12
        for key in single:
            assert got[key] == pytest.approx(single[key], abs=1e-12)


def test_measure_cost_reports_real_figures(model):
    batches = [make_batch(batch_size=2, seed=s) for s in range(3)]
    cost = measure_cost(model, batches, warmup=1)
    assert cost["timed_batches"] == 2 and cost["timed_examples"] == 4
    assert cost["latency_ms_per_batch_median"] > 0 and cost["throughput_examples_per_s"] > 0
    assert cost["num_parameters"] == sum(p.numel() for p in model.parameters()) == parameter_count(model)
    expected_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert cost["memory_model_bytes"] == expected_bytes == model_bytes(model)
    assert cost["cuda_peak_allocated_bytes"] is None and "cuda_peak_allocated_bytes" in cost["unavailable"]
    if os.path.exists("/proc/self/clear_refs"):
        assert cost["cpu_peak_rss_bytes"] > 0 and cost["cpu_peak_rss_increase_bytes"] >= 0
    with pytest.raises(ValueError, match="warmup"):
        measure_cost(model, batches[:1], warmup=1)


def test_compare():
    teacher = {"hr@1": 0.5, "ndcg@5": 0.0, "mrr": 0.4, "n": 10, "latency_ms_per_example_median": 30.0}
    teacher |= {"memory_model_bytes": 1000, "num_parameters": 100, "cuda_peak_allocated_bytes": None}
    student = {"hr@1": 0.45, "ndcg@5": 0.1, "mrr": 0.2, "n": 10, "latency_ms_per_example_median": 10.0}
    student |= {"memory_model_bytes": 250, "num_parameters": 25, "cuda_peak_allocated_bytes": None}
    c = compare(teacher, student)
    assert c["retained"] == {"hr@1": pytest.approx(0.9), "ndcg@5": None, "mrr": pytest.approx(0.5)}
    assert c["speedup"] == pytest.approx(3.0)
    assert c["memory_reduction"] == {"memory_model_bytes": pytest.approx(0.75)}
    assert c["parameter_reduction"] == pytest.approx(0.75)


# --------------------------------------------------------------------------- per-example results and bootstrap


def test_bootstrap_constant_vector_is_a_point():
    assert bootstrap_ci([0.25] * 50) == (0.25, 0.25)
    assert bootstrap_ci(torch.ones(7)) == (1.0, 1.0)
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([])


def test_bootstrap_is_seeded_and_brackets_the_mean():
    values = torch.rand(200, generator=torch.Generator().manual_seed(0)).tolist()
    lo, hi = bootstrap_ci(values, seed=3)
    assert (lo, hi) == bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)
    mean = sum(values) / len(values)
    assert lo < mean < hi
    # about 2 * 1.96 standard errors wide (uniform: sd = 1/sqrt(12))
    assert hi - lo == pytest.approx(2 * 1.96 / math.sqrt(12 * 200), rel=0.2)


def test_bootstrap_coverage_bernoulli():
    """A 95% interval of a Bernoulli(0.3) mean (n=400) contains 0.3 in most of 200 seeded samples."""
    gen = torch.Generator().manual_seed(123)
    covered = 0
    for rep in range(200):
        sample = (torch.rand(400, generator=gen) < 0.3).double()
        lo, hi = bootstrap_ci(sample, n_boot=400, seed=rep)
        covered += lo <= 0.3 <= hi
    assert 0.88 <= covered / 200 <= 0.99


def test_paired_bootstrap():
    a = torch.rand(100, generator=torch.Generator().manual_seed(1))
    assert paired_bootstrap_ci(a, a.clone()) == (0.0, 0.0)
    lo, hi = paired_bootstrap_ci(a + 0.1, a)  # a constant shift is known exactly
    assert lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    b = torch.rand(100, generator=torch.Generator().manual_seed(2))
    lo, hi = paired_bootstrap_ci(a, b)
    assert lo < float(a.mean() - b.mean()) < hi
    with pytest.raises(ValueError, match="same length"):
        paired_bootstrap_ci(a, b[:50])


def test_per_example_metrics_match_rank_metrics():
    scores = torch.randn(30, 6, generator=torch.Generator().manual_seed(5))
    targets = torch.randint(0, 6, (30,), generator=torch.Generator().manual_seed(6))
    values = per_example_metrics(target_ranks(scores, targets), [1, 3, 20])
    expected = rank_metrics(scores, targets, ks=[1, 3, 20])
    for key, v in values.items():
        assert v.shape == (30,) and v.mean() == pytest.approx(expected[key])


def test_evaluate_per_example_listwise(model):
    batches = [make_batch(batch_size=3, seed=s) for s in range(3)]
    result = evaluate_per_example(model, batches, ks=[1, 3, 10, 20], progress=False, n_boot=200)
    assert result.metrics == evaluate_model(model, batches, ks=[1, 3, 10, 20], progress=False)
    scores = torch.cat([forward_scores(model, b) for b in batches])
    targets = torch.cat([b["target_index"] for b in batches])
    assert result.ranks.tolist() == target_ranks(scores, targets).tolist()
    torch.testing.assert_close(torch.from_numpy(result.scores), scores)
    assert result.top1.tolist() == scores.argmax(1).tolist()
    assert result.metrics["hr@20"] == result.metrics["hr@10"] == 1.0  # 5 candidates
    assert result.intervals["hr@20"] == (1.0, 1.0)
    for key in ("hr@1", "ndcg@3", "mrr"):
        lo, hi = result.intervals[key]
        assert lo <= result.metrics[key] <= hi and lo < hi
    summary = result.summary()
    assert summary["ci95"]["mrr"] == list(result.intervals["mrr"]) and summary["n"] == 9
    diff = result.paired_difference(result, "ndcg@3")
    assert diff["difference"] == 0.0 and diff["ci95"] == [0.0, 0.0]


def _per_example_worker(rank: int, port: int, batches: list, result_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = tiny_llama(vocab_size=VOCAB, num_layers=2, hidden=32, seed=0)
        share = batches[:2] if rank == 0 else batches[2:]  # contiguous shares, rank 1 one batch fewer
        r = evaluate_per_example(model, share, ks=[1, 3], progress=False, n_boot=100)
        torch.save({"metrics": r.metrics, "ranks": r.ranks, "intervals": r.intervals}, f"{result_file}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_per_example_results_gathered_over_two_ranks(model, tmp_path):
    batches = [make_batch(batch_size=3, seed=s) for s in range(3)]
    single = evaluate_per_example(model, batches, ks=[1, 3], progress=False, n_boot=100)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(
        _per_example_worker, args=(port, batches, str(tmp_path / "p")), nprocs=2, join=True, start_method="fork"
    )
    for rank in range(2):
        got = torch.load(tmp_path / f"p.{rank}", weights_only=False)
        assert got["ranks"].tolist() == single.ranks.tolist()  # every example, in dataset order
        assert got["intervals"] == single.intervals
        for key in single.metrics:
            assert got["metrics"][key] == pytest.approx(single.metrics[key], abs=1e-12)


# --------------------------------------------------------------------------- baselines


def _tiny_splits():
    from layerwise_dist.data.splits import SplitData

    # train counts: a=3, b=2, c=2, d=1, e=0 (e only in valid/test), f=0
    train = {"u1": ["a", "b", "c"], "u2": ["a", "b", "d"], "u3": ["a", "c"]}
    valid = {"u1": "e", "u2": "e", "u3": "e"}
    test = {"u1": "e", "u2": "c", "u3": "f"}
    titles = {i: f"title {i}" for i in "abcdef"}
    return SplitData(train=train, valid=valid, test=test, titles=titles, category="Video_Games")


def _example(user: str, candidates: list[str], target: str):
    from layerwise_dist.data.prompts import RankExample

    return RankExample(user, [], [], candidates, [f"title {c}" for c in candidates], candidates.index(target), "test")


def test_popularity_baseline_hand_computed():
    from layerwise_dist.baselines import evaluate_baselines, popularity_scores, train_item_counts

    splits = _tiny_splits()
    assert dict(train_item_counts(splits)) == {"a": 3, "b": 2, "c": 2, "d": 1}
    examples = [
        _example("u1", ["e", "a", "d", "f"], "e"),  # e: 0 (its valid/test uses do not count), tied with f -> rank 4
        _example("u2", ["d", "c", "e", "a"], "c"),  # c: 2, below a -> rank 2
        _example("u3", ["f", "b", "c", "e"], "b"),  # b: 2 tied with c -> rank 2 (ties against the target)
        _example("u1", ["a", "f", "d", "e"], "a"),  # a: 3 -> rank 1
    ]
    assert popularity_scores(train_item_counts(splits), examples[:1])[0].tolist() == [0, 3, 1, 0]
    res = evaluate_baselines(splits, examples, ks=[1, 2], n_boot=200)["popularity"]
    assert res.ranks.tolist() == [4, 2, 2, 1]
    assert res.metrics["hr@1"] == pytest.approx(1 / 4) and res.metrics["hr@2"] == pytest.approx(3 / 4)
    assert res.metrics["ndcg@2"] == pytest.approx((2 / math.log2(3) + 1) / 4)
    assert res.metrics["mrr"] == pytest.approx((1 / 4 + 1 / 2 + 1 / 2 + 1) / 4)
    assert res.metrics["n"] == 4
    lo, hi = res.intervals["mrr"]
    assert lo < res.metrics["mrr"] < hi


def test_popularity_with_ties_at_random_is_the_mean_over_every_tie_breaking():
    import itertools

    from layerwise_dist.baselines import evaluate_baselines, random_tie_values

    ks = [1, 2, 5]
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 3, size=6).astype(float) for _ in range(20)] + [np.zeros(6), np.arange(6.0)]
    targets = [int(rng.integers(0, 6)) for _ in rows]
    got = random_tie_values(rows, targets, ks)
    for i, (s, t) in enumerate(zip(rows, targets)):
        # brute force: every order of the candidates used as the tie-breaker, equally likely
        ranks = [
            1 + sum(s[j] > s[t] or (s[j] == s[t] and p[j] < p[t]) for j in range(6))
            for p in itertools.permutations(range(6))
        ]
        brute = per_example_metrics(torch.tensor(ranks), ks)
        for key in brute:
            assert got[key][i] == pytest.approx(brute[key].mean()), (i, key)
    # no ties: the pessimistic rank itself
    assert got["mrr"][-1] == pytest.approx(1 / (6 - targets[-1]))

    splits = _tiny_splits()
    examples = [  # the hand-computed example above: e tied with f (rank 3 or 4), b tied with c (rank 1 or 2)
        _example("u1", ["e", "a", "d", "f"], "e"),
        _example("u2", ["d", "c", "e", "a"], "c"),
        _example("u3", ["f", "b", "c", "e"], "b"),
        _example("u1", ["a", "f", "d", "e"], "a"),
    ]
    res = evaluate_baselines(splits, examples, ks=[1, 2], n_boot=200)["popularity"]
    assert res.metrics["mrr"] == pytest.approx((1 / 4 + 1 / 2 + 1 / 2 + 1) / 4)  # unchanged: ties against the target
    ties = res.summary()["random_ties"]
    assert ties["mrr"] == pytest.approx(((1 / 3 + 1 / 4) / 2 + 1 / 2 + (1 + 1 / 2) / 2 + 1) / 4)
    assert ties["hr@1"] == pytest.approx((0 + 0 + 1 / 2 + 1) / 4) and ties["n"] == 4
    assert res.summary()["targets_tied"] == 0.5
    with pytest.raises(ValueError, match="2 score vectors for 1 targets"):
        random_tie_values(rows[:2], [0], ks)


def test_random_baseline_is_the_exact_expectation():
    import itertools

    from layerwise_dist.baselines import evaluate_baselines, random_expected_values

    splits = _tiny_splits()
    ks = [1, 2, 10]
    # exact: the mean over every position the target can take among C=4 equally likely orders
    perms = list(itertools.permutations(range(4)))
    ranks = torch.tensor([p.index(0) + 1 for p in perms])
    brute = per_example_metrics(ranks, ks)
    expected = random_expected_values([4], ks)
    for key in brute:
        assert expected[key][0] == pytest.approx(brute[key].mean())
    assert expected["hr@1"][0] == 0.25 and expected["hr@10"][0] == 1.0
    assert expected["mrr"][0] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    examples = [_example("u1", ["e", "a", "d", "f"], "e"), _example("u2", ["d", "c"], "c")]
    res = evaluate_baselines(splits, examples, ks=ks, names=["random"])["random"]
    assert res.ranks is None and res.metrics["hr@1"] == pytest.approx((1 / 4 + 1 / 2) / 2)
    assert res.values["ndcg@2"].tolist() == pytest.approx([(1 + 1 / math.log2(3)) / 4, (1 + 1 / math.log2(3)) / 2])
    same_count = evaluate_baselines(splits, examples[:1] * 5, ks=ks, names=["random"])["random"]
    assert same_count.intervals["mrr"] == (same_count.metrics["mrr"],) * 2  # an expectation: no sampling spread
    with pytest.raises(ValueError, match="unknown baseline"):
        evaluate_baselines(splits, examples, names=["oracle"])
