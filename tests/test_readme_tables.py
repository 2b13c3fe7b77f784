"""The README's generated sections are what their scripts make of the committed results (no hand edits)."""

from __future__ import annotations

import importlib
import json
import sys

import pytest

from conftest import REPO


@pytest.fixture
def scripts(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    yield lambda name: importlib.import_module(name)
    for name in ("gpu_table", "perf_table", "readme_results"):
        sys.modules.pop(name, None)


def test_gpu_section_is_generated_from_the_committed_h200_run(scripts):
    gpu_table = scripts("gpu_table")
    runs = sorted((REPO / "results" / "gpu").glob("*/gpu_check.json"))
    assert runs, "no committed GPU check under results/gpu/"
    result = json.loads(runs[-1].read_text())
    assert result["device"] == "cuda" and result["ok"] is True
    section = gpu_table.section(result, runs[-1].relative_to(REPO))
    assert section in (REPO / "README.md").read_text()
    # every figure in the table comes from the JSON: e.g. the measured speedup at the demo's prompt length
    row = result["parts"]["models"]["scoring"]["bf16_seq380"]
    assert f"| {row['speedup_full']:.2f}x | {row['speedup_answer_only']:.2f}x |" in section


def test_gpu_table_refuses_a_cpu_dry_run(scripts, tmp_path):
    gpu_table = scripts("gpu_table")
    dry = tmp_path / "gpu_check.json"
    dry.write_text(json.dumps({"device": "cpu", "parts": {}, "date": "x"}))
    readme = tmp_path / "README.md"
    readme.write_text("x\n")
    sys_argv = sys.argv
    try:
        sys.argv = ["gpu_table.py", str(dry), str(readme)]
        assert gpu_table.main() == 2
    finally:
        sys.argv = sys_argv
    assert readme.read_text() == "x\n"


def test_perf_section_is_generated_from_the_committed_benchmarks(scripts):
    perf_table = scripts("perf_table")
    section = perf_table.render(REPO / "benchmarks" / "results")
    assert section.strip() in (REPO / "README.md").read_text()
