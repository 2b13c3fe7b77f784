"""Teacher loading: source resolution, quantization settings, device-dependent choices (CPU side)."""

from __future__ import annotations

import pytest
import torch

from layerwise_dist.config import ConfigError, TeacherConfig
from layerwise_dist.distributed import backend
from layerwise_dist.models.teacher import (
    ModelLoadError,
    compute_dtype,
    load_teacher,
    quantization_config,
    resolve_model_dir,
    select_attn_implementation,
)
from layerwise_dist.precision import use_bf16

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallbacks")


@cpu_only
def test_cpu_fallbacks():
    assert select_attn_implementation("auto") == "sdpa"
    assert compute_dtype() == torch.float32
    assert backend() == "gloo"
    assert use_bf16("auto") is False and use_bf16("fp32") is False
    with pytest.raises(ModelLoadError, match="needs CUDA and the flash-attn package"):
        select_attn_implementation("flash_attention_2")
    with pytest.raises(ConfigError, match="bf16 needs CUDA"):
        use_bf16("bf16")


def test_nf4_settings_let_zero3_partition():
    q = quantization_config(TeacherConfig(quantization="nf4"), torch.bfloat16)
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    assert q.bnb_4bit_quant_storage == torch.bfloat16  # packed weights in the compute dtype: ZeRO-3 shards them
    assert quantization_config(TeacherConfig(quantization="int8"), torch.float32).load_in_8bit
    assert quantization_config(TeacherConfig(quantization="none"), torch.float32) is None


def test_resolve_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_dir(TeacherConfig(model=str(tmp_path / "model.gguf")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="holds no config.json"):
        resolve_model_dir(TeacherConfig(model=str(tmp_path / "empty")))
    with pytest.raises(ModelLoadError, match="no such model folder"):
        resolve_model_dir(TeacherConfig(model=str(tmp_path / "missing")))
    with pytest.raises(ModelLoadError, match="nor in the local Hugging Face cache"):
        resolve_model_dir(TeacherConfig(model="nobody-here/no-such-model-xyz"))


def test_tiny_teacher_loads_nf4_frozen():
    model = load_teacher(TeacherConfig(model="tiny", quantization="nf4", placement="replicate"))
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Linear4bit" in kinds
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all() and logits.dtype == torch.float32
