"""Edge cases of the fused ops on every CPU backend (torch, cpp, Triton under its interpreter):
aliasing and overlapping buffers, non-contiguous outputs, mismatched operands, bad arguments,
Philox streams at offsets, and the backend choice of ``"auto"``.  Float64 references throughout."""
import math

import pytest
import torch

import sharpkit as sk
from sharpkit.kernels import _backend
from sharpkit.kernels import activations as A
from sharpkit.kernels.box_ascent import box_ascent_step_reference
from sharpkit.kernels.ce_hvp import ce_hvp, ce_hvp_reference
from sharpkit.kernels.philox import gaussian_block, philox4x32_batch

CPU_BACKENDS = ["torch", "cpp", "triton"]


def _require(backend):
    why = _backend.backends()[backend]
    if why != "ok":
        pytest.skip(f"{backend}: {why}")


# ---- overlap detection --------------------------------------------------------------------------

def test_partially_overlaps():
    buf = torch.arange(12.0)
    assert not _backend.partially_overlaps(buf, buf)  # the same elements: in place is fine
    assert not _backend.partially_overlaps(buf[:6], buf[6:])  # disjoint halves
    assert not _backend.partially_overlaps(buf, torch.arange(12.0))  # other storage
    assert not _backend.partially_overlaps(buf[:0], buf)  # empty
    assert _backend.partially_overlaps(buf[:-1], buf[1:])  # shifted by one element
    assert _backend.partially_overlaps(buf.view(3, 4), buf.view(4, 3).t())  # same storage, other order
    assert _backend.partially_overlaps(buf[:4], buf)  # a part of it


# ---- box_ascent_step -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_box_ascent_out_overlapping_an_input_is_exact(backend, dtype):
    """y_new written over a shifted view of x's storage: the kernels used to overwrite x[i + 1]
    before reading it (w came out wrong); every backend must give the reference result."""
    _require(backend)
    n = 1030  # beyond one Triton block
    gen = torch.Generator().manual_seed(5)
    buf = torch.randn(n + 1, generator=gen, dtype=torch.float64).to(dtype)
    x, y_new = buf[:-1], buf[1:]
    y = 0.1 * torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    g = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    want = box_ascent_step_reference(x.double().clone(), y.double(), g.double(), 0.05, 0.01, "sign")
    w = torch.empty(n, dtype=dtype)
    got = sk.ops.box_ascent_step(x, y, g, 0.05, 0.01, "sign", backend=backend, out=(y_new, w))
    assert got[0] is y_new and got[1] is w
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(y_new.double(), want[0], rtol=tol, atol=tol)
    torch.testing.assert_close(w.double(), want[1], rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_box_ascent_out_aliasing_x_y_and_g_at_once(backend):
    _require(backend)
    v = torch.tensor([1.0, -2.0, 3.0, 0.0], dtype=torch.float64)
    want = box_ascent_step_reference(v, v, v, 0.1, 0.5, "sign")
    w = torch.empty_like(v)
    sk.ops.box_ascent_step(v, v, v, 0.1, 0.5, "sign", backend=backend, out=(v, w))
    torch.testing.assert_close(v, want[0], rtol=0, atol=1e-15)
    torch.testing.assert_close(w, want[1], rtol=0, atol=1e-15)


def test_box_ascent_refuses_out_buffers_that_share_memory():
    x, y, g = torch.randn(4), torch.zeros(4), torch.randn(4)
    buf = torch.empty(5)
    with pytest.raises(ValueError, match="share memory"):
        sk.ops.box_ascent_step(x, y, g, 0.1, 0.1, out=(buf[:4], buf[1:]))
    with pytest.raises(ValueError, match="share memory"):
        sk.ops.box_ascent_step(x, y, g, 0.1, 0.1, out=(buf[:4], buf[:4]))


def test_box_ascent_refuses_bool_scalars():
    x, y, g = torch.randn(4), torch.zeros(4), torch.randn(4)
    with pytest.raises(ValueError, match="epsilon"):
        sk.ops.box_ascent_step(x, y, g, True, 0.1)
    with pytest.raises(ValueError, match="momentum"):
        sk.ops.box_ascent_step(x, y, g, 0.1, 0.1, y_prev=y, momentum=False)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_box_ascent_zero_dimensional(backend):
    _require(backend)
    x, y, g = torch.tensor(1.5), torch.tensor(0.0), torch.tensor(-2.0)
    got = sk.ops.box_ascent_step(x, y, g, 0.1, 0.05, backend=backend)
    want = box_ascent_step_reference(x.double(), y.double(), g.double(), 0.1, 0.05)
    for a, b in zip(got, want):
        assert a.shape == () and a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-7, atol=1e-7)


# ---- activation R-terms (Triton path) -----------------------------------------------------------

def _stack(n=3, k=2, d=5, dtype=torch.float64):
    gen = torch.Generator().manual_seed(7)
    return tuple(torch.randn(*s, generator=gen, dtype=dtype) for s in ((n, d), (n, d), (n, k, d), (n, k, d)))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_activation_non_contiguous_out_and_in_place(backend):
    """A transposed ``out`` (or an in-place call on a transposed Rz/Rgh): the Triton kernels write
    linear offsets and used to scramble such outputs."""
    _require(backend)
    z, gh, rz, rgh = _stack()
    want_f = A.rforward_reference("tanh", z, rz)
    want_b = A.rbackward_reference("tanh", z, gh, rz, rgh)
    out = torch.empty(3, 5, 2, dtype=torch.float64).transpose(1, 2)
    assert A.rforward("tanh", z, rz, backend=backend, out=out) is out
    torch.testing.assert_close(out, want_f, rtol=1e-13, atol=1e-14)
    rzt = rz.transpose(1, 2).contiguous().transpose(1, 2)  # same values, non-contiguous
    A.rforward("tanh", z, rzt, backend=backend, out=rzt)
    torch.testing.assert_close(rzt, want_f, rtol=1e-13, atol=1e-14)
    rght = rgh.transpose(1, 2).contiguous().transpose(1, 2)
    A.rbackward("tanh", z, gh, rz, rght, backend=backend, out=rght)
    torch.testing.assert_close(rght, want_b, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_activation_mismatched_operands_are_refused(backend):
    _require(backend)
    z, gh, rz, rgh = _stack()
    with pytest.raises(ValueError, match="out must match Rz"):
        A.rforward("tanh", z, rz, backend=backend, out=torch.empty(3, 2, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="out must match Rz"):
        A.rforward("tanh", z, rz, backend=backend, out=torch.empty(3, 2, 5, dtype=torch.float32))
    with pytest.raises(TypeError, match="z has dtype torch.float64, Rz has torch.float32"):
        A.rforward("tanh", z, rz.float(), backend=backend)
    with pytest.raises(TypeError, match="gh has dtype"):
        A.rbackward("tanh", z, gh.float(), rz, rgh, backend=backend)
    with pytest.raises(ValueError, match="gh must match z"):
        A.rbackward("tanh", z, gh[:, :1], rz, rgh, backend=backend)
    with pytest.raises(ValueError, match="Rz is on meta"):
        A.rbackward("tanh", z, gh, rz.to("meta"), rgh, backend=backend)
    with pytest.raises(TypeError, match="floating"):
        A.rforward("tanh", z.long(), rz.long(), backend=backend)


def test_activation_half_precision_triton_within_twice_the_plain_error():
    _require("triton")
    z, gh, rz, rgh = _stack(4, 3, 50)
    for kind in ("gelu", "silu", "tanh"):
        exact = A.rbackward_reference(kind, z, gh, rz, rgh)
        low = [t.half() for t in (z, gh, rz, rgh)]
        err = (A.rbackward(kind, *low, backend="triton").double() - exact).abs().max()
        err_plain = (A.rbackward_reference(kind, *low).double() - exact).abs().max()
        assert err <= 2 * err_plain + 1e-6, kind


# ---- ce_hvp ----------------------------------------------------------------------------------------

def _ce_case(n, k, c, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = 4 * torch.randn(n, c, generator=gen, dtype=torch.float64)
    r = torch.randn(n, k, c, generator=gen, dtype=torch.float64)
    s = torch.rand(n, generator=gen, dtype=torch.float64) + 0.1
    return z, r, s


@pytest.mark.parametrize("block_c", [3, 0, -4, True, 2.0])
def test_ce_hvp_refuses_a_bad_block_c(block_c):
    """block_c=-4 used to skip every column (an uninitialised result), 3 failed inside Triton."""
    z, r, s = _ce_case(2, 2, 7)
    for backend in ("torch", "triton"):
        if _backend.backends()[backend] != "ok":
            continue
        with pytest.raises(ValueError, match="block_c must be a positive power of two"):
            ce_hvp(z, r, s, backend=backend, block_c=block_c)


def test_ce_hvp_refuses_operands_on_other_devices():
    z, r, s = _ce_case(2, 2, 7)
    with pytest.raises(ValueError, match="scale is on meta, R is on cpu"):
        ce_hvp(z, r, s.to("meta"))
    with pytest.raises(ValueError, match="lse is on meta"):
        ce_hvp(z, r, s, lse=torch.logsumexp(z, -1).to("meta"))
    with pytest.raises(ValueError, match="logits is on cpu, R is on meta"):
        ce_hvp(z, r.to("meta"), s)


def test_ce_hvp_triton_reads_wider_logits_at_their_precision():
    """float32 logits with a float16 R: the definition reads the logits in float32; Triton used to
    round them to float16 first (about twice the error of the torch path)."""
    _require("triton")
    z, r, s = _ce_case(16, 2, 40, seed=3)
    exact = ce_hvp_reference(z.float().double(), r.half().double(), s)
    plain = ce_hvp_reference(z.float(), r.half(), s).double()
    got = ce_hvp(z.float(), r.half(), s, backend="triton")
    assert got.dtype == torch.float16
    err, err_plain = (got.double() - exact).abs().max(), (plain - exact).abs().max()
    assert err <= 1.25 * err_plain + 1e-7


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ce_hvp_out_overlapping_r_is_exact(backend):
    """out a view of R's storage shifted by one row: one Triton program per row (block_c below C)
    wrote row m + 1 of R before reading it."""
    _require(backend)
    n, c = 4, 6
    z, _, s = _ce_case(n, 1, c, seed=4)
    buf = torch.randn((n + 1) * c, dtype=torch.float64)
    r, out = buf[: n * c].view(n, c), buf[c:].view(n, c)
    want = ce_hvp_reference(z, r.clone(), s)
    assert ce_hvp(z, r, s, backend=backend, out=out, block_c=4) is out
    torch.testing.assert_close(out, want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ce_hvp_non_contiguous_inputs(backend):
    _require(backend)
    z, r, s = _ce_case(3, 2, 9, seed=6)
    want = ce_hvp_reference(z, r, s)
    zt = z.t().contiguous().t()
    rt = r.transpose(0, 2).contiguous().transpose(0, 2)
    st = torch.stack((s, s), 1)[:, 0]
    got = ce_hvp(zt, rt, st, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)


# ---- Philox ------------------------------------------------------------------------------------------

def test_philox_batch_refuses_values_that_are_not_uint32():
    ok = torch.zeros(1, 2, dtype=torch.int64)
    with pytest.raises(TypeError, match="integer tensor"):
        philox4x32_batch(torch.zeros(1, 4), ok)
    with pytest.raises(ValueError, match=r"\[0, 2\*\*32\)"):
        philox4x32_batch(torch.tensor([[2**32, 0, 0, 0]]), ok)  # used to wrap to counter 0
    with pytest.raises(ValueError, match=r"keys must hold uint32"):
        philox4x32_batch(torch.zeros(1, 4, dtype=torch.int64), torch.tensor([[-1, 0]]))
    # int32 tensors carry uint32 values as bit patterns
    bits = torch.tensor([[-1, -1, -1, -1]], dtype=torch.int32)
    assert torch.equal(philox4x32_batch(bits, bits[:, :2]),
                       philox4x32_batch(torch.full((1, 4), 2**32 - 1), torch.full((1, 2), 2**32 - 1)))


def test_gaussian_block_refuses_bad_arguments():
    with pytest.raises(ValueError, match=">= 0"):
        gaussian_block(1, -3, 2, 2)  # a negative row used to give entries of no defined row
    with pytest.raises(ValueError, match=">= 0"):
        gaussian_block(1, 0, -2, 2)
    with pytest.raises(TypeError, match="seed must be an int"):
        gaussian_block(1.5, 0, 2, 2)
    with pytest.raises(ValueError, match="2\\*\\*63"):
        gaussian_block(1, 2**63 - 1, 2, 2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_at_offsets_are_the_slices_of_A(backend, dtype):
    """rows(start, count) on every backend is exactly A[start : start + count] of the torch
    definition, whatever the offset (blocks of rows are independent of where they start)."""
    _require(backend)
    n, p, seed = 70, 9, 2**40 + 17
    A_ = sk.ops.GaussianSubspace(n, p, seed, backend=backend, dtype=dtype)
    full = gaussian_block(seed, 0, n, p, dtype)
    tol = 5e-6 if dtype == torch.float32 else 1e-13
    for start, count in ((0, 1), (1, 31), (31, 33), (69, 1), (70, 0), (5, 65)):
        got = A_.rows(start, count)
        assert got.shape == (count, p)
        torch.testing.assert_close(got, full[start : start + count], rtol=0, atol=tol)


def test_streams_do_not_overlap():
    """Every (seed, row, pair) is its own Philox counter: no two entries of A coincide, nor do
    entries of neighbouring seeds, so blocks at different offsets never reuse random numbers."""
    n, p = 400, 30
    a = gaussian_block(11, 0, n, p, torch.float64).flatten()
    b = gaussian_block(12, 0, n, p, torch.float64).flatten()
    c = gaussian_block(11 + 2**32, 0, n, p, torch.float64).flatten()
    both = torch.cat((a, b, c))
    assert torch.unique(both).numel() == both.numel()
    # rows at an offset continue the same matrix
    assert torch.equal(gaussian_block(11, 100, 50, p, torch.float64), a.view(n, p)[100:150])


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_philox_batch_non_contiguous_and_empty(backend):
    _require(backend)
    counters = torch.arange(32).view(4, 8)[:, ::2]
    keys = torch.arange(16).view(4, 4)[:, 1::2]
    assert torch.equal(philox4x32_batch(counters, keys, backend), philox4x32_batch(counters, keys, "torch"))
    empty = philox4x32_batch(torch.zeros(0, 4, dtype=torch.int64), torch.zeros(0, 2, dtype=torch.int64), backend)
    assert empty.shape == (0, 4)


# ---- backend choice --------------------------------------------------------------------------------

def test_auto_follows_the_documented_preference(monkeypatch):
    """GPU: cuda > triton > cupy > torch; CPU: cpp > torch (never Triton); a backend is skipped
    when unusable here or when it cannot take the dtype."""
    usable = {"torch", "cpp", "triton", "cuda", "cupy"}
    monkeypatch.setattr(_backend, "_reason", lambda name: "ok" if name in usable else "missing")
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    order = []
    for _ in range(4):
        name = _backend.resolve("auto", gpu, torch.float32, "op")
        order.append(name)
        usable.discard(name)
    assert order == ["cuda", "triton", "cupy", "torch"]
    usable.update({"cpp", "triton", "cuda", "cupy"})
    assert _backend.resolve("auto", cpu, torch.float32, "op") == "cpp"
    assert _backend.resolve("auto", cpu, torch.float16, "op") == "torch"  # cpp: float32/float64 only
    assert _backend.resolve("auto", gpu, torch.bfloat16, "op") == "cuda"
    assert _backend.resolve("auto", gpu, torch.complex64, "op") == "torch"
    usable.discard("cpp")
    assert _backend.resolve("auto", cpu, torch.float64, "op") == "torch"


def test_explicit_backends_explain_why_they_cannot_run(monkeypatch):
    monkeypatch.setattr(_backend, "_reason", lambda name: "ok" if name != "cupy" else "cannot import cupy: nope")
    with pytest.raises(RuntimeError, match="backend 'cupy' is unusable here: cannot import cupy: nope"):
        _backend.resolve("cupy", torch.device("cuda", 0), torch.float32, "op")
    with pytest.raises(ValueError, match="backend 'cpp' runs on CPU tensors only"):
        _backend.resolve("cpp", torch.device("cuda", 0), torch.float32, "op")
    with pytest.raises(ValueError, match="backend 'cuda' runs on CUDA tensors only"):
        _backend.resolve("cuda", torch.device("cpu"), torch.float32, "op")
    with pytest.raises(ValueError, match="backend 'cpp' supports float32/float64 only, got torch.bfloat16"):
        _backend.resolve("cpp", torch.device("cpu"), torch.bfloat16, "op")
    with pytest.raises(ValueError, match="must be 'auto' or one of"):
        _backend.resolve("CUDA", torch.device("cpu"), torch.float32, "op")


def test_backends_table_reasons_are_specific():
    table = sk.ops.backends()
    if not torch.cuda.is_available():
        assert "GPU" in table["cupy"] or "cupy" in table["cupy"]
        assert table["cuda"] != "ok" and ("CUDA" in table["cuda"] or "GPU" in table["cuda"])
    if _backend.triton_interpreted():
        assert table["triton"] == "ok" or "triton" in table["triton"].lower()


# ---- the C++ entry points guard their raw-pointer interface --------------------------------------

def test_cpp_entry_points_refuse_bad_sizes_and_dtypes():
    _require("cpp")
    C = _backend.cpp_module()[0]
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="negative size"):
        C.box_ascent(x.data_ptr(), x.data_ptr(), x.data_ptr(), 0, x.data_ptr(), x.data_ptr(), -1, 0,
                     0.1, 0.1, True, 0.0, 1.0)
    with pytest.raises(ValueError, match="float32 and float64 only"):
        C.box_ascent(x.data_ptr(), x.data_ptr(), x.data_ptr(), 0, x.data_ptr(), x.data_ptr(), 4, 2,
                     0.1, 0.1, True, 0.0, 1.0)
    with pytest.raises(ValueError, match="negative size"):
        C.subspace_fill(0, 0, -1, 3, x.data_ptr(), 0)
    with pytest.raises(ValueError, match="float32 and float64 only"):
        C.subspace_matvec(0, 0, 1, 3, x.data_ptr(), x.data_ptr(), 3)
    assert torch.equal(x, torch.zeros(4))  # nothing was written


def test_triton_subspace_launches_column_pairs_in_slices(monkeypatch):
    """Grid axis 1 holds at most 65535 programs on a GPU: fill and rmatvec launch the column pairs
    in slices (forced to 1 and 2 programs here) and give the same A."""
    _require("triton")
    from sharpkit.kernels import _triton

    n, p, seed = 9, 37, 21  # 19 column pairs: 5 programs of 4 pairs
    want = gaussian_block(seed, 0, n, p, torch.float32)
    g = torch.randn(n, dtype=torch.float64)
    for cap in (1, 2):
        monkeypatch.setattr(_triton, "MAX_GRID_Y", cap)
        assert len(_triton._pair_slices(p, 4)) == -(-5 // cap)
        out = torch.empty(n, p)
        _triton.subspace_fill(seed, 0, out, block_rows=16, block_pairs=4)
        torch.testing.assert_close(out, want, rtol=0, atol=5e-6)
        got = _triton.subspace_rmatvec(seed, 0, g.float(), p, block_rows=16, block_pairs=4)
        torch.testing.assert_close(got.double(), want.double().T @ g, rtol=1e-5, atol=1e-5)



def test_cuda_rmatvec_host_side_covers_every_column_pair_once(monkeypatch):
    """The CUDA rmatvec is launched in slices of at most 65535 blocks along y (forced to 2 here).
    A stand-in for the kernel, following csrc/subspace.cu's contract through the raw pointers
    (block (x, y) writes columns 2 * (pair0 + y * SK_RMV_PAIRS) .. of partial[x]), checks that the
    slices cover each column exactly once and that the host sums give A^T g."""
    import ctypes

    import numpy as np

    from sharpkit.kernels import subspace as S

    n, p, seed = 10, 41, 8  # 21 column pairs: 3 blocks of 8 pairs along y
    full = gaussian_block(seed, 0, n, p, torch.float64)
    launches, written = [], [0] * p

    def fake_launch(backend, source, name, grid, block, args, device, shared_bytes=0):
        (_, g_ptr), (_, partial_ptr), (_, start), (_, count), (_, cols), (_, pair0), *_ = args
        gx, gy = grid
        assert name == "sk_subspace_rmatvec_f64" and tuple(block) == (S._CUDA_THREADS,) and gy <= 2
        launches.append(pair0)
        g = np.ctypeslib.as_array((ctypes.c_double * count).from_address(g_ptr))
        partial = np.ctypeslib.as_array((ctypes.c_double * (gx * cols)).from_address(partial_ptr)).reshape(gx, cols)
        for y in range(gy):
            first = 2 * (pair0 + y * S._CUDA_RMV_PAIRS)
            for j in range(first, min(first + 2 * S._CUDA_RMV_PAIRS, cols)):
                written[j] += 1
                partial[:, j] = 0.0
                partial[0, j] = float(full[start : start + count, j].numpy() @ g)

    monkeypatch.setattr(S, "launch", fake_launch)
    monkeypatch.setattr(S, "multiprocessor_count", lambda index: 1)
    monkeypatch.setattr(S, "_CUDA_MAX_GRID_Y", 2)
    A_ = S.GaussianSubspace(n, p, seed, dtype=torch.float64, backend="torch", block_rows=6)
    A_.backend = A_._requested_backend = "cuda"  # the host side only; the kernel is the stand-in
    g = torch.randn(n, dtype=torch.float64)
    got = A_.rmatvec(g)
    assert launches == [0, 16, 0, 16]  # two row blocks (block_rows=6), two y-slices each
    assert written == [2] * p
    torch.testing.assert_close(got, full.T @ g, rtol=1e-12, atol=1e-12)
