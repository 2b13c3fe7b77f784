"""One recipe per stage (``setup -> run/train -> save``) and the jobs composed of them.

::

    with RunSession(cfg) as session:                      # process group, data, tracker, teacher handle
        profile = FisherRecipe(session).setup() ...       # see jobs.py for each job's flow
"""

from .adapt import AdaptRecipe
from .distill import DistillRecipe
from .evaluate import EvaluateRecipe
from .fisher import FisherRecipe, needs_fisher
from .jobs import DESCRIPTIONS, JOBS, adapt, distill, evaluate, fisher, pipeline
from .session import RunSession, TeacherHandle, describe_placement

__all__ = [
    "DESCRIPTIONS",
    "JOBS",
    "AdaptRecipe",
    "DistillRecipe",
    "EvaluateRecipe",
    "FisherRecipe",
    "RunSession",
    "TeacherHandle",
    "adapt",
    "describe_placement",
    "distill",
    "evaluate",
    "fisher",
    "needs_fisher",
    "pipeline",
]
