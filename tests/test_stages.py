"""Per-stage peak RSS: each stage's high-water mark is its own, not the run's so far."""

from __future__ import annotations

import pytest
import torch

from layerwise_dist.stages import StageMeter, reset_peak_rss


@pytest.mark.skipif(not reset_peak_rss(), reason="this kernel does not let a process reset its RSS high-water mark")
def test_each_stage_has_its_own_peak():
    meter = StageMeter()
    with meter.stage("big"):
        block = torch.ones(64 * 1024 * 1024, dtype=torch.uint8)  # 64 MiB, touched
        del block
    with meter.stage("small"):
        block = torch.ones(4 * 1024 * 1024, dtype=torch.uint8)
        del block
    with meter.stage("big"):  # entered again: keeps the higher peak, adds the time
        pass
    out = meter.summary()  # no process group: a world of one
    big, small = out["stages"]["big"], out["stages"]["small"]
    assert list(out["stages"]) == ["big", "small"]
    assert len(big["peak_rss_mib"]) == 1
    assert big["peak_rss_mib"][0] - small["peak_rss_mib"][0] > 40  # the 64 MiB block shows in "big" only
    assert small["peak_rss_mib"][0] >= small["end_rss_mib"][0] > 0
    assert big["wall_s"][0] >= 0 and "peak resident set" in out["note"]
