"""ε-sharpness of Keskar et al. (ICLR 2017, Eq. 3/4), in the full space or a random subspace.

    φ(ε, A) = 100 · (max_{y ∈ C_ε} f(x + A y) − f(x)) / (1 + f(x)),
    C_ε = { y : |y_i| <= ε (|(A⁺x)_i| + 1) }

with f the sample-weighted mean loss over ``data`` and x the model's trainable parameters.

* Full space: A = I, the box is ``|y_i| <= ε(|x_i| + 1)``.
* Random subspace (``subspace_dim=p``): A is n x p with i.i.d. N(0, 1) entries generated from
  ``(seed, i, j)`` by Philox (:class:`sharpkit.ops.GaussianSubspace`; never stored).  ``A⁺x`` is
  ``(AᵀA)⁻¹ Aᵀx``, with ``AᵀA`` (p x p) and ``Aᵀx`` accumulated in float64 in one pass over A's rows
  and the p x p system solved in float64.

Solvers (:mod:`sharpkit.sharpness.solvers`): ``"lbfgsb"`` is the paper's protocol (scipy
L-BFGS-B, ``max_iter`` = 10 iterations from y = 0, scipy's defaults otherwise, float64 objective
and gradient from one pass); ``"pga"`` and ``"apgd"`` are first-order ascents that stay on the
model's device (``max_iter`` gradient steps per run, the first a clipped gradient step,
``restarts`` runs, the best point kept).
"""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from ..objective import LossFn, Objective
from ..ops import GaussianSubspace
from ..params import FlatParams, measurement_mode
from . import solvers
from ._checks import (ascent_dtype_arg, choice, device_arg, dtype_arg, measured_dtype, positive_float, positive_int,
                      seed_int)
from .result import SharpnessResult

__all__ = ["keskar_sharpness", "subspace_center"]


def subspace_center(A: GaussianSubspace, x: torch.Tensor) -> torch.Tensor:
    """``A⁺x = (AᵀA)⁻¹ Aᵀx`` (shape ``(p,)``, float64) without forming A.

    The Gram matrix and ``Aᵀx`` are accumulated in float64 from the same blocks of rows (one
    generation pass over A); A's entries are generated in float64 from its seed.
    """
    n, p = A.shape
    if x.shape != (n,):
        raise ValueError(f"x must have shape ({n},), got {tuple(x.shape)}")
    A64 = GaussianSubspace(n, p, seed=A.seed, dtype=torch.float64, device=A.device, block_rows=A.block_rows)
    gram = torch.zeros(p, p, dtype=torch.float64, device=A.device)
    atx = torch.zeros(p, dtype=torch.float64, device=A.device)
    for start in range(0, n, A.block_rows):
        count = min(A.block_rows, n - start)
        rows = A64.rows(start, count)
        gram += rows.T @ rows
        atx += rows.T @ x[start : start + count].to(A.device, torch.float64)
    return torch.linalg.solve(gram, atx)


def keskar_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    epsilon: float = 1e-3,
    subspace_dim: int | None = None,
    solver: str = "lbfgsb",
    max_iter: int = 10,
    seed: int = 0,
    bn: str = "eval",
    restarts: int = 1,
    step_size: float | None = None,
    first_step: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    ascent_dtype: torch.dtype | str | None = None,
) -> SharpnessResult:
    """Keskar et al.'s ε-sharpness of ``model`` at its current parameters (percent).

    Args:
        model: the network (left exactly as found: parameters, buffers, train/eval flags).
        loss_fn: mean-reduced ``loss_fn(outputs, targets) -> scalar`` (e.g. ``nn.CrossEntropyLoss()``).
        data: ``(inputs, targets)`` tensors or an iterable of batches (the training set, for the
            paper's training sharpness).  Small batches are evaluated joined into larger passes
            where the samples do not interact (``Objective(regroup=True)``; same objective).
        epsilon: relative box size ε > 0 (default 1e-3; the paper also uses 5e-4).
        subspace_dim: p for the random-subspace variant (1 <= p <= n), ``None`` for the full space.
        solver: ``"lbfgsb"`` (default, the paper's protocol), ``"pga"`` or ``"apgd"``.  L-BFGS-B
            stops at y = 0 (value 0, a ``RuntimeWarning``, ``info["stopped_at_start"]``) where every
            coordinate of the gradient is below scipy's absolute tolerance 1e-5, as at a
            well-converged minimum; the first-order solvers climb there.
        max_iter: L-BFGS-B iterations, or gradient steps per pga/apgd run (default 10).
        seed: seeds A (subspace) and the random restarts (default 0).
        bn: ``"eval"`` (BatchNorm uses running statistics, default) or ``"train"`` (batch statistics).
        restarts: pga/apgd runs (default 1): the first two from y = 0 with the two first steps
            (see ``first_step``), any others from random points in the box.
        step_size: pga/apgd initial step in units of the box half-width (default None: 2.0).
        first_step: pga/apgd's first step from y = 0: ``"gradient"`` (default None: this; the
            largest 3 % of the gradient's coordinates to the box's edge, the rest in proportion) or
            ``"sign"`` (the corner of the gradient's signs); with ``restarts >= 2`` the second run
            takes the other.  ``step_size``, ``first_step`` and ``restarts`` are errors with
            ``solver="lbfgsb"`` (the paper's protocol has none of them).
        device, dtype: where and in what precision the model is evaluated (default None: its own,
            float32 for a bfloat16/float16 model, whose perturbed parameters and loss would round
            the sharpness away); ``dtype`` a floating-point ``torch.dtype`` of at least 32 bits,
            ``device`` one this machine has.
        ascent_dtype: pga/apgd only: ``"bfloat16"`` or ``"float16"`` to take the ascent's steps
            with the model under ``torch.autocast`` to that precision (default None: full
            precision).  The loss at the parameters and at each run's best point are still
            evaluated in ``dtype`` (float32 required), so ``value`` is exact; the steps are cheaper
            where the hardware has fast low-precision matrix products (GPU tensor cores, CPUs with
            AVX-512 BF16 or AMX) and slower elsewhere.  ``history`` then holds the exact values
            only (at the start and after each run).  Prefer bfloat16: float16 runs without loss
            scaling, so gradients below its range are zero and those coordinates do not move.

    Returns:
        :class:`SharpnessResult` with ``value``, ``loss``, ``max_loss``, ``perturbation`` (the
        n-vector ``A y``), ``coords`` (y, subspace only), ``num_evals``, ``time_s``, ``history``.
    """
    t0 = time.perf_counter()
    epsilon = positive_float("epsilon", epsilon)
    choice("solver", solver, solvers.SOLVERS)
    max_iter = positive_int("max_iter", max_iter)
    restarts = positive_int("restarts", restarts)
    if solver == "lbfgsb":
        if restarts != 1:
            raise ValueError(f"restarts={restarts} applies to solver='pga'/'apgd'; L-BFGS-B (the paper's protocol) "
                             "starts once at y = 0")
        for name, value in (("step_size", step_size), ("first_step", first_step)):
            if value is not None:
                raise ValueError(f"{name}={value!r} applies to solver='pga'/'apgd'; L-BFGS-B (the paper's protocol) "
                                 "takes scipy's own steps")
    step_size = 2.0 if step_size is None else positive_float("step_size", step_size)
    first_step = "gradient" if first_step is None else first_step
    choice("first_step", first_step, solvers.FIRST_STEPS)
    seed = seed_int(seed)
    dtype = measured_dtype(model, dtype_arg(dtype))
    ascent_dtype = ascent_dtype_arg(ascent_dtype, solver, model, device, dtype)
    device = device_arg(device)
    if subspace_dim is not None:
        subspace_dim = positive_int("subspace_dim", subspace_dim)
        n = FlatParams(model).n  # (a model without trainable parameters is named as such, not as n=0)
        if subspace_dim > n:
            raise ValueError(f"subspace_dim must be at most the number of parameters n={n}, got {subspace_dim}")
    history: list[tuple[int, float, float]] = []

    def record(evals: int, loss0: torch.Tensor, best: torch.Tensor) -> None:
        f0, fb = float(loss0[0]), float(best[0])
        if 1.0 + f0 <= 0.0:  # checked at the first evaluation, before the ascent
            raise ValueError(f"the loss at the parameters is {f0}; Keskar's value 100·(max_loss − loss)/(1 + loss) "
                             "needs loss > −1 (a non-negative loss)")
        history.append((evals, time.perf_counter() - t0, 100.0 * (fb - f0) / (1.0 + f0)))

    with measurement_mode(model, bn):
        obj = Objective(model, loss_fn, data, device=device, dtype=dtype, regroup=True)
        X = obj.x0().unsqueeze(0)
        engine = solvers.ObjectiveEngine([obj])
        if ascent_dtype is not None:
            engine = solvers.AutocastEngine(engine, ascent_dtype)
        A = coords = None
        if subspace_dim is None:
            problem = solvers.ShiftedProblem(engine, X)
            scale = solvers.keskar_bound(X, epsilon)
        else:
            A = GaussianSubspace(obj.n, subspace_dim, seed=seed, dtype=obj.dtype, device=obj.device)
            center = subspace_center(A, X[0])
            scale = solvers.keskar_bound(center, epsilon).to(obj.dtype).unsqueeze(0)
            problem = solvers.SubspaceProblem(engine, X, A)
        res = solvers.maximize(problem, scale, solver=solver, norm="linf", max_iter=max_iter, step_size=step_size,
                               restarts=restarts, seed=seed, callback=record, first_step=first_step)
        if A is None:
            perturbation = res.Y[0]
        else:
            coords = res.Y[0]
            perturbation = A.matvec(coords).to(obj.dtype)
    loss, max_loss = float(res.loss0[0]), float(res.max_loss[0])
    return SharpnessResult(
        value=100.0 * (max_loss - loss) / (1.0 + loss),
        loss=loss,
        max_loss=max_loss,
        perturbation=perturbation,
        num_evals=res.num_evals,
        time_s=time.perf_counter() - t0,
        solver=solver,
        measure="keskar",
        radius=epsilon,
        subspace_dim=subspace_dim,
        coords=coords,
        history=history,
        info=dict(res.info, ascent_dtype=ascent_dtype),
    )
