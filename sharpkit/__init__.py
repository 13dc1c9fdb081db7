"""sharpkit: fast curvature and sharpness of neural-network minima (Keskar et al., ICLR 2017, and
the work that followed).  The public API is listed in ``__all__``."""
from __future__ import annotations

__version__ = "0.1.0"

from . import ops
from .audit import audit
from .data import load_digits, load_mnist1d
from .landscape import Curve, interpolate
from .params import FlatParams, measurement_mode, preserved

__all__ = [
    "__version__",
    "ops",
    "FlatParams",
    "preserved",
    "measurement_mode",
    "load_mnist1d",
    "load_digits",
    "interpolate",
    "Curve",
    "audit",
]
