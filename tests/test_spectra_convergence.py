"""What the iterative solvers report (converged, iterations, products) against what they did,
with eigenvalues checked against explicit float64 matrices (torch.linalg.eigvalsh)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import sharpkit as sk
from test_curvature_refs import explicit_hessian, mlp, uneven_batches

F64 = torch.float64


class _BlockOperator:
    """An explicit symmetric matrix with the layer layout ``op.flat.blocks`` that layerwise reads."""

    def __init__(self, M: torch.Tensor, sizes: dict[str, int]):
        self.M, self.shape, self.dtype = M, tuple(M.shape), F64
        blocks, off = [], 0
        for name, numel in sizes.items():
            blocks.append(SimpleNamespace(name=name, offset=off, numel=numel))
            off += numel
        self.flat = SimpleNamespace(blocks=blocks)

    def __matmul__(self, V: torch.Tensor) -> torch.Tensor:
        return self.M @ V


def _two_layers() -> tuple[_BlockOperator, torch.Tensor]:
    """Layer "a" (12 coordinates): 4 distinct eigenvalues, so Lanczos from a random start spans an
    invariant subspace (exact Ritz values) at step 4; layer "b" (10): a generic spectrum.  The
    coupling between the layers is outside both diagonal blocks."""
    g = torch.Generator().manual_seed(0)
    Qa, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=F64))
    Qb, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=F64))
    a = Qa @ torch.diag(torch.tensor([1.0, 2.0, 3.0, 5.0], dtype=F64).repeat_interleave(3)) @ Qa.t()
    b = Qb @ torch.diag(torch.linspace(0.5, 4.0, 10, dtype=F64)) @ Qb.t()
    C = 0.1 * torch.randn(12, 10, generator=g, dtype=F64)
    M = torch.cat([torch.cat([a, C], 1), torch.cat([C.t(), b], 1)], 0)
    return _BlockOperator(M, {"a.weight": 12, "b.weight": 10}), M


def test_layerwise_converged_on_the_last_allowed_step():
    op, M = _two_layers()
    top_a = float(torch.linalg.eigvalsh(M[:12, :12]).max())
    assert top_a == pytest.approx(5.0, abs=1e-12)
    for steps in range(1, 13):
        res = sk.layerwise(op, trace=False, tol=1e-10, max_steps=steps)
        # Layer a: exact at step 4 (the stopping test holds there), not before; reported converged
        # also where step 4 is the last one allowed (it was reported unconverged there).
        assert res["a"].converged == (steps >= 4), steps
        if steps >= 4:
            assert res["a"].top_eigenvalue == pytest.approx(top_a, rel=1e-10)
        else:
            assert res["a"].top_eigenvalue < top_a - 1e-3
    # Layer b: 10 distinct eigenvalues, tol 1e-10: not met in 4 steps, met (at the latest by
    # spanning the block) in 10.
    assert not sk.layerwise(op, trace=False, tol=1e-10, max_steps=4)["b"].converged
    full = sk.layerwise(op, trace=False, tol=1e-10, max_steps=10)["b"]
    assert full.converged and full.top_eigenvalue == pytest.approx(float(torch.linalg.eigvalsh(M[12:, 12:]).max()),
                                                                    rel=1e-10)


def test_layerwise_converged_flag_matches_where_each_run_stops():
    """On a BN MLP's Hessian: each layer's run stops by its test at some step N (from then on the
    result no longer depends on max_steps); converged must hold exactly for max_steps >= N."""
    torch.manual_seed(0)
    model = mlp(d_in=5, hidden=12, classes=4)
    data = uneven_batches("mlp", sizes=(16, 16, 5), classes=4)
    loss = nn.CrossEntropyLoss()
    op = sk.hessian(model, loss, data, dtype=F64)
    H = explicit_hessian(model, loss, data, "eval")
    groups = sk.curvature.parameter_groups(op)
    final = sk.layerwise(op, trace=False, tol=1e-3, max_steps=100)
    scan = {m: sk.layerwise(op, trace=False, tol=1e-3, max_steps=m) for m in range(1, 31)}
    stops = {}
    for name, lc in final.items():
        assert lc.converged
        N = min(m for m, r in scan.items() if r[name].top_eigenvalue == lc.top_eigenvalue)
        stops[name] = N
        for m, r in scan.items():
            assert r[name].converged == (m >= N), (name, m, N)
        s = groups[name]
        ref = float(torch.linalg.eigvalsh(H[s][:, s]).max())
        assert abs(scan[N][name].top_eigenvalue - ref) <= 1e-5 * abs(ref)
    # (at least one layer stops by tol short of its block size: the case that was misreported)
    assert any(N < groups[name].numel() for name, N in stops.items())


def _lobpcg_problem():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=F64))
    lam = torch.linspace(0.01, 1, 200, dtype=F64) ** 3 * 10
    return Q @ torch.diag(lam) @ Q.t()


class _Counting:
    def __init__(self, A: torch.Tensor):
        self.A, self.shape, self.dtype, self.calls = A, tuple(A.shape), F64, 0

    def __matmul__(self, V: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.A @ V


def test_lobpcg_reports_the_iterations_it_ran():
    A = _lobpcg_problem()
    ref = torch.linalg.eigvalsh(A).flip(0)[:3]
    # Converged early: the same run under any larger budget, and its iteration count (it was
    # reported as the budget: 50 and 200 here).
    runs = {m: sk.eigenvalues(A, k=3, method="lobpcg", tol=1e-1, max_steps=m) for m in (50, 200)}
    r50, r200 = runs[50], runs[200]
    assert r50.converged and r200.converged
    assert torch.equal(r50.values, r200.values) and r50.num_matvecs == r200.num_matvecs
    assert r50.iterations == r200.iterations < 50
    # A Ritz value within its residual of an eigenvalue (symmetric A): checked against eigvalsh.
    assert ((r200.values - ref).abs() <= r200.residuals + 1e-12).all()
    # To tol 1e-10: at most the budget, one product of the block per iteration.
    op = _Counting(A)
    tight = sk.eigenvalues(op, k=3, method="lobpcg", tol=1e-10)
    assert tight.converged and 0 < tight.iterations < 200
    assert (tight.values - ref).abs().max() <= 1e-12 * float(ref.abs().max())
    # (per run: a product at its start, one per iteration, one for the final Rayleigh-Ritz, one
    # for the residual check; a run converged in the first, short, run does not start a second)
    assert op.calls == tight.iterations + 6


@pytest.mark.parametrize("budget,runs", [(1, 1), (5, 1), (15, 2)])
def test_lobpcg_stays_within_max_steps(budget, runs):
    """scipy's maxiter=m runs m + 1 iterations: max_steps=m was exceeded by one per run."""
    op = _Counting(_lobpcg_problem())
    r = sk.eigenvalues(op, k=3, method="lobpcg", tol=1e-12, max_steps=budget)
    assert not r.converged and r.iterations == budget
    assert op.calls == budget + 3 * runs
    assert r.num_matvecs == 3 * op.calls


@pytest.mark.parametrize("kw", [dict(), dict(block_size=2), dict(method="power")], ids=["lanczos", "block", "power"])
def test_eigensolvers_converged_on_the_last_allowed_step(kw):
    """Lanczos, block Lanczos and power iteration: a run whose test holds on step N is reported
    converged under max_steps=N and not under N - 1; iterations and products are those made."""
    g = torch.Generator().manual_seed(1)
    n = 120
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    lam = torch.linspace(-1, 1, n, dtype=F64) ** 3 * 10
    lam[-1] = 12.0
    A = Q @ torch.diag(lam) @ Q.t()
    free = sk.eigenvalues(A, tol=1e-6, max_steps=5000, **kw)
    N = free.iterations
    assert free.converged and 1 < N < n
    for m in (N - 1, N):
        op = _Counting(A)
        r = sk.eigenvalues(op, tol=1e-6, max_steps=m, **kw)
        assert r.converged == (m == N) and r.iterations == m
        assert r.num_matvecs == op.calls * kw.get("block_size", 1)
    assert float(r.values[0]) == pytest.approx(float(torch.linalg.eigvalsh(A).max()),
                                               rel=1e-4 if kw.get("method") == "power" else 1e-9)
