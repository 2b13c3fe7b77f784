"""Errors of the data pipeline and the ledger of skipped input rows."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

logger = logging.getLogger("layerwise_dist.data")

MAX_SHOWN = 10


class DataError(ValueError):
    """Input data that cannot become a dataset: unreadable, empty, inconsistent or too long."""


class BadRows:
    """Counts skipped input rows by reason and keeps the first ten messages.

    Every reader reports a bad row (malformed JSON, missing required field, wrong
    type) through :meth:`add` with its file and 1-based line (or parquet row)
    number. In strict mode the first one raises :class:`DataError` with that
    message; otherwise the row is skipped and counted.
    """

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.by_reason: Counter[str] = Counter()
        self.shown: list[str] = []

    def add(self, path: Any, line: int, reason: str, detail: str = "") -> None:
        message = f"{path}:{line}: {reason}" + (f" ({detail})" if detail else "")
        if self.strict:
            raise DataError(message + " [strict mode stops at the first bad row]")
        self.by_reason[reason] += 1
        if len(self.shown) < MAX_SHOWN:
            self.shown.append(message)

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def summary(self) -> dict[str, Any]:
        return {"total": self.total, "by_reason": dict(sorted(self.by_reason.items())), "first": list(self.shown)}

    def log(self) -> None:
        if not self.total:
            return
        logger.warning("skipped %d bad input rows: %s", self.total, dict(self.by_reason))
        for message in self.shown:
            logger.warning("  %s", message)
        if self.total > len(self.shown):
            logger.warning("  ... and %d more", self.total - len(self.shown))
