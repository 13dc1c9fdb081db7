"""Bad inputs to the landscape functions give a clear error (never a silent NaN or empty curve), and
an undefined accuracy is NaN, not a number."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import sharpkit as sk
from sharpkit import landscape
from sharpkit.landscape import evaluate, random_direction, slice_1d, slice_2d


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).double()


def _data(n=23):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


CE = nn.CrossEntropyLoss()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_are_refused_naming_the_batch(bad):
    x, y = _data()
    x[17, 2] = bad
    batches = [(x[i:i + 10], y[i:i + 10]) for i in range(0, 23, 10)]
    what = "NaN" if bad != bad else "inf"
    with pytest.raises(ValueError, match=rf"inputs hold {what} \(batch 1"):
        evaluate(_net(), CE, batches)
    with pytest.raises(ValueError, match=rf"inputs hold {what}"):
        sk.interpolate(_net(0), _net(1), CE, batches, [0.0, 1.0])
    with pytest.raises(ValueError, match=rf"inputs hold {what}"):
        slice_1d(_net(), CE, batches, [0.0, 1.0])


def test_accuracy_of_nan_outputs_is_nan_not_a_number():
    # A model whose outputs are NaN on some samples (a NaN-producing op, not NaN weights).
    class HalfNaN(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3).double()

        def forward(self, x):
            out = self.lin(x)
            return torch.where(x[:, :1] > 0, out, torch.full_like(out, float("nan")))

    x, y = _data()
    loss, acc = evaluate(HalfNaN(), CE, (x, y))
    assert np.isnan(loss) and np.isnan(acc)


def test_a_diverged_model_has_nan_loss_and_nan_accuracy():
    # (evaluate tracks training, where a diverged run is a result to record, not an error.)
    m = _net()
    with torch.no_grad():
        m[0].weight[1, 1] = float("nan")
    loss, acc = evaluate(m, CE, _data())
    assert np.isnan(loss) and np.isnan(acc)


@pytest.mark.parametrize("alphas, said", [
    ([], "alphas is empty"),
    ([0.0, float("nan")], "alphas must be finite"),
    ([float("inf")], "alphas must be finite"),
])
def test_slice_alphas_must_be_finite_and_not_empty(alphas, said):
    m, xy = _net(), _data()
    with pytest.raises(ValueError, match=said):
        slice_1d(m, CE, xy, alphas)
    with pytest.raises(ValueError, match=said):
        slice_2d(m, CE, xy, alphas, [0.0])
    with pytest.raises(ValueError, match=said.replace("alphas", "betas")):
        slice_2d(m, CE, xy, [0.0], alphas)


def test_slice_takes_nested_coordinates_as_a_flat_list():
    m, xy = _net(), _data()
    d = random_direction(m, seed=2)
    flat = slice_1d(m, CE, xy, [0.0, 0.5], direction=d)
    nested = slice_1d(m, CE, xy, [[0.0, 0.5]], direction=d)
    np.testing.assert_array_equal(nested.alphas, [0.0, 0.5])
    np.testing.assert_array_equal(nested.loss, flat.loss)


def test_directions_are_checked():
    m, xy = _net(), _data()
    d = random_direction(m, seed=1)
    bad = d.clone()
    bad[4] = float("nan")
    with pytest.raises(ValueError, match="direction holds NaN"):
        slice_1d(m, CE, xy, [0.0, 0.5], direction=bad)
    with pytest.raises(ValueError, match="second direction holds NaN"):
        slice_2d(m, CE, xy, [0.0], [0.0], directions=(d, bad))
    with pytest.raises(ValueError, match=rf"must have shape \({d.numel()},\) .*got \({d.numel() - 1},\)"):
        slice_1d(m, CE, xy, [0.0], direction=d[:-1])
    with pytest.raises(ValueError, match="directions must be a pair"):
        slice_2d(m, CE, xy, [0.0], [0.0], directions=(d, d, d))
    # Array-likes are taken as tensors (the same curve), not an AttributeError.
    ref = slice_1d(m, CE, xy, [0.0, 0.5], direction=d)
    np.testing.assert_array_equal(slice_1d(m, CE, xy, [0.0, 0.5], direction=d.numpy()).loss, ref.loss)
    np.testing.assert_array_equal(slice_1d(m, CE, xy, [0.0, 0.5], direction=d.tolist()).loss, ref.loss)


def test_interpolate_on_a_device_spelled_differently_copies_the_model_once(monkeypatch):
    # "cpu:0" is the CPU the parameters are on: no copy of the model per point.
    copies = []
    real = landscape.private_copy

    def counting(model):
        copies.append(type(model).__name__)
        return real(model)

    monkeypatch.setattr(landscape, "private_copy", counting)
    a, b = _net(0), _net(1)
    xy = _data()
    curve = sk.interpolate(a, b, CE, xy, [0.0, 0.5, 1.0], device="cpu:0")
    assert len(copies) == 1, copies
    ref = sk.interpolate(a, b, CE, xy, [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(curve.loss, ref.loss)


def test_models_returning_a_dict_have_a_loss_and_no_accuracy():
    # keskar_sharpness accepts such models (the loss reads the dict): the curves must too.
    class DictOut(nn.Module):
        def __init__(self, seed):
            super().__init__()
            torch.manual_seed(seed)
            self.lin = nn.Linear(5, 3).double()

        def forward(self, x):
            return {"logits": self.lin(x)}

    def loss(out, y):
        return nn.functional.cross_entropy(out["logits"], y)

    x, y = _data()
    a, b = DictOut(0), DictOut(1)
    value, acc = evaluate(a, loss, (x, y))
    with torch.no_grad():
        assert value == pytest.approx(float(nn.functional.cross_entropy(a.lin(x), y)), rel=1e-14, abs=0)
    assert np.isnan(acc)
    curve = sk.interpolate(a, b, loss, (x, y), [0.0, 1.0])
    with torch.no_grad():
        assert curve.loss[1] == pytest.approx(float(nn.functional.cross_entropy(b.lin(x), y)), rel=1e-14, abs=0)
    assert np.isnan(curve.accuracy).all()


def test_a_one_sample_batch_under_batch_statistics_is_named():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    b = copy.deepcopy(a)
    x, y = _data(21)
    batches = [(x[:10], y[:10]), (x[10:20], y[10:20]), (x[20:], y[20:])]  # the last holds one sample
    with pytest.raises(ValueError, match=r"batch 2 holds 1 sample\(s\): BatchNorm with batch statistics"):
        sk.interpolate(a, b, CE, batches, [0.5], bn="train")
    # With running statistics the same data are fine, and weighted by samples.
    assert np.isfinite(sk.interpolate(a, b, CE, batches, [0.5], bn="eval").loss).all()


def test_curves_under_the_callers_inference_mode():
    a, b = _net(0), _net(1)
    x, y = _data()
    ref_curve = sk.interpolate(a, b, CE, (x, y), [0.0, 0.5])
    ref_slice = slice_1d(a, CE, (x, y), [0.0, 0.5])
    ref_eval = evaluate(a, CE, (x, y))
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()  # inference tensors
        np.testing.assert_array_equal(sk.interpolate(a, b, CE, (xi, yi), [0.0, 0.5]).loss, ref_curve.loss)
        np.testing.assert_array_equal(slice_1d(a, CE, (xi, yi), [0.0, 0.5]).loss, ref_slice.loss)
        np.testing.assert_array_equal(slice_2d(a, CE, (xi, yi), [0.0], [0.0]).loss, [[ref_eval[0]]])
        assert evaluate(a, CE, (xi, yi)) == ref_eval


def test_on_point_reports_each_point_of_one_curve():
    torch.manual_seed(0)
    a, b = nn.Linear(3, 2).double(), nn.Linear(3, 2).double()
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randint(0, 2, (7,))
    seen = []
    curve = sk.interpolate(a, b, nn.CrossEntropyLoss(), (x, y), [0.0, 0.5, 1.0], on_point=lambda *p: seen.append(p))
    assert [p[0] for p in seen] == [0.0, 0.5, 1.0]
    assert [p[1] for p in seen] == list(curve.loss) and [p[2] for p in seen] == list(curve.accuracy)
    with torch.no_grad():
        assert seen[2][1] == pytest.approx(float(nn.functional.cross_entropy(b(x), y)), rel=1e-12)


def _regression_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1)).double()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_targets_of_torch_losses_are_refused(bad):
    """NaN targets under nn.MSELoss gave a curve of NaN losses, silently."""
    x, _ = _data()
    y = torch.randn(x.shape[0], 1, dtype=torch.float64)
    y[17, 0] = bad
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]
    with pytest.raises(ValueError, match=r"targets hold (NaN|inf) \(batch 1"):
        sk.interpolate(_regression_net(0), _regression_net(1), nn.MSELoss(), batches, [0.0, 1.0])
    with pytest.raises(ValueError, match="targets hold"):
        slice_1d(_regression_net(0), nn.MSELoss(), batches, alphas=[0.0])

    def masking_loss(out, t):  # a loss of the user's own may leave such targets out
        keep = torch.isfinite(t)
        return ((out - torch.nan_to_num(t)) ** 2)[keep].mean()

    curve = sk.interpolate(_regression_net(0), _regression_net(1), masking_loss, (x, y), [0.0, 1.0])
    assert np.all(np.isfinite(curve.loss))


def test_summed_loss_of_a_lambda_is_refused():
    """A lambda around reduction='sum' gave every point the sum (17.34 where the mean is 1.48)."""
    x, y = _data()
    summed = lambda out, t: nn.functional.cross_entropy(out, t, reduction="sum")  # noqa: E731
    for run in (lambda loss: sk.interpolate(_net(0), _net(1), loss, (x, y), [0.0, 1.0]),
                lambda loss: slice_1d(_net(0), loss, (x, y), alphas=[0.0]),
                lambda loss: evaluate(_net(0), loss, (x, y))):
        with pytest.raises(ValueError, match="sum"):
            run(summed)
        mean = run(lambda out, t: nn.functional.cross_entropy(out, t))  # the mean form passes
        assert mean is not None
