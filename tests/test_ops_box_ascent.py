"""sk.ops.box_ascent_step: every backend against the float64 torch reference."""
import math

import pytest
import torch

import sharpkit as sk
from sharpkit.kernels import _backend
from sharpkit.kernels.box_ascent import box_ascent_step_reference

CPU_BACKENDS = ["torch", "cpp", "triton"]
GPU_BACKENDS = ["torch", "triton", "cuda", "cupy"]

# Sizes around the kernels' boundaries: vector widths, the C++ parallel threshold (2**15) and the
# Triton block (1024); the interpreter runs about a millisecond per program, so Triton stays small.
CPP_SIZES = [0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 63, 64, 65, 1000, 2**15 - 1, 2**15, 2**15 + 1, 100_003]
TRITON_SIZES = [0, 1, 2, 17, 1023, 1024, 1025, 2049]
CASES = [  # mode, momentum
    ("sign", None),
    ("grad", None),
    ("sign", 0.75),
    ("grad", 0.3),
]


def _require(backend):
    why = _backend.backends()[backend]
    if why != "ok":
        pytest.skip(f"{backend}: {why}")


def _inputs(n, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    eps = 0.05
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    # y spreads over and beyond the box so that both clamps and the interior occur.
    y = 1.5 * eps * (x.abs() + 1) * (2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1)
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    g[::11] = 0.0  # sign(0) = 0
    yp = eps * (x.abs() + 1) * (2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1)
    return [t.to(device=device, dtype=dtype) for t in (x, y, g, yp)], eps


def _reference64(x, y, g, yp, eps, step, mode, mu):
    d = [t.double().cpu() for t in (x, y, g, yp)]
    return box_ascent_step_reference(d[0], d[1], d[2], eps, step, mode, d[3] if mu is not None else None, mu)


def _check_close(got, ref, dtype):
    # Float64 reference: float32 results agree to a few units in the last place of the box size.
    tol = {torch.float32: 4e-7, torch.float64: 1e-14}[dtype]
    for a, b in zip(got, ref):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double().cpu(), b, rtol=tol, atol=tol, equal_nan=True)


def _run(backend, n, dtype, mode, mu, device="cpu"):
    (x, y, g, yp), eps = _inputs(n, dtype, device, seed=n)
    step = 0.02
    got = sk.ops.box_ascent_step(x, y, g, eps, step, mode, yp if mu is not None else None, mu, backend=backend)
    _check_close(got, _reference64(x, y, g, yp, eps, step, mode, mu), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode,mu", CASES)
@pytest.mark.parametrize("n", CPP_SIZES)
def test_cpp_matches_float64_reference(n, mode, mu, dtype):
    _require("cpp")
    _run("cpp", n, dtype, mode, mu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode,mu", CASES)
@pytest.mark.parametrize("n", [0, 1, 17, 1000])
def test_torch_matches_float64_reference(n, mode, mu, dtype):
    _run("torch", n, dtype, mode, mu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode,mu", CASES)
@pytest.mark.parametrize("n", TRITON_SIZES)
def test_triton_interpreted_matches_float64_reference(n, mode, mu, dtype):
    _require("triton")
    _run("triton", n, dtype, mode, mu)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside Triton's interpreter, on NaN
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("which", ["x", "y", "g", "y_prev"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("mode", ["sign", "grad"])
def test_nan_inf_propagate_like_the_reference(backend, which, value, mode):
    _require(backend)
    n = 1025
    (x, y, g, yp), eps = _inputs(n, torch.float32)
    tensors = dict(x=x, y=y, g=g, y_prev=yp)
    tensors[which][0] = value
    tensors[which][-1] = value
    args = (x, y, g, eps, 0.02, mode, yp, 0.6)
    want = box_ascent_step_reference(*args)
    got = sk.ops.box_ascent_step(*args, backend=backend)
    for a, b in zip(got, want):
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, equal_nan=True)
    # epsilon = 0 with an infinite x gives a NaN bound (0 * inf), in every backend alike.
    x2 = x.clone()
    x2[3] = math.inf
    for a, b in zip(sk.ops.box_ascent_step(x2, y, g, 0.0, 0.02, mode, backend=backend),
                    box_ascent_step_reference(x2, y, g, 0.0, 0.02, mode)):
        torch.testing.assert_close(a, b, equal_nan=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs_are_handled(backend):
    _require(backend)
    (x, y, g, yp), eps = _inputs(2 * 3 * 70, torch.float32)
    views = [t.view(6, 70).t() for t in (x, y, g, yp)]  # transposed: non-contiguous
    strided = [t[::2] for t in (x, y, g, yp)]
    for xs, ys, gs, ps in (views, strided):
        assert not xs.is_contiguous()
        got = sk.ops.box_ascent_step(xs, ys, gs, eps, 0.01, "sign", ps, 0.5, backend=backend)
        want = box_ascent_step_reference(xs, ys, gs, eps, 0.01, "sign", ps, 0.5)
        for a, b in zip(got, want):
            assert a.shape == xs.shape and a.is_contiguous()
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_out_buffers_are_written_in_place_and_may_alias_y(backend):
    _require(backend)
    (x, y, g, yp), eps = _inputs(3000, torch.float64)
    want = box_ascent_step_reference(x, y, g, eps, 0.01, "grad")
    w = torch.empty_like(x)
    y_inplace = y.clone()
    got = sk.ops.box_ascent_step(x, y_inplace, g, eps, 0.01, "grad", backend=backend, out=(y_inplace, w))
    assert got[0] is y_inplace and got[1] is w
    torch.testing.assert_close(y_inplace, want[0], rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(w, want[1], rtol=1e-14, atol=1e-15)


def test_multidimensional_shapes_are_kept():
    (x, y, g, _), eps = _inputs(24, torch.float32)
    shape = (2, 3, 4)
    got = sk.ops.box_ascent_step(x.view(shape), y.view(shape), g.view(shape), eps, 0.01)
    assert got[0].shape == shape and got[1].shape == shape


def test_auto_picks_cpp_on_cpu_and_falls_back_for_half():
    _require("cpp")
    assert _backend.resolve("auto", torch.device("cpu"), torch.float32, "op") == "cpp"
    assert _backend.resolve("auto", torch.device("cpu"), torch.float16, "op") == "torch"
    # Triton is never auto-picked for CPU tensors, even under the interpreter.
    assert "triton" not in _backend.CPU_PREFERENCE
    x, g = torch.randn(10, dtype=torch.float16), torch.randn(10, dtype=torch.float16)
    got = sk.ops.box_ascent_step(x, torch.zeros_like(x), g, 0.1, 0.01)
    want = box_ascent_step_reference(x, torch.zeros_like(x), g, 0.1, 0.01)
    assert got[0].dtype == torch.float16
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_clear_errors():
    x = torch.randn(5)
    y, g = torch.zeros(5), torch.randn(5)
    step = sk.ops.box_ascent_step
    with pytest.raises(ValueError, match="shape"):
        step(x, torch.zeros(4), g, 0.1, 0.1)
    with pytest.raises(TypeError, match="dtype"):
        step(x, y.double(), g, 0.1, 0.1)
    with pytest.raises(ValueError, match="meta"):
        step(x, y.to("meta"), g, 0.1, 0.1)
    with pytest.raises(TypeError, match="floating"):
        step(x.long(), y.long(), g.long(), 0.1, 0.1)
    with pytest.raises(TypeError, match="torch.Tensor"):
        step(x.numpy(), y, g, 0.1, 0.1)
    with pytest.raises(ValueError, match="mode"):
        step(x, y, g, 0.1, 0.1, mode="l2")
    with pytest.raises(ValueError, match="epsilon"):
        step(x, y, g, -0.1, 0.1)
    with pytest.raises(ValueError, match="step"):
        step(x, y, g, 0.1, math.nan)
    with pytest.raises(ValueError, match="y_prev and momentum"):
        step(x, y, g, 0.1, 0.1, y_prev=y)
    with pytest.raises(ValueError, match="backend"):
        step(x, y, g, 0.1, 0.1, backend="fortran")
    if _backend.backends()["cpp"] == "ok":
        with pytest.raises(ValueError, match="float32/float64"):
            step(x.half(), y.half(), g.half(), 0.1, 0.1, backend="cpp")
    with pytest.raises(ValueError, match="contiguous"):
        step(x, y, g, 0.1, 0.1, out=(torch.empty(10)[::2], torch.empty(5)))
    with pytest.raises(ValueError, match="match x"):
        step(x, y, g, 0.1, 0.1, out=(torch.empty(4), torch.empty(5)))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="unusable"):
            step(x, y, g, 0.1, 0.1, backend="cuda")


# ---- GPU ------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode,mu", CASES)
@pytest.mark.parametrize("n", [0, 1, 255, 256, 1023, 1024, 1025, 4097, 1_000_003])
def test_gpu_matches_float64_reference(backend, n, mode, mu, dtype):
    _require(backend)
    _run(backend, n, dtype, mode, mu, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "cupy"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode,mu", CASES)
def test_gpu_low_precision(backend, dtype, mode, mu):
    """Judged against the error of the plain torch chain in the same dtype (flash-attention style)."""
    _require(backend)
    (x, y, g, yp), eps = _inputs(100_003, dtype, "cuda")
    args = (x, y, g, eps, 0.02, mode, yp if mu is not None else None, mu)
    ref = _reference64(x, y, g, yp, eps, 0.02, mode, mu)
    got = sk.ops.box_ascent_step(*args, backend=backend)
    plain = box_ascent_step_reference(*args)
    for a, p, r in zip(got, plain, ref):
        assert a.dtype == dtype
        err = (a.double().cpu() - r).abs().max().item()
        err_plain = (p.double().cpu() - r).abs().max().item()
        assert err <= 2 * err_plain + 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "cupy"])
def test_gpu_nan_inf(backend):
    _require(backend)
    (x, y, g, yp), eps = _inputs(4097, torch.float32, "cuda")
    for t in (x, y, g, yp):
        t[0], t[-1] = math.nan, math.inf
        args = (x, y, g, eps, 0.02, "sign", yp, 0.6)
        for a, b in zip(sk.ops.box_ascent_step(*args, backend=backend), box_ascent_step_reference(*args)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, equal_nan=True)


def test_inputs_that_need_gradients_take_the_differentiable_path():
    x = torch.randn(33, dtype=torch.float64)
    y = torch.zeros(33, dtype=torch.float64)
    g = torch.randn(33, dtype=torch.float64, requires_grad=True)
    y_new, _ = sk.ops.box_ascent_step(x, y, g, epsilon=0.1, step=0.01, mode="grad")
    assert y_new.requires_grad  # the torch path recorded the update
    reference, _ = box_ascent_step_reference(x, y, g, 0.1, 0.01, "grad")
    torch.testing.assert_close(y_new, reference)
    with pytest.raises(ValueError, match="records no autograd history"):
        sk.ops.box_ascent_step(x, y, g, epsilon=0.1, step=0.01, mode="grad", backend="cpp")
