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

The maximisations use projected sign ascent scaled to the box (``solver="pga"``):
``y <- clip(y + η_b · bound ⊙ sign(∇f), -bound, bound)`` with ``η_b = 1`` at first (the
linearised maximiser, a corner of the box) and halved for problem b whenever its loss did not
increase; the best point seen is kept.  ``max_iter`` gradients plus one final loss evaluation.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["MetricConfig", "METRICS", "run_metrics", "box_ascent", "lanczos_top", "hutchinson_trace"]

METRICS = ("keskar", "keskar-subspace", "adaptive", "top-eig", "trace")
SOLVERS = ("pga",)

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
            (default), else ``c = 1``.
        solver: ascent solver, ``"pga"``.  max_iter: gradient steps per maximisation (default 10).
        k: eigenvalues for ``top-eig`` (default 1).  lanczos_steps: Lanczos iterations (default 20).
        trace_samples: Hutchinson probes (default 20).
        seed: seeds A, the Lanczos start vector and the Hutchinson probes (default 0).
    """

    metrics: tuple[str, ...] = ("keskar",)
    epsilon: float = 1e-3
    subspace_dim: int = 100
    rho: float = 2e-3
    adaptive_scale: bool = True
    solver: str = "pga"
    max_iter: int = 10
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
            raise ValueError(
                f"solver {self.solver!r} is not available in the audit (choose from {SOLVERS}); "
                "L-BFGS-B runs per checkpoint: use sk.keskar_sharpness for it"
            )
        for name in ("epsilon", "rho"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and value == value and value != float("inf")):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        for name in ("subspace_dim", "max_iter", "k", "lanczos_steps", "trace_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.k > self.lanczos_steps:
            raise ValueError(f"k={self.k} eigenvalues need lanczos_steps >= k, got {self.lanczos_steps}")

    def key(self) -> dict[str, Any]:
        """The options that matter to the metrics asked for (other options do not change rows)."""
        d = asdict(self)
        used = {"metrics": list(self.metrics), "seed": self.seed}
        m = set(self.metrics)
        if m & {"keskar", "keskar-subspace", "adaptive"}:
            used.update(solver=self.solver, max_iter=self.max_iter)
        if m & {"keskar", "keskar-subspace"}:
            used["epsilon"] = d["epsilon"]
        if "keskar-subspace" in m:
            used["subspace_dim"] = self.subspace_dim
        if "adaptive" in m:
            used.update(rho=self.rho, adaptive_scale=self.adaptive_scale)
        if "top-eig" in m:
            used.update(k=self.k, lanczos_steps=self.lanczos_steps)
        if "trace" in m:
            used["trace_samples"] = self.trace_samples
        return used

    def vectors_per_checkpoint(self) -> int:
        """Parameter-sized vectors a checkpoint needs at once (for the group-size estimate)."""
        need = 8
        if "top-eig" in self.metrics:
            need = max(need, self.lanczos_steps + 6)
        if "keskar-subspace" in self.metrics:
            need = max(need, 10)
        return need


def box_ascent(engine, X: torch.Tensor, bound: torch.Tensor, max_iter: int, A: "_Subspace | None" = None):
    """Maximise each problem's loss over its box: ``max_{|y| <= bound} f_b(X_b + M y)``.

    ``M`` is the identity, or ``A`` for a subspace.  Returns ``(f0, max_loss)``, both ``(B,)``
    float64: the loss at ``X`` and the largest loss seen (never below ``f0``).
    """
    y = torch.zeros_like(bound)
    eta = torch.ones(bound.shape[0], dtype=bound.dtype, device=bound.device)
    f0 = best = prev = None
    for _ in range(max_iter):
        W = X if f0 is None else X + (y if A is None else A.matvec(y))
        losses, grads = engine.loss_and_grad(W)
        if A is not None:
            grads = A.rmatvec(grads.to(A.dtype))
        if f0 is None:
            f0, best = losses, losses.clone()
        else:
            best = torch.maximum(best, losses)
            # Halve the step of the problems whose last step did not raise the loss.
            eta = torch.where(losses <= prev, eta / 2, eta).to(eta.dtype)
        prev = losses
        step = eta.unsqueeze(1) * bound * torch.sign(grads.to(bound.dtype))
        y = torch.clamp(y + step, -bound, bound)
    final = engine.loss(X + (y if A is None else A.matvec(y)))
    best = torch.maximum(best, final)
    return f0, best


class _Subspace:
    """A (Gaussian, Philox-seeded) applied to the B problems' vectors at once."""

    def __init__(self, n: int, p: int, seed: int, dtype: torch.dtype, device: torch.device):
        from ..ops import GaussianSubspace

        self.dtype = torch.float64  # A⁺x and the box are formed in float64
        self.out_dtype = dtype
        self.op = GaussianSubspace(n, p, seed=seed, dtype=self.dtype, device=device)
        self.dense = self.op.materialize() if n * p * 8 <= _MATERIALIZE_LIMIT else None

    def matvec(self, Z: torch.Tensor) -> torch.Tensor:
        Z = Z.to(self.dtype)
        out = Z @ self.dense.T if self.dense is not None else torch.stack([self.op.matvec(z) for z in Z])
        return out.to(self.out_dtype)

    def rmatvec(self, G: torch.Tensor) -> torch.Tensor:
        G = G.to(self.dtype)
        return G @ self.dense if self.dense is not None else torch.stack([self.op.rmatvec(g) for g in G])

    def pinv_apply(self, X: torch.Tensor) -> torch.Tensor:
        """``A⁺ x`` for each row: the least-squares solution of ``(AᵀA) z = Aᵀ x``."""
        gram = self.dense.T @ self.dense if self.dense is not None else self.op.gram()
        return torch.linalg.solve(gram, self.rmatvec(X).T).T


def lanczos_top(engine, k: int, steps: int, seed: int) -> torch.Tensor:
    """The k largest Ritz values (``(B, k)`` float64) of each problem's Hessian after ``steps``
    Lanczos iterations with full reorthogonalisation, all problems from the same seeded start."""
    B, n = engine.num_problems, engine.dim
    steps = min(steps, n)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, generator=gen, dtype=torch.float64).to(engine.device)
    q = (q / q.norm()).expand(B, n).clone()
    Q = torch.zeros(B, steps, n, dtype=torch.float64, device=engine.device)
    alpha = torch.zeros(B, steps, dtype=torch.float64, device=engine.device)
    beta = torch.zeros(B, steps, dtype=torch.float64, device=engine.device)
    for j in range(steps):
        Q[:, j] = q
        w = engine.hvp(q.to(engine.dtype)).double()
        alpha[:, j] = (w * q).sum(1)
        # Full reorthogonalisation (twice is enough) keeps the Ritz values free of ghosts.
        for _ in range(2):
            w = w - torch.einsum("bj,bjn->bn", torch.einsum("bjn,bn->bj", Q[:, : j + 1], w), Q[:, : j + 1])
        if j + 1 == steps:
            break
        b = w.norm(dim=1)
        beta[:, j] = b
        # An invariant subspace was found: continue from a fresh direction orthogonal to it.
        small = b <= 1e-10 * alpha[:, : j + 1].abs().amax(1).clamp_min(1e-30)
        if bool(small.any()):
            r = torch.randn(n, generator=gen, dtype=torch.float64).to(engine.device).expand(B, n).clone()
            r = r - torch.einsum("bj,bjn->bn", torch.einsum("bjn,bn->bj", Q[:, : j + 1], r), Q[:, : j + 1])
            w = torch.where(small.unsqueeze(1), r, w)
            beta[:, j] = torch.where(small, torch.zeros_like(b), b)
            b = torch.where(small, r.norm(dim=1), b)
        q = w / b.unsqueeze(1)
    T = torch.diag_embed(alpha) + torch.diag_embed(beta[:, : steps - 1], 1) + torch.diag_embed(beta[:, : steps - 1], -1)
    values = torch.linalg.eigvalsh(T)  # ascending
    return values.flip(1)[:, :k]


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


def run_metrics(engine, config: MetricConfig) -> list[dict[str, Any]]:
    """All of ``config.metrics`` for every problem of ``engine``: one dict per problem.

    Each dict has ``"loss"`` (f at the checkpoint), one float per metric, and ``"details"``
    (per-metric extras: max_loss, the eigenvalues, the trace's standard error, evaluation counts).
    """
    X = engine.X
    B = engine.num_problems
    out: list[dict[str, Any]] = [{"details": {}} for _ in range(B)]
    f0 = None
    ms = config.metrics
    if "keskar" in ms:
        bound = config.epsilon * (X.abs() + 1)
        f0, fmax = box_ascent(engine, X, bound, config.max_iter)
        for b in range(B):
            out[b]["keskar"] = float(100 * (fmax[b] - f0[b]) / (1 + f0[b]))
            out[b]["details"]["keskar"] = {"max_loss": float(fmax[b])}
    if "keskar-subspace" in ms:
        A = _Subspace(engine.dim, config.subspace_dim, config.seed, X.dtype, X.device)
        bound = config.epsilon * (A.pinv_apply(X).abs() + 1)
        f0s, fmax = box_ascent(engine, X, bound, config.max_iter, A=A)
        f0 = f0s if f0 is None else f0
        for b in range(B):
            out[b]["keskar-subspace"] = float(100 * (fmax[b] - f0s[b]) / (1 + f0s[b]))
            out[b]["details"]["keskar-subspace"] = {"max_loss": float(fmax[b]), "p": config.subspace_dim}
    if "adaptive" in ms:
        scale = X.abs() if config.adaptive_scale else torch.ones_like(X)
        f0a, fmax = box_ascent(engine, X, config.rho * scale, config.max_iter)
        f0 = f0a if f0 is None else f0
        for b in range(B):
            out[b]["adaptive"] = float(fmax[b] - f0a[b])
            out[b]["details"]["adaptive"] = {"max_loss": float(fmax[b]), "norm": "linf"}
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
        f0 = engine.loss(X)
    for b in range(B):
        out[b]["loss"] = float(f0[b])
    return out
