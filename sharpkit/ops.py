"""Kernel-level ops (``sk.ops``): fused perturbation updates and the matrix-free Gaussian subspace.

Every op takes ``backend="auto" | "torch" | "cpp" | "triton" | "cuda" | "cupy"``; ``backends()`` says
which are usable here and why the others are not.
"""
from __future__ import annotations

from .kernels._backend import backends
from .kernels.box_ascent import box_ascent_step, box_ascent_step_reference
from .kernels.subspace import GaussianSubspace

__all__ = ["box_ascent_step", "box_ascent_step_reference", "GaussianSubspace", "backends"]
