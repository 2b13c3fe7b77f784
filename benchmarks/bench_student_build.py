"""Peak host memory of building the student: chosen layers read from the safetensors folder vs the whole teacher.

    OMP_NUM_THREADS=1 python benchmarks/bench_student_build.py [--model smollm2-135m] [--layers 8] [--reps 3]
        [--json-out benchmarks/results/student_build.json]

``--model`` is anything ``teacher.model`` takes (default: the embedded SmolLM2-135M-Instruct, 30 layers,
fp32 safetensors). ``--layers`` uniformly chosen teacher layers make the student. Every measurement runs
in a fresh process (this file with ``--child``), the three kinds interleaved rep by rep:

  runtime   python with torch, transformers and layerwise_dist imported, nothing built: its resident set
  folder    ``build_student(folder, layers)``: the tensor-by-tensor safetensors path
  teacher   ``build_student(AutoModelForCausalLM.from_pretrained(folder, dtype="auto"), layers)``: the
            whole-teacher path (what every folder went through before, and what a folder without
            safetensors weights still goes through)

A child reads its resident set after the imports, resets the kernel's high-water mark
(``layerwise_dist.stages``), builds, and reads the high-water mark (``VmHWM``). Prints JSON (and writes it
to ``--json-out``): student bytes (its parameters, tied ones once), teacher bytes, per kind the median
peak resident set and the median peak above the process's resident set before the build, and
``ratio_to_student_plus_runtime`` = peak / (student bytes + the idle runtime's resident set). Goal: <= 1.2
for the folder path.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _results import add_json_out, emit

MIB = 2**20
KINDS = ("runtime", "folder", "teacher")


def child(kind: str, folder: str, layers: list[int]) -> dict:
    """Runs in a fresh process: one measurement of ``kind``."""
    import torch
    from transformers import AutoModelForCausalLM

    from layerwise_dist.models.student import build_student
    from layerwise_dist.stages import peak_rss_mib, reset_peak_rss, rss_mib

    before = rss_mib()
    if kind == "runtime":
        return {"rss_mib": before}
    if not reset_peak_rss():
        raise SystemExit("this kernel does not let a process reset its RSS high-water mark (/proc/self/clear_refs)")
    t0 = time.perf_counter()
    if kind == "folder":
        student, _ = build_student(folder, layers)
    else:
        student, _ = build_student(AutoModelForCausalLM.from_pretrained(folder, dtype="auto"), layers)
    seconds = time.perf_counter() - t0
    peak = peak_rss_mib()
    params = {p.data_ptr(): p.numel() * p.element_size() for p in student.parameters()}
    assert all(p.dtype == torch.float32 for p in student.parameters())
    return {
        "rss_before_mib": before,
        "peak_rss_mib": peak,
        "peak_above_before_mib": peak - before,
        "end_rss_mib": rss_mib(),
        "seconds": seconds,
        "student_bytes": sum(params.values()),
    }


def run_child(kind: str, folder: str, layers: list[int]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [sys.executable, __file__, "--child", kind, "--folder", folder, "--layer-list", json.dumps(layers)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{kind} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a teacher.model value")
    parser.add_argument("--layers", type=int, default=8, help="student layers, uniformly chosen")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--layer-list", help=argparse.SUPPRESS)
    add_json_out(parser)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.folder, json.loads(args.layer_list))))
        return
    if args.reps < 1:
        parser.error("--reps must be >= 1")

    from transformers import AutoConfig

    from layerwise_dist.config import TeacherConfig
    from layerwise_dist.models.student import safetensors_files, select_layers
    from layerwise_dist.models.teacher import resolve_model_dir

    folder = resolve_model_dir(TeacherConfig(model=args.model))
    if safetensors_files(folder) is None:
        raise SystemExit(f"{folder}: no safetensors weights, nothing to compare (both kinds take the same path)")
    config = AutoConfig.from_pretrained(str(folder))
    layers = select_layers("uniform", config.num_hidden_layers, args.layers)
    teacher_bytes = sum(p.stat().st_size for p in set(safetensors_files(folder).values()))
    runs: dict[str, list[dict]] = {k: [] for k in KINDS}
    for _ in range(args.reps):
        for kind in KINDS:
            runs[kind].append(run_child(kind, str(folder), layers))
    student_bytes = runs["folder"][0]["student_bytes"]
    if any(r["student_bytes"] != student_bytes for k in ("folder", "teacher") for r in runs[k]):
        raise SystemExit("the two paths built students of different sizes")
    runtime = statistics.median(r["rss_mib"] for r in runs["runtime"])
    result = {
        "benchmark": "student_build",
        "model": args.model,
        "teacher_layers": config.num_hidden_layers,
        "student_layers": layers,
        "reps": args.reps,
        "student_mib": student_bytes / MIB,
        "teacher_checkpoint_mib": teacher_bytes / MIB,
        "runtime_rss_mib": runtime,
        "paths": {},
        "goal": 1.2,
    }
    for kind in ("folder", "teacher"):
        peak = statistics.median(r["peak_rss_mib"] for r in runs[kind])
        result["paths"][kind] = {
            "peak_rss_mib": peak,
            "peak_above_before_mib": statistics.median(r["peak_above_before_mib"] for r in runs[kind]),
            "seconds": statistics.median(r["seconds"] for r in runs[kind]),
            "ratio_to_student_plus_runtime": peak / (student_bytes / MIB + runtime),
        }
    result["ratio_to_student_plus_runtime"] = result["paths"]["folder"]["ratio_to_student_plus_runtime"]
    result["peak_teacher_path_over_folder_path"] = (
        result["paths"]["teacher"]["peak_rss_mib"] / result["paths"]["folder"]["peak_rss_mib"]
    )
    emit(result, args.json_out)


if __name__ == "__main__":
    main()
