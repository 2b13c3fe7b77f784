"""Zero-shot teacher, pointwise vs listwise, beside random and popularity, on the same users.

    OMP_NUM_THREADS=2 python benchmarks/zero_shot_formulations.py \
        --reviews ../shared/data/amazon2018_video_games_llmrank --users 300 [--scores mean,sum,pmi]

Goes through the package's own functions: ``load_splits`` (``data.source=llmrank``),
``build_examples`` (test split, ``data.max_eval_examples`` = a seeded user sample,
``data.num_candidates`` candidates: the target + uniformly sampled negatives the user
never touched, shuffled), ``tokenize_examples`` for each formulation, ``collate``,
``load_teacher`` (SmolLM2-135M-Instruct, ``--quantization``, sdpa) and
``evaluate_per_example`` / ``evaluate_baselines``. Both formulations score exactly the
same examples (same users, candidates and order); the baselines too.

Prints JSON: per formulation (and pointwise score mode) HR@K, NDCG@K, MRR with 95%
percentile bootstrap intervals over users (1000 resamples), the tokens each example's
scoring forward processes, wall seconds, the share of users whose top-1 is candidate A
(position bias), and paired differences (pointwise - listwise, pointwise - popularity)
of NDCG@10 with their paired bootstrap intervals.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from _results import add_json_out, emit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reviews", default="../shared/data/amazon2018_video_games_llmrank")
    ap.add_argument("--source", default="llmrank")
    ap.add_argument("--users", type=int, default=300, help="seeded sample of test users (data.max_eval_examples)")
    ap.add_argument("--candidates", type=int, default=20)
    ap.add_argument("--history-len", type=int, default=10)
    ap.add_argument("--title-max-tokens", type=int, default=24)
    ap.add_argument("--scores", default="mean", help="pointwise score modes, comma separated (mean,sum,pmi)")
    ap.add_argument("--formulations", default="pointwise,listwise")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--quantization", default="none", help="teacher.quantization: none (fp32 on CPU), nf4, int8")
    ap.add_argument(
        "--teacher",
        default="embedded:smollm2",
        help="teacher.model: the embedded SmolLM2, or a folder such as <run>/adapt/merged (an adapted teacher)",
    )
    ap.add_argument("--ks", default="1,5,10,20")
    ap.add_argument("--seed", type=int, default=1234, help="data.seed (user sample, negatives, shuffling)")
    ap.add_argument("--n-boot", type=int, default=1000)
    add_json_out(ap)
    args = ap.parse_args()

    from layerwise_dist.baselines import evaluate_baselines
    from layerwise_dist.config import DataConfig, TeacherConfig
    from layerwise_dist.data import build_examples, collate, load_splits, tokenize_examples
    from layerwise_dist.evaluation import evaluate_per_example
    from layerwise_dist.models.teacher import load_teacher, load_tokenizer

    ks = [int(k) for k in args.ks.split(",")]
    t_start = time.perf_counter()
    scratch = tempfile.mkdtemp(prefix="zs-cache-")  # the data cache of this run only, removed when it ends
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    base = DataConfig(
        source=args.source,
        reviews=args.reviews,
        num_candidates=args.candidates,
        history_len=args.history_len,
        title_max_tokens=args.title_max_tokens,
        max_eval_examples=args.users,
        max_length=4096,
        seed=args.seed,
        cache_dir=scratch,
    )
    teacher_cfg = TeacherConfig(
        model=args.teacher, quantization=args.quantization, placement="replicate", attn_implementation="sdpa"
    )
    t0 = time.perf_counter()
    splits = load_splits(base)
    tokenizer = load_tokenizer(teacher_cfg)
    examples = build_examples(splits, "test", base, tokenizer)
    data_s = time.perf_counter() - t0

    out: dict = {
        "command": " ".join(sys.argv),
        "data": {
            "source": args.source,
            "reviews": args.reviews,
            "category": splits.category,
            "split": "test",
            "users": len(examples),
            "users_in_split": len(splits.test),
            "candidates": args.candidates,
            "negatives": "uniform over items the user never touched (data.negative_sampling=uniform)",
            "history_len": args.history_len,
            "title_max_tokens": args.title_max_tokens,
            "seed": args.seed,
            "build_s": round(data_s, 1),
        },
        "teacher": {"model": args.teacher, "quantization": args.quantization},
        "machine": {
            "torch_threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "cuda": torch.cuda.is_available(),
        },
        "bootstrap": {"n_boot": args.n_boot, "level": 0.95, "unit": "user (one test example per user)"},
        "results": {},
    }

    t0 = time.perf_counter()
    baselines = evaluate_baselines(splits, examples, ks, n_boot=args.n_boot)
    for name, res in baselines.items():
        out["results"][name] = res.summary()
    out["results"]["baselines_s"] = round(time.perf_counter() - t0, 2)

    model = load_teacher(teacher_cfg)
    pad = tokenizer.pad_token_id
    per_run = {}
    runs = []
    for form in args.formulations.split(","):
        modes = args.scores.split(",") if form == "pointwise" else ["-"]
        cfg = dataclasses.replace(base, formulation=form)
        t0 = time.perf_counter()
        ds = tokenize_examples(examples, tokenizer, cfg)
        tok_s = time.perf_counter() - t0
        batches = [
            collate([ds[j] for j in range(i, min(i + args.batch_size, len(ds)))], pad)
            for i in range(0, len(ds), args.batch_size)
        ]
        for mode in modes:
            name = form if form == "listwise" else f"pointwise_{mode}"
            t0 = time.perf_counter()
            res = evaluate_per_example(
                model, batches, ks, progress=False, pointwise_score=mode if mode != "-" else "mean", n_boot=args.n_boot
            )
            wall = time.perf_counter() - t0
            summary = res.summary()
            summary["wall_s"] = round(wall, 1)
            summary["s_per_user"] = round(wall / len(examples), 3)
            summary["tokenize_s"] = round(tok_s, 1)
            summary["top1_share_of_first_candidate"] = float(np.mean(res.top1 == 0))
            summary["top1_position_most_common_share"] = float(np.bincount(res.top1).max() / len(res.top1))
            if form == "pointwise":
                summary["tokens_if_scored_separately_mean"] = float(
                    np.mean(
                        [
                            len(r["candidate_ids"]) * len(r["prefix_ids"]) + sum(len(c) for c in r["candidate_ids"])
                            for r in ds
                        ]
                    )
                )
            out["results"][name] = summary
            per_run[name] = res
            runs.append(name)
            print(f"# {name}: ndcg@10={summary.get('ndcg@10')} wall={wall:.0f}s", file=sys.stderr, flush=True)

    targets_match = all(np.array_equal(per_run[a].target_index, per_run[runs[0]].target_index) for a in runs)
    paired = {}
    for name in runs:
        for other in ("listwise", "popularity", "random"):
            ref = per_run.get(other) or baselines.get(other)
            if ref is None or other == name:
                continue
            paired[f"{name} - {other}"] = per_run[name].paired_difference(ref, "ndcg@10")
    out["paired_ndcg@10"] = paired
    out["same_targets_across_formulations"] = bool(targets_match)
    out["total_wall_s"] = round(time.perf_counter() - t_start, 1)
    emit(out, args.json_out, indent=1)


if __name__ == "__main__":
    main()
