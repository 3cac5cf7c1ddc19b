"""Generation and answer extraction: greedy (steered, if asked) completions, the number, option
letter or label word a completion gives, and how often one answer is given (`habit_rate`)."""

from __future__ import annotations

import importlib
import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from expertsteer.data.tasks import LETTERS
from expertsteer.models.batching import token_batches
from expertsteer.models.causal_lm import CausalLM


@torch.inference_mode()
def generate_answers(
    decoder: CausalLM,
    prompts: list[str],
    intervention: Any | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    max_tokens: int | None = None,
) -> list[str]:
    """Greedy completions of `prompts` (chat-formatted as the decoder does), steered if asked,
    `batch_size` prompts per call in order; with `max_tokens`, also at most that many padded
    tokens per call (prompts x (longest prompt + `max_new_tokens`); a longer one goes alone)."""
    if not prompts:
        raise ValueError("no prompts to generate from")
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(
            f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}"
        )
    steering = None if intervention is None else importlib.import_module("expertsteer.method.steer")
    lengths = [0] * len(prompts) if max_tokens is None else decoder.token_lengths(prompts)
    texts: list[str] = []
    for group in token_batches([n + max_new_tokens for n in lengths], batch_size, max_tokens):
        chunk = [prompts[k] for k in group]
        if steering is None:
            texts.extend(decoder.generate(chunk, max_new_tokens=max_new_tokens))
        else:
            texts.extend(
                steering.steered_generate(
                    decoder, chunk, _rows(intervention, group), max_new_tokens=max_new_tokens
                )
            )
    return texts


def _rows(intervention: Any, group: list[int]) -> Any:
    """The intervention of one generate call's prompts (a conditioned one keeps theirs)."""
    select = getattr(intervention, "for_rows", None)
    return intervention if select is None else select(group)


# A number not glued to a word or a preceding dot: optional sign and dollar sign (either
# order), thousands groups "1,234" or plain digits, optional decimals; a sentence's trailing
# period is not a decimal point. "10 - 5" is not read as -5 (no space after the sign).
_NUMBER = re.compile(
    r"(?<![\w.])(?P<sign>-?)\$?(?P<sign2>-?)"
    r"(?P<body>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
)


def extract_number(text: str) -> float | None:
    """The last number in `text` ("1,234", "-5", "$3.50", "42." ...), or None if there is none."""
    normalized = text.replace("\u2212", "-")
    matches = list(_NUMBER.finditer(normalized))
    if not matches:
        return None
    last = matches[-1]
    value = float(last["body"].replace(",", ""))
    return -value if (last["sign"] or last["sign2"]) else value


def numbers_match(pred: float | None, gold: float, tol: float = 1e-6) -> bool:
    """Whether `pred` equals `gold` within `tol`, relative for |gold| > 1; None never matches."""
    if pred is None or not math.isfinite(pred):
        return False
    return abs(pred - gold) <= tol * max(1.0, abs(gold))


_LEAD_LETTER = re.compile(r"^[\s*_(\[\"'`]*([A-J])(?:[.):\]*]|\s*$|\s*\n)")
_NAMED_LETTER = re.compile(
    r"(?i:answer|option|choice)(?:\s+is)?\s*[:\-]?\s*[*_(\[]*([A-J])(?![A-Za-z])"
)


def _earliest_phrase(text: str, phrases: Sequence[str]) -> int | None:
    """Index of the phrase occurring first as whole words in `text` (ties: the longer one)."""
    lowered = text.lower()
    best: tuple[int, int] | None = None
    found = None
    for index, phrase in enumerate(phrases):
        if not phrase.strip():
            continue
        match = re.search(rf"(?<!\w){re.escape(phrase.strip().lower())}(?!\w)", lowered)
        if match is None:
            continue
        key = (match.start(), -len(phrase))
        if best is None or key < best:
            best, found = key, index
    return found


def extract_option(text: str, choices: Sequence[str], letters: bool) -> int | None:
    """The option a generated answer names, or None.

    With `letters` (choice tasks): a leading letter ("B", "(B)", "B. ..."), then "answer is B",
    then the earliest option text. Otherwise (label words): the earliest label word.
    """
    if letters:
        valid = LETTERS[: len(choices)]
        for pattern in (_LEAD_LETTER, _NAMED_LETTER):
            match = pattern.search(text)
            if match and match.group(1) in valid:
                return valid.index(match.group(1))
    return _earliest_phrase(text, choices)


def habit_rate(predictions: Sequence[Any]) -> float:
    """Share of items given the single most common prediction (unanswered items never count)."""
    if not predictions:
        raise ValueError("no predictions")
    answered = Counter(p for p in predictions if p is not None)
    return max(answered.values(), default=0) / len(predictions)
