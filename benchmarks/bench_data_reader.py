"""Reader throughput and peak memory on synthetic Amazon Reviews 2023 jsonl files.

    OMP_NUM_THREADS=1 python benchmarks/bench_data_reader.py [--sizes 100000 1000000] [--keep DIR]

Writes synthetic review files (official field names, text of realistic length) to
a temporary folder, then reads each one in a fresh subprocess (so peak RSS,
``resource.getrusage(...).ru_maxrss``, belongs to that size alone) into the
interaction table and through duplicates/k-core/leave-one-out. Prints one JSON
object: per size, reviews/s of the reader and of the whole split, and peak RSS
next to the RSS of the same process before reading. Goal: >= 50k reviews/s on one
core and a peak that grows only by the interaction table (~20 bytes a row + ids).
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import add_json_out, emit

WORDS = "great good fine soft smell skin hair works price quality love bought again would recommend not".split()


def write_reviews(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    n_users, n_items = max(10, n // 8), max(10, n // 25)
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(10, 60))) for _ in range(256)]
    with open(path, "w") as f:
        for k in range(n):
            item = int(n_items * rng.random() ** 2)  # skewed popularity
            record = {
                "rating": float(rng.randint(1, 5)),
                "title": "Review title",
                "text": texts[k % 256],
                "images": [],
                "asin": f"B{item:09d}",
                "parent_asin": f"P{item:09d}",
                "user_id": f"AG{rng.randrange(n_users):026d}",
                "timestamp": 1_500_000_000_000 + rng.randrange(200_000_000_000),
                "helpful_vote": rng.randint(0, 3),
                "verified_purchase": True,
            }
            f.write(json.dumps(record) + "\n")


def child(reviews: Path, meta: Path) -> dict:
    """Runs in a fresh process: read, then split; report timings and peak RSS."""
    from layerwise_dist.data.errors import BadRows
    from layerwise_dist.data.readers import read_reviews
    from layerwise_dist.data.sources import Amazon2023Source
    from layerwise_dist.data.splits import InteractionTable, build_splits

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    bad = BadRows()
    table = InteractionTable()
    t0 = time.perf_counter()
    table.extend(read_reviews(reviews, bad))
    read_s = time.perf_counter() - t0
    rss_read = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    source = Amazon2023Source(reviews, meta, "All_Beauty")
    t1 = time.perf_counter()
    split = build_splits(
        table,
        kcore=5,
        apply_kcore=True,
        load_titles=lambda items: source.titles(items, BadRows()),
        category="bench",
        where=str(reviews),
    )
    split_s = time.perf_counter() - t1
    n = len(table)
    return {
        "reviews": n,
        "file_mb": round(reviews.stat().st_size / 2**20, 1),
        "read_s": round(read_s, 2),
        "reviews_per_s": round(n / read_s),
        "split_s": round(split_s, 2),
        "end_to_end_reviews_per_s": round(n / (read_s + split_s)),
        "rss_before_mb": round(rss_before),
        "peak_rss_after_read_mb": round(rss_read),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "users_after_kcore": split.stats["users"],
        "items_after_kcore": split.stats["items"],
        "bad_rows": bad.total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--keep", default="", help="write the synthetic files here and keep them")
    parser.add_argument("--child", nargs=2, metavar=("REVIEWS", "META"), help=argparse.SUPPRESS)
    add_json_out(parser)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), Path(args.child[1]))))
        return
    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="bench_data_")
    folder = Path(args.keep or tmp.name)
    folder.mkdir(parents=True, exist_ok=True)
    results = []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for n in args.sizes:
        reviews = folder / f"synthetic_{n}.jsonl"
        meta = folder / f"meta_synthetic_{n}.jsonl"
        t0 = time.perf_counter()
        write_reviews(reviews, n)
        with open(meta, "w") as f:
            for item in range(max(10, n // 25)):
                f.write(
                    json.dumps({"parent_asin": f"P{item:09d}", "title": f"Product {item}", "main_category": "X"}) + "\n"
                )
        write_s = time.perf_counter() - t0
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(reviews), str(meta)], capture_output=True, text=True, env=env
        )
        if out.returncode:
            raise SystemExit(out.stderr)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result["write_s"] = round(write_s, 1)
        results.append(result)
        reviews.unlink()
    if tmp is not None:
        tmp.cleanup()
    emit({"benchmark": "data_reader", "results": results}, args.json_out)


if __name__ == "__main__":
    main()
