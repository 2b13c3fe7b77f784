"""layerwise_dist: distributed, Fisher-guided layerwise knowledge distillation of LLM recommenders.

The public names are imported lazily, so ``import layerwise_dist`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "RunConfig": "layerwise_dist.config",
    "load_config": "layerwise_dist.config",
    "ConfigError": "layerwise_dist.config",
    "BaseRecommender": "layerwise_dist.recommender",
    "FisherInformationCalculator": "layerwise_dist.fisher",
    "FisherProfile": "layerwise_dist.fisher",
    "compute_fisher_profile": "layerwise_dist.fisher",
    "DistillationTrainer": "layerwise_dist.trainer",
    "DistillationRunner": "layerwise_dist.trainer",
    "LayerwiseDistillation": "layerwise_dist.weighting",
    "register_weighting": "layerwise_dist.weighting",
    "layer_weights": "layerwise_dist.weighting",
    "build_student": "layerwise_dist.models.student",
    "select_layers": "layerwise_dist.models.student",
    "load_teacher": "layerwise_dist.models.teacher",
    "load_tokenizer": "layerwise_dist.models.teacher",
    "DistillationLoss": "layerwise_dist.losses",
    "rank_metrics": "layerwise_dist.evaluation",
    "evaluate_model": "layerwise_dist.evaluation",
    "evaluate_per_example": "layerwise_dist.evaluation",
    "bootstrap_ci": "layerwise_dist.evaluation",
    "paired_bootstrap_ci": "layerwise_dist.evaluation",
    "evaluate_baselines": "layerwise_dist.baselines",
    "PointwiseDistillationLoss": "layerwise_dist.losses",
    "score_candidates": "layerwise_dist.pointwise",
    "plan": "layerwise_dist.planner",
}
_ALIASES = {"run_pipeline": ("layerwise_dist.recipes.jobs", "pipeline")}

__all__ = sorted([*_EXPORTS, *_ALIASES, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _ALIASES:
        module, attr = _ALIASES[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'layerwise_dist' has no attribute {name!r}")
