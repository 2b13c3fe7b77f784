"""Scoring with batches regrouped longest first (``layerwise_dist.data.sampler.length_sorted``, what evaluation and
the learning curve use) against batches in dataset order, on the experiment's test users.

    OMP_NUM_THREADS=1 python benchmarks/bench_eval_length_sorted.py [--examples 64] [--reps 2] \
        [--model results/experiment/cells/fisher-topk+fisher/student] [--reviews <llmrank folder>]

The users and candidates are those of ``--preset`` (default ``experiment``: 1,000 Video_Games test users, 20
candidates, pointwise); without ``../shared/data`` (a fresh clone), the ``default`` preset's embedded
All_Beauty users. The model: the experiment's first student when it is there, else SmolLM2-135M. Prints JSON with the padding share of every batch of each rank (``--ranks`` shares, as
the evaluation's sampler cuts them) in both orders, and, for the first ``--examples`` examples of rank 0's
share, the median seconds to score them in both orders (interleaved), their ratio, and whether the two give
the same ranks (scores differ by float rounding only: another padding, the same model).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _results import add_json_out, emit, interleaved, medians

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="experiment")
    parser.add_argument("--reviews", default="", help="the preset's data folder (default: ../shared's Video_Games)")
    parser.add_argument("--model", default="", help="a model folder (default: see the module doc)")
    parser.add_argument("--examples", type=int, default=64, help="examples timed (the first of rank 0's share)")
    parser.add_argument("--batch-size", type=int, default=0, help="default: the preset's eval.batch_size")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--reps", type=int, default=2)
    add_json_out(parser)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layerwise_dist.compare import eval_examples
    from layerwise_dist.config import TeacherConfig, load_config
    from layerwise_dist.data import load_splits, tokenize_examples
    from layerwise_dist.data.sampler import RankSampler, example_length, length_sorted, load_batch
    from layerwise_dist.evaluation import evaluate_per_example
    from layerwise_dist.models.teacher import resolve_model_dir

    model_dir = args.model or str(REPO / "results/experiment/cells/fisher-topk+fisher/student")
    if not Path(model_dir, "config.json").is_file():
        if args.model:
            raise SystemExit(f"--model {args.model}: no model folder")
        model_dir = str(resolve_model_dir(TeacherConfig(model="smollm2-135m")))
    reviews = args.reviews or str(REPO.parent / "shared" / "data" / "amazon2018_video_games_llmrank")
    if Path(reviews).exists():
        cfg = load_config(args.preset, [f"data.reviews={reviews}"])
    elif args.reviews:
        raise SystemExit(f"--reviews {args.reviews}: no such file or folder")
    else:  # a fresh clone without ../shared: the embedded users
        cfg = load_config("default")
    batch_size = args.batch_size or cfg.eval.batch_size
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    splits = load_splits(cfg.data)
    examples = eval_examples(splits, cfg, tokenizer, "test")  # the run's seeded sample of the test users
    data = tokenize_examples(examples, tokenizer, cfg.data, cache_dir=cfg.data.cache_dir or None)
    lengths = [example_length(data[i]) for i in range(len(data))]

    def padding(batches: list[list[int]]) -> float:
        real = sum(lengths[i] for b in batches for i in b)
        return 1 - real / sum(len(b) * max(lengths[i] for i in b) for b in batches)

    shares = [
        [list(b) for b in RankSampler(len(data), batch_size, rank=r, world_size=args.ranks, equal_batches=False)]
        for r in range(args.ranks)
    ]
    in_order = [b for share in shares for b in share]
    regrouped = [b for share in shares for b in length_sorted(share, data)]

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    first = [i for b in shares[0] for i in b][: args.examples]
    timed_in_order = [first[i : i + batch_size] for i in range(0, len(first), batch_size)]
    timed_sorted = length_sorted(timed_in_order, data)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    score = cfg.data.pointwise_score
    loaded = {
        "in_order": [load_batch(data, b, pad) for b in timed_in_order],
        "length_sorted": [load_batch(data, b, pad) for b in timed_sorted],
    }
    positions = {"in_order": None, "length_sorted": [i for b in timed_sorted for i in b]}
    results = {}

    def run(name: str):
        def fn() -> None:
            results[name] = evaluate_per_example(
                model, loaded[name], ks=(10,), progress=False, pointwise_score=score, n_boot=10,
                positions=positions[name],
            )  # fmt: skip

        return fn

    wall, cpu = interleaved({name: run(name) for name in loaded}, args.reps)
    med, med_cpu = medians(wall), medians(cpu)
    a, b = results["in_order"], results["length_sorted"]
    emit(
        {
            "data": f"{splits.category} ({cfg.data.source})",
            "model": model_dir,
            "users": len(data),
            "batch_size": batch_size,
            "ranks": args.ranks,
            "row_tokens": {"min": min(lengths), "mean": sum(lengths) / len(lengths), "max": max(lengths)},
            "padding_share_all_batches": {"in_order": padding(in_order), "length_sorted": padding(regrouped)},
            "timed_examples": len(first),
            "padding_share_timed": {"in_order": padding(timed_in_order), "length_sorted": padding(timed_sorted)},
            "median_s": med,
            "median_cpu_s": med_cpu,
            "ratio_in_order_over_length_sorted": med["in_order"] / med["length_sorted"],
            "ratio_in_order_over_length_sorted_cpu_time": med_cpu["in_order"] / med_cpu["length_sorted"],
            "same_ranks": a.ranks.tolist() == b.ranks.tolist(),
            "max_abs_score_difference": float(abs(a.scores - b.scores).max()),
            "reps": args.reps,
        },
        args.json_out,
    )


if __name__ == "__main__":
    main()
