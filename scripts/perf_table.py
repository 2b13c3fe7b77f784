"""Render the README's performance table from the benchmarks' JSON files.

    python scripts/perf_table.py [--results benchmarks/results] [--readme README.md]

Reads the files ``make bench`` writes (``benchmarks/results/<name>.json``, one per benchmark, each with
the command that produced it) and replaces the README's text between ``<!-- perf:begin -->`` and
``<!-- perf:end -->`` with one table row per benchmark found: the command, what it compares, the measured
figures and the goal with whether it is met. A benchmark without its file is named below the table as not
run; nothing is invented for it. ``--check`` prints the section instead of writing the README.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from readme_results import replace_section

BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"
ROOT = Path(__file__).resolve().parents[1]


def _x(value: float) -> str:
    return f"{value:.2f}x"


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _speedup(r: dict, key: str) -> tuple[float, str]:
    """A ratio a goal is judged on, and its text: in CPU time where the run recorded it (a one-thread run's
    CPU time leaves out the time it waited for a core on a shared machine), beside wall time."""
    wall = r[key]
    if f"{key}_cpu_time" in r:
        cpu = r[f"{key}_cpu_time"]
        return cpu, f"{_x(cpu)} in CPU time, {_x(wall)} in wall time"
    return wall, _x(wall)


def scoring(r: dict) -> tuple[str, str, str]:
    n_teacher, n_student = r["teacher_layers"], len(r["student_layers"])
    tokens = r["prompt_tokens"]
    what = (
        f"rec scoring of {r['batch']} listwise prompts ({min(tokens)}-{max(tokens)} tokens, {r['candidates']} "
        f"candidates), {n_student}-layer student vs its {n_teacher}-layer teacher ({r['model']}, {r['dtype']}), "
        "same path, FLOP bound from the two configs"
    )
    answer, answer_text = _speedup(r, "speedup_answer_only")
    _, full_text = _speedup(r, "speedup_full")
    measured = (
        f"answer-only head {answer_text} (FLOP bound {_x(r['flop_bound_answer_only'])}); full head {full_text} "
        f"(bound {_x(r['flop_bound_full'])})"
    )
    goal = r["goal"]["speedup_answer_only"]
    return what, measured, f">= {goal}x answer-only: {_met(answer >= goal)}"


def kd_vs_hf_trainer(r: dict) -> tuple[str, str, str]:
    what = (
        f"distillation tokens/s: the package's step vs a HF `Trainer` with a KD `compute_loss` (full-sequence "
        f"forward KL + CE), same teacher ({r['teacher']}), {len(r['student_layers'])}-layer student, batch "
        f"({r['batch_rows']} x {r['batch_width']}, {r['formulation']}) and threads"
        + (f"; the package's step under `{r['ds_config']}`" if r.get("ds_config") else "")
    )
    speedup, text = _speedup(r, "speedup")
    tps = r.get("tokens_per_cpu_s", r["tokens_per_s"])
    unit = "tokens per CPU second" if "tokens_per_cpu_s" in r else "tokens/s"
    measured = f"online {text} ({tps['package']:.0f} vs {tps['hf_trainer']:.0f} {unit})"
    if "speedup_cached" in r:
        _, cached_text = _speedup(r, "speedup_cached")
        measured += (
            f"; reading the offline teacher cache (no teacher forward in the step): {cached_text} "
            f"({tps['package_cached']:.0f} {unit})"
        )
    return what, measured, f">= {r['goal']}x online: {_met(speedup >= r['goal'])}"


def student_build(r: dict) -> tuple[str, str, str]:
    paths = r["paths"]
    what = (
        f"peak RSS of building the {len(r['student_layers'])}-layer student of {r['model']} "
        f"({r['teacher_layers']} layers), fresh process each: chosen tensors read from the safetensors folder "
        "vs the whole teacher loaded"
    )
    measured = (
        f"{paths['folder']['peak_rss_mib']:.0f} vs {paths['teacher']['peak_rss_mib']:.0f} MiB; "
        f"{r['ratio_to_student_plus_runtime']:.2f}x (student {r['student_mib']:.0f} MiB + idle runtime "
        f"{r['runtime_rss_mib']:.0f} MiB) vs {paths['teacher']['ratio_to_student_plus_runtime']:.2f}x"
    )
    ratio = r["ratio_to_student_plus_runtime"]
    return what, measured, f"<= {r['goal']}x student + runtime: {_met(ratio <= r['goal'])}"


def distill_step(r: dict) -> tuple[str, str, str]:
    med = r.get("median_cpu_s", r["median_s"])
    what = (
        f"one distill step vs its parts (teacher forward + student forward/backward/step), {r['teacher']} "
        f"teacher ({r['quantization']}), batch {' x '.join(map(str, r['batch']))}"
    )
    ratio, text = _speedup(r, "ratio_distill_over_parts")
    unit = "CPU s" if "median_cpu_s" in r else "s"
    measured = f"{text} ({med['distill']:.2f} vs {med['teacher']:.2f} + {med['student']:.2f} {unit})"
    return what, measured, f"<= {r['goal']}x: {_met(ratio <= r['goal'])}"


def fisher(r: dict) -> tuple[str, str, str]:
    c = r["config"]
    what = (
        f"Fisher pass vs a frozen forward+backward on the same batch ({c['shape']} layer shape, {c['layers']} "
        f"layers, {c['batch']} x {c['seq']} tokens, {c['quant']})"
    )
    param, param_text = _speedup(r, "ratio_param_vs_frozen")
    act, act_text = _speedup(r, "ratio_act_vs_frozen")
    measured = f"parameter form {param_text}; activation form {act_text}"
    if "ratio_param_vs_train" in r:
        measured += f"; parameter form {_x(r['ratio_param_vs_train'])} a training backward (wall)"
    goal = r["goal"]
    ok = param <= goal["param"] and act <= goal["act"]
    return what, measured, f"<= {goal['param']}x / {goal['act']}x: {_met(ok)}"


def data_reader(r: dict) -> tuple[str, str, str]:
    rows = r["results"]
    what = "streaming jsonl reader on synthetic Amazon reviews, each size in a fresh process"
    measured = "; ".join(
        f"{x['reviews']:,} reviews: {x['reviews_per_s'] / 1000:.0f}k/s read, peak RSS {x['peak_rss_mb']} MB "
        f"({x['rss_before_mb']} MB before)"
        for x in rows
    )
    ok = all(x["reviews_per_s"] >= 50_000 for x in rows)
    return what, measured, f">= 50k reviews/s: {_met(ok)}"


def pointwise(r: dict) -> tuple[str, str, str]:
    tok = r["tokens_processed"]
    what = (
        f"packed pointwise scoring (one forward per user) vs one forward per candidate, {r['candidates']} "
        f"candidates, {r['model']} model"
    )
    measured = (
        f"{_x(r['speedup_packed_vs_separate'])} faster ({_x(r['speedup_packed_vs_separate_batched'])} vs batched); "
        f"{tok['ratio_separate_over_packed']}x fewer tokens"
    )
    return what, measured, f">= 4x fewer tokens: {_met(tok['ratio_separate_over_packed'] >= 4)}"


def optimizer_step(r: dict) -> tuple[str, str, str]:
    med = r.get("median_cpu_s", r["median_s"])
    what = (
        f"AdamW step as the trainer builds it ({'fused' if r['trainer_optimizer_fused'] else 'per-op loop'}) vs "
        f"torch's per-op loop, one fp32 tensor of {r['numel'] / 1e6:.0f}M elements (a ZeRO-2 rank's share of "
        "the experiment's 8-layer student)"
    )
    ratio, text = _speedup(r, "ratio_loop_over_trainer")
    unit = "CPU s" if "median_cpu_s" in r else "s"
    measured = (
        f"{text} ({med['trainer']:.3f} vs {med['loop']:.3f} {unit}); largest difference after {r['steps']} "
        f"steps {r['max_abs_difference_after_steps']:.1e}"
    )
    return what, measured, f">= 2x: {_met(ratio >= 2)}"


def eval_length_sorted(r: dict) -> tuple[str, str, str]:
    pad, timed = r["padding_share_all_batches"], r["padding_share_timed"]
    what = (
        f"scoring with each rank's batches regrouped longest first vs in dataset order: {r['users']} {r['data']} "
        f"users, batches of {r['batch_size']} over {r['ranks']} ranks; {r['timed_examples']} of them timed"
    )
    ratio, text = _speedup(r, "ratio_in_order_over_length_sorted")
    measured = (
        f"padding {pad['in_order']:.1%} -> {pad['length_sorted']:.1%} of the batches' tokens; timed examples "
        f"{text} ({timed['in_order']:.1%} -> {timed['length_sorted']:.1%} padding); same ranks: "
        f"{'yes' if r['same_ranks'] else 'NO'} (scores within {r['max_abs_score_difference']:.1e})"
    )
    return what, measured, f"same ranks, faster: {_met(r['same_ranks'] and ratio > 1)}"


#: Benchmarks in table order: result file stem -> renderer (what it compares, measured, goal).
RENDERERS: dict[str, Callable[[dict], tuple[str, str, str]]] = {
    "scoring": scoring,
    "kd_vs_hf_trainer": kd_vs_hf_trainer,
    "kd_vs_hf_trainer_listwise": kd_vs_hf_trainer,
    "kd_vs_hf_trainer_zero0": kd_vs_hf_trainer,
    "student_build": student_build,
    "distill_step": distill_step,
    "fisher": fisher,
    "data_reader": data_reader,
    "pointwise": pointwise,
    "optimizer_step": optimizer_step,
    "eval_length_sorted": eval_length_sorted,
}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(results: Path) -> str:
    rows, missing, hosts = [], [], set()
    for name, renderer in RENDERERS.items():
        path = results / f"{name}.json"
        if not path.is_file():
            missing.append(name)
            continue
        try:
            result: dict[str, Any] = json.loads(path.read_text())
            what, measured, goal = renderer(result)
        except (ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"{path}: not a result of bench_{name}.py ({type(e).__name__}: {e})") from None
        run = result.get("run", {})
        hosts.add(f"{run.get('cpu_count', '?')} CPUs")
        if run.get("torch"):
            hosts.add(f"torch {run['torch']}")
        command = run.get("command", f"python benchmarks/bench_{name}.py")
        rows.append(f"| `{_cell(command)}` | {_cell(what)} | {_cell(measured)} | {_cell(goal)} |")
    try:
        where = results.resolve().relative_to(ROOT)
    except ValueError:
        where = results
    lines = [
        BEGIN,
        f"_Generated by `python scripts/perf_table.py` from `{where}/*.json` (`make bench`; "
        f"{'; '.join(sorted(hosts)) or 'no results'}). Ratios are medians of repetitions interleaved "
        "in one process; where a benchmark records CPU time too, its goal is judged on CPU time (one thread, the "
        "machine shared with other jobs); absolute times depend on the machine and its load._",
        "",
        "| command | what it compares | measured | goal |",
        "| --- | --- | --- | --- |",
        *rows,
    ]
    if missing:
        lines += ["", "Not run: " + ", ".join(f"`benchmarks/bench_{name}.py`" for name in missing) + "."]
    lines.append(END)
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--check", action="store_true", help="print the section, do not write the README")
    args = ap.parse_args()
    if not args.results.is_dir():
        print(f"error: {args.results}: no results folder (run `make bench` first)", file=sys.stderr)
        return 2
    section = render(args.results)
    if args.check:
        print(section)
        return 0
    readme = args.readme.read_text()
    args.readme.write_text(replace_section(readme, section, BEGIN, END, "Performance"))
    print(f"{args.readme}: performance table from {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
