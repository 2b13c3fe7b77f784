"""Serving cost and retrieval quality of `recommend`: latency per user on one thread, retrieval hit rate.

    OMP_NUM_THREADS=1 python benchmarks/bench_recommend.py --model results/demo/student [--users 8] [key=value ...]

``--model`` is any model `recommend` takes (a saved student, ``embedded:smollm2``); the data
and the prompt settings for a model that records none come from ``--preset`` (default: the demo's)
and the overrides. Prints JSON: model load time, the first call (which builds the co-occurrence
index), wall and CPU seconds per later call (median and max over ``--users`` users), and the share of
users whose held-out valid / test item is among the retrieved candidates (co-occurrence vs popularity
alone).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _results import add_json_out, emit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    add_json_out(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from layerwise_dist.config import load_config
    from layerwise_dist.data import load_splits
    from layerwise_dist.recommender import BaseRecommender
    from layerwise_dist.retrieval import CandidateRetriever, hit_rate

    cfg = load_config(args.preset, args.overrides)
    split = load_splits(cfg.data)
    start = time.perf_counter()
    rec = BaseRecommender(model_name=args.model, data=split, data_config=cfg.data, serve_config=cfg.serve)
    load_s = time.perf_counter() - start
    users = sorted(split.train)[: args.users + 1]
    start = time.perf_counter()
    rec.recommend(users[0], split.category, args.top_k)
    first_s = time.perf_counter() - start
    wall, cpu = [], []
    for user in users[1:]:
        w, c = time.perf_counter(), time.process_time()
        rec.recommend(user, split.category, args.top_k)
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)

    n = cfg.serve.num_candidates
    retrieval: dict[str, float] = {}
    if n:
        both = CandidateRetriever.from_split(split, cfg.serve)
        popular = CandidateRetriever.from_split(split, cfg.serve)
        popular.neighbours = {}
        for target in ("valid", "test"):
            retrieval[f"hit_rate_{target}"] = hit_rate(both, split, n, target)["hit_rate"]
            retrieval[f"hit_rate_{target}_popularity_only"] = hit_rate(popular, split, n, target)["hit_rate"]
        # n uniformly random untouched items hold the held-out one with probability n / untouched
        untouched = [len(split.all_items) - len(split.sequence(u)) + 1 for u in split.train]
        retrieval["hit_rate_random"] = statistics.mean(min(1.0, n / u) for u in untouched)
    emit(
        {
            "model": args.model,
            "formulation": rec.data_config.formulation,
            "threads": torch.get_num_threads(),
            "serve.num_candidates": n,
            "users": len(wall),
            "load_s": round(load_s, 3),
            "first_call_s": round(first_s, 3),
            "wall_s_median": round(statistics.median(wall), 3),
            "wall_s_max": round(max(wall), 3),
            "cpu_s_median": round(statistics.median(cpu), 3),
            "cpu_s_max": round(max(cpu), 3),
            "retrieval": {k: round(v, 4) for k, v in retrieval.items()},
            "catalogue": len(split.all_items),
            "data_users": len(split.train),
        },
        args.json_out,
    )


if __name__ == "__main__":
    main()
