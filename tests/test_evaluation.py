"""Ranking metrics against hand-computed values, answer-leak freedom, 2-rank equality, cost figures."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from layerwise_dist.evaluation import (
    candidate_scores,
    compare,
    evaluate_model,
    measure_cost,
    model_bytes,
    parameter_count,
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
