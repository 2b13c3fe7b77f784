"""A student made of chosen teacher layers, and the student -> teacher layer map.

``select_layers`` picks teacher layer indices (by Fisher score or a baseline rule); ``build_student`` copies
them, in order, with the embeddings, final norm and LM head into a fresh model of the teacher's class with
``num_hidden_layers = len(layers)``, in fp32 and trainable. From a model folder with safetensors weights it
reads only those tensors (host memory O(student), not O(teacher)); from an in-memory teacher it copies them,
dequantizing a 4-bit (or 8-bit) bitsandbytes teacher on the way. The layer map is stored in ``student.config.layerwise_dist`` so that it travels
with ``save_pretrained`` and is read back by :func:`load_layer_map`.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from ..config import Selection
from ..distributed import get_logger

# transformers' model classes (modeling_utils, ~3 s to import) are imported where a model is built, so the
# layer-choice checks (select_layers, validate_layer_map) run before any rank starts without them.
if typing.TYPE_CHECKING:
    from transformers import PreTrainedModel

log = get_logger()

SELECTIONS = typing.get_args(Selection)
CONFIG_KEY = "layerwise_dist"
# Config fields holding one entry per decoder layer: sliced like the layers themselves
# (Gemma 2/3, Qwen2/3, Mistral, Llama 4 ``layer_types``: sliding vs full attention; Llama 4 ``no_rope_layers``;
# hybrid models' block types).
_PER_LAYER_CONFIG_LISTS = ("layer_types", "no_rope_layers", "layers_block_type", "attn_type_list")
# Config fields holding teacher layer *indices*: renumbered to the student layers that came from them.
_LAYER_INDEX_CONFIG_LISTS = ("mlp_only_layers",)
# Where causal LMs keep their decoder layers, tried in this order (then a search by name and length).
DECODER_LAYER_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma 1/2/3 (text), Phi-3, OLMo, ...
    "model.language_model.layers",  # multimodal wrappers (Gemma 3 4B+, Llama 4, ...)
    "transformer.h",  # GPT-2, GPT-J, Falcon, BLOOM
    "gpt_neox.layers",  # Pythia / GPT-NeoX
    "model.decoder.layers",  # OPT
    "transformer.blocks",  # MPT
)


class StudentError(ValueError):
    """Invalid layer selection, layer map or student source."""


def _num_hidden_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    n = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    return int(n) if isinstance(n, int) else None


def decoder_layers_path(model: nn.Module) -> str:
    """Dotted name of the ``nn.ModuleList`` holding the decoder layers of a causal LM (``model.layers`` for
    Llama and Gemma 3). Looks at the known places (:data:`DECODER_LAYER_PATHS`), then for the one module list
    named layers/h/blocks/layer with ``config.num_hidden_layers`` entries; else a one-line StudentError."""
    model = getattr(model, "module", model)  # a DeepSpeed engine
    if not isinstance(model, nn.Module):
        raise StudentError(f"cannot locate decoder layers in a {type(model).__name__} (not a torch module)")
    n = _num_hidden_layers(model)
    for path in DECODER_LAYER_PATHS:
        try:
            found = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList) and len(found) > 0 and (n is None or len(found) == n):
            return path
    lists = [
        name
        for name, m in model.named_modules()
        if name and isinstance(m, nn.ModuleList) and len(m) > 0 and (n is None or len(m) == n)
    ]
    named = [name for name in lists if name.split(".")[-1] in ("layers", "h", "blocks", "layer")]
    if len(named) == 1:
        return named[0]
    raise StudentError(
        f"cannot locate the decoder layers of {type(model).__name__}: no nn.ModuleList of "
        f"config.num_hidden_layers={n} blocks at {', '.join(DECODER_LAYER_PATHS)} "
        f"(candidates: {named or lists or 'none'})"
    )


def decoder_layers_of(model: nn.Module) -> nn.ModuleList:
    """The decoder layers (:func:`decoder_layers_path`) of a causal LM or of the model inside a DeepSpeed engine."""
    net = getattr(model, "module", model)
    return net.get_submodule(decoder_layers_path(net))


def select_layers(
    strategy: str,
    num_teacher_layers: int,
    num_student_layers: int | None,
    fisher_scores: Sequence[float] | None = None,
    layers: Sequence[int] | None = None,
) -> list[int]:
    """Teacher layer indices the student keeps, student layer ``i`` <- teacher layer ``result[i]``.

    - ``fisher-topk``: the ``num_student_layers`` layers with the highest Fisher score (ties: shallower
      first), returned in depth order;
    - ``uniform``: evenly spaced over the depth, including the first and the last layer (as SLMRec);
      a single layer is the last one;
    - ``last`` / ``first``: the deepest / shallowest ``num_student_layers`` layers;
    - ``list``: the explicit ``layers`` as given (``num_student_layers`` may be ``None``; if given it must
      equal ``len(layers)``).
    """
    if strategy not in SELECTIONS:
        raise StudentError(f"unknown layer selection {strategy!r} (choose one of {', '.join(SELECTIONS)})")
    if num_teacher_layers <= 0:
        raise StudentError(f"the teacher must have at least one layer; got {num_teacher_layers}")
    if strategy == "list":
        if not layers:
            raise StudentError("selection=list needs explicit layers, e.g. student.layers=[0,8,16,24]")
        chosen = [int(t) for t in layers]
        if num_student_layers is not None and num_student_layers != len(chosen):
            raise StudentError(f"student.num_layers={num_student_layers} but student.layers lists {len(chosen)}")
        _check_teacher_indices(chosen, num_teacher_layers, "student.layers")
        return chosen
    if num_student_layers is None or num_student_layers <= 0:
        raise StudentError(f"the student needs at least one layer; got {num_student_layers}")
    k, n = int(num_student_layers), int(num_teacher_layers)
    if k > n:
        raise StudentError(f"the student cannot have more layers ({k}) than the teacher ({n})")
    if strategy == "first":
        return list(range(k))
    if strategy == "last":
        return list(range(n - k, n))
    if strategy == "uniform":
        if k == 1:
            return [n - 1]
        # Spacing (n-1)/(k-1) >= 1, so rounding keeps the indices distinct and increasing.
        return [int(math.floor(i * (n - 1) / (k - 1) + 0.5)) for i in range(k)]
    if fisher_scores is None:
        raise StudentError("selection=fisher-topk needs Fisher scores: run the Fisher pass or give a profile")
    scores = [float(s) for s in fisher_scores]
    if len(scores) != n:
        raise StudentError(f"{len(scores)} Fisher scores for a teacher with {n} layers")
    if any(not math.isfinite(s) for s in scores):
        raise StudentError(f"Fisher scores must be finite; got {scores}")
    top = sorted(range(n), key=lambda j: (-scores[j], j))[:k]
    return sorted(top)


def _check_teacher_indices(indices: Sequence[int], num_teacher_layers: int, what: str) -> None:
    bad = [t for t in indices if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < num_teacher_layers]
    if bad:
        raise StudentError(f"{what} {list(indices)} has indices outside [0, {num_teacher_layers}): {bad}")
    if len(set(indices)) != len(indices):
        dup = sorted({t for t in indices if list(indices).count(t) > 1})
        raise StudentError(f"{what} {list(indices)} repeats teacher layers {dup}")


def validate_layer_map(
    layer_map: Sequence[int], num_student_layers: int, num_teacher_layers: int | None = None
) -> list[int]:
    """Check a student -> teacher layer map against both depths; returns it as a list of ints."""
    values = list(layer_map)
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in values):
        raise StudentError(f"layer_map must hold non-negative integers; got {values!r}")
    if len(values) != num_student_layers:
        raise StudentError(f"layer_map has {len(values)} entries but the student has {num_student_layers} layers")
    if num_teacher_layers is not None and any(t >= num_teacher_layers for t in values):
        raise StudentError(f"layer_map {values} points past the teacher's {num_teacher_layers} layers")
    return values


def _dequantized(module: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A full-precision fp32 copy of a parameter or buffer; bitsandbytes weights are dequantized."""
    if hasattr(tensor, "ds_id"):
        raise StudentError(
            "the source model is partitioned by DeepSpeed ZeRO-3: build the student from the model folder instead"
        )
    if name == "weight" and type(module).__name__ == "Linear4bit":
        import bitsandbytes.functional as bnbf

        quant_state = getattr(tensor, "quant_state", None)
        if quant_state is None:  # not yet quantized (never moved to a device): plain weights
            return tensor.detach().to(torch.float32).clone()
        data = tensor.data
        if getattr(quant_state, "packing_format_for_cpu", False):
            # On CPUs with AVX512-BF16, bitsandbytes repacks the weight for its CPU kernel on the first
            # forward; undo that on copies (the inverse mutates its arguments) before dequantizing.
            data, quant_state = bnbf._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(quant_state))
        return bnbf.dequantize_4bit(data, quant_state).to(torch.float32)
    if name == "weight" and type(module).__name__ == "Linear8bitLt":
        if tensor.dtype != torch.int8:  # fp16 weights kept (has_fp16_weights) or not yet quantized
            return tensor.detach().to(torch.float32).clone()
        # The row scales live on the weight until the first forward, then bitsandbytes moves them
        # to module.state.SCB (and clears weight.SCB).
        scb = getattr(tensor, "SCB", None)
        if scb is None:
            scb = getattr(getattr(module, "state", None), "SCB", None)
        if scb is None:
            raise StudentError(
                f"cannot dequantize {type(module).__name__}.{name}: int8 weight without row scales (SCB) "
                "on the weight or in module.state"
            )
        # LLM.int8 row-wise absmax quantization: W = CB * SCB / 127.
        return tensor.data.to(torch.float32) * scb.to(torch.float32).unsqueeze(1) / 127.0
    if tensor.dtype == torch.uint8 and type(module).__name__.startswith("Linear"):
        raise StudentError(f"cannot dequantize {type(module).__name__}.{name}: unsupported quantization")
    out = tensor.detach()
    return (out.to(torch.float32) if out.is_floating_point() else out).clone()


def _source_tensors(source: nn.Module) -> dict[str, tuple[nn.Module, str, torch.Tensor]]:
    """Every parameter and buffer of ``source`` by full name (tied ones under each name), not yet copied:
    only the tensors the student needs are dequantized, never the whole teacher."""
    tensors: dict[str, tuple[nn.Module, str, torch.Tensor]] = {}
    for mod_name, module in source.named_modules(remove_duplicate=False):
        items = itertools.chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False))
        for name, tensor in items:
            tensors.setdefault(f"{mod_name}.{name}" if mod_name else name, (module, name, tensor))
    return tensors


def _no_init() -> contextlib.AbstractContextManager:
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _student_config(config: PretrainedConfig, layers: list[int], layer_map_info: dict) -> PretrainedConfig:
    """The teacher's config for ``len(layers)`` layers: every per-layer list (attention type, RoPE use, ...)
    follows the chosen layers, every list of layer indices is renumbered; a list of one entry per teacher
    layer that this function does not know is an error rather than silently misaligned."""
    num_teacher = config.num_hidden_layers
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = len(layers)
    for key in _PER_LAYER_CONFIG_LISTS:
        value = getattr(cfg, key, None)
        if isinstance(value, (list, tuple)) and len(value) == num_teacher:
            setattr(cfg, key, [value[t] for t in layers])
    for key in _LAYER_INDEX_CONFIG_LISTS:
        value = getattr(cfg, key, None)
        if isinstance(value, (list, tuple)):
            kept = set(int(v) for v in value)
            setattr(cfg, key, [i for i, t in enumerate(layers) if t in kept])
    window_layers = getattr(cfg, "max_window_layers", None)
    if isinstance(window_layers, int) and not isinstance(window_layers, bool):
        # Qwen2/3: layers below max_window_layers never slide. layer_types (sliced above) decides; this keeps
        # the threshold consistent with it: the number of kept layers that came from below the threshold.
        cfg.max_window_layers = sum(1 for t in layers if t < window_layers)
    if len(layers) != num_teacher:
        handled = set(_PER_LAYER_CONFIG_LISTS) | set(_LAYER_INDEX_CONFIG_LISTS)
        unknown = [
            key
            for key, value in vars(cfg).items()
            if "layer" in key and key not in handled and isinstance(value, (list, tuple)) and len(value) == num_teacher
        ]
        if unknown:
            raise StudentError(
                f"config.{unknown[0]} of {type(config).__name__} has one entry per teacher layer and "
                "layerwise_dist does not know how to carry it to the chosen layers"
            )
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(cfg, key):
            delattr(cfg, key)
    cfg.dtype = torch.float32
    setattr(cfg, CONFIG_KEY, layer_map_info)
    return cfg


def build_student(
    source: str | Path | PreTrainedModel, layers: Sequence[int], teacher_name: str | None = None
) -> tuple[PreTrainedModel, list[int]]:
    """A trainable fp32 student of the teacher's class holding teacher layers ``layers`` in order.

    ``source`` is a HF model folder or an in-memory model (fp32/bf16, or bitsandbytes 4-/8-bit, which is
    dequantized). The student gets the source's embeddings, final norm and LM head (tied if the source
    ties them) and fresh per-layer attributes (``self_attn.layer_idx`` = its own index, for the KV cache).
    Returns ``(student, layer_map)`` with ``layer_map[i] = layers[i]``; the map and the teacher name are
    stored in ``student.config.layerwise_dist``.

    A folder holding safetensors weights (``model.safetensors``, or shards listed in
    ``model.safetensors.index.json``) is read tensor by tensor: the student is built on the meta device and
    gets only the chosen layers' tensors, the embeddings, the final norm and the head, each read from disk
    straight into its own fp32 buffer, so the peak host memory is the student's size, not the teacher's.
    Every other source goes through the general path, which holds the whole teacher in memory while
    copying: an in-memory model, a folder of ``pytorch_model.bin`` weights, a quantized checkpoint (its
    ``config.json`` names a ``quantization_config``), one whose tensor names differ from the model's
    parameter names (transformers renames them on load) or of a dtype safetensors' reader here does not
    know. (GGUF teachers reach this function as the safetensors folder :mod:`.teacher` converts them to.)
    Both paths give bit-identical students.
    """
    from transformers import AutoModelForCausalLM, PreTrainedModel

    layer_map = [int(t) for t in layers]
    if isinstance(source, (str, Path)):
        name = teacher_name or str(source)
        folder = Path(source)
        if not folder.is_dir():
            raise StudentError(f"student source {str(source)!r} is not a model folder")
        try:
            return _build_from_safetensors(folder, layer_map, name)
        except _NotReadableByTensor as e:
            log.info("student from %s: whole-teacher path (%s)", folder, e)
        # Checkpoint dtype: the tensors the student keeps are upcast one by one below.
        source = AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto")
    elif isinstance(source, PreTrainedModel):
        name = teacher_name or getattr(source.config, "_name_or_path", "") or type(source).__name__
    else:
        raise StudentError(f"student source must be a model folder or a PreTrainedModel; got {type(source).__name__}")
    _check_layer_map(layer_map, int(source.config.num_hidden_layers))

    prefix = decoder_layers_path(source)
    cfg = _student_config(source.config, layer_map, {"layer_map": layer_map, "teacher": name})
    with _no_init():
        student = type(source)(cfg)
    student.to(torch.float32)

    tensors = _source_tensors(source)
    missing = []
    with torch.no_grad():
        student_items = itertools.chain(
            student.named_parameters(remove_duplicate=False), student.named_buffers(remove_duplicate=False)
        )
        for key, target in student_items:
            src_key = _teacher_key(key, prefix, layer_map)
            if src_key not in tensors:
                missing.append(key)
                continue
            src = _dequantized(*tensors[src_key])
            if src.shape != target.shape:
                raise StudentError(
                    f"{src_key}: teacher shape {tuple(src.shape)} != student shape {tuple(target.shape)}"
                )
            target.copy_(src)
    missing_params = [k for k in missing if k in dict(student.named_parameters(remove_duplicate=False))]
    if missing_params:
        raise StudentError(f"no teacher weights for student parameters {missing_params[:5]}")
    if getattr(cfg, "tie_word_embeddings", False):
        student.tie_weights()
    if getattr(source, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(source.generation_config)
    return _finish(student, source, prefix, layer_map), layer_map


def _check_layer_map(layer_map: list[int], num_teacher: int) -> None:
    if not layer_map:
        raise StudentError("the student needs at least one teacher layer")
    _check_teacher_indices(layer_map, num_teacher, "layers")


def _teacher_key(student_key: str, prefix: str, layer_map: list[int]) -> str:
    """The teacher's name for a student tensor: ``{prefix}.{i}.rest`` -> ``{prefix}.{layer_map[i]}.rest``."""
    head = prefix + "."
    if student_key.startswith(head):
        index, _, rest = student_key[len(head) :].partition(".")
        if index.isdigit() and rest:
            return f"{head}{layer_map[int(index)]}.{rest}"
    return student_key


def _finish(student: PreTrainedModel, teacher: nn.Module, prefix: str, layer_map: list[int]) -> PreTrainedModel:
    _check_layer_attention(teacher, student, prefix, layer_map)
    for p in student.parameters():
        p.requires_grad_(True)
    student.train()
    return student


class _NotReadableByTensor(Exception):
    """The folder's weights cannot be read tensor by tensor here; :func:`build_student` takes the general path."""


# safetensors dtype names (little-endian on disk, as the format specifies).
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _safetensors_header(path: Path) -> tuple[dict[str, dict], int]:
    """``({name: {"dtype", "shape", "data_offsets"}}, byte offset of the data)`` of one safetensors file."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size <= 0 or size > path.stat().st_size - 8:
                raise ValueError(f"header length {size} does not fit the file")
            header = json.loads(f.read(size))
    except (OSError, ValueError) as e:
        raise StudentError(f"{path}: not a readable safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise StudentError(f"{path}: not a readable safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    return header, 8 + size


def safetensors_files(folder: Path) -> dict[str, Path] | None:
    """Tensor name -> the safetensors file holding it, for a folder with ``model.safetensors`` or a sharded
    ``model.safetensors.index.json``; None for a folder without safetensors weights."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StudentError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        files = {name: folder / shard for name, shard in weight_map.items()}
        absent = sorted({str(p) for p in files.values() if not p.is_file()})
        if absent:
            raise StudentError(f"{index} lists shards that are not there: {absent[:3]}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return {name: single for name in _safetensors_header(single)[0]}
    return None


def _read_tensors(wanted: dict[str, str], files: dict[str, Path]) -> dict[str, torch.Tensor]:
    """``{student name: tensor}`` for ``wanted`` = ``{student name: checkpoint name}``, each read from its file
    straight into a buffer of its own (no memory map, nothing else of the file read); floating-point
    tensors are returned in fp32. Files are opened once each and read in offset order."""
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for key, src in wanted.items():
        by_file.setdefault(files[src], []).append((key, src))
    out: dict[str, torch.Tensor] = {}
    for path, items in by_file.items():
        header, base = _safetensors_header(path)
        absent = [src for _, src in items if src not in header]
        if absent:
            raise StudentError(f"{path} does not hold {absent[:3]} (its index says it does)")
        items.sort(key=lambda item: header[item[1]]["data_offsets"][0])
        with open(path, "rb") as f:
            for key, src in items:
                entry = header[src]
                dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
                if dtype is None:
                    raise _NotReadableByTensor(f"{src} has dtype {entry.get('dtype')}")
                begin, end = entry["data_offsets"]
                tensor = torch.empty(entry["shape"], dtype=dtype)
                nbytes = tensor.numel() * tensor.element_size()
                if end - begin != nbytes:
                    raise StudentError(f"{path}: {src} spans {end - begin} bytes, its shape and dtype need {nbytes}")
                if nbytes:
                    f.seek(base + begin)
                    buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
                    if f.readinto(buffer) != nbytes:
                        raise StudentError(f"{path}: truncated at {src}")
                # An fp32 checkpoint's tensor is already the student's buffer; others are upcast once.
                out[key] = tensor.to(torch.float32) if tensor.is_floating_point() else tensor
                del tensor
    return out


def _build_from_safetensors(folder: Path, layer_map: list[int], name: str) -> tuple[PreTrainedModel, list[int]]:
    """:func:`build_student` from a folder of safetensors weights, reading only what the student holds."""
    from accelerate import init_empty_weights
    from transformers import GenerationConfig

    if sys.byteorder != "little":
        raise _NotReadableByTensor("safetensors data is little-endian, this machine is not")
    files = safetensors_files(folder)
    if files is None:
        raise _NotReadableByTensor("no safetensors weights in the folder")
    from transformers import AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder))
    if getattr(config, "quantization_config", None):
        raise _NotReadableByTensor("a quantized checkpoint")
    _check_layer_map(layer_map, int(config.num_hidden_layers))
    # The teacher's module tree without any storage: where its layers live, their attention settings.
    with torch.device("meta"):
        teacher = AutoModelForCausalLM.from_config(config)
    prefix = decoder_layers_path(teacher)
    cfg = _student_config(config, layer_map, {"layer_map": layer_map, "teacher": name})
    # Parameters on the meta device (no memory), buffers computed as usual (rotary frequencies, ...).
    with _no_init(), init_empty_weights(include_buffers=False):
        student = type(teacher)(cfg)
    student.to(torch.float32)
    targets = student.state_dict(keep_vars=True)
    wanted, seen = {}, set()
    for key, target in targets.items():
        src = _teacher_key(key, prefix, layer_map)
        if src in files and id(target) not in seen:  # a tensor tied at init (the head) is read once
            wanted[key] = src
            seen.add(id(target))
    loaded = _read_tensors(wanted, files)
    for key, tensor in loaded.items():
        if tensor.shape != targets[key].shape:
            raise StudentError(
                f"{wanted[key]}: teacher shape {tuple(tensor.shape)} != student shape {tuple(targets[key].shape)}"
            )
    student.load_state_dict(loaded, strict=False, assign=True)
    del loaded
    if getattr(cfg, "tie_word_embeddings", False):
        student.tie_weights()
    unset = [
        key
        for key, t in itertools.chain(student.named_parameters(), student.named_buffers())
        if t.device.type == "meta"
    ]
    if unset:
        raise _NotReadableByTensor(f"no tensor in the checkpoint for {unset[:3]}")
    if student.can_generate():
        # As from_pretrained: generation_config.json, else the generation fields of config.json.
        try:
            student.generation_config = GenerationConfig.from_pretrained(str(folder))
        except OSError:
            student.generation_config = GenerationConfig.from_pretrained(
                str(folder), config_file_name="config.json", _from_model_config=True
            )
    return _finish(student, teacher, prefix, layer_map), layer_map


# Per-layer attention settings a decoder layer keeps on its attention module (Gemma 2/3, Qwen2/3, Mistral, ...).
_ATTENTION_ATTRIBUTES = ("layer_type", "is_sliding", "sliding_window", "attention_type", "use_rope")


def _check_layer_attention(source: nn.Module, student: nn.Module, prefix: str, layer_map: list[int]) -> None:
    """Student layer i attends like teacher layer layer_map[i] (sliding or global, window, RoPE)."""
    t_layers, s_layers = source.get_submodule(prefix), student.get_submodule(prefix)
    for i, t in enumerate(layer_map):
        t_attn = getattr(t_layers[t], "self_attn", t_layers[t])
        s_attn = getattr(s_layers[i], "self_attn", s_layers[i])
        for attr in _ATTENTION_ATTRIBUTES:
            if hasattr(t_attn, attr) and getattr(t_attn, attr) != getattr(s_attn, attr, None):
                raise StudentError(
                    f"student layer {i} has {attr}={getattr(s_attn, attr, None)!r} but its teacher layer {t} has "
                    f"{getattr(t_attn, attr)!r}: the config's per-layer settings did not follow the chosen layers"
                )


def load_layer_map(
    model_or_dir: str | Path | PreTrainedModel | PretrainedConfig,
    override: Sequence[int] | None = None,
    num_teacher_layers: int | None = None,
) -> list[int]:
    """The student -> teacher layer map: ``override`` (``student.layer_map``) if non-empty, else the one
    stored by :func:`build_student`; checked against the student depth and, if given, the teacher's."""
    from transformers import PreTrainedModel

    if isinstance(model_or_dir, PreTrainedModel):
        config = model_or_dir.config
    elif isinstance(model_or_dir, PretrainedConfig):
        config = model_or_dir
    else:
        config = AutoConfig.from_pretrained(str(model_or_dir))
    num_student = int(config.num_hidden_layers)
    if override:
        return validate_layer_map([int(t) for t in override], num_student, num_teacher_layers)
    stored = getattr(config, CONFIG_KEY, None)
    if not isinstance(stored, dict) or "layer_map" not in stored:
        raise StudentError(
            f"{model_or_dir if isinstance(model_or_dir, (str, Path)) else 'the student'} stores no layer map: "
            "set student.layer_map=[...]"
        )
    return validate_layer_map(list(stored["layer_map"]), num_student, num_teacher_layers)
