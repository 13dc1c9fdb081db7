"""Thin calls into sharpkit's measurement API (ε-sharpness, Hessian spectrum), imported at call
time so the study runs (and reports what is missing) whatever part of the API is installed."""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

__all__ = ["Unavailable", "keskar", "top_eigen", "hessian_trace"]


class Unavailable(RuntimeError):
    """A measurement's API function is not available in this sharpkit installation."""


def _api(name: str):
    import importlib

    import sharpkit as sk

    fn = getattr(sk, name, None)
    for home in ("sharpkit.sharpness", "sharpkit.curvature"):
        if fn is not None:
            break
        try:
            fn = getattr(importlib.import_module(home), name, None)
        except ImportError:
            continue
    if fn is None:
        raise Unavailable(f"sharpkit.{name} is not available in this installation")
    return fn


def keskar(
    model: nn.Module, loss_fn, data: Any, epsilon: float, solver: str, subspace_dim: int | None,
    max_iter: int, seed: int, bn: str,
) -> dict:
    """ε-sharpness (Keskar et al. Eq. 4, percent) with the given solver; a dict of plain numbers."""
    fn = _api("keskar_sharpness")
    t = time.perf_counter()
    r = fn(model, loss_fn, data, epsilon=epsilon, subspace_dim=subspace_dim, solver=solver,
           max_iter=max_iter, seed=seed, bn=bn)
    return {
        "value": float(r.value),
        "loss": float(r.loss),
        "max_loss": float(r.max_loss),
        "num_evals": int(getattr(r, "num_evals", -1) or -1),
        "seconds": time.perf_counter() - t,
    }


def top_eigen(
    model: nn.Module, loss_fn, data: Any, bn: str, tol: float, seed: int, v0: torch.Tensor | None = None
) -> tuple[dict, torch.Tensor]:
    """Largest Hessian eigenvalue by Lanczos, warm-started from ``v0`` when given; (numbers, vector)."""
    hessian, eigenvalues = _api("hessian"), _api("eigenvalues")
    t = time.perf_counter()
    H = hessian(model, loss_fn, data, bn=bn)
    kwargs = {"k": 1, "tol": tol, "seed": seed}
    if v0 is not None:
        kwargs["v0"] = v0
    r = eigenvalues(H, **kwargs)
    vec = torch.as_tensor(r.vectors).reshape(-1).detach().clone()
    info = {
        "value": float(torch.as_tensor(r.values).reshape(-1)[0]),
        "num_matvecs": int(r.num_matvecs),
        "warm": v0 is not None,
        "seconds": time.perf_counter() - t,
    }
    return info, vec


def hessian_trace(model: nn.Module, loss_fn, data: Any, bn: str, num_matvecs: int, seed: int) -> dict:
    """Hutch++ estimate of the Hessian trace."""
    hessian, trace = _api("hessian"), _api("trace")
    t = time.perf_counter()
    H = hessian(model, loss_fn, data, bn=bn)
    r = trace(H, method="hutch++", num_matvecs=num_matvecs, seed=seed)
    return {
        "value": float(r.value),
        "stderr": float(r.stderr),
        "num_matvecs": int(r.num_matvecs),
        "seconds": time.perf_counter() - t,
    }
