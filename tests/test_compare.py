"""``layerwise-dist compare --models A B ...``: several models on the same users, one table (issue 15)."""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest

from conftest import run_cli
from layerwise_dist import compare as cmp
from layerwise_dist.config import load_config


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "table"
    cfg = load_config("tiny", ["eval.max_examples=10", "fisher.num_examples=4", "tracking.enabled=true"])
    result = cmp.run_compare(["tiny", "gemma=tiny:gemma3"], cfg, out, latency_examples=3)
    return cfg, out, result


def test_files_rows_and_same_users(compared):
    cfg, out, result = compared
    for name in ("compare.md", "compare.csv", "compare.png", "compare.json", "fisher_tiny.json", "fisher_gemma.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [r["label"] for r in rows] == ["tiny", "gemma"]
    assert [r["architecture"] for r in rows] == ["LlamaForCausalLM", "Gemma3ForCausalLM"]
    models = result["models"]
    assert models[0]["examples_hash"] == models[1]["examples_hash"] and models[0]["examples"] == 10
    for r in models:
        for m in ("hr@10", "ndcg@10", "mrr"):
            assert 0 <= r[f"{m}_lo"] <= r[m] <= r[f"{m}_hi"] <= 1, (m, r)
        assert 0 < r["latency_ms_p50"] <= r["latency_ms_p95"] and r["latency_requests"] == 3
        assert r["examples_per_s"] > 0 and r["parameters"] > 1e6 and r["memory_model_bytes"] > 0
    md = (out / "compare.md").read_text()
    assert "| gemma (`tiny:gemma3`) | Gemma3ForCausalLM | 4 |" in md and "The original project's view" in md


def test_quality_equals_a_plain_evaluation_and_paired_difference(compared):
    """The table's figures are evaluate_model's on the run's own evaluation users, and the paired difference
    is the difference of the two models' means on those users."""
    from layerwise_dist.data import load_splits, tokenize_examples
    from layerwise_dist.data.sampler import load_batch
    from layerwise_dist.evaluation import evaluate_model
    from layerwise_dist.models.teacher import load_teacher, load_tokenizer

    cfg, _, result = compared
    tcfg = dataclasses.replace(cfg.teacher, model="tiny:gemma3", placement="replicate")
    tok = load_tokenizer(tcfg)
    examples = cmp.eval_examples(load_splits(cfg.data), cfg, tok, "test")
    data = tokenize_examples(examples, tok, cfg.data)
    batches = [load_batch(data, [i], tok.pad_token_id) for i in range(len(data))]
    metrics = evaluate_model(load_teacher(tcfg), batches, (10,), progress=False)
    gemma, tiny = result["models"][1], result["models"][0]
    for m in ("hr@10", "ndcg@10", "mrr"):
        assert gemma[m] == pytest.approx(metrics[m], abs=1e-6), m
    diff = gemma["paired_ndcg@10"]
    assert diff["difference"] == pytest.approx(gemma["ndcg@10"] - tiny["ndcg@10"], abs=1e-9)
    assert diff["ci95"][0] <= diff["difference"] <= diff["ci95"][1] and diff["n"] == 10
    assert "paired_ndcg@10" not in tiny


def test_fisher_summary_is_the_saved_profile(compared):
    from layerwise_dist.fisher import FisherProfile

    _, out, result = compared
    for row, name in zip(result["models"], ("tiny", "gemma")):
        profile = FisherProfile.load_json(out / f"fisher_{name}.json")
        assert profile.num_layers == 4 and profile.num_examples == 4
        top, bottom = profile.depth_shares(0.3)
        assert row["fisher_top30_share"] == pytest.approx(top) and row["fisher_bottom30_share"] == pytest.approx(bottom)
        assert row["fisher_top_layers"] == profile.top_layers(3)


def test_mlflow_run_holds_every_model(compared):
    import mlflow

    _, out, _ = compared
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out.parent}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("layerwise_dist").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    metrics = runs[0].data.metrics
    assert "eval/tiny/ndcg_at_10" in metrics and "eval/gemma/ndcg_at_10" in metrics
    assert any(k.startswith("eval/gemma/latency_ms_p95") for k in metrics)
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"compare.md", "compare.csv", "compare.png", "compare.json"} <= artifacts


def test_models_that_would_see_other_users_are_refused(tmp_path, monkeypatch):
    cfg = load_config("tiny", ["eval.max_examples=6", "tracking.enabled=false"])
    real = cmp.eval_examples
    calls = []

    def shifted(splits, run_cfg, tokenizer, split):
        calls.append(1)
        examples = real(splits, run_cfg, tokenizer, split)
        return examples[1:] if len(calls) > 1 else examples[:-1]

    monkeypatch.setattr(cmp, "eval_examples", shifted)
    with pytest.raises(cmp.CompareError, match="would be scored on other examples than a"):
        cmp.run_compare(["a=tiny", "b=tiny"], cfg, tmp_path / "x", latency_examples=1, with_fisher=False)


def test_model_and_override_parsing():
    assert cmp.split_models_and_overrides(["smollm2-135m", "g=gemma3-270m", "data.seed=3", "output_dir=x"]) == (
        ["smollm2-135m", "g=gemma3-270m"],
        ["data.seed=3", "output_dir=x"],
    )
    with pytest.raises(cmp.CompareError, match="appear twice"):
        cmp.parse_models(["tiny", "tiny"])
    with pytest.raises(cmp.CompareError, match="at least one model"):
        cmp.parse_models([])


def test_cli_unknown_model_is_one_line(tmp_path):
    out = run_cli(
        ["compare", "--preset", "tiny", "--models", "tiny", str(tmp_path / "missing"), "--out", str(tmp_path)]
    )
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors and "no such model folder" in errors[0] and "Traceback" not in out.stderr


def test_a_run_folder_stands_for_its_zero_shot_adapted_and_student_models(tmp_path):
    run = tmp_path / "demo"
    (run / "adapt" / "merged").mkdir(parents=True)
    (run / "student").mkdir()
    (run / "config.yaml").write_text("teacher:\n  model: smollm2-135m\n")
    (run / "adapt" / "merged" / "config.json").write_text("{}")
    specs = cmp.parse_models([str(run), "g=gemma3-270m"])
    assert [(s.label, s.model) for s in specs] == [
        ("demo/zero-shot", "smollm2-135m"),
        ("demo/adapted", str(run / "adapt" / "merged")),
        ("g", "gemma3-270m"),
    ]  # no student/config.json: no student row
    (run / "student" / "config.json").write_text("{}")
    assert [s.label for s in cmp.parse_models([f"mine={run}"])] == ["mine/zero-shot", "mine/adapted", "mine/student"]


def test_cli_overrides_after_other_options(tmp_path, capsys):
    """key=value items reach the config wherever they stand after --models (here after --out)."""
    from layerwise_dist.cli import main

    out = tmp_path / "t"
    argv = ["compare", "--preset", "tiny", "--models", "tiny", "--no-fisher", "--latency-examples", "1"]
    assert main([*argv, "--out", str(out), "eval.max_examples=3", "tracking.enabled=false", "data.seed=7"]) == 0
    result = json.loads((out / "compare.json").read_text())
    assert result["models"][0]["examples"] == 3 and "data.seed=7" in result["setup"]
    assert "| tiny | LlamaForCausalLM | 4 |" in capsys.readouterr().out
