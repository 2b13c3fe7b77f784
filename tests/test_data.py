"""Data pipeline: readers, validation, k-core, leave-one-out, examples, prompts, tokens, prepare."""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import json
import logging
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from layerwise_dist.config import ConfigError, DataConfig
from layerwise_dist.data import (
    IGNORE_INDEX,
    LABELS,
    Amazon2023Source,
    BadRows,
    DataError,
    RankExample,
    SplitData,
    add_prepare_arguments,
    build_examples,
    category_from_filename,
    collate,
    encode,
    label_token_ids,
    load_splits,
    prepare,
    read_reviews,
    read_titles,
    render_prompt,
    run_prepare,
    splits_from_source,
    stable_seed,
    tokenize_examples,
)
from layerwise_dist.data import tokenize as tokenize_module

SHARED = Path(os.environ.get("LD_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
BEAUTY = SHARED / "amazon2023_all_beauty_5core"
GAMES = SHARED / "amazon2018_video_games_llmrank"
needs_beauty = pytest.mark.skipif(not BEAUTY.is_dir(), reason=f"shared data not found at {BEAUTY} (set LD_SHARED_DATA)")
needs_games = pytest.mark.skipif(not GAMES.is_dir(), reason=f"shared data not found at {GAMES} (set LD_SHARED_DATA)")

WORDS = "soft cream soap brush oil gel mask lotion shampoo comb nail serum".split()


# ---------------------------------------------------------------- fixtures


def make_reviews(n_users: int = 12, n_items: int = 10, per_user: int = 7, seed: int = 0) -> list[dict]:
    """Official-format review records; timestamps ms, each user with distinct items."""
    rng = random.Random(seed)
    rows = []
    for u in range(n_users):
        items = rng.sample(range(n_items), per_user)
        for k, i in enumerate(items):
            rows.append(
                {
                    "rating": float(rng.randint(1, 5)),
                    "title": "ok",
                    "text": "fine product " * 3,
                    "images": [],
                    "asin": f"X{i:04d}",
                    "parent_asin": f"P{i:04d}",
                    "user_id": f"U{u:03d}",
                    "timestamp": 1_600_000_000_000 + 1000 * (u * 100 + k),
                    "helpful_vote": 0,
                    "verified_purchase": True,
                }
            )
    rng.shuffle(rows)
    return rows


def make_meta(n_items: int = 10, skip: tuple[int, ...] = ()) -> list[dict]:
    return [
        {
            "main_category": "All Beauty",
            "title": f"{WORDS[i % len(WORDS)]} {WORDS[(i * 7 + 3) % len(WORDS)]} number {i}",
            "average_rating": 4.5,
            "rating_number": 10,
            "features": [],
            "description": [],
            "price": None,
            "store": "S",
            "categories": [],
            "details": {},
            "parent_asin": f"P{i:04d}",
        }
        for i in range(n_items)
        if i not in skip
    ]


def write_jsonl(path: Path, records: list, extra_lines: list[str] = ()) -> Path:
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def write_parquet(path: Path, records: list) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = (
        "rating",
        "title",
        "text",
        "asin",
        "parent_asin",
        "user_id",
        "timestamp",
        "helpful_vote",
        "verified_purchase",
    )
    pq.write_table(pa.table({c: [r[c] for r in records] for c in cols}), path, row_group_size=16)
    return path


def make_tokenizer(chat: bool = True, letters: str = LABELS):
    """A real fast word-level tokenizer built in code (no download), with an optional chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[BOS]", "<|user|>", "<|assistant|>"]
    words = list(letters) + [str(d) for d in range(100)] + list(".:,?()") + WORDS
    words += "A customer bought these products oldest first Which of candidates will the buy next".split()
    words += "Reply with letter one candidate only Answer nothing yet All Beauty number".split()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        bos_token="[BOS]",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
        name_or_path="test-wordlevel",
    )
    if chat:
        tok.chat_template = (
            "[BOS]{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
        )
    return tok


@pytest.fixture(scope="module")
def beauty() -> SplitData:
    return load_splits(DataConfig())  # embedded copy of the All_Beauty 5-core files


@pytest.fixture
def raw(tmp_path: Path) -> tuple[Path, Path]:
    reviews = write_jsonl(tmp_path / "All_Beauty.jsonl", make_reviews())
    meta = write_jsonl(tmp_path / "meta_All_Beauty.jsonl", make_meta())
    return reviews, meta


def load(reviews: Path, meta: Path | None, kcore: int = 2, strict: bool = False) -> SplitData:
    return splits_from_source(Amazon2023Source(reviews, meta, "All_Beauty"), kcore, strict=strict)


# ---------------------------------------------------------------- readers and validation


def test_jsonl_gz_and_parquet_give_the_same_split(tmp_path: Path, raw) -> None:
    reviews, meta = raw
    records = make_reviews()
    gz = write_jsonl(tmp_path / "All_Beauty.jsonl.gz", records)
    pq_file = write_parquet(tmp_path / "All_Beauty.parquet", records)
    a, b, c = (load(p, meta) for p in (reviews, gz, pq_file))
    assert a.train == b.train == c.train and a.valid == b.valid == c.valid and a.test == b.test == c.test
    assert a.category == "All_Beauty" and a.stats["users"] == 12
    assert set(a.titles) == set(a.all_items)


def test_bad_lines_are_counted_with_file_and_line_and_skipped(tmp_path: Path) -> None:
    good = make_reviews()
    bad_lines = [
        '{"user_id": "U000", "parent_asin": ',  # malformed JSON
        json.dumps({"user_id": "U000", "rating": 5.0, "timestamp": 1}),  # no parent_asin
        json.dumps({"user_id": "U000", "parent_asin": "P0001", "rating": "five", "timestamp": 1}),
        json.dumps({"user_id": "U000", "parent_asin": "P0001", "rating": 5.0, "timestamp": "yesterday"}),
        json.dumps({"user_id": 7, "parent_asin": "P0001", "rating": 5.0, "timestamp": 1}),
        "[1, 2]",
    ]
    reviews = write_jsonl(tmp_path / "All_Beauty.jsonl", good, bad_lines)
    meta = write_jsonl(tmp_path / "meta_All_Beauty.jsonl", make_meta())
    split = load(reviews, meta)
    bad = split.stats["bad_rows"]["interactions"]
    assert bad["total"] == 6
    assert bad["by_reason"] == {
        "malformed JSON": 2,
        "missing field parent_asin": 1,
        "wrong type of rating": 1,
        "wrong type of timestamp": 1,
        "wrong type of user_id": 1,
    }
    first_bad = len(good) + 1
    assert bad["first"][0].startswith(f"{reviews}:{first_bad}: malformed JSON")
    assert bad["first"][2].startswith(f"{reviews}:{first_bad + 2}: wrong type of rating")
    assert split.train == load(write_jsonl(tmp_path / "clean.jsonl", good), meta).train
    with pytest.raises(DataError, match=rf"All_Beauty.jsonl:{first_bad}: malformed JSON.*strict"):
        load(reviews, meta, strict=True)


def test_only_first_ten_bad_rows_are_shown_but_all_counted(tmp_path: Path) -> None:
    reviews = write_jsonl(tmp_path / "r.jsonl", make_reviews(), ["not json"] * 15)
    split = load(reviews, write_jsonl(tmp_path / "m.jsonl", make_meta()))
    bad = split.stats["bad_rows"]["interactions"]
    assert bad["total"] == 15 and len(bad["first"]) == 10


def test_clear_errors_for_unusable_input(tmp_path: Path) -> None:
    meta = write_jsonl(tmp_path / "meta.jsonl", make_meta())
    with pytest.raises(DataError, match="no usable rows"):
        load(write_jsonl(tmp_path / "empty.jsonl", [], ["{broken", ""]), meta)
    reviews = write_jsonl(tmp_path / "r.jsonl", make_reviews())
    with pytest.raises(DataError, match="no users left after 50-core"):
        load(reviews, meta, kcore=50)
    with pytest.raises(DataError, match=r"no title for 7 of 10 items \(> 50%\)"):
        load(reviews, write_jsonl(tmp_path / "m2.jsonl", make_meta(skip=(0, 1, 2, 3, 4, 5, 6))))
    with pytest.raises(DataError, match="no such file|no such reviews file"):
        load(tmp_path / "missing.jsonl", meta)
    bad_pq = tmp_path / "x.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"user_id": ["a"], "rating": [1.0], "timestamp": [1]}), bad_pq)
    with pytest.raises(DataError, match="no column 'parent_asin'"):
        load(bad_pq, meta)


def test_csv_fields_beyond_the_default_limit_leave_the_global_limit_alone(tmp_path: Path) -> None:
    old = csv.field_size_limit(131_072)  # the csv module's default; restored below
    try:
        big = "x" * 200_000
        meta = tmp_path / "meta_All_Beauty.csv"
        with open(meta, "w", newline="") as f:
            csv.writer(f).writerows([["", "parent_asin", "title"], ["0", "P1", big], ["1", "P2", "short"]])
        reviews = tmp_path / "All_Beauty.rating_only.csv"
        with open(reviews, "w", newline="") as f:
            csv.writer(f).writerows(
                [
                    ["user_id", "parent_asin", "rating", "timestamp", "text"],
                    ["U1", "P1", "5", "1", big],
                    ["U2", "P2", "4", "2", ""],
                ]
            )
        with open(meta, newline="") as f, pytest.raises(csv.Error, match="field larger than field limit"):
            list(csv.reader(f))  # the file really is beyond the caller's limit
        titles, _ = read_titles(meta, None, BadRows())
        assert titles == {"P1": big, "P2": "short"}
        assert csv.field_size_limit() == 131_072
        rows = read_reviews(reviews, BadRows(strict=True))
        assert next(rows) == ("U1", "P1", 5.0, 1)
        assert csv.field_size_limit() == 131_072  # also while the reader is suspended between rows
        assert list(rows) == [("U2", "P2", 4.0, 2)]
        assert csv.field_size_limit() == 131_072
    finally:
        csv.field_size_limit(old)
    code = "import csv; before = csv.field_size_limit(); import layerwise_dist.data; print(csv.field_size_limit() == before)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True"]  # importing the package leaves it alone too


def test_items_without_title_are_dropped_and_kcore_reapplied(tmp_path: Path) -> None:
    reviews = write_jsonl(tmp_path / "r.jsonl", make_reviews())
    split = load(reviews, write_jsonl(tmp_path / "m.jsonl", make_meta(skip=(3,))))
    assert "P0003" not in split.all_items and split.stats["items_without_title"] == 1
    assert all("P0003" not in split.sequence(u) for u in split.users)


def test_category_from_file_name_or_main_category(tmp_path: Path) -> None:
    assert category_from_filename(Path("Electronics.jsonl.gz")) == "Electronics"
    assert category_from_filename(Path("meta_All_Beauty.5core.csv")) == "All_Beauty"
    assert category_from_filename(Path("All_Beauty.rating_only.csv.gz")) == "All_Beauty"
    assert category_from_filename(Path("reviews.jsonl")) is None
    split = load(
        write_jsonl(tmp_path / "reviews.jsonl", make_reviews()), write_jsonl(tmp_path / "m.jsonl", make_meta())
    )
    assert split.category == "All_Beauty"  # "All Beauty" from main_category


# ---------------------------------------------------------------- k-core, duplicates, ties, leave-one-out


def brute_kcore(rows: list[tuple[str, str]], k: int) -> set[tuple[str, str]]:
    rows = set(rows)
    while True:
        uc, ic = Counter(u for u, _ in rows), Counter(i for _, i in rows)
        kept = {(u, i) for u, i in rows if uc[u] >= k and ic[i] >= k}
        if kept == rows:
            return kept
        rows = kept


def test_kcore_matches_brute_force(tmp_path: Path) -> None:
    rng = random.Random(3)
    records = []
    for u in range(40):
        for k, i in enumerate(rng.sample(range(30), rng.randint(2, 12))):
            records.append({"user_id": f"U{u}", "parent_asin": f"P{i:04d}", "rating": 5.0, "timestamp": u * 100 + k})
    split = load(write_jsonl(tmp_path / "r.jsonl", records), write_jsonl(tmp_path / "m.jsonl", make_meta(30)), kcore=4)
    expected = brute_kcore([(r["user_id"], r["parent_asin"]) for r in records], 4)
    got = {(u, i) for u in split.users for i in split.sequence(u)}
    assert got == expected
    assert min(Counter(i for _, i in got).values()) >= 4


def test_duplicates_keep_earliest_and_ties_keep_file_order(tmp_path: Path) -> None:
    def r(user: str, item: int, ts: int) -> dict:
        return {"user_id": user, "parent_asin": f"P{item:04d}", "rating": 4.0, "timestamp": ts}

    records = [r("U1", 5, 50), r("U1", 1, 10), r("U1", 3, 30), r("U1", 2, 30), r("U1", 4, 40), r("U1", 1, 45)]
    records += [r("U1", 3, 5)]  # duplicate of P0003, earlier: this copy is kept
    split = load(write_jsonl(tmp_path / "r.jsonl", records), write_jsonl(tmp_path / "m.jsonl", make_meta()), kcore=1)
    assert split.sequence("U1") == ["P0003", "P0001", "P0002", "P0004", "P0005"]
    assert split.stats["duplicates_removed"] == 2
    records2 = [r("U2", 1, 10), r("U2", 2, 20), r("U2", 4, 30), r("U2", 3, 30)]  # tie at 30: file order wins
    split2 = load(write_jsonl(tmp_path / "r2.jsonl", records2), write_jsonl(tmp_path / "m.jsonl", make_meta()), kcore=1)
    assert split2.valid["U2"] == "P0004" and split2.test["U2"] == "P0003"
    assert split2.stats["users_with_timestamp_ties"] == 1


@needs_beauty
def test_loo_of_rating_only_reproduces_official_split(beauty: SplitData) -> None:
    def rows(name: str) -> list[dict]:
        with open(BEAUTY / f"All_Beauty.{name}.csv") as f:
            return list(csv.DictReader(f))

    test, valid = rows("test"), rows("valid")
    assert len(beauty.test) == len(test) == 253
    assert {r["user_id"]: r["parent_asin"] for r in test} == beauty.test
    assert {r["user_id"]: r["parent_asin"] for r in valid} == beauty.valid
    for r in valid:  # the official valid history is the train sequence
        assert r["history"].split() == beauty.train[r["user_id"]]
    assert beauty.stats["users_with_timestamp_ties"] == 0
    assert (beauty.stats["users"], beauty.stats["items"], beauty.stats["interactions"]) == (253, 356, 2535)


@needs_beauty
def test_benchmark_csv_source_equals_rating_only(beauty: SplitData) -> None:
    split = load_splits(DataConfig(source="benchmark_csv", reviews=str(BEAUTY)))
    assert (split.train, split.valid, split.test, split.titles) == (
        beauty.train,
        beauty.valid,
        beauty.test,
        beauty.titles,
    )
    assert split.category == "All_Beauty"


@needs_games
def test_llmrank_source_reproduces_published_split() -> None:
    split = load_splits(DataConfig(source="llmrank", reviews=str(GAMES)))
    assert split.category == "Video_Games"
    assert (split.stats["users"], split.stats["items"], split.stats["interactions"]) == (50546, 16859, 440264)
    with open(GAMES / "Games-6k.valid.inter") as f:
        next(f)
        for n, line in enumerate(f):
            user, history, target = line.rstrip("\n").split("\t")
            assert split.valid[user] == target and split.train[user][-len(history.split()) :] == history.split()
            if n > 2000:
                break
    assert all(r != r for r in split.ratings["0"])  # no ratings: NaN
    assert split.titles["0"] == "Fire Emblem: The Sacred Stones"


# ---------------------------------------------------------------- examples


def test_examples_are_deterministic_and_well_formed(beauty: SplitData) -> None:
    cfg = DataConfig(history_len=4, num_candidates=8)
    for split in ("train", "valid", "test"):
        a, b = build_examples(beauty, split, cfg), build_examples(beauty, split, cfg)
        assert a == b and len(a) == 253
        for ex in a:
            seq = beauty.sequence(ex.user_id)
            target = {
                "train": beauty.train[ex.user_id][-1],
                "valid": beauty.valid[ex.user_id],
                "test": beauty.test[ex.user_id],
            }[split]
            end = seq.index(target)
            assert ex.history == seq[:end][-4:] and ex.target == target
            assert len(set(ex.candidates)) == 8 and not (set(ex.candidates) - {target}) & set(seq)
            assert ex.history_titles == [" ".join(beauty.titles[i].split()[:24]) for i in ex.history]
    other = build_examples(beauty, "test", DataConfig(history_len=4, num_candidates=8, seed=7))
    assert [e.candidates for e in other] != [e.candidates for e in build_examples(beauty, "test", cfg)]
    counts = Counter(e.target_index for e in build_examples(beauty, "test", cfg))
    assert len(counts) == 8  # the target is shuffled over all positions


def test_train_candidates_cut_only_the_training_examples(beauty: SplitData) -> None:
    """data.train_candidates: training examples get the target plus train_candidates-1 untouched negatives;
    validation and test keep num_candidates, the same examples as without it (the users' rankings do not move)."""
    full = DataConfig(formulation="pointwise", history_len=4, num_candidates=8)
    few = DataConfig(formulation="pointwise", history_len=4, num_candidates=8, train_candidates=3)
    train = build_examples(beauty, "train", few)
    assert len(train) == 253 and {len(e.candidates) for e in train} == {3}
    for ex in train:
        assert ex.target in ex.candidates and len(set(ex.candidates)) == 3
        assert not (set(ex.candidates) - {ex.target}) & set(beauty.sequence(ex.user_id))
    assert Counter(e.target_index for e in train).keys() == {0, 1, 2}  # the target still shuffled
    for split in ("valid", "test"):
        assert build_examples(beauty, split, few) == build_examples(beauty, split, full)
    with pytest.raises(ConfigError, match=r"train_candidates must be 0 or in \[2, data.num_candidates=8\]; got 9"):
        DataConfig(formulation="pointwise", num_candidates=8, train_candidates=9)
    with pytest.raises(ConfigError, match="train_candidates is a pointwise setting"):
        DataConfig(formulation="listwise", train_candidates=3)


def test_stable_seed_is_not_pythons_hash() -> None:
    # The documented derivation: blake2b, 8-byte digest read little-endian, of the parts' text joined by \x1f.
    digest = hashlib.blake2b(b"1234\x1fU1\x1ftest\x1f3", digest_size=8).digest()
    assert stable_seed(1234, "U1", "test", 3) == int.from_bytes(digest, "little")
    assert stable_seed(1234, "U1", "test", 3) != stable_seed(1234, "U1", "valid", 3)
    # Unlike hash(), it does not move with the interpreter's string-hash seed.
    code = "from layerwise_dist.data.examples import stable_seed; print(stable_seed(1234, 'U1', 'test', 3))"
    env = {**os.environ, "PYTHONHASHSEED": "7" if os.environ.get("PYTHONHASHSEED") != "7" else "8"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout) == stable_seed(1234, "U1", "test", 3)


def test_subset_is_seeded_and_nested_and_train_positions(beauty: SplitData) -> None:
    small = build_examples(beauty, "valid", DataConfig(max_eval_examples=20))
    large = build_examples(beauty, "valid", DataConfig(max_eval_examples=50))
    assert len(small) == 20 and len(large) == 50
    assert {e.user_id for e in small} <= {e.user_id for e in large}
    assert [e.user_id for e in small] == [u for u in beauty.users if u in {e.user_id for e in small}]
    multi = build_examples(beauty, "train", DataConfig(train_targets_per_user=3, max_train_examples=0))
    per_user = Counter(e.user_id for e in multi)
    # a target needs one earlier train item as history: min(3, len(train) - 1) per user
    assert per_user == {u: min(3, len(t) - 1) for u, t in beauty.train.items()}
    ex = next(e for e in multi if e.meta["position"] == len(beauty.train[e.user_id]) - 3)
    assert ex.target == beauty.train[ex.user_id][-3]


def test_popularity_sampling_prefers_popular_items(beauty: SplitData) -> None:
    cfg = DataConfig(negative_sampling="popularity", num_candidates=10)
    examples = build_examples(beauty, "test", cfg)
    negatives = Counter(c for e in examples for c in e.candidates if c != e.target)
    counts = beauty.item_counts()
    top = [i for i, _ in counts.most_common(20)]
    bottom = [i for i, _ in counts.most_common()[-100:]]
    assert sum(negatives[i] for i in top) / 20 > 2 * sum(negatives[i] for i in bottom) / 100
    assert examples == build_examples(beauty, "test", cfg)


def test_titles_are_cut_to_tokenizer_tokens(beauty: SplitData) -> None:
    tok = make_tokenizer()
    ex = build_examples(
        beauty, "test", DataConfig(title_max_tokens=3, num_candidates=4, max_eval_examples=5), tokenizer=tok
    )[0]
    for title in ex.history_titles + ex.candidate_titles:
        assert len(tok(title, add_special_tokens=False)["input_ids"]) <= 3
    full = beauty.titles[ex.history[-1]]
    assert full.startswith(ex.history_titles[-1])


# ---------------------------------------------------------------- prompts and tokens


def small_example(target: int = 2, n: int = 5) -> RankExample:
    cands = [f"P{i:04d}" for i in range(n)]
    return RankExample(
        user_id="U1",
        history=["P0009", "P0008"],
        history_titles=["soft cream", "oil soap"],
        candidates=cands,
        candidate_titles=[f"{WORDS[i]} number {i}" for i in range(n)],
        target_index=target,
        split="test",
        category="All_Beauty",
    )


def test_render_prompt_chat_and_plain() -> None:
    ex = small_example()
    prompt, answer = render_prompt(ex, make_tokenizer(chat=True))
    assert answer == "C" and prompt.startswith("[BOS]<|user|>\n") and prompt.endswith("<|assistant|>\n")
    assert "A. soap number 0" not in prompt and "A. soft number 0" in prompt and "1. soft cream" in prompt
    plain, answer = render_prompt(ex, make_tokenizer(chat=False))
    assert plain.endswith("\nAnswer: ") and answer == "C"
    assert render_prompt(ex, None)[0] == plain


def test_label_token_ids_are_single_distinct_tokens() -> None:
    tok = make_tokenizer()
    ids = label_token_ids(tok, 26)
    assert ids == tok.convert_tokens_to_ids(list(LABELS))
    with pytest.raises(DataError, match="share token id"):
        label_token_ids(make_tokenizer(letters="XYZ"), 3)  # A, B, C all unknown
    with pytest.raises(DataError, match="is 2 tokens"):
        encode("Answer: ", "A B", tok)


def test_bpe_plain_prompt_merges_space_into_letter(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = [f"Answer: {c}" for c in LABELS] * 20 + [" ".join(WORDS)] * 5
    backend.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="Ġ")
    ids = label_token_ids(tok, 10)
    assert [tok.convert_ids_to_tokens(i) for i in ids] == [f"Ġ{c}" for c in LABELS[:10]]
    ds = tokenize_examples([small_example()], tok, DataConfig(), cache_dir=tmp_path)
    row = ds[0]
    assert row["input_ids"][row["answer_pos"] + 1] == ids[2]


def test_tokenize_examples_labels_positions_and_cache(tmp_path: Path, monkeypatch, beauty: SplitData) -> None:
    tok = make_tokenizer()
    cfg = DataConfig(history_len=3, num_candidates=5, title_max_tokens=6)
    examples = build_examples(beauty, "test", cfg, tokenizer=tok)[:12]
    ds = tokenize_examples(examples, tok, cfg, cache_dir=tmp_path)
    assert set(("input_ids", "attention_mask", "labels", "answer_pos", "target_index", "candidate_token_ids")) <= set(
        ds.column_names
    )
    letters = label_token_ids(tok, 5)
    for ex, row in zip(examples, ds):
        ids, labels, pos = row["input_ids"], row["labels"], row["answer_pos"]
        assert pos == len(ids) - 2 and row["candidate_token_ids"] == letters
        assert ids[pos + 1] == letters[ex.target_index] == labels[pos + 1]
        assert all(v == IGNORE_INDEX for k, v in enumerate(labels) if k != pos + 1)
        prompt, answer = render_prompt(ex, tok)
        assert (
            ids[: pos + 1] == tok(prompt, add_special_tokens=False)["input_ids"] and answer == LABELS[ex.target_index]
        )

    def fail(*args, **kwargs):
        raise AssertionError("re-tokenized although the cache holds this dataset")

    monkeypatch.setattr(tokenize_module, "_encode_batch", fail)
    again = tokenize_examples(examples, tok, cfg, cache_dir=tmp_path)
    assert again["input_ids"] == ds["input_ids"]
    with pytest.raises(AssertionError, match="re-tokenized"):  # other examples: a different fingerprint
        tokenize_examples(examples[:3], tok, cfg, cache_dir=tmp_path)


def test_too_long_prompt_is_an_error_naming_the_example(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"user=U1 split=test is \d+ tokens, more than data.max_length=10"):
        tokenize_examples([small_example()], make_tokenizer(), DataConfig(max_length=10), cache_dir=tmp_path)


def test_collate_pads_right() -> None:
    feats = [
        {
            "input_ids": [5, 6, 7],
            "attention_mask": [1, 1, 1],
            "labels": [-100, -100, 7],
            "answer_pos": 1,
            "target_index": 0,
            "candidate_token_ids": [7, 8],
        },
        {
            "input_ids": [5, 8],
            "attention_mask": [1, 1],
            "labels": [-100, 8],
            "answer_pos": 0,
            "target_index": 1,
            "candidate_token_ids": [7, 8],
        },
    ]
    batch = collate(feats, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 8, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7], [-100, 8, -100]]
    assert batch["answer_pos"].tolist() == [1, 0] and batch["target_index"].tolist() == [0, 1]
    assert batch["candidate_token_ids"].shape == (2, 2)


# ---------------------------------------------------------------- prepare


def test_prepare_writes_splits_and_stats_and_reloads(tmp_path: Path, raw) -> None:
    reviews, meta = raw
    out = tmp_path / "prepared"
    split = prepare(reviews, meta, out, DataConfig(source="amazon2023", reviews=str(reviews), kcore=2))
    assert sorted(p.name for p in out.iterdir()) == [
        "items.parquet",
        "stats.json",
        "test.parquet",
        "train.parquet",
        "valid.parquet",
    ]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["users"] == split.stats["users"] and 0 < stats["sparsity"] < 1 and "bad_rows" in stats
    again = load_splits(DataConfig(source="prepared", reviews=str(out)))
    assert (again.train, again.valid, again.test, again.titles, again.all_items, again.category) == (
        split.train,
        split.valid,
        split.test,
        split.titles,
        split.all_items,
        split.category,
    )
    small = DataConfig(num_candidates=3)
    assert build_examples(again, "test", small) == build_examples(split, "test", small)
    with pytest.raises(DataError, match="not an empty folder"):
        prepare(reviews, meta, out, DataConfig(reviews=str(reviews)))


def test_run_prepare_cli_failure_writes_nothing(tmp_path: Path, capsys, raw) -> None:
    reviews, meta = raw
    parser = argparse.ArgumentParser()
    add_prepare_arguments(parser)
    broken = write_jsonl(tmp_path / "All_Beauty.jsonl", make_reviews(), ["{oops"])
    out = tmp_path / "out"
    assert (
        run_prepare(parser.parse_args(["--reviews", str(broken), "--meta", str(meta), "--out", str(out), "--strict"]))
        == 2
    )
    assert "malformed JSON" in capsys.readouterr().err
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    assert (
        run_prepare(parser.parse_args(["--reviews", str(broken), "--meta", str(meta), "--out", str(out), "kcore=2"]))
        == 0
    )
    assert "1 bad rows skipped" in capsys.readouterr().out and (out / "train.parquet").is_file()


def test_prepare_logs_and_prints_nothing(tmp_path: Path, capsys, raw) -> None:
    reviews, meta = raw
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("layerwise_dist.data")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        prepare(reviews, meta, tmp_path / "out", DataConfig(source="amazon2023", reviews=str(reviews), kcore=2))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert capsys.readouterr().out == ""
    assert f"prepared split written to {tmp_path / 'out'}" in [r.getMessage() for r in records]


def test_run_prepare_overrides_reach_the_data_config(tmp_path: Path, capsys, raw) -> None:
    reviews, meta = raw
    parser = argparse.ArgumentParser()
    add_prepare_arguments(parser)

    def run(out: str, *overrides: str) -> int:
        args = ["--reviews", str(reviews), "--meta", str(meta), "--out", str(tmp_path / out), *overrides]
        return run_prepare(parser.parse_args(args))

    assert run("a", "kcore=3", "data.category=Beauty_Test") == 0
    assert "wrote " in capsys.readouterr().out
    stats = json.loads((tmp_path / "a" / "stats.json").read_text())
    assert stats["kcore_setting"] == 3
    for overrides, message in (
        (["kcore=three"], "data.kcore expects an integer; got 'three'"),
        (["kcore=0"], "kcore"),
        (["negative_sampling=best"], "negative_sampling"),
        (["nope=1"], "unknown data key 'nope'"),
        (["kcore"], "is not key=value"),
        (["reviews=other.jsonl"], "--reviews"),
    ):
        assert run("b", *overrides) == 2, overrides
        assert message in capsys.readouterr().err, overrides
        assert not (tmp_path / "b").exists()
