"""Checks shared by the settings dataclasses' `__post_init__`: each error names its option.

Settings reach a dataclass from Python, from a LightningCLI config (jsonargparse has already
checked the types there) and from an experiment YAML (nothing has checked them yet), so the
checks are strict about types: `true` is not an integer and `"8"` is not a number.
"""

from __future__ import annotations

import functools
import math
import types
import typing
from dataclasses import fields
from typing import Any, Literal, TypeVar

T = TypeVar("T")


def literal_choices(annotation: Any) -> tuple[Any, ...] | None:
    """The values a `Literal[...]` (or `Literal[...] | None`) annotation allows; None for any
    other annotation."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [literal_choices(arg) for arg in typing.get_args(annotation)]
        nullable = type(None) in typing.get_args(annotation)
        literals = [choice for found in options if found for choice in found]
        if literals:
            return (*literals, None) if nullable else tuple(literals)
    return None


@functools.cache
def _choice_fields(cls: type) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    hints = typing.get_type_hints(cls)
    found = ((f.name, literal_choices(hints[f.name])) for f in fields(cls))
    return tuple((name, choices) for name, choices in found if choices is not None)


def check_choices(settings: Any) -> None:
    """Every `Literal`-typed field of a settings dataclass holds one of its choices."""
    for name, choices in _choice_fields(type(settings)):
        check_choice(name, getattr(settings, name), choices)


def check_choice(option: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{option} must be one of {list(choices)}, got {value!r}")


def _real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_integer(option: str, value: Any, minimum: int) -> None:
    """`value` must be an int (not a bool or float) of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{option} must be an integer >= {minimum}, got {value!r}")


def check_number(option: str, value: Any, positive: bool = True) -> None:
    """`value` must be a finite real number (> 0 if `positive`, else >= 0)."""
    if not _real(value) or not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{option} must be a finite number {bound}, got {value!r}")


def check_numbers(option: str, values: Any, positive: bool = True) -> None:
    """A non-empty list (or tuple) of finite numbers, each > 0 (`positive`) or >= 0."""
    if not isinstance(values, list | tuple) or not values:
        raise ValueError(f"{option} must be a non-empty list of numbers, got {values!r}")
    for value in values:
        check_number(option, value, positive)


def check_bool(option: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{option} must be true or false, got {value!r}")


def settings_of(cls: type[T], value: T | dict[str, Any]) -> T:
    """`value` as a `cls`: a dict (the hyperparameters of a checkpoint, which stores settings as
    plain dicts so that `torch.load(weights_only=True)` reads it) is built into one."""
    return cls(**value) if isinstance(value, dict) else value
