"""Teacher adaptation with LoRA (QLoRA on a 4-bit base): adapters, loss, merge, export.

The base is the teacher as :func:`layerwise_dist.models.teacher.load_teacher` loads it:
bitsandbytes NF4 when ``adapt.quantized_base`` and ``teacher.quantization=nf4`` (QLoRA),
else full precision. ``peft`` wraps the target linears (``adapt.target_modules``) with
LoRA adapters ``W x + (alpha / r) * B A x``; only ``A`` and ``B`` train.

Under DeepSpeed ZeRO-3 (verified on CPU, 2 gloo ranks): the base is loaded under
``HfDeepSpeedConfig``; ``deepspeed.initialize`` partitions the frozen NF4 weights
(``Params4bit`` shards in the compute dtype, see ``bnb_4bit_quant_storage``) together
with the adapters peft added afterwards; the adapters are the engine's only trainable
parameters. ``peft.prepare_model_for_kbit_training`` is not used: on CPU it changes
nothing but switching on gradient checkpointing, and on CUDA it upcasts bf16 parameters
by reassigning ``param.data``, which under ZeRO-3 would replace the partition placeholders
instead of the shards. What it does that matters here is done explicitly: the base is
frozen (``load_teacher``) and the adapters are fp32.

Merging (:func:`merged_state_dict`) gathers one module at a time from the ZeRO-3 shards
and writes a full-precision (fp32) Hugging Face state dict: every base weight in fp32
(an NF4 weight dequantized with its own quant state) and, for every adapted linear,
``W + scaling * B @ A`` (peft's ``get_delta_weight``). The folders are written beside
their final place and swapped in by rename, as :func:`layerwise_dist.export.export_student`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ConfigError, RunConfig
from .distributed import barrier, get_logger, is_main
from .export import swap_in

log = get_logger()

ADAPTER_NAME = "default"


# ---------------------------------------------------------------- configuration
def base_quantization(cfg: RunConfig) -> str:
    """The quantization of the base the adapters train on: ``nf4`` (QLoRA) or ``none``."""
    if not cfg.adapt.quantized_base or cfg.teacher.quantization == "none":
        return "none"
    if cfg.teacher.quantization != "nf4":
        raise ConfigError(
            f"adapt.quantized_base=true needs teacher.quantization=nf4 (QLoRA); got {cfg.teacher.quantization}: "
            "set teacher.quantization=nf4, or adapt.quantized_base=false for a full-precision base"
        )
    return "nf4"


def check_adapt_config(cfg: RunConfig) -> None:
    """Refuse what adaptation cannot do, with the setting to change (ConfigError)."""
    base_quantization(cfg)
    if cfg.adapt.list_loss_weight > 0 and cfg.data.formulation != "pointwise":
        raise ConfigError(
            f"adapt.list_loss_weight={cfg.adapt.list_loss_weight} is a pointwise option (a CE over the candidates' "
            "title scores); listwise adaptation already trains the CE over the answer letters: set it to 0"
        )


def adapt_run_config(cfg: RunConfig) -> RunConfig:
    """A copy of ``cfg`` whose ``train.*`` batch sizes, lr and schedule are adapt's.

    :func:`layerwise_dist.ds_config.resolve_ds_config` fills the DeepSpeed JSON from
    ``train.*``; the adaptation engine gets its dict from this copy, so the one resolver
    (and its consistency checks) serves both engines.
    """
    a = cfg.adapt
    train = dataclasses.replace(
        cfg.train,
        micro_batch_size=a.micro_batch_size,
        grad_accum=a.grad_accum,
        lr=a.lr,
        warmup_steps=a.warmup_steps,
        max_steps=a.max_steps,
        seed=a.seed,
    )
    return dataclasses.replace(cfg, train=train)


# ---------------------------------------------------------------- model
def load_base(cfg: RunConfig, ds_config: dict[str, Any] | None = None) -> nn.Module:
    """The teacher as the frozen base of the adapters (4-bit or full precision, see :func:`base_quantization`)."""
    from .models.teacher import load_teacher

    teacher = dataclasses.replace(cfg.teacher, quantization=base_quantization(cfg))
    return load_teacher(teacher, ds_config)


def attach_lora(model: nn.Module, cfg: Any, seed: int | None = None) -> nn.Module:
    """Wrap ``model`` (frozen) with LoRA adapters on ``cfg.target_modules`` (an :class:`AdaptConfig`).

    The adapters' initial ``A`` is drawn from ``seed`` (the same on every rank), ``B`` is
    zero, so the wrapped model starts equal to the base. Returns the ``PeftModel``, in
    train mode, whose only trainable parameters are the adapters (fp32).
    """
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = sorted(set(cfg.target_modules) - present)
    if missing:
        raise ConfigError(
            f"adapt.target_modules: {missing} name no linear module of {type(model).__name__} "
            f"(its linear modules: {sorted(present)})"
        )
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with _seeded(cfg.seed if seed is None else seed):
        peft_model = get_peft_model(model, lora, adapter_name=ADAPTER_NAME)
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            if "lora_" not in name:
                raise RuntimeError(f"non-adapter parameter {name} is trainable")
            p.data = p.data.float()
    peft_model.train()
    return peft_model


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def num_trainable(model: nn.Module) -> int:
    """Trainable parameter count (the full count under ZeRO-3, not this rank's shard)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in trainable_parameters(model))


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token CE (fp32) over the supervised tokens (``labels != -100``, HF shift).

    ``pointwise`` examples supervise every token of the target title given the history
    (next-item title modelling); ``listwise`` ones the answer letter (CE on the letter).
    """
    from .losses import TaskCrossEntropy

    return TaskCrossEntropy()(logits, labels)


def supervised_lm_loss(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """:func:`causal_lm_loss` with the LM head applied only where a loss is taken.

    The positions that predict a supervised token (``labels[:, p + 1] != -100``) are passed as
    ``logits_to_keep`` (a [B, L] mask): a Hugging Face causal LM then returns logits [U, V] for
    those U positions only, instead of [B, L, V] (a listwise prompt of ~700 tokens supervises one;
    a pointwise one its target title's ~12). Equal to the full path, loss and gradients (tests).
    Every rank runs the forward even without a supervised token (ZeRO-3 forwards are collective).
    """
    from torch.nn import functional as F

    from .losses import IGNORE_INDEX

    labels = batch["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    from .heads import forward_keeping

    out = forward_keeping(
        model, keep, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    )
    targets = labels[:, 1:][keep[:, :-1]]
    if targets.numel() == 0:
        return out.logits.float().sum() * 0.0
    return F.cross_entropy(out.logits.float(), targets)


# ---------------------------------------------------------------- merge
def _gathered(params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
    """Full parameters on every rank for the block (ZeRO-3); a no-op for plain parameters."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def full_precision(module: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """An fp32 copy of a (gathered) parameter or buffer; a bitsandbytes 4-/8-bit weight is dequantized."""
    from .models.student import _dequantized

    quant_state = getattr(tensor, "quant_state", None)
    if name == "weight" and type(module).__name__ == "Linear4bit" and quant_state is not None:
        import bitsandbytes.functional as bnbf

        data = tensor.data
        if getattr(quant_state, "packing_format_for_cpu", False):
            data, quant_state = _unpacked_for_cpu(data, quant_state)
        return bnbf.dequantize_4bit(data, quant_state).to(torch.float32).cpu()
    # A gathered ZeRO-3 parameter still carries its ds_* attributes: hand over the plain tensor.
    plain = tensor.detach() if hasattr(tensor, "ds_id") else tensor
    return _dequantized(module, name, plain).cpu()


def _unpacked_for_cpu(data: torch.Tensor, quant_state: Any) -> tuple[torch.Tensor, Any]:
    """A 4-bit weight that bitsandbytes repacked for its CPU AVX512-BF16 kernel, back in the standard layout.

    bitsandbytes >= 0.49 repacks a ``Linear4bit`` weight in place at its first forward in eval
    mode without grad on such CPUs, and rounds its block scales to bf16 on the way; the
    standard dequantization of the repacked tensor is garbage. Undone on copies (the module
    keeps serving its fast path); the bf16 rounding of the scales stays (about 0.4% of a
    weight's magnitude). Training forwards never repack, so the adaptation loop never gets here.
    """
    import copy

    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    log.warning("a 4-bit weight was repacked for bitsandbytes' CPU inference kernel: dequantizing with bf16 scales")
    return _convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(quant_state))


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def merged_state_dict(peft_model: nn.Module, adapter: str = ADAPTER_NAME) -> dict[str, torch.Tensor] | None:
    """The full-precision state dict of base + adapters, under the base model's own keys.

    Collective under ZeRO-3 (every rank calls it; the modules are gathered one at a time);
    the dict is built on rank 0 (``None`` elsewhere). An adapted linear's weight is
    ``fp32(W) + scaling * B @ A``, every other tensor its fp32 copy (NF4 dequantized).
    """
    model = peft_model.get_base_model()
    lora = _lora_layers(model)
    inside = tuple(f"{name}." for name in lora)
    state: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if name.startswith(inside):
            continue  # the base layer and the adapters of a LoRA layer: handled with the layer
        prefix = f"{name}." if name else ""
        if name in lora:
            base = module.get_base_layer()
            if getattr(module, "use_dora", {}).get(adapter, False):
                raise NotImplementedError("merging DoRA adapters")
            params = list(base.parameters(recurse=False)) + [
                module.lora_A[adapter].weight,
                module.lora_B[adapter].weight,
            ]
            with _gathered(params):
                if is_main():
                    weight = full_precision(base, "weight", base.weight)
                    delta = module.get_delta_weight(adapter).to(torch.float32).cpu()
                    state[prefix + "weight"] = weight + delta
                    if getattr(base, "bias", None) is not None:
                        state[prefix + "bias"] = full_precision(base, "bias", base.bias)
            continue
        own = list(module.named_parameters(recurse=False))
        with _gathered([p for _, p in own]):
            if is_main():
                for key, p in own:
                    state[prefix + key] = full_precision(module, key, p)
        if is_main():
            persistent = [
                k for k, _ in module.named_buffers(recurse=False) if k not in module._non_persistent_buffers_set
            ]
            for key in persistent:
                state[prefix + key] = full_precision(module, key, getattr(module, key))
    return state if is_main() else None


@torch.no_grad()
def adapter_state_dict(peft_model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The adapters' weights gathered from the ZeRO-3 shards (rank 0; ``None`` elsewhere). Collective."""
    state: dict[str, torch.Tensor] = {}
    for name, p in peft_model.named_parameters():
        if "lora_" not in name:
            continue
        with _gathered([p]):
            if is_main():
                state[name] = p.detach().to(torch.float32).cpu().clone()
    return state if is_main() else None


def merged_model(base_dir: str | Path, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain fp32 model of the base's class and config holding ``state`` (strict)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models.student import _no_init

    raw = AutoConfig.from_pretrained(str(base_dir)).to_dict()
    raw.pop("quantization_config", None)
    raw.pop("_pre_quantization_dtype", None)
    raw["dtype"] = "float32"
    config = AutoConfig.for_model(**raw)
    with _no_init():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to(torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(
            f"merged state dict does not fit {type(model).__name__}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    if tied:
        model.tie_weights()
    model.config.use_cache = True
    model.eval()
    return model


def merge_saved_adapter(
    cfg: RunConfig,
    adapter_dir: str | Path,
    merged_dir: str | Path,
    tokenizer: Any = None,
    info: dict[str, Any] | None = None,
) -> Path:
    """Rebuild ``merged_dir`` from a saved adapter folder and its base, without training. Collective.

    The merged folder of a finished adaptation is 0.5 GB and is not committed with the results; its adapter
    folder (a few MB) can be. On a fresh checkout this gives back the merged teacher of that adaptation: the
    base is loaded as the adaptation loaded it (:func:`load_base`: full precision or NF4), the adapters are
    attached with PEFT, and the merge is the one :func:`export_adapted` wrote (:func:`merged_state_dict`), so
    the weights are the same bit for bit on the same kind of machine. Rank 0 builds and writes; the folder is
    swapped in by rename.
    """
    from peft import PeftModel

    adapter_dir, merged_dir = Path(adapter_dir), Path(merged_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} holds no adapter (adapter_config.json): nothing to merge")
    if is_main():
        base = load_base(cfg)
        peft_model = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name=ADAPTER_NAME).train()
        from .models.teacher import resolve_model_dir

        _write_merged(resolve_model_dir(cfg.teacher), merged_state_dict(peft_model), merged_dir, tokenizer, info)
        log.info("adapted teacher: merged %s into its base again: %s", adapter_dir, merged_dir)
    barrier()
    return merged_dir


# ---------------------------------------------------------------- export
def _tmp(folder: Path) -> Path:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _write_merged(
    base_dir: str | Path, state: dict[str, torch.Tensor], merged_dir: Path, tokenizer: Any, info: dict[str, Any] | None
) -> None:
    """The merged fp32 folder (``info`` in its config as ``layerwise_dist_adapt``), swapped in by rename."""
    model = merged_model(base_dir, state)
    if info:
        model.config.layerwise_dist_adapt = dict(info)
    tmp = _tmp(merged_dir)
    model.save_pretrained(str(tmp), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    swap_in(tmp, merged_dir)


def export_adapted(
    peft_model: nn.Module,
    base_dir: str | Path,
    adapter_dir: str | Path,
    merged_dir: str | Path,
    tokenizer: Any = None,
    info: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write the PEFT adapter folder and the merged fp32 HF folder (with tokenizer). Collective.

    ``adapter_dir`` loads with ``PeftModel.from_pretrained(base, adapter_dir)`` (its
    ``adapter_config.json`` names ``base_dir``); ``merged_dir`` with
    ``AutoModelForCausalLM.from_pretrained``, and serves as the teacher of later stages.
    ``info`` is stored in the merged config as ``layerwise_dist_adapt``. Rank 0 writes;
    each folder is swapped in by rename.
    """
    adapter_dir, merged_dir = Path(adapter_dir), Path(merged_dir)
    adapters = adapter_state_dict(peft_model)
    merged = merged_state_dict(peft_model)
    if is_main():
        tmp = _tmp(adapter_dir)
        config = peft_model.peft_config[ADAPTER_NAME]
        saved_base = config.base_model_name_or_path
        config.base_model_name_or_path = str(base_dir)
        try:
            peft_model.save_pretrained(str(tmp), state_dict=adapters, safe_serialization=True)
        finally:
            config.base_model_name_or_path = saved_base
        swap_in(tmp, adapter_dir)

        _write_merged(base_dir, merged, merged_dir, tokenizer, info)
        log.info("adapted teacher: adapters in %s, merged fp32 model in %s", adapter_dir, merged_dir)
    barrier()
    return adapter_dir, merged_dir
