"""Curvature: Hessian / Gauss-Newton operators of the sample-weighted mean loss, their batched
products (generic torch.func engine or the fused engine), and spectra (eigenvalues, trace, density,
per-layer estimates)."""
from .engines import GenericEngine, HVPEngine, make_engine
from .layerwise import LayerCurvature, layerwise, parameter_groups
from .operator import CurvatureOperator, ggn, hessian
from .spectra import Density, EigenResult, Estimate, eigenvalues, spectral_density, trace

__all__ = [
    "CurvatureOperator",
    "hessian",
    "ggn",
    "HVPEngine",
    "GenericEngine",
    "make_engine",
    "EigenResult",
    "Estimate",
    "Density",
    "eigenvalues",
    "trace",
    "spectral_density",
    "LayerCurvature",
    "layerwise",
    "parameter_groups",
]
