"""layerwise_dist: distributed, Fisher-guided layerwise knowledge distillation of LLM recommenders."""

__version__ = "0.1.0"
