"""Batches sized by tokens, and out-of-memory errors that name the option to lower.

A left-padded batch costs memory in proportion to its items times its longest sequence, so a
fixed item count that fits short prompts can run a 7-8B model out of memory on long ones. A
token budget caps that padded size instead: long texts make smaller batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from expertsteer.errors import ExpertSteerError


class BatchMemoryError(ExpertSteerError, MemoryError):
    """A batch did not fit in the device's memory; the message names the option to lower."""


def check_budget(option: str, max_tokens: int | None) -> None:
    """Refuse a token budget that is not a positive integer (None: no budget), naming `option`."""
    if max_tokens is not None and (isinstance(max_tokens, bool) or max_tokens < 1):
        raise ValueError(f"{option} must be a positive number of tokens or null, got {max_tokens}")


def token_batches(
    lengths: Sequence[int], max_items: int, max_tokens: int | None = None
) -> list[list[int]]:
    """Consecutive groups of indices into `lengths`, in order, that cover every index once.

    Each group has at most `max_items` indices and, with `max_tokens`, a padded size (its item
    count times its longest length) of at most `max_tokens`; an item longer than the budget
    on its own forms a group alone. Without `max_tokens`: groups of `max_items`, as before
    budgets existed.
    """
    if max_items < 1:
        raise ValueError(f"max_items must be >= 1, got {max_items}")
    check_budget("max_tokens", max_tokens)
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index, length in enumerate(lengths):
        widest = max(longest, length)
        full = len(current) == max_items
        over = max_tokens is not None and (len(current) + 1) * widest > max_tokens
        if current and (full or over):
            groups.append(current)
            current, widest = [], length
        current.append(index)
        longest = widest
    if current:
        groups.append(current)
    return groups


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is a device (or host allocator) out-of-memory error."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


@contextlib.contextmanager
def naming_out_of_memory(what: str, advice: str) -> Iterator[None]:
    """Turn an out-of-memory error raised inside into a `BatchMemoryError` saying what ran
    out (`what`) and which option to lower (`advice`)."""
    try:
        yield
    except RuntimeError as error:  # torch.OutOfMemoryError is one
        if not is_out_of_memory(error):
            raise
        raise BatchMemoryError(f"out of memory during {what}: {advice}") from error
