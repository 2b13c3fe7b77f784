"""``layerwise-dist data prepare``: raw files -> a prepared split folder (parquet + stats.json).

The folder is built in a temporary directory beside ``out`` and renamed into place
only when everything succeeded, so ``out`` never holds a half-written result.
It is read back with ``data.source=prepared data.reviews=<out>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..config import ConfigError, DataConfig, apply_overrides, from_dict
from .errors import DataError
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
    return splits


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
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


def _data_config(overrides: list[str]) -> DataConfig:
    base = {"data": dataclasses.asdict(DataConfig())}
    items = [o if o.startswith("data.") else f"data.{o}" for o in overrides]
    # prepare takes its inputs from --reviews/--meta; a placeholder satisfies the schema check.
    base["data"]["reviews"] = "-"
    return from_dict(apply_overrides(base, items)).data


def run_prepare(args: argparse.Namespace) -> int:
    """Entry point of ``layerwise-dist data prepare``; returns the exit code (2 on bad input)."""
    try:
        cfg = _data_config(list(getattr(args, "overrides", []) or []))
        splits = prepare(args.reviews, args.meta or None, args.out, cfg, strict=args.strict)
    except (DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s: dict[str, Any] = splits.stats
    bad = s["bad_rows"]["interactions"]["total"] + s["bad_rows"]["metadata"]["total"]
    print(
        f"wrote {args.out}: {s['category']} {s['users']} users, {s['items']} items, "
        f"{s['interactions']} interactions (sparsity {s['sparsity']:.4f}); {bad} bad rows skipped"
    )
    return 0
