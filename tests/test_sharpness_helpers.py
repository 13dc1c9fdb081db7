"""Small models shared by the sharpness tests (quadratics with closed-form answers, tiny MLPs)."""
from __future__ import annotations

import torch
from torch import nn


class SeparableQuadratic(nn.Module):
    """Output (per sample) ``sum_i a_i / 2 (theta_i - c_i)^2``; with ``mean_loss`` the loss is that value."""

    def __init__(self, n: int, seed: int = 0, at_minimum: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        c = torch.randn(n, generator=g, dtype=torch.float64)
        theta = c.clone() if at_minimum else torch.randn(n, generator=g, dtype=torch.float64)
        self.theta = nn.Parameter(theta)
        self.register_buffer("a", torch.rand(n, generator=g, dtype=torch.float64) * 2 + 0.1)
        self.register_buffer("c", c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (0.5 * self.a * (self.theta - self.c) ** 2).sum().expand(x.shape[0])


class Linear1(nn.Module):
    """Output (per sample) ``g . theta``: a linear loss whose maxima over norm balls are closed-form."""

    def __init__(self, n: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.theta = nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64))
        self.register_buffer("g", torch.randn(n, generator=g, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.g * self.theta).sum().expand(x.shape[0])


def mean_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return out.mean()


def dummy_data(rows: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(rows, 1, dtype=torch.float64), torch.zeros(rows, dtype=torch.float64)


def mlp(sizes=(6, 12, 12, 3), bn: bool = False, seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            if bn:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers).to(dtype)
    if bn:  # non-trivial running statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
    return model


def blobs(n: int = 60, dim: int = 6, classes: int = 3, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    centers = torch.randn(classes, dim, generator=g, dtype=dtype) * 2
    x = centers[y] + torch.randn(n, dim, generator=g, dtype=dtype)
    return x, y


def train_full_batch(model: nn.Module, data, steps: int = 150, lr: float = 0.2) -> nn.Module:
    """Full-batch gradient descent (plain loop: torch.optim's first import costs seconds)."""
    x, y = data
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    for _ in range(steps):
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * g)
    return model.eval()


def state(model: nn.Module):
    """Everything a measurement must leave alone: parameters, buffers, train/eval flags."""
    return ([t.detach().clone() for t in model.parameters()], [t.detach().clone() for t in model.buffers()],
            [m.training for m in model.modules()])


def assert_same_state(model: nn.Module, before) -> None:
    params, buffers, flags = state(model)
    assert all(torch.equal(a, b) for a, b in zip(params, before[0]))
    assert all(torch.equal(a, b) for a, b in zip(buffers, before[1]))
    assert flags == before[2]


def trained_classifier(samples: int = 200, hidden: int = 32) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """A float32 MLP 8 -> hidden -> hidden -> 4 trained full-batch (a large-batch minimiser) on
    ``samples`` blob points, and those points."""
    torch.manual_seed(0)
    data = blobs(samples, dim=8, classes=4, seed=5, dtype=torch.float32)
    model = mlp((8, hidden, hidden, 4), seed=5, dtype=torch.float32)
    return train_full_batch(model, data, steps=200), data
