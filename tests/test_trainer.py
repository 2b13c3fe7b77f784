"""Trainer pieces: the LR schedule, and the original project's DistillationTrainer API on a real engine."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO, run_env
from layerwise_dist.trainer import warmup_cosine


def test_warmup_cosine_shape():
    fn = warmup_cosine(warmup_steps=4, max_steps=20, min_ratio=0.1)
    ramp = [fn(s) for s in range(4)]
    assert ramp == sorted(ramp) and ramp[-1] == pytest.approx(1.0)
    assert fn(4) == pytest.approx(1.0)
    decay = [fn(s) for s in range(4, 21)]
    assert decay == sorted(decay, reverse=True)
    assert fn(20) == pytest.approx(0.1) and fn(100) == pytest.approx(0.1)


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
