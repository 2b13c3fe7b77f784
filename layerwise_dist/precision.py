"""Precision choice in one place: bf16 on CUDA, fp32 on CPU unless the config says otherwise."""

from __future__ import annotations

import torch

from .config import ConfigError


def use_bf16(precision: str) -> bool:
    if precision == "bf16":
        if not torch.cuda.is_available():
            raise ConfigError("train.precision=bf16 needs CUDA here; use auto or fp32 on CPU")
        return True
    if precision == "fp32":
        return False
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
