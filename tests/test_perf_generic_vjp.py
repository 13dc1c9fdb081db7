"""The generic engine's products with several columns on a CPU (one backward per column through the
kept graph instead of one vmapped backward): every column equals a dense float64 reference built
independently by torch.autograd.functional, for the Hessian and the GGN of a small conv net."""
from __future__ import annotations

import torch
from torch import nn

import sharpkit as sk
from sharpkit.curvature import engines


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Unflatten(1, (1, 8)), nn.Conv1d(1, 2, 3, padding=1), nn.BatchNorm1d(2), nn.Tanh(),
        nn.MaxPool1d(2), nn.Flatten(), nn.Linear(8, 3),
    ).eval()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(12, 8, generator=g), torch.randint(0, 3, (12,), generator=g)


def _flat_call(model: nn.Module, theta: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    params, i = {}, 0
    for name, shape in zip(names, shapes):
        size = int(torch.Size(shape).numel())
        params[name] = theta[i:i + size].view(shape)
        i += size
    buffers = {n: b.double() if b.is_floating_point() else b for n, b in model.named_buffers()}
    return torch.func.functional_call(model, {**params, **buffers}, (X.double(),))


def _reference(kind: str) -> torch.Tensor:
    """Dense float64 Hessian or GGN (J^T H_logits J) of the mean cross-entropy."""
    model, (X, Y) = _model(), _data()
    model64 = _model().double().eval()
    theta = torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])
    if kind == "hessian":
        f = lambda t: nn.functional.cross_entropy(_flat_call(model64, t, X), Y)  # noqa: E731
        return torch.autograd.functional.hessian(f, theta)
    J = torch.autograd.functional.jacobian(lambda t: _flat_call(model64, t, X).reshape(-1), theta)
    z = _flat_call(model64, theta, X).detach()
    p = torch.softmax(z, 1)
    blocks = [(torch.diag(pi) - torch.outer(pi, pi)) / X.shape[0] for pi in p]
    return J.t() @ torch.block_diag(*blocks) @ J


def test_several_columns_match_float64_reference():
    model, data = _model(), _data()
    for kind, make in (("hessian", sk.hessian), ("ggn", sk.ggn)):
        ref = _reference(kind)
        op = make(model, nn.CrossEntropyLoss(), data, engine="generic")
        assert op.engine_info["engine"] == "generic"
        V = torch.randn(op.n, 5, generator=torch.Generator().manual_seed(2))
        for cols in (V[:, :1], V[:, :3], V):
            got = (op @ cols).double()
            want = ref @ cols.double()
            err = float((got - want).abs().max() / want.abs().max())
            assert err < 1e-5, (kind, cols.shape, err)


def test_looped_equals_batched_backward_and_unused_inputs_give_zeros():
    """The loop and autograd's batched backward agree column by column; an input the output does
    not depend on gets zero columns from the loop (allow_unused) as from the batched path."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, dtype=torch.float64, requires_grad=True)
    unused = torch.randn(4, dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        y = torch.tanh(x[:, None] * torch.randn(6, 5, dtype=torch.float64, generator=g)).sum(0)
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    W = torch.randn(6, 4, dtype=torch.float64, generator=g)
    looped = engines._batched_vjp(gx, x, W)  # (CPU: the loop)
    (batched,) = torch.autograd.grad(gx, x, W.t().contiguous(), retain_graph=True, is_grads_batched=True)
    torch.testing.assert_close(looped, batched.t(), rtol=1e-12, atol=1e-12)
    zeros = engines._batched_vjp(gx, unused, W)
    assert zeros.shape == (4, 4) and not zeros.any()
