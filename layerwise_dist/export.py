"""The trained student as a standard Hugging Face model folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from .distributed import barrier, is_main


def export_student(
    engine: Any, student: nn.Module, folder: str | Path, tokenizer: Any = None, prefix: str = ""
) -> Path:
    """Gather the student's weights from the engine and write ``folder`` (safetensors + config + tokenizer).

    Collective under ZeRO-3 (every rank must call it: the weights are gathered from all
    shards); rank 0 writes. ``prefix`` is the student's key prefix inside the engine's
    module. The new folder is written beside the old one and swapped in by rename.
    """
    folder = Path(folder)
    if engine.zero_optimization_partition_weights():
        state = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank calls it
    else:
        state = engine.module.state_dict()
    if is_main():
        student_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        student.save_pretrained(tmp, state_dict=student_state, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_model_card(tmp, run_dir=folder.parent)
        make_group_readable(tmp)
        swap_in(tmp, folder)
    barrier()
    return folder


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    ok = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
    return ok


def swap_in(new: Path, folder: Path) -> None:
    """Put the finished folder ``new`` in place of ``folder`` with no moment where ``folder`` is missing.

    An existing folder is exchanged with the new one in one atomic step (renameat2), then the
    old contents are removed; where the kernel cannot exchange, a plain rename is used.
    """
    new, folder = Path(new), Path(folder)
    if folder.exists() and _exchange(new, folder):
        shutil.rmtree(new, ignore_errors=True)  # now holds the previous contents
        return
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(new, folder)
    shutil.rmtree(old, ignore_errors=True)


def make_group_readable(folder: str | Path) -> None:
    """Files 0644 and folders 0755 below ``folder`` (some writers create 0600 temp files and rename them)."""
    folder = Path(folder)
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod(0o755 if path.is_dir() else 0o644)


def export_checkpoint(
    checkpoint_dir: str | Path, out: str | Path, tag: str | None = None, model_config: str | Path | None = None
) -> Path:
    """A DeepSpeed checkpoint folder (any ZeRO stage, any rank count) as a Hugging Face model folder.

    ``checkpoint_dir`` holds ``latest`` and the tag folders (``<output_dir>/checkpoints`` of a
    run); ``tag`` picks one (default: the one ``latest`` names). The architecture and
    tokenizer come from ``model_config`` (a folder with ``config.json``), by default the
    run's own ``student/`` folder beside ``checkpoint_dir``. The weights are consolidated
    on this process's CPU from every rank's shards; no process group is needed.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .errors import ExportError

    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise ExportError(f"checkpoint folder {checkpoint_dir} does not exist")
    if tag is None:
        latest = checkpoint_dir / "latest"
        if not latest.is_file():
            raise ExportError(f"{checkpoint_dir} has no 'latest' file: name the tag with --tag (e.g. step40)")
        tag = latest.read_text().strip()
    if not (checkpoint_dir / tag).is_dir():
        tags = sorted(p.name for p in checkpoint_dir.iterdir() if p.is_dir())
        raise ExportError(f"no checkpoint tag {tag!r} in {checkpoint_dir} (tags: {', '.join(tags) or 'none'})")
    source = Path(model_config) if model_config else checkpoint_dir.parent / "student"
    if not (source / "config.json").is_file():
        raise ExportError(
            f"no config.json in {source}: give --model-config, a folder with the model's config.json (and tokenizer)"
        )
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    # The engine trains StudentWithAligner: the student's weights carry the "student." prefix.
    prefix = "student." if any(k.startswith("student.") for k in state) else ""
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    config = AutoConfig.from_pretrained(source)
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k not in {"lm_head.weight"} or not getattr(config, "tie_word_embeddings", False)]
    if missing or unexpected:
        raise ExportError(
            f"checkpoint {checkpoint_dir / tag} does not match {source / 'config.json'}: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    try:
        AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
    except (OSError, ValueError):
        pass  # a config-only folder: the export is still a loadable model
    write_model_card(tmp, run_dir=checkpoint_dir.parent, source=f"{checkpoint_dir / tag}")
    make_group_readable(tmp)
    swap_in(tmp, out)
    return out


def write_model_card(folder: str | Path, run_dir: str | Path | None = None, source: str = "") -> Path:
    """A short README.md: what the model is (teacher, kept layers), the data it saw, its measured metrics."""
    import json

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    info = config.get("layerwise_dist", {})
    lines = ["---", "library_name: transformers", "tags: [layerwise_dist, distillation, recommendation]", "---", ""]
    lines.append(f"# {folder.name if folder.name not in ('student', 'student.tmp') else 'layerwise_dist student'}")
    lines.append("")
    lines.append(
        f"- architecture: {', '.join(config.get('architectures', []))}, {config.get('num_hidden_layers')} layers"
    )
    if info:
        lines.append(f"- teacher: {info.get('teacher', '?')}; kept teacher layers {info.get('layer_map')}")
    if source:
        lines.append(f"- exported from: `{source}`")
    run = Path(run_dir) if run_dir else None
    if run is not None and (run / "config.yaml").is_file():
        import yaml

        cfg = yaml.safe_load((run / "config.yaml").read_text())
        data = cfg.get("data", {})
        lines.append(
            f"- data: {data.get('source')} {data.get('category')} ({data.get('reviews') or 'embedded sample'}), "
            f"{data.get('num_candidates')} candidates, formulation {data.get('formulation', 'listwise')}"
        )
    if run is not None and (run / "results.json").is_file():
        results = json.loads((run / "results.json").read_text())
        rows = [
            (name, results[name])
            for name in ("teacher", "student")
            if isinstance(results.get(name), dict) and "ndcg@10" in results[name]
        ]
        if rows:
            lines += ["", "| model | HR@10 | NDCG@10 | MRR | examples |", "| --- | --- | --- | --- | --- |"]
            for name, m in rows:
                lines.append(
                    f"| {name} | {m.get('hr@10', 0):.4f} | {m['ndcg@10']:.4f} | {m.get('mrr', 0):.4f} | {m.get('n')} |"
                )
            lines.append("")
            lines.append("Measured by the run's `evaluate` stage (see its results.json for intervals and costs).")
    path = folder / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path
