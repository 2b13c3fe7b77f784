"""Layerwise distillation of the student under a DeepSpeed engine.

The loop reads top to bottom: ``setup`` (engine, optimizer, schedule, resume),
then ``train`` (teacher forward without grad, student forward, loss, backward,
step, log, validate, checkpoint), then ``save_student``.

Exact resume: the batch of every micro-step is a pure function of
``(train.seed, epoch, position)``, so a resumed run needs only the step number
(saved in the DeepSpeed checkpoint's client state with the RNG states) to see
the same data in the same order as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ConfigError, RunConfig
from .distributed import all_reduce_sum, barrier, get_logger, is_main, rank, world_size
from .tracking import NullTracker

log = get_logger()


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


class StudentWithAligner(nn.Module):
    """The student plus the trainable parts of the loss (width projections), one engine for both."""

    def __init__(self, student: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.loss = loss
        self.config = student.config  # DeepSpeed and HF helpers look for .config

    def forward(self, **kwargs: Any) -> Any:
        return self.student(**kwargs)


def warmup_cosine(warmup_steps: int, max_steps: int, min_ratio: float = 0.1):
    """LR multiplier: linear warmup to 1, then cosine decay to min_ratio at max_steps."""

    def fn(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def resolve_ds_config(path: str | Path, cfg: RunConfig, for_training: bool = True) -> dict[str, Any]:
    """Read the DeepSpeed JSON and fill what the schema owns (batch sizes, clipping, precision).

    A value the JSON sets explicitly and that disagrees with the schema is an error:
    two sources of truth for the batch size is how runs silently differ.
    """
    from .precision import use_bf16

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ds_config: {path} does not exist")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"ds_config: {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except OSError as e:
        raise ConfigError(f"ds_config: cannot read {path} ({e.strerror})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"ds_config: {path} must hold a JSON object")
    t = cfg.train
    owned = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size(),
        "gradient_clipping": t.grad_clip,
    }
    for key, value in owned.items():
        given = ds.get(key, "auto")
        if given not in ("auto", value):
            raise ConfigError(
                f"ds_config: {path} sets {key}={given} but the run config gives {value}; "
                f'set it to "auto" in the JSON or change train.* (train_batch_size = micro_batch_size * grad_accum * world_size)'
            )
        ds[key] = value
    bf16 = use_bf16(t.precision)
    ds.setdefault("bf16", {})
    if ds["bf16"].get("enabled", "auto") == "auto":
        ds["bf16"]["enabled"] = bf16
    if ds.get("fp16", {}).get("enabled") is True:
        raise ConfigError(f"ds_config: {path} enables fp16; this package trains in bf16 (CUDA) or fp32")
    stage = ds.get("zero_optimization", {}).get("stage")
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"ds_config: {path} zero_optimization.stage must be 0-3; got {stage!r}")
    opt = ds.get("optimizer")
    if isinstance(opt, dict):  # e.g. DeepSpeedCPUAdam for ZeRO-Offload: fill its "auto" values too
        params = opt.setdefault("params", {})
        for key, value in (("lr", t.lr), ("weight_decay", t.weight_decay)):
            if params.get(key, "auto") == "auto":
                params[key] = value
    ds.setdefault("steps_per_print", 10**9)
    # We build a torch optimizer ourselves unless the JSON names one.
    ds.setdefault("zero_allow_untested_optimizer", True)
    if not for_training:
        for key in ("optimizer", "scheduler"):
            ds.pop(key, None)
    return ds


@dataclass
class TrainState:
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


class DistillationRunner:
    """Owns the student engine and the loop. Build with :meth:`setup`, run :meth:`train`."""

    def __init__(
        self,
        cfg: RunConfig,
        student: nn.Module,
        teacher: nn.Module,
        loss_fn: nn.Module,
        train_data: Sequence[dict[str, Any]],
        pad_token_id: int,
        ds_config: dict[str, Any],
        valid_data: Sequence[dict[str, Any]] | None = None,
        tracker: Any = None,
        tokenizer: Any = None,
    ) -> None:
        self.cfg = cfg
        self.teacher = teacher
        self.loss_fn = loss_fn
        self.train_data = train_data
        self.valid_data = valid_data
        self.pad_token_id = pad_token_id
        self.ds_config = ds_config
        self.tracker = tracker or NullTracker()
        self.tokenizer = tokenizer
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.state = TrainState()
        self.module = StudentWithAligner(student, loss_fn)
        self.engine = None

    # ---------------------------------------------------------------- setup
    def setup(self) -> DistillationRunner:
        import deepspeed

        t = self.cfg.train
        params = [p for p in self.module.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the student has no trainable parameters")
        optimizer = None
        scheduler = None
        if "optimizer" not in self.ds_config:
            optimizer = torch.optim.AdamW(
                params, lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.999), fused=torch.cuda.is_available()
            )
        if "scheduler" not in self.ds_config:
            schedule = warmup_cosine(t.warmup_steps, t.max_steps)
            if optimizer is not None:
                scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
            else:  # DeepSpeed builds the optimizer from the JSON; it calls this with it
                scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule)  # noqa: E731
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.module,
            model_parameters=params if optimizer is None else None,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.ds_config,
        )
        if t.resume:
            self._resume()
        return self

    def _resume(self) -> None:
        latest = self.ckpt_dir / "latest"
        if not latest.exists():
            log.warning("train.resume=true but no checkpoint in %s: starting at step 0", self.ckpt_dir)
            return
        path, client = self.engine.load_checkpoint(str(self.ckpt_dir))
        if path is None:
            raise RuntimeError(f"could not load the checkpoint named in {latest}")
        self.state.step = int(client["step"])
        self.state.history = list(client.get("history", []))
        states = client.get("rng_cpu") or []
        if len(states) == world_size():
            torch.set_rng_state(states[rank()])
        else:  # data order is still exact (a function of the step); only RNG-driven ops may differ
            log.warning(
                "checkpoint was written by %d ranks, this run has %d: RNG state not restored", len(states), world_size()
            )
        log.info("resumed from %s at step %d", path, self.state.step)

    # ---------------------------------------------------------------- data
    def _indices_for_step(self, step: int, micro: int) -> list[int]:
        """Dataset indices of one micro-batch on this rank: a pure function of the step."""
        t = self.cfg.train
        per_rank = len(self.train_data) // world_size()
        per_micro = t.micro_batch_size
        micro_per_epoch = per_rank // per_micro
        if micro_per_epoch == 0:
            raise ConfigError(
                f"{len(self.train_data)} training examples cannot fill one micro-batch of {per_micro} on {world_size()} ranks"
            )
        global_micro = step * t.grad_accum + micro
        epoch, pos = divmod(global_micro, micro_per_epoch)
        gen = torch.Generator().manual_seed(t.seed * 1000003 + epoch)
        order = torch.randperm(len(self.train_data), generator=gen).tolist()
        mine = order[rank() * per_rank : (rank() + 1) * per_rank]  # same permutation on every rank
        return mine[pos * per_micro : (pos + 1) * per_micro]

    def _batch(self, indices: list[int], data: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        from .data import collate

        batch = collate([data[i] for i in indices], self.pad_token_id)
        dev = self.engine.device
        return {k: v.to(dev) for k, v in batch.items()}

    # ---------------------------------------------------------------- loop
    def _forward_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.no_grad():
            teacher_out = self.teacher(**inputs, output_hidden_states=True)
        student_out = self.engine(**inputs, output_hidden_states=True)
        return self.loss_fn(student_out, teacher_out, batch)

    def train(self) -> TrainState:
        from tqdm.auto import tqdm

        t = self.cfg.train
        assert self.engine is not None, "call setup() first"
        self.engine.train()
        bar = tqdm(
            total=t.max_steps, initial=self.state.step, desc="distill", disable=not is_main(), dynamic_ncols=True
        )
        start = time.perf_counter()
        end = min(t.max_steps, t.stop_at_step) if t.stop_at_step else t.max_steps
        while self.state.step < end:
            step = self.state.step
            sums: dict[str, float] = {}
            for micro in range(t.grad_accum):
                batch = self._batch(self._indices_for_step(step, micro), self.train_data)
                loss, parts = self._forward_loss(batch)
                self._check_finite(step, loss, parts)
                self.engine.backward(loss)
                self.engine.step()
                parts = {"total": loss, **parts}
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) / t.grad_accum
            metrics = self._mean_over_ranks(sums)
            metrics["lr"] = float(self.engine.get_lr()[0])
            self.state.step += 1
            metrics["step"] = self.state.step
            self.state.history.append(metrics)
            if self.state.step % t.log_every == 0 or self.state.step == t.max_steps:
                self.tracker.log_metrics(
                    {f"train/{k}": v for k, v in metrics.items() if k != "step"}, step=self.state.step
                )
            bar.set_postfix(loss=f"{metrics.get('total', float('nan')):.4f}")
            bar.update(1)
            if t.eval_every and self.state.step % t.eval_every == 0 and self.valid_data is not None:
                self.validate()
            if t.save_every and self.state.step % t.save_every == 0 and self.state.step < t.max_steps:
                self.save_checkpoint()
        bar.close()
        elapsed = time.perf_counter() - start
        log.info("distillation: at step %d of %d after %.1f s", self.state.step, t.max_steps, elapsed)
        if self.valid_data is not None:
            self.validate()
        self.save_checkpoint()
        return self.state

    def _check_finite(self, step: int, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        # Every rank must agree to stop, or the healthy ones hang in the next collective.
        bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], dtype=torch.float64)
        all_reduce_sum(bad)
        if bad.item() > 0:
            shown = ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items())
            raise TrainingDivergedError(
                f"non-finite loss at step {step + 1} ({shown}); last good checkpoint kept in {self.ckpt_dir}"
            )

    def _mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        keys = sorted(values)
        vec = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        all_reduce_sum(vec)
        return {k: float(v) / world_size() for k, v in zip(keys, vec.tolist())}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean loss components on this rank's share of the validation examples, over all ranks."""
        data = self.valid_data
        n = len(data) // world_size()  # equal counts: ZeRO-3 forwards are collective
        mb = self.cfg.train.micro_batch_size
        mine = list(range(rank() * n, (rank() + 1) * n))
        sums: dict[str, float] = {}
        batches = 0
        self.engine.eval()
        for i in range(0, len(mine) - mb + 1, mb):  # full batches only: same count on every rank
            idx = mine[i : i + mb]
            loss, parts = self._forward_loss(self._batch(idx, data))
            for k, v in {"total": loss, **parts}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            batches += 1
        self.engine.train()
        if batches == 0:
            return {}
        metrics = self._mean_over_ranks({k: v / batches for k, v in sums.items()})
        self.tracker.log_metrics({f"valid/{k}": v for k, v in metrics.items()}, step=self.state.step)
        log.info("step %d validation: %s", self.state.step, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return metrics

    # ---------------------------------------------------------------- saving
    def save_checkpoint(self) -> Path:
        """DeepSpeed checkpoint + consolidated HF student, both crash-safe.

        DeepSpeed writes the ``latest`` pointer only after every shard of the new
        tag is on disk, so an interrupted save leaves the previous tag loadable;
        the HF folder is written beside the old one and swapped in by rename.
        """
        tag = f"step{self.state.step}"
        rng = [None] * world_size()
        rng[rank()] = torch.get_rng_state()
        if world_size() > 1:
            import torch.distributed as dist

            dist.all_gather_object(rng, torch.get_rng_state())
        client = {"step": self.state.step, "history": self.state.history, "rng_cpu": rng}
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=client)
        self.save_student(self.out / "student")
        self._prune_checkpoints(keep=2)
        return self.ckpt_dir / tag

    def _prune_checkpoints(self, keep: int) -> None:
        if not is_main():
            return
        latest = (self.ckpt_dir / "latest").read_text().strip() if (self.ckpt_dir / "latest").exists() else ""
        tags = sorted(
            (p for p in self.ckpt_dir.glob("step*") if p.is_dir()), key=lambda p: int(p.name[4:]), reverse=True
        )
        for p in tags[keep:]:
            if p.name != latest:
                shutil.rmtree(p, ignore_errors=True)

    def save_student(self, folder: Path) -> Path:
        """Write the student as a standard HF model folder (gathered from ZeRO-3 shards)."""
        engine = self.engine
        if engine.zero_optimization_partition_weights():
            state = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank calls it
        else:
            state = engine.module.state_dict()
        if is_main():
            prefix = "student."
            student_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            tmp = folder.with_name(folder.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            student = self.module.student
            student.save_pretrained(tmp, state_dict=student_state, safe_serialization=True)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            old = folder.with_name(folder.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            if folder.exists():
                os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        barrier()
        return folder


class DistillationTrainer:
    """The original project's entry point, on the same DeepSpeed loop as the launchers.

    ``DistillationTrainer(teacher_model=..., student_model=..., fisher_weights=...).train(loader, num_epochs=10)``

    ``fisher_weights`` are either one weight per student layer, or per-teacher-layer
    Fisher scores (then the mapped layers' scores are normalised). The student's layer
    map comes from ``student.config.layerwise_dist`` (set by ``build_student``) or
    ``layer_map=``. ``train_loader`` yields collated batches (``layerwise_dist.data.collate``).
    """

    def __init__(
        self,
        teacher_model: nn.Module,
        student_model: nn.Module,
        fisher_weights: Sequence[float] | None = None,
        config: RunConfig | None = None,
        layer_map: Sequence[int] | None = None,
        ds_config: str | Path | None = None,
    ) -> None:
        from .config import load_config
        from .losses import DistillationLoss, expose_layer_outputs
        from .models.student import load_layer_map
        from .weighting import layer_weights

        self.cfg = config or load_config("default", ["tracking.enabled=false"])
        self.layer_map = list(layer_map) if layer_map is not None else load_layer_map(student_model)
        n_teacher = teacher_model.config.num_hidden_layers
        if fisher_weights is None:
            weights = layer_weights("uniform", self.layer_map)
        elif len(fisher_weights) == len(self.layer_map) and len(fisher_weights) != n_teacher:
            weights = [w / sum(fisher_weights) for w in fisher_weights]
        else:
            weights = layer_weights(
                "fisher", self.layer_map, list(fisher_weights), temperature=self.cfg.distill.weight_temperature
            )
        expose_layer_outputs(student_model)
        expose_layer_outputs(teacher_model)
        loss_fn = DistillationLoss(
            self.cfg.distill,
            weights,
            self.layer_map,
            student_model.config.hidden_size,
            teacher_model.config.hidden_size,
        )
        from .distributed import init_distributed

        init_distributed()
        path = ds_config or self.cfg.ds_config
        if not Path(path).is_file():  # an installed package run outside the repo: ship-independent default
            path = Path(__file__).resolve().parents[1] / "ds_configs" / "zero3.json"
        self.runner = DistillationRunner(
            self.cfg,
            student_model,
            teacher_model,
            loss_fn,
            [],
            pad_token_id=0,
            ds_config=resolve_ds_config(path, self.cfg),
        ).setup()

    def train(self, train_loader: Any, num_epochs: int = 1) -> list[dict[str, float]]:
        """One optimizer step per batch; returns the per-step loss components."""
        runner = self.runner
        history = []
        for _ in range(num_epochs):
            for batch in train_loader:
                batch = {k: v.to(runner.engine.device) for k, v in batch.items()}
                loss, parts = runner._forward_loss(batch)
                runner._check_finite(len(history), loss, parts)
                runner.engine.backward(loss)
                runner.engine.step()
                history.append({"total": float(loss.detach()), **{k: float(v) for k, v in parts.items()}})
        return history

    @property
    def student(self) -> nn.Module:
        return self.runner.module.student
