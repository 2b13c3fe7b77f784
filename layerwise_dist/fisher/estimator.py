"""The Fisher pass: one forward + one backward per batch, one all-reduce per profile."""

from __future__ import annotations

import contextlib
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from layerwise_dist import distributed as dist_utils
from layerwise_dist.config import FisherForm
from layerwise_dist.data import collate
from layerwise_dist.fisher.hooks import GRAM_CHUNK, GROUPS, FisherHooks
from layerwise_dist.fisher.profile import FisherProfile
from layerwise_dist.fisher.targets import answer_log_probs
from layerwise_dist.models.util import model_device
from layerwise_dist.weighting import normalize

FORMS = typing.get_args(FisherForm)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a HF causal LM (or of the module inside a DeepSpeed engine): ``model.model.layers``
    for Llama, Gemma 3 and Qwen, else where :func:`layerwise_dist.models.student.decoder_layers_path` finds them;
    a model whose layers cannot be located is a one-line ``StudentError`` (a ``ValueError``) naming the places
    looked at."""
    from layerwise_dist.models.student import decoder_layers_of

    return decoder_layers_of(model)


def unpack_cpu_4bit_weights(net: nn.Module) -> int:
    """Undo bitsandbytes' CPU inference repacking of 4-bit weights, in place; returns how many were unpacked.

    On CPUs with AVX512-BF16, a ``Linear4bit`` in eval mode repacks its weight for an inference-only kernel
    on the first forward whose input needs no gradient (an evaluation, a recommendation). That kernel has no
    backward: a Fisher pass after it would get no gradient through the layer. The repacked weight is turned
    back into the standard NF4 layout (the same codes), and the pass's inputs require grad, so it stays so.
    """
    count = 0
    for module in net.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if type(module).__name__ != "Linear4bit" or not getattr(state, "packing_format_for_cpu", False):
            continue
        if hasattr(weight, "ds_id"):  # a ZeRO-3 partition: left to DeepSpeed
            continue
        import bitsandbytes.functional as bnbf

        weight.data, weight.quant_state = bnbf._convert_weight_packed_for_cpu_inverse(weight.data, state)
        count += 1
    return count


def _is_engine(model: Any) -> bool:
    return hasattr(model, "module") and hasattr(model, "backward") and isinstance(model.module, nn.Module)


@contextlib.contextmanager
def _frozen(net: nn.Module, active: bool) -> Iterator[None]:
    """Turn weight gradients off for the pass (they are never needed) and restore the flags."""
    if not active:
        yield
        return
    flags = [(p, p.requires_grad) for p in net.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def _eval_mode(net: nn.Module) -> Iterator[None]:
    was_training = net.training
    net.eval()
    try:
        yield
    finally:
        net.train(was_training)


@contextlib.contextmanager
def input_requires_grad(net: nn.Module) -> Iterator[None]:
    """Make the embedding output require grad so activation gradients flow through a frozen model."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not output.requires_grad:
            output = output.requires_grad_(True) if output.is_leaf else output.detach().requires_grad_(True)
        return output

    handle = net.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def compute_fisher_profile(
    model: nn.Module | Any,
    batches: Iterable[Mapping[str, torch.Tensor]],
    form: str = "parameter",
    labels: str = "empirical",
    seed: int = 0,
    backward: Callable[[torch.Tensor], None] | None = None,
    model_id: str = "",
    progress: bool = True,
    linear_method: str = "auto",
    gram_chunk: int = GRAM_CHUNK,
) -> FisherProfile:
    """Layerwise Fisher profile of ``model`` on ``batches`` (this rank's share), reduced over all ranks.

    ``model`` is a HF causal LM with ``model.model.layers`` or a DeepSpeed engine around
    one (then ``backward`` defaults to :func:`~layerwise_dist.fisher.engine.engine_backward`).
    With the default ``loss.backward()`` the weights' ``requires_grad`` flags are switched
    off during the pass and restored after, so no ``.grad`` is touched.

    Every rank must be given the same number of batches (ZeRO-3 gathers collectively).
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}; got {form!r}")
    engine = model if _is_engine(model) else None
    net: nn.Module = engine.module if engine is not None else model
    if backward is None and engine is not None:
        from layerwise_dist.fisher.engine import engine_backward

        backward = engine_backward(engine)
    own_backward = backward is None
    if backward is None:
        backward = torch.Tensor.backward
    layers = decoder_layers(net)
    unpack_cpu_4bit_weights(net)
    L = len(layers)
    device = model_device(model)
    totals = torch.zeros(5 * L + 1, dtype=torch.float64)
    num_examples = 0
    bar = tqdm(batches, desc=f"fisher ({form}, {labels})", disable=not (progress and dist_utils.is_main()))
    forward = engine if engine is not None else net
    with (
        _frozen(net, active=own_backward),
        _eval_mode(net),
        input_requires_grad(net),
        FisherHooks(layers, form, linear_method, gram_chunk) as hooks,
        torch.enable_grad(),
    ):
        for batch in bar:
            batch = _to_device(batch, device)
            hooks.start_batch(batch.get("attention_mask"))
            logp = answer_log_probs(forward, batch, labels=labels, seed=seed)
            # One backward of sum_n log p_n gives every example its own activation gradients.
            backward(logp.sum())
            totals += hooks.finish_batch()
            num_examples += int(batch["input_ids"].shape[0])
    # One all-reduce of one fp64 vector: [fisher | attention | mlp | BI | angular | tokens | examples].
    vec = torch.cat([totals, torch.tensor([float(num_examples)], dtype=torch.float64)])
    dist_utils.all_reduce_sum(vec)
    n, tokens = vec[-1].item(), vec[-2].item()
    if n == 0:
        raise ValueError("the Fisher pass saw no examples on any rank")
    per_example = (vec[: 3 * L] / n).tolist()
    controls = (vec[3 * L : 5 * L] / max(tokens, 1.0)).tolist()
    return FisherProfile(
        scores=per_example[:L],
        module_scores=(
            {GROUPS[0]: per_example[L : 2 * L], GROUPS[1]: per_example[2 * L : 3 * L]} if form == "parameter" else {}
        ),
        block_influence=controls[:L],
        angular_distance=controls[L:],
        form=form,
        labels=labels,
        num_examples=int(round(n)),
        num_tokens=int(round(tokens)),
        model_id=model_id,
        seed=seed,
    )


def _as_batches(data: Iterable[Mapping[str, Any]], batch_size: int, pad_token_id: int) -> Iterator[dict[str, Any]]:
    """Batches pass through; a dataset of single examples (1-D input_ids) is collated batch_size at a time
    by :func:`layerwise_dist.data.collate`."""
    pending: list[Mapping[str, Any]] = []
    for item in data:
        ids = item["input_ids"]
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            yield dict(item)
            continue
        pending.append(item)
        if len(pending) == batch_size:
            yield collate(pending, pad_token_id)
            pending = []
    if pending:
        yield collate(pending, pad_token_id)


class FisherInformationCalculator:
    """The original project's API over :func:`compute_fisher_profile`.

    ``FisherInformationCalculator().calculate(teacher_model, dataset)`` returns the per-layer
    scores; ``normalize(scores)`` turns them into layer weights summing to 1. The full
    result of the last call is kept in ``self.profile``.
    """

    def __init__(
        self,
        form: str = "parameter",
        labels: str = "empirical",
        batch_size: int = 2,
        num_examples: int = 0,
        seed: int = 0,
        backward: Callable[[torch.Tensor], None] | None = None,
        progress: bool = True,
        linear_method: str = "auto",
    ) -> None:
        self.form = form
        self.labels = labels
        self.batch_size = batch_size
        self.num_examples = num_examples
        self.seed = seed
        self.backward = backward
        self.progress = progress
        self.linear_method = linear_method
        self.profile: FisherProfile | None = None

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> FisherInformationCalculator:
        """From a :class:`layerwise_dist.config.FisherConfig`."""
        return cls(
            form=config.form,
            labels=config.labels,
            batch_size=config.batch_size,
            seed=config.seed,
            linear_method=getattr(config, "linear_method", "auto"),
            **kwargs,
        )

    def calculate(self, teacher_model: nn.Module | Any, dataset_or_batches: Iterable[Mapping[str, Any]]) -> list[float]:
        net = getattr(teacher_model, "module", teacher_model)
        pad = getattr(getattr(net, "config", None), "pad_token_id", None) or 0
        batches: Iterable[dict[str, Any]] = _as_batches(dataset_or_batches, self.batch_size, pad)
        if self.num_examples:
            batches = _limit(batches, self.num_examples)
        model_id = getattr(getattr(net, "config", None), "name_or_path", "") or ""
        self.profile = compute_fisher_profile(
            teacher_model,
            batches,
            form=self.form,
            labels=self.labels,
            seed=self.seed,
            backward=self.backward,
            model_id=model_id,
            progress=self.progress,
            linear_method=self.linear_method,
        )
        return list(self.profile.scores)

    @staticmethod
    def normalize(scores: Sequence[float], temperature: float = 1.0) -> list[float]:
        return normalize(list(scores), temperature)


def _limit(batches: Iterable[dict[str, Any]], num_examples: int) -> Iterator[dict[str, Any]]:
    seen = 0
    for batch in batches:
        if seen >= num_examples:
            return
        take = min(num_examples - seen, int(batch["input_ids"].shape[0]))
        yield {k: (v[:take] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        seen += take
