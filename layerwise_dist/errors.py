"""The errors that mean bad input (shown as one line), as opposed to bugs (shown with a traceback)."""

from __future__ import annotations

import json

from .config import ConfigError
from .models.teacher import ModelLoadError


class ExportError(ValueError):
    """A checkpoint that cannot be exported (missing folder, tag or model config, mismatched weights)."""


def _known() -> tuple[type[BaseException], ...]:
    from .data import DataError
    from .losses import LossInputError
    from .models.student import StudentError
    from .planner import PlanError
    from .runlock import RunLockedError
    from .teacher_cache import CacheError
    from .tracking import TrackingError
    from .trainer import StoppedBySignal, TrainingDivergedError
    from .weighting import WeightingError

    return (
        ConfigError,
        ModelLoadError,
        DataError,
        StudentError,
        WeightingError,
        LossInputError,
        TrainingDivergedError,
        StoppedBySignal,
        ExportError,
        RunLockedError,
        PlanError,
        CacheError,
        TrackingError,
        FileNotFoundError,
        json.JSONDecodeError,
    )


KNOWN_ERRORS = _known()


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
