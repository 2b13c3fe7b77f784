"""What every recipe of one run shares on a rank: config, process group, data, tracker, the teacher."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from ..config import RunConfig
from ..distributed import barrier, destroy_engine, device, get_logger, init_distributed, is_main, rank, world_size
from ..ds_config import resolve_ds_config

log = get_logger()


class TeacherHandle:
    """The frozen teacher of this rank, loaded at most once per run.

    ``teacher.placement=zero3``: a DeepSpeed engine holding this rank's shards (a Fisher
    engine when the first user needs gradients: its norms train at lr 0 so that
    ``engine.backward`` runs; a plain inference engine otherwise). ``replicate``: the
    whole model on this rank's device. Whichever is built first serves every later stage.
    """

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self._model: Any = None
        self.info: dict[str, Any] = {}
        self.load_s = 0.0

    def get(self, for_fisher: bool = False) -> Any:
        if self._model is not None:
            return self._model
        import deepspeed

        from ..fisher import make_fisher_engine
        from ..models.teacher import load_teacher

        cfg = self.cfg
        t0 = time.perf_counter()
        ds = resolve_ds_config(cfg.ds_config, cfg, "inference")
        model = load_teacher(cfg.teacher, ds if cfg.teacher.placement == "zero3" else None)
        if cfg.teacher.placement == "zero3" and for_fisher:
            # ZeRO-3 refuses loss.backward(); an engine whose norms train at lr 0 gives engine.backward.
            engine = make_fisher_engine(model, ds)
        elif cfg.teacher.placement == "zero3":
            engine, *_ = deepspeed.initialize(model=model, config=ds)
        else:
            engine = model.to(device())
        self.load_s = time.perf_counter() - t0
        self.info = describe_placement(model)
        log.info("teacher placement: %s", self.info)
        self._model = engine
        return engine

    @property
    def module(self) -> Any:
        """The model inside the engine (for hooks); loads the teacher if needed."""
        model = self.get()
        return model.module if hasattr(model, "module") else model

    def release(self) -> None:
        """Drop this rank's teacher (a DeepSpeed engine is destroyed first): later stages load their own models."""
        import gc

        if self._model is not None:
            destroy_engine(self._model)
        self._model = None
        gc.collect()


def _scores(results: dict[str, Any]) -> dict[str, Any]:
    """The measured scores of a run's results (teacher, student, comparison), numbers only, for MLflow."""
    out: dict[str, Any] = {}
    for name in ("teacher", "student"):
        if isinstance(results.get(name), dict):
            out[name] = {k: v for k, v in results[name].items() if _is_number(v)}
    if isinstance(results.get("comparison"), dict):
        out["comparison"] = results["comparison"]
    return out


_RESTORED_FILES = (
    "config.yaml",
    "results.json",
    "train_history.json",
    "layer_weights.json",
    "report.md",
    "report.png",
)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s unreadable (%s): not restored", path, exc)
        return None


def _eval_metrics(results: dict[str, Any]) -> dict[str, Any]:
    """The evaluation metrics a run logged, read back from its ``results.json``, under the same names: every
    scored model (:func:`_scores`' teacher, student and comparison, and any other, e.g. the zero-shot teacher)
    as ``eval/<model>/<metric>``, baselines as ``eval/baseline/<name>/<metric>`` (and ``<name>_random_ties``)."""
    scores = _scores(results)
    for name, value in results.items():
        if name not in scores and isinstance(value, dict) and _is_number(value.get("ndcg@10")):
            scores[name] = {k: v for k, v in value.items() if _is_number(v)}
    baselines: dict[str, Any] = {}
    for name, summary in (results.get("baselines") or {}).items():
        if isinstance(summary, dict):
            baselines[name] = {k: v for k, v in summary.items() if _is_number(v)}
            if isinstance(summary.get("random_ties"), dict):
                baselines[f"{name}_random_ties"] = {k: v for k, v in summary["random_ties"].items() if _is_number(v)}
    return {"eval": {**scores, **({"baseline": baselines} if baselines else {})}}


def describe_placement(model: torch.nn.Module) -> dict[str, Any]:
    """How the teacher is held on this rank: quantized modules, ZeRO-3 partitioning, local share."""
    quantized = sorted(
        {type(m).__name__ for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")}
    )
    params = list(model.parameters())
    partitioned = bool(params) and all(hasattr(p, "ds_id") for p in params)
    full = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    return {
        "quantized_modules": quantized,
        "zero3_partitioned": partitioned,
        "local_param_fraction": round(local / max(1, full), 4),
        "world_size": world_size(),
    }


class RunSession:
    """One run on this rank: ``with RunSession(cfg) as session: ...``.

    Entering joins the process group, seeds, writes the resolved config and DeepSpeed
    JSON (rank 0), loads tokenizer and splits, and opens the tracker run; leaving ends
    the tracker run as FINISHED, or FAILED when an exception left the block.

    MLflow: the run is tagged with the job (``job``: entry point), git commit, teacher,
    student and data set (``log_input`` with the data's digest); with ``nest_stages``
    each :meth:`stage` is a run nested under it. Its ids are kept in
    ``<output_dir>/mlflow_run.json``: ``train.resume=true`` continues the same runs.
    """

    def __init__(self, cfg: RunConfig, job: str = "", nest_stages: bool = False) -> None:
        # Resolve attn "auto" once for every model this run loads (pointwise block masks need sdpa/eager).
        attn = cfg.model_attn_implementation()
        if attn != cfg.teacher.attn_implementation:
            cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, attn_implementation=attn))
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.timings: dict[str, float] = {}
        self.results: dict[str, Any] = {}
        self.teacher = TeacherHandle(cfg)
        self._datasets: dict[str, Any] = {}
        self._rank_examples: dict[str, list[Any]] = {}
        self.base_teacher = cfg.teacher  # the zero-shot teacher, kept when adaptation swaps in the merged one
        self._t0 = time.perf_counter()
        self.tracker: Any = None
        self.run_tracker: Any = None  # the job's own MLflow run (``tracker`` is a stage's while one runs)
        self.job, self.nest_stages = job, nest_stages
        self.run_continued = False  # this sitting continues the MLflow run of an earlier one (set on enter)
        self._stage_runs: dict[str, str] = {}
        self._previous_stages: dict[str, str] = {}
        from ..stages import StageMeter

        self.meter = StageMeter()  # per-stage wall time and peak RSS on every rank (results.json "memory")

    def __enter__(self) -> RunSession:
        if getattr(self, "_parent", None) is not None:
            return self._enter_child()
        cfg = self.cfg
        init_distributed()
        torch.manual_seed(cfg.train.seed)
        self.ds_config = resolve_ds_config(cfg.ds_config, cfg, "train")
        self._lock = self._take_lock()
        try:
            self._open()
        except BaseException:  # a setup that fails releases output_dir's lock and ends its MLflow run FAILED
            self.__exit__(*sys.exc_info())
            raise
        return self

    def _open(self) -> None:
        """Everything ``__enter__`` does once output_dir is locked."""
        from ..data import load_splits
        from ..models.teacher import load_tokenizer
        from ..run_metadata import dataset_record, effective_uri, environment_record, read_run_file, source_tags
        from ..tracking import make_tracker

        cfg = self.cfg
        self._check_resume_config()
        # Teacher and data are checked before anything is written into output_dir.
        with self.meter.stage("setup"):
            self.tokenizer = load_tokenizer(cfg.teacher)
            self.splits = load_splits(cfg.data, progress=is_main())
        # What the data really is (data.category is a default for sources that name their own category).
        self.results["data"] = {
            "source": cfg.data.source,
            "category": self.splits.category,
            "users": len(self.splits.test),
            "items": len(self.splits.all_items),
        }
        if is_main():
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out / "config.yaml")
            (self.out / "ds_config.resolved.json").write_text(json.dumps(self.ds_config, indent=2))
        barrier()
        previous = None
        if is_main() and cfg.tracking.enabled and cfg.train.resume and not cfg.tracking.run_id:
            previous = read_run_file(self.out, effective_uri(cfg.tracking, self.out.parent))
        self._previous_stages = dict(previous["stages"]) if previous else {}
        self.tracker = self.run_tracker = make_tracker(
            cfg.tracking,
            self.out.parent,
            run_name=cfg.tracking.run_name or self._run_name(),
            rank=rank(),
            run_dir=self.out,  # an unreachable server buffers into the run folder (replayed later)
            run_id=previous["run_id"] if previous else None,  # a resumed job continues its MLflow run
            strict_resume=previous is None,
        )
        self.tracker.log_params(_resumed_params(cfg) if previous else cfg.to_dict())
        if previous:
            self.tracker.set_tags({"resumed": "true"})
        # False when the store lost the run an earlier sitting logged to: this sitting's run starts empty.
        self.run_continued = bool(previous) and getattr(self.tracker, "run_id", None) == previous["run_id"]
        dataset = dataset_record(self.splits, cfg.data) if is_main() else None
        # This sitting's software and machine (a resumed run records the last sitting's; each cell its own).
        self.results["environment"] = environment = environment_record()
        self.tracker.set_tags(
            {
                "world_size": str(world_size()),
                "device": "cuda" if torch.cuda.is_available() else "cpu",
                **(source_tags(self.job) if is_main() else {}),
                "teacher": cfg.teacher.model,
                "teacher.quantization": cfg.teacher.quantization,
                "student.num_layers": str(cfg.student.num_layers),
                "student.selection": cfg.student.selection,
                "distill.layer_weighting": cfg.distill.layer_weighting,
                **({"dataset": dataset["name"], "dataset.digest": dataset["digest"]} if dataset else {}),
                **{f"env.{k}": v for k, v in environment.items()},
            }
        )
        if is_main():
            self.tracker.log_input(dataset, context="train")
            self.tracker.log_artifact(self.out / "config.yaml")
            self.tracker.log_artifact(self.out / "ds_config.resolved.json")
            self._save_run_file()
        log.info(
            "run %s: %d ranks, data %s (%s users), teacher %s",
            self.out,
            world_size(),
            cfg.data.source,
            len(self.splits.test),
            cfg.teacher.model,
        )

    def _check_resume_config(self) -> None:
        """:func:`check_resume_config` on every rank, before rank 0 replaces the earlier config.yaml."""
        from ..distributed import barrier

        error = None
        try:
            check_resume_config(self.cfg)
        except Exception as e:  # every rank reaches the barrier before one raises
            error = e
        barrier()
        if error is not None:
            raise error

    def _take_lock(self) -> Any:
        """Rank 0 locks output_dir for the whole job; every rank learns the outcome (none hangs in a barrier)."""
        from ..distributed import all_reduce_sum
        from ..runlock import RunLock, RunLockedError

        lock, error = None, None
        if is_main():
            try:
                lock = RunLock(self.out).acquire()
            except RunLockedError as e:
                error = e
        failed = torch.tensor([0.0 if error is None else 1.0], dtype=torch.float64)
        all_reduce_sum(failed)
        if failed.item() > 0:
            raise error or RunLockedError(f"{self.out} is in use by another run (rank 0 names it)")
        return lock

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if self.tracker is not None:
                if is_main():
                    self._save_run_file()
                self.tracker.end(_end_status(exc_type))
        finally:
            if getattr(self, "_lock", None) is not None:
                self._lock.release()

    def _save_run_file(self) -> None:
        """``<output_dir>/mlflow_run.json``: this run's and its stages' MLflow ids (rank 0; resumed jobs read it).
        A child (an ablation cell) keeps its own in its folder."""
        from ..run_metadata import save_run_file

        if self.run_tracker is not None:
            save_run_file(self.out, self.run_tracker, {**self._previous_stages, **self._stage_runs})

    @contextmanager
    def stage(self, name: str) -> Iterator[Any]:
        """One stage of the job: its wall time and peak memory (``meter``), and, with ``nest_stages``, its own
        MLflow run nested under the job's (``session.tracker`` is that run's meanwhile; a resumed job
        continues the stage's earlier run). The stage run ends FAILED when the block raises (KILLED when a
        signal stopped it)."""
        with self.meter.stage(name):
            root = self.tracker
            if not self.nest_stages or root is None:
                yield root
                return
            tracker = root.nested(
                name,
                self.out,
                run_id=self._previous_stages.get(name),
                buffer_name=f"tracking_buffer.{name}.jsonl",
                tags={"stage": name},
            )
            if getattr(tracker, "run_id", None):
                self._stage_runs[name] = tracker.run_id
                if is_main():
                    self._save_run_file()
            self.tracker = tracker
            try:
                yield tracker
            except BaseException as e:
                tracker.end(_end_status(type(e)))
                raise
            else:
                tracker.end("FINISHED")
            finally:
                self.tracker = root

    def _log_model(self, student_dir: Path) -> None:
        """The final student as the run's MLflow model (``model/``: a pyfunc recommender; rank 0, the job's
        own run, ``tracking.log_model``)."""
        tracker = self.run_tracker
        if getattr(self, "_parent", None) is not None or not getattr(tracker, "active", False):
            return
        if not getattr(self.cfg.tracking, "log_model", True):
            return
        from ..mlflow_model import save_student_model

        folder = save_student_model(student_dir, self.out / "mlflow_model", self.cfg.to_dict()["data"])
        tracker.log_model(folder, name="student", artifact_path="model")

    def tag_run(self, tags: dict[str, Any]) -> None:
        """Tags on the job's own MLflow run (and the stage run now open, if any)."""
        if self.run_tracker is not None:
            self.run_tracker.set_tags(tags)
        if self.tracker is not None and self.tracker is not self.run_tracker:
            self.tracker.set_tags(tags)

    def _run_name(self) -> str:
        cfg = self.cfg
        return f"{self.out.name}-{cfg.student.num_layers}L-{cfg.student.selection}-{cfg.distill.layer_weighting}"

    def rank_examples(self, split: str) -> list[Any]:
        """The split's :class:`~layerwise_dist.data.RankExample` list (candidates and targets), before tokens.

        For valid/test, ``eval.max_examples`` users are a seeded sample (``data.seed``) kept in split
        order: the same users and candidates for every model and baseline of the run.
        """
        if split not in self._rank_examples:
            from ..data import build_examples, seeded_sample

            cfg = self.cfg
            examples = build_examples(self.splits, split, cfg.data, self.tokenizer)
            if split in ("test", "valid"):
                examples = seeded_sample(examples, cfg.eval.max_examples, cfg.data.seed)
            self._rank_examples[split] = examples
        return self._rank_examples[split]

    def examples(self, split: str) -> Any:
        """Tokenized examples of a split (cached by HF datasets across runs)."""
        if split not in self._datasets:
            from ..data import tokenize_examples

            cfg = self.cfg
            self._datasets[split] = tokenize_examples(
                self.rank_examples(split), self.tokenizer, cfg.data, cache_dir=cfg.data.cache_dir or None
            )
        return self._datasets[split]

    def use_teacher(self, model_dir: str | Path, quantization: str | None = None) -> RunConfig:
        """Continue this run with another teacher folder (the adapted, merged one): a new config and a fresh
        teacher handle for every later stage; the tokenizer, splits and tracker stay. ``quantization``
        replaces ``teacher.quantization`` for it (None: keep)."""
        self.teacher.release()
        changes: dict[str, Any] = {"model": str(model_dir), "gguf_file": ""}
        if quantization is not None:
            changes["quantization"] = quantization
        self.cfg = dataclasses.replace(self.cfg, teacher=dataclasses.replace(self.cfg.teacher, **changes))
        self.teacher = TeacherHandle(self.cfg)
        return self.cfg

    def child(self, out: str | Path, cfg: RunConfig, run_name: str) -> RunSession:
        """A run inside this one (an ablation cell): its own folder, config, results and MLflow run (nested
        under this run's), sharing the process group, tokenizer, data and, when ``cfg.teacher`` is this
        run's, the loaded teacher. Use as ``with session.child(...) as cell: ... cell.finish()``."""
        c = object.__new__(RunSession)
        c.cfg, c.out, c._parent, c._child_name = cfg, Path(out), self, run_name
        c.timings, c.results, c.tracker, c._lock = {}, {}, None, None
        # The software and machine it runs on: the parent's (the same process), recorded in its results.json too.
        from ..run_metadata import environment_record

        c.results["environment"] = self.results.get("environment") or environment_record()
        c.run_tracker, c.job, c.nest_stages, c._stage_runs, c._previous_stages = None, self.job, False, {}, {}
        c.teacher = self.teacher if cfg.teacher == self.cfg.teacher else TeacherHandle(cfg)
        same_data = cfg.data == self.cfg.data and cfg.eval == self.cfg.eval
        c._datasets = self._datasets if same_data else {}
        c._rank_examples = self._rank_examples if same_data else {}
        c.base_teacher, c.tokenizer = self.base_teacher, self.tokenizer
        if cfg.data == self.cfg.data:
            c.splits = self.splits
        else:  # another data set (a transfer check): its own splits
            from ..data import load_splits

            c.splits = load_splits(cfg.data, progress=is_main())
        c.ds_config = resolve_ds_config(cfg.ds_config, cfg, "train")
        c._t0 = time.perf_counter()
        from ..stages import StageMeter

        c.meter = StageMeter()
        return c

    def restore_child(self, out: str | Path, cfg: RunConfig, run_name: str) -> str | None:
        """A child an earlier sitting finished (an ablation cell), found again: when this tracking store has no
        run of it (the store was lost, moved or is another one), a nested run is made from its folder, so the
        parent run still shows every child. It gets the child's config as params, its training history
        (``train_history.json``) at the steps it was logged, its evaluation from ``results.json``, a Fisher
        profile's chart, table and depth shares, and those files as artifacts, tagged ``restored_from``. Returns the new run's id; ``None`` when the store already has
        the child's run, could not be asked, tracking is off, or on ranks other than 0. Never retrains nor
        rescores anything."""
        from ..run_metadata import effective_uri, read_run_file, save_run_file
        from ..tracking import make_tracker, run_in_store

        out = Path(out)
        if not (is_main() and cfg.tracking.enabled and self.run_tracker is not None):
            return None
        uri = effective_uri(cfg.tracking, self.out.parent)
        previous = read_run_file(out, uri)
        if previous and run_in_store(uri, previous["run_id"]) is not False:
            return None
        if hasattr(self.run_tracker, "flush"):
            self.run_tracker.flush()
        parent_id = getattr(self.run_tracker, "run_id", None)
        tracker = make_tracker(cfg.tracking, self.out.parent, run_name=run_name, rank=0, run_dir=out)
        with tracker:
            tracker.log_params(cfg.to_dict())
            tags = {"restored_from": str(out), **({"mlflow.parentRunId": parent_id} if parent_id else {})}
            tracker.set_tags(tags)
            history = _read_json(out / "train_history.json") or []
            for record in history if isinstance(history, list) else []:
                step = record.get("step")
                numbers = {k: v for k, v in record.items() if _is_number(v) and k != "step"}
                tracker.log_metrics(
                    {(k if k.startswith("valid/") else f"train/{k}"): v for k, v in numbers.items()}, step=step
                )
            results = _read_json(out / "results.json") or {}
            tracker.log_metrics(_eval_metrics(results))
            for name in _RESTORED_FILES:
                if (out / name).is_file():
                    tracker.log_artifact(out / name)
            if (out / "fisher_profile.json").is_file():  # a Fisher child: its chart, table and depth shares
                from ..fisher.profile import FisherProfile
                from ..run_metadata import log_fisher_profile

                log_fisher_profile(tracker, FisherProfile.load_json(out / "fisher_profile.json"), out)
            run_id = getattr(tracker, "run_id", None)
            save_run_file(out, tracker)
        log.info("tracking: %s had no run in %s; restored from %s as run %s", run_name, uri, out, run_id)
        return run_id

    def _enter_child(self) -> RunSession:
        from ..run_metadata import effective_uri, read_run_file
        from ..tracking import make_tracker

        parent = self._parent
        if is_main():
            self.out.mkdir(parents=True, exist_ok=True)
            self.cfg.save(self.out / "config.yaml")
        barrier()
        parent_id = None
        if parent.tracker is not None and hasattr(parent.tracker, "flush"):
            parent.tracker.flush()
            parent_id = getattr(parent.tracker, "run_id", None)
        cfg = self.cfg
        previous = None  # a cell stopped in an earlier sitting continues its own MLflow run
        if is_main() and cfg.tracking.enabled and cfg.train.resume and not cfg.tracking.run_id:
            previous = read_run_file(self.out, effective_uri(cfg.tracking, parent.out.parent))
        self.tracker = self.run_tracker = make_tracker(
            cfg.tracking,
            parent.out.parent,
            run_name=self._child_name,
            rank=rank(),
            run_dir=self.out,
            run_id=previous["run_id"] if previous else None,
            strict_resume=previous is None,
        )
        self.tracker.log_params(_resumed_params(cfg) if previous else cfg.to_dict())
        if previous:
            self.tracker.set_tags({"resumed": "true"})
        if is_main():
            self._save_run_file()
        if parent_id:  # MLflow shows the cell under the parent run
            self.tracker.set_tags({"mlflow.parentRunId": parent_id})
        return self

    @cached_property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def finish(self) -> dict[str, Any]:
        """Timings and teacher placement into the results; rank 0 writes results.json and the report."""
        from ..report import write_report

        self.timings["total_s"] = time.perf_counter() - self._t0
        if self.teacher.load_s:
            self.timings["teacher_load_s"] = self.teacher.load_s
        self.results["timings"] = self.timings
        self.results["memory"] = self.meter.summary()  # collective: every rank calls finish()
        self.results["setup"] = {"teacher": self.teacher.info} if self.teacher.info else {}
        self.results["mlflow_run_id"] = getattr(self.tracker, "run_id", None)
        if is_main():
            path = self.out / "results.json"
            path.write_text(json.dumps(self.results, indent=2, default=str))
            self.tracker.log_artifact(path)
            if self._stage_runs:  # the stages logged to their own runs: the job's run gets the scores too
                self.tracker.log_metrics({"eval": _scores(self.results)})
            student_dir = self.out / "student"
            if (student_dir / "config.json").is_file():  # the model card gets the measured metrics
                from ..export import write_model_card

                write_model_card(student_dir, run_dir=self.out)
                self._log_model(student_dir)
            if "teacher" in self.results or "student" in self.results:
                md, png = write_report(self.results, self.out)
                self.tracker.log_artifact(md)
                self.tracker.log_artifact(png)
                log.info("report: %s, chart: %s", md, png)
        return self.results


def _resumed_params(cfg: RunConfig) -> dict[str, Any]:
    """A resumed run's params: the first part logged how it started (MLflow params cannot change), so the
    keys that say how this part was launched are left out."""
    params = cfg.to_dict()
    params["train"] = {k: v for k, v in params["train"].items() if k not in ("resume", "stop_at_step")}
    return params


def _end_status(exc_type: type[BaseException] | None) -> str:
    """MLflow's end status: FINISHED, KILLED for a stop by signal or ^C (a resume continues it), else FAILED."""
    from ..trainer import StoppedBySignal

    if exc_type is None:
        return "FINISHED"
    return "KILLED" if issubclass(exc_type, (StoppedBySignal, KeyboardInterrupt)) else "FAILED"


# What a start that failed on bad input leaves: no stage's work, so its settings may be corrected.
_SETUP_ONLY = frozenset({"config.yaml", "ds_config.resolved.json", ".layerwise_dist.lock", "mlflow_run.json"})


def check_resume_config(cfg: RunConfig) -> None:
    """With ``train.resume=true``, an output_dir holding an earlier sitting's work must have been run with
    the same settings (:func:`layerwise_dist.config.resume_changes`): its finished stages and cells are
    reused as they are, so a changed learning rate or step budget would silently report results that
    were computed with the old one. A ConfigError names each changed setting. Called by every session and,
    before it writes the ranks' config.yaml over the earlier one, by ``layerwise-dist --nproc N``."""
    import yaml

    from ..config import ConfigError, resume_changes

    out = Path(cfg.output_dir)
    saved = out / "config.yaml"
    if not (cfg.train.resume and saved.is_file()):
        return
    # MLflow's write-ahead buffers (tracking_buffer*.jsonl, their state) are not a stage's work
    if not [p for p in out.iterdir() if p.name not in _SETUP_ONLY and not p.name.startswith("tracking_buffer")]:
        return
    try:
        previous = yaml.safe_load(saved.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"{saved} is unreadable ({type(e).__name__}), so the settings of the finished work in "
            f"{out} are unknown: restore that file, or give this run a new output_dir"
        ) from None
    changes = resume_changes(previous if isinstance(previous, dict) else {}, cfg.to_dict())
    if changes:
        listed = "; ".join(f"{k}: {old!r} there, {new!r} now" for k, old, new in changes[:8])
        more = f" (and {len(changes) - 8} more)" if len(changes) > 8 else ""
        raise ConfigError(
            f"train.resume=true would reuse the finished work in {out}, which was run with other "
            f"settings: {listed}{more}. Give this run a new output_dir, or set those values back to "
            "resume it"
        )
