"""layerwise-dist ablation: cells, nested MLflow runs, the report, and a rerun that recomputes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from layerwise_dist.ablation_report import _wall, plateau
from layerwise_dist.config import ConfigError, load_config
from layerwise_dist.recipes.ablation import AblationRecipe, Cell, ablation_cells, add_compute, counted


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
    assert plain.train.eval_every == cfg.train.eval_every and plain.train.final_validation is False
    assert task.train.final_validation is True  # the learning-curve cell validates, its last step included
    with pytest.raises(ConfigError, match="ablation.selections must be some of"):
        load_config("tiny", ["ablation.selections=[list]"])
    with pytest.raises(ConfigError, match="ablation.weightings must name"):
        load_config("tiny", ["ablation.weightings=[]"])


def test_the_final_evaluation_loads_the_first_cell_whose_student_is_on_disk(tmp_path):
    """Student folders are not committed: a fresh checkout finishing a run times a student it trained, or, when
    it trained none, the first cell's architecture built again from the teacher's layers."""
    from types import SimpleNamespace

    from layerwise_dist.models.teacher import load_tokenizer

    cfg = load_config("tiny", ["ablation.selections=[fisher-topk,first]", "ablation.weightings=[fisher,uniform]"])
    recipe = AblationRecipe(SimpleNamespace(cfg=cfg, out=tmp_path, tokenizer=load_tokenizer(cfg.teacher)))
    with pytest.raises(FileNotFoundError, match=r"no cell of .* has a student folder.*layer_weights.json.*missing"):
        recipe.final_student()
    first = tmp_path / "cells" / "fisher-topk+fisher"
    first.mkdir(parents=True)
    (first / "layer_weights.json").write_text(json.dumps({"layer_map": [1, 3], "weights": [0.5, 0.5]}))
    name, folder = recipe.final_student()
    assert name == "fisher-topk+fisher" and folder == tmp_path / "final_student"
    built = json.loads((folder / "config.json").read_text())
    assert built["num_hidden_layers"] == 2 and built["layerwise_dist"]["layer_map"] == [1, 3]
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer_config.json").is_file()
    for name in ("first+uniform", "fisher-topk+task_only"):
        (tmp_path / "cells" / name / "student").mkdir(parents=True)
        (tmp_path / "cells" / name / "student" / "config.json").write_text("{}")
    (tmp_path / "cells" / "fisher-topk+uniform" / "student").mkdir(parents=True)  # no config.json: not a model
    assert recipe.final_student() == ("first+uniform", tmp_path / "cells" / "first+uniform" / "student")
    (first / "student").mkdir()
    (first / "student" / "config.json").write_text("{}")
    assert recipe.final_student() == ("fisher-topk+fisher", first / "student")


def test_plateau_judges_the_second_half_of_the_curve():
    def pts(vals):
        return [{"step": 25 * (i + 1), "valid_ndcg@10": v} for i, v in enumerate(vals)]

    flat = plateau(pts([0.325, 0.286, 0.299, 0.320, 0.313, 0.321]))
    assert flat["plateau"] is True and flat["best_step"] == 25 and flat["last"] == pytest.approx(0.321)
    rising = plateau(pts([0.20, 0.22, 0.25, 0.28, 0.31, 0.34]))  # still climbing at the end of the budget
    assert rising["plateau"] is False and rising["rise_second_half"] == pytest.approx(0.06, abs=1e-9)
    fell = plateau(pts([0.30, 0.40, 0.39, 0.36, 0.35, 0.35]))  # the last point far below the best
    assert fell["plateau"] is False and fell["best"] == pytest.approx(0.40)
    assert plateau(pts([0.3, 0.3]))["plateau"] is None


def test_plateau_with_the_validation_ranks_pairs_the_last_quarter_user_by_user():
    """With each validation user's rank at each point, the verdict is the paired rise over the last quarter of
    the budget (from the point at three quarters of it to the last) with its bootstrap interval: holding 0 and
    below the tolerance is a plateau, above 0 is not, anything else is undecided (too few users), whatever the
    means alone suggest; the rise from half the budget is given beside it."""
    rng = np.random.default_rng(0)
    steps = [150, 300, 450, 600]
    pts = [{"step": s, "valid_ndcg@10": 0.3} for s in steps]  # the means say nothing here
    before = rng.integers(1, 21, size=400)
    better = np.where(rng.random(400) < 0.3, 1, before)  # 30% of the users now rank their target first
    # risen from half the budget to three quarters, flat since: a plateau (the rule up to session 17 said no)
    flat = plateau(pts, ranks={"300": before.tolist(), "450": better.tolist(), "600": better.tolist()})
    assert flat["plateau"] is True and flat["paired"]["from_step"] == 450 and flat["paired"]["to_step"] == 600
    assert flat["paired"]["rise"] == 0.0 and flat["paired"]["ci95"] == [0.0, 0.0] and flat["paired"]["n"] == 400
    assert flat["paired_half"]["from_step"] == 300 and flat["paired_half"]["ci95"][0] > 0
    rising = plateau(pts, ranks={"300": before.tolist(), "450": before.tolist(), "600": better.tolist()})
    assert rising["plateau"] is False and rising["paired"]["ci95"][0] > 0
    # a small rise, below the tolerance but clearly above 0: still rising, not a plateau
    nudged = np.where(rng.random(400) < 0.04, 1, before)
    small = plateau(pts, ranks={"450": before.tolist(), "600": nudged.tolist()}, tolerance=0.2)
    assert 0 < small["paired"]["ci95"][0] and small["paired"]["ci95"][1] < 0.2 and small["plateau"] is False
    # 12 users, half of them better and half worse: a mean rise of 0 whose interval is far wider than 0.02
    few = [[1] * 6 + [20] * 6, [20] * 6 + [1] * 6]
    unsure = plateau(pts, ranks={"450": few[0], "600": few[1]})
    assert unsure["plateau"] is None and "12 validation users are too few" in unsure["reason"]
    assert "paired_half" not in unsure  # no ranks at step 300
    # Ranks missing for a point, or of another length: the means' heuristic, as for older runs.
    assert "paired" not in plateau(pts, ranks={"600": before.tolist()})
    assert "paired" not in plateau(pts, ranks={"450": before.tolist(), "600": before[:10].tolist()})
    # A curve every 75 steps of 300: the last quarter is 225 -> 300; of 3 steps every step: 2 -> 3.
    four = [{"step": s, "valid_ndcg@10": 0.3} for s in (75, 150, 225, 300)]
    assert plateau(four, ranks={"225": before.tolist(), "300": before.tolist()})["paired"]["from_step"] == 225
    three = [{"step": s, "valid_ndcg@10": 0.3} for s in (1, 2, 3)]
    assert plateau(three, ranks={"2": before.tolist(), "3": before.tolist()})["paired"]["from_step"] == 2


def _fake_run(root, name, steps, ranks, recorded=None):
    """An ablation run folder with one cell whose student ranked 40 users' targets at ``ranks``."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    run = root / name
    cell = run / "cells" / "c"
    (cell / "per_example").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"max_steps": steps}}))
    users = [f"u{i}" for i in range(len(ranks))]
    table = {"user": users, "target": ["t"] * len(users), "candidates": [["t", "x", "y"]] * len(users), "rank": ranks}
    pq.write_table(pa.table(table), cell / "per_example" / "student.parquet")
    # what the run recorded when it was written under another name (a renamed folder)
    (cell / "results.json").write_text(json.dumps({"per_example_files": {"student": str(recorded or "")}}))
    return run


def test_the_budget_check_pairs_each_cell_with_the_reference_run_on_its_own_files(tmp_path):
    from layerwise_dist.ablation_report import budget_check

    short = _fake_run(tmp_path, "short", 100, [3] * 40)
    # the reference was renamed: its results.json still names the short run's file, which must not be read
    long = _fake_run(tmp_path, "long", 150, [1] * 40, recorded=short / "cells/c/per_example/student.parquet")
    assert budget_check(short, {"train": {"max_steps": 100}}, ["c"]) == {}
    cfg = {"train": {"max_steps": 100}, "ablation": {"budget_reference": str(long)}}
    out = budget_check(short, cfg, ["c", "missing"], n_boot=200)
    assert out["steps"] == [100, 150] and [c["cell"] for c in out["cells"]] == ["c"]
    d = out["cells"][0]["ndcg@10"]
    assert d["a"] == pytest.approx(0.5) and d["b"] == pytest.approx(1.0)  # 1/log2(4) vs 1/log2(2)
    assert d["difference"] == pytest.approx(-0.5) and d["ci95"][1] < 0
    cfg["ablation"]["budget_reference"] = "long"  # relative to another working directory: the sibling folder
    assert budget_check(short, cfg, ["c"], n_boot=50)["reference"] == str(long)
    cfg["ablation"]["budget_reference"] = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="budget_reference=.*nowhere: no finished ablation run"):
        budget_check(short, cfg, ["c"])


def test_compute_ledger_adds_every_sitting_and_the_report_prefers_it(tmp_path):
    (tmp_path / "cells" / "a").mkdir(parents=True)
    (tmp_path / "cells" / "b").mkdir(parents=True)
    (tmp_path / "cells" / "a" / "cell.json").write_text(json.dumps({"wall_s": 20.0}))  # the last sitting only
    (tmp_path / "cells" / "b" / "cell.json").write_text(json.dumps({"wall_s": 50.0}))
    add_compute(tmp_path, "cell:a", 30.0)  # a sitting stopped inside cell a
    with pytest.raises(RuntimeError), counted(tmp_path, "cell:a"):  # the sitting that finished it (here: fails)
        raise RuntimeError("stopped")
    with counted(tmp_path, "cell:b") as sitting:  # a sitting that only found cell b finished adds nothing
        sitting.reused = True
    add_compute(tmp_path, "fisher_zero_shot", 5.0)  # less than its file says: begun before the ledger existed
    (tmp_path / "zero_shot").mkdir()
    (tmp_path / "zero_shot" / "results.json").write_text(json.dumps({"timings": {"total_s": 120.0}}))
    ledger = json.loads((tmp_path / "compute.json").read_text())["stages"]
    assert ledger["cell:a"]["sittings"] == 2 and 30.0 <= ledger["cell:a"]["wall_s"] < 31.0
    assert "cell:b" not in ledger
    wall = _wall(tmp_path, ["a", "b"])
    by = {s["stage"]: s for s in wall["stages"]}
    assert by["cell:a"]["source"].startswith("compute.json") and by["cell:b"]["wall_s"] == 50.0
    assert by["fisher_zero_shot"]["wall_s"] == 120.0 and by["fisher_zero_shot"]["source"] == "zero_shot/results.json"
    assert by["fisher"]["wall_s"] is None and wall["complete"] is False and "fisher" in wall["not_recorded"]
    assert wall["total_s"] == pytest.approx(ledger["cell:a"]["wall_s"] + 50.0 + 120.0) and wall["within_budget"]
    assert wall["cache_builds"] == [] and wall["cache_rebuild_s"] == 0
    # Cell a built the teacher cache; cell b, in a later sitting on a fresh checkout, built it again.
    for name, built, seconds in (("a", 600, 400.0), ("b", 600, 410.0)):
        res = {"teacher_cache": {"built_examples_rank0": built}, "timings": {"teacher_cache_s": seconds}}
        (tmp_path / "cells" / name / "results.json").write_text(json.dumps(res))
    wall = _wall(tmp_path, ["a", "b"])
    assert [b["cell"] for b in wall["cache_builds"]] == ["a", "b"] and wall["cache_rebuild_s"] == 410.0
    (tmp_path / "cells" / "b" / "results.json").write_text(json.dumps({"teacher_cache": {"built_examples_rank0": 0}}))
    assert _wall(tmp_path, ["a", "b"])["cache_rebuild_s"] == 0  # it only read the cache: no rebuild
    (tmp_path / "compute.json").write_text("{not json")  # a corrupt ledger: warned about, never raised over
    with pytest.raises(RuntimeError, match="the stage's own error"), counted(tmp_path, "cell:a"):
        raise RuntimeError("the stage's own error")


def test_evaluation_reuses_a_per_example_file_only_for_the_same_users_and_candidates(tmp_path):
    from types import SimpleNamespace

    from layerwise_dist.evaluation import result_from_scores, write_per_example
    from layerwise_dist.recipes.evaluate import EvaluateRecipe

    def ex(user, cands, target):
        return SimpleNamespace(user_id=user, split="test", target=cands[target], target_index=target, candidates=cands)

    examples = [ex("u1", ["a", "b", "c"], 2), ex("u2", ["d", "e", "f"], 0)]
    scored = result_from_scores([[0.1, 0.5, 0.9], [0.2, 0.8, 0.1]], [2, 0], ks=[1, 10])
    path = tmp_path / "student.parquet"
    write_per_example(scored, examples, path)
    recipe = object.__new__(EvaluateRecipe)
    recipe.cfg = SimpleNamespace(eval=SimpleNamespace(ks=[1, 10]))
    recipe.reuse, recipe.orders, recipe.examples, recipe.spot_checked = {"student": path}, None, examples, {}
    got = recipe._reused("student")
    assert got.metrics == scored.metrics and (got.ranks == scored.ranks).all()  # ranks 1 and 2
    assert got.extra["reused_from"] == str(path) and "position_bias" in got.extra
    assert recipe._reused("teacher") is None  # nothing to reuse for it
    recipe.examples = [examples[0], ex("u2", ["d", "e", "g"], 0)]  # one candidate differs: scored anew
    import logging

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # the package logger does not propagate
    logging.getLogger("layerwise_dist").addHandler(handler)
    try:
        assert recipe._reused("student") is None
    finally:
        logging.getLogger("layerwise_dist").removeHandler(handler)
    assert any("other users or candidates" in m for m in seen), seen
    recipe.examples, recipe.orders = examples, [[0, 1, 2]]  # under permutations the stored scores are sums
    assert recipe._reused("student") is None
    recipe.orders = None
    path.write_bytes(b"not parquet")  # a corrupt file: scored anew, with the reason
    seen.clear()
    logging.getLogger("layerwise_dist").addHandler(handler)
    try:
        assert recipe._reused("student") is None
    finally:
        logging.getLogger("layerwise_dist").removeHandler(handler)
    assert any("unreadable" in m and "not a parquet file" in m for m in seen), seen


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
    args += ["train.valid_examples=8", "train.valid_rank_examples=16"]  # the curve ranks more users than the loss
    _ok(run_cli(args))
    cells = ["uniform+uniform", "uniform+task_only"]
    for name in cells:
        cell = run / "cells" / name
        res = json.loads((cell / "results.json").read_text())
        assert res["cell"]["name"] == name and res["student"]["n"] == 16
        assert (cell / "per_example" / "student.parquet").is_file() and (cell / "student" / "config.json").is_file()
        assert not (cell / "checkpoints").exists()  # a finished cell is never resumed: its ZeRO shards are freed
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
    # Each curve point keeps its validation users' ranks (both ranks' users, the same order each time).
    ranks = json.loads((run / "cells" / "uniform+uniform" / "valid_ranks.json").read_text())
    assert set(ranks) == {"1", "2"} and len(ranks["1"]) == len(ranks["2"]) == 16
    assert all(1 <= r <= 5 for r in ranks["1"] + ranks["2"])  # tiny: 5 candidates
    ndcg = [h["valid/ndcg@10"] for h in curve if "valid/ndcg@10" in h]
    from layerwise_dist.evaluation import per_example_metrics

    assert [per_example_metrics(ranks[s], (10,))["ndcg@10"].mean() for s in ("1", "2")] == pytest.approx(ndcg)

    top = json.loads((run / "results.json").read_text())
    assert list(top["cells"]) == cells and "comparison" in top and top["teacher"]["n"] == 16
    # The first cell's student is not scored twice: its quality is read back, its speed measured here.
    cell_student = json.loads((run / "cells" / cells[0] / "results.json").read_text())["student"]
    assert top["student"]["reused_from"].endswith(f"{cells[0]}/per_example/student.parquet")
    assert (
        top["student"]["ndcg@10"] == pytest.approx(cell_student["ndcg@10"]) and "eval_student_s" not in top["timings"]
    )
    assert top["student"]["latency_ms_per_example_median"] > 0
    no_final = json.loads((run / "cells" / cells[1] / "train_history.json").read_text())
    assert not any("valid/total" in h for h in no_final)  # only the learning-curve cell validates
    report = (run / "ablation_report.md").read_text()
    for section in ("## Every ranker on the same users", "## H3:", "## H1:", "Layerwise-Adapter headline"):
        assert section in report
    for section in ("## Goal figures", "## Compute (wall time", "Plateau: not judged (2 validation points"):
        assert section in report
    # Each learning-curve point carries its own 95% interval over the validation users, from their ranks.
    from layerwise_dist.evaluation import bootstrap_ci

    points = json.loads((run / "ablation.json").read_text())["curve"]["points"]
    assert [pt["step"] for pt in points] == [1, 2]
    for pt in points:
        lo, hi = pt["valid_ndcg@10_ci95"]
        assert [lo, hi] == pytest.approx(
            list(bootstrap_ci(per_example_metrics(ranks[str(pt["step"])], (10,))["ndcg@10"]))
        )
        assert lo <= pt["valid_ndcg@10"] <= hi
        assert f"| {pt['step']} | {pt['valid_ndcg@10']:.4f} [{lo:.4f}, {hi:.4f}] |" in report
    ledger = json.loads((run / "compute.json").read_text())["stages"]
    assert {"fisher", *(f"cell:{n}" for n in cells), "transfer", "final_evaluation"} <= set(ledger)
    data = json.loads((run / "ablation.json").read_text())
    assert set(cells) <= set(data["rankers"]) and {"random", "popularity", "teacher"} <= set(data["rankers"])
    ties = data["rankers"]["popularity_random_ties"]  # popularity with ties broken at random, beside it
    assert ties["n"] == 16 and 0 <= ties["targets_tied"] <= 1 and "popularity_random_ties:" in report
    assert (
        data["rankers"]["uniform+uniform"]["retention_ci95"][0]
        <= data["rankers"]["uniform+uniform"]["retention_ndcg@10"]
    )
    assert any(p["question"].startswith("value of distillation") for p in data["paired"])
    assert [p["step"] for p in data["curve"]["points"]] == [1, 2]
    top = json.loads((run / "results.json").read_text())  # the data as loaded, not the config's default
    assert top["data"]["users"] > 0 and data["setup"]["data"]["category"] == top["data"]["category"]
    transfer = json.loads((run / "transfer" / "results.json").read_text())
    import torch

    for name in cells:  # each cell records the software it ran on (the report compares them)
        assert (
            json.loads((run / "cells" / name / "results.json").read_text())["environment"]["torch"] == torch.__version__
        )
    assert transfer["transfer"]["cell"] == "uniform+uniform" and transfer["student"]["n"] == 16  # the first cell
    # ... scored right after that cell, before the second one is trained (its student folder is surely there).
    first_done = (run / "cells" / cells[0] / "cell.json").stat().st_mtime_ns
    second_done = (run / "cells" / cells[1] / "cell.json").stat().st_mtime_ns
    assert first_done < (run / "transfer" / "results.json").stat().st_mtime_ns < second_done
    assert "teacher" in transfer and "## Transfer check: embedded" in report

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{results_dir}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("layerwise_dist").experiment_id])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parent) == 1 and len(children) == 3  # the two cells and the transfer check
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent[0].info.run_id}
    assert {c.info.run_name for c in children} == {f"abl-{n}" for n in [*cells, "transfer"]}

    # A rerun recomputes nothing: the cells' markers and the final results stay as they were, and the store,
    # which has every run already, gets no new one.
    stamps = {n: (run / "cells" / n / "cell.json").stat().st_mtime_ns for n in cells}
    stamps["results.json"] = (run / "results.json").stat().st_mtime_ns
    out = run_cli(args)
    _ok(out)
    assert {n: (run / "cells" / n / "cell.json").stat().st_mtime_ns for n in cells} == {n: stamps[n] for n in cells}
    assert (run / "results.json").stat().st_mtime_ns == stamps["results.json"]
    assert out.stderr.count("already finished") >= 2, out.stderr[-2000:]
    assert "final evaluation already in" in out.stderr, out.stderr[-2000:]
    again = json.loads((run / "compute.json").read_text())["stages"]  # stages found finished add nothing
    assert again == ledger, again
    assert len(client.search_runs([client.get_experiment_by_name("layerwise_dist").experiment_id])) == len(runs)

    # The store is lost (a fresh checkout has none): a rerun trains and scores nothing, yet its new parent run
    # again shows every child, restored from the folders, with their histories and scores.
    # (Another, empty store stands for the lost one: MLflow keeps one SQLAlchemy engine per store URI in the
    # process, so a client would still read a renamed or deleted mlflow.db through its open connections.)
    out = run_cli([*args, f"tracking.tracking_uri=sqlite:///{results_dir}/new.db"])
    _ok(out)
    assert json.loads((run / "compute.json").read_text())["stages"] == ledger
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{results_dir}/new.db")
    runs = client.search_runs([client.get_experiment_by_name("layerwise_dist").experiment_id])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.info.run_name: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert len(parent) == 1 and set(children) == {f"abl-{n}" for n in [*cells, "transfer"]}
    assert {c.data.tags["mlflow.parentRunId"] for c in children.values()} == {parent[0].info.run_id}
    assert all("restored_from" in c.data.tags and c.info.status == "FINISHED" for c in children.values()), {
        n: (c.info.status, sorted(c.data.tags)) for n, c in children.items()
    }
    restored = children["abl-uniform+uniform"]
    assert restored.data.metrics["eval/student/ndcg_at_10"] == pytest.approx(cell_student["ndcg@10"])
    assert restored.data.params["distill.layer_weighting"] == "uniform"
    steps = client.get_metric_history(restored.info.run_id, "train/total")
    assert sorted(m.step for m in steps) == [1, 2]
    assert [m.step for m in client.get_metric_history(restored.info.run_id, "valid/ndcg_at_10")] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(restored.info.run_id)}
    assert {"results.json", "train_history.json"} <= artifacts
    assert parent[0].data.metrics["eval/teacher/ndcg_at_10"] == pytest.approx(top["teacher"]["ndcg@10"])

    # Each cell records the teacher it was distilled from; a table of cells from different teachers is flagged.
    from layerwise_dist.ablation_report import write_ablation_report

    done = [json.loads((run / "cells" / n / "cell.json").read_text()) for n in cells]
    assert done[0]["teacher"] == done[1]["teacher"] and done[0]["teacher"].startswith("tiny|")
    assert "Mixed teachers" not in report
    (run / "cells" / cells[1] / "cell.json").write_text(json.dumps({**done[1], "teacher": "folder:another"}))
    mixed = write_ablation_report(run, n_boot=50)[0].read_text()
    assert "**Mixed teachers**: the cells were distilled from 2 different teachers" in mixed
    assert "uniform+task_only from `folder:another`" in mixed


@pytest.mark.integration
def test_a_cell_stopped_by_stop_at_step_is_not_finished_and_the_next_sitting_completes_it(tmp_path):
    """train.stop_at_step ends a sitting inside a cell: the cell is neither scored nor marked finished (before,
    it was, and every later sitting skipped an undertrained student); the next sitting continues its steps."""
    run = tmp_path / "abl"
    args = ["ablation", "--preset", "tiny", "--nproc", "1", "ablation.selections=[uniform]"]
    args += ["ablation.weightings=[uniform]", "ablation.task_only=false", "train.max_steps=2", f"output_dir={run}"]
    _ok(run_cli([*args, "train.stop_at_step=1"]))
    cell = run / "cells" / "uniform+uniform"
    assert not (cell / "cell.json").exists() and not (cell / "results.json").exists()
    assert not (run / "final_evaluation.json").exists()
    assert [h["step"] for h in json.loads((cell / "train_history.json").read_text())] == [1]
    out = run_cli(args)
    _ok(out)
    assert "stopped at step" not in out.stderr
    assert json.loads((cell / "cell.json").read_text())["cell"] == "uniform+uniform"
    assert [h["step"] for h in json.loads((cell / "train_history.json").read_text())] == [1, 2]
    assert json.loads((cell / "results.json").read_text())["student"]["n"] > 0
    assert (run / "final_evaluation.json").is_file()


def test_a_table_of_paired_intervals_says_how_many_would_exclude_zero_by_chance():
    from layerwise_dist.ablation_report import _multiplicity

    assert _multiplicity(1) == []
    note = " ".join(_multiplicity(18))
    assert "18 intervals" in note and "about 0.9 of them" in note


def _script_result(code: str, arg) -> list:
    """Run ``code`` in a fresh Python process (its own process group and MLflow state) with ``arg`` as argv[1];
    the JSON of its last stdout line."""
    import subprocess
    import sys

    from conftest import REPO, run_env

    proc = subprocess.run(
        [sys.executable, "-c", code, str(arg)], cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_CELL_STOPPED_THEN_RESUMED = """
import dataclasses, json, sys
from pathlib import Path
import mlflow
from layerwise_dist.config import load_config
from layerwise_dist.recipes.session import RunSession
from layerwise_dist.trainer import StoppedBySignal

out = Path(sys.argv[1])
cfg = load_config("tiny", [f"output_dir={out}", "tracking.enabled=true", "train.resume=true"])
client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out.parent}/mlflow.db")
seen = []
for sitting in range(2):
    with RunSession(cfg, job="ablation") as session:
        cell_cfg = dataclasses.replace(cfg, output_dir=str(out / "cells" / "c"))
        try:
            with session.child(out / "cells" / "c", cell_cfg, "abl-c") as cell:
                cell.tracker.log_metrics({"step_seen": sitting}, step=sitting)
                if sitting == 0:
                    raise StoppedBySignal("stopped by SIGTERM", 15)
        except StoppedBySignal:
            pass
        cell.tracker.flush()
        run_id = cell.run_tracker.run_id
        seen.append({"parent": session.run_tracker.run_id, "cell": run_id})
    seen[-1]["status"] = client.get_run(run_id).info.status
print(json.dumps(seen))
"""


_RESUMED_WITH_OTHER_SETTINGS = """
import json, sys
from pathlib import Path
import yaml
from layerwise_dist.config import ConfigError, load_config
from layerwise_dist.recipes.session import RunSession

def sitting(out, *overrides):
    cfg = load_config("tiny", [f"output_dir={out}", "tracking.enabled=false", "train.resume=true", *overrides])
    try:
        with RunSession(cfg, job="ablation"):
            (out / "fisher_profile.json").write_text("{}")  # a finished stage's file
    except ConfigError as e:
        return str(e)
    return "ran with lr " + str(yaml.safe_load((out / "config.yaml").read_text())["train"]["lr"])

out, failed = Path(sys.argv[1]) / "run", Path(sys.argv[1]) / "failed_start"
seen = [
    sitting(out, "train.lr=1e-3"),
    sitting(out, "train.lr=2e-3", "train.max_steps=9"),  # the finished stage was computed with lr 1e-3
    sitting(out, "train.lr=1e-3", "tracking.run_name=again", "train.stop_at_step=3"),  # safe to change
]
load_config("tiny", [f"output_dir={failed}", "train.lr=1e-3"]).save(failed / "config.yaml")  # no stage ran
(failed / "tracking_buffer.jsonl.state.json").write_text("{}")  # nor is MLflow's buffer a stage's work
seen.append(sitting(failed, "train.lr=2e-3"))
(out / "config.yaml").write_text("train: [unclosed")  # a corrupt record of the finished work's settings
seen.append(sitting(out, "train.lr=1e-3"))
print(json.dumps(seen))
"""


@pytest.mark.integration
def test_a_resumed_run_with_other_settings_is_refused_before_it_reuses_finished_work(tmp_path):
    """train.resume=true reuses finished stages and cells as they are: a sitting that changed what they
    computed (here the learning rate and step budget) fails at the start, naming the settings, and leaves the
    earlier config in place, and releases output_dir's lock (the next sitting runs in the same process);
    tracking or stop settings may change; a start that did no work may be corrected."""
    first, refused, safe, corrected, unreadable = _script_result(_RESUMED_WITH_OTHER_SETTINGS, tmp_path)
    assert unreadable.endswith(
        "config.yaml is unreadable (ParserError), so the settings of the finished work in "
        f"{tmp_path / 'run'} are unknown: restore that file, or give this run a new output_dir"
    )
    assert first == "ran with lr 0.001" and safe == "ran with lr 0.001" and corrected == "ran with lr 0.002"
    assert refused.startswith("train.resume=true would reuse the finished work in ")
    assert "train.max_steps: " in refused and "train.lr: 0.001 there, 0.002 now" in refused
    assert "tracking" not in refused and "new output_dir" in refused


def test_the_multi_rank_launcher_checks_the_settings_before_it_replaces_config_yaml(tmp_path):
    """`layerwise-dist --nproc 2` writes the ranks' config.yaml into output_dir; it used to do so before any
    rank compared it with the earlier sitting's, so the ranks compared the new settings with themselves and a
    changed learning rate went through. The launcher now refuses first, and the earlier config stays."""
    run = tmp_path / "run"
    run.mkdir()
    load_config("tiny", ["train.lr=0.001", f"output_dir={run}"]).save(run / "config.yaml")
    (run / "fisher_profile.json").write_text("{}")  # an earlier sitting's finished work
    before = (run / "config.yaml").read_text()
    out = run_cli(
        ["distill", "--preset", "tiny", "--nproc", "2", f"output_dir={run}", "train.resume=true", "train.lr=0.002"]
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "train.lr: 0.001 there, 0.002 now" in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert (run / "config.yaml").read_text() == before


@pytest.mark.integration
def test_a_cell_stopped_by_a_signal_continues_its_own_mlflow_run(tmp_path):
    """An ablation cell stopped by SIGTERM ends its nested run KILLED; the next sitting continues that run."""
    first, second = _script_result(_CELL_STOPPED_THEN_RESUMED, tmp_path / "results" / "abl")
    assert first["status"] == "KILLED" and second["status"] == "FINISHED"
    assert first["cell"] == second["cell"] and first["parent"] == second["parent"]  # one run each, continued
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'results'}/mlflow.db")
    run = client.get_run(second["cell"])
    assert run.data.tags["mlflow.parentRunId"] == second["parent"] and run.data.tags.get("resumed") == "true"
    steps = [m.step for m in client.get_metric_history(second["cell"], "step_seen")]
    assert sorted(steps) == [0, 1]  # both sittings' records in the one run


def test_teacher_scores_are_reused_from_another_run_only_when_the_teacher_scores_alike(tmp_path):
    """Two ranks through the CLI: a second evaluation with eval.reuse_teacher_scores reads the first run's teacher
    scores (spot-checked on each rank's first batch); another teacher (other random weights) is scored anew."""
    import pyarrow.parquet as pq

    from conftest import run_cli

    common = ["evaluate", "--preset", "tiny"]
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    first, again, other = tmp_path / "first", tmp_path / "again", tmp_path / "other"
    _ok(run_cli([*common, "--nproc", "1", cache, f"output_dir={first}"], timeout=600))  # another world size: same rows
    _ok(
        run_cli(
            [*common, "--nproc", "2", cache, f"output_dir={again}", f"eval.reuse_teacher_scores={first}"], timeout=600
        )
    )
    a, b = (json.loads((d / "results.json").read_text()) for d in (first, again))
    assert "reused_from" not in a["teacher"] and "eval_teacher_s" in a["timings"]
    teacher = b["teacher"]
    assert teacher["reused_from"] == str(first / "per_example" / "teacher.parquet")
    assert teacher["reuse_check"]["max_abs_diff"] <= 1e-4 and teacher["reuse_check"]["examples"] == 8  # 2 x 4
    assert teacher["reused_compute_s"] == pytest.approx(a["timings"]["eval_teacher_s"])
    assert "eval_teacher_s" not in b["timings"] and teacher["latency_ms_per_example_median"] > 0  # still timed
    for key in ("ndcg@10", "hr@10", "mrr", "n"):
        assert teacher[key] == pytest.approx(a["teacher"][key], abs=1e-12)  # sums in another order
    ta, tb = (pq.read_table(d / "per_example" / "teacher.parquet").to_pydict() for d in (first, again))
    assert ta["scores"] == tb["scores"] and ta["user"] == tb["user"]
    out = run_cli(
        [
            *common,
            "--nproc",
            "1",
            cache,
            f"output_dir={other}",
            f"eval.reuse_teacher_scores={first}",
            "teacher.tiny_seed=1",
        ]
    )
    _ok(out)
    c = json.loads((other / "results.json").read_text())
    assert "reused_from" not in c["teacher"] and "eval_teacher_s" in c["timings"]
    assert "otherwise than the file" in out.stderr and "another model" in out.stderr
    # A folder without per-example teacher files: one clear error (the ablation asks before its first stage).
    from layerwise_dist.recipes.evaluate import reused_teacher_files

    with pytest.raises(FileNotFoundError, match="no teacher.parquet or teacher_zero_shot.parquet"):
        reused_teacher_files(tmp_path)
    assert set(reused_teacher_files(first)) == {"teacher"}


def test_the_transfer_check_reads_teacher_scores_only_from_the_other_runs_transfer_check(tmp_path):
    """eval.reuse_teacher_scores names a run whose per_example/ ranks the main data set's users: the transfer check
    reads that run's transfer/per_example/ instead, and scores the teachers itself when there is none."""
    from layerwise_dist.recipes.ablation import transfer_reuse_source

    assert transfer_reuse_source("") == ""
    (tmp_path / "per_example").mkdir()
    (tmp_path / "per_example" / "teacher.parquet").write_bytes(b"")
    assert transfer_reuse_source(str(tmp_path)) == ""  # only the main data set's files
    (tmp_path / "transfer" / "per_example").mkdir(parents=True)
    assert transfer_reuse_source(str(tmp_path)) == ""  # an empty transfer check
    (tmp_path / "transfer" / "per_example" / "teacher_zero_shot.parquet").write_bytes(b"")
    assert transfer_reuse_source(str(tmp_path)) == str(tmp_path / "transfer")
    # The committed 100-step run, which the experiment preset reuses, has both teachers' transfer scores.
    committed = Path(__file__).resolve().parents[1] / "results" / "experiment_100steps"
    assert transfer_reuse_source(str(committed)) == str(committed / "transfer")


def test_the_report_names_cells_that_ran_on_other_software_or_cpus():
    from layerwise_dist.ablation_report import _environments_note
    from layerwise_dist.run_metadata import environment_record

    here = environment_record()
    import torch

    assert here["torch"] == torch.__version__ and here["python"].count(".") == 2 and "transformers" in here
    assert _environments_note({}) == [] and _environments_note({"a": here, "b": dict(here)}) == []
    assert _environments_note({"a": here, "b": {**here, "platform": "other kernel"}}) == []  # the OS alone
    other = {**here, "transformers": "9.9.9", "cpu": "Other CPU"}
    note = " ".join(_environments_note({"a": here, "b": other, "c": dict(here)}))
    assert "**Cells on other environments** (3 cells recorded one)" in note
    assert f"transformers: {here['transformers']} (a, c); 9.9.9 (b)" in note and "cpu: " in note
    assert "torch:" not in note


def test_the_compute_report_keeps_lost_and_redone_sittings_out_of_the_total(tmp_path):
    """compute.json's hand-written ``lost`` section (sittings whose outputs a machine reset took, done again):
    beside the total, named with the reason, never in it."""
    from layerwise_dist.ablation_report import _wall

    (tmp_path / "cells" / "a").mkdir(parents=True)
    (tmp_path / "cells" / "a" / "cell.json").write_text(json.dumps({"wall_s": 100.0}))
    ledger = {"stages": {"cell:a": {"wall_s": 120.0, "sittings": 1}}}
    (tmp_path / "compute.json").write_text(json.dumps(ledger))
    before = _wall(tmp_path, ["a"])
    assert before["lost"] == [] and before["lost_s"] == 0.0 and before["total_s"] == 120.0
    ledger["lost"] = {"note": "a reset", "stages": {"cell:a": {"wall_s": 300.0, "sittings": 2}}}
    (tmp_path / "compute.json").write_text(json.dumps(ledger))
    wall = _wall(tmp_path, ["a"])
    assert wall["total_s"] == 120.0 and wall["lost_s"] == 300.0 and wall["lost_note"] == "a reset"
    assert wall["lost"] == [{"stage": "cell:a", "wall_s": 300.0, "sittings": 2}]
    # A hand-written entry without its seconds: one clear error naming the file and the entry.
    ledger["lost"]["stages"]["adapt"] = {"sittings": 1}
    (tmp_path / "compute.json").write_text(json.dumps(ledger))
    with pytest.raises(ValueError, match=r"compute.json: lost.stages.adapt needs wall_s"):
        _wall(tmp_path, ["a"])
    del ledger["lost"]["stages"]["adapt"]
    (tmp_path / "compute.json").write_text(json.dumps(ledger))
    # Rendered, on a copy of the committed 100-step run given a lost sitting.
    import shutil

    from layerwise_dist.ablation_report import write_ablation_report

    run = tmp_path / "run"
    shutil.copytree(Path(__file__).resolve().parents[1] / "results" / "experiment_100steps", run)
    led = json.loads((run / "compute.json").read_text())
    led["lost"] = {"note": "a reset", "stages": {"adapt": {"wall_s": 1000.0, "sittings": 1}}}
    (run / "compute.json").write_text(json.dumps(led))
    md = write_ablation_report(run)[0].read_text()
    total = _wall(run, sorted(p.name for p in (run / "cells").iterdir()))["total_s"]
    assert (
        "Not in the total either: 1,000 s of work whose outputs were lost before they were committed, and done "
        "again (adapt 1,000 s; `compute.json`, `lost`: a reset). Everything this run spent, those included: "
        f"{total + 1000.0:,.0f} s" in md
    )


def test_the_compute_report_names_teacher_scores_read_from_another_run(tmp_path):
    from layerwise_dist.ablation_report import _wall

    (tmp_path / "cells" / "a").mkdir(parents=True)
    (tmp_path / "cells" / "a" / "cell.json").write_text(json.dumps({"wall_s": 100.0}))
    top = {
        "timings": {"eval_student_s": 10.0},
        "teacher": {"reused_from": "old/per_example/teacher.parquet", "reuse_check": {}, "reused_compute_s": 5000.0},
        "teacher_zero_shot": {"ndcg@10": 0.3},  # scored here
        "student": {"reused_from": "cells/a/per_example/student.parquet"},  # its own cell's file: counted there
    }
    (tmp_path / "results.json").write_text(json.dumps(top))
    wall = _wall(tmp_path, ["a"])
    assert wall["reused"] == [
        {"model": "teacher", "from": "old/per_example/teacher.parquet", "seconds": 5000.0, "check": {}}
    ]
    assert wall["total_with_reused_s"] == wall["total_s"] + 5000.0 and wall["reused_s"] == 5000.0
    # The transfer check's teacher scores, read from that run's transfer check: named as such and counted too.
    (tmp_path / "transfer").mkdir()
    transfer = {
        "timings": {"total_s": 50.0},
        "teacher": {
            "reused_from": "old/transfer/per_example/teacher.parquet",
            "reuse_check": {},
            "reused_compute_s": 300.0,
        },
        "student": {"ndcg@10": 0.2},
    }
    (tmp_path / "transfer" / "results.json").write_text(json.dumps(transfer))
    wall = _wall(tmp_path, ["a"])
    assert [x["model"] for x in wall["reused"]] == ["teacher", "teacher (transfer check)"]
    assert wall["reused"][1]["from"] == "old/transfer/per_example/teacher.parquet" and wall["reused_s"] == 5300.0
    top["teacher"]["reused_compute_s"] = 20000.0
    (tmp_path / "results.json").write_text(json.dumps(top))
    wall = _wall(tmp_path, ["a"])
    assert wall["within_budget"] and not wall["within_budget_with_reused"]
    # Rendered: on a copy of the committed 100-step run, its adapted teacher marked as read from elsewhere.
    import shutil

    from layerwise_dist.ablation_report import write_ablation_report

    run = tmp_path / "run"
    shutil.copytree(Path(__file__).resolve().parents[1] / "results" / "experiment_100steps", run)
    res = json.loads((run / "results.json").read_text())
    res["teacher"].update(reused_from="x/per_example/teacher.parquet", reused_compute_s=856.0)
    res["teacher"]["reuse_check"] = {"max_abs_diff": 0.0, "examples": 8}
    (run / "results.json").write_text(json.dumps(res))
    md = write_ablation_report(run)[0].read_text()
    # The goal counts every 8-layer student (there the task-loss-only one is the best); the headline and the paired
    # questions name the best distilled cell.
    measured = json.loads((run / "ablation.json").read_text())["headline"]["measured"]
    assert (measured["best_student_cell"], measured["best_cell"]) == ("fisher-topk+task_only", "first+linear")
    assert (
        "(fisher-topk+task_only) | no |" in md
        and "| quality retained (NDCG@10, best distilled cell first+linear) |" in md
    )
    assert (
        "| value of distillation (best distilled cell vs task loss alone) | first+linear | fisher-topk+task_only |"
        in md
    )
    assert "teacher: its scores are read from `x/per_example/teacher.parquet`" in md
    assert "Not in the total either" not in md  # no lost sittings in that run
    assert "8 examples of its first batches as the file does (max |difference| 0)" in md
    total = _wall(run, sorted(p.name for p in (run / "cells").iterdir()))["total_s"]
    assert (
        f"a run from scratch takes {total + 856.0:,.0f} s" in md
        and "(x/per_example/teacher.parquet, scored there in 856 s)" in md
    )
