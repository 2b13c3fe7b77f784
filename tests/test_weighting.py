"""Layer weighting strategies and the user extension point."""

from __future__ import annotations

import pytest
import torch

from layerwise_dist.config import DistillConfig
from layerwise_dist.weighting import (
    LayerwiseDistillation,
    WeightingError,
    available_weightings,
    layer_weights,
    normalize,
    register_weighting,
)

SCORES = [0.1, 4.0, 0.5, 2.0, 1.0, 0.0]


@pytest.mark.parametrize("strategy", ["fisher", "linear", "uniform"])
def test_weights_are_non_negative_and_sum_to_one(strategy):
    w = layer_weights(strategy, [0, 2, 3, 5], SCORES)
    assert len(w) == 4 and all(x >= 0 for x in w)
    assert sum(w) == pytest.approx(1.0)


def test_linear_is_the_seed_ramp_increasing_with_depth():
    w = layer_weights("linear", [0, 1, 2, 3], None)
    ramp = torch.linspace(0.1, 1.0, 4, dtype=torch.float64)
    assert w == pytest.approx((ramp / ramp.sum()).tolist())
    assert all(a < b for a, b in zip(w, w[1:]))


def test_uniform():
    assert layer_weights("uniform", [3, 7, 9], None) == pytest.approx([1 / 3] * 3)


def test_fisher_follows_the_mapped_scores():
    layer_map = [1, 2, 4, 5]
    w = layer_weights("fisher", layer_map, SCORES)
    mapped = [SCORES[t] for t in layer_map]
    assert w == pytest.approx([s / sum(mapped) for s in mapped])
    assert w[-1] == 0.0  # a layer with Fisher score 0 gets no weight


def test_fisher_temperature_sharpens_and_flattens():
    layer_map = [0, 1, 2, 3]
    base = layer_weights("fisher", layer_map, SCORES)
    sharp = layer_weights("fisher", layer_map, SCORES, temperature=0.5)
    flat = layer_weights("fisher", layer_map, SCORES, temperature=4.0)
    assert max(sharp) > max(base) > max(flat)
    assert sharp.index(max(sharp)) == base.index(max(base)) == 1
    assert layer_weights("fisher", layer_map, SCORES, temperature=1e-3)[1] == pytest.approx(1.0)
    assert layer_weights("fisher", layer_map, SCORES, temperature=1e6) == pytest.approx([0.25] * 4, abs=1e-4)


def test_fisher_errors():
    with pytest.raises(WeightingError, match="needs Fisher scores"):
        layer_weights("fisher", [0, 1], None)
    with pytest.raises(WeightingError, match="past the 2 teacher layers"):
        layer_weights("fisher", [0, 3], [1.0, 2.0])
    with pytest.raises(WeightingError, match="non-negative"):
        layer_weights("fisher", [0, 1], [1.0, -2.0])
    with pytest.raises(WeightingError, match="score 0"):
        layer_weights("fisher", [0, 1], [0.0, 0.0, 3.0])


def test_unknown_strategy_lists_the_registered_ones():
    with pytest.raises(WeightingError, match="registered: .*fisher.*linear.*uniform"):
        layer_weights("nope", [0], None)


def test_user_subclass_is_selectable_by_name():
    @register_weighting("test_last_only")
    class LastOnly(LayerwiseDistillation):
        def calculate_layer_weights(self) -> list[float]:
            return [0.0] * (self.num_layers - 1) + [5.0]

    cfg = DistillConfig(layer_weighting="test_last_only")
    assert "test_last_only" in available_weightings()
    assert layer_weights(cfg.layer_weighting, [0, 2, 3], None) == [0.0, 0.0, 1.0]


def test_invalid_user_weights_are_rejected():
    @register_weighting("test_bad_length")
    class BadLength(LayerwiseDistillation):
        def calculate_layer_weights(self) -> list[float]:
            return [1.0]

    with pytest.raises(WeightingError, match="returned 1 weights for 2"):
        layer_weights("test_bad_length", [0, 1], None)
    with pytest.raises(WeightingError, match="needs a LayerwiseDistillation subclass"):
        register_weighting("test_not_a_class")(object)
    with pytest.raises(WeightingError, match="all zero"):
        normalize([0.0, 0.0])
