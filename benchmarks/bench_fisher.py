"""Cost of the Fisher pass relative to a plain forward + backward on the same batch (issue 4, goal 8).

    OMP_NUM_THREADS=1 python benchmarks/bench_fisher.py --shape smollm2 --layers 4 --seq 384 --batch 2
    OMP_NUM_THREADS=1 python benchmarks/bench_fisher.py --shape llama3-8b --layers 1 --seq 384 --batch 1 --reps 3
    OMP_NUM_THREADS=1 python benchmarks/bench_fisher.py --shape smollm2 --layers 4 --quant nf4

A random Llama with the layer shapes of ``--shape`` (hidden, MLP width, heads and KV
heads of the real model; fewer layers and a small vocabulary, which the per-layer cost
ratio does not depend on: only the answer positions are projected onto the vocabulary).
``--quant nf4`` saves it and reloads it through the package's teacher loader as a
bitsandbytes NF4 model (double quantization), the default teacher format.

Timed (median of interleaved repetitions), all on one batch and the same answer log-prob loss:
  plain_train   forward + backward with weight gradients (a training step without the optimizer;
                fp32 only: 4-bit weights take no gradient)
  plain_frozen  forward + backward with frozen weights (activation gradients only: all a
                4-bit teacher's backward can do, and all the Fisher pass needs)
  fisher_param  compute_fisher_profile(form="parameter")
  fisher_act    compute_fisher_profile(form="activation")
Prints one JSON object with the times (wall and ``time.process_time``, which leaves out the time a
one-thread run waited for a core on a shared machine), the ratios in both, and the linear-layer method
(Gram or explicit) the parameter form picked for each shape.

Why the shape matters: per example and linear layer (fan-in i, fan-out o, T tokens), the
exact per-example weight-gradient norm costs min(T*i*o, T^2*(i+o)) multiply-adds; a
forward or an activation backward costs T*i*o. The overhead over a frozen
forward+backward is therefore about min(1, T*(i+o)/(i*o)) / 2: large for SmolLM2's
576-wide layers at T ~ 400, small for an 8B teacher's 4096/14336-wide ones.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from _results import add_json_out, emit, interleaved, medians
from transformers import LlamaConfig, LlamaForCausalLM

from layerwise_dist.fisher import answer_log_probs, compute_fisher_profile
from layerwise_dist.fisher.estimator import _frozen, decoder_layers, input_requires_grad
from layerwise_dist.fisher.hooks import FisherHooks

# (hidden, intermediate, heads, kv_heads) of real models' decoder layers.
SHAPES = {
    "tiny": (256, 512, 4, 2),
    "smollm2": (576, 1536, 9, 3),  # SmolLM2-135M, the CPU teacher
    "llama3-8b": (4096, 14336, 32, 8),  # Llama 3 8B, the target teacher
}


def build_model(shape: str, layers: int, vocab: int, seed: int = 0) -> LlamaForCausalLM:
    hidden, inter, heads, kv = SHAPES[shape]
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def quantize_nf4(model: LlamaForCausalLM, folder: str) -> torch.nn.Module:
    from layerwise_dist.config import TeacherConfig
    from layerwise_dist.models.teacher import load_teacher

    model.save_pretrained(folder)
    return load_teacher(TeacherConfig(model=folder, quantization="nf4", placement="replicate"))


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
    params = [p for p in model.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(train)
    with input_requires_grad(model):
        answer_log_probs(model, batch).sum().backward()
    for p in params:
        p.grad = None
        p.requires_grad_(False)


def methods(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, str]:
    """Which per-example method (Gram or explicit) the parameter form used for each linear of a layer."""
    with (
        _frozen(model, True),
        input_requires_grad(model),
        FisherHooks(decoder_layers(model), "parameter") as hooks,
        torch.enable_grad(),
    ):
        hooks.start_batch(batch["attention_mask"])
        answer_log_probs(model, batch).sum().backward()
        hooks.finish_batch()
        return dict(hooks.linear_methods)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="smollm2", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=384)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--quant", default="none", choices=["none", "nf4"])
    add_json_out(parser)
    args = parser.parse_args()

    model = build_model(args.shape, args.layers, args.vocab)
    tmp = None
    if args.quant == "nf4":
        tmp = tempfile.TemporaryDirectory(prefix="bench_fisher_")
        model = quantize_nf4(model, tmp.name)
    batch = make_batch(args.batch, args.seq, args.vocab)
    runs = {
        "plain_frozen": lambda: plain(model, batch, False),
        "fisher_param": lambda: compute_fisher_profile(model, [batch], "parameter", progress=False),
        "fisher_act": lambda: compute_fisher_profile(model, [batch], "activation", progress=False),
    }
    if args.quant == "none":
        runs["plain_train"] = lambda: plain(model, batch, True)
    times, cpu = interleaved(runs, args.reps)
    med, med_cpu = medians(times), medians(cpu)
    out = {
        "config": vars(args),
        "layer_shape": dict(zip(("hidden", "intermediate", "heads", "kv_heads"), SHAPES[args.shape])),
        "torch_threads": torch.get_num_threads(),
        "linear_methods": methods(model, batch),
        "median_s": med,
        "median_cpu_s": med_cpu,
        "ratio_param_vs_frozen": med["fisher_param"] / med["plain_frozen"],
        "ratio_act_vs_frozen": med["fisher_act"] / med["plain_frozen"],
        "ratio_param_vs_frozen_cpu_time": med_cpu["fisher_param"] / med_cpu["plain_frozen"],
        "ratio_act_vs_frozen_cpu_time": med_cpu["fisher_act"] / med_cpu["plain_frozen"],
        "goal": {"param": 1.2, "act": 1.05},
    }
    if "plain_train" in med:
        out["ratio_param_vs_train"] = med["fisher_param"] / med["plain_train"]
        out["ratio_act_vs_train"] = med["fisher_act"] / med["plain_train"]
    emit(out, args.json_out)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
