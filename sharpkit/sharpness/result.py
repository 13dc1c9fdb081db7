"""The result of a sharpness measurement."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["SharpnessResult"]


@dataclass
class SharpnessResult:
    """One sharpness measurement.

    Attributes:
        value: the sharpness.  Keskar: ``100 * (max_loss - loss) / (1 + loss)`` (percent);
            adaptive: ``max_loss - loss`` (worst case) or mean perturbed loss minus loss (average).
        loss: the loss at the model's parameters (sample-weighted mean over the data; for
            m-sharpness the sample-weighted mean of the per-chunk losses).
        max_loss: the loss at the perturbation found (average case: the mean perturbed loss).
        perturbation: the parameter-space perturbation, ``(n,)`` in the flat parameter order
            (m-sharpness: ``(num_chunks, n)``, one row per chunk); ``None`` for the average case.
        num_evals: data passes (each a loss, or a loss and its gradient) per problem.
        time_s: wall-clock seconds of the whole call.
        solver: ``"lbfgsb"``, ``"pga"``, ``"apgd"`` or ``"sampling"`` (average case).
        measure: ``"keskar"``, ``"adaptive-worst"`` or ``"adaptive-average"``.
        radius: ε (Keskar) or ρ (adaptive).
        subspace_dim: p for the random-subspace variant, else ``None``.
        coords: the subspace coordinates y (``(p,)``) with ``perturbation = A y``, else ``None``.
        history: ``(num_evals, seconds since the call began, value of the best point so far)``
            after each evaluation (L-BFGS-B: the best point evaluated so far, not its iterate; with
            ``ascent_dtype``: only after the start and after each run, where values are exact).
        info: solver details (e.g. L-BFGS-B's ``nit``, ``nfev``, ``message``).
    """

    value: float
    loss: float
    max_loss: float
    perturbation: torch.Tensor | None
    num_evals: int
    time_s: float
    solver: str
    measure: str
    radius: float
    subspace_dim: int | None = None
    coords: torch.Tensor | None = None
    history: list[tuple[int, float, float]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        sub = f", subspace_dim={self.subspace_dim}" if self.subspace_dim else ""
        return (f"SharpnessResult(measure={self.measure!r}, value={self.value:.6g}, loss={self.loss:.6g}, "
                f"max_loss={self.max_loss:.6g}, solver={self.solver!r}, radius={self.radius:g}{sub}, "
                f"num_evals={self.num_evals}, time_s={self.time_s:.3g})")
