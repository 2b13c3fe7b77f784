"""Checks of a run's settings that need the teacher's config but no weights, run before any rank starts.

``layerwise-dist <command> --nproc N`` runs them in its own process, before the launcher: this module
imports only what they need (torch, the transformers config classes), not the recipes, DeepSpeed or
MLflow, so a bad choice is one line within seconds.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .config import ConfigError, RunConfig


def check_student_choice(cfg: RunConfig) -> None:
    """The student's layer choice and layer map against the teacher's config, before any expensive stage.

    Reads only the teacher's ``config.json`` (and, for a separate ``student.model``, both
    tokenizers): a bad choice is one line here, not a failure after the Fisher pass.
    """
    from transformers import AutoConfig

    from .models.student import StudentError, select_layers, validate_layer_map
    from .models.teacher import resolve_model_dir

    n_teacher = AutoConfig.from_pretrained(str(resolve_model_dir(cfg.teacher))).num_hidden_layers
    s = cfg.student
    if s.model:
        if not s.layer_map:
            raise ConfigError("student.model needs student.layer_map (student layer -> teacher layer)")
        n_student = AutoConfig.from_pretrained(s.model).num_hidden_layers
        check_same_tokenizer(cfg)
    else:
        dummy = [1.0] * n_teacher  # fisher-topk: only the count matters before the profile exists
        n_student = len(select_layers(s.selection, n_teacher, s.num_layers, fisher_scores=dummy, layers=s.layers))
    if s.layer_map:
        try:
            validate_layer_map(list(s.layer_map), n_student, n_teacher)
        except StudentError as e:
            raise StudentError(f"student.layer_map: {e}") from None


def check_memory(cfg: RunConfig, ranks: int) -> Any:
    """The memory planner's estimate for this run's placement; PlanError (one line) when it cannot fit.

    On CUDA the budget is the first device's memory per rank and the host's memory for
    offloaded states; on CPU every rank lives in host memory, so each rank's budget is the
    host's memory divided by the ranks. Student placement comes from the DeepSpeed JSON (stage,
    offload); stages 0 and 1 keep whole gradients on every rank (and stage 0 whole optimizer states:
    ``planner.student_states``); stage 1 with an offloaded optimizer is planned as ZeRO-2 with one.
    """
    import psutil
    import torch
    from transformers import AutoConfig

    from .ds_config import read_ds_config
    from .models.teacher import resolve_model_dir
    from .planner import check_fits
    from .precision import use_bf16

    zero = read_ds_config(cfg.ds_config).get("zero_optimization", {})
    stage = {0: "zero0", 1: "zero1", 3: "zero3"}.get(zero.get("stage"), "zero2")
    offload_param = (zero.get("offload_param") or {}).get("device") in ("cpu", "nvme")
    offload_opt = (zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme")
    if stage == "zero1" and offload_opt:
        stage = "zero2"
    placement = stage + (
        "+offload_all"
        if offload_param and stage == "zero3"
        else "+offload_opt"
        if offload_opt and stage != "zero0"
        else ""
    )
    host = psutil.virtual_memory().total
    if torch.cuda.is_available():
        device_mem = torch.cuda.get_device_properties(0).total_memory
        per_node = min(ranks, torch.cuda.device_count())
    else:
        device_mem, per_node = host // max(1, ranks), ranks
    num_layers = len(cfg.student.layers) if cfg.student.selection == "list" else cfg.student.num_layers
    if cfg.student.model:
        num_layers = AutoConfig.from_pretrained(cfg.student.model).num_hidden_layers
    return check_fits(
        AutoConfig.from_pretrained(str(resolve_model_dir(cfg.teacher))),
        num_layers,
        ranks,
        cfg.train.micro_batch_size,
        cfg.data.max_length,
        gpu_mem=device_mem,
        host_mem=host,
        teacher_quantization=cfg.teacher.quantization,
        teacher_placement=cfg.teacher.placement,
        student_placement=placement,
        dtype="bf16" if use_bf16(cfg.train.precision) else "fp32",
        ranks_per_node=per_node,
    )


def check_same_tokenizer(cfg: RunConfig) -> None:
    """A separate student model must read the teacher's tokens: same vocabulary and special tokens, by content."""
    from .models.student import StudentError
    from .models.teacher import load_tokenizer

    teacher = load_tokenizer(cfg.teacher)
    student = load_tokenizer(dataclasses.replace(cfg.teacher, model=cfg.student.model, gguf_file=""))
    tv, sv = teacher.get_vocab(), student.get_vocab()
    if tv != sv:
        differ = sorted(set(tv.items()) ^ set(sv.items()), key=lambda kv: kv[1])[:3]
        raise StudentError(
            f"student.model {cfg.student.model}: its vocabulary differs from the teacher's "
            f"({len(sv)} vs {len(tv)} tokens; e.g. {differ}): logit KD needs the same tokenizer"
        )
    ts, ss = teacher.special_tokens_map, student.special_tokens_map
    if ts != ss:
        raise StudentError(
            f"student.model {cfg.student.model}: special tokens differ from the teacher's ({ss} vs {ts})"
        )
