"""Ranking quality (HR@K, NDCG@K, MRR) and inference cost of a recommender LLM.

A prompt lists C letter-labelled candidates; the model's score for candidate c
is ``log p(label_c | prompt)`` read from the logits at ``answer_pos`` (the last
prompt position, whose next-token distribution is the answer). Ranking by score
gives, for the single relevant item at 1-based rank r,

    HR@K   = 1[r <= K]
    NDCG@K = 1[r <= K] / log2(r + 1)      (ideal DCG is 1: one relevant item)
    MRR    = 1 / r

averaged over examples. Ties are ranked pessimistically: every other candidate
whose score equals the target's counts as ranked above it, so a model that
gives all candidates the same score gets rank C, not 1.

Batches are the data pipeline's dicts of tensors: ``input_ids`` [B,T],
``attention_mask`` [B,T] (right padding), ``answer_pos`` [B], ``target_index``
[B], ``candidate_token_ids`` [B,C] (``labels`` is not used here).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from layerwise_dist import distributed
from layerwise_dist.models.util import model_device

QUALITY_PREFIXES = ("hr@", "ndcg@", "mrr")
LATENCY_KEY = "latency_ms_per_example_median"
MEMORY_KEYS = ("cuda_peak_allocated_bytes", "memory_model_bytes", "cpu_peak_rss_increase_bytes")


def candidate_scores(logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Log-probability of each candidate's label token at the answer position.

    Args:
        logits: [B, T, V] next-token logits of a causal LM (any dtype).
        batch: needs ``answer_pos`` [B] and ``candidate_token_ids`` [B, C].

    Returns:
        [B, C] fp32 scores: ``log_softmax(logits[b, answer_pos[b]])[candidate_token_ids[b]]``.

    The answer letter sits at ``answer_pos + 1``. A causal LM's logits at
    ``answer_pos`` are computed from tokens ``0..answer_pos`` only, so the answer
    token cannot leak into the scores (``tests/test_evaluation.py`` checks that
    changing it leaves the scores unchanged). The softmax runs in fp32 because
    bf16 log-probabilities of nearby candidates often round to the same value,
    which the pessimistic tie rule would then punish.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V]; got shape {tuple(logits.shape)}")
    answer_pos = batch["answer_pos"].to(logits.device).long()
    cand = batch["candidate_token_ids"].to(logits.device).long()
    b, t, v = logits.shape
    if answer_pos.shape != (b,) or cand.dim() != 2 or cand.size(0) != b:
        raise ValueError(
            f"answer_pos must be [B] and candidate_token_ids [B, C] with B={b}; "
            f"got {tuple(answer_pos.shape)} and {tuple(cand.shape)}"
        )
    if answer_pos.numel() and (answer_pos.min() < 0 or answer_pos.max() >= t):
        raise ValueError(f"answer_pos out of range [0, {t}): {answer_pos.tolist()}")
    if cand.numel() and (cand.min() < 0 or cand.max() >= v):
        raise ValueError(f"candidate_token_ids out of the vocabulary [0, {v})")
    at_answer = logits[torch.arange(b, device=logits.device), answer_pos].float()
    return torch.log_softmax(at_answer, dim=-1).gather(1, cand)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1-based rank of each target among its candidates, ties counted against the target.

    rank = #{c : score_c >= score_target} (the target itself included).
    """
    if scores.dim() != 2 or targets.shape != (scores.size(0),):
        raise ValueError(f"scores must be [N, C] and targets [N]; got {tuple(scores.shape)}, {tuple(targets.shape)}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN: the model's logits are not finite")
    targets = targets.to(scores.device).long()
    if targets.numel() and (targets.min() < 0 or targets.max() >= scores.size(1)):
        raise ValueError(f"target index out of range [0, {scores.size(1)}): {targets.tolist()}")
    target_score = scores.gather(1, targets[:, None])
    return (scores >= target_score).sum(dim=1)


def _metric_sums(scores: torch.Tensor, targets: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """fp64 vector [hits@k..., ndcg@k..., reciprocal-rank sum, n] for one all-reduce."""
    ranks = target_ranks(scores, targets).double()
    parts = [(ranks <= k).double().sum() for k in ks]
    parts += [torch.where(ranks <= k, 1.0 / torch.log2(ranks + 1.0), 0.0).sum() for k in ks]
    parts += [(1.0 / ranks).sum(), torch.tensor(float(ranks.numel()), dtype=torch.float64)]
    return torch.stack([p.cpu() for p in parts])


def _metrics_from_sums(sums: torch.Tensor, ks: Sequence[int]) -> dict[str, float | int]:
    n = int(round(sums[-1].item()))
    if n == 0:
        raise ValueError("no examples were scored: the evaluation data is empty")
    out: dict[str, float | int] = {}
    for i, k in enumerate(ks):
        out[f"hr@{k}"] = sums[i].item() / n
    for i, k in enumerate(ks):
        out[f"ndcg@{k}"] = sums[len(ks) + i].item() / n
    out["mrr"] = sums[2 * len(ks)].item() / n
    out["n"] = n
    return out


def _check_ks(ks: Sequence[int]) -> list[int]:
    ks = list(ks)
    if not ks or not all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in ks):
        raise ValueError(f"ks must be a non-empty list of positive integers; got {ks!r}")
    return ks


def rank_metrics(scores: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float | int]:
    """HR@K, NDCG@K, MRR and the example count ``n`` of scores [N, C] with true indices [N].

    Ties count against the target (see the module docstring). K larger than C
    is allowed: every target is then within the cut-off.
    """
    ks = _check_ks(ks)
    return _metrics_from_sums(_metric_sums(scores, targets, ks), ks)


def _prompt_only(batch: Mapping[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask cut after the last answer position.

    Positions after ``max(answer_pos)`` cannot influence any answer logit of a
    causal LM, so dropping them changes no score; it saves compute and removes
    the longest examples' answer tokens from the input altogether.
    """
    end = int(batch["answer_pos"].max().item()) + 1
    ids = batch["input_ids"][:, :end].to(device)
    mask = batch["attention_mask"][:, :end].to(device)
    return ids, mask


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)):
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"model output has no logits tensor: {type(output).__name__}")
    return logits


def forward_scores(model: Any, batch: Mapping[str, torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    """Candidate scores [B, C] of one batch (no grad; the caller sets eval mode)."""
    device = device or model_device(model)
    ids, mask = _prompt_only(batch, device)
    with torch.no_grad():
        logits = _logits(model(input_ids=ids, attention_mask=mask))
    return candidate_scores(logits, batch)


def evaluate_model(
    model: Any,
    batches: Iterable[Mapping[str, torch.Tensor]],
    ks: Sequence[int] = (1, 5, 10),
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict[str, float | int]:
    """Ranking metrics of ``model`` over ``batches``; global over ranks when distributed.

    ``model`` is anything called as ``model(input_ids=..., attention_mask=...)``
    returning logits: a HF causal LM, or a DeepSpeed engine (or its ``.module``).
    Each rank scores its own batches; with a process group of more than one rank
    the per-rank sums (hits, NDCG, reciprocal ranks, n) are summed in a single
    all-reduce, so every rank returns the same global metrics. Under ZeRO-3 the
    forward itself gathers parameters collectively: every rank must then pass
    the same number of batches, or the ranks hang.
    """
    ks = _check_ks(ks)
    device = torch.device(device) if device is not None else model_device(model)
    was_training = getattr(model, "training", False)
    model.eval()
    sums = torch.zeros(2 * len(ks) + 2, dtype=torch.float64)
    log = distributed.get_logger()
    start = time.perf_counter()
    try:
        for i, batch in enumerate(batches):
            sums += _metric_sums(forward_scores(model, batch, device), batch["target_index"], ks)
            if progress and (i + 1) % 10 == 0:
                log.info("eval: %d batches, %d examples, %.1fs", i + 1, int(sums[-1]), time.perf_counter() - start)
    finally:
        if was_training:
            model.train()
    # One all-reduce of sums (not a gather of per-example scores): the metrics are
    # means, so summing numerators and the count over ranks gives them exactly.
    distributed.all_reduce_sum(sums)
    metrics = _metrics_from_sums(sums, ks)
    if progress:
        log.info(
            "eval: %s", ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        )
    return metrics


def parameter_count(model: Any) -> int:
    """Number of parameters (weights of the model, not storage elements).

    Under ZeRO-3 the full (unpartitioned) count via ``ds_numel``. A bitsandbytes 4-bit
    weight is stored packed (two 4-bit values per byte, in a wider storage dtype), so its
    count comes from the original shape kept in its ``quant_state``.
    """
    total = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        shape = getattr(state, "shape", None)
        if shape is not None:
            total += int(torch.Size(shape).numel())
        else:
            total += int(getattr(p, "ds_numel", p.numel()))
    return total


def model_bytes(model: Any) -> int:
    """Exact bytes of the model's parameters and buffers (full size under ZeRO-3)."""
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        total += int(getattr(t, "ds_numel", t.numel())) * t.element_size()
    return total


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's per-process resident-set high-water mark (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _proc_status_kib("VmHWM") is not None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_cost(
    model: Any, batches: Sequence[Mapping[str, torch.Tensor]], warmup: int = 1, device: torch.device | str | None = None
) -> dict[str, Any]:
    """Latency, throughput and memory of scoring ``batches`` (the first ``warmup`` are not timed).

    Returns:
        ``latency_ms_per_batch_median``, ``latency_ms_per_example_median`` (median over
        timed batches of batch time / batch size), ``throughput_examples_per_s``
        (timed examples / timed seconds), ``timed_batches``, ``timed_examples``,
        ``num_parameters``, ``memory_model_bytes`` (parameters + buffers, exact),
        ``device``, and the peak figure the device allows:

        - CUDA: ``cuda_peak_allocated_bytes`` = ``torch.cuda.max_memory_allocated``
          over the timed batches (peak statistics reset first).
        - CPU on Linux: ``cpu_peak_rss_bytes`` (the process's resident-set high-water
          mark over the timed batches, after resetting it through
          ``/proc/self/clear_refs``; it includes everything the process holds, other
          models too) and ``cpu_peak_rss_increase_bytes`` (that peak minus the
          resident set just before timing: the memory inference itself added).

        A figure this machine cannot measure is ``None`` and ``unavailable`` says why.
        Each rank measures itself; nothing is reduced across ranks.
    """
    batches = list(batches)
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0; got {warmup}")
    if len(batches) <= warmup:
        raise ValueError(f"measure_cost needs more than warmup={warmup} batches; got {len(batches)}")
    device = torch.device(device) if device is not None else model_device(model)
    was_training = getattr(model, "training", False)
    model.eval()
    unavailable: dict[str, str] = {}
    out: dict[str, Any] = {
        "device": str(device),
        "num_parameters": parameter_count(model),
        "memory_model_bytes": model_bytes(model),
        "cuda_peak_allocated_bytes": None,
        "cpu_peak_rss_bytes": None,
        "cpu_peak_rss_increase_bytes": None,
        "torch_num_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    try:
        for batch in batches[:warmup]:
            forward_scores(model, batch, device)
        _sync(device)
        rss_tracked = False
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            unavailable["cpu_peak_rss_bytes"] = "model runs on CUDA: host RSS is not its memory"
        else:
            unavailable["cuda_peak_allocated_bytes"] = f"model runs on {device.type}, not CUDA"
            rss_before = _proc_status_kib("VmRSS")
            rss_tracked = rss_before is not None and _reset_peak_rss()
            if not rss_tracked:
                unavailable["cpu_peak_rss_bytes"] = "needs Linux /proc/self/status and a writable /proc/self/clear_refs"
        times, sizes = [], []
        for batch in batches[warmup:]:
            _sync(device)
            t0 = time.perf_counter()
            forward_scores(model, batch, device)
            _sync(device)
            times.append(time.perf_counter() - t0)
            sizes.append(int(batch["input_ids"].size(0)))
        if device.type == "cuda":
            out["cuda_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
        elif rss_tracked:
            peak = _proc_status_kib("VmHWM")
            out["cpu_peak_rss_bytes"] = peak * 1024
            out["cpu_peak_rss_increase_bytes"] = max(0, peak - rss_before) * 1024
    finally:
        if was_training:
            model.train()
    if "cpu_peak_rss_bytes" in unavailable:
        unavailable["cpu_peak_rss_increase_bytes"] = unavailable["cpu_peak_rss_bytes"]
    out["latency_ms_per_batch_median"] = statistics.median(times) * 1e3
    out[LATENCY_KEY] = statistics.median(t / n for t, n in zip(times, sizes)) * 1e3
    out["throughput_examples_per_s"] = sum(sizes) / sum(times)
    out["timed_batches"] = len(times)
    out["timed_examples"] = sum(sizes)
    out["unavailable"] = unavailable
    return out


def _ratio(num: Any, den: Any) -> float | None:
    if num is None or den is None or not isinstance(num, (int, float)) or not isinstance(den, (int, float)):
        return None
    if den == 0 or not math.isfinite(num) or not math.isfinite(den):
        return None
    return num / den


def compare(teacher_metrics: Mapping[str, Any], student_metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Student relative to teacher, from dicts of ``evaluate_model`` and ``measure_cost`` results.

    Returns:
        ``retained``: student/teacher of each quality metric (HR@K, NDCG@K, MRR) present
        in both; ``None`` where the teacher's value is 0.
        ``speedup``: teacher / student median latency per example (``None`` if missing).
        ``memory_reduction``: 1 - student/teacher for each memory figure both measured
        (``cuda_peak_allocated_bytes``, ``memory_model_bytes``, ``cpu_peak_rss_increase_bytes``).
        ``parameter_reduction``: 1 - student/teacher parameter count.
    """
    retained = {}
    for key, t in teacher_metrics.items():
        if key.startswith(QUALITY_PREFIXES) and key in student_metrics:
            retained[key] = _ratio(student_metrics[key], t)
    memory = {}
    for key in MEMORY_KEYS:
        r = _ratio(student_metrics.get(key), teacher_metrics.get(key))
        if r is not None:
            memory[key] = 1.0 - r
    params = _ratio(student_metrics.get("num_parameters"), teacher_metrics.get("num_parameters"))
    return {
        "retained": retained,
        "speedup": _ratio(teacher_metrics.get(LATENCY_KEY), student_metrics.get(LATENCY_KEY)),
        "memory_reduction": memory,
        "parameter_reduction": None if params is None else 1.0 - params,
    }
