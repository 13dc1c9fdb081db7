"""Kernel-level ops (``sk.ops``): fused perturbation updates and the matrix-free Gaussian subspace."""
from __future__ import annotations

import torch

from .kernels.box_ascent import box_ascent_step_reference
from .kernels.subspace import GaussianSubspace

__all__ = ["box_ascent_step", "GaussianSubspace", "backends"]


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """One projected ascent step in the box ``|y_i| <= epsilon * (|x_i| + 1)``; returns ``(y_new, x + y_new)``."""
    return box_ascent_step_reference(x, y, g, epsilon, step, mode, y_prev, momentum)


def backends() -> dict[str, str]:
    """Which backends are usable here (value "ok") and why the others are not."""
    return {"torch": "ok"}
