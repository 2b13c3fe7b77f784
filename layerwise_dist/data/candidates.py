"""Ranking examples on fixed, published candidate lists (LLMRank's ``Games-6k.random`` / ``.bm25`` / ``.sasrec``).

File format ``llmrank`` (the only one so far): one user per line,
``user_id<TAB>item item item ...`` (space-separated item ids, no header), as in
RUCAIBox/LLMRank's ``dataset/<name>/<name>.<retriever>`` files. Ids are the ids of
the loaded data (``data.source=llmrank`` reads the matching ``.item``/``.test.inter``).
The published ``Games-6k.random`` lines hold 100 items and, on the lines checked (the
first 29), never the user's test item: the LLMRank rule below appends it.

Two rules turn a line into the candidates of one example (``num_candidates`` = N):

* ``include_target=False`` (default), LLMRank's ``has_gt`` protocol
  (``trainer.SelectedUserTrainer.evaluate``): drop the user's target from the list
  when present, keep the first N-1 remaining items in file order, append the
  target, then shuffle the N with ``random.Random(seed)`` where
  ``seed = stable_seed(data.seed, "candidates", user, split)`` (recorded in the
  example's ``meta["shuffle_seed"]``). LLMRank shuffles with numpy's global RNG,
  so its orders are not reproducible; the candidate SET is exactly LLMRank's.
* ``include_target=True``: the list already holds the target (a retriever's output
  that is scored as given): the first N items in file order, NOT shuffled. The
  target must be among them; a line where it is not is an error (this package
  scores one held-out item that must be a candidate; a retriever's misses are
  counted by the retriever's own recall, not here).

History: exactly :func:`~layerwise_dist.data.examples.split_targets`, the rule of
:func:`~layerwise_dist.data.examples.build_examples` (test: history = train + valid,
target = the test item; valid: history = train, target = the valid item).

Every problem is one :class:`~layerwise_dist.data.errors.DataError` line naming the
file and 1-based line: malformed lines, duplicate users, users missing from the
data, items without titles, too few candidates, duplicate candidates.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import DataConfig
from .errors import DataError
from .examples import make_example, split_targets, stable_seed
from .prompts import RankExample, TitleCutter
from .splits import SplitData

FORMATS = ("llmrank",)


@dataclass
class CandidateLine:
    """One line of a candidate file: ``line`` is 1-based."""

    line: int
    user: str
    items: list[str]


def read_candidates(path: str | Path, fmt: str = "llmrank") -> list[CandidateLine]:
    """Parse a candidate file; malformed lines and repeated users are one-line errors naming the line."""
    if fmt not in FORMATS:
        raise DataError(f"candidate file format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such candidate file")
    out: list[CandidateLine] = []
    seen: dict[str, int] = {}
    for n, line in _lines(path):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not fields[0].strip() or not fields[1].split():
            raise DataError(
                f"{path}:{n}: malformed line (expected user_id<TAB>space-separated item ids): {line[:80]!r}"
            )
        user = fields[0].strip()
        if user in seen:
            raise DataError(f"{path}:{n}: user {user} already has candidates on line {seen[user]}")
        seen[user] = n
        out.append(CandidateLine(n, user, fields[1].split()))
    if not out:
        raise DataError(f"{path}: no candidate lines")
    return out


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            yield n, raw.rstrip("\r\n")


def choose_candidates(
    items: list[str], target: str, num_candidates: int, include_target: bool, seed: int, where: str
) -> list[str]:
    """The N candidates of one line by the rules of the module docstring (``where`` prefixes errors)."""
    if include_target:
        chosen = items[:num_candidates]
        if len(chosen) < num_candidates:
            raise DataError(f"{where}: {len(items)} candidates, fewer than num_candidates={num_candidates}")
        if target not in chosen:
            raise DataError(
                f"{where}: the target {target} is not among the first {num_candidates} candidates "
                "(drop --include-target to apply LLMRank's rule: the target is added)"
            )
    else:
        rest = [item for item in items if item != target][: num_candidates - 1]
        if len(rest) < num_candidates - 1:
            raise DataError(
                f"{where}: {len(rest)} candidates besides the target, fewer than num_candidates-1={num_candidates - 1}"
            )
        chosen = [*rest, target]
        random.Random(seed).shuffle(chosen)
    dup = next((x for i, x in enumerate(chosen) if x in chosen[:i]), None)
    if dup is not None:
        raise DataError(f"{where}: item {dup} appears twice among the candidates")
    return chosen


def examples_from_candidates(
    splits: SplitData,
    lines: list[CandidateLine] | str | Path,
    cfg: DataConfig,
    split: str = "test",
    include_target: bool = False,
    tokenizer: Any = None,
    fmt: str = "llmrank",
) -> list[RankExample]:
    """Ranking examples of ``split`` on given candidate lists, one per line, in file order.

    ``lines`` is a candidate file (path) or its parsed :func:`read_candidates` lines.
    ``cfg.num_candidates`` candidates per example, chosen by the rule of the module
    docstring (``include_target``); history by :func:`split_targets` (the rule of
    ``build_examples``), shown as the last ``cfg.history_len`` items; titles cut to
    ``cfg.title_max_tokens`` tokens of ``tokenizer``. ``meta`` records the file line,
    the target's sequence position, the rule and (LLMRank rule) the shuffle seed.
    """
    if split not in ("valid", "test"):
        raise DataError(f"candidate files score the valid or test split; got {split!r}")
    where_file = str(lines) if isinstance(lines, (str, Path)) else "candidates"
    if isinstance(lines, (str, Path)):
        lines = read_candidates(lines, fmt)
    cut = TitleCutter(tokenizer, cfg.title_max_tokens)
    examples = []
    for entry in lines:
        where = f"{where_file}:{entry.line}"
        if entry.user not in splits.train:
            raise DataError(f"{where}: user {entry.user} is not in the loaded data ({len(splits.train)} users)")
        ((pos, history, target),) = split_targets(splits, split, entry.user)
        seed = stable_seed(cfg.seed, "candidates", entry.user, split)
        chosen = choose_candidates(entry.items, target, cfg.num_candidates, include_target, seed, where)
        missing = next((x for x in chosen if not splits.titles.get(x)), None)
        if missing is not None:
            raise DataError(f"{where}: item {missing} has no title in the loaded data")
        meta: dict[str, Any] = {
            "position": pos,
            "line": entry.line,
            "rule": "as_given" if include_target else "llmrank",
        }
        if not include_target:
            meta["shuffle_seed"] = seed
        examples.append(make_example(splits, split, entry.user, history, chosen, target, cfg, cut, meta))
    return examples


def write_candidates(path: str | Path, rows: list[tuple[str, list[str]]]) -> Path:
    """Write ``(user, items)`` rows in the ``llmrank`` format (for tests and for sharing a candidate set)."""
    path = Path(path)
    path.write_text("".join(f"{user}\t{' '.join(items)}\n" for user, items in rows), encoding="utf-8")
    return path


def example_for_user(
    splits: SplitData,
    cfg: Any,
    user: str,
    split: str = "test",
    tokenizer: Any = None,
) -> RankExample:
    """One user's evaluation example as a run builds it (``cfg`` a RunConfig): from ``eval.candidates``
    when set (the file's line of that user), else the sampled candidates of ``build_examples``."""
    from .examples import build_examples

    if user not in splits.train:
        raise DataError(f"user {user} is not in the loaded data ({len(splits.train)} users)")
    if cfg.eval.candidates:
        lines = [e for e in read_candidates(cfg.eval.candidates, cfg.eval.candidates_format) if e.user == user]
        if not lines:
            raise DataError(f"{cfg.eval.candidates}: no line for user {user}")
        (ex,) = examples_from_candidates(
            splits, lines, cfg.data, split, cfg.eval.include_target, tokenizer, cfg.eval.candidates_format
        )
        return ex
    (ex,) = build_examples(splits, split, cfg.data, tokenizer, users=[user])
    return ex
