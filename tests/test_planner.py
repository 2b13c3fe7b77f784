"""The memory planner: shapes from configs on the meta device, and every component against measured bytes."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from conftest import REPO
from layerwise_dist import planner
from layerwise_dist.models.tiny import tiny_llama, tiny_llama_config

TOL = 0.15


def _bench():
    spec = importlib.util.spec_from_file_location("bench_planner", REPO / "benchmarks" / "bench_planner.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _within(planned: int, measured: int, tol: float = TOL) -> bool:
    return abs(planned - measured) <= tol * measured


def test_parse_bytes():
    assert planner.parse_bytes("80GB") == 80 * 10**9
    assert planner.parse_bytes("141GiB") == 141 * 2**30
    assert planner.parse_bytes("1TB") == 10**12
    assert planner.parse_bytes("512mb") == 512 * 10**6
    assert planner.parse_bytes(1234) == 1234
    with pytest.raises(planner.PlanError, match="memory size"):
        planner.parse_bytes("eighty gigs")


@pytest.mark.parametrize("tied", [False, True])
def test_count_model_matches_the_built_model(tied):
    config = tiny_llama_config(vocab_size=300, num_layers=3, hidden=64)
    config.tie_word_embeddings = tied
    shape = planner.count_model(config)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(config)
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    assert shape.tied is tied and shape.num_layers == 3 and shape.kv_width == 32
    assert shape.embed_params == 300 * 64 and shape.head_params == (0 if tied else 300 * 64)
    student = shape.student(2)
    assert student.total_params == shape.total_params - shape.layers[0].params


def test_count_model_other_architecture():
    """Any HF causal LM: a Qwen2 config (attention biases) counts what the built model holds."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    shape = planner.count_model(config)
    assert shape.total_params == sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    assert shape.layers[0].other_params > 2 * 64  # the q/k/v biases are not linear weights


def test_llama3_8b_preset():
    shape = planner.count_model("llama3-8b")
    assert shape.total_params == 8_030_261_248  # Meta-Llama-3-8B
    assert shape.student(8).total_params == 8 * shape.layers[0].params + 2 * 128256 * 4096 + 4096


@pytest.mark.parametrize("quantization", ["nf4", "int8", "none"])
def test_teacher_weight_bytes_equal_bitsandbytes(quantization, tmp_path):
    """The loaded teacher (bitsandbytes on CPU, fp32 compute dtype) holds what the planner predicts."""
    from layerwise_dist.config import TeacherConfig
    from layerwise_dist.models.teacher import load_teacher

    bench = _bench()
    folder = tmp_path / "tiny"
    tiny_llama(vocab_size=256, num_layers=2, hidden=128).save_pretrained(folder)
    model = load_teacher(TeacherConfig(model=str(folder), quantization=quantization, placement="replicate"))
    measured = bench._param_bytes(model) + bench._quant_state_bytes(model)
    shape = planner.count_model(folder)
    planned = planner.weight_bytes(shape, quantization, "fp32")
    assert _within(planned.total, measured), (planned, measured)
    if quantization == "nf4":
        import bitsandbytes as bnb

        linears = [m.weight for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert planned.quantized_linears == sum(w.numel() * w.element_size() for w in linears)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_bytes_match_saved_tensors(checkpointing):
    """Bytes autograd saves in a real training forward (fp32, SDPA) against the Llama-block formula."""
    bench = _bench()
    config = tiny_llama_config(vocab_size=256, num_layers=3, hidden=128)
    config.intermediate_size = 352
    from transformers import LlamaForCausalLM

    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)
    ids = torch.randint(3, 256, (2, 96), generator=torch.Generator().manual_seed(0))
    plain = bench.saved_activation_bytes(model, ids, checkpointing=False)
    measured = bench.saved_activation_bytes(model, ids, checkpointing=True) if checkpointing else plain
    layers = measured["layers"] + (plain["max_layer_saved"] if checkpointing else 0)
    planned = planner.activation_bytes(planner.count_model(config), 2, 96, "fp32", checkpointing)
    assert _within(planned.layers, layers), (planned, layers)
    assert _within(planned.logits, measured["logits"]), (planned, measured)


def test_check_fits_stops_with_a_clear_message():
    est = planner.check_fits("llama3-8b", 8, ranks=8, batch=2, seq=768, gpu_mem="80GB", host_mem="1TB")
    assert est.device < 0.9 * 80e9
    with pytest.raises(planner.PlanError, match=r"cannot fit: 1 rank\(s\).*needs .* per GPU.*these fit: .*offload"):
        planner.check_fits("llama3-8b", 8, ranks=1, batch=2, seq=768, gpu_mem="24GB", teacher_placement="replicate")
    with pytest.raises(planner.PlanError, match="no placement fits"):
        planner.check_fits("llama3-8b", 8, ranks=1, batch=2, seq=768, gpu_mem="4GB")


def test_offload_moves_states_to_the_host():
    shape = planner.count_model("llama3-8b").student(8)
    z3 = planner.student_states(shape, 8, "zero3")
    off = planner.student_states(shape, 8, "zero3+offload_opt")
    both = planner.student_states(shape, 8, "zero3+offload_all")
    part = -(-shape.total_params // 8)
    assert off.optimizer == off.grads == 0 and off.host == z3.optimizer + 4 * part  # + the fp32 gradient partition
    assert both.params == 0 and both.host == off.host + z3.params


def test_unpartitioned_gradients_and_states_under_zero0_and_zero1():
    shape = planner.count_model("llama3-8b").student(8)
    n, part = shape.total_params, -(-shape.total_params // 8)
    z2 = planner.student_states(shape, 8, "zero2", "fp32")
    z1 = planner.student_states(shape, 8, "zero1", "fp32")
    z0 = planner.student_states(shape, 8, "zero0", "fp32")
    assert z0.params == z1.params == z2.params == 4 * n
    assert z0.grads == z1.grads == 4 * n and z2.grads == 4 * part  # every rank holds whole gradients
    assert z0.optimizer == 8 * n and z1.optimizer == z2.optimizer == 12 * part  # fp32: moments on the params
    assert z0.device > z1.device > z2.device
    bf = planner.student_states(shape, 8, "zero0", "bf16")
    assert (bf.params, bf.grads, bf.optimizer) == (2 * n, 4 * n, 12 * n)  # fp32 grads and master copy
    with pytest.raises(planner.PlanError, match="student placement must be one of"):
        planner.student_states(shape, 8, "zero0+offload_opt")


@pytest.mark.parametrize(
    ("zero", "placement"),
    [
        ({"stage": 0}, "zero0"),
        ({"stage": 1}, "zero1"),
        ({"stage": 1, "offload_optimizer": {"device": "cpu"}}, "zero2+offload_opt"),
        ({"stage": 2}, "zero2"),
        ({"stage": 3, "offload_param": {"device": "cpu"}}, "zero3+offload_all"),
    ],
)
def test_the_preflight_plans_the_stage_the_json_names(tmp_path, monkeypatch, zero, placement):
    from layerwise_dist import planner as planner_module
    from layerwise_dist.config import load_config
    from layerwise_dist.preflight import check_memory

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": zero}))
    seen = {}
    monkeypatch.setattr(planner_module, "check_fits", lambda *a, **kw: seen.update(kw) or "planned")
    assert check_memory(load_config("tiny", [f"ds_config={ds}"]), 2) == "planned"
    assert seen["student_placement"] == placement


def test_cli_plan_prints_the_table(capsys, tmp_path):
    from layerwise_dist.cli import main

    out_json = tmp_path / "plan.json"
    rc = main(["plan", "--preset", "llama3-8b", "--gpu-mem", "80GB", "--host-mem", "1TB", "--json", str(out_json)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "8.03 B params" in text and "| 16 |" in text and " ok" in text
    data = json.loads(out_json.read_text())
    assert {e["ranks"] for e in data["estimates"]} == {1, 2, 4, 8, 16}
    assert main(["plan", "--config-json", str(tmp_path / "missing.json")]) == 2
    assert "no model config" in capsys.readouterr().err


@pytest.mark.distributed
@pytest.mark.integration
def test_planner_within_15_percent_of_two_zero3_ranks(tmp_path):
    """2 ranks under the real deepspeed launcher: teacher NF4 / full shards, student ZeRO-3 and ZeRO-2
    params, grads and optimizer states, activations: each within 15% of the plan."""
    bench = _bench()
    rows = bench.compare("tiny", 2, 2, batch=2, seq=64, out_dir=tmp_path)
    components = {r["component"] for r in rows}
    assert {"teacher_nf4.total", "student_zero3.optimizer", "student_zero2.grads", "activations.layers"} <= components
    off = [r for r in rows if abs(r["planned_over_measured"] - 1) > TOL]
    assert not off, off
