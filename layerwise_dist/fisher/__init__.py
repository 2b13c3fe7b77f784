"""Layerwise Fisher information of a (frozen, possibly 4-bit, possibly ZeRO-3) teacher on the task."""

from layerwise_dist.fisher.engine import engine_backward, make_fisher_engine
from layerwise_dist.fisher.estimator import (
    FisherInformationCalculator,
    compute_fisher_profile,
    decoder_layers,
)
from layerwise_dist.fisher.hooks import FisherHooks, linear_method
from layerwise_dist.fisher.profile import FisherProfile, spearman
from layerwise_dist.fisher.targets import answer_log_probs, answer_targets, sample_tokens
from layerwise_dist.weighting import normalize

__all__ = [
    "FisherHooks",
    "FisherInformationCalculator",
    "FisherProfile",
    "answer_log_probs",
    "answer_targets",
    "compute_fisher_profile",
    "decoder_layers",
    "engine_backward",
    "linear_method",
    "make_fisher_engine",
    "normalize",
    "sample_tokens",
    "spearman",
]
