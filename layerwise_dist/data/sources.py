"""Adapters: every data source yields (user, item, rating, timestamp) rows plus item titles.

A new source plugs in by subclassing :class:`InteractionSource` (two methods) and
goes through the same duplicate removal, k-core and leave-one-out split as the
Amazon files (:func:`splits_from_source`). :func:`load_splits` dispatches on
``DataConfig.source``.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..config import DataConfig
from .errors import BadRows, DataError, logger
from .readers import (
    Interaction,
    category_from_filename,
    file_kind,
    file_stem,
    open_binary,
    read_reviews,
    read_titles,
)
from .splits import InteractionTable, SplitData, build_splits

EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "_data" / "all_beauty"
EMBEDDED_REVIEWS = EMBEDDED_DIR / "All_Beauty.rating_only.csv.gz"
EMBEDDED_META = EMBEDDED_DIR / "meta_All_Beauty.5core.csv"


class InteractionSource(abc.ABC):
    """One category's interactions and item titles, in any format.

    ``apply_kcore`` is False for sources published already filtered whose
    published split must be reproduced as is (LLMRank).
    """

    apply_kcore: bool = True

    @abc.abstractmethod
    def interactions(self, bad: BadRows, progress: Callable[[int], None] | None = None) -> Iterator[Interaction]:
        """(user_id, item_id, rating, timestamp) in input order; bad rows go to ``bad``."""

    @abc.abstractmethod
    def titles(self, items: set[str], bad: BadRows) -> dict[str, str]:
        """Titles of the given items (those without one may be absent)."""

    @abc.abstractmethod
    def category(self) -> str:
        """Category name shown in prompts (may look at what was read)."""

    @abc.abstractmethod
    def files(self) -> list[str]:
        """The input files, for stats and messages."""


def _find(folder: Path, patterns: list[str], what: str, exclude: str = "") -> Path:
    for pattern in patterns:
        hits = sorted(h for h in folder.glob(pattern) if not (exclude and h.name.startswith(exclude)))
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise DataError(f"{folder}: several {what} files match {pattern!r}: {', '.join(h.name for h in hits)}")
    raise DataError(f"{folder}: no {what} file (looked for {', '.join(patterns)})")


def _normalise_category(name: str) -> str:
    return "_".join(name.replace("&", "and").split())


class Amazon2023Source(InteractionSource):
    """Amazon Reviews 2023 reviews (jsonl, jsonl.gz, parquet or rating_only csv) + item metadata.

    ``reviews`` may be a folder: it then holds ``<category>.jsonl[.gz]|.parquet`` or
    ``<category>.rating_only.csv[.gz]`` and ``meta_<category>...``. The category is
    taken from the file name when it is an Amazon 2023 category, else from the most
    common ``main_category`` of the kept items, else ``fallback_category``.
    """

    def __init__(self, reviews: str | Path, meta: str | Path | None, fallback_category: str) -> None:
        path = Path(reviews)
        if path.is_dir():
            c = fallback_category
            path = _find(
                path,
                [f"{c}.jsonl", f"{c}.jsonl.gz", f"{c}.parquet", f"{c}.rating_only.csv*", f"{c}.csv*"]
                + ["*.jsonl", "*.jsonl.gz", "*.parquet", "*.rating_only.csv*"],
                "reviews",
                exclude="meta_",
            )
        if not path.is_file():
            raise DataError(f"{path}: no such reviews file")
        self.reviews = path
        self._fallback = fallback_category
        self._file_category = category_from_filename(path)
        if meta:
            self.meta: Path = Path(meta)
            if not self.meta.is_file():
                raise DataError(f"{self.meta}: no such metadata file")
        else:
            # The reviews file's own stem first (MyShop.jsonl.gz -> meta_MyShop.*), then the category.
            names = dict.fromkeys([file_stem(path), self._file_category or fallback_category])
            patterns = [f"meta_{n}.*" for n in names] + ["meta_*"]
            self.meta = _find(path.parent, patterns, "metadata (meta_<reviews file stem>...)")
        file_kind(self.meta)
        self._main_categories: dict[str, int] = {}

    def interactions(self, bad: BadRows, progress: Callable[[int], None] | None = None) -> Iterator[Interaction]:
        return read_reviews(self.reviews, bad, progress)

    def titles(self, items: set[str], bad: BadRows) -> dict[str, str]:
        titles, cats = read_titles(self.meta, items, bad)
        self._main_categories = dict(cats)
        return titles

    def category(self) -> str:
        if self._file_category:
            return self._file_category
        if self._main_categories:
            return _normalise_category(max(self._main_categories.items(), key=lambda kv: (kv[1], kv[0]))[0])
        return self._fallback

    def files(self) -> list[str]:
        return [str(self.reviews), str(self.meta)]


class BenchmarkCSVSource(Amazon2023Source):
    """The official benchmark split ``<Category>.train.csv/.valid.csv/.test.csv`` (optionally ``.gz``).

    Rows are read train, valid, test (each oldest first), so the stable tie rule
    reproduces the published split; the leave-one-out of their union equals it.
    ``reviews`` is the folder or any of the three files; metadata as for
    :class:`Amazon2023Source`.
    """

    def __init__(self, reviews: str | Path, meta: str | Path | None, fallback_category: str) -> None:
        path = Path(reviews)
        folder = path if path.is_dir() else path.parent
        if path.is_dir():
            path = _find(folder, [f"{fallback_category}.train.csv*", "*.train.csv*"], "benchmark train CSV")
        if not path.is_file():
            raise DataError(f"{path}: no such benchmark CSV file")
        stem = path.name.split(".")[0]
        self.split_files = [
            _find(folder, [f"{stem}.{name}.csv", f"{stem}.{name}.csv.gz"], f"benchmark {name} CSV")
            for name in ("train", "valid", "test")
        ]
        super().__init__(self.split_files[0], meta, fallback_category)

    def interactions(self, bad: BadRows, progress: Callable[[int], None] | None = None) -> Iterator[Interaction]:
        for path in self.split_files:
            yield from read_reviews(path, bad, progress)

    def files(self) -> list[str]:
        return [*map(str, self.split_files), str(self.meta)]


class LLMRankSource(InteractionSource):
    """RUCAIBox/LLMRank atomic files: ``<name>.item`` titles and ``<name>.test.inter``.

    A test line holds the user, the chronological history and the last item; history
    + target is the user's whole sequence. There are no ratings (every interaction is a
    positive, rating NaN) and no timestamps (the position in the sequence is the time).
    The published data is already 5-core and is used as published (``apply_kcore`` False).
    """

    apply_kcore = False

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        self.inter = _find(folder, ["*.test.inter"], "LLMRank .test.inter") if path.is_dir() else path
        if not self.inter.is_file():
            raise DataError(f"{self.inter}: no such LLMRank .test.inter file")
        self.name = self.inter.name.split(".")[0]
        self.item_file = folder / f"{self.name}.item"
        if not self.item_file.is_file():
            raise DataError(f"{self.item_file}: no such LLMRank item file (needed for titles)")

    @staticmethod
    def _lines(path: Path) -> Iterator[tuple[int, list[str]]]:
        with open_binary(path) as f:
            for line_no, raw in enumerate(f, 1):
                line = raw.decode("utf-8").rstrip("\r\n")
                if line_no == 1 or not line.strip():  # header: field:type names
                    continue
                yield line_no, line.split("\t")

    def interactions(self, bad: BadRows, progress: Callable[[int], None] | None = None) -> Iterator[Interaction]:
        for line_no, fields in self._lines(self.inter):
            if len(fields) != 3 or not fields[0] or not fields[2]:
                bad.add(self.inter, line_no, "malformed line", "expected user<TAB>history<TAB>target")
                continue
            user, history, target = fields
            for pos, item in enumerate([*history.split(), target]):
                yield user, item, math.nan, pos

    def titles(self, items: set[str], bad: BadRows) -> dict[str, str]:
        titles = {}
        for line_no, fields in self._lines(self.item_file):
            if len(fields) < 2 or not fields[0]:
                bad.add(self.item_file, line_no, "malformed line", "expected item<TAB>title")
                continue
            title = " ".join(fields[1].split())
            if fields[0] in items and title:
                titles[fields[0]] = title
        return titles

    def category(self) -> str:
        return "Video_Games" if self.name.startswith("Games") else self.name

    def files(self) -> list[str]:
        return [str(self.inter), str(self.item_file)]


def splits_from_source(
    source: InteractionSource, kcore: int, strict: bool = False, progress: bool = False
) -> SplitData:
    """Read a source into an interaction table and split it (see :mod:`layerwise_dist.data.splits`)."""
    bad_rows, bad_meta = BadRows(strict), BadRows(strict)
    table = InteractionTable()
    bar: Any = None
    if progress:
        from tqdm.auto import tqdm

        # Shown after 1 s: a quick failure (a corrupt file) leaves only its error line.
        bar = tqdm(desc=f"reading {Path(source.files()[0]).name}", unit=" rows", unit_scale=True, delay=1.0)
    try:
        table.extend(source.interactions(bad_rows, bar.update if bar is not None else None))
    except BaseException:
        if bar is not None:  # wipe the bar: the error is the one line left on the terminal
            bar.leave = False
            bar.close()
        raise
    if bar is not None:
        bar.close()
    bad_rows.log()
    where = ", ".join(source.files()[:-1])
    split = build_splits(
        table,
        kcore=kcore,
        apply_kcore=source.apply_kcore,
        load_titles=lambda items: source.titles(items, bad_meta),
        category=source.category,
        where=where,
        stats={"source": type(source).__name__, "files": source.files()},
    )
    bad_meta.log()
    split.stats["bad_rows"] = {"interactions": bad_rows.summary(), "metadata": bad_meta.summary()}
    return split


def source_from_config(cfg: DataConfig) -> InteractionSource:
    if cfg.source == "embedded":
        return Amazon2023Source(EMBEDDED_REVIEWS, EMBEDDED_META, "All_Beauty")
    if cfg.source == "amazon2023":
        return Amazon2023Source(cfg.reviews, cfg.meta or None, cfg.category)
    if cfg.source == "benchmark_csv":
        return BenchmarkCSVSource(cfg.reviews, cfg.meta or None, cfg.category)
    if cfg.source == "llmrank":
        return LLMRankSource(cfg.reviews)
    raise DataError(f"data.source={cfg.source} has no interaction source")


def category_picks_files(cfg: DataConfig) -> bool:
    """Whether ``data.category`` picks the files :func:`source_from_config` reads (an amazon2023 or benchmark_csv
    folder). A saved student then records it as given, so that reloading its settings finds the same file,
    whatever category the file's items name; elsewhere (embedded, llmrank, prepared, a single file) it records
    the category the data named, which is what its prompts said."""
    return cfg.source in ("amazon2023", "benchmark_csv") and Path(cfg.reviews).is_dir()


def load_splits(cfg: DataConfig, strict: bool = False, progress: bool = False) -> SplitData:
    """The leave-one-out split of ``cfg.source``: embedded | amazon2023 | benchmark_csv | llmrank | prepared."""
    if cfg.source == "prepared":
        split = SplitData.load(cfg.reviews)
    else:
        split = splits_from_source(source_from_config(cfg), cfg.kcore, strict=strict, progress=progress)
    logger.info(
        "data %s: %d users, %d items, %d interactions",
        split.category,
        split.stats.get("users", len(split.train)),
        len(split.all_items),
        split.stats.get("interactions", 0),
    )
    return split
