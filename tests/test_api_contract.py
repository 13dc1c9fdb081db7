"""Regression tests for the public API contract in DESIGN.md ("Public API contract")."""
import pytest
import torch
from torch import nn
from torch.func import functional_call

import sharpkit as sk

F64 = torch.float64


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(11, 4, generator=g, dtype=F64)
    Y = torch.randint(0, 3, (11,), generator=g)
    return [(X[i:i + 4], Y[i:i + 4]) for i in range(0, 11, 4)]  # batches 4, 4, 3


def _explicit_ggn(model, loss_fn, data):
    """sum_b n_b J_b^T H_loss,b J_b / N in float64, from explicit Jacobians and loss Hessians."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    x0 = nn.utils.parameters_to_vector(model.parameters()).detach()

    def params(x):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            out[n] = x[i:i + s.numel()].view(s)
            i += s.numel()
        return out

    N = sum(len(y) for _, y in data)
    G = torch.zeros(x0.numel(), x0.numel(), dtype=F64)
    for xb, yb in data:
        def out_fn(x):
            return functional_call(model, params(x), (xb,))
        J = torch.autograd.functional.jacobian(out_fn, x0).reshape(-1, x0.numel())
        o = out_fn(x0).detach()
        HL = torch.autograd.functional.hessian(lambda z: loss_fn(z.view_as(o), yb), o.reshape(-1))
        G += len(yb) * J.T @ HL @ J
    return G / N


@pytest.mark.parametrize("engine", ["generic", "fused", "auto"])
def test_ggn_fourth_positional_argument_is_the_engine(engine):
    # The contract writes sk.ggn(model, loss_fn, data, engine="auto"): ggn(m, l, d, "generic") used to
    # be read as bn="generic" and refused.
    model, data, loss_fn = _mlp(), _data(), nn.CrossEntropyLoss()
    G = sk.ggn(model, loss_fn, data, engine)
    if engine != "auto":
        assert G.engine_info["engine"] == engine
    assert G.bn == "eval"
    V = torch.randn(G.shape[0], 3, dtype=F64)
    torch.testing.assert_close(G @ V, _explicit_ggn(model, loss_fn, data) @ V, rtol=1e-9, atol=1e-11)


def test_ggn_positional_bn_still_accepted():
    model, data, loss_fn = _mlp(), _data(), nn.CrossEntropyLoss()
    G = sk.ggn(model, loss_fn, data, "train", "generic")
    assert (G.bn, G.engine_info["engine"]) == ("train", "generic")


def test_ggn_engine_given_twice_is_refused():
    with pytest.raises(ValueError, match="names an engine"):
        sk.ggn(_mlp(), nn.CrossEntropyLoss(), _data(), "fused", "generic")
