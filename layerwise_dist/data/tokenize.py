"""Tokenized ranking examples (Hugging Face ``datasets``, cached) and batching."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import DataConfig
from .errors import DataError
from .prompts import (
    LABELS,
    RankExample,
    has_chat_template,
    label_token_ids,
    pointwise_phrases,
    render_pointwise,
    render_prompt,
)

IGNORE_INDEX = -100
FORMAT_VERSION = "1"
COLUMNS = ("input_ids", "attention_mask", "labels", "answer_pos", "target_index", "candidate_token_ids")
POINTWISE_COLUMNS = (
    "input_ids",
    "attention_mask",
    "labels",
    "answer_pos",
    "target_index",
    "prefix_ids",
    "candidate_ids",
    "unconditional_ids",
)


def default_cache_dir(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "layerwise_dist")) / "tokenized"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Stable hash of what decides token ids: vocabulary/merges, special tokens, chat template."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{type(tokenizer).__name__}|{getattr(tokenizer, 'name_or_path', '')}|{len(tokenizer)}".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", "") or "").encode())
    h.update(json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str).encode())
    return h.hexdigest()


def pointwise_template(category: str, category_phrase: str = "") -> str:
    """The pointwise template of a category with placeholder titles (part of the cache fingerprint)."""
    from ..pointwise import candidate_continuation, render_history_prefix

    plural, singular = pointwise_phrases(category, category_phrase)
    history = render_history_prefix(["{title 1}", "{title 2}"], plural, item_phrase=singular)
    return (
        history + candidate_continuation("{candidate}") + "|" + render_history_prefix([], plural, item_phrase=singular)
    )


def examples_fingerprint(examples: Sequence[RankExample], tokenizer: Any, cfg: DataConfig) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"v{FORMAT_VERSION}|{cfg.max_length}|{tokenizer_fingerprint(tokenizer)}".encode())
    if cfg.system_prompt and cfg.formulation == "listwise":  # (absent when empty: earlier caches stay valid)
        h.update(json.dumps(["system_prompt", cfg.system_prompt]).encode())
    if cfg.formulation != "listwise":  # (the listwise fingerprint is the one it always had)
        templates = [pointwise_template(c, cfg.category_phrase) for c in sorted({ex.category for ex in examples})]
        h.update(json.dumps([cfg.formulation, templates]).encode())
    for ex in examples:
        h.update(json.dumps(dataclasses.asdict(ex), sort_keys=True, default=str).encode())
    return h.hexdigest()


def _encode_batch(batch: dict[str, list], tokenizer: Any, letter_ids: list[int], max_length: int) -> dict[str, list]:
    chat = has_chat_template(tokenizer)
    texts = [p + a for p, a in zip(batch["prompt"], batch["answer"])]
    encoded = tokenizer(texts, add_special_tokens=not chat)["input_ids"]
    out: dict[str, list] = {c: [] for c in COLUMNS}
    for ids, target, n_cand, user, split in zip(
        encoded, batch["target_index"], batch["num_candidates"], batch["user_id"], batch["split"]
    ):
        ids = list(ids)
        if len(ids) > max_length:
            raise DataError(
                f"example user={user} split={split} is {len(ids)} tokens, more than data.max_length={max_length} "
                "(raise it, or lower history_len / title_max_tokens)"
            )
        if ids[-1] != letter_ids[target]:
            raise DataError(
                f"example user={user} split={split}: the answer {LABELS[target]!r} is not the single last token"
            )
        labels = [IGNORE_INDEX] * len(ids)
        labels[-1] = ids[-1]
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append(labels)
        out["answer_pos"].append(len(ids) - 2)
        out["target_index"].append(target)
        out["candidate_token_ids"].append(letter_ids[:n_cand])
    return out


def _encode_pointwise_batch(batch: dict[str, list], tokenizer: Any, max_length: int) -> dict[str, list]:
    """Pointwise rows: prefix (with the tokenizer's special tokens) + each continuation (without),
    tokenized separately as :func:`layerwise_dist.pointwise.tokenize_pointwise` does."""
    prefixes = tokenizer(batch["prefix"], add_special_tokens=True)["input_ids"]
    texts = list(dict.fromkeys([t for conts in batch["continuations"] for t in conts] + batch["unconditional"]))
    pieces = dict(zip(texts, tokenizer(texts, add_special_tokens=False)["input_ids"]))
    unconditional_ids = {
        u: list(tokenizer(u, add_special_tokens=True)["input_ids"]) for u in set(batch["unconditional"])
    }
    out: dict[str, list] = {c: [] for c in POINTWISE_COLUMNS}
    for prefix, conts, uncond, target, user, split in zip(
        prefixes,
        batch["continuations"],
        batch["unconditional"],
        batch["target_index"],
        batch["user_id"],
        batch["split"],
    ):
        prefix = list(prefix)
        cands = [list(pieces[t]) for t in conts]
        if not prefix or any(not c for c in cands):
            raise DataError(f"example user={user} split={split}: the prefix or a candidate title has no tokens")
        longest = len(prefix) + max(len(c) for c in cands)
        if longest > max_length:
            raise DataError(
                f"example user={user} split={split} is {longest} tokens (prefix + longest candidate), more than "
                f"data.max_length={max_length} (raise it, or lower history_len / title_max_tokens)"
            )
        ids = prefix + cands[target]
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append([IGNORE_INDEX] * len(prefix) + cands[target])
        out["answer_pos"].append(len(prefix) - 1)
        out["target_index"].append(target)
        out["prefix_ids"].append(prefix)
        out["candidate_ids"].append(cands)
        out["unconditional_ids"].append(unconditional_ids[uncond])
    return out


def _pointwise_dataset(examples: Sequence[RankExample], tokenizer: Any, cfg: DataConfig, path: Path, fp: str) -> Any:
    from datasets import Dataset

    rows = []
    for ex in examples:
        prefix, continuations, unconditional = render_pointwise(ex, cfg.category_phrase)
        rows.append(
            {
                "user_id": ex.user_id,
                "split": ex.split,
                "prefix": prefix,
                "continuations": continuations,
                "unconditional": unconditional,
                "target_index": ex.target_index,
            }
        )
    return Dataset.from_list(rows).map(
        _encode_pointwise_batch,
        batched=True,
        batch_size=256,
        fn_kwargs={"tokenizer": tokenizer, "max_length": cfg.max_length},
        remove_columns=["prefix", "continuations", "unconditional", "target_index"],
        cache_file_name=str(path),
        new_fingerprint=fp,
        desc="tokenizing (pointwise)",
    )


def tokenize_examples(
    examples: Sequence[RankExample], tokenizer: Any, cfg: DataConfig, cache_dir: str | Path | None = None
) -> Any:
    """A ``datasets.Dataset`` of tokenized examples (plus ``user_id``, ``split``), by ``cfg.formulation``.

    ``listwise``: ``input_ids, attention_mask, labels, answer_pos, target_index,
    candidate_token_ids``. ``labels`` is -100 except at the answer letter;
    ``answer_pos`` is the position whose logits predict it (answer index - 1).

    ``pointwise`` (plain text, no chat template, see :func:`prompts.render_pointwise`):
    ``input_ids`` = history prefix + the target's continuation ``" " + title + "\n"``,
    ``labels`` -100 on the prefix and the continuation's tokens supervised (the
    causal-LM loss of adaptation and the Fisher label), ``answer_pos`` = len(prefix) - 1
    (the position predicting the first title token), ``target_index``, ``prefix_ids``,
    ``candidate_ids`` (one token list per candidate, in the example's order) and
    ``unconditional_ids`` (the template with no history, for ``pmi``). The prefix is
    tokenized with the tokenizer's special tokens (its BOS, if it adds one), each
    continuation without, separately: a candidate's tokens do not depend on the history.
    ``data.max_length`` bounds prefix + the longest candidate (the positions a packed
    forward reaches).

    The result is cached as ``<cache_dir>/tokenized/tok-<fingerprint>.arrow``, the
    fingerprint covering the examples, the tokenizer (vocabulary, special tokens, chat
    template), ``max_length`` and, for ``pointwise``, the formulation and its template;
    a second call with the same inputs loads that file without tokenizing. Ranks racing
    on the same file are safe: ``datasets`` writes a temporary file and renames it.
    """
    from datasets import Dataset

    if not examples:
        raise DataError("no examples to tokenize")
    folder = Path(cache_dir) / "tokenized" if cache_dir else default_cache_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    fingerprint = examples_fingerprint(examples, tokenizer, cfg)
    path = folder / f"tok-{fingerprint}.arrow"
    if path.is_file():
        return Dataset.from_file(str(path))
    if cfg.formulation == "pointwise":
        return _pointwise_dataset(examples, tokenizer, cfg, path, fingerprint)
    letter_ids = label_token_ids(tokenizer, max(len(ex.candidates) for ex in examples))
    rows = []
    for ex in examples:
        prompt, answer = render_prompt(ex, tokenizer, cfg.system_prompt)
        rows.append(
            {
                "user_id": ex.user_id,
                "split": ex.split,
                "prompt": prompt,
                "answer": answer,
                "target_index": ex.target_index,
                "num_candidates": len(ex.candidates),
            }
        )
    ds = Dataset.from_list(rows)
    return ds.map(
        _encode_batch,
        batched=True,
        batch_size=256,
        fn_kwargs={"tokenizer": tokenizer, "letter_ids": letter_ids, "max_length": cfg.max_length},
        remove_columns=["prompt", "answer", "target_index", "num_candidates"],
        cache_file_name=str(path),
        new_fingerprint=fingerprint,
        desc="tokenizing",
    )


def _pack_pointwise(features: Sequence[Mapping[str, Any]], pad_token_id: int) -> Any:
    from ..pointwise import pack_candidates_batch

    unconditional = None
    if all(f.get("unconditional_ids") for f in features):
        distinct = {tuple(f["unconditional_ids"]) for f in features}
        if len(distinct) != 1:
            raise DataError("a pointwise batch mixes examples with different unconditional prefixes (categories)")
        unconditional = list(distinct.pop())
    try:
        return pack_candidates_batch(
            [f["prefix_ids"] for f in features], [f["candidate_ids"] for f in features], pad_token_id, unconditional
        )
    except ValueError as e:
        raise DataError(f"cannot pack a pointwise batch: {e}") from None


def collate(features: Sequence[Mapping[str, Any]], pad_token_id: int = 0) -> dict[str, Any]:
    """Right-padded batch of tokenized examples (the one collate of every stage).

    ``input_ids`` is padded with ``pad_token_id``, ``labels`` with -100 and
    ``attention_mask`` with 0 (built from the lengths when the examples have none).
    ``labels``, ``answer_pos``, ``target_index``, ``candidate_token_ids`` (``[B, C]``)
    and ``example_id`` are carried when every example has them, so a plain
    ``input_ids`` + ``labels`` dataset (e.g. for a Fisher pass) collates too.

    Pointwise examples (those with ``candidate_ids`` and ``prefix_ids``) also give
    ``packed``: a :class:`layerwise_dist.pointwise.PackedBatch` of every example's
    prefix and candidates, one row each, with the unconditional group when the
    examples carry ``unconditional_ids`` (``pmi``; ``mean``/``sum`` scoring drops it
    before the forward). It moves with ``.to(device)`` like the tensors.
    """
    import torch

    if not features:
        raise DataError("collate got an empty batch")
    n = max(len(f["input_ids"]) for f in features)

    def pad(key: str, value: int) -> torch.Tensor:
        return torch.tensor([list(f[key]) + [value] * (n - len(f[key])) for f in features], dtype=torch.long)

    def has(key: str) -> bool:
        return all(key in f and f[key] is not None for f in features)

    batch = {"input_ids": pad("input_ids", pad_token_id)}
    if has("attention_mask"):
        batch["attention_mask"] = pad("attention_mask", 0)
    else:
        batch["attention_mask"] = torch.tensor(
            [[1] * len(f["input_ids"]) + [0] * (n - len(f["input_ids"])) for f in features], dtype=torch.long
        )
    if has("labels"):
        batch["labels"] = pad("labels", IGNORE_INDEX)
    for key in ("answer_pos", "target_index", "example_id"):
        if has(key):
            batch[key] = torch.tensor([int(f[key]) for f in features], dtype=torch.long)
    if has("candidate_ids") and has("prefix_ids"):
        batch["packed"] = _pack_pointwise(features, pad_token_id)
    if has("candidate_token_ids"):
        widths = {len(f["candidate_token_ids"]) for f in features}
        if len(widths) != 1:
            raise DataError(f"a batch mixes examples with different candidate counts {sorted(widths)}")
        batch["candidate_token_ids"] = torch.tensor(
            [list(f["candidate_token_ids"]) for f in features], dtype=torch.long
        )
    return batch
