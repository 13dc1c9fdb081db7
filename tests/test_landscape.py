import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import sharpkit as sk
from sharpkit.landscape import evaluate, random_direction, slice_1d, slice_2d


pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)


def _net(seed, bn=True):
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 7)] + ([nn.BatchNorm1d(7)] if bn else []) + [nn.ReLU(), nn.Dropout(0.3), nn.Linear(7, 3)]
    m = nn.Sequential(*layers).double()
    if bn:  # non-trivial running statistics
        m.train()
        with torch.no_grad():
            m(torch.randn(50, 5, dtype=torch.float64) * 2 + 1)
    return m


def _data(n=37):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}, [mod.training for mod in m.modules()]


def _direct(model_a, model_b, x, y, ca, cb, bn):
    """Independent float64 evaluation: build the interpolated network by hand."""
    m = copy.deepcopy(model_a)
    with torch.no_grad():
        for pm, pa, pb in zip(m.parameters(), model_a.parameters(), model_b.parameters()):
            pm.copy_(ca * pa + cb * pb)
    m.eval()
    if bn == "train":
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm1d):
                mod.train()
                mod.track_running_stats = False
                mod.running_mean = mod.running_var = None
    with torch.no_grad():
        out = m(x)
    return float(nn.functional.cross_entropy(out, y)), float((out.argmax(1) == y).double().mean())


@pytest.mark.parametrize("path", ["linear", "sin"])
@pytest.mark.parametrize("bn", ["train", "eval"])
def test_interpolate_matches_direct_evaluation(path, bn):
    a, b = _net(0), _net(1)
    if bn == "eval":  # (eval mode needs one set of running statistics: see the next test)
        b[1].load_state_dict({k: v for k, v in a[1].state_dict().items()})
    a.train()  # a flag that must survive
    x, y = _data()
    before_a, before_b = _state(a), _state(b)
    alphas = [-1.0, -0.25, 0.0, 0.5, 1.0, 1.75, 2.0]
    curve = sk.interpolate(a, b, nn.CrossEntropyLoss(), (x, y), alphas, path=path, bn=bn)
    assert isinstance(curve, sk.Curve)
    assert curve.loss.shape == curve.accuracy.shape == (len(alphas),)
    for i, al in enumerate(alphas):
        ca, cb = (1 - al, al) if path == "linear" else (math.cos(al * math.pi / 2), math.sin(al * math.pi / 2))
        loss, acc = _direct(a, b, x, y, ca, cb, bn)
        assert curve.loss[i] == pytest.approx(loss, rel=1e-12, abs=1e-12)
        assert curve.accuracy[i] == pytest.approx(acc)
    for m, (st, flags) in ((a, before_a), (b, before_b)):
        now, now_flags = _state(m)
        assert now_flags == flags
        assert all(torch.equal(now[k], st[k]) for k in st)


def test_interpolate_uneven_batches_are_sample_weighted():
    a, b = _net(0, bn=False), _net(1, bn=False)
    x, y = _data(37)
    whole = sk.interpolate(a, b, nn.CrossEntropyLoss(), (x, y), [0.3, 1.4])
    batched = sk.interpolate(a, b, nn.CrossEntropyLoss(), [(x[i : i + 10], y[i : i + 10]) for i in range(0, 37, 10)], [0.3, 1.4])
    np.testing.assert_allclose(batched.loss, whole.loss, rtol=1e-12)
    np.testing.assert_allclose(batched.accuracy, whole.accuracy)


def test_interpolate_end_points_equal_the_models():
    a, b = _net(0, bn=False), _net(1, bn=False)
    x, y = _data()
    c = sk.interpolate(a, b, nn.CrossEntropyLoss(), (x, y), [0.0, 1.0])
    assert c.loss[0] == pytest.approx(evaluate(a, nn.CrossEntropyLoss(), (x, y))[0], rel=1e-12)
    assert c.loss[1] == pytest.approx(evaluate(b, nn.CrossEntropyLoss(), (x, y))[0], rel=1e-12)


def test_interpolate_bad_input():
    a, x_y = _net(0), _data()
    b = _net(1)
    b[1].load_state_dict(a[1].state_dict())  # (one set of running statistics, as bn='eval' needs)
    other = nn.Sequential(nn.Linear(5, 3)).double()
    with pytest.raises(ValueError, match=r"same architecture \(only in model_a"):
        sk.interpolate(a, other, nn.CrossEntropyLoss(), x_y, [0.0])
    with pytest.raises(ValueError, match="path"):
        sk.interpolate(a, b, nn.CrossEntropyLoss(), x_y, [0.0], path="cubic")
    with pytest.raises(ValueError, match="empty"):
        sk.interpolate(a, b, nn.CrossEntropyLoss(), x_y, [])
    bad = _net(1)
    with torch.no_grad():
        bad[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sk.interpolate(a, bad, nn.CrossEntropyLoss(), x_y, [0.0])
    with pytest.raises(ValueError, match="empty"):
        sk.interpolate(a, b, nn.CrossEntropyLoss(), (x_y[0][:0], x_y[1][:0]), [0.0])
    with pytest.raises(ValueError, match="reduction='none'"):
        sk.interpolate(a, b, nn.CrossEntropyLoss(reduction="none"), x_y, [0.0])
    with pytest.raises(ValueError, match="scalar"):
        sk.interpolate(a, b, lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"), x_y, [0.0])


def test_random_direction_is_filter_normalised():
    m = _net(0)
    d = random_direction(m, seed=5)
    flat = sk.FlatParams(m)
    for blk, dv, wv in zip(flat.blocks, flat.views(d), flat.views(flat.get())):
        if dv.dim() <= 1:
            assert torch.count_nonzero(dv) == 0, blk.name
        else:
            torch.testing.assert_close(dv.norm(dim=1), wv.norm(dim=1), rtol=1e-10, atol=0)
    assert torch.equal(d, random_direction(m, seed=5))


def test_slices_at_origin_and_along_direction():
    m = _net(0, bn=False)
    x, y = _data()
    d = random_direction(m, seed=1)
    c = slice_1d(m, nn.CrossEntropyLoss(), (x, y), [0.0, 0.5], direction=d)
    assert c.loss[0] == pytest.approx(evaluate(m, nn.CrossEntropyLoss(), (x, y))[0], rel=1e-12)
    moved = copy.deepcopy(m)
    sk.FlatParams(moved).set_(sk.FlatParams(m).get() + 0.5 * d)
    assert c.loss[1] == pytest.approx(evaluate(moved, nn.CrossEntropyLoss(), (x, y))[0], rel=1e-12)
    s = slice_2d(m, nn.CrossEntropyLoss(), (x, y), [0.0, 0.5], [0.0], directions=(d, torch.zeros_like(d)))
    np.testing.assert_allclose(s.loss[:, 0], c.loss, rtol=1e-12)


def test_one_shot_generators_are_replayed_at_every_point():
    a, b = _net(0, bn=False), _net(1, bn=False)
    X, Y = torch.randn(23, 5, dtype=torch.float64), torch.randint(0, 3, (23,))
    ce = nn.CrossEntropyLoss()
    listed = [(X[i:i + 5], Y[i:i + 5]) for i in range(0, 23, 5)]
    ref = sk.interpolate(a, b, ce, listed, alphas=[0.0, 0.5, 1.0])
    gen = ((X[i:i + 5], Y[i:i + 5]) for i in range(0, 23, 5))
    assert np.allclose(sk.interpolate(a, b, ce, gen, alphas=[0.0, 0.5, 1.0]).loss, ref.loss, rtol=0, atol=1e-14)
    gen = ((X[i:i + 5], Y[i:i + 5]) for i in range(0, 23, 5))
    assert np.allclose(slice_1d(a, ce, gen, alphas=[-0.5, 0.0, 0.5]).loss,
                       slice_1d(a, ce, listed, alphas=[-0.5, 0.0, 0.5]).loss, rtol=0, atol=1e-14)


def test_interpolate_in_eval_mode_refuses_differing_running_statistics():
    """Under bn='eval' (the default) a path would use model_a's running statistics at every point,
    so its end at alpha = 1 would not be model_b: refused, naming the layer."""
    a, b = _net(0), _net(1)
    x, y = _data()
    assert not torch.equal(a[1].running_mean, b[1].running_mean)
    with pytest.raises(ValueError, match=r"running statistics.*differ in 1\b.*bn='train'"):
        sk.interpolate(a, b, nn.CrossEntropyLoss(), (x, y), [0.0, 1.0])
    b[1].running_var.add_(0.5)
    b[1].running_mean.copy_(a[1].running_mean)
    with pytest.raises(ValueError, match="differ in 1"):  # the variance alone differs
        sk.interpolate(a, b, nn.CrossEntropyLoss(), (x, y), [0.0, 1.0], bn="eval")
    b[1].running_var.copy_(a[1].running_var)
    curve = sk.interpolate(a, b, nn.CrossEntropyLoss(), (x, y), [0.0, 1.0])
    with torch.no_grad():  # the end points are the two models, each in eval mode
        for i, m in enumerate((a, b)):
            assert curve.loss[i] == pytest.approx(float(nn.functional.cross_entropy(m.eval()(x), y)), rel=1e-12)


def test_interpolation_moves_frozen_parameters_too():
    a, b = _net(0, bn=False), _net(1, bn=False)
    for m in (a, b):
        m[-1].bias.requires_grad_(False)
    X, Y = torch.randn(23, 5, dtype=torch.float64), torch.randint(0, 3, (23,))
    ce = nn.CrossEntropyLoss()
    curve = sk.interpolate(a, b, ce, (X, Y), alphas=[0.0, 1.0], bn="eval")
    with torch.no_grad():
        assert curve.loss[0] == pytest.approx(float(ce(a.eval()(X), Y)), rel=1e-12)
        assert curve.loss[1] == pytest.approx(float(ce(b.eval()(X), Y)), rel=1e-12)


def test_interpolation_names_mismatched_parameters():
    a = _net(0, bn=False)
    b = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3)).double()
    with pytest.raises(ValueError, match=r"shapes differ: 0.weight: \(7, 5\) vs \(8, 5\)"):
        sk.interpolate(a, b, nn.CrossEntropyLoss(), (torch.randn(4, 5, dtype=torch.float64), torch.zeros(4, dtype=torch.long)))


def _old_style_weight_norm_net(seed):
    import warnings

    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # (the older form, deprecated but in use)
        nn.utils.weight_norm(m[0])
    m(torch.randn(4, 5, dtype=torch.float64)).sum().backward()  # leaves m[0].weight a non-leaf
    return m


def test_landscape_of_old_style_weight_norm_models():
    """The older weight_norm keeps the weight it computes as a module attribute, a non-leaf tensor
    that copy.deepcopy refuses ('Only Tensors created explicitly by the user')."""
    a, b = _old_style_weight_norm_net(0), _old_style_weight_norm_net(1)
    x, y = _data()
    ce = nn.CrossEntropyLoss()
    curve = sk.interpolate(a, b, ce, (x, y), [0.0, 0.5, 1.0])
    with torch.no_grad():
        assert curve.loss[0] == pytest.approx(float(ce(a(x), y)), rel=1e-12)
        assert curve.loss[2] == pytest.approx(float(ce(b(x), y)), rel=1e-12)
        # An independent midpoint: weight_g and weight_v averaged, the weight w = g v / ||v|| per row.
        g, v = 0.5 * (a[0].weight_g + b[0].weight_g), 0.5 * (a[0].weight_v + b[0].weight_v)
        mid = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
        mid[0].weight.copy_(g * v / v.norm(dim=1, keepdim=True))
        mid[0].bias.copy_(0.5 * a[0].bias + 0.5 * b[0].bias)
        mid[2].weight.copy_(0.5 * a[2].weight + 0.5 * b[2].weight)
        mid[2].bias.copy_(0.5 * a[2].bias + 0.5 * b[2].bias)
        assert curve.loss[1] == pytest.approx(float(ce(mid(x), y)), rel=1e-12)
    surf = slice_1d(a, ce, (x, y), alphas=[0.0, 0.5])
    with torch.no_grad():
        assert surf.loss[0] == pytest.approx(float(ce(a(x), y)), rel=1e-12)


@pytest.mark.parametrize("fail_at", [None, 2])
def test_landscape_restores_tensors_the_models_hooks_write(fail_at):
    """The private copy runs the user's hook functions, which may write a tensor of the user's
    model held by closure: the user's model is restored, also when the loss raises midway."""
    a, b = _net(0, bn=False), _net(1, bn=False)
    def counting_hook(counter):
        def hook(module, args):
            counter.add_(1)
        return hook

    for m in (a, b):
        m.register_buffer("calls", torch.zeros((), dtype=torch.float64))
        m[0].register_forward_pre_hook(counting_hook(m.calls))
    calls = [0]

    def loss(out, y):
        calls[0] += 1
        if calls[0] == fail_at:
            raise RuntimeError("loss stopped")
        return nn.functional.cross_entropy(out, y)

    x, y = _data()
    for run in (lambda: sk.interpolate(a, b, loss, (x, y), [0.0, 0.5, 1.0]),
                lambda: slice_1d(a, loss, (x, y), alphas=[0.0, 0.5])):
        calls[0] = 0
        if fail_at is None:
            run()
        else:
            with pytest.raises(RuntimeError, match="loss stopped"):
                run()
        assert float(a.calls) == float(b.calls) == 0.0
