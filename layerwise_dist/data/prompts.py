"""Ranking prompts: history titles + lettered candidates, answered by one letter token
(listwise); or the history as a plain-text list continued by each candidate title (pointwise).

Listwise: with a chat template the user message holds the instructions, history and
candidates and the assistant message is the letter; without one the prompt is
plain text ending in ``"\\nAnswer: "`` followed by the letter. Either way the
model's score for candidate ``c`` is the log-probability of ``c``'s letter token
at the answer position, so every letter must be exactly one token there
(:func:`label_token_ids` checks it).

Pointwise (:func:`render_pointwise`): plain text, never a chat template; the
template and scoring rules are those of :mod:`layerwise_dist.pointwise`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import DataError

LABELS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class RankExample:
    """One candidate-ranking prompt: the answer is ``LABELS[target_index]``."""

    user_id: str
    history: list[str]
    history_titles: list[str]
    candidates: list[str]
    candidate_titles: list[str]
    target_index: int
    split: str
    category: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return self.candidates[self.target_index]

    @property
    def answer(self) -> str:
        return LABELS[self.target_index]


def user_message(example: RankExample) -> str:
    """Instructions, history (oldest first) and lettered candidates."""
    if len(example.candidates) > len(LABELS):
        raise DataError(f"user {example.user_id}: {len(example.candidates)} candidates, at most {len(LABELS)}")
    what = f"{example.category.replace('_', ' ')} products" if example.category else "products"
    lines = [f"A customer bought these {what}, oldest first:"]
    lines += [f"{n}. {title}" for n, title in enumerate(example.history_titles, 1)] or ["(nothing yet)"]
    lines.append("Which of these candidates will the customer buy next?")
    lines += [f"{LABELS[n]}. {title}" for n, title in enumerate(example.candidate_titles)]
    lines.append("Reply with the letter of one candidate only.")
    return "\n".join(lines)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(example: RankExample, tokenizer: Any = None, system_prompt: str = "") -> tuple[str, str]:
    """(prompt text, answer text): the chat template's generation prompt when the
    tokenizer has one, else plain text ending in ``"\\nAnswer: "``; the answer is the letter.

    ``system_prompt`` (``data.system_prompt``): with a chat template, ``""`` passes no
    system message, so the template's own default applies (SmolLM2's template then writes
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face"); any other text
    is the system message. Without a chat template a non-empty system prompt is the first
    paragraph of the plain text."""
    message = user_message(example)
    if has_chat_template(tokenizer):
        messages = [{"role": "user", "content": message}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        prompt = (f"{system_prompt}\n\n" if system_prompt else "") + message + "\nAnswer: "
    return prompt, example.answer


def rendered_text(example: RankExample, tokenizer: Any, formulation: str = "listwise", **settings: Any) -> str:
    """The exact text a model reads for ``example`` (what ``layerwise-dist data show-prompt`` prints).

    listwise: the prompt (system prompt and chat template included) followed by the answer
    letter that training supervises; scoring reads the logits just before that letter.
    pointwise: the history prefix, then each candidate's continuation as a Python string
    literal (leading space and newline visible), each scored right after the same prefix.
    ``settings``: ``system_prompt`` (listwise), ``category_phrase`` (pointwise)."""
    if formulation == "pointwise":
        prefix, continuations, _ = render_pointwise(example, settings.get("category_phrase", ""))
        blocks = [
            f"--- candidate {n}{' (target)' if n == example.target_index else ''}, continuing the text above: {c!r}\n"
            for n, c in enumerate(continuations)
        ]
        return prefix + "\n" + "".join(blocks)
    prompt, answer = render_prompt(example, tokenizer, settings.get("system_prompt", ""))
    return prompt + answer


def _ids(tokenizer: Any, text: str, chat: bool) -> list[int]:
    # A chat template writes its own BOS; plain text gets the tokenizer's special tokens.
    return list(tokenizer(text, add_special_tokens=not chat)["input_ids"])


def encode(prompt: str, answer: str, tokenizer: Any) -> tuple[list[int], int]:
    """Token ids of prompt + answer and the index of the answer token (the last one).

    The ids are those of the joined text, so a BPE that merges the prompt's trailing
    space into the letter (``" A"``) is handled; the answer must end up a single token.
    """
    chat = has_chat_template(tokenizer)
    full = _ids(tokenizer, prompt + answer, chat)
    head = _ids(tokenizer, prompt, chat)
    common = 0
    for a, b in zip(full, head):
        if a != b:
            break
        common += 1
    if len(full) - common != 1:
        pieces = tokenizer.convert_ids_to_tokens(full[common:])
        raise DataError(
            f"answer {answer!r} is {len(full) - common} tokens {pieces} after the prompt, not one: "
            "use a tokenizer or chat template where each label letter is a single token"
        )
    return full, len(full) - 1


def label_token_ids(tokenizer: Any, num_candidates: int) -> list[int]:
    """Token id of each letter A, B, ... as it appears in the answer position.

    Raises DataError when a letter is several tokens or two letters share a token.
    """
    if not 1 <= num_candidates <= len(LABELS):
        raise DataError(f"num_candidates must be in [1, {len(LABELS)}]; got {num_candidates}")
    probe = RankExample("probe", ["x"], ["an item"], ["y"], ["a candidate"], 0, "probe")
    prompt, _ = render_prompt(probe, tokenizer)
    ids = []
    for letter in LABELS[:num_candidates]:
        full, pos = encode(prompt, letter, tokenizer)
        ids.append(full[pos])
    if len(set(ids)) != len(ids):
        seen: dict[int, str] = {}
        for letter, tid in zip(LABELS, ids):
            if tid in seen:
                raise DataError(
                    f"label letters {seen[tid]!r} and {letter!r} share token id {tid} in the answer position"
                )
            seen[tid] = letter
    return ids


class TitleCutter:
    """Cuts titles to ``max_tokens`` tokens of ``tokenizer`` (whitespace words without one), memoised."""

    def __init__(self, tokenizer: Any, max_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self._cache: dict[str, str] = {}
        self._by_item: dict[str, str] = {}
        self._offsets = bool(getattr(tokenizer, "is_fast", False))

    def __call__(self, title: str) -> str:
        out = self._cache.get(title)
        if out is None:
            out = self._cache[title] = self._cut(title)
        return out

    def many(self, items: list[str], titles: dict[str, str]) -> list[str]:
        """Cut titles of ``items`` (memoised per item id)."""
        by_item = self._by_item
        out = []
        for item in items:
            cut = by_item.get(item)
            if cut is None:
                cut = by_item[item] = self(titles[item])
            out.append(cut)
        return out

    def _cut(self, title: str) -> str:
        n = self.max_tokens
        if self.tokenizer is None:
            return " ".join(title.split()[:n])
        if self._offsets:
            enc = self.tokenizer(title, add_special_tokens=False, return_offsets_mapping=True)
            offsets = enc["offset_mapping"]
            if len(offsets) <= n:
                return title
            return title[: offsets[n - 1][1]].rstrip()
        ids = self.tokenizer(title, add_special_tokens=False)["input_ids"]
        if len(ids) <= n:
            return title
        return self.tokenizer.decode(ids[:n]).rstrip("\ufffd").strip()


# --------------------------------------------------------------------------- pointwise

# Plural and singular item phrases of the pointwise template, by Amazon category name.
CATEGORY_PHRASES: dict[str, tuple[str, str]] = {
    "All_Beauty": ("beauty products", "beauty product"),
    "Beauty_and_Personal_Care": ("beauty products", "beauty product"),
    "Video_Games": ("video games", "video game"),
    "Books": ("books", "book"),
    "Kindle_Store": ("e-books", "e-book"),
    "Movies_and_TV": ("movies and TV shows", "movie or TV show"),
    "CDs_and_Vinyl": ("music albums", "music album"),
    "Toys_and_Games": ("toys and games", "toy or game"),
    "Electronics": ("electronics products", "electronics product"),
}


def pointwise_phrases(category: str, category_phrase: str = "") -> tuple[str, str]:
    """(plural, singular) item phrase of the pointwise prompt.

    ``category_phrase`` (``data.category_phrase``) wins when given, its singular being
    the phrase without a final "s"; else the category's entry of
    :data:`CATEGORY_PHRASES`; else the category lowercased with underscores as
    spaces plus " items" ("Pet_Supplies" -> "pet supplies items").
    """
    from ..pointwise import _singular

    if category_phrase.strip():
        plural = " ".join(category_phrase.split())
        return plural, _singular(plural)
    if category in CATEGORY_PHRASES:
        return CATEGORY_PHRASES[category]
    base = " ".join(category.replace("_", " ").lower().split())
    plural = f"{base} items" if base else "items"
    return plural, plural[:-1]


def render_pointwise(example: RankExample, category_phrase: str = "") -> tuple[str, list[str], str]:
    """(history prefix, candidate continuations in the example's order, unconditional prefix).

    Plain text, no chat template: the prefix lists the example's history titles
    (already cut to ``history_len`` titles of ``title_max_tokens`` tokens by
    ``build_examples``) and ends with ``"\\n-"``; each continuation is
    ``" " + title + "\\n"`` (see :mod:`layerwise_dist.pointwise`).
    """
    from ..pointwise import candidate_continuation, render_history_prefix

    plural, singular = pointwise_phrases(example.category, category_phrase)
    try:
        prefix = render_history_prefix(example.history_titles, plural, item_phrase=singular)
        continuations = [candidate_continuation(t) for t in example.candidate_titles]
    except ValueError as e:
        raise DataError(f"user {example.user_id} split {example.split}: {e}") from None
    return prefix, continuations, render_history_prefix([], plural, item_phrase=singular)
