"""The benchmarks' JSON: printed, and with ``--json-out PATH`` also written there (``make bench`` writes
``benchmarks/results/<name>.json``, which ``scripts/perf_table.py`` renders into the README).

Every result gets a ``run`` entry: the command that produced it (without ``--json-out``), the thread
settings, the host's CPU count, the versions, the environment record (``run_metadata.environment_record``)
and the UTC time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def add_json_out(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json-out", default="", help="also write the JSON result to this file")


def run_info() -> dict[str, Any]:
    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--json-out":
            skip = True
        elif not arg.startswith("--json-out="):
            argv.append(arg)
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(Path.cwd())
    except ValueError:
        pass
    threads = os.environ.get("OMP_NUM_THREADS")
    command = shlex.join(["python", str(script), *argv])
    info: dict[str, Any] = {
        "command": (f"OMP_NUM_THREADS={threads} " if threads else "") + command,
        "omp_num_threads": threads,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    transformers = sys.modules.get("transformers")
    if transformers is not None:
        info["transformers"] = transformers.__version__
    from layerwise_dist.run_metadata import environment_record

    # The same record as a run's results.json: CPU model, GPU, and the versions of every library whose
    # kernels or defaults change the numbers; two results on other environments are not one comparison.
    info["environment"] = environment_record()
    return info


def emit(result: dict[str, Any], json_out: str = "", indent: int | None = 2) -> None:
    """Print ``result`` (plus its ``run`` entry) as JSON; also write it to ``json_out`` when given."""
    text = json.dumps({**result, "run": run_info()}, indent=indent)
    print(text)
    if json_out:
        path = Path(json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


def interleaved(
    runs: Mapping[str, Callable[[], Any]], reps: int, warmup: bool = True
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds of each run's ``reps`` calls, the runs interleaved within a round so that drifting
    machine load hits every variant alike (``warmup``: one call of each first, not timed)."""
    if warmup:
        for fn in runs.values():
            fn()
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(reps):
        for name, fn in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu


def medians(samples: Mapping[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in samples.items()}
