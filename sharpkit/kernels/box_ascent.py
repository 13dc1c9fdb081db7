"""Projected-box perturbation update (one ascent step of ε-sharpness), torch reference.

Definition (DESIGN.md): with the box half-width ``b_i = epsilon * (|x_i| + 1)``,

    mode="sign":  y_new = clamp(y + step * sign(g), -b, b)
    mode="grad":  y_new = clamp(y + step * g,       -b, b)

and the perturbed weights ``w = x + y_new``.  The Auto-PGD variant (``y_prev`` and ``momentum``
given) takes ``z = clamp(y + step * dir)`` and returns
``y_new = clamp(y + momentum * (z - y) + (1 - momentum) * (y - y_prev))``.
NaN in any input propagates to the outputs (``clamp`` keeps NaN).
"""
from __future__ import annotations

import math
import numbers

import torch

from ..params import canonical_device
from ._backend import (DTYPE_CODES, DTYPE_SUFFIX, check_dense_tensor, cpp_module, for_autograd, launch,
                       multiprocessor_count, partially_overlaps, ptr, resolve)

MODES = ("sign", "grad")


def box_ascent_step_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    g: torch.Tensor,
    epsilon: float,
    step: float,
    mode: str = "sign",
    y_prev: torch.Tensor | None = None,
    momentum: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition, written as the unfused torch chain (computed in the inputs' dtype)."""
    bound = epsilon * (x.abs() + 1)
    # torch.sign(NaN) is 0, which would hide a NaN gradient: keep NaN, as the docstring promises.
    direction = torch.where(torch.isnan(g), g, torch.sign(g)) if mode == "sign" else g
    z = torch.minimum(torch.maximum(y + step * direction, -bound), bound)
    if y_prev is not None:
        z = y + momentum * (z - y) + (1 - momentum) * (y - y_prev)
        z = torch.minimum(torch.maximum(z, -bound), bound)
    # torch.maximum/minimum propagate NaN from either argument, as the fused kernels do.
    return z, x + z


# ---- validation and dispatch ------------------------------------------------------------------

def _finite_number(name: str, value) -> float:
    """``value`` as a float: a real Python or NumPy number (not a bool, not a tensor), finite."""
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, numbers.Real):
        raise ValueError(f"box_ascent_step: {name} must be a finite number, got {shown}")
    try:
        as_float = float(value)
    except OverflowError:  # an int beyond float's range
        as_float = math.inf
    if not math.isfinite(as_float):
        raise ValueError(f"box_ascent_step: {name} must be a finite number, got {shown}")
    return as_float


def _check_inputs(x, y, g, epsilon, step, mode, y_prev, momentum, out):
    """Raise a clear TypeError/ValueError for bad arguments (nothing is returned or modified)."""
    named = {"x": x, "y": y, "g": g}
    if y_prev is not None:
        named["y_prev"] = y_prev
    for name, t in named.items():
        check_dense_tensor("box_ascent_step", name, t)
    if not x.is_floating_point():
        raise TypeError(f"box_ascent_step: x must have a floating dtype, got {x.dtype}")
    for name, t in named.items():
        if t.shape != x.shape:
            raise ValueError(f"box_ascent_step: {name} has shape {tuple(t.shape)}, x has {tuple(x.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"box_ascent_step: {name} has dtype {t.dtype}, x has {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"box_ascent_step: {name} is on {t.device}, x is on {x.device}")
    if mode not in MODES:
        raise ValueError(f"box_ascent_step: mode must be one of {MODES}, got {mode!r}")
    if _finite_number("epsilon", epsilon) < 0:
        raise ValueError(f"box_ascent_step: epsilon must be >= 0, got {epsilon}")
    _finite_number("step", step)
    if (y_prev is None) != (momentum is None):
        raise ValueError("box_ascent_step: the momentum variant needs both y_prev and momentum")
    if momentum is not None:
        _finite_number("momentum", momentum)
    if out is not None:
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise TypeError("box_ascent_step: out must be a pair (y_new, w) of tensors")
        for name, t in zip(("out[0]", "out[1]"), out):
            check_dense_tensor("box_ascent_step", name, t)
            if t.shape != x.shape or t.dtype != x.dtype or t.device != x.device:
                raise ValueError(f"box_ascent_step: {name} must match x in shape, dtype and device "
                                 f"(got {tuple(t.shape)}, {t.dtype}, {t.device})")
            if not t.is_contiguous():
                raise ValueError(f"box_ascent_step: {name} must be contiguous (it is written in place)")
        if x.numel() > 0 and (out[0].data_ptr() == out[1].data_ptr() or partially_overlaps(out[0], out[1])):
            raise ValueError("box_ascent_step: out[0] and out[1] share memory; they must be separate buffers")


def box_ascent_step(
    x: torch.Tensor,
    y: torch.Tensor,
    g: torch.Tensor,
    epsilon: float,
    step: float,
    mode: str = "sign",
    y_prev: torch.Tensor | None = None,
    momentum: float | None = None,
    backend: str = "auto",
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One projected ascent step in the box ``|y_i| <= epsilon * (|x_i| + 1)``, fused into one pass.

    Args:
        x: the weights (any shape, floating dtype).  y: the current perturbation.  g: the gradient
            of the loss at ``x + y``.  All of the same shape, dtype and device.
        epsilon: relative box size (>= 0, dimensionless; Keskar et al. use 1e-3 and 5e-4).
        step: ascent step length (in the units of y).
        mode: ``"sign"`` (l-infinity ascent, y + step * sign(g)) or ``"grad"`` (y + step * g).
        y_prev, momentum: both or neither; the Auto-PGD step
            ``y_new = P(y + momentum (z - y) + (1 - momentum)(y - y_prev))`` with ``z = P(y + step dir)``.
        backend: ``"auto"`` (fastest usable for x's device), ``"torch"``, ``"cpp"``, ``"triton"``,
            ``"cuda"`` or ``"cupy"`` (see :func:`sharpkit.ops.backends`).
        out: optional contiguous ``(y_new, w)`` buffers written in place (no allocation); they may
            alias y (or x) since every element is read before it is written.  They must not share
            memory with each other; a buffer that overlaps an input other than element for element
            (a shifted view of the same storage) is handled through temporaries.

    Returns:
        ``(y_new, w)`` with ``w = x + y_new``, contiguous, of x's shape.  NaN or inf in any input
        propagates as in :func:`box_ascent_step_reference`.  Non-contiguous inputs are accepted
        (copied to contiguous first).
    """
    _check_inputs(x, y, g, epsilon, step, mode, y_prev, momentum, out)
    # Python floats from here on: a NumPy scalar times a tensor can turn into a NumPy array.
    epsilon, step = float(epsilon), float(step)
    momentum = float(momentum) if momentum is not None else None
    backend = for_autograd(backend, (x, y, g, y_prev), "box_ascent_step")
    name = resolve(backend, x.device, x.dtype, "box_ascent_step")
    if name == "torch":
        y_new, w = box_ascent_step_reference(x, y, g, epsilon, step, mode, y_prev, momentum)
        if out is None:
            return y_new.contiguous(), w.contiguous()
        out[0].copy_(y_new)
        out[1].copy_(w)
        return out[0], out[1]
    x, y, g = x.contiguous(), y.contiguous(), g.contiguous()
    y_prev = y_prev.contiguous() if y_prev is not None else None
    y_new, w = out if out is not None else (torch.empty_like(x), torch.empty_like(x))
    if out is not None and any(partially_overlaps(o, t) for o in out for t in (x, y, g, y_prev) if t is not None):
        # An out buffer that overlaps an input other than element for element (e.g. a shifted view
        # of the same storage) would overwrite elements still to be read: work in fresh buffers.
        y_new, w = box_ascent_step(x, y, g, epsilon, step, mode, y_prev, momentum, backend=name)
        out[0].copy_(y_new)
        out[1].copy_(w)
        return out[0], out[1]
    n = x.numel()
    mu = float(momentum) if momentum is not None else 0.0
    if n == 0:
        return y_new, w
    if name == "cpp":
        cpp_module()[0].box_ascent(x.data_ptr(), y.data_ptr(), g.data_ptr(),
                                   0 if y_prev is None else y_prev.data_ptr(), y_new.data_ptr(), w.data_ptr(),
                                   n, DTYPE_CODES[x.dtype], float(epsilon), float(step), mode == "sign", mu, 1.0 - mu)
    elif name == "triton":
        from . import _triton

        _triton.box_ascent(x, y, g, y_prev, y_new, w, float(epsilon), float(step), mode == "sign", mu)
    else:  # cuda, cupy: the same kernel, compiled by nvcc or by CuPy
        threads = 256
        per_block = threads * CUDA_UNROLL
        blocks = min(_cdiv(n, per_block), multiprocessor_count(_index(x.device)) * 32)
        launch(name, "box_ascent.cu", f"sk_box_ascent_{DTYPE_SUFFIX[x.dtype]}", (blocks,), (threads,),
               [ptr(x), ptr(y), ptr(g), ptr(y_prev), ptr(y_new), ptr(w), ("q", n), ("d", float(epsilon)),
                ("d", float(step)), ("d", mu), ("d", 1.0 - mu), ("i", int(mode == "sign")),
                ("i", int(y_prev is not None))], x.device)
    return y_new, w


# Elements per thread per grid step in csrc/box_ascent.cu (SK_BOX_UNROLL).
CUDA_UNROLL = 4


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _index(device: torch.device) -> int:
    return canonical_device(device).index
