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
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    barrier()
    return folder
