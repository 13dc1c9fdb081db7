"""The audit's metrics, written once against an engine of B problems (see :mod:`.batched`).

Every algorithm runs in lockstep over the B checkpoints of a group: each data pass evaluates all
of them.  With B = 1 the same code is the one-at-a-time audit, so both give the same numbers.

- ``keskar``: ε-sharpness in the full space (Keskar et al. 2017, Eq. 4, A = I):
  ``100 * (max_{|y_i| <= ε(|x_i|+1)} f(x + y) - f(x)) / (1 + f(x))``.
- ``keskar-subspace``: the same over ``y = A z`` with A an n x p Gaussian matrix
  (:class:`sharpkit.ops.GaussianSubspace`, Philox-seeded) and the box
  ``|z_i| <= ε(|(A⁺x)_i| + 1)``.
- ``adaptive``: worst-case l∞ adaptive sharpness (Kwon et al. 2021; Andriushchenko et al. 2023):
  ``max_{|δ_i| <= ρ c_i} f(x + δ) - f(x)`` with ``c = |x|`` (adaptive) or 1.
- ``top-eig``: the k largest Hessian eigenvalues by Lanczos with full reorthogonalisation.
- ``trace``: the Hessian trace by Hutchinson's estimator with Rademacher probes.

The maximisations are :mod:`sharpkit.sharpness.solvers`' (``apgd`` by default, or ``pga``), run
on the whole group at once: the engine is the solvers' batched problem (``num_problems`` = B,
``loss_and_grad(W: (B, n))``) through their ``ShiftedProblem`` / ``SubspaceProblem`` adapters.
``lbfgsb`` (scipy, one problem at a time) makes the audit measure one checkpoint at a time.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..sharpness.solvers import FIRST_STEPS, NORMS, ascent_dtype_for

__all__ = ["MetricConfig", "METRICS", "SOLVERS", "run_metrics", "lanczos_top", "hutchinson_trace"]

METRICS = ("keskar", "keskar-subspace", "adaptive", "top-eig", "trace")
ASCENT_METRICS = ("keskar", "keskar-subspace", "adaptive")
SOLVERS = ("apgd", "pga", "lbfgsb")  # sharpkit.sharpness.solvers'; lbfgsb runs one checkpoint at a time

# Default ascent steps: the paper's protocol for Keskar's metrics, Andriushchenko et al.'s for adaptive.
KESKAR_STEPS, ADAPTIVE_STEPS = 10, 20

# Materialise the subspace matrix A up to this many bytes; beyond, products stream it by blocks.
_MATERIALIZE_LIMIT = 256 << 20


@dataclass
class MetricConfig:
    """What to measure and how (the part of the audit configuration that keys result rows).

    Attributes:
        metrics: names from :data:`METRICS`.
        epsilon: box half-width factor of ``keskar``/``keskar-subspace`` (default 1e-3).
        subspace_dim: p, columns of A for ``keskar-subspace`` (default 100).
        rho: radius of ``adaptive`` (default 2e-3).  adaptive_scale: ``c = |x|`` when True
            (default), else ``c = 1``.  adaptive_norm: ``"linf"`` (default) or ``"l2"``.
        solver: ascent solver of :mod:`sharpkit.sharpness.solvers`: ``"apgd"`` (default),
            ``"pga"`` or ``"lbfgsb"`` (one checkpoint at a time).
        max_iter: steps per maximisation (default None: 10 for ``keskar``/``keskar-subspace``,
            the paper's protocol, and 20 for ``adaptive``, as :func:`sharpkit.adaptive_sharpness`).
        restarts: apgd/pga runs (default 1).  first_step: apgd/pga's first step on the box,
            ``"gradient"`` (default) or ``"sign"`` (:mod:`sharpkit.sharpness.solvers`).
        ascent_dtype: apgd/pga steps under autocast to ``"bfloat16"`` or ``"float16"``, the
            reported losses still exact (:class:`~sharpkit.sharpness.solvers.AutocastEngine`;
            default None: full-precision steps).
        k: eigenvalues for ``top-eig`` (default 1).  lanczos_steps: Lanczos iterations (default 20).
        trace_samples: Hutchinson probes (default 20).
        seed: seeds A, the Lanczos start vector and the Hutchinson probes (default 0).
    """

    metrics: tuple[str, ...] = ("keskar",)
    epsilon: float = 1e-3
    subspace_dim: int = 100
    rho: float = 2e-3
    adaptive_scale: bool = True
    adaptive_norm: str = "linf"
    solver: str = "apgd"
    max_iter: int | None = None
    restarts: int = 1
    first_step: str = "gradient"
    ascent_dtype: str | None = None
    k: int = 1
    lanczos_steps: int = 20
    trace_samples: int = 20
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.metrics, str):
            self.metrics = tuple(m.strip() for m in self.metrics.split(",") if m.strip())
        self.metrics = tuple(self.metrics)
        if not self.metrics:
            raise ValueError("metrics is empty: name at least one of " + ", ".join(METRICS))
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}: choose from {', '.join(METRICS)}")
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError(f"metrics lists a name twice: {list(self.metrics)}")
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}: choose from {', '.join(SOLVERS)}")
        if self.first_step not in FIRST_STEPS:
            raise ValueError(f"first_step must be one of {FIRST_STEPS}, got {self.first_step!r}")
        if self.ascent_dtype is not None:  # (the solver matters only where a metric maximises)
            self.ascent_dtype = ascent_dtype_for(self.ascent_dtype, self.solver if self.has_ascent() else "apgd")
        if self.adaptive_norm not in NORMS:
            raise ValueError(f"adaptive_norm must be one of {NORMS}, got {self.adaptive_norm!r}")
        if self.solver == "lbfgsb" and "adaptive" in self.metrics and self.adaptive_norm != "linf":
            raise ValueError("solver 'lbfgsb' handles boxes only: use adaptive_norm='linf' or solver 'apgd'")
        for name in ("epsilon", "rho"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and value == value and value != float("inf")):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        for name in ("subspace_dim", "max_iter", "restarts", "k", "lanczos_steps", "trace_samples"):
            value = getattr(self, name)
            if name == "max_iter" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if "top-eig" in self.metrics and self.k > self.lanczos_steps:  # k and lanczos_steps serve top-eig only
            raise ValueError(f"k={self.k} eigenvalues need lanczos_steps >= {self.k}, got {self.lanczos_steps}")

    def key(self) -> dict[str, Any]:
        """The options that matter to the metrics asked for (other options do not change rows)."""
        d = asdict(self)
        used = {"metrics": list(self.metrics), "seed": self.seed}
        m = set(self.metrics)
        if self.has_ascent():
            used["solver"] = self.solver
            if m & {"keskar", "keskar-subspace"}:
                used["max_iter"] = self.steps("keskar")
            if "adaptive" in m:
                used["adaptive_max_iter"] = self.steps("adaptive")
            if self.solver != "lbfgsb":
                used["restarts"] = self.restarts
                # (an l2 ball has one first step: first_step applies to boxes only)
                if m & {"keskar", "keskar-subspace"} or self.adaptive_norm == "linf":
                    used["first_step"] = self.first_step
            if self.ascent_dtype is not None:  # absent from full-precision keys, as before the option
                used["ascent_dtype"] = self.ascent_dtype
        if m & {"keskar", "keskar-subspace"}:
            used["epsilon"] = d["epsilon"]
        if "keskar-subspace" in m:
            used["subspace_dim"] = self.subspace_dim
        if "adaptive" in m:
            used.update(rho=self.rho, adaptive_scale=self.adaptive_scale, adaptive_norm=self.adaptive_norm)
        if "top-eig" in m:
            used.update(k=self.k, lanczos_steps=self.lanczos_steps)
        if "trace" in m:
            used["trace_samples"] = self.trace_samples
        return used

    def has_ascent(self) -> bool:
        """Whether a metric asked for is a maximisation (the solver options apply)."""
        return bool(set(self.metrics) & set(ASCENT_METRICS))

    def steps(self, metric: str) -> int:
        """Ascent steps of ``metric`` (``max_iter``, or its metric's default when None)."""
        if self.max_iter is not None:
            return self.max_iter
        return ADAPTIVE_STEPS if metric == "adaptive" else KESKAR_STEPS

    def vectors_per_checkpoint(self) -> int:
        """Parameter-sized vectors a checkpoint needs at once (for the group-size estimate)."""
        need = 8
        if "top-eig" in self.metrics:
            need = max(need, self.lanczos_steps + 6)
        if "keskar-subspace" in self.metrics:
            need = max(need, 10)
        return need


class _DenseSubspace:
    """A materialised once (float64) and shared by every checkpoint of a group: the solvers'
    ``SubspaceProblem`` applies A row by row, and regenerating it from Philox for each of B rows
    at every step would cost more than the model.  Falls back to the matrix-free operator when
    A is too large to hold."""

    def __init__(self, n: int, p: int, seed: int, dtype: torch.dtype, device: torch.device):
        from ..ops import GaussianSubspace

        self.p, self.dtype = p, dtype
        self.op = GaussianSubspace(n, p, seed=seed, dtype=dtype, device=device)
        self.dense = (
            GaussianSubspace(n, p, seed=seed, dtype=torch.float64, device=device).materialize()
            if n * p * 8 <= _MATERIALIZE_LIMIT else None
        )
        self.dense_t = self.dense.to(dtype) if self.dense is not None else None

    def matvec(self, z: torch.Tensor) -> torch.Tensor:
        return self.dense_t @ z.to(self.dtype) if self.dense is not None else self.op.matvec(z)

    def rmatvec(self, g: torch.Tensor) -> torch.Tensor:
        return g.to(self.dtype) @ self.dense_t if self.dense is not None else self.op.rmatvec(g)

    def centers(self, X: torch.Tensor) -> torch.Tensor:
        """``A⁺x`` (float64) for each row of ``X``: ``(AᵀA)⁻¹ Aᵀx``."""
        if self.dense is None:
            from ..sharpness.keskar import subspace_center

            return torch.stack([subspace_center(self.op, x) for x in X])
        # All rows share AᵀA: one p x p factorisation serves the group.
        return torch.linalg.solve(self.dense.T @ self.dense, self.dense.T @ X.double().T).T


def _ascend(problem, scale: torch.Tensor, norm: str, config: "MetricConfig", metric: str):
    from ..sharpness import solvers

    return solvers.maximize(problem, scale, solver=config.solver, norm=norm, max_iter=config.steps(metric),
                            restarts=config.restarts, seed=config.seed, first_step=config.first_step)


def _ascent_details(res, b: int, **extra: Any) -> dict[str, Any]:
    """A row's details of one ascent: its best loss, evaluation count, and where the loss was not
    finite at points tried (skipped: the value is then the maximum over the finite ones), how many."""
    details = {"max_loss": float(res.max_loss[b]), **extra, "num_evals": res.num_evals}
    per_problem = res.info.get("nonfinite_evals_per_problem")
    if per_problem is not None and per_problem[b]:
        details["nonfinite_evals"] = int(per_problem[b])
    elif "nonfinite_evals" in res.info and len(res.max_loss) == 1:  # (L-BFGS-B: one problem)
        details["nonfinite_evals"] = int(res.info["nonfinite_evals"])
    return details


def lanczos_top(engine, k: int, steps: int, seed: int) -> torch.Tensor:
    """The k largest Ritz values (``(B, k)`` float64) of each problem's Hessian after ``steps``
    Lanczos iterations with full reorthogonalisation, all problems from the same seeded start:
    :func:`sharpkit.curvature.spectra.lanczos_runs` with one run per problem, each step one stacked
    product.  A run that finds an invariant subspace early stops there (its Ritz values are then
    exact eigenvalues); if it holds fewer than k values the rest are NaN."""
    from ..curvature.spectra import lanczos_runs, tridiagonal

    B, n = engine.num_problems, engine.dim
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(n, generator=gen, dtype=torch.float64)

    def matmat(V: torch.Tensor, runs: list[int]) -> torch.Tensor:
        W = torch.zeros(B, n, dtype=engine.dtype, device=engine.device)
        W[runs] = V.t().to(engine.dtype)
        return engine.hvp(W).double()[runs].t()

    runs = lanczos_runs(matmat, n, [start] * B, min(steps, n), device=engine.device, per_run=True)
    values = torch.full((B, k), float("nan"), dtype=torch.float64)
    for b, (alphas, betas) in enumerate(runs):
        theta = torch.linalg.eigvalsh(tridiagonal(alphas.tolist(), betas.tolist())).flip(0)[:k]
        values[b, : theta.numel()] = theta
    return values


def hutchinson_trace(engine, samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(estimate, stderr)``, each ``(B,)`` float64: mean of ``vᵀHv`` over Rademacher probes v,
    the same probes for every problem."""
    gen = torch.Generator().manual_seed(seed + 1)
    vals = []
    for _ in range(samples):
        v = (torch.randint(0, 2, (engine.dim,), generator=gen) * 2 - 1).to(engine.device, torch.float64)
        hv = engine.hvp(v.to(engine.dtype).expand(engine.num_problems, -1)).double()
        vals.append(hv @ v)
    vals = torch.stack(vals, 1)
    stderr = vals.std(1) / samples**0.5 if samples > 1 else torch.full_like(vals[:, 0], float("nan"))
    return vals.mean(1), stderr


def run_metrics(engine, config: MetricConfig, loss0: torch.Tensor | None = None) -> list[dict[str, Any]]:
    """All of ``config.metrics`` for every problem of ``engine``: one dict per problem.

    ``loss0``, the ``(B,)`` losses at the checkpoints when the caller has them, spares a pass where
    no ascent reports them.

    Each dict has ``"loss"`` (f at the checkpoint), one float per metric, and ``"details"``
    (per-metric extras: max_loss, the eigenvalues, the trace's standard error, evaluation counts).
    """
    X = engine.X
    B = engine.num_problems
    out: list[dict[str, Any]] = [{"details": {}} for _ in range(B)]
    f0 = None
    ms = set(config.metrics)
    if config.has_ascent():
        from ..sharpness import solvers

        # The ascents' steps; curvature and reported losses use the engine itself.
        steps = engine if config.ascent_dtype is None else solvers.AutocastEngine(engine, config.ascent_dtype)
    if "keskar" in ms:
        res = _ascend(solvers.ShiftedProblem(steps, X), solvers.keskar_bound(X, config.epsilon), "linf", config,
                      "keskar")
        f0 = res.loss0
        for b in range(B):
            out[b]["keskar"] = float(100 * (res.max_loss[b] - res.loss0[b]) / (1 + res.loss0[b]))
            out[b]["details"]["keskar"] = _ascent_details(res, b)
    if "keskar-subspace" in ms:
        A = _DenseSubspace(engine.dim, config.subspace_dim, config.seed, X.dtype, X.device)
        scale = solvers.keskar_bound(A.centers(X), config.epsilon).to(X.dtype)
        res = _ascend(solvers.SubspaceProblem(steps, X, A), scale, "linf", config, "keskar-subspace")
        f0 = res.loss0 if f0 is None else f0
        for b in range(B):
            out[b]["keskar-subspace"] = float(100 * (res.max_loss[b] - res.loss0[b]) / (1 + res.loss0[b]))
            out[b]["details"]["keskar-subspace"] = _ascent_details(res, b, p=config.subspace_dim)
    if "adaptive" in ms:
        scale = config.rho * (X.abs() if config.adaptive_scale else torch.ones_like(X))
        res = _ascend(solvers.ShiftedProblem(steps, X), scale, config.adaptive_norm, config, "adaptive")
        f0 = res.loss0 if f0 is None else f0
        for b in range(B):
            out[b]["adaptive"] = float(res.max_loss[b] - res.loss0[b])
            out[b]["details"]["adaptive"] = _ascent_details(res, b, norm=config.adaptive_norm)
    if "top-eig" in ms:
        values = lanczos_top(engine, config.k, config.lanczos_steps, config.seed)
        for b in range(B):
            out[b]["top-eig"] = float(values[b, 0])
            out[b]["details"]["top-eig"] = {"values": [float(v) for v in values[b]]}
    if "trace" in ms:
        est, err = hutchinson_trace(engine, config.trace_samples, config.seed)
        for b in range(B):
            out[b]["trace"] = float(est[b])
            out[b]["details"]["trace"] = {"stderr": float(err[b])}
    if f0 is None:
        f0 = engine.loss(X) if loss0 is None else loss0
    for b in range(B):
        out[b]["loss"] = float(f0[b])
    return out
