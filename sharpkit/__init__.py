"""sharpkit: fast curvature and sharpness of neural-network minima (Keskar et al., ICLR 2017, and
the work that followed).  The public API is listed in ``__all__``."""
from __future__ import annotations

__version__ = "0.1.0"

from . import distributed, ops
from .audit import audit
from .curvature import (
    CurvatureOperator,
    Density,
    EigenResult,
    Estimate,
    LayerCurvature,
    eigenvalues,
    ggn,
    hessian,
    layerwise,
    spectral_density,
    trace,
)
from .data import load_digits, load_mnist1d
from .landscape import Curve, interpolate
from .params import FlatParams, measurement_mode, preserved
from .sharpness import SharpnessResult, adaptive_sharpness, keskar_sharpness, reparameterize_relu

__all__ = [
    "__version__",
    "ops",
    "distributed",
    "FlatParams",
    "preserved",
    "measurement_mode",
    "load_mnist1d",
    "load_digits",
    "interpolate",
    "Curve",
    "audit",
    "hessian",
    "ggn",
    "CurvatureOperator",
    "eigenvalues",
    "trace",
    "spectral_density",
    "layerwise",
    "EigenResult",
    "Estimate",
    "Density",
    "LayerCurvature",
    "keskar_sharpness",
    "adaptive_sharpness",
    "SharpnessResult",
    "reparameterize_relu",
]
