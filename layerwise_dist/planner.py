"""Memory planner: per-rank bytes of a distillation run from a model config alone.

No weights are read: the model is built on the ``meta`` device from its config
(:func:`count_model`), and every figure is arithmetic on its parameter shapes,
following what the libraries this package uses really allocate (checked against
measured runs in ``tests/test_planner.py`` and ``benchmarks/bench_planner.py``).

Teacher weights (per rank):

* ``nf4`` (bitsandbytes 4-bit, double quantization, what ``load_teacher`` does):
  every ``nn.Linear`` except the LM head is packed at 0.5 byte per weight, plus its
  quantization state: one uint8 absmax per block of 64 weights, one fp32 absmax per
  256 of those blocks (the double quantization), two code books (16 and 256 fp32)
  and an fp32 offset. Embeddings, norms and the LM head stay in the compute dtype.
* ``int8`` (LLM.int8()): 1 byte per linear weight plus one fp32 scale per output row.
* ``none``: every weight in the compute dtype (bf16 on CUDA, fp32 on CPU).

  ``replicate`` keeps all of it on every rank; ``zero3`` divides every parameter
  (the packed 4-bit weights too) by the number of ranks, while the small
  quantization states stay whole on every rank (they are attributes, not
  parameters, so ZeRO-3 does not partition them).

Student (``student_layers`` decoder layers of the teacher's, plus embeddings, final
norm and LM head), trained by a DeepSpeed engine with Adam, per rank, ``P`` its
parameter count, ``p`` the bytes of the training dtype (2 for bf16, 4 for fp32):

* parameters ``P*p`` (ZeRO-2) or ``P*p/N`` (ZeRO-3);
* gradients ``P*p/N``: the partitioned gradient buffer of both stages (ZeRO-2's
  reduce bucket is left out, as are transient full gradients of one bucket);
* optimizer ``P*12/N``: Adam's two fp32 moments plus DeepSpeed's fp32 master copy of
  the partition, which DeepSpeed keeps in fp32 training too (it clones the partition);
* ``zero0`` (plain data parallel, ``ds_configs/zero0.json``) and ``zero1`` partition no
  gradients: ``P*p`` each, ``P*4`` in bf16 (DeepSpeed's bf16 optimizer accumulates them in
  fp32); ``zero0`` keeps every optimizer state on every rank, ``P*8`` in fp32 (Adam's moments
  on the module's own parameters) or ``P*12`` in bf16 (with the fp32 master copy); ``zero1``
  partitions them, ``P*12/N``. Neither is in the plan's table (``STUDENT_PLACEMENTS``): at two
  ranks and more they need more than ``zero2``;
* ``offload_optimizer``: the optimizer states and the fp32 gradient partition live on
  the host (``P*16/N`` host bytes), the device keeps the parameters;
* ``offload_param`` (ZeRO-3 only): the parameter partition lives on the host too;
* ZeRO-3 gathers one module at a time while it runs: the working set is the largest
  gathered module (one decoder layer, or the embedding / LM head) in the training
  dtype, counted once for the student and once for a ZeRO-3 teacher.

Activations of one micro-batch of ``B`` sequences of ``T`` tokens, per rank, for a
Llama-style block (RMSNorm, attention with ``kv`` = key/value width, SwiGLU MLP of
width ``I``), ``p`` the compute dtype's bytes; what autograd saves per token per layer:

    2 * (4h + 4 + 2*p*h)       two RMSNorms: fp32 input, fp32 rsqrt, normalised and output in p
  + p * (2h + 2*kv)            attention: q, k, v (RoPE'd) and the attention output
  + 4 * heads                  the attention's fp32 log-sum-exp (SDPA flash / flash-attn)
  + p * 4*I                    MLP: gate, up, silu(gate), their product

The attention itself is fused (no ``T x T`` matrix is stored). Logits: the LM head
output ``B*T*V*p`` plus the fp32 log-softmax the loss keeps, ``B*T*V*4``
(``logit_tokens`` < ``T`` when only answer positions get logits). With activation
checkpointing only each layer's input (``B*T*h*p``) is kept, plus one layer's
activations while it is recomputed. The frozen teacher's forward keeps its logits and
its hidden states for the alignment loss: ``B*T*(V + (L+1)*h)*p``.

Not counted: the CUDA context and allocator fragmentation (a placement "fits" when
the prediction is at most ``usable`` (90%) of the GPU memory), the Python process
itself on the host, and communication buffers.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QUANTIZATIONS = ("nf4", "int8", "none")
TEACHER_PLACEMENTS = ("replicate", "zero3")
STUDENT_PLACEMENTS = ("zero2", "zero2+offload_opt", "zero3", "zero3+offload_opt", "zero3+offload_all")
UNPARTITIONED_GRADIENTS = ("zero0", "zero1")  # planned for a run's own JSON (preflight), not tabled
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
DEFAULT_RANKS = (1, 2, 4, 8, 16)
NF4_BLOCK = 64
NF4_NESTED_BLOCK = 256
# Code books and offset of one NF4 linear with double quantization: 16 + 256 fp32 values, one fp32 offset.
NF4_STATE_FIXED = (16 + 256 + 1) * 4

# Built-in shapes (no config file needed).
PRESETS: dict[str, dict[str, Any]] = {
    "llama3-8b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 14336,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
    },
}


class PlanError(ValueError):
    """A model config the planner cannot read, an invalid argument, or a placement that does not fit."""


# --------------------------------------------------------------------------- sizes


def parse_bytes(text: str | int | float) -> int:
    """``80GB`` -> 80e9, ``80GiB`` -> 80 * 2**30, ``1TB``, ``512MB``, or a plain number of bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?)([bB]?)\s*", str(text))
    if not m:
        raise PlanError(f"cannot read a memory size from {text!r} (examples: 80GB, 141GiB, 1TB)")
    value, prefix, binary, _ = m.groups()
    power = " KMGT".index(prefix.upper() if prefix else " ")
    return int(float(value) * ((1024 if binary else 1000) ** power))


def fmt_bytes(n: float) -> str:
    """Decimal units (GB = 1e9 bytes), as GPU memory is sold."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}" if n / size < 100 else f"{n / size:.0f} {unit}"
    return f"{int(n)} B"


# --------------------------------------------------------------------------- model shape


@dataclass(frozen=True)
class LayerShape:
    """One decoder layer: its linear weights (out, in) and every other parameter count."""

    linears: tuple[tuple[int, int], ...]
    other_params: int  # norms, biases, anything not a linear weight

    @property
    def params(self) -> int:
        return sum(o * i for o, i in self.linears) + self.other_params


@dataclass(frozen=True)
class ModelShape:
    """Parameter shapes of a causal LM, counted on the meta device."""

    model_type: str
    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    layers: tuple[LayerShape, ...]
    embed_params: int  # input embedding (and any other embedding outside the layers)
    head_params: int  # LM head weight (0 when tied to the embedding)
    other_linears: tuple[tuple[int, int], ...]  # quantizable linears outside the layers (rare)
    other_params: int  # final norm and the rest outside the layers

    @property
    def total_params(self) -> int:
        return (
            sum(layer.params for layer in self.layers)
            + self.embed_params
            + self.head_params
            + sum(o * i for o, i in self.other_linears)
            + self.other_params
        )

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def student(self, num_layers: int, layers: Sequence[int] | None = None) -> ModelShape:
        """The shape of a student keeping ``layers`` (default: the ``num_layers`` largest ones)."""
        if layers is None:
            if not 0 < num_layers <= self.num_layers:
                raise PlanError(f"student layers must be in 1..{self.num_layers}; got {num_layers}")
            order = sorted(range(self.num_layers), key=lambda i: -self.layers[i].params)
            layers = sorted(order[:num_layers])
        kept = tuple(self.layers[i] for i in layers)
        return dataclasses.replace(self, num_layers=len(kept), layers=kept)


def load_config(source: Any) -> Any:
    """A ``PretrainedConfig`` from a config object, a preset name, a config.json or a model folder."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source
    if isinstance(source, dict):
        raw = dict(source)
        return AutoConfig.for_model(raw.pop("model_type"), **raw)
    if isinstance(source, str) and source in PRESETS:
        return load_config(PRESETS[source])
    path = Path(source).expanduser()
    if path.is_file():
        import json

        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise PlanError(f"cannot read the model config {path}: {e}") from None
        if "model_type" not in raw:
            raise PlanError(f"{path} has no model_type: not a Hugging Face config.json")
        raw.pop("quantization_config", None)
        return load_config(raw)
    if path.is_dir() and (path / "config.json").is_file():
        return load_config(path / "config.json")
    raise PlanError(f"no model config at {source!r} (a preset {sorted(PRESETS)}, a config.json or a model folder)")


def _decoder_layers(model: Any, num_layers: int) -> tuple[str, Any]:
    import torch.nn as nn

    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return name, module
    raise PlanError(f"cannot find the {num_layers} decoder layers (a ModuleList) in {type(model).__name__}")


def count_model(config: Any) -> ModelShape:
    """Build the model on the meta device (no memory, no weights) and read its parameter shapes."""
    import torch
    import torch.nn as nn
    from transformers import AutoModelForCausalLM

    config = load_config(config)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # any architecture error: one clear line
        raise PlanError(f"cannot build {getattr(config, 'model_type', '?')} on the meta device: {e}") from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_layers = int(text.num_hidden_layers)
    prefix, layer_list = _decoder_layers(model, num_layers)
    head = model.get_output_embeddings()
    head_weight = head.weight if head is not None else None
    seen: set[int] = set()

    def module_params(module: nn.Module) -> tuple[list[tuple[int, int]], int]:
        linears, other = [], 0
        for sub in module.modules():
            for pname, p in sub.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                if isinstance(sub, nn.Linear) and pname == "weight" and sub is not head:
                    linears.append(tuple(p.shape))
                else:
                    other += p.numel()
        return linears, other

    layers = []
    for layer in layer_list:
        linears, other = module_params(layer)
        layers.append(LayerShape(tuple(linears), other))
    embed_params = head_params = other = 0
    other_linears: list[tuple[int, int]] = []
    for sub in model.modules():
        for pname, p in sub.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(sub, nn.Embedding):
                embed_params += p.numel()
            elif head_weight is not None and p is head_weight:
                head_params += p.numel()
            elif isinstance(sub, nn.Linear) and pname == "weight":
                other_linears.append(tuple(p.shape))
            else:
                other += p.numel()
    heads = int(text.num_attention_heads)
    hidden = int(text.hidden_size)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    tied = head_weight is not None and any(
        head_weight is e.weight for e in model.modules() if isinstance(e, nn.Embedding)
    )
    return ModelShape(
        model_type=str(config.model_type),
        num_layers=num_layers,
        hidden=hidden,
        intermediate=int(getattr(text, "intermediate_size", 4 * hidden)),
        heads=heads,
        kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=head_dim,
        vocab=int(text.vocab_size),
        tied=tied,
        layers=tuple(layers),
        embed_params=embed_params,
        head_params=head_params,
        other_linears=tuple(other_linears),
        other_params=other,
    )


# --------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class WeightBytes:
    """Bytes of a model's weights in one quantization, split by what ZeRO-3 partitions."""

    partitioned: int  # parameters (packed 4-bit / int8 / full-precision tensors): divided by N under ZeRO-3
    replicated: int  # quantization states: whole on every rank
    quantized_linears: int  # of ``partitioned``: the packed linear weights alone (0 for ``none``)

    def per_rank(self, ranks: int, placement: str) -> int:
        if placement == "replicate":
            return self.partitioned + self.replicated
        return math.ceil(self.partitioned / ranks) + self.replicated

    @property
    def total(self) -> int:
        return self.partitioned + self.replicated


def _all_linears(shape: ModelShape) -> Iterable[tuple[int, int]]:
    for layer in shape.layers:
        yield from layer.linears
    yield from shape.other_linears


def weight_bytes(shape: ModelShape, quantization: str = "nf4", dtype: str = "bf16") -> WeightBytes:
    """Bytes of every weight, as bitsandbytes (``nf4``/``int8``) or plain torch (``none``) store them."""
    if quantization not in QUANTIZATIONS:
        raise PlanError(f"quantization must be one of {QUANTIZATIONS}; got {quantization!r}")
    p = _dtype_bytes(dtype)
    linear_params = sum(o * i for o, i in _all_linears(shape))
    full_precision = (shape.total_params - linear_params) * p  # embeddings, norms, LM head
    if quantization == "none":
        return WeightBytes(shape.total_params * p, 0, 0)
    packed = state = 0
    for out_f, in_f in _all_linears(shape):
        n = out_f * in_f
        if quantization == "nf4":
            packed += (n + 1) // 2
            blocks = math.ceil(n / NF4_BLOCK)
            state += blocks + math.ceil(blocks / NF4_NESTED_BLOCK) * 4 + NF4_STATE_FIXED
        else:  # int8: the int8 matrix and one fp32 scale per output row
            packed += n
            state += out_f * 4
    return WeightBytes(packed + full_precision, state, packed)


def _dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise PlanError(f"dtype must be one of {sorted(DTYPE_BYTES)}; got {dtype!r}")
    return DTYPE_BYTES[dtype]


def scoring_flops(shape: ModelShape, seq: int, answer_only: bool) -> float:
    """Forward FLOPs of scoring one prompt of ``seq`` tokens: 2 x the layers' weights per token, causal
    attention (scores and values), and the LM head at every position (full path) or at one (answer-only)."""
    layer = sum(layer.params for layer in shape.layers)
    attention = shape.num_layers * 2 * 2 * seq * (seq + 1) / 2 * shape.heads * shape.head_dim
    head = 2 * shape.vocab * shape.hidden * (1 if answer_only else seq)
    return 2 * layer * seq + attention + head


def largest_module_params(shape: ModelShape) -> int:
    """Parameters of the largest module ZeRO-3 gathers at once: one decoder layer, the embedding or the head."""
    return max([layer.params for layer in shape.layers] + [shape.embed_params, shape.head_params])


# --------------------------------------------------------------------------- student states


@dataclass(frozen=True)
class StudentStates:
    """Per-rank bytes of the student's training states, on the device and on the host."""

    params: int
    grads: int
    optimizer: int  # Adam moments + fp32 master copy
    gathered: int  # ZeRO-3 working set (one gathered module)
    host: int  # offloaded to CPU memory

    @property
    def device(self) -> int:
        return self.params + self.grads + self.optimizer + self.gathered


def student_states(shape: ModelShape, ranks: int, placement: str, dtype: str = "bf16") -> StudentStates:
    """Bytes of the student's parameters, gradients and Adam states under one DeepSpeed placement."""
    if placement not in STUDENT_PLACEMENTS + UNPARTITIONED_GRADIENTS:
        raise PlanError(
            f"student placement must be one of {STUDENT_PLACEMENTS + UNPARTITIONED_GRADIENTS}; got {placement!r}"
        )
    if ranks < 1:
        raise PlanError(f"ranks must be >= 1; got {ranks}")
    p = _dtype_bytes(dtype)
    n_params = shape.total_params
    part = math.ceil(n_params / ranks)
    if placement in UNPARTITIONED_GRADIENTS:
        grads = n_params * (4 if p == 2 else p)  # bf16: DeepSpeed's bf16 optimizer accumulates them in fp32
        if placement == "zero0":
            optimizer = n_params * (12 if p == 2 else 8)  # fp32: Adam's moments on the parameters themselves
        else:
            optimizer = part * 12
        return StudentStates(n_params * p, grads, optimizer, 0, 0)
    stage3 = placement.startswith("zero3")
    params = part * p if stage3 else n_params * p
    grads = part * p
    optimizer = part * 12  # two fp32 Adam moments + the fp32 master partition
    gathered = largest_module_params(shape) * p if stage3 else 0
    host = 0
    if "offload" in placement:
        host += optimizer + part * 4  # states + the fp32 gradient partition
        optimizer = 0
        grads = 0
    if placement == "zero3+offload_all":
        host += params
        params = 0
    return StudentStates(params, grads, optimizer, gathered, host)


# --------------------------------------------------------------------------- activations


def layer_activation_bytes_per_token(shape: ModelShape, dtype: str = "bf16") -> int:
    """What autograd keeps per token for one Llama-style decoder layer (module docstring formula)."""
    p = _dtype_bytes(dtype)
    h, kv, inter = shape.hidden, shape.kv_width, shape.intermediate
    norms = 2 * (4 * h + 4 + 2 * p * h)
    attention = p * (2 * h + 2 * kv) + 4 * shape.heads
    mlp = p * 4 * inter
    return norms + attention + mlp


@dataclass(frozen=True)
class Activations:
    layers: int  # decoder layers (all of them, or layer inputs + one layer under checkpointing)
    logits: int  # LM head output + the loss's fp32 log-softmax
    teacher_outputs: int  # the frozen teacher's logits and hidden states kept for the loss

    @property
    def total(self) -> int:
        return self.layers + self.logits + self.teacher_outputs


def activation_bytes(
    student: ModelShape,
    batch: int,
    seq: int,
    dtype: str = "bf16",
    checkpointing: bool = False,
    teacher: ModelShape | None = None,
    logit_tokens: int | None = None,
) -> Activations:
    """Activation bytes of one training micro-batch ``batch x seq`` on one rank.

    ``logit_tokens``: positions per sequence that get logits (default ``seq``, the full path; 1 for
    answer-only heads). ``teacher``: the frozen teacher whose logits and hidden states the loss reads
    (omit for a plain training step)."""
    if batch < 1 or seq < 1:
        raise PlanError(f"batch and seq must be >= 1; got {batch} x {seq}")
    p = _dtype_bytes(dtype)
    tokens = batch * seq
    per_layer = layer_activation_bytes_per_token(student, dtype) * tokens
    final_norm = (4 * student.hidden + 4 + 2 * p * student.hidden) * tokens
    if checkpointing:
        layers = student.num_layers * tokens * student.hidden * p + per_layer + final_norm
    else:
        layers = student.num_layers * per_layer + final_norm
    lt = batch * (seq if logit_tokens is None else logit_tokens)
    logits = lt * student.vocab * (p + 4)
    teacher_out = 0
    if teacher is not None:
        teacher_out = (lt * teacher.vocab + tokens * (teacher.num_layers + 1) * teacher.hidden) * p
    return Activations(layers, logits, teacher_out)


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Estimate:
    """Per-rank device bytes and per-node host bytes of one complete placement."""

    ranks: int
    teacher_quantization: str
    teacher_placement: str
    student_placement: str
    checkpointing: bool
    teacher: int
    teacher_gathered: int
    student: StudentStates
    activations: Activations
    ranks_per_node: int

    @property
    def device(self) -> int:
        return self.teacher + self.teacher_gathered + self.student.device + self.activations.total

    @property
    def host_per_node(self) -> int:
        return self.student.host * min(self.ranks, self.ranks_per_node)

    def fits(self, gpu_bytes: int, host_bytes: int | None = None, usable: float = 0.9) -> bool:
        ok = self.device <= usable * gpu_bytes
        return ok and (host_bytes is None or self.host_per_node <= usable * host_bytes)

    def describe(self) -> str:
        return (
            f"{self.ranks} rank(s), teacher {self.teacher_quantization} {self.teacher_placement}, "
            f"student {self.student_placement}, activation checkpointing {'on' if self.checkpointing else 'off'}"
        )

    def breakdown(self) -> dict[str, int]:
        return {
            "teacher": self.teacher,
            "teacher_gathered": self.teacher_gathered,
            "student_params": self.student.params,
            "student_grads": self.student.grads,
            "student_optimizer": self.student.optimizer,
            "student_gathered": self.student.gathered,
            "activations_layers": self.activations.layers,
            "activations_logits": self.activations.logits,
            "teacher_outputs": self.activations.teacher_outputs,
            "device_total": self.device,
            "host_per_rank": self.student.host,
            "host_per_node": self.host_per_node,
        }


@dataclass
class Plan:
    """Every placement's estimate for ranks in ``ranks``; render with :func:`render_plan`."""

    model: str
    teacher: ModelShape
    student: ModelShape
    batch: int
    seq: int
    dtype: str
    ranks_per_node: int
    gpu_bytes: int | None = None
    host_bytes: int | None = None
    usable: float = 0.9
    estimates: list[Estimate] = field(default_factory=list)

    def teacher_bytes(self, quantization: str, placement: str, ranks: int) -> int:
        return weight_bytes(self.teacher, quantization, self.dtype).per_rank(ranks, placement)

    def find(self, ranks: int, quantization: str, placement: str, student: str, ckpt: bool) -> Estimate:
        for e in self.estimates:
            key = (e.ranks, e.teacher_quantization, e.teacher_placement, e.student_placement, e.checkpointing)
            if key == (ranks, quantization, placement, student, ckpt):
                return e
        raise KeyError((ranks, quantization, placement, student, ckpt))

    def fitting(self) -> list[Estimate]:
        if self.gpu_bytes is None:
            return list(self.estimates)
        return [e for e in self.estimates if e.fits(self.gpu_bytes, self.host_bytes, self.usable)]


def estimate(
    teacher: ModelShape,
    student: ModelShape,
    ranks: int,
    batch: int,
    seq: int,
    teacher_quantization: str = "nf4",
    teacher_placement: str = "zero3",
    student_placement: str = "zero3",
    checkpointing: bool = False,
    dtype: str = "bf16",
    ranks_per_node: int = 8,
    logit_tokens: int | None = None,
) -> Estimate:
    """One placement's per-rank memory (see the module docstring for every term)."""
    if teacher_placement not in TEACHER_PLACEMENTS:
        raise PlanError(f"teacher placement must be one of {TEACHER_PLACEMENTS}; got {teacher_placement!r}")
    p = _dtype_bytes(dtype)
    weights = weight_bytes(teacher, teacher_quantization, dtype)
    gathered = 0
    if teacher_placement == "zero3" and ranks > 1:
        # One gathered module at a time; 4-bit layers gather packed (the layer's share of the packed bytes).
        layer = max(layer.params for layer in teacher.layers)
        per_param = {"nf4": 0.5, "int8": 1.0, "none": p}[teacher_quantization]
        gathered = max(int(layer * per_param), max(teacher.embed_params, teacher.head_params) * p)
    return Estimate(
        ranks=ranks,
        teacher_quantization=teacher_quantization,
        teacher_placement=teacher_placement,
        student_placement=student_placement,
        checkpointing=checkpointing,
        teacher=weights.per_rank(ranks, teacher_placement),
        teacher_gathered=gathered,
        student=student_states(student, ranks, student_placement, dtype),
        activations=activation_bytes(student, batch, seq, dtype, checkpointing, teacher, logit_tokens),
        ranks_per_node=ranks_per_node,
    )


def plan(
    config: Any,
    student_layers: int,
    ranks: Sequence[int] = DEFAULT_RANKS,
    batch: int = 2,
    seq: int = 768,
    *,
    dtype: str = "bf16",
    gpu_mem: str | int | None = None,
    host_mem: str | int | None = None,
    ranks_per_node: int = 8,
    quantizations: Sequence[str] = QUANTIZATIONS,
    teacher_placements: Sequence[str] = TEACHER_PLACEMENTS,
    student_placements: Sequence[str] = STUDENT_PLACEMENTS,
    checkpointing: Sequence[bool] = (False, True),
    logit_tokens: int | None = None,
    usable: float = 0.9,
    name: str | None = None,
) -> Plan:
    """Every placement of a ``student_layers``-layer student of ``config`` at each rank count.

    ``config``: a ``PretrainedConfig``, a preset name (``llama3-8b``), a config.json or a model folder;
    ``batch`` x ``seq``: one micro-batch per rank; ``gpu_mem`` / ``host_mem``: per GPU and per node
    (``80GB``, ``1TB``), used by :meth:`Plan.fitting` and the rendered verdicts."""
    teacher = count_model(config)
    student = teacher.student(student_layers)
    if ranks_per_node < 1:
        raise PlanError(f"ranks_per_node must be >= 1; got {ranks_per_node}")
    result = Plan(
        model=name or str(getattr(load_config(config), "_name_or_path", "") or teacher.model_type),
        teacher=teacher,
        student=student,
        batch=batch,
        seq=seq,
        dtype=dtype,
        ranks_per_node=ranks_per_node,
        gpu_bytes=None if gpu_mem is None else parse_bytes(gpu_mem),
        host_bytes=None if host_mem is None else parse_bytes(host_mem),
        usable=usable,
    )
    for n in ranks:
        for q in quantizations:
            for tp in teacher_placements:
                for sp in student_placements:
                    for ckpt in checkpointing:
                        result.estimates.append(
                            estimate(
                                teacher, student, n, batch, seq, q, tp, sp, ckpt, dtype, ranks_per_node, logit_tokens
                            )
                        )
    return result


def check_fits(
    config: Any,
    student_layers: int,
    ranks: int,
    batch: int,
    seq: int,
    *,
    gpu_mem: str | int,
    host_mem: str | int | None = None,
    teacher_quantization: str = "nf4",
    teacher_placement: str = "zero3",
    student_placement: str = "zero3",
    checkpointing: bool = False,
    dtype: str = "bf16",
    ranks_per_node: int = 8,
    logit_tokens: int | None = None,
    usable: float = 0.9,
) -> Estimate:
    """The estimate of the one placement a run will use; raises :class:`PlanError` when it cannot fit.

    "Cannot fit" means: the predicted per-rank device bytes exceed ``usable`` (90%) of ``gpu_mem``, or
    the offloaded bytes of the ranks on one node exceed ``usable`` of ``host_mem``. The message names
    the largest terms and the placements of the same run that would fit."""
    teacher = count_model(config)
    student = teacher.student(student_layers)
    gpu, host = parse_bytes(gpu_mem), None if host_mem is None else parse_bytes(host_mem)
    args = (teacher, student, ranks, batch, seq)
    chosen = estimate(*args, teacher_quantization, teacher_placement, student_placement, checkpointing, dtype,
                      ranks_per_node, logit_tokens)  # fmt: skip
    if chosen.fits(gpu, host, usable):
        return chosen
    alternatives = [
        estimate(*args, teacher_quantization, tp, sp, ck, dtype, ranks_per_node, logit_tokens)
        for tp in TEACHER_PLACEMENTS
        for sp in STUDENT_PLACEMENTS
        for ck in (False, True)
    ]
    fitting = sorted((e for e in alternatives if e.fits(gpu, host, usable)), key=lambda e: e.device)
    parts = sorted(((v, k) for k, v in chosen.breakdown().items() if k.startswith(("teacher", "student", "act"))),
                   reverse=True)[:3]  # fmt: skip
    msg = (
        f"the planned placement cannot fit: {chosen.describe()} needs {fmt_bytes(chosen.device)} per GPU "
        f"(usable {fmt_bytes(usable * gpu)} of {fmt_bytes(gpu)})"
    )
    if host is not None:
        msg += f" and {fmt_bytes(chosen.host_per_node)} host memory per node (usable {fmt_bytes(usable * host)})"
    msg += "; largest: " + ", ".join(f"{k} {fmt_bytes(v)}" for v, k in parts)
    if fitting:
        msg += "; these fit: " + "; ".join(
            f"teacher {e.teacher_placement} + student {e.student_placement}"
            f"{' + activation checkpointing' if e.checkpointing else ''} ({fmt_bytes(e.device)})"
            for e in fitting[:3]
        )
    else:
        msg += "; no placement fits at this rank count: use more ranks, a smaller batch/sequence or fewer layers"
    raise PlanError(msg)


# --------------------------------------------------------------------------- rendering


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def render_plan(result: Plan, quantization: str = "nf4") -> str:
    """Markdown: teacher bytes per rank, student states per rank, activations, and which placements fit."""
    t, s = result.teacher, result.student
    ranks = sorted({e.ranks for e in result.estimates})
    lines = [
        f"Memory plan: {result.model}, teacher {t.num_layers} layers ({t.total_params / 1e9:.2f} B params) -> "
        f"student {s.num_layers} layers ({s.total_params / 1e9:.2f} B params), {result.dtype}, "
        f"micro-batch {result.batch} x {result.seq} tokens per rank, {result.ranks_per_node} ranks per node",
        "",
        "Teacher weights per rank:",
        "",
    ]
    quants = sorted({e.teacher_quantization for e in result.estimates}, key=QUANTIZATIONS.index)
    header = ["ranks"] + [f"{q} {pl}" for q in quants for pl in TEACHER_PLACEMENTS]
    rows = [[str(n)] + [fmt_bytes(result.teacher_bytes(q, pl, n)) for q in quants for pl in TEACHER_PLACEMENTS]
            for n in ranks]  # fmt: skip
    lines += _table(header, rows)
    lines += ["", "Student states per rank, device (+ host when offloaded): params / grads / Adam+master:", ""]
    placements = sorted({e.student_placement for e in result.estimates}, key=STUDENT_PLACEMENTS.index)
    rows = []
    for n in ranks:
        row = [str(n)]
        for sp in placements:
            st = student_states(s, n, sp, result.dtype)
            cell = f"{fmt_bytes(st.params)} / {fmt_bytes(st.grads)} / {fmt_bytes(st.optimizer)}"
            if st.host:
                cell += f" (+{fmt_bytes(st.host)} host)"
            row.append(cell)
        rows.append(row)
    lines += _table(["ranks"] + placements, rows)
    act = {ck: activation_bytes(s, result.batch, result.seq, result.dtype, ck, t) for ck in (False, True)}
    lines += [
        "",
        f"Activations per rank (micro-batch {result.batch} x {result.seq}): layers "
        f"{fmt_bytes(act[False].layers)} without checkpointing, {fmt_bytes(act[True].layers)} with; "
        f"logits {fmt_bytes(act[False].logits)}; teacher logits + hidden states {fmt_bytes(act[False].teacher_outputs)}",
    ]
    fits_known = result.gpu_bytes is not None
    title = f"Device memory per rank (teacher {quantization}) for each placement"
    if fits_known:
        title += f"; ok = fits in {result.usable:.0%} of {fmt_bytes(result.gpu_bytes)}"
        if result.host_bytes is not None:
            title += f" GPU and {fmt_bytes(result.host_bytes)} host per node"
    for ck in sorted({e.checkpointing for e in result.estimates}):
        lines += ["", f"{title}, activation checkpointing {'on' if ck else 'off'}:", ""]
        rows = []
        for n in ranks:
            for tp in TEACHER_PLACEMENTS:
                row = [str(n), f"teacher {tp}"]
                for sp in placements:
                    try:
                        e = result.find(n, quantization, tp, sp, ck)
                    except KeyError:
                        row.append("-")
                        continue
                    cell = fmt_bytes(e.device)
                    if e.host_per_node:
                        cell += f" (host {fmt_bytes(e.host_per_node)}/node)"
                    if fits_known:
                        cell += " ok" if e.fits(result.gpu_bytes, result.host_bytes, result.usable) else " NO"
                    row.append(cell)
                rows.append(row)
        lines += _table(["ranks", "teacher"] + [f"student {sp}" for sp in placements], rows)
    return "\n".join(lines) + "\n"


def plan_to_dict(result: Plan) -> dict[str, Any]:
    """JSON-ready: the shapes' totals and every estimate's breakdown."""
    return {
        "model": result.model,
        "teacher_params": result.teacher.total_params,
        "student_params": result.student.total_params,
        "batch": result.batch,
        "seq": result.seq,
        "dtype": result.dtype,
        "gpu_bytes": result.gpu_bytes,
        "host_bytes": result.host_bytes,
        "estimates": [
            {
                "ranks": e.ranks,
                "teacher_quantization": e.teacher_quantization,
                "teacher_placement": e.teacher_placement,
                "student_placement": e.student_placement,
                "checkpointing": e.checkpointing,
                **e.breakdown(),
                "fits": None
                if result.gpu_bytes is None
                else e.fits(result.gpu_bytes, result.host_bytes, result.usable),
            }
            for e in result.estimates
        ],
    }
