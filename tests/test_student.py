"""Layer selection, student construction (fp32 and 4-bit teachers) and the stored layer map."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from layerwise_dist.models.student import (
    StudentError,
    build_student,
    load_layer_map,
    select_layers,
    validate_layer_map,
)
from layerwise_dist.models.tiny import tiny_llama


@pytest.fixture(scope="module")
def teacher():
    return tiny_llama(num_layers=4, hidden=64, seed=0)


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(0))


def test_select_layers_strategies():
    scores = [0.5, 3.0, 0.1, 2.0, 2.0, 0.7]
    assert select_layers("fisher-topk", 6, 3, fisher_scores=scores) == [1, 3, 4]
    assert select_layers("fisher-topk", 6, 2, fisher_scores=scores) == [1, 3]  # tie 3/4: shallower first
    assert select_layers("uniform", 32, 8) == [0, 4, 9, 13, 18, 22, 27, 31]
    assert select_layers("uniform", 6, 2) == [0, 5]
    assert select_layers("uniform", 6, 6) == list(range(6))
    assert select_layers("uniform", 6, 1) == [5]
    assert select_layers("last", 6, 2) == [4, 5]
    assert select_layers("first", 6, 2) == [0, 1]
    assert select_layers("list", 6, None, layers=[0, 2, 5]) == [0, 2, 5]
    assert select_layers("list", 6, 3, layers=[0, 2, 5]) == [0, 2, 5]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strategy": "uniform", "num_student_layers": 7}, "more layers"),
        ({"strategy": "fisher-topk", "num_student_layers": 2}, "needs Fisher scores"),
        ({"strategy": "fisher-topk", "num_student_layers": 2, "fisher_scores": [1.0]}, "1 Fisher scores"),
        ({"strategy": "list", "num_student_layers": None, "layers": [0, 6]}, "outside"),
        ({"strategy": "list", "num_student_layers": None, "layers": [1, 1]}, "repeats"),
        ({"strategy": "list", "num_student_layers": 3, "layers": [1, 2]}, "num_layers=3"),
        ({"strategy": "list", "num_student_layers": None}, "needs explicit layers"),
        ({"strategy": "random", "num_student_layers": 2}, "unknown layer selection"),
    ],
)
def test_select_layers_errors(kwargs, match):
    with pytest.raises(StudentError, match=match):
        select_layers(num_teacher_layers=6, **kwargs)


def _manual_forward(model, layer_ids, input_ids):
    """Oracle: teacher embeddings -> chosen decoder layers -> final norm -> LM head."""
    inner = model.model
    position_ids = torch.arange(input_ids.shape[1]).unsqueeze(0)
    h = inner.embed_tokens(input_ids)
    position_embeddings = inner.rotary_emb(h, position_ids=position_ids)
    for i in layer_ids:
        h = inner.layers[i](h, attention_mask=None, position_ids=position_ids, position_embeddings=position_embeddings)
        h = h[0] if isinstance(h, tuple) else h
    return model.lm_head(inner.norm(h))


def test_student_equals_teacher_layers_oracle(teacher, input_ids):
    student, layer_map = build_student(teacher, [0, 2])
    assert layer_map == [0, 2]
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    assert all(p.requires_grad and p.dtype == torch.float32 for p in student.parameters())
    assert student.model.embed_tokens.weight.data_ptr() != teacher.model.embed_tokens.weight.data_ptr()
    student.eval()
    with torch.no_grad():
        oracle = _manual_forward(teacher, [0, 2], input_ids)
        logits = student(input_ids).logits
    torch.testing.assert_close(logits, oracle, rtol=0, atol=0)
    # The KV cache works with the renumbered layers: incremental decoding equals the full forward.
    with torch.no_grad():
        prefix = student(input_ids[:, :-1], use_cache=True)
        step = student(input_ids[:, -1:], past_key_values=prefix.past_key_values, use_cache=True).logits
    torch.testing.assert_close(step[:, -1], logits[:, -1], rtol=1e-5, atol=1e-5)


def test_student_save_and_reload(teacher, input_ids, tmp_path):
    student, _ = build_student(teacher, [1, 3], teacher_name="tiny-teacher")
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.layerwise_dist == {"layer_map": [1, 3], "teacher": "tiny-teacher"}
    assert load_layer_map(tmp_path) == [1, 3] == load_layer_map(reloaded, num_teacher_layers=4)
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, student(input_ids).logits, rtol=0, atol=0)


def test_student_from_folder_with_tied_embeddings(tmp_path, input_ids):
    tied = tiny_llama(num_layers=3, seed=1)
    tied.config.tie_word_embeddings = True
    tied.tie_weights()
    tied.save_pretrained(tmp_path / "teacher")
    student, layer_map = build_student(tmp_path / "teacher", [2])
    assert layer_map == [2] and student.config.layerwise_dist["teacher"] == str(tmp_path / "teacher")
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids).logits, _manual_forward(tied, [2], input_ids), rtol=0, atol=0)


def test_layer_map_override_and_errors(teacher):
    student, _ = build_student(teacher, [0, 3])
    assert load_layer_map(student, override=[1, 2], num_teacher_layers=4) == [1, 2]
    with pytest.raises(StudentError, match="has 3 entries but the student has 2"):
        load_layer_map(student, override=[0, 1, 2])
    with pytest.raises(StudentError, match="past the teacher's 4 layers"):
        load_layer_map(student, override=[0, 4], num_teacher_layers=4)
    with pytest.raises(StudentError, match="stores no layer map"):
        load_layer_map(tiny_llama(num_layers=2))
    with pytest.raises(StudentError, match="non-negative integers"):
        validate_layer_map([0, -1], 2)
    with pytest.raises(StudentError, match="outside"):
        build_student(teacher, [0, 4])


QUANTIZATIONS = {
    # NF4 error is a few percent of a weight's norm; LLM.int8 row-wise absmax well under one percent.
    "nf4": (
        BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_quant_storage=torch.float32,
        ),
        "Linear4bit",
        0.15,
    ),
    "int8": (BitsAndBytesConfig(load_in_8bit=True), "Linear8bitLt", 0.02),
}


@pytest.mark.parametrize("after_forward", [False, True], ids=["fresh", "after_forward"])
@pytest.mark.parametrize("quantization", list(QUANTIZATIONS))
def test_student_from_quantized_teacher(teacher, tmp_path, input_ids, quantization, after_forward):
    quant, linear_cls, tolerance = QUANTIZATIONS[quantization]
    teacher.save_pretrained(tmp_path)
    q_teacher = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, dtype=torch.float32)
    assert type(q_teacher.model.layers[1].mlp.up_proj).__name__ == linear_cls
    if after_forward:
        # The pipeline builds the student after the Fisher pass has run the teacher; bitsandbytes'
        # LLM.int8 moves the row scales from weight.SCB to module.state.SCB on the first forward.
        with torch.no_grad():
            q_teacher(input_ids)
    student, layer_map = build_student(q_teacher, [1, 3])
    assert layer_map == [1, 3] and not hasattr(student.config, "quantization_config")
    for name, module in student.named_modules():
        assert type(module).__name__ not in ("Linear4bit", "Linear8bitLt"), name
    assert all(p.requires_grad and p.dtype == torch.float32 for p in student.parameters())
    for s_idx, t_idx in enumerate(layer_map):
        for name, w_s in student.model.layers[s_idx].named_parameters():
            w_t = teacher.model.layers[t_idx].get_parameter(name)
            assert w_s.shape == w_t.shape, name
            if w_s.dim() == 2:  # quantized linear
                assert ((w_s - w_t).norm() / w_t.norm()).item() < tolerance, name
            else:  # norms are not quantized
                torch.testing.assert_close(w_s, w_t, rtol=0, atol=0)
    torch.testing.assert_close(student.lm_head.weight, teacher.lm_head.weight, rtol=0, atol=0)
    torch.testing.assert_close(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight, rtol=0, atol=0)
    # The student trains: a backward pass reaches the dequantized weights.
    student(input_ids, labels=input_ids).loss.backward()
    assert student.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


# --- Reading only the chosen layers from a safetensors folder ---------------------------------------------


def _saved_teacher(folder, tied: bool, num_layers: int = 5, dtype: torch.dtype = torch.float32, **save_kwargs):
    model = tiny_llama(num_layers=num_layers, hidden=64, seed=7)
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    model.to(dtype).save_pretrained(folder, **save_kwargs)
    return folder


def _whole_teacher_student(folder, layers):
    """The general path: the whole teacher in memory, its chosen tensors copied."""
    teacher = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    return build_student(teacher, layers, teacher_name=str(folder))[0]


def _assert_same_student(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype == torch.float32, key
        assert torch.equal(sa[key], sb[key]), key
    buffers_a, buffers_b = dict(a.named_buffers()), dict(b.named_buffers())
    assert buffers_a.keys() == buffers_b.keys()
    for key in buffers_a:
        assert torch.equal(buffers_a[key], buffers_b[key]), key
    assert a.config.to_dict() == b.config.to_dict()
    assert a.generation_config.to_dict() == b.generation_config.to_dict()
    assert a.training and all(p.requires_grad for p in a.parameters())


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_student_from_safetensors_equals_whole_teacher_path(tmp_path, input_ids, tied, sharded):
    kwargs = {"max_shard_size": "40KB"} if sharded else {}
    folder = _saved_teacher(tmp_path / "teacher", tied, **kwargs)
    assert (folder / "model.safetensors.index.json").is_file() == sharded
    if sharded:
        assert len(list(folder.glob("model-*.safetensors"))) > 3
    expected = _whole_teacher_student(folder, [1, 4])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transformers.AutoModelForCausalLM, "from_pretrained", _refuse_whole_teacher)
        student, layer_map = build_student(folder, [1, 4])
    assert layer_map == [1, 4]
    _assert_same_student(student, expected)
    tied_now = student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    assert tied_now == tied
    student.eval(), expected.eval()
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids).logits, expected(input_ids).logits, rtol=0, atol=0)


def _refuse_whole_teacher(*args, **kwargs):
    raise AssertionError("build_student loaded the whole teacher")


def test_student_from_bf16_safetensors_upcasts_like_the_whole_teacher_path(tmp_path, monkeypatch):
    folder = _saved_teacher(tmp_path / "teacher", tied=False, dtype=torch.bfloat16)
    expected = _whole_teacher_student(folder, [0, 3])
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", _refuse_whole_teacher)
    student, _ = build_student(folder, [0, 3])
    _assert_same_student(student, expected)


def test_student_from_pytorch_bin_folder_takes_the_whole_teacher_path(tmp_path):
    """No safetensors in the folder: the general path, same student."""
    model = tiny_llama(num_layers=4, hidden=64, seed=2)
    folder = tmp_path / "bin"
    model.save_pretrained(folder)
    state = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(folder).state_dict().items()}
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    student, _ = build_student(folder, [2, 3])
    for i, t in enumerate([2, 3]):
        for name, w in student.model.layers[i].named_parameters():
            assert torch.equal(w, model.model.layers[t].get_parameter(name)), name


def test_student_from_broken_safetensors_folders(tmp_path):
    folder = _saved_teacher(tmp_path / "sharded", tied=False, max_shard_size="40KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(StudentError, match="lists shards that are not there"):
        build_student(folder, [0, 1])
    single = _saved_teacher(tmp_path / "single", tied=False)
    data = (single / "model.safetensors").read_bytes()
    (single / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(StudentError, match="truncated"):
        build_student(single, [0, 4])
    (single / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(StudentError, match="not a readable safetensors file"):
        build_student(single, [0, 1])
    with pytest.raises(StudentError, match="outside"):
        build_student(_saved_teacher(tmp_path / "ok", tied=False), [0, 5])


_RSS_CHILD = """
import json, sys
from layerwise_dist.models.student import build_student
from layerwise_dist.stages import peak_rss_mib, reset_peak_rss, rss_mib
from transformers import AutoModelForCausalLM
folder, warm, kind = sys.argv[1], sys.argv[2], sys.argv[3]
# Warm-up on a 2-layer model of the same architecture: lazy imports and caches are not the build's memory.
build_student(warm, [0, 1])
build_student(AutoModelForCausalLM.from_pretrained(warm, dtype="auto"), [0, 1])
before = rss_mib()
if not reset_peak_rss():
    print(json.dumps(None)); sys.exit()
if kind == "folder":
    student, _ = build_student(folder, [5, 17])
else:
    student, _ = build_student(AutoModelForCausalLM.from_pretrained(folder, dtype="auto"), [5, 17])
peak = peak_rss_mib()
size = sum(p.numel() * p.element_size() for p in student.parameters()) / 2**20
print(json.dumps({"extra_mib": peak - before, "student_mib": size}))
"""


def test_student_construction_memory_is_of_the_student_not_the_teacher(tmp_path):
    """2 of 24 layers, each build in a fresh process: the folder path's peak above the process's resident set
    is about the student's size; the whole-teacher path's is at least the teacher's."""
    import json
    import subprocess
    import sys

    model = tiny_llama(num_layers=24, hidden=256, seed=0)
    teacher_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    model.save_pretrained(tmp_path / "teacher")
    tiny_llama(num_layers=2, hidden=256, seed=1).save_pretrained(tmp_path / "warm")
    del model
    measured = {}
    for kind in ("folder", "teacher"):
        out = subprocess.run(
            [sys.executable, "-c", _RSS_CHILD, str(tmp_path / "teacher"), str(tmp_path / "warm"), kind],
            capture_output=True,
            text=True,
            check=True,
        )
        measured[kind] = json.loads(out.stdout.strip().splitlines()[-1])
        if measured[kind] is None:
            pytest.skip("this kernel does not let a process reset its RSS high-water mark")
    student_mib = measured["folder"]["student_mib"]
    assert student_mib < teacher_mib / 8  # 2 of 24 layers and a small vocabulary
    # (Some of the teacher's bytes fit in memory the warm-up freed: at least half of them are new.)
    assert measured["teacher"]["extra_mib"] > 0.5 * teacher_mib, measured
    # The student's own bytes, plus allocator and module-construction slack of a few MiB.
    assert measured["folder"]["extra_mib"] < 1.2 * student_mib + 4, (measured, teacher_mib)


def _recorded_prompt(overrides: list[str], data_category: str) -> tuple[dict, object]:
    import types

    from transformers import AutoConfig

    from layerwise_dist.config import load_config
    from layerwise_dist.recipes.distill import DistillRecipe

    cfg = load_config("tiny", ["student.selection=uniform", *overrides])
    session = types.SimpleNamespace(cfg=cfg, splits=types.SimpleNamespace(category=data_category))
    recipe = DistillRecipe(session)
    recipe.teacher_config = AutoConfig.from_pretrained(str(recipe._teacher_dir()))
    student, _ = recipe._setup_student()
    return student.config.layerwise_dist["prompt"], cfg


def test_the_saved_student_records_the_category_its_prompts_named_not_the_config_default(tmp_path):
    """An llmrank folder names its own category (Video_Games); ``data.category`` keeps its default."""
    prompt, cfg = _recorded_prompt(["data.source=llmrank", f"data.reviews={tmp_path}"], "Video_Games")
    assert cfg.data.category == "All_Beauty" and prompt["category"] == "Video_Games"
    assert {k: v for k, v in prompt.items() if k != "category"} == {
        k: v for k, v in cfg.data.prompt_settings().items() if k != "category"
    }
    # An amazon2023 folder: data.category picked the file (MyShop.jsonl), so it is what a reload needs, even
    # when the items' main_category named the data otherwise.
    prompt, _ = _recorded_prompt(
        ["data.source=amazon2023", f"data.reviews={tmp_path}", "data.category=MyShop"], "Beauty"
    )
    assert prompt["category"] == "MyShop"
