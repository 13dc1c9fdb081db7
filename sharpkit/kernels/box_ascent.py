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

import torch

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
    direction = torch.sign(g) if mode == "sign" else g
    z = torch.minimum(torch.maximum(y + step * direction, -bound), bound)
    if y_prev is not None:
        z = y + momentum * (z - y) + (1 - momentum) * (y - y_prev)
        z = torch.minimum(torch.maximum(z, -bound), bound)
    # torch.maximum/minimum propagate NaN from either argument, as the fused kernels do.
    return z, x + z
