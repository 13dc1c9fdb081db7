"""Adaptive (and standard) sharpness: Kwon et al. 2021 (ASAM); Andriushchenko et al. 2023.

With ``c = |w|`` (adaptive) or ``c = 1`` (standard) and the perturbation set
``S_ρ = { δ : ‖δ ⊘ c‖_p <= ρ }``, p ∈ {∞, 2}:

* worst case: ``max_{δ ∈ S_ρ} f(w + δ) − f(w)``, maximised by Auto-PGD
  (:func:`sharpkit.sharpness.solvers.apgd`; ℓ2 projects onto the ellipsoid ``‖δ ⊘ c‖₂ <= ρ``);
* average case: ``E_ξ f(w + ρ c ⊙ ξ) − f(w)`` with ξ uniform on ``[-1, 1]ⁿ`` (ℓ∞) or standard
  Gaussian (ℓ2, i.e. ``δ ~ N(0, ρ² diag(c²))``), estimated from ``max_iter`` seeded draws.
* m-sharpness (``m`` given): the first ``num_examples`` examples (default 1024) are cut into
  consecutive chunks of ``m``; each chunk's sharpness is measured separately (the chunks are the
  B independent problems of the batched solver) and the results are averaged with sample weights
  (for cross-entropy with ignored targets or class weights, the weights of the loss's mean; a
  chunk whose every target is ignored is left out).

Because the solver iterates in the normalised coordinates ``δ ⊘ (ρ c)``, the adaptive measures
(c = |w|) are invariant to rescaling a ReLU layer by α and the next by 1/α (Dinh et al. 2017), to
rounding: see docs/invariance.md.  Defaults follow Andriushchenko et al.: 20 iterations, BN frozen;
their evaluation protocol (1024 examples in batches of 128) is ``m=128`` (``num_examples=1024`` is
the default); ``m=None`` measures one worst case over all of ``data``.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from ..data import as_batches
from ..objective import LossFn, Objective, batch_weigher
from ..params import measurement_mode
from . import solvers
from ._checks import (ascent_dtype_arg, choice, device_arg, dtype_arg, flag, measured_dtype, positive_float, positive_int,
                      seed_int)
from .result import SharpnessResult

__all__ = ["adaptive_sharpness"]

KINDS = ("worst", "average")


def _chunks(data: Any, m: int, num_examples: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``num_examples`` examples of ``data`` in consecutive chunks of ``m``."""
    batches = as_batches(data)
    if batches.is_sharded:
        # Each rank would cut its own share into a different number of chunks (and issue another
        # number of collectives); m-sharpness takes the full data on every rank instead.
        raise ValueError("m-sharpness needs the full data on every rank, not this rank's part (local_data); "
                         "pass the data unsharded")
    xs, ys = batches.materialize(max_samples=num_examples)
    return [(xs[s : s + m], ys[s : s + m]) for s in range(0, xs.shape[0], m)]


# m-sharpness uses the first this many examples by default (Andriushchenko et al.: 1024 in chunks of m).
M_SHARPNESS_EXAMPLES = 1024


def adaptive_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    rho: float,
    norm: str = "linf",
    kind: str = "worst",
    adaptive: bool = True,
    m: int | None = None,
    max_iter: int = 20,
    seed: int = 0,
    bn: str = "eval",
    num_examples: int | None = M_SHARPNESS_EXAMPLES,
    solver: str | None = None,
    restarts: int | None = None,
    step_size: float | None = None,
    first_step: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    ascent_dtype: torch.dtype | str | None = None,
) -> SharpnessResult:
    """Worst- or average-case (adaptive) sharpness of ``model`` at its current parameters.

    Args:
        model, loss_fn, data: as in :func:`sharpkit.keskar_sharpness` (the model is left as found).
        rho: radius ρ > 0 of ``‖δ ⊘ c‖ <= ρ`` (dimensionless when adaptive, parameter units otherwise).
        norm: ``"linf"`` (default) or ``"l2"``.
        kind: ``"worst"`` (default; maximised by ``solver``) or ``"average"`` (random draws).
        adaptive: ``c = |w|`` when True (default), ``c = 1`` (standard sharpness) when False (a
            bool, Python's or numpy's).
        m: m-sharpness chunk size (e.g. 128), or ``None`` (default) for one problem over all of data.
        max_iter: solver steps (worst) or random draws (average); default 20.
        seed: seeds the random draws and restarts (default 0).
        bn: BatchNorm policy, ``"eval"`` (default, frozen running statistics) or ``"train"``.
        num_examples: with ``m``, how many leading examples to use (default 1024; ``None``: all);
            another value without ``m`` is an error.
        solver: ``"apgd"`` (default None: this) or ``"pga"`` for the worst case.
        restarts: solver runs (default None: 1).  step_size: initial step in units of ρ c
            (default None: 2.0).
        first_step: the first step on the box, ``"gradient"`` (default None: this) or ``"sign"``,
            as in :func:`sharpkit.keskar_sharpness`; an error with ``norm="l2"``.  ``solver``,
            ``restarts``, ``step_size`` and ``first_step`` are errors with ``kind="average"``.
        device, dtype: where and in what precision the model is evaluated (default None: its own,
            float32 for a bfloat16/float16 model); ``dtype`` a floating-point ``torch.dtype`` of at
            least 32 bits (16 bits cannot resolve the loss changes measured), ``device`` one this
            machine has.
        ascent_dtype: worst case only: ``"bfloat16"`` or ``"float16"`` for the ascent's steps, the
            reported losses still in ``dtype`` (as in :func:`sharpkit.keskar_sharpness`; default
            None: full precision); ``history`` then holds exact values only (at the start and after
            each run).

    Returns:
        :class:`SharpnessResult`; ``value = max_loss - loss``.  ``perturbation`` is δ (``(n,)``, or
        ``(num_chunks, n)`` with ``m``, also for a single chunk), ``None`` for the average case.
    """
    t0 = time.perf_counter()
    rho = positive_float("rho", rho)
    choice("norm", norm, solvers.NORMS)
    choice("kind", kind, KINDS)
    adaptive = flag("adaptive", adaptive)
    dtype = measured_dtype(model, dtype_arg(dtype))
    ascent = (("solver", solver), ("restarts", restarts), ("step_size", step_size), ("first_step", first_step),
              ("ascent_dtype", ascent_dtype))
    if kind == "average":
        for name, value in ascent:
            if value is not None:
                raise ValueError(f"{name}={value!r} applies to kind='worst'; kind='average' averages max_iter random draws")
    if norm == "l2" and first_step is not None:
        raise ValueError(f"first_step={first_step!r} applies to the box (norm='linf'); on the l2 ball the first step "
                         "is the normalised gradient")
    if m is None and num_examples not in (None, M_SHARPNESS_EXAMPLES):
        raise ValueError(f"num_examples={num_examples!r} applies to m-sharpness (give m); without m all of data is used")
    solver = "apgd" if solver is None else solver
    choice("solver", solver, ("apgd", "pga"))
    ascent_dtype = ascent_dtype_arg(ascent_dtype, solver, model, device, dtype)
    device = device_arg(device)
    max_iter = positive_int("max_iter", max_iter)
    restarts = 1 if restarts is None else positive_int("restarts", restarts)
    step_size = 2.0 if step_size is None else positive_float("step_size", step_size)
    first_step = "gradient" if first_step is None else first_step
    choice("first_step", first_step, solvers.FIRST_STEPS)
    seed = seed_int(seed)
    if m is not None:
        m = positive_int("m", m)
        if num_examples is not None:
            num_examples = positive_int("num_examples", num_examples)
    history: list[tuple[int, float, float]] = []

    with measurement_mode(model, bn):
        if m is None:
            objectives = [Objective(model, loss_fn, data, device=device, dtype=dtype, regroup=True)]
        else:
            # A chunk whose every target is ignored has no loss: it is left out, as a batch is.
            weigh = batch_weigher(loss_fn)
            chunks = [chunk for chunk in _chunks(data, m, num_examples) if weigh(chunk) > 0]
            if not chunks:
                raise ValueError("every target of the examples measured equals the loss's ignore_index or has class "
                                 "weight 0: the mean loss is undefined")
            objectives = [Objective(model, loss_fn, chunk, device=device, dtype=dtype) for chunk in chunks]
        # Each problem weighs its share of the objective (its samples, or batch_weigher's sum).
        weights = torch.tensor([o.weights.total for o in objectives], dtype=torch.float64)
        weights = weights / weights.sum()
        engine = solvers.ObjectiveEngine(objectives)
        x = objectives[0].x0()
        X = x.unsqueeze(0).expand(engine.num_problems, -1)
        c = x.abs() if adaptive else torch.ones_like(x)
        scale = (rho * c).unsqueeze(0).expand(engine.num_problems, -1).contiguous()

        def mean(v: torch.Tensor) -> float:
            return float((v.cpu() * weights).sum())

        def record(evals: int, loss0: torch.Tensor, best: torch.Tensor) -> None:
            history.append((evals, time.perf_counter() - t0, mean(best) - mean(loss0)))

        if kind == "worst":
            steps = engine if ascent_dtype is None else solvers.AutocastEngine(engine, ascent_dtype)
            problem = solvers.ShiftedProblem(steps, X)
            res = solvers.maximize(problem, scale, solver=solver, norm=norm, max_iter=max_iter, step_size=step_size,
                                   restarts=restarts, seed=seed, callback=record, first_step=first_step)
            loss0, max_loss, num_evals, info = res.loss0, res.max_loss, res.num_evals, res.info
            perturbation = res.Y[0] if m is None else res.Y  # one row per chunk, however many
            used = solver
        else:
            loss0 = engine.loss(X)
            if not bool(torch.isfinite(loss0).all()):
                raise ValueError(f"the loss at the unperturbed parameters is {loss0.tolist()}; sharpness is undefined there")
            gen = torch.Generator(device=x.device).manual_seed(int(seed))
            total = torch.zeros_like(loss0)
            for s in range(max_iter):
                if norm == "linf":
                    xi = torch.rand(scale.shape, generator=gen, dtype=x.dtype, device=x.device) * 2 - 1
                else:
                    xi = torch.randn(scale.shape, generator=gen, dtype=x.dtype, device=x.device)
                total += engine.loss(X + scale * xi)
                record(s + 2, loss0, total / (s + 1))
            max_loss, num_evals, info, perturbation, used = total / max_iter, max_iter + 1, {}, None, "sampling"
    loss, worst = mean(loss0), mean(max_loss)
    info = dict(info, num_problems=engine.num_problems, norm=norm, adaptive=adaptive, m=m,
                ascent_dtype=ascent_dtype)
    return SharpnessResult(
        value=worst - loss,
        loss=loss,
        max_loss=worst,
        perturbation=perturbation,
        num_evals=num_evals,
        time_s=time.perf_counter() - t0,
        solver=used,
        measure=f"adaptive-{kind}",
        radius=rho,
        history=history,
        info=info,
    )
