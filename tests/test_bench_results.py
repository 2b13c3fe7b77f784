"""benchmarks/_results.py: every benchmark's JSON names the command that produced it and the environment."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_results_module():
    spec = importlib.util.spec_from_file_location("bench_results", ROOT / "benchmarks" / "_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_info_names_command_without_json_out_and_records_environment(monkeypatch):
    import torch

    results = _load_results_module()
    monkeypatch.setattr(sys, "argv", [str(ROOT / "benchmarks" / "bench_x.py"), "--steps", "3", "--json-out", "o.json"])
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    info = results.run_info()
    assert info["command"] == "OMP_NUM_THREADS=1 python benchmarks/bench_x.py --steps 3"
    env = info["environment"]
    assert env["torch"] == torch.__version__.split("+")[0] or env["torch"] == torch.__version__
    assert env["cpu_count"] == str(info["cpu_count"])
    assert env["python"] == info["python"]
