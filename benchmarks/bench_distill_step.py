"""Cost of one distillation step vs its parts, measured in one run on the same batch.

    OMP_NUM_THREADS=1 python benchmarks/bench_distill_step.py [--preset tiny|default] [--reps 5] [key=value ...]

Times, interleaved rep by rep, on one process (ZeRO-3 engine of one rank):
  teacher   teacher forward (no grad, hidden states)
  student   student engine forward + backward + step with the task CE only
  distill   the full step: teacher forward, student forward, CE + KD + layer alignment, backward, step
and prints JSON with the medians and ratio = distill / (teacher + student), in wall time and in CPU time
(``time.process_time``: leaves out the time a one-thread run waited for a core on a shared machine).
Goal: <= 1.10.
"""

from __future__ import annotations

import argparse

import torch
from _results import add_json_out, emit, interleaved, medians


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    add_json_out(parser)
    args = parser.parse_args()

    from layerwise_dist.config import load_config
    from layerwise_dist.data import build_examples, collate, load_splits, tokenize_examples
    from layerwise_dist.losses import TaskCrossEntropy
    from layerwise_dist.models.student import build_student, select_layers
    from layerwise_dist.models.teacher import load_teacher, load_tokenizer, resolve_model_dir
    from layerwise_dist.trainer import DistillationTrainer

    cfg = load_config(args.preset, ["tracking.enabled=false", "teacher.placement=replicate", *args.overrides])
    tokenizer = load_tokenizer(cfg.teacher)
    splits = load_splits(cfg.data)
    examples = build_examples(splits, "train", cfg.data, tokenizer)[: cfg.train.micro_batch_size]
    data = tokenize_examples(examples, tokenizer, cfg.data)
    batch = collate([data[i] for i in range(len(data))], tokenizer.pad_token_id)
    teacher = load_teacher(cfg.teacher)
    n_teacher = teacher.config.num_hidden_layers
    layers = select_layers("uniform", n_teacher, cfg.student.num_layers)
    student, layer_map = build_student(resolve_model_dir(cfg.teacher), layers)
    trainer = DistillationTrainer(teacher, student, None, config=cfg, layer_map=layer_map)
    engine = trainer.runner.engine
    ce = TaskCrossEntropy()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def t_teacher() -> None:
        with torch.no_grad():
            teacher(**inputs, output_hidden_states=True)

    def t_student() -> None:
        out = engine(**inputs)
        loss = ce(out.logits, batch["labels"])
        engine.backward(loss)
        engine.step()

    def t_distill() -> None:
        trainer.train([batch], num_epochs=1)

    timings, cpu = interleaved({"teacher": t_teacher, "student": t_student, "distill": t_distill}, args.reps)
    med, med_cpu = medians(timings), medians(cpu)
    emit(
        {
            "preset": args.preset,
            "teacher": cfg.teacher.model,
            "quantization": cfg.teacher.quantization,
            "batch": list(batch["input_ids"].shape),
            "student_layers": layer_map,
            "reps": args.reps,
            "median_s": med,
            "median_cpu_s": med_cpu,
            "ratio_distill_over_parts": med["distill"] / (med["teacher"] + med["student"]),
            "ratio_distill_over_parts_cpu_time": med_cpu["distill"] / (med_cpu["teacher"] + med_cpu["student"]),
            "goal": 1.10,
        },
        args.json_out,
    )


if __name__ == "__main__":
    main()
