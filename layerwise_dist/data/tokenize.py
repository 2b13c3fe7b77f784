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
from .prompts import LABELS, RankExample, has_chat_template, label_token_ids, render_prompt

IGNORE_INDEX = -100
FORMAT_VERSION = "1"
COLUMNS = ("input_ids", "attention_mask", "labels", "answer_pos", "target_index", "candidate_token_ids")


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


def examples_fingerprint(examples: Sequence[RankExample], tokenizer: Any, cfg: DataConfig) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"v{FORMAT_VERSION}|{cfg.max_length}|{tokenizer_fingerprint(tokenizer)}".encode())
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


def tokenize_examples(
    examples: Sequence[RankExample], tokenizer: Any, cfg: DataConfig, cache_dir: str | Path | None = None
) -> Any:
    """A ``datasets.Dataset`` with ``input_ids, attention_mask, labels, answer_pos, target_index,
    candidate_token_ids`` (plus ``user_id``, ``split``).

    ``labels`` is -100 except at the answer letter; ``answer_pos`` is the position whose
    logits predict it (answer index - 1). The result is cached as
    ``<cache_dir>/tokenized/tok-<fingerprint>.arrow``, the fingerprint covering the
    examples, the tokenizer (vocabulary, special tokens, chat template) and
    ``max_length``; a second call with the same inputs loads that file without
    tokenizing. Ranks racing on the same file are safe: ``datasets`` writes a temporary
    file and renames it.
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
    letter_ids = label_token_ids(tokenizer, max(len(ex.candidates) for ex in examples))
    rows = []
    for ex in examples:
        prompt, answer = render_prompt(ex, tokenizer)
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


def collate(features: Sequence[Mapping[str, Any]], pad_token_id: int = 0) -> dict[str, Any]:
    """Right-padded batch of tokenized examples (the one collate of every stage).

    ``input_ids`` is padded with ``pad_token_id``, ``labels`` with -100 and
    ``attention_mask`` with 0 (built from the lengths when the examples have none).
    ``labels``, ``answer_pos``, ``target_index``, ``candidate_token_ids`` (``[B, C]``)
    and ``example_id`` are carried when every example has them, so a plain
    ``input_ids`` + ``labels`` dataset (e.g. for a Fisher pass) collates too.
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
    if has("candidate_token_ids"):
        widths = {len(f["candidate_token_ids"]) for f in features}
        if len(widths) != 1:
            raise DataError(f"a batch mixes examples with different candidate counts {sorted(widths)}")
        batch["candidate_token_ids"] = torch.tensor(
            [list(f["candidate_token_ids"]) for f in features], dtype=torch.long
        )
    return batch
