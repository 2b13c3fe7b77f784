"""Serving entry point of the original project: top-k items for a known user.

::

    rec = BaseRecommender(model_name="results/run/student")      # or embedded:smollm2, tiny, a .gguf
    rec.recommend(user_id="AE22...", category="All_Beauty", top_k=3)
    # [{"item_id": "B07...", "title": "...", "score": -0.41}, ...]

How items are ranked: the user's history is their most recent ``history_len``
items (train + valid + test: everything the recommender knows). Every item the
user never touched is a candidate. Candidates are cut into chunks of at most
``num_candidates`` (one letter label each, at most 26), each chunk rendered by
the same prompt builder as training and evaluation
(:func:`layerwise_dist.data.render_prompt`), and scored as in evaluation: the
log-probability of its label token at the answer position. A top-k over all
chunks gives the result.

Approximation: scores from different chunks are compared directly, although
each was computed in the context of a different candidate list (and a
candidate's letter and position in its list affect its score). Within one chunk
the ranking is exactly the evaluated one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from layerwise_dist.evaluation import forward_scores
from layerwise_dist.models.util import model_device

if TYPE_CHECKING:
    from layerwise_dist.data import SplitData

MAX_CANDIDATES = 26


class RecommendError(ValueError):
    """A recommendation request that cannot be served (unknown user or category, bad top_k)."""


class BaseRecommender:
    """Top-k recommendations from a (distilled) LLM ranker.

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
        quantization: how to load ``model_name``: none, nf4 or int8.
        batch_size: prompts per forward.
    """

    def __init__(
        self,
        model_name: str = "",
        data: SplitData | Mapping[str, SplitData] | None = None,
        *,
        model: Any = None,
        tokenizer: Any = None,
        data_config: Any = None,
        quantization: str = "none",
        batch_size: int = 4,
    ) -> None:
        from layerwise_dist.config import DataConfig

        self.data_config = data_config or DataConfig()
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

    def _split(self, category: str) -> SplitData:
        data = self.data
        if category not in data:
            raise RecommendError(f"unknown category {category!r}: this recommender holds {', '.join(sorted(data))}")
        return data[category]

    def recommend(self, user_id: str, category: str = "All_Beauty", top_k: int = 3) -> list[dict[str, Any]]:
        """The ``top_k`` untouched items with the highest score, best first.

        Each entry is ``{"item_id", "title", "score"}`` with ``score`` the label
        log-probability (see the module docstring for the cross-chunk approximation).
        Fewer than ``top_k`` entries come back when the user has fewer untouched items.
        """
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise RecommendError(f"top_k must be a positive integer; got {top_k!r}")
        scored = self.score_items(user_id, category)
        # Stable sort: equal scores keep the catalogue order.
        ranked = sorted(range(len(scored)), key=lambda i: -scored[i][1])[:top_k]
        titles = self._split(category).titles
        return [{"item_id": scored[i][0], "title": titles.get(scored[i][0], ""), "score": scored[i][1]} for i in ranked]

    def candidates(self, user_id: str, category: str = "All_Beauty") -> tuple[list[str], list[str]]:
        """(history: the most recent ``history_len`` items, candidates: every untouched item in catalogue order)."""
        split = self._split(category)
        if user_id not in split.train:
            raise RecommendError(f"unknown user {user_id!r} in category {category!r} ({len(split.train)} known users)")
        sequence = split.sequence(user_id)
        touched = set(sequence)
        return sequence[-self.data_config.history_len :], [i for i in split.all_items if i not in touched]

    def score_items(self, user_id: str, category: str = "All_Beauty") -> list[tuple[str, float]]:
        """(item_id, score) of every untouched item, in catalogue order."""
        from layerwise_dist.data import RankExample, collate, encode, label_token_ids, render_prompt
        from layerwise_dist.data.prompts import TitleCutter

        if self.data_config.formulation != "listwise":
            raise RecommendError(
                f"recommend serves the listwise formulation only; this model uses {self.data_config.formulation!r}"
            )
        split = self._split(category)
        history, pool = self.candidates(user_id, category)
        if not pool:
            return []
        size = min(self.data_config.num_candidates, MAX_CANDIDATES)
        cut = TitleCutter(self.tokenizer, self.data_config.title_max_tokens)
        letters = label_token_ids(self.tokenizer, min(size, len(pool)))
        features = []
        chunks = [pool[i : i + size] for i in range(0, len(pool), size)]
        for chunk in chunks:
            example = RankExample(
                user_id=user_id,
                history=history,
                history_titles=[cut(split.titles[i]) for i in history],
                candidates=chunk,
                candidate_titles=[cut(split.titles[i]) for i in chunk],
                target_index=0,  # unknown at serving time; only the prompt is scored
                split="serve",
                category=split.category,
            )
            prompt, answer = render_prompt(example, self.tokenizer)
            ids, answer_index = encode(prompt, answer, self.tokenizer)
            features.append(
                {
                    "input_ids": ids,
                    "attention_mask": [1] * len(ids),
                    "labels": [-100] * len(ids),
                    "answer_pos": answer_index - 1,
                    "target_index": 0,
                    "candidate_token_ids": letters[: len(chunk)],
                }
            )
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        scores: list[float] = []
        # A batch holds prompts with the same candidate count (only the last chunk can be shorter).
        groups: list[list[dict[str, Any]]] = []
        for f in features:
            if (
                groups
                and len(groups[-1]) < self.batch_size
                and len(groups[-1][0]["candidate_token_ids"]) == len(f["candidate_token_ids"])
            ):
                groups[-1].append(f)
            else:
                groups.append([f])
        for group in groups:
            batch = collate(group, pad)
            with torch.no_grad():
                scores += forward_scores(self.model, batch, self.device).flatten().tolist()
        return list(zip(pool, scores))
