"""Fixed candidate lists (LLMRank files): the protocol's rules, the shared history rule, one-line errors."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from layerwise_dist.config import DataConfig
from layerwise_dist.data import DataError, build_examples, load_splits
from layerwise_dist.data.candidates import examples_from_candidates, read_candidates, write_candidates
from layerwise_dist.data.examples import split_targets


@pytest.fixture(scope="module")
def beauty():
    return load_splits(DataConfig())  # embedded All_Beauty 5-core


def _pool(splits, user: str, n: int, with_target: bool, at: int = 3) -> list[str]:
    touched = set(splits.sequence(user))
    items = [x for x in splits.all_items if x not in touched][:n]
    if with_target:
        items.insert(at, splits.test[user])
    return items


def test_llmrank_rule_drops_target_keeps_first_n_minus_1_appends_and_shuffles(beauty, tmp_path: Path):
    users = beauty.users[:40]
    rows = [(u, _pool(beauty, u, 30, with_target=(i % 2 == 0))) for i, u in enumerate(users)]
    path = write_candidates(tmp_path / "All_Beauty.random", rows)
    cfg = DataConfig(num_candidates=10, history_len=4)
    examples = examples_from_candidates(beauty, path, cfg, "test")
    assert [e.user_id for e in examples] == users
    for (user, items), ex in zip(rows, examples):
        target = beauty.test[user]
        expected_negatives = [x for x in items if x != target][:9]
        assert ex.target == target
        assert sorted(ex.candidates) == sorted([*expected_negatives, target])
        assert ex.meta["rule"] == "llmrank" and isinstance(ex.meta["shuffle_seed"], int)
    # shuffled: the target is not always last, and the order is reproducible
    assert len({ex.target_index for ex in examples}) > 3
    again = examples_from_candidates(beauty, path, cfg, "test")
    assert [e.candidates for e in again] == [e.candidates for e in examples]
    other = examples_from_candidates(beauty, path, DataConfig(num_candidates=10, history_len=4, seed=9), "test")
    assert [e.candidates for e in other] != [e.candidates for e in examples]


def test_history_rule_is_the_one_of_build_examples(beauty, tmp_path: Path):
    cfg = DataConfig(num_candidates=5, history_len=3)
    built = {e.user_id: e for e in build_examples(beauty, "test", cfg)}
    rows = [(u, _pool(beauty, u, 8, with_target=False)) for u in beauty.users[:10]]
    path = write_candidates(tmp_path / "c.txt", rows)
    for split in ("test", "valid"):
        for ex in examples_from_candidates(beauty, path, cfg, split):
            ((pos, history, target),) = split_targets(beauty, split, ex.user_id)
            assert ex.history == history[-3:] and ex.target == target and ex.meta["position"] == pos
            if split == "test":
                assert ex.history == built[ex.user_id].history
                assert ex.history_titles == built[ex.user_id].history_titles


def test_include_target_keeps_the_lists_as_given(beauty, tmp_path: Path):
    users = beauty.users[:5]
    rows = [(u, _pool(beauty, u, 12, with_target=True, at=i)) for i, u in enumerate(users)]
    path = write_candidates(tmp_path / "retrieved.txt", rows)
    examples = examples_from_candidates(beauty, path, DataConfig(num_candidates=6), include_target=True)
    for i, ((_, items), ex) in enumerate(zip(rows, examples)):
        assert ex.candidates == items[:6] and ex.target_index == i
        assert ex.meta["rule"] == "as_given" and "shuffle_seed" not in ex.meta


def test_errors_are_one_line_naming_the_line(beauty, tmp_path: Path):
    u0, u1 = beauty.users[:2]
    good = " ".join(_pool(beauty, u0, 10, with_target=False))
    cfg = DataConfig(num_candidates=5)

    def err(text: str, **kw) -> str:
        path = tmp_path / "bad.txt"
        path.write_text(text)
        with pytest.raises(DataError) as e:
            examples_from_candidates(beauty, path, cfg, **kw)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "bad.txt:2: malformed line" in err(f"{u0}\t{good}\n{u1} {good}\n")
    assert "bad.txt:2: malformed line" in err(f"{u0}\t{good}\n{u1}\t\n")
    assert "bad.txt:1: user nobody is not in the loaded data" in err(f"nobody\t{good}\n")
    assert "bad.txt:2: user" in err(f"{u0}\t{good}\n{u0}\t{good}\n")  # repeated user
    assert "bad.txt:1: item no-such-item has no title" in err(f"{u0}\tno-such-item {good}\n")
    assert "bad.txt:1: 2 candidates besides the target" in err(f"{u0}\t{' '.join(good.split()[:2])}\n")
    assert "not among the first 5" in err(f"{u0}\t{good}\n", include_target=True)
    dup = good.split()[0]
    assert "appears twice" in err(f"{u0}\t{dup} {dup} {good}\n")
    with pytest.raises(DataError, match="no such candidate file"):
        read_candidates(tmp_path / "missing.txt")


def test_llmrank_file_on_the_real_games_data(tmp_path: Path):
    """The LLMRank Games-6k data: a line in the published format, scored by the package's rule."""
    folder = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon2018_video_games_llmrank"
    if not folder.is_dir():
        pytest.skip("shared LLMRank data not present")
    # Build a split from the first 200 users only (fast): same files, same reader.
    inter = tmp_path / "Games-6k.test.inter"
    with open(folder / "Games-6k.test.inter") as f:
        inter.write_text("".join(next(f) for _ in range(201)))
    (tmp_path / "Games-6k.item").write_text((folder / "Games-6k.item").read_text())
    splits = load_splits(DataConfig(source="llmrank", reviews=str(inter)))
    user = "0"
    assert splits.test[user] == "14" and splits.train[user][-1] == "12"
    cands = [str(i) for i in range(100, 200)]
    cands.insert(50, "14")
    path = write_candidates(tmp_path / "Games-6k.random", [(user, cands)])
    (ex,) = examples_from_candidates(splits, path, DataConfig(num_candidates=20, history_len=50), "test")
    assert Counter(ex.candidates) == Counter([*[str(i) for i in range(100, 119)], "14"])
    assert ex.history == [str(i) for i in range(14)] and ex.category == "Video_Games"
    assert ex.candidate_titles[ex.target_index] == splits.titles["14"]
