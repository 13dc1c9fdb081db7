"""The gradient noise scale B_simple (McCandlish et al. 2018; PAPER.md section 6).

With ``G_B`` the mean gradient of a random batch of B samples, ``E|G_B|^2 = |G|^2 + tr(Sigma)/B``
(Sigma: the per-sample gradient covariance).  Measuring ``E|G_B|^2`` at two batch sizes gives

    |G|^2    ~ (B_big E|G_big|^2 - B_small E|G_small|^2) / (B_big - B_small)
    tr Sigma ~ (E|G_small|^2 - E|G_big|^2) / (1/B_small - 1/B_big)

and ``B_simple = tr(Sigma) / |G|^2``, the batch size beyond which larger batches stop paying
(the critical batch size, to within a small factor).  Batches here are drawn without replacement
from a finite training set of N samples, for which ``E|G_B|^2 = |G|^2 + tr(Sigma) (N - B) / (B (N - 1))``;
the estimator solves these two equations exactly (it reduces to the formulas above as N grows).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..objective import Objective
from ..params import measurement_mode

__all__ = ["NoiseScale", "gradient_noise_scale"]


@dataclass
class NoiseScale:
    """``b_simple`` (samples; NaN when the |G|^2 estimate is not positive), ``grad_sq`` (|G|^2),
    ``trace_sigma`` (tr Sigma), the mean squared batch-gradient norms at ``b_small`` and ``b_big``
    and how many batches of each were averaged."""

    b_simple: float
    grad_sq: float
    trace_sigma: float
    b_small: int
    b_big: int
    mean_sq_small: float
    mean_sq_big: float
    batches_small: int
    batches_big: int

    def as_dict(self) -> dict:
        return asdict(self)


def gradient_noise_scale(
    model: nn.Module,
    loss_fn,
    data: tuple[torch.Tensor, torch.Tensor],
    b_small: int,
    b_big: int,
    seed: int = 0,
    bn: str = "eval",
    max_batches: int | None = None,
) -> NoiseScale:
    """Estimate B_simple at ``model``'s current parameters from gradients at two batch sizes.

    ``data = (X, Y)`` is shuffled (``seed``) and cut into disjoint batches of ``b_small`` (then of
    ``b_big``) samples, incomplete batches dropped; ``E|G_B|^2`` is the mean over those batches
    (at most ``max_batches`` each).  ``bn="eval"`` (default) makes every sample's gradient a fixed
    function of the parameters, as the estimator assumes; with ``bn="train"`` batch statistics
    couple the samples of a batch and small batches bias the estimate.  The model is left untouched.
    """
    x, y = data
    n = x.shape[0]
    if not 1 <= b_small < b_big:
        raise ValueError(f"need 1 <= b_small < b_big, got b_small={b_small}, b_big={b_big}")
    if b_big > n:
        raise ValueError(f"b_big={b_big} exceeds the {n} samples available")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    with measurement_mode(model, bn):
        obj = Objective(model, loss_fn, (x[:1], y[:1]), distributed=False)  # only its batch_loss is used
        x0 = obj.x0()
        mean_sq, counts = {}, {}
        for b in (b_small, b_big):
            total, count = 0.0, 0
            for s in range(0, n - b + 1, b):
                if max_batches is not None and count >= max_batches:
                    break
                idx = perm[s : s + b]
                xr = x0.clone().requires_grad_(True)
                (g,) = torch.autograd.grad(obj.batch_loss(xr, (x[idx], y[idx])), xr)
                total += float(g.double().pow(2).sum())
                count += 1
            mean_sq[b], counts[b] = total / count, count
    # Finite-population weights of tr(Sigma) at each batch size (sampling without replacement).
    c_small, c_big = ((n - b) / (b * (n - 1)) if n > 1 else 0.0 for b in (b_small, b_big))
    trace_sigma = (mean_sq[b_small] - mean_sq[b_big]) / (c_small - c_big)
    grad_sq = mean_sq[b_big] - c_big * trace_sigma
    b_simple = trace_sigma / grad_sq if grad_sq > 0 else math.nan
    return NoiseScale(
        b_simple, grad_sq, trace_sigma, b_small, b_big, mean_sq[b_small], mean_sq[b_big], counts[b_small], counts[b_big]
    )
