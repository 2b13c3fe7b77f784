"""Forward and tensor hooks that turn one forward + one backward into per-example Fisher terms.

Every example's activation gradients are its own (examples do not interact), so the
backward of sum_n log p(y_n | x_n) hands each hook the per-example output gradients
``g`` of every module. Weight gradients are never formed by autograd:

* linear ``y = W x (+ b)``: the per-example weight gradient is ``dW_n = G_n^T X_n`` and
  ``||dW_n||_F^2 = sum_{t,t'} (g_t . g_t') (x_t . x_t')`` (Gram form). Both Gram matrices are
  symmetric, so only their lower block triangle is formed (row chunks of the sequence
  against all earlier tokens; off-diagonal blocks count twice): ``T^2 d (k+1)/(2k)`` for
  ``k`` chunks instead of ``T^2 d``. Linears fed by the same input (q/k/v, gate/up) share
  one input Gram. Which form is computed is chosen per linear by cost: Gram
  ``T^2 ((in, unless shared) + out) (k+1)/(2k)`` vs explicit ``T in out``.
  This works for bitsandbytes ``Linear4bit``/``Linear8bitLt`` (the gradient is w.r.t. the
  dequantized weight) and for ZeRO-3 partitioned weights (never touched here).
* RMSNorm ``y = w * xhat`` (Gemma's ``(1 + w) * xhat`` alike): ``dw_n = sum_t g_t * xhat_t`` with xhat recomputed in fp32
  from the captured input and the module's eps (LayerNorm likewise, plus its bias).

All maths runs in fp32; per-batch sums are accumulated in fp64.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from layerwise_dist.config import FisherForm, LinearMethod

GROUPS = ("attention", "mlp")
LINEAR_METHODS = typing.get_args(LinearMethod)


def module_group(name: str, sandwich_norms: bool = False) -> int:
    """0 (attention: self_attn.* and input_layernorm) or 1 (mlp.* and post_attention_layernorm).

    ``sandwich_norms``: the layer has a norm before and after each sublayer (Gemma 2/3:
    ``pre_feedforward_layernorm`` exists), so ``post_attention_layernorm`` normalises the attention
    output and belongs to the attention group; the feed-forward norms are mlp.
    """
    head = name.split(".", 1)[0]
    if head == "input_layernorm" or (("attn" in head or "attention" in head) and not head.startswith("post_")):
        return 0
    if sandwich_norms and head == "post_attention_layernorm":
        return 0
    return 1


def has_sandwich_norms(layer: nn.Module) -> bool:
    """Gemma-style layers: a norm before and after attention and before and after the MLP."""
    return isinstance(getattr(layer, "pre_feedforward_layernorm", None), nn.Module)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith("RMSNorm")


def _norm_eps(module: nn.Module, dtype: torch.dtype) -> float:
    for attr in ("variance_epsilon", "eps", "epsilon"):
        eps = getattr(module, attr, None)
        if eps is not None:
            return float(eps)
    return float(torch.finfo(dtype).eps)


def _first_tensor(args: tuple, kwargs: dict, key: str = "hidden_states") -> torch.Tensor:
    return args[0] if args else kwargs[key]


def _output_tensor(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output  # type: ignore[index]


GRAM_CHUNK = 96  # tokens per row chunk of the block-triangular Gram products
GRAM_MAX_CHUNKS = 8


def gram_chunks(tokens: int, chunk: int = GRAM_CHUNK) -> list[tuple[int, int]]:
    """Row chunks ``[(start, end), ...]`` covering ``range(tokens)``: at most GRAM_MAX_CHUNKS, about ``chunk`` long."""
    k = max(1, min(GRAM_MAX_CHUNKS, -(-tokens // max(1, chunk))))
    bounds = [round(i * tokens / k) for i in range(k + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(k) if bounds[i + 1] > bounds[i]]


def linear_method(
    tokens: int, fan_in: int, fan_out: int, method: str = "auto", input_gram_shared: bool = False, chunks: int = 1
) -> str:
    """Per example, Gram form costs T^2 ((in, unless its input Gram is already computed) + out) (k+1)/(2k)
    for k row chunks; explicit G^T X costs T in out."""
    if method != "auto":
        return method
    gram = tokens * ((0 if input_gram_shared else fan_in) + fan_out) * (chunks + 1) / (2 * chunks)
    return "gram" if gram < fan_in * fan_out else "explicit"


def block_gram(m: torch.Tensor, chunks: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Lower block triangle of ``m m^T`` per example: for row chunk ``(s, e)``, ``m[:, s:e] @ m[:, :e]^T``."""
    return [torch.bmm(m[:, s:e], m[:, :e].transpose(1, 2)) for s, e in chunks]


def block_gram_inner(a: list[torch.Tensor], b: list[torch.Tensor], chunks: list[tuple[int, int]]) -> torch.Tensor:
    """``sum(A * B)`` of two symmetric matrices given as :func:`block_gram` lower block triangles."""
    total = a[0].new_zeros(())
    for (s, _), ai, bi in zip(chunks, a, b):
        prod = ai * bi
        total = total + prod[:, :, s:].sum()
        if s:
            total = total + 2.0 * prod[:, :, :s].sum()
    return total


class FisherHooks:
    """Hooks on decoder layers collecting per-layer Fisher terms and the block controls.

    Use as a context manager; call :meth:`start_batch` before each forward and
    :meth:`finish_batch` after the backward. ``finish_batch`` returns the batch's sums
    as an fp64 vector ``[fisher(L) | attention(L) | mlp(L) | block_influence(L) |
    angular(L) | tokens]``; Fisher terms are summed over examples, controls over real tokens.
    """

    def __init__(
        self, layers: Sequence[nn.Module], form: str, linear: str = "auto", gram_chunk: int = GRAM_CHUNK
    ) -> None:
        if form not in typing.get_args(FisherForm):
            raise ValueError(f"form must be one of {typing.get_args(FisherForm)}; got {form!r}")
        if linear not in LINEAR_METHODS:
            raise ValueError(f"linear method must be one of {LINEAR_METHODS}; got {linear!r}")
        self.layers = list(layers)
        self.form = form
        self.linear = linear
        if gram_chunk < 1:
            raise ValueError(f"gram_chunk must be >= 1; got {gram_chunk}")
        self.gram_chunk = gram_chunk
        self.num_layers = len(self.layers)
        self._handles: list = []
        self._mask: torch.Tensor | None = None
        self._fisher: list[tuple[int, int, torch.Tensor]] = []  # (layer, group, scalar)
        self._controls: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self._gram_cache: tuple[torch.Tensor, list[torch.Tensor]] | None = None
        self.methods_used: set[str] = set()
        self.linear_methods: dict[str, str] = {}  # layer-relative module name -> method of the last batch

    # -- registration -------------------------------------------------------------------------
    def __enter__(self) -> FisherHooks:
        for idx, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(self._layer_hook(idx), with_kwargs=True))
            if self.form == "parameter":
                self._register_parameter_hooks(idx, layer)
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._reset()

    def _register_parameter_hooks(self, idx: int, layer: nn.Module) -> None:
        covered: set[int] = set()
        sandwich = has_sandwich_norms(layer)
        for name, mod in layer.named_modules():
            own = list(mod.parameters(recurse=False))
            if isinstance(mod, nn.Linear):
                self._handles.append(mod.register_forward_hook(self._linear_hook(idx, name, mod)))
            elif is_norm(mod) and own:
                group = module_group(name, sandwich)
                self._handles.append(mod.register_forward_hook(self._norm_hook(idx, group, mod)))
            elif own:
                names = [n for n, _ in mod.named_parameters(recurse=False)]
                raise NotImplementedError(
                    f"layer {idx}: module {name or '<layer>'} ({type(mod).__name__}) has parameters {names} that "
                    "the parameter-form Fisher does not cover (supported: nn.Linear incl. bitsandbytes, RMSNorm, LayerNorm)"
                )
            covered.update(id(p) for p in own)
        missing = [n for n, p in layer.named_parameters() if id(p) not in covered]
        if missing:  # pragma: no cover - every module with parameters is handled or raised above
            raise NotImplementedError(f"layer {idx}: parameters {missing} are not covered")

    # -- per batch ----------------------------------------------------------------------------
    def start_batch(self, attention_mask: torch.Tensor | None) -> None:
        self._reset()
        self._mask = attention_mask

    def _reset(self) -> None:
        self._fisher.clear()
        self._controls.clear()
        self._gram_cache = None
        self._mask = None

    def finish_batch(self) -> torch.Tensor:
        L = self.num_layers
        out = torch.zeros(5 * L + 1, dtype=torch.float64)
        if self._fisher:
            idx = torch.tensor([layer for layer, _, _ in self._fisher])
            grp = torch.tensor([g for _, g, _ in self._fisher])
            vals = torch.stack([v.detach() for _, _, v in self._fisher]).to("cpu", torch.float64)
            out[:L].index_add_(0, idx, vals)
            if self.form == "parameter":
                out[L : 3 * L].index_add_(0, L * grp + idx, vals)
        if self._controls:
            idx = torch.tensor([layer for layer, _, _ in self._controls])
            vals = torch.stack([torch.stack([b, a]) for _, b, a in self._controls]).to("cpu", torch.float64)
            out[3 * L : 4 * L].index_add_(0, idx, vals[:, 0])
            out[4 * L : 5 * L].index_add_(0, idx, vals[:, 1])
        if self._mask is not None:
            out[-1] = float(self._mask.sum())
        self._reset()
        return out

    # -- hooks --------------------------------------------------------------------------------
    def _layer_hook(self, idx: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            h_in = _first_tensor(args, kwargs)
            h_out = _output_tensor(output)
            with torch.no_grad():
                cos = F.cosine_similarity(h_in.detach().float(), h_out.detach().float(), dim=-1)
                mask = self._mask.to(cos) if self._mask is not None else torch.ones_like(cos)
                bi = ((1.0 - cos) * mask).sum()
                ang = (torch.arccos(cos.clamp(-1.0, 1.0)) * mask).sum() / math.pi
            self._controls.append((idx, bi, ang))
            if self.form == "activation" and h_out.requires_grad:

                def grad_hook(g: torch.Tensor) -> None:
                    # Squared norm summed over tokens and examples = sum_n ||d log p_n / d h_l||^2.
                    self._fisher.append((idx, 0, g.detach().float().pow(2).sum()))

                h_out.register_hook(grad_hook)

        return hook

    def _linear_hook(self, idx: int, name: str, mod: nn.Linear):
        group = module_group(name)
        has_bias = getattr(mod, "bias", None) is not None

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            out = _output_tensor(output)
            if not out.requires_grad:
                return
            x = args[0]
            bsz, fan_in, fan_out = x.shape[0], x.shape[-1], out.shape[-1]
            tokens = x.numel() // (bsz * fan_in)
            chunks = gram_chunks(tokens, self.gram_chunk)
            cached = self._cached_input_gram(x)
            method = linear_method(tokens, fan_in, fan_out, self.linear, cached is not None, len(chunks))
            self.methods_used.add(method)
            self.linear_methods[name] = method
            if method == "gram":
                kx = cached if cached is not None else self._input_gram(x, chunks)
                if has_bias:
                    kx = [k + 1.0 for k in kx]  # the bias is a weight column fed by a constant 1

                def grad_hook(g: torch.Tensor) -> None:
                    gm = g.detach().reshape(bsz, -1, fan_out).float()
                    self._fisher.append((idx, group, block_gram_inner(block_gram(gm, chunks), kx, chunks)))

            else:
                xd = x.detach()

                def grad_hook(g: torch.Tensor) -> None:
                    gm = g.detach().reshape(bsz, -1, fan_out).float()
                    xm = xd.reshape(bsz, -1, fan_in).float()
                    score = torch.bmm(gm.transpose(1, 2), xm).pow(2).sum()
                    if has_bias:
                        score = score + gm.sum(1).pow(2).sum()
                    self._fisher.append((idx, group, score))

            out.register_hook(grad_hook)

        return hook

    def _cached_input_gram(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        cached = self._gram_cache
        if cached is None:
            return None
        prev, kx = cached
        # `prev` is kept alive, so an equal data_ptr with equal layout and version is the same tensor.
        if prev is x or (
            prev.data_ptr() == x.data_ptr()
            and prev.shape == x.shape
            and prev.stride() == x.stride()
            and prev.dtype == x.dtype
            and prev._version == x._version
        ):
            return kx
        return None

    def _input_gram(self, x: torch.Tensor, chunks: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Block-triangular X_n X_n^T per example in fp32, kept for the next linear fed the same input
        (q/k/v and gate/up share one input, hence one Gram)."""
        xd = x.detach()
        kx = block_gram(xd.reshape(xd.shape[0], -1, xd.shape[-1]).float(), chunks)
        self._gram_cache = (xd, kx)
        return kx

    def _norm_hook(self, idx: int, group: int, mod: nn.Module):
        is_layer_norm = isinstance(mod, nn.LayerNorm)
        has_bias = getattr(mod, "bias", None) is not None

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            out = _output_tensor(output)
            if not out.requires_grad:
                return
            x = args[0].detach()
            eps = _norm_eps(mod, x.dtype)
            bsz, dim = x.shape[0], x.shape[-1]

            def grad_hook(g: torch.Tensor) -> None:
                xf = x.reshape(bsz, -1, dim).float()
                if is_layer_norm:
                    xf = xf - xf.mean(-1, keepdim=True)
                xhat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
                gm = g.detach().reshape(bsz, -1, dim).float()
                score = (gm * xhat).sum(1).pow(2).sum()
                if has_bias:
                    score = score + gm.sum(1).pow(2).sum()
                self._fisher.append((idx, group, score))

            out.register_hook(grad_hook)

        return hook
