"""Pointwise candidate scoring: the log-likelihood of each candidate title as the next item.

Instead of asking the model to pick a letter among listed candidates, the user's
history is written as a plain-text list and every candidate is scored by how
likely the model finds its title as the next line of that list.

Template (``render_history_prefix`` + ``candidate_continuation``)::

    Video games a customer bought, oldest first:\\n
    - <history title 1>\\n
    - ...\\n
    - <history title H>\\n
    The next video game the customer bought:\\n
    -                                   <- the prefix ends here, after "-"
     <candidate title>\\n               <- the continuation: " " + title + "\\n"

The score of a candidate is computed from the log-probabilities of its
continuation tokens given the prefix: ``mean`` (length-normalised, default),
``sum``, or ``pmi`` = sum log p(title | history prefix) - sum log p(title |
unconditional prefix), the unconditional prefix being the same template with an
empty history (``render_history_prefix([])``).

All candidates share the prefix, so one packed forward scores them all: the
sequence is ``prefix, cand_1, ..., cand_C``; every candidate token attends to
the whole prefix and causally to its own candidate's earlier tokens only, and its
position ids continue from ``len(prefix)`` (they restart for every candidate).
This is exactly what C separate forwards of ``prefix + cand_c`` compute, with
``P + sum_c T_c`` tokens processed instead of ``C * P + sum_c T_c``.

Mask approach: a custom 4D attention mask. In transformers 5.x
``masking_utils._preprocess_mask_arguments`` returns a 4D mask unchanged (before
any packed-sequence detection from position ids), and it reaches the attention
function as is. The eager path *adds* it to the scores
(``attn_weights + attention_mask``), so a boolean mask would be silently wrong
there; SDPA accepts boolean or additive masks. We therefore pass an additive
float mask (0 where allowed, ``finfo(dtype).min`` where not) in the model's
dtype, which both ``eager`` and ``sdpa`` honour. ``flash_attention_2`` and other
kernels ignore or reject arbitrary 4D masks, so they are refused with a clear
error (load the model with ``attn_implementation="sdpa"`` for scoring).

Log-probabilities are computed in fp32 from the hidden states gathered at the
needed positions only: the LM head is applied to N = sum_c T_c rows, never to
every position of the packed sequence.

In the data pipeline, ``collate`` packs a pointwise batch once (with the
unconditional group, so ``pmi`` can use it) and the ``PackedBatch`` travels with
the tensors (``.to(device)``); :func:`packed_scores` scores it, dropping the
unconditional group first for ``mean`` and ``sum`` (``PackedBatch.history_only``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

ScoreMode = Literal["mean", "sum", "pmi"]
SCORE_MODES: tuple[str, ...] = ("mean", "sum", "pmi")
MASK_ATTN_IMPLEMENTATIONS: tuple[str, ...] = ("eager", "sdpa")

__all__ = [
    "SCORE_MODES",
    "PackedBatch",
    "candidate_continuation",
    "pack_candidates",
    "pack_candidates_batch",
    "packed_scores",
    "packed_slot_logprob_sums",
    "render_history_prefix",
    "score_candidates",
    "score_candidates_batch",
    "score_candidates_separately",
    "tokenize_pointwise",
    "unconditional_prefix",
]


# --------------------------------------------------------------------------- text


def _clean_title(title: str, what: str) -> str:
    """Collapse whitespace (a newline inside a title would break the list format)."""
    cleaned = " ".join(str(title).split())
    if not cleaned:
        raise ValueError(f"{what} is empty after whitespace normalisation: {title!r}")
    return cleaned


def _singular(phrase: str) -> str:
    """Naive de-pluralisation of the last word: 'video games' -> 'video game', 'items' -> 'item'."""
    if phrase.endswith("s") and not phrase.endswith("ss"):
        return phrase[:-1]
    return phrase


def render_history_prefix(
    history_titles: Sequence[str],
    category_phrase: str = "items",
    *,
    item_phrase: str | None = None,
    max_history: int | None = None,
) -> str:
    """The prompt prefix listing the user's history, oldest first; it ends with ``"\\n-"``.

    ``category_phrase`` is plural ("video games", "beauty products"); ``item_phrase``
    is its singular for the last line, by default ``category_phrase`` without a
    final "s". ``max_history`` keeps only the last titles (the measured prompt used 5).
    Titles have their whitespace collapsed to single spaces. An empty history gives
    the unconditional prefix used by ``pmi``.
    """
    if not category_phrase.strip():
        raise ValueError("category_phrase must be a non-empty phrase such as 'video games'")
    if max_history is not None and max_history < 0:
        raise ValueError(f"max_history must be >= 0, got {max_history}")
    titles = list(history_titles)
    if max_history is not None:
        titles = titles[len(titles) - max_history :] if max_history else []
    plural = category_phrase.strip()
    singular = (item_phrase or _singular(plural)).strip()
    lines = [f"{plural[0].upper()}{plural[1:]} a customer bought, oldest first:"]
    lines += [f"- {_clean_title(t, f'history title {i}')}" for i, t in enumerate(titles)]
    lines.append(f"The next {singular} the customer bought:")
    return "\n".join(lines) + "\n-"


def unconditional_prefix(category_phrase: str = "items", *, item_phrase: str | None = None) -> str:
    """The template with no history: the reference prefix of ``pmi`` scoring."""
    return render_history_prefix([], category_phrase, item_phrase=item_phrase)


def candidate_continuation(title: str) -> str:
    """The scored continuation of a candidate: ``" " + title + "\\n"`` (whitespace collapsed)."""
    return f" {_clean_title(title, 'candidate title')}\n"


def tokenize_pointwise(tokenizer, prefix: str, titles: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """Token ids of the prefix (with the tokenizer's special tokens) and of each continuation (without).

    Prefix and continuations are tokenized separately, so a candidate's tokens are
    the same whatever the history; returns ``(prefix_ids, [candidate_ids, ...])``.
    """
    prefix_ids = list(tokenizer(prefix, add_special_tokens=True)["input_ids"])
    candidates = [list(tokenizer(candidate_continuation(t), add_special_tokens=False)["input_ids"]) for t in titles]
    return prefix_ids, candidates


# --------------------------------------------------------------------------- packing


@dataclass
class PackedBatch:
    """Several users' prefixes and candidates packed one row per user.

    Shapes (B rows, L the longest packed length, N candidate tokens in all,
    S candidate slots in all = sum over rows of C_row * groups):

    * ``input_ids`` [B, L] long; padding holds ``pad_id``.
    * ``position_ids`` [B, L] long; prefix 0..P-1, each candidate P..P+T_c-1; padding 0.
    * ``attention_mask`` [B, 1, L, L] bool, True where query i may attend key j:
      prefix tokens causally over their prefix, candidate tokens over their
      prefix and causally over their own candidate; a padding token only itself
      (so no attention row is empty).
    * ``token_row`` [N], ``token_pred_pos`` [N]: row and position of the hidden
      state whose next-token distribution predicts the token (the last prefix
      position for a candidate's first token, the previous position otherwise).
    * ``token_target`` [N]: the candidate token ids being scored.
    * ``token_slot`` [N]: the candidate slot (0..S-1) each token belongs to.
    * ``slot_row``, ``slot_group``, ``slot_candidate`` [S]: per slot its row, its
      group (0 = the user's history prefix, 1 = the unconditional prefix) and the
      candidate index within that user's list. Slots are ordered row by row,
      group by group, candidate by candidate.
    * ``num_candidates``: C per row; ``num_groups``: 1, or 2 with the unconditional prefix.
    * ``lengths``: packed length of each row before padding.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_row: torch.Tensor
    token_pred_pos: torch.Tensor
    token_target: torch.Tensor
    token_slot: torch.Tensor
    slot_row: torch.Tensor
    slot_group: torch.Tensor
    slot_candidate: torch.Tensor
    num_candidates: list[int]
    num_groups: int
    lengths: list[int]
    pad_id: int = 0

    @property
    def num_tokens(self) -> int:
        """Tokens processed by the packed forward, padding excluded."""
        return int(sum(self.lengths))

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def to(self, device: torch.device | str) -> PackedBatch:
        """The same batch with every tensor on ``device`` (a new object; lists are shared)."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)

    def slot_token_counts(self) -> torch.Tensor:
        """[S] number of tokens of each candidate slot."""
        return torch.bincount(self.token_slot, minlength=len(self.slot_row))

    def history_only(self) -> PackedBatch:
        """The batch without its unconditional group (itself when it has none).

        Group 0 (history prefix + candidates) comes first in every row and attends
        to nothing of group 1, so the rows are cut to the longest group-0 length and
        any group-1 token left inside that width becomes padding (pad id, position
        0, attending only itself): group-0 scores are unchanged and no
        unconditional token is processed. ``mean`` and ``sum`` scoring use this, so
        a batch collated for ``pmi`` costs them nothing extra.
        """
        if self.num_groups == 1:
            return self
        keep_tok = self.slot_group[self.token_slot] == 0
        keep_slot = self.slot_group == 0
        new_slot = torch.cumsum(keep_slot.long(), 0) - 1
        rows = self.input_ids.size(0)
        lengths = []
        for b in range(rows):
            # Group 0 of row b is its prefix (P tokens; every candidate's first token is
            # predicted from position P-1, the lowest predicting position) then its candidates.
            in_row = keep_tok & (self.token_row == b)
            lengths.append(int(self.token_pred_pos[in_row].min()) + 1 + int(in_row.sum()))
        width = max(lengths)
        input_ids = self.input_ids[:, :width].clone()
        position_ids = self.position_ids[:, :width].clone()
        mask = self.attention_mask[:, :, :width, :width].clone()
        eye = torch.eye(width, dtype=torch.bool, device=mask.device)
        for b, n in enumerate(lengths):
            if n < width:
                input_ids[b, n:] = self.pad_id
                position_ids[b, n:] = 0
                mask[b, 0, n:, :] = eye[n:]
                mask[b, 0, :, n:] = eye[:, n:]
        return PackedBatch(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=mask,
            token_row=self.token_row[keep_tok],
            token_pred_pos=self.token_pred_pos[keep_tok],
            token_target=self.token_target[keep_tok],
            token_slot=new_slot[self.token_slot[keep_tok]],
            slot_row=self.slot_row[keep_slot],
            slot_group=self.slot_group[keep_slot],
            slot_candidate=self.slot_candidate[keep_slot],
            num_candidates=list(self.num_candidates),
            num_groups=1,
            lengths=lengths,
            pad_id=self.pad_id,
        )

    def additive_attention_mask(self, dtype: torch.dtype, sliding_window: int | None = None) -> torch.Tensor:
        """[B, 1, L, L] float mask of ``dtype``: 0 where attention is allowed, ``finfo(dtype).min`` elsewhere.

        ``sliding_window``: also block keys ``sliding_window`` or more positions before the query (HF's
        sliding-window rule, on the true positions ``position_ids``, so a candidate token sees the prefix
        tokens a separate sequence would show it)."""
        zero = torch.zeros((), dtype=dtype)
        blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype)
        allowed = self.attention_mask
        if sliding_window is not None:
            pos = self.position_ids
            allowed = allowed & ((pos[:, :, None] - pos[:, None, :]) < int(sliding_window))[:, None]
        return torch.where(allowed, zero, blocked)

    def model_attention_mask(self, config: Any, dtype: torch.dtype) -> torch.Tensor | dict[str, torch.Tensor]:
        """The mask to pass a model of ``config``: a custom 4D mask is used as given by every layer, so a model
        with sliding-window layers (Gemma 2/3, Qwen2/3 ``layer_types``) gets one mask per layer type, and a
        model whose every layer slides (``sliding_window`` without ``layer_types``) the windowed mask."""
        window = getattr(config, "sliding_window", None)
        types = getattr(config, "layer_types", None)
        if not window:
            return self.additive_attention_mask(dtype)
        if types is None:
            return self.additive_attention_mask(dtype, window)
        if "sliding_attention" not in types:
            return self.additive_attention_mask(dtype)
        return {
            "full_attention": self.additive_attention_mask(dtype),
            "sliding_attention": self.additive_attention_mask(dtype, window),
        }


def _check_ids(prefix_ids: Sequence[int], candidates: Sequence[Sequence[int]], what: str) -> None:
    if len(prefix_ids) == 0:
        raise ValueError(f"{what}: the prefix has no tokens (its last token predicts each candidate's first token)")
    if len(candidates) == 0:
        raise ValueError(f"{what}: the candidates list is empty (need at least one candidate to score)")
    for i, cand in enumerate(candidates):
        if len(cand) == 0:
            raise ValueError(f"{what}: candidate {i} has no tokens (an empty continuation has no likelihood)")


def pack_candidates_batch(
    prefixes: Sequence[Sequence[int]],
    candidates: Sequence[Sequence[Sequence[int]]],
    pad_id: int = 0,
    unconditional_prefix_ids: Sequence[int] | None = None,
) -> PackedBatch:
    """Pack each user's prefix and candidates into one row; rows padded on the right to the longest.

    ``prefixes[b]`` is user b's prefix token ids (P_b >= 1), ``candidates[b]`` its
    C_b >= 1 candidates' token ids (each T >= 1). With ``unconditional_prefix_ids``
    each row also holds a second group after the first: the unconditional prefix
    followed by the same candidates (used by ``pmi``), positions restarting at 0.
    """
    if len(prefixes) != len(candidates):
        raise ValueError(f"{len(prefixes)} prefixes but {len(candidates)} candidate lists (one of each per user)")
    if len(prefixes) == 0:
        raise ValueError("no users to pack")
    groups_per_row: list[list[tuple[Sequence[int], Sequence[Sequence[int]]]]] = []
    for b, (prefix, cands) in enumerate(zip(prefixes, candidates, strict=True)):
        _check_ids(prefix, cands, f"user {b}")
        groups = [(prefix, cands)]
        if unconditional_prefix_ids is not None:
            _check_ids(unconditional_prefix_ids, cands, f"user {b} (unconditional prefix)")
            groups.append((unconditional_prefix_ids, cands))
        groups_per_row.append(groups)

    # Per token: id, position id, group (-1 = padding) and segment (0 = prefix, c+1 = candidate c).
    rows_ids: list[list[int]] = []
    rows_pos: list[list[int]] = []
    rows_group: list[list[int]] = []
    rows_seg: list[list[int]] = []
    token_row: list[int] = []
    token_pred_pos: list[int] = []
    token_target: list[int] = []
    token_slot: list[int] = []
    slot_row: list[int] = []
    slot_group: list[int] = []
    slot_candidate: list[int] = []
    for b, groups in enumerate(groups_per_row):
        ids: list[int] = []
        pos: list[int] = []
        grp: list[int] = []
        seg: list[int] = []
        for g, (prefix, cands) in enumerate(groups):
            p = len(prefix)
            last_prefix = len(ids) + p - 1
            ids += [int(t) for t in prefix]
            pos += list(range(p))
            grp += [g] * p
            seg += [0] * p
            for c, cand in enumerate(cands):
                slot = len(slot_row)
                slot_row.append(b)
                slot_group.append(g)
                slot_candidate.append(c)
                start = len(ids)
                for k, tok in enumerate(cand):
                    token_row.append(b)
                    token_pred_pos.append(last_prefix if k == 0 else start + k - 1)
                    token_target.append(int(tok))
                    token_slot.append(slot)
                ids += [int(t) for t in cand]
                pos += list(range(p, p + len(cand)))
                grp += [g] * len(cand)
                seg += [c + 1] * len(cand)
        rows_ids.append(ids)
        rows_pos.append(pos)
        rows_group.append(grp)
        rows_seg.append(seg)

    lengths = [len(r) for r in rows_ids]
    width = max(lengths)
    n_rows = len(rows_ids)
    input_ids = torch.full((n_rows, width), int(pad_id), dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    group = torch.full((n_rows, width), -1, dtype=torch.long)
    segment = torch.zeros((n_rows, width), dtype=torch.long)
    for b in range(n_rows):
        n = lengths[b]
        input_ids[b, :n] = torch.tensor(rows_ids[b])
        position_ids[b, :n] = torch.tensor(rows_pos[b])
        group[b, :n] = torch.tensor(rows_group[b])
        segment[b, :n] = torch.tensor(rows_seg[b])

    idx = torch.arange(width)
    causal = idx[None, :, None] >= idx[None, None, :]  # [1, L(query), L(key)]
    same_group = (group[:, :, None] == group[:, None, :]) & (group[:, None, :] >= 0)
    seg_q, seg_k = segment[:, :, None], segment[:, None, :]
    visible_segment = (seg_k == 0) | (seg_k == seg_q)
    real = causal & same_group & visible_segment
    pad_self = (group[:, :, None] < 0) & (idx[None, :, None] == idx[None, None, :])
    attention_mask = (real | pad_self).unsqueeze(1)

    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        token_row=torch.tensor(token_row, dtype=torch.long),
        token_pred_pos=torch.tensor(token_pred_pos, dtype=torch.long),
        token_target=torch.tensor(token_target, dtype=torch.long),
        token_slot=torch.tensor(token_slot, dtype=torch.long),
        slot_row=torch.tensor(slot_row, dtype=torch.long),
        slot_group=torch.tensor(slot_group, dtype=torch.long),
        slot_candidate=torch.tensor(slot_candidate, dtype=torch.long),
        num_candidates=[len(c) for c in candidates],
        num_groups=2 if unconditional_prefix_ids is not None else 1,
        lengths=lengths,
        pad_id=int(pad_id),
    )


def pack_candidates(
    prefix_ids: Sequence[int],
    candidates: Sequence[Sequence[int]],
    pad_id: int = 0,
    unconditional_prefix_ids: Sequence[int] | None = None,
) -> PackedBatch:
    """One user's prefix then every candidate's tokens, as a batch of one row (see ``pack_candidates_batch``)."""
    return pack_candidates_batch([prefix_ids], [candidates], pad_id, unconditional_prefix_ids)


# --------------------------------------------------------------------------- scoring


def _check_mode(mode: str, unconditional_prefix_ids: Sequence[int] | None) -> None:
    if mode not in SCORE_MODES:
        raise ValueError(f"unknown pointwise score mode {mode!r}; expected one of {SCORE_MODES}")
    if mode == "pmi" and unconditional_prefix_ids is None:
        raise ValueError("mode='pmi' needs unconditional_prefix_ids (e.g. the tokenized unconditional_prefix())")


def _check_attn_implementation(model) -> None:
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in MASK_ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"packed pointwise scoring needs a custom 4D attention mask, honoured by attn_implementation in "
            f"{MASK_ATTN_IMPLEMENTATIONS}; this model uses {impl!r} (load it with attn_implementation='sdpa', "
            f"or use score_candidates_separately)"
        )


def _to(mask: torch.Tensor | dict[str, torch.Tensor], device: Any) -> torch.Tensor | dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in mask.items()} if isinstance(mask, dict) else mask.to(device)


def _decoder(model) -> torch.nn.Module:
    """The decoder stack of a ``*ForCausalLM`` (``model.model`` for Llama/Qwen2/Gemma3)."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if base is None or base is model:
        raise ValueError(f"{type(model).__name__} has no inner decoder (expected a *ForCausalLM model)")
    return base


def _token_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """fp32 log p(target) from hidden states [N, H] (final norm applied) through the LM head -> [N]."""
    logits = model.get_output_embeddings()(hidden).float()  # [N, V]
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def _combine(sums: torch.Tensor, counts: torch.Tensor, mode: str) -> torch.Tensor:
    """fp32 scores [C] from fp64 per-candidate log-prob sums [G, C] (G=2 for pmi) and token counts [C]."""
    if mode == "mean":
        scores = sums[0] / counts
    elif mode == "sum":
        scores = sums[0]
    else:
        scores = sums[0] - sums[1]
    return scores.float()


@torch.no_grad()
def packed_slot_logprob_sums(model, packed: PackedBatch) -> torch.Tensor:
    """One forward of the packed batch -> [S] sums of log p(candidate tokens | its prefix), one per slot.

    Token log-probs are fp32; they are summed in fp64 so that the summation order
    (packed vs separate) adds no rounding difference of its own."""
    _check_attn_implementation(model)
    device = model.get_input_embeddings().weight.device
    dtype = model.get_input_embeddings().weight.dtype
    out = _decoder(model)(
        input_ids=packed.input_ids.to(device),
        attention_mask=_to(packed.model_attention_mask(model.config, dtype), device),
        position_ids=packed.position_ids.to(device),
        use_cache=False,
    )
    hidden = out.last_hidden_state  # [B, L, H], final norm applied
    needed = hidden[packed.token_row.to(device), packed.token_pred_pos.to(device)]  # [N, H]
    logp = _token_logprobs(model, needed, packed.token_target.to(device))  # [N]
    sums = torch.zeros(len(packed.slot_row), dtype=torch.float64, device=device)
    return sums.index_add_(0, packed.token_slot.to(device), logp.double())


def score_candidates_batch(
    model,
    prefixes: Sequence[Sequence[int]],
    candidates: Sequence[Sequence[Sequence[int]]],
    mode: ScoreMode = "mean",
    unconditional_prefix_ids: Sequence[int] | None = None,
    pad_id: int = 0,
) -> list[torch.Tensor]:
    """Score several users' candidates in ONE packed forward -> one fp32 tensor [C_b] per user (on CPU).

    ``mode``: ``mean`` (mean token log-prob of the continuation), ``sum``, or
    ``pmi`` (sum given the history minus sum given ``unconditional_prefix_ids``,
    packed in the same row). ``unconditional_prefix_ids`` is only used by ``pmi``.
    The model must use ``attn_implementation`` ``eager`` or ``sdpa``.
    """
    _check_mode(mode, unconditional_prefix_ids)
    packed = pack_candidates_batch(prefixes, candidates, pad_id, unconditional_prefix_ids if mode == "pmi" else None)
    return packed_scores(model, packed, mode)


def packed_scores(model, packed: PackedBatch, mode: ScoreMode = "mean") -> list[torch.Tensor]:
    """Scores of an already packed batch (e.g. the ``packed`` entry of a collated pointwise batch).

    One forward -> one fp32 tensor [C_b] per row (on CPU). ``pmi`` needs a batch
    packed with the unconditional group; ``mean`` and ``sum`` drop that group
    before the forward (:meth:`PackedBatch.history_only`) when it is there.
    """
    if mode not in SCORE_MODES:
        raise ValueError(f"unknown pointwise score mode {mode!r}; expected one of {SCORE_MODES}")
    if mode == "pmi" and packed.num_groups != 2:
        raise ValueError(
            "mode='pmi' needs a batch packed with the unconditional prefix (unconditional_prefix_ids / "
            "the unconditional_ids column)"
        )
    if mode != "pmi":
        packed = packed.history_only()
    sums = packed_slot_logprob_sums(model, packed).cpu()
    counts_all = packed.slot_token_counts().cpu().double()
    scores: list[torch.Tensor] = []
    start = 0
    for n_cand in packed.num_candidates:
        size = packed.num_groups * n_cand
        block = sums[start : start + size].view(packed.num_groups, n_cand)
        counts = counts_all[start : start + n_cand]
        start += size
        scores.append(_combine(block, counts, mode))
    return scores


def score_candidates(
    model,
    prefix_ids: Sequence[int],
    candidates: Sequence[Sequence[int]],
    mode: ScoreMode = "mean",
    unconditional_prefix_ids: Sequence[int] | None = None,
    pad_id: int = 0,
) -> torch.Tensor:
    """Score one user's C candidates in one packed forward -> fp32 tensor [C] (on CPU)."""
    return score_candidates_batch(model, [prefix_ids], [candidates], mode, unconditional_prefix_ids, pad_id)[0]


@torch.no_grad()
def _separate_logprob_sum(model, prefix: Sequence[int], cand: Sequence[int]) -> torch.Tensor:
    """Sum of log p(cand | prefix) from an ordinary forward of ``prefix + cand`` (no mask, default positions)."""
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([list(prefix) + list(cand)], dtype=torch.long, device=device)
    t = len(cand)
    # Logits of the last t+1 positions only; the ones at P-1 .. P+t-2 predict the candidate's tokens.
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=t + 1).logits[0, :-1].float()  # [t, V]
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, torch.tensor(list(cand), device=device)[:, None]).double().sum().cpu()


def score_candidates_separately(
    model,
    prefix_ids: Sequence[int],
    candidates: Sequence[Sequence[int]],
    mode: ScoreMode = "mean",
    unconditional_prefix_ids: Sequence[int] | None = None,
) -> torch.Tensor:
    """Reference scores [C]: one ordinary forward per (prefix + candidate) sequence (and per
    (unconditional prefix + candidate) for ``pmi``). The oracle of the packed scorer and the
    baseline of its benchmark; works with any attention implementation."""
    _check_mode(mode, unconditional_prefix_ids)
    _check_ids(prefix_ids, candidates, "user")
    if mode == "pmi":
        _check_ids(unconditional_prefix_ids, candidates, "unconditional prefix")
    sums = torch.stack([_separate_logprob_sum(model, prefix_ids, c) for c in candidates])
    groups = [sums]
    if mode == "pmi":
        groups.append(torch.stack([_separate_logprob_sum(model, unconditional_prefix_ids, c) for c in candidates]))
    counts = torch.tensor([len(c) for c in candidates], dtype=torch.float64)
    return _combine(torch.stack(groups), counts, mode)
