"""Argument checks shared by the sharpness measures (clear errors before any data pass)."""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch


def _as_number(value: Any) -> Any:
    """A one-element tensor as its Python number (users pass ``torch.tensor(1e-3)``); else ``value``."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        return value.item()
    return value


def positive_float(name: str, value: Any) -> float:
    """``value`` as a float; ``ValueError`` unless it is a positive finite real number
    (Python, numpy or one-element tensor)."""
    value = _as_number(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int; ``ValueError`` unless it is an integer >= 1 (Python, numpy or
    one-element integer tensor)."""
    value = _as_number(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def seed_int(value: Any) -> int:
    """``value`` as a random seed; ``ValueError`` unless it is an integer >= 0."""
    value = _as_number(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"seed must be a non-negative integer, got {value!r}")
    return int(value)


def choice(name: str, value: Any, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def ascent_dtype_arg(value: Any, solver: str, model: torch.nn.Module, device: Any, dtype: torch.dtype | None
                     ) -> str | None:
    """``value`` (``None``, ``"bfloat16"``/``"float16"`` or that torch dtype) as the name of the
    ascent steps' precision, checked before any data pass: ``ValueError`` for another value, with
    ``solver="lbfgsb"``, or where autocast would not take effect for the model measured on
    ``device`` in ``dtype`` (each ``None``: the model's own)."""
    from ..params import FlatParams
    from .solvers import ascent_dtype_for, check_autocast

    name = ascent_dtype_for(value, solver)
    if name is not None:
        flat = FlatParams(model)
        check_autocast(name, device if device is not None else flat.device, dtype if dtype is not None else flat.dtype)
    return name
