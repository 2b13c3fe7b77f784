"""`layerwise-dist data prepare` output is usable in one step: the overrides it prints feed every stage."""

from __future__ import annotations

import gzip
import json
import shlex

import pytest

from conftest import run_cli
from layerwise_dist.cli import main
from layerwise_dist.config import load_config
from layerwise_dist.data import build_examples, load_splits
from layerwise_dist.data.prepare import pipeline_overrides

USERS, ITEMS, PER_USER = 20, 15, 6


@pytest.fixture()
def raw(tmp_path):
    """Reviews as .jsonl.gz and metadata as .parquet, in the documented schema (extra fields ignored)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for u in range(USERS):
        for k in range(PER_USER):
            item = f"B{(3 * u + k) % ITEMS:03d}"
            rows.append(
                {
                    "user_id": f"U{u}",
                    "parent_asin": item,
                    "rating": 4.0,
                    "timestamp": 1_600_000_000_000 + 1000 * (10 * u + k),
                    "text": "fine",
                }
            )
    reviews = tmp_path / "MyShop.jsonl.gz"
    with gzip.open(reviews, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    meta = tmp_path / "meta_MyShop.parquet"
    items = [f"B{i:03d}" for i in range(ITEMS)]
    pq.write_table(
        pa.table({"parent_asin": items, "title": [f"Lotion number {i}" for i in range(ITEMS)], "price": [1.0] * ITEMS}),
        meta,
    )
    return reviews, meta


def _prepare(tmp_path, raw, capsys) -> tuple[str, list[str]]:
    reviews, meta = raw
    out = tmp_path / "prepared"
    args = ["data", "prepare", "--reviews", str(reviews), "--meta", str(meta), "--out", str(out), "category=MyShop"]
    assert main(args) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"wrote {out}: MyShop {USERS} users, {ITEMS} items")
    assert printed[1].startswith("next: layerwise-dist pipeline ")
    command = shlex.split(printed[1].removeprefix("next: ").split("  (")[0])
    return str(out), command[2:]


def test_printed_overrides_feed_the_data_stage(tmp_path, raw, capsys):
    out, overrides = _prepare(tmp_path, raw, capsys)
    assert overrides == pipeline_overrides(out, "MyShop")
    cfg = load_config("tiny", overrides)
    split = load_splits(cfg.data)
    assert split.category == "MyShop" and len(split.train) == USERS and len(split.all_items) == ITEMS
    for name in ("train", "test"):
        examples = build_examples(split, name, cfg.data, None)
        limit = cfg.data.max_train_examples if name == "train" else cfg.data.max_eval_examples  # tiny: 32, 16
        assert len(examples) == min(USERS * (cfg.data.train_targets_per_user if name == "train" else 1), limit)
        assert all(len(ex.candidates) == cfg.data.num_candidates for ex in examples)
        assert all(t.startswith("Lotion number") for ex in examples for t in ex.candidate_titles)


def test_prepare_help_lists_the_schema_and_every_data_key(capsys):
    with pytest.raises(SystemExit):
        main(["data", "prepare", "--help"])
    text = capsys.readouterr().out
    assert "parent_asin" in text and "timestamp" in text and ".parquet" in text
    assert "data.kcore=5" in text and "data.history_len=10" in text


@pytest.mark.integration
def test_pipeline_runs_on_the_prepared_folder_in_one_step(tmp_path, raw, capsys):
    """The printed command, run as printed (plus the tiny preset), goes through Fisher, distillation and evaluation."""
    _, overrides = _prepare(tmp_path, raw, capsys)
    run = tmp_path / "run"
    result = run_cli(
        ["pipeline", "--preset", "tiny", "--nproc", "1", *overrides]
        + ["train.max_steps=1", "eval.max_examples=4", f"output_dir={run}"],
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert "student" in results and 0.0 <= results["student"]["ndcg@10"] <= 1.0
