"""Argument checks shared by the sharpness measures (clear errors before any data pass)."""
from __future__ import annotations

import math
from typing import Any


def positive_float(name: str, value: Any) -> float:
    """``value`` as a float; ``ValueError`` unless it is a positive finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int; ``ValueError`` unless it is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def choice(name: str, value: Any, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value
