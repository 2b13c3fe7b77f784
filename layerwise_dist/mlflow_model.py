"""The distilled student as an MLflow model: a pyfunc wrapping :class:`~layerwise_dist.BaseRecommender`.

:func:`save_student_model` writes an MLflow model folder (``MLmodel``, the student's Hugging Face folder
as the artifact ``student``, the data settings it serves from); the run logs it as its ``model``
artifact, so ``mlflow.pyfunc.load_model("runs:/<run_id>/model")`` gives a recommender:

    model.predict(pd.DataFrame({"user_id": ["AFSK..."], "top_k": [3]}))
    # one row per recommendation: user_id, rank, item_id, title, score, source

Input columns: ``user_id`` (str), optional ``category`` (default: the data's), ``top_k`` (default 10) and
``history`` (a list of item ids, for a user the data does not know). The model needs this package
installed where it is loaded (``pip_requirements`` names it), and the data it serves from: the embedded
sample, or the review/metadata files of ``data.reviews``/``data.meta`` at the same paths.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

OUTPUT_COLUMNS = ["user_id", "rank", "item_id", "title", "score", "source"]


class StudentRecommender(mlflow.pyfunc.PythonModel):
    """Top-k recommendations of a saved student (the model's ``student`` artifact) for each input row."""

    def load_context(self, context: Any) -> None:
        from layerwise_dist.config import from_dict
        from layerwise_dist.recommender import BaseRecommender

        config = dict(context.model_config or {})
        data_cfg = from_dict({"data": config.get("data", {})}).data
        self.default_top_k = int(config.get("top_k", 10))
        self.recommender = BaseRecommender(model_name=context.artifacts["student"], data_config=data_cfg)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "user_id" not in frame.columns:
            raise ValueError(f"input needs a user_id column; got {list(frame.columns)}")
        category_default = self.recommender.data_config.category
        rows = []
        for record in frame.to_dict("records"):
            top_k = record.get("top_k")
            category = record.get("category")
            history = record.get("history")
            recs = self.recommender.recommend(
                str(record["user_id"]),
                category=category if isinstance(category, str) and category else category_default,
                top_k=int(top_k) if top_k is not None and not pd.isna(top_k) else self.default_top_k,
                history=list(history) if history is not None and not isinstance(history, float) else None,
            )
            for rank, rec in enumerate(recs, start=1):
                rows.append({"user_id": str(record["user_id"]), "rank": rank, **rec})
        return pd.DataFrame(rows, columns=OUTPUT_COLUMNS)


def save_student_model(student_dir: str | Path, path: str | Path, data: dict[str, Any], top_k: int = 10) -> Path:
    """Write the MLflow model folder of a saved student at ``path`` (replaced when present).

    ``data``: the run's ``data`` config section (the recommender serves from that data with the
    student's recorded prompt settings).

    Raises:
        FileNotFoundError: ``student_dir`` holds no Hugging Face model (no ``config.json``).
    """
    from mlflow.types.schema import Array, ColSpec, Schema

    student_dir, path = Path(student_dir).resolve(), Path(path)
    if not (student_dir / "config.json").is_file():
        raise FileNotFoundError(f"{student_dir} holds no saved student (no config.json)")
    if path.exists():
        shutil.rmtree(path)
    inputs = Schema(
        [
            ColSpec("string", "user_id"),
            ColSpec("string", "category", required=False),
            ColSpec("long", "top_k", required=False),
            ColSpec(Array("string"), "history", required=False),
        ]
    )
    outputs = Schema(
        [
            ColSpec("string", "user_id"),
            ColSpec("long", "rank"),
            ColSpec("string", "item_id"),
            ColSpec("string", "title"),
            ColSpec("double", "score"),
            ColSpec("string", "source"),
        ]
    )
    with warnings.catch_warnings():  # advice about input examples and cloudpickle: the class is imported by name
        warnings.simplefilter("ignore", UserWarning)
        logger = logging.getLogger("mlflow.pyfunc")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            _save(path, student_dir, data, top_k, inputs, outputs)
        finally:
            logger.setLevel(level)
    return path


def _save(path: Path, student_dir: Path, data: dict[str, Any], top_k: int, inputs: Any, outputs: Any) -> None:
    from mlflow.models.signature import ModelSignature

    import layerwise_dist

    mlflow.pyfunc.save_model(
        path=str(path),
        python_model=StudentRecommender(),
        artifacts={"student": str(student_dir)},
        model_config={"data": data, "top_k": top_k},
        signature=ModelSignature(inputs=inputs, outputs=outputs),
        # Named, not inferred: inference loads the model in a subprocess (slow, and needs nothing more).
        pip_requirements=[f"layerwise-dist=={layerwise_dist.__version__}", "mlflow", "torch", "transformers"],
    )
