"""The jobs a user runs, each as a recipe read top to bottom.

Every entry point runs these same functions on every rank: the deepspeed
launchers (``launchers/*.py``), ``layerwise-dist <command>`` (through the
deepspeed launcher when ``--nproc`` > 1) and Ray Train's ``train_loop_per_worker``
(:func:`layerwise_dist.ray_train.train_func`). Each takes the resolved
:class:`~layerwise_dist.config.RunConfig` and returns the run's results.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ..commands import DESCRIPTIONS  # noqa: F401 -- the jobs' one-line help, beside them
from ..config import RunConfig
from .adapt import AdaptRecipe
from .distill import DistillRecipe
from .evaluate import EvaluateRecipe
from .fisher import FisherRecipe
from .session import RunSession


def fisher(cfg: RunConfig) -> dict[str, Any]:
    """Fisher profile of the teacher: ``<output_dir>/fisher_profile.json`` + ``.png``."""
    with RunSession(cfg, job="fisher") as session:
        with session.stage("fisher"):
            recipe = FisherRecipe(session).setup()
            recipe.run()
            recipe.save()
        return session.finish()


def distill(cfg: RunConfig) -> dict[str, Any]:
    """Student from teacher layers (Fisher profile first when needed), distilled, saved and scored."""
    with RunSession(cfg, job="distill", nest_stages=True) as session:
        student_dir = _distill_student(session)
        return _finish_with_eval(session, student_dir, with_teacher=False)


def evaluate(cfg: RunConfig) -> dict[str, Any]:
    """Teacher and the run's student (``<output_dir>/student``, when present) on the test split."""
    with RunSession(cfg, job="evaluate") as session:
        student_dir = session.out / "student"
        return _finish_with_eval(session, student_dir if (student_dir / "config.json").exists() else None)


def adapt(cfg: RunConfig) -> dict[str, Any]:
    """LoRA (QLoRA) adapters on the teacher: ``<output_dir>/adapt/adapter`` + the merged fp32 ``adapt/merged``."""
    with RunSession(cfg, job="adapt") as session:
        _adapt_teacher(session)
        return session.finish()


def pipeline(cfg: RunConfig) -> dict[str, Any]:
    """The whole job: (teacher adaptation,) Fisher profile, distillation, teacher and student scored, report.

    MLflow: one run for the job, a nested run per stage (adapt, fisher, distill, evaluate)."""
    with RunSession(cfg, job="pipeline", nest_stages=True) as session:
        if cfg.adapt.enabled and not _adapt_teacher(session).complete:
            return session.finish()  # stopped early (train.stop_at_step): resume continues the adaptation
        with session.stage("fisher"):
            recipe = FisherRecipe(session).setup()
            recipe.run()
            profile = recipe.save()
        student_dir = _distill_student(session, profile)
        return _finish_with_eval(session, student_dir)


def _distill_student(session: RunSession, profile: Any = None) -> Any:
    """Build, distil and save the student; then free its engine and the teacher (evaluation loads its own)."""
    with session.stage("distill"):
        recipe = DistillRecipe(session, profile).setup().train()
        student_dir = recipe.save()
        session.tag_run({"student.layers": json.dumps(recipe.layer_map)})
        recipe.release()
    return student_dir


def _adapt_teacher(session: RunSession) -> AdaptRecipe:
    """Adapt the teacher; when all ``adapt.max_steps`` ran, the rest of the run uses the merged teacher.

    Returns the recipe: ``.complete`` is False when ``train.stop_at_step`` ended the adaptation early
    (checkpointed); ``.finished`` holds the summary of an adaptation an earlier sitting finished.
    """
    with session.stage("adapt"):
        recipe = AdaptRecipe(session).setup().train()
        merged = recipe.save()
        recipe.release()
    if recipe.complete:
        # The merged teacher is used in full precision: LoRA's delta is a fraction of one NF4 step
        # (measured on the demo: 0.4% of the weight norm vs a 9% quantization error), so quantizing
        # the merged weights again gives the base's NF4 codes back, bit for bit, and undoes the adaptation.
        session.use_teacher(merged, quantization="none")
    return recipe


def _finish_with_eval(
    session: RunSession, student_dir: Any, with_teacher: bool = True, reuse: dict[str, Any] | None = None
) -> dict[str, Any]:
    with session.stage("evaluate"):
        recipe = EvaluateRecipe(session, student_dir, with_teacher=with_teacher, reuse=reuse).setup()
        recipe.run()
        recipe.save()
    return session.finish()


def ablation(cfg: RunConfig) -> dict[str, Any]:
    """(Adaptation,) Fisher profile, one student per layer selection x weighting (nested runs), evaluation."""
    from .ablation import AblationRecipe

    with RunSession(cfg, job="ablation") as session:
        return AblationRecipe(session).run()


JOBS: dict[str, Callable[[RunConfig], dict[str, Any]]] = {
    "ablation": ablation,
    "adapt": adapt,
    "fisher": fisher,
    "distill": distill,
    "evaluate": evaluate,
    "pipeline": pipeline,
}
