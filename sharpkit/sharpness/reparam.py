"""Function-preserving rescaling of ReLU networks (Dinh et al. 2017, *Sharp Minima Can Generalize*).

For ``... → L₁ → [BN] → ReLU → L₂ → ...`` the map ``(θ₁, θ₂) → (α θ₁, θ₂ / α)`` with α > 0 leaves
the function unchanged because ReLU is positively homogeneous: ``relu(α z) = α relu(z)``.  The
scaled block θ₁ is the affine map right before the ReLU (the BatchNorm's weight and bias when a
BatchNorm sits there, otherwise the Linear/Conv layer's weight and bias); θ₂ is the weight of the
next Linear/Conv layer.  Between the ReLU and that layer only positively homogeneous modules
(dropout, max/average pooling, flatten, identity, further ReLUs) are allowed.

The model's leaf modules must run in the order they are registered (``nn.Sequential``-style),
and the ReLU must be an ``nn.ReLU`` module.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

__all__ = ["reparameterize_relu"]

_AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (nn.modules.batchnorm._BatchNorm,)
# Modules that commute with multiplication by a positive scalar.
_HOMOGENEOUS = (nn.ReLU, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Flatten, nn.Identity,
                nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if not list(m.children())]


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
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
    leaves = _leaves(model)
    relus = [i for i, (_, m) in enumerate(leaves) if isinstance(m, nn.ReLU)]
    if isinstance(layer, str):
        where = [i for i in relus if leaves[i][0] == layer]
        if not where:
            raise ValueError(f"no nn.ReLU module named {layer!r}; ReLUs: {[leaves[i][0] for i in relus]}")
        at = where[0]
    elif isinstance(layer, int) and not isinstance(layer, bool):
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

    new = copy.deepcopy(model)
    modules = dict(new.named_modules())
    first, second = modules[scaled[0]], modules[leaves[after][0]]
    with torch.no_grad():
        first.weight.mul_(alpha)
        if first.bias is not None:
            first.bias.mul_(alpha)
        second.weight.div_(alpha)
    return new
