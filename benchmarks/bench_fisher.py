"""Cost of the Fisher pass relative to a plain forward + backward on the same batch.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_fisher.py --layers 4 --hidden 256 --seq 128 --batch 4

Timed (median of interleaved repetitions), all on one batch and the same answer log-prob loss:
  plain_train   forward + backward with weight gradients (a training step without the optimizer)
  plain_frozen  forward + backward with frozen weights (activation gradients only: what the Fisher pass needs)
  fisher_param  compute_fisher_profile(form="parameter")
  fisher_act    compute_fisher_profile(form="activation")
Prints one JSON object with the times and the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from layerwise_dist.fisher import answer_log_probs, compute_fisher_profile
from layerwise_dist.fisher.estimator import input_requires_grad
from layerwise_dist.models.tiny import tiny_llama


def make_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    lengths = [seq - (i * seq) // (4 * batch) for i in range(batch)]  # some right padding
    labels = torch.full_like(ids, -100)
    for i, n in enumerate(lengths):
        mask[i, n:] = 0
        ids[i, n:] = 0
        labels[i, n - 1] = ids[i, n - 1]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def plain(model: torch.nn.Module, batch: dict[str, torch.Tensor], train: bool) -> None:
    for p in model.parameters():
        p.requires_grad_(train)
    with input_requires_grad(model):
        answer_log_probs(model, batch).sum().backward()
    for p in model.parameters():
        p.grad = None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()

    model = tiny_llama(vocab_size=args.vocab, num_layers=args.layers, hidden=args.hidden)
    batch = make_batch(args.batch, args.seq, args.vocab)
    runs = {
        "plain_train": lambda: plain(model, batch, True),
        "plain_frozen": lambda: plain(model, batch, False),
        "fisher_param": lambda: compute_fisher_profile(model, [batch], "parameter", progress=False),
        "fisher_act": lambda: compute_fisher_profile(model, [batch], "activation", progress=False),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(args.reps):
        for name, fn in runs.items():  # interleaved, so drifting machine load hits every variant alike
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "config": vars(args),
        "torch_threads": torch.get_num_threads(),
        "median_s": med,
        "ratio_param_vs_train": med["fisher_param"] / med["plain_train"],
        "ratio_param_vs_frozen": med["fisher_param"] / med["plain_frozen"],
        "ratio_act_vs_train": med["fisher_act"] / med["plain_train"],
        "ratio_act_vs_frozen": med["fisher_act"] / med["plain_frozen"],
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
