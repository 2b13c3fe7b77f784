"""The distillation loop: the student under a DeepSpeed engine, the frozen teacher beside it.

The loop reads top to bottom: ``setup`` (engine, optimizer, schedule, resume),
then ``train`` (teacher forward without grad, student forward, loss, backward,
step, log, validate, checkpoint). Checkpoints live in
:class:`layerwise_dist.checkpoint.CheckpointStore`, the Hugging Face export in
:func:`layerwise_dist.export.export_student`, the data order in
:class:`layerwise_dist.data.RankSampler`.

Exact resume: the batch of every micro-step is a pure function of
``(train.seed, micro-step)``, so a resumed run needs only the step number
(saved in the DeepSpeed checkpoint's client state with the RNG states) to see
the same data in the same order as an uninterrupted run.

Signals: under :func:`stop_signals` (every rank's job runs under it, see
:func:`layerwise_dist.worker.run_job`) SIGTERM/SIGINT inside the loop only note the
request; at the next step boundary the ranks agree on it (one all-reduce: they may see
the signal at different moments, all must stop at the same step), write a checkpoint
when ``train.save_on_signal`` and raise :class:`StoppedBySignal`. Outside the loop the
signal raises it at once.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointStore, TrainState
from .config import ConfigError, RunConfig
from .data.errors import DataError
from .data.sampler import RankSampler, length_sorted, load_batch
from .distributed import all_reduce_sum, get_logger, is_main, world_size
from .export import export_student
from .tracking import NullTracker

log = get_logger()


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


class StoppedBySignal(BaseException):  # noqa: N818 -- like KeyboardInterrupt: `except Exception` must not swallow it
    """SIGTERM/SIGINT stopped the job; ``signum`` says which (the exit code is 128 + signum)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class _StopRequest:
    signum: int | None = None  # the first SIGTERM/SIGINT this process got
    deferring: int = 0  # > 0 inside the training loop: note the signal, stop at the step boundary


_STOP = _StopRequest()

#: ``fn(step, metrics, checkpoint)`` called on every rank after each logged or checkpointed step (see
#: :func:`step_listener`); ``checkpoint`` is the step's complete DeepSpeed tag folder, or None.
StepListener = Callable[[int, dict[str, float], "Path | None"], None]
_STEP_LISTENERS: list[StepListener] = []


@contextlib.contextmanager
def step_listener(fn: StepListener) -> Iterator[None]:
    """Within the block, every distillation loop calls ``fn`` after each step it logs (``train.log_every``)
    or checkpoints, with the step's metrics (as in train_history.json) and its checkpoint folder, last
    after the final checkpoint. Every rank calls it at the same steps, so ``fn`` may be collective
    (Ray Train's ``report`` is: :mod:`layerwise_dist.ray_train`)."""
    _STEP_LISTENERS.append(fn)
    try:
        yield
    finally:
        _STEP_LISTENERS.remove(fn)


def _notify_step(step: int, metrics: dict[str, float], checkpoint: Path | None) -> None:
    for fn in list(_STEP_LISTENERS):
        fn(step, metrics, checkpoint)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _on_stop_signal(signum: int, frame: Any) -> None:
    if _STOP.signum is not None:
        return  # already stopping: a repeat (e.g. the launcher's SIGTERM once a rank exited) changes nothing
    _STOP.signum = signum
    if _STOP.deferring == 0:
        raise StoppedBySignal(f"stopped by {_signal_name(signum)} outside the training loop (nothing to save)", signum)


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """SIGTERM/SIGINT stop this process through :class:`StoppedBySignal` (deferred to a step boundary in the loop)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be installed from the main thread; keep the process's own ones
        return
    previous = {s: signal.signal(s, _on_stop_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    _STOP.signum, _STOP.deferring = None, 0
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _STOP.signum, _STOP.deferring = None, 0


@contextlib.contextmanager
def deferred_stop() -> Iterator[None]:
    """Inside a training loop: SIGTERM/SIGINT are only noted; the loop polls :func:`agreed_stop_signal`."""
    _STOP.deferring += 1
    try:
        yield
    finally:
        _STOP.deferring -= 1


def agreed_stop_signal() -> int:
    """The signal some rank got (0: none), the same on every rank: one all-reduce (max); collective."""
    local = float(_STOP.signum or 0)
    if world_size() == 1:
        return int(local)
    import torch.distributed as dist

    from .distributed import backend, device

    flag = torch.tensor([local], dtype=torch.float64, device=device() if backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


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


def adamw(params: Sequence[torch.Tensor], lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """torch's AdamW, fused into one kernel wherever torch has one for the parameters' devices.

    CUDA, and CPU since torch 2.4: on one core the fused step over a 28M-element ZeRO partition (the
    experiment's 8-layer student on two ranks) takes ~0.03 s against ~0.28 s for the per-op loop
    (``benchmarks/bench_optimizer_step.py``), with the same values to float rounding. Parameters built on the
    CPU and moved to the GPU by DeepSpeed get the GPU's fused kernel."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        supported = set(_get_fused_kernels_supported_devices())
    except ImportError:  # older torch: only CUDA had the fused kernel
        supported = {"cuda"}
    fused = all(p.is_floating_point() and p.device.type in supported for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), fused=fused)


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
        teacher_cache: Any = None,
    ) -> None:
        self.cfg = cfg
        self.teacher = teacher
        self.teacher_cache = teacher_cache  # a TeacherCache: training steps read the teacher's outputs from it
        self.loss_fn = loss_fn
        self.train_data = train_data
        self.valid_data = valid_data
        self.pad_token_id = pad_token_id
        self.ds_config = ds_config
        self.tracker = tracker or NullTracker()
        self.tokenizer = tokenizer
        self.out = Path(cfg.output_dir)
        self.checkpoints = CheckpointStore(self.out / "checkpoints", keep=2)
        self.state = TrainState()
        self.module = StudentWithAligner(student, loss_fn)
        self.engine = None
        self._saved_step: int | None = None  # the step whose DeepSpeed checkpoint this run wrote or loaded
        self._lengths: tuple[int, ...] | None = None  # the training examples' tokens (train.group_by_length)

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
            optimizer = adamw(params, lr=t.lr, weight_decay=t.weight_decay)
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
            loaded = self.checkpoints.load(self.engine)
            if loaded is not None:
                self.state = loaded
                self._saved_step = loaded.step
        return self

    def _sampler(self) -> RankSampler:
        t = self.cfg.train
        if t.group_by_length and self._lengths is None:
            from .data.sampler import example_length

            self._lengths = tuple(example_length(self.train_data[i]) for i in range(len(self.train_data)))
        lengths = self._lengths if t.group_by_length else None
        try:
            return RankSampler.for_rank(
                len(self.train_data), t.micro_batch_size, shuffle=True, seed=t.seed, lengths=lengths
            )
        except DataError as e:
            raise ConfigError(f"training data: {e}") from None

    # ---------------------------------------------------------------- teacher cache
    def _prepared(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch both models run on (pointwise: the packed groups the loss scores)."""
        if "packed" in batch and hasattr(self.loss_fn, "scored_packed"):
            return {**batch, "packed": self.loss_fn.scored_packed(batch["packed"])}
        return batch

    def _train_batches(self) -> list[list[int]]:
        """The example indices of every micro-batch this rank trains on, step 0 to train.max_steps."""
        t, sampler = self.cfg.train, self._sampler()
        return [list(sampler.batch(i)) for i in range(t.max_steps * t.grad_accum)]

    def build_teacher_cache(self) -> dict[str, float]:
        """Teacher outputs of every training example this rank visits that the cache lacks (collective).

        Logs the size of what it is about to write first. A ZeRO-3 teacher's forwards are collective: every
        rank runs as many as the rank with the most work, the extra ones on a batch already cached (not written).
        """
        import torch.distributed as dist

        from .distributed import backend, device
        from .teacher_cache import format_bytes

        cache = self.teacher_cache
        wanted = [i for batch in self._train_batches() for i in batch]
        missing = cache.missing(wanted)
        size = self.cfg.train.micro_batch_size
        groups = [missing[i : i + size] for i in range(0, len(missing), size)]
        batches = [
            self._prepared(load_batch(self.train_data, g, self.pad_token_id, self.engine.device)) for g in groups
        ]
        hidden = getattr(self.teacher, "module", self.teacher).config.hidden_size
        vocab = getattr(self.teacher, "module", self.teacher).config.vocab_size
        estimate = sum(cache.estimate_bytes(b, hidden, vocab) for b in batches)
        rounds = len(batches)
        if dist.is_available() and dist.is_initialized():
            count = torch.tensor([rounds], dtype=torch.long, device=device() if backend() == "nccl" else "cpu")
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            rounds = int(count.item())
        log.info(
            "teacher cache %s: %d of this rank's %d training examples to compute, ~%s to write "
            "(hidden states of teacher layers %s and %s KD targets, in %s)",
            cache.folder,
            len(missing),
            len(set(wanted)),
            format_bytes(estimate),
            cache.layers,
            f"top-{cache.settings['topk']}" if cache.settings["topk"] else "full-vocabulary",
            cache.settings["dtype"],
        )
        self.teacher.eval()
        stats = cache.build(self.teacher, zip(groups, batches), hidden, total=len(missing))
        filler = batches[-1] if batches else None
        for _ in range(rounds - len(batches)):  # keep the collective teacher forwards in step
            if filler is None:
                filler = self._prepared(
                    load_batch(self.train_data, wanted[:size], self.pad_token_id, self.engine.device)
                )
            cache.teacher_outputs(self.teacher, filler)
        stats["estimate_bytes"] = estimate
        if stats["examples"]:
            log.info(
                "teacher cache: %d examples, %s written in %.1f s",
                stats["examples"],
                format_bytes(stats["bytes"]),
                stats["seconds"],
            )
        return stats

    # ---------------------------------------------------------------- loop
    def _forward_loss(
        self, batch: dict[str, Any], indices: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Teacher forward without grad, student forward through the engine, then the loss.

        A pointwise batch (with a ``packed`` entry) runs both models once on the packed candidates
        (:func:`layerwise_dist.losses.packed_forward`: block mask, LM head at the candidate positions
        only) into a :class:`~layerwise_dist.losses.PointwiseDistillationLoss`; a listwise batch runs
        them on the prompts into a :class:`~layerwise_dist.losses.DistillationLoss`
        (:func:`~layerwise_dist.losses.listwise_forward`: with ``distill.mask=answer`` the LM heads run at the
        answer positions only, the full-vocabulary logits of every other position are never computed). Both forwards go
        through the engines' top modules, so ZeRO-3 gathers and releases parameters as usual.
        """
        from .losses import PointwiseDistillationLoss, forward_for_loss

        pointwise = isinstance(self.loss_fn, PointwiseDistillationLoss)
        if ("packed" in batch) != pointwise:
            raise ConfigError(
                f"a {'pointwise' if 'packed' in batch else 'listwise'} batch reached a "
                f"{type(self.loss_fn).__name__}: build the loss with layerwise_dist.losses.distillation_loss(cfg, ...) "
                "so that it follows data.formulation"
            )
        batch = self._prepared(batch)
        mask = self.cfg.distill.mask  # logits only where CE/KD read them, for both models
        if self.teacher_cache is not None and indices is not None:
            teacher_out = self.teacher_cache.outputs(indices, batch)
        else:
            with torch.no_grad():
                teacher_out = forward_for_loss(self.teacher, batch, mask, getattr(self.teacher, "module", self.teacher))
        student_out = forward_for_loss(self.engine, batch, mask, self.module.student)
        return self.loss_fn(student_out, teacher_out, batch)

    def train(self) -> TrainState:
        from tqdm.auto import tqdm

        t = self.cfg.train
        assert self.engine is not None, "call setup() first"
        sampler = self._sampler()
        self.engine.train()
        bar = tqdm(
            total=t.max_steps, initial=self.state.step, desc="distill", disable=not is_main(), dynamic_ncols=True
        )
        start = time.perf_counter()
        end = min(t.max_steps, t.stop_at_step) if t.stop_at_step else t.max_steps
        with deferred_stop():
            self._loop(sampler, bar, end)
            bar.close()
            elapsed = time.perf_counter() - start
            log.info("distillation: at step %d of %d after %.1f s", self.state.step, t.max_steps, elapsed)
            last = self.state.history[-1] if self.state.history else {}
            if self.valid_data is not None and t.final_validation and "valid/total" not in last:
                self.validate()
            checkpoint = self.save_checkpoint()
            _notify_step(self.state.step, self.state.history[-1] if self.state.history else {}, checkpoint)
        if _STOP.signum is not None:  # arrived during the final validation or save: both finished
            raise StoppedBySignal(
                f"stopped by {_signal_name(_STOP.signum)} after the last step ({self.state.step}); "
                f"checkpoint step{self.state.step} written in {self.checkpoints.folder}",
                _STOP.signum,
            )
        return self.state

    def _loop(self, sampler: RankSampler, bar: Any, end: int) -> None:
        t = self.cfg.train
        while self.state.step < end:
            step = self.state.step
            sums: dict[str, float] = {}
            for micro in range(t.grad_accum):
                indices = sampler.batch(step * t.grad_accum + micro)
                loss, parts = self._forward_loss(
                    load_batch(self.train_data, indices, self.pad_token_id, self.engine.device), indices
                )
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
            logged = self.state.step % t.log_every == 0 or self.state.step == t.max_steps
            if logged:
                self.tracker.log_metrics(
                    {f"train/{k}": v for k, v in metrics.items() if k != "step"}, step=self.state.step
                )
            bar.set_postfix(loss=f"{metrics.get('total', float('nan')):.4f}")
            bar.update(1)
            if t.eval_every and self.state.step % t.eval_every == 0 and self.valid_data is not None:
                self.validate()
            checkpoint = None
            if t.save_every and self.state.step % t.save_every == 0 and self.state.step < t.max_steps:
                checkpoint = self.save_checkpoint()
            if (logged or checkpoint is not None) and self.state.step < end:  # the last step: after the final save
                _notify_step(self.state.step, metrics, checkpoint)
            signum = agreed_stop_signal()
            if signum:
                bar.close()
                self._stop(signum)

    def _stop(self, signum: int) -> None:
        """Every rank at the same step boundary: checkpoint (when train.save_on_signal), then raise."""
        t = self.cfg.train
        name = _signal_name(signum)
        step = self.state.step
        if t.save_on_signal:
            if self._saved_step != step:
                self.checkpoints.save(self.engine, self.state)
                self._saved_step = step
            where = f"checkpoint step{step} written in {self.checkpoints.folder}; continue with train.resume=true"
        else:
            where = f"nothing saved (train.save_on_signal=false); {self._last_checkpoint_note()}"
        raise StoppedBySignal(f"stopped by {name} at step {step} of {t.max_steps}; {where}", signum)

    def _last_checkpoint_note(self) -> str:
        tag, _ = self.checkpoints.newest_complete()
        if tag is None:
            return f"no complete checkpoint in {self.checkpoints.folder} to resume from"
        return f"last complete checkpoint: {self.checkpoints.folder / tag} (train.resume=true continues from it)"

    def _check_finite(self, step: int, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        # Every rank must agree to stop, or the healthy ones hang in the next collective.
        bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], dtype=torch.float64)
        all_reduce_sum(bad)
        if bad.item() > 0:
            shown = ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items())
            raise TrainingDivergedError(f"non-finite loss at step {step + 1} ({shown}); {self._last_checkpoint_note()}")

    def _mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        keys = sorted(values)
        vec = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        all_reduce_sum(vec)
        return {k: float(v) / world_size() for k, v in zip(keys, vec.tolist())}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean loss components over the first ``train.valid_examples`` validation examples (every rank its
        share), and the student's NDCG@10, HR@10 and MRR on the first ``train.valid_rank_examples`` (global
        over ranks; 0: the same examples). Ranking runs the student only, so many users cost little."""
        t = self.cfg.train
        n_loss = min(len(self.valid_data), t.valid_examples) if t.valid_examples else len(self.valid_data)
        n_rank = min(len(self.valid_data), t.valid_rank_examples) if t.valid_rank_examples else n_loss
        try:  # full batches only, the same count on every rank: ZeRO-3 forwards are collective
            batches = RankSampler.for_rank(n_loss, t.micro_batch_size).epoch_batches()
            ranked = batches if n_rank == n_loss else RankSampler.for_rank(n_rank, t.micro_batch_size).epoch_batches()
        except DataError:
            return {}
        from .evaluation import evaluate_per_example

        sums: dict[str, float] = {}
        self.engine.eval()
        loaded = [load_batch(self.valid_data, indices, self.pad_token_id, self.engine.device) for indices in batches]
        for batch in loaded:
            loss, parts = self._forward_loss(batch)
            for k, v in {"total": loss, **parts}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        metrics = self._mean_over_ranks({k: v / len(batches) for k, v in sums.items()})
        # The student's own ranking of the validation users (a learning curve that says when quality plateaus),
        # on the same users regrouped longest first (less padding; as many batches per rank), ranks in order.
        ranked = length_sorted(ranked, self.valid_data)
        loaded = [load_batch(self.valid_data, indices, self.pad_token_id, self.engine.device) for indices in ranked]
        result = evaluate_per_example(
            self.module.student,
            loaded,
            ks=(10,),
            progress=False,
            pointwise_score=self.cfg.data.pointwise_score,
            n_boot=100,  # the intervals are not used here; the report pairs the points' ranks
            positions=[i for indices in ranked for i in indices],
        )
        metrics.update({k: float(result.metrics[k]) for k in ("ndcg@10", "hr@10", "mrr")})
        if is_main():  # each validation user's target rank: the curve's points compared user by user
            self._save_valid_ranks(result.ranks)
        self.engine.train()
        history = self.state.history
        if history and history[-1].get("step") == self.state.step:  # train_history.json carries the curve
            history[-1].update({f"valid/{k}": v for k, v in metrics.items()})
        self.tracker.log_metrics({f"valid/{k}": v for k, v in metrics.items()}, step=self.state.step)
        log.info("step %d validation: %s", self.state.step, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return metrics

    VALID_RANKS = "valid_ranks.json"

    def _save_valid_ranks(self, ranks: Any) -> None:
        """``<out>/valid_ranks.json``: ``{step: [target rank of each validation user]}``, the users in the same
        order at every step (the same batches, gathered rank by rank), so two points of the learning curve
        can be compared user by user (:func:`layerwise_dist.ablation_report.plateau`). Written whole, then renamed."""
        path = self.out / self.VALID_RANKS
        saved = json.loads(path.read_text()) if path.is_file() else {}
        saved[str(self.state.step)] = [int(r) for r in ranks]
        tmp = path.with_suffix(".tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(saved))
        tmp.replace(path)

    # ---------------------------------------------------------------- saving
    def save_checkpoint(self) -> Path:
        """DeepSpeed checkpoint of the loop, then the consolidated HF student (collective).

        A step whose checkpoint this run already wrote or resumed from is not written again
        (rewriting it in place would open a window with no complete copy of it)."""
        path = self.checkpoints.folder / f"step{self.state.step}"
        if self._saved_step != self.state.step:
            path = self.checkpoints.save(self.engine, self.state)
            self._saved_step = self.state.step
        self.save_student(self.out / "student")
        return path

    def save_student(self, folder: Path) -> Path:
        """Write the student as a standard HF model folder (gathered from ZeRO-3 shards)."""
        return export_student(self.engine, self.module.student, folder, self.tokenizer, prefix="student.")


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
        from .ds_config import resolve_ds_config
        from .losses import distillation_loss, expose_layer_outputs
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
        loss_fn = distillation_loss(
            self.cfg,
            weights,
            self.layer_map,
            student_model.config.hidden_size,
            teacher_model.config.hidden_size,
        )
        from .distributed import init_distributed

        init_distributed()
        path = ds_config or self.cfg.ds_config
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
