"""Dinh et al.'s rescaling: the function is unchanged, and docs/invariance.md's table holds numerically."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev

import sharpkit as sk
from test_sharpness_helpers import assert_same_state, blobs, mlp, state, train_full_batch


@pytest.fixture(scope="module")
def trained():
    data = blobs(80, dim=6, classes=3, seed=8)
    model = train_full_batch(mlp((6, 12, 12, 3), bn=True, seed=8), data, steps=60, lr=0.1)
    return model, data


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("layer", [0, 1, -1])
def test_same_function_new_model(bn, layer):
    model = mlp((5, 7, 7, 7, 2), bn=bn, seed=1).eval()
    x = torch.randn(11, 5, dtype=torch.float64)
    before = state(model)
    for alpha in (0.1, 3.0, 25.0):
        new = sk.reparameterize_relu(model, alpha, layer=layer)
        assert new is not model
        assert_same_state(model, before)
        # Batch statistics (train mode) update the running buffers: compare under preserved().
        with sk.preserved(model), sk.preserved(new):
            for mode in (True, False):
                model.train(mode)
                new.train(mode)
                torch.testing.assert_close(new(x), model(x), rtol=1e-12, atol=1e-12)
        assert_same_state(model, before)
        xa, xb = sk.FlatParams(model).get(), sk.FlatParams(new).get()
        assert xa.shape == xb.shape and not torch.equal(xa, xb)


def test_layer_by_name_and_errors():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Dropout(0.1), nn.Linear(4, 2))
    new = sk.reparameterize_relu(model, 2.0, layer="1")
    assert torch.equal(new[0].weight, 2 * model[0].weight) and torch.equal(new[0].bias, 2 * model[0].bias)
    assert torch.equal(new[3].weight, model[3].weight / 2) and torch.equal(new[3].bias, model[3].bias)
    for alpha in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            sk.reparameterize_relu(model, alpha)
    with pytest.raises(ValueError, match="out of range"):
        sk.reparameterize_relu(model, 2.0, layer=1)
    with pytest.raises(ValueError, match="no nn.ReLU module named"):
        sk.reparameterize_relu(model, 2.0, layer="0")
    with pytest.raises(ValueError, match="no Linear/Conv layer follows"):
        sk.reparameterize_relu(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), 2.0)
    with pytest.raises(ValueError, match="not positively homogeneous"):
        sk.reparameterize_relu(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Tanh(), nn.Linear(4, 2)), 2.0)
    with pytest.raises(ValueError, match="must directly follow"):
        sk.reparameterize_relu(nn.Sequential(nn.Tanh(), nn.ReLU(), nn.Linear(4, 2)), 2.0)



class _TiedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.a, self.r, self.b, self.r2, self.c = nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)
        self.b.weight = self.a.weight  # tied

    def forward(self, x):
        return self.c(self.r2(self.b(self.r(self.a(x)))))


def test_shared_tensors_are_refused_and_shared_relus_are_followed():
    x = torch.randn(9, 8)
    # A layer registered at two places, or a weight tied to another layer's: scaling it scales every use
    # (the returned model differed from the original by 0.13-0.61 on these inputs).
    shared = nn.Linear(8, 8)
    twice = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), shared, nn.ReLU(), shared, nn.ReLU(), nn.Linear(8, 3))
    for model, layers in ((twice, (0, 1, 2)), (_TiedMLP(), (0, 1))):
        for layer in layers:
            with pytest.raises(ValueError, match="shared module or tied parameter"):
                sk.reparameterize_relu(model, 3.0, layer=layer)
    # One ReLU object at two places is run at each: both are rescalable (the second was "out of range").
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(8, 8), relu, nn.Linear(8, 8), relu, nn.Linear(8, 3))
    for layer, (scaled, divided) in ((0, (0, 2)), (1, (2, 4)), ("3", (2, 4))):
        new = sk.reparameterize_relu(model, 3.0, layer=layer)
        torch.testing.assert_close(new(x), model(x))
        assert torch.equal(new[scaled].weight, 3 * model[scaled].weight)
        assert torch.equal(new[divided].weight, model[divided].weight / 3)
    # alpha and layer as numpy scalars or one-element tensors, like the measures' arguments
    for alpha, layer in ((np.float32(3.0), np.int64(1)), (torch.tensor(3.0), 1)):
        new = sk.reparameterize_relu(model, alpha, layer=layer)
        assert torch.equal(new[2].weight, 3 * model[2].weight)


def _top_hessian_eigenvalue(model, data) -> float:
    """Explicit float64 Hessian of the mean loss in the flat parameters (the model is tiny)."""
    flat = sk.FlatParams(model)
    x, y = data

    def f(w):
        return nn.functional.cross_entropy(functional_call(model, flat.as_dict(w), (x,)), y)

    with sk.measurement_mode(model, "eval"):
        H = jacrev(grad(f))(flat.get())  # reverse-over-reverse: the cheapest explicit Hessian here
    return float(torch.linalg.eigvalsh(H)[-1])


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b))


# docs/invariance.md, one row per entry: name -> (measure(model, data), invariant?)
TABLE = {
    "adaptive worst linf": (lambda m, d: sk.adaptive_sharpness(m, nn.CrossEntropyLoss(), d, rho=0.05, max_iter=10).value, True),
    "adaptive worst l2": (lambda m, d: sk.adaptive_sharpness(m, nn.CrossEntropyLoss(), d, rho=0.05, norm="l2", max_iter=10).value, True),
    "adaptive average linf": (lambda m, d: sk.adaptive_sharpness(m, nn.CrossEntropyLoss(), d, rho=0.05, kind="average").value, True),
    "adaptive average l2": (lambda m, d: sk.adaptive_sharpness(m, nn.CrossEntropyLoss(), d, rho=0.05, norm="l2", kind="average").value, True),
    "adaptive m-sharpness": (lambda m, d: sk.adaptive_sharpness(m, nn.CrossEntropyLoss(), d, rho=0.05, m=32, max_iter=5).value, True),
    "standard worst linf": (lambda m, d: sk.adaptive_sharpness(m, nn.CrossEntropyLoss(), d, rho=0.05, adaptive=False, max_iter=10).value, False),
    "keskar lbfgsb": (lambda m, d: sk.keskar_sharpness(m, nn.CrossEntropyLoss(), d, epsilon=1e-2).value, False),
    "keskar apgd": (lambda m, d: sk.keskar_sharpness(m, nn.CrossEntropyLoss(), d, epsilon=1e-2, solver="apgd").value, False),
    "keskar subspace": (lambda m, d: sk.keskar_sharpness(m, nn.CrossEntropyLoss(), d, epsilon=1e-2, subspace_dim=10).value, False),
    "hessian top eigenvalue": (_top_hessian_eigenvalue, False),
}


@pytest.mark.parametrize("name", list(TABLE))
def test_invariance_table(trained, name):
    model, data = trained
    measure, invariant = TABLE[name]
    base = measure(model, data)
    assert base > 0
    for alpha in (0.1, 10.0):
        value = measure(sk.reparameterize_relu(model, alpha, layer=1), data)
        if invariant:
            assert _rel(value, base) < 1e-9, (alpha, value, base)
        else:
            assert _rel(value, base) > 0.05, (alpha, value, base)
