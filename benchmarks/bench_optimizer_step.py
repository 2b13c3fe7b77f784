"""AdamW's step as the distillation trainer builds it (``layerwise_dist.trainer.adamw``: fused where torch has
the kernel) against torch's per-op loop, on one flat fp32 tensor the size of a ZeRO-2 rank's partition.

    OMP_NUM_THREADS=1 python benchmarks/bench_optimizer_step.py [--numel 28000000] [--reps 5] [--steps 20]

The default size is the experiment's 8-layer SmolLM2 student (56M trainable parameters, tied embedding
included) split over two ranks. Both variants step the same parameter from the same gradients, interleaved
rep by rep; prints JSON with the median seconds per step, the ratio loop / fused, and the largest difference
between the two parameters after ``--steps`` steps on a 1M-element copy (float rounding, not a different
update rule).
"""

from __future__ import annotations

import argparse

import torch
from _results import add_json_out, emit, interleaved, medians


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--numel", type=int, default=28_000_000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    add_json_out(parser)
    args = parser.parse_args()

    from layerwise_dist.trainer import adamw

    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(args.numel, generator=gen) * 1e-3

    def build(name: str, param: torch.nn.Parameter) -> torch.optim.Optimizer:
        if name == "trainer":
            return adamw([param], lr=1e-3, weight_decay=0.01)
        return torch.optim.AdamW([param], lr=1e-3, weight_decay=0.01, betas=(0.9, 0.999), fused=False)

    variants = {}
    for name in ("loop", "trainer"):
        param = torch.nn.Parameter(torch.randn(args.numel, generator=gen))
        opt = build(name, param)

        def step(param=param, opt=opt) -> None:
            param.grad = grad  # the same gradient each time; the step does not write it
            opt.step()

        variants[name] = step
    wall, cpu = interleaved(variants, args.reps)

    # Same start, same gradients: how far apart the two rules end.
    init = torch.randn(1_000_000, generator=gen)
    grads = [torch.randn(1_000_000, generator=gen) * 1e-3 for _ in range(args.steps)]
    ends = []
    for name in ("loop", "trainer"):
        param = torch.nn.Parameter(init.clone())
        opt = build(name, param)
        for g in grads:
            param.grad = g.clone()
            opt.step()
        ends.append(param.detach())
    med, med_cpu = medians(wall), medians(cpu)
    emit(
        {
            "numel": args.numel,
            "reps": args.reps,
            "trainer_optimizer_fused": bool(opt.defaults.get("fused")),
            "median_s": med,
            "median_cpu_s": med_cpu,
            "ratio_loop_over_trainer": med["loop"] / med["trainer"],
            "ratio_loop_over_trainer_cpu_time": med_cpu["loop"] / med_cpu["trainer"],
            "max_abs_difference_after_steps": float((ends[0] - ends[1]).abs().max()),
            "steps": args.steps,
        },
        args.json_out,
    )


if __name__ == "__main__":
    main()
