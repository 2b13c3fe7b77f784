"""Distillation throughput beside a peer: the package's step vs a Hugging Face ``Trainer`` with a KD ``compute_loss``.

    OMP_NUM_THREADS=1 python benchmarks/bench_kd_vs_hf_trainer.py [--preset default] [--reps 5] [key=value ...]

Both sides get the same teacher (the preset's, loaded replicated in fp32), two copies of the same
8-layer student (built from the same teacher layers), the same collated batch of the preset's
formulation, one process and the same threads. Steps are interleaved rep by rep after one warm-up each.

- ``package``: :class:`layerwise_dist.trainer.DistillationTrainer` (the launchers' DeepSpeed loop, one
  rank): teacher forward, student forward, the preset's loss (pointwise: CE on the target title, token
  KD on the candidates' title tokens, list KD over the candidate scores, Fisher-free uniform layer
  alignment), backward, step; logits only where a loss reads them.
- ``package_cached``: the same step reading the teacher's outputs from the offline cache
  (``distill.teacher_cache``, what ``layerwise-dist ablation`` runs: no teacher forward in the step; top-k KD
  targets, bf16 hidden states), built once before the timing (its time reported as ``cache.build_s``).
- ``hf_trainer``: ``transformers.Trainer`` with ``compute_loss`` overridden the way DistillKit-style
  tools do it: teacher and student forwards over the whole sequence, full-vocabulary logits at every
  position, ``alpha * CE + (1 - alpha) * T^2 * forward KL`` averaged over every real token; one step is
  ``trainer.training_step`` + ``optimizer.step`` (what ``Trainer.train`` runs per step, without its
  data loader). For pointwise batches it runs on the very same packed rows (block attention mask and
  position ids), CE on the target title's tokens.

Prints JSON: median wall and CPU seconds per step (``time.process_time``, every thread of the process:
on a machine shared with other jobs it leaves out the time the process waited for a core), tokens per step
(the real tokens of the batch, the same for both), tokens/s, and ``speedup = package tokens/s /
hf_trainer tokens/s`` in wall time (``speedup_cpu_time`` in CPU time; goal >= 1.3, judged on the online step:
both sides run the teacher), and ``speedup_cached`` / ``speedup_cached_cpu_time`` for the cached step.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses

import torch
import torch.nn.functional as F
from _results import add_json_out, emit, interleaved, medians


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="default")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=0.5, help="peer: weight of CE (1 - alpha on KD)")
    parser.add_argument("overrides", nargs="*")
    add_json_out(parser)
    args = parser.parse_args()

    from transformers import Trainer, TrainingArguments

    from layerwise_dist.config import load_config
    from layerwise_dist.data import build_examples, collate, load_splits, tokenize_examples
    from layerwise_dist.losses import IGNORE_INDEX
    from layerwise_dist.models.student import build_student, select_layers
    from layerwise_dist.models.teacher import (
        load_teacher,
        load_tokenizer,
        resolve_model_dir,
        select_attn_implementation,
    )
    from layerwise_dist.trainer import DistillationTrainer

    overrides = ["tracking.enabled=false", "teacher.placement=replicate", "teacher.quantization=none"]
    cfg = load_config(args.preset, [*overrides, *args.overrides])
    attn = select_attn_implementation(cfg.model_attn_implementation())  # auto -> sdpa on CPU
    tokenizer = load_tokenizer(cfg.teacher)
    splits = load_splits(cfg.data)
    examples = build_examples(splits, "train", cfg.data, tokenizer)[: cfg.train.micro_batch_size]
    data = tokenize_examples(examples, tokenizer, cfg.data)
    batch = collate([data[i] for i in range(len(data))], tokenizer.pad_token_id)
    teacher = load_teacher(dataclasses.replace(cfg.teacher, attn_implementation=attn))
    teacher.eval()
    n_teacher = teacher.config.num_hidden_layers
    layers = select_layers("uniform", n_teacher, cfg.student.num_layers)
    student, layer_map = build_student(resolve_model_dir(cfg.teacher), layers)
    student.config._attn_implementation = attn
    peer_student = copy.deepcopy(student)
    peer_teacher = teacher  # frozen, shared (the peer never writes to it)

    pointwise = "packed" in batch
    if pointwise:
        packed = batch["packed"].history_only()
        dtype = teacher.get_input_embeddings().weight.dtype
        peer_inputs = {
            "input_ids": packed.input_ids,
            "attention_mask": packed.additive_attention_mask(dtype),
            "position_ids": packed.position_ids,
        }
        lengths = torch.tensor(packed.lengths)
        real = torch.arange(packed.input_ids.shape[1])[None, :] < lengths[:, None]
        # CE on the target title's tokens: label at position p is the token p predicts (HF shifts by one).
        labels = torch.full_like(packed.input_ids, IGNORE_INDEX)
        target_slots = set()
        start = 0
        for b, n_cand in enumerate(packed.num_candidates):
            target_slots.add(start + int(batch["target_index"][b]))
            start += packed.num_groups * n_cand
        for k in range(packed.token_target.numel()):
            if int(packed.token_slot[k]) in target_slots:
                row, pos = int(packed.token_row[k]), int(packed.token_pred_pos[k])
                labels[row, pos + 1] = int(packed.token_target[k])  # shifted back by compute_loss
        tokens = int(real.sum())
    else:
        peer_inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        labels = batch["labels"]
        real = batch["attention_mask"].bool()
        tokens = int(real.sum())

    temperature, alpha = cfg.distill.temperature, args.alpha

    class KDTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = dict(inputs)
            y = inputs.pop("labels")
            out = model(**inputs)
            with torch.no_grad():
                t_logits = peer_teacher(**inputs).logits
            s_logits = out.logits.float()
            ce = F.cross_entropy(s_logits[:, :-1].flatten(0, 1), y[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
            log_p = F.log_softmax(t_logits.float() / temperature, -1)
            log_q = F.log_softmax(s_logits / temperature, -1)
            kl = (log_p.exp() * (log_p - log_q)).sum(-1)
            kd = (kl * real).sum() / real.sum() * temperature**2
            loss = alpha * ce + (1 - alpha) * kd
            return (loss, out) if return_outputs else loss

    import atexit
    import shutil
    import tempfile
    from pathlib import Path

    # One scratch folder for the peer's output_dir and the teacher cache (~40 MB), removed when the run ends.
    scratch = Path(tempfile.mkdtemp(prefix="kd-bench-"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    for sub in ("peer", "cache"):
        (scratch / sub).mkdir()

    targs = TrainingArguments(
        output_dir=str(scratch / "peer"),
        per_device_train_batch_size=cfg.train.micro_batch_size,
        learning_rate=cfg.train.lr,
        max_steps=args.reps + 1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    peer = KDTrainer(model=peer_student, args=targs)
    peer.create_optimizer_and_scheduler(num_training_steps=args.reps + 1)
    peer.current_gradient_accumulation_steps = 1  # what Trainer.train sets before its first step
    peer_student.train()

    def step_peer() -> None:
        peer.training_step(peer_student, {**peer_inputs, "labels": labels})
        peer.optimizer.step()
        peer.lr_scheduler.step()
        peer.optimizer.zero_grad(set_to_none=True)

    ours = DistillationTrainer(teacher, student, None, config=cfg, layer_map=layer_map)

    def step_package() -> None:
        ours.train([batch], num_epochs=1)

    # The package reading the teacher's outputs from its offline cache (distill.teacher_cache, what
    # `layerwise-dist ablation` runs): built once here, its cost per step reported apart.
    from layerwise_dist.teacher_cache import TeacherCache

    runner = ours.runner
    indices = list(range(len(data)))
    cache = TeacherCache(
        str(scratch / "cache"),
        layer_map,
        n_teacher,
        cfg.distill.cache_topk,
        cfg.distill.temperature,
        cfg.data.formulation,
        cfg.teacher.model,
        cfg.distill.cache_dtype,
    ).open()
    build = cache.build(teacher, [(indices, runner._prepared(batch))], teacher.config.hidden_size, progress=False)
    runner.teacher_cache = cache  # read only when _forward_loss gets the batch's example indices

    def step_cached() -> None:
        loss, _ = runner._forward_loss(batch, indices)
        runner.engine.backward(loss)
        runner.engine.step()

    contenders = {"package": step_package, "package_cached": step_cached, "hf_trainer": step_peer}
    timings, cpu = interleaved(contenders, args.reps)  # the warm-up call sets up the engines and the allocator
    med, med_cpu = medians(timings), medians(cpu)
    tps = {k: tokens / v for k, v in med.items()}
    tps_cpu = {k: tokens / v for k, v in med_cpu.items()}
    emit(
        {
            "preset": args.preset,
            "formulation": cfg.data.formulation,
            "ds_config": str(cfg.ds_config),  # the package step's DeepSpeed config (one rank)
            "teacher": cfg.teacher.model,
            "student_layers": layer_map,
            "batch_rows": int(peer_inputs["input_ids"].shape[0]),
            "batch_width": int(peer_inputs["input_ids"].shape[1]),
            "tokens_per_step": tokens,
            "threads": torch.get_num_threads(),
            "reps": args.reps,
            "seconds_per_step": timings,
            "cpu_seconds_per_step": cpu,
            "median_s": med,
            "median_cpu_s": med_cpu,
            "tokens_per_s": tps,
            "tokens_per_cpu_s": tps_cpu,
            "speedup": tps["package"] / tps["hf_trainer"],
            "speedup_cpu_time": tps_cpu["package"] / tps_cpu["hf_trainer"],
            "speedup_cached": tps["package_cached"] / tps["hf_trainer"],
            "speedup_cached_cpu_time": tps_cpu["package_cached"] / tps_cpu["hf_trainer"],
            "cache": {
                "build_s": build["seconds"],
                "bytes_per_example": build["bytes"] / max(1, build["examples"]),
                "topk": cfg.distill.cache_topk,
                "layers": cache.layers,
            },
            "goal": 1.3,
        },
        args.json_out,
    )


if __name__ == "__main__":
    main()
