"""DeepSpeed configuration: the one place a ``ds_config`` JSON is found, read and filled.

Every engine of a run (the student's training engine, the frozen teacher's
inference or Fisher engine) gets its dict from
:func:`resolve_ds_config`. The run config owns the values that decide what a run
computes (batch sizes, accumulation, clipping, precision); the JSON owns the
rest (ZeRO stage, offload, bucket sizes). A value set in both that disagrees is
an error, never a silent choice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from .config import ConfigError, RunConfig
from .distributed import world_size

Purpose = Literal["train", "inference"]


#: The DeepSpeed JSONs shipped inside the package (the repository's ``ds_configs/`` links here).
PACKAGE_DS_CONFIGS = Path(__file__).resolve().parent / "ds_configs"


def ds_config_path(path: str | Path) -> Path:
    """The JSON file named by ``ds_config``, or a ConfigError saying it is missing.

    A relative path is looked up in the working directory first, then, for the presets'
    ``ds_configs/<name>.json``, among the JSONs shipped with the package, so an installed
    package runs from any directory.
    """
    path = Path(path)
    if path.is_file():
        return path
    shipped = PACKAGE_DS_CONFIGS / path.name
    if not path.is_absolute() and path.parts[:1] == ("ds_configs",) and len(path.parts) == 2 and shipped.is_file():
        return shipped
    raise ConfigError(f"ds_config: {path} does not exist")


def read_ds_config(path: str | Path) -> dict[str, Any]:
    """Parse the JSON (one-line ConfigError for a missing, unreadable or invalid file)."""
    path = ds_config_path(path)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"ds_config: {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except OSError as e:
        raise ConfigError(f"ds_config: cannot read {path} ({e.strerror})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"ds_config: {path} must hold a JSON object")
    return ds


def resolve_ds_config(
    path: str | Path, cfg: RunConfig, purpose: Purpose = "train", *, world: int | None = None
) -> dict[str, Any]:
    """Read the DeepSpeed JSON and fill what the schema owns, for one kind of engine.

    ``train``: batch sizes, accumulation and clipping from ``train.*``; an optimizer
    block in the JSON gets its ``"auto"`` lr / weight decay filled. ``inference``: a
    frozen model (the teacher, also under its Fisher engine, which
    :func:`layerwise_dist.fisher.make_fisher_engine` adapts), so no optimizer or scheduler, and
    ZeRO stage 1 or 2 becomes 3 (the only stage that partitions a frozen model's parameters).
    """
    from .precision import use_bf16

    ds = read_ds_config(path)
    t = cfg.train
    world = world_size() if world is None else world
    owned = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world,
        "gradient_clipping": t.grad_clip,
    }
    for key, value in owned.items():
        given = ds.get(key, "auto")
        if given not in ("auto", value):
            raise ConfigError(
                f"ds_config: {path} sets {key}={given} but the run config gives {value}; "
                f'set it to "auto" in the JSON or change train.* (train_batch_size = micro_batch_size * grad_accum * world_size)'
            )
        ds[key] = value
    ds.setdefault("bf16", {})
    if ds["bf16"].get("enabled", "auto") == "auto":
        ds["bf16"]["enabled"] = use_bf16(t.precision)
    if ds.get("fp16", {}).get("enabled") is True:
        raise ConfigError(f"ds_config: {path} enables fp16; this package trains in bf16 (CUDA) or fp32")
    stage = ds.get("zero_optimization", {}).get("stage")
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"ds_config: {path} zero_optimization.stage must be 0-3; got {stage!r}")
    opt = ds.get("optimizer")
    if isinstance(opt, dict):  # e.g. DeepSpeedCPUAdam for ZeRO-Offload: fill its "auto" values too
        params = opt.setdefault("params", {})
        for key, value in (("lr", t.lr), ("weight_decay", t.weight_decay)):
            if params.get(key, "auto") == "auto":
                params[key] = value
    ds.setdefault("steps_per_print", 10**9)
    # We build a torch optimizer ourselves unless the JSON names one.
    ds.setdefault("zero_allow_untested_optimizer", True)
    if purpose != "train":
        for key in ("optimizer", "scheduler"):
            ds.pop(key, None)
        if stage in (0, 1, 2):
            # Stages 1-2 partition optimizer state and gradients, which a frozen model has none of (DeepSpeed
            # refuses them without an optimizer), and stage 0 partitions nothing; a frozen model's parameters are
            # what to partition: stage 3. So a student trained under zero2.json (or zero0.json) distils from a
            # ZeRO-3-partitioned teacher (teacher.placement=zero3).
            ds["zero_optimization"] = {**ds["zero_optimization"], "stage": 3}
    return ds
