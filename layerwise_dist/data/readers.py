"""Streaming readers of Amazon Reviews 2023 files.

Reviews (``.jsonl``, ``.jsonl.gz``, ``.parquet``; official field names ``user_id``,
``parent_asin``, ``rating``, ``timestamp`` in ms, plus ``title``, ``text``, ``asin``,
``verified_purchase``, ``helpful_vote`` that are not kept) and the benchmark CSVs
(``rating_only`` and ``<Category>.train/valid/test.csv``, optionally ``.gz``) are
read line by line or parquet row group by row group. Each reader yields only
``(user_id, parent_asin, rating, timestamp)`` tuples, so memory stays at the size
of the interaction table whatever the size of the file.

Item metadata (``.jsonl``, ``.jsonl.gz``, ``.parquet`` or the pandas-written
``.csv`` with an index column first) is read the same way, keeping only the
titles of the items asked for and a count of ``main_category``.

A bad row (malformed JSON, missing required field, wrong type) goes to a
:class:`~layerwise_dist.data.errors.BadRows` ledger with its file and line number.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .errors import BadRows, DataError

Interaction = tuple[str, str, float, int]
REVIEW_FIELDS = ("user_id", "parent_asin", "rating", "timestamp")
PARQUET_BATCH = 65_536

# The 33 category file names of Amazon Reviews 2023 (plus Unknown).
AMAZON2023_CATEGORIES = frozenset(
    """All_Beauty Amazon_Fashion Appliances Arts_Crafts_and_Sewing Automotive Baby_Products
    Beauty_and_Personal_Care Books CDs_and_Vinyl Cell_Phones_and_Accessories Clothing_Shoes_and_Jewelry
    Digital_Music Electronics Gift_Cards Grocery_and_Gourmet_Food Handmade_Products Health_and_Household
    Health_and_Personal_Care Home_and_Kitchen Industrial_and_Scientific Kindle_Store Magazine_Subscriptions
    Movies_and_TV Musical_Instruments Office_Products Patio_Lawn_and_Garden Pet_Supplies Software
    Sports_and_Outdoors Subscription_Boxes Tools_and_Home_Improvement Toys_and_Games Video_Games Unknown""".split()
)
_SUFFIXES = (".gz", ".jsonl", ".json", ".parquet", ".csv", ".rating_only", ".train", ".valid", ".test", ".5core")

# Benchmark and metadata CSVs can hold fields longer than the csv module's default limit
# (128 KiB): the package lifts it while its own readers parse, see csv_field_limit.
CSV_FIELD_LIMIT = min(sys.maxsize, 2**31 - 1)
CSV_CHUNK_ROWS = 4096  # rows parsed per lift of the limit


def file_kind(path: Path) -> str:
    """``jsonl``, ``parquet`` or ``csv`` from the file name (``.gz`` allowed for jsonl and csv)."""
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for suffix, kind in ((".jsonl", "jsonl"), (".json", "jsonl"), (".parquet", "parquet"), (".csv", "csv")):
        if name.endswith(suffix):
            return kind
    raise DataError(f"{path}: unknown file type (expected .jsonl, .jsonl.gz, .parquet, .csv or .csv.gz)")


def file_stem(path: Path) -> str:
    """``Video_Games`` from ``Video_Games.jsonl.gz``, ``MyShop`` from ``MyShop.rating_only.csv`` (data suffixes off)."""
    stem = path.name
    changed = True
    while changed:
        changed = False
        for suffix in _SUFFIXES:
            if stem.endswith(suffix):
                stem, changed = stem[: -len(suffix)], True
    return stem


def category_from_filename(path: Path) -> str | None:
    """``All_Beauty`` from ``All_Beauty.jsonl.gz``, ``meta_All_Beauty.5core.csv``, ``All_Beauty.train.csv``...

    Returns None unless the stem is one of the Amazon Reviews 2023 category names.
    """
    stem = file_stem(path).removeprefix("meta_")
    return stem if stem in AMAZON2023_CATEGORIES else None


def open_binary(path: Path) -> IO[bytes]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")  # noqa: SIM115


def _check_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _validate(record: Any, path: Path, line: int, bad: BadRows) -> Interaction | None:
    """The (user, item, rating, timestamp) of one review record, or None after reporting why not."""
    if not isinstance(record, dict):
        bad.add(path, line, "malformed JSON", "not an object")
        return None
    user = record.get("user_id")
    item = record.get("parent_asin")
    rating = record.get("rating")
    ts = record.get("timestamp")
    for name, value in (("user_id", user), ("parent_asin", item), ("rating", rating), ("timestamp", ts)):
        if value is None or value == "":
            bad.add(path, line, f"missing field {name}")
            return None
    if not isinstance(user, str):
        bad.add(path, line, "wrong type of user_id", f"expected a string, got {type(user).__name__}")
        return None
    if not isinstance(item, str):
        bad.add(path, line, "wrong type of parent_asin", f"expected a string, got {type(item).__name__}")
        return None
    if isinstance(rating, bool) or not isinstance(rating, (int, float)) or not math.isfinite(rating):
        bad.add(path, line, "wrong type of rating", f"expected a number, got {rating!r:.40}")
        return None
    if isinstance(ts, bool) or not (isinstance(ts, int) or (isinstance(ts, float) and ts.is_integer())):
        bad.add(path, line, "wrong type of timestamp", f"expected integer milliseconds, got {ts!r:.40}")
        return None
    return user, item, float(rating), int(ts)


def read_reviews_jsonl(
    path: Path, bad: BadRows, progress: Callable[[int], None] | None = None
) -> Iterator[Interaction]:
    """One review per line; blank lines are skipped silently."""
    loads = json.loads
    with open_binary(path) as f:
        for line_no, line in enumerate(f, 1):
            if progress is not None and line_no % 10_000 == 0:
                progress(10_000)
            if not line.strip():
                continue
            try:
                record = loads(line)
            except ValueError as e:
                bad.add(path, line_no, "malformed JSON", str(e)[:80])
                continue
            row = _validate(record, path, line_no, bad)
            if row is not None:
                yield row


def _parquet_columns(path: Path, wanted: tuple[str, ...], required: tuple[str, ...]) -> Any:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    names = set(pf.schema_arrow.names)
    missing = [c for c in required if c not in names]
    if missing:
        raise DataError(f"{path}: parquet file has no column {missing[0]!r} (columns: {', '.join(sorted(names))})")
    return pf, [c for c in wanted if c in names]


def read_reviews_parquet(
    path: Path, bad: BadRows, progress: Callable[[int], None] | None = None
) -> Iterator[Interaction]:
    """Row group by row group (batches of 65,536 rows); the row number stands for the line number."""
    pf, columns = _parquet_columns(path, REVIEW_FIELDS, REVIEW_FIELDS)
    row_no = 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH, columns=columns):
        cols = [batch.column(c).to_pylist() for c in REVIEW_FIELDS]
        for user, item, rating, ts in zip(*cols):
            row_no += 1
            row = _validate(
                {"user_id": user, "parent_asin": item, "rating": rating, "timestamp": ts}, path, row_no, bad
            )
            if row is not None:
                yield row
        if progress is not None:
            progress(batch.num_rows)


@contextmanager
def csv_field_limit(limit: int = CSV_FIELD_LIMIT) -> Iterator[None]:
    """Set ``csv.field_size_limit`` for the block and restore the previous limit after it.

    The limit is process-wide state of the csv module; setting it at import would change
    it for every other user of csv. (It is not thread-safe: another thread parsing CSV in
    the same moment sees the raised limit.)
    """
    old = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _limited_rows(reader: Any) -> Iterator[tuple[int, list[str]]]:
    """(line number, row) of a ``csv.reader``, parsed under :func:`csv_field_limit`.

    Rows are parsed in chunks with the limit raised and yielded with it restored, so code
    running between two rows (the caller's) sees its own limit.
    """
    while True:
        chunk = []
        with csv_field_limit():
            for row in reader:
                chunk.append((reader.line_num, row))
                if len(chunk) == CSV_CHUNK_ROWS:
                    break
        yield from chunk
        if len(chunk) < CSV_CHUNK_ROWS:
            return


def _csv_rows(path: Path) -> tuple[Iterator[tuple[int, list[str]]], Any, list[str]]:
    """(rows after the header as (line number, row), the open text handle to close, header)."""
    text = io.TextIOWrapper(open_binary(path), encoding="utf-8", newline="")
    rows = _limited_rows(csv.reader(text))
    first = next(rows, None)
    if first is None:
        text.close()
        raise DataError(f"{path}: empty file (no header line)")
    return rows, text, [h.strip() for h in first[1]]


def read_reviews_csv(path: Path, bad: BadRows, progress: Callable[[int], None] | None = None) -> Iterator[Interaction]:
    """``rating_only`` or benchmark CSV: columns ``user_id,parent_asin,rating,timestamp`` (others ignored)."""
    rows, handle, header = _csv_rows(path)
    with handle:
        missing = [c for c in REVIEW_FIELDS if c not in header]
        if missing:
            raise DataError(f"{path}: CSV header has no column {missing[0]!r} (header: {','.join(header)})")
        iu, ii, ir, it = (header.index(c) for c in REVIEW_FIELDS)
        width = max(iu, ii, ir, it) + 1
        count = 0
        for line_no, row in rows:
            count += 1
            if progress is not None and count % 10_000 == 0:
                progress(10_000)
            if not row:
                continue
            if len(row) < width:
                bad.add(path, line_no, "malformed CSV row", f"{len(row)} fields, expected {len(header)}")
                continue
            user, item, rating, ts = row[iu], row[ii], row[ir], row[it]
            empty = next((c for c, v in zip(REVIEW_FIELDS, (user, item, rating, ts)) if not v.strip()), None)
            if empty:
                bad.add(path, line_no, f"missing field {empty}")
                continue
            try:
                r = float(rating)
                if not math.isfinite(r):
                    raise ValueError
            except ValueError:
                bad.add(path, line_no, "wrong type of rating", f"expected a number, got {rating!r:.40}")
                continue
            try:
                t = int(ts)
            except ValueError:
                bad.add(path, line_no, "wrong type of timestamp", f"expected integer milliseconds, got {ts!r:.40}")
                continue
            yield user, item, r, t


def _intact(path: Path, rows: Iterator[Any]) -> Iterator[Any]:
    """``rows``, with a truncated or corrupt file (gzip, parquet) turned into one DataError naming it."""
    import zlib

    try:
        yield from rows
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated gzip file ({type(e).__name__}: {e})") from None
    except OSError as e:  # pyarrow.ArrowInvalid/ArrowIOError for a damaged parquet row group are OSErrors
        raise DataError(f"{path}: cannot read the file ({type(e).__name__}: {e})") from None


def read_reviews(path: Path, bad: BadRows, progress: Callable[[int], None] | None = None) -> Iterator[Interaction]:
    """Dispatch on the file type: jsonl(.gz), parquet or csv(.gz)."""
    kind = file_kind(path)
    reader = {"jsonl": read_reviews_jsonl, "parquet": read_reviews_parquet, "csv": read_reviews_csv}[kind]
    return _intact(path, reader(path, bad, progress))


def _meta_records(path: Path, bad: BadRows) -> Iterator[tuple[int, Any]]:
    """(line number, record dict) of a metadata file of any supported type."""
    return _intact(path, _meta_records_of(path, bad))


def _meta_records_of(path: Path, bad: BadRows) -> Iterator[tuple[int, Any]]:
    kind = file_kind(path)
    if kind == "jsonl":
        with open_binary(path) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield line_no, json.loads(line)
                except ValueError as e:
                    bad.add(path, line_no, "malformed JSON", str(e)[:80])
    elif kind == "parquet":
        pf, columns = _parquet_columns(path, ("parent_asin", "title", "main_category"), ("parent_asin", "title"))
        row_no = 0
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH, columns=columns):
            for record in batch.to_pylist():
                row_no += 1
                yield row_no, record
    else:
        rows, handle, header = _csv_rows(path)
        with handle:
            for name in ("parent_asin", "title"):
                if name not in header:
                    raise DataError(f"{path}: metadata CSV has no column {name!r} (header: {','.join(header)})")
            for line_no, row in rows:
                if row:
                    yield line_no, dict(zip(header, row))


def read_titles(path: Path, wanted: set[str] | None, bad: BadRows) -> tuple[dict[str, str], Counter[str]]:
    """Titles of the ``wanted`` items (all when None) and the count of ``main_category`` over them.

    A record without ``parent_asin`` or with a non-string one is a bad row; an empty or
    missing title leaves the item without a title (the caller decides what that means).
    """
    titles: dict[str, str] = {}
    categories: Counter[str] = Counter()
    for line_no, record in _meta_records(path, bad):
        if not isinstance(record, dict):
            bad.add(path, line_no, "malformed JSON", "not an object")
            continue
        item = record.get("parent_asin")
        if item is None or item == "":
            bad.add(path, line_no, "missing field parent_asin")
            continue
        if not isinstance(item, str):
            bad.add(path, line_no, "wrong type of parent_asin", f"expected a string, got {type(item).__name__}")
            continue
        if wanted is not None and item not in wanted:
            continue
        title = record.get("title")
        if title is not None and not isinstance(title, str):
            bad.add(path, line_no, "wrong type of title", f"expected a string, got {type(title).__name__}")
            continue
        title = " ".join((title or "").split())
        if title and item not in titles:
            titles[item] = title
        main = record.get("main_category")
        if isinstance(main, str) and main.strip():
            categories[main.strip()] += 1
    return titles, categories
