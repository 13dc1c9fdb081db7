"""Argument checks shared by the sharpness measures (clear errors before any data pass)."""
from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
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
    """``value`` as a random seed; ``ValueError`` unless it is an integer in [0, 2⁶⁴) (the range of
    the subspace's Philox key and of torch's generators, checked before any data pass)."""
    value = _as_number(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {value!r}")
    return int(value)


def flag(name: str, value: Any) -> bool:
    """``value`` as a bool; ``ValueError`` unless it is one (Python, numpy or one-element bool
    tensor): a string such as ``"False"`` would otherwise be taken as True."""
    value = _as_number(value)
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def dtype_arg(value: Any) -> torch.dtype | None:
    """``value`` (``None``: the model's own) as the precision the model is evaluated in;
    ``ValueError`` unless it is a floating-point ``torch.dtype`` (as :func:`sharpkit.hessian`
    takes it; a name such as ``"float64"`` is refused there too)."""
    if value is None or (isinstance(value, torch.dtype) and value.is_floating_point):
        return value
    raise ValueError(f"dtype must be None or a floating-point torch.dtype (e.g. torch.float64), got {value!r}")


def measured_dtype(model: torch.nn.Module, dtype: torch.dtype | None) -> torch.dtype | None:
    """The precision a sharpness is measured in: ``dtype`` (already checked by :func:`dtype_arg`),
    or for ``None`` the model's own, except float32 for a model whose trainable parameters are in
    a format of fewer than 32 bits (bfloat16, float16; their values convert exactly).

    A sharpness is a small change of the loss under a small relative change of the parameters, both
    below what 16 bits resolve: on a bfloat16 MLP ``x + y`` with ``|y| <= 1e-3 (|x| + 1)`` rounds back
    to ``x`` for most coordinates and the loss to 2⁻⁸ of itself, so ε-sharpness at ε = 1e-3 came out
    exactly 0 (0.074 in float32).  An explicit 16-bit ``dtype`` is a ``ValueError``; low-precision
    steps are ``ascent_dtype``'s job, with the values still measured in float32.
    ``None`` stays ``None`` for a model without trainable parameters (named as such later)."""
    if dtype is not None:
        if dtype.itemsize < 4:
            raise ValueError(f"dtype={dtype} cannot resolve a sharpness: perturbations of relative size epsilon/rho "
                             f"and the loss changes they cause are below {dtype}'s rounding (the value would be "
                             "rounding noise, often exactly 0); measure in torch.float32 or torch.float64 (dtype=None "
                             "measures a 16-bit model in float32) and use ascent_dtype for low-precision steps")
        return dtype
    own = next((p.dtype for p in model.parameters() if p.requires_grad), None)
    if own is not None and own.is_floating_point and own.itemsize < 4:
        return torch.float32
    return None


def device_arg(value: Any) -> torch.device | None:
    """``value`` (``None``: the model's own) as the device the model is evaluated on, checked
    before any data pass (:func:`sharpkit.inputs.resolve_device`): ``ValueError`` naming the
    device for an unknown name or one this machine or torch build does not have."""
    if value is None:
        return None
    from ..inputs import resolve_device  # (here: inputs imports the audit, which imports the solvers)

    return resolve_device(value)


def choice(name: str, value: Any, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def ascent_dtype_arg(value: Any, solver: str, model: torch.nn.Module, device: Any, dtype: torch.dtype | None
                     ) -> str | None:
    """``value`` (``None``, ``"bfloat16"``/``"float16"`` or that torch dtype) as the name of the
    ascent steps' precision, checked before any data pass: ``ValueError`` for another value, with
    ``solver="lbfgsb"``, or where autocast would not take effect for the model measured on
    ``device`` in ``dtype`` (each ``None``: the model's own; ``dtype`` already checked by
    :func:`dtype_arg`; ``device`` is checked for availability by :func:`device_arg` after this, so
    that a device type without autocast, e.g. meta, is named as such)."""
    from ..params import FlatParams
    from .solvers import ascent_dtype_for, check_autocast

    name = ascent_dtype_for(value, solver)
    if name is not None:
        flat = FlatParams(model)
        if device is not None:
            try:
                device = torch.device(device)
            except (RuntimeError, TypeError):  # not a device name: the ValueError of the device check
                device_arg(device)
                raise
        check_autocast(name, device if device is not None else flat.device, dtype if dtype is not None else flat.dtype)
    return name
