"""Recipe: LoRA / QLoRA adaptation of the teacher under the run's DeepSpeed engine.

``AdaptRecipe(session).setup().train().save()``:

* ``setup``: the base (NF4 under ZeRO-3 for QLoRA, or full precision) with LoRA adapters
  (:mod:`layerwise_dist.adapt`), one DeepSpeed engine whose only trainable parameters are
  the adapters (AdamW, linear warmup + cosine), the training examples with a shuffled
  :class:`~layerwise_dist.data.RankSampler`; with ``train.resume=true`` the newest
  checkpoint in ``<output_dir>/adapt/checkpoints``.
* ``train``: ``adapt.max_steps`` optimizer steps of the causal-LM loss on the labelled
  tokens (pointwise: the target title given the history; listwise: the answer letter);
  pointwise with ``adapt.list_loss_weight > 0``: :class:`~layerwise_dist.losses.PointwiseListLoss`
  (the target title's mean NLL plus that weight times a CE over all candidates' scores) from
  one packed forward per batch.
  ``train.stop_at_step`` and ``train.resume`` apply here as in distillation: the run ends
  after that many steps of the adapt schedule, checkpointed, and a resumed run continues
  at the exact step (batch ``i`` is a function of ``adapt.seed`` and ``i`` only).
* ``save``: ``<output_dir>/adapt/adapter`` (PEFT folder) and ``<output_dir>/adapt/merged``
  (full-precision HF folder with tokenizer), ``<output_dir>/adapt/history.json``,
  ``session.results["adapt"]``. A resumed run whose adaptation had already finished
  reuses them without loading the base.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import Any

import torch

from ..adapt import (
    adapt_run_config,
    attach_lora,
    base_quantization,
    check_adapt_config,
    export_adapted,
    load_base,
    num_trainable,
    supervised_lm_loss,
    trainable_parameters,
)
from ..checkpoint import CheckpointStore, TrainState
from ..config import ConfigError
from ..data.errors import DataError
from ..data.sampler import RankSampler, load_batch
from ..distributed import all_reduce_sum, barrier, destroy_engine, get_logger, is_main, world_size
from ..ds_config import resolve_ds_config
from ..losses import PointwiseListLoss, packed_forward
from .session import RunSession, describe_placement

log = get_logger()

SUMMARY = "summary.json"


class _Bnb4bitCheckpointEngine:
    """The engine as :class:`CheckpointStore` sees it, loading the module state non-strictly.

    bitsandbytes adds its quant-state entries (``weight.absmax``, ``weight.quant_map``, ...)
    to the module state dict DeepSpeed saves, and loading them back into the ``Linear4bit``
    modules strictly fails ("Unexpected key(s)"). The frozen base is reloaded from its
    folder (deterministic quantization) and the adapters come back from the checkpoint's
    optimizer partitions, so nothing is lost.
    """

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("load_module_strict", False)
        return self._engine.load_checkpoint(*args, **kwargs)


class AdaptRecipe:
    """``setup`` (model, engine, data, resume) -> ``train`` -> ``save`` (adapter + merged folders)."""

    def __init__(self, session: RunSession) -> None:
        self.session = session
        self.cfg = session.cfg
        self.folder = session.out / "adapt"
        self.adapter_dir = self.folder / "adapter"
        self.merged_dir = self.folder / "merged"
        self.checkpoints = CheckpointStore(self.folder / "checkpoints", keep=2)
        self.state = TrainState()
        self.engine: Any = None
        self.model: Any = None
        self.finished: dict[str, Any] | None = None
        self.seconds_per_step = 0.0
        self.list_loss: PointwiseListLoss | None = None
        self._parts: dict[str, float] = {}

    # ---------------------------------------------------------------- setup
    def setup(self) -> AdaptRecipe:
        check_adapt_config(self.cfg)
        self.finished = self._setup_finished()
        if self.finished is not None:
            return self
        if self.cfg.adapt.list_loss_weight > 0:  # check_adapt_config: pointwise only
            self.list_loss = PointwiseListLoss(self.cfg.adapt.list_loss_weight, self.cfg.data.pointwise_score)
        self.data, self.sampler = self._setup_data()
        self.ds_config = self._setup_ds_config()
        self.model = self._setup_model()
        self.engine = self._setup_engine()
        if self.cfg.train.resume:
            self.state = self.checkpoints.load(_Bnb4bitCheckpointEngine(self.engine)) or self.state
        return self

    def _setup_finished(self) -> dict[str, Any] | None:
        """A resumed run whose adaptation already finished: its summary (folders are reused)."""
        summary = self.folder / SUMMARY
        if not (self.cfg.train.resume and summary.is_file()):
            return None
        done = json.loads(summary.read_text())
        if done.get("steps") != self.cfg.adapt.max_steps or not (self.adapter_dir / "adapter_config.json").is_file():
            return None
        if not (self.merged_dir / "config.json").is_file():
            # A fresh checkout of committed results: the adapter is there, the merged folder (not committed) is
            # rebuilt from it and the base, the same weights without the adaptation's training.
            from ..adapt import merge_saved_adapter

            log.info(
                "resume: adaptation finished (%d steps), merged folder missing: merging %s again",
                done["steps"],
                self.adapter_dir,
            )
            info = {k: done[k] for k in ("base", "base_quantization", "steps", "lora") if k in done}
            merge_saved_adapter(
                self.cfg, self.adapter_dir, self.merged_dir, tokenizer=self.session.tokenizer, info=info
            )
        log.info("resume: adaptation already finished (%d steps); using %s", done["steps"], self.merged_dir)
        return done

    def _setup_data(self) -> tuple[Any, RankSampler]:
        a = self.cfg.adapt
        data = self.session.examples("train")
        if a.max_train_examples:
            data = data.select(range(min(len(data), a.max_train_examples)))
        if "labels" not in data.column_names:
            raise DataError("adaptation needs examples with labels (the supervised tokens)")
        try:  # equal full batches on every rank: ZeRO-3 forwards are collective
            sampler = RankSampler.for_rank(len(data), a.micro_batch_size, shuffle=True, seed=a.seed)
        except DataError as e:
            raise ConfigError(f"adapt: training data: {e} (lower adapt.micro_batch_size)") from None
        return data, sampler

    def _setup_ds_config(self) -> dict[str, Any]:
        ds = resolve_ds_config(self.cfg.ds_config, adapt_run_config(self.cfg), "train")
        if is_main():
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / "ds_config.resolved.json").write_text(json.dumps(ds, indent=2))
        return ds

    def _setup_model(self) -> Any:
        t0 = time.perf_counter()
        base = load_base(self.cfg, self.ds_config)
        self.base_load_s = time.perf_counter() - t0
        model = attach_lora(base, self.cfg.adapt)
        model.config.use_cache = False
        if self.cfg.adapt.gradient_checkpointing:  # activations of one layer at a time (non-reentrant: ZeRO-3 safe)
            model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    def _setup_engine(self) -> Any:
        import deepspeed

        from ..trainer import adamw, warmup_cosine

        a, t = self.cfg.adapt, self.cfg.train
        params = trainable_parameters(self.model)
        optimizer = scheduler = None
        if "optimizer" not in self.ds_config:
            optimizer = adamw(params, lr=a.lr, weight_decay=t.weight_decay)
        if "scheduler" not in self.ds_config:
            schedule = warmup_cosine(a.warmup_steps, a.max_steps)
            if optimizer is not None:
                scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
            else:  # DeepSpeed builds the optimizer from the JSON and calls this with it
                scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule)  # noqa: E731
        engine, *_ = deepspeed.initialize(
            model=self.model,
            model_parameters=params if optimizer is None else None,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.ds_config,
        )
        self.placement = describe_placement(self.model.get_base_model())
        self.trainable_params = num_trainable(self.model)
        log.info(
            "adapt: LoRA r=%d on %s, %d trainable parameters, base %s: %s",
            a.lora_r,
            list(a.target_modules),
            self.trainable_params,
            base_quantization(self.cfg),
            self.placement,
        )
        return engine

    # ---------------------------------------------------------------- loop
    def _forward_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.list_loss is None:  # the LM head only where a token is supervised
            return supervised_lm_loss(self.engine, batch)
        # Pointwise with a list-level loss: one packed forward scores every candidate (shared prefix).
        packed = batch["packed"]
        if self.cfg.data.pointwise_score != "pmi":
            packed = packed.history_only()
        out = packed_forward(self.engine, packed, self.model)
        loss, parts = self.list_loss(out.logits, packed, batch["target_index"])
        for name, value in parts.items():
            self._parts[name] = self._parts.get(name, 0.0) + float(value) / self.cfg.adapt.grad_accum
        return loss

    def train(self) -> AdaptRecipe:
        from tqdm.auto import tqdm

        if self.finished is not None:
            return self
        a, t = self.cfg.adapt, self.cfg.train
        end = min(a.max_steps, t.stop_at_step) if t.stop_at_step else a.max_steps
        self.engine.train()
        bar = tqdm(total=a.max_steps, initial=self.state.step, desc="adapt", disable=not is_main(), dynamic_ncols=True)
        start, first_step = time.perf_counter(), self.state.step
        while self.state.step < end:
            step = self.state.step
            total = 0.0
            for micro in range(a.grad_accum):
                indices = self.sampler.batch(step * a.grad_accum + micro)
                batch = load_batch(self.data, indices, self.session.pad_token_id, self.engine.device)
                loss = self._forward_loss(batch)
                self._check_finite(step, loss)
                self.engine.backward(loss)
                self.engine.step()
                total += float(loss.detach()) / a.grad_accum
            loss_mean = self._mean_over_ranks(total)
            self.state.step += 1
            metrics = {"loss": loss_mean, "lr": float(self.engine.get_lr()[0])}
            metrics.update({f"loss_{k}": self._mean_over_ranks(v) for k, v in self._parts.items()})
            self._parts = {}
            self.state.history.append({"step": self.state.step, **metrics})
            self.session.tracker.log_metrics({f"adapt/{k}": v for k, v in metrics.items()}, step=self.state.step)
            bar.set_postfix(loss=f"{loss_mean:.4f}")
            bar.update(1)
            if a.save_every and self.state.step % a.save_every == 0 and self.state.step < end:
                self.checkpoints.save(self.engine, self.state)
        bar.close()
        steps = self.state.step - first_step
        self.seconds_per_step = (time.perf_counter() - start) / steps if steps else 0.0
        self.session.timings["adapt_s"] = self.session.timings.get("adapt_s", 0.0) + time.perf_counter() - start
        if steps:
            self.checkpoints.save(self.engine, self.state)
        log.info("adaptation: at step %d of %d (%.2f s/step)", self.state.step, a.max_steps, self.seconds_per_step)
        return self

    @property
    def complete(self) -> bool:
        """All ``adapt.max_steps`` steps are done (False after an early ``train.stop_at_step``)."""
        return self.finished is not None or self.state.step >= self.cfg.adapt.max_steps

    def _check_finite(self, step: int, loss: torch.Tensor) -> None:
        from ..trainer import TrainingDivergedError

        # Every rank must agree to stop, or the healthy ones hang in the next collective.
        bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], dtype=torch.float64)
        all_reduce_sum(bad)
        if bad.item() > 0:
            raise TrainingDivergedError(
                f"adapt: non-finite loss at step {step + 1} ({float(loss.detach()):.4g}); "
                f"lower adapt.lr; last good checkpoint kept in {self.checkpoints.folder}"
            )

    def _mean_over_ranks(self, value: float) -> float:
        vec = torch.tensor([value], dtype=torch.float64)
        all_reduce_sum(vec)
        return float(vec.item()) / world_size()

    # ---------------------------------------------------------------- saving
    def save(self) -> Path:
        """Adapter and merged folders (when adaptation is complete), history, results. Returns the merged folder."""
        session = self.session
        if self.finished is not None:
            summary = self.finished
        else:
            summary = self._export() if self.complete else self._summary()
            if is_main():
                (self.folder / "history.json").write_text(json.dumps(self.state.history, indent=2))
                session.tracker.log_artifact(self.folder / "history.json")
                if self.complete:
                    (self.folder / SUMMARY).write_text(json.dumps(summary, indent=2))
            barrier()
        session.results["adapt"] = summary
        if self.complete:
            session.tracker.log_params({"resolved.adapted_teacher": summary["merged"]})
        return self.merged_dir

    def _summary(self) -> dict[str, Any]:
        history = self.state.history
        return {  # the folders exist once every step ran (an early stop leaves only the checkpoint)
            "adapter": str(self.adapter_dir) if self.complete else None,
            "merged": str(self.merged_dir) if self.complete else None,
            "base": self.cfg.teacher.model,
            "base_quantization": base_quantization(self.cfg),
            "steps": self.state.step,
            "max_steps": self.cfg.adapt.max_steps,
            "complete": self.complete,
            "loss_first": history[0]["loss"] if history else None,
            "loss_last": history[-1]["loss"] if history else None,
            "trainable_params": self.trainable_params,
            "seconds_per_step": self.seconds_per_step,
            "base_load_s": self.base_load_s,
            "placement": self.placement,
            "lora": {
                "r": self.cfg.adapt.lora_r,
                "alpha": self.cfg.adapt.lora_alpha,
                "dropout": self.cfg.adapt.lora_dropout,
                "target_modules": list(self.cfg.adapt.target_modules),
            },
        }

    def _export(self) -> dict[str, Any]:
        from ..models.teacher import resolve_model_dir

        summary = self._summary()
        t0 = time.perf_counter()
        export_adapted(
            self.model,
            resolve_model_dir(self.cfg.teacher),
            self.adapter_dir,
            self.merged_dir,
            tokenizer=self.session.tokenizer,
            info={k: summary[k] for k in ("base", "base_quantization", "steps", "lora")},
        )
        summary["export_s"] = time.perf_counter() - t0
        return summary

    def release(self) -> None:
        """Free the adaptation engine (and the base it holds) before the next stage loads its teacher."""
        if self.engine is not None:
            destroy_engine(self.engine)
        self.engine = self.model = None
        gc.collect()
