"""Does the 4-bit teacher rank layers like the full-precision one? (issue 4: Spearman >= 0.9 on SmolLM2, 64 examples)

    OMP_NUM_THREADS=2 python benchmarks/bench_fisher_quantized.py [--examples 64] [--form parameter|activation]
        [--labels empirical|sampled] [--quant nf4|int8] [--check_examples 8] [--preset default] [key=value ...]

Measures the Fisher profile of the same teacher loaded in fp32 and quantized (NF4 with
double quantization by default, as the pipeline loads it) on the same training prompts,
in one process, and prints JSON with:

* ``spearman_fp32_vs_quant``: the number the issue asks about;
* ``split_half``: each model's profile on the first half of the prompts vs the second
  half (sampling noise of the estimate) and the cross-model Spearman on each half. A
  within-model split-half correlation far above the cross-model one means the gap is a
  systematic change of the profile by quantization, not too few examples;
* ``dequantized_check``: the quantized model's profile vs the profile of an fp32 copy
  holding its dequantized weights, on the first ``--check_examples`` prompts (max relative
  difference per layer). Near 1e-6 means the estimator sees exactly the quantized weights;
  the fp32-vs-quantized gap then comes from the weights themselves;
* top layers, depth shares (H1) and the wall time of each pass.
"""

from __future__ import annotations

import argparse
import time

from _results import add_json_out, emit


def _combine(a: list[float], na: int, b: list[float], nb: int) -> list[float]:
    """Per-example means of two disjoint halves -> the mean over both."""
    return [(x * na + y * nb) / (na + nb) for x, y in zip(a, b)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--form", default="parameter", choices=["parameter", "activation"])
    parser.add_argument("--labels", default="empirical", choices=["empirical", "sampled"])
    parser.add_argument("--quant", default="nf4", choices=["nf4", "int8"])
    parser.add_argument("--check_examples", type=int, default=8, help="0 skips the dequantized-copy check")
    parser.add_argument("overrides", nargs="*")
    add_json_out(parser)
    args = parser.parse_args()

    from layerwise_dist.config import load_config
    from layerwise_dist.data import build_examples, collate, load_splits, tokenize_examples
    from layerwise_dist.fisher import FisherProfile, compute_fisher_profile, spearman
    from layerwise_dist.models.student import build_student
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
    half = len(batches) // 2
    n_first = sum(int(b["input_ids"].shape[0]) for b in batches[:half])
    n_second = len(data) - n_first

    def profile(model, some_batches) -> FisherProfile:
        return compute_fisher_profile(
            model, some_batches, form=args.form, labels=args.labels, seed=cfg.fisher.seed, model_id=cfg.teacher.model
        )

    halves: dict[str, tuple[FisherProfile, FisherProfile]] = {}
    seconds: dict[str, float] = {}
    check: dict[str, object] = {}
    for quant in ("none", args.quant):
        teacher_cfg = type(cfg.teacher)(**{**cfg.teacher.__dict__, "quantization": quant})
        model = load_teacher(teacher_cfg)
        start = time.perf_counter()
        halves[quant] = (profile(model, batches[:half]), profile(model, batches[half:]))
        seconds[quant] = time.perf_counter() - start
        if quant != "none" and args.check_examples > 0:
            some = batches[: max(1, -(-args.check_examples // bs))]
            deq, _ = build_student(model, list(range(model.config.num_hidden_layers)))
            q, d = profile(model, some), profile(deq, some)
            rel = [abs(x - y) / max(abs(y), 1e-30) for x, y in zip(q.scores, d.scores)]
            check = {"examples": q.num_examples, "max_rel_diff": max(rel), "spearman": spearman(q.scores, d.scores)}
            del deq
        del model

    full = {k: _combine(a.scores, n_first, b.scores, n_second) for k, (a, b) in halves.items()}
    ref = halves["none"][0]

    def shares(scores: list[float]) -> tuple[float, float]:
        return FisherProfile(scores=scores, form=ref.form, labels=ref.labels).depth_shares(0.3)

    def top(scores: list[float]) -> list[int]:
        return FisherProfile(scores=scores, form=ref.form, labels=ref.labels).top_layers(5)

    fp32, quantized = full["none"], full[args.quant]
    emit(
        {
            "teacher": cfg.teacher.model,
            "quantization": args.quant,
            "examples": len(data),
            "form": args.form,
            "labels": args.labels,
            "spearman_fp32_vs_quant": spearman(fp32, quantized),
            "goal": 0.9,
            "split_half": {
                "examples": [n_first, n_second],
                "fp32_first_vs_second": spearman(halves["none"][0].scores, halves["none"][1].scores),
                "quant_first_vs_second": spearman(halves[args.quant][0].scores, halves[args.quant][1].scores),
                "fp32_vs_quant_first": spearman(halves["none"][0].scores, halves[args.quant][0].scores),
                "fp32_vs_quant_second": spearman(halves["none"][1].scores, halves[args.quant][1].scores),
            },
            "dequantized_check": check,
            "top5_fp32": top(fp32),
            "top5_quant": top(quantized),
            "depth_shares_fp32": shares(fp32),
            "depth_shares_quant": shares(quantized),
            "scores_fp32": [round(s, 4) for s in fp32],
            "scores_quant": [round(s, 4) for s in quantized],
            "spearman_fisher_vs_block_influence_fp32": spearman(fp32, ref.block_influence),
            "fisher_pass_seconds": seconds,
        },
        args.json_out,
    )


if __name__ == "__main__":
    main()
