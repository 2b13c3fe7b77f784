"""Teacher adaptation (LoRA / QLoRA): merge equals base + adapters, the real 2-rank ZeRO-3 launcher, exact resume."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import run_cli, run_deepspeed
from layerwise_dist.adapt import (
    adapt_run_config,
    attach_lora,
    causal_lm_loss,
    check_adapt_config,
    export_adapted,
    full_precision,
    load_base,
    merge_saved_adapter,
    merged_model,
    merged_state_dict,
)
from layerwise_dist.config import ConfigError, load_config
from layerwise_dist.models.teacher import resolve_model_dir

TARGETS = "adapt.target_modules=[q_proj,v_proj,up_proj,down_proj]"


def _cfg(*overrides: str):
    return load_config("tiny", ["tracking.enabled=false", "teacher.placement=replicate", TARGETS, *overrides])


def _ids() -> torch.Tensor:
    return torch.randint(3, 1000, (2, 11), generator=torch.Generator().manual_seed(1))


def _adapted(cfg):
    """The tiny base with LoRA adapters whose B is random (B = 0 at init would make the merge trivial)."""
    model = attach_lora(load_base(cfg), cfg.adapt)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


@pytest.mark.parametrize(("quantization", "tol"), [("none", 1e-5), ("nf4", 1e-4)])
def test_merged_logits_equal_base_plus_adapter(quantization, tol, tmp_path):
    """Merged fp32 model == peft forward (base + B A scale); NF4: merged = dequantized base + delta."""
    cfg = _cfg(f"teacher.quantization={quantization}", "adapt.lora_dropout=0.0")
    # Train mode (dropout 0, so deterministic) as in the adaptation loop: in eval mode without grad,
    # bitsandbytes repacks NF4 weights for its CPU bf16 kernel (see test_merge_after_cpu_repacking).
    model = _adapted(cfg).train()
    if quantization == "nf4":
        assert type(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    ids = _ids()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    assert (expected - plain).abs().max() > 1e-2  # the adapters change the model

    state = merged_state_dict(model)
    merged = merged_model(resolve_model_dir(cfg.teacher), state)
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    # Stated tolerance: fp32 on both sides (bitsandbytes dequantizes the NF4 weight, then an fp32 matmul);
    # only the order of the additions differs (W x + s B A x vs (W + s B A) x). Measured: about 6e-7.
    assert (got - expected).abs().max().item() < tol, (got - expected).abs().max().item()

    # Merged weight minus the adapters' delta is exactly the (dequantized) base weight.
    lora = model.get_base_model().model.layers[1].mlp.down_proj
    base_w = full_precision(lora.base_layer, "weight", lora.base_layer.weight)
    delta = lora.get_delta_weight("default").float()
    torch.testing.assert_close(state["model.layers.1.mlp.down_proj.weight"] - delta, base_w, rtol=0, atol=1e-6)
    # A module without adapters (k_proj) is the dequantized base weight, bit for bit.
    k = model.get_base_model().model.layers[0].self_attn.k_proj
    assert torch.equal(state["model.layers.0.self_attn.k_proj.weight"], full_precision(k, "weight", k.weight))


def test_merge_after_cpu_repacking():
    """An NF4 base that served an eval forward (repacked by bitsandbytes for its CPU kernel) still merges."""
    cfg = _cfg("teacher.quantization=nf4", "adapt.lora_dropout=0.0")
    reference = merged_state_dict(_adapted(cfg).train())
    model = _adapted(cfg).eval()
    with torch.no_grad():
        model(input_ids=_ids())
    state = merged_state_dict(model)
    key = "model.layers.2.self_attn.q_proj.weight"
    # The repacked block scales are bf16 (relative error <= 2^-8): the merged weights agree to that.
    scale = reference[key].abs().max()
    assert (state[key] - reference[key]).abs().max() <= scale * 2**-7


def test_export_folders_load(tmp_path):
    """export_adapted: the PEFT folder reloads onto a fresh base, the merged folder with AutoModelForCausalLM."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = _cfg("teacher.quantization=none", "adapt.lora_dropout=0.0")
    model = _adapted(cfg)
    base_dir = resolve_model_dir(cfg.teacher)
    adapter_dir, merged_dir = export_adapted(model, base_dir, tmp_path / "adapter", tmp_path / "merged", info={"x": 1})
    ids = _ids()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_dir)
        assert merged.config.layerwise_dist_adapt == {"x": 1}
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
        reloaded = PeftModel.from_pretrained(load_base(cfg), adapter_dir).eval()
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=1e-6)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    assert not (tmp_path / "merged.tmp").exists() and not (tmp_path / "adapter.tmp").exists()


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_a_saved_adapter_merges_again_into_the_same_weights(quantization, tmp_path):
    """merge_saved_adapter (a fresh checkout: adapter committed, merged folder not): the merged weights that
    export_adapted wrote, bit for bit, from the adapter folder and the base alone."""
    from safetensors.torch import load_file

    cfg = _cfg(f"teacher.quantization={quantization}", "adapt.quantized_base=true", "adapt.lora_dropout=0.0")
    model = _adapted(cfg).train()  # train mode, as the adaptation exports it (no NF4 CPU repacking)
    adapter_dir, merged_dir = export_adapted(
        model, resolve_model_dir(cfg.teacher), tmp_path / "adapter", tmp_path / "merged", info={"steps": 3}
    )
    again = merge_saved_adapter(cfg, adapter_dir, tmp_path / "again", info={"steps": 3})
    first, second = load_file(merged_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert json.loads((again / "config.json").read_text())["layerwise_dist_adapt"] == {"steps": 3}
    plain = load_base(dataclasses.replace(cfg, adapt=dataclasses.replace(cfg.adapt, quantized_base=False)))
    key = "model.layers.1.mlp.down_proj.weight"  # the adapters are in: not the base's weight
    assert (second[key] - plain.state_dict()[key].float()).abs().max() > 1e-3
    with pytest.raises(FileNotFoundError, match="holds no adapter"):
        merge_saved_adapter(cfg, tmp_path / "nowhere", tmp_path / "x")


def test_only_adapters_train_and_loss_is_masked_ce():
    cfg = _cfg("teacher.quantization=nf4")
    model = attach_lora(load_base(cfg), cfg.adapt)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    # 4 layers x 4 target modules x (A, B)
    assert len(trainable) == 4 * 4 * 2

    logits = torch.randn(2, 5, 7)
    labels = torch.full((2, 5), -100)
    labels[0, 3], labels[1, 4], labels[1, 2] = 1, 2, 6
    want = torch.stack(
        [
            -torch.log_softmax(logits[0, 2], -1)[1],
            -torch.log_softmax(logits[1, 3], -1)[2],
            -torch.log_softmax(logits[1, 1], -1)[6],
        ]
    ).mean()
    torch.testing.assert_close(causal_lm_loss(logits, labels), want)


def test_supervised_lm_loss_equals_the_full_path_loss_and_gradients():
    """The LM head at the supervised positions only: same loss and adapter gradients as full logits (1e-6)."""
    from layerwise_dist.adapt import supervised_lm_loss

    cfg = _cfg("teacher.quantization=none", "adapt.lora_dropout=0.0")
    model = _adapted(cfg).train()
    ids = _ids()
    labels = torch.full_like(ids, -100)
    labels[0, 4:7] = ids[0, 4:7]  # a title's tokens in one row, one answer token in the other
    labels[1, 10] = ids[1, 10]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    grads = []
    for fn in (
        lambda: supervised_lm_loss(model, batch),
        lambda: causal_lm_loss(model(input_ids=ids, attention_mask=batch["attention_mask"]).logits, labels),
    ):
        model.zero_grad(set_to_none=True)
        loss = fn()
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (fast, g_fast), (full, g_full) = grads
    torch.testing.assert_close(fast, full, rtol=1e-6, atol=1e-6)
    assert fast.item() > 0
    for a, b in zip(g_fast, g_full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in g_fast)
    empty = {**batch, "labels": torch.full_like(ids, -100)}  # nothing supervised: zero, still differentiable
    zero = supervised_lm_loss(model, empty)
    assert zero.item() == 0.0 and zero.requires_grad


def test_config_errors():
    with pytest.raises(ConfigError, match="is a pointwise option"):
        check_adapt_config(_cfg("adapt.list_loss_weight=0.5", "data.formulation=listwise"))
    check_adapt_config(_cfg("adapt.list_loss_weight=0.5", "data.formulation=pointwise"))
    with pytest.raises(ConfigError, match="teacher.quantization=nf4"):
        check_adapt_config(_cfg("teacher.quantization=int8"))
    check_adapt_config(_cfg("teacher.quantization=int8", "adapt.quantized_base=false"))
    with pytest.raises(ConfigError, match="name no linear module"):
        attach_lora(load_base(_cfg("teacher.quantization=none")), _cfg("adapt.target_modules=[qkv]").adapt)
    a = adapt_run_config(_cfg("adapt.micro_batch_size=3", "adapt.grad_accum=2", "adapt.lr=0.01"))
    assert (a.train.micro_batch_size, a.train.grad_accum, a.train.lr) == (3, 2, 0.01)


def test_non_finite_loss_stops_with_the_step(tmp_path):
    """A non-finite loss raises TrainingDivergedError (one line, exit 2 from a launcher) naming the step."""
    from types import SimpleNamespace

    from layerwise_dist.recipes.adapt import AdaptRecipe
    from layerwise_dist.trainer import TrainingDivergedError

    recipe = AdaptRecipe(SimpleNamespace(cfg=_cfg(), out=tmp_path))
    recipe._check_finite(0, torch.tensor(2.5))
    with pytest.raises(TrainingDivergedError, match="adapt: non-finite loss at step 4 .*lower adapt.lr"):
        recipe._check_finite(3, torch.tensor(float("nan")))


# ---------------------------------------------------------------- the real launcher, 2 ranks


def _ok(out):
    assert out.returncode == 0, f"exit {out.returncode}\nSTDOUT:\n{out.stdout[-4000:]}\nSTDERR:\n{out.stderr[-4000:]}"


COMMON = [
    "--ds_config",
    "ds_configs/zero3.json",
    "--preset",
    "tiny",
    "teacher.quantization=nf4",
    TARGETS,
    "adapt.max_steps=4",
    "adapt.micro_batch_size=2",
    "adapt.lr=5e-3",
    "adapt.warmup_steps=1",
    "adapt.lora_dropout=0.0",
]


def _adapter_tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    """One uninterrupted 4-step QLoRA run through deepspeed launchers/adapt.py (2 ranks), shared by two tests."""
    run = tmp_path_factory.mktemp("adapt") / "run"
    _ok(run_deepspeed("launchers/adapt.py", [*COMMON, f"output_dir={run}"]))
    return run


@pytest.mark.distributed
@pytest.mark.integration
def test_adapt_launcher_qlora_zero3(qlora_run):
    """deepspeed launchers/adapt.py: NF4 base partitioned by ZeRO-3, adapters train, both folders load."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = qlora_run
    results = json.loads((run / "results.json").read_text())
    adapt = results["adapt"]
    placement = adapt["placement"]
    assert placement["quantized_modules"] == ["Linear4bit"]
    assert placement["zero3_partitioned"] is True and placement["world_size"] == 2
    assert placement["local_param_fraction"] == pytest.approx(0.5, abs=0.01)  # each rank holds half of the base
    assert adapt["steps"] == 4 and adapt["complete"] and adapt["base_quantization"] == "nf4"
    # r=16 on 4 layers: q (64->64), v (64->32, 2 kv heads), up (64->128), down (128->64); A is r x in, B out x r
    assert adapt["trainable_params"] == 4 * 16 * ((64 + 64) + (64 + 32) + (64 + 128) + (128 + 64))
    history = json.loads((run / "adapt" / "history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert all(h["loss"] > 0 for h in history) and history[-1]["loss"] < history[0]["loss"]
    assert adapt["loss_first"] == history[0]["loss"] and adapt["loss_last"] == history[-1]["loss"]
    assert adapt["seconds_per_step"] > 0

    cfg = _cfg("teacher.quantization=nf4", "adapt.lora_dropout=0.0")
    merged = AutoModelForCausalLM.from_pretrained(run / "adapt" / "merged")
    assert merged.config.layerwise_dist_adapt["base_quantization"] == "nf4"
    # Train mode (the adapters were saved with dropout 0): no CPU repacking of the NF4 weights.
    peft = PeftModel.from_pretrained(load_base(cfg), run / "adapt" / "adapter", is_trainable=True).train()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, peft(input_ids=ids).logits, rtol=0, atol=1e-4)
    # Only the adapters changed: every merged weight minus its delta is the dequantized NF4 base.
    base = peft.get_base_model()
    merged_sd = merged.state_dict()
    adapted = plain = 0
    for name, module in base.named_modules():
        if hasattr(module, "lora_A"):
            delta = module.get_delta_weight("default").float()
            assert delta.abs().max() > 0, name  # B moved away from 0
            base_w = full_precision(module.base_layer, "weight", module.base_layer.weight)
            torch.testing.assert_close(merged_sd[f"{name}.weight"] - delta, base_w, rtol=0, atol=1e-6)
            adapted += 1
        elif type(module).__name__ == "Linear4bit" and not name.endswith(".base_layer"):
            assert torch.equal(merged_sd[f"{name}.weight"], full_precision(module, "weight", module.weight)), name
            plain += 1
    assert adapted == 16 and plain == 4 * 3  # k, o, gate projections without adapters
    assert torch.equal(merged_sd["model.norm.weight"], base.model.norm.weight)


@pytest.mark.distributed
@pytest.mark.integration
def test_a_fresh_checkout_merges_the_committed_adapter_again(qlora_run, tmp_path):
    """A finished run's folder without adapt/merged (what a fresh checkout of committed results holds): the
    resumed run merges the adapter into its base again instead of training, into the same weights."""
    import shutil

    from safetensors.torch import load_file

    fresh = tmp_path / "run"
    shutil.copytree(qlora_run, fresh, ignore=shutil.ignore_patterns("merged", "checkpoints"))
    assert not (fresh / "adapt" / "merged").exists() and (fresh / "adapt" / "adapter").is_dir()
    out = run_deepspeed("launchers/adapt.py", [*COMMON, f"output_dir={fresh}", "train.resume=true"])
    _ok(out)
    assert "merged folder missing: merging" in out.stdout + out.stderr
    assert "adaptation already finished" in out.stdout + out.stderr  # no step was trained
    a = load_file(str(qlora_run / "adapt" / "merged" / "model.safetensors"))
    b = load_file(str(fresh / "adapt" / "merged" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    info = json.loads((fresh / "adapt" / "merged" / "config.json").read_text())["layerwise_dist_adapt"]
    assert info["steps"] == 4 and info["base_quantization"] == "nf4"


@pytest.mark.slow  # ~2-3 min; resume exactness of the loop is in make test through test_faults
@pytest.mark.distributed
@pytest.mark.integration
def test_adapt_resume_equals_uninterrupted(qlora_run, tmp_path):
    """Stop after 2 of 4 steps (train.stop_at_step), resume: adapters and losses equal the uninterrupted run's."""
    full, split = qlora_run, tmp_path / "split"
    # The interrupted run through the CLI (which starts the same 2 ranks through the deepspeed launcher).
    _ok(run_cli(["adapt", "--nproc", "2", *COMMON, f"output_dir={split}", "train.stop_at_step=2"]))
    first = json.loads((split / "results.json").read_text())["adapt"]
    assert first["steps"] == 2 and not first["complete"] and first["merged"] is None
    assert not (split / "adapt" / "merged").exists()
    _ok(run_deepspeed("launchers/adapt.py", [*COMMON, f"output_dir={split}", "train.resume=true"]))

    a, b = _adapter_tensors(full / "adapt" / "adapter"), _adapter_tensors(split / "adapt" / "adapter")
    assert a.keys() == b.keys() and len(a) == 32
    for key in a:
        assert torch.equal(a[key], b[key]), key
    losses = [h["loss"] for h in json.loads((full / "adapt" / "history.json").read_text())]
    resumed = [h["loss"] for h in json.loads((split / "adapt" / "history.json").read_text())]
    assert resumed == losses

    # Resuming a finished adaptation reuses its folders: no base is loaded, nothing is rewritten.
    stamp = (split / "adapt" / "merged" / "model.safetensors").stat().st_mtime_ns
    again = run_deepspeed("launchers/adapt.py", [*COMMON, f"output_dir={split}", "train.resume=true"])
    _ok(again)
    assert "adaptation already finished (4 steps)" in again.stdout + again.stderr
    assert (split / "adapt" / "merged" / "model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((split / "results.json").read_text())["adapt"]["steps"] == 4


@pytest.mark.distributed
@pytest.mark.integration
def test_pipeline_runs_on_the_adapted_teacher(tmp_path):
    """pipeline with adapt.enabled: Fisher, student and evaluation use the merged teacher; MLflow records it."""
    import mlflow

    results_dir = tmp_path / "results"
    run = results_dir / "run"
    out = run_deepspeed(
        "launchers/pipeline.py",
        [
            *COMMON,
            "adapt.enabled=true",
            "adapt.max_steps=2",
            f"output_dir={run}",
            "tracking.enabled=true",
        ],
    )
    _ok(out)
    results = json.loads((run / "results.json").read_text())
    merged = str(run / "adapt" / "merged")
    assert results["adapt"]["merged"] == merged and results["adapt"]["steps"] == 2
    assert results["fisher"]["model_id"] == merged
    assert json.loads((run / "student" / "config.json").read_text())["layerwise_dist"]["teacher"] == merged
    assert results["teacher"]["n"] == 16 and results["setup"]["teacher"]["zero3_partitioned"] is True
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{results_dir}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("layerwise_dist").experiment_id])
    stages = {r.info.run_name: r for r in runs if "mlflow.parentRunId" in r.data.tags}  # nested under the job
    assert len(runs) == 5 and set(stages) == {"adapt", "fisher", "distill", "evaluate"}
    assert stages["adapt"].data.params["resolved.adapted_teacher"] == merged
    assert len(client.get_metric_history(stages["adapt"].info.run_id, "adapt/loss")) == 2


@pytest.mark.integration
def test_cli_adapt_help():
    out = run_cli(["adapt", "--help"])
    assert out.returncode == 0, out.stderr
    assert "usage: layerwise-dist adapt" in out.stdout and "LoRA adapters" in out.stdout


@pytest.mark.distributed
@pytest.mark.integration
def test_pointwise_adapt_with_list_loss(tmp_path):
    """layerwise-dist adapt, pointwise with a list-level loss: both terms logged per step, the total their sum."""
    from conftest import run_cli

    run = tmp_path / "run"
    args = ["adapt", "--preset", "tiny", "--nproc", "1", "data.formulation=pointwise", "adapt.list_loss_weight=0.5"]
    args += [TARGETS, "adapt.max_steps=3", "adapt.micro_batch_size=2", "adapt.lr=5e-3", "adapt.warmup_steps=1"]
    _ok(run_cli([*args, "teacher.quantization=none", "tracking.enabled=false", f"output_dir={run}"]))
    history = json.loads((run / "adapt" / "history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3]
    for h in history:
        assert h["loss_title"] > 0 and h["loss_list"] > 0
        assert h["loss"] == pytest.approx(h["loss_title"] + 0.5 * h["loss_list"], rel=1e-5)
    assert (run / "adapt" / "merged" / "config.json").is_file()


@pytest.mark.distributed
@pytest.mark.integration
def test_gradient_checkpointing_changes_memory_not_the_loss(tmp_path):
    """adapt.gradient_checkpointing=true under ZeRO-3 (one rank): the same losses step by step as without."""
    from conftest import run_cli

    losses = {}
    for flag in ("false", "true"):
        run = tmp_path / flag
        args = ["adapt", "--preset", "tiny", "--nproc", "1", TARGETS, "adapt.max_steps=2", "adapt.micro_batch_size=2"]
        args += ["adapt.lora_dropout=0.0", f"adapt.gradient_checkpointing={flag}", "teacher.quantization=none"]
        _ok(run_cli([*args, f"output_dir={run}"]))
        losses[flag] = [h["loss"] for h in json.loads((run / "adapt" / "history.json").read_text())]
    assert len(losses["true"]) == 2
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-5)
