"""One recipe per stage (``setup -> run/train -> save``) and the jobs composed of them.

::

    with RunSession(cfg) as session:                      # process group, data, tracker, teacher handle
        profile = FisherRecipe(session).setup() ...       # see jobs.py for each job's flow

The names below are imported lazily: ``from layerwise_dist.recipes.session import ...`` does not import
every recipe (the command line checks a run's settings before the ranks start, in seconds). The jobs are
``JOBS[name]`` (or ``layerwise_dist.recipes.jobs.<name>``): ``recipes.fisher`` is the module of the Fisher recipe.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AdaptRecipe": "adapt",
    "DistillRecipe": "distill",
    "EvaluateRecipe": "evaluate",
    "FisherRecipe": "fisher",
    "needs_fisher": "fisher",
    "DESCRIPTIONS": "jobs",
    "JOBS": "jobs",
    "RunSession": "session",
    "TeacherHandle": "session",
    "describe_placement": "session",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
