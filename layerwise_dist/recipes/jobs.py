"""The jobs a user runs, each as a recipe read top to bottom.

Every entry point runs these same functions on every rank: the deepspeed
launchers (``launchers/*.py``), ``layerwise-dist <command>`` (through the
deepspeed launcher when ``--nproc`` > 1) and Ray Train's ``train_loop_per_worker``
(:func:`layerwise_dist.ray_train.train_func`). Each takes the resolved
:class:`~layerwise_dist.config.RunConfig` and returns the run's results.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..config import RunConfig
from .distill import DistillRecipe
from .evaluate import EvaluateRecipe
from .fisher import FisherRecipe
from .session import RunSession


def fisher(cfg: RunConfig) -> dict[str, Any]:
    """Fisher profile of the teacher: ``<output_dir>/fisher_profile.json`` + ``.png``."""
    with RunSession(cfg) as session:
        recipe = FisherRecipe(session).setup()
        recipe.run()
        recipe.save()
        return session.finish()


def distill(cfg: RunConfig) -> dict[str, Any]:
    """Student from teacher layers (Fisher profile first when needed), distilled, saved and scored."""
    with RunSession(cfg) as session:
        student_dir = DistillRecipe(session).setup().train().save()
        return _finish_with_eval(session, student_dir, with_teacher=False)


def evaluate(cfg: RunConfig) -> dict[str, Any]:
    """Teacher and the run's student (``<output_dir>/student``, when present) on the test split."""
    with RunSession(cfg) as session:
        student_dir = session.out / "student"
        return _finish_with_eval(session, student_dir if (student_dir / "config.json").exists() else None)


def pipeline(cfg: RunConfig) -> dict[str, Any]:
    """The whole job: Fisher profile, distillation, teacher and student scored, report."""
    with RunSession(cfg) as session:
        recipe = FisherRecipe(session).setup()
        recipe.run()
        profile = recipe.save()
        student_dir = DistillRecipe(session, profile).setup().train().save()
        return _finish_with_eval(session, student_dir)


def _finish_with_eval(session: RunSession, student_dir: Any, with_teacher: bool = True) -> dict[str, Any]:
    recipe = EvaluateRecipe(session, student_dir, with_teacher=with_teacher).setup()
    recipe.run()
    recipe.save()
    return session.finish()


JOBS: dict[str, Callable[[RunConfig], dict[str, Any]]] = {
    "fisher": fisher,
    "distill": distill,
    "evaluate": evaluate,
    "pipeline": pipeline,
}

DESCRIPTIONS = {
    "fisher": "measure the layerwise Fisher profile of the teacher (JSON + PNG in output_dir)",
    "distill": "build the student from teacher layers, distil it, save it and score it on the test split",
    "evaluate": "score teacher and student (output_dir/student) on the test split: HR@K, NDCG@K, MRR, latency, memory",
    "pipeline": "the whole job: Fisher profile, distillation, evaluation of teacher and student, report, MLflow run",
}
