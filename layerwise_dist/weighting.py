"""Per-layer weights of the hidden-state alignment loss, by named strategy.

The extension point of the original project is kept: subclass :class:`LayerwiseDistillation`, implement
``calculate_layer_weights``, register it by name and select it with ``distill.layer_weighting=<name>``::

    from layerwise_dist.weighting import LayerwiseDistillation, register_weighting

    @register_weighting("last_only")
    class LastOnly(LayerwiseDistillation):
        def calculate_layer_weights(self) -> list[float]:
            return [0.0] * (self.num_layers - 1) + [1.0]

Whatever a strategy returns is checked (one finite, non-negative weight per student layer, not all zero)
and normalised to sum to 1 by :func:`layer_weights`.

Built-ins:

- ``fisher``: ``w_l ~ s_{map(l)}^(1/T)`` with ``s`` the teacher's layerwise Fisher scores; ``T < 1``
  sharpens towards the most informative layer, ``T > 1`` flattens towards uniform.
- ``linear``: the seed's ``torch.linspace(0.1, 1.0, L_s)`` (deeper layers weigh more), normalised.
- ``uniform``: ``1 / L_s`` each.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch


class WeightingError(ValueError):
    """An unknown weighting strategy, missing Fisher scores or invalid weights."""


class LayerwiseDistillation:
    """Base class of a layer-weighting strategy (the original project's extension point).

    ``layer_map[i]`` is the teacher layer aligned with student layer ``i``; ``fisher_scores[j]`` (optional)
    the Fisher score of teacher layer ``j``; ``temperature`` a strategy-specific knob (used by ``fisher``).
    """

    name: str = ""

    def __init__(
        self, layer_map: Sequence[int], fisher_scores: Sequence[float] | None = None, temperature: float = 1.0
    ) -> None:
        self.layer_map = [int(t) for t in layer_map]
        self.fisher_scores = None if fisher_scores is None else [float(s) for s in fisher_scores]
        self.temperature = float(temperature)

    @property
    def num_layers(self) -> int:
        """Number of student layers (length of the layer map)."""
        return len(self.layer_map)

    def calculate_layer_weights(self) -> list[float]:
        """One non-negative weight per student layer (normalised afterwards)."""
        raise NotImplementedError(f"{type(self).__name__} must implement calculate_layer_weights()")


_REGISTRY: dict[str, type[LayerwiseDistillation]] = {}


def register_weighting(name: str) -> Callable[[type[LayerwiseDistillation]], type[LayerwiseDistillation]]:
    """Class decorator registering a :class:`LayerwiseDistillation` subclass under ``name``."""
    if not name or not isinstance(name, str):
        raise WeightingError(f"a weighting strategy needs a non-empty name; got {name!r}")

    def decorator(cls: type[LayerwiseDistillation]) -> type[LayerwiseDistillation]:
        if not (isinstance(cls, type) and issubclass(cls, LayerwiseDistillation)):
            raise WeightingError(f"@register_weighting({name!r}) needs a LayerwiseDistillation subclass; got {cls!r}")
        existing = _REGISTRY.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise WeightingError(f"weighting strategy {name!r} is already registered by {existing.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def available_weightings() -> list[str]:
    """Names of the registered strategies, sorted."""
    return sorted(_REGISTRY)


def normalize(weights: Sequence[float], temperature: float = 1.0) -> list[float]:
    """Weights proportional to ``w^(1/temperature)``, summing to 1 (the old project's ``normalize`` step).

    The one normalisation of the package: layer weights here, and Fisher scores
    (:meth:`~layerwise_dist.fisher.FisherProfile.normalized`,
    :meth:`~layerwise_dist.fisher.FisherInformationCalculator.normalize`). ``temperature < 1`` sharpens,
    ``> 1`` flattens. Empty, negative, non-finite or all-zero weights raise :class:`WeightingError`: a
    profile of zeros means the Fisher pass (or a strategy) is broken, and no weighting follows from it.
    """
    if temperature <= 0 or not math.isfinite(temperature):
        raise WeightingError(f"temperature must be finite and > 0; got {temperature}")
    values = [float(w) for w in weights]
    if not values:
        raise WeightingError("no weights to normalise (empty layer map)")
    if any(not math.isfinite(w) or w < 0 for w in values):
        raise WeightingError(f"layer weights must be finite and non-negative; got {values}")
    top = max(values)
    if top <= 0:
        raise WeightingError(f"layer weights are all zero; cannot normalise {values}")
    if temperature != 1.0:
        # Scaled by the maximum first: w^(1/T) neither overflows nor underflows to all-zero for small T.
        values = [(w / top) ** (1.0 / temperature) for w in values]
    total = sum(values)
    return [w / total for w in values]


@register_weighting("uniform")
class UniformWeighting(LayerwiseDistillation):
    """Every student layer weighs the same."""

    def calculate_layer_weights(self) -> list[float]:
        return [1.0] * self.num_layers


@register_weighting("linear")
class LinearWeighting(LayerwiseDistillation):
    """The seed's depth ramp ``linspace(0.1, 1.0, L_s)``: deeper student layers weigh more."""

    def calculate_layer_weights(self) -> list[float]:
        return torch.linspace(0.1, 1.0, self.num_layers, dtype=torch.float64).tolist()


@register_weighting("fisher")
class FisherWeighting(LayerwiseDistillation):
    """``w_l ~ s_{map(l)}^(1/T)``: the Fisher scores of the mapped teacher layers, tempered."""

    def calculate_layer_weights(self) -> list[float]:
        from layerwise_dist.models.student import StudentError, validate_layer_map  # transformers: loaded on use

        if self.fisher_scores is None:
            raise WeightingError("layer_weighting=fisher needs Fisher scores: run the Fisher pass or give a profile")
        scores = self.fisher_scores
        if any(not math.isfinite(s) or s < 0 for s in scores):
            raise WeightingError(f"Fisher scores must be finite and non-negative; got {scores}")
        try:
            validate_layer_map(self.layer_map, self.num_layers, len(scores))
        except StudentError as err:
            raise WeightingError(
                f"{err}: a map past the {len(scores)} teacher layers of the Fisher profile has no score to weight"
            ) from err
        mapped = [scores[t] for t in self.layer_map]
        if not any(s > 0 for s in mapped):
            raise WeightingError(f"the mapped teacher layers {self.layer_map} all have Fisher score 0")
        return normalize(mapped, self.temperature)


def layer_weights(
    strategy: str,
    layer_map: Sequence[int],
    fisher_scores: Sequence[float] | None = None,
    temperature: float = 1.0,
) -> list[float]:
    """Weights of the student layers under a registered strategy: non-negative, summing to 1."""
    cls = _REGISTRY.get(strategy)
    if cls is None:
        raise WeightingError(f"unknown layer weighting {strategy!r} (registered: {', '.join(available_weightings())})")
    if not layer_map:
        raise WeightingError("layer_map is empty: the student has no layer to weight")
    weights = list(cls(layer_map, fisher_scores, temperature).calculate_layer_weights())
    if len(weights) != len(layer_map):
        raise WeightingError(
            f"weighting {strategy!r} returned {len(weights)} weights for {len(layer_map)} student layers"
        )
    return normalize(weights)
