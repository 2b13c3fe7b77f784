"""How much of the full-vocabulary KD the teacher cache's top-k targets keep, and what they cost on disk.

    OMP_NUM_THREADS=2 python benchmarks/bench_cache_topk.py --teacher DIR --student DIR \\
        [--preset experiment-quick] [--examples 8] [--topk 16 64 256 1024 4096] [key=value ...]

The cache stores, per loss position, the teacher's top-k log-probs at the KD temperature and one bin for the rest
of the vocabulary (:mod:`layerwise_dist.teacher_cache`); KD from it is the full KD coarse-grained to k + 1 bins, a
lower bound. This runs a teacher and a student (e.g. an adapted teacher's ``merged`` folder and a cell's
``student``) on the preset's first training examples, at the positions the loss reads, and prints JSON: per k
the binned KD (``distill.kd_loss``, ``distill.temperature``) as a fraction of the full KD, the teacher's mass in
its top k, and the bytes per example the top-k targets take beside the hidden states.
"""

from __future__ import annotations

import argparse

import torch
from _results import add_json_out, emit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--teacher", required=True, help="teacher folder (HF safetensors)")
    parser.add_argument("--student", required=True, help="student folder (HF safetensors)")
    parser.add_argument("--preset", default="experiment-quick")
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--topk", type=int, nargs="+", default=[16, 64, 256, 1024, 4096])
    parser.add_argument("overrides", nargs="*")
    add_json_out(parser)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from layerwise_dist.config import load_config
    from layerwise_dist.data import build_examples, load_splits, tokenize_examples
    from layerwise_dist.data.sampler import load_batch
    from layerwise_dist.losses import distillation_loss, forward_for_loss, kd_loss_from_config
    from layerwise_dist.models.teacher import load_tokenizer
    from layerwise_dist.teacher_cache import CachedLogits, student_binned

    cfg = load_config(args.preset, ["tracking.enabled=false", *args.overrides])
    tok = load_tokenizer(cfg.teacher)
    examples = build_examples(load_splits(cfg.data), "train", cfg.data, tok)[: args.examples]
    data = tokenize_examples(examples, tok, cfg.data)
    models = {}
    for name, folder in (("teacher", args.teacher), ("student", args.student)):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
        models[name] = model
    loss = distillation_loss(
        cfg, [1.0], [0], models["student"].config.hidden_size, models["teacher"].config.hidden_size
    )
    kd = kd_loss_from_config(cfg.distill)
    T = cfg.distill.temperature
    full_sum, binned_sum = 0.0, {k: 0.0 for k in args.topk}
    mass_sum, positions, tokens = {k: 0.0 for k in args.topk}, 0, 0
    with torch.no_grad():
        for start in range(0, len(data), args.batch):
            indices = list(range(start, min(start + args.batch, len(data))))
            batch = load_batch(data, indices, tok.pad_token_id)
            if "packed" in batch:
                batch = {**batch, "packed": loss.scored_packed(batch["packed"])}
                tokens += sum(batch["packed"].lengths)
            else:
                tokens += int(batch["attention_mask"].sum())
            outs = [forward_for_loss(models[n], batch) for n in ("teacher", "student")]
            t_logits, s_logits = outs[0].logits, outs[1].logits
            n = t_logits.shape[0]
            every = torch.ones(1, n, dtype=torch.bool)
            full_sum += float(kd(s_logits[None], t_logits[None], every)) * n
            for k in args.topk:
                cached = CachedLogits.from_logits(t_logits, k, T)
                s_bins = student_binned(s_logits, cached)
                binned_sum[k] += float(kd((T * s_bins)[None], (T * cached.binned())[None], every)) * n
                mass_sum[k] += float(cached.logp.exp().sum(-1).sum())
            positions += n
    hidden = models["teacher"].config.hidden_size
    width = 2 if cfg.distill.cache_dtype == "bf16" else 4
    per_layer_per_example = tokens / len(data) * hidden * width
    emit(
        {
            "preset": args.preset,
            "teacher": args.teacher,
            "student": args.student,
            "examples": len(data),
            "loss_positions_per_example": positions / len(data),
            "tokens_per_example": tokens / len(data),
            "kd_loss": cfg.distill.kd_loss,
            "temperature": T,
            "full_kd": full_sum / positions,
            "topk": {
                str(k): {
                    "binned_kd": binned_sum[k] / positions,
                    "fraction_of_full_kd": binned_sum[k] / full_sum,
                    "teacher_mass_in_topk": mass_sum[k] / positions,
                    "topk_bytes_per_example": positions / len(data) * (k * 8 + 4),
                }
                for k in args.topk
            },
            "hidden_bytes_per_layer_per_example": per_layer_per_example,
        },
        args.json_out,
    )


if __name__ == "__main__":
    main()
