"""Bad input is one line on stderr, exit code 2, and nothing half-written (issue 14, point 5)."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from conftest import run_cli


def _one_line_error(out, *needles):
    # What a terminal shows: a progress bar wiped with carriage returns leaves nothing behind.
    lines = [shown for line in out.stderr.split("\n") if (shown := line.split("\r")[-1].strip())]
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _reviews(folder: Path, stem: str) -> tuple[Path, Path]:
    rows = [
        {"user_id": f"U{u}", "parent_asin": f"I{(u + k) % 9}", "rating": 5.0, "timestamp": 1000 * (u * 10 + k)}
        for u in range(12)
        for k in range(6)
    ]
    reviews = folder / f"{stem}.jsonl.gz"
    reviews.write_bytes(gzip.compress(("\n".join(json.dumps(r) for r in rows) + "\n").encode()))
    meta = folder / f"meta_{stem}.jsonl"
    meta.write_text("\n".join(json.dumps({"parent_asin": f"I{i}", "title": f"Item {i}"}) for i in range(9)) + "\n")
    return reviews, meta


@pytest.mark.parametrize("damage", ["truncated", "not-gzip"])
def test_corrupt_gzip_reviews(tmp_path, damage):
    reviews, meta = _reviews(tmp_path, "All_Beauty")
    data = reviews.read_bytes()
    reviews.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"plain text, not gzip\n" * 40)
    out = run_cli(["data", "prepare", "--reviews", str(reviews), "--meta", str(meta), "--out", str(tmp_path / "p")])
    _one_line_error(out, str(reviews), "corrupt or truncated gzip")
    assert not (tmp_path / "p").exists()


def test_corrupt_parquet_reviews(tmp_path):
    reviews = tmp_path / "All_Beauty.parquet"
    reviews.write_bytes(b"PAR1" + os.urandom(64) + b"PAR1")
    _, meta = _reviews(tmp_path, "All_Beauty")
    out = run_cli(["data", "prepare", "--reviews", str(reviews), "--meta", str(meta), "--out", str(tmp_path / "p")])
    _one_line_error(out, "not a readable parquet file")
    assert not (tmp_path / "p").exists()


def test_metadata_found_by_the_reviews_file_stem(tmp_path):
    """MyShop.jsonl.gz (not an Amazon category name) finds meta_MyShop.jsonl, not meta_All_Beauty.*"""
    reviews, _ = _reviews(tmp_path, "MyShop")
    (tmp_path / "meta_Other.jsonl").write_text('{"parent_asin": "X", "title": "x"}\n')  # a second meta_* file
    from layerwise_dist.data.sources import Amazon2023Source

    assert Amazon2023Source(reviews, None, "All_Beauty").meta == tmp_path / "meta_MyShop.jsonl"
    (tmp_path / "meta_MyShop.jsonl").unlink()
    (tmp_path / "meta_Other.jsonl").unlink()
    from layerwise_dist.data import DataError

    with pytest.raises(DataError, match=r"meta_MyShop\.\*"):
        Amazon2023Source(reviews, None, "All_Beauty")


@pytest.mark.parametrize(
    ("nproc", "extra", "needle"),
    [
        ("0", [], "--nproc must be at least 1; got 0"),
        ("-3", [], "--nproc must be at least 1; got -3"),
        ("4096", [], "add --oversubscribe"),
    ],
)
def test_nproc_outside_the_machine(tmp_path, nproc, extra, needle):
    out = run_cli(["fisher", "--preset", "tiny", "--nproc", nproc, *extra, f"output_dir={tmp_path}/run"], timeout=120)
    _one_line_error(out, needle)
    assert not (tmp_path / "run").exists()


def test_teacher_folder_without_tokenizer_files(tmp_path):
    from layerwise_dist.models.tiny import tiny_llama

    tiny_llama(vocab_size=64).save_pretrained(tmp_path / "model")  # weights and config, no tokenizer
    out = run_cli(
        ["fisher", "--preset", "tiny", "--nproc", "1", f"teacher.model={tmp_path}/model", f"output_dir={tmp_path}/r"]
    )
    _one_line_error(out, "ModelLoadError", "no tokenizer files")


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["student.num_layers=9"], "cannot have more layers (9) than the teacher (4)"),
        (["student.selection=list", "student.layers=[0,7]", "student.num_layers=2"], "student.layers"),
        (["student.selection=uniform", "student.num_layers=2", "student.layer_map=[0,9]"], "student.layer_map"),
        (["train.micro_batch_size=4096", "data.max_length=1000000"], "the planned placement cannot fit"),
    ],
)
def test_layer_choice_checked_before_any_rank_starts(tmp_path, overrides, needle):
    out = run_cli(
        ["distill", "--preset", "tiny", "--nproc", "2", *overrides, f"output_dir={tmp_path}/run"], timeout=120
    )
    _one_line_error(out, needle)
    assert "launching:" not in out.stdout and not (tmp_path / "run").exists()  # no rank, no Fisher pass ran


def test_student_model_with_another_tokenizer_is_refused_by_content(tmp_path):
    """Same vocabulary size, different tokens: the size check alone would let logit KD compare unrelated ids."""
    from layerwise_dist.config import load_config
    from layerwise_dist.models.teacher import load_tokenizer, resolve_model_dir
    from layerwise_dist.models.tiny import tiny_llama

    cfg = load_config("tiny")
    tok = load_tokenizer(cfg.teacher)
    student = tmp_path / "student"
    tiny_llama(vocab_size=len(tok), num_layers=2).save_pretrained(student)
    tok.save_pretrained(student)
    data = json.loads((student / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = sorted(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two tokens swap ids: same size, different content
    (student / "tokenizer.json").write_text(json.dumps(data))
    assert resolve_model_dir(cfg.teacher).is_dir()
    out = run_cli(
        ["distill", "--preset", "tiny", "--nproc", "1", f"student.model={student}", "student.layer_map=[1,3]"]
        + [f"output_dir={tmp_path}/run"],
        timeout=300,
    )
    _one_line_error(out, "StudentError", "vocabulary differs")


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_missing_teacher_writes_nothing(tmp_path, nproc):
    out = run_cli(["adapt", "--preset", "tiny", "--nproc", nproc, f"teacher.model={tmp_path}/nothere"]
                  + [f"output_dir={tmp_path}/run"], timeout=120)  # fmt: skip
    _one_line_error(out, "ModelLoadError", "nothere")
    assert not (tmp_path / "run").exists()
