"""A DeepSpeed engine around a frozen (possibly 4-bit) teacher, only so that ``engine.backward`` runs.

Under ZeRO-3, ``loss.backward()`` and ``torch.autograd.grad`` are refused by the
partitioning hooks, and ``engine.backward`` fails on an engine without trainable
parameters. So the norm weights are made trainable under an lr-0 SGD optimizer: the
backward then runs, the tensor hooks see every activation gradient, and the norm
gradients the engine accumulates are zeroed after each backward, so nothing changes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from layerwise_dist.distributed import prepare_shm_op
from layerwise_dist.fisher.hooks import is_norm


def make_fisher_engine(model: nn.Module, ds_config: dict[str, Any]) -> Any:
    """Wrap a frozen model in a DeepSpeed engine whose only trainable weights are its norms (lr 0).

    ``ds_config`` is a DeepSpeed config (usually ZeRO stage 3); its optimizer, scheduler and
    batch sizes are replaced: one micro-batch per step, no gradient accumulation (so
    ``engine.backward`` does not rescale the loss). fp16 is refused: its loss scaling would
    scale the gradients the Fisher hooks square.
    """
    import deepspeed
    import torch._dynamo  # noqa: F401  (must precede deepspeed.zero.Init; harmless otherwise)

    config = copy.deepcopy(ds_config)
    if config.get("fp16", {}).get("enabled") is True:
        raise ValueError("make_fisher_engine: fp16 loss scaling would scale the Fisher gradients; use bf16 or fp32")
    for key in ("optimizer", "scheduler", "train_batch_size"):
        config.pop(key, None)
    micro = config.get("train_micro_batch_size_per_gpu")
    config["train_micro_batch_size_per_gpu"] = micro if isinstance(micro, int) else 1
    config["gradient_accumulation_steps"] = 1
    config["zero_allow_untested_optimizer"] = True
    config.setdefault("gradient_clipping", 0.0)

    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [p for m in model.modules() if is_norm(m) for p in m.parameters(recurse=False)]
    if not trainable:
        raise ValueError("make_fisher_engine: the model has no norm weights to carry the engine's backward")
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(trainable, lr=0.0)
    prepare_shm_op()  # deepspeed.initialize may start the process group itself
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def engine_backward(engine: Any) -> Callable[[torch.Tensor], None]:
    """``engine.backward(loss)`` followed by dropping the (lr-0) gradients it accumulated."""

    def backward(loss: torch.Tensor) -> None:
        engine.backward(loss)
        engine.optimizer.zero_grad()

    return backward
