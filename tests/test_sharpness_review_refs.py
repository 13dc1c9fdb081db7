"""ε-sharpness and adaptive sharpness against independent float64 references written here.

The references use only torch.func.functional_call, numpy and scipy (never sharpkit's own
objective, box or solvers): closed forms where the maximum over the set is known exactly (a loss
affine in the parameters has it at a vertex of the box / on the ellipsoid's boundary), and
scipy's L-BFGS-B on −f over the paper's box for real little networks (BatchNorm in eval and
train mode, DataLoaders, frozen and tied parameters, dict outputs, ignored targets).
"""
from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import scipy.optimize
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import sharpkit as sk
from sharpkit.ops import GaussianSubspace

CE = nn.CrossEntropyLoss()
# Tiny models: extra intra-op threads only add contention.
pytestmark = pytest.mark.usefixtures("one_thread")


# ---- independent references --------------------------------------------------------------------


def trainable(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The distinct trainable parameters in named_parameters order (a tied tensor once)."""
    return [(k, p) for k, p in model.named_parameters() if p.requires_grad]


def reference_loss(model, batches, loss_fn, weights=None, train=False):
    """``(f, w0)``: f(w) the weighted mean of the batches' losses at flat trainable parameters w
    (float64; frozen parameters and buffers as they are, buffers never written)."""
    named = trainable(model)
    frozen = {k: p.detach().double() for k, p in model.named_parameters() if not p.requires_grad}
    buffers = {k: b.detach().clone().double() if b.is_floating_point() else b.clone() for k, b in model.named_buffers()}
    w0 = torch.cat([p.detach().flatten() for _, p in named]).double()
    weights = [float(len(b[1])) for b in batches] if weights is None else weights
    ref = copy.deepcopy(model).double().train(train)

    def f(w):
        tensors, i = dict(frozen), 0
        for k, p in named:
            tensors[k] = w[i : i + p.numel()].view(p.shape)
            i += p.numel()
        total = 0.0
        for (x, y), weight in zip(batches, weights):
            call = dict(tensors, **{k: v.clone() for k, v in buffers.items()})
            total = total + weight * loss_fn(functional_call(ref, call, (x.double(),)), y)
        return total / sum(weights)

    return f, w0


def scipy_keskar(f, w0, epsilon, A=None, max_iter=10):
    """Keskar et al.'s protocol by hand: scipy L-BFGS-B from y = 0 on −f(w0 + A y) over
    |y_i| <= ε(|(A⁺w0)_i| + 1) (A = I when None); returns (value, loss, max_loss)."""
    Anp = None if A is None else A.numpy()
    center = w0.numpy() if A is None else np.linalg.pinv(Anp) @ w0.numpy()
    bound = epsilon * (np.abs(center) + 1)

    def fg(y):
        z = torch.from_numpy(y).requires_grad_(True)
        loss = f(w0 + (z if A is None else A @ z))
        (g,) = torch.autograd.grad(loss, z)
        return -float(loss.detach()), -g.numpy()

    f0 = -fg(np.zeros_like(bound))[0]
    res = scipy.optimize.minimize(fg, np.zeros_like(bound), jac=True, method="L-BFGS-B",
                                  bounds=list(zip(-bound, bound)), options={"maxiter": max_iter})
    return 100 * (-res.fun - f0) / (1 + f0), f0, -res.fun


def blobs(n=48, dim=6, classes=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=dtype)
    return x, (x[:, :classes].argmax(1) + torch.randint(0, 2, (n,), generator=g)) % classes


def mlp(sizes=(6, 12, 3), bn=False, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes[:-2], sizes[1:-1]):
        layers += [nn.Linear(a, b)] + ([nn.BatchNorm1d(b)] if bn else []) + [nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(sizes[-2], sizes[-1])).to(dtype)
    if bn:  # running statistics that differ from any batch's
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm1d):
                    m.running_mean.uniform_(-0.3, 0.3)
                    m.running_var.uniform_(0.5, 2.0)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
    return model


class Affine(nn.Module):
    """One output per sample, affine in the parameters; with ``affine_loss`` the loss is affine too."""

    def __init__(self, dim=5):
        super().__init__()
        self.fc = nn.Linear(dim, 1).double()

    def forward(self, x):
        return self.fc(x).squeeze(-1)


def affine_loss(out, target):
    return (out - target).mean() + 3.0  # > 0 near the parameters (Keskar's value needs loss > −1)


def affine_case(n=40, dim=5, seed=0):
    torch.manual_seed(seed)
    model = Affine(dim)
    x = torch.randn(n, dim, dtype=torch.float64)
    w = torch.cat([p.detach().flatten() for p in model.parameters()]).numpy()
    g = np.concatenate([x.mean(0).numpy(), [1.0]])  # ∇f, constant
    with torch.no_grad():
        f0 = float(affine_loss(model(x), torch.zeros(n, dtype=torch.float64)))
    return model, (x, torch.zeros(n, dtype=torch.float64)), w, g, f0


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict(keep_vars=True).items()},
            [(p.requires_grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()],
            [m.training for m in model.modules()])


def same_state(model, snap) -> bool:
    state, params, flags = snapshot(model)
    return (all(torch.equal(snap[0][k], state[k]) for k in snap[0])
            and all(a[0] == b[0] and ((a[1] is None and b[1] is None) or torch.equal(a[1], b[1]))
                    for a, b in zip(snap[1], params))
            and snap[2] == flags)


# ---- the box and the value: closed forms ---------------------------------------------------------


@pytest.mark.parametrize("solver", ["lbfgsb", "pga", "apgd"])
@pytest.mark.parametrize("epsilon", [1e-3, 5e-4])
def test_affine_loss_full_space_maximum_is_the_box_vertex(solver, epsilon):
    model, data, w, g, f0 = affine_case()
    res = sk.keskar_sharpness(model, affine_loss, data, epsilon=epsilon, solver=solver)
    bound = epsilon * (np.abs(w) + 1)
    expected = 100 * float(np.abs(g) @ bound) / (1 + f0)
    assert res.loss == pytest.approx(f0, rel=1e-14)
    assert res.value == pytest.approx(expected, rel=1e-10)
    # The vertex itself: every coordinate at ±ε(|x_i| + 1), on the gradient's side.
    np.testing.assert_allclose(res.perturbation.numpy(), np.sign(g) * bound, rtol=1e-12, atol=0)


@pytest.mark.parametrize("solver", ["lbfgsb", "apgd"])
def test_affine_loss_subspace_box_uses_the_pseudo_inverse(solver):
    model, data, w, g, f0 = affine_case(dim=7)
    p = 3
    A = GaussianSubspace(w.size, p, seed=5, dtype=torch.float64).materialize().numpy()
    center = np.linalg.pinv(A) @ w  # A⁺x, numpy's SVD pseudo-inverse
    bound = 1e-3 * (np.abs(center) + 1)
    res = sk.keskar_sharpness(model, affine_loss, data, epsilon=1e-3, subspace_dim=p, seed=5, solver=solver)
    gz = A.T @ g
    assert res.value == pytest.approx(100 * float(np.abs(gz) @ bound) / (1 + f0), rel=1e-10)
    np.testing.assert_allclose(res.coords.numpy(), np.sign(gz) * bound, rtol=1e-10, atol=0)
    np.testing.assert_allclose(res.perturbation.numpy(), A @ res.coords.numpy(), rtol=1e-12, atol=1e-18)


@pytest.mark.parametrize("rho", [0.01, 0.04])
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("adaptive", [True, False])
def test_adaptive_worst_case_of_an_affine_loss_is_linear_in_rho(rho, norm, adaptive):
    model, data, w, g, f0 = affine_case()
    c = np.abs(w) if adaptive else np.ones_like(w)
    # max over ‖δ ⊘ c‖_p <= ρ of g·δ: ρ ‖g ⊙ c‖_1 (p = ∞), ρ ‖g ⊙ c‖_2 (p = 2).
    expected = rho * (np.abs(g * c).sum() if norm == "linf" else np.linalg.norm(g * c))
    res = sk.adaptive_sharpness(model, affine_loss, data, rho=rho, norm=norm, adaptive=adaptive)
    assert res.value == pytest.approx(expected, rel=1e-9)
    delta = res.perturbation.numpy()
    size = np.abs(delta / c).max() if norm == "linf" else np.linalg.norm(delta / c)
    assert size <= rho * (1 + 1e-12)


def test_m_sharpness_of_an_affine_loss_is_the_sample_weighted_mean_of_chunk_maxima():
    model, (x, t), w, _, _ = affine_case(n=50)
    rho, m = 0.02, 16  # chunks of 16, 16, 16 and 2
    res = sk.adaptive_sharpness(model, affine_loss, (x, t), rho=rho, m=m, num_examples=None)
    per_chunk, sizes = [], []
    for s in range(0, 50, m):
        g = np.concatenate([x[s : s + m].mean(0).numpy(), [1.0]])
        per_chunk.append(rho * np.abs(g * np.abs(w)).sum())
        sizes.append(len(x[s : s + m]))
    assert res.info["num_problems"] == 4
    assert res.value == pytest.approx(np.average(per_chunk, weights=sizes), rel=1e-9)


def test_average_case_of_a_quadratic_scales_with_rho_squared():
    # f(w) = ½ Σ h_i (w_i − a_i)² at its minimum w = a: E f(w + ρ c ⊙ ξ) − f(w) = ½ ρ² Σ h_i c_i² E ξ²
    # (E ξ² = 1/3 uniform, 1 Gaussian).  No linear term, so 200 draws over 400 coordinates estimate it
    # to about 1 %.
    class Quad(nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.w = nn.Parameter(torch.randn(400, generator=g, dtype=torch.float64))
            self.register_buffer("a", self.w.detach().clone())
            self.register_buffer("h", torch.rand(400, generator=g, dtype=torch.float64) + 0.5)

        def forward(self, x):
            return (0.5 * self.h * (self.w - self.a) ** 2).sum() + 1 + 0 * x.sum(1)

    model = Quad()
    data = (torch.zeros(4, 1, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))
    c2h = float((model.h * model.w.detach() ** 2).sum())
    loss = lambda out, t: out.mean()  # noqa: E731
    for norm, moment in (("linf", 1 / 3), ("l2", 1.0)):
        for rho in (0.05, 0.1):
            res = sk.adaptive_sharpness(model, loss, data, rho=rho, norm=norm, kind="average", max_iter=200)
            assert res.value == pytest.approx(0.5 * rho**2 * c2h * moment, rel=0.05)


# ---- real little networks against scipy ----------------------------------------------------------


@pytest.mark.parametrize("bn", ["eval", "train"])
def test_bn_mlp_from_a_dataloader_against_scipy(bn):
    model = mlp((6, 10, 10, 3), bn=True)
    x, y = blobs(60)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=25)  # 25, 25, 10
    batches = [(x[s : s + 25], y[s : s + 25]) for s in range(0, 60, 25)]
    f, w0 = reference_loss(model, batches, CE, train=bn == "train")
    for epsilon in (1e-3, 5e-4):
        value, f0, fmax = scipy_keskar(f, w0, epsilon)
        res = sk.keskar_sharpness(model, CE, loader, epsilon=epsilon, bn=bn)
        assert res.loss == pytest.approx(f0, rel=1e-12)
        assert res.value == pytest.approx(value, rel=1e-8)
        assert res.max_loss == pytest.approx(fmax, rel=1e-12)


def test_subspace_against_scipy_on_the_materialised_matrix():
    model = mlp((6, 12, 3))
    data = blobs(40)
    f, w0 = reference_loss(model, [data], CE)
    A = GaussianSubspace(w0.numel(), 20, seed=3, dtype=torch.float64).materialize()
    value, f0, _ = scipy_keskar(f, w0, 1e-3, A=A)
    res = sk.keskar_sharpness(model, CE, data, epsilon=1e-3, subspace_dim=20, seed=3)
    assert res.value == pytest.approx(value, rel=1e-8)
    assert float(f(w0 + res.perturbation)) == pytest.approx(res.max_loss, rel=1e-12)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = mlp((6, 12, 3))

    def forward(self, x):
        return {"logits": self.net(x), "aux": x.sum()}


def _frozen_mlp():
    model = mlp((6, 12, 3))
    model[0].weight.requires_grad_(False)
    return model


@pytest.mark.parametrize("case", ["frozen", "tied", "dict", "ignore_index"])
def test_realistic_models_against_scipy(case):
    x, y = blobs(48)
    loss_fn, weights = CE, None
    if case == "frozen":
        model = _frozen_mlp()
    elif case == "tied":
        torch.manual_seed(0)
        model = Tied().double()
    elif case == "dict":
        model, loss_fn = DictOut(), (lambda out, t: F.cross_entropy(out["logits"], t))
    else:
        model, y = mlp((6, 12, 3)), y.clone()
        y[:20] = -100  # unevenly over the batches: 16, 4, 0 ignored
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    batches = [(x[s : s + 16], y[s : s + 16]) for s in range(0, 48, 16)]
    if case == "ignore_index":
        weights = [float((b[1] != -100).sum()) for b in batches]
        batches, weights = zip(*[(b, wt) for b, wt in zip(batches, weights) if wt > 0])
    f, w0 = reference_loss(model, list(batches), loss_fn, weights=weights)
    value, f0, _ = scipy_keskar(f, w0, 1e-3)
    res = sk.keskar_sharpness(model, loss_fn, data, epsilon=1e-3)
    assert res.perturbation.numel() == w0.numel()  # frozen left out, a tied tensor once
    assert res.loss == pytest.approx(f0, rel=1e-12)
    assert res.value == pytest.approx(value, rel=1e-8)


def test_float32_model_and_float64_evaluation_against_the_float64_reference():
    model64 = mlp((6, 12, 3))
    data64 = blobs(48)
    f, w0 = reference_loss(model64, [data64], CE)
    value, _, _ = scipy_keskar(f, w0, 1e-3)
    model32 = copy.deepcopy(model64).float()
    data32 = (data64[0].float(), data64[1])
    in32 = sk.keskar_sharpness(model32, CE, data32, epsilon=1e-3)
    in64 = sk.keskar_sharpness(model32, CE, data32, epsilon=1e-3, dtype=torch.float64)
    # The float32 model's parameters are float64's rounded: the same value up to that rounding.
    assert in32.value == pytest.approx(value, rel=1e-4)
    assert in64.value == pytest.approx(scipy_keskar(*reference_loss(model32, [data32], CE), 1e-3)[0], rel=1e-9)
    assert next(model32.parameters()).dtype == torch.float32


@pytest.mark.parametrize("solver", ["pga", "apgd"])
@pytest.mark.parametrize("subspace_dim", [None, 15])
def test_first_order_max_loss_is_the_loss_at_the_reported_perturbation(solver, subspace_dim):
    model = mlp((6, 12, 3), bn=True)
    data = blobs(48)
    f, w0 = reference_loss(model, [data], CE)
    res = sk.keskar_sharpness(model, CE, data, epsilon=5e-4, solver=solver, subspace_dim=subspace_dim, restarts=3)
    assert float(f(w0 + res.perturbation)) == pytest.approx(res.max_loss, rel=1e-12)
    assert res.max_loss >= res.loss
    if subspace_dim is None:
        assert bool((res.perturbation.abs() <= 5e-4 * (w0.abs() + 1) * (1 + 1e-12)).all())


def test_bfloat16_steps_report_the_exact_float32_loss_of_their_point():
    model = mlp((6, 16, 3), dtype=torch.float32)
    x, y = blobs(64, dtype=torch.float32)
    res = sk.keskar_sharpness(model, CE, (x, y), solver="apgd", ascent_dtype="bfloat16")
    f, w0 = reference_loss(model, [(x, y)], CE)
    assert float(f(w0 + res.perturbation.double())) == pytest.approx(res.max_loss, rel=1e-5)
    assert res.max_loss >= res.loss


# ---- reparametrisation invariance (Dinh et al.; Kwon et al.) -----------------------------------


def _per_neuron_rescaled(model, seed=1):
    """(α_j θ₁ row j, θ₂ column j / α_j) at every hidden ReLU: the same function, α per neuron."""
    new = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    linears = [m for m in new if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for first, second in zip(linears[:-1], linears[1:]):
            alpha = torch.exp(1.5 * torch.randn(first.out_features, generator=g, dtype=torch.float64))
            first.weight.mul_(alpha[:, None])
            first.bias.mul_(alpha)
            second.weight.div_(alpha[None, :])
    return new


@pytest.mark.parametrize("kind", ["worst", "average"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_elementwise_adaptive_sharpness_is_invariant_to_per_neuron_rescaling(kind, norm):
    model = mlp((6, 12, 12, 3))
    data = blobs(48)
    other = _per_neuron_rescaled(model)
    with torch.no_grad():
        assert torch.allclose(model(data[0]), other(data[0]), rtol=0, atol=1e-12)
    a = sk.adaptive_sharpness(model, CE, data, rho=0.05, norm=norm, kind=kind).value
    b = sk.adaptive_sharpness(other, CE, data, rho=0.05, norm=norm, kind=kind).value
    assert a != 0 and b == pytest.approx(a, rel=1e-8)  # (an average can be negative away from a minimum)
    # Neither the standard measure nor Keskar's ε(|x|+1) box is invariant.
    if kind == "worst" and norm == "linf":
        s = [sk.adaptive_sharpness(m, CE, data, rho=0.01, adaptive=False).value for m in (model, other)]
        k = [sk.keskar_sharpness(m, CE, data).value for m in (model, other)]
        assert abs(s[1] / s[0] - 1) > 0.1 and abs(k[1] / k[0] - 1) > 0.1


def test_reparameterize_relu_through_batchnorm_and_pooling_keeps_the_function_and_adaptive_value():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU(), nn.MaxPool1d(2),
                          nn.Flatten(), nn.Linear(12, 3)).double().eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(30, 1, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (30,))
    other = sk.reparameterize_relu(model, 7.0)
    with torch.no_grad():
        assert torch.allclose(model(x), other(x), rtol=0, atol=1e-12)
    a = sk.adaptive_sharpness(model, CE, (x, y), rho=0.05).value
    b = sk.adaptive_sharpness(other, CE, (x, y), rho=0.05).value
    assert b == pytest.approx(a, rel=1e-8)


# ---- restoration and errors ----------------------------------------------------------------------


@pytest.mark.parametrize("measure", ["lbfgsb", "apgd", "subspace", "adaptive"])
def test_model_restored_exactly_after_an_exception_mid_ascent(measure):
    model = mlp((6, 10, 3), bn=True).train()
    x, y = blobs(40)
    model(x).sum().backward()  # the user's .grad must survive too
    before = snapshot(model)
    calls = {"n": 0}

    def failing(out, target):
        calls["n"] += 1
        if calls["n"] == 4:  # (two probe forwards, y = 0, then the first step)
            raise RuntimeError("failed on the 4th call")
        return F.cross_entropy(out, target)

    with pytest.raises(RuntimeError, match="4th"):
        if measure == "adaptive":
            sk.adaptive_sharpness(model, failing, (x, y), rho=0.05, bn="train")
        else:
            sk.keskar_sharpness(model, failing, (x, y), solver="apgd" if measure == "apgd" else "lbfgsb",
                                subspace_dim=10 if measure == "subspace" else None, bn="train")
    assert calls["n"] == 4
    assert same_state(model, before)
    sk.keskar_sharpness(model, CE, (x, y), bn="train")
    assert same_state(model, before)


def test_bad_inputs_are_named():
    model = mlp((6, 10, 3))
    x, y = blobs(20)
    n = sum(p.numel() for p in model.parameters())
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken[0].weight[0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        sk.keskar_sharpness(broken, CE, (x, y))
    with pytest.raises(ValueError, match="NaN"):
        sk.adaptive_sharpness(broken, CE, (x, y), rho=0.1, kind="average")
    for eps in (0.0, -1e-3, math.nan, math.inf):
        with pytest.raises(ValueError, match="epsilon"):
            sk.keskar_sharpness(model, CE, (x, y), epsilon=eps)
    with pytest.raises(ValueError, match="rho"):
        sk.adaptive_sharpness(model, CE, (x, y), rho=0.0)
    with pytest.raises(ValueError, match=f"subspace_dim.*n={n}"):
        sk.keskar_sharpness(model, CE, (x, y), subspace_dim=n + 1)
    for empty in ((x[:0], y[:0]), [], torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:0], y[:0]))):
        with pytest.raises(ValueError, match="empty"):
            sk.keskar_sharpness(model, CE, empty)


class Exploding(nn.Module):
    """A float32 regressor whose squared error overflows float32 once the weights grow 1e8-fold."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("solver", ["lbfgsb", "pga", "apgd"])
def test_a_loss_that_overflows_in_the_box_is_said_not_reported_as_flat(solver):
    # At ε = 1e8 every corner step's loss is inf in float32: the first-order solvers returned
    # sharpness 0.0 without a word (L-BFGS-B 123.9; measured in float64 all three give 2e55 to 3e55).
    model = Exploding()
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(32, 4, generator=g), torch.randn(32, 2, generator=g))
    with pytest.warns(RuntimeWarning, match="not finite") as caught:
        res = sk.keskar_sharpness(model, nn.MSELoss(), data, epsilon=1e8, solver=solver)
    assert caught[0].filename == __file__  # points at the caller
    assert res.info["nonfinite_evals"] >= 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a normal measurement stays silent
        ok = sk.keskar_sharpness(model, nn.MSELoss(), data, epsilon=1e-3, solver=solver)
    assert "nonfinite_evals" not in ok.info


def test_adaptive_worst_case_that_overflows_is_said():
    model = Exploding()
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(32, 4, generator=g), torch.randn(32, 2, generator=g))
    with pytest.warns(RuntimeWarning, match="not finite"):
        res = sk.adaptive_sharpness(model, nn.MSELoss(), data, rho=1e8)
    assert res.info["nonfinite_evals"] >= 1


def test_nonfinite_points_are_counted_per_problem():
    """Two problems stacked, the loss of the first infinite away from its start: the count says
    which problem met it."""
    from sharpkit.sharpness import solvers

    class TwoBowls:
        num_problems, dim, dtype = 2, 3, torch.float64

        def loss_and_grad(self, Y):
            f = (Y**2 + Y).sum(1)
            f[0] = torch.where(Y[0].abs().max() > 0.25, torch.tensor(math.inf, dtype=Y.dtype), f[0])
            return f, 2 * Y + 1

    with pytest.warns(RuntimeWarning, match="not finite"):
        res = solvers.maximize(TwoBowls(), torch.ones(2, 3, dtype=torch.float64), solver="apgd", max_iter=4)
    first, second = res.info["nonfinite_evals_per_problem"]
    assert first >= 1 and second == 0
    assert res.info["nonfinite_evals"] == first
    assert float(res.max_loss[1]) == pytest.approx(6.0)  # the finite bowl reaches its best corner
