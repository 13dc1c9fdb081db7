"""Function-preserving rescaling of ReLU networks (Dinh et al. 2017, *Sharp Minima Can Generalize*).

For ``... → L₁ → [BN] → ReLU → L₂ → ...`` the map ``(θ₁, θ₂) → (α θ₁, θ₂ / α)`` with α > 0 leaves
the function unchanged because ReLU is positively homogeneous: ``relu(α z) = α relu(z)``.  The
scaled block θ₁ is the affine map right before the ReLU (the BatchNorm's weight and bias when a
BatchNorm sits there, otherwise the Linear/Conv layer's weight and bias); θ₂ is the weight of the
next Linear/Conv layer.  Between the ReLU and that layer only positively homogeneous modules
(dropout, max/average pooling, flatten, identity, further ReLUs) are allowed.

The model's leaf modules must run in the order they are registered (``nn.Sequential``-style; a
module registered at several places runs at each), and the ReLU must be an ``nn.ReLU`` module.
The rescaled parameters must belong to their layer alone (not tied to another module's, and the
layer not registered twice): scaling a shared tensor would change every use of it.
"""
from __future__ import annotations

import copy
import numbers

import torch
from torch import nn

from ._checks import _as_number, positive_float

__all__ = ["reparameterize_relu"]

_AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (nn.modules.batchnorm._BatchNorm,)
# Modules that commute with multiplication by a positive scalar.
_HOMOGENEOUS = (nn.ReLU, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Flatten, nn.Identity,
                nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    # Every registration, a module registered twice included: nn.Sequential(fc, relu, fc2, relu, ...)
    # with one ReLU object runs it at both places.
    return [(name, m) for name, m in model.named_modules(remove_duplicate=False) if not list(m.children())]


def _check_not_shared(model: nn.Module, writes: list[tuple[str, str]]) -> None:
    """ValueError where a tensor the rescaling writes (``(module name, parameter name)`` pairs)
    is also used elsewhere in ``model``: a module registered under two names, or a parameter tied
    to another module's (``b.weight = a.weight``).  Scaling it would scale every use, so the
    returned model would compute another function."""
    modules = dict(model.named_modules(remove_duplicate=False))
    written = {id(t): f"{name}.{key}" for name, key in writes
               if (t := modules[name]._parameters.get(key)) is not None}
    for name, module in modules.items():
        for key, t in module._parameters.items():
            place = f"{name}.{key}"
            if t is not None and id(t) in written and written[id(t)] != place:
                raise ValueError(f"the rescaling would write {written[id(t)]!r}, which is also {place!r} (a shared "
                                 "module or tied parameter): scaling it scales every use, and the function changes")


def reparameterize_relu(model: nn.Module, alpha: float, layer: int | str = 0) -> nn.Module:
    """A new model computing the same function with one ReLU block scaled by α and the next by 1/α.

    Args:
        model: left untouched; a deep copy is modified and returned.
        alpha: positive finite scale factor.
        layer: which ``nn.ReLU`` (index among the model's ReLU modules in registration order,
            default 0, or its module name as in ``named_modules()``).

    Returns:
        The rescaled copy (same parameter layout, so the flat vectors are comparable).

    Raises:
        ValueError: alpha not positive, no such ReLU, no affine block before it or no Linear/Conv
            after it, or a non-homogeneous module in between.
    """
    alpha = positive_float("alpha", alpha)  # (numpy scalars and one-element tensors too)
    layer = _as_number(layer)
    leaves = _leaves(model)
    relus = [i for i, (_, m) in enumerate(leaves) if isinstance(m, nn.ReLU)]
    if isinstance(layer, str):
        where = [i for i in relus if leaves[i][0] == layer]
        if not where:
            raise ValueError(f"no nn.ReLU module named {layer!r}; ReLUs: {[leaves[i][0] for i in relus]}")
        at = where[0]
    elif isinstance(layer, numbers.Integral) and not isinstance(layer, bool):
        if not -len(relus) <= layer < len(relus):
            raise ValueError(f"layer={layer} is out of range: the model has {len(relus)} nn.ReLU module(s)")
        at = relus[layer]
    else:
        raise TypeError(f"layer must be an int or a module name, got {type(layer).__name__}")

    before = at - 1
    if before < 0 or not isinstance(leaves[before][1], _AFFINE + _NORM):
        what = type(leaves[before][1]).__name__ if before >= 0 else "nothing"
        raise ValueError(f"the ReLU {leaves[at][0]!r} must directly follow a Linear/Conv or BatchNorm layer, not {what}")
    scaled = leaves[before]
    if isinstance(scaled[1], _NORM) and not scaled[1].affine:
        raise ValueError(f"BatchNorm {scaled[0]!r} has no affine parameters to rescale")
    after = at + 1
    while after < len(leaves) and not isinstance(leaves[after][1], _AFFINE):
        if not isinstance(leaves[after][1], _HOMOGENEOUS):
            raise ValueError(f"module {leaves[after][0]!r} ({type(leaves[after][1]).__name__}) between the ReLU and "
                             "the next layer is not positively homogeneous; the rescaling would change the function")
        after += 1
    if after == len(leaves):
        raise ValueError(f"no Linear/Conv layer follows the ReLU {leaves[at][0]!r}")

    _check_not_shared(model, [(scaled[0], "weight"), (scaled[0], "bias"), (leaves[after][0], "weight")])

    new = copy.deepcopy(model)
    modules = dict(new.named_modules(remove_duplicate=False))
    first, second = modules[scaled[0]], modules[leaves[after][0]]
    with torch.no_grad():
        first.weight.mul_(alpha)
        if first.bias is not None:
            first.bias.mul_(alpha)
        second.weight.div_(alpha)
    return new
