"""The errors that mean bad input (shown as one line), as opposed to bugs (shown with a traceback)."""

from __future__ import annotations

import importlib
import json
import sys
from typing import Any


class ExportError(ValueError):
    """A checkpoint that cannot be exported (missing folder, tag or model config, mismatched weights)."""


# (module, class): every bad-input error of the package, by where it is defined.
_KNOWN = (
    ("layerwise_dist.config", "ConfigError"),
    ("layerwise_dist.models.teacher", "ModelLoadError"),
    ("layerwise_dist.data.errors", "DataError"),
    ("layerwise_dist.models.student", "StudentError"),
    ("layerwise_dist.weighting", "WeightingError"),
    ("layerwise_dist.losses", "LossInputError"),
    ("layerwise_dist.trainer", "TrainingDivergedError"),
    ("layerwise_dist.trainer", "StoppedBySignal"),
    ("layerwise_dist.runlock", "RunLockedError"),
    ("layerwise_dist.planner", "PlanError"),
    ("layerwise_dist.teacher_cache", "CacheError"),
    ("layerwise_dist.tracking", "TrackingError"),
)
_ALWAYS: tuple[type[BaseException], ...] = (ExportError, FileNotFoundError, json.JSONDecodeError)


def known_errors() -> tuple[type[BaseException], ...]:
    """The bad-input error classes of the modules imported so far, for ``except known_errors() as e``.

    Imports nothing: an error class whose module was never imported cannot have been raised. The command
    line's own process checks settings with a few light modules and matches its errors with this, instead of
    importing the trainer, the losses and MLflow only to name their errors (seconds per bad command)."""
    found = list(_ALWAYS)
    for module, name in _KNOWN:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None:
            found.append(cls)
    return tuple(found)


def _all_known() -> tuple[type[BaseException], ...]:
    for module, _ in _KNOWN:
        importlib.import_module(module)
    return known_errors()


def __getattr__(name: str) -> Any:
    if name == "KNOWN_ERRORS":  # every class, its modules imported: where the whole package is loaded anyway
        value = _all_known()
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
