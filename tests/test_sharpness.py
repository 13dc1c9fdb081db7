"""ε-sharpness (Keskar et al.) and the ascent solvers, against closed forms and independent scipy runs."""
import math

import numpy as np
import pytest
import torch
from scipy.optimize import fmin_l_bfgs_b
from torch import nn
from torch.func import functional_call

import sharpkit as sk
from sharpkit.sharpness import solvers
from test_sharpness_helpers import (SeparableQuadratic, assert_same_state, blobs, dummy_data, mean_loss, mlp, state,
                                    train_full_batch, trained_classifier)

SOLVERS = ("lbfgsb", "pga", "apgd")


def quadratic_box_max(model: SeparableQuadratic, bound: torch.Tensor) -> tuple[float, float]:
    """(f(x), max over |y| <= bound of f(x + y)) for a convex separable quadratic: push every
    coordinate away from its minimiser to the face of the box."""
    d = (model.theta.detach() - model.c).abs()
    a = model.a
    return float((0.5 * a * d**2).sum()), float((0.5 * a * (d + bound) ** 2).sum())


@pytest.mark.parametrize("solver", SOLVERS)
def test_quadratic_closed_form_full_space(solver):
    model = SeparableQuadratic(40, seed=1)
    eps = 0.05
    f0, fmax = quadratic_box_max(model, eps * (model.theta.detach().abs() + 1))
    r = sk.keskar_sharpness(model, mean_loss, dummy_data(), epsilon=eps, solver=solver, max_iter=10)
    expected = 100 * (fmax - f0) / (1 + f0)
    assert r.loss == pytest.approx(f0, rel=1e-12)
    assert r.max_loss == pytest.approx(fmax, rel=1e-6)
    assert r.value == pytest.approx(expected, rel=1e-6)
    # The maximiser is the corner sign(x - c) * bound.
    corner = torch.sign(model.theta.detach() - model.c) * eps * (model.theta.detach().abs() + 1)
    assert torch.allclose(r.perturbation, corner, rtol=1e-5, atol=0)
    if solver == "lbfgsb":
        assert r.info["nit"] <= 10
    else:
        assert r.num_evals == 11


def test_lbfgsb_is_the_paper_protocol_against_independent_scipy():
    """An independent float64 L-BFGS-B (fmin_l_bfgs_b, maxiter=10, full-batch loss) agrees."""
    model = mlp((6, 10, 10, 3), seed=3)
    x_all, y_all = blobs(50, seed=3)
    train_full_batch(model, (x_all, y_all), steps=60)
    batches = [(x_all[i : i + 16], y_all[i : i + 16]) for i in range(0, 50, 16)]  # uneven last batch
    eps = 5e-3
    before = state(model)
    r = sk.keskar_sharpness(model, nn.CrossEntropyLoss(), batches, epsilon=eps, solver="lbfgsb", max_iter=10)
    assert_same_state(model, before)

    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    x0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()

    def f_and_g(y):
        w = (x0 + torch.from_numpy(y)).requires_grad_(True)
        tensors, off = {}, 0
        for name, shape in zip(names, shapes):
            k = math.prod(shape)
            tensors[name] = w[off : off + k].view(shape)
            off += k
        loss = nn.functional.cross_entropy(functional_call(model, tensors, (x_all,)), y_all)
        (g,) = torch.autograd.grad(loss, w)
        return -float(loss.detach()), -g.numpy()

    bound = (eps * (x0.abs() + 1)).numpy()
    y, fmin, info = fmin_l_bfgs_b(f_and_g, np.zeros_like(bound), bounds=list(zip(-bound, bound)), maxiter=10)
    f0 = -f_and_g(np.zeros_like(bound))[0]
    expected = 100 * (-fmin - f0) / (1 + f0)
    assert r.loss == pytest.approx(f0, rel=1e-12)
    assert r.value == pytest.approx(expected, rel=1e-6)
    assert r.info["nit"] == info["nit"]
    np.testing.assert_allclose(r.perturbation.numpy(), y, rtol=1e-5, atol=1e-9)
    assert r.num_evals == info["funcalls"]


@pytest.fixture(scope="module")
def trained_mlp():
    """A small MLP trained full-batch (a large-batch minimiser) and its data."""
    return trained_classifier(200, 32)


def test_apgd_reaches_lbfgsb_on_trained_mlp(trained_mlp):
    model, data = trained_mlp
    loss_fn = nn.CrossEntropyLoss()
    for eps in (1e-3, 5e-4):
        ref = sk.keskar_sharpness(model, loss_fn, data, epsilon=eps, solver="lbfgsb")
        fast = sk.keskar_sharpness(model, loss_fn, data, epsilon=eps, solver="apgd")
        assert ref.value > 0
        assert fast.value >= ref.value
        # The reported value is the loss at the reported perturbation.
        with torch.no_grad():
            w = sk.FlatParams(model).get() + fast.perturbation
            tensors = dict(zip(sk.FlatParams(model).names, sk.FlatParams(model).views(w)))
            f = float(loss_fn(functional_call(model, tensors, (data[0],)), data[1]))
        assert f == pytest.approx(fast.max_loss, rel=1e-5)
        assert float(((fast.perturbation.abs() - eps * (sk.FlatParams(model).get().abs() + 1)) > 1e-9).sum()) == 0


def test_gradient_first_step_against_a_sorted_reference():
    g = torch.Generator().manual_seed(4)
    B, d = 3, 1001
    G = torch.randn(B, d, generator=g, dtype=torch.float64)
    scale = torch.rand(B, d, generator=g, dtype=torch.float64) + 0.05
    G[1, 20:] = 0  # mostly zero: every non-zero coordinate belongs to the largest 3 %
    G[2] = 0  # no gradient: no move
    U = solvers._gradient_first_step(G, scale, torch.empty_like(G))
    for b in range(B):
        gu = (G[b] * scale[b]).numpy()
        k = math.ceil((1 - solvers.FIRST_STEP_EDGE_FRACTION) * d)  # the k-th smallest |gu| is the unit
        c = np.sort(np.abs(gu))[k - 1]
        expected = np.clip(gu / c, -1, 1) if c > 0 else np.sign(gu)
        np.testing.assert_allclose(U[b].numpy(), expected, rtol=1e-15, atol=0)
    assert int((U[0].abs() == 1).sum()) == d - k + 1  # 31 coordinates reach the edge
    assert bool((U[1, :20].abs() == 1).all()) and bool((U[1, 20:] == 0).all())
    assert bool((U[2] == 0).all())
    empty = torch.zeros(2, 0, dtype=torch.float64)
    assert solvers._gradient_first_step(empty, empty, torch.empty_like(empty)).shape == (2, 0)


@pytest.fixture(scope="module")
def mnist1d_f1_large_batch():
    """The benchmark's F1-style MLP (5 x 512, BN) trained 20 epochs at batch 400 on MNIST-1D."""
    from sharpkit.study.models import make_f1
    from sharpkit.study.train import TrainConfig, train

    data = sk.load_mnist1d()
    torch.manual_seed(0)
    model = make_f1((40,), 10)
    train(model, nn.CrossEntropyLoss(), data.train, TrainConfig(batch_size=400, max_epochs=20, patience=10), seed=0)
    return model.eval(), data.train


def test_apgd_reaches_lbfgsb_where_the_sign_corner_is_a_worse_local_maximum(mnist1d_f1_large_batch):
    """On this model the sign-corner first step climbs to a local maximum 15 % below L-BFGS-B's
    (3355 vs 3946 at the time of writing); the gradient first step and the two-start run reach it."""
    model, data = mnist1d_f1_large_batch
    loss_fn = nn.CrossEntropyLoss()
    ref = sk.keskar_sharpness(model, loss_fn, data, epsilon=1e-3, solver="lbfgsb")
    both = sk.keskar_sharpness(model, loss_fn, data, epsilon=1e-3, solver="apgd", restarts=2)
    assert both.info["starts"] == ["gradient", "sign"]
    assert both.num_evals == 1 + 10 + 10
    assert both.value >= ref.value
    first = [v for e, _, v in both.history if e == 11][0]  # the best value after the gradient-start run
    assert first >= ref.value


def test_two_starts_reach_lbfgsb_where_the_gradient_start_is_a_worse_local_maximum():
    """A narrower F1 (5 x 256) on 2000 MNIST-1D samples at ε = 5e-4: here the gradient first step
    ends below L-BFGS-B (244 vs 333 at the time of writing) and the sign start above it (367)."""
    from sharpkit.study.models import make_f1
    from sharpkit.study.train import TrainConfig, train

    data = sk.load_mnist1d()
    x, y = data.x_train[:2000], data.y_train[:2000]
    torch.manual_seed(0)
    model = make_f1((40,), 10, width=256)
    train(model, nn.CrossEntropyLoss(), (x, y), TrainConfig(batch_size=200, max_epochs=20, patience=10), seed=0)
    model.eval()
    ref = sk.keskar_sharpness(model, nn.CrossEntropyLoss(), (x, y), epsilon=5e-4, solver="lbfgsb")
    for solver in ("apgd", "pga"):
        both = sk.keskar_sharpness(model, nn.CrossEntropyLoss(), (x, y), epsilon=5e-4, solver=solver, restarts=2)
        # The same local maximum can be reached to different last digits in 10 iterations (with one
        # torch thread the model trains differently and all three land on 338.5): 1e-4 relative.
        assert both.value >= ref.value * (1 - 1e-4), (solver, both.value, ref.value)


@pytest.mark.parametrize("solver", SOLVERS)
def test_epsilon_monotone(trained_mlp, solver):
    model, data = trained_mlp
    values = [sk.keskar_sharpness(model, nn.CrossEntropyLoss(), data, epsilon=e, solver=solver, max_iter=5).value
              for e in (1e-4, 3e-4, 1e-3, 3e-3)]
    assert values[0] > 0
    assert all(b > a for a, b in zip(values, values[1:])), values


def test_subspace_against_materialized_matrix():
    model = mlp((5, 8, 3), seed=7)
    data = blobs(30, dim=5, seed=7)
    n, p, eps, seed = sk.FlatParams(model).n, 6, 1e-2, 11
    r = sk.keskar_sharpness(model, nn.CrossEntropyLoss(), data, epsilon=eps, subspace_dim=p, seed=seed,
                            solver="lbfgsb")
    A = sk.ops.GaussianSubspace(n, p, seed=seed, dtype=torch.float64).materialize()
    x0 = sk.FlatParams(model).get().double()
    center = torch.linalg.lstsq(A, x0.unsqueeze(1)).solution.squeeze(1)  # A⁺x independently
    bound = (eps * (center.abs() + 1)).numpy()
    names = [nm for nm, _ in model.named_parameters()]

    def f_and_g(z):
        zt = torch.from_numpy(z).requires_grad_(True)
        w = x0 + A @ zt
        tensors = dict(zip(names, sk.FlatParams(model).views(w)))
        loss = nn.functional.cross_entropy(functional_call(model, tensors, (data[0],)), data[1])
        (g,) = torch.autograd.grad(loss, zt)
        return -float(loss.detach()), -g.numpy()

    z, fmin, _ = fmin_l_bfgs_b(f_and_g, np.zeros(p), bounds=list(zip(-bound, bound)), maxiter=10)
    f0 = -f_and_g(np.zeros(p))[0]
    assert r.value == pytest.approx(100 * (-fmin - f0) / (1 + f0), rel=1e-6)
    np.testing.assert_allclose(r.coords.numpy(), z, rtol=1e-5, atol=1e-10)
    assert torch.allclose(r.perturbation, A @ r.coords, rtol=1e-10, atol=1e-12)
    assert r.subspace_dim == p and r.perturbation.shape == (n,)
    # First-order solvers stay in the same box and improve on the unperturbed loss.
    for solver in ("pga", "apgd"):
        s = sk.keskar_sharpness(model, nn.CrossEntropyLoss(), data, epsilon=eps, subspace_dim=p, seed=seed, solver=solver)
        assert s.value > 0 and bool((s.coords.abs() <= torch.from_numpy(bound) * (1 + 1e-12)).all())
    # The subspace center solves the normal equations.
    assert torch.allclose(sk.sharpness.subspace_center(sk.ops.GaussianSubspace(n, p, seed=seed), x0), center,
                          rtol=1e-8, atol=1e-12)


def test_model_left_as_found_train_mode_and_bn_train():
    model = mlp((6, 10, 10, 3), bn=True, seed=2)
    model.train()
    model[1].eval()  # a mixed set of flags must survive too
    data = blobs(40, seed=2)
    before = state(model)
    for solver in SOLVERS:
        for bn in ("eval", "train"):
            sk.keskar_sharpness(model, nn.CrossEntropyLoss(), data, epsilon=1e-3, solver=solver, bn=bn, max_iter=3)
            assert_same_state(model, before)
    sk.keskar_sharpness(model, nn.CrossEntropyLoss(), data, epsilon=1e-3, subspace_dim=4, solver="apgd", max_iter=2)
    assert_same_state(model, before)


def test_model_left_as_found_after_an_exception():
    model = mlp((6, 10, 3), bn=True, seed=4)
    x, y = blobs(20, seed=4)
    calls = {"n": 0}

    def flaky(out, target):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return nn.functional.cross_entropy(out, target)

    before = state(model)
    with pytest.raises(RuntimeError, match="boom"):
        sk.keskar_sharpness(model, flaky, (x, y), solver="apgd", bn="train")
    assert_same_state(model, before)
    x_nan = x.clone()
    x_nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="inputs hold NaN"):
        sk.keskar_sharpness(model, nn.CrossEntropyLoss(), (x_nan, y))

    def nan_loss(out, target):
        return nn.functional.cross_entropy(out, target) * float("nan")

    with pytest.raises(ValueError, match="loss at the unperturbed parameters is nan"):
        sk.keskar_sharpness(model, nan_loss, (x, y))
    assert_same_state(model, before)


def test_bad_inputs():
    model = mlp((4, 5, 2), seed=0)
    data = blobs(10, dim=4, classes=2)
    ce = nn.CrossEntropyLoss()
    n = sk.FlatParams(model).n
    for eps in (0, -1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="epsilon"):
            sk.keskar_sharpness(model, ce, data, epsilon=eps)
    with pytest.raises(ValueError, match="subspace_dim"):
        sk.keskar_sharpness(model, ce, data, subspace_dim=n + 1)
    with pytest.raises(ValueError, match="subspace_dim"):
        sk.keskar_sharpness(model, ce, data, subspace_dim=0)
    with pytest.raises(ValueError, match="solver"):
        sk.keskar_sharpness(model, ce, data, solver="adam")
    with pytest.raises(ValueError, match="max_iter"):
        sk.keskar_sharpness(model, ce, data, max_iter=0)
    with pytest.raises(ValueError, match="empty"):
        sk.keskar_sharpness(model, ce, (torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="empty"):
        sk.keskar_sharpness(model, ce, [])
    with pytest.raises(ValueError, match="bn"):
        sk.keskar_sharpness(model, ce, data, bn="frozen")
    with pytest.raises(ValueError, match="scalar"):
        sk.keskar_sharpness(model, lambda o, t: nn.functional.cross_entropy(o, t, reduction="none"), data)
    bad = mlp((4, 5, 2), seed=0)
    with torch.no_grad():
        bad[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sk.keskar_sharpness(bad, ce, data)


# ---- the batched solver contract -----------------------------------------------------------------


class QuadraticProblems:
    """B independent separable quadratics f_b(y) = sum a_b/2 (d_b + y)^2 (the solver protocol)."""

    def __init__(self, a, d):
        self.a, self.d = a, d
        self.num_problems, self.dim = a.shape
        self.calls = 0

    def loss_and_grad(self, Y):
        self.calls += 1
        r = self.d + Y
        return (0.5 * self.a * r**2).sum(1), self.a * r


@pytest.mark.parametrize("method", ["pga", "apgd"])
def test_batched_problems_equal_one_at_a_time(method):
    g = torch.Generator().manual_seed(0)
    B, d = 3, 25
    a = torch.rand(B, d, generator=g, dtype=torch.float64) + 0.1
    a[1, :10] *= -1  # problem 1 is indefinite: some coordinates have interior maxima
    off = torch.randn(B, d, generator=g, dtype=torch.float64)
    scale = torch.rand(B, d, generator=g, dtype=torch.float64) * 0.5
    scale[2, 3] = 0.0  # a coordinate that must not move
    fn = getattr(solvers, method)
    # One run per problem: every problem's state (step, momentum, checkpoints) is its own.
    together = fn(QuadraticProblems(a, off), scale, max_iter=12)
    for b in range(B):
        alone = fn(QuadraticProblems(a[b : b + 1], off[b : b + 1]), scale[b : b + 1], max_iter=12)
        assert torch.equal(alone.Y[0], together.Y[b])
        assert float(alone.max_loss[0]) == float(together.max_loss[b])
    assert together.Y[2, 3] == 0
    assert bool((together.Y.abs() <= scale * (1 + 1e-12)).all())
    assert bool((together.max_loss >= together.loss0).all())
    assert together.num_evals == 1 + 12
    restarted = fn(QuadraticProblems(a, off), scale, max_iter=12, restarts=3, seed=3)
    # y = 0 and 12 steps; 12 steps from y = 0 with the sign first step; a random start and 12 steps.
    assert restarted.num_evals == (1 + 12) + 12 + (1 + 12)
    assert restarted.info["starts"] == ["gradient", "sign", "random"]
    assert bool((restarted.max_loss >= together.max_loss).all())
    assert bool((restarted.Y.abs() <= scale * (1 + 1e-12)).all())
    # Convex problems 0 and 2 reach their corner maxima.
    for b in (0, 2):
        expected = float((0.5 * a[b] * (off[b].abs() + scale[b]) ** 2).sum())
        assert float(together.max_loss[b]) == pytest.approx(expected, rel=1e-9)


def test_l2_ball_solver_linear_closed_form():
    g = torch.Generator().manual_seed(1)
    B, d = 2, 30
    grad = torch.randn(B, d, generator=g, dtype=torch.float64)
    scale = torch.rand(B, d, generator=g, dtype=torch.float64) + 0.1

    class LinearProblems:
        num_problems, dim = B, d

        def loss_and_grad(self, Y):
            return (grad * Y).sum(1), grad.clone()

    for method in ("pga", "apgd"):
        r = getattr(solvers, method)(LinearProblems(), scale, norm="l2", max_iter=5)
        expected = (grad * scale).norm(dim=1)  # max of g.y over ||y / scale||_2 <= 1
        assert torch.allclose(r.max_loss, expected, rtol=1e-10)
        assert torch.allclose((r.Y / scale).norm(dim=1), torch.ones(B, dtype=torch.float64), rtol=1e-10)


def test_apgd_checkpoints_follow_the_recursion():
    # p: 0, .22, .41, .57, .70, .80, .87, .93, .99, 1.05 -> w_j = ceil(p_j * 100)
    assert solvers.apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert solvers.apgd_checkpoints(10) == [3, 5, 6, 7, 8, 9, 10]
    assert solvers.apgd_checkpoints(1) == [1]


def test_solver_contract_errors():
    a = torch.ones(1, 3, dtype=torch.float64)
    prob = QuadraticProblems(a, a.clone())
    with pytest.raises(ValueError, match="scale"):
        solvers.apgd(prob, torch.ones(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="scale"):
        solvers.apgd(prob, -torch.ones(1, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="norm"):
        solvers.pga(prob, torch.ones(1, 3, dtype=torch.float64), norm="l1")
    with pytest.raises(ValueError, match="one problem"):
        solvers.lbfgsb(QuadraticProblems(torch.ones(2, 3, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64)),
                       torch.ones(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="boxes only"):
        solvers.maximize(prob, torch.ones(1, 3, dtype=torch.float64), solver="lbfgsb", norm="l2")


@pytest.mark.parametrize("solver", ["lbfgsb", "apgd"])
def test_small_batches_from_a_dataloader_give_the_one_batch_value(solver):
    """The objective joins small batches into larger passes (same sums): same iterates and value."""
    model = mlp((6, 10, 10, 3), seed=4)
    x, y = blobs(90, seed=4)
    train_full_batch(model, (x, y), steps=40)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    one = sk.keskar_sharpness(model, nn.CrossEntropyLoss(), (x, y), epsilon=5e-3, solver=solver)
    small = sk.keskar_sharpness(model, nn.CrossEntropyLoss(), loader, epsilon=5e-3, solver=solver)
    assert small.value == pytest.approx(one.value, rel=1e-9)
    assert small.num_evals == one.num_evals
    torch.testing.assert_close(small.perturbation, one.perturbation, rtol=1e-8, atol=1e-12)
    adaptive_one = sk.adaptive_sharpness(model, nn.CrossEntropyLoss(), (x, y), rho=0.05)
    adaptive_small = sk.adaptive_sharpness(model, nn.CrossEntropyLoss(), loader, rho=0.05)
    assert adaptive_small.value == pytest.approx(adaptive_one.value, rel=1e-9)
