"""``layerwise-dist data prepare``: raw files -> a prepared split folder (parquet + stats.json).

The folder is built in a temporary directory beside ``out`` and renamed into place
only when everything succeeded, so ``out`` never holds a half-written result.

One step from there to a run: the command prints the overrides that point every
stage at the folder (:func:`pipeline_overrides`)::

    layerwise-dist data prepare --reviews Electronics.jsonl.gz --meta meta_Electronics.jsonl.gz --out data/el
    layerwise-dist pipeline data.source=prepared data.reviews=/abs/data/el data.category=Electronics
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import shutil
import sys
import tempfile
import typing
from pathlib import Path
from typing import Any

from ..config import ConfigError, DataConfig
from .errors import DataError, logger
from .sources import load_splits
from .splits import SplitData

RAW_SOURCES = ("amazon2023", "benchmark_csv", "llmrank", "embedded")


def prepare(
    reviews: str | Path, meta: str | Path | None, out: str | Path, cfg: DataConfig, strict: bool = False
) -> SplitData:
    """Read, validate, k-core and split ``reviews`` (+ ``meta``); write ``out/{train,valid,test,items}.parquet``
    and ``out/stats.json``. ``cfg.source`` picks the reader (``embedded``/``prepared`` mean amazon2023 here)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: exists and is not an empty folder; remove it or choose another --out")
    source = cfg.source if cfg.source in ("amazon2023", "benchmark_csv", "llmrank") else "amazon2023"
    cfg = dataclasses.replace(cfg, source=source, reviews=str(reviews), meta=str(meta or ""))
    splits = load_splits(cfg, strict=strict, progress=True)
    splits.stats["kcore_setting"] = cfg.kcore
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        splits.save(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("prepared split written to %s", out)
    return splits


def summary(out: str | Path, stats: dict[str, Any]) -> str:
    """One line about a prepared folder: category, users, items, interactions, sparsity, bad rows."""
    bad = stats["bad_rows"]["interactions"]["total"] + stats["bad_rows"]["metadata"]["total"]
    return (
        f"wrote {out}: {stats['category']} {stats['users']} users, {stats['items']} items, "
        f"{stats['interactions']} interactions (sparsity {stats['sparsity']:.4f}); {bad} bad rows skipped"
    )


def pipeline_overrides(out: str | Path, category: str) -> list[str]:
    """The ``key=value`` overrides that make any run command read a prepared folder."""
    return ["data.source=prepared", f"data.reviews={Path(out).resolve()}", f"data.category={category}"]


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    from ..config import help_text

    parser.description = (
        "Reviews + item metadata -> a prepared split folder (train/valid/test/items.parquet + stats.json). "
        "Reviews: one record per interaction with user_id (str), parent_asin (str), rating (number), timestamp "
        "(integer ms); item metadata: parent_asin and title (main_category optional). Files: .jsonl, .jsonl.gz, "
        ".parquet (or the benchmark CSVs with source=benchmark_csv)."
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    data_keys = [
        line
        for line in help_text().splitlines()
        if line.startswith("  data.") and not line.startswith(("  data.reviews=", "  data.meta="))
    ]
    parser.epilog = "data keys (key=value, the data. prefix optional; default shown after '='):\n" + "\n".join(
        data_keys
    )
    parser.add_argument("--reviews", required=True, help="reviews file (jsonl, jsonl.gz, parquet, csv) or folder")
    parser.add_argument("--meta", default="", help="item metadata file (default: meta_<category>.* beside the reviews)")
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad row instead of skipping it")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="data config overrides, e.g. kcore=10 source=benchmark_csv category=Electronics",
    )


def _data_config(overrides: list[str], reviews: str | Path, meta: str | Path | None) -> DataConfig:
    """The ``data`` section of ``data prepare``: ``--reviews``/``--meta`` plus ``key=value`` overrides
    of the other ``DataConfig`` fields (``data.`` prefix optional), checked by ``DataConfig`` itself."""
    hints = typing.get_type_hints(DataConfig)
    names = sorted(f.name for f in dataclasses.fields(DataConfig) if f.name not in ("reviews", "meta"))
    values: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().removeprefix("data.")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (e.g. kcore=10)")
        if key in ("reviews", "meta"):
            raise ConfigError(f"data prepare reads its input from --{key}, not from the override {item!r}")
        if key not in names:
            raise ConfigError(f"unknown data key {key!r} in override {item!r} (valid: {', '.join(names)})")
        if hints[key] is int:
            try:
                values[key] = int(raw)
            except ValueError:
                raise ConfigError(f"data.{key} expects an integer; got {raw!r}") from None
        else:
            values[key] = raw.strip()
    return DataConfig(**values, reviews=str(reviews), meta=str(meta or ""))


def run_prepare(args: argparse.Namespace) -> int:
    """Entry point of ``layerwise-dist data prepare``: prints the summary line, or the error to stderr
    and returns 2 on bad input."""
    from ..distributed import get_logger

    get_logger()  # the package logger's stderr handler shows the progress and bad-row warnings
    try:
        cfg = _data_config(list(getattr(args, "overrides", []) or []), args.reviews, args.meta or None)
        splits = prepare(args.reviews, args.meta or None, args.out, cfg, strict=args.strict)
    except (DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(args.out, splits.stats))
    command = ["layerwise-dist", "pipeline", *pipeline_overrides(args.out, splits.category)]
    print(f"next: {shlex.join(command)}  (any command, --preset and key=value work as usual)")
    return 0
