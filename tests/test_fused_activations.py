"""Activation R-forward / R-backward terms: derivatives against autograd, Triton kernels (CPU
interpreter) against the torch reference at block boundaries, with NaN/inf and empty inputs."""
import pytest
import torch
from torch.func import grad, vmap

from sharpkit.kernels import _backend
from sharpkit.kernels import activations as A

KINDS = sorted(A.ACTIVATIONS)
ALPHA = 0.07


def needs_triton():
    pytest.importorskip("triton")
    if _backend.triton_reason() != "ok":
        pytest.skip(_backend.triton_reason())


@pytest.mark.parametrize("kind", KINDS)
def test_derivatives_match_autograd_and_activation_matches_torch(kind):
    z = torch.linspace(-6, 6, 97, dtype=torch.float64)
    z = z[z != 0]  # ReLU family: torch's kink convention is tested below
    f = lambda t: A.activation(kind, t, ALPHA)  # noqa: E731
    d1 = vmap(grad(f))(z)
    d2 = vmap(grad(grad(f)))(z)
    got1, got2 = A.derivatives(kind, z, ALPHA)
    torch.testing.assert_close(got1, d1, rtol=1e-12, atol=1e-13)
    if got2 is None:
        assert kind in A.PIECEWISE_LINEAR and bool((d2 == 0).all())
    else:
        torch.testing.assert_close(got2, d2, rtol=1e-10, atol=1e-12)
    module = {"relu": torch.nn.ReLU(), "leaky_relu": torch.nn.LeakyReLU(ALPHA), "gelu": torch.nn.GELU(),
              "gelu_tanh": torch.nn.GELU("tanh"), "tanh": torch.nn.Tanh(), "sigmoid": torch.nn.Sigmoid(),
              "silu": torch.nn.SiLU()}[kind]
    torch.testing.assert_close(f(z), module(z), rtol=0, atol=0)


def test_kink_convention_is_autograds():
    z = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    for kind in ("relu", "leaky_relu"):
        (g,) = torch.autograd.grad(A.activation(kind, z, ALPHA).sum(), z)
        assert torch.equal(A.derivatives(kind, z.detach(), ALPHA)[0], g)


def stack(n, k, d, dtype=torch.float64):
    return (3 * torch.randn(n, d, dtype=dtype), torch.randn(n, d, dtype=dtype), torch.randn(n, k, d, dtype=dtype),
            torch.randn(n, k, d, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", KINDS)
def test_triton_matches_reference_around_the_block(kind, dtype):
    needs_triton()
    # N * k * d = BLOCK - 1, BLOCK, BLOCK + 1 (BLOCK = 1024 elements per program)
    for n, k, d in [(31, 3, 11), (8, 4, 32), (5, 5, 41)]:
        z, gh, rz, rgh = stack(n, k, d)
        zl, ghl, rzl, rghl = (t.to(dtype) for t in (z, gh, rz, rgh))
        for got, plain, exact in [
            (A.rforward(kind, zl, rzl, ALPHA, backend="triton"), A.rforward_reference(kind, zl, rzl, ALPHA),
             A.rforward_reference(kind, z, rz, ALPHA)),
            (A.rbackward(kind, zl, ghl, rzl, rghl, ALPHA, backend="triton"),
             A.rbackward_reference(kind, zl, ghl, rzl, rghl, ALPHA),
             A.rbackward_reference(kind, z, gh, rz, rgh, ALPHA)),
            (A.rbackward(kind, zl, None, None, rghl, ALPHA, exact=False, backend="triton"),
             A.rbackward_reference(kind, zl, ghl, rzl, rghl, ALPHA, exact=False),
             A.rbackward_reference(kind, z, gh, rz, rgh, ALPHA, exact=False)),
        ]:
            assert got.dtype == dtype
            scale = exact.abs().max()
            err = ((got.double() - exact).abs().max() / scale).item()
            if dtype == torch.float64:
                assert err < 1e-12
            else:  # judged by the error of the plain float32 reference (never more than 2x it)
                err_plain = ((plain.double() - exact).abs().max() / scale).item()
                assert err <= 2 * err_plain + 1e-7


def test_activation_terms_paths_agree_and_work_in_place():
    needs_triton()
    z, gh, rz, rgh = stack(4, 3, 5)
    results = []
    for backend in ("torch", "triton"):
        t = A.ActivationTerms("gelu", z, ALPHA, exact=True, backend=backend)
        gz = t.input_grad(gh)
        fwd = t.rforward(rz)
        buf = rgh.clone()
        bwd = t.rbackward(buf, rz)
        assert bwd.data_ptr() == buf.data_ptr()
        results.append((gz, fwd, bwd))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(results[0][2], A.rbackward_reference("gelu", z, gh, rz, rgh, ALPHA))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter, on NaN
@pytest.mark.parametrize("kind", ["relu", "tanh", "silu"])
def test_nan_inf_and_empty(kind):
    needs_triton()
    z, gh, rz, rgh = stack(3, 2, 7)
    z[0, 0] = float("nan")
    z[2, 6] = float("inf")
    rz[1, 1, 3] = float("-inf")
    gh[1, 3] = float("nan")
    for got, want in [
        (A.rforward(kind, z, rz, backend="triton"), A.rforward_reference(kind, z, rz)),
        (A.rbackward(kind, z, gh, rz, rgh, backend="triton"), A.rbackward_reference(kind, z, gh, rz, rgh)),
    ]:
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13, equal_nan=True)
    ze, ge, re_, rge = stack(0, 2, 4)
    assert A.rforward(kind, ze, re_, backend="triton").shape == (0, 2, 4)
    assert A.rbackward(kind, ze, ge, re_, rge, backend="triton").shape == (0, 2, 4)


def test_bad_arguments():
    z, gh, rz, rgh = stack(3, 2, 4)
    with pytest.raises(ValueError, match="unknown activation"):
        A.rforward("elu", z, rz)
    with pytest.raises(ValueError, match=r"Rz must have shape \(N, k, d\)"):
        A.rforward("tanh", z, rz[:, :, :3])
    with pytest.raises(ValueError, match="Rgh"):
        A.rbackward("tanh", z, gh, rz, rgh[:2])
    with pytest.raises(ValueError, match="needs gh and Rz"):
        A.rbackward("tanh", z, None, None, rgh)
    with pytest.raises(ValueError, match="backend"):
        A.rforward("tanh", z, rz, backend="fast")
    # no C++ version of these ops: naming it is an error either way
    err = ValueError if _backend.backends()["cpp"] == "ok" else RuntimeError
    with pytest.raises(err, match="cpp"):
        A.rforward("tanh", z, rz, backend="cpp")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_triton_matches_reference(kind):
    for dtype, tol in [(torch.float64, 1e-11), (torch.float32, 5e-6)]:
        z, gh, rz, rgh = (t.cuda() for t in stack(257, 16, 129, dtype))
        got = A.rbackward(kind, z, gh, rz, rgh, ALPHA)  # auto: Triton on GPU
        want = A.rbackward_reference(kind, z, gh, rz, rgh, ALPHA)
        assert ((got - want).abs().max() / want.abs().max()).item() < tol
