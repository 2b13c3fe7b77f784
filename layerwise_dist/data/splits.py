"""Interaction table -> duplicates removed -> iterative k-core -> leave-one-out split.

Ordering rule (documented and tested): a user's interactions are ordered by
timestamp, and interactions with the same timestamp keep their order of
appearance in the input (a stable sort on ``(timestamp, input row)``). The same
rule picks which copy of a duplicate ``(user, item)`` pair survives: the earliest,
ties again broken by input order. Leave-one-out then takes the last interaction
of each user as test, the second-to-last as validation and the rest as train.
"""

from __future__ import annotations

import json
import math
from array import array
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError
from .readers import Interaction

MIN_TITLE_COVERAGE = 0.5
SPLIT_FILES = ("train", "valid", "test")


class InteractionTable:
    """Interned (user, item, rating, timestamp) rows in input order: about 20 bytes a row plus the id strings."""

    def __init__(self) -> None:
        self.user_index: dict[str, int] = {}
        self.item_index: dict[str, int] = {}
        self.users = array("i")
        self.items = array("i")
        self.ratings = array("f")
        self.timestamps = array("q")

    def extend(self, rows: Iterable[Interaction]) -> None:
        uidx, iidx = self.user_index, self.item_index
        users, items, ratings, timestamps = self.users, self.items, self.ratings, self.timestamps
        for user, item, rating, ts in rows:
            u = uidx.get(user)
            if u is None:
                u = uidx[user] = len(uidx)
            i = iidx.get(item)
            if i is None:
                i = iidx[item] = len(iidx)
            users.append(u)
            items.append(i)
            ratings.append(rating)
            timestamps.append(ts)

    def __len__(self) -> int:
        return len(self.users)


@dataclass
class SplitData:
    """Chronological leave-one-out split of one category.

    ``train[user]`` is the user's train sequence, oldest first; ``valid[user]`` and
    ``test[user]`` are the second-to-last and last items. Every user is in all three.
    ``all_items`` is the item universe negatives are sampled from (every item of the
    split, in first-appearance order); ``titles`` has a title for each of them.
    """

    train: dict[str, list[str]]
    valid: dict[str, str]
    test: dict[str, str]
    titles: dict[str, str]
    category: str
    stats: dict[str, Any] = field(default_factory=dict)
    all_items: list[str] = field(default_factory=list)
    ratings: dict[str, list[float]] = field(default_factory=dict)
    timestamps: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.all_items:
            seen: dict[str, None] = {}
            for user, seq in self.train.items():
                seen.update(dict.fromkeys(seq))
                seen[self.valid[user]] = None
                seen[self.test[user]] = None
            self.all_items = list(seen)

    @property
    def users(self) -> list[str]:
        return list(self.train)

    def sequence(self, user: str) -> list[str]:
        """The user's whole chronological sequence: train + valid + test."""
        return [*self.train[user], self.valid[user], self.test[user]]

    def item_counts(self) -> Counter[str]:
        """Interactions per item in the train sequences (the popularity used for negative sampling)."""
        counts: Counter[str] = Counter()
        for seq in self.train.values():
            counts.update(seq)
        return counts

    def save(self, folder: str | Path) -> None:
        """Write ``train/valid/test.parquet`` (``user_id,parent_asin,rating,timestamp``),
        ``items.parquet`` (``parent_asin,title``) and ``stats.json``."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in SPLIT_FILES:
            users, items, ratings, stamps = [], [], [], []
            for user, seq in self.train.items():
                full_r = self.ratings.get(user) or [math.nan] * (len(seq) + 2)
                full_t = self.timestamps.get(user) or list(range(len(seq) + 2))
                if name == "train":
                    users += [user] * len(seq)
                    items += seq
                    ratings += full_r[: len(seq)]
                    stamps += full_t[: len(seq)]
                else:
                    k = -2 if name == "valid" else -1
                    users.append(user)
                    items.append(getattr(self, name)[user])
                    ratings.append(full_r[k])
                    stamps.append(full_t[k])
            table = pa.table(
                {
                    "user_id": pa.array(users, pa.string()),
                    "parent_asin": pa.array(items, pa.string()),
                    "rating": pa.array(ratings, pa.float32()),
                    "timestamp": pa.array(stamps, pa.int64()),
                }
            )
            pq.write_table(table, folder / f"{name}.parquet")
        items_table = pa.table(
            {"parent_asin": self.all_items, "title": [self.titles.get(i, "") for i in self.all_items]}
        )
        pq.write_table(items_table, folder / "items.parquet")
        stats = dict(self.stats, category=self.category)
        (folder / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=False) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> SplitData:
        """Read a folder written by :meth:`save` (``layerwise-dist data prepare``)."""
        import pyarrow.parquet as pq

        folder = Path(folder)
        needed = [f"{n}.parquet" for n in (*SPLIT_FILES, "items")] + ["stats.json"]
        missing = [n for n in needed if not (folder / n).is_file()]
        if missing:
            raise DataError(f"{folder}: not a prepared data folder (missing {', '.join(missing)})")
        stats = json.loads((folder / "stats.json").read_text())
        cols = {n: pq.read_table(folder / f"{n}.parquet").to_pydict() for n in SPLIT_FILES}
        train: dict[str, list[str]] = {}
        ratings: dict[str, list[float]] = {}
        stamps: dict[str, list[int]] = {}
        t = cols["train"]
        for user, item, rating, ts in zip(t["user_id"], t["parent_asin"], t["rating"], t["timestamp"]):
            train.setdefault(user, []).append(item)
            ratings.setdefault(user, []).append(rating)
            stamps.setdefault(user, []).append(ts)
        held: dict[str, dict[str, str]] = {}
        for name in ("valid", "test"):
            c = cols[name]
            held[name] = dict(zip(c["user_id"], c["parent_asin"]))
            for user, rating, ts in zip(c["user_id"], c["rating"], c["timestamp"]):
                ratings.setdefault(user, []).append(rating)
                stamps.setdefault(user, []).append(ts)
        if not (set(train) == set(held["valid"]) == set(held["test"])):
            raise DataError(f"{folder}: train, valid and test do not hold the same users")
        items = pq.read_table(folder / "items.parquet").to_pydict()
        titles = dict(zip(items["parent_asin"], items["title"]))
        return cls(
            train=train,
            valid=held["valid"],
            test=held["test"],
            titles=titles,
            category=stats.get("category", ""),
            stats=stats,
            all_items=list(items["parent_asin"]),
            ratings=ratings,
            timestamps=stamps,
        )


def _dedup(u: np.ndarray, i: np.ndarray, t: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Row indices that survive duplicate (user, item) removal: the earliest (timestamp, input row)."""
    order = np.lexsort((rows, t[rows], i[rows], u[rows]))
    s = rows[order]
    first = np.ones(len(s), dtype=bool)
    first[1:] = (u[s][1:] != u[s][:-1]) | (i[s][1:] != i[s][:-1])
    return np.sort(s[first])


def _kcore(u: np.ndarray, i: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """Iteratively drop users and items with fewer than k interactions; returns (rows, rounds)."""
    rounds = 0
    n_users, n_items = int(u.max(initial=-1)) + 1, int(i.max(initial=-1)) + 1
    while len(rows):
        uc = np.bincount(u[rows], minlength=n_users)
        ic = np.bincount(i[rows], minlength=n_items)
        keep = (uc[u[rows]] >= k) & (ic[i[rows]] >= k)
        rounds += 1
        if keep.all():
            break
        rows = rows[keep]
    return rows, rounds


def build_splits(
    table: InteractionTable,
    *,
    kcore: int,
    apply_kcore: bool,
    load_titles: Callable[[set[str]], dict[str, str]],
    category: Callable[[], str] | str,
    where: str,
    stats: dict[str, Any] | None = None,
) -> SplitData:
    """Duplicates, k-core, titles, chronological leave-one-out. Raises DataError when nothing usable is left.

    ``load_titles(items)`` returns titles for the item ids it is given (called once,
    after the k-core, so a large metadata file is filtered while streaming). Items
    without a title are dropped and the k-core is applied again; more than half of
    the items without one is an error.
    """
    stats = dict(stats or {})
    if len(table) == 0:
        raise DataError(f"{where}: no usable rows (every row was empty or bad; see the messages above)")
    u = np.frombuffer(table.users, dtype=np.int32)
    i = np.frombuffer(table.items, dtype=np.int32)
    t = np.frombuffer(table.timestamps, dtype=np.int64)
    r = np.frombuffer(table.ratings, dtype=np.float32)
    user_names = list(table.user_index)
    item_names = list(table.item_index)
    rows = np.arange(len(u), dtype=np.int64)
    stats["rows_read"] = int(len(rows))
    rows = _dedup(u, i, t, rows)
    stats["duplicates_removed"] = int(len(u) - len(rows))

    k = kcore if apply_kcore else 1
    before = len(rows)
    rows, rounds = _kcore(u, i, rows, k)
    stats["kcore"] = {"k": k, "applied": apply_kcore, "rounds": rounds, "interactions_removed": int(before - len(rows))}
    if not len(rows):
        raise DataError(f"{where}: no users left after {k}-core filtering of {before} interactions (lower data.kcore)")

    kept_items = np.unique(i[rows])
    wanted = {item_names[x] for x in kept_items}
    titles = load_titles(wanted)
    missing = len(wanted) - sum(1 for x in wanted if x in titles)
    if missing / len(wanted) > MIN_TITLE_COVERAGE:
        raise DataError(
            f"{where}: metadata has no title for {missing} of {len(wanted)} items (> 50%): wrong or missing meta file?"
        )
    stats["items_without_title"] = int(missing)
    if missing:
        has_title = np.array([item_names[x] in titles for x in range(len(item_names))], dtype=bool)
        before = len(rows)
        rows = rows[has_title[i[rows]]]
        rows, more = _kcore(u, i, rows, k)
        stats["kcore"]["rounds"] += more
        stats["interactions_removed_without_title"] = int(before - len(rows))
        if not len(rows):
            raise DataError(f"{where}: no users left after dropping items without a title and {k}-core filtering")

    # Chronological per user; ties keep input order (rows are input row indices).
    rows = rows[np.lexsort((rows, t[rows], u[rows]))]
    us = u[rows]
    starts = np.flatnonzero(np.r_[True, us[1:] != us[:-1]])
    ends = np.r_[starts[1:], len(rows)]
    ties = 0
    train: dict[str, list[str]] = {}
    valid: dict[str, str] = {}
    test: dict[str, str] = {}
    ratings: dict[str, list[float]] = {}
    stamps: dict[str, list[int]] = {}
    too_short = 0
    # Interned user ids follow first appearance, so users come out in input order.
    for s, e in zip(starts.tolist(), ends.tolist()):
        if e - s < 3:
            too_short += 1
            continue
        seg = rows[s:e]
        user = user_names[int(us[s])]
        seq = [item_names[x] for x in i[seg].tolist()]
        ts = t[seg].tolist()
        ties += int(len(set(ts)) < len(ts))
        train[user], valid[user], test[user] = seq[:-2], seq[-2], seq[-1]
        ratings[user] = [float(x) for x in r[seg].tolist()]
        stamps[user] = ts
    if not train:
        raise DataError(f"{where}: no user has the 3 interactions leave-one-out needs (train, valid, test)")
    stats["users_too_short_for_split"] = too_short
    stats["users_with_timestamp_ties"] = ties
    stats["tie_rule"] = "stable: equal timestamps keep input order; duplicates keep the earliest copy"
    split = SplitData(
        train=train,
        valid=valid,
        test=test,
        titles={},
        category=category if isinstance(category, str) else category(),
        ratings=ratings,
        timestamps=stamps,
    )
    split.titles = {item: titles[item] for item in split.all_items}
    split.stats = {**summary_stats(split), **stats}
    return split


def summary_stats(split: SplitData) -> dict[str, Any]:
    lengths = [len(s) + 2 for s in split.train.values()]
    n_users, n_items, n = len(lengths), len(split.all_items), sum(lengths)
    out: dict[str, Any] = {
        "category": split.category,
        "users": n_users,
        "items": n_items,
        "interactions": n,
        "sparsity": 1.0 - n / (n_users * n_items),
        "interactions_per_user": {"min": min(lengths), "max": max(lengths), "mean": n / n_users},
        "split_sizes": {"train": n - 2 * n_users, "valid": n_users, "test": n_users},
    }
    all_ratings = [x for rs in split.ratings.values() for x in rs if not math.isnan(x)]
    if all_ratings:
        out["ratings"] = {str(k): v for k, v in sorted(Counter(all_ratings).items())}
    return out
