"""Data pipeline: raw reviews -> leave-one-out split -> ranking prompts -> tokens.

::

    splits = load_splits(cfg.data)                       # SplitData (train/valid/test/titles)
    examples = build_examples(splits, "train", cfg.data, tokenizer)
    ds = tokenize_examples(examples, tokenizer, cfg.data)   # cached datasets.Dataset
    for indices in RankSampler.for_rank(len(ds), batch_size=4):   # this rank's batches
        batch = load_batch(ds, indices, tokenizer.pad_token_id)
"""

from .candidates import examples_from_candidates, read_candidates
from .errors import BadRows, DataError
from .examples import NegativeSampler, build_examples, split_targets, stable_seed
from .prepare import add_prepare_arguments, prepare, run_prepare
from .prompts import LABELS, RankExample, encode, label_token_ids, pointwise_phrases, render_pointwise, render_prompt
from .readers import category_from_filename, read_reviews, read_titles
from .sampler import RankSampler, length_sorted, load_batch, seeded_sample
from .sources import (
    Amazon2023Source,
    BenchmarkCSVSource,
    InteractionSource,
    LLMRankSource,
    load_splits,
    splits_from_source,
)
from .splits import InteractionTable, SplitData, build_splits
from .tokenize import IGNORE_INDEX, collate, tokenize_examples

__all__ = [
    "LABELS",
    "IGNORE_INDEX",
    "Amazon2023Source",
    "BadRows",
    "BenchmarkCSVSource",
    "DataError",
    "InteractionSource",
    "InteractionTable",
    "LLMRankSource",
    "NegativeSampler",
    "RankExample",
    "RankSampler",
    "SplitData",
    "add_prepare_arguments",
    "build_examples",
    "build_splits",
    "category_from_filename",
    "collate",
    "encode",
    "examples_from_candidates",
    "label_token_ids",
    "length_sorted",
    "load_batch",
    "load_splits",
    "pointwise_phrases",
    "prepare",
    "read_candidates",
    "read_reviews",
    "read_titles",
    "render_pointwise",
    "render_prompt",
    "run_prepare",
    "seeded_sample",
    "split_targets",
    "splits_from_source",
    "stable_seed",
    "tokenize_examples",
]
