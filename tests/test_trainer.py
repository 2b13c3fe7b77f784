"""Trainer pieces: the LR schedule, the original project's DistillationTrainer API on a real engine, and the
pointwise path (packed teacher and student forwards) against plain models, also under 2-rank ZeRO-3."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO, run_deepspeed, run_env
from layerwise_dist.trainer import adamw, warmup_cosine


def test_warmup_cosine_shape():
    fn = warmup_cosine(warmup_steps=4, max_steps=20, min_ratio=0.1)
    ramp = [fn(s) for s in range(4)]
    assert ramp == sorted(ramp) and ramp[-1] == pytest.approx(1.0)
    assert fn(4) == pytest.approx(1.0)
    decay = [fn(s) for s in range(4, 21)]
    assert decay == sorted(decay, reverse=True)
    assert fn(20) == pytest.approx(0.1) and fn(100) == pytest.approx(0.1)


def test_the_optimizer_is_fused_on_the_cpu_and_steps_as_the_loop_does():
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    gen = torch.Generator().manual_seed(0)
    init = torch.randn(4096, generator=gen)
    grads = [torch.randn(4096, generator=gen) * 1e-2 for _ in range(10)]
    params = [torch.nn.Parameter(init.clone()) for _ in range(2)]
    fused = adamw([params[0]], lr=1e-2, weight_decay=0.1)
    loop = torch.optim.AdamW([params[1]], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.999), fused=False)
    assert fused.defaults["fused"] is ("cpu" in _get_fused_kernels_supported_devices())
    for g in grads:
        for p, opt in zip(params, (fused, loop)):
            p.grad = g.clone()
            opt.step()
    assert not torch.equal(params[0], init)  # it moved, and ...
    torch.testing.assert_close(params[0], params[1], rtol=1e-5, atol=1e-6)  # ... as the per-op loop moved
    with torch.device("meta"):  # a device without the kernel gets the loop instead of an error
        assert adamw([torch.nn.Parameter(torch.zeros(2))], lr=1e-3).defaults["fused"] is False


def test_group_by_length_gives_the_training_sampler_each_examples_tokens():
    from types import SimpleNamespace

    from layerwise_dist.config import load_config
    from layerwise_dist.trainer import DistillationRunner

    student = torch.nn.Linear(1, 1)
    student.config = SimpleNamespace()
    rows = [{"input_ids": [1] * n} for n in (5, 9, 3, 7, 8, 2, 6, 4)]
    pointwise = {"prefix_ids": [1, 2, 3], "candidate_ids": [[4, 5], [6]]}  # a packed row: prefix + candidates
    data = [*rows, pointwise, pointwise]

    def sampler(on: bool):
        cfg = load_config("tiny", [f"train.group_by_length={str(on).lower()}", "train.micro_batch_size=2"])
        return DistillationRunner(cfg, student, None, torch.nn.Identity(), data, 0, {})._sampler()

    assert sampler(False).lengths is None
    grouped = sampler(True)
    assert grouped.lengths == (5, 9, 3, 7, 8, 2, 6, 4, 6, 6)
    batches, plain = grouped.epoch_batches(), sampler(False).epoch_batches()
    assert sorted(i for b in batches for i in b) == sorted(i for b in plain for i in b)  # the same examples
    assert batches != plain


def test_public_names_resolve():
    import layerwise_dist

    for name in (
        "BaseRecommender",
        "FisherInformationCalculator",
        "DistillationTrainer",
        "LayerwiseDistillation",
        "register_weighting",
        "load_config",
        "run_pipeline",
    ):
        assert getattr(layerwise_dist, name) is not None
    with pytest.raises(AttributeError):
        layerwise_dist.does_not_exist  # noqa: B018


SCRIPT = textwrap.dedent(
    """
    import json, torch
    from layerwise_dist import DistillationTrainer, build_student, load_config
    from layerwise_dist.data import build_examples, collate, load_splits, tokenize_examples
    from layerwise_dist.models.teacher import load_teacher, load_tokenizer, resolve_model_dir

    cfg = load_config("tiny", ["train.lr=3e-3", "train.warmup_steps=0"])
    tok = load_tokenizer(cfg.teacher)
    data = tokenize_examples(build_examples(load_splits(cfg.data), "train", cfg.data, tok)[:4], tok, cfg.data)
    batch = collate([data[i] for i in range(4)], tok.pad_token_id)
    teacher = load_teacher(cfg.teacher)
    student, layer_map = build_student(resolve_model_dir(cfg.teacher), [1, 3])
    scores = [0.1, 0.2, 0.3, 0.4]   # per teacher layer: mapped layers 1 and 3 -> weights 1/3, 2/3
    trainer = DistillationTrainer(teacher_model=teacher, student_model=student, fisher_weights=scores, config=cfg)
    history = trainer.train([batch], num_epochs=6)
    print("RESULT", json.dumps({"history": history, "weights": trainer.runner.loss_fn.layer_weights}))
    """
)


@pytest.mark.integration
def test_distillation_trainer_original_api_trains():
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    totals = [h["total"] for h in result["history"]]
    assert len(totals) == 6 and all(t == t for t in totals)
    assert totals[-1] < totals[0], totals  # same batch six times: the loss must go down
    assert result["weights"] == pytest.approx([1 / 3, 2 / 3])


# --------------------------------------------------------------------------- pointwise

PV = 48


def _pointwise_setup(seed: int = 0):
    """A sharp tiny teacher, a 2-layer student from its layers 0 and 3, and three users' packed batches."""
    from layerwise_dist.config import load_config
    from layerwise_dist.losses import distillation_loss, expose_layer_outputs
    from layerwise_dist.models.student import build_student
    from layerwise_dist.models.tiny import tiny_llama
    from layerwise_dist.pointwise import pack_candidates_batch

    cfg = load_config("tiny", ["data.formulation=pointwise", "tracking.enabled=false"])
    teacher = tiny_llama(vocab_size=PV, num_layers=4, seed=seed)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8.0)
    student, layer_map = build_student(teacher, [0, 3])
    for model in (teacher, student):
        model.config._attn_implementation = "sdpa"
        expose_layer_outputs(model)
    teacher.requires_grad_(False)
    g = torch.Generator().manual_seed(seed + 1)

    def ids(n):
        return torch.randint(3, PV, (n,), generator=g).tolist()

    users = [(ids(6 + u), [ids(1 + (u + c) % 4) for c in range(3 + u % 2)], u % 3) for u in range(3)]
    packed = pack_candidates_batch([u[0] for u in users], [u[1] for u in users])
    batch = {"packed": packed, "target_index": torch.tensor([u[2] for u in users])}
    loss_fn = distillation_loss(cfg, [0.25, 0.75], layer_map, 64, 64)
    return cfg, teacher, student, loss_fn, batch


def test_forward_loss_dispatches_pointwise_batches_to_packed_forwards():
    """The runner's pointwise path is the pointwise loss on packed_forward of both models (no engine here)."""
    from layerwise_dist.config import ConfigError
    from layerwise_dist.losses import DistillationLoss, PointwiseDistillationLoss, packed_forward
    from layerwise_dist.trainer import DistillationRunner

    cfg, teacher, student, loss_fn, batch = _pointwise_setup()
    assert isinstance(loss_fn, PointwiseDistillationLoss)
    runner = DistillationRunner(cfg, student, teacher, loss_fn, [], 0, {})
    runner.engine = runner.module  # StudentWithAligner forwards the keyword arguments to the student
    calls = []
    handle = teacher.lm_head.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        total, parts = runner._forward_loss(batch)
    finally:
        handle.remove()
    with torch.no_grad():
        t_out = packed_forward(teacher, batch["packed"])
    expected, expected_parts = loss_fn(packed_forward(student, batch["packed"]), t_out, batch)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(parts) == {"ce", "kd", "list_kd", "align", "align_l0", "align_l1"}
    assert all(parts[k].item() == pytest.approx(v.item(), rel=1e-6) for k, v in expected_parts.items())
    # The teacher's LM head ran once, on the candidate-predicting positions only.
    n_tokens, width = len(batch["packed"].token_target), batch["packed"].input_ids.numel()
    assert len(calls) == 1 and calls[0] < n_tokens < width
    total.backward()
    assert student.lm_head.weight.grad is not None and all(p.grad is None for p in teacher.parameters())

    # A batch of the other formulation is refused with the fix named.
    with pytest.raises(ConfigError, match="distillation_loss"):
        runner._forward_loss({"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 4)})
    runner.loss_fn = DistillationLoss(cfg.distill, [0.25, 0.75], [0, 3], 64, 64)
    with pytest.raises(ConfigError, match="pointwise batch"):
        runner._forward_loss(batch)


@pytest.mark.parametrize("score", ["mean", "pmi"])
def test_forward_loss_on_a_collated_pointwise_batch(score):
    """A batch from ``collate`` (packed with the unconditional group): ``mean`` distils the history group
    only, ``pmi`` both groups; each equals the loss on a batch packed for it directly."""
    from layerwise_dist.config import load_config
    from layerwise_dist.data import collate
    from layerwise_dist.losses import distillation_loss, packed_forward
    from layerwise_dist.pointwise import pack_candidates_batch
    from layerwise_dist.trainer import DistillationRunner

    _, teacher, student, _, _ = _pointwise_setup()
    cfg = load_config("tiny", ["data.formulation=pointwise", f"data.pointwise_score={score}", "tracking.enabled=false"])
    loss_fn = distillation_loss(cfg, [0.25, 0.75], [0, 3], 64, 64)
    g = torch.Generator().manual_seed(9)

    def ids(n):
        return torch.randint(3, PV, (n,), generator=g).tolist()

    uncond = ids(3)
    features = []
    for u in range(2):
        prefix, cands, y = ids(5 + 2 * u), [ids(1 + c) for c in range(3 + u)], u + 1
        features.append(
            {
                "input_ids": prefix + cands[y],
                "labels": [-100] * len(prefix) + cands[y],
                "answer_pos": len(prefix) - 1,
                "target_index": y,
                "prefix_ids": prefix,
                "candidate_ids": cands,
                "unconditional_ids": uncond,
            }
        )
    batch = collate(features, 0)
    assert batch["packed"].num_groups == 2
    runner = DistillationRunner(cfg, student, teacher, loss_fn, [], 0, {})
    runner.engine = runner.module
    total, parts = runner._forward_loss(batch)

    direct = pack_candidates_batch(
        [f["prefix_ids"] for f in features],
        [f["candidate_ids"] for f in features],
        0,
        uncond if score == "pmi" else None,
    )
    ref_batch = {"packed": direct, "target_index": batch["target_index"]}
    with torch.no_grad():
        expected, expected_parts = loss_fn(packed_forward(student, direct), packed_forward(teacher, direct), ref_batch)
    for key, value in expected_parts.items():
        assert parts[key].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-7), key
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)


ZERO3_WORKER = textwrap.dedent(
    """
    import copy, json, sys
    from pathlib import Path
    import torch
    import torch._dynamo  # noqa: F401  (before any deepspeed.zero.Init)
    import deepspeed
    from deepspeed.utils import safe_get_full_grad
    sys.path.insert(0, "tests")
    from test_trainer import _pointwise_setup
    from layerwise_dist import distributed
    from layerwise_dist.losses import packed_forward
    from layerwise_dist.pointwise import pack_candidates_batch
    from layerwise_dist.trainer import DistillationRunner

    out = Path(sys.argv[-1])
    distributed.init_distributed()
    rank, world = distributed.rank(), distributed.world_size()
    cfg, teacher, student, loss_fn, _ = _pointwise_setup()
    cfg.train.lr, cfg.train.warmup_steps, cfg.output_dir = 1e-3, 0, str(out)
    teacher_ref, student_ref, loss_ref = copy.deepcopy(teacher), copy.deepcopy(student), copy.deepcopy(loss_fn)
    ds = {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2 * world,
        "gradient_clipping": 0.0, "steps_per_print": 10**9,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    teacher_engine, *_ = deepspeed.initialize(model=teacher, config=ds)  # frozen, partitioned
    runner = DistillationRunner(cfg, student, teacher_engine, loss_fn, [], 0, dict(ds, zero_allow_untested_optimizer=True))
    engine = runner.setup().engine
    result = {"partitioned": all(
        p.numel() == 0 and hasattr(p, "ds_id")
        for p in list(teacher_engine.module.parameters()) + list(engine.module.student.parameters())
    )}

    g = torch.Generator().manual_seed(5)
    def ids(n):
        return torch.randint(3, 48, (n,), generator=g).tolist()
    users = [(ids(6 + u), [ids(1 + (u + c) % 4) for c in range(3 + u % 2)], u % 3) for u in range(2 * world)]
    def batch_of(us):
        packed = pack_candidates_batch([u[0] for u in us], [u[1] for u in us])
        return {"packed": packed, "target_index": torch.tensor([u[2] for u in us])}
    batches = [batch_of(users[2 * r : 2 * r + 2]) for r in range(world)]
    mine = batches[rank]

    def plain_loss(batch):
        with torch.no_grad():
            t_out = packed_forward(teacher_ref, batch["packed"])
        return loss_ref(packed_forward(student_ref, batch["packed"]), t_out, batch)

    # The loss through the two ZeRO-3 engines equals the plain models' loss on this rank's batch.
    loss, parts = runner._forward_loss(mine)
    ref_total, ref_parts = plain_loss(mine)
    result["parts"] = {k: [float(v), float(ref_parts[k])] for k, v in parts.items()}
    result["total"] = [float(loss.detach()), float(ref_total.detach())]
    # The full (gathered) gradient = the gradient of the plain losses' mean over ranks.
    engine.backward(loss)
    full = [safe_get_full_grad(p) for p in engine.module.student.parameters()]
    torch.stack([plain_loss(b)[0] for b in batches]).mean().backward()
    result["grad_rel_err"] = max(
        float((a - p.grad).abs().max() / p.grad.abs().max()) for a, p in zip(full, student_ref.parameters())
    )
    engine.step()
    # Submodules called directly, outside the engine's forward, still gather (and release) their shards.
    packed = mine["packed"]
    kwargs = dict(
        input_ids=packed.input_ids, attention_mask=packed.additive_attention_mask(torch.float32),
        position_ids=packed.position_ids,
    )
    with torch.no_grad():
        direct = teacher_engine.module.model(**kwargs).last_hidden_state
        plain = teacher_ref.model(**kwargs).last_hidden_state
        head = teacher_engine.module.lm_head(direct[:, -1]) - teacher_ref.lm_head(plain[:, -1])
    result["direct_diff"] = [float((direct - plain).abs().max()), float(head.abs().max())]
    result["released"] = all(p.numel() == 0 for p in teacher_engine.module.parameters())
    losses = [float(loss.detach())]
    for _ in range(4):
        step_loss, _ = runner._forward_loss(mine)
        engine.backward(step_loss)
        engine.step()
        losses.append(float(step_loss.detach()))
    result["losses"] = losses
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    distributed.barrier()
    """
)


@pytest.mark.distributed
def test_pointwise_distillation_under_two_rank_zero3_equals_plain_models(tmp_path):
    """Teacher (frozen inference engine) and student (training engine) partitioned by ZeRO-3 on 2 ranks: the
    packed pointwise loss and its gathered gradient equal the plain models'; training lowers the loss."""
    script = tmp_path / "worker.py"
    script.write_text(ZERO3_WORKER)
    proc = run_deepspeed(str(script), [str(tmp_path / "out")])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / "out" / f"rank{rank}.json").read_text())
        assert result["partitioned"]
        for name, (got, ref) in result["parts"].items():
            assert got == pytest.approx(ref, rel=1e-5, abs=1e-7), name
        assert result["total"][0] == pytest.approx(result["total"][1], rel=1e-5)
        assert result["parts"]["kd"][0] > 0 and result["parts"]["list_kd"][0] > 0
        assert result["grad_rel_err"] < 1e-4
        assert result["direct_diff"] == [0.0, 0.0] and result["released"]
        assert result["losses"][-1] < result["losses"][0], result["losses"]
