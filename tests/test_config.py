"""The configuration schema: presets, overrides, type and range checks, DeepSpeed JSON resolution."""

from __future__ import annotations

import dataclasses
import json
import pickle
import typing

import pytest
import yaml

from layerwise_dist import config as config_module
from layerwise_dist.config import (
    PRESET_DIR,
    ConfigError,
    DataConfig,
    FisherConfig,
    RunConfig,
    config_from_yaml,
    from_dict,
    help_text,
    load_config,
)

try:  # the DeepSpeed JSON moves from trainer.py to its own module (issue 9); either place is tested
    from layerwise_dist.ds_config import resolve_ds_config
except ImportError:
    from layerwise_dist.trainer import resolve_ds_config

REPO_DS = PRESET_DIR.parents[1] / "ds_configs"


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
def test_every_preset_parses(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, RunConfig)


def _sections():
    """(section name, section dataclass) for every section of RunConfig."""
    hints = typing.get_type_hints(RunConfig)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(hints[f.name])]


def _literal_fields():
    out = []
    for name, cls in _sections():
        for field_name, annotation in typing.get_type_hints(cls).items():
            if typing.get_origin(annotation) is typing.Literal:
                out.append((name, cls, field_name, typing.get_args(annotation)))
    return out


@pytest.mark.parametrize("path", sorted(PRESET_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_file_sets_what_it_says(path):
    """Each preset file, read by path, gives a RunConfig whose values are the file's, typed as the schema says."""
    raw = yaml.safe_load(path.read_text())
    cfg = config_from_yaml(path)
    assert cfg == load_config(str(path))
    resolved = cfg.to_dict()
    hints = typing.get_type_hints(RunConfig)
    for key, value in raw.items():
        if isinstance(value, dict):
            section_hints = typing.get_type_hints(hints[key])
            for name, v in value.items():
                got = resolved[key][name]
                assert got == (float(v) if section_hints[name] is float else v), f"{key}.{name}"
                if section_hints[name] in (int, float, bool, str):
                    assert type(got) is section_hints[name], f"{key}.{name}"
        else:
            assert resolved[key] == value


def test_choice_aliases_are_the_field_types():
    """The Literal aliases other modules import are the annotations of the schema's choice fields."""
    expected = {
        ("data", "source"): "DataSource",
        ("data", "negative_sampling"): "NegativeSampling",
        ("data", "formulation"): "Formulation",
        ("data", "pointwise_score"): "PointwiseScore",
        ("teacher", "quantization"): "Quantization",
        ("teacher", "placement"): "Placement",
        ("teacher", "attn_implementation"): "AttnImplementation",
        ("student", "selection"): "Selection",
        ("fisher", "form"): "FisherForm",
        ("fisher", "labels"): "FisherLabels",
        ("fisher", "linear_method"): "LinearMethod",
        ("distill", "kd_loss"): "KDLoss",
        ("distill", "align_loss"): "AlignLoss",
        ("distill", "mask"): "KDMask",
        ("train", "precision"): "Precision",
        ("eval", "split"): "EvalSplit",
        ("eval", "student_quantization"): "ServeQuantization",
        ("eval", "candidates_format"): "CandidatesFormat",
    }
    found = {(section, name) for section, _, name, _ in _literal_fields()}
    assert found == set(expected)
    sections = dict(_sections())
    for (section, name), alias in expected.items():
        assert typing.get_type_hints(sections[section])[name] == getattr(config_module, alias)
    assert typing.get_args(config_module.Quantization) == ("nf4", "int8", "none")


@pytest.mark.parametrize(
    "section, name, choices", [(s, n, c) for s, _, n, c in _literal_fields()], ids=lambda x: str(x)
)
def test_literal_fields_reject_other_values(section, name, choices):
    for choice in choices:  # every listed value is accepted ...
        needs = {("data", "source"): ["data.reviews=reviews.jsonl"], ("student", "selection"): ["student.layers=[0]"]}
        extra = needs.get((section, name), [])
        assert getattr(getattr(load_config("tiny", [f"{section}.{name}={choice}", *extra]), section), name) == choice
    with pytest.raises(ConfigError) as err:  # ... and nothing else, from an override ...
        load_config("tiny", [f"{section}.{name}=bogus"])
    assert str(err.value) == f"{section}.{name} must be one of {', '.join(choices)}; got 'bogus'"
    with pytest.raises(ConfigError, match=f"^{section}.{name} must be one of .*; got 7$"):  # ... a YAML number ...
        from_dict({section: {name: 7}})
    cls = dict(_sections())[section]
    with pytest.raises(ConfigError, match=f"^{section}.{name} must be one of"):  # ... or code
        cls(**{name: "bogus"})


def test_teacher_quantization_message():
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["teacher.quantization=nf3"])
    assert str(err.value) == "teacher.quantization must be one of nf4, int8, none; got 'nf3'"


def test_float_overrides_in_exponent_notation():
    cfg = load_config("tiny", ["train.lr=3e-3", "train.weight_decay=1e-2", "distill.jsd_beta=1"])
    assert cfg.train.lr == 3e-3 and isinstance(cfg.train.lr, float)
    assert cfg.train.weight_decay == 0.01 and isinstance(cfg.train.weight_decay, float)
    assert cfg.distill.jsd_beta == 1.0 and isinstance(cfg.distill.jsd_beta, float)


def test_float_in_exponent_notation_in_a_yaml_file(tmp_path):
    path = tmp_path / "lr.yaml"
    path.write_text("train:\n  lr: 3e-3\n")  # YAML 1.1 (PyYAML) reads this as a string
    cfg = load_config(str(path))
    assert cfg.train.lr == 3e-3 and isinstance(cfg.train.lr, float)


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("train:\n  max_stepz: 3\n", "unknown config key 'train.max_stepz'"),
        ("teacher:\n  model: tiny\n  quantisation: nf4\n", "unknown config key 'teacher.quantisation'"),
        ("trainer:\n  lr: 0.1\n", "unknown config section 'trainer'"),
        ("train: 5\n", "train is a section: it must be a mapping of its keys; got 5"),
        ("- 1\n- 2\n", "the top level must be a mapping"),
        ("train:\n  lr: [1e-3\n", "not valid YAML"),
        ("eval:\n  ks: [1, x]\n", "eval.ks[1] expects an integer; got 'x'"),
        ("eval:\n  ks: 5\n", "eval.ks expects a list of integers"),
        ("train:\n  resume: maybe\n", "train.resume expects true or false; got 'maybe'"),
        ("output_dir: [a]\n", "output_dir expects a string"),
    ],
)
def test_bad_yaml_files_are_one_line_errors(tmp_path, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert message in str(err.value)
    assert str(err.value).startswith(str(path))
    assert "\n" not in str(err.value)


def test_unknown_nested_key_in_an_override_names_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["train.max_stepz=3"])
    message = str(err.value)
    assert message.startswith("unknown config key 'train.max_stepz'")
    assert "max_steps" in message and "micro_batch_size" in message
    with pytest.raises(ConfigError, match="train is a section"):
        load_config("tiny", ["train=5"])
    with pytest.raises(ConfigError, match=r"^train.lr expects a number"):
        load_config("tiny", ["train.lr.peak=1"])


def test_empty_override_value_is_an_empty_string():
    cfg = load_config("tiny", ["tracking.run_name=named", "tracking.run_name="])
    assert cfg.tracking.run_name == ""
    with pytest.raises(ConfigError, match="output_dir must not be empty"):
        load_config("tiny", ["output_dir="])


def test_later_override_wins_and_lists_are_replaced():
    cfg = load_config("tiny", ["eval.ks=[1,2,3]", "eval.ks=[5]", "train.max_steps=2", "train.max_steps=3"])
    assert cfg.eval.ks == [5] and cfg.train.max_steps == 3


def test_direct_construction_still_checks():
    assert DataConfig(source="amazon2023", reviews="-", kcore=2).kcore == 2
    with pytest.raises(ConfigError, match="data.num_candidates must be in"):
        DataConfig(num_candidates=1)
    with pytest.raises(ConfigError, match="fisher.linear_method must be one of auto, gram, explicit; got 'svd'"):
        FisherConfig(linear_method="svd")


def test_from_dict_fills_defaults_and_checks():
    cfg = from_dict({"train": {"max_steps": 9}, "student": {"layers": [1, 2]}})
    assert cfg.train.max_steps == 9 and cfg.student.layers == [1, 2]
    assert cfg.data == DataConfig() and cfg.train.lr == RunConfig().train.lr
    with pytest.raises(ConfigError, match="student.layers must be a list of non-negative integers"):
        from_dict({"student": {"layers": [-1]}})
    with pytest.raises(ConfigError, match="unknown config key 'data.nope'"):
        from_dict({"data": {"nope": 1}})


def test_run_config_pickles():
    cfg = load_config("default", ["student.layers=[0,4]", "train.lr=3e-3", "eval.ks=[1,3]"])
    again = pickle.loads(pickle.dumps(cfg))
    assert again == cfg and again is not cfg
    assert type(again.eval.ks) is list and again.eval.ks == [1, 3]
    assert again.to_dict() == cfg.to_dict()


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


def test_help_text_gives_every_default_and_help_line():
    lines = help_text().splitlines()
    defaults = RunConfig()
    for name, cls in _sections():
        section = getattr(defaults, name)
        for f in dataclasses.fields(cls):
            assert f.metadata["help"], f"{name}.{f.name} has no help"
            line = f"  {name}.{f.name}={getattr(section, f.name)!r}  {f.metadata['help']}"
            assert line in lines
    for f in dataclasses.fields(RunConfig):
        if not dataclasses.is_dataclass(typing.get_type_hints(RunConfig)[f.name]):
            assert f"{f.name}={getattr(defaults, f.name)!r}  {f.metadata['help']}" in lines


def test_saved_config_round_trips(tmp_path):
    cfg = load_config("default", ["train.max_steps=3"])
    cfg.save(tmp_path / "config.yaml")
    again = load_config(str(tmp_path / "config.yaml"))
    assert again == cfg
    assert config_from_yaml(tmp_path / "config.yaml") == cfg
    with pytest.raises(ConfigError, match="does not exist"):
        config_from_yaml(tmp_path / "missing.yaml")


def test_ds_config_batch_sizes_come_from_the_schema():
    cfg = load_config("tiny", ["train.micro_batch_size=3", "train.grad_accum=2", "train.grad_clip=0.5"])
    ds = resolve_ds_config(REPO_DS / "zero3.json", cfg)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 6  # one process here
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False  # CPU
    assert ds["zero_optimization"]["stage"] == 3


def test_a_frozen_models_engine_partitions_its_parameters_whatever_the_training_stage():
    cfg = load_config("tiny")
    assert resolve_ds_config(REPO_DS / "zero2.json", cfg)["zero_optimization"]["stage"] == 2
    inference = resolve_ds_config(REPO_DS / "zero2.json", cfg, "inference")
    assert inference["zero_optimization"]["stage"] == 3
    assert inference["zero_optimization"]["reduce_bucket_size"] == 5e7  # the rest of the JSON is kept
    assert "optimizer" not in inference
    # stage 0 (plain data parallel, the experiment's students) partitions nothing: a frozen teacher is stage 3 too
    assert resolve_ds_config(REPO_DS / "zero0.json", cfg)["zero_optimization"] == {"stage": 0}
    assert resolve_ds_config(REPO_DS / "zero0.json", cfg, "inference")["zero_optimization"]["stage"] == 3


@pytest.mark.parametrize("name", ["zero0.json", "zero2.json", "zero3.json", "zero3_offload.json"])
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


def test_gpu_8b_preset_resolves_and_validates(capsys):
    """NF4 ZeRO-3 teacher, bf16 student, flash_attention_2 with the listwise formulation (pointwise needs sdpa)."""
    from layerwise_dist.cli import main

    cfg = load_config("gpu-8b")
    assert (cfg.teacher.quantization, cfg.teacher.placement) == ("nf4", "zero3")
    assert cfg.train.precision == "bf16" and cfg.eval.student_quantization == "none"
    assert cfg.data.formulation == "listwise" and cfg.model_attn_implementation() == "flash_attention_2"
    import torch

    if not torch.cuda.is_available():  # a GPU preset: bf16 is refused on CPU in one line
        with pytest.raises(ConfigError, match="bf16 needs CUDA"):
            resolve_ds_config(cfg.ds_config, cfg, world=8)
    fp32 = load_config("gpu-8b", [] if torch.cuda.is_available() else ["train.precision=fp32"])
    ds = resolve_ds_config(fp32.ds_config, fp32, world=8)
    assert ds["zero_optimization"]["stage"] == 3 and ds["train_batch_size"] == 2 * 4 * 8
    with pytest.raises(ConfigError, match="flash_attention_2"):
        load_config("gpu-8b", ["data.formulation=pointwise"])
    pointwise = load_config("gpu-8b", ["data.formulation=pointwise", "teacher.attn_implementation=sdpa"])
    assert pointwise.model_attn_implementation() == "sdpa"
    assert main(["config", "--preset", "gpu-8b"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == cfg.to_dict()


@pytest.mark.parametrize("command", ["adapt", "fisher", "distill", "evaluate", "pipeline", "config", "recommend"])
def test_every_help_lists_every_key_with_its_default(command, capsys):
    from layerwise_dist.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out.splitlines()
    missing = [line for line in help_text().splitlines() if line not in text]
    assert not missing, missing[:3]


def test_resume_changes_name_what_a_finished_stage_depends_on_and_skip_the_safe_keys():
    from layerwise_dist.config import resume_changes

    before = load_config("tiny").to_dict()
    now = load_config(
        "tiny",
        [
            "train.lr=3e-4",
            "train.max_steps=7",
            "train.resume=true",  # safe: how the run continues
            "train.stop_at_step=2",
            "tracking.run_name=again",
            "ablation.budget_reference=results/other",
            "data.reviews=/elsewhere/reviews.jsonl",  # paths move between machines
        ],
    ).to_dict()
    changes = resume_changes(before, now)
    assert [c[0] for c in changes] == ["train.max_steps", "train.lr"]
    assert changes[1][1:] == (before["train"]["lr"], 3e-4)
    # Numbers read back from YAML compare by value; a key an older version did not write is no change.
    assert (
        resume_changes({"train": {"lr": 1, "max_steps": 40}}, {"train": {"lr": 1.0, "max_steps": 40, "new": 3}}) == []
    )
    assert resume_changes({"train": {"lr": 1}}, {"train": {"lr": True}}) == [("train.lr", 1, True)]
    # The experiment's second sitting was refused over this: config.yaml keeps attn "auto", the session resolves
    # it (pointwise: sdpa). The same setting; another kernel is still a change.
    saved = {"data": {"formulation": "pointwise"}, "teacher": {"attn_implementation": "auto"}}
    resolved = {"data": {"formulation": "pointwise"}, "teacher": {"attn_implementation": "sdpa"}}
    assert resume_changes(saved, resolved) == [] and resume_changes(resolved, saved) == []
    eager = {"data": {"formulation": "pointwise"}, "teacher": {"attn_implementation": "eager"}}
    assert resume_changes(saved, eager) == [("teacher.attn_implementation", "sdpa", "eager")]
