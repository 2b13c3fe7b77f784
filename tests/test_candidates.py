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


# ---------------------------------------------------------------- per-example files and paired comparison


def test_per_example_file_round_trip_and_paired_compare(beauty, tmp_path: Path):
    import numpy as np
    import pyarrow.parquet as pq

    from layerwise_dist.baselines import popularity_result
    from layerwise_dist.evaluation import compare_per_example, result_from_scores, write_per_example

    rows = [(u, _pool(beauty, u, 12, with_target=False)) for u in beauty.users[:60]]
    path = write_candidates(tmp_path / "c.txt", rows)
    examples = examples_from_candidates(beauty, path, DataConfig(num_candidates=8), "test")
    ks = [1, 5, 10, 20]
    pop = popularity_result(beauty, examples, ks)
    # an oracle that ranks the target first for every other user, last otherwise
    scores = [np.where(np.arange(8) == e.target_index, 1.0 if i % 2 else -1.0, 0.0) for i, e in enumerate(examples)]
    oracle = result_from_scores(scores, [e.target_index for e in examples], ks)
    assert oracle.ranks.tolist() == [8 if i % 2 == 0 else 1 for i in range(60)]
    a = write_per_example(oracle, examples, tmp_path / "per_example" / "oracle.parquet")
    b = write_per_example(pop, examples, tmp_path / "per_example" / "popularity.parquet")
    t = pq.read_table(a).to_pydict()
    assert t["user"] == [e.user_id for e in examples] and t["target"] == [e.target for e in examples]
    assert t["candidates"][3] == examples[3].candidates and t["rank"] == oracle.ranks.tolist()
    assert t["top1_position"] == [int(np.argmax(s)) for s in scores]
    assert t["scores"][1] == pytest.approx(scores[1].tolist()) and t["hr@20"] == [1.0] * 60
    out = compare_per_example(a, b, ks, n_boot=500)
    assert out["n"] == 60
    d = out["metrics"]["hr@1"]
    assert d["a"] == 0.5 and d["b"] == pytest.approx(pop.metrics["hr@1"])
    assert d["difference"] == pytest.approx(0.5 - pop.metrics["hr@1"])
    assert d["ci95"][0] <= d["difference"] <= d["ci95"][1]
    same = compare_per_example(a, a, ks)
    assert all(m["difference"] == 0.0 and m["ci95"] == [0.0, 0.0] for m in same["metrics"].values())
    # different examples: one line naming a user
    fewer = write_per_example(
        result_from_scores(scores[:-1], [e.target_index for e in examples[:-1]], ks),
        examples[:-1],
        tmp_path / "fewer.parquet",
    )
    with pytest.raises(ValueError, match=f"user {examples[-1].user_id} target .* is only in"):
        compare_per_example(a, fewer)


def test_show_prompt_prints_the_exact_text_with_the_system_prompt(capsys):
    from layerwise_dist.cli import main

    user = load_splits(DataConfig()).users[0]
    assert main(["data", "show-prompt", "--user", user, "--preset", "tiny"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert "Which of these candidates" in out and f"user {user}, test" in err
    assert main(["data", "show-prompt", "--user", user, "--preset", "tiny", "data.system_prompt=Rank games."]) == 0
    custom, _ = capsys.readouterr()
    assert custom.startswith("<|im_start|>system\nRank games.<|im_end|>")
    assert custom.split("<|im_end|>", 1)[1] == out.split("<|im_end|>", 1)[1]  # the rest is unchanged
    assert main(["data", "show-prompt", "--user", "nobody", "--preset", "tiny"]) == 2
    assert "user nobody is not in the loaded data" in capsys.readouterr().err


def test_cli_evaluate_on_a_candidate_file_with_permutations_and_baseline_only(beauty, tmp_path: Path, capsys):
    """One run through the CLI (1 rank, tiny preset): candidates from a file, 3 orders, per-example files."""
    import json

    import pyarrow.parquet as pq

    from conftest import run_cli
    from layerwise_dist.cli import main

    users = beauty.users[:12]
    path = write_candidates(tmp_path / "beauty.random", [(u, _pool(beauty, u, 9, with_target=False)) for u in users])
    common = ["--preset", "tiny", "--nproc", "1", "--candidates", str(path), "--num-candidates", "5"]
    overrides = ["eval.max_examples=0", f"data.cache_dir={tmp_path / 'cache'}"]
    run = tmp_path / "run"
    r = run_cli(["evaluate", *common, "--permutations", "3", *overrides, f"output_dir={run}"], timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((run / "results.json").read_text())
    assert res["config"]["permutations"] == 3 and res["config"]["prompts"] == 36
    assert res["candidate_file"]["lines"] == 12 and res["candidate_file"]["rule"].startswith("llmrank")
    teacher = res["teacher"]
    assert teacher["n"] == 12 and teacher["ci95"]["hr@20"] == [1.0, 1.0]  # K=20 > 5 candidates
    assert teacher["position_bias"]["vectors"] == 36 and sum(teacher["position_bias"]["top1_counts"]) == 36
    assert teacher["permutation_cost"]["prompts_scored"] == 36 and teacher["permutation_cost"]["seconds"] > 0
    files = res["per_example_files"]
    assert set(files) == {"teacher", "popularity"}
    t = pq.read_table(files["teacher"]).to_pydict()
    assert t["user"] == users and all(len(c) == 5 for c in t["candidates"])
    assert all(beauty.test[u] == c[i] for u, c, i in zip(t["user"], t["candidates"], t["target_index"]))
    # the popularity baseline alone, same candidates: no model is loaded, same numbers
    run2 = tmp_path / "pop"
    r = run_cli(["evaluate", *common, "--baseline", "popularity", *overrides, f"output_dir={run2}"], timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res2 = json.loads((run2 / "results.json").read_text())
    assert "teacher" not in res2 and set(res2["baselines"]) == {"popularity"}
    assert res2["baselines"]["popularity"]["mrr"] == res["baselines"]["popularity"]["mrr"]
    assert main(["compare", files["teacher"], str(run2 / "per_example" / "popularity.parquet"), "--ks", "1", "3"]) == 0
    out = capsys.readouterr().out
    assert "12 paired examples" in out and "hr@3" in out


def test_eval_config_fields_and_one_line_errors():
    from layerwise_dist.config import ConfigError, load_config

    cfg = load_config("tiny")
    assert cfg.eval.ks == [1, 5, 10, 20] and cfg.eval.permutations == 1 and cfg.eval.models
    assert cfg.eval.baselines == ["random", "popularity"] and cfg.data.system_prompt == ""
    assert "system_prompt" in cfg.data.prompt_settings()
    assert load_config("tiny", ["eval.ks=[3,50]"]).eval.ks == [3, 50]
    for override, message in [
        ("eval.permutations=0", "eval.permutations must be > 0"),
        ("eval.baselines=[pop]", "eval.baselines must be some of random, popularity"),
        ("eval.candidates_format=csv", "eval.candidates_format must be one of llmrank"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config("tiny", [override])


def test_compare_command_bad_input_is_one_line(tmp_path: Path, capsys):
    from layerwise_dist.cli import main

    assert main(["compare", str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no such per-example file" in err and err.count("\n") == 1
    (tmp_path / "x.parquet").write_text("not parquet")
    assert main(["compare", str(tmp_path / "x.parquet"), str(tmp_path / "x.parquet")]) == 2
    assert "not a parquet file" in capsys.readouterr().err


def test_rendered_text_pointwise_shows_each_exact_continuation(beauty):
    from layerwise_dist.data.prompts import render_pointwise, rendered_text

    (ex,) = build_examples(
        beauty, "test", DataConfig(num_candidates=4, formulation="pointwise"), users=beauty.users[:1]
    )
    text = rendered_text(ex, None, "pointwise")
    prefix, continuations, _ = render_pointwise(ex)
    assert text.startswith(prefix + "\n")
    for n, c in enumerate(continuations):
        assert repr(c) in text and (f"candidate {n} (target)" in text) == (n == ex.target_index)
