"""Recipe: the ablation, every layer selection x layer weighting distilled from one teacher, same budget.

``layerwise-dist ablation`` runs, on every rank, in one process group and with one teacher per rank:

1. with ``adapt.enabled`` and ``ablation.zero_shot_fisher``: the zero-shot teacher's Fisher profile
   (``<out>/zero_shot/``), for the depth shares before adaptation;
2. with ``adapt.enabled``: the teacher's adaptation (``<out>/adapt/``), then the merged teacher in
   full precision for everything below;
3. the teacher's Fisher profile (``<out>/fisher_profile.json``), shared by every cell;
4. the cells (``<out>/cells/<selection>+<weighting>/``, plus ``<first selection>+task_only``: the
   student trained on the task loss alone, no distillation), each a nested run: the student built,
   distilled for ``train.max_steps`` from the same teacher (loaded once, kept across cells; with
   ``ablation.teacher_cache`` its outputs are computed once, by the first cell, for every layer any cell
   aligns to, in ``<out>/teacher_cache/``, and every cell reads them: :mod:`layerwise_dist.teacher_cache`), saved and
   scored on the test users (per-example parquet); the first cell validates every
   ``ablation.curve_every`` steps (its learning curve);
5. with ``ablation.transfer_source``, right after the first cell: the (adapted) teacher and that cell's
   student on that data set's test users (``<out>/transfer/``), a transfer check of quality (no latency
   or memory there);
6. the baselines, zero-shot and adapted teacher scored in this run, beside one cell's student (the first
   whose student folder is on disk, or its architecture built again: :meth:`AblationRecipe.final_student`; ``<out>/results.json``): quality on the same users (the student's read back from its cell's
   per-example file, not recomputed) and the student/teacher speed and memory ratios measured in one
   process.

Resumable at the granularity of a stage and a cell (``train.resume=true``, which ``layerwise-dist
ablation`` sets): a finished cell (``cell.json``) is never recomputed, an interrupted one continues
from its last checkpoint, a finished adaptation, Fisher profile, transfer check and final evaluation (``final_evaluation.json``)
are reused. A finished child whose MLflow run this store lacks (a new checkout, a lost or another store)
gets a nested run restored from its folder (:meth:`RunSession.restore_child`), so the parent run always
shows every cell.

Compute over sittings: every stage adds its wall seconds in this sitting to ``<out>/compute.json``
(rank 0; ``{"stages": {name: {"wall_s": total, "sittings": k}}}``), also when the sitting is stopped
in the middle of it, so the report's total counts every sitting's work, not only the last one's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..distributed import barrier, get_logger, is_main
from .session import RunSession

log = get_logger()

CELL_DONE = "cell.json"
FINAL_DONE = "final_evaluation.json"  # the last stage finished: results.json holds its evaluation
COMPUTE_LEDGER = "compute.json"


def add_compute(out: Path, stage: str, seconds: float) -> None:
    """Add one sitting's ``seconds`` of ``stage`` to ``<out>/compute.json`` (written whole, then renamed)."""
    path = out / COMPUTE_LEDGER
    ledger = json.loads(path.read_text()) if path.is_file() else {}
    stages = ledger.setdefault("stages", {})
    entry = stages.setdefault(stage, {"wall_s": 0.0, "sittings": 0})
    entry["wall_s"] = round(entry["wall_s"] + seconds, 3)
    entry["sittings"] += 1
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(ledger, indent=2))
    tmp.replace(path)


@dataclass
class Sitting:
    """One sitting's go at a stage: ``reused`` is set when the stage was found finished (nothing is added)."""

    reused: bool = False


@contextlib.contextmanager
def counted(out: Path, stage: str) -> Iterator[Sitting]:
    """Time the block and add it to the compute ledger on rank 0, whether it finishes, fails or is stopped.

    A block that only found its stage finished by an earlier sitting sets ``Sitting.reused`` and adds
    nothing. A ledger that cannot be read or written is warned about, never raised: the block's own
    error (this runs in a ``finally``) must not be hidden, and a run is not lost for a timing figure.
    """
    t0 = time.perf_counter()
    sitting = Sitting()
    try:
        yield sitting
    finally:
        if is_main() and not sitting.reused:
            try:
                add_compute(out, stage, time.perf_counter() - t0)
            except (OSError, ValueError) as e:
                log.warning("compute ledger %s not updated for %s (%s)", out / COMPUTE_LEDGER, stage, e)


@dataclass(frozen=True)
class Cell:
    """One student of the ablation: a layer selection and a layer-loss weighting (or the task loss alone)."""

    selection: str
    weighting: str
    task_only: bool = False

    @property
    def name(self) -> str:
        return f"{self.selection}+{'task_only' if self.task_only else self.weighting}"

    def config(self, cfg: RunConfig, out: Path, curve_every: int = 0) -> RunConfig:
        distill = dataclasses.replace(cfg.distill, layer_weighting=self.weighting)
        if self.task_only:  # the task's CE alone: what the student learns without a teacher
            distill = dataclasses.replace(distill, kd_weight=0.0, list_kd_weight=0.0, align_weight=0.0)
        # Only the learning-curve cell validates: every cell's test evaluation follows its training, so a
        # last validation (a teacher forward and a ZeRO-3 student ranking of the validation users, ~2 min
        # per cell in the experiment) would add nothing.
        train = (
            dataclasses.replace(cfg.train, eval_every=curve_every)
            if curve_every
            else dataclasses.replace(cfg.train, final_validation=False)
        )
        return dataclasses.replace(
            cfg,
            output_dir=str(out),
            student=dataclasses.replace(cfg.student, selection=self.selection),
            distill=distill,
            train=train,
        )


def transfer_reuse_source(source: str) -> str:
    """The folder whose teacher scores the transfer check reads (``eval.reuse_teacher_scores`` of the child run):
    ``<source>/transfer`` when that run's transfer check wrote the teachers' per-example files, else ``''``
    (scored here). Never ``source`` itself: its files rank the main data set's users, not the transfer users.
    The evaluation still reuses a file only for the same users and candidates and a teacher that scores its
    first batch as the file does."""
    if not source:
        return ""
    from .evaluate import reused_teacher_files

    folder = Path(source) / "transfer"
    try:
        reused_teacher_files(folder)
    except FileNotFoundError:
        log.info("ablation: %s holds no teacher scores; the transfer check scores the teachers", folder / "per_example")
        return ""
    return str(folder)


def ablation_cells(cfg: RunConfig) -> list[Cell]:
    """Every selection x weighting of ``cfg.ablation``, then the task-only student (first selection)."""
    a = cfg.ablation
    cells = [Cell(s, w) for s in a.selections for w in a.weightings]
    if a.task_only:
        cells.append(Cell(a.selections[0], "uniform", task_only=True))
    return cells


class AblationRecipe:
    """``run()``: zero-shot Fisher, adaptation, Fisher, cells, final evaluation (see the module doc)."""

    def __init__(self, session: RunSession) -> None:
        self.session = session
        self.cells = ablation_cells(session.cfg)
        self.cell_results: dict[str, dict[str, Any]] = {}

    def run(self) -> dict[str, Any]:
        from .fisher import FisherRecipe
        from .jobs import _adapt_teacher, _finish_with_eval

        session, cfg = self.session, self.session.cfg
        out = session.out
        if cfg.ablation.budget_reference:  # checked now, not hours later when the report is written
            from ..ablation_report import budget_reference_dir

            budget_reference_dir(out, cfg.ablation.budget_reference)
        if cfg.eval.reuse_teacher_scores:  # likewise: the final evaluation reads it hours from now
            from .evaluate import reused_teacher_files

            reused_teacher_files(cfg.eval.reuse_teacher_scores)
        if cfg.adapt.enabled and cfg.ablation.zero_shot_fisher:
            with counted(out, "fisher_zero_shot") as s:
                s.reused = self._zero_shot_fisher_done()
                self._zero_shot_fisher()
        if cfg.adapt.enabled:
            session.teacher.release()  # the adaptation engine needs the room
            with counted(out, "adapt") as s:
                adapt = _adapt_teacher(session)
                s.reused = adapt.finished is not None
            if not adapt.complete:
                return session.finish()  # stopped early (train.stop_at_step); resume continues it
        with session.meter.stage("fisher"), counted(out, "fisher") as s:
            recipe = FisherRecipe(session).setup()
            s.reused = recipe.profile is not None  # this run's saved profile (resume) or fisher.profile
            recipe.run()
            profile = recipe.save()
        cache_layers = self._cache_layers(profile) if cfg.ablation.teacher_cache else None
        for i, cell in enumerate(self.cells):
            with counted(out, f"cell:{cell.name}") as s:
                s.reused = self._cell_done(cell.name)
                result = self._cell(cell, profile, curve=(i == 0), cache_layers=cache_layers)
            if result is None:  # stopped early (train.stop_at_step): not finished; resume continues this cell
                return session.finish()
            self.cell_results[cell.name] = result
            if i == 0 and cfg.ablation.transfer_source:
                # Right after the first cell, while its student folder is surely on disk: student folders are
                # not committed, so a later sitting on a fresh checkout may not have it.
                with counted(out, "transfer") as s:
                    s.reused = self._transfer_done()
                    self._transfer()
        session.teacher.release()
        session.results["cells"] = {
            name: {"folder": str(self._cell_dir(name)), "student": r.get("student")}
            for name, r in self.cell_results.items()
        }
        with counted(out, "final_evaluation") as s:
            s.reused = (out / FINAL_DONE).is_file() and (out / "results.json").is_file()
            if s.reused:
                log.info("ablation: final evaluation already in %s", out / "results.json")
                results = self._final_results()
            else:
                t0 = time.perf_counter()
                name, student_dir = self.final_student()
                # That student already ranked these users: its quality is read back, not recomputed; it is
                # loaded again only for its speed and memory beside the teachers in this process.
                session.results["final_student_cell"] = name
                if student_dir.parent != self._cell_dir(name):
                    session.results["final_student_rebuilt"] = str(student_dir)
                reuse = {"student": self._cell_dir(name) / "per_example" / "student.parquet"}
                results = _finish_with_eval(session, student_dir, reuse=reuse)
                if is_main():
                    (out / FINAL_DONE).write_text(json.dumps({"wall_s": time.perf_counter() - t0}, indent=2))
        if is_main():
            from ..ablation_report import write_ablation_report

            md, js = write_ablation_report(session.out)
            for path in (md, js, session.out / "ablation_quality.png", session.out / "ablation_curve.png"):
                if path.is_file():
                    session.tracker.log_artifact(path)
            log.info("ablation report: %s", md)
        barrier()
        return results

    def _final_results(self) -> dict[str, Any]:
        """The final evaluation an earlier sitting finished, read back (every rank); when this sitting's MLflow
        run is not the one it logged to (the store lost it), its scores and files are logged here again."""
        from .session import _eval_metrics

        session = self.session
        results = json.loads((session.out / "results.json").read_text())
        if is_main() and not session.run_continued:
            session.tracker.log_metrics(_eval_metrics(results))
            for name in ("results.json", "report.md", "report.png"):
                if (session.out / name).is_file():
                    session.tracker.log_artifact(session.out / name)
        return results

    def final_student(self) -> tuple[str, Path]:
        """The cell whose student the final evaluation loads for speed and memory (all students share one
        architecture), and the folder it loads: the first cell of the run whose student folder is on disk.

        Student folders are not committed with the results, so a sitting on a fresh checkout that trains no
        cell has none: then the first cell's student is built again from the teacher's layers (its layer map,
        ``layer_weights.json``) into ``<out>/final_student``, untrained. Its latency and memory are those of
        the trained one (the same architecture, dtype and shapes: they do not depend on the weights' values),
        and its quality is not scored: it is read from that cell's per-example file.
        """
        for cell in self.cells:
            if (self._cell_dir(cell.name) / "student" / "config.json").is_file():
                if cell is not self.cells[0]:
                    log.info(
                        "ablation: %s has no student folder; speed and memory are measured on %s's student",
                        self.cells[0].name,
                        cell.name,
                    )
                return cell.name, self._cell_dir(cell.name) / "student"
        first = self.cells[0].name
        weights = self._cell_dir(first) / "layer_weights.json"
        if not weights.is_file():
            raise FileNotFoundError(
                f"no cell of {self.session.out / 'cells'} has a student folder (student/config.json), and "
                f"{weights}, which names the first cell's teacher layers, is missing too: the final evaluation "
                f"cannot build a student to measure speed and memory; retrain that cell by removing "
                f"{self._cell_dir(first) / CELL_DONE} and running the ablation again (its other stages are reused)"
            )
        folder = self.session.out / "final_student"
        if is_main() and not (folder / "config.json").is_file():
            from ..export import swap_in
            from ..models.student import build_student
            from ..models.teacher import resolve_model_dir

            layer_map = json.loads(weights.read_text())["layer_map"]
            student, _ = build_student(resolve_model_dir(self.session.cfg.teacher), layer_map)
            tmp = folder.with_name(folder.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            student.save_pretrained(str(tmp), safe_serialization=True)
            self.session.tokenizer.save_pretrained(str(tmp))
            swap_in(tmp, folder)
            del student
        barrier()
        log.info(
            "ablation: no cell's student folder is on disk (a fresh checkout); speed and memory are measured on "
            "%s's architecture built again from the teacher's layers (%s), its quality read from its per-example file",
            first,
            folder,
        )
        return first, folder

    def _transfer(self) -> None:
        """The (adapted) teacher and the first cell's student on another data set's test users (``<out>/transfer``).

        The first cell (the preset's method, fisher-topk + fisher weights in the experiment) is fixed before any
        result is seen; choosing the cell with the best test score would select on the test users."""
        from .evaluate import EvaluateRecipe

        session, a = self.session, self.session.cfg.ablation
        out = session.out / "transfer"
        changes = {"source": a.transfer_source, "category_phrase": ""}  # the phrase follows the new category
        if a.transfer_reviews:
            changes["reviews"] = a.transfer_reviews
        if a.transfer_category:
            changes["category"] = a.transfer_category
        data = dataclasses.replace(session.cfg.data, **changes)
        reuse = transfer_reuse_source(session.cfg.eval.reuse_teacher_scores)
        cfg = dataclasses.replace(
            session.cfg,
            data=data,
            eval=dataclasses.replace(session.cfg.eval, reuse_teacher_scores=reuse),
            output_dir=str(out),
        )
        if self._transfer_done():
            log.info("ablation: transfer check already in %s", out)
            session.restore_child(out, cfg, f"{session.out.name}-transfer")
            return
        first = self.cells[0].name
        student = self._cell_dir(first) / "student"
        if not (student / "config.json").is_file():
            raise FileNotFoundError(
                f"the transfer check scores {first}'s student, and {student} holds none (student folders are not "
                f"committed); retrain that cell by removing {self._cell_dir(first) / CELL_DONE} and running the "
                "ablation again (its other stages are reused)"
            )
        with session.meter.stage("transfer"), session.child(out, cfg, f"{session.out.name}-transfer") as t:
            t.results["transfer"] = {"cell": first, "source": data.source, "category": data.category}
            recipe = EvaluateRecipe(t, student, with_teacher=True, measure_cost=False).setup()
            recipe.run()
            recipe.save()
            t.finish()

    # ---------------------------------------------------------------- stages
    def _cell_dir(self, name: str) -> Path:
        return self.session.out / "cells" / name

    def _cell_done(self, name: str) -> bool:
        return (self._cell_dir(name) / CELL_DONE).is_file()

    def _transfer_done(self) -> bool:
        return (self.session.out / "transfer" / "results.json").is_file()

    def _zero_shot_fisher_done(self) -> bool:
        out = self.session.out / "zero_shot"
        return (out / "fisher_profile.json").is_file() and (out / "results.json").is_file()

    def _zero_shot_fisher(self) -> None:
        from .fisher import FisherRecipe

        session = self.session
        out = session.out / "zero_shot"
        cfg = dataclasses.replace(session.cfg, output_dir=str(out))
        if self._zero_shot_fisher_done():
            log.info("ablation: zero-shot Fisher profile already in %s", out)
            session.restore_child(out, cfg, f"{session.out.name}-zero-shot")
            return
        with session.meter.stage("fisher_zero_shot"), session.child(out, cfg, f"{session.out.name}-zero-shot") as z:
            recipe = FisherRecipe(z).setup()
            recipe.run()
            recipe.save()
            z.finish()

    def _cache_layers(self, profile: Any) -> list[int]:
        """Every teacher layer some cell aligns to: the teacher cache stores them all, once."""
        from ..models.student import select_layers

        s = self.session.cfg.student
        if s.layer_map:
            return sorted(set(s.layer_map))
        n = len(profile.scores)
        layers: set[int] = set()
        for cell in self.cells:
            layers |= set(
                select_layers(cell.selection, n, s.num_layers, fisher_scores=list(profile.scores), layers=s.layers)
            )
        return sorted(layers)

    def _cell(
        self, cell: Any, profile: Any, curve: bool, cache_layers: list[int] | None = None
    ) -> dict[str, Any] | None:
        """Train, save and score one cell; its results. ``None`` when ``train.stop_at_step`` ended its training
        before ``train.max_steps``: then it is neither scored nor marked finished (its checkpoint stays)."""
        from .distill import DistillRecipe, teacher_identity
        from .evaluate import EvaluateRecipe

        session = self.session
        out = self._cell_dir(cell.name)
        cfg = cell.config(session.cfg, out, session.cfg.ablation.curve_every if curve else 0)
        if cache_layers is not None:  # every cell reads the one cache (the first cell builds it)
            cfg = dataclasses.replace(
                cfg, distill=dataclasses.replace(cfg.distill, teacher_cache=str(session.out / "teacher_cache"))
            )
        if self._cell_done(cell.name):
            log.info("ablation: cell %s already finished (%s)", cell.name, out)
            session.restore_child(out, cfg, f"{session.out.name}-{cell.name}")
            return json.loads((out / "results.json").read_text())
        t0 = time.perf_counter()
        log.info("ablation: cell %s (%d of %d)", cell.name, self.cells.index(cell) + 1, len(self.cells))
        with session.meter.stage(f"cell:{cell.name}"), session.child(out, cfg, f"{session.out.name}-{cell.name}") as c:
            c.results["cell"] = {**dataclasses.asdict(cell), "name": cell.name}
            with c.meter.stage("distill"):
                recipe = DistillRecipe(c, profile, cache_layers=cache_layers).setup().train()
                student_dir = recipe.save()
                recipe.release(keep_teacher=True)
            if recipe.state.step < cfg.train.max_steps:
                log.info(
                    "ablation: cell %s stopped at step %d of %d (train.stop_at_step): not finished; run again "
                    "without it to continue the cell from its checkpoint",
                    cell.name,
                    recipe.state.step,
                    cfg.train.max_steps,
                )
                return None
            with c.meter.stage("evaluate"):
                evaluation = EvaluateRecipe(c, student_dir, with_teacher=False).setup()
                evaluation.run()
                evaluation.save()
            results = c.finish()
        if is_main():  # the teacher it was distilled from, by contents: the report flags a table of mixed teachers
            done = {"cell": cell.name, "wall_s": time.perf_counter() - t0, "teacher": teacher_identity(cfg.teacher)}
            (out / CELL_DONE).write_text(json.dumps(done, indent=2))
        barrier()
        if is_main():  # they only served a resume of this cell, which is never trained again (0.7 GB a cell here)
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        return results
