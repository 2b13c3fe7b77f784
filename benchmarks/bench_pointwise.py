"""Packed pointwise scoring (one forward per user) vs one forward per candidate sequence.

    OMP_NUM_THREADS=1 python benchmarks/bench_pointwise.py [--model random|smollm2] [--candidates 20] [--reps 5]

One user: a prefix of --prefix-len tokens and --candidates titles of --min-title to
--max-title tokens (random ids; lengths are what matters for cost). Times, interleaved
rep by rep, all under torch.no_grad():
  packed            score_candidates: prefix once + every candidate, block attention mask
  separate          score_candidates_separately: one forward of prefix + candidate per candidate
  separate_batched  the C prefix + candidate sequences right-padded into one batch of C rows
Prints JSON: tokens processed (packed vs separate, ratio; goal >= 4 at 20 candidates),
median wall times and speed-ups, and the max abs difference packed vs separate scores
for mean, sum and pmi. ``--model random`` (default) is a random Llama (hidden 256,
4 layers, SmolLM2's vocabulary size); ``--model smollm2`` the embedded SmolLM2-135M (fp32).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _results import add_json_out, emit


def load_model(name: str, attn: str):
    if name == "random":
        from layerwise_dist.models.tiny import tiny_llama

        return tiny_llama(vocab_size=49152, num_layers=4, hidden=256, seed=0, attn_implementation=attn)
    from transformers import AutoModelForCausalLM

    from layerwise_dist.models.teacher import embedded_smollm2_dir

    model = AutoModelForCausalLM.from_pretrained(
        str(embedded_smollm2_dir()), dtype=torch.float32, attn_implementation=attn
    )
    return model.eval()


@torch.no_grad()
def separate_batched(model, prefix: list[int], candidates: list[list[int]]) -> torch.Tensor:
    """Mean log-prob per candidate from one forward of the C right-padded prefix + candidate rows -> [C]."""
    width = len(prefix) + max(len(c) for c in candidates)
    ids = torch.zeros((len(candidates), width), dtype=torch.long)
    mask = torch.zeros((len(candidates), width), dtype=torch.long)
    rows, pos, targets, slot = [], [], [], []
    for i, cand in enumerate(candidates):
        seq = prefix + cand
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        for k, tok in enumerate(cand):
            rows.append(i)
            pos.append(len(prefix) + k - 1)
            targets.append(tok)
            slot.append(i)
    hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    logits = model.get_output_embeddings()(hidden[torch.tensor(rows), torch.tensor(pos)]).float()
    logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(targets)[:, None]).squeeze(-1)
    sums = torch.zeros(len(candidates), dtype=torch.float64).index_add_(0, torch.tensor(slot), logp.double())
    return (sums / torch.tensor([len(c) for c in candidates], dtype=torch.float64)).float()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["random", "smollm2"], default="random")
    parser.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--prefix-len", type=int, default=120)
    parser.add_argument("--min-title", type=int, default=8)
    parser.add_argument("--max-title", type=int, default=24)
    parser.add_argument("--unconditional-len", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    add_json_out(parser)
    args = parser.parse_args()

    from layerwise_dist.pointwise import pack_candidates, score_candidates, score_candidates_separately

    model = load_model(args.model, args.attn)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    prefix = torch.randint(3, vocab, (args.prefix_len,), generator=gen).tolist()
    unconditional = torch.randint(3, vocab, (args.unconditional_len,), generator=gen).tolist()
    lengths = torch.randint(args.min_title, args.max_title + 1, (args.candidates,), generator=gen).tolist()
    candidates = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]

    tokens_packed = pack_candidates(prefix, candidates).num_tokens
    tokens_separate = sum(len(prefix) + n for n in lengths)
    tokens_batched = len(candidates) * (len(prefix) + max(lengths))

    diffs = {}
    for mode in ("mean", "sum", "pmi"):
        a = score_candidates(model, prefix, candidates, mode, unconditional)
        b = score_candidates_separately(model, prefix, candidates, mode, unconditional)
        diffs[mode] = float((a - b).abs().max())
    diffs["mean_separate_batched"] = float(
        (separate_batched(model, prefix, candidates) - score_candidates_separately(model, prefix, candidates))
        .abs()
        .max()
    )

    runs = {
        "packed": lambda: score_candidates(model, prefix, candidates, "mean"),
        "separate": lambda: score_candidates_separately(model, prefix, candidates, "mean"),
        "separate_batched": lambda: separate_batched(model, prefix, candidates),
    }
    for fn in runs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.reps):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}

    emit(
        {
            "model": args.model,
            "attn_implementation": args.attn,
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "threads": torch.get_num_threads(),
            "candidates": args.candidates,
            "prefix_tokens": len(prefix),
            "title_tokens": {"min": min(lengths), "max": max(lengths), "mean": statistics.mean(lengths)},
            "tokens_processed": {
                "packed": tokens_packed,
                "separate": tokens_separate,
                "separate_batched_with_padding": tokens_batched,
                "ratio_separate_over_packed": round(tokens_separate / tokens_packed, 2),
            },
            "wall_ms_median": {k: round(v, 1) for k, v in med.items()},
            "speedup_packed_vs_separate": round(med["separate"] / med["packed"], 2),
            "speedup_packed_vs_separate_batched": round(med["separate_batched"] / med["packed"], 2),
            "reps": args.reps,
            "max_abs_diff_packed_vs_separate": diffs,
        },
        args.json_out,
    )


if __name__ == "__main__":
    main()
