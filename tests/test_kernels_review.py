"""Black-box checks of the fused ops (box ascent, Gaussian subspace, Philox, activation R-terms) on
every CPU backend (torch, cpp, Triton under its interpreter) against independent float64 NumPy
references: block boundaries, special values, memory shared through outside buffers, argument
types and dtypes."""
import math

import numpy as np
import pytest
import torch

import sharpkit as sk
from sharpkit.kernels import _backend
from sharpkit.kernels import activations as A
from sharpkit.kernels.philox import gaussian_block, philox4x32_batch

CPU_BACKENDS = ["torch", "cpp", "triton"]


def _require(backend):
    why = _backend.backends()[backend]
    if why != "ok":
        pytest.skip(f"{backend}: {why}")


# ---- independent references ------------------------------------------------------------------------

_U32 = np.uint64(0xFFFFFFFF)


def _philox_np(c0, c1, c2, c3, k0, k1):
    """Philox-4x32-10 in NumPy uint64 (32 x 32-bit products are exact there)."""
    c = [np.asarray(v, dtype=np.uint64) for v in (c0, c1, c2, c3)]
    k0, k1 = np.uint64(k0), np.uint64(k1)
    for _ in range(10):
        p0 = c[0] * np.uint64(0xD2511F53)
        p1 = c[2] * np.uint64(0xCD9E8D57)
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & _U32, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & _U32]
        k0 = (k0 + np.uint64(0x9E3779B9)) & _U32
        k1 = (k1 + np.uint64(0xBB67AE85)) & _U32
    return c


def _a_np(seed, row0, n, p, float32_uniforms):
    """Rows row0 .. row0 + n - 1 of A in float64 from the documented counters (Box-Muller in float64;
    the float32 definition draws u1, u2 in float32)."""
    pairs = (p + 1) // 2
    rows = np.uint64(row0) + np.arange(n, dtype=np.uint64)[:, None]
    c0 = np.broadcast_to(rows & _U32, (n, pairs))
    c1 = np.broadcast_to(rows >> np.uint64(32), (n, pairs))
    c2 = np.broadcast_to(np.arange(pairs, dtype=np.uint64)[None, :], (n, pairs))
    r0, r1, _, _ = _philox_np(c0, c1, c2, np.zeros_like(c0), seed & 0xFFFFFFFF, seed >> 32)
    if float32_uniforms:
        u1 = ((r0.astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-32)).astype(np.float64)
        u2 = ((r1.astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-32)).astype(np.float64)
    else:
        u1, u2 = (r0.astype(np.float64) + 0.5) * 2.0**-32, (r1.astype(np.float64) + 0.5) * 2.0**-32
    radius = np.sqrt(-2.0 * np.log(u1))
    out = np.stack([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)], -1)
    return out.reshape(n, 2 * pairs)[:, :p]


def _box_np(x, y, g, eps, step, mode, yp=None, mu=None):
    """The projected box step in float64 NumPy (np.maximum/np.minimum propagate NaN)."""
    x, y, g = (np.asarray(t, dtype=np.float64) for t in (x, y, g))
    bound = eps * (np.abs(x) + 1)
    d = np.where(np.isnan(g), g, np.sign(g)) if mode == "sign" else g
    with np.errstate(all="ignore"):
        z = np.minimum(np.maximum(y + step * d, -bound), bound)
        if yp is not None:
            v = y + mu * (z - y) + (1 - mu) * (y - np.asarray(yp, dtype=np.float64))
            z = np.minimum(np.maximum(v, -bound), bound)
        return z, x + z


def _assert_matches(got, want, rtol, atol):
    got = got.detach().double().numpy()
    assert got.shape == want.shape
    assert np.array_equal(np.isnan(got), np.isnan(want))
    finite = ~np.isnan(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=rtol, atol=atol)


# ---- box ascent ------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside Triton's interpreter, on NaN
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_box_ascent_against_numpy_at_block_edges_with_specials(backend, dtype):
    """Sizes at the Triton/CUDA block (1024) and the C++ vector widths +-1, NaN/inf/-0.0 at the first
    and last element of each input, epsilon 0 and a unit absolute box (x = 0, epsilon = 1)."""
    _require(backend)
    rng = np.random.default_rng(11)
    sizes = [1, 2, 1023, 1024, 1025] if backend == "triton" else [1, 7, 8, 9, 1023, 1024, 1025, 2**15 + 1]
    specials = [math.nan, math.inf, -math.inf, -0.0]
    rtol = 1e-6 if dtype == torch.float32 else 1e-14
    for i, n in enumerate(sizes):
        x, y, g, yp = (rng.standard_normal(n) for _ in range(4))
        y *= 0.08 * (np.abs(x) + 1)
        which = [x, y, g, yp][i % 4]
        which[0] = specials[i % 4]
        which[-1] = specials[(i + 1) % 4]
        for eps, step, mode, mu, absolute in ((0.05, 0.02, "sign", None, False), (0.05, 0.3, "grad", 0.75, False),
                                              (0.0, 0.02, "sign", 0.5, False), (1.0, 0.4, "sign", None, True)):
            xs = np.zeros(n) if absolute else x
            ts = [torch.tensor(a, dtype=dtype) for a in (xs, y, g, yp)]
            vals = [t.double().numpy() for t in ts]  # the inputs as the kernels see them
            got = sk.ops.box_ascent_step(ts[0], ts[1], ts[2], eps, step, mode, ts[3] if mu is not None else None,
                                         mu, backend=backend)
            want = _box_np(vals[0], vals[1], vals[2], eps, step, mode, vals[3] if mu is not None else None, mu)
            for a, b in zip(got, want):
                assert a.dtype == dtype
                _assert_matches(a, b, rtol, rtol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_box_ascent_out_overlapping_an_input_through_an_outside_buffer(backend):
    """x and y_new made from overlapping NumPy views (torch.from_numpy gives them separate storages
    over the same memory): the overlap went undetected, y_new was written over x before x was read
    (w off by up to 4.0 with cpp, 0.43 with Triton)."""
    _require(backend)
    n = 2000
    rng = np.random.default_rng(3)
    buf = rng.standard_normal(n + 1)
    x, y_new = torch.from_numpy(buf[:-1]), torch.from_numpy(buf[1:])
    y = torch.from_numpy(0.1 * rng.standard_normal(n))
    g = torch.from_numpy(rng.standard_normal(n))
    want = _box_np(buf[:-1].copy(), y.numpy(), g.numpy(), 0.05, 0.01, "sign")
    w = torch.empty(n, dtype=torch.float64)
    sk.ops.box_ascent_step(x, y, g, 0.05, 0.01, "sign", backend=backend, out=(y_new, w))
    _assert_matches(y_new, want[0], 1e-15, 1e-15)
    _assert_matches(w, want[1], 1e-15, 1e-15)


def test_box_ascent_out_buffers_sharing_an_outside_buffer_are_refused():
    buf = np.zeros(9)
    x, g = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    with pytest.raises(ValueError, match="share memory"):
        sk.ops.box_ascent_step(x, torch.zeros_like(x), g, 0.1, 0.1,
                               out=(torch.from_numpy(buf[:-1]), torch.from_numpy(buf[1:])))


def test_box_ascent_scalar_arguments():
    """NumPy scalars are numbers (they were refused as 'must be a finite number, got
    np.float32(0.1)'); an int beyond float's range is refused by name (it raised OverflowError from
    math.isfinite)."""
    x, g = torch.randn(50), torch.randn(50)
    y = torch.zeros(50)
    for backend in ("torch", "cpp"):
        if _backend.backends()[backend] != "ok":
            continue
        got = sk.ops.box_ascent_step(x, y, g, np.float32(0.25), np.float64(0.125), "grad", y_prev=y,
                                     momentum=np.float32(0.5), backend=backend)
        want = sk.ops.box_ascent_step(x, y, g, float(np.float32(0.25)), 0.125, "grad", y_prev=y, momentum=0.5,
                                      backend=backend)
        assert type(got[0]) is torch.Tensor
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for name, kwargs in (("epsilon", dict(epsilon=10**400, step=0.1)), ("step", dict(epsilon=0.1, step=-10**400)),
                         ("epsilon", dict(epsilon=np.float64(np.inf), step=0.1)),
                         ("step", dict(epsilon=0.1, step=np.bool_(True)))):
        with pytest.raises(ValueError, match=f"{name} must be a finite number"):
            sk.ops.box_ascent_step(x, y, g, **kwargs)
    with pytest.raises(ValueError, match="momentum must be a finite number"):
        sk.ops.box_ascent_step(x, y, g, 0.1, 0.1, y_prev=y, momentum=10**400)


def test_sparse_operands_are_refused_by_layout():
    """Sparse tensors failed inside .contiguous() with 'unsupported memory format option'."""
    x, g = torch.randn(6), torch.randn(6)
    with pytest.raises(TypeError, match="x must be a dense .strided. tensor, got layout torch.sparse_coo"):
        sk.ops.box_ascent_step(x.to_sparse(), torch.zeros(6), g, 0.1, 0.1)
    with pytest.raises(TypeError, match="g must be a dense"):
        sk.ops.box_ascent_step(x, torch.zeros(6), g.to_sparse(), 0.1, 0.1, backend="torch")
    S = sk.ops.GaussianSubspace(6, 3, backend="torch")
    with pytest.raises(TypeError, match="dense"):
        S.rmatvec(g.to_sparse())
    z, rz = torch.randn(2, 3), torch.randn(2, 4, 3)
    with pytest.raises(TypeError, match="z must be a dense"):
        A.rforward("tanh", z.to_sparse(), rz, backend="torch")


# ---- Gaussian subspace and Philox -------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_subspace_against_numpy_philox(backend, dtype):
    """Entries, A z, A^T g and A^T A against a NumPy Philox + Box-Muller of the documented counters,
    at the tile edges (Triton: 32 rows x 16 column pairs; C++: 64 column pairs per chunk, 256 rows
    per work item) and several row blocks, seeds using both key words."""
    _require(backend)
    f32 = dtype == torch.float32
    shapes = [(1, 1), (33, 33), (31, 32), (2, 65)] if backend == "triton" else \
        [(1, 1), (257, 15), (3, 127), (2, 128), (2, 129), (65, 63)]
    rng = np.random.default_rng(5)
    for (n, p), seed in zip(shapes, [0, 2**32 - 1, 2**32, 2**63 + 5, 2**64 - 1, 12345]):
        for block_rows in (7,) if backend == "triton" else (7, 1 << 14):  # the interpreter is slow
            S = sk.ops.GaussianSubspace(n, p, seed, backend=backend, dtype=dtype, block_rows=block_rows)
            ref = _a_np(seed, 0, n, p, f32)
            np.testing.assert_allclose(S.materialize().double().numpy(), ref, rtol=0, atol=5e-5 if f32 else 1e-12)
            z = torch.tensor(rng.standard_normal(p), dtype=dtype)
            g = torch.tensor(rng.standard_normal(n), dtype=dtype)
            scale_mv = np.abs(ref) @ np.abs(z.double().numpy())
            scale_rmv = np.abs(ref).T @ np.abs(g.double().numpy())
            tol = 2e-6 if f32 else 1e-13
            assert np.all(np.abs(S.matvec(z).double().numpy() - ref @ z.double().numpy()) <= tol * (1 + scale_mv))
            assert np.all(np.abs(S.rmatvec(g).double().numpy() - ref.T @ g.double().numpy()) <= tol * (1 + scale_rmv))
            np.testing.assert_allclose(S.gram().double().numpy(), ref.T @ ref, rtol=tol * 10, atol=tol * 10 * n)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_last_int64_row(backend):
    """Row 2**63 - 1, the last row an n = 2**63 subspace has: the torch definition failed with
    'value cannot be converted to type int64_t without overflow' (its arange ended at 2**63)."""
    _require(backend)
    S = sk.ops.GaussianSubspace(2**63, 3, seed=9, backend=backend, dtype=torch.float64)
    got = S.rows(2**63 - 2, 2)
    np.testing.assert_allclose(got.numpy(), _a_np(9, 2**63 - 2, 2, 3, False), rtol=0, atol=1e-12)
    assert gaussian_block(9, 2**63, 0, 3).shape == (0, 3)


def test_subspace_rows_beyond_int64_are_refused_at_construction():
    """n above 2**63 was accepted; its last rows then failed inside the C++ binding with pybind11's
    'incompatible function arguments'."""
    with pytest.raises(ValueError, match="n must be"):
        sk.ops.GaussianSubspace(2**63 + 1, 3)


def test_subspace_refuses_complex_vectors():
    """A complex z was cast to real with only a warning: A (1j * ones) came out as zeros."""
    S = sk.ops.GaussianSubspace(4, 3, seed=1, backend="torch")
    with pytest.raises(TypeError, match="real tensor, got torch.complex64"):
        S.matvec(torch.ones(3, dtype=torch.complex64) * 1j)
    with pytest.raises(TypeError, match="real tensor"):
        S.rmatvec(torch.ones(4, dtype=torch.complex128))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matvec_on_cpu_rounds_once(dtype):
    """The torch path multiplied float16/bfloat16 entries in that dtype: up to 0.024 beyond half a
    bfloat16 ulp of A z.  Now the products run in float32, as rmatvec and the GPU kernels, and A z
    is rounded once: within half an ulp of the float32 entries' product (plus float32 sums)."""
    n, p = 300, 40
    S = sk.ops.GaussianSubspace(n, p, 3, dtype=dtype)
    assert S.backend == "torch"
    z = torch.randn(p, generator=torch.Generator().manual_seed(0)).to(dtype)
    a32 = _a_np(3, 0, n, p, True)
    exact = a32 @ z.double().numpy()
    got = S.matvec(z).double().numpy()
    ulp = 2.0 ** (np.floor(np.log2(np.abs(exact))) - (7 if dtype == torch.bfloat16 else 10))
    assert np.all(np.abs(got - exact) <= 0.5 * ulp + 1e-6 * (np.abs(a32) @ np.abs(z.double().numpy())))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_philox_takes_unsigned_dtypes(backend):
    """torch.uint16/uint32/uint64 counters failed with '"min_all" not implemented for UInt32'."""
    _require(backend)
    rng = np.random.default_rng(2)
    c = rng.integers(0, 2**32, (5, 4), dtype=np.uint64)
    k = rng.integers(0, 2**32, (5, 2), dtype=np.uint64)
    want = np.stack([np.stack(_philox_np(*c[i], k[i, 0], k[i, 1])) for i in range(5)])
    for dtype in (torch.uint32, torch.uint64, torch.int64):
        got = philox4x32_batch(torch.from_numpy(c.astype(np.int64)).to(dtype),
                               torch.from_numpy(k.astype(np.int64)).to(dtype), backend)
        assert np.array_equal(got.numpy().astype(np.uint64), want)
    small = torch.tensor([[1, 2, 3, 4]], dtype=torch.uint16)
    assert torch.equal(philox4x32_batch(small, small[:, :2], backend), philox4x32_batch(small.long(), small[:, :2].long()))


def test_philox_refuses_values_outside_uint32_in_unsigned_dtypes():
    zeros = torch.zeros(1, 2, dtype=torch.uint64)
    for value in (2**32, 2**64 - 1):
        with pytest.raises(ValueError, match=rf"counters must hold uint32 values in \[0, 2\*\*32\), got {value}"):
            philox4x32_batch(torch.tensor([[value, 0, 0, 0]], dtype=torch.uint64), zeros)
    with pytest.raises(TypeError, match="counters must be a torch.Tensor, got list"):
        philox4x32_batch([[0, 0, 0, 0]], [[0, 0]])


# ---- activation R-terms ------------------------------------------------------------------------------

def test_activation_out_overlapping_rz_through_an_outside_buffer():
    """Rz and out from overlapping NumPy views: the Triton kernel wrote out (one row of d ahead of
    Rz) over elements of Rz still to be read (3.7 off)."""
    _require("triton")
    n, k, d = 4, 3, 100
    buf = np.random.default_rng(4).standard_normal(n * k * d + d)
    rz = torch.from_numpy(buf[: n * k * d]).view(n, k, d)
    out = torch.from_numpy(buf[d:]).view(n, k, d)
    z = torch.randn(n, d, dtype=torch.float64)
    want = (1 - np.tanh(z.numpy()) ** 2)[:, None, :] * buf[: n * k * d].reshape(n, k, d).copy()
    assert A.rforward("tanh", z, rz, backend="triton", out=out) is out
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-13, atol=1e-15)


# ---- dtypes the interpreter cannot be trusted with ---------------------------------------------------

def test_triton_refuses_bfloat16_cpu_tensors():
    """Triton's interpreter rounds float32 -> bfloat16 toward zero: box_ascent_step gave y twice as far
    from the float64 result as the plain bfloat16 torch chain (9.6e-4 against 5.9e-4).  Refused, by
    name; "auto" never picks Triton for CPU tensors."""
    if _backend.triton_reason() != "ok" or not _backend.triton_interpreted():
        pytest.skip("needs Triton running under TRITON_INTERPRET=1")
    x = torch.randn(8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="backend 'triton' cannot take bfloat16 CPU tensors"):
        sk.ops.box_ascent_step(x, torch.zeros_like(x), x, 0.1, 0.1, backend="triton")
    with pytest.raises(ValueError, match="bfloat16"):
        sk.ops.GaussianSubspace(4, 3, backend="triton", dtype=torch.bfloat16)
    y_new, _ = sk.ops.box_ascent_step(x, torch.zeros_like(x), x, 0.1, 0.1)  # auto: the torch path
    assert y_new.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_activation_terms_rbackward_with_rz_sharing_rgh(backend):
    """ActivationTerms.rbackward(rgh, rz) with Rz the same tensor as Rgh: the torch path scaled rgh
    in place first, so the sigma'' term read sigma' * Rz instead of Rz (Triton reads both first)."""
    _require(backend)
    gen = torch.Generator().manual_seed(8)
    z, gh = torch.randn(3, 5, generator=gen, dtype=torch.float64), torch.randn(3, 5, generator=gen, dtype=torch.float64)
    r = torch.randn(3, 2, 5, generator=gen, dtype=torch.float64)
    zn, ghn, rn = z.numpy(), gh.numpy(), r.numpy().copy()
    t = np.tanh(zn)
    d1, d2 = 1 - t * t, -2 * t * (1 - t * t)
    want = d1[:, None, :] * rn + (d2 * ghn)[:, None, :] * rn
    terms = A.ActivationTerms("tanh", z, exact=True, backend=backend)
    terms.input_grad(gh)
    got = terms.rbackward(r, r)
    assert got.data_ptr() == r.data_ptr()
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-13, atol=1e-15)


def test_cpp_rmatvec_is_the_same_on_every_call():
    """The C++ A^T g summed per-thread partials under `omp critical` after a dynamic schedule: in
    float64, 20 calls on the same g gave 20 different results (up to 4.9e-12 apart) on two threads.
    Fixed row ranges summed in order now give one result, at the float64 reference."""
    _require("cpp")
    n, p = 60_000, 20
    S = sk.ops.GaussianSubspace(n, p, 1, backend="cpp", dtype=torch.float64, block_rows=1 << 16)
    g = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    first = S.rmatvec(g)
    for _ in range(8):
        assert torch.equal(S.rmatvec(g), first)
    ref = _a_np(1, 0, n, p, False)
    gn = g.numpy()
    assert np.all(np.abs(first.numpy() - ref.T @ gn) <= 1e-13 * (np.abs(ref).T @ np.abs(gn)))
