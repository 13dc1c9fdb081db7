"""Curvature where softmax is within rounding of one-hot (well-fitted samples: logit margins of 20
in float32, 40 in float64).  The true products are then of the order of 1 - p_max, far below
eps * |R|: every path (the CE-HVP kernels, the loss gradient, the generic and fused engines, the
audit's batched engines) must keep their relative precision.  References: the product in
50-digit decimal arithmetic, and float64 where its rounding is far below the tolerance."""
from __future__ import annotations

import copy
import decimal
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, jvp

import sharpkit as sk
from sharpkit.audit.batched import SingleObjective, StackedObjective
from sharpkit.curvature.stable_loss import SaturationSafeCrossEntropy, curvature_loss
from sharpkit.data import as_batches
from sharpkit.kernels import _backend
from sharpkit.kernels.ce_hvp import CEHessian, ce_hvp, ce_hvp_reference
from sharpkit.objective import Objective, checked_loss
from sharpkit.params import FlatParams


def saturated_logits(n: int, c: int, margin: float, dtype=torch.float32, seed: int = 0):
    """Logits whose largest entry (at a random class) exceeds every other by at least ``margin``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g, dtype=torch.float64)
    top = torch.randint(0, c, (n,), generator=g)
    z[torch.arange(n), top] = z.max(1).values + margin
    return z.to(dtype), top


def decimal_product(z: torch.Tensor, r: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``s_i (diag p_i - p_i p_i^T) r_ij`` in 50-digit decimal arithmetic, as float64."""
    decimal.getcontext().prec = 50
    n, k, c = r.shape
    out = torch.empty(n, k, c, dtype=torch.float64)
    for i in range(n):
        zi = [decimal.Decimal(float(v)) for v in z[i]]
        e = [v.exp() for v in zi]
        total = sum(e)
        p = [v / total for v in e]
        for j in range(k):
            rj = [decimal.Decimal(float(v)) for v in r[i, j]]
            dot = sum(pc * rc for pc, rc in zip(p, rj))
            for col in range(c):
                out[i, j, col] = float(decimal.Decimal(float(s[i])) * p[col] * (rj[col] - dot))
    return out


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


def ce_backends() -> list[str]:
    names = ["torch"]
    if _backend.triton_reason() == "ok":
        names.append("triton")
    return names


@pytest.mark.parametrize("dtype, margin, tol", [(torch.float32, 20.0, 1e-5), (torch.float64, 40.0, 1e-12)])
@pytest.mark.parametrize("backend", ce_backends())
@pytest.mark.parametrize("block_c", [None, 4])
def test_ce_hvp_keeps_relative_precision_at_saturated_softmax(dtype, margin, tol, backend, block_c):
    if backend == "torch" and block_c is not None:
        pytest.skip("block_c is Triton's")
    z, _ = saturated_logits(6, 9, margin, dtype)
    r = torch.randn(6, 3, 9, dtype=dtype, generator=torch.Generator().manual_seed(1))
    s = torch.full((6,), 1 / 6, dtype=dtype)
    want = decimal_product(z, r, s)
    assert float(want.abs().max()) < 1e-6  # the products are tiny: margin 20 gives about 1e-9
    got = ce_hvp(z, r, s, backend=backend, block_c=block_c)
    assert relative_error(got, want) < tol
    in_place = r.clone()  # out aliasing R: the shift's entry is read before the row is written
    ce_hvp(z, in_place, s, backend=backend, out=in_place, block_c=block_c)
    assert relative_error(in_place, want) < tol
    if backend == "torch":
        assert relative_error(CEHessian(z, s, backend="torch").apply_(r.clone()), want) < tol


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "cupy", "triton"])
@pytest.mark.parametrize("dtype, margin, tol", [(torch.float32, 20.0, 1e-5), (torch.float64, 40.0, 1e-12)])
def test_gpu_ce_hvp_keeps_relative_precision_at_saturated_softmax(backend, dtype, margin, tol):
    if _backend.backends()[backend] != "ok":
        pytest.skip(_backend.backends()[backend])
    for n, k, c in [(5, 3, 9), (2, 2, 1000)]:  # 1000 classes: many column sweeps per warp
        z, _ = saturated_logits(n, c, margin, dtype)
        r = torch.randn(n, k, c, dtype=dtype, generator=torch.Generator().manual_seed(1))
        s = torch.full((n,), 1 / n, dtype=dtype)
        want = decimal_product(z, r, s)
        got = ce_hvp(z.cuda(), r.cuda(), s.cuda(), backend=backend).cpu()
        assert relative_error(got, want) < tol
        in_place = r.cuda()
        ce_hvp(z.cuda(), in_place, s.cuda(), backend=backend, out=in_place)
        assert relative_error(in_place.cpu(), want) < tol


def test_ce_hvp_reference_takes_a_given_ref_and_checks_it():
    z, top = saturated_logits(4, 5, 20.0, torch.float64)
    r = torch.randn(4, 2, 5, dtype=torch.float64)
    s = torch.ones(4, dtype=torch.float64)
    # Any reference column gives the same product up to rounding; the largest logit is the precise one.
    torch.testing.assert_close(ce_hvp_reference(z, r, s, ref=top), ce_hvp_reference(z, r, s), rtol=0, atol=0)
    other = (top + 1) % 5
    torch.testing.assert_close(ce_hvp_reference(z, r, s, ref=other), ce_hvp_reference(z, r, s), rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="ref must be an int64 tensor"):
        ce_hvp_reference(z, r, s, ref=top[:3])
    with pytest.raises(ValueError, match="ref must be an int64 tensor"):
        ce_hvp_reference(z, r, s, ref=top.int())


# ---- the loss in the form the engines differentiate ------------------------------------------------

LOSSES = {
    "module": lambda w: nn.CrossEntropyLoss(),
    "weighted": lambda w: nn.CrossEntropyLoss(weight=w),
    "weighted-ignore": lambda w: nn.CrossEntropyLoss(weight=w, ignore_index=2),
    "function": lambda w: F.cross_entropy,
    "partial-weighted-ignore": lambda w: functools.partial(F.cross_entropy, weight=w, ignore_index=2),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("spatial", [False, True])
def test_curvature_loss_has_the_value_and_derivatives_of_cross_entropy(name, spatial):
    g = torch.Generator().manual_seed(3)
    w = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    loss_fn = LOSSES[name](w)
    safe = curvature_loss(loss_fn)
    assert isinstance(safe, SaturationSafeCrossEntropy)
    shape = (6, 5, 3) if spatial else (6, 5)
    z = 3 * torch.randn(*shape, generator=g, dtype=torch.float64)
    t = torch.randint(0, 5, (6, 3) if spatial else (6,), generator=g)
    t.view(-1)[0] = 2 if name.endswith("weighted-ignore") else -100  # one ignored entry
    torch.testing.assert_close(safe(z, t), loss_fn(z, t), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(grad(lambda q: safe(q, t))(z), grad(lambda q: loss_fn(q, t))(z), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(hessian(lambda q: safe(q, t))(z), hessian(lambda q: loss_fn(q, t))(z),
                               rtol=1e-12, atol=1e-15)


def test_curvature_loss_keeps_the_gradient_precise_at_saturation():
    z, top = saturated_logits(32, 7, 20.0)
    safe = curvature_loss(nn.CrossEntropyLoss())
    want = grad(lambda q: F.cross_entropy(q, top))(z.double())  # float64: margin 20 is far from its limit
    r = torch.randn(32, 7)
    want_hv = jvp(grad(lambda q: F.cross_entropy(q, top)), (z.double(),), (r.double(),))[1]
    assert relative_error(grad(lambda q: safe(q, top))(z), want) < 1e-5
    assert relative_error(jvp(grad(lambda q: safe(q, top)), (z,), (r,))[1], want_hv) < 1e-5


class ScaledLoss(nn.CrossEntropyLoss):
    def forward(self, input, target):
        return 2 * super().forward(input, target)


def test_curvature_loss_leaves_other_losses_alone():
    smoothing = nn.CrossEntropyLoss(label_smoothing=0.1)
    assert curvature_loss(smoothing) is smoothing
    assert curvature_loss(F.mse_loss) is F.mse_loss
    scaled = ScaledLoss()
    assert curvature_loss(scaled) is scaled
    hooked = nn.CrossEntropyLoss()
    hooked.register_forward_hook(lambda m, i, o: o * 3)
    assert curvature_loss(hooked) is hooked
    replaced = nn.CrossEntropyLoss()
    replaced.forward = lambda input, target: F.cross_entropy(input, target) * 5
    assert curvature_loss(replaced) is replaced


def test_curvature_loss_hands_other_targets_to_the_loss_itself():
    safe = curvature_loss(nn.CrossEntropyLoss())
    z = torch.randn(4, 3, dtype=torch.float64)
    probs = torch.softmax(torch.randn(4, 3, dtype=torch.float64), 1)
    torch.testing.assert_close(safe(z, probs), F.cross_entropy(z, probs), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"class-index targets must lie in \[0, 3\).*holds 7"):
        checked_loss(safe, z, torch.tensor([0, 1, 7, 2]))


# ---- the engines ------------------------------------------------------------------------------------

def saturated_classifier(margin: float, n: int = 96):
    """An MLP, inputs, and the labels it predicts, every sample with a logit margin >= ``margin``."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4))
    x = torch.randn(8 * n, 6)
    with torch.no_grad():
        top2 = net(x).topk(2, 1).values
        gap = top2[:, 0] - top2[:, 1]
        x = x[gap > gap.median()][:n]
        z = net(x)
        top2 = z.topk(2, 1).values
        factor = margin / float((top2[:, 0] - top2[:, 1]).min())
        net[2].weight.mul_(factor)
        net[2].bias.mul_(factor)
        y = net(x).argmax(1)
    return net, x, y


def float64_hessian(net: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """The explicit Hessian (or GGN) of the mean cross-entropy in float64, by torch.func on F.cross_entropy."""
    net64 = copy.deepcopy(net).double()
    flat = FlatParams(net64)
    x64 = x.double()

    def out(p):
        return functional_call(net64, flat.as_dict(p), (x64,))

    p0 = flat.get().double()
    if kind == "hessian":
        return hessian(lambda p: F.cross_entropy(out(p), y))(p0)
    J = torch.func.jacrev(out)(p0).reshape(-1, p0.numel())
    H = hessian(lambda o: F.cross_entropy(o, y))(out(p0)).reshape(J.shape[0], J.shape[0])
    return J.T @ H @ J


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
@pytest.mark.parametrize("engine", ["generic", "fused"])
def test_engines_keep_relative_precision_on_a_saturated_float32_model(kind, engine):
    net, x, y = saturated_classifier(20.0)
    H64 = float64_hessian(net, x, y, kind)
    V = torch.randn(H64.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    want = H64 @ V
    assert float(want.norm()) < 1e-3  # tiny curvature, the regime of a well-fitted model
    op = getattr(sk, kind)(net, nn.CrossEntropyLoss(), (x, y), engine=engine)
    assert op.engine_info["engine"] == engine
    # Before the saturation-safe forms: 0.76 off for both engines (float32 rounding noise).
    assert relative_error(op.matmat(V.float()), want) < 1e-4


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_keyword_partial_of_cross_entropy_keeps_relative_precision(kind):
    """partial(F.cross_entropy, ...) is weighed as the module (Objective); the engines differentiate
    it in the saturation-safe form too (it was left as given: rounding noise at margin 20)."""
    net, x, y = saturated_classifier(20.0)
    H64 = float64_hessian(net, x, y, kind)
    V = torch.randn(H64.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    op = getattr(sk, kind)(net, functools.partial(F.cross_entropy, ignore_index=-1), (x, y), engine="generic")
    assert relative_error(op.matmat(V.float()), H64 @ V) < 1e-4


def test_audit_engines_keep_relative_precision_on_a_saturated_float32_model():
    net, x, y = saturated_classifier(20.0)
    want_H = float64_hessian(net, x, y, "hessian")
    flat = FlatParams(net)
    V = torch.randn(1, flat.n, generator=torch.Generator().manual_seed(4))
    want = (want_H @ V[0].double())
    loss_fn = nn.CrossEntropyLoss()
    batches = as_batches((x, y))
    X = flat.get().detach().unsqueeze(0)
    frozen = {}
    stacked = StackedObjective(net, loss_fn, batches, X, frozen)
    single = SingleObjective(Objective(net, loss_fn, (x, y)))
    assert relative_error(stacked.hvp(V)[0], want) < 1e-4
    assert relative_error(single.hvp(V)[0], want) < 1e-4
