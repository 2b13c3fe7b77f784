"""Does the 4-bit teacher rank layers like the full-precision one? (issue 4: Spearman >= 0.9 on SmolLM2, 64 examples)

    OMP_NUM_THREADS=2 python benchmarks/bench_fisher_quantized.py [--examples 64] [--form parameter|activation] [--preset default] [key=value ...]

Measures the empirical Fisher profile (parameter form by default) of the same teacher loaded in
fp32 and in NF4 (bitsandbytes, double quantization) on the same training prompts,
one process, and prints JSON: Spearman between the two profiles (and between each
and Block Influence), top layers, depth shares, and the wall time of each pass.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--form", default="parameter", choices=["parameter", "activation"])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from layerwise_dist.config import load_config
    from layerwise_dist.data import build_examples, collate, load_splits, tokenize_examples
    from layerwise_dist.fisher import compute_fisher_profile, spearman
    from layerwise_dist.models.teacher import load_teacher, load_tokenizer

    cfg = load_config(args.preset, ["teacher.placement=replicate", *args.overrides])
    tokenizer = load_tokenizer(cfg.teacher)
    examples = build_examples(load_splits(cfg.data), "train", cfg.data, tokenizer)[: args.examples]
    data = tokenize_examples(examples, tokenizer, cfg.data)
    bs = args.batch_size
    batches = [
        collate([data[j] for j in range(i, min(i + bs, len(data)))], tokenizer.pad_token_id)
        for i in range(0, len(data), bs)
    ]
    profiles, seconds = {}, {}
    for quant in ("none", "nf4"):
        teacher_cfg = type(cfg.teacher)(**{**cfg.teacher.__dict__, "quantization": quant})
        model = load_teacher(teacher_cfg)
        start = time.perf_counter()
        profiles[quant] = compute_fisher_profile(
            model, batches, form=args.form, labels="empirical", model_id=cfg.teacher.model
        )
        seconds[quant] = time.perf_counter() - start
        del model
    full, nf4 = profiles["none"], profiles["nf4"]
    print(
        json.dumps(
            {
                "teacher": cfg.teacher.model,
                "examples": len(data),
                "form": args.form,
                "spearman_fp32_vs_nf4": spearman(full.scores, nf4.scores),
                "goal": 0.9,
                "top5_fp32": full.top_layers(5),
                "top5_nf4": nf4.top_layers(5),
                "depth_shares_fp32": full.depth_shares(0.3),
                "depth_shares_nf4": nf4.depth_shares(0.3),
                "spearman_fisher_vs_block_influence_fp32": spearman(full.scores, full.block_influence),
                "fisher_pass_seconds": seconds,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
