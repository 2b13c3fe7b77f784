"""DeepSpeed checkpoints of a training run: save with the loop's state, resume, prune.

A checkpoint is DeepSpeed's own sharded tag folder (``<dir>/step<N>``) plus the
loop's client state: the step, the loss history and every rank's CPU RNG state.
The step alone fixes which data comes next (see :class:`layerwise_dist.data.RankSampler`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .distributed import get_logger, is_main, rank, world_size

log = get_logger()


@dataclass
class TrainState:
    """What the loop needs to continue exactly: the optimizer steps done and the per-step losses."""

    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


class CheckpointStore:
    """The checkpoints of one run under ``folder`` (``latest`` names the newest tag)."""

    def __init__(self, folder: str | Path, keep: int = 2) -> None:
        self.folder = Path(folder)
        self.keep = keep

    def save(self, engine: Any, state: TrainState) -> Path:
        """Every rank writes its shards and its RNG state; collective (call on all ranks)."""
        tag = f"step{state.step}"
        rng: list[Any] = [None] * world_size()
        rng[rank()] = torch.get_rng_state()
        if world_size() > 1:
            import torch.distributed as dist

            dist.all_gather_object(rng, torch.get_rng_state())
        client = {"step": state.step, "history": state.history, "rng_cpu": rng}
        engine.save_checkpoint(str(self.folder), tag=tag, client_state=client)
        self.prune()
        return self.folder / tag

    def load(self, engine: Any) -> TrainState | None:
        """Load the newest checkpoint into ``engine``; None (with a warning) when there is none."""
        latest = self.folder / "latest"
        if not latest.exists():
            log.warning("train.resume=true but no checkpoint in %s: starting at step 0", self.folder)
            return None
        path, client = engine.load_checkpoint(str(self.folder))
        if path is None:
            raise RuntimeError(f"could not load the checkpoint named in {latest}")
        state = TrainState(step=int(client["step"]), history=list(client.get("history", [])))
        states = client.get("rng_cpu") or []
        if len(states) == world_size():
            torch.set_rng_state(states[rank()])
        else:  # data order is still exact (a function of the step); only RNG-driven ops may differ
            log.warning(
                "checkpoint was written by %d ranks, this run has %d: RNG state not restored", len(states), world_size()
            )
        log.info("resumed from %s at step %d", path, state.step)
        return state

    def prune(self) -> None:
        """Keep the newest ``keep`` tags (and always the one ``latest`` names); rank 0 deletes."""
        if not is_main():
            return
        latest = (self.folder / "latest").read_text().strip() if (self.folder / "latest").exists() else ""
        tags = sorted((p for p in self.folder.glob("step*") if p.is_dir()), key=lambda p: int(p.name[4:]), reverse=True)
        for p in tags[self.keep :]:
            if p.name != latest:
                shutil.rmtree(p, ignore_errors=True)
