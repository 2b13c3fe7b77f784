"""Rec-scoring speed of the student beside its teacher, and the FLOP bound of the two configs.

    OMP_NUM_THREADS=1 python benchmarks/bench_scoring.py [--model smollm2-135m] [--layers 8] [--batch 2]
        [--reps 5] [--json-out benchmarks/results/scoring.json] [key=value ...]

The teacher (``--model``, any ``teacher.model``; default the embedded SmolLM2-135M-Instruct, 30 layers)
in fp32 with SDPA attention, and the student ``build_student`` makes of ``--layers`` uniformly chosen
teacher layers (default 8), score the same listwise batch (``--batch`` test examples of ``--preset``'s data,
``data.formulation=listwise``) through the same two paths:

  full         :func:`layerwise_dist.evaluation.forward_scores`: the whole prompt's ``B x T x V`` logits
  answer_only  :func:`layerwise_dist.heads.answer_only_scores`: the decoder up to the answer position and
               the head at that position only

Timed under ``torch.no_grad()``, the four runs interleaved rep by rep after one warm-up each, in this one
process. Prints JSON: median wall and CPU seconds (``time.process_time``: on a machine shared with other
jobs, a one-thread run's CPU time leaves out the time it waited for a core), ``speedup_<path>`` = teacher /
student wall time, ``speedup_<path>_cpu_time`` = the same in CPU time, and
``flop_bound_<path>`` = the ratio of :func:`layerwise_dist.planner.scoring_flops` of the two configs at
the batch's mean prompt length (what the speedup would be if time followed FLOPs). Goal: answer-only
speedup >= 3.5 (bound 3.75 for 8 of 30 layers). Both paths' scores are checked to agree per model.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _results import add_json_out, emit, interleaved, medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a teacher.model value")
    parser.add_argument("--layers", type=int, default=8, help="student layers, uniformly chosen")
    parser.add_argument("--batch", type=int, default=2, help="examples scored per call")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--preset", default="default", help="data and prompt settings")
    parser.add_argument("overrides", nargs="*")
    add_json_out(parser)
    args = parser.parse_args()
    if args.reps < 1 or args.batch < 1 or args.layers < 1:
        parser.error("--reps, --batch and --layers must be >= 1")

    from transformers import AutoModelForCausalLM

    from layerwise_dist import planner
    from layerwise_dist.config import load_config
    from layerwise_dist.data import build_examples, collate, load_splits, tokenize_examples
    from layerwise_dist.evaluation import forward_scores
    from layerwise_dist.heads import answer_only_scores
    from layerwise_dist.models.student import build_student, select_layers
    from layerwise_dist.models.teacher import load_tokenizer, resolve_model_dir

    cfg = load_config(
        args.preset,
        ["tracking.enabled=false", f"teacher.model={args.model}", "data.formulation=listwise", *args.overrides],
    )
    tokenizer = load_tokenizer(cfg.teacher)
    examples = build_examples(load_splits(cfg.data), "test", cfg.data, tokenizer)[: args.batch]
    if len(examples) < args.batch:
        raise SystemExit(f"--batch {args.batch}: the test split has only {len(examples)} examples")
    data = tokenize_examples(examples, tokenizer, cfg.data)
    batch = collate([data[i] for i in range(len(data))], tokenizer.pad_token_id)
    prompt_tokens = [int(p) + 1 for p in batch["answer_pos"].tolist()]

    folder = resolve_model_dir(cfg.teacher)
    teacher = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="sdpa")
    layers = select_layers("uniform", teacher.config.num_hidden_layers, args.layers)
    student, _ = build_student(folder, layers)
    student.config._attn_implementation = "sdpa"
    models = {"teacher": teacher.eval(), "student": student.eval()}

    runs = {}
    for role, model in models.items():
        runs[f"{role}_full"] = lambda m=model: forward_scores(m, batch)
        runs[f"{role}_answer_only"] = lambda m=model: answer_only_scores(m, batch)
    agreement = {}
    with torch.no_grad():
        for role in models:  # warm-up, and the two paths give the same scores
            full, answer = runs[f"{role}_full"](), runs[f"{role}_answer_only"]()
            agreement[role] = float((full.float() - answer.float()).abs().max())
        times, cpu = interleaved(runs, args.reps, warmup=False)
    med, med_cpu = medians(times), medians(cpu)

    seq = round(statistics.mean(prompt_tokens))
    tshape, sshape = planner.count_model(teacher.config), planner.count_model(student.config)
    result = {
        "benchmark": "scoring",
        "model": args.model,
        "teacher_layers": teacher.config.num_hidden_layers,
        "student_layers": layers,
        "dtype": "fp32",
        "attn_implementation": "sdpa",
        "batch": args.batch,
        "prompt_tokens": prompt_tokens,
        "candidates": int(batch["candidate_token_ids"].shape[1]),
        "reps": args.reps,
        "threads": torch.get_num_threads(),
        "seconds_per_call": times,
        "cpu_seconds_per_call": cpu,
        "median_s": med,
        "median_cpu_s": med_cpu,
        "max_abs_diff_full_vs_answer_only": agreement,
    }
    for path in ("full", "answer_only"):
        result[f"speedup_{path}"] = med[f"teacher_{path}"] / med[f"student_{path}"]
        result[f"speedup_{path}_cpu_time"] = med_cpu[f"teacher_{path}"] / med_cpu[f"student_{path}"]
        answer_only = path == "answer_only"
        result[f"flop_bound_{path}"] = planner.scoring_flops(tshape, seq, answer_only) / planner.scoring_flops(
            sshape, seq, answer_only
        )
    result["goal"] = {"speedup_answer_only": 3.5}
    emit(result, args.json_out)


if __name__ == "__main__":
    main()
