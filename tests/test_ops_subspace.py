"""sk.ops.GaussianSubspace: products against float64 references, determinism across backends and
block sizes, and the statistics of A."""
import math

import pytest
import torch

import sharpkit as sk
from sharpkit.kernels import _backend
from sharpkit.kernels.philox import gaussian_block

CPU_BACKENDS = ["torch", "cpp", "triton"]
GPU_BACKENDS = ["torch", "triton", "cuda", "cupy"]
SEEDS = [0, 123, 2**32 + 7, 2**64 - 1]


def _require(backend):
    why = _backend.backends()[backend]
    if why != "ok":
        pytest.skip(f"{backend}: {why}")


def _a64(n, p, seed, row0=0, dtype=torch.float64):
    """A's entries as defined for ``dtype`` (rows row0 .. row0 + n - 1), held in float64.

    The float32 definition draws u1, u2 in float32 (sharpkit/kernels/philox.py), so it differs from
    the float64 one by the float32 quantisation of u1 (up to ~4e-4 where u1 rounds to 1); products are
    checked in float64 against the entries of their own dtype."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    return gaussian_block(seed, row0, n, p, work).double()


# Same definition, different libm: float32 entries agree to a few ulp of |A| <= ~6.
F32_ENTRY_TOL = 5e-6


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,p", [(1, 1), (1, 2), (3, 5), (33, 31), (65, 100)])
def test_entries_match_the_definition(backend, dtype, n, p):
    _require(backend)
    for seed in SEEDS[:2] if backend == "triton" else SEEDS:
        got = sk.ops.GaussianSubspace(n, p, seed, backend=backend, dtype=dtype).materialize()
        assert got.shape == (n, p) and got.dtype == dtype
        tol = F32_ENTRY_TOL if dtype == torch.float32 else 1e-13
        torch.testing.assert_close(got.double(), _a64(n, p, seed, dtype=dtype), rtol=0, atol=tol)


def test_cpp_float32_entries_over_a_large_sample():
    """The C++ float32 path uses its own vectorised log and sin/cos: check them on 10^6 entries
    (u1 and the angle cover their whole ranges) against the torch float32 definition."""
    _require("cpp")
    n, p, seed = 20_000, 50, 77
    got = sk.ops.GaussianSubspace(n, p, seed, backend="cpp").materialize()
    want = gaussian_block(seed, 0, n, p, torch.float32)
    diff = (got - want).abs()
    assert diff.max().item() < F32_ENTRY_TOL
    # Relative to the entry: a few float32 ulp (eps = 1.19e-7) away from the smallest entries.
    assert (diff / want.abs().clamp_min(1e-2)).max().item() < 8 * 1.19e-7


def test_float32_and_float64_definitions_agree_to_float32_quantisation():
    a32, a64 = _a64(400, 50, 9, dtype=torch.float32), _a64(400, 50, 9)
    assert (a32 - a64).abs().max().item() < 5e-4
    assert (a32 - a64).abs().median().item() < 1e-6


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,p", [(0, 3), (4, 0), (1, 1), (37, 7), (70, 100)])
def test_products_match_float64_reference(backend, dtype, n, p):
    _require(backend)
    gen = torch.Generator().manual_seed(n * 1000 + p)
    z = torch.randn(p, generator=gen, dtype=torch.float64)
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    seed = 2**40 + 3
    # Several row blocks (block_rows=16) on the native backends; one under Triton's interpreter.
    block_rows = 16 if backend != "triton" else 1 << 14
    A = sk.ops.GaussianSubspace(n, p, seed, backend=backend, dtype=dtype, block_rows=block_rows)
    A64 = _a64(n, p, seed, dtype=dtype)
    # Error bound for sums of k terms of size ~|A||v| in float32: ~k * eps * scale, generous here.
    tol = 1e-5 * max(p, n, 1) ** 0.5 if dtype == torch.float32 else 1e-12
    mv, rmv, gram = A.matvec(z.to(dtype)), A.rmatvec(g.to(dtype)), A.gram()
    assert mv.shape == (n,) and rmv.shape == (p,) and gram.shape == (p, p)
    assert mv.dtype == rmv.dtype == gram.dtype == dtype
    torch.testing.assert_close(mv.double(), A64 @ z, rtol=tol, atol=tol)
    torch.testing.assert_close(rmv.double(), A64.T @ g, rtol=tol, atol=tol)
    torch.testing.assert_close(gram.double(), A64.T @ A64, rtol=tol, atol=tol * max(n, 1) ** 0.5)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_same_seed_same_matrix_across_block_sizes(backend):
    _require(backend)
    n, p, seed = 150, 13, 99
    ref = sk.ops.GaussianSubspace(n, p, seed, backend=backend).materialize()
    z = torch.randn(p, dtype=torch.float64)
    g = torch.randn(n, dtype=torch.float64)
    mv = rmv = None
    for block_rows in (1, 7, 128, n, n + 5):
        A = sk.ops.GaussianSubspace(n, p, seed, backend=backend, dtype=torch.float64, block_rows=block_rows)
        assert torch.equal(sk.ops.GaussianSubspace(n, p, seed, backend=backend, block_rows=block_rows).materialize(),
                           ref)
        if mv is None:
            mv, rmv = A.matvec(z), A.rmatvec(g)
        torch.testing.assert_close(A.matvec(z), mv, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(A.rmatvec(g), rmv, rtol=1e-13, atol=1e-13)


def test_triton_tiles_do_not_change_entries():
    _require("triton")
    from sharpkit.kernels import _triton

    n, p, seed = 40, 11, 5
    want = sk.ops.GaussianSubspace(n, p, seed, backend="torch").materialize()
    for rows, pairs in ((16, 1), (32, 4), (64, 8)):
        out = torch.empty(n, p)
        _triton.subspace_fill(seed, 0, out, block_rows=rows, block_pairs=pairs)
        torch.testing.assert_close(out, want, rtol=0, atol=F32_ENTRY_TOL)
        z = torch.randn(p)
        mv = torch.empty(n)
        _triton.subspace_matvec(seed, 0, z, mv, block_rows=rows, block_pairs=pairs)
        torch.testing.assert_close(mv, want @ z, rtol=1e-5, atol=1e-5)


def test_same_matrix_across_cpu_backends():
    n, p, seed = 50, 9, 2**33 + 1
    mats = {b: sk.ops.GaussianSubspace(n, p, seed, backend=b).materialize()
            for b in CPU_BACKENDS if _backend.backends()[b] == "ok"}
    first = mats.pop("torch")
    for b, m in mats.items():
        torch.testing.assert_close(m, first, rtol=0, atol=F32_ENTRY_TOL, msg=f"backend {b}")


def test_rows_beyond_two_to_the_32():
    """Row indices use both counter words (i_lo, i_hi)."""
    _require("cpp")
    start, p = 2**32 - 2, 6
    A = sk.ops.GaussianSubspace(2**32 + 3, p, seed=1, backend="cpp", dtype=torch.float64)
    torch.testing.assert_close(A.rows(start, 4), _a64(4, p, 1, row0=start), rtol=0, atol=1e-13)
    assert not torch.equal(A.rows(start + 2, 1), A.rows(0, 1))  # row 2**32 is not row 0


def test_different_seeds_give_different_matrices():
    a = sk.ops.GaussianSubspace(20, 4, 0).materialize()
    b = sk.ops.GaussianSubspace(20, 4, 1).materialize()
    c = sk.ops.GaussianSubspace(20, 4, 2**32).materialize()  # the key's high word matters
    assert not torch.equal(a, b) and not torch.equal(a, c)


def test_statistics_of_A():
    """Mean 0, variance 1, uncorrelated columns (including the cos/sin pair of one Philox draw)
    and rows; bounds are 5 standard errors of the sample statistic for N samples."""
    n, p = 20_000, 16
    backend = "cpp" if _backend.backends()["cpp"] == "ok" else "torch"
    A = sk.ops.GaussianSubspace(n, p, seed=2024, backend=backend, dtype=torch.float64).materialize()
    N = A.numel()
    assert abs(A.mean().item()) < 5 / math.sqrt(N)
    # Var of the sample variance of N(0, 1) is 2 / N.
    assert abs(A.var().item() - 1) < 5 * math.sqrt(2 / N)
    # Fourth moment 3 (Gaussian tails, not just the right variance): Var(x^4 mean) = (105 - 9) / N.
    assert abs((A**4).mean().item() - 3) < 5 * math.sqrt(96 / N)
    # Column correlations: each off-diagonal entry of A^T A / n has standard error 1 / sqrt(n).
    corr = (A.T @ A) / n
    off = corr - torch.diag(torch.diagonal(corr))
    assert off.abs().max().item() < 5 / math.sqrt(n)
    # Adjacent rows (consecutive counters) are uncorrelated too: standard error 1 / sqrt(N).
    assert abs((A[1:] * A[:-1]).mean().item()) < 5 / math.sqrt(N)


def test_clear_errors():
    with pytest.raises(ValueError, match="n must be"):
        sk.ops.GaussianSubspace(-1, 3)
    with pytest.raises(TypeError, match="p must be an int"):
        sk.ops.GaussianSubspace(3, 2.5)
    with pytest.raises(ValueError, match="seed"):
        sk.ops.GaussianSubspace(3, 2, seed=2**64)
    with pytest.raises(TypeError, match="dtype"):
        sk.ops.GaussianSubspace(3, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="backend"):
        sk.ops.GaussianSubspace(3, 2, backend="numpy")
    A = sk.ops.GaussianSubspace(3, 2)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        A.matvec(torch.zeros(3))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        A.rmatvec(torch.zeros(2))
    with pytest.raises(TypeError, match="torch.Tensor"):
        A.matvec([0.0, 1.0])
    with pytest.raises(ValueError, match="exceed"):
        A.rows(2, 2)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="unusable"):
            sk.ops.GaussianSubspace(3, 2, backend="cuda")
        for device in ("cuda", "cuda:0"):
            with pytest.raises(ValueError, match="CUDA is not available"):
                sk.ops.GaussianSubspace(3, 2, device=device)


# ---- GPU ------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,p", [(1, 1), (255, 3), (257, 100), (10_001, 17)])
def test_gpu_products_match_float64_reference(backend, dtype, n, p):
    _require(backend)
    seed = 2**35 + 11
    z = torch.randn(p, dtype=torch.float64)
    g = torch.randn(n, dtype=torch.float64)
    A = sk.ops.GaussianSubspace(n, p, seed, backend=backend, dtype=dtype, device="cuda")
    A64 = _a64(n, p, seed, dtype=dtype)
    tol = 1e-5 * max(p, n) ** 0.5 if dtype == torch.float32 else 1e-12
    entry_tol = F32_ENTRY_TOL if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(A.materialize().double().cpu(), A64, rtol=0, atol=entry_tol)
    torch.testing.assert_close(A.matvec(z.to("cuda", dtype)).double().cpu(), A64 @ z, rtol=tol, atol=tol)
    torch.testing.assert_close(A.rmatvec(g.to("cuda", dtype)).double().cpu(), A64.T @ g, rtol=tol, atol=tol)
    torch.testing.assert_close(A.gram().double().cpu(), A64.T @ A64, rtol=tol, atol=tol * n**0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "cupy"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_low_precision_entries(backend, dtype):
    _require(backend)
    got = sk.ops.GaussianSubspace(1000, 10, 3, backend=backend, dtype=dtype, device="cuda").materialize()
    want = _a64(1000, 10, 3, dtype=torch.float32).to(dtype)  # correctly rounded from float32
    diff = (got.double().cpu() - want.double()).abs()
    ulp = want.double().abs() * (2.0 ** -10 if dtype == torch.float16 else 2.0 ** -7)
    assert bool((diff <= ulp + 1e-6).all())


def test_inputs_that_need_gradients_take_the_differentiable_path():
    # The fused kernels record no autograd history: "auto" then runs the torch path, an explicit
    # kernel backend is an error rather than a silent zero gradient.
    A = sk.ops.GaussianSubspace(50, 4, seed=1, dtype=torch.float64)
    A64 = A.materialize().double()
    z = torch.randn(4, dtype=torch.float64, requires_grad=True)
    A.matvec(z).pow(2).sum().backward()
    torch.testing.assert_close(z.grad, 2 * A64.T @ (A64 @ z.detach()))
    g = torch.randn(50, dtype=torch.float64, requires_grad=True)
    A.rmatvec(g).sum().backward()
    torch.testing.assert_close(g.grad, A64 @ torch.ones(4, dtype=torch.float64))
    with torch.no_grad():  # no history wanted: the kernel backend as usual
        torch.testing.assert_close(A.matvec(z), A64 @ z.detach())
    if "cpp" in sk.ops.backends() and sk.ops.backends()["cpp"] == "ok":
        explicit = sk.ops.GaussianSubspace(50, 4, seed=1, backend="cpp", dtype=torch.float64)
        with pytest.raises(ValueError, match="records no autograd history"):
            explicit.matvec(z)
