"""Candidate retrieval for serving: co-occurrence weights, popularity fill, sources, no held-out leakage."""

from __future__ import annotations

import math

import pytest

from layerwise_dist.config import ConfigError, DataConfig, ServeConfig, load_config
from layerwise_dist.data import SplitData, load_splits
from layerwise_dist.retrieval import COOCCURRENCE, POPULARITY, CandidateRetriever, RetrievalError, hit_rate

SEQUENCES = {
    "a": ["x", "y", "z"],
    "b": ["x", "y"],
    "c": ["w", "x"],
    "d": ["v", "v", "u"],
}


def test_cooccurrence_weights_by_hand():
    r = CandidateRetriever(SEQUENCES, window=2, backward_weight=0.5)
    n = r.counts
    assert n == {"x": 3, "y": 2, "z": 1, "w": 1, "v": 2, "u": 1}
    # x -> y follows twice at distance 1, x -> z once at distance 2; y was preceded by x (backward 0.5 each)
    assert r.neighbours["x"]["y"] == pytest.approx(2.0 / math.sqrt(3 * 2))
    assert r.neighbours["x"]["z"] == pytest.approx(0.5 / math.sqrt(3 * 1))
    assert r.neighbours["y"]["x"] == pytest.approx(2 * 0.5 / math.sqrt(2 * 3))
    assert r.neighbours["x"]["w"] == pytest.approx(0.5 / math.sqrt(3 * 1))  # w came before x
    assert "v" not in r.neighbours["v"]  # an item never co-occurs with itself
    narrow = CandidateRetriever(SEQUENCES, window=1, backward_weight=0.0)
    assert "z" not in narrow.neighbours["x"] and "w" not in narrow.neighbours["x"]


def test_recent_seeds_weigh_more():
    r = CandidateRetriever({"p": ["a", "b"], "q": ["c", "d"]}, recency_decay=0.5)
    scores = r.cooccurrence_scores(["a", "c"])  # c is the most recent
    assert scores["d"] == pytest.approx(2 * scores["b"])
    assert r.cooccurrence_scores(["a", "c"]) != CandidateRetriever(
        {"p": ["a", "b"], "q": ["c", "d"]}, recency_decay=0.5, seed_items=1
    ).cooccurrence_scores(["a", "c"])


def test_retrieve_marks_sources_excludes_touched_and_fills_with_popularity():
    r = CandidateRetriever(SEQUENCES, catalogue=["u", "v", "w", "x", "y", "z", "t"], window=2)
    got = r.retrieve(["x"], 5, exclude=["w"])
    assert [(c.item_id, c.source) for c in got] == [
        ("y", COOCCURRENCE),
        ("z", COOCCURRENCE),
        ("v", POPULARITY),  # count 2
        ("u", POPULARITY),  # count 1, before t (never trained on) by count
        ("t", POPULARITY),
    ]
    assert got[0].retrieval_score > got[1].retrieval_score
    assert got[2].retrieval_score == 2.0
    # the catalogue runs out: fewer than asked, never a touched item
    everything = r.retrieve(["x", "y"], 100, exclude=["w"])
    assert {c.item_id for c in everything} == {"u", "v", "z", "t"}


def test_cold_user_gets_popularity():
    r = CandidateRetriever(SEQUENCES, window=2)
    assert [(c.item_id, c.source) for c in r.retrieve([], 3)] == [
        ("x", POPULARITY),
        ("y", POPULARITY),
        ("v", POPULARITY),  # count 2 like y; y comes first in the catalogue
    ]
    # history items with no co-occurring neighbour: popularity too
    assert {c.source for c in r.retrieve(["never-seen"], 3)} == {POPULARITY}


def test_held_out_items_never_build_the_index():
    split = SplitData(
        train={"u1": ["a", "b"], "u2": ["c", "d"]},
        valid={"u1": "e", "u2": "f"},
        test={"u1": "g", "u2": "h"},
        titles={i: i for i in "abcdefgh"},
        category="X",
    )
    r = CandidateRetriever.from_split(split, ServeConfig(cooccurrence_window=5, backward_weight=1.0))
    assert set(r.neighbours) == {"a", "b", "c", "d"}
    assert all(set(row) <= {"a", "b", "c", "d"} for row in r.neighbours.values())
    assert r.catalogue == split.all_items


def test_bad_settings_are_clear():
    with pytest.raises(RetrievalError, match="window must be >= 1"):
        CandidateRetriever(SEQUENCES, window=0)
    with pytest.raises(RetrievalError, match="recency_decay"):
        CandidateRetriever(SEQUENCES, recency_decay=0.0)
    with pytest.raises(RetrievalError, match="positive integer"):
        CandidateRetriever(SEQUENCES).retrieve(["x"], 0)
    with pytest.raises(ConfigError, match=r"serve.recency_decay must be in \(0, 1\]"):
        load_config("tiny", ["serve.recency_decay=1.5"])
    with pytest.raises(ConfigError, match="serve.cooccurrence_window must be > 0"):
        load_config("tiny", ["serve.cooccurrence_window=0"])
    assert load_config("tiny", ["serve.num_candidates=30"]).serve.num_candidates == 30


def test_cooccurrence_finds_held_out_items_popularity_does_not():
    """On the embedded All_Beauty sample (253 users, 356 items): the next item is among 50 candidates for
    about a quarter of the users with co-occurrence, and for under a tenth by popularity alone."""
    split = load_splits(DataConfig())
    r = CandidateRetriever.from_split(split)
    popular_only = CandidateRetriever.from_split(split)
    popular_only.neighbours = {}
    for target in ("valid", "test"):
        both = hit_rate(r, split, 50, target)
        pop = hit_rate(popular_only, split, 50, target)
        assert both["users"] == len(split.train) == 253
        assert pop["from_cooccurrence"] == 0
        assert both["hit_rate"] >= 0.2 and pop["hit_rate"] <= 0.1, (target, both, pop)
        assert both["from_cooccurrence"] > both["hits"] / 2
