"""Per-stage wall time and peak host memory of one run, on every rank.

``with meter.stage("fisher"): ...`` resets the kernel's resident-set high-water mark
(``/proc/self/clear_refs``, Linux >= 4.0) when the stage starts and reads it (``VmHWM``)
when it ends, so each stage's peak is its own, not the run's so far. ``meter.summary()``
gathers every rank's figures (one all-reduce): the pipeline writes them into
``results.json["memory"]["stages"]`` as ``{stage: {"peak_rss_mib": [rank0, rank1, ...],
"end_rss_mib": [...], "wall_s": [...]}}``.

What it measures is the process's resident set: model weights, activations, the
allocator's cache and the DeepSpeed shm buffers a rank has touched. Where the kernel does
not let a process reset its high-water mark, the peaks are None and say why.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch

from .distributed import all_reduce_sum, rank, world_size

MIB = 1024.0


def status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the resident-set high-water mark of this process; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return status_kib("VmHWM") is not None


def rss_mib() -> float | None:
    kib = status_kib("VmRSS")
    return None if kib is None else kib / MIB


def peak_rss_mib() -> float | None:
    kib = status_kib("VmHWM")
    return None if kib is None else kib / MIB


class StageMeter:
    """Wall time and peak RSS of each named stage on this rank; :meth:`summary` gathers all ranks.

    Every rank must enter the same stages in the same order (they do: a run's ranks run
    the same recipe), since :meth:`summary` sums fixed-position vectors across ranks.
    """

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, float | None]] = {}
        self.resettable = reset_peak_rss()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        resettable = reset_peak_rss()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            entry = self.stages.setdefault(name, {"peak_rss_mib": None, "end_rss_mib": None, "wall_s": 0.0})
            peak = peak_rss_mib() if resettable else None
            if peak is not None:  # a stage entered twice keeps its higher peak
                entry["peak_rss_mib"] = max(peak, entry["peak_rss_mib"] or 0.0)
            entry["end_rss_mib"] = rss_mib()
            entry["wall_s"] = float(entry["wall_s"] or 0.0) + time.perf_counter() - t0

    def summary(self) -> dict[str, Any]:
        """``{"stages": {name: {key: [per rank]}}, "note": ...}``, the same on every rank (one all-reduce)."""
        names = list(self.stages)
        keys = ("peak_rss_mib", "end_rss_mib", "wall_s")
        n = world_size()
        grid = torch.full((len(names), len(keys), n), 0.0, dtype=torch.float64)
        known = torch.zeros((len(names), len(keys), n), dtype=torch.float64)
        me = rank()
        for i, name in enumerate(names):
            for j, key in enumerate(keys):
                value = self.stages[name][key]
                if value is not None:
                    grid[i, j, me] = float(value)
                    known[i, j, me] = 1.0
        all_reduce_sum(grid)
        all_reduce_sum(known)
        stages = {
            name: {
                key: [round(float(grid[i, j, r]), 1) if known[i, j, r] else None for r in range(n)]
                for j, key in enumerate(keys)
            }
            for i, name in enumerate(names)
        }
        note = (
            "per rank: peak resident set during the stage (high-water mark reset at its start), "
            "resident set at its end, wall seconds"
        )
        if not self.resettable:
            note += "; peaks unavailable: this kernel does not let a process reset its high-water mark"
        return {"stages": stages, "note": note}
