"""The memory planner against measured bytes, at 1 and 2 DeepSpeed ranks (CPU, gloo).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_planner.py --model embedded:smollm2 \
        --student-layers 8 --ranks 1 2 --out results/bench/planner_smollm2.json
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_planner.py --model tiny --ranks 1 2

Each rank count runs this file under the real ``deepspeed`` launcher (``--worker``); every
rank measures what it really holds and the driver puts it beside
:func:`layerwise_dist.planner` 's prediction for the same shape, dtype (fp32 on CPU) and
rank count:

* teacher, NF4 under ZeRO-3 (``load_teacher`` + ``make_fisher_engine``, as the pipeline
  does): the rank's parameter shards (``ds_tensor`` bytes) plus the bitsandbytes
  quantization states (absmax, nested absmax, code books, offset; unique storages);
* teacher, full precision under ZeRO-3: the rank's ``ds_tensor`` bytes;
* student (``build_student``) in a ZeRO-3 and a ZeRO-2 engine with AdamW after one
  step: parameters (ZeRO-3 ``ds_tensor`` / ZeRO-2 flat fp32 groups), gradients (the
  partitioned gradient buffers), optimizer (Adam moments + DeepSpeed's fp32 master
  partition);
* activations (rank 0, the plain student, one batch x seq): bytes of the unique
  storages autograd saves for backward (weights excluded) plus the returned logits,
  without and with activation checkpointing (stored in the forward + the largest one
  layer saves when it is recomputed).

Output: JSON with one row per component and rank count: planned, measured, ratio.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 0.15


def _tbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _param_bytes(model: torch.nn.Module) -> int:
    """What this rank holds of the model's parameters: ZeRO-3 shards when partitioned."""
    total = 0
    for p in model.parameters():
        total += _tbytes(p.ds_tensor) if hasattr(p, "ds_tensor") else _tbytes(p)
    return total


def _quant_state_bytes(model: torch.nn.Module) -> int:
    """Unique storages of the bitsandbytes quantization states (4-bit: absmax, nested state, code books)."""
    seen: dict[int, int] = {}

    def add(t: object) -> None:
        if isinstance(t, torch.Tensor):
            seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())

    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            for name in ("absmax", "code", "offset"):
                add(getattr(qs, name, None))
            s2 = getattr(qs, "state2", None)
            if s2 is not None:
                add(s2.absmax)
                add(s2.code)
        scb = getattr(p, "SCB", None)
        add(scb)
    return sum(seen.values())


def _ds_config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {
            "stage": stage,
            "stage3_param_persistence_threshold": 0,
            "reduce_bucket_size": 5e7,
            "stage3_prefetch_bucket_size": 5e7,
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def measure_teacher(model_name: str, quantization: str) -> dict:
    from layerwise_dist.config import TeacherConfig
    from layerwise_dist.fisher.engine import make_fisher_engine
    from layerwise_dist.models.teacher import load_teacher

    ds = _ds_config(3)
    model = load_teacher(TeacherConfig(model=model_name, quantization=quantization, placement="zero3"), ds)
    engine = make_fisher_engine(model, ds)
    out = {"params": _param_bytes(engine.module), "quant_state": _quant_state_bytes(engine.module)}
    del engine, model
    gc.collect()
    return out


def measure_int8_replicated(model_name: str) -> dict:
    from layerwise_dist.config import TeacherConfig
    from layerwise_dist.models.teacher import load_teacher

    model = load_teacher(TeacherConfig(model=model_name, quantization="int8", placement="replicate"))
    out = {"total": _param_bytes(model) + _quant_state_bytes(model)}
    del model
    gc.collect()
    return out


def _random_batch(vocab: int, batch: int, seq: int) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))


def measure_student(folder: Path, layers: list[int], stage: int) -> dict:
    import deepspeed

    from layerwise_dist.models.student import build_student

    student, _ = build_student(folder, layers)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    engine, zo, _, _ = deepspeed.initialize(model=student, optimizer=opt, config=_ds_config(stage))
    ids = _random_batch(student.config.vocab_size, 1, 16)
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    if stage == 3:
        grads = _tbytes(zo.grad_partitions_flat_buffer)
        master = sum(_tbytes(t) for t in zo.fp32_partitioned_groups_flat)
    else:
        grads = sum(_tbytes(t) for group in zo.averaged_gradients.values() for t in group if t is not None)
        master = sum(_tbytes(t) for t in zo.single_partition_of_fp32_groups)
    engine.step()
    moments = sum(
        _tbytes(t) for s in zo.optimizer.state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")
    )
    out = {"params": _param_bytes(engine.module), "grads": grads, "optimizer": moments + master}
    del engine, zo, student, opt
    gc.collect()
    return out


def saved_activation_bytes(model: torch.nn.Module, ids: torch.Tensor, checkpointing: bool) -> dict:
    """Bytes autograd keeps for backward (unique storages, weights excluded) + the returned logits.

    Also the largest share one decoder layer saves (found with hooks around each layer)."""
    from layerwise_dist.fisher.estimator import decoder_layers

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    vocab = model.config.vocab_size
    seen: dict[int, int] = {}
    logit_keys: set[int] = set()
    running = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        k = s.data_ptr()
        if k not in weights and k not in seen:
            seen[k] = s.nbytes()
            running[0] += s.nbytes()
            if t.dim() and t.shape[-1] == vocab:
                logit_keys.add(k)
        return t

    per_layer: list[int] = []
    starts: dict[int, int] = {}
    handles = []
    for i, layer in enumerate(decoder_layers(model)):
        handles.append(layer.register_forward_pre_hook(lambda m, a, i=i: starts.__setitem__(i, running[0])))
        handles.append(layer.register_forward_hook(lambda m, a, o, i=i: per_layer.append(running[0] - starts[i])))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(input_ids=ids, labels=ids)
    finally:
        for h in handles:
            h.remove()
        model.gradient_checkpointing_disable()
    logits = _tbytes(out.logits) + sum(seen[k] for k in logit_keys)
    layers = sum(v for k, v in seen.items() if k not in logit_keys)
    del out
    return {"layers": layers, "logits": logits, "max_layer_saved": max(per_layer)}


def measure_activations(folder: Path, layers: list[int], batch: int, seq: int) -> dict:
    from layerwise_dist.models.student import build_student

    student, _ = build_student(folder, layers)
    ids = _random_batch(student.config.vocab_size, batch, seq)
    plain = saved_activation_bytes(student, ids, checkpointing=False)
    ckpt = saved_activation_bytes(student, ids, checkpointing=True)
    # A layer's activations while it is recomputed: the largest one layer saves without checkpointing.
    return {
        "layers": plain["layers"],
        "layers_checkpointed": ckpt["layers"] + plain["max_layer_saved"],
        "logits": plain["logits"],
    }


def worker(args: argparse.Namespace) -> None:
    import importlib

    importlib.import_module("torch._dynamo")  # must precede deepspeed.zero.Init (DESIGN.md)
    import deepspeed

    from layerwise_dist.config import TeacherConfig
    from layerwise_dist.models.teacher import resolve_model_dir

    deepspeed.init_distributed()
    from layerwise_dist.distributed import release_shm_names

    release_shm_names()  # DeepSpeed never unlinks its /dev/shm buffers
    rank = int(os.environ.get("RANK", "0"))
    folder = resolve_model_dir(TeacherConfig(model=args.model))
    layers = list(range(args.student_layers))
    result: dict = {"rank": rank, "world": int(os.environ.get("WORLD_SIZE", "1"))}
    result["teacher_nf4"] = measure_teacher(args.model, "nf4")
    result["teacher_none"] = measure_teacher(args.model, "none")
    result["student_zero3"] = measure_student(folder, layers, 3)
    result["student_zero2"] = measure_student(folder, layers, 2)
    if rank == 0:  # int8 (LLM.int8) is loaded replicated: ZeRO-3 does not partition int8 tensors
        result["teacher_int8"] = measure_int8_replicated(args.model)
    if rank == 0 and not args.skip_activations:
        result["activations"] = measure_activations(folder, layers, args.batch, args.seq)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(result, indent=1))


def run_ranks(model: str, student_layers: int, ranks: int, batch: int, seq: int, out_dir: Path) -> list[dict]:
    """This file as ``--worker`` under the real deepspeed launcher; returns every rank's JSON."""
    from layerwise_dist.distributed import free_port

    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher), "--num_gpus", str(ranks), "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    cmd += [str(Path(__file__).resolve()), "--worker", "--model", model, "--student-layers", str(student_layers)]
    cmd += ["--batch", str(batch), "--seq", str(seq), "--out-dir", str(out_dir)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(
            f"deepspeed worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(ranks)]


def planned(model: str, student_layers: int, ranks: int, batch: int, seq: int) -> dict[str, int]:
    """The planner's per-rank figures for what the worker measures (fp32 on CPU)."""
    from layerwise_dist import planner
    from layerwise_dist.config import TeacherConfig
    from layerwise_dist.models.teacher import resolve_model_dir

    shape = planner.count_model(resolve_model_dir(TeacherConfig(model=model)))
    student = shape.student(student_layers, list(range(student_layers)))
    nf4 = planner.weight_bytes(shape, "nf4", "fp32")
    full = planner.weight_bytes(shape, "none", "fp32")
    z3 = planner.student_states(student, ranks, "zero3", "fp32")
    z2 = planner.student_states(student, ranks, "zero2", "fp32")
    act = planner.activation_bytes(student, batch, seq, "fp32", checkpointing=False)
    ckpt = planner.activation_bytes(student, batch, seq, "fp32", checkpointing=True)
    return {
        "teacher_nf4.params": nf4.per_rank(ranks, "zero3") - nf4.replicated,
        "teacher_nf4.quant_state": nf4.replicated,
        "teacher_nf4.total": nf4.per_rank(ranks, "zero3"),
        "teacher_none.params": full.per_rank(ranks, "zero3"),
        "student_zero3.params": z3.params,
        "student_zero3.grads": z3.grads,
        "student_zero3.optimizer": z3.optimizer,
        "student_zero2.params": z2.params,
        "student_zero2.grads": z2.grads,
        "student_zero2.optimizer": z2.optimizer,
        "activations.layers": act.layers,
        "activations.layers_checkpointed": ckpt.layers,
        "activations.logits": act.logits,
        "teacher_int8.total": planner.weight_bytes(shape, "int8", "fp32").per_rank(ranks, "replicate"),
    }


def measured_rows(rank_results: list[dict]) -> dict[str, int]:
    """Rank 0's figures (every rank holds the same share up to padding; the max is taken)."""
    rows: dict[str, int] = {}
    for part in ("teacher_nf4", "teacher_int8", "teacher_none", "student_zero3", "student_zero2", "activations"):
        for key in rank_results[0].get(part, {}):
            rows[f"{part}.{key}"] = max(r[part][key] for r in rank_results if part in r)
    rows["teacher_nf4.total"] = rows["teacher_nf4.params"] + rows["teacher_nf4.quant_state"]
    return rows


def compare(model: str, student_layers: int, ranks: int, batch: int, seq: int, out_dir: Path) -> list[dict]:
    measured = measured_rows(run_ranks(model, student_layers, ranks, batch, seq, out_dir))
    plan = planned(model, student_layers, ranks, batch, seq)
    rows = []
    for key, value in measured.items():
        if key in plan:
            rows.append(
                {
                    "model": model,
                    "ranks": ranks,
                    "component": key,
                    "planned_bytes": plan[key],
                    "measured_bytes": value,
                    "planned_over_measured": plan[key] / value if value else None,
                }
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # the deepspeed launcher adds it
    ap.add_argument("--model", default="tiny", help="tiny, embedded:smollm2 or a HF model folder")
    ap.add_argument("--student-layers", type=int, default=2)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--skip-activations", action="store_true")
    ap.add_argument("--out-dir", default="results/bench/planner_ranks")
    ap.add_argument("--out", "--json-out", default=None, help="JSON file for the comparison (default: print only)")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    rows = []
    for n in args.ranks:
        rows += compare(args.model, args.student_layers, n, args.batch, args.seq, Path(args.out_dir) / f"n{n}")
    print(f"{'ranks':>5}  {'component':<40} {'planned':>14} {'measured':>14} {'ratio':>7}")
    for r in rows:
        ratio = r["planned_over_measured"]
        flag = "" if ratio is not None and abs(ratio - 1) <= TOLERANCE else "  <-- off by more than 15%"
        print(
            f"{r['ranks']:>5}  {r['component']:<40} {r['planned_bytes']:>14,} {r['measured_bytes']:>14,} {ratio:>7.3f}{flag}"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"tolerance": TOLERANCE, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
