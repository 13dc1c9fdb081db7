"""Per-layer curvature in one run: trace and top eigenvalue of every diagonal block of H.

For a layer (parameter block) b with coordinates s_b, the quantities are those of the principal
submatrix ``H[s_b, s_b]`` (the layer's own curvature with the other layers held fixed).  Nothing here
makes one pass over the data per layer:

* traces: Hutchinson probes over the whole vector; ``z_b . (H z)_b`` is an unbiased sample of
  ``tr H[s_b, s_b]`` for every b at once (E[z_i z_j] = delta_ij), so m probes give every layer's trace
  and the full trace from the same m products (batched ``block_size`` at a time);
* top eigenvalues: one Lanczos run per layer, all advanced together; each step is ONE batched
  product whose column b is the layer's Lanczos vector, zero outside s_b, read back on s_b.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .spectra import (F64, Estimate, _Counter, _device, _eigh, _generator, _is_int, _rademacher, _select, _size,
                      _lanczos_runs, tridiagonal)

__all__ = ["LayerCurvature", "layerwise", "parameter_groups"]


@dataclass
class LayerCurvature:
    """Curvature of one layer's diagonal block: ``trace`` (an :class:`Estimate`) and
    ``top_eigenvalue`` (largest algebraic eigenvalue of the block, Lanczos to ``tol``)."""

    name: str
    numel: int
    trace: Estimate | None
    top_eigenvalue: float | None
    converged: bool = True


def parameter_groups(op: Any, group: str = "module") -> dict[str, torch.Tensor]:
    """Coordinates of each layer in the flat vector: ``{name: index tensor}``.

    ``group="module"`` joins the parameters of one module (``fc1.weight`` and ``fc1.bias`` -> ``fc1``);
    ``group="parameter"`` keeps every parameter tensor apart.
    """
    if group not in ("module", "parameter"):
        raise ValueError(f"group must be 'module' or 'parameter', got {group!r}")
    flat = getattr(op, "flat", None)
    if flat is None:
        raise TypeError("layerwise needs a curvature operator from sk.hessian / sk.ggn (it reads op.flat)")
    parts: dict[str, list[torch.Tensor]] = {}
    for b in flat.blocks:
        key = b.name if group == "parameter" else (b.name.rsplit(".", 1)[0] if "." in b.name else b.name)
        parts.setdefault(key, []).append(torch.arange(b.offset, b.offset + b.numel))
    return {k: torch.cat(v) for k, v in parts.items()}


def layerwise(
    H: Any,
    *,
    trace: bool = True,
    eigenvalue: bool = True,
    num_matvecs: int = 100,
    tol: float = 1e-3,
    max_steps: int = 100,
    seed: int = 0,
    group: str = "module",
    block_size: int = 16,
) -> dict[str, LayerCurvature]:
    """Trace and top eigenvalue of every layer's diagonal Hessian/GGN block, in one run.

    Args:
        H: a curvature operator from :func:`~sharpkit.hessian` / :func:`~sharpkit.ggn`.
        trace: estimate each block's trace from ``num_matvecs`` shared Hutchinson probes.
        eigenvalue: each block's largest eigenvalue by Lanczos (relative Ritz residual ``tol``, at
            most ``max_steps`` steps; one batched product per step for all layers together).
        seed: seed of the probes and start vectors.
        group: "module" (default) or "parameter" (see :func:`parameter_groups`).
        block_size: probes per batched product.

    Returns ``{layer name: LayerCurvature}`` in parameter order.
    """
    groups = parameter_groups(H, group)
    if trace and (not _is_int(num_matvecs) or num_matvecs < 2):
        raise ValueError(f"num_matvecs must be an int >= 2, got {num_matvecs!r}")
    if trace and (not _is_int(block_size) or block_size < 1):
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if eigenvalue and (not _is_int(max_steps) or max_steps < 1):
        raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")
    if eigenvalue and not (tol > 0):
        raise ValueError(f"tol must be positive, got {tol}")
    if trace:
        num_matvecs, block_size = int(num_matvecs), int(block_size)
    if eigenvalue:
        max_steps = int(max_steps)
    n = _size(H)
    device = _device(H)
    gen = _generator(seed)
    mv = _Counter(H)
    names = list(groups)
    traces: dict[str, Estimate | None] = {k: None for k in names}
    if trace:
        samples = torch.zeros(len(names), num_matvecs, dtype=F64)
        done = 0
        while done < num_matvecs:
            b = min(block_size, num_matvecs - done)
            Z = _rademacher(n, b, gen, device)
            ZHZ = (Z * mv(Z)).cpu()
            for i, k in enumerate(names):
                samples[i, done:done + b] = ZHZ[groups[k]].sum(0)
            done += b
        for i, k in enumerate(names):
            s = samples[i]
            traces[k] = Estimate(float(s.mean()), float(s.std() / math.sqrt(num_matvecs)), num_matvecs,
                                 "hutchinson (block-diagonal)", s)
    tops: dict[str, tuple[float | None, bool]] = {k: (None, True) for k in names}
    if eigenvalue:
        supports = [groups[k].to(device) for k in names]
        starts = [torch.randn(s.numel(), generator=gen, dtype=F64) for s in supports]
        runs, stopped = _lanczos_runs(mv, n, starts, max_steps, supports=supports, tol=tol, which="LA",
                                      device=device)
        for k, (a, b), converged in zip(names, runs, stopped):
            theta, S = _eigh(tridiagonal(a.tolist(), b.tolist()))
            i = _select(theta, 1, "LA")
            # Converged: the run's stopping test held (Ritz residual <= tol, an invariant subspace or
            # the whole block spanned), on whichever step, the last allowed one included.
            tops[k] = (float(theta[i]), converged)
    return {
        k: LayerCurvature(k, int(groups[k].numel()), traces[k], tops[k][0], tops[k][1]) for k in names
    }
