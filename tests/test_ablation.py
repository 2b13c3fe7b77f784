"""layerwise-dist ablation: cells, nested MLflow runs, the report, and a rerun that recomputes nothing."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from layerwise_dist.config import ConfigError, load_config
from layerwise_dist.recipes.ablation import Cell, ablation_cells


def test_cells_and_their_configs(tmp_path):
    cfg = load_config("tiny", ["ablation.selections=[fisher-topk,first]", "ablation.weightings=[fisher,uniform]"])
    names = [c.name for c in ablation_cells(cfg)]
    assert names == [
        "fisher-topk+fisher",
        "fisher-topk+uniform",
        "first+fisher",
        "first+uniform",
        "fisher-topk+task_only",
    ]
    task = Cell("first", "uniform", task_only=True).config(cfg, tmp_path / "c", curve_every=5)
    assert (task.distill.kd_weight, task.distill.list_kd_weight, task.distill.align_weight) == (0.0, 0.0, 0.0)
    assert task.distill.ce_weight == cfg.distill.ce_weight > 0
    assert task.student.selection == "first" and task.train.eval_every == 5 and task.output_dir == str(tmp_path / "c")
    plain = Cell("uniform", "linear").config(cfg, tmp_path / "d")
    assert plain.distill.layer_weighting == "linear" and plain.distill.kd_weight == cfg.distill.kd_weight
    assert plain.train.eval_every == cfg.train.eval_every
    with pytest.raises(ConfigError, match="ablation.selections must be some of"):
        load_config("tiny", ["ablation.selections=[list]"])
    with pytest.raises(ConfigError, match="ablation.weightings must name"):
        load_config("tiny", ["ablation.weightings=[]"])


def _ok(out):
    assert out.returncode == 0, f"exit {out.returncode}\nSTDOUT:\n{out.stdout[-3000:]}\nSTDERR:\n{out.stderr[-3000:]}"


@pytest.mark.distributed
@pytest.mark.integration
def test_ablation_two_ranks_nested_runs_report_and_rerun(tmp_path):
    import mlflow

    results_dir = tmp_path / "results"
    run = results_dir / "abl"
    args = ["ablation", "--preset", "tiny", "--nproc", "2", "ablation.selections=[uniform]"]
    args += ["ablation.weightings=[uniform]", "train.max_steps=2", "ablation.curve_every=1", "tracking.enabled=true"]
    args += ["ablation.transfer_source=embedded", f"output_dir={run}"]
    _ok(run_cli(args))
    cells = ["uniform+uniform", "uniform+task_only"]
    for name in cells:
        cell = run / "cells" / name
        res = json.loads((cell / "results.json").read_text())
        assert res["cell"]["name"] == name and res["student"]["n"] == 16
        assert (cell / "per_example" / "student.parquet").is_file() and (cell / "student" / "config.json").is_file()
    # One teacher cache for both cells: the first cell builds it (each rank its own examples), the second reads it.
    cache = run / "teacher_cache"
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["layers"] and manifest["formulation"] == "listwise"
    first = json.loads((run / "cells" / cells[0] / "results.json").read_text())["teacher_cache"]
    second = json.loads((run / "cells" / cells[1] / "results.json").read_text())["teacher_cache"]
    assert manifest["topk"] == 0 and manifest["dtype"] == "bf16"  # full-vocabulary logits by default
    assert first["built_examples_rank0"] > 0 and second["built_examples_rank0"] == 0
    assert len(list((cache / "examples").glob("*.safetensors"))) >= 2 * first["built_examples_rank0"] - 1
    task_history = json.loads((run / "cells" / "uniform+task_only" / "train_history.json").read_text())
    assert all(h["total"] == pytest.approx(h["ce"], rel=1e-5) for h in task_history)  # no KD, no alignment
    curve = json.loads((run / "cells" / "uniform+uniform" / "train_history.json").read_text())
    assert [h["step"] for h in curve if "valid/ndcg@10" in h] == [1, 2]

    top = json.loads((run / "results.json").read_text())
    assert list(top["cells"]) == cells and "comparison" in top and top["teacher"]["n"] == 16
    report = (run / "ablation_report.md").read_text()
    for section in ("## Every ranker on the same users", "## H3:", "## H1:", "Layerwise-Adapter headline"):
        assert section in report
    data = json.loads((run / "ablation.json").read_text())
    assert set(cells) <= set(data["rankers"]) and {"random", "popularity", "teacher"} <= set(data["rankers"])
    assert (
        data["rankers"]["uniform+uniform"]["retention_ci95"][0]
        <= data["rankers"]["uniform+uniform"]["retention_ndcg@10"]
    )
    assert any(p["question"].startswith("value of distillation") for p in data["paired"])
    assert [p["step"] for p in data["curve"]["points"]] == [1, 2]
    top = json.loads((run / "results.json").read_text())  # the data as loaded, not the config's default
    assert top["data"]["users"] > 0 and data["setup"]["data"]["category"] == top["data"]["category"]
    transfer = json.loads((run / "transfer" / "results.json").read_text())
    assert transfer["transfer"]["cell"] == "uniform+uniform" and transfer["student"]["n"] == 16  # the best distilled
    assert "teacher" in transfer and "## Transfer check: embedded" in report

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{results_dir}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("layerwise_dist").experiment_id])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parent) == 1 and len(children) == 3  # the two cells and the transfer check
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent[0].info.run_id}
    assert {c.info.run_name for c in children} == {f"abl-{n}" for n in [*cells, "transfer"]}

    # A rerun recomputes no cell: their markers stay as they were.
    stamps = {n: (run / "cells" / n / "cell.json").stat().st_mtime_ns for n in cells}
    out = run_cli(args)
    _ok(out)
    assert {n: (run / "cells" / n / "cell.json").stat().st_mtime_ns for n in cells} == stamps
    assert out.stderr.count("already finished") >= 2, out.stderr[-2000:]
