"""Landscape numbers against an independent float64 reference: a plain loop that writes the point's
parameters into a fresh copy of the network, runs every batch, and averages per-sample losses
(``reduction='none'``) and correct predictions over all the data at once.  Nothing of sharpkit's
is used for the reference except the seed's Gaussian draw of a random direction (reproduced with
torch's generator; the per-filter normalisation is recomputed here)."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F

import sharpkit as sk
from sharpkit.landscape import evaluate, random_direction, slice_1d, slice_2d

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)

ALPHAS = [-0.5, 0.0, 0.3, 1.0, 1.6]


def _bn_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3)).double()
    m.train()
    with torch.no_grad():  # non-trivial running statistics
        m(torch.randn(64, 5, dtype=torch.float64) * 1.5 + 0.7)
    return m.eval()


class _Tied(nn.Module):
    """A frozen input scale, a buffer used in the forward, and an output layer tied to the input one."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.enc = nn.Linear(5, 4, bias=False)
        self.mid = nn.Linear(4, 4)
        self.dec = nn.Linear(4, 5, bias=False)
        self.dec.weight = self.enc.weight  # tied: (4, 5) used as W and W^T
        self.head = nn.Linear(5, 3)
        self.scale = nn.Parameter(torch.rand(5) + 0.5, requires_grad=False)  # frozen
        self.register_buffer("shift", torch.randn(5))

    def forward(self, x):
        h = torch.tanh(self.enc(x * self.scale + self.shift))
        h = torch.tanh(self.mid(h))
        return self.head(F.linear(h, self.enc.weight.t()))


def _tied(seed: int) -> nn.Module:
    return _Tied(seed).double()


def _data(n: int = 37, seed: int = 3, ignore_every: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    if ignore_every:
        y[::ignore_every] = -100
    return x, y


def _batches(x, y, size: int = 10):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, x.shape[0], size)]


def _reference(net: nn.Module, point: dict[str, torch.Tensor], batches, bn: str,
               ignore_index: int = -100) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over all samples of ``batches`` (targets equal to
    ``ignore_index`` left out of both), with ``net``'s named tensors replaced by ``point``."""
    m = copy.deepcopy(net).double()
    with torch.no_grad():
        own = dict(m.named_parameters())
        for name, value in point.items():
            own[name].copy_(value)
    m.eval()
    if bn == "train":
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm1d):
                mod.train()
    losses, correct, kept = [], 0, 0
    with torch.no_grad():
        for xb, yb in batches:
            out = m(xb.double())
            keep = yb != ignore_index
            losses.append(F.cross_entropy(out, yb, reduction="none", ignore_index=ignore_index)[keep])
            correct += int(((out.argmax(1) == yb) & keep).sum())
            kept += int(keep.sum())
    return float(torch.cat(losses).sum() / kept), correct / kept


def _trainable(net: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in net.named_parameters() if p.requires_grad]


def _filter_normalised(net: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Li et al. 2018: a Gaussian direction, each filter (row of a weight, output channel of a
    conv) rescaled to the norm of the weight's filter; 1-D parameters (biases, BN) zeroed."""
    named = _trainable(net)
    n = sum(p.numel() for _, p in named)
    g = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out, offset = {}, 0
    for name, p in named:
        d = g[offset:offset + p.numel()].view(p.shape).clone()
        offset += p.numel()
        if p.dim() <= 1:
            d.zero_()
        else:
            for i in range(p.shape[0]):
                d[i] *= p[i].detach().double().norm() / d[i].norm()
        out[name] = d
    return out


def _check(got: float, want: float, tol: float, worst: list) -> None:
    worst.append(abs(got - want))
    assert abs(got - want) <= tol * max(1.0, abs(want)), (got, want)


@pytest.mark.parametrize("bn", ["eval", "train"])
@pytest.mark.parametrize("path", ["linear", "sin"])
def test_interpolation_matches_the_reference_on_uneven_batches_and_a_dataloader(bn, path):
    a, b = _bn_net(0), _bn_net(1)
    if bn == "eval":  # (one set of running statistics, as bn='eval' needs)
        b[1].load_state_dict(a[1].state_dict())
    x, y = _data()
    batches = _batches(x, y, 10)  # 10, 10, 10, 7
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)  # ..., 5
    worst: list[float] = []
    for data, ref_batches in ((batches, batches), (loader, _batches(x, y, 8))):
        curve = sk.interpolate(a, b, nn.CrossEntropyLoss(), data, ALPHAS, path=path, bn=bn)
        for i, al in enumerate(ALPHAS):
            ca, cb = (1 - al, al) if path == "linear" else (math.cos(al * math.pi / 2), math.sin(al * math.pi / 2))
            point = {n: ca * pa.detach() + cb * pb.detach()
                     for (n, pa), pb in zip(a.named_parameters(), b.parameters())}
            loss, acc = _reference(a, point, ref_batches, bn)
            _check(curve.loss[i], loss, 1e-12, worst)
            _check(curve.accuracy[i], acc, 0, worst)
    assert max(worst) < 1e-12


def test_interpolation_with_tied_frozen_parameters_and_buffers():
    """Every floating parameter moves (the tied one once, the frozen one too); buffers come from
    model_a."""
    a, b = _tied(0), _tied(1)
    with torch.no_grad():
        b.shift.mul_(3.0)  # a buffer of model_b's that the path must not use
    x, y = _data(29)
    curve = sk.interpolate(a, b, nn.CrossEntropyLoss(), _batches(x, y, 8), ALPHAS)
    for i, al in enumerate(ALPHAS):
        point = {n: (1 - al) * pa.detach() + al * pb.detach()
                 for (n, pa), pb in zip(a.named_parameters(), b.parameters())}
        assert "scale" in point and "dec.weight" not in point  # (named_parameters lists a tied tensor once)
        loss, acc = _reference(a, point, _batches(x, y, 8), "eval")
        assert curve.loss[i] == pytest.approx(loss, rel=1e-12, abs=1e-12)
        assert curve.accuracy[i] == acc


def test_interpolation_leaves_ignored_targets_out_of_loss_and_accuracy():
    a, b = _bn_net(0), _bn_net(1)
    b[1].load_state_dict(a[1].state_dict())
    x, y = _data(41, ignore_every=3)
    data = _batches(x, y, 9)  # batches with different counts of ignored targets: weighted by the kept ones
    curve = sk.interpolate(a, b, nn.CrossEntropyLoss(), data, ALPHAS)
    for i, al in enumerate(ALPHAS):
        point = {n: (1 - al) * pa.detach() + al * pb.detach()
                 for (n, pa), pb in zip(a.named_parameters(), b.parameters())}
        loss, acc = _reference(a, point, data, "eval")
        assert curve.loss[i] == pytest.approx(loss, rel=1e-12, abs=1e-12)
        assert curve.accuracy[i] == pytest.approx(acc, abs=1e-15)


@pytest.mark.parametrize("bn", ["eval", "train"])
def test_slices_along_filter_normalised_directions_match_the_reference(bn):
    m = _bn_net(2)
    x, y = _data(33, ignore_every=5)
    data = _batches(x, y, 10)
    d1, d2 = _filter_normalised(m, 4), _filter_normalised(m, 5)
    flat = sk.FlatParams(m)
    torch.testing.assert_close(random_direction(m, seed=4), torch.cat([v.reshape(-1) for v in d1.values()]),
                               rtol=1e-13, atol=0)
    betas = [-0.4, 0.7]
    surf = slice_2d(m, nn.CrossEntropyLoss(), data, ALPHAS, betas, seed=4, bn=bn)
    line = slice_1d(m, nn.CrossEntropyLoss(), data, ALPHAS, seed=4, bn=bn)
    centre = dict(_trainable(m))
    for i, al in enumerate(ALPHAS):
        for j, be in enumerate(betas):
            point = {n: centre[n].detach() + al * d1[n] + be * d2[n] for n in centre}
            loss, acc = _reference(m, point, data, bn)
            assert surf.loss[i, j] == pytest.approx(loss, rel=1e-12, abs=1e-12)
            assert surf.accuracy[i, j] == pytest.approx(acc, abs=1e-15)
        loss, acc = _reference(m, {n: centre[n].detach() + al * d1[n] for n in centre}, data, bn)
        assert line.loss[i] == pytest.approx(loss, rel=1e-12, abs=1e-12)
        assert line.accuracy[i] == pytest.approx(acc, abs=1e-15)
    assert flat.n == sum(p.numel() for _, p in _trainable(m))


def test_filter_normalisation_of_conv_filters_and_tied_or_frozen_parameters():
    """Conv weights are normalised per output channel; a tied weight is one block; a frozen
    parameter is no coordinate of the direction and does not move along a slice."""
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).double()
    d = random_direction(conv, seed=7)
    ref = _filter_normalised(conv, 7)
    torch.testing.assert_close(d, torch.cat([v.reshape(-1) for v in ref.values()]), rtol=1e-13, atol=0)
    for i in range(3):
        got = d[: 3 * 2 * 9].view(3, 2, 3, 3)[i].norm()
        assert float(got) == pytest.approx(float(conv[0].weight[i].detach().norm()), rel=1e-12)

    m = _tied(3)
    x, y = _data(21)
    dirs = _filter_normalised(m, 9)
    curve = slice_1d(m, nn.CrossEntropyLoss(), (x, y), ALPHAS, seed=9)
    centre = dict(_trainable(m))
    assert "scale" not in centre
    for i, al in enumerate(ALPHAS):
        loss, acc = _reference(m, {n: centre[n].detach() + al * dirs[n] for n in centre}, [(x, y)], "eval")
        assert curve.loss[i] == pytest.approx(loss, rel=1e-12, abs=1e-12)
        assert curve.accuracy[i] == acc


def test_evaluate_matches_the_reference_for_a_frozen_checkpoint_and_a_dataloader():
    m = _bn_net(4).requires_grad_(False)  # (an inference checkpoint: nothing trainable)
    x, y = _data(30, ignore_every=4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7)
    for bn in ("eval", "train"):
        loss, acc = evaluate(m, nn.CrossEntropyLoss(), loader, bn=bn)
        want = _reference(m, {}, _batches(x, y, 7), bn)
        assert loss == pytest.approx(want[0], rel=1e-12) and acc == pytest.approx(want[1], abs=1e-15)
    assert not any(p.requires_grad for p in m.parameters())


def test_bn_train_refuses_a_dataloader_that_reshuffles():
    """With batch statistics a shuffled DataLoader groups other samples at every point: each point
    of the curve would be measured on other batches (a noisy curve); refused, as every measurement
    through the objective does."""
    a, b = _bn_net(0), _bn_net(1)
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True)
    with pytest.raises(ValueError, match="random order on every pass"):
        sk.interpolate(a, b, nn.CrossEntropyLoss(), loader, [0.0, 0.5], bn="train")
    # With running statistics the batches' grouping does not change the loss (to rounding).
    b[1].load_state_dict(a[1].state_dict())
    shuffled = sk.interpolate(a, b, nn.CrossEntropyLoss(), loader, [0.0, 0.5], bn="eval")
    fixed = sk.interpolate(a, b, nn.CrossEntropyLoss(), (x, y), [0.0, 0.5], bn="eval")
    np.testing.assert_allclose(shuffled.loss, fixed.loss, rtol=1e-13)


def test_a_summed_loss_is_refused_when_the_first_batch_holds_one_sample():
    """The reduction is checked on the first batch that can show it (2 samples or more), not only on
    the first batch: a loss summing over the samples gives every point a wrong value."""
    m = _bn_net(0)
    x, y = _data(20)
    data = [(x[:1], y[:1]), (x[1:], y[1:])]
    summed = lambda out, t: F.cross_entropy(out, t, reduction="sum")  # noqa: E731
    for run in (lambda: evaluate(m, summed, data), lambda: slice_1d(m, summed, data, [0.0, 0.5]),
                lambda: sk.interpolate(m, m, summed, data, [0.0, 0.5])):
        with pytest.raises(ValueError, match="sums over the samples"):
            run()
