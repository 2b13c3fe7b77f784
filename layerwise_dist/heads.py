"""Answer-only scoring heads: the LM head at one position and a few vocabulary rows.

Ranking C candidates needs, per example, the next-token distribution at one position
(``answer_pos``) and only at the C label tokens. The full path
(:func:`layerwise_dist.evaluation.forward_scores`) computes ``B x T x V`` logits and
reads ``B x C`` of them. :func:`answer_only_scores` runs the decoder, takes the
final hidden state at ``answer_pos`` and multiplies it by the candidates' rows of the
output embedding: ``B x C`` dot products instead of a ``B x T x V`` matrix product.

Ranking does not depend on the softmax normaliser; with ``normalize=True`` (the
default) it is computed at that one position (``B x V``), so the scores are the same
log-probabilities the full path returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import torch


class HeadError(ValueError):
    """A model or batch the answer-only head cannot score."""


def _inner(model: Any) -> Any:
    return getattr(model, "module", model)  # a DeepSpeed engine wraps the HF model


def _gathered(weight: torch.Tensor):
    """ZeRO-3 keeps only a shard of the head on each rank: gather it for the few rows we read."""
    if hasattr(weight, "ds_tensor"):
        import deepspeed

        return deepspeed.zero.GatheredParameters([weight], modifier_rank=None)
    return nullcontext()


def answer_hidden_states(model: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[B, H] final (normed) decoder hidden state at each example's ``answer_pos``."""
    hf = _inner(model)
    decoder = hf.get_decoder() if hasattr(hf, "get_decoder") else None
    if decoder is None:
        raise HeadError(f"{type(hf).__name__} has no get_decoder(): answer-only scoring needs a HF causal LM")
    device = next(hf.parameters()).device
    answer_pos = batch["answer_pos"].to(device).long()
    end = int(answer_pos.max().item()) + 1  # later positions cannot reach any answer (causal)
    ids = batch["input_ids"][:, :end].to(device)
    mask = batch["attention_mask"][:, :end].to(device)
    out = decoder(input_ids=ids, attention_mask=mask)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden[torch.arange(hidden.size(0), device=device), answer_pos]


def answer_only_scores(model: Any, batch: Mapping[str, torch.Tensor], normalize: bool = True) -> torch.Tensor:
    """[B, C] fp32 candidate scores of a listwise batch, equal to the full-vocabulary path.

    ``batch`` needs ``input_ids``, ``attention_mask``, ``answer_pos`` [B] and ``candidate_token_ids`` [B, C].
    ``normalize=False`` returns the candidates' raw logits (same ranking, no ``B x V`` product at all).
    No gradient; the caller sets eval mode."""
    if "packed" in batch:
        raise HeadError("answer-only scoring is for the listwise formulation; pointwise batches score titles")
    hf = _inner(model)
    head = hf.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise HeadError(f"{type(hf).__name__} has no output embedding to score candidates with")
    config = getattr(hf, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    with torch.no_grad():
        h = answer_hidden_states(model, batch)
        cand = batch["candidate_token_ids"].to(h.device).long()
        if cand.dim() != 2 or cand.size(0) != h.size(0):
            raise HeadError(f"candidate_token_ids must be [B, C] with B={h.size(0)}; got {tuple(cand.shape)}")
        with _gathered(head.weight):
            weight = head.weight
            if cand.numel() and (cand.min() < 0 or cand.max() >= weight.size(0)):
                raise HeadError(f"candidate_token_ids out of the vocabulary [0, {weight.size(0)})")
            if normalize:
                # The whole vocabulary at this one position ([B, V]) for the normaliser; the candidates'
                # logits are read from it, so they round exactly as the full path's do.
                full = _post(head(h.to(weight.dtype)).float(), softcap, scale)
                return torch.log_softmax(full, dim=-1).gather(1, cand)
            rows = weight[cand]  # [B, C, H]: only the candidates' rows of the output embedding
            logits = torch.einsum("bh,bch->bc", h.to(rows.dtype), rows)
            bias = getattr(head, "bias", None)
            if bias is not None:
                logits = logits + bias[cand]
        return _post(logits.float(), softcap, scale)


def _post(logits: torch.Tensor, softcap: float | None, scale: float | None) -> torch.Tensor:
    if scale is not None:
        logits = logits * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _mask_logits_to_keep_supported() -> bool:
    """Whether this transformers takes a [B, L] boolean ``logits_to_keep`` (added after 5.17: its causal
    LMs index ``hidden_states[:, keep, :]``, which accepts an int or a 1D tensor of positions only)."""
    from transformers import modeling_utils

    return hasattr(modeling_utils, "slice_logits_to_keep")


def forward_keeping(model: Any, keep: torch.Tensor, **kwargs: Any) -> Any:
    """``model(**kwargs)`` with the LM head applied only where ``keep`` [B, L] (bool) is True.

    The output's ``logits`` are [U, V] for the U kept positions in (row, position) order, whatever the
    transformers version: a boolean ``logits_to_keep`` where it is supported, else the union of the kept
    positions as a 1D ``logits_to_keep`` ([B, P, V], P <= L) from which the kept (row, position) pairs are
    read. The same head (scaling, soft-capping) runs in both; only the number of rows it sees differs.
    """
    if keep.dtype != torch.bool or keep.dim() != 2:
        raise HeadError(f"keep must be a [B, L] bool mask; got {keep.dtype} {tuple(keep.shape)}")
    if _mask_logits_to_keep_supported():
        return model(**kwargs, logits_to_keep=keep)
    rows, pos = keep.nonzero(as_tuple=True)  # row-major: the order a boolean mask flattens in
    positions = keep.any(0).nonzero().flatten()
    out = model(**kwargs, logits_to_keep=positions)
    out.logits = out.logits[rows, torch.searchsorted(positions, pos)]
    return out
