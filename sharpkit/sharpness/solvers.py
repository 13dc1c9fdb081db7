"""Ascent solvers for sharpness: maximise B independent losses, each over its own perturbation set.

Protocol
--------
An *ascent problem* is any object with

* ``num_problems`` (B) and ``dim`` (d), ints;
* ``loss_and_grad(Y) -> (losses, grads)`` for ``Y`` of shape ``(B, d)``: ``losses`` is ``(B,)``
  float64 (the sample-weighted mean loss of problem b at perturbation coordinates ``Y[b]``) and
  ``grads`` is ``(B, d)``, the gradient of ``losses[b]`` with respect to ``Y[b]``, from the same pass.

Problem b's perturbation set is given by a non-negative ``scale`` of shape ``(B, d)``:

* ``norm="linf"``: the box ``|Y[b, i]| <= scale[b, i]`` (Keskar: ``scale = ε(|x| + 1)``, see
  :func:`keskar_bound`; adaptive sharpness: ``scale = ρ c``);
* ``norm="l2"``: the ellipsoid ``‖Y[b] ⊘ scale[b]‖₂ <= 1`` (adaptive ℓ2 sharpness: ``scale = ρ c``).

The first-order solvers (:func:`pga`, :func:`apgd`) iterate in normalised coordinates
``U = Y ⊘ scale``, where the set is the unit box or the unit ball, so one step size fits every
coordinate and the iterates do not depend on how the parameters are scaled.  A coordinate with
``scale = 0`` never moves.  On the box the update of each problem is one call of the fused
:func:`sharpkit.ops.box_ascent_step` (``x = 0``, ``epsilon = 1``, ``backend="auto"``); on the
ball it is a normalised-gradient step followed by the projection onto the ball.

Every solver first evaluates ``Y = 0`` (the unperturbed loss ``loss0``, which must be finite),
keeps the best point found per problem (never worse than ``Y = 0``) and returns an
:class:`AscentResult`.  Evaluations count data passes: one at ``Y = 0``, ``max_iter`` per run and
one at each random start point (with low-precision steps, below, also an exact pass at ``Y = 0``
and one per run at its best point).  A point whose loss is not finite (an overflow of the model's
precision far out in a large set) is never the best: pga/apgd count it as a failed step, L-BFGS-B's
line search backs off; ``info["nonfinite_evals"]`` counts them (pga/apgd also per problem:
``info["nonfinite_evals_per_problem"]``) and a ``RuntimeWarning`` says that
the value is then the maximum over the finite points only.

* First step on the box (``first_step``).  ``"gradient"`` (default): ``U = clip(G / c, −1, 1)``
  with ``G`` the gradient in normalised coordinates and ``c`` the ``1 − FIRST_STEP_EDGE_FRACTION``
  quantile of ``|G|``: the 3 % of coordinates with the largest gradient reach the edge of the box, the
  others move in proportion to their gradient.  This is L-BFGS-B's first, curvature-free step made
  independent of the loss's scale; the gradient at that point already reflects the curvature, and
  the sign steps that follow then climb towards the maximum L-BFGS-B finds.  ``"sign"``: Croce &
  Hein's first step, ``η`` times the sign of the gradient (with ``η = 2`` the corner ``sign(G)``).
  On MLPs whose loss is strongly non-linear over the box the two starts can end at different local
  maxima (on a large-batch MNIST-1D MLP at ε = 1e-3: 3947 from the gradient step, 3355 from the
  corner, 3946 for L-BFGS-B; the corner is ahead on others), so a second run starts with the other
  step (``restarts >= 2``).  On the ball the first step is the normalised gradient step.
* :func:`pga`: projected sign ascent (ℓ∞) or normalised-gradient ascent (ℓ2).  Step
  ``η = step_size`` (default 2: a sign step reaches a corner of the box), halved for
  a problem whenever a step does not increase its loss, after which it resumes from its best point.
* :func:`apgd`: Auto-PGD (Croce & Hein 2020), started after the gradient first step from the point
  it reached (its first sign step there without momentum): momentum 0.75, checkpoints ``w_j = ⌈p_j N⌉`` with
  ``p_0 = 0``, ``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)``; at a checkpoint the
  step is halved and the iterate restarts from the best point when fewer than 75 % of the steps
  since the previous checkpoint increased the loss, or when the step was not halved at the
  previous checkpoint and the best loss has not improved since.  Initial step ``step_size`` (2).
* :func:`lbfgsb`: scipy's L-BFGS-B (B = 1, box only), Keskar et al.'s protocol: start at 0,
  ``maxiter=max_iter``, scipy's defaults otherwise, objective and gradient in float64 on the host.

Low-precision steps (``AutocastEngine``): pga/apgd only need an ascent direction, which a pass
under ``torch.autocast`` to bfloat16/float16 gives at a fraction of the cost where the hardware has
fast low-precision matrix products (GPU tensor cores; CPUs with AVX-512 BF16 or AMX).  Such a
problem says so with ``estimates = True``: its ``loss_and_grad`` values are estimates used only to
steer the steps, and its ``loss(Y)`` is exact (the engine's own precision).  The solvers then take
``loss0`` from an exact pass at ``Y = 0`` and evaluate each run's best point exactly at the end;
the returned ``max_loss`` is that exact value (never below ``loss0``: if no run's point beats it,
``Y = 0`` is returned), and ``callback`` sees exact values only (after the passes at ``Y = 0``
and after each run).  float16 has no loss scaling here: gradients below its range become zero and
those coordinates do not move, so bfloat16 is the better choice where it is fast.
L-BFGS-B refuses such problems (its line search needs exact, consistent values).

``restarts > 1`` adds runs of pga/apgd: on the box the second starts at 0 with the other first step,
the others (and on the ball all but the first) from uniformly random points of the set (seeded by
``seed``); the best point over all runs is returned.

Adapters: :class:`ObjectiveEngine` evaluates a list of :class:`sharpkit.objective.Objective` (one
per problem) at full parameter vectors ``W`` ``(B, n)``; :class:`AutocastEngine` wraps an engine
for low-precision steps; :class:`ShiftedProblem` turns any such engine (``loss_and_grad(W)``) and
reference points ``X`` into the problem ``Y -> f(X + Y)``; :class:`SubspaceProblem` into
``Z -> f(X + A Z)`` with gradients ``Aᵀ ∇f``, A matrix-free.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch

from ..ops import box_ascent_step
from ._lbfgsb import GTOL, minimize_box

__all__ = [
    "AscentProblem",
    "AscentResult",
    "AutocastEngine",
    "ObjectiveEngine",
    "ShiftedProblem",
    "SubspaceProblem",
    "keskar_bound",
    "apgd_checkpoints",
    "pga",
    "apgd",
    "lbfgsb",
    "maximize",
    "SOLVERS",
    "NORMS",
    "FIRST_STEPS",
    "ASCENT_DTYPES",
    "ascent_dtype_name",
    "ascent_dtype_for",
    "check_autocast",
]

SOLVERS = ("lbfgsb", "pga", "apgd")
NORMS = ("linf", "l2")
FIRST_STEPS = ("gradient", "sign")
# Precisions that AutocastEngine's steps may run in (by name, as the CLI and result rows spell them).
ASCENT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# The share of coordinates that the gradient first step moves to the edge of the box.
FIRST_STEP_EDGE_FRACTION = 0.03
APGD_MOMENTUM = 0.75
# Fraction of successful steps below which APGD halves its step at a checkpoint (Croce & Hein's ρ).
APGD_SUCCESS_FRACTION = 0.75

Callback = Callable[[int, torch.Tensor, torch.Tensor], None]


class AscentProblem(Protocol):
    num_problems: int
    dim: int

    def loss_and_grad(self, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class AscentResult:
    """What a solver found, per problem.

    Attributes:
        loss0: ``(B,)`` float64, the loss at ``Y = 0``.
        max_loss: ``(B,)`` float64, the loss at ``Y`` (the best point; >= ``loss0`` for pga/apgd).
        Y: ``(B, d)`` perturbation coordinates of the best point.
        num_evals: loss-and-gradient evaluations (data passes) per problem.
        info: solver details (L-BFGS-B: ``nit``, ``nfev``, ``message``; pga/apgd: final step sizes).
    """

    loss0: torch.Tensor
    max_loss: torch.Tensor
    Y: torch.Tensor
    num_evals: int
    info: dict[str, Any] = field(default_factory=dict)


# ---- problems ----------------------------------------------------------------------------------


class ObjectiveEngine:
    """B :class:`~sharpkit.objective.Objective` s (problem b uses ``objectives[b]``) evaluated at
    full parameter vectors: ``loss_and_grad(W)`` and ``loss(W)`` for ``W`` of shape ``(B, n)``.

    The objectives must share one parameter layout (the same model, possibly different data).
    """

    def __init__(self, objectives: Sequence[Any]):
        if not objectives:
            raise ValueError("ObjectiveEngine needs at least one objective")
        self.objectives = list(objectives)
        first = self.objectives[0]
        self.num_problems, self.dim = len(self.objectives), first.n
        self.device, self.dtype = first.device, first.dtype
        if any(o.n != self.dim for o in self.objectives):
            raise ValueError("the objectives disagree on the number of parameters")

    def _check(self, W: torch.Tensor) -> torch.Tensor:
        if W.shape != (self.num_problems, self.dim):
            raise ValueError(f"expected points of shape {(self.num_problems, self.dim)}, got {tuple(W.shape)}")
        return W.detach().to(self.device, self.dtype)

    def loss(self, W: torch.Tensor) -> torch.Tensor:
        W = self._check(W)
        return torch.stack([o.loss(w) for o, w in zip(self.objectives, W)]).double()

    def loss_and_grad(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        W = self._check(W)
        if self.num_problems == 1:
            f, g = self.objectives[0].loss_and_grad(W[0])
            return f.reshape(1).double(), g.unsqueeze(0)
        losses = torch.empty(self.num_problems, dtype=torch.float64, device=self.device)
        grads = torch.empty_like(W)
        for b, (o, w) in enumerate(zip(self.objectives, W)):
            f, g = o.loss_and_grad(w)
            losses[b], grads[b] = f, g
        return losses, grads


def ascent_dtype_name(value: torch.dtype | str) -> str:
    """The name in :data:`ASCENT_DTYPES` of ``value`` (that name or its torch dtype)."""
    for name, dtype in ASCENT_DTYPES.items():
        if value == name or value is dtype:
            return name
    raise ValueError(f"ascent_dtype must be one of {tuple(ASCENT_DTYPES)}, got {value!r}")


def ascent_dtype_for(value: torch.dtype | str | None, solver: str) -> str | None:
    """The ascent steps' precision by name (None: full precision); ``ValueError`` for an unknown
    value or with ``solver="lbfgsb"`` (its line search needs exact values)."""
    if value is None:
        return None
    if solver == "lbfgsb":
        raise ValueError(f"ascent_dtype={value!r} applies to solver 'pga'/'apgd'; L-BFGS-B (the paper's protocol) "
                         "needs exact values and gradients")
    return ascent_dtype_name(value)


def check_autocast(name: str, device: torch.device | str, measured_dtype: torch.dtype) -> torch.dtype:
    """The torch dtype of the ascent precision ``name``; ``ValueError`` unless autocast to it would
    take effect: the model measured in float32 (autocast lowers float32 computations only) on a
    device type where torch's autocast exists and is enabled (it disables itself, with only a
    warning, e.g. for CUDA without a GPU)."""
    dtype = ASCENT_DTYPES[ascent_dtype_name(name)]
    if measured_dtype != torch.float32:
        raise ValueError(f"ascent_dtype={name!r} needs the model measured in float32 (autocast lowers float32 "
                         f"computations only), got {measured_dtype}")
    kind = torch.device(device).type
    if not torch.amp.is_autocast_available(kind):
        raise ValueError(f"ascent_dtype={name!r}: torch has no autocast for device type {kind!r}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probe = torch.autocast(kind, dtype=dtype)
    if not getattr(probe, "_enabled", True):
        why = f": {caught[0].message}" if caught else ""
        raise ValueError(f"ascent_dtype={name!r}: autocast to {name} is disabled on {kind}{why}")
    return dtype


class AutocastEngine:
    """An engine whose ``loss_and_grad`` runs under ``torch.autocast(dtype)`` (the ascent's steps)
    while ``loss`` stays in the wrapped engine's precision (the values that are reported).

    Its problems are marked ``estimates = True`` (module docstring).  The wrapped engine must
    evaluate in float32 on a device with autocast (:func:`check_autocast`).
    """

    estimates = True

    def __init__(self, engine: Any, dtype: torch.dtype | str):
        self.ascent_dtype = ascent_dtype_name(dtype)
        self.steps_dtype = check_autocast(self.ascent_dtype, engine.device, engine.dtype)
        self.engine = engine
        self.num_problems, self.dim = engine.num_problems, engine.dim
        self.device, self.dtype = engine.device, engine.dtype

    def loss_and_grad(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(torch.device(self.device).type, dtype=self.steps_dtype):
            return self.engine.loss_and_grad(W)

    def loss(self, W: torch.Tensor) -> torch.Tensor:
        return self.engine.loss(W)


class ShiftedProblem:
    """The ascent problem ``Y -> f_b(X[b] + Y[b])`` (full space, d = n) of an engine with
    ``loss_and_grad(W: (B, n))``, e.g. :class:`ObjectiveEngine` or the audit's stacked engines."""

    def __init__(self, engine: Any, X: torch.Tensor):
        if X.dim() != 2 or X.shape[0] != engine.num_problems:
            raise ValueError(f"X must have shape (num_problems, n) = ({engine.num_problems}, n), got {tuple(X.shape)}")
        self.engine, self.X = engine, X
        self.num_problems, self.dim = X.shape
        self.device, self.dtype = X.device, X.dtype
        self.estimates = getattr(engine, "estimates", False)

    def point(self, Y: torch.Tensor) -> torch.Tensor:
        """The parameters ``X + Y`` at perturbation coordinates ``Y``."""
        return self.X + Y.to(self.dtype)

    def loss_and_grad(self, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.engine.loss_and_grad(self.point(Y))

    def loss(self, Y: torch.Tensor) -> torch.Tensor:
        """The engine's loss at ``X + Y`` (``(B,)`` float64, no gradient)."""
        return self.engine.loss(self.point(Y))


class SubspaceProblem:
    """The ascent problem ``Z -> f_b(X[b] + A Z[b])`` (d = p) with gradient ``Aᵀ ∇f_b``.

    ``A`` is matrix-free (:class:`sharpkit.ops.GaussianSubspace` or anything with ``matvec``,
    ``rmatvec``, ``p``); only n-vectors and the p-vectors are ever formed.
    """

    def __init__(self, engine: Any, X: torch.Tensor, A: Any):
        if X.dim() != 2 or X.shape[0] != engine.num_problems:
            raise ValueError(f"X must have shape (num_problems, n) = ({engine.num_problems}, n), got {tuple(X.shape)}")
        self.engine, self.X, self.A = engine, X, A
        self.num_problems, self.dim = X.shape[0], A.p
        self.device, self.dtype = X.device, X.dtype
        self.estimates = getattr(engine, "estimates", False)

    def point(self, Z: torch.Tensor) -> torch.Tensor:
        """The parameters ``X + A Z`` (row by row)."""
        W = torch.empty_like(self.X)
        for b in range(self.num_problems):
            torch.add(self.X[b], self.A.matvec(Z[b]).to(self.dtype), out=W[b])
        return W

    def loss_and_grad(self, Z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        W = self.point(Z)
        losses, grads = self.engine.loss_and_grad(W)
        del W
        gz = torch.stack([self.A.rmatvec(grads[b]).to(self.dtype) for b in range(self.num_problems)])
        return losses, gz

    def loss(self, Z: torch.Tensor) -> torch.Tensor:
        """The engine's loss at ``X + A Z`` (``(B,)`` float64, no gradient)."""
        return self.engine.loss(self.point(Z))


def keskar_bound(x: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Keskar et al.'s box half-widths ``ε (|x| + 1)`` (same shape and dtype as x)."""
    return epsilon * (x.abs() + 1)


# ---- helpers -----------------------------------------------------------------------------------


def apgd_checkpoints(max_iter: int) -> list[int]:
    """Auto-PGD's checkpoint iterations ``w_j = ⌈p_j N⌉`` (without 0), ascending and distinct."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    # Rounding before ceil keeps e.g. 0.7 * 10 from becoming 8.
    ws = sorted({math.ceil(round(q * max_iter, 9)) for q in p[1:]})
    return [w for w in ws if 0 < w <= max_iter]


def _check_common(problem: Any, scale: torch.Tensor, norm: str, max_iter: int, restarts: int, step_size: float,
                  first_step: str = "gradient"):
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if first_step not in FIRST_STEPS:
        raise ValueError(f"first_step must be one of {FIRST_STEPS}, got {first_step!r}")
    for name, v in (("max_iter", max_iter), ("restarts", restarts)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not (isinstance(step_size, (int, float)) and math.isfinite(step_size) and step_size > 0):
        raise ValueError(f"step_size must be a positive finite number, got {step_size!r}")
    B, d = problem.num_problems, problem.dim
    if not isinstance(scale, torch.Tensor) or scale.shape != (B, d):
        shape = tuple(scale.shape) if isinstance(scale, torch.Tensor) else type(scale).__name__
        raise ValueError(f"scale must be a tensor of shape (num_problems, dim) = ({B}, {d}), got {shape}")
    if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
        raise ValueError("scale must be finite and non-negative")


def _evaluate(problem: Any, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    losses, grads = problem.loss_and_grad(Y)
    losses = losses.detach().to(torch.float64).reshape(-1)
    if losses.shape[0] != problem.num_problems or grads.shape != Y.shape:
        raise ValueError(
            f"loss_and_grad returned shapes {tuple(losses.shape)}, {tuple(grads.shape)} for Y of shape {tuple(Y.shape)}"
        )
    return losses, grads.detach().to(Y.dtype)


def _exact_loss(problem: Any, Y: torch.Tensor) -> torch.Tensor:
    """The problem's exact loss at ``Y`` (``(B,)`` float64), for problems whose steps are estimates."""
    losses = problem.loss(Y).detach().to(torch.float64).reshape(-1)
    if losses.shape[0] != problem.num_problems:
        raise ValueError(f"loss returned shape {tuple(losses.shape)} for Y of shape {tuple(Y.shape)}")
    return losses


def _check_unperturbed(losses: torch.Tensor) -> None:
    bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"the loss at the unperturbed parameters is {float(losses[bad[0]])} (problem {bad[0]}); "
                         "sharpness is undefined there")


def _start(problem: Any, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Evaluate Y = 0: ``(loss0, f0, g0, passes)``, ``loss0`` exact and ``f0``, ``g0`` the steps'
    value and gradient (one pass, or two when the problem's steps are estimates); raise when the
    unperturbed loss is not finite."""
    Y = torch.zeros_like(scale)
    if not getattr(problem, "estimates", False):
        f0, g0 = _evaluate(problem, Y)
        _check_unperturbed(f0)
        return f0, f0, g0, 1
    loss0 = _exact_loss(problem, Y)
    _check_unperturbed(loss0)
    try:
        f0, g0 = _evaluate(problem, Y)
    except RuntimeError as exc:  # e.g. a layer without a kernel for that precision on this device
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"the low-precision ascent steps fail on this model: {first_line}; take full-precision "
                         "steps (ascent_dtype=None) or another precision") from exc
    bad = (~torch.isfinite(f0)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"the low-precision pass at the unperturbed parameters gave loss {float(f0[bad[0]])} "
                         f"(problem {bad[0]}; exact: {float(loss0[bad[0]])}): it overflowed; take full-precision "
                         "steps (ascent_dtype=None), or bfloat16 (float16's range is smaller)")
    return loss0, f0, g0, 2


def _random_unit(shape, norm: str, gen: torch.Generator, dtype, device) -> torch.Tensor:
    """A uniformly random point of the unit box (linf) or unit ball (l2), one per row."""
    if norm == "linf":
        return torch.rand(shape, generator=gen, dtype=dtype, device=device) * 2 - 1
    g = torch.randn(shape, generator=gen, dtype=dtype, device=device)
    r = torch.rand(shape[0], 1, generator=gen, dtype=dtype, device=device) ** (1.0 / shape[1])
    return g / g.norm(dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny) * r


def _gradient_first_step(G: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = clip(Gu / c, −1, 1)`` per row, ``Gu = G ⊙ scale`` the gradient in normalised
    coordinates and ``c`` its ``1 − FIRST_STEP_EDGE_FRACTION`` quantile in absolute value."""
    torch.mul(G, scale, out=out)
    if out.shape[1] == 0:
        return out
    k = max(1, math.ceil((1 - FIRST_STEP_EDGE_FRACTION) * out.shape[1]))
    c = out.abs().kthvalue(k, dim=1, keepdim=True).values
    # A gradient that is zero on more than 97 % of the coordinates: the non-zero ones go to the edge.
    c.clamp_(min=torch.finfo(out.dtype).tiny)
    return out.div_(c).clamp_(-1, 1)


def _run_starts(restarts: int, norm: str, first_step: str) -> list[str]:
    """How each run begins: a first step from 0 (``"gradient"``/``"sign"``) or ``"random"``."""
    if norm == "l2":
        return ["sign"] + ["random"] * (restarts - 1)
    other = "sign" if first_step == "gradient" else "gradient"
    return ([first_step, other] + ["random"] * restarts)[:restarts]


def _project_ball(u: torch.Tensor) -> torch.Tensor:
    nrm = u.norm()
    return u / nrm if nrm > 1 else u


class _Stepper:
    """One ascent step per problem in normalised coordinates U (unit box or ball)."""

    def __init__(self, scale: torch.Tensor, norm: str):
        self.scale, self.norm = scale, norm
        d = scale.shape[1]
        self.zeros = torch.zeros(d, dtype=scale.dtype, device=scale.device)
        self.scratch = torch.empty(d, dtype=scale.dtype, device=scale.device)

    def __call__(self, U, G, eta, out, U_prev=None, momentum=None, active=None):
        for b in range(U.shape[0]):
            if active is not None and not active[b]:
                out[b].copy_(U[b])
                continue
            prev = None if U_prev is None else U_prev[b]
            mom = None if U_prev is None else momentum
            if self.norm == "linf":
                # The unit box is box_ascent_step's box with x = 0, epsilon = 1; sign(G) = sign(scale ⊙ G).
                box_ascent_step(self.zeros, U[b], G[b], 1.0, float(eta[b]), mode="sign", y_prev=prev,
                                momentum=mom, backend="auto", out=(out[b], self.scratch))
            else:
                gu = G[b] * self.scale[b]
                nrm = gu.norm()
                direction = gu / nrm if nrm > 0 else gu
                z = _project_ball(U[b] + float(eta[b]) * direction)
                if prev is not None:
                    z = _project_ball(U[b] + mom * (z - U[b]) + (1 - mom) * (U[b] - prev))
                out[b].copy_(z)
        return out


def _warn_nonfinite(count: int, evals: int, dtype: torch.dtype, stacklevel: int) -> None:
    """Say that ``count`` of ``evals`` evaluated points had a non-finite loss (skipped by the ascent)."""
    warnings.warn(f"the loss was not finite (inf or NaN) at {count} of the {evals} points evaluated ({dtype}); the "
                  "ascent skipped them, so the value is the maximum over the finite points only and can be far below "
                  "the set's (0 where every step overflowed); a smaller radius or dtype=torch.float64 avoids an "
                  "overflow", RuntimeWarning, stacklevel=stacklevel)


def _finite_or_zero(losses: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Problems whose loss overflowed get a zero gradient (their step is then a failure)."""
    bad = ~torch.isfinite(losses)
    if bool(bad.any()):
        G[bad] = 0
    return bad


# ---- first-order solvers -----------------------------------------------------------------------


def _first_order(problem, scale, norm, max_iter, step_size, restarts, seed, callback, method, first_step):
    _check_common(problem, scale, norm, max_iter, restarts, step_size, first_step)
    B = problem.num_problems
    scale = scale.detach()
    step = _Stepper(scale, norm)
    estimates = getattr(problem, "estimates", False)
    loss0, f0, g0, evals = _start(problem, scale)
    # The best point over finished runs and its exact loss.
    best_loss = loss0.clone()
    best_U = torch.zeros_like(scale)
    if callback is not None:
        callback(evals, loss0, best_loss)
    gen = None
    final_eta, starts = [], []
    # Points whose loss was inf/NaN (e.g. a float32 overflow): skipped as failed steps, and said so at the end.
    # (per problem: an audit row says which checkpoint)
    nonfinite = torch.zeros(B, dtype=torch.long, device=scale.device)
    checkpoints = set(apgd_checkpoints(max_iter))
    for start in _run_starts(restarts, norm, first_step):
        if start != "random":
            U, f, G = torch.zeros_like(scale), f0.clone(), g0
        else:
            if gen is None:
                gen = torch.Generator(device=scale.device).manual_seed(int(seed))
            U = _random_unit(scale.shape, norm, gen, scale.dtype, scale.device)
            f, G = _evaluate(problem, scale * U)
            nonfinite += _finite_or_zero(f, G)
            evals += 1
        # This run's best point and the gradient there (to restart from it without a new pass).
        run_best_f = torch.where(torch.isfinite(f), f, torch.full_like(f, -math.inf))
        run_best_U, run_best_G = U.clone(), G.clone()
        eta = [float(step_size)] * B
        U_prev = None
        U_next = torch.empty_like(U)
        # APGD bookkeeping, per problem.
        successes = [0] * B
        last_w = 0
        best_at_last = run_best_f.clone()
        reduced_last = [True] * B
        for k in range(max_iter):
            # After the gradient first step Auto-PGD starts from that point, so its first step there is
            # a plain sign step and momentum begins with the next one (Croce & Hein's x1 -> x2).
            use_momentum = method == "apgd" and U_prev is not None and not (start == "gradient" and k == 1)
            if k == 0 and start == "gradient":
                _gradient_first_step(G, scale, U_next)
            else:
                step(U, G, eta, U_next, U_prev=U_prev if use_momentum else None,
                     momentum=APGD_MOMENTUM if use_momentum else None)
            f_new, G_new = _evaluate(problem, scale * U_next)
            overflow = _finite_or_zero(f_new, G_new)
            nonfinite += overflow
            evals += 1
            improved = (f_new > f) & ~overflow
            better = (f_new > run_best_f) & ~overflow
            if bool(better.any()):
                run_best_f = torch.where(better, f_new, run_best_f)
                run_best_U[better] = U_next[better]
                run_best_G[better] = G_new[better]
            U_prev, U, U_next = U, U_next, (U_prev if U_prev is not None else torch.empty_like(U))
            f, G = f_new, G_new
            if method == "pga":
                # Backtracking: a failed step halves the step and resumes from the best point.
                for b in range(B):
                    if not bool(improved[b]):
                        eta[b] /= 2
                        U[b], G[b], f[b] = run_best_U[b], run_best_G[b], run_best_f[b]
            else:
                for b in range(B):
                    successes[b] += int(bool(improved[b]))
                if k + 1 in checkpoints:
                    span = k + 1 - last_w
                    for b in range(B):
                        few = successes[b] < APGD_SUCCESS_FRACTION * span
                        stalled = (not reduced_last[b]) and bool(best_at_last[b] >= run_best_f[b])
                        reduced_last[b] = few or stalled
                        if reduced_last[b]:
                            eta[b] /= 2
                            U[b], G[b], f[b] = run_best_U[b], run_best_G[b], run_best_f[b]
                            U_prev[b] = run_best_U[b]  # no momentum carried across a restart
                        successes[b] = 0
                    best_at_last = run_best_f.clone()
                    last_w = k + 1
            if callback is not None and not estimates:
                callback(evals, loss0, torch.maximum(best_loss, run_best_f))
        if estimates:
            # The steps' values only ranked this run's points; its best is valued exactly.
            run_best_f = _exact_loss(problem, scale * run_best_U)
            nonfinite += ~torch.isfinite(run_best_f)
            evals += 1
        better = (run_best_f > best_loss) & torch.isfinite(run_best_f)
        if bool(better.any()):
            best_loss = torch.where(better, run_best_f, best_loss)
            best_U[better] = run_best_U[better]
        if callback is not None and estimates:
            callback(evals, loss0, best_loss)
        final_eta.append(list(eta))
        starts.append(start)
        del U, U_prev, U_next, G, run_best_G
    info = {"final_step": final_eta, "norm": norm, "restarts": restarts, "starts": starts}
    nonfinite = nonfinite.cpu()  # (counted where the losses are, moved once)
    if bool(nonfinite.any()):
        info["nonfinite_evals"] = int(nonfinite.sum())
        info["nonfinite_evals_per_problem"] = nonfinite.tolist()
        # (stack: _warn_nonfinite, _first_order, pga/apgd, maximize, the measure, its caller)
        _warn_nonfinite(int(nonfinite.sum()), evals * B, problem.dtype if hasattr(problem, "dtype") else scale.dtype, 6)
    return AscentResult(loss0=loss0, max_loss=best_loss, Y=scale * best_U, num_evals=evals, info=info)


def pga(
    problem: AscentProblem,
    scale: torch.Tensor,
    norm: str = "linf",
    max_iter: int = 10,
    step_size: float = 2.0,
    restarts: int = 1,
    seed: int = 0,
    callback: Callback | None = None,
    first_step: str = "gradient",
) -> AscentResult:
    """Projected sign ascent with backtracking on each problem's box (ℓ∞) or ellipsoid (ℓ2).

    Args:
        problem: see the module docstring.  scale: ``(B, d)`` half-widths / axes of the sets.
        norm: ``"linf"`` or ``"l2"``.  max_iter: steps per run (default 10, one evaluation each).
        step_size: initial step in units of ``scale`` (default 2.0).  restarts: runs (default 1; the
            first starts at 0, on the box the second too with the other first step, the others at
            seeded random points).  seed: for the random starts.
        first_step: ``"gradient"`` (default) or ``"sign"``, the box's first step (module docstring).
        callback: called after every evaluation as ``callback(num_evals, loss0, best_loss)``
            (problems with estimated steps: after the start and after each run, exact values).
    """
    return _first_order(problem, scale, norm, max_iter, step_size, restarts, seed, callback, "pga",
                        first_step)


def apgd(
    problem: AscentProblem,
    scale: torch.Tensor,
    norm: str = "linf",
    max_iter: int = 10,
    step_size: float = 2.0,
    restarts: int = 1,
    seed: int = 0,
    callback: Callback | None = None,
    first_step: str = "gradient",
) -> AscentResult:
    """Auto-PGD (momentum 0.75, step halving at checkpoints, restart from the best point); the
    arguments are those of :func:`pga`."""
    return _first_order(problem, scale, norm, max_iter, step_size, restarts, seed, callback, "apgd",
                        first_step)


# ---- L-BFGS-B ----------------------------------------------------------------------------------


def lbfgsb(
    problem: AscentProblem,
    scale: torch.Tensor,
    max_iter: int = 10,
    callback: Callback | None = None,
) -> AscentResult:
    """Keskar et al.'s protocol: scipy L-BFGS-B on ``-f`` over the box ``|y| <= scale``.

    Starts at ``y = 0`` with ``maxiter=max_iter`` and scipy's defaults otherwise (no rescaling);
    objective and gradient come from one pass and are handed to scipy in float64.  Returns the
    final iterate (as the paper does).  One problem only (B = 1).  scipy's compiled routine runs
    without ``minimize``'s per-coordinate bound setup (:mod:`sharpkit.sharpness._lbfgsb`; same
    iterates).  Where scipy stops at ``y = 0`` because the projected gradient there is below its
    absolute ``pgtol`` (1e-5; at a well-converged minimum), the result is ``loss0`` itself: a
    ``RuntimeWarning`` says so and ``info["stopped_at_start"]`` is True.
    """
    _check_common(problem, scale, "linf", max_iter, 1, 1.0)
    if getattr(problem, "estimates", False):
        raise ValueError("lbfgsb needs exact objective values and gradients (its line search compares them); "
                         "low-precision steps apply to pga/apgd")
    if problem.num_problems != 1:
        raise ValueError(f"lbfgsb solves one problem at a time, got num_problems={problem.num_problems}")
    scale = scale.detach()
    device, dtype = scale.device, scale.dtype
    bound = scale[0].double().cpu().numpy()
    loss0, _, g0, _ = _start(problem, scale)
    # The last point evaluated and its loss: scipy's final iterate is normally that point.
    state = {"evals": 1, "best": loss0.clone(), "last": (np.zeros_like(bound), float(loss0[0])), "nonfinite": 0}
    if callback is not None:
        callback(1, loss0, state["best"])

    def fun(y: np.ndarray) -> tuple[float, np.ndarray]:
        losses, grads = _evaluate(problem, torch.from_numpy(y).to(device, dtype).unsqueeze(0))
        f, g = float(losses[0]), grads[0].double().cpu().numpy()
        state["evals"] += 1
        state["last"] = (y.copy(), f)
        state["nonfinite"] += not math.isfinite(f)
        if math.isfinite(f) and f > float(state["best"][0]):
            state["best"] = losses.clone()
        if callback is not None:
            callback(state["evals"], loss0, state["best"])
        return -f, -g

    res = minimize_box(fun, bound, max_iter, first=(-float(loss0[0]), -g0[0].double().cpu().numpy()))
    Y = torch.from_numpy(res.x).to(device, dtype).unsqueeze(0)
    info = {"nit": int(res.nit), "nfev": int(res.nfev), "message": str(res.message), "success": bool(res.success)}
    last_y, last_f = state["last"]
    if np.array_equal(res.x, last_y):
        final = last_f
    else:
        # scipy went back to an earlier iterate (its line search failed, e.g. on a non-finite
        # trial point) and reports the failed trial's value: evaluate the returned point instead.
        final = float(_evaluate(problem, Y)[0][0])
        state["evals"] += 1
        info["reevaluated"] = True
    max_loss = torch.tensor([final], dtype=torch.float64, device=loss0.device)
    if state["nonfinite"]:
        info["nonfinite_evals"] = state["nonfinite"]
        _warn_nonfinite(state["nonfinite"], state["evals"], getattr(problem, "dtype", dtype), 5)
    if res.nit == 0 and res.success:
        # scipy's pgtol is absolute: at a well-converged minimum every coordinate of the gradient can be
        # below it, and L-BFGS-B then stops at y = 0 with "convergence" and a sharpness of exactly 0,
        # however curved the loss is (a trained MLP at loss 3e-6: 0, where Auto-PGD finds 5e-5).
        info["stopped_at_start"] = True
        warnings.warn(f"L-BFGS-B took no step ({info['message']}): the gradient at the parameters is below "
                      f"scipy's absolute tolerance pgtol={GTOL:g} in every coordinate, so the maximum reported is "
                      "the unperturbed loss (sharpness 0, as the paper's protocol gives it), not the box's maximum; "
                      "solver='apgd' climbs from the curvature", RuntimeWarning, stacklevel=4)
    return AscentResult(loss0=loss0, max_loss=max_loss, Y=Y, num_evals=state["evals"], info=info)


def maximize(
    problem: AscentProblem,
    scale: torch.Tensor,
    solver: str = "apgd",
    norm: str = "linf",
    max_iter: int = 10,
    step_size: float = 2.0,
    restarts: int = 1,
    seed: int = 0,
    callback: Callback | None = None,
    first_step: str = "gradient",
) -> AscentResult:
    """Dispatch to :func:`lbfgsb`, :func:`pga` or :func:`apgd` (``solver``)."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if solver == "lbfgsb":
        if norm != "linf":
            raise ValueError("solver='lbfgsb' handles boxes only (norm='linf'); use 'apgd' for norm='l2'")
        return lbfgsb(problem, scale, max_iter=max_iter, callback=callback)
    fn = pga if solver == "pga" else apgd
    return fn(problem, scale, norm=norm, max_iter=max_iter, step_size=step_size, restarts=restarts, seed=seed,
              callback=callback, first_step=first_step)
