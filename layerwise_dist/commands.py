"""The commands ``layerwise-dist`` runs and their one-line help, without importing the jobs.

The jobs themselves (:data:`layerwise_dist.recipes.jobs.JOBS`) import torch, transformers and DeepSpeed;
the command line reads this module to parse and print help, and imports a job only to run it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

DESCRIPTIONS = {
    "ablation": "students for every ablation.selections x ablation.weightings (and the task loss alone) from one "
    "(adapted) teacher, same budget, each a nested run in output_dir/cells/; resumable cell by cell",
    "adapt": "train LoRA adapters on the teacher (QLoRA on a 4-bit ZeRO-3 base): output_dir/adapt/adapter + merged/",
    "fisher": "measure the layerwise Fisher profile of the teacher (JSON + PNG in output_dir)",
    "distill": "build the student from teacher layers, distil it, save it and score it on the test split",
    "evaluate": "score teacher and student (output_dir/student) on the test split: HR@K, NDCG@K, MRR, latency, memory",
    "pipeline": "the whole job: (adapt.enabled: teacher adaptation,) Fisher profile, distillation, evaluation of teacher and student, report, MLflow run",
}


def job(name: str) -> Callable[[Any], dict[str, Any]]:
    """The job function for a command (imports the recipes)."""
    from .recipes.jobs import JOBS

    return JOBS[name]
