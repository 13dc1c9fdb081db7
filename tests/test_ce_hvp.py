"""The softmax cross-entropy Hessian product: reference against explicit Hessians, kernels against
the reference (Triton through its CPU interpreter; CUDA/CuPy on GPU)."""
import pytest
import torch
from torch.func import hessian

from sharpkit.kernels import _backend
from sharpkit.kernels.ce_hvp import CEHessian, ce_hvp, ce_hvp_reference


def needs_triton():
    pytest.importorskip("triton")
    if _backend.triton_reason() != "ok":
        pytest.skip(_backend.triton_reason())


def case(n, k, c, dtype=torch.float64, device="cpu", stacked=True):
    z = 3 * torch.randn(n, c, dtype=dtype, device=device)
    r = torch.randn(*((n, k, c) if stacked else (n, c)), dtype=dtype, device=device)
    s = torch.rand(n, dtype=dtype, device=device) + 0.1
    return z, r, s


def test_reference_equals_explicit_logsumexp_hessian():
    n, k, c = 4, 3, 6
    z, r, s = case(n, k, c)
    out = ce_hvp_reference(z, r, s)
    for i in range(n):
        H = hessian(torch.logsumexp, argnums=0)(z[i], 0)  # d2/dz2 logsumexp = diag(p) - p p^T
        torch.testing.assert_close(out[i], s[i] * (r[i] @ H.T), rtol=1e-12, atol=1e-14)
    # 2-D R is the k = 1 case; the given lse is used as is
    lse = torch.logsumexp(z, -1)
    torch.testing.assert_close(ce_hvp_reference(z, r[:, 0], s, lse), out[:, 0], rtol=1e-13, atol=1e-15)


def test_ce_hessian_torch_path_matches_reference():
    z, r, s = case(5, 4, 7)
    want = ce_hvp_reference(z, r, s)
    got = CEHessian(z, s, backend="torch").apply_(r.clone())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize(
    "n, k, c, block_c",
    [
        (3, 2, 10, None),  # one column block, several rows per program
        (2, 3, 7, 8),  # C = block - 1
        (2, 1, 8, 8),  # C = block
        (2, 2, 9, 8),  # C = block + 1: two-pass path
        (1, 2, 17, 8),  # C = 2 blocks + 1
        (3, 1, 1, None),  # one class
        (65, 1, 8, 8),  # rows = BLOCK_M + 1 (64 rows of 8 per program)
    ],
)
def test_triton_matches_reference(n, k, c, block_c, dtype, tol):
    needs_triton()
    z, r, s = case(n, k, c, dtype)
    want = ce_hvp_reference(z, r, s)
    got = ce_hvp(z, r, s, backend="triton", block_c=block_c)
    scale = want.abs().max().clamp_min(1e-30)
    assert got.dtype == dtype and got.shape == r.shape
    assert ((got - want).abs().max() / scale).item() < tol


def test_triton_in_place_two_dimensional_and_empty():
    needs_triton()
    z, r, s = case(3, 1, 12, stacked=False)
    want = ce_hvp_reference(z, r, s)
    buf = r.clone()
    got = ce_hvp(z, buf, s, backend="triton", out=buf, block_c=8)
    assert got.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    for n, k, c in [(0, 2, 5), (3, 0, 5)]:
        ze, re_, se = case(n, k, c)
        assert ce_hvp(ze, re_, se, backend="triton").shape == (n, k, c)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter, on NaN
@pytest.mark.parametrize("block_c", [None, 4])
def test_nan_and_inf_propagate_like_the_reference(block_c):
    needs_triton()
    z, r, s = case(3, 2, 9)
    z[0, 0] = float("nan")  # first element: sample 0's whole row turns NaN
    z[2, 8] = float("inf")  # last element: lse = inf, row NaN
    r[1, 1, 8] = float("inf")  # one direction of sample 1
    want = ce_hvp_reference(z, r, s)
    got = ce_hvp(z, r, s, backend="triton", block_c=block_c)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and bool(torch.isnan(want[0]).all())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14, equal_nan=True)


def test_bad_arguments():
    z, r, s = case(3, 2, 5)
    with pytest.raises(ValueError, match="logits"):
        ce_hvp(z[0], r, s)
    with pytest.raises(ValueError, match="R must have shape"):
        ce_hvp(z, r[:, :, :4], s)
    with pytest.raises(ValueError, match="scale"):
        ce_hvp(z, r, s[:2])
    with pytest.raises(ValueError, match="lse"):
        ce_hvp(z, r, s, lse=s[:1])
    with pytest.raises(TypeError, match="floating"):
        ce_hvp(z.long(), r, s)
    with pytest.raises(ValueError, match="backend"):
        ce_hvp(z, r, s, backend="fast")
    with pytest.raises(ValueError, match="out must match"):
        ce_hvp(z, r, s, out=torch.empty(3, 5, dtype=torch.float64))
    if not torch.cuda.is_available():
        with pytest.raises((RuntimeError, ValueError), match="cuda"):
            ce_hvp(z, r, s, backend="cuda")


def test_cuda_kernels_are_built_into_the_native_module():
    """csrc/ce_hvp.cu registers one entry point per dtype in sharpkit._C_cuda (no GPU needed to list them)."""
    try:
        import sharpkit._C_cuda as native
    except ImportError:
        pytest.skip("sharpkit was built without CUDA kernels")
    assert {f"sk_ce_hvp_{s}" for s in ("f32", "f64", "f16", "bf16")} <= set(native.kernels())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "cupy"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_gpu_backends_match_reference(backend, dtype, tol):
    if _backend.backends()[backend] != "ok":
        pytest.skip(_backend.backends()[backend])
    for n, k, c in [(33, 3, 10), (5, 2, 1000), (3, 1, 50257), (1, 4, 4097), (0, 2, 3)]:
        z, r, s = case(n, k, c, dtype, "cuda")
        want = ce_hvp_reference(z, r, s)
        got = ce_hvp(z, r, s, backend=backend)
        if want.numel():
            assert ((got - want).abs().max() / want.abs().max()).item() < tol
        inplace = r.clone()
        ce_hvp(z, inplace, s, backend=backend, out=inplace)
        torch.testing.assert_close(inplace, got, rtol=tol, atol=0.0)


@pytest.mark.gpu
def test_gpu_half_precision_error_is_that_of_the_plain_half_reference():
    z, r, s = case(64, 2, 1000, torch.float64, "cuda")
    exact = ce_hvp_reference(z, r, s)
    for dtype in (torch.float16, torch.bfloat16):
        plain = ce_hvp_reference(z.to(dtype), r.to(dtype), s).double()
        err_plain = (plain - exact).abs().max()
        for backend in ("cuda", "triton"):
            if _backend.backends()[backend] != "ok":
                continue
            got = ce_hvp(z.to(dtype), r.to(dtype), s, backend=backend).double()
            assert (got - exact).abs().max() <= 2 * err_plain + 1e-6


def test_an_interpreter_that_cannot_run_the_kernels_is_named(monkeypatch):
    """Triton 3.6's interpreter under NumPy 2.4 failed inside every kernel with 'only 0-dimensional
    arrays can be converted to Python scalars'; the backend is now reported unusable, saying why."""
    pytest.importorskip("triton")
    if not _backend.triton_interpreted():
        pytest.skip("the interpreter is probed only under TRITON_INTERPRET=1")
    if _backend._triton_import_reason() != "ok":  # (a Triton too old: the next test's case)
        pytest.skip(_backend._triton_import_reason())
    from sharpkit.kernels import _triton

    z = torch.randn(2, 5, dtype=torch.float64)
    r, s = torch.randn(2, 1, 5, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    # The probe's verdict holds for the real kernels in this environment, whichever it is.
    if _backend._interpreter_reason() == "ok":
        torch.testing.assert_close(ce_hvp(z, r, s, backend="triton"), ce_hvp(z, r, s, backend="torch"))
    else:
        with pytest.raises(Exception, match="CPU interpreter cannot run"):
            ce_hvp(z, r, s, backend="triton")

    def failing_probe():
        raise TypeError("only 0-dimensional arrays can be converted to Python scalars")

    monkeypatch.setattr(_triton, "interpreter_probe", failing_probe)
    _backend._interpreter_reason.cache_clear()
    try:
        why = _backend.triton_reason()
        assert "CPU interpreter cannot run sharpkit's kernels" in why and "0-dimensional" in why
        with pytest.raises(Exception, match="CPU interpreter cannot run"):
            ce_hvp(z, r, s, backend="triton")
    finally:
        _backend._interpreter_reason.cache_clear()


def test_a_triton_older_than_the_kernels_is_named(monkeypatch):
    """torch 2.5 pins Triton 3.1, below the [triton] extra's 3.2: its interpreter failed inside the
    kernels ('Shape element 0 must have type constexpr'), and a GPU compile on an API it lacks."""
    triton = pytest.importorskip("triton")
    before = _backend._triton_import_reason()
    monkeypatch.setattr(triton, "__version__", "3.1.0")
    _backend._triton_import_reason.cache_clear()
    try:
        why = _backend.triton_reason()
        assert why.startswith("Triton 3.1.0 is older than 3.2")
        with pytest.raises(Exception, match="older than 3.2"):
            ce_hvp(torch.randn(2, 5), torch.randn(2, 1, 5), torch.ones(2), backend="triton")
    finally:
        monkeypatch.undo()
        _backend._triton_import_reason.cache_clear()
    assert _backend._triton_import_reason() == before
