"""One configuration schema for every entry point.

Each section is a typed dataclass; every field carries a one-line ``help`` that
the CLI prints with ``--help``, and every choice is a ``Literal`` alias below. The
dataclasses are OmegaConf structured configs: a YAML preset
(``layerwise_dist/presets/*.yaml``) and ``key=value`` overrides
(``train.max_steps=20``, ``student.layers=[0,4,8]``) are merged onto the schema,
which checks keys, types and choices; ``__post_init__`` checks ranges. Every error
is a one-line :class:`ConfigError` naming the dotted key. The resolved
configuration is saved with every run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

PRESET_DIR = Path(__file__).parent / "presets"

# Every choice field's values, defined once (models, data and CLI read them with typing.get_args).
DataSource = Literal["embedded", "amazon2023", "benchmark_csv", "llmrank", "prepared"]
NegativeSampling = Literal["uniform", "popularity"]
Quantization = Literal["nf4", "int8", "none"]
Placement = Literal["zero3", "replicate"]
AttnImplementation = Literal["auto", "sdpa", "eager", "flash_attention_2"]
Selection = Literal["fisher-topk", "uniform", "last", "first", "list"]
FisherForm = Literal["parameter", "activation"]
FisherLabels = Literal["empirical", "sampled"]
LinearMethod = Literal["auto", "gram", "explicit"]
KDLoss = Literal["forward_kl", "reverse_kl", "jsd"]
AlignLoss = Literal["nmse", "mse", "cosine"]
KDMask = Literal["answer", "all"]
Precision = Literal["auto", "bf16", "fp32"]
EvalSplit = Literal["test", "valid"]
ServeQuantization = Literal["teacher", "none", "nf4", "int8"]
Formulation = Literal["listwise", "pointwise"]
PointwiseScore = Literal["mean", "sum", "pmi"]
CandidatesFormat = Literal["llmrank"]


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _choices(annotation: Any) -> tuple[str, ...] | None:
    return typing.get_args(annotation) if typing.get_origin(annotation) is Literal else None


def _check_choices(section: str, obj: Any) -> None:
    """Literal fields of a section built directly in code (OmegaConf checks them on load)."""
    for name, annotation in _hints(type(obj)).items():
        choices = _choices(annotation)
        if choices is not None and getattr(obj, name) not in choices:
            raise ConfigError(f"{section}.{name} must be one of {', '.join(choices)}; got {getattr(obj, name)!r}")


def _positive(section: str, name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{section}.{name} must be {bound}; got {value!r}")


@dataclass
class DataConfig:
    """Where the reviews come from and how they become ranking prompts."""

    source: DataSource = _f(
        "embedded",
        "embedded (All_Beauty sample shipped with the package), amazon2023, benchmark_csv, llmrank or prepared",
    )
    reviews: str = _f("", "reviews file (jsonl, jsonl.gz, parquet, rating_only csv) or a folder holding the files")
    meta: str = _f("", "item metadata file (jsonl, jsonl.gz, parquet or csv)")
    category: str = _f("All_Beauty", "Amazon Reviews 2023 category name, used in prompts and run names")
    kcore: int = _f(5, "iterative k-core: keep users and items with at least k interactions")
    history_len: int = _f(10, "number of most recent history titles shown in a prompt")
    formulation: Formulation = _f(
        "listwise",
        "listwise (candidates behind letters, score = answer letter log-prob) or pointwise "
        "(history as plain text, score = each candidate title's log-likelihood as the next item)",
    )
    pointwise_score: PointwiseScore = _f(
        "mean",
        "pointwise: mean (length-normalised) or sum of the title's token log-probs, or pmi (sum minus unconditional)",
    )
    category_phrase: str = _f(
        "", "pointwise: plural noun phrase of the items in the prompt, e.g. 'video games' (default: from data.category)"
    )
    num_candidates: int = _f(20, "candidates per prompt: the true next item plus num_candidates-1 negatives")
    train_candidates: int = _f(
        0,
        "pointwise: candidates per training example (the target plus train_candidates-1 negatives; 0 = "
        "num_candidates); validation and test keep num_candidates. Fewer make a training step cheaper: every "
        "candidate title is a forward, a backward and a full-vocabulary head at each of its tokens",
    )
    title_max_tokens: int = _f(24, "each title is cut to this many tokens")
    negative_sampling: NegativeSampling = _f("uniform", "uniform or popularity sampling of negatives")
    max_length: int = _f(768, "prompts longer than this many tokens are an error (raise it or shorten titles)")
    train_targets_per_user: int = _f(1, "train examples per user: the last N train items as targets")
    max_train_examples: int = _f(0, "use at most this many training examples (0 = all)")
    max_eval_examples: int = _f(0, "use at most this many validation/test examples (0 = all)")
    seed: int = _f(1234, "seed of negative sampling and candidate shuffling (identical on every rank)")
    cache_dir: str = _f("", "Hugging Face datasets cache for tokenized examples (default: ~/.cache/layerwise_dist)")
    system_prompt: str = _f(
        "",
        "listwise with a chat template: the system message ('' = none given, so the template's own default "
        "applies; SmolLM2's is 'You are a helpful AI assistant named SmolLM, trained by Hugging Face')",
    )

    #: The fields that decide the text a model sees: a saved student records them, every entry point reuses them.
    PROMPT_FIELDS: typing.ClassVar[tuple[str, ...]] = (
        "formulation",
        "pointwise_score",
        "category",
        "category_phrase",
        "history_len",
        "title_max_tokens",
        "num_candidates",
        "max_length",
        "system_prompt",
    )

    def prompt_settings(self) -> dict[str, Any]:
        """What a saved model must carry to rebuild its prompts exactly."""
        return {name: getattr(self, name) for name in self.PROMPT_FIELDS}

    def with_prompt_settings(self, settings: dict[str, Any]) -> DataConfig:
        """This data config with a model's recorded prompt settings (unknown keys are ignored)."""
        known = {k: v for k, v in settings.items() if k in self.PROMPT_FIELDS}
        return dataclasses.replace(self, **known)

    def __post_init__(self) -> None:
        _check_choices("data", self)
        for name in ("kcore", "history_len", "title_max_tokens", "max_length", "train_targets_per_user"):
            _positive("data", name, getattr(self, name))
        if self.formulation == "listwise" and not 2 <= self.num_candidates <= 26:
            raise ConfigError(
                f"data.num_candidates must be in [2, 26] (one letter label each); got {self.num_candidates}"
            )
        if self.formulation == "pointwise" and not 2 <= self.num_candidates <= 1000:
            raise ConfigError(f"data.num_candidates must be in [2, 1000]; got {self.num_candidates}")
        for name in ("max_train_examples", "max_eval_examples"):
            _positive("data", name, getattr(self, name), allow_zero=True)
        if self.train_candidates and self.formulation != "pointwise":
            raise ConfigError(
                "data.train_candidates is a pointwise setting (listwise prompts label their candidates with "
                "letters, the same set in training and evaluation): leave it 0"
            )
        if self.train_candidates and not 2 <= self.train_candidates <= self.num_candidates:
            raise ConfigError(
                f"data.train_candidates must be 0 or in [2, data.num_candidates={self.num_candidates}]; "
                f"got {self.train_candidates}"
            )
        if self.source != "embedded" and not self.reviews:
            raise ConfigError(f"data.source={self.source} needs data.reviews (a file or folder)")


@dataclass
class TeacherConfig:
    """The frozen teacher LLM and how it is placed on the workers."""

    model: str = _f(
        "embedded:smollm2",
        "a registry name (smollm2-135m = embedded:smollm2, gemma3-270m), tiny or tiny:<llama|gemma3|qwen2|qwen3> "
        "(random model), a HF model folder, a .gguf file or a hub id in the local cache",
    )
    gguf_file: str = _f("", "GGUF file name inside the model folder, when the folder holds one")
    quantization: Quantization = _f("nf4", "nf4 (bitsandbytes 4-bit, double quantization), int8 or none")
    placement: Placement = _f(
        "zero3", "zero3 (partitioned across ranks by DeepSpeed) or replicate (each rank holds it)"
    )
    trust_remote_code: bool = _f(False, "allow model code from the model folder or hub")
    attn_implementation: AttnImplementation = _f(
        "auto", "auto (flash_attention_2 on CUDA with flash-attn, else sdpa), sdpa, eager or flash_attention_2"
    )
    tiny_layers: int = _f(4, "tiny preset: number of decoder layers")
    tiny_hidden: int = _f(64, "tiny preset: hidden size")
    tiny_seed: int = _f(0, "tiny preset: seed of the random weights")

    def __post_init__(self) -> None:
        _check_choices("teacher", self)
        if not self.model:
            raise ConfigError("teacher.model is empty: give embedded:smollm2, tiny, a folder, a .gguf file or a hub id")
        _positive("teacher", "tiny_layers", self.tiny_layers)
        _positive("teacher", "tiny_hidden", self.tiny_hidden)


@dataclass
class StudentConfig:
    """Which teacher layers the student keeps."""

    num_layers: int = _f(8, "number of decoder layers of the student")
    selection: Selection = _f("fisher-topk", "fisher-topk, uniform (evenly spaced), last, first or list")
    layers: list[int] = _f([], "explicit teacher layer indices (selection=list)")
    model: str = _f("", "optional: a separate student model folder (same tokenizer) instead of teacher layers")
    layer_map: list[int] = _f(
        [], "student layer -> teacher layer for alignment (default: the layer it was copied from)"
    )

    def __post_init__(self) -> None:
        _check_choices("student", self)
        _positive("student", "num_layers", self.num_layers)
        if self.selection == "list" and not self.layers and not self.model:
            raise ConfigError("student.selection=list needs student.layers, e.g. student.layers=[0,8,16,24]")
        for name in ("layers", "layer_map"):
            values = getattr(self, name)
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
                raise ConfigError(f"student.{name} must be a list of non-negative integers; got {values!r}")


@dataclass
class FisherConfig:
    """The layerwise Fisher information pass over the teacher."""

    form: FisherForm = _f(
        "parameter", "parameter (per-example squared gradient norm of each layer's weights) or activation"
    )
    labels: FisherLabels = _f("empirical", "empirical (dataset answers) or sampled (drawn from the model: true Fisher)")
    num_examples: int = _f(64, "training examples used for the profile, over all ranks")
    batch_size: int = _f(2, "examples per forward/backward on each rank")
    profile: str = _f("", "reuse an existing FisherProfile JSON instead of measuring")
    seed: int = _f(0, "seed for sampled labels")
    linear_method: LinearMethod = _f(
        "auto", "per-example linear-layer norms: auto (cheaper by shape), gram or explicit (G^T X)"
    )

    def __post_init__(self) -> None:
        _check_choices("fisher", self)
        _positive("fisher", "num_examples", self.num_examples)
        _positive("fisher", "batch_size", self.batch_size)


@dataclass
class DistillConfig:
    """The distillation objective: a*CE + b*KD + sum_l w_l * align_l."""

    ce_weight: float = _f(1.0, "a: weight of task cross-entropy on answer tokens")
    kd_weight: float = _f(1.0, "b: weight of the logit distillation loss")
    kd_loss: KDLoss = _f("forward_kl", "forward_kl (Hinton, T^2 scaled), reverse_kl or jsd")
    temperature: float = _f(2.0, "softmax temperature T of logit KD")
    jsd_beta: float = _f(0.5, "beta of the generalised JSD")
    align_weight: float = _f(1.0, "total weight of hidden-state alignment (per-layer weights sum to 1)")
    align_loss: AlignLoss = _f(
        "nmse", "nmse (MSE relative to the teacher state's norm), mse or cosine between mapped hidden states"
    )
    layer_weighting: str = _f("fisher", "fisher, linear, uniform or a registered strategy name")
    weight_temperature: float = _f(1.0, "fisher weighting: weights ~ profile^(1/temperature)")
    mask: KDMask = _f("answer", "answer (loss on answer tokens only) or all tokens")
    shared_vocab_only: bool = _f(False, "allow teacher/student vocabularies that differ: KD on the shared prefix only")
    list_kd_weight: float = _f(
        1.0, "pointwise: weight of list-level KD (KL of the teacher's softmax over candidate scores to the student's)"
    )
    list_temperature: float = _f(1.0, "pointwise: temperature of the softmax over candidate scores in list-level KD")
    teacher_cache: str = _f(
        "",
        "folder of offline teacher outputs (hidden states, top-k KD targets, scores), computed once per training "
        "example and reused by every run reading it; empty = the teacher runs at every step",
    )
    cache_topk: int = _f(
        0,
        "teacher cache: 0 = the full vocabulary's logits at every loss position (KD as online; V x 2 bytes each in "
        "bf16); k > 0 = the teacher's top-k tokens + one bin for the rest (far smaller; a lower bound of the KD: "
        "benchmarks/bench_cache_topk.py measures how much of it)",
    )
    cache_dtype: str = _f("bf16", "teacher cache: dtype of the stored hidden states and full logits (bf16 or fp32)")

    def __post_init__(self) -> None:
        _check_choices("distill", self)
        _positive("distill", "cache_topk", self.cache_topk, allow_zero=True)
        if self.cache_dtype not in ("bf16", "fp32"):
            raise ConfigError(f"distill.cache_dtype must be bf16 or fp32; got {self.cache_dtype!r}")
        if self.teacher_cache and self.mask != "answer":
            raise ConfigError(
                "distill.teacher_cache stores the teacher's outputs at the positions with a loss (distill.mask=answer); "
                "distill.mask=all needs the teacher online (distill.teacher_cache='')"
            )
        for name in ("ce_weight", "kd_weight", "align_weight", "list_kd_weight"):
            _positive("distill", name, getattr(self, name), allow_zero=True)
        _positive("distill", "temperature", self.temperature)
        _positive("distill", "list_temperature", self.list_temperature)
        _positive("distill", "weight_temperature", self.weight_temperature)
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ConfigError(f"distill.jsd_beta must be in [0, 1]; got {self.jsd_beta}")


@dataclass
class AdaptConfig:
    """Teacher adaptation: LoRA adapters (QLoRA on a 4-bit base) trained on the task before Fisher and distillation."""

    enabled: bool = _f(
        False, "pipeline: adapt the teacher first; Fisher, student and evaluation then use the merged teacher"
    )
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = _f(0.05, "LoRA dropout")
    target_modules: list[str] = _f(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "names of the linear modules that get adapters",
    )
    quantized_base: bool = _f(
        True, "QLoRA: the frozen base stays in teacher.quantization (4-bit) under ZeRO-3; false = full-precision base"
    )
    max_steps: int = _f(40, "optimizer steps of adaptation")
    lr: float = _f(2e-4, "peak learning rate of the adapters")
    micro_batch_size: int = _f(4, "examples per rank per forward")
    grad_accum: int = _f(1, "gradient accumulation steps")
    warmup_steps: int = _f(2, "linear warmup steps before the cosine decay")
    list_loss_weight: float = _f(
        0.0, "pointwise: weight of an extra list-level CE over the candidates' scores (0 = title modelling only)"
    )
    save_every: int = _f(0, "checkpoint every N steps (0 = only at the end)")
    max_train_examples: int = _f(0, "use at most this many training examples (0 = all)")
    seed: int = _f(7, "seed of data order and adapter initialisation")
    gradient_checkpointing: bool = _f(
        False, "recompute each layer's activations in the backward (long listwise prompts: ~5 GB less per rank)"
    )

    def __post_init__(self) -> None:
        for name in ("lora_r", "lora_alpha", "max_steps", "micro_batch_size", "grad_accum"):
            _positive("adapt", name, getattr(self, name))
        _positive("adapt", "lr", self.lr)
        for name in ("warmup_steps", "list_loss_weight", "save_every", "max_train_examples"):
            _positive("adapt", name, getattr(self, name), allow_zero=True)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"adapt.lora_dropout must be in [0, 1); got {self.lora_dropout}")
        if not self.target_modules:
            raise ConfigError("adapt.target_modules must name at least one module, e.g. [q_proj, v_proj]")


@dataclass
class TrainConfig:
    """Optimisation of the student."""

    micro_batch_size: int = _f(2, "examples per rank per forward (DeepSpeed train_micro_batch_size_per_gpu)")
    grad_accum: int = _f(1, "gradient accumulation steps")
    max_steps: int = _f(40, "optimizer steps")
    lr: float = _f(5e-5, "peak learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_steps: int = _f(4, "linear warmup steps before the cosine decay")
    grad_clip: float = _f(1.0, "gradient clipping norm (0 = off)")
    eval_every: int = _f(0, "validation loss every N steps (0 = only at the end)")
    final_validation: bool = _f(
        True,
        "validate once more after the last step (skipped when that step already did); the ablation turns it off for cells whose test evaluation follows",
    )
    valid_examples: int = _f(16, "validation examples used for the validation loss (0 = the whole validation split)")
    valid_rank_examples: int = _f(
        0,
        "validation users the student ranks at each validation, the learning curve's NDCG@10 (0 = the valid_examples "
        "ones); more than valid_examples makes the curve's paired plateau verdict decisive without running the "
        "teacher on them",
    )
    save_every: int = _f(0, "checkpoint every N steps (0 = only at the end)")
    log_every: int = _f(1, "log losses every N steps")
    resume: bool = _f(False, "continue from the newest checkpoint in output_dir at the exact step")
    stop_at_step: int = _f(
        0,
        "end this run after N steps of the max_steps schedule, checkpointed (0 = run to max_steps); continue with resume=true, e.g. in time-limited cluster slots",
    )
    save_on_signal: bool = _f(
        True, "on SIGTERM/SIGINT, stop at the next step boundary and write a checkpoint before exiting (non-zero)"
    )
    seed: int = _f(42, "seed of data order and initialisation")
    group_by_length: bool = _f(
        False,
        "batch the training examples of each group of 16 batches longest first, in a seeded order: the same examples "
        "per rank, less padding, and ranks whose batches at a step are alike in length (data.sampler.RankSampler)",
    )
    precision: Precision = _f("auto", "auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32")

    def __post_init__(self) -> None:
        _check_choices("train", self)
        for name in ("micro_batch_size", "grad_accum", "max_steps", "log_every"):
            _positive("train", name, getattr(self, name))
        _positive("train", "lr", self.lr)
        for name in (
            "warmup_steps",
            "eval_every",
            "valid_examples",
            "valid_rank_examples",
            "save_every",
            "grad_clip",
            "weight_decay",
            "stop_at_step",
        ):
            _positive("train", name, getattr(self, name), allow_zero=True)


@dataclass
class EvalConfig:
    """Ranking quality and cost of teacher and student."""

    ks: list[int] = _f([1, 5, 10, 20], "cut-offs K of HR@K and NDCG@K (any list)")
    batch_size: int = _f(4, "examples per forward during evaluation")
    max_examples: int = _f(64, "test examples scored (0 = the whole test split)")
    latency_batches: int = _f(4, "batches timed for latency and throughput")
    split: EvalSplit = _f("test", "test or valid")
    student_quantization: ServeQuantization = _f(
        "teacher",
        "precision the student is served and measured in: teacher (same as teacher.quantization), none, nf4 or int8",
    )
    candidates: str = _f(
        "", "score on a fixed candidate file (user<TAB>item ids, LLMRank format) instead of sampled candidates"
    )
    candidates_format: CandidatesFormat = _f("llmrank", "format of eval.candidates: llmrank")
    include_target: bool = _f(
        False,
        "eval.candidates lists already hold the target: the first data.num_candidates as given, unshuffled "
        "(false: LLMRank's rule, drop the target, keep the first N-1, append it, shuffle with a recorded seed)",
    )
    permutations: int = _f(
        1, "score each example under P seeded candidate orders and sum each candidate's scores (LLMRank bootstrapping)"
    )
    models: bool = _f(True, "score the teacher and student (false: baselines only, no model is loaded)")
    baselines: list[str] = _f(["random", "popularity"], "reference rankers scored on the same candidates")
    reuse_teacher_scores: str = _f(
        "",
        "a finished run's folder whose per_example/teacher*.parquet are read instead of scoring the teachers again, "
        "if they hold these users and candidates and the teacher scores its first batch the same (else scored)",
    )

    def __post_init__(self) -> None:
        _check_choices("eval", self)
        _positive("eval", "batch_size", self.batch_size)
        _positive("eval", "max_examples", self.max_examples, allow_zero=True)
        _positive("eval", "latency_batches", self.latency_batches)
        _positive("eval", "permutations", self.permutations)
        unknown = [b for b in self.baselines if b not in ("random", "popularity")]
        if unknown:
            raise ConfigError(f"eval.baselines must be some of random, popularity; got {unknown!r}")
        if not self.ks or not all(isinstance(k, int) and k > 0 for k in self.ks):
            raise ConfigError(f"eval.ks must be a non-empty list of positive integers; got {self.ks!r}")


@dataclass
class ServeConfig:
    """Serving (recommend): a retrieval stage proposes candidates, the LLM re-ranks them in one batched pass."""

    num_candidates: int = _f(
        50, "items retrieval proposes per user for the LLM to re-rank (0 = score every untouched item)"
    )
    cooccurrence_window: int = _f(
        5, "retrieval: items at most this many positions apart in a training sequence co-occur"
    )
    backward_weight: float = _f(
        0.0, "retrieval: weight of an item that came before a history item, relative to one that followed it"
    )
    seed_items: int = _f(10, "retrieval: the most recent history items whose co-occurring items are proposed")
    recency_decay: float = _f(0.5, "retrieval: weight decay^r of the r-th most recent seed item, in (0, 1]")

    def __post_init__(self) -> None:
        _positive("serve", "num_candidates", self.num_candidates, allow_zero=True)
        _positive("serve", "cooccurrence_window", self.cooccurrence_window)
        _positive("serve", "seed_items", self.seed_items)
        _positive("serve", "backward_weight", self.backward_weight, allow_zero=True)
        if not 0.0 < self.recency_decay <= 1.0:
            raise ConfigError(f"serve.recency_decay must be in (0, 1]; got {self.recency_decay}")


@dataclass
class AblationConfig:
    """``layerwise-dist ablation``: students for every layer selection x layer weighting, one teacher, same budget."""

    selections: list[str] = _f(
        ["fisher-topk", "uniform", "first"], "layer selections of the cells (first = the last layers dropped)"
    )
    weightings: list[str] = _f(["fisher", "linear", "uniform"], "layer-loss weightings of the cells")
    task_only: bool = _f(True, "also a student of the first selection trained on the task loss alone (no KD)")
    curve_every: int = _f(0, "the first cell validates every N steps: its learning curve (0 = only at the end)")
    zero_shot_fisher: bool = _f(
        True, "with adapt.enabled: also the Fisher profile of the zero-shot teacher (depth shares before adaptation)"
    )
    transfer_source: str = _f(
        "", "transfer check: the (adapted) teacher and the first cell's student scored on this data.source too"
    )
    transfer_reviews: str = _f("", "transfer check: its data.reviews (empty = the source's default)")
    transfer_category: str = _f("", "transfer check: its data.category (empty = the source's default)")
    teacher_cache: bool = _f(
        True,
        "compute the teacher's outputs once (<out>/teacher_cache: every layer any cell aligns to) and distil "
        "every cell from them (distill.teacher_cache); false = the teacher runs at every step of every cell",
    )
    budget_reference: str = _f(
        "",
        "another finished ablation run folder (same cells, users and candidates, another train.max_steps): the "
        "report gives each cell's paired test NDCG@10 difference between the two step budgets",
    )

    def __post_init__(self) -> None:
        allowed = [s for s in typing.get_args(Selection) if s != "list"]
        bad = [s for s in self.selections if s not in allowed]
        if bad or not self.selections:
            raise ConfigError(f"ablation.selections must be some of {', '.join(allowed)}; got {list(self.selections)}")
        if not self.weightings:
            raise ConfigError("ablation.weightings must name at least one weighting, e.g. [fisher, uniform]")
        _positive("ablation", "curve_every", self.curve_every, allow_zero=True)


@dataclass
class RayConfig:
    """Ray Train (``launchers/ray_distill.py``): ScalingConfig, RunConfig, FailureConfig and CheckpointConfig."""

    address: str = _f(
        "",
        "cluster to join: '' = RAY_ADDRESS when set (ray job submit sets it), else a new local instance; "
        "auto, or head-ip:6379",
    )
    num_workers: int = _f(2, "Ray Train workers = ranks (ScalingConfig.num_workers)")
    use_gpu: bool = _f(False, "one GPU per worker and NCCL (false: CPU workers, gloo)")
    cpus_per_worker: int = _f(1, "CPUs per worker (ScalingConfig.resources_per_worker); also its torch threads on CPU")
    storage_path: str = _f(
        "results/ray",
        "where Ray keeps runs and checkpoints: a local folder (relative: made absolute on the driver) or a URI "
        "such as s3://bucket/prefix, passed to RunConfig as given",
    )
    name: str = _f("", "Ray run name (default: <command>-<output_dir name>-<time>)")
    max_failures: int = _f(
        0,
        "FailureConfig.max_failures: worker-group restarts after a failure, each from the last Ray checkpoint "
        "(-1 = unlimited)",
    )
    num_to_keep: int = _f(
        2, "CheckpointConfig.num_to_keep: newest Ray checkpoints kept (0 = all), written every train.save_every steps"
    )
    fault_kill_step: int = _f(
        0, "testing only: on the first attempt the last rank SIGKILLs itself after reporting this step (0 = off)"
    )

    def __post_init__(self) -> None:
        _positive("ray", "num_workers", self.num_workers)
        _positive("ray", "cpus_per_worker", self.cpus_per_worker)
        _positive("ray", "num_to_keep", self.num_to_keep, allow_zero=True)
        _positive("ray", "fault_kill_step", self.fault_kill_step, allow_zero=True)
        if self.max_failures < -1:
            raise ConfigError(f"ray.max_failures must be >= -1 (-1 = unlimited); got {self.max_failures}")
        if not self.storage_path:
            raise ConfigError("ray.storage_path must not be empty: a local folder or a URI such as s3://bucket/prefix")


@dataclass
class TrackingConfig:
    """MLflow run tracking."""

    enabled: bool = _f(True, "log params, metrics and artifacts to MLflow")
    tracking_uri: str = _f("", "MLflow tracking URI (default: sqlite:///<results_dir>/mlflow.db)")
    experiment: str = _f("layerwise_dist", "MLflow experiment name")
    run_name: str = _f("", "MLflow run name (default: derived from the config)")
    run_id: str = _f("", "resume this existing MLflow run instead of starting a new one")
    artifact_root: str = _f(
        "", "artifact folder of a new experiment (default: <results_dir>/mlartifacts beside the default store)"
    )
    required: bool = _f(
        False, "fail at start (one line) when the tracking server does not answer; default: warn and buffer"
    )
    flush_timeout_s: float = _f(
        30.0, "at the end of a run, wait at most this long for buffered records to reach MLflow"
    )
    connect_timeout_s: float = _f(3.0, "timeout of the reachability check of an http(s) tracking URI at start")
    request_timeout_s: float = _f(
        30.0, "MLflow HTTP request timeout of the background sender (MLFLOW_HTTP_REQUEST_TIMEOUT unless set)"
    )
    log_model: bool = _f(
        True, "log the final student as the run's MLflow model (model/: a pyfunc recommender, mlflow.pyfunc.load_model)"
    )

    def __post_init__(self) -> None:
        if not self.experiment:
            raise ConfigError("tracking.experiment must not be empty")
        for name in ("flush_timeout_s", "connect_timeout_s", "request_timeout_s"):
            _positive("tracking", name, getattr(self, name))


@dataclass
class RunConfig:
    """A whole run: data, teacher, student, Fisher pass, distillation, evaluation."""

    output_dir: str = _f("results/run", "folder of this run's profile, student, checkpoints and report")
    ds_config: str = _f("ds_configs/zero3.json", "DeepSpeed JSON (batch sizes are filled from train.*)")
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    fisher: FisherConfig = field(default_factory=FisherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ConfigError("output_dir must not be empty")
        if self.data.formulation == "pointwise" and self.teacher.attn_implementation == "flash_attention_2":
            raise ConfigError(
                "data.formulation=pointwise scores candidates in one packed sequence with a block attention mask, "
                "which flash_attention_2 cannot take: use teacher.attn_implementation=sdpa (or auto)"
            )

    def model_attn_implementation(self) -> str:
        """The attention implementation to request: ``auto`` resolves to sdpa for pointwise (block masks)."""
        if self.data.formulation == "pointwise" and self.teacher.attn_implementation == "auto":
            return "sdpa"
        return self.teacher.attn_implementation

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# Settings a later sitting of the same run may change: where things are (paths move between machines),
# how the run is tracked, logged, checkpointed or stopped, and the report's reference run. Everything
# else decides what a finished stage computed, so a resumed run must keep it (resume_changes).
RESUME_SAFE_KEYS: tuple[str, ...] = (
    "output_dir",
    "data.reviews",
    "data.meta",
    "data.cache_dir",
    "train.resume",
    "train.stop_at_step",
    "train.save_every",
    "train.log_every",
    "train.save_on_signal",
    "eval.batch_size",
    "eval.reuse_teacher_scores",  # reused only where the model gives the file's scores: the same numbers
    "ablation.budget_reference",
    "tracking.",
    "ray.",
)


def resume_changes(previous: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, earlier value, value now)`` for every setting that differs between the config an earlier
    sitting saved (``previous``, ``<output_dir>/config.yaml``) and ``current``, except the
    :data:`RESUME_SAFE_KEYS`. A key the earlier config lacks (written by an older version) is not a change.
    """
    from .tracking import flatten  # (tracking imports this module)

    before, now = flatten(previous), flatten(current)
    # A run resolves teacher.attn_implementation=auto when it starts (pointwise: sdpa, RunSession) and saves the
    # setting as given: "auto" on one side is the same setting as its resolution on the other.
    for side in (before, now):
        key = "teacher.attn_implementation"
        if side.get(key) == "auto" and side.get("data.formulation") == "pointwise":
            side[key] = "sdpa"

    def safe(key: str) -> bool:
        return any(key == s or (s.endswith(".") and key.startswith(s)) for s in RESUME_SAFE_KEYS)

    def same(a: Any, b: Any) -> bool:
        if isinstance(a, bool) != isinstance(b, bool):
            return False
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b)):
            return float(a) == float(b)
        return a == b

    return [(k, before[k], now[k]) for k in now if k in before and not safe(k) and not same(before[k], now[k])]


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _annotation(key: str) -> Any:
    """The schema type of a dotted key (``train.lr``; ``eval.ks[1]`` is an element), or None."""
    annotation: Any = RunConfig
    for part in key.split("."):
        name, _, index = part.partition("[")
        if not (dataclasses.is_dataclass(annotation) and name in _hints(annotation)):
            return None
        annotation = _hints(annotation)[name]
        if index:
            annotation = (typing.get_args(annotation) or (None,))[0]
    return annotation


_EXPECTS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_PLURAL = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


def _error(e: OmegaConfBaseException, source: DictConfig | None = None) -> ConfigError:
    """An OmegaConf error as one line naming the dotted key and what it expects."""
    key = e.full_key or ""
    value = getattr(e, "value", None)
    if isinstance(e, ConfigKeyError) and key:
        parent = e.object_type if dataclasses.is_dataclass(e.object_type) else RunConfig
        valid = ", ".join(f.name for f in dataclasses.fields(parent))
        if source is not None and OmegaConf.is_dict(OmegaConf.select(source, key, throw_on_missing=False)):
            return ConfigError(f"unknown config section {key!r} (valid: {valid})")
        return ConfigError(f"unknown config key {key!r} (valid: {valid})")
    annotation = _annotation(key) if key and isinstance(e, ValidationError) else None
    choices = _choices(annotation)
    if choices is not None:
        expected = f"must be one of {', '.join(choices)}"
    elif annotation in _EXPECTS:
        expected = f"expects {_EXPECTS[annotation]}"
    elif typing.get_origin(annotation) is list:
        item = typing.get_args(annotation)[0]
        expected = f"expects a list of {_PLURAL.get(item, 'values')}, e.g. [1, 2]"
    elif dataclasses.is_dataclass(annotation):
        expected = "is a section: it must be a mapping of its keys"
    else:
        first = (str(e.msg or e).strip().splitlines() or [type(e).__name__])[0]
        return ConfigError(_one_line(f"{key}: {first}" if key else first))
    return ConfigError(f"{key} {expected}; got {value!r}")


def _source(data: Any, where: str) -> DictConfig:
    """A YAML document, dict or parsed override as a DictConfig whose sections are mappings."""
    if OmegaConf.is_config(data):
        data = OmegaConf.to_container(data, resolve=False)
    if not isinstance(data, dict):
        raise ConfigError(f"{where}the top level must be a mapping of config keys; got {data!r}")
    for name, annotation in _hints(RunConfig).items():
        if dataclasses.is_dataclass(annotation) and name in data and not isinstance(data[name], dict):
            raise ConfigError(f"{where}{name} is a section: it must be a mapping of its keys; got {data[name]!r}")
    return OmegaConf.create(data)


def _merge(cfg: DictConfig, data: Any, where: str = "") -> DictConfig:
    """Merge data onto the structured cfg: OmegaConf checks keys, types and Literal choices."""
    source = _source(data, where)
    try:
        return OmegaConf.merge(cfg, source)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}{_error(e, source)}") from None


def _override(item: str) -> Any:
    """``key=value`` as a nested mapping; the value is read as YAML (``[0,4]``, ``3e-3``, ``true``)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (e.g. train.max_steps=20)")
    key, raw = item.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        return OmegaConf.from_dotlist([f"{key}={raw if raw.strip() else repr('')}"])
    except yaml.YAMLError:  # not YAML (e.g. an unbalanced bracket): the raw text, as a string
        data: Any = raw
        for part in reversed(key.split(".")):
            data = {part: data}
        return data


def _to_object(cfg: DictConfig) -> RunConfig:
    try:
        return OmegaConf.to_object(cfg)  # builds the dataclasses: __post_init__ checks ranges
    except OmegaConfBaseException as e:
        raise _error(e) from None


def _schema() -> DictConfig:
    return OmegaConf.structured(RunConfig)


def from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    """A RunConfig from a (partial) mapping of sections, then ``key=value`` overrides; defaults elsewhere."""
    cfg = _merge(_schema(), data)
    for item in overrides or []:
        cfg = _merge(cfg, _override(item))
    return _to_object(cfg)


def preset_path(name: str) -> Path:
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") and candidate.exists():
        return candidate
    path = PRESET_DIR / f"{name}.yaml"
    if not path.exists():
        names = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
        raise ConfigError(f"no preset or YAML file {name!r} (presets: {names})")
    return path


def load_config(preset: str = "default", overrides: list[str] | None = None) -> RunConfig:
    """Load a preset (name or YAML path), apply key=value overrides, check everything."""
    return _load_yaml(preset_path(preset), overrides)


def config_from_yaml(path: str | Path) -> RunConfig:
    """Read a saved resolved config (``RunConfig.save``) back; the same as ``load_config(path)``."""
    if not Path(path).is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    return _load_yaml(Path(path))


def _load_yaml(path: Path, overrides: list[str] | None = None) -> RunConfig:
    try:
        data: Any = OmegaConf.load(path)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({_one_line(e)})") from None
    except OSError as e:  # OmegaConf refuses a document that is a single scalar
        raise ConfigError(f"{path}: the top level must be a mapping of config keys ({_one_line(e)})") from None
    cfg = _merge(_schema(), data, f"{path}: ")
    for item in overrides or []:
        cfg = _merge(cfg, _override(item))
    return _to_object(cfg)


def help_text() -> str:
    """Every field with its default and help line (printed by --help)."""
    lines = []
    for f in dataclasses.fields(RunConfig):
        t = _hints(RunConfig)[f.name]
        if dataclasses.is_dataclass(t):
            lines.append(f"{f.name}:  {t.__doc__.strip().splitlines()[0]}")
            for g in dataclasses.fields(t):
                default = g.default if g.default is not dataclasses.MISSING else g.default_factory()
                lines.append(f"  {f.name}.{g.name}={default!r}  {g.metadata.get('help', '')}")
        else:
            lines.append(f"{f.name}={f.default!r}  {f.metadata.get('help', '')}")
    return "\n".join(lines)
