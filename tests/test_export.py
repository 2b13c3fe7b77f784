"""`layerwise-dist export`: a DeepSpeed checkpoint becomes a Hugging Face folder equal to the run's own student."""

from __future__ import annotations

import json
import stat

import pytest
import torch

from conftest import run_cli

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("export") / "run"
    out = run_cli(
        [
            "distill",
            "--preset",
            "tiny",
            "--nproc",
            "1",
            "student.selection=uniform",
            "distill.layer_weighting=linear",
            "train.max_steps=2",
            "eval.max_examples=4",
            "data.history_len=3",
            "tracking.enabled=false",
            f"output_dir={run}",
        ]
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return run


def test_export_equals_the_saved_student_and_is_group_readable(run_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = run_cli(["export", str(run_dir / "checkpoints"), "--out", str(tmp_path / "hf")])
    assert out.returncode == 0, out.stderr[-3000:]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    saved = AutoModelForCausalLM.from_pretrained(run_dir / "student").eval()
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, saved(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert exported.config.layerwise_dist["layer_map"] == saved.config.layerwise_dist["layer_map"]
    for folder in (tmp_path / "hf", run_dir / "student"):
        for path in [folder, *folder.iterdir()]:
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "kept teacher layers" in card and "step2" in card


def test_student_model_card_has_the_measured_metrics(run_dir):
    card = (run_dir / "student" / "README.md").read_text()
    ndcg = json.loads((run_dir / "results.json").read_text())["student"]["ndcg@10"]
    assert f"{ndcg:.4f}" in card


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["{tmp}/nope", "--out", "{tmp}/x"], "does not exist"),
        (["{run}/checkpoints", "--out", "{tmp}/x", "--tag", "step99"], "no checkpoint tag 'step99'"),
        (["{run}/checkpoints", "--out", "{tmp}/x", "--model-config", "{tmp}"], "no config.json"),
    ],
)
def test_bad_export_input_is_one_line(run_dir, tmp_path, args, needle):
    out = run_cli(["export", *[a.format(tmp=tmp_path, run=run_dir) for a in args]])
    assert out.returncode == 2 and needle in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "x").exists()


def test_cli_and_api_recommend_the_same_items(run_dir):
    """The student records its prompt settings (history_len=3 here, default 10): every entry point uses them."""
    from layerwise_dist.config import load_config
    from layerwise_dist.data import load_splits
    from layerwise_dist.recommender import BaseRecommender

    stored = json.loads((run_dir / "student" / "config.json").read_text())["layerwise_dist"]["prompt"]
    assert stored["history_len"] == 3
    splits = load_splits(load_config("tiny").data)
    user = sorted(splits.train)[0]
    rec = BaseRecommender(model_name=str(run_dir / "student"), data=splits)
    assert rec.data_config.history_len == 3
    api = [item["item_id"] for item in rec.recommend(user_id=user, category=splits.category, top_k=3)]
    out = run_cli(
        ["recommend", "--model", str(run_dir / "student"), "--preset", "tiny", "--user", user]
        + ["--category", splits.category, "--top-k", "3"]
    )
    assert out.returncode == 0, out.stderr[-2000:]
    cli = [line.split()[1] for line in out.stdout.splitlines() if line[:2] in ("1.", "2.", "3.")]
    assert cli == api and len(api) == 3
