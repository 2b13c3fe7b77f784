"""Small helpers shared by the Fisher pass, evaluation and the recommender."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def model_device(model: Any) -> torch.device:
    """The device a batch for ``model`` goes to.

    A DeepSpeed engine's ``device``; else the device of the input embeddings of a HF model (with a
    ``device_map`` the first layer's); else ``model.device`` when it is a ``torch.device``; else the
    device of the first parameter; CPU for a module without parameters.
    """
    inner = getattr(model, "module", None)
    dev = getattr(model, "device", None)
    if isinstance(inner, nn.Module) and dev is not None:  # DeepSpeedEngine
        return torch.device(dev)
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    if isinstance(dev, torch.device):
        return dev
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return torch.device("cpu")
