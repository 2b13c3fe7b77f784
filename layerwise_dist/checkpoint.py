"""DeepSpeed checkpoints of a training run: save with the loop's state, resume, prune.

A checkpoint is DeepSpeed's own sharded tag folder (``<dir>/step<N>``) plus the
loop's client state: the step, the loss history and every rank's CPU RNG state.
The step alone fixes which data comes next (see :class:`layerwise_dist.data.RankSampler`).

Atomic across ranks. DeepSpeed 0.19's ``save_checkpoint`` lets rank 0 write ``latest``
right after its *own* shards, before the final barrier, while other ranks may still be
writing theirs (and ``torch.save`` does not fsync): a rank killed then leaves ``latest``
naming a checkpoint with a truncated shard. So :meth:`CheckpointStore.save` calls it with
``save_latest=False``; each rank then fsyncs its own files and writes
``<tag>/rank<r>.done`` (JSON: world size, the byte size of each of its files) by temp file
and rename; a barrier; rank 0 checks every rank's marker and file, then publishes
``latest`` by temp file + ``os.replace``. :meth:`CheckpointStore.load` loads the newest tag
whose markers and files all check out (sizes equal, zip directory readable), naming every
newer tag it skips and why, and hands DeepSpeed the tag (it never reads ``latest`` itself).
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .distributed import barrier, get_logger, is_main, rank, world_size

log = get_logger()

MARKER = "rank{}.done"


@dataclass
class TrainState:
    """What the loop needs to continue exactly: the optimizer steps done and the per-step losses."""

    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_file(path)
    except OSError:  # some file systems refuse fsync on a directory; the rename is still atomic
        pass


def _write_atomic(path: Path, text: str) -> None:
    """``path`` holds either its old content or ``text``, never a part (temp file, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _rank_files(tag_dir: Path, r: int) -> list[Path]:
    """The files rank ``r`` wrote into a DeepSpeed tag folder.

    ZeRO partitions are named ``*zero_pp_rank_<r>_mp_rank_*`` (model states under ZeRO-3,
    optimizer states under every stage); the unpartitioned ``mp_rank_*_model_states.pt``
    (ZeRO 0-2) is written by data-parallel rank 0 alone.
    """
    files = []
    for p in sorted(tag_dir.iterdir()):
        if not p.is_file() or p.name.endswith((".done", ".tmp")):
            continue
        if f"zero_pp_rank_{r}_mp_rank_" in p.name or (r == 0 and "zero_pp_rank_" not in p.name):
            files.append(p)
    return files


def _tag_step(path: Path) -> int:
    return int(path.name[4:])


class CheckpointStore:
    """The checkpoints of one run under ``folder`` (``latest`` names the newest complete tag)."""

    def __init__(self, folder: str | Path, keep: int = 2) -> None:
        self.folder = Path(folder)
        self.keep = keep

    # ---------------------------------------------------------------- save
    def save(self, engine: Any, state: TrainState) -> Path:
        """Every rank writes its shards, its RNG state and its completion marker; collective (call on all ranks)."""
        tag = f"step{state.step}"
        tag_dir = self.folder / tag
        if is_main() and tag_dir.exists():
            # Left by an interrupted or damaged save of this step (a resume fell back past it): its
            # stale markers must not vouch for the new shards, nor `latest` name it meanwhile. The
            # all_gather below orders this removal before any rank writes.
            if self._latest_name() == tag:
                (self.folder / "latest").unlink()
            shutil.rmtree(tag_dir)
        rng: list[Any] = [None] * world_size()
        rng[rank()] = torch.get_rng_state()
        if world_size() > 1:
            import torch.distributed as dist

            dist.all_gather_object(rng, torch.get_rng_state())
        client = {"step": state.step, "history": state.history, "rng_cpu": rng}
        engine.save_checkpoint(str(self.folder), tag=tag, client_state=client, save_latest=False)
        self._write_marker(tag_dir, state.step)
        barrier()  # every rank's shards and marker are on disk
        if is_main():
            problem = self.check(tag_dir)
            if problem:
                raise RuntimeError(f"checkpoint {tag_dir} is incomplete right after saving it: {problem}")
            _write_atomic(self.folder / "latest", tag)
            self.prune()
        return tag_dir

    def _write_marker(self, tag_dir: Path, step: int) -> None:
        files = _rank_files(tag_dir, rank())
        for p in files:
            _fsync_file(p)
        record = {
            "rank": rank(),
            "world_size": world_size(),
            "step": step,
            "files": {p.name: p.stat().st_size for p in files},
        }
        _write_atomic(tag_dir / MARKER.format(rank()), json.dumps(record, indent=1))

    # ---------------------------------------------------------------- check
    def check(self, tag_dir: Path) -> str:
        """Why the tag folder is not a complete checkpoint ('' when it is): every rank's marker present,
        every file it lists present with the recorded size and a readable zip directory."""
        if not tag_dir.is_dir():
            return "no such folder"
        first = tag_dir / MARKER.format(0)
        if not first.is_file():
            if not any(tag_dir.glob("rank*.done")):
                return "no rank finished writing it (no rank*.done)"
            return "rank 0 never finished writing it (no rank0.done)"
        try:
            n = int(json.loads(first.read_text())["world_size"])
        except (ValueError, KeyError, TypeError):
            return "rank0.done is unreadable"
        for r in range(n):
            marker = tag_dir / MARKER.format(r)
            if not marker.is_file():
                return f"rank {r} of {n} never finished writing it (no {marker.name})"
            try:
                files = json.loads(marker.read_text())["files"]
            except (ValueError, KeyError, TypeError):
                return f"{marker.name} is unreadable"
            for name, size in files.items():
                p = tag_dir / name
                if not p.is_file():
                    return f"rank {r}'s {name} is missing"
                if p.stat().st_size != size:
                    return f"rank {r}'s {name} has {p.stat().st_size} of its {size} bytes"
                if name.endswith(".pt") and zipfile.is_zipfile(p):
                    try:
                        with zipfile.ZipFile(p) as z:
                            z.infolist()
                    except (zipfile.BadZipFile, OSError) as e:
                        return f"rank {r}'s {name} is not readable ({e})"
        return ""

    def _tags(self) -> list[Path]:
        """Tag folders, newest first."""
        if not self.folder.is_dir():
            return []
        tags = [p for p in self.folder.glob("step*") if p.is_dir() and p.name[4:].isdigit()]
        return sorted(tags, key=_tag_step, reverse=True)

    def _latest_name(self) -> str:
        latest = self.folder / "latest"
        return latest.read_text().strip() if latest.is_file() else ""

    def newest_complete(self) -> tuple[str | None, list[str]]:
        """The newest complete tag (None if there is none) and one line per newer tag skipped, saying why.

        A tag without any marker that ``latest`` names was written before markers existed (``latest``
        is published only after every marker, and unlinked before its tag is rewritten): it is
        trusted, unverified, as DeepSpeed would.
        """
        latest = self._latest_name()
        skipped: list[str] = []
        for tag_dir in self._tags():
            if tag_dir.name == latest and not any(tag_dir.glob("rank*.done")):
                log.warning(
                    "checkpoint %s has no completion markers (older format): trusted as 'latest' names it", latest
                )
                return tag_dir.name, skipped
            problem = self.check(tag_dir)
            if not problem:
                return tag_dir.name, skipped
            skipped.append(f"{tag_dir.name}: {problem}")
        return None, skipped

    # ---------------------------------------------------------------- load
    def load(self, engine: Any) -> TrainState | None:
        """Load the newest complete checkpoint into ``engine``; None (with a warning) when there is none.

        Rank 0 chooses the tag and every rank loads that one: the ranks cannot disagree.
        """
        choice: list[Any] = [None]
        if is_main():
            choice[0] = self.newest_complete()
        if world_size() > 1:
            import torch.distributed as dist

            dist.broadcast_object_list(choice, src=0)
        tag, skipped = choice[0]
        for line in skipped:
            log.warning("checkpoint %s: skipped, falling back to an older one", line)
        if tag is None:
            log.warning(
                "train.resume=true but no complete checkpoint in %s%s: starting at step 0",
                self.folder,
                f" ({len(skipped)} incomplete)" if skipped else "",
            )
            return None
        path, client = engine.load_checkpoint(str(self.folder), tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.folder / tag}")
        state = TrainState(step=int(client["step"]), history=list(client.get("history", [])))
        states = client.get("rng_cpu") or []
        if len(states) == world_size():
            torch.set_rng_state(states[rank()])
        else:  # data order is still exact (a function of the step); only RNG-driven ops may differ
            log.warning(
                "checkpoint was written by %d ranks, this run has %d: RNG state not restored", len(states), world_size()
            )
        log.info("resumed from %s at step %d", self.folder / tag, state.step)
        return state

    # ---------------------------------------------------------------- prune
    def prune(self) -> None:
        """Keep the newest ``keep`` complete tags; rank 0 deletes.

        Incomplete tags older than the newest complete one are dead (a resume never picks them);
        a tag newer than the newest complete one is left alone (a save may be writing it).
        """
        if not is_main():
            return
        kept = 0
        for tag_dir in self._tags():
            complete = not self.check(tag_dir)
            if complete and kept < self.keep:
                kept += 1
            elif kept > 0:
                shutil.rmtree(tag_dir, ignore_errors=True)
