"""Independent float64 references for the curvature tests: explicit Hessian / GGN matrices of small
models, built directly with torch.func (no sharpkit code on the path)."""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

F64 = torch.float64


def mlp(bn: bool = True, d_in: int = 5, hidden: int = 6, classes: int = 3) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(d_in, hidden)]
    if bn:
        layers.append(nn.BatchNorm1d(hidden))
    layers += [nn.Tanh(), nn.Dropout(0.5), nn.Linear(hidden, classes)]
    return _randomize_bn(nn.Sequential(*layers))


class SmallCNN(nn.Module):
    """conv -> BN2d -> tanh -> flatten -> linear, on 1 x 5 x 5 images (not an nn.Sequential)."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2 * 3 * 3, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.bn(self.conv(x))).flatten(1))


def cnn() -> nn.Module:
    return _randomize_bn(SmallCNN())


def _randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    return model


def uneven_batches(model_kind: str, sizes=(10, 10, 3), classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (5,) if model_kind == "mlp" else (1, 5, 5)
    return [(torch.randn(s, *shape, generator=g), torch.randint(0, classes, (s,), generator=g)) for s in sizes]


def _flat_fn(model: nn.Module, bn: str):
    """(x0, call(x, inputs)) with BN normalising by batch statistics (bn="train") or running ones."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for p in model.parameters() if p.requires_grad]
    x0 = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad]).to(F64)
    buffers = {n: (b.detach().to(F64) if b.is_floating_point() else b.detach()) for n, b in model.named_buffers()}
    if bn == "train":  # batch statistics; no running-stat update (buffers omitted)
        buffers = {n: b for n, b in buffers.items() if "running" not in n and "num_batches" not in n}

    def call(x: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        tensors, off = dict(buffers), 0
        for n, s in zip(names, shapes):
            tensors[n] = x[off:off + s.numel()].view(s)
            off += s.numel()
        return functional_call(model, tensors, (inputs.to(F64),))

    return x0, call


class _Mode:
    """Dropout off; BatchNorm in the given mode, without running statistics for "train"."""

    def __init__(self, model: nn.Module, bn: str):
        self.model, self.bn = model, bn

    def __enter__(self):
        self.flags = [(m, m.training, getattr(m, "track_running_stats", None)) for m in self.model.modules()]
        self.model.eval()
        if self.bn == "train":
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train()
                    m.track_running_stats = False
                    # F.batch_norm reads running stats from the module when tracking is off only if
                    # they are None; keep them but make the module use batch statistics.
        return self

    def __exit__(self, *exc):
        for m, t, trs in self.flags:
            m.training = t
            if trs is not None:
                m.track_running_stats = trs


def explicit_hessian(model: nn.Module, loss_fn, batches, bn: str = "eval") -> torch.Tensor:
    """The float64 Hessian of sum_b n_b loss_b / N.  bn="eval": torch.func.hessian.  bn="train":
    column by column with plain double backward, because both torch.func.hessian and
    jacrev(jacrev) through training-mode batch_norm return a non-symmetric matrix that disagrees with
    finite differences in torch 2.13 (test_batch_norm_train_agrees_with_finite_differences checks
    the operator against finite differences independently)."""
    with _Mode(model, bn):
        x0, call = _flat_fn(model, bn)
        N = sum(xb.shape[0] for xb, _ in batches)

        def f(x):
            return sum(loss_fn(call(x, xb), _t(yb)) * xb.shape[0] for xb, yb in batches) / N

        if bn == "eval":
            H = hessian(f)(x0)
        else:
            xr = x0.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(f(xr), xr, create_graph=True)
            eye = torch.eye(x0.numel(), dtype=F64)
            H = torch.stack([torch.autograd.grad(g, xr, e, retain_graph=True)[0] for e in eye], 1)
    return H.detach()


def explicit_ggn(model: nn.Module, loss_fn, batches, bn: str = "eval") -> torch.Tensor:
    """The float64 GGN sum_b n_b J_b^T H_out,b J_b / N with explicit Jacobians."""
    with _Mode(model, bn):
        x0, call = _flat_fn(model, bn)
        N = sum(xb.shape[0] for xb, _ in batches)
        G = torch.zeros(x0.numel(), x0.numel(), dtype=F64)
        for xb, yb in batches:
            out = call(x0, xb).detach()
            J = jacrev(lambda x: call(x, xb))(x0).reshape(out.numel(), -1)
            HL = jacrev(jacrev(lambda o: loss_fn(o, _t(yb))))(out).reshape(out.numel(), out.numel())
            G += xb.shape[0] * J.t() @ HL @ J
    return G / N


def explicit_gradient(model: nn.Module, loss_fn, batches, bn: str, x: torch.Tensor) -> torch.Tensor:
    with _Mode(model, bn):
        _, call = _flat_fn(model, bn)
        N = sum(xb.shape[0] for xb, _ in batches)

        def f(p):
            return sum(loss_fn(call(p, xb), _t(yb)) * xb.shape[0] for xb, yb in batches) / N

        return jacrev(f)(x).detach()


def _t(y: torch.Tensor) -> torch.Tensor:
    return y.to(F64) if y.is_floating_point() else y


def snapshot(model: nn.Module):
    return (
        [p.detach().clone() for p in model.parameters()],
        [b.detach().clone() for b in model.buffers()],
        [m.training for m in model.modules()],
        [getattr(m, "track_running_stats", None) for m in model.modules()],
    )


def assert_unchanged(model: nn.Module, snap) -> None:
    params, buffers, flags, trs = snap
    for a, b in zip(model.parameters(), params):
        assert torch.equal(a.detach(), b)
    for a, b in zip(model.buffers(), buffers):
        assert torch.equal(a.detach(), b)
    assert [m.training for m in model.modules()] == flags
    assert [getattr(m, "track_running_stats", None) for m in model.modules()] == trs
