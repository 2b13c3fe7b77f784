"""A destroyed DeepSpeed engine's model is freed (the ablation builds one student engine per cell)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO, free_port, run_env


def _one_rank_result(script: str) -> dict:
    """Run ``script`` as rank 0 of a one-rank process group; the JSON it prints after ``RESULT ``."""
    env = run_env()
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(line[len("RESULT ") :])


SCRIPT = textwrap.dedent(
    """
    import gc, json, os, sys, weakref
    import torch._dynamo  # before deepspeed.zero.Init (DESIGN.md)
    import torch
    import deepspeed
    from deepspeed.runtime.zero import parameter_offload
    from layerwise_dist.distributed import destroy_engine, init_distributed
    from layerwise_dist.models.tiny import tiny_llama

    init_distributed()
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    out = {}
    for how in ("destroy", "destroy_engine"):
        refs = []
        for i in range(3):
            model = tiny_llama(vocab_size=64, num_layers=2, hidden=32, seed=i)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
            ids = torch.randint(0, 64, (1, 8))
            for _ in range(2):  # the second step replays the recorded trace (the release cache fills)
                engine.backward(engine(input_ids=ids, labels=ids).loss)
                engine.step()
            refs.append(weakref.ref(model))
            engine.destroy() if how == "destroy" else destroy_engine(engine)
            del model, opt, engine, _  # `_` holds the ZeRO optimizer, which holds the model
            gc.collect()
        out[how] = {"alive": sum(r() is not None for r in refs),
                    "stack": len(parameter_offload.FWD_MODULE_STACK)}
        parameter_offload.FWD_MODULE_STACK.clear()
    print("RESULT " + json.dumps(out))
    """
)


@pytest.mark.distributed
def test_destroy_engine_frees_the_model_where_destroy_alone_does_not():
    out = _one_rank_result(SCRIPT)
    # What the ablation hit: DeepSpeed's own destroy() leaves each ZeRO-3 model on its global module stack
    # and in the coordinator's class-level release cache.
    assert out["destroy"]["alive"] == 3 and out["destroy"]["stack"] == 3, out
    assert out["destroy_engine"] == {"alive": 0, "stack": 0}, out


TEACHER_SCRIPT = textwrap.dedent(
    """
    import json
    import torch._dynamo  # before deepspeed.zero.Init (DESIGN.md)
    from layerwise_dist.config import load_config
    from layerwise_dist.distributed import init_distributed
    from layerwise_dist.recipes.session import TeacherHandle

    init_distributed()
    out = {}
    for name in ("zero2.json", "zero3.json"):
        for fisher in (False, True):
            cfg = load_config("tiny", [f"ds_config=ds_configs/{name}", "teacher.placement=zero3"])
            handle = TeacherHandle(cfg)
            handle.get(for_fisher=fisher)
            out[f"{name}:{fisher}"] = handle.info["zero3_partitioned"]
            handle.release()
    print("RESULT " + json.dumps(out))
    """
)


@pytest.mark.distributed
def test_a_zero3_teacher_is_partitioned_when_the_student_trains_under_zero2():
    """teacher.placement=zero3 with ds_configs/zero2.json: the frozen teacher's engine is stage 3.

    DeepSpeed refuses a stage-2 engine without an optimizer ("zero stage 2 requires an optimizer"), which is
    what a frozen teacher is; stages 1-2 partition nothing a frozen model has. So the student's engine follows
    the JSON (stage 2) and the teacher's is stage 3, for its inference and for its Fisher engine.
    """
    assert _one_rank_result(TEACHER_SCRIPT) == {
        f"{n}:{f}": True for n in ("zero2.json", "zero3.json") for f in (False, True)
    }
