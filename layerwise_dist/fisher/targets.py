"""Answer log-probabilities log p(y_n | x_n) of a batch, with empirical or sampled labels.

Batch convention (the data pipeline's, HF-style): ``labels[n, t]`` holds the answer
token at position ``t`` (``-100`` elsewhere), so the logits at ``t - 1`` predict it and
``answer_pos[n]`` is the position of the first such prediction. A row without any
label falls back to ``answer_pos`` and ``candidate_token_ids[n, target_index[n]]``.
"""

from __future__ import annotations

import inspect
import typing
import zlib
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from layerwise_dist.config import FisherLabels
from layerwise_dist.data.tokenize import IGNORE_INDEX
from layerwise_dist.heads import forward_keeping

LABEL_MODES = typing.get_args(FisherLabels)


def answer_targets(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flattened answer tokens of a batch: (row, predicting position, token), each [K], sorted by (row, pos)."""
    input_ids = batch["input_ids"]
    bsz = input_ids.shape[0]
    rows, pos, tok = [], [], []
    labels = batch.get("labels")
    has_label = torch.zeros(bsz, dtype=torch.bool, device=input_ids.device)
    if labels is not None:
        shifted = labels[:, 1:]
        r, p = (shifted != IGNORE_INDEX).nonzero(as_tuple=True)
        rows.append(r)
        pos.append(p)
        tok.append(shifted[r, p])
        has_label[r] = True
        if "answer_pos" in batch:
            # Guard the convention: the answer position's logits must predict a labelled token.
            ap = batch["answer_pos"].to(input_ids.device)
            labelled = has_label.nonzero(as_tuple=True)[0]
            ok = shifted[labelled, ap[labelled]] != IGNORE_INDEX
            if not bool(ok.all()):
                bad = labelled[~ok].tolist()
                raise ValueError(
                    f"rows {bad}: labels[n, answer_pos[n] + 1] is -100; expected the answer token there "
                    "(logits at answer_pos predict labels at answer_pos + 1)"
                )
    missing = (~has_label).nonzero(as_tuple=True)[0]
    if missing.numel():
        if not all(k in batch for k in ("answer_pos", "target_index", "candidate_token_ids")):
            raise ValueError(
                f"rows {missing.tolist()} have no labels and the batch lacks answer_pos/target_index/candidate_token_ids"
            )
        ap = batch["answer_pos"].to(input_ids.device)[missing]
        ti = batch["target_index"].to(input_ids.device)[missing]
        cand = batch["candidate_token_ids"].to(input_ids.device)[missing]
        rows.append(missing)
        pos.append(ap)
        tok.append(cand.gather(1, ti[:, None]).squeeze(1))
    rows_t, pos_t, tok_t = torch.cat(rows), torch.cat(pos), torch.cat(tok)
    order = torch.argsort(rows_t * input_ids.shape[1] + pos_t)
    return rows_t[order], pos_t[order], tok_t[order]


def example_seed(seed: int, batch: Mapping[str, torch.Tensor], n: int) -> int:
    """A per-example seed that does not depend on the rank or the batching.

    Uses ``batch["example_id"][n]`` when present, else a CRC of the example's real tokens
    (so two identical prompts draw the same labels).
    """
    if "example_id" in batch:
        key = int(batch["example_id"][n])
        return (seed * 1_000_003 + key) % (2**63)
    ids = batch["input_ids"][n]
    if "attention_mask" in batch:
        ids = ids[batch["attention_mask"][n].bool()]
    return zlib.crc32(ids.detach().to("cpu", torch.int64).numpy().tobytes(), seed & 0xFFFFFFFF)


def sample_tokens(
    logits: torch.Tensor, rows: torch.Tensor, batch: Mapping[str, torch.Tensor], seed: int
) -> torch.Tensor:
    """Draw one token per answer position from softmax(logits) (fp32), seeded per example."""
    probs = torch.softmax(logits.detach().float(), dim=-1).cpu()
    out = torch.empty(rows.shape[0], dtype=torch.long)
    rows_cpu = rows.cpu()
    gen = torch.Generator()
    current = None
    for k in range(rows_cpu.shape[0]):
        n = int(rows_cpu[k])
        if n != current:  # positions of one example are consecutive: one generator per example
            gen.manual_seed(example_seed(seed, batch, n))
            current = n
        out[k] = torch.multinomial(probs[k], 1, generator=gen)[0]
    return out.to(logits.device)


def _accepts_logits_to_keep(model: Callable) -> bool:
    fwd = getattr(model, "module", model)
    try:
        return "logits_to_keep" in inspect.signature(fwd.forward).parameters
    except (TypeError, ValueError):
        return False


def answer_log_probs(
    model: Callable, batch: Mapping[str, torch.Tensor], labels: str = "empirical", seed: int = 0
) -> torch.Tensor:
    """One forward; returns log p(y_n | x_n) [B] in fp32, summed over the answer tokens of each example.

    ``labels="sampled"`` replaces each answer token by a draw from the model's own
    distribution at that position (true Fisher); the dataset prefix stays the context.
    Only the answer positions are projected onto the vocabulary when the model takes
    ``logits_to_keep``.
    """
    if labels not in LABEL_MODES:
        raise ValueError(f"labels must be one of {LABEL_MODES}; got {labels!r}")
    input_ids = batch["input_ids"]
    rows, pos, tok = answer_targets(batch)
    kwargs = {"input_ids": input_ids, "attention_mask": batch.get("attention_mask"), "use_cache": False}
    if _accepts_logits_to_keep(model):
        keep = torch.zeros_like(input_ids, dtype=torch.bool)
        keep[rows, pos] = True
        # Exactly these positions, flattened in (row, pos) order = our order.
        logits = forward_keeping(model, keep, **kwargs).logits.reshape(rows.shape[0], -1)
    else:
        logits = model(**kwargs).logits[rows, pos]
    logprobs = F.log_softmax(logits.float(), dim=-1)
    if labels == "sampled":
        tok = sample_tokens(logits, rows, batch, seed)
    per_token = logprobs.gather(1, tok[:, None]).squeeze(1)
    return torch.zeros(input_ids.shape[0], dtype=torch.float32, device=per_token.device).index_add(0, rows, per_token)
