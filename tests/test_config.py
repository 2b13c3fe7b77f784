"""The configuration schema: presets, overrides, type and range checks, DeepSpeed JSON resolution."""

from __future__ import annotations

import dataclasses
import json

import pytest

from layerwise_dist.config import PRESET_DIR, ConfigError, RunConfig, help_text, load_config
from layerwise_dist.trainer import resolve_ds_config

REPO_DS = PRESET_DIR.parents[1] / "ds_configs"


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
def test_every_preset_parses(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, RunConfig)


def test_overrides_are_typed_and_applied():
    cfg = load_config(
        "tiny", ["train.max_steps=7", "student.layers=[0,3]", "distill.temperature=3", "tracking.enabled=true"]
    )
    assert cfg.train.max_steps == 7
    assert cfg.student.layers == [0, 3]
    assert cfg.distill.temperature == 3.0 and isinstance(cfg.distill.temperature, float)
    assert cfg.tracking.enabled is True


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_steps=abc", "train.max_steps expects an integer"),
        ("train.max_steps=0", "train.max_steps must be > 0"),
        ("train.nope=1", "unknown config key 'train.nope'"),
        ("nosection.x=1", "unknown config section"),
        ("student.selection=best", "student.selection must be one of"),
        ("tracking.enabled=maybe", "tracking.enabled expects true or false"),
        ("data.num_candidates=40", "data.num_candidates must be in [2, 26]"),
        ("eval.ks=[0]", "eval.ks must be a non-empty list of positive integers"),
        ("max_steps", "is not key=value"),
    ],
)
def test_bad_overrides_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_yaml_file_with_wrong_type(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: fast\n")
    with pytest.raises(ConfigError, match="train.lr expects a number"):
        load_config(str(path))


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="presets: .*default.*tiny"):
        load_config("nonexistent")


def test_help_text_names_every_field():
    text = help_text()
    for section in dataclasses.fields(RunConfig):
        value = getattr(RunConfig(), section.name)
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                assert f"{section.name}.{f.name}=" in text


def test_saved_config_round_trips(tmp_path):
    cfg = load_config("default", ["train.max_steps=3"])
    cfg.save(tmp_path / "config.yaml")
    again = load_config(str(tmp_path / "config.yaml"))
    assert again == cfg


def test_ds_config_batch_sizes_come_from_the_schema():
    cfg = load_config("tiny", ["train.micro_batch_size=3", "train.grad_accum=2", "train.grad_clip=0.5"])
    ds = resolve_ds_config(REPO_DS / "zero3.json", cfg)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 6  # one process here
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False  # CPU
    assert ds["zero_optimization"]["stage"] == 3


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json", "zero3_offload.json"])
def test_shipped_ds_configs_resolve(name):
    ds = resolve_ds_config(REPO_DS / name, load_config("tiny"))
    assert "auto" not in json.dumps(ds)


def test_ds_config_conflicts_and_bad_json(tmp_path):
    cfg = load_config("tiny")
    conflict = tmp_path / "conflict.json"
    conflict.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="sets train_micro_batch_size_per_gpu=16 but the run config gives 2"):
        resolve_ds_config(conflict, cfg)
    broken = tmp_path / "broken.json"
    broken.write_text('{"zero_optimization": {"stage": 3},}')
    with pytest.raises(ConfigError, match="not valid JSON"):
        resolve_ds_config(broken, cfg)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_ds_config(tmp_path / "missing.json", cfg)
    bad_stage = tmp_path / "stage.json"
    bad_stage.write_text(json.dumps({"zero_optimization": {"stage": 5}}))
    with pytest.raises(ConfigError, match="stage must be 0-3"):
        resolve_ds_config(bad_stage, cfg)
