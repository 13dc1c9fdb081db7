"""Sharpness of minima: Keskar et al.'s ε-sharpness, adaptive sharpness, and the solvers behind them.

* :func:`keskar_sharpness` (:mod:`.keskar`): ε-sharpness in the full space or a random subspace.
* :func:`adaptive_sharpness` (:mod:`.adaptive`): worst/average-case, standard/adaptive, ℓ∞/ℓ2, m-sharpness.
* :func:`reparameterize_relu` (:mod:`.reparam`): Dinh et al.'s function-preserving rescaling.
* :mod:`.solvers`: L-BFGS-B, PGA and Auto-PGD over batches of independent problems.
"""
from __future__ import annotations

from . import solvers
from .adaptive import adaptive_sharpness
from .keskar import keskar_sharpness, subspace_center
from .reparam import reparameterize_relu
from .result import SharpnessResult

__all__ = ["keskar_sharpness", "adaptive_sharpness", "reparameterize_relu", "SharpnessResult",
           "subspace_center", "solvers"]
