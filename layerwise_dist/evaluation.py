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

Pointwise batches (``data.formulation=pointwise``) carry ``packed`` instead of
``candidate_token_ids``: every candidate's score is its title's log-likelihood as
the next item, ``mean`` (per token), ``sum`` or ``pmi`` (``pointwise_score``),
all candidates of a user scored in one packed forward
(:func:`layerwise_dist.pointwise.packed_scores`).

Uncertainty: :func:`evaluate_per_example` keeps every example's rank and scores
(gathered from all ranks, in dataset order) and gives each metric a 95% percentile
bootstrap interval over examples (:func:`bootstrap_ci`); on the valid and test
splits each example is one user, so that is an interval over users.
:func:`paired_bootstrap_ci` is the interval of the difference of two models scored
on the same examples (resampling the pairs).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from layerwise_dist import distributed
from layerwise_dist.models.util import model_device
from layerwise_dist.stages import reset_peak_rss, status_kib

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


def pointwise_forward_scores(model: Any, packed: Any, mode: str = "mean") -> torch.Tensor:
    """Candidate scores [B, C] (fp32, CPU) of a packed pointwise batch: one forward.

    ``model`` may be a DeepSpeed engine (its ``.module`` is used). Every row must
    have the same number of candidates."""
    from layerwise_dist.pointwise import packed_scores

    inner = getattr(model, "module", model)
    rows = packed_scores(inner, packed, mode)
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise ValueError(f"a pointwise batch mixes candidate counts {sorted(widths)}")
    return torch.stack(rows)


def forward_scores(
    model: Any,
    batch: Mapping[str, Any],
    device: torch.device | None = None,
    pointwise_score: str = "mean",
) -> torch.Tensor:
    """Candidate scores [B, C] of one batch (no grad; the caller sets eval mode).

    A batch with ``packed`` (pointwise) is scored by title likelihood with
    ``pointwise_score`` (mean, sum or pmi), the LM head applied only where a candidate token is
    predicted; otherwise by the label letters' log-probs from the answer-only head
    (:func:`layerwise_dist.heads.answer_only_scores`: the decoder up to the answer position, the
    vocabulary at that one position), equal to :func:`full_forward_scores` within 1e-5. A model the
    answer-only head cannot take (no ``get_decoder``, e.g. the trainer's student-with-aligner engine)
    is scored by the full path."""
    if "packed" in batch:
        with torch.no_grad():
            return pointwise_forward_scores(model, batch["packed"], pointwise_score)
    hf = getattr(model, "module", model)
    if hasattr(hf, "get_decoder") and hasattr(hf, "get_output_embeddings") and hf.get_output_embeddings() is not None:
        from .heads import answer_only_scores

        return answer_only_scores(model, batch)
    return full_forward_scores(model, batch, device)


def full_forward_scores(model: Any, batch: Mapping[str, Any], device: torch.device | None = None) -> torch.Tensor:
    """Listwise candidate scores [B, C] from the full ``B x T x V`` logits (the reference path)."""
    device = device or model_device(model)
    ids, mask = _prompt_only(batch, device)
    with torch.no_grad():
        logits = _logits(model(input_ids=ids, attention_mask=mask))
    return candidate_scores(logits, batch)


def tokens_per_example(batch: Mapping[str, Any], pointwise_score: str = "mean") -> list[int]:
    """Tokens each example's scoring forward processes, padding excluded.

    Listwise: the prompt up to the answer position (``answer_pos + 1``). Pointwise:
    the packed row (prefix once + every candidate's tokens; with ``pmi`` also the
    unconditional prefix and the candidates again)."""
    if "packed" in batch:
        packed = batch["packed"]
        return list(packed.lengths if pointwise_score == "pmi" else packed.history_only().lengths)
    return [int(p) + 1 for p in batch["answer_pos"].tolist()]


# --------------------------------------------------------------------------- bootstrap


def _as_matrix(values: Any) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"bootstrap needs a non-empty vector of per-example values; got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("bootstrap values must be finite")
    return arr


def _bootstrap_means(matrix: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, M] column means of ``n_boot`` resamples (with replacement) of the rows of ``matrix`` [n, M].

    One set of resampled row indices serves every column, so columns that are
    metrics of the same examples (or a paired difference) are resampled together.
    Drawn in chunks of about 4M indices, so memory stays bounded for large n."""
    if not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer; got {n_boot!r}")
    n = matrix.shape[0]
    rng = np.random.default_rng(seed)
    chunk = max(1, (1 << 22) // n)
    out = np.empty((n_boot, matrix.shape[1]), dtype=np.float64)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = matrix[idx].mean(axis=1)
    return out


def _percentiles(means: np.ndarray, level: float) -> list[tuple[float, float]]:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1); got {level}")
    tail = (1.0 - level) / 2.0 * 100.0
    lo = np.percentile(means, tail, axis=0)
    hi = np.percentile(means, 100.0 - tail, axis=0)
    return [(float(a), float(b)) for a, b in zip(lo, hi)]


def bootstrap_ci(
    per_example_values: Sequence[float] | np.ndarray | torch.Tensor,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``per_example_values``.

    ``n_boot`` resamples of the n values with replacement (numpy PCG64 seeded with
    ``seed``); the interval is the ``(1-level)/2`` and ``(1+level)/2`` percentiles
    of the resampled means. A constant vector gives the point interval (c, c).
    """
    if isinstance(per_example_values, torch.Tensor):
        per_example_values = per_example_values.detach().cpu().double().numpy()
    matrix = _as_matrix(per_example_values)
    if matrix.shape[1] != 1:
        raise ValueError(f"bootstrap_ci takes a vector of per-example values; got shape {matrix.shape}")
    return _percentiles(_bootstrap_means(matrix, n_boot, seed), level)[0]


def paired_bootstrap_ci(
    a: Sequence[float] | np.ndarray | torch.Tensor,
    b: Sequence[float] | np.ndarray | torch.Tensor,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(a) - mean(b) for two models' values on the SAME examples.

    ``a[i]`` and ``b[i]`` are the same example's values (e.g. NDCG@10 of two
    models): examples are resampled as pairs, so what both models find hard
    cancels out. Identical vectors give (0, 0).
    """
    va = _as_matrix(a.detach().cpu().double().numpy() if isinstance(a, torch.Tensor) else a)
    vb = _as_matrix(b.detach().cpu().double().numpy() if isinstance(b, torch.Tensor) else b)
    if va.shape != vb.shape or va.shape[1] != 1:
        raise ValueError(f"paired bootstrap needs two vectors of the same length; got {va.shape} and {vb.shape}")
    return _percentiles(_bootstrap_means(va - vb, n_boot, seed), level)[0]


def metric_names(ks: Sequence[int]) -> list[str]:
    """Metric keys in report order: hr@k..., ndcg@k..., mrr."""
    return [f"hr@{k}" for k in ks] + [f"ndcg@{k}" for k in ks] + ["mrr"]


def per_example_metrics(ranks: Sequence[int] | np.ndarray | torch.Tensor, ks: Sequence[int]) -> dict[str, np.ndarray]:
    """Each example's HR@K, NDCG@K and reciprocal rank from its 1-based target rank (fp64 arrays)."""
    if isinstance(ranks, torch.Tensor):
        ranks = ranks.detach().cpu().numpy()
    r = np.asarray(ranks, dtype=np.float64)
    if r.ndim != 1 or (r.size and r.min() < 1):
        raise ValueError("ranks must be a vector of 1-based ranks")
    out: dict[str, np.ndarray] = {}
    for k in ks:
        out[f"hr@{k}"] = (r <= k).astype(np.float64)
    for k in ks:
        out[f"ndcg@{k}"] = np.where(r <= k, 1.0 / np.log2(r + 1.0), 0.0)
    out["mrr"] = 1.0 / r
    return out


def metric_intervals(
    values: Mapping[str, np.ndarray], n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, tuple[float, float]]:
    """Bootstrap interval of every metric's mean; all metrics share the resampled examples."""
    names = list(values)
    matrix = _as_matrix(np.stack([np.asarray(values[m], dtype=np.float64) for m in names], axis=1))
    return dict(zip(names, _percentiles(_bootstrap_means(matrix, n_boot, seed), level)))


@dataclass
class EvalResult:
    """Per-example results of one model (or baseline) on a list of examples, in dataset order.

    * ``metrics``: what :func:`evaluate_model` returns (``hr@k``, ``ndcg@k``, ``mrr``, ``n``).
    * ``intervals``: 95% (``level``) percentile bootstrap interval of each metric.
    * ``values``: each example's value of each metric (fp64 arrays of length n).
    * ``ranks`` [n] 1-based target ranks (ties against the target), ``scores`` [n, C]
      (a list of [C_i] arrays when candidate counts differ),
      ``target_index`` [n]: present for a scored model, ``None`` for an expectation
      (the ``random`` baseline).
    """

    metrics: dict[str, float | int]
    intervals: dict[str, tuple[float, float]]
    values: dict[str, np.ndarray]
    ks: list[int]
    ranks: np.ndarray | None = None
    scores: np.ndarray | list[np.ndarray] | None = None
    target_index: np.ndarray | None = None
    n_boot: int = 1000
    seed: int = 0
    level: float = 0.95
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def top1(self) -> np.ndarray | None:
        """Position of each example's highest-scored candidate (the first one on ties)."""
        if self.scores is None:
            return None
        if isinstance(self.scores, np.ndarray):
            return self.scores.argmax(axis=1)
        return np.asarray([int(np.argmax(row)) for row in self.scores], dtype=np.int64)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly: the metrics, ``ci95`` ({metric: [low, high]}) and the bootstrap settings."""
        return {
            **self.metrics,
            "ci95": {k: [lo, hi] for k, (lo, hi) in self.intervals.items()},
            "bootstrap": {"n_boot": self.n_boot, "seed": self.seed, "level": self.level, "unit": "example"},
            **self.extra,
        }

    def paired_difference(self, other: EvalResult, metric: str) -> dict[str, Any]:
        """mean(self) - mean(other) of ``metric`` on the same examples, with its paired bootstrap interval."""
        a, b = self.values[metric], other.values[metric]
        if a.shape != b.shape:
            raise ValueError(f"paired difference needs the same examples: {a.shape[0]} vs {b.shape[0]} values")
        lo, hi = paired_bootstrap_ci(a, b, self.n_boot, self.seed, self.level)
        return {"metric": metric, "difference": float(a.mean() - b.mean()), "ci95": [lo, hi], "n": int(a.shape[0])}


def result_from_values(
    values: Mapping[str, np.ndarray], ks: Sequence[int], n_boot: int = 1000, seed: int = 0, level: float = 0.95, **kw
) -> EvalResult:
    """An :class:`EvalResult` whose metrics are the means of per-example ``values`` (baselines)."""
    ks = _check_ks(ks)
    values = {k: np.asarray(v, dtype=np.float64) for k, v in values.items()}
    n = len(next(iter(values.values())))
    if n == 0:
        raise ValueError("no examples were scored: the evaluation data is empty")
    metrics: dict[str, float | int] = {m: float(values[m].mean()) for m in metric_names(ks)}
    metrics["n"] = n
    return EvalResult(
        metrics, metric_intervals(values, n_boot, seed, level), values, ks, n_boot=n_boot, seed=seed, level=level, **kw
    )


def result_from_scores(
    scores: Sequence[Sequence[float]] | np.ndarray,
    target_index: Sequence[int] | np.ndarray,
    ks: Sequence[int],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    **kw: Any,
) -> EvalResult:
    """An :class:`EvalResult` from each example's candidate scores and target index (ties against the target)."""
    ks = _check_ks(ks)
    rows = [np.asarray(r, dtype=np.float64) for r in scores]
    targets = np.asarray(target_index, dtype=np.int64)
    if len(rows) != targets.shape[0]:
        raise ValueError(f"{len(rows)} score vectors for {targets.shape[0]} targets")
    ranks = np.asarray(
        [int(target_ranks(torch.from_numpy(r)[None], torch.tensor([int(t)]))[0]) for r, t in zip(rows, targets)],
        dtype=np.int64,
    )
    result = result_from_values(per_example_metrics(ranks, ks), ks, n_boot, seed, level, **kw)
    result.ranks = ranks
    widths = {len(r) for r in rows}
    result.scores = np.stack(rows).astype(np.float32) if len(widths) == 1 else [r.astype(np.float32) for r in rows]
    result.target_index = targets
    return result


# --------------------------------------------------------------------------- per-example files

PER_EXAMPLE_COLUMNS = ("user", "split", "target", "target_index", "candidates", "scores", "rank", "top1_position")


def write_per_example(result: EvalResult, examples: Sequence[Any], path: str | os.PathLike) -> str:
    """Write one ranker's per-example results as parquet: one row per example, in evaluation order.

    Columns: ``user``, ``split``, ``target`` (item id), ``target_index`` (its index in
    ``candidates``), ``candidates`` (item ids in the order the scores refer to), ``scores``
    (one per candidate), ``rank`` (1-based, ties against the target), ``top1_position``
    (index of the highest score in ``candidates``, the first on ties) and each metric's
    per-example value (``hr@k``, ``ndcg@k``, ``mrr``). The file's metadata holds the
    averages with their 95% intervals (``summary``). A result without ranks (the
    ``random`` baseline, an exact expectation) cannot be written.
    """
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    if result.ranks is None or result.scores is None:
        raise ValueError("this result has no per-example ranks and scores (an expectation, not a ranking)")
    n = len(result.ranks)
    if len(examples) != n:
        raise ValueError(f"{len(examples)} examples for {n} results")
    targets = result.target_index if result.target_index is not None else [ex.target_index for ex in examples]
    for ex, t in zip(examples, targets):
        if int(t) != ex.target_index:
            raise ValueError(f"user {ex.user_id}: result target {int(t)} != example target {ex.target_index}")
    columns: dict[str, Any] = {
        "user": pa.array([str(ex.user_id) for ex in examples], pa.string()),
        "split": pa.array([ex.split for ex in examples], pa.string()),
        "target": pa.array([str(ex.target) for ex in examples], pa.string()),
        "target_index": pa.array([int(t) for t in targets], pa.int32()),
        "candidates": pa.array([[str(c) for c in ex.candidates] for ex in examples], pa.list_(pa.string())),
        "scores": pa.array([np.asarray(r, dtype=np.float64).tolist() for r in result.scores], pa.list_(pa.float64())),
        "rank": pa.array(result.ranks.tolist(), pa.int32()),
        "top1_position": pa.array(result.top1.tolist(), pa.int32()),
    }
    for name, values in result.values.items():
        columns[name] = pa.array(np.asarray(values, dtype=np.float64), pa.float64())
    table = pa.table(columns).replace_schema_metadata(
        {"layerwise_dist": json.dumps({"summary": result.summary()}, default=str)}
    )
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    pq.write_table(table, path)
    return path


def read_per_example(path: str | os.PathLike) -> dict[str, list]:
    """A per-example file as columns (lists); a ValueError names what is missing."""
    import pyarrow.parquet as pq

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such per-example file")
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise ValueError(f"{path}: not a parquet file ({' '.join(str(e).split())[:120]})") from None
    missing = [c for c in ("user", "target", "candidates", "rank") if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: not a per-example file (missing columns {', '.join(missing)})")
    return table.to_pydict()


def compare_per_example(
    a: str | os.PathLike,
    b: str | os.PathLike,
    ks: Sequence[int] = (1, 5, 10, 20),
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Paired difference A - B of every metric between two per-example files, with its bootstrap interval.

    Examples are matched by (user, split, target) and must have the same candidate SET
    (the order may differ, e.g. under permutations); anything else is a ValueError
    naming the first mismatch. Metrics are recomputed from the ranks, for any ``ks``.
    """
    ks = _check_ks(ks)
    ta, tb = read_per_example(a), read_per_example(b)

    def keyed(t: dict[str, list], path: Any) -> dict[tuple[str, str, str], int]:
        out: dict[tuple[str, str, str], int] = {}
        splits = t.get("split") or [""] * len(t["user"])
        for i, key in enumerate(zip(t["user"], splits, t["target"])):
            if key in out:
                raise ValueError(f"{os.fspath(path)}: user {key[0]} ({key[1]}) appears twice")
            out[key] = i
        return out

    ka, kb = keyed(ta, a), keyed(tb, b)
    only_a = next((k for k in ka if k not in kb), None)
    only_b = next((k for k in kb if k not in ka), None)
    if only_a or only_b:
        k, where = (only_a, os.fspath(a)) if only_a else (only_b, os.fspath(b))
        raise ValueError(
            f"not the same examples: user {k[0]} target {k[2]} is only in {where} ({len(ka)} vs {len(kb)} examples)"
        )
    order = list(ka)
    for key in order:
        if set(ta["candidates"][ka[key]]) != set(tb["candidates"][kb[key]]):
            raise ValueError(f"user {key[0]}: the two files rank different candidates")
    ra = np.asarray([ta["rank"][ka[k]] for k in order], dtype=np.int64)
    rb = np.asarray([tb["rank"][kb[k]] for k in order], dtype=np.int64)
    va, vb = per_example_metrics(ra, ks), per_example_metrics(rb, ks)
    names = metric_names(ks)
    diffs = np.stack([va[m] - vb[m] for m in names], axis=1)
    intervals = _percentiles(_bootstrap_means(diffs, n_boot, seed), level)
    return {
        "a": os.fspath(a),
        "b": os.fspath(b),
        "n": len(order),
        "metrics": {
            m: {
                "a": float(va[m].mean()),
                "b": float(vb[m].mean()),
                "difference": float(diffs[:, j].mean()),
                "ci95": list(intervals[j]),
            }
            for j, m in enumerate(names)
        },
        "bootstrap": {"n_boot": n_boot, "seed": seed, "level": level, "unit": "example (paired)"},
    }


# --------------------------------------------------------------------------- evaluation


def _gather_examples(local: dict[str, list]) -> dict[str, list]:
    """Every rank's per-example lists concatenated in rank order (rank 0's first)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return local
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return {key: [x for part in parts for x in part[key]] for key in local}


def _run(
    model: Any,
    batches: Iterable[Mapping[str, Any]],
    ks: list[int],
    device: torch.device | str | None,
    progress: bool,
    pointwise_score: str,
    keep: bool,
    positions: Sequence[int] | None = None,
) -> tuple[torch.Tensor, dict[str, list]]:
    device = torch.device(device) if device is not None else model_device(model)
    was_training = getattr(model, "training", False)
    model.eval()
    sums = torch.zeros(2 * len(ks) + 2, dtype=torch.float64)
    local: dict[str, list] = {"ranks": [], "scores": [], "target_index": [], "tokens": []}
    from tqdm.auto import tqdm

    total = len(batches) if hasattr(batches, "__len__") else None
    bar = tqdm(total=total, desc="evaluate", unit=" batch", disable=not (progress and distributed.is_main()),
               dynamic_ncols=True, leave=False)  # fmt: skip
    try:
        for batch in batches:
            scores = forward_scores(model, batch, device, pointwise_score)
            sums += _metric_sums(scores, batch["target_index"], ks)
            if keep:
                local["ranks"] += target_ranks(scores, batch["target_index"]).tolist()
                local["scores"] += scores.float().cpu().tolist()
                local["target_index"] += batch["target_index"].tolist()
                local["tokens"] += tokens_per_example(batch, pointwise_score)
            bar.update(1)
    finally:
        bar.close()
        if was_training:
            model.train()
    if keep and positions is not None:  # batches regrouped (by length): this rank's examples back in order
        if len(positions) != len(local["ranks"]):
            raise ValueError(f"positions gives {len(positions)} indices for {len(local['ranks'])} scored examples")
        back = sorted(range(len(positions)), key=lambda j: positions[j])
        local = {key: [values[j] for j in back] for key, values in local.items()}
    # One all-reduce of sums for the averages: the metrics are means, so summing
    # numerators and the count over ranks gives them exactly.
    distributed.all_reduce_sum(sums)
    return sums, _gather_examples(local) if keep else local


def _log_metrics(metrics: Mapping[str, Any]) -> None:
    distributed.get_logger().info(
        "eval: %s", ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
    )


def evaluate_model(
    model: Any,
    batches: Iterable[Mapping[str, Any]],
    ks: Sequence[int] = (1, 5, 10),
    device: torch.device | str | None = None,
    progress: bool = True,
    pointwise_score: str = "mean",
) -> dict[str, float | int]:
    """Ranking metrics of ``model`` over ``batches``; global over ranks when distributed.

    ``model`` is anything called as ``model(input_ids=..., attention_mask=...)``
    returning logits: a HF causal LM, or a DeepSpeed engine (or its ``.module``).
    Pointwise batches (with ``packed``) are scored by title likelihood with
    ``pointwise_score`` (``data.pointwise_score``: mean, sum or pmi).
    Each rank scores its own batches; with a process group of more than one rank
    the per-rank sums (hits, NDCG, reciprocal ranks, n) are summed in a single
    all-reduce, so every rank returns the same global metrics. Under ZeRO-3 the
    forward itself gathers parameters collectively: every rank must then pass
    the same number of batches, or the ranks hang. For intervals and per-example
    ranks use :func:`evaluate_per_example`.
    """
    ks = _check_ks(ks)
    sums, _ = _run(model, batches, ks, device, progress, pointwise_score, keep=False)
    metrics = _metrics_from_sums(sums, ks)
    if progress:
        _log_metrics(metrics)
    return metrics


def evaluate_per_example(
    model: Any,
    batches: Iterable[Mapping[str, Any]],
    ks: Sequence[int] = (1, 5, 10, 20),
    device: torch.device | str | None = None,
    progress: bool = True,
    pointwise_score: str = "mean",
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    positions: Sequence[int] | None = None,
) -> EvalResult:
    """:func:`evaluate_model` plus every example's rank and scores and a bootstrap interval per metric.

    ``result.metrics`` equals what :func:`evaluate_model` returns on the same
    batches. Distributed: each rank scores its own share, the sums are all-reduced
    as in :func:`evaluate_model`, and the per-example ranks, scores and targets are
    gathered to every rank (``all_gather_object``), concatenated rank by rank; with
    :class:`~layerwise_dist.data.sampler.RankSampler` (``equal_batches=False``, no
    shuffle) that is dataset order. The intervals are computed from the gathered
    values, with the same seed on every rank, so every rank returns the same result.

    ``positions``: each scored example's index in the dataset, in the order ``batches`` hold them (flattened),
    for batches regrouped by :func:`~layerwise_dist.data.sampler.length_sorted`; each rank's results are
    then put back in ascending index order before the gather, so the order is the dataset's as above.
    """
    ks = _check_ks(ks)
    sums, gathered = _run(model, batches, ks, device, progress, pointwise_score, keep=True, positions=positions)
    metrics = _metrics_from_sums(sums, ks)
    ranks = np.asarray(gathered["ranks"], dtype=np.int64)
    values = per_example_metrics(ranks, ks)
    widths = {len(s) for s in gathered["scores"]}
    if len(widths) == 1:
        scores: Any = np.asarray(gathered["scores"], dtype=np.float32)
    else:  # batches with different candidate counts: one array per example
        scores = [np.asarray(row, dtype=np.float32) for row in gathered["scores"]]
    result = EvalResult(
        metrics,
        metric_intervals(values, n_boot, seed, level),
        values,
        ks,
        ranks=ranks,
        scores=scores,
        target_index=np.asarray(gathered["target_index"], dtype=np.int64),
        n_boot=n_boot,
        seed=seed,
        level=level,
        extra={"tokens_per_example_mean": float(np.mean(gathered["tokens"]))},
    )
    if progress:
        _log_metrics(metrics)
    return result


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_cost(
    model: Any,
    batches: Sequence[Mapping[str, Any]],
    warmup: int = 1,
    device: torch.device | str | None = None,
    pointwise_score: str = "mean",
) -> dict[str, Any]:
    """Latency, throughput and memory of scoring ``batches`` (the first ``warmup`` are not timed).

    Pointwise batches are scored with ``pointwise_score`` as in :func:`evaluate_model`.

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
            forward_scores(model, batch, device, pointwise_score)
        _sync(device)
        rss_tracked = False
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            unavailable["cpu_peak_rss_bytes"] = "model runs on CUDA: host RSS is not its memory"
        else:
            unavailable["cuda_peak_allocated_bytes"] = f"model runs on {device.type}, not CUDA"
            rss_before = status_kib("VmRSS")
            rss_tracked = rss_before is not None and reset_peak_rss()
            if not rss_tracked:
                unavailable["cpu_peak_rss_bytes"] = "needs Linux /proc/self/status and a writable /proc/self/clear_refs"
        times, sizes = [], []
        for batch in batches[warmup:]:
            _sync(device)
            t0 = time.perf_counter()
            forward_scores(model, batch, device, pointwise_score)
            _sync(device)
            times.append(time.perf_counter() - t0)
            sizes.append(int(batch["input_ids"].size(0)))
        if device.type == "cuda":
            out["cuda_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
        elif rss_tracked:
            peak = status_kib("VmHWM")
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
