"""Argument checks whose messages name the bad value.

Every public hyperparameter goes through one of these before any state is
built, so a typo fails at construction with ``ValueError``/``TypeError``
instead of a silent NaN three thousand steps later.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any


def number(name: str, value: Any) -> float:
    """Return ``value`` as a float; TypeError for non-numbers (bools included)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"Invalid {name} value: {value}")
    return value


def non_negative(name: str, value: Any) -> float:
    value = number(name, value)
    if value < 0.0 or math.isinf(value):
        raise ValueError(f"Invalid {name} value: {value} (must be finite and >= 0)")
    return value


def positive(name: str, value: Any) -> float:
    value = number(name, value)
    if not 0.0 < value < math.inf:
        raise ValueError(f"Invalid {name} value: {value} (must be finite and > 0)")
    return value


def in_range(name: str, value: Any, low: float, high: float, *, high_open: bool = False, low_open: bool = False) -> float:
    """Check ``low <= value <= high`` with optionally open ends."""
    value = number(name, value)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"Invalid {name} value: {value} (must lie in {lo}{low}, {high}{hi})")
    return value


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} of type {type(value).__name__}")
    return value


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")
    if value < 1:
        raise ValueError(f"Invalid {name} value: {value} (must be >= 1)")
    return value


def optional_positive(name: str, value: Any) -> float | None:
    return None if value is None else positive(name, value)


def optional_non_negative(name: str, value: Any) -> float | None:
    return None if value is None else non_negative(name, value)


def optional_flag(name: str, value: Any) -> bool | None:
    return None if value is None else flag(name, value)


def below_one(name: str, value: Any) -> float:
    """``0 <= value < 1`` (a decay, a weight that must leave room for the rest)."""
    return in_range(name, value, 0.0, 1.0, high_open=True)


def above_zero(name: str, value: Any) -> float:
    """``0 < value <= 1`` (a probability or a fraction that must keep something)."""
    return in_range(name, value, 0.0, 1.0, low_open=True)


def fraction(name: str, value: Any) -> float:
    """``0 <= value <= 1``."""
    return in_range(name, value, 0.0, 1.0)


def optional_seed(name: str, value: Any) -> int | None:
    """None, or an int in ``[0, 2**64)``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or None, got {value!r} of type {type(value).__name__}")
    if not 0 <= value < 1 << 64:
        raise ValueError(f"Invalid {name} value: {value} (must be in [0, 2**64))")
    return value
