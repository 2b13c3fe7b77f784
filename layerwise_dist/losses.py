"""Distillation losses: task CE, logit KD (forward KL, reverse KL, JSD) and hidden-state alignment.

Two objectives, one per ``data.formulation``: :class:`DistillationLoss` (listwise prompts; logits at the
answer positions only with ``mask="answer"`` via :func:`listwise_forward`, full [B, T, V] with ``"all"``) and :class:`PointwiseDistillationLoss` (a packed batch of candidate titles, logits at the
candidate positions only, plus list-level KD over the candidate scores); :func:`distillation_loss` picks one.

Conventions (torchtune ``kd_losses`` style):

- ``logits`` are ``[B, T, V]``; HF causal-LM convention: the logits at position ``t`` predict token ``t + 1``.
- Every loss upcasts to fp32 before softmax/log-softmax: bf16 log-probabilities lose the small tail
  probabilities that dominate KL gradients.
- Token masks are boolean ``[B, T]`` over *logit positions*. ``answer`` masking keeps position ``t`` when
  ``labels[:, t + 1] != -100`` (the shifted label mask), ``all`` keeps positions with ``attention_mask == 1``.
- Reduction is the mean over kept positions; a batch with no kept position gives exactly ``0`` (no NaN),
  and the gradient is zero.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from layerwise_dist.config import AlignLoss, DistillConfig, KDLoss, KDMask, RunConfig
from layerwise_dist.data.tokenize import IGNORE_INDEX
from layerwise_dist.models.student import StudentError, validate_layer_map
from layerwise_dist.pointwise import MASK_ATTN_IMPLEMENTATIONS, SCORE_MODES, PackedBatch
from layerwise_dist.teacher_cache import CachedLogits, student_binned


class LossInputError(ValueError):
    """Inputs of a loss have incompatible shapes, vocabularies or layer maps."""


def shifted_label_mask(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``[B, T]`` bool over logit positions: ``mask[:, t] = labels[:, t + 1] != ignore_index``, last position False."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != ignore_index
    return mask


def token_mask(batch: Mapping[str, torch.Tensor], mode: str, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The KD token mask of a batch: ``answer`` (shifted label mask) or ``all`` (attention mask)."""
    if mode == "answer":
        return shifted_label_mask(batch["labels"], ignore_index)
    if mode == "all":
        return batch["attention_mask"].bool()
    raise LossInputError(f"mask must be one of {', '.join(typing.get_args(KDMask))}; got {mode!r}")


def _kl_per_token(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``sum_v p_v (log p_v - log q_v)`` over the last dim, with ``0 log 0 = 0``; ``[N, V] -> [N]``."""
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(-1)


def _kept_log_probs(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 tempered log-softmaxes ``[N, V]`` of the ``N`` kept positions of student and teacher."""
    if student_logits.shape != teacher_logits.shape:
        raise LossInputError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ"
        )
    if student_logits.dim() != 3 or mask.shape != student_logits.shape[:2]:
        raise LossInputError(
            f"expected logits [B, T, V] and mask [B, T]; got {tuple(student_logits.shape)}, {tuple(mask.shape)}"
        )
    # Select before the softmax: answer masking keeps a few tokens per prompt, and whatever sits at a
    # masked position (inf, NaN) can then reach neither the loss nor its gradient.
    mask = mask.bool()
    log_s = F.log_softmax(student_logits[mask].float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits[mask].float() / temperature, dim=-1)
    return log_s, log_t


def _mean_over_kept(per_token: torch.Tensor) -> torch.Tensor:
    """Mean of ``[N]`` per-token losses; exactly 0 (with zero gradient) when ``N == 0``."""
    return per_token.sum() / max(per_token.numel(), 1)


class TaskCrossEntropy(nn.Module):
    """Next-token cross-entropy on the answer tokens.

    ``CE = -(1/N) sum_{b,t: labels[b,t+1] != -100} log softmax(logits[b,t])[labels[b,t+1]]``

    Shapes: ``logits`` [B, T, V] (any float dtype, computed in fp32), ``labels`` [B, T] (``-100`` = ignored).
    The shift follows HF: logits at ``t`` predict token ``t + 1``. No answer token -> 0.
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.shape[:2] != labels.shape:
            raise LossInputError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ in [B, T]")
        shift_logits = logits[:, :-1].float().reshape(-1, logits.size(-1))
        shift_labels = labels[:, 1:].reshape(-1)
        total = F.cross_entropy(shift_logits, shift_labels, ignore_index=self.ignore_index, reduction="sum")
        count = (shift_labels != self.ignore_index).sum().clamp(min=1)
        return total / count.to(total.dtype)


def _check_temperature(temperature: float) -> float:
    if temperature <= 0:
        raise LossInputError(f"temperature must be > 0; got {temperature}")
    return float(temperature)


class KLDivergenceLoss(nn.Module):
    """Tempered KL between teacher and student token distributions, with the T^2 gradient rescaling.

    ``L = T^2 * (1/N) sum_{kept (b,t)} KL(p || q)``, with ``p_T = softmax(z_T / T)``, ``p_S = softmax(z_S / T)``
    over the vocabulary and ``KL(p || q) = sum_v p_v (log p_v - log q_v)``:

    - ``direction="forward"``: ``KL(p_T || p_S)`` (Hinton et al. 2015, eq. 2): mean-seeking, the student
      covers all teacher modes;
    - ``direction="reverse"``: ``KL(p_S || p_T)`` (MiniLLM, Gu et al. 2024): mode-seeking.

    Both take ``(student_logits, teacher_logits, mask)``. Shapes: logits [B, T, V]; ``mask`` [B, T] bool
    (kept positions). Identical logits -> 0; nothing kept -> 0.
    """

    def __init__(self, temperature: float = 1.0, direction: str = "forward") -> None:
        super().__init__()
        if direction not in ("forward", "reverse"):
            raise LossInputError(f"KL direction must be 'forward' or 'reverse'; got {direction!r}")
        self.temperature = _check_temperature(temperature)
        self.direction = direction

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        log_s, log_t = _kept_log_probs(student_logits, teacher_logits, mask, self.temperature)
        log_p, log_q = (log_t, log_s) if self.direction == "forward" else (log_s, log_t)
        return self.temperature**2 * _mean_over_kept(_kl_per_token(log_p, log_q))


class ForwardKLLoss(KLDivergenceLoss):
    """Forward KL ``KL(p_T || p_S)``: :class:`KLDivergenceLoss` with ``direction="forward"``."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__(temperature, "forward")


class ReverseKLLoss(KLDivergenceLoss):
    """Reverse KL ``KL(p_S || p_T)``: :class:`KLDivergenceLoss` with ``direction="reverse"``."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__(temperature, "reverse")


class JSDLoss(nn.Module):
    """Generalised Jensen-Shannon divergence (GKD, Agarwal et al. 2024, eq. 1; TRL's convention).

    ``JSD(beta) = beta * KL(p_T || m) + (1 - beta) * KL(p_S || m)``, ``m = beta * p_T + (1 - beta) * p_S``,
    for ``0 < beta < 1``; symmetric in teacher/student at ``beta = 0.5``. The formula vanishes at the end
    points, so (as TRL) ``beta = 0`` is the forward KL ``KL(p_T || p_S)`` and ``beta = 1`` the reverse KL
    ``KL(p_S || p_T)`` (the limits of the mode-covering / mode-seeking behaviour, up to scale).

    Tempered softmaxes and T^2 scaling as :class:`KLDivergenceLoss`; ``log m`` via logsumexp for stability.
    Shapes: logits [B, T, V], ``mask`` [B, T] bool. Identical logits -> 0; nothing kept -> 0.
    """

    def __init__(self, beta: float = 0.5, temperature: float = 1.0) -> None:
        super().__init__()
        if not 0.0 <= beta <= 1.0:
            raise LossInputError(f"beta must be in [0, 1]; got {beta}")
        self.beta = float(beta)
        self.temperature = _check_temperature(temperature)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        log_s, log_t = _kept_log_probs(student_logits, teacher_logits, mask, self.temperature)
        if self.beta == 0.0:
            per_token = _kl_per_token(log_t, log_s)
        elif self.beta == 1.0:
            per_token = _kl_per_token(log_s, log_t)
        else:
            log_m = torch.logsumexp(
                torch.stack([log_t + math.log(self.beta), log_s + math.log(1.0 - self.beta)]), dim=0
            )
            per_token = self.beta * _kl_per_token(log_t, log_m) + (1.0 - self.beta) * _kl_per_token(log_s, log_m)
        return self.temperature**2 * _mean_over_kept(per_token)


class HiddenAlignmentLoss(nn.Module):
    """Alignment of one student layer's hidden states with its mapped teacher layer.

    ``h = proj(h_S)`` (a learned ``nn.Linear(student_dim, teacher_dim, bias=False)`` when the widths differ,
    FitNets-style; identity otherwise), then per token

    - ``mse``:    ``l_t = (1/D) || h_t - h_T,t ||^2``
    - ``nmse``:   ``l_t = || h_t - h_T,t ||^2 / (|| h_T,t ||^2 + eps)`` (scale-free: raw residual streams of
      real LLMs carry a few huge channels, so plain MSE lets the deepest layers swamp every other term)
    - ``cosine``: ``l_t = 1 - cos(h_t, h_T,t)``

    and the mean of ``l_t`` over real tokens (``attention_mask == 1``). Shapes: ``student_hidden`` [B, T, Ds],
    ``teacher_hidden`` [B, T, Dt], ``attention_mask`` [B, T]. fp32 maths; no real token -> 0. The projection
    (if any) is a trainable parameter: give :meth:`parameters` to the optimizer.
    """

    def __init__(self, kind: str = "mse", student_dim: int | None = None, teacher_dim: int | None = None) -> None:
        super().__init__()
        if kind not in typing.get_args(AlignLoss):
            raise LossInputError(f"alignment kind must be one of {', '.join(typing.get_args(AlignLoss))}; got {kind!r}")
        self.kind = kind
        self.student_dim = student_dim
        self.teacher_dim = teacher_dim
        self.proj: nn.Linear | None = None
        if student_dim is not None and teacher_dim is not None and student_dim != teacher_dim:
            self.proj = nn.Linear(student_dim, teacher_dim, bias=False, dtype=torch.float32)

    def forward(
        self, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        if student_hidden.shape[:2] != teacher_hidden.shape[:2] or attention_mask.shape != student_hidden.shape[:2]:
            raise LossInputError(
                f"hidden states {tuple(student_hidden.shape)} / {tuple(teacher_hidden.shape)} and attention mask "
                f"{tuple(attention_mask.shape)} differ in [B, T]"
            )
        keep = attention_mask.bool()
        h_s = student_hidden[keep].float()
        h_t = teacher_hidden[keep].float()
        if self.proj is not None:
            h_s = self.proj(h_s)
        if h_s.shape[-1] != h_t.shape[-1]:
            raise LossInputError(
                f"student width {student_hidden.shape[-1]} != teacher width {h_t.shape[-1]}: build "
                "HiddenAlignmentLoss with student_dim and teacher_dim to learn a projection"
            )
        if self.kind == "mse":
            per_token = (h_s - h_t).pow(2).mean(-1)
        elif self.kind == "nmse":
            per_token = (h_s - h_t).pow(2).sum(-1) / (h_t.pow(2).sum(-1) + 1e-6)
        else:
            per_token = 1.0 - F.cosine_similarity(h_s, h_t, dim=-1, eps=1e-8)
        return _mean_over_kept(per_token)


class LayerOutputsHandle:
    """Removes the hooks installed by :func:`expose_layer_outputs`."""

    def __init__(self, handles: list) -> None:
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def expose_layer_outputs(model: nn.Module) -> LayerOutputsHandle:
    """Make ``output_hidden_states=True`` return raw decoder-layer outputs for every layer.

    HF replaces the last ``hidden_states`` entry by the output of the final norm, so a model's last layer
    would be aligned *after* its norm with a raw hidden state of the other model. A pre-hook on the final
    norm keeps its input (the raw output of the last layer) and a hook on ``model`` puts it back as
    ``hidden_states[-1]``; the output is marked ``raw_layer_outputs = True``. Logits are unchanged.
    Give the HF model (``engine.module`` under DeepSpeed); ``.remove()`` on the result undoes it.
    """
    existing = getattr(model, "_ld_layer_outputs_handle", None)
    if existing is not None and existing._handles:  # already exposed (a teacher shared by ablation cells)
        return existing
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    norm = getattr(decoder, "norm", None)
    if not isinstance(norm, nn.Module):
        raise LossInputError(f"{type(model).__name__} has no final norm at get_decoder().norm to hook")
    captured: dict[str, torch.Tensor] = {}

    def keep_norm_input(_module: nn.Module, args: tuple) -> None:
        captured["last"] = args[0]

    def restore_last(_module: nn.Module, _args: tuple, output: Any) -> Any:
        last = captured.pop("last", None)
        hidden = getattr(output, "hidden_states", None)
        if isinstance(output, ModelOutput) and hidden is not None and last is not None:
            output.hidden_states = (*tuple(hidden)[:-1], last)
            output.raw_layer_outputs = True
        return output

    handle = LayerOutputsHandle(
        [norm.register_forward_pre_hook(keep_norm_input), model.register_forward_hook(restore_last)]
    )
    model._ld_layer_outputs_handle = handle
    return handle


def _post_norm_last(out: Any) -> bool:
    """Whether ``out.hidden_states[-1]`` is after the final norm (an HF output not passed through the hook)."""
    return isinstance(out, ModelOutput) and not getattr(out, "raw_layer_outputs", False)


KD_LOSSES = typing.get_args(KDLoss)


def kd_loss_from_config(cfg: DistillConfig) -> nn.Module:
    """The logit KD module named by ``cfg.kd_loss`` at ``cfg.temperature`` (and ``cfg.jsd_beta``)."""
    directions = {"forward_kl": "forward", "reverse_kl": "reverse"}
    if cfg.kd_loss in directions:
        return KLDivergenceLoss(cfg.temperature, directions[cfg.kd_loss])
    if cfg.kd_loss == "jsd":
        return JSDLoss(cfg.jsd_beta, cfg.temperature)
    raise LossInputError(f"distill.kd_loss must be one of {', '.join(KD_LOSSES)}; got {cfg.kd_loss!r}")


def _checked_layer_map(layer_map: list[int], num_student: int, num_teacher: int | None = None) -> list[int]:
    """:func:`layerwise_dist.models.student.validate_layer_map`, failing with :class:`LossInputError`."""
    try:
        return validate_layer_map(layer_map, num_student, num_teacher)
    except StudentError as err:
        raise LossInputError(str(err)) from err


class DistillationLoss(nn.Module):
    """The whole objective: ``total = a * CE + b * KD + align_weight * sum_l w_l * align_l``.

    ``a = cfg.ce_weight``, ``b = cfg.kd_weight``; KD is ``cfg.kd_loss`` on the tokens of ``cfg.mask``;
    ``align_l`` is :class:`HiddenAlignmentLoss` (``cfg.align_loss``) between student layer ``l`` and teacher
    layer ``layer_map[l]``, weighted by ``layer_weights[l]`` (normally summing to 1, see
    :func:`layerwise_dist.weighting.layer_weights`).

    Hidden states follow HF ``output_hidden_states=True``: ``hidden_states[0]`` is the embedding output and
    ``hidden_states[i + 1]`` the output of decoder layer ``i``. HF replaces the *last* entry by the output
    of the final norm; pairing such a post-norm state with a raw one is an error: call
    :func:`expose_layer_outputs` on student and teacher once (then every entry is a raw layer output).

    Vocabularies: student and teacher logits must have the same size ``V`` unless ``cfg.shared_vocab_only``,
    in which case KD uses the first ``min(V_S, V_T)`` entries (a shared tokenizer whose embedding matrices
    were padded differently).

    Each alignment layer with differing widths owns a trainable projection: the optimizer must receive
    :meth:`parameters` of this module (empty when the widths agree).
    """

    def __init__(
        self,
        cfg: DistillConfig,
        layer_weights: Sequence[float],
        layer_map: Sequence[int],
        student_dim: int,
        teacher_dim: int,
    ) -> None:
        super().__init__()
        if len(layer_weights) != len(layer_map):
            raise LossInputError(
                f"{len(layer_weights)} layer weights for {len(layer_map)} mapped student layers: they must match"
            )
        if any(not math.isfinite(w) or w < 0 for w in layer_weights):
            raise LossInputError(f"layer weights must be finite and non-negative; got {list(layer_weights)}")
        self.cfg = cfg
        self.layer_weights = [float(w) for w in layer_weights]
        self.layer_map = _checked_layer_map([int(t) for t in layer_map], len(layer_map))
        self.ce = TaskCrossEntropy()
        self.kd = kd_loss_from_config(cfg)
        self.align = nn.ModuleList(
            HiddenAlignmentLoss(cfg.align_loss, student_dim, teacher_dim) for _ in self.layer_map
        )

    def _kd_logits(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        v_s, v_t = student_logits.size(-1), teacher_logits.size(-1)
        if v_s == v_t:
            return student_logits, teacher_logits
        if not self.cfg.shared_vocab_only:
            raise LossInputError(
                f"student vocabulary ({v_s}) != teacher vocabulary ({v_t}); set distill.shared_vocab_only=true "
                "to distil on the shared first min(V) entries"
            )
        v = min(v_s, v_t)
        return student_logits[..., :v], teacher_logits[..., :v]

    def _kd_rows(self, s_logits: torch.Tensor, t_logits: Any) -> torch.Tensor:
        """KD over N positions: ``[N, V]`` student logits against ``[N, V]`` teacher logits, or against a
        teacher cache's :class:`~layerwise_dist.teacher_cache.CachedLogits` (k + 1 bins: its top-k tokens and
        the rest of the vocabulary; see :mod:`layerwise_dist.teacher_cache`)."""
        every = torch.ones((1, s_logits.shape[0]), dtype=torch.bool, device=s_logits.device)
        if isinstance(t_logits, CachedLogits):
            temperature = self.cfg.temperature
            if not math.isclose(t_logits.temperature, temperature):
                raise LossInputError(
                    f"the teacher cache holds KD targets at temperature {t_logits.temperature}; "
                    f"distill.temperature is {temperature}"
                )
            s_bins = student_binned(s_logits, t_logits)
            t_bins = t_logits.binned().to(s_bins.device)
            # The KD losses take logits and apply log_softmax(x / T): T * log-probs gives the bins back.
            return self.kd((temperature * s_bins)[None], (temperature * t_bins)[None], every)
        s_kd, t_kd = self._kd_logits(s_logits, t_logits)
        return self.kd(s_kd[None], t_kd[None], every)

    def _kept_ce_kd(
        self, s_logits: torch.Tensor, t_logits: Any, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CE and KD from the ``[U, V]`` logits of the answer positions only (see :meth:`forward`)."""
        if self.cfg.mask != "answer":
            raise LossInputError(
                f"logits of the answer positions only reached a loss with distill.mask={self.cfg.mask!r}: "
                "KD over all tokens needs the full [B, T, V] logits (listwise_forward(..., mask='all'))"
            )
        keep = shifted_label_mask(labels)
        count = int(keep.sum())
        t_rows = (
            len(t_logits) if isinstance(t_logits, CachedLogits) else t_logits.size(0) if t_logits.dim() == 2 else -1
        )
        if s_logits.dim() != 2 or s_logits.size(0) != count or t_rows != count:
            t_shape = f"{t_rows} cached rows" if isinstance(t_logits, CachedLogits) else tuple(t_logits.shape)
            raise LossInputError(
                f"answer-position logits must be [U, V] with U = {count} answer positions for student and "
                f"teacher; got {tuple(s_logits.shape)} and {t_shape}"
            )
        following = torch.full_like(labels, IGNORE_INDEX)
        following[:, :-1] = labels[:, 1:]  # the token each logit position predicts
        targets = following[keep].to(s_logits.device)
        ce = F.cross_entropy(s_logits.float(), targets, reduction="sum") / max(count, 1)
        return ce, self._kd_rows(s_logits, t_logits)

    def _alignment(
        self, student_out: Any, teacher_out: Any, keep: torch.Tensor, reference: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``sum_l w_l * align_l`` over the tokens of ``keep`` [B, T], and the unweighted ``align_l<i>`` terms."""
        components: dict[str, torch.Tensor] = {}
        align = reference.new_zeros((), dtype=torch.float32)
        s_hidden = getattr(student_out, "hidden_states", None)
        t_hidden = getattr(teacher_out, "hidden_states", None)
        if self.cfg.align_weight > 0 and self.layer_map and (s_hidden is None or t_hidden is None):
            raise LossInputError("hidden-state alignment needs output_hidden_states=True on student and teacher")
        # With align_weight 0 the per-layer terms are still logged when the hidden states are there.
        if self.layer_map and s_hidden is not None and t_hidden is not None:
            _checked_layer_map(self.layer_map, len(s_hidden) - 1, len(t_hidden) - 1)
            last_s, last_t = len(s_hidden) - 2, len(t_hidden) - 2
            normed_s, normed_t = _post_norm_last(student_out), _post_norm_last(teacher_out)
            for i, t_layer in enumerate(self.layer_map):
                if (normed_s and i == last_s) != (normed_t and t_layer == last_t):
                    raise LossInputError(
                        f"student layer {i} and teacher layer {t_layer}: one is HF's post-norm hidden_states[-1], "
                        "the other a raw layer output; call layerwise_dist.losses.expose_layer_outputs(model) on both"
                    )
            for i, (t_layer, w, loss) in enumerate(zip(self.layer_map, self.layer_weights, self.align)):
                a_i = loss(s_hidden[i + 1], t_hidden[t_layer + 1].detach(), keep)
                components[f"align_l{i}"] = a_i.detach()
                align = align + w * a_i
        return align, components

    def forward(self, student_out: Any, teacher_out: Any, batch: Mapping[str, torch.Tensor]) -> tuple:
        """Returns ``(total, components)``; components hold detached fp32 scalars ``ce``, ``kd``, ``align``
        and ``align_l<i>`` (unweighted alignment of student layer ``i``).

        Logits are either full ``[B, T, V]`` or, from :func:`listwise_forward` with ``cfg.mask == "answer"``,
        the ``[U, V]`` rows of the U answer positions (``shifted_label_mask(labels)``, row-major): the same
        CE and KD, computed from the only rows they read."""
        s_logits, t_logits = student_out.logits, _detached(teacher_out.logits)
        if s_logits.dim() == 2 or isinstance(t_logits, CachedLogits) or t_logits.dim() == 2:
            ce, kd = self._kept_ce_kd(s_logits, t_logits, batch["labels"])
        else:
            ce = self.ce(s_logits, batch["labels"])
            s_kd, t_kd = self._kd_logits(s_logits, t_logits)
            kd = self.kd(s_kd, t_kd, token_mask(batch, self.cfg.mask))
        align, per_layer = self._alignment(student_out, teacher_out, batch["attention_mask"], s_logits)
        total = self.cfg.ce_weight * ce + self.cfg.kd_weight * kd + self.cfg.align_weight * align
        components = {"ce": ce.detach(), "kd": kd.detach(), "align": align.detach(), **per_layer}
        return total, components


def _detached(logits: Any) -> Any:
    return logits if isinstance(logits, CachedLogits) else logits.detach()


def listwise_forward(model: Any, batch: Mapping[str, torch.Tensor], mask: str) -> Any:
    """One forward of a listwise batch for :class:`DistillationLoss`: every hidden state, and logits where
    the loss reads them.

    ``mask="answer"``: the LM head runs only at the answer positions (``shifted_label_mask(labels)``, where CE
    and KD live), logits ``[U, V]`` (:func:`layerwise_dist.heads.forward_keeping`); ``mask="all"``: the full
    ``[B, T, V]``. ``model`` is a HF causal LM or anything forwarding its keyword arguments to one (a DeepSpeed
    engine), so ZeRO-3 gathers parameters as in any forward.
    """
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if mask == "all":
        return model(**inputs, output_hidden_states=True)
    if mask != "answer":
        raise LossInputError(f"mask must be one of {', '.join(typing.get_args(KDMask))}; got {mask!r}")
    from .heads import forward_keeping

    keep = shifted_label_mask(batch["labels"]).to(batch["input_ids"].device)
    return forward_keeping(model, keep, **inputs, output_hidden_states=True)


# --------------------------------------------------------------------------- pointwise


def packed_logit_positions(packed: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep, index)`` of a packed pointwise batch (:class:`layerwise_dist.pointwise.PackedBatch`).

    ``keep`` [B, L] bool marks the U distinct positions whose next-token distribution predicts a candidate
    token (a row's last prefix position predicts the first token of every candidate of its group, so U < N).
    Passed as ``logits_to_keep``, it makes a Hugging Face causal LM apply its LM head at those U positions
    only and return logits [U, V] in (row, position) order. ``index`` [N] is the row of those logits that
    predicts each candidate token (``packed.token_target``).
    """
    rows, pos = packed.token_row, packed.token_pred_pos
    width = packed.input_ids.shape[1]
    keep = torch.zeros(packed.input_ids.shape, dtype=torch.bool, device=rows.device)
    keep[rows, pos] = True
    order = keep.flatten().cumsum(0) - 1
    return keep, order[rows * width + pos]


def packed_forward(model: Any, packed: PackedBatch, hf_model: nn.Module | None = None) -> Any:
    """One forward of a packed pointwise batch: every hidden state, and logits [U, V] at the candidate positions.

    ``model`` is a Hugging Face causal LM or anything forwarding its keyword arguments to one (a DeepSpeed
    engine, the trainer's ``StudentWithAligner`` engine): the forward goes through it, so ZeRO-3 gathers the
    parameters as in any forward. ``hf_model`` (default ``model``) is the causal LM itself, read for its dtype
    (the additive block mask must match it) and its attention implementation (``eager`` or ``sdpa``: other
    kernels ignore a 4D mask). Logits come from ``logits_to_keep`` = :func:`packed_logit_positions`'s ``keep``:
    the LM head never runs at all L positions. With :func:`expose_layer_outputs` on the model, every
    ``hidden_states`` entry is a raw decoder-layer output, as in the listwise path.
    """
    inner = model if hf_model is None else hf_model
    impl = getattr(inner.config, "_attn_implementation", None)
    if impl not in MASK_ATTN_IMPLEMENTATIONS:
        raise LossInputError(
            f"a packed pointwise batch needs an attention implementation that honours a 4D mask "
            f"{MASK_ATTN_IMPLEMENTATIONS}; {type(inner).__name__} uses {impl!r} (load it with attn_implementation='sdpa')"
        )
    dtype = inner.get_input_embeddings().weight.dtype
    from .heads import forward_keeping

    keep, _ = packed_logit_positions(packed)
    return forward_keeping(
        model,
        keep,
        input_ids=packed.input_ids,
        attention_mask=_mask_to(packed.model_attention_mask(inner.config, dtype), packed.input_ids.device),
        position_ids=packed.position_ids,
        output_hidden_states=True,
        use_cache=False,
    )


def forward_for_loss(
    model: Any, batch: Mapping[str, Any], mask: str = "answer", hf_model: nn.Module | None = None
) -> Any:
    """The forward a distillation loss reads: :func:`packed_forward` for a pointwise batch (``hf_model`` as
    there), :func:`listwise_forward` with ``mask`` for a listwise one."""
    if "packed" in batch:
        return packed_forward(model, batch["packed"], hf_model)
    return listwise_forward(model, batch, mask)


def _mask_to(mask: Any, device: torch.device) -> Any:
    """A packed batch's mask (a tensor, or one per layer type for sliding-window models) on ``device``."""
    return {k: v.to(device) for k, v in mask.items()} if isinstance(mask, dict) else mask.to(device)


def _token_log_probs(logits: torch.Tensor, index: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """fp32 ``log softmax(logits[index[k]])[targets[k]]`` -> [N], from logits [U, V] (no [N, V] copy)."""
    logits = logits.float()
    return logits[index, targets] - torch.logsumexp(logits, dim=-1)[index]


def slot_scores(sums: torch.Tensor, counts: torch.Tensor, packed: PackedBatch, score: str) -> list[torch.Tensor]:
    """Per user the [C_b] candidate scores (``mean``, ``sum`` or ``pmi``) from per-slot log-prob sums and
    token counts [S] of a packed batch (slots ordered user, group, candidate)."""
    scores, start = [], 0
    for n_cand in packed.num_candidates:
        block = sums[start : start + packed.num_groups * n_cand].view(packed.num_groups, n_cand)
        if score == "mean":
            scores.append(block[0] / counts[start : start + n_cand])
        elif score == "sum":
            scores.append(block[0])
        else:
            scores.append(block[0] - block[1])
        start += packed.num_groups * n_cand
    return scores


def packed_slot_sums(logits: torch.Tensor, packed: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sums, counts)`` [S]: each slot's fp32 title log-prob sum and token count, from the logits [U, V]
    that :func:`packed_forward` returns."""
    _, index = packed_logit_positions(packed)
    num_slots = packed.slot_row.numel()
    counts = torch.bincount(packed.token_slot, minlength=num_slots).float()
    lp = _token_log_probs(logits, index, packed.token_target)
    return lp.new_zeros(num_slots).index_add(0, packed.token_slot, lp), counts


def target_slots(packed: PackedBatch, target_index: torch.Tensor) -> torch.Tensor:
    """The slot of each user's target candidate (in the history group) [B]."""
    n_cand = torch.tensor(packed.num_candidates, device=target_index.device)
    if target_index.shape != n_cand.shape or bool(((target_index < 0) | (target_index >= n_cand)).any()):
        raise LossInputError(
            f"target_index {target_index.tolist()} out of range for {packed.num_candidates} candidates"
        )
    group_starts = torch.cumsum(packed.num_groups * n_cand, 0) - packed.num_groups * n_cand
    return group_starts + target_index


class PointwiseListLoss(nn.Module):
    """Pointwise adaptation objective from one packed forward: title modelling plus a list-level CE.

    ``total = CE_title + w * CE_list`` with, per user ``b`` (target ``y_b``, candidates ``c``, scores
    ``s_bc`` by ``score``: ``mean``/``sum`` of the title tokens' log-probs given the history, or ``pmi``):

    - ``CE_title = (1/B) sum_b -(1/n_{y_b}) sum_{k in y_b} lp_k``: the target title's mean token NLL;
    - ``CE_list = (1/B) sum_b -log softmax_c(s_bc)[y_b]``: the target against the other candidates.

    ``w = 0`` is title modelling alone, on per-user means (the packed forward then only costs more).
    Components: ``title``, ``list``.
    """

    def __init__(self, list_weight: float, score: str = "mean") -> None:
        super().__init__()
        if score not in SCORE_MODES:
            raise LossInputError(f"pointwise score must be one of {', '.join(SCORE_MODES)}; got {score!r}")
        if list_weight < 0:
            raise LossInputError(f"list loss weight must be >= 0; got {list_weight}")
        self.list_weight = float(list_weight)
        self.score = score

    def forward(self, logits: torch.Tensor, packed: PackedBatch, target_index: torch.Tensor) -> tuple:
        if (self.score == "pmi") != (packed.num_groups == 2):
            raise LossInputError(
                f"pointwise score {self.score!r} with {packed.num_groups} prefix group(s): 'pmi' needs the "
                "unconditional group, 'mean'/'sum' run on packed.history_only()"
            )
        sums, counts = packed_slot_sums(logits, packed)
        slots = target_slots(packed, target_index)
        title = -(sums[slots] / counts[slots]).mean()
        scores = slot_scores(sums, counts, packed, self.score)
        listwise = torch.stack(
            [-torch.log_softmax(s, -1)[int(y)] for s, y in zip(scores, target_index.tolist())]
        ).mean()
        total = title + self.list_weight * listwise
        return total, {"title": title.detach(), "list": listwise.detach()}


class PointwiseDistillationLoss(DistillationLoss):
    """The objective of the pointwise formulation, from one packed forward of student and teacher.

    ``total = a * CE + b * KD + c * ListKD + align_weight * sum_l w_l * align_l`` with ``a = cfg.ce_weight``,
    ``b = cfg.kd_weight``, ``c = cfg.list_kd_weight``. Both models ran :func:`packed_forward` on the same
    ``batch["packed"]`` (user ``b``'s prefix and its ``C_b`` candidate titles in row ``b``); ``lp_c`` is the
    fp32 log-prob of candidate ``c``'s tokens given its prefix, ``n_c`` their count, ``y_b`` =
    ``batch["target_index"][b]``:

    - ``CE = (1/B) sum_b -(1/n_{y_b}) sum_{k in y_b} lp_k``: the target title's mean token NLL given the
      history (for one user, :class:`TaskCrossEntropy` on ``prefix + target title`` with labels on the title);
    - ``KD``: ``cfg.kd_loss`` (forward KL with T^2 scaling by default, reverse KL, JSD) at temperature
      ``cfg.temperature`` on the full vocabulary, averaged over the N candidate tokens of the batch, each at
      the position that predicts it (as in C separate ``prefix + candidate`` sequences: the last prefix
      position counts once per candidate);
    - ``ListKD = (tau^2 / B) sum_b KL(softmax(s^T_b / tau) || softmax(s^S_b / tau))`` over the C_b candidate
      scores, ``tau = cfg.list_temperature``; the score is ``score``: ``mean`` (mean token log-prob),
      ``sum``, or ``pmi`` (sum given the history minus sum given the unconditional prefix: the packed batch
      must hold that second group);
    - ``align_l``: :class:`HiddenAlignmentLoss` between student layer ``l`` and teacher layer
      ``layer_map[l]`` over the non-padding positions of the packed rows (prefix and candidate tokens).

    Run both models on :meth:`scored_packed` of the collated batch (the unconditional group is dropped
    unless the score is ``pmi``). Teacher outputs are detached; everything is fp32. ``cfg.mask`` must be ``answer`` (the candidates' title
    tokens are the answer; ``all`` is a listwise option). Components: ``ce``, ``kd``, ``list_kd``, ``align``
    and ``align_l<i>``.
    """

    def __init__(
        self,
        cfg: DistillConfig,
        layer_weights: Sequence[float],
        layer_map: Sequence[int],
        student_dim: int,
        teacher_dim: int,
        score: str = "mean",
    ) -> None:
        super().__init__(cfg, layer_weights, layer_map, student_dim, teacher_dim)
        if score not in SCORE_MODES:
            raise LossInputError(f"pointwise score must be one of {', '.join(SCORE_MODES)}; got {score!r}")
        if cfg.mask != "answer":
            raise LossInputError(
                f"distill.mask={cfg.mask!r} is a listwise option; pointwise token KD covers the candidates' "
                "title tokens (distill.mask=answer)"
            )
        self.score = score
        self.list_temperature = _check_temperature(cfg.list_temperature)

    def scored_packed(self, packed: PackedBatch) -> PackedBatch:
        """The packed batch both models must run on: without the unconditional group unless the score is
        ``pmi`` (``collate`` packs that group whenever the examples carry it)."""
        return packed if self.score == "pmi" else packed.history_only()

    def _scores(self, sums: torch.Tensor, counts: torch.Tensor, packed: PackedBatch) -> list[torch.Tensor]:
        """Per user the [C_b] candidate scores from per-slot log-prob sums and token counts [S]."""
        return slot_scores(sums, counts, packed, self.score)

    def forward(self, student_out: Any, teacher_out: Any, batch: Mapping[str, Any]) -> tuple:
        """Returns ``(total, components)``; components hold detached fp32 scalars."""
        packed: PackedBatch = batch["packed"]
        target = batch["target_index"]
        if self.score == "pmi" and packed.num_groups != 2:
            raise LossInputError("pointwise score 'pmi' needs packed batches with the unconditional-prefix group")
        if self.score != "pmi" and packed.num_groups != 1:
            raise LossInputError(
                f"pointwise score {self.score!r} distils the history group only: run both models on "
                "loss.scored_packed(packed), which drops the unconditional group"
            )
        keep, index = packed_logit_positions(packed)
        kept = int(keep.sum())
        s_logits, t_logits = student_out.logits, _detached(teacher_out.logits)
        cached = isinstance(t_logits, CachedLogits)
        if cached and len(t_logits) != kept:
            raise LossInputError(f"the teacher cache gave {len(t_logits)} positions for a batch with {kept}")
        for who, logits in (("student", s_logits),) + (() if cached else (("teacher", t_logits),)):
            if logits.dim() != 2 or logits.shape[0] != kept:
                raise LossInputError(
                    f"{who} logits {tuple(logits.shape)}: expected [{kept}, V], the positions that predict candidate "
                    "tokens (run the model with layerwise_dist.losses.packed_forward)"
                )
        n_cand = torch.tensor(packed.num_candidates, device=target.device)
        if target.shape != n_cand.shape or bool(((target < 0) | (target >= n_cand)).any()):
            raise LossInputError(f"target_index {target.tolist()} out of range for {packed.num_candidates} candidates")

        # Token-level KD on the candidate tokens (each at the position predicting it).
        kd = self._kd_rows(s_logits[index], t_logits.rows(index) if cached else t_logits[index])

        # Per-slot log-likelihoods of the candidates, then CE on the target and list-level KD on the scores.
        num_slots = packed.slot_row.numel()
        counts = torch.bincount(packed.token_slot, minlength=num_slots).float()
        sums = {}
        for who, logits in (("s", s_logits), ("t", t_logits)):
            if who == "t" and getattr(teacher_out, "token_logp", None) is not None:
                lp = teacher_out.token_logp.to(s_logits.device)  # a teacher cache's fp32 candidate-token log-probs
            else:
                lp = _token_log_probs(logits, index, packed.token_target)
            sums[who] = lp.new_zeros(num_slots).index_add(0, packed.token_slot, lp)
        group_starts = torch.cumsum(packed.num_groups * n_cand, 0) - packed.num_groups * n_cand
        target_slots = group_starts + target
        ce = -(sums["s"][target_slots] / counts[target_slots]).mean()

        tau = self.list_temperature
        per_user = [
            _kl_per_token(torch.log_softmax(t / tau, -1)[None], torch.log_softmax(s / tau, -1)[None])
            for s, t in zip(self._scores(sums["s"], counts, packed), self._scores(sums["t"], counts, packed))
        ]
        list_kd = tau**2 * torch.cat(per_user).mean()

        lengths = torch.tensor(packed.lengths, device=packed.input_ids.device)
        real = torch.arange(packed.input_ids.shape[1], device=lengths.device)[None, :] < lengths[:, None]
        align, per_layer = self._alignment(student_out, teacher_out, real, s_logits)
        cfg = self.cfg
        total = cfg.ce_weight * ce + cfg.kd_weight * kd + cfg.list_kd_weight * list_kd + cfg.align_weight * align
        components = {
            "ce": ce.detach(),
            "kd": kd.detach(),
            "list_kd": list_kd.detach(),
            "align": align.detach(),
            **per_layer,
        }
        return total, components


def distillation_loss(
    cfg: RunConfig, layer_weights: Sequence[float], layer_map: Sequence[int], student_dim: int, teacher_dim: int
) -> DistillationLoss:
    """The objective of ``cfg.data.formulation``: :class:`DistillationLoss` (listwise) or
    :class:`PointwiseDistillationLoss` scoring by ``cfg.data.pointwise_score`` (pointwise)."""
    if cfg.data.formulation == "pointwise":
        return PointwiseDistillationLoss(
            cfg.distill, layer_weights, layer_map, student_dim, teacher_dim, score=cfg.data.pointwise_score
        )
    return DistillationLoss(cfg.distill, layer_weights, layer_map, student_dim, teacher_dim)
