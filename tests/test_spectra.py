"""Eigenvalues, trace, spectral density and per-layer estimates against explicit float64 matrices."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import sharpkit as sk
from sharpkit.curvature import spectra
from test_curvature_refs import assert_unchanged, cnn, explicit_ggn, explicit_hessian, mlp, snapshot, uneven_batches

F64 = torch.float64
CE = nn.CrossEntropyLoss()


def _wider_mlp() -> nn.Module:
    torch.manual_seed(0)
    return mlp(d_in=5, hidden=12, classes=4)


@pytest.fixture(scope="module")
def problem():
    """A BN MLP (n = 136) on uneven batches: its Hessian operator and explicit Hessian."""
    model = _wider_mlp()
    data = uneven_batches("mlp", sizes=(16, 16, 5), classes=4)
    H = explicit_hessian(model, CE, data, "eval")
    return model, data, H, torch.linalg.eigvalsh(H)


def _rel(a, b):
    a, b = torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64)
    return float(((a - b).abs() / b.abs()).max())


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_lanczos_top5_matches_explicit(problem, which):
    model, data, H, evals = problem
    op = sk.hessian(model, CE, data, dtype=F64)
    r = sk.eigenvalues(op, k=5, which=which, tol=1e-10, block_size=1)
    want = {"LA": evals.flip(0)[:5], "SA": evals[:5], "LM": evals[evals.abs().argsort(descending=True)][:5]}[which]
    assert r.converged and r.values.shape == (5,) and r.vectors.shape == (op.n, 5)
    assert _rel(r.values, want) < 1e-6
    # Ritz vectors are eigenvectors: residual small, orthonormal.
    R = H @ r.vectors - r.vectors * r.values
    assert float(R.norm(dim=0).max()) < 1e-4 * float(evals.abs().max())
    torch.testing.assert_close(r.vectors.t() @ r.vectors, torch.eye(5, dtype=F64), atol=1e-8, rtol=0)
    assert r.num_matvecs == op.num_matvecs


@pytest.mark.parametrize("method,kw", [("lanczos", {"block_size": 8}), ("lanczos", {"block_size": 3}), ("lobpcg", {})])
def test_block_methods_top5_match_explicit(problem, method, kw):
    model, data, H, evals = problem
    op = sk.hessian(model, CE, data, dtype=F64)
    r = sk.eigenvalues(op, k=5, method=method, tol=1e-10, **kw)
    assert _rel(r.values, evals.flip(0)[:5]) < 1e-6
    if method == "lanczos":  # every step is one batched product of block_size vectors
        assert op.num_passes * kw["block_size"] == op.num_matvecs


def test_power_iteration_and_warm_start():
    # A synthetic symmetric matrix with a clear gap: power iteration converges, warm start is immediate.
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=F64))
    lam = torch.cat([torch.tensor([10.0, 5.0, -3.0], dtype=F64), torch.linspace(-1, 1, 57, dtype=F64)])
    A = Q @ torch.diag(lam) @ Q.t()
    r = sk.eigenvalues(A, k=2, method="power", tol=1e-10, max_steps=500)
    assert r.converged and _rel(r.values, [10.0, 5.0]) < 1e-6
    cold = sk.eigenvalues(A, k=1, tol=1e-8)
    # (the previous top eigenvector, not an exact one: an exact eigenvector spans an invariant
    # subspace, which Lanczos has to check with a random probe; test_spectra_estimators)
    warm = sk.eigenvalues(A, k=1, tol=1e-8, v0=Q[:, 0] + 1e-10 * torch.randn(60, generator=g, dtype=F64))
    assert _rel(cold.values, [10.0]) < 1e-10 and _rel(warm.values, [10.0]) < 1e-10
    assert warm.num_matvecs <= 2 < cold.num_matvecs
    again = sk.eigenvalues(A, k=1, tol=1e-8)
    assert torch.equal(again.values, cold.values)  # same seed, same numbers


def test_ggn_eigenvalues_cnn_both_bn_modes():
    torch.manual_seed(0)
    model, data = cnn(), uneven_batches("cnn")
    snap = snapshot(model)
    for bn in ("train",):  # (the eval-mode GGN is checked in test_curvature)
        G = explicit_ggn(model, CE, data, bn)
        r = sk.eigenvalues(sk.ggn(model, CE, data, bn=bn, dtype=F64), k=3, tol=1e-10)
        assert _rel(r.values, torch.linalg.eigvalsh(G).flip(0)[:3]) < 1e-6
    assert_unchanged(model, snap)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_within_three_standard_errors(problem, method):
    model, data, H, _ = problem
    op = sk.hessian(model, CE, data, dtype=F64)
    est = sk.trace(op, method=method, num_matvecs=60, seed=1)
    exact = float(torch.trace(H))
    assert est.num_matvecs == 60 == op.num_matvecs
    assert est.stderr > 0
    assert abs(est.value - exact) <= 3 * est.stderr
    again = sk.trace(op, method=method, num_matvecs=60, seed=1)
    assert again.value == est.value


def test_hutchpp_beats_hutchinson_on_low_rank():
    g = torch.Generator().manual_seed(2)
    U = torch.randn(200, 5, generator=g, dtype=F64)
    A = U @ torch.diag(torch.tensor([50.0, 40, 30, 20, 10], dtype=F64)) @ U.t() / 200 + 1e-3 * torch.eye(200, dtype=F64)
    exact = float(torch.trace(A))
    pp = sk.trace(A, method="hutch++", num_matvecs=30, seed=0)
    hu = sk.trace(A, method="hutchinson", num_matvecs=30, seed=0)
    assert abs(pp.value - exact) <= 3 * pp.stderr + 1e-12
    assert pp.stderr < hu.stderr
    early = sk.trace(A, method="hutchinson", num_matvecs=400, seed=0, rtol=0.05, block_size=8)
    assert early.num_matvecs < 400 and early.stderr <= 0.05 * abs(early.value)


def test_spectral_density_quadrature(problem):
    model, data, H, evals = problem
    n = H.shape[0]
    op = sk.hessian(model, CE, data, dtype=F64)
    d = sk.spectral_density(op, num_runs=4, lanczos_steps=n, seed=0)
    # n steps: the nodes are the eigenvalues exactly; weights of each run sum to 1.
    for run in range(4):
        nodes = d.nodes[run][~torch.isnan(d.nodes[run])]
        # (fewer nodes than n where eigenvalues repeat: the Krylov space is then invariant earlier)
        tol = 1e-8 * float(evals.abs().max())
        assert float((nodes[:, None] - evals[None]).abs().min(1).values.max()) < tol
        assert abs(float(nodes.max() - evals.max())) < tol and abs(float(nodes.min() - evals.min())) < tol
    torch.testing.assert_close(d.weights.sum(1), torch.ones(4, dtype=F64), rtol=1e-10, atol=1e-10)
    assert op.num_passes <= n  # all runs advance together: one batched product per step
    # Short runs: the quadrature's first moment per run is z^T H z / n; its mean estimates tr(H)/n.
    d = sk.spectral_density(op, num_runs=12, lanczos_steps=10, seed=3)
    m1 = (d.weights * torch.nan_to_num(d.nodes)).sum(1)
    assert abs(float(m1.mean()) - float(torch.trace(H)) / n) <= 3 * float(m1.std()) / math.sqrt(12)
    dx = float(d.grid[1] - d.grid[0])
    assert abs(float(d.density.sum()) * dx - 1.0) < 0.02
    assert d.density.dtype == F64 and (d.density >= 0).all()


def test_layerwise_in_one_run(problem):
    model, data, H, _ = problem
    op = sk.hessian(model, CE, data, dtype=F64)
    res = sk.layerwise(op, num_matvecs=64, tol=1e-10, max_steps=60, seed=0, block_size=16)
    assert list(res) == ["0", "1", "4"]
    groups = sk.curvature.parameter_groups(op)
    for name, lc in res.items():
        s = groups[name]
        block = H[s][:, s]
        assert lc.numel == s.numel()
        assert abs(lc.trace.value - float(torch.trace(block))) <= 3 * lc.trace.stderr
        assert _rel([lc.top_eigenvalue], [float(torch.linalg.eigvalsh(block).max())]) < 1e-6
    # No pass per layer: 64 probes in blocks of 16, then one batched product per Lanczos step.
    assert op.num_passes <= 4 + 60
    per_param = sk.layerwise(op, trace=False, tol=1e-10, max_steps=60, group="parameter")
    assert len(per_param) == 6 and all(r.trace is None for r in per_param.values())


def test_bad_arguments(problem):
    model, data, H, _ = problem
    op = sk.hessian(model, CE, data, dtype=F64)
    with pytest.raises(ValueError, match="k must"):
        sk.eigenvalues(op, k=0)
    with pytest.raises(ValueError, match="which"):
        sk.eigenvalues(op, which="BE")
    with pytest.raises(ValueError, match="method"):
        sk.eigenvalues(op, method="arnoldi")
    with pytest.raises(ValueError, match="v0"):
        sk.eigenvalues(op, v0=torch.ones(3))
    with pytest.raises(ValueError, match="v0"):
        sk.eigenvalues(op, v0=torch.zeros(op.n))
    with pytest.raises(ValueError, match="num_matvecs"):
        sk.trace(op, num_matvecs=2)
    with pytest.raises(ValueError, match="method"):
        sk.trace(op, method="exact")
    with pytest.raises(TypeError, match="square operator"):
        sk.trace(torch.ones(3, 4))
    with pytest.raises(TypeError, match="curvature operator"):
        sk.layerwise(H)


@pytest.mark.parametrize("n", [0, 1, spectra._DOT_ROWS - 1, spectra._DOT_ROWS, spectra._DOT_ROWS + 1, 3 * spectra._DOT_ROWS + 7])
@pytest.mark.parametrize("k", [1, 3])
def test_column_dots_against_float64(n, k):
    g = torch.Generator().manual_seed(n + k)
    A = torch.randn(k, n, generator=g).t()  # the (n, k) transposed-row layout of the probes
    B = torch.randn(n, k, generator=g)  # and a plain row-major one
    got = spectra._column_dots(A, B)
    want = (A.double() * B.double()).sum(0)
    assert got.dtype == torch.float64 and got.shape == (k,)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * math.sqrt(max(n, 1)))


def test_trace_block_defaults_to_the_operators_preference(monkeypatch):
    """The fused engine carries one direction per pass on a CPU, so the trace's probes go one at a
    time there; the generic engine shares each data pass among 16."""
    blocks = []
    real = spectra._hutchinson

    def recording(mv, n, m, block, *args):
        blocks.append(block)
        return real(mv, n, m, block, *args)

    monkeypatch.setattr(spectra, "_hutchinson", recording)
    fused = sk.hessian(mlp(), nn.CrossEntropyLoss(), uneven_batches("mlp"), engine="fused")
    generic = sk.hessian(cnn(), nn.CrossEntropyLoss(), uneven_batches("cnn"), engine="generic")
    assert (fused.preferred_block_size, generic.preferred_block_size) == (1, 16)
    one = sk.trace(fused, method="hutchinson", num_matvecs=6, seed=2)
    sixteen = sk.trace(generic, method="hutchinson", num_matvecs=6, seed=2)
    forced = sk.trace(fused, method="hutchinson", num_matvecs=6, seed=2, block_size=4)
    assert blocks == [1, 16, 4]
    # The same probes whatever the block: the estimates agree to rounding.
    assert forced.value == pytest.approx(one.value, rel=1e-5)
    assert math.isfinite(sixteen.value)
    with pytest.raises(ValueError, match="block_size"):
        sk.trace(fused, method="hutchinson", num_matvecs=6, block_size=0)


def _symmetric(n: int, seed: int, negative_definite: bool = False) -> torch.Tensor:
    A = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return -(A @ A.t()) - torch.eye(n, dtype=F64) if negative_definite else A + A.t()


@pytest.mark.parametrize("p", [2, 3, 4, 5, 6, 7])
def test_block_lanczos_on_tiny_operators_is_exact_or_says_not_converged(p):
    # n = 7 is not a multiple of most block sizes: the last block must shrink, not stop early
    # or add a zero direction (a spurious Ritz value 0 above a negative-definite spectrum).
    A = _symmetric(7, seed=0, negative_definite=True)
    evals = torch.linalg.eigvalsh(A)
    r = sk.eigenvalues(A, k=1, block_size=p, tol=1e-8)
    assert r.converged and abs(float(r.values[0]) - float(evals[-1])) < 1e-10
    B = _symmetric(27, seed=1)
    full = sk.eigenvalues(B, k=27, block_size=p, tol=1e-8)
    assert full.values.numel() == 27
    assert float((full.values.sort().values - torch.linalg.eigvalsh(B)).abs().max()) < 1e-10


def test_power_iteration_finds_the_algebraic_extremes():
    A = torch.diag(torch.tensor([3.0, 1.0, -5.0], dtype=F64))
    kw = dict(method="power", tol=1e-12, max_steps=3000)
    assert sk.eigenvalues(A, which="LA", **kw).values.tolist() == pytest.approx([3.0], rel=1e-9)
    assert sk.eigenvalues(A, which="LM", **kw).values.tolist() == pytest.approx([-5.0], rel=1e-9)
    assert sk.eigenvalues(A, which="SA", **kw).values.tolist() == pytest.approx([-5.0], rel=1e-9)
    assert sk.eigenvalues(A, k=2, which="LA", **kw).values.tolist() == pytest.approx([3.0, 1.0], rel=1e-6)
    assert sk.eigenvalues(A, k=2, which="SA", **kw).values.tolist() == pytest.approx([-5.0, 1.0], rel=1e-6)


@pytest.mark.parametrize("which", ["LA", "SA"])
def test_power_iteration_wrong_sign_extreme_on_a_dense_operator(which):
    # The dominant eigenvalue has the other sign: the second run, on the shifted spectrum, used to
    # start from the first run's eigenvector (the shifted operator's null vector) and stopped at
    # another eigenvalue (-4.5 for "LA" here), reported as converged.
    sign = 1.0 if which == "LA" else -1.0
    ev = sign * torch.cat([torch.tensor([-5.0, -4.5]), torch.linspace(-1, 0.5, 37), torch.tensor([1.0])]).double()
    Q, _ = torch.linalg.qr(torch.randn(40, 40, generator=torch.Generator().manual_seed(0), dtype=F64))
    A = Q @ torch.diag(ev) @ Q.t()
    r = sk.eigenvalues(A, k=1, method="power", which=which, tol=1e-10, max_steps=3000)
    assert float(r.values[0]) == pytest.approx(sign * 1.0, rel=1e-6)


def test_lobpcg_honours_tol():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=F64))
    lam = torch.linspace(0.01, 1, 200, dtype=F64) ** 3 * 10
    A = Q @ torch.diag(lam) @ Q.t()
    runs = {tol: sk.eigenvalues(A, k=3, method="lobpcg", tol=tol) for tol in (1e-1, 1e-6, 1e-10)}
    assert all(r.converged for r in runs.values())
    assert runs[1e-1].num_matvecs < runs[1e-6].num_matvecs < runs[1e-10].num_matvecs
    assert _rel(runs[1e-10].values, lam.flip(0)[:3]) < 1e-12


def test_float32_dense_operators_and_numpy_seeds():
    import numpy as np

    A32 = _symmetric(40, seed=2).float()
    top = float(torch.linalg.eigvalsh(A32.double())[-1])
    for kw in (dict(block_size=3), dict(method="lobpcg", block_size=4), dict(method="power", max_steps=2000, tol=1e-9)):
        assert float(sk.eigenvalues(A32, k=1, **kw).values[0]) == pytest.approx(top, rel=1e-4)
    # Hutch++ with a sketch of all n = 40 directions is exact up to float32 rounding.
    assert float(sk.trace(A32, num_matvecs=120).value) == pytest.approx(float(A32.double().trace()), rel=1e-5)
    sk.spectral_density(A32, num_runs=2, lanczos_steps=10)
    assert torch.equal(sk.eigenvalues(A32, seed=np.int64(3)).values, sk.eigenvalues(A32, seed=3).values)


def test_spectral_density_does_not_depend_on_the_memory_bound():
    A = _symmetric(50, seed=4)
    small = sk.spectral_density(A, num_runs=6, lanczos_steps=20, seed=1, max_memory_bytes=8 * 50 * 21 * 2)
    large = sk.spectral_density(A, num_runs=6, lanczos_steps=20, seed=1)
    assert torch.allclose(torch.as_tensor(small.density), torch.as_tensor(large.density), rtol=1e-10, atol=1e-12)


class _MatrixOperator:
    """An explicit symmetric matrix behind the operator interface, with the fused engine's CPU
    preference of one direction per product (``trace`` then draws its probes one at a time)."""

    preferred_block_size = 1

    def __init__(self, A: torch.Tensor):
        self.A, self.shape, self.dtype = A, A.shape, A.dtype

    def __matmul__(self, V: torch.Tensor) -> torch.Tensor:
        return self.A @ V


def test_hutchinson_rtol_stderr_is_calibrated_with_one_probe_per_block():
    # Testing the stopping rule from 2 probes on stopped runs whose first probes happened to agree,
    # with a stderr far below the error (here: 15 % of the seeds beyond 3 stderr, z std ~16).
    A = torch.randn(30, 30, generator=torch.Generator().manual_seed(0), dtype=F64)
    A = (A + A.t()) / 2 + torch.eye(30, dtype=F64)
    exact = float(torch.trace(A))
    op = _MatrixOperator(A)
    runs = [sk.trace(op, method="hutchinson", num_matvecs=2000, rtol=0.15, seed=s) for s in range(300)]
    used = torch.tensor([r.num_matvecs for r in runs])
    z = torch.tensor([(r.value - exact) / r.stderr for r in runs], dtype=F64)
    assert float((z.abs() > 3).double().mean()) <= 0.02  # (Student t, 15 dof: ~0.01)
    assert 0.8 < float(z.std()) < 1.25
    assert int(used.min()) >= spectra.HUTCHINSON_MIN_PROBES
    assert float(used.float().median()) < 100  # (the rule does stop runs early)
    assert all(r.stderr <= 0.15 * abs(r.value) for r in runs)
    # num_matvecs stays the hard cap, also below the minimum.
    capped = sk.trace(op, method="hutchinson", num_matvecs=10, rtol=0.5, seed=0)
    assert capped.num_matvecs == 10 == capped.samples.numel()


def _with_spectrum(d: torch.Tensor, seed: int) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(d.numel(), d.numel(), generator=torch.Generator().manual_seed(seed), dtype=F64))
    A = (Q * d.to(F64)) @ Q.t()
    return (A + A.t()) / 2


def _wanted(evals: torch.Tensor, which: str, k: int) -> torch.Tensor:
    order = {"LA": evals.flip(0), "SA": evals, "LM": evals[evals.abs().argsort(descending=True)]}[which]
    return order[:k]


_BULK = 0.9 * torch.linspace(-1, 1, 141) ** 3
_SPECTRA = {
    # the three extreme eigenvalues (LM: magnitudes 2, 1.5 and 1.3) twice / three times, then the bulk
    "double": torch.cat([torch.tensor([2.0, 2.0, 1.5, 1.5, -1.3, -1.3]), _BULK]),
    "triple": torch.cat([torch.tensor([2.0, 2.0, 2.0, 1.5, 1.5, 1.5, -1.3, -1.3, -1.3]), _BULK]),
    "distinct": torch.cat([torch.tensor([2.0, 1.9, 1.5, 1.4, -1.3, -1.2]), _BULK]),
}


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
@pytest.mark.parametrize("spectrum", list(_SPECTRA))
def test_block_lanczos_finds_repeated_eigenvalues(spectrum, which):
    # One Krylov vector sees one direction per eigenspace: single-vector Lanczos (the default)
    # returns 2, 1.5 and 0.9 for the top 3 of "triple", as converged; a block of k vectors finds
    # every copy (and, on distinct spectra, the same values as the default).
    for seed in (0, 1):
        A = _with_spectrum(_SPECTRA[spectrum], seed)
        n = A.shape[0]
        evals = torch.linalg.eigvalsh(A)
        scale = float(evals.abs().max())
        for k in (2, 3, 4, 6):
            r = sk.eigenvalues(A, k=k, which=which, tol=1e-8, seed=seed, block_size=k)
            if spectrum == "distinct":
                single = sk.eigenvalues(A, k=k, which=which, tol=1e-8, seed=seed)
                assert float((single.values - _wanted(evals, which, k)).abs().max()) < 1e-12 * scale
            assert r.converged and r.num_matvecs < n  # (not by exhausting the space)
            assert float((r.values - _wanted(evals, which, k)).abs().max()) < 1e-12 * scale
            R = A @ r.vectors - r.vectors * r.values
            assert float(R.norm(dim=0).max()) < 1e-7 * scale
            torch.testing.assert_close(r.vectors.t() @ r.vectors, torch.eye(k, dtype=F64), atol=1e-8, rtol=0)
        # k = 1 stays single-vector Lanczos
        one = sk.eigenvalues(A, k=1, which=which, tol=1e-8, seed=seed)
        assert one.method == "lanczos" and float((one.values - _wanted(evals, which, 1)).abs().max()) < 1e-12 * scale


def test_lanczos_multiplicity_of_a_linear_mse_hessian():
    # A linear model with C outputs under MSE: H = (2 / (N C)) I_C (x) [X 1]^T [X 1], every
    # eigenvalue C-fold.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3)).double()
    data = [(torch.randn(50, 6, dtype=F64), torch.randn(50, 3, dtype=F64))]
    H = explicit_hessian(model, nn.MSELoss(), data)
    evals = torch.linalg.eigvalsh(H).flip(0)
    op = sk.hessian(model, nn.MSELoss(), data, dtype=F64)
    for k in (2, 3, 5):
        for tol in (1e-3, 1e-8):
            r = sk.eigenvalues(op, k=k, tol=tol)
            assert r.converged
            assert _rel(r.values, evals[:k]) < 10 * tol ** 2 + 1e-12
    assert _rel(sk.eigenvalues(op, k=3, tol=1e-10).values, evals[:1].expand(3)) < 1e-12


@pytest.mark.parametrize("which,tol,matvecs", [("LA", 1e-3, 13), ("LA", 1e-8, 22), ("SA", 1e-3, 15), ("SA", 1e-8, 25)])
def test_lanczos_k1_products_unchanged(problem, which, tol, matvecs):
    # k = 1 stays single-vector Lanczos (one direction of the top eigenspace is all it needs):
    # the product counts are those measured before the block Lanczos and rtol changes.
    model, data, H, evals = problem
    for dtype in (F64, None):
        op = sk.hessian(model, CE, data, dtype=dtype)
        r = sk.eigenvalues(op, k=1, which=which, tol=tol)
        assert r.num_matvecs == matvecs == op.num_matvecs and r.converged
        assert _rel(r.values, _wanted(evals, which, 1)) < (1e-5 if dtype is None else 10 * tol ** 2)


def _repeated_operator(value: float) -> torch.Tensor:
    """43 x 43 with ``value`` six times (more than a block) among 37 distinct eigenvalues."""
    d = torch.linspace(-0.5, 0.85, 43, dtype=F64)
    d[:6] = value
    return _with_spectrum(d, seed=0)


@pytest.mark.parametrize("matrix", ["zeros", "repeated", "dense"])
@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_lanczos_near_exhaustion(matrix, p):
    # Before: block Lanczos replaced dead directions against QR completions not orthogonal to the
    # basis, and the basis grew past n (wrong eigenpairs as converged, num_matvecs > n); and a
    # Krylov space that became invariant with one block's copies of a 6-fold eigenvalue was taken
    # as the answer for k close to n (wrong by up to 0.2, converged=True).
    A = {"zeros": lambda: _repeated_operator(0.0), "repeated": lambda: _repeated_operator(0.3),
         "dense": lambda: _symmetric(43, seed=5)}[matrix]()
    n = A.shape[0]
    evals = torch.linalg.eigvalsh(A)
    scale = float(evals.abs().max())
    for which in ("LA", "SA", "LM"):
        for k in (n - 8, n - 6, n - 3, n - 1, n):
            r = sk.eigenvalues(A, k=k, which=which, tol=1e-8, block_size=p)
            want = _wanted(evals, which, k)
            got = r.values.abs() if which == "LM" else r.values  # (LM: ties of +-x in either order)
            assert r.converged and r.num_matvecs <= n
            assert float((got - (want.abs() if which == "LM" else want)).abs().max()) < 1e-10 * scale
            assert float((A @ r.vectors - r.vectors * r.values).norm(dim=0).max()) < 1e-10 * scale
            torch.testing.assert_close(r.vectors.t() @ r.vectors, torch.eye(k, dtype=F64), atol=1e-10, rtol=0)
    # Too few steps for k = n: said so.
    short = sk.eigenvalues(A, k=n, block_size=p, max_steps=2)
    assert not short.converged and short.num_matvecs == 2 * p


class _Log(nn.Module):
    """log of the hidden units: NaN where one is negative, from finite data and weights."""

    def forward(self, h):
        return torch.log(h)


def _nan_problem():
    """An MLP whose outputs are NaN on finite data: its loss, and every product, is NaN."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), _Log(), nn.Linear(12, 4)).double()
    x, y = uneven_batches("mlp", sizes=(16,), classes=4)[0]
    return model, (x, y)


@pytest.mark.parametrize("call", [
    lambda H: sk.eigenvalues(H, k=1),
    lambda H: sk.eigenvalues(H, k=2, block_size=2),
    lambda H: sk.eigenvalues(H, k=1, method="power"),
    lambda H: sk.eigenvalues(H, k=2, method="lobpcg"),
    lambda H: sk.trace(H, num_matvecs=9),
    lambda H: sk.trace(H, method="hutchinson", num_matvecs=4),
    lambda H: sk.spectral_density(H, num_runs=2, lanczos_steps=5),
], ids=["lanczos", "block-lanczos", "power", "lobpcg", "hutch++", "hutchinson", "density"])
def test_non_finite_products_are_named(call):
    # They used to end in linalg.eigh's or linalg.svd's LinAlgError, or in a NaN estimate.
    model, data = _nan_problem()
    for H, name in ((sk.hessian(model, CE, data, dtype=F64), "Hessian-vector product"),
                    (sk.ggn(model, CE, data, dtype=F64), "GGN-vector product")):
        with pytest.raises(ValueError, match=f"the {name} returned non-finite values"):
            call(H)
    A = _symmetric(30, seed=0)
    A[4, 7] = A[7, 4] = float("inf")
    with pytest.raises(ValueError, match="the operator's product returned non-finite values"):
        call(A)


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_power_iteration_values_are_sorted_even_unconverged(which):
    # A cluster at the top: five steps leave the deflated values in no particular order.
    d = torch.cat([torch.tensor([1.0, 0.99, 0.98, 0.97, 0.5]), torch.zeros(15)]).double()
    Q, _ = torch.linalg.qr(torch.randn(20, 20, generator=torch.Generator().manual_seed(0), dtype=F64))
    A = Q @ torch.diag(d) @ Q.t()
    key = {"LA": lambda v: -v, "SA": lambda v: v, "LM": lambda v: -v.abs()}[which]
    for seed in range(5):
        r = sk.eigenvalues(A, k=3, method="power", max_steps=5, seed=seed, which=which)
        assert torch.equal(r.values, r.values[torch.argsort(key(r.values), stable=True)]), (seed, r.values)
        if which == "LM":  # one run, no shift: the pairs are the deflated run's, permuted together
            raw = spectra._power(spectra._Counter(A), 20, 3, 1e-3, 5, None, spectra._generator(seed), A.device)
            for i in range(3):
                j = int(torch.nonzero(raw[0] == r.values[i])[0, 0])
                assert torch.equal(raw[1][:, j], r.vectors[:, i])
                assert torch.equal(raw[2][j], r.residuals[i]) or (raw[2][j].isnan() and r.residuals[i].isnan())


@pytest.mark.parametrize("scale", [1.0, 1e3, 1e6, -1e6])
def test_spectral_density_integrates_to_one_when_the_nodes_coincide(scale):
    # All nodes equal: the default width used to be 1e-12 absolute, below float64's spacing near
    # 1e6, and the grid collapsed onto a few values (integral 0 or 1.45).
    d = sk.spectral_density(scale * torch.eye(10, dtype=F64))
    assert float(torch.trapezoid(d.density, d.grid)) == pytest.approx(1.0, rel=1e-5)
    assert d.grid.unique().numel() == d.grid.numel()
    A = scale * (torch.eye(30, dtype=F64) + 0.1 * _symmetric(30, seed=3) / 30)
    for kw in (dict(num_runs=1), dict(lanczos_steps=1)):  # one node per run
        d = sk.spectral_density(A, **kw)
        assert float(torch.trapezoid(d.density, d.grid)) == pytest.approx(1.0, rel=1e-5), kw


def test_numpy_integers_are_accepted_bools_are_not():
    import numpy as np

    A = _symmetric(30, seed=5)
    ref = sk.eigenvalues(A, k=2)
    assert torch.equal(sk.eigenvalues(A, k=np.int64(2)).values, ref.values)
    assert torch.equal(sk.eigenvalues(A, k=np.int32(2), block_size=np.int64(2)).values,
                       sk.eigenvalues(A, k=2, block_size=2).values)
    assert sk.trace(A, num_matvecs=np.int64(9), block_size=np.int64(3)).value == sk.trace(A, num_matvecs=9,
                                                                                           block_size=3).value
    assert torch.equal(sk.spectral_density(A, num_runs=np.int64(2), lanczos_steps=np.int16(5)).density,
                       sk.spectral_density(A, num_runs=2, lanczos_steps=5).density)
    with pytest.raises(ValueError, match="k must"):
        sk.eigenvalues(A, k=True)
    with pytest.raises(ValueError, match="k must"):
        sk.eigenvalues(A, k=2.0)


def test_lobpcg_on_a_low_rank_operator_is_quiet():
    import warnings

    U = torch.randn(100, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = sk.eigenvalues(U @ U.t(), k=3, method="lobpcg")
    assert not caught, {type(w.message).__name__ for w in caught}
    top = torch.linalg.eigvalsh(U @ U.t()).flip(0)[:2]
    assert _rel(r.values[:2], top) < 1e-6
