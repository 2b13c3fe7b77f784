"""Serving entry point of the original project: top-k items for a known user.

::

    rec = BaseRecommender(model_name="results/run/student")      # or embedded:smollm2, tiny, a .gguf
    rec.recommend(user_id="AE22...", category="All_Beauty", top_k=3)
    # [{"item_id": "B07...", "title": "...", "score": -2.41, "source": "co-occurrence"}, ...]

Two stages:

1. **Retrieval** (:mod:`layerwise_dist.retrieval`) proposes ``serve.num_candidates``
   items the user never touched: items co-occurring with the user's recent items in
   the training interactions, then the most popular training items to fill up (all of
   them for a cold user). Each result says which source proposed it (``source``).
   ``serve.num_candidates=0`` skips retrieval and scores every untouched item
   (``source`` ``catalogue``), the behaviour of earlier versions.
2. **Re-ranking** by the LLM in one batched pass, with the prompt settings the model
   records (``config.layerwise_dist.prompt``, written by ``distill``) or, for a model
   that records none, those of ``data_config``:

   * ``pointwise``: the user's last ``history_len`` titles as a plain-text list, and
     every candidate's title scored as its continuation, all candidates packed into one
     sequence with a block attention mask (:func:`layerwise_dist.pointwise.score_candidates_batch`);
     the score is ``data.pointwise_score`` (mean / sum of the title's token log-probs,
     or pmi). Exact per candidate: packing does not change any score.
   * ``listwise``: the candidates cut into prompts of at most ``num_candidates`` (at most
     26, one letter each), rendered by the training prompt builder, all prompts in one
     batch, scored answer-only (:func:`layerwise_dist.heads.answer_only_scores`: the
     log-probability of each candidate's letter at the answer position, as in
     evaluation). Scores from different prompts are compared directly, although each
     was computed in the context of a different candidate list.

The history is the user's most recent items (train + valid + test: everything the
recommender knows); the co-occurrence index is built from the training sequences only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from layerwise_dist.models.util import model_device
from layerwise_dist.retrieval import Candidate, CandidateRetriever

if TYPE_CHECKING:
    from layerwise_dist.config import DataConfig
    from layerwise_dist.data import SplitData

MAX_CANDIDATES = 26
#: Pointwise: candidates packed into one sequence (more are split over several rows of the same batch).
POINTWISE_PACK = 64
CATALOGUE = "catalogue"


class RecommendError(ValueError):
    """A recommendation request that cannot be served (unknown user or category, bad top_k)."""


def score_meaning(data_config: DataConfig) -> str:
    """One line: what the ``score`` of a recommendation means for this formulation."""
    if data_config.formulation == "pointwise":
        what = {
            "mean": "mean log-probability per token of the item's title as the next item after the user's history",
            "sum": "total log-probability of the item's title as the next item after the user's history",
            "pmi": "log p(title | user's history) - log p(title | no history), summed over the title's tokens",
        }[data_config.pointwise_score]
        return f"{what} (pointwise, {data_config.pointwise_score}; higher is better)"
    size = min(data_config.num_candidates, MAX_CANDIDATES)
    return (
        "log-probability of the item's letter at the answer position of a prompt listing up to "
        f"{size} candidates (listwise; higher is better; scores of different prompts compared directly)"
    )


class BaseRecommender:
    """Top-k recommendations from a (distilled) LLM ranker over retrieved candidates.

    Args:
        model_name: a HF model folder (e.g. a saved student), a ``.gguf`` file,
            ``embedded:smollm2``, ``tiny`` or a cached hub id, resolved by the teacher
            loader. Not needed when ``model`` and ``tokenizer`` are given.
        data: the interactions to serve from: a :class:`~layerwise_dist.data.SplitData`,
            or a mapping ``category -> SplitData``. Default: the split that
            ``data_config`` describes (the embedded All_Beauty sample), loaded on first use.
        model, tokenizer: ready objects instead of ``model_name``.
        data_config: the data source when ``data`` is None, and the prompt settings (history
            length, candidates per prompt, title length, formulation) for a model that does
            not record its own; a student saved by this package records them in its config
            (``layerwise_dist.prompt``), and those win. Default ``DataConfig()``.
        serve_config: retrieval settings (``serve.*``: candidate count, co-occurrence window, ...).
            Default ``ServeConfig()``.
        quantization: how to load ``model_name``: none, nf4 or int8.
        batch_size: rows per forward (listwise prompts, or pointwise packs of up to 64 candidates).
    """

    def __init__(
        self,
        model_name: str = "",
        data: SplitData | Mapping[str, SplitData] | None = None,
        *,
        model: Any = None,
        tokenizer: Any = None,
        data_config: Any = None,
        serve_config: Any = None,
        quantization: str = "none",
        batch_size: int = 4,
    ) -> None:
        from layerwise_dist.config import DataConfig, ServeConfig

        self.data_config = data_config or DataConfig()
        self.serve_config = serve_config or ServeConfig()
        if batch_size < 1:
            raise RecommendError(f"batch_size must be >= 1; got {batch_size}")
        self.batch_size = batch_size
        if model is None or tokenizer is None:
            if not model_name:
                raise RecommendError("give model_name (a model folder or name) or both model= and tokenizer=")
            model, tokenizer = self._load(model_name, quantization, model, tokenizer)
        self.model = model.eval()
        self.tokenizer = tokenizer
        recorded = (getattr(model.config, "layerwise_dist", None) or {}).get("prompt")
        if recorded:  # a saved student: its own prompt settings, whatever the caller's data config says
            self.data_config = self.data_config.with_prompt_settings(recorded)
        self.device = model_device(model)
        self._data: dict[str, SplitData] | None = None
        if data is not None:
            self._data = dict(data) if isinstance(data, Mapping) else {data.category: data}
        self._retrievers: dict[str, CandidateRetriever] = {}
        self._cutters: dict[str, Any] = {}

    @staticmethod
    def _load(model_name: str, quantization: str, model: Any, tokenizer: Any) -> tuple[Any, Any]:
        from layerwise_dist.config import TeacherConfig
        from layerwise_dist.models.teacher import ModelLoadError, load_teacher, load_tokenizer

        cfg = TeacherConfig(model=model_name, quantization=quantization, placement="replicate")
        try:
            return model or load_teacher(cfg), tokenizer or load_tokenizer(cfg)
        except ModelLoadError as e:  # the loader speaks of teacher.model; here it is the served model
            raise ModelLoadError(str(e).replace("teacher.model: ", "model: ", 1)) from None

    @property
    def data(self) -> dict[str, SplitData]:
        if self._data is None:
            from layerwise_dist.data import load_splits

            split = load_splits(self.data_config)
            self._data = {split.category: split}
        return self._data

    @property
    def score_meaning(self) -> str:
        """What ``score`` means for this model's formulation (the CLI prints it in its header)."""
        return score_meaning(self.data_config)

    def _split(self, category: str) -> SplitData:
        data = self.data
        if category not in data:
            raise RecommendError(f"unknown category {category!r}: this recommender holds {', '.join(sorted(data))}")
        return data[category]

    def retriever(self, category: str = "All_Beauty") -> CandidateRetriever:
        """The category's co-occurrence + popularity retriever (built once, from the training sequences)."""
        if category not in self._retrievers:
            self._retrievers[category] = CandidateRetriever.from_split(self._split(category), self.serve_config)
        return self._retrievers[category]

    def recommend(
        self, user_id: str, category: str = "All_Beauty", top_k: int = 3, history: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        """The ``top_k`` retrieved items with the highest model score, best first.

        Each entry is ``{"item_id", "title", "score", "source"}``: ``score`` as
        :attr:`score_meaning` says, ``source`` the retrieval source that proposed the item
        (``co-occurrence``, ``popularity``, or ``catalogue`` without retrieval). At least
        ``top_k`` candidates are retrieved; fewer entries come back only when the user has
        fewer untouched items.

        ``history``: the items the user interacted with, oldest first, instead of the data's
        record of ``user_id`` (a user the data does not know; ``[]`` is a cold user, served
        popular items re-ranked by the model). Without it an unknown ``user_id`` is an error.
        """
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise RecommendError(f"top_k must be a positive integer; got {top_k!r}")
        sequence = self._sequence(user_id, category, history)
        candidates = self._candidates(sequence, category, top_k)
        scores = self._score(user_id, category, candidates, sequence)
        # Stable sort: equal scores keep the retrieval order.
        ranked = sorted(range(len(candidates)), key=lambda i: -scores[i])[:top_k]
        titles = self._split(category).titles
        return [
            {
                "item_id": candidates[i].item_id,
                "title": titles.get(candidates[i].item_id, ""),
                "score": scores[i],
                "source": candidates[i].source,
            }
            for i in ranked
        ]

    def candidates(
        self,
        user_id: str,
        category: str = "All_Beauty",
        at_least: int = 1,
        history: Sequence[str] | None = None,
    ) -> tuple[list[str], list[Candidate]]:
        """(history: the most recent ``history_len`` items, the candidates the model re-ranks).

        Candidates: ``max(serve.num_candidates, at_least)`` retrieved items, best first; with
        ``serve.num_candidates=0`` every untouched item in catalogue order. ``history`` as in
        :meth:`recommend`."""
        sequence = self._sequence(user_id, category, history)
        return sequence[-self.data_config.history_len :], self._candidates(sequence, category, at_least)

    def score_items(
        self, user_id: str, category: str = "All_Beauty", history: Sequence[str] | None = None
    ) -> list[tuple[str, float]]:
        """(item_id, model score) of every candidate of :meth:`candidates`, in candidate order."""
        sequence = self._sequence(user_id, category, history)
        candidates = self._candidates(sequence, category, 1)
        return list(zip([c.item_id for c in candidates], self._score(user_id, category, candidates, sequence)))

    def _sequence(self, user_id: str, category: str, history: Sequence[str] | None) -> list[str]:
        """Everything known about the user, oldest first: ``history`` when given, else the data's record."""
        split = self._split(category)
        if history is not None:
            if isinstance(history, str):
                raise RecommendError("history must be a list of item ids, not one string")
            unknown = [i for i in history if i not in split.titles]
            if unknown:
                raise RecommendError(f"unknown item {unknown[0]!r} in the history (not in category {category!r})")
            return list(history)
        if user_id not in split.train:
            raise RecommendError(
                f"unknown user {user_id!r} in category {category!r} ({len(split.train)} known users; "
                "give the user's history to serve a new user)"
            )
        return split.sequence(user_id)

    def _candidates(self, sequence: list[str], category: str, at_least: int) -> list[Candidate]:
        n = self.serve_config.num_candidates
        if n == 0:
            touched = set(sequence)
            return [Candidate(i, CATALOGUE, 0.0) for i in self._split(category).all_items if i not in touched]
        return self.retriever(category).retrieve(sequence, max(n, at_least), exclude=sequence)

    # ------------------------------------------------------------------ scoring

    def _score(self, user_id: str, category: str, candidates: Sequence[Candidate], sequence: list[str]) -> list[float]:
        if not candidates:
            return []
        split = self._split(category)
        history = sequence[-self.data_config.history_len :]
        items = [c.item_id for c in candidates]
        if self.data_config.formulation == "pointwise":
            return self._score_pointwise(user_id, split, history, items)
        return self._score_listwise(user_id, split, history, items)

    def _cutter(self, category: str) -> Any:
        from layerwise_dist.data.prompts import TitleCutter

        if category not in self._cutters:  # memoised titles, per category (item ids are per category)
            self._cutters[category] = TitleCutter(self.tokenizer, self.data_config.title_max_tokens)
        return self._cutters[category]

    def _example(self, user_id: str, split: SplitData, history: list[str], items: list[str]) -> Any:
        from layerwise_dist.data import RankExample

        cut = self._cutter(split.category)
        return RankExample(
            user_id=user_id,
            history=history,
            history_titles=cut.many(history, split.titles),
            candidates=items,
            candidate_titles=cut.many(items, split.titles),
            target_index=0,  # unknown at serving time; only the prompt is scored
            split="serve",
            category=split.category,
        )

    def _score_pointwise(self, user_id: str, split: SplitData, history: list[str], items: list[str]) -> list[float]:
        """Every candidate's title likelihood as the next item, candidates packed (exact per candidate)."""
        from layerwise_dist.data import render_pointwise
        from layerwise_dist.pointwise import MASK_ATTN_IMPLEMENTATIONS, score_candidates_batch

        if getattr(self.model.config, "_attn_implementation", None) not in MASK_ATTN_IMPLEMENTATIONS:
            # Packed scoring needs a block attention mask (flash_attention_2 takes none): switch to sdpa.
            self.model.set_attn_implementation("sdpa")
        cfg = self.data_config
        tok = self.tokenizer
        chunks = [items[i : i + POINTWISE_PACK] for i in range(0, len(items), POINTWISE_PACK)]
        prefix_ids: list[int] = []
        unconditional_ids: list[int] = []
        rows: list[list[list[int]]] = []
        for chunk in chunks:
            prefix, continuations, unconditional = render_pointwise(
                self._example(user_id, split, history, chunk), cfg.category_phrase
            )
            if not prefix_ids:
                prefix_ids = list(tok(prefix, add_special_tokens=True)["input_ids"])
                unconditional_ids = list(tok(unconditional, add_special_tokens=True)["input_ids"])
            rows.append([list(ids) for ids in tok(continuations, add_special_tokens=False)["input_ids"]])
        longest = len(prefix_ids) + max(len(c) for row in rows for c in row)
        if longest > cfg.max_length:
            raise RecommendError(
                f"user {user_id}: prefix + longest candidate is {longest} tokens, more than data.max_length="
                f"{cfg.max_length} (raise it, or lower history_len / title_max_tokens)"
            )
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        scores: list[float] = []
        for start in range(0, len(rows), self.batch_size):
            group = rows[start : start + self.batch_size]
            out = score_candidates_batch(
                self.model,
                [prefix_ids] * len(group),
                group,
                mode=cfg.pointwise_score,
                unconditional_prefix_ids=unconditional_ids,
                pad_id=pad,
            )
            scores += [float(s) for row in out for s in row.tolist()]
        return scores

    def _score_listwise(self, user_id: str, split: SplitData, history: list[str], items: list[str]) -> list[float]:
        """Letter log-probs: prompts of at most ``num_candidates`` (<= 26) candidates, answer-only scoring."""
        from layerwise_dist.data import encode, label_token_ids, render_prompt
        from layerwise_dist.heads import answer_only_scores

        size = min(self.data_config.num_candidates, MAX_CANDIDATES)
        letters = label_token_ids(self.tokenizer, min(size, len(items)))
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        encoded = []
        for chunk in chunks:
            example = self._example(user_id, split, history, chunk)
            prompt, answer = render_prompt(example, self.tokenizer, self.data_config.system_prompt)
            ids, answer_index = encode(prompt, answer, self.tokenizer)
            encoded.append((ids, answer_index - 1, letters[: len(chunk)]))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        scores: list[float] = []
        for start in range(0, len(encoded), self.batch_size):
            group = encoded[start : start + self.batch_size]
            width = max(len(ids) for ids, _, _ in group)
            cands = max(len(c) for _, _, c in group)
            batch = {
                "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _, _ in group]),
                "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _, _ in group]),
                "answer_pos": torch.tensor([pos for _, pos, _ in group]),
                # A shorter list is padded with its first letter; those columns are dropped below.
                "candidate_token_ids": torch.tensor([c + [c[0]] * (cands - len(c)) for _, _, c in group]),
            }
            out = answer_only_scores(self.model, batch)
            for row, (_, _, c) in zip(out.tolist(), group):
                scores += row[: len(c)]
        return scores
