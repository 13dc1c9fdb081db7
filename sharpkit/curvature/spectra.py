"""Spectra of curvature operators: extreme eigenvalues, trace, spectral density.

Everything works on any ``op`` with ``op.shape == (n, n)`` and ``op @ V`` for ``V`` of shape ``(n, k)``
(a :class:`~sharpkit.curvature.operator.CurvatureOperator`, or a symmetric tensor for tests).  The
Krylov bases, tridiagonal matrices and estimates are kept in float64 whatever the operator's own
precision; products are asked for k vectors at a time wherever the algorithm allows it, because k
columns share one pass over the data.  Every random vector comes from a ``torch.Generator`` seeded
with ``seed``, so results are reproducible.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .engines import DEFAULT_BLOCK_SIZE

__all__ = [
    "EigenResult",
    "Estimate",
    "Density",
    "eigenvalues",
    "trace",
    "spectral_density",
    "tridiagonal",
    "lanczos_runs",
]

F64 = torch.float64
WHICH = ("LA", "SA", "LM")


@dataclass
class EigenResult:
    """``k`` eigenpairs: ``values`` (k,) ordered by ``which`` (descending for "LA", ascending for
    "SA", descending magnitude for "LM"), ``vectors`` (n, k) orthonormal columns, float64.

    ``residuals``: ``||H v - lambda v||`` per pair (Ritz estimates for Lanczos; for power iteration
    the deflated operator's, of the iterate its last product was taken of, NaN where unconverged);
    ``converged``: whether every pair met ``tol`` (for power iteration: its Rayleigh quotient
    settled AND its residual is at most ``2 sqrt(tol) |lambda|``, see :func:`eigenvalues`);
    ``num_matvecs``: products used.
    """

    values: torch.Tensor
    vectors: torch.Tensor
    num_matvecs: int
    residuals: torch.Tensor | None = None
    converged: bool = True
    method: str = "lanczos"
    iterations: int = 0


@dataclass
class Estimate:
    """A stochastic estimate: ``value`` with its standard error ``stderr`` from ``num_matvecs`` products."""

    value: float
    stderr: float
    num_matvecs: int
    method: str = ""
    samples: torch.Tensor | None = field(default=None, repr=False)


@dataclass
class Density:
    """Stochastic Lanczos quadrature: ``density`` (Gaussian-smoothed, integrates to ~1) on ``grid``;
    ``nodes``/``weights`` (runs, steps): the quadrature rule of every run (weights sum to 1 per run)."""

    grid: torch.Tensor
    density: torch.Tensor
    nodes: torch.Tensor
    weights: torch.Tensor
    sigma: float
    num_matvecs: int


# ---- plumbing --------------------------------------------------------------------------------------

def _size(op: Any) -> int:
    shape = getattr(op, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != shape[1]:
        raise TypeError(f"expected a square operator with .shape (n, n) and op @ V, got {type(op).__name__}")
    return int(shape[0])


def _device(op: Any) -> torch.device:
    dev = getattr(op, "device", None)
    return torch.device(dev) if dev is not None else torch.device("cpu")


# What a product is called in errors, by the operator's ``kind`` (a CurvatureOperator's).
_PRODUCT_NAMES = {"hessian": "the Hessian-vector product", "ggn": "the GGN-vector product"}


class _Counter:
    """``V (n, k) -> op @ V`` in ``dtype`` (float64 unless set), counting products.

    A product with NaN/inf entries is a ``ValueError``: left in, it would come out as a NaN
    estimate or as a ``LinAlgError`` from the eigensolver of the projected matrix, far from its
    cause (NaN/inf in the data, buffers or parameters).
    """

    def __init__(self, op: Any, dtype: torch.dtype = F64):
        self.op, self.n, self.count = op, _size(op), 0
        self.device = _device(op)
        self.dtype = dtype

    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        vec = V.dim() == 1
        W = V[:, None] if vec else V
        # A dense tensor operator keeps its own precision (a float32 matrix meets float64 vectors).
        out = self.op @ W.to(self.op.dtype) if isinstance(self.op, torch.Tensor) else self.op @ W
        self.count += W.shape[1]
        out = torch.as_tensor(out).to(self.device, self.dtype)
        if out.shape != W.shape:
            raise ValueError(f"the operator returned shape {tuple(out.shape)} for input {tuple(W.shape)}")
        if not bool(torch.isfinite(out).all()):
            what = _PRODUCT_NAMES.get(getattr(self.op, "kind", None), "the operator's product")
            raise ValueError(f"{what} returned non-finite values (NaN/inf): check the data, buffers and "
                             "parameters for NaN/inf")
        return out[:, 0] if vec else out


def _work_dtype(op: Any) -> torch.dtype:
    """The precision of the Lanczos/Hutchinson vectors for ``op``: float32 when the operator computes
    in float32 (its products carry float32 rounding anyway, and the n-vector traffic halves), else
    float64.  Coefficients, tridiagonal matrices and sums stay float64 either way."""
    return torch.float32 if getattr(op, "dtype", F64) == torch.float32 else F64


def _generator(seed: int) -> torch.Generator:
    if not _is_int(seed):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return torch.Generator().manual_seed(int(seed))


def _is_int(value: Any) -> bool:
    """Whether ``value`` is an integer: Python's or numpy's (``np.int64`` from array arithmetic), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _rademacher(rows: int, cols: int, gen: torch.Generator, device: torch.device, dtype: torch.dtype = F64) -> torch.Tensor:
    """``(rows, cols)`` random signs (drawn as int8: 3x faster than int64 for 1e6 of them)."""
    return torch.randint(0, 2, (rows, cols), generator=gen, dtype=torch.int8).to(dtype).mul_(2).sub_(1).to(device)


def _gaussian(n: int, k: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randn(n, k, generator=gen, dtype=F64).to(device)


def _eigh(T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of a small symmetric float64 matrix (the tridiagonal/banded Lanczos
    matrices).  Through torch, not numpy: numpy's OpenBLAS wakes worker threads that keep spinning
    after the call and take the cores from the next product (2x slower Lanczos on a 2-core CPU)."""
    return torch.linalg.eigh(T.detach().cpu())


def _select(theta: torch.Tensor, k: int, which: str) -> torch.Tensor:
    """Indices of the k wanted values of ``theta``, in output order."""
    if which == "LA":
        return torch.argsort(theta, descending=True)[:k]
    if which == "SA":
        return torch.argsort(theta)[:k]
    return torch.argsort(theta.abs(), descending=True)[:k]


def _check_which(which: str) -> None:
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")


class _Basis:
    """A growing set of orthonormal columns stored row-wise (capacity doubles as needed).

    ``dtype`` is the storage precision (float64 by default).  Reading the basis is the main cost of
    full reorthogonalisation for large n, so the Lanczos eigensolvers store it in the operator's
    precision: a float32 operator's products carry float32 rounding anyway, and float32 storage
    halves the memory traffic; coefficients and the tridiagonal matrix stay float64.
    """

    def __init__(self, n: int, device: torch.device, capacity: int = 16, dtype: torch.dtype = F64):
        self.rows = torch.empty(capacity, n, dtype=dtype, device=device)
        self.size = 0

    @property
    def Q(self) -> torch.Tensor:
        return self.rows[: self.size]

    def append(self, v: torch.Tensor) -> None:
        block = v.t() if v.dim() == 2 else v[None]  # (n, p) columns or one (n,) vector
        need = self.size + block.shape[0]
        if need > self.rows.shape[0]:
            grown = torch.empty(max(need, 2 * self.rows.shape[0]), self.rows.shape[1], dtype=self.rows.dtype,
                                device=self.rows.device)
            grown[: self.size] = self.rows[: self.size]
            self.rows = grown
        self.rows[self.size: need] = block
        self.size = need

    def combine(self, S: torch.Tensor) -> torch.Tensor:
        """``Q^T S`` (float64, columns of unit length whatever the storage precision): vectors from
        coefficients in the basis."""
        V = (self.Q.t() @ S.to(self.rows.device, self.rows.dtype)).to(F64)
        return V / torch.linalg.vector_norm(V, dim=0)

    def orthogonalize_(self, W: torch.Tensor, passes: int = 2) -> torch.Tensor:
        """Remove the basis components of the columns of ``W`` (n,) or (n, p): classical Gram-Schmidt,
        repeated once when needed ("twice is enough", Parlett/Kahan) for full reorthogonalisation."""
        if self.size == 0:
            return W
        Q = self.Q
        before = torch.linalg.vector_norm(W, dim=0)
        W = W - (Q.t() @ (Q @ W.to(Q.dtype))).to(W.dtype)
        # DGKS criterion: a second pass only where the first cancelled much of the vector (norm
        # dropped below 1/sqrt(2)); each pass reads the whole basis, the dominant cost for large n.
        if passes > 1 and bool((torch.linalg.vector_norm(W, dim=0) < 0.7071 * before).any()):
            W = W - (Q.t() @ (Q @ W.to(Q.dtype))).to(W.dtype)
        return W


def _fresh_direction(basis: _Basis, n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor | None:
    """A random unit vector orthogonal to the basis (None when the basis spans everything)."""
    for _ in range(3):
        w = basis.orthogonalize_(_gaussian(n, 1, gen, device)[:, 0])
        nrm = torch.linalg.vector_norm(w)
        if nrm > 1e-8:
            return w / nrm
    return None


# ---- Lanczos ---------------------------------------------------------------------------------------

def _lanczos(matvec: _Counter, n: int, k: int, which: str, tol: float, max_steps: int,
             v0: torch.Tensor, gen: torch.Generator, device: torch.device, warm: bool = False):
    """Single-vector Lanczos with full reorthogonalisation and Ritz-residual stopping; the vectors
    and the basis live in ``matvec.dtype``.

    ``warm``: ``v0`` is the caller's, not random.  A random start has a component along every
    eigenvector, so a Krylov space grown from it that becomes invariant holds (one copy of) every
    wanted eigenvalue; a warm start may span an invariant subspace without them (an exact
    eigenvector of another eigenvalue).  There the run goes on from a random direction orthogonal
    to it, as a fresh run: it stops once its extreme Ritz values have converged too."""
    storage = matvec.dtype
    basis = _Basis(n, device, capacity=min(max_steps + 1, 64), dtype=storage)
    q = (v0 / torch.linalg.vector_norm(v0)).to(storage)
    alphas: list[float] = []
    betas: list[float] = []
    q_prev, beta_prev = None, 0.0
    theta = S = None
    res = None
    converged = False
    probe = ref = None  # first column of the running probe; the k-th wanted value when it started
    fresh = False  # the probe follows a warm start's invariant space: a fresh run, not a check
    for j in range(max_steps):
        basis.append(q)
        w = matvec(q)
        a = float(torch.dot(q, w).double())  # (BLAS dot: blocked partial sums even in float32)
        w.sub_(q, alpha=a)  # in place: these n-vectors are the loop's main memory traffic
        if q_prev is not None:
            w.sub_(q_prev, alpha=beta_prev)
        w = basis.orthogonalize_(w)
        b = float(torch.linalg.vector_norm(w))
        alphas.append(a)
        m = j + 1
        theta, S = _eigh(tridiagonal(alphas, betas))
        idx = _select(theta, min(k, m), which)
        res = (b * S[-1, idx]).abs()
        scale = theta[idx].abs().clamp_min(1e-30)
        floor = 1e-12 * float(theta.abs().max())  # (relative: an operator ~1e-12 is not all rounding)
        invariant = b <= floor

        def probe_pairs():
            th_p, S_p = _eigh(tridiagonal(alphas[probe:], betas[probe:]))
            return th_p, (b * S_p[-1]).abs()

        met = bool((res <= tol * scale).all())
        # For k > 1 an invariant subspace may lack copies of repeated eigenvalues (one Krylov
        # vector holds one direction per eigenspace): a probe follows it (k = 1 needs one copy,
        # which a random start has; a warm start's invariant space may hold none).
        if fresh:
            # The run from a random direction after a warm start's invariant space: trusted like
            # a cold run once its own extreme Ritz values have converged (before, the wanted value
            # may still be the warm space's exact one, an eigenvalue but not the extreme).
            stop = m == n or (met and m >= k and not invariant and _probe_clear(*probe_pairs(), which, tol, None, floor))
        else:
            stop = _may_stop(met, m == n, m >= k and (k == 1 or (probe is None and not invariant))
                             and not (warm and probe is None and invariant),
                             probe_pairs if probe is not None else None, which, tol, ref, floor)
        if stop:
            converged = True
            break
        if invariant:
            # An invariant subspace: its Ritz pairs are exact; continue in a fresh direction (a
            # probe: the rest of the space holds only the missing copies of its eigenvalues, or
            # anything where the space grew from a warm start).
            nxt = _fresh_direction(basis, n, gen, device)
            if nxt is None:
                converged = True
                break
            fresh = warm and probe is None
            probe, ref = m, (float(theta[idx[-1]]) if m >= k else None)
            betas.append(0.0)
            q_prev, beta_prev, q = q, 0.0, nxt.to(storage)
            continue
        betas.append(b)
        q_prev, beta_prev, q = q, b, w.div_(b)
    idx = _select(theta, min(k, len(alphas)), which)
    vectors = basis.combine(S[:, idx])
    return theta[idx], vectors, res, converged, len(alphas)


def _next_block(basis: _Basis, W: torch.Tensor, a_scale: float, w_scale: float, n: int, width: int,
                gen: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The next block Lanczos block ``Qn`` (n, p') and coupling ``B`` (p', p) with ``W = Qn B`` from
    the residual block ``W`` (n, p), already orthogonal to the basis; ``p' <= n - basis.size``; and
    whether the block is a fresh start.

    Where ``W`` loses rank, an unpivoted QR is no help: its columns for the dead directions are
    arbitrary completions (not orthogonal to the basis), and the later columns mix them in.  The
    block is then rebuilt from the SVD of QR's ``B``, whose leading columns span exactly the range of
    ``W``, and shrinks to them (a zero column would add a spurious Ritz value 0).  Where no column
    is left, the basis spans an invariant subspace: the next block is ``width`` fresh random columns
    orthogonal to it (``B = 0``: no coupling), fewer where fewer dimensions are left.  A live
    direction that is nearly dead carries the rounding of the orthogonalisation amplified by
    ``w_scale / sigma``; the block is orthogonalised once more then.
    """
    p = W.shape[1]
    room = n - basis.size

    def live_block(Qn: torch.Tensor, B: torch.Tensor, smallest: float):
        if smallest < 1e-4 * w_scale:  # nearly dead: orthogonalise once more
            Qn, C = torch.linalg.qr(basis.orthogonalize_(Qn))
            B = C @ B
        return Qn, B, False

    Qn, B = torch.linalg.qr(W)
    sv = torch.linalg.svdvals(B)
    thr = 1e-12 * max(a_scale, w_scale)
    if p <= room and float(sv[-1]) > thr:
        return live_block(Qn, B, float(sv[-1]))
    U, sv, Vh = torch.linalg.svd(B)
    live = min(int((sv > thr).sum()), room)
    if live:
        return live_block(Qn @ U[:, :live], sv[:live, None] * Vh[:live], float(sv[live - 1]))
    cols: list[torch.Tensor] = []
    for _ in range(min(width, room)):
        w = _gaussian(n, 1, gen, device)
        for _ in range(2):  # against the basis and the columns so far ("twice is enough")
            w = basis.orthogonalize_(w, passes=1)
            if cols:
                Z = torch.cat(cols, 1)
                w = w - Z @ (Z.t() @ w)
        nrm = torch.linalg.vector_norm(w)
        if not nrm > 1e-8:
            break
        cols.append(w / nrm)
    Qn = torch.cat(cols, 1) if cols else W[:, :0]
    return Qn, W.new_zeros(Qn.shape[1], p), True


def _may_stop(met: bool, exhausted: bool, trusted: bool, probe_pairs, which: str, tol: float,
              ref: float | None, floor: float) -> bool:
    """Whether a (block) Lanczos run may stop: the space is ``exhausted``, or every wanted Ritz
    residual ``met`` tol and either no copy of a repeated eigenvalue can be missing (``trusted``:
    k = 1, or no probe runs and the Krylov space did not become invariant short of k values or its
    blocks hold >= k columns) or the running probe (``probe_pairs() -> (Ritz values, residuals)``,
    None when none runs) shows that nothing is missing (:func:`_probe_clear`)."""
    if exhausted:
        return True
    if not met:
        return False
    if trusted:
        return True
    if probe_pairs is None or ref is None:  # (fewer than k values before it: whatever it finds is wanted)
        return False
    theta, res = probe_pairs()
    return _probe_clear(theta, res, which, tol, ref, floor)


def _probe_clear(theta: torch.Tensor, res: torch.Tensor, which: str, tol: float, ref: float | None,
                 floor: float) -> bool:
    """Whether a probe, a Lanczos run restarted from random directions orthogonal to an invariant
    subspace, shows that nothing is missing: its extreme Ritz values on the wanted side(s) (Ritz
    values ``theta``, residuals ``res``) have converged (residual <= tol * max(|value|, |ref|)) and
    none lies beyond ``ref``, the k-th wanted value when it started, by more than ``tol * |ref|``
    (both up to ``floor``, the rounding level of the operator: zero eigenvalues come out as noise).

    A Krylov space grown from p random vectors holds min(m, p) directions of an eigenvalue of
    multiplicity m, so where it becomes invariant the rest of the space holds the missing copies
    only; random directions there find (one copy of) each of them."""
    score = {"LA": lambda x: x, "SA": lambda x: -x, "LM": abs}[which]
    ends = {"LA": [int(theta.argmax())], "SA": [int(theta.argmin())],
            "LM": [int(theta.argmax()), int(theta.argmin())]}[which]
    if ref is None:  # (a fresh run's probe: only whether its extremes converged; see _lanczos)
        return all(float(res[i]) <= tol * abs(float(theta[i])) + floor for i in ends)
    for i in ends:
        t = float(theta[i])
        if float(res[i]) > tol * max(abs(t), abs(ref)) + floor or score(t) > score(ref) + tol * abs(ref) + floor:
            return False
    return True


def _block_lanczos(matmat: _Counter, n: int, k: int, which: str, tol: float, max_steps: int,
                   V0: torch.Tensor, gen: torch.Generator, device: torch.device, storage: torch.dtype = F64):
    """Block Lanczos (block size p = V0.shape[1]) with full reorthogonalisation: every step is one
    batched product of the block's vectors.  A block shrinks where its residual loses rank; where
    none is left (an invariant subspace) a fresh random block continues, as a probe for k > p (see
    :func:`_probe_clear`; a block of p >= k random columns holds every copy of the k wanted)."""
    p = V0.shape[1]
    basis = _Basis(n, device, capacity=min(p * (max_steps + 1), 256), dtype=storage)
    Q, _ = torch.linalg.qr(V0)
    Q_prev = None
    B_prev = None  # (p_j, p_{j-1}): Q_j B_j = residual of step j-1
    A_blocks: list[torch.Tensor] = []
    B_blocks: list[torch.Tensor] = []
    theta = S = res = None
    converged = False
    steps = 0
    probe = ref = None  # first row of the running probe; the k-th wanted value when it started
    for j in range(max_steps):
        basis.append(Q)
        W = matmat(Q)
        wscale = float(torch.linalg.vector_norm(W, dim=0).max())
        A = Q.t() @ W
        A = (A + A.t()) / 2
        W = W - Q @ A
        if Q_prev is not None:
            W = W - Q_prev @ B_prev.t()
        W = basis.orthogonalize_(W)
        Qn, B, fresh = _next_block(basis, W, float(A.abs().max()), wscale, n, p, gen, device)
        A_blocks.append(A.cpu())
        B_blocks.append(B.cpu())
        steps = j + 1
        m = basis.size
        T = torch.zeros(m, m, dtype=F64)
        lo = 0
        for i, Ai in enumerate(A_blocks):
            hi = lo + Ai.shape[0]
            T[lo:hi, lo:hi] = Ai
            if i > 0:
                Bi = B_blocks[i - 1]  # (p_i, p_{i-1})
                T[lo:hi, lo - Bi.shape[1]:lo] = Bi
                T[lo - Bi.shape[1]:lo, lo:hi] = Bi.t()
            lo = hi
        theta, S = _eigh(T)
        idx = _select(theta, min(k, m), which)
        res = torch.linalg.vector_norm(B_blocks[-1] @ S[-A.shape[0]:, idx], dim=0)
        # (_next_block never takes the basis past n: Qn.shape[1] <= n - m.)
        exhausted = m >= n or Qn.shape[1] == 0

        def probe_pairs():
            th_p, S_p = _eigh(T[probe:, probe:])
            return th_p, torch.linalg.vector_norm(B_blocks[-1] @ S_p[-A.shape[0]:], dim=0)

        met = bool((res <= tol * theta[idx].abs().clamp_min(1e-30)).all())
        if _may_stop(met, exhausted and m >= k, m >= k and (k == 1 or (probe is None and (not fresh or p >= k))),
                     probe_pairs if probe is not None else None, which, tol, ref,
                     1e-12 * float(theta.abs().max())):
            converged = True
            break
        if exhausted:  # (m < k: fewer dimensions than wanted eigenpairs cannot happen, k <= n)
            break
        if fresh:
            probe, ref = m, (float(theta[idx[-1]]) if m >= k else None)
        Q_prev, B_prev, Q = Q, B, Qn
    idx = _select(theta, min(k, theta.numel()), which)
    vectors = basis.combine(S[:, idx])
    return theta[idx], vectors, res, converged, steps


# Power iteration's second convergence test: the residual ``||H v - theta v||`` (deflated, of the
# iterate the last product was taken of) at most ``POWER_RESIDUAL_FACTOR * sqrt(tol) * |theta|``
# (plus ``1e-12`` times the operator's scale, the rounding level of a deflated zero eigenvalue).
# The Rayleigh quotient's relative change alone, PyHessian's test, holds without an eigenpair: on
# eigenvalues +l and -l among the wanted ones the iterate alternates in their span with a constant
# quotient l (a^2 - b^2) / (a^2 + b^2) (residual 2 l |ab|, of the order of l), and on a pair of near
# magnitudes of opposite signs (ratio -rho) the quotient moves by about (1 - rho^2) of its error a
# step, tol while it is tol / (1 - rho^2) off.  A residual r bounds the distance of theta to the
# spectrum by r, and by r^2 / gap where theta is isolated: the test holds where theta is within
# 4 tol theta^2 / gap of an eigenvalue.  sqrt(tol) is the residual a converged run has: when the
# quotient's change meets tol, its error is about tol |theta| / (1 - rho^2) and the residual about
# sqrt(error * gap), sqrt(tol / (1 - rho)) |theta| for a second eigenvalue -rho theta.  The factor 2:
# at the quotient's stop, every float64 run of the tests had residual <= 1.5 sqrt(tol) |theta| (a
# float32 operator at tol 1e-9: 1.9, and 5.6 for a run that now goes on 69 more products); on 400
# random spectra (776 pairs, tol 1e-3 .. 1e-10) every pair less than tol |theta| off had <= 1.6,
# and the 188 above 2 were 1.2 tol off or more (median 7 tol; 88 % next to an eigenvalue of the
# other sign).  A run whose quotient has settled but whose residual has not goes on: near-equal
# magnitudes converge, a +-l pair never does (converged=False).
POWER_RESIDUAL_FACTOR = 2.0


def _power(matvec: _Counter, n: int, k: int, tol: float, max_iter: int, v0, gen, device):
    """Deflated power iteration as in PyHessian: each eigenvalue by power iteration orthogonal to the
    ones found, stopped when the Rayleigh quotient's relative change is at most ``tol`` and the
    residual meets ``POWER_RESIDUAL_FACTOR * sqrt(tol)`` relative to the value (see there); a value
    whose tests do not both hold within ``max_iter`` steps is unconverged (residual NaN)."""
    values, vectors, residuals = [], [], []
    all_converged = True
    iters = 0
    scale = 0.0  # |first eigenvalue|: the operator's scale
    res_factor = POWER_RESIDUAL_FACTOR * math.sqrt(tol)
    for i in range(k):
        v = v0.clone() if (i == 0 and v0 is not None) else _gaussian(n, 1, gen, device)[:, 0]
        v = v / torch.linalg.vector_norm(v)
        lam = None
        ok = False
        for _ in range(max_iter):
            for u in vectors:
                v = v - (u @ v) * u
            v = v / torch.linalg.vector_norm(v)
            Hv = matvec(v)
            for u in vectors:  # deflate: work with H - sum lambda_u u u^T on the complement
                Hv = Hv - (u @ Hv) * u
            new = float(v @ Hv)
            iters += 1
            nrm = torch.linalg.vector_norm(Hv)
            # Relative whatever the scale (PyHessian's ``/ (|lam| + 1e-6)`` accepts any value once
            # the eigenvalues are ~1e-6 and below); after the first value, changes at the rounding
            # level of the operator's scale (a zero eigenvalue under deflation) count as none.
            if lam is not None and abs(new - lam) <= tol * max(abs(lam), 1e-12 * scale):
                # The quotient has settled; an eigenpair only where the residual is small too (from
                # this step's product: no extra one).
                res = float(torch.linalg.vector_norm(Hv - new * v))
                if res <= res_factor * abs(new) + 1e-12 * scale:
                    lam, ok = new, True
                    residuals.append(res)
                    v = Hv / nrm if nrm > 0 else v
                    break
            lam = new
            v = Hv / nrm if nrm > 0 else v
        if not ok:
            residuals.append(float("nan"))
            all_converged = False
        if i == 0:
            scale = abs(lam)
        values.append(lam)
        vectors.append(v)
    return (torch.tensor(values, dtype=F64), torch.stack(vectors, 1), torch.tensor(residuals, dtype=F64),
            all_converged, iters)


def eigenvalues(
    H: Any,
    k: int = 1,
    method: str = "lanczos",
    which: str = "LA",
    tol: float = 1e-3,
    seed: int = 0,
    *,
    v0: torch.Tensor | None = None,
    max_steps: int | None = None,
    block_size: int | None = None,
) -> EigenResult:
    """The ``k`` extreme eigenpairs of the symmetric operator ``H``.

    Args:
        H: a curvature operator (or any symmetric ``(n, n)`` operator supporting ``H @ V``).
        k: number of eigenpairs (default 1).
        method: "lanczos" (default; full reorthogonalisation in float64; block Lanczos with batched
            products when ``block_size > 1``), "lobpcg" (scipy's, on batched products; which "LA"
            or "SA", n >= 5 × block size) or "power"
            (deflated power iteration, PyHessian's algorithm: it finds the largest magnitude; for
            "LA"/"SA" a second run on the spectrum shifted by that magnitude, where its sign is wrong).
        which: "LA" largest algebraic (default), "SA" smallest algebraic, "LM" largest magnitude.
        tol: relative accuracy: Lanczos stops when every wanted Ritz residual
            ``|beta_m s_m| <= tol * |theta|`` (the eigenvalue error is then about ``tol^2 |theta| /
            gap``); power iteration when the eigenvalue (Rayleigh quotient) changes by at most
            ``tol`` relatively (PyHessian's test) and its residual ``||H v - theta v||`` is at most
            ``2 sqrt(tol) |theta|`` (``POWER_RESIDUAL_FACTOR``; plus 1e-12 of the operator's scale).
            A converged power value is then within its residual of an eigenvalue, and within about
            ``4 tol theta^2 / gap`` where it is isolated; it need not be the wanted one where
            eigenvalues of the same sign crowd the wanted (slow convergence, e.g. 1 % off in a
            cluster at tol 1e-3).  The quotient alone settles without an eigenpair where
            eigenvalues ``+l`` and ``-l`` are among the wanted (the iterate alternates in their span;
            power iteration cannot separate them: ``converged=False`` after ``max_steps``) and
            too early for near magnitudes of opposite signs (the run goes on until the residual
            test holds too).  For "LA"/"SA" the result is converged where the shifted run is and,
            where the first run (the shift) is not, all its shifted values came out positive.
        seed: seed of the random start vectors.
        v0: warm start ``(n,)`` (e.g. the previous top eigenvector along training); the first start
            vector for Lanczos/power, the first column for block methods.  Where it is an exact
            eigenvector (it spans an invariant subspace), single-vector Lanczos goes on from a
            random direction until that run converges too; power iteration, LOBPCG and block
            Lanczos may return its eigenvalue when it is the most extreme found so far.
        max_steps: Lanczos steps (default ``min(n, max(300, 20 k))``; block Lanczos with block p:
            ``min(n, max(300, 20 k) // p + 1)``, each one product of up to p vectors), power iterations per
            eigenvalue (default 100, PyHessian's), LOBPCG iterations (default 200).
        block_size: block size of Lanczos (default 1: single-vector Lanczos).  A Krylov space
            grown from p vectors holds at most p directions of each eigenspace: with
            ``block_size=1`` and k > 1, an eigenvalue of exact multiplicity m shows up once and the
            next distinct eigenvalues take the other m - 1 places, reported as converged (their
            residuals are small); ``block_size >= m`` finds the copies (``converged`` says the
            Ritz residuals met ``tol``, not that no copy is missing).  Where the Krylov space becomes invariant before k values have
            converged (k close to n, low rank), the run goes on from fresh random directions and
            stops only when they find nothing beyond the k-th value (they hold the missing copies).
    """
    n = _size(H)
    if not _is_int(k) or k < 1 or k > n:
        raise ValueError(f"k must be an int in [1, n={n}], got {k!r}")
    k = int(k)
    _check_which(which)
    if method not in ("lanczos", "lobpcg", "power"):
        raise ValueError(f"method must be 'lanczos', 'lobpcg' or 'power', got {method!r}")
    if not (tol > 0):
        raise ValueError(f"tol must be positive, got {tol}")
    if max_steps is not None and (not _is_int(max_steps) or max_steps < 1):
        raise ValueError(f"max_steps must be a positive int or None, got {max_steps!r}")
    device = _device(H)
    gen = _generator(seed)
    if v0 is not None:
        if not isinstance(v0, torch.Tensor) or v0.shape != (n,):
            raise ValueError(f"v0 must be a tensor of shape ({n},), got {getattr(v0, 'shape', type(v0).__name__)}")
        v0 = v0.detach().to(device, F64)
        if not bool(torch.isfinite(v0).all()) or float(torch.linalg.vector_norm(v0)) == 0.0:
            raise ValueError("v0 must be finite and nonzero")
    if method == "power":
        mv = _Counter(H)
        iters = max_steps or 100
        vals, vecs, res, ok, it = _power(mv, n, 1 if which != "LM" else k, tol, iters, v0, gen, device)
        sign = 1.0 if which == "LA" else -1.0
        if which != "LM" and not (k == 1 and sign * float(vals[0]) >= 0):
            # Power iteration finds the largest magnitude; for the largest (smallest) algebraic
            # eigenvalues run it again on H + |λ| I (|λ| I - H), whose spectrum is shifted to >= 0.
            shift = abs(float(vals[0]))

            def shifted(V: torch.Tensor) -> torch.Tensor:
                return sign * mv(V) + shift * V

            # Not from the first run's vector: it is the eigenvector of the shifted spectrum's 0, so
            # the run would start from rounding and stop on whatever its first steps produce.
            vals, vecs, res, ok2, it2 = _power(shifted, n, k, tol, iters, v0, gen, device)
            # Found values of the shifted spectrum that are all positive are its k largest in
            # magnitude and so algebraically: the wanted ones, whatever the shift.  Only then does
            # a first run that did not converge (on eigenvalues +l and -l it never does; its shift
            # is below the largest magnitude) leave the result converged.
            ok = ok2 and (ok or bool((vals > 0).all()))
            vals, it = sign * (vals - shift), it + it2
        # Deflation finds the values in about the wanted order, exactly so only once converged
        # (unconverged runs on a clustered spectrum stop anywhere in it): sort as promised.
        idx = _select(vals, k, which)
        return EigenResult(vals[idx], vecs[:, idx], mv.count, res[idx], ok, "power", it)
    if method == "lobpcg":
        mv = _Counter(H)
        return _lobpcg(H, mv, n, k, which, tol, max_steps or 200, v0, gen, device, block_size)
    # Default: single-vector Lanczos for every k.  A block of min(k, 8) would also find exact copies
    # of repeated eigenvalues before the Krylov space becomes invariant (one start vector sees one
    # direction per eigenspace), but it cost 4x the time for the top 5 of the 1.08 M-parameter F1
    # MLP (2.72 s against 0.68 s, 45 against 24 products; benchmarks/bench_curvature.py, kept in
    # benchmarks/results/cpu_curvature_20261129T180556Z.txt) and exact multiplicities are rare in
    # trained networks (a linear layer under MSE with C outputs is the classic case): pass
    # block_size >= the multiplicity when copies matter.
    p = block_size if block_size is not None else 1
    if not _is_int(p) or p < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    p = int(p)
    storage = _work_dtype(H)  # the Lanczos basis (block Lanczos keeps its products in float64)
    if p == 1:
        mv = _Counter(H, storage)
        start = v0 if v0 is not None else _gaussian(n, 1, gen, device)[:, 0]
        steps = max_steps or min(n, max(300, 20 * k))
        vals, vecs, res, ok, it = _lanczos(mv, n, k, which, tol, steps, start, gen, device, warm=v0 is not None)
    else:
        mv = _Counter(H)
        p = min(p, n)
        V0 = _gaussian(n, p, gen, device)
        if v0 is not None:
            V0[:, 0] = v0
        # (at least one new dimension a step: n steps exhaust the space even where blocks shrink)
        steps = max_steps or max(2, min(n, max(300, 20 * k) // p + 1))
        vals, vecs, res, ok, it = _block_lanczos(mv, n, k, which, tol, steps, V0, gen, device, storage)
    return EigenResult(vals, vecs, mv.count, res, ok, "lanczos" if p == 1 else f"block-lanczos(p={p})", it)


def _lobpcg(H, mv, n, k, which, tol, max_iter, v0, gen, device, block_size) -> EigenResult:
    from scipy.linalg import LinAlgWarning
    from scipy.sparse.linalg import LinearOperator, lobpcg

    if which == "LM":
        raise ValueError("method='lobpcg' supports which='LA' or 'SA'")
    p = max(k, block_size or k)
    if 5 * p > n:
        raise ValueError(f"method='lobpcg' needs n >= 5 * block size ({5 * p}); use method='lanczos' for n={n}")
    X = _gaussian(n, p, gen, device)
    if v0 is not None:
        X[:, 0] = v0

    products = 0  # calls of the operator from scipy

    def mm(V: np.ndarray) -> np.ndarray:
        nonlocal products
        products += 1
        return mv(torch.from_numpy(np.ascontiguousarray(V, dtype=np.float64)).to(device)).cpu().numpy()

    A = LinearOperator((n, n), matvec=mm, matmat=mm, dtype=np.float64)
    iterations = 0  # scipy's iterations, over both runs

    def run(start: np.ndarray, iters: int, abs_tol: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        nonlocal iterations
        before = products
        # Non-convergence is reported through EigenResult.converged; ill-conditioned Rayleigh-Ritz
        # steps (LinAlgWarning, dozens per run on a low-rank operator) show up there too.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", LinAlgWarning)
            # scipy's maxiter=m runs its loop m + 1 times (iterations 0..m): at most ``iters``.
            vals, vecs = lobpcg(A, start, largest=which == "LA", tol=abs_tol, maxiter=iters - 1)
        # One product per iteration that did not stop, between the start's (A X) and the final
        # Rayleigh-Ritz's (a forced restart, rare, makes one more and counts as an iteration).
        iterations += products - before - 2
        vals_t, vecs_t = torch.from_numpy(np.asarray(vals)), torch.from_numpy(np.asarray(vecs))
        idx = _select(vals_t, k, which)
        vals_t, vecs_t = vals_t[idx], vecs_t[:, idx].to(device)
        res = torch.linalg.vector_norm(mv(vecs_t) - vecs_t * vals_t.to(device), dim=0).cpu()
        return vals_t, vecs_t, res

    # scipy's tolerance is an absolute residual norm; ``tol`` is relative to the eigenvalues, so a
    # short first run estimates them and the second continues from its vectors to tol * |λ|.
    first = min(11, max_iter)
    vals_t, vecs_t, res = run(X.cpu().numpy(), first, None)
    ok = bool((res <= tol * vals_t.abs().clamp_min(1e-30)).all())
    if not ok and max_iter > first:
        abs_tol = tol * float(vals_t.abs().min().clamp_min(1e-30))
        start = np.concatenate([vecs_t.cpu().numpy(), X.cpu().numpy()[:, k:]], axis=1)
        vals_t, vecs_t, res = run(start, max_iter - first, abs_tol)
        ok = bool((res <= tol * vals_t.abs().clamp_min(1e-30)).all())
    return EigenResult(vals_t, vecs_t, mv.count, res, ok, "lobpcg", iterations)


# ---- parallel independent Lanczos runs (SLQ, per-layer spectra) --------------------------------------

def lanczos_runs(
    matmat: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    starts: Sequence[torch.Tensor],
    steps: int,
    supports: Sequence[torch.Tensor | None] | None = None,
    tol: float | None = None,
    which: str = "LA",
    device: torch.device | str = "cpu",
    per_run: bool = False,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Independent Lanczos runs advanced together: every step is ONE product with one column per
    active run.  Run r lives on the coordinates ``supports[r]`` (an index tensor; None: all), i.e. it
    works with the principal submatrix ``H[s, s]`` (block-diagonal restriction for per-layer spectra).
    With ``per_run`` every run has its own operator (e.g. one Hessian per checkpoint):
    ``matmat(V, runs)`` then applies operator ``runs[c]`` to column ``c``.

    Returns, per run, ``(alphas, betas)`` of its tridiagonal matrix (float64, CPU).  With ``tol``
    a run stops once its wanted (``which``) Ritz value has relative residual <= tol.
    """
    return _lanczos_runs(matmat, n, starts, steps, supports, tol, which, device, per_run)[0]


def _lanczos_runs(matmat, n, starts, steps, supports=None, tol=None, which="LA", device="cpu", per_run=False):
    """:func:`lanczos_runs`, and per run whether it stopped by its test (``tol`` met, an invariant
    subspace, or its whole support spanned) rather than by running out of ``steps``; the test is
    made after every step, the last one included."""
    R = len(starts)
    supports = list(supports) if supports is not None else [None] * R
    device = torch.device(device)
    bases, qs, prev, alphas, betas, active = [], [], [], [], [], []
    for s, v in zip(supports, starts):
        m = n if s is None else s.numel()
        v = v.to(device, F64)
        bases.append(_Basis(m, device, capacity=min(steps + 1, 32)))
        qs.append(v / torch.linalg.vector_norm(v))
        prev.append((None, 0.0))
        alphas.append([])
        betas.append([])
        active.append(m > 0)
    stopped = [not a for a in active]  # (an empty support: nothing to find)
    for _ in range(steps):
        runs = [r for r in range(R) if active[r]]
        if not runs:
            break
        V = torch.zeros(n, len(runs), dtype=F64, device=device)
        for c, r in enumerate(runs):
            if supports[r] is None:
                V[:, c] = qs[r]
            else:
                V[supports[r], c] = qs[r]
        W = matmat(V, runs) if per_run else matmat(V)
        for c, r in enumerate(runs):
            q = qs[r]
            w = W[:, c] if supports[r] is None else W[supports[r], c]
            bases[r].append(q)
            a = float(q @ w)
            q_prev, b_prev = prev[r]
            w = w - a * q - (b_prev * q_prev if q_prev is not None else 0.0)
            w = bases[r].orthogonalize_(w)
            b = float(torch.linalg.vector_norm(w))
            alphas[r].append(a)
            m = len(alphas[r])
            done = m >= bases[r].rows.shape[1] or b <= 1e-12 * max(abs(x) for x in alphas[r] + betas[r] + [b])
            if tol is not None and not done:
                T = tridiagonal(alphas[r], betas[r])
                theta, S = _eigh(T)
                i = _select(theta, 1, which)
                done = bool((b * S[-1, i]).abs() <= tol * theta[i].abs().clamp_min(1e-30))
            if done:
                active[r] = False
                stopped[r] = True
                continue
            betas[r].append(b)
            prev[r] = (q, b)
            qs[r] = w / b
    runs = [(torch.tensor(a, dtype=F64), torch.tensor(b[: len(a) - 1], dtype=F64)) for a, b in zip(alphas, betas)]
    return runs, stopped


def tridiagonal(alphas: Sequence[float], betas: Sequence[float]) -> torch.Tensor:
    """The symmetric tridiagonal Lanczos matrix (float64) from its diagonal and off-diagonal."""
    T = torch.diag(torch.tensor(list(alphas), dtype=F64))
    if len(alphas) > 1:
        off = torch.tensor(list(betas[: len(alphas) - 1]), dtype=F64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    return T


# ---- trace -----------------------------------------------------------------------------------------

def trace(
    H: Any,
    method: str = "hutch++",
    num_matvecs: int = 100,
    seed: int = 0,
    *,
    block_size: int | None = None,
    rtol: float | None = None,
) -> Estimate:
    """A stochastic estimate of ``tr(H)`` with its standard error.

    Args:
        method: "hutch++" (default; Meyer et al. 2021: a third of the products sketch the top
            subspace, whose trace is taken exactly, a third project it out, the rest estimate the
            remainder with Hutchinson) or "hutchinson" (Rademacher probes).
        num_matvecs: products to spend (for "hutch++" at least 3; with ``rtol``: the maximum).
        seed: seed of the Rademacher probes.
        block_size: probes per batched product (they share every pass over the data); default: the
            operator's ``preferred_block_size`` (1 for the fused engine on a CPU), else 16.
        rtol: ("hutchinson") stop as soon as ``stderr <= rtol * |value|``, checked after each block
            once at least ``HUTCHINSON_MIN_PROBES`` (16) probes are in (fewer only where
            ``num_matvecs``, always the hard cap, is smaller): the sample standard deviation of a
            handful of probes is too noisy for a stopping rule, and a run stopped by an accidentally
            tight early pair reports a stderr far below its actual error.

    ``stderr`` is the standard error of the mean of the stochastic part (for Hutch++ conditional on
    the sketch: the exactly traced part adds no variance).
    """
    n = _size(H)
    if method not in ("hutch++", "hutchinson"):
        raise ValueError(f"method must be 'hutch++' or 'hutchinson', got {method!r}")
    if not _is_int(num_matvecs) or num_matvecs < (3 if method == "hutch++" else 2):
        raise ValueError(f"num_matvecs must be an int >= {3 if method == 'hutch++' else 2}, got {num_matvecs!r}")
    num_matvecs = int(num_matvecs)
    if rtol is not None:
        if method != "hutchinson":
            raise ValueError("rtol (early stopping) is for method='hutchinson'; hutch++ spends num_matvecs")
        if not (rtol > 0):
            raise ValueError(f"rtol must be positive, got {rtol}")
    if block_size is None:
        block_size = int(getattr(H, "preferred_block_size", DEFAULT_BLOCK_SIZE))
    if not _is_int(block_size) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    block_size = int(block_size)
    device = _device(H)
    gen = _generator(seed)
    mv = _Counter(H, _work_dtype(H) if method == "hutchinson" else F64)
    if method == "hutchinson":
        samples = _hutchinson(mv, n, num_matvecs, block_size, gen, device, None, rtol)
        m = samples.numel()
        return Estimate(float(samples.mean()), float(samples.std() / math.sqrt(m)), mv.count, method, samples)
    s = max(1, num_matvecs // 3)
    r = num_matvecs - 2 * s
    S = _rademacher(n, s, gen, device)
    Q, _ = torch.linalg.qr(_chunked(mv, S, block_size))
    exact = float(torch.trace(Q.t() @ _chunked(mv, Q, block_size)))
    samples = _hutchinson(mv, n, r, block_size, gen, device, Q, None)
    if samples.numel() >= 2:
        stderr = float(samples.std() / math.sqrt(samples.numel()))
    else:
        stderr = float("nan")
    return Estimate(exact + float(samples.mean()), stderr, mv.count, method, samples)


def _chunked(mv: _Counter, V: torch.Tensor, block: int) -> torch.Tensor:
    return torch.cat([mv(V[:, i:i + block]) for i in range(0, V.shape[1], block)], 1)


# Rows per partial sum of _column_dots: small enough to stay in cache and to keep each float32
# partial sum accurate (about 1e-7 relative), large enough that the loop costs nothing.
_DOT_ROWS = 1 << 16


def _column_dots(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``(A * B).sum(0)`` in float64 for ``(n, k)`` matrices: on a CPU as float64 sums of partial
    dot products over ``_DOT_ROWS`` rows (no n x k temporary: 16x faster for n ~ 1e6, k = 16)."""
    if A.device.type != "cpu":
        return (A * B).sum(0, dtype=F64)
    total = torch.zeros(A.shape[1], dtype=F64)
    At, Bt = A.t(), B.t()
    for s in range(0, A.shape[0], _DOT_ROWS):
        total += torch.linalg.vecdot(At[:, s:s + _DOT_ROWS], Bt[:, s:s + _DOT_ROWS]).double()
    return total


# The fewest Hutchinson probes before trace's ``rtol`` stopping rule is tested.  Testing the rule
# from 2 samples on (block size 1) stops runs whose first probes happen to agree, with a stderr far
# below the error (z-scores with std ~100 over seeds); from 16 on, the sample standard deviation is
# within ~20 % of the true one and the stopped runs' stderr is calibrated.
HUTCHINSON_MIN_PROBES = 16


def _hutchinson(mv, n, m, block, gen, device, Q, rtol) -> torch.Tensor:
    """``m`` samples ``g^T H g`` for Rademacher g (projected off ``Q`` when given); with ``rtol``
    fewer: the first block boundary with at least ``HUTCHINSON_MIN_PROBES`` samples and
    ``stderr <= rtol * |mean|``."""
    out: list[torch.Tensor] = []
    done = 0
    # Plain probes are exact in any precision: draw them in the products' dtype, sum in float64.
    dtype = F64 if Q is not None else mv.dtype
    while done < m:
        b = min(block, m - done)
        # Probes drawn as rows (b, n) and used as the transposed (n, b) view: the engines take
        # directions as rows and return products in the same layout, so the passes over the
        # n-vectors here run through contiguous memory.
        G = _rademacher(b, n, gen, device, dtype).t()
        if Q is not None:
            G = G - Q @ (Q.t() @ G)
        out.append(_column_dots(G, mv(G)).cpu())
        done += b
        if rtol is not None and done >= HUTCHINSON_MIN_PROBES:
            sm = torch.cat(out)
            if float(sm.std() / math.sqrt(sm.numel())) <= rtol * abs(float(sm.mean())):
                break
    return torch.cat(out)


# ---- spectral density --------------------------------------------------------------------------------

# The smallest default Gaussian width of the density relative to the largest |node|: far above
# float64's resolution (2.2e-16), far below the spread of any spectrum that is not a single cluster.
SIGMA_REL_FLOOR = 1e-8


def spectral_density(
    H: Any,
    num_runs: int = 10,
    lanczos_steps: int = 80,
    seed: int = 0,
    grid: torch.Tensor | int = 1000,
    sigma: float | None = None,
    *,
    max_memory_bytes: int = 2 << 30,
) -> Density:
    """Stochastic Lanczos quadrature estimate of the eigenvalue density (Ghorbani et al. 2019).

    ``num_runs`` Lanczos runs of ``lanczos_steps`` steps (full reorthogonalisation, float64) from
    Rademacher start vectors, advanced together: one batched product per step.  The runs' Ritz values
    (nodes) and squared first eigenvector components (weights) define the density
    ``sum_j w_j N(t; node_j, sigma^2)`` averaged over runs.

    Args:
        grid: the evaluation points (a tensor) or their number (an int >= 2; default 1000, spanning
            the nodes with a margin of 5 sigma).
        sigma: Gaussian width (default: 1% of the node range, at least ``SIGMA_REL_FLOOR`` (1e-8)
            times the largest |node| and 1e-12, so that the grid stays resolvable in float64 where
            the nodes coincide, e.g. for a multiple of the identity).
        max_memory_bytes: bound on the Krylov bases kept at once (runs are processed in groups).
    """
    n = _size(H)
    if not _is_int(num_runs) or num_runs < 1:
        raise ValueError(f"num_runs must be a positive int, got {num_runs!r}")
    if not _is_int(lanczos_steps) or lanczos_steps < 1:
        raise ValueError(f"lanczos_steps must be a positive int, got {lanczos_steps!r}")
    num_runs, lanczos_steps = int(num_runs), int(lanczos_steps)
    if sigma is not None and not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    if isinstance(grid, bool) or (_is_int(grid) and grid < 2):
        raise ValueError(f"grid must be a number of points >= 2 or a tensor of points, got {grid!r}")
    if not _is_int(grid):
        grid = torch.as_tensor(grid, dtype=F64).reshape(-1)
        if grid.numel() == 0 or not bool(torch.isfinite(grid).all()):
            raise ValueError("grid must hold finite points (at least one)")
    device = _device(H)
    gen = _generator(seed)
    mv = _Counter(H)
    steps = min(lanczos_steps, n)
    group = max(1, min(num_runs, max_memory_bytes // max(1, 8 * n * (steps + 1))))
    nodes = torch.full((num_runs, steps), float("nan"), dtype=F64)
    weights = torch.zeros(num_runs, steps, dtype=F64)
    for g0 in range(0, num_runs, group):
        g = min(group, num_runs - g0)
        # One draw per run, in run order: the result does not depend on the grouping (memory).
        starts = [_rademacher(1, n, gen, device)[0] for _ in range(g)]
        for i, (a, b) in enumerate(lanczos_runs(mv, n, starts, steps, device=device)):
            theta, S = _eigh(tridiagonal(a.tolist(), b.tolist()))
            nodes[g0 + i, : theta.numel()] = theta
            weights[g0 + i, : theta.numel()] = S[0] ** 2
    valid = ~torch.isnan(nodes)
    lo, hi = float(nodes[valid].min()), float(nodes[valid].max())
    if sigma is None:
        # A floor relative to the nodes' magnitude: an absolute one falls below float64's spacing
        # near large coinciding nodes (1e6 * I), and the grid then collapses to a few values.
        sigma = max(0.01 * (hi - lo), SIGMA_REL_FLOOR * max(abs(lo), abs(hi)), 1e-12)
    if _is_int(grid):  # (numpy's too: an np.int64 count is not one grid point)
        t = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, int(grid), dtype=F64)
    else:
        t = grid
    nd = torch.where(valid, nodes, torch.zeros_like(nodes))
    z = (t[:, None, None] - nd[None]) / sigma
    dens = (weights[None] * torch.exp(-0.5 * z * z)).sum((1, 2)) / (num_runs * sigma * math.sqrt(2 * math.pi))
    return Density(t, dens, nodes, weights, float(sigma), mv.count)
