"""Estimators against exact float64 answers on explicit matrices: warm starts that span an invariant
subspace, scale invariance of power iteration, argument checks, and the statistics of the trace
and density estimators (unbiased over seeds, calibrated standard errors, exact product counts)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import sharpkit as sk
from sharpkit.curvature import spectra
from test_curvature_refs import mlp, uneven_batches

F64 = torch.float64


def _with_spectrum(d: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    Q, _ = torch.linalg.qr(torch.randn(d.numel(), d.numel(), generator=torch.Generator().manual_seed(seed), dtype=F64))
    A = (Q * d.to(F64)) @ Q.t()
    return (A + A.t()) / 2, Q


def _wanted(evals: torch.Tensor, which: str, k: int) -> torch.Tensor:
    return {"LA": evals.flip(0), "SA": evals, "LM": evals[evals.abs().argsort(descending=True)]}[which][:k]


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_lanczos_warm_start_that_is_an_exact_eigenvector(which):
    # An exact eigenvector spans an invariant subspace.  Before: for k = 1 Lanczos stopped after one
    # product and returned ITS eigenvalue as converged (v0 = the eigenvector of -3, "LA": -3, not
    # 10); for k = 2 the run after it never counted as done and went on to the n-th product (to
    # max_steps, converged=False, for n > max_steps).
    d = torch.cat([torch.tensor([10.0, 5.0, -3.0, -6.0]), torch.linspace(-1, 1, 56)])
    A, Q = _with_spectrum(d)
    n = A.shape[0]
    evals = torch.linalg.eigvalsh(A)
    for v0 in (Q[:, 0], Q[:, 1], Q[:, 2], Q[:, 3], Q[:, 0] + Q[:, 2]):
        for k in (1, 2):
            r = sk.eigenvalues(A, k=k, which=which, tol=1e-8, v0=v0, max_steps=45)
            assert r.converged and r.num_matvecs < 45
            assert float((r.values - _wanted(evals, which, k)).abs().max()) < 1e-10
            assert float((A @ r.vectors - r.vectors * r.values).norm(dim=0).max()) < 1e-6
    # A warm start that is not exact still stops at once where its residual meets tol.
    near = Q[:, 0] + 1e-12 * torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=F64)
    if which != "SA":
        assert sk.eigenvalues(A, k=1, which=which, tol=1e-8, v0=near).num_matvecs == 1


@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_eigenvalues_scale_with_the_operator(method):
    # Power iteration stopped on |change| / (|lam| + 1e-6) < tol: at eigenvalues ~1e-9 after two
    # products, 95 % off, as converged.
    d = torch.cat([torch.tensor([1.0, 0.95]), torch.linspace(-0.5, 0.5, 48)])
    A, _ = _with_spectrum(d)
    ref = sk.eigenvalues(A, k=2, method=method, tol=1e-4, seed=0, max_steps=1000)
    assert ref.converged and abs(float(ref.values[0]) - 1.0) < 1e-2
    for scale in (1e-6, 1e-9, 1e-12, 1e6):
        r = sk.eigenvalues(scale * A, k=2, method=method, tol=1e-4, seed=0, max_steps=1000)
        assert r.num_matvecs == ref.num_matvecs and r.converged
        torch.testing.assert_close(r.values / scale, ref.values, rtol=1e-9, atol=0)


def test_invalid_arguments_are_refused_before_any_product():
    A = _with_spectrum(torch.linspace(-1, 2, 30))[0]
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_steps"):
            sk.eigenvalues(A, max_steps=bad)  # (0 used to mean the default, -1 a TypeError from argsort)
    assert sk.eigenvalues(A, max_steps=np.int64(40)).converged
    with pytest.raises(ValueError, match="rtol"):
        sk.trace(A, method="hutch++", num_matvecs=30, rtol=0.1)  # (was ignored)
    for bad in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="rtol"):
            sk.trace(A, method="hutchinson", num_matvecs=30, rtol=bad)
    for bad in (0, 1, -5, True):
        with pytest.raises(ValueError, match="grid"):
            sk.spectral_density(A, num_runs=2, lanczos_steps=5, grid=bad)  # (an empty or 1-point density)
    with pytest.raises(ValueError, match="grid"):
        sk.spectral_density(A, num_runs=2, lanczos_steps=5, grid=torch.tensor([0.0, float("nan")]))
    # A numpy count is a count (it was taken for a single grid point at t = 50).
    d = sk.spectral_density(A, num_runs=2, lanczos_steps=5, grid=np.int64(50))
    assert torch.equal(d.grid, sk.spectral_density(A, num_runs=2, lanczos_steps=5, grid=50).grid)

    class Counting:
        shape, dtype, calls = A.shape, F64, 0

        def __matmul__(self, V):
            Counting.calls += 1
            return A @ V

    with pytest.raises(ValueError, match="sigma"):
        sk.spectral_density(Counting(), num_runs=2, lanczos_steps=5, sigma=-1.0)
    assert Counting.calls == 0  # (refused after all the Lanczos runs before)


def test_layerwise_arguments():
    torch.manual_seed(0)
    op = sk.hessian(mlp(), nn.CrossEntropyLoss(), uneven_batches("mlp"), dtype=F64)
    with pytest.raises(ValueError, match="block_size"):
        sk.layerwise(op, block_size=0)  # (looped forever)
    for bad in (0, -2):
        with pytest.raises(ValueError, match="max_steps"):
            sk.layerwise(op, trace=False, max_steps=bad)  # (a RuntimeError from torch)
    with pytest.raises(ValueError, match="tol"):
        sk.layerwise(op, trace=False, tol=0.0)
    # numpy integers are integers (num_matvecs=np.int64(16) was refused as "not an int")
    a = sk.layerwise(op, num_matvecs=np.int64(16), block_size=np.int64(4), max_steps=np.int64(20))
    b = sk.layerwise(op, num_matvecs=16, block_size=4, max_steps=20)
    assert {k: (v.trace.value, v.top_eigenvalue) for k, v in a.items()} == {
        k: (v.trace.value, v.top_eigenvalue) for k, v in b.items()}


@pytest.mark.parametrize("method,matvecs", [("hutchinson", 12), ("hutch++", 12), ("hutch++", 31)])
def test_trace_unbiased_over_seeds_with_calibrated_stderr(method, matvecs):
    g = torch.Generator().manual_seed(0)
    n = 50
    U = torch.randn(n, 4, generator=g, dtype=F64)
    M = torch.randn(n, n, generator=g, dtype=F64)
    A = U @ torch.diag(torch.tensor([40.0, 20, 10, 5], dtype=F64)) @ U.t() / n + 0.05 * (M + M.t())
    exact = float(torch.trace(A))
    runs = [sk.trace(A, method=method, num_matvecs=matvecs, seed=s, block_size=5) for s in range(300)]
    assert {r.num_matvecs for r in runs} == {matvecs}
    values = torch.tensor([r.value for r in runs], dtype=F64)
    stderr = torch.tensor([r.stderr for r in runs], dtype=F64)
    # unbiased: the mean over seeds within 4 standard errors of that mean
    assert abs(float(values.mean()) - exact) < 4 * float(values.std()) / math.sqrt(len(runs))
    # calibrated: the reported variance matches the spread over seeds (on average)
    ratio = float((stderr ** 2).mean()) / float(values.var())
    assert 0.7 < ratio < 1.4, ratio
    again = sk.trace(A, method=method, num_matvecs=matvecs, seed=7, block_size=5)
    assert again.value == runs[7].value and again.stderr == runs[7].stderr


def test_slq_quadrature_moments_are_the_start_vectors_moments():
    # Gauss quadrature with m nodes is exact to degree 2m - 1: sum_j w_j theta_j^p = z^T H^p z / n
    # for every run's Rademacher start z, so the mean over runs estimates tr(H^p) / n.
    g = torch.Generator().manual_seed(3)
    n = 40
    M = torch.randn(n, n, generator=g, dtype=F64)
    A = (M + M.t()) / math.sqrt(2 * n) + 0.3 * torch.eye(n, dtype=F64)
    d = sk.spectral_density(A, num_runs=30, lanczos_steps=3, seed=5)
    assert d.num_matvecs == 30 * 3 and d.nodes.shape == d.weights.shape == (30, 3)
    gen = spectra._generator(5)
    Z = torch.stack([spectra._rademacher(1, n, gen, torch.device("cpu"))[0] for _ in range(30)]) / math.sqrt(n)
    evals = torch.linalg.eigvalsh(A)
    for p in range(6):
        quad = (d.weights * d.nodes ** p).sum(1)
        direct = ((Z @ torch.linalg.matrix_power(A, p)) * Z).sum(1)
        torch.testing.assert_close(quad, direct, rtol=1e-10, atol=1e-12)
        exact = float((evals ** p).mean())
        assert abs(float(quad.mean()) - exact) <= 4 * float(quad.std()) / math.sqrt(30) + 1e-12
    assert float(torch.trapezoid(d.density, d.grid)) == pytest.approx(1.0, abs=1e-6)
    # The smoothed density's mean is the quadrature's mean; its variance adds sigma^2.
    m1 = float(torch.trapezoid(d.density * d.grid, d.grid))
    assert m1 == pytest.approx(float((d.weights * d.nodes).sum(1).mean()), abs=1e-6)
