"""Offline teacher outputs: computed once per training example, reused by every student that distils from them.

A distillation step runs the frozen teacher forward on every batch; an ablation distils ten students from the
same teacher on the same examples (one seed, one sampler order), so it runs the same teacher forwards ten
times. :class:`TeacherCache` computes them once (DistillKit's offline mode) and stores, per example:

- ``hidden.<l>`` [len, H] bf16 (``distill.cache_dtype``): the raw output of each teacher layer ``l`` any
  student aligns to (the union of the cells' layer maps);
- the KD targets at the positions with a logit loss (listwise: the answer positions; pointwise: the positions
  predicting candidate tokens): with ``distill.cache_topk=0`` (the default) the full-vocabulary logits
  ``logits`` [U, V] in bf16, so KD is the online KD up to that rounding; with ``k > 0`` the teacher's top-k
  log-probabilities at the KD temperature with their token ids and the log of the remaining mass
  (``topk.index`` int32 / ``topk.logp`` / ``topk.tail`` fp32), ~V / (4k) times smaller;
- pointwise: ``token_logp`` [N] fp32, the teacher's log-prob (temperature 1) of each candidate token, from which
  its candidate scores (list-level KD targets) follow exactly;
- ``input_ids``: the example's tokens, checked against the batch at every read (a cache never silently
  serves another data set's outputs).

With top-k targets, KD is over k + 1 bins: the teacher's top-k tokens and the rest of the vocabulary as one bin
(the student's mass outside those k tokens against the teacher's). That is the full-vocabulary KD of
:mod:`layerwise_dist.losses` coarse-grained: a lower bound of it, equal to it when the teacher's tail mass is
0 or ``k`` covers the vocabulary, and far from it when the tempered teacher is flat (SmolLM2 at T = 2 on
Video_Games: the top 64 tokens hold 21% of the mass and the 65 bins keep 34% of the KD;
``benchmarks/bench_cache_topk.py``). CE, list-level KD and the alignment terms are the online ones in both
modes (up to the rounding of the stored hidden states).

Files: ``<folder>/manifest.json`` (what the cache holds: teacher, layers, k, temperature, formulation; a
cache built for other settings is refused) and ``<folder>/examples/<index>.safetensors``, one per training
example; each rank computes and writes the examples its own sampler visits, so the work is sharded by rank
and an interrupted build resumes where it stopped (an example file is written atomically).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .distributed import get_logger

log = get_logger()

CACHE_VERSION = 1
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class CacheError(ValueError):
    """A teacher cache that does not match the run reading it (settings, data or layers)."""


@dataclass
class CachedLogits:
    """The teacher's next-token distributions at U positions, as top-k log-probs plus the rest's log-mass.

    ``index`` [U, k] token ids, ``logp`` [U, k] fp32 ``log softmax(z / T)`` at them, ``tail`` [U] fp32 log of
    the remaining mass (``-inf`` when nothing remains), ``temperature`` the ``T`` they were taken at.
    """

    index: torch.Tensor
    logp: torch.Tensor
    tail: torch.Tensor
    temperature: float

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def rows(self, which: torch.Tensor) -> CachedLogits:
        return CachedLogits(self.index[which], self.logp[which], self.tail[which], self.temperature)

    def binned(self) -> torch.Tensor:
        """[U, k + 1] log-probs: the k tokens, then the rest of the vocabulary as one bin."""
        return torch.cat([self.logp, self.tail[:, None]], dim=-1)

    @staticmethod
    def from_logits(logits: torch.Tensor, k: int, temperature: float) -> CachedLogits:
        """Top-``k`` of ``[U, V]`` logits at ``temperature`` (fp32 maths)."""
        z = logits.float() / temperature
        lse = torch.logsumexp(z, dim=-1)
        values, index = z.topk(min(k, z.shape[-1]), dim=-1)
        tail = torch.logsumexp(z.scatter(-1, index, float("-inf")), dim=-1) - lse
        return CachedLogits(index, values - lse[:, None], tail, float(temperature))


def student_binned(student_logits: torch.Tensor, teacher: CachedLogits) -> torch.Tensor:
    """[U, k + 1] tempered log-probs of the student's ``[U, V]`` logits in the teacher's bins (differentiable)."""
    if student_logits.dim() != 2 or student_logits.shape[0] != len(teacher):
        raise CacheError(
            f"student logits {tuple(student_logits.shape)} for {len(teacher)} cached teacher positions: expected [U, V]"
        )
    if len(teacher) and int(teacher.index.max()) >= student_logits.shape[-1]:
        raise CacheError(
            f"cached teacher token ids reach {int(teacher.index.max())}, past the student's vocabulary "
            f"({student_logits.shape[-1]}): a cache needs one vocabulary for teacher and student"
        )
    z = student_logits.float() / teacher.temperature
    lse = torch.logsumexp(z, dim=-1)
    index = teacher.index.to(z.device).long()
    top = z.gather(-1, index) - lse[:, None]
    tail = torch.logsumexp(z.scatter(-1, index, float("-inf")), dim=-1) - lse
    return torch.cat([top, tail[:, None]], dim=-1)


@dataclass
class CachedTeacherOutput:
    """What the losses read of a teacher forward, rebuilt from the cache for one batch.

    ``logits``: the teacher's logits [U, V] (fp32) or its top-k :class:`CachedLogits` at the batch's loss
    positions, in the order the online path returns them (row-major); ``hidden_states``: a tuple like HF's (entry ``l + 1`` = layer ``l``), [B, L, H] fp32 for the
    cached layers and None for the others; ``token_logp``: pointwise, [N] in the batch's token order.
    """

    logits: Any
    hidden_states: tuple
    token_logp: torch.Tensor | None = None


def _keep_rows(batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``(keep [B, L], input_ids [B, L], lengths)`` of a batch: where its logit losses live, its tokens and each
    row's real length (packed rows for a pointwise batch)."""
    if "packed" in batch:
        from .losses import packed_logit_positions

        packed = batch["packed"]
        keep, _ = packed_logit_positions(packed)
        return keep, packed.input_ids, list(packed.lengths)
    from .losses import shifted_label_mask

    mask = batch["attention_mask"].bool()
    lengths = mask.sum(1).tolist()
    if any(not bool(mask[b, :n].all()) for b, n in enumerate(lengths)):
        raise CacheError("the teacher cache needs right-padded batches (layerwise_dist.data.collate)")
    return shifted_label_mask(batch["labels"]), batch["input_ids"], lengths


class TeacherCache:
    """Per-example teacher outputs in ``folder`` (see the module doc); ``settings`` must match the manifest."""

    def __init__(
        self,
        folder: str | Path,
        layers: Sequence[int],
        num_teacher_layers: int,
        topk: int,
        temperature: float,
        formulation: str,
        teacher: str,
        dtype: str = "bf16",
    ) -> None:
        if topk < 0:
            raise CacheError(f"teacher cache top-k must be >= 0 (0 = the full vocabulary); got {topk}")
        if dtype not in DTYPES:
            raise CacheError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
        bad = [layer for layer in layers if not 0 <= layer < num_teacher_layers]
        if bad:
            raise CacheError(f"cache layers {bad} outside the teacher's {num_teacher_layers} layers")
        self.folder = Path(folder)
        self.layers = sorted({int(layer) for layer in layers})
        self.num_teacher_layers = int(num_teacher_layers)
        self.settings = {
            "version": CACHE_VERSION,
            "teacher": str(teacher),
            "formulation": formulation,
            "topk": int(topk),
            "temperature": float(temperature),
            "dtype": dtype,
            "num_teacher_layers": self.num_teacher_layers,
        }
        self.dtype = DTYPES[dtype]
        self.examples = self.folder / "examples"
        self.bytes_read = 0

    # ------------------------------------------------------------ manifest
    def open(self) -> TeacherCache:
        """Create the folder and manifest, or check an existing manifest against these settings (every rank)."""
        manifest = self.folder / "manifest.json"
        if self.folder.exists() and not self.folder.is_dir():
            raise CacheError(f"teacher cache {self.folder} is a file, not a folder")
        if manifest.is_file():
            try:
                have = json.loads(manifest.read_text())
            except (OSError, ValueError) as e:
                raise CacheError(f"teacher cache {manifest} is unreadable ({e}): remove the folder") from None
            differ = {k: (have.get(k), v) for k, v in self.settings.items() if have.get(k) != v}
            if differ:
                raise CacheError(
                    f"teacher cache {self.folder} was built with other settings ({differ}, cached vs this run): "
                    "remove the folder or point the run at another one"
                )
            missing = sorted(set(self.layers) - set(have.get("layers", [])))
            if missing and any(self.examples.glob("*.safetensors")):
                raise CacheError(
                    f"teacher cache {self.folder} holds layers {have.get('layers')}; this run aligns to {missing} "
                    "too: remove the folder (it is rebuilt with the union of the layers)"
                )
            self.layers = sorted(set(self.layers) | set(have.get("layers", [])))
        self.examples.mkdir(parents=True, exist_ok=True)
        from .distributed import barrier, is_main

        if is_main():
            _atomic_write(manifest, json.dumps({**self.settings, "layers": self.layers}, indent=2).encode())
        barrier()
        return self

    def path(self, index: int) -> Path:
        return self.examples / f"{int(index)}.safetensors"

    def missing(self, indices: Iterable[int]) -> list[int]:
        return [i for i in dict.fromkeys(int(i) for i in indices) if not self.path(i).is_file()]

    # ------------------------------------------------------------ size
    def estimate_bytes(self, batch: Mapping[str, Any], hidden_size: int, vocab_size: int) -> int:
        """Bytes the examples of ``batch`` take in the cache (before computing them)."""
        keep, ids, lengths = _keep_rows(batch)
        width = torch.finfo(self.dtype).bits // 8
        per_token = len(self.layers) * hidden_size * width + 4  # + input_ids
        k = self.settings["topk"]
        per_position = k * (4 + 4) + 4 if k else vocab_size * width
        total = sum(lengths) * per_token + int(keep.sum()) * per_position
        if "packed" in batch:
            total += 4 * int(batch["packed"].token_row.numel())
        return int(total)

    # ------------------------------------------------------------ build
    def build(
        self,
        teacher: Any,
        batches: Iterable[tuple[Sequence[int], Mapping[str, Any]]],
        hidden_size: int,
        total: int | None = None,
        progress: bool = True,
    ) -> dict[str, float]:
        """Run the teacher on every ``(indices, batch)`` whose examples are missing and write them.

        ``batches`` yields the example indices of a collated batch and the batch itself (on the teacher's
        device). Returns ``{"examples": n, "bytes": written, "seconds": wall}``.
        """
        import time

        from tqdm.auto import tqdm

        from .distributed import rank

        start, written, done = time.perf_counter(), 0, 0
        bar = tqdm(total=total, desc=f"teacher cache (rank {rank()})", unit="ex", disable=not progress)
        for indices, batch in batches:
            outputs = self.teacher_outputs(teacher, batch)
            for b, index in enumerate(indices):
                written += self._write(int(index), self._example_tensors(outputs, batch, b))
                done += 1
            bar.update(len(indices))
        bar.close()
        return {"examples": done, "bytes": written, "seconds": time.perf_counter() - start}

    @torch.no_grad()
    def teacher_outputs(self, teacher: Any, batch: Mapping[str, Any]) -> Any:
        """One online teacher forward of ``batch`` with logits at the loss positions only."""
        from .losses import forward_for_loss

        return forward_for_loss(teacher, batch, "answer", getattr(teacher, "module", teacher))

    def _example_tensors(self, out: Any, batch: Mapping[str, Any], b: int) -> dict[str, torch.Tensor]:
        keep, ids, lengths = _keep_rows(batch)
        n = lengths[b]
        hidden = out.hidden_states
        if len(hidden) != self.num_teacher_layers + 1:
            raise CacheError(
                f"the teacher returned {len(hidden) - 1} layers' hidden states; expected {self.num_teacher_layers}"
            )
        row_of_kept = keep.nonzero(as_tuple=True)[0]
        mine = row_of_kept == b
        tensors = {"input_ids": ids[b, :n].to(torch.int32)}
        if self.settings["topk"]:
            logits = CachedLogits.from_logits(out.logits[mine], self.settings["topk"], self.settings["temperature"])
            tensors.update(
                {"topk.index": logits.index.to(torch.int32), "topk.logp": logits.logp, "topk.tail": logits.tail}
            )
        else:
            tensors["logits"] = out.logits[mine].to(self.dtype)
        for layer in self.layers:
            tensors[f"hidden.{layer}"] = hidden[layer + 1][b, :n].to(self.dtype)
        if "packed" in batch:
            packed = batch["packed"]
            from .losses import _token_log_probs, packed_logit_positions

            _, index = packed_logit_positions(packed)
            lp = _token_log_probs(out.logits, index, packed.token_target)
            tensors["token_logp"] = lp[packed.token_row == b].float()
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    def _read(self, index: int) -> dict[str, torch.Tensor] | None:
        """One example's tensors, None when it was never written; a corrupt file is a CacheError naming it."""
        from safetensors.torch import load

        path = self.path(index)
        if not path.is_file():
            return None
        try:
            return load(path.read_bytes())
        except Exception as e:  # safetensors raises its own error types for truncated or foreign files
            raise CacheError(
                f"teacher cache file {path} is corrupt ({type(e).__name__}: {e}): delete it to recompute"
            ) from None

    def _write(self, index: int, tensors: dict[str, torch.Tensor]) -> int:
        from safetensors.torch import save

        data = save(tensors, metadata={"index": str(index)})
        _atomic_write(self.path(index), data)
        return len(data)

    # ------------------------------------------------------------ read
    def outputs(self, indices: Sequence[int], batch: Mapping[str, Any]) -> CachedTeacherOutput:
        """The cached teacher outputs of the batch collated from the examples at ``indices``."""
        keep, ids, lengths = _keep_rows(batch)
        device = ids.device
        rows = [self._read(int(i)) for i in indices]
        absent = [int(i) for i, r in zip(indices, rows) if r is None]
        if absent:
            raise CacheError(f"teacher cache {self.folder} has no outputs for examples {absent[:5]}: build it first")
        kept_per_row = keep.sum(1).tolist()
        width = ids.shape[1]
        hidden: list[Any] = [None] * (self.num_teacher_layers + 1)
        for layer in self.layers:
            size = rows[0][f"hidden.{layer}"].shape[-1]
            hidden[layer + 1] = torch.zeros(len(rows), width, size, dtype=torch.float32, device=device)
        for b, (r, n) in enumerate(zip(rows, lengths)):
            if r["input_ids"].shape[0] != n or not torch.equal(r["input_ids"].to(device).long(), ids[b, :n].long()):
                raise CacheError(
                    f"teacher cache {self.folder}: example {int(indices[b])} holds other tokens than the batch "
                    "(the data or the prompt settings changed since it was built): remove the folder"
                )
            stored = r["topk.index" if self.settings["topk"] else "logits"].shape[0]
            if stored != kept_per_row[b]:
                raise CacheError(
                    f"teacher cache {self.folder}: example {int(indices[b])} has {stored} "
                    f"loss positions, the batch {kept_per_row[b]}"
                )
            for layer in self.layers:
                hidden[layer + 1][b, :n] = r[f"hidden.{layer}"].to(device, torch.float32)
            self.bytes_read += sum(t.numel() * t.element_size() for t in r.values())
        if self.settings["topk"]:
            logits: Any = CachedLogits(
                torch.cat([r["topk.index"] for r in rows]).to(device).long(),
                torch.cat([r["topk.logp"] for r in rows]).to(device),
                torch.cat([r["topk.tail"] for r in rows]).to(device),
                self.settings["temperature"],
            )
        else:  # [U, V] fp32, as the online teacher's logits at the loss positions
            logits = torch.cat([r["logits"] for r in rows]).to(device, torch.float32)
        token_logp = None
        if "packed" in batch:
            packed = batch["packed"]
            token_logp = torch.empty(packed.token_row.shape[0], dtype=torch.float32, device=device)
            for b, r in enumerate(rows):
                where = packed.token_row == b
                if int(where.sum()) != r["token_logp"].shape[0]:
                    raise CacheError(f"teacher cache {self.folder}: example {int(indices[b])} candidate tokens differ")
                token_logp[where] = r["token_logp"].to(device)
        return CachedTeacherOutput(logits, tuple(hidden), token_logp)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover
