import numpy as np
import pytest
import torch
from torch import nn

from sharpkit.data import Batches, load_dataset, load_tensor_file
from sharpkit.objective import Objective
from sharpkit.params import FlatParams


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _data(n=23):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def test_batches_split_and_count():
    x, y = _data(23)
    b = Batches((x, y), batch_size=5)
    sizes = [xb.shape[0] for xb, _ in b]
    assert sizes == [5, 5, 5, 5, 3]
    assert b.num_samples() == 23
    X, Y = b.materialize()
    assert torch.equal(X, x) and torch.equal(Y, y)


def test_generator_is_replayable():
    x, y = _data(10)
    gen = ((x[i : i + 4], y[i : i + 4]) for i in range(0, 10, 4))
    b = Batches(gen)
    assert b.num_samples() == 10 and b.num_samples() == 10


@pytest.mark.parametrize(
    "data, match",
    [
        ((torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)), "empty"),
        ([], "empty"),
        ((torch.zeros(3, 4), torch.zeros(2, dtype=torch.long)), "disagree"),
        ([(torch.zeros(3, 4),)], "pair"),
    ],
)
def test_bad_data_is_named(data, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Batches(data).num_samples()


def test_objective_is_sample_weighted_mean_with_uneven_batches():
    model, (x, y) = _mlp(), _data(23)
    loss_fn = nn.CrossEntropyLoss()
    whole = Objective(model, loss_fn, (x, y))
    split = Objective(model, loss_fn, Batches((x, y), batch_size=6))
    x0 = whole.x0()
    expected = loss_fn(model(x), y).double()
    assert torch.allclose(whole.loss(x0), expected, rtol=1e-12)
    assert torch.allclose(split.loss(x0), expected, rtol=1e-12)
    # Gradient against autograd on the full batch, at a perturbed point.
    pert = x0 + 0.1 * torch.randn_like(x0)
    f, g = split.loss_and_grad(pert)
    FlatParams(model).set_(pert)
    model.zero_grad()
    ref = loss_fn(model(x), y)
    ref.backward()
    ref_g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert torch.allclose(f, ref.double(), rtol=1e-12)
    assert torch.allclose(g, ref_g, rtol=1e-10, atol=1e-12)


def _counting(model):
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_regrouped_objective_joins_small_batches_and_keeps_the_value():
    from sharpkit import objective as objective_module

    model, (x, y) = _mlp(), _data(23)
    loss_fn = nn.CrossEntropyLoss()
    plain = Objective(model, loss_fn, Batches((x, y), batch_size=4))
    joined = Objective(model, loss_fn, Batches((x, y), batch_size=4), regroup=True)
    assert [b[0].shape[0] for b in joined.batches] == [23] and joined.num_samples == 23
    x0 = plain.x0() + 0.1 * torch.randn(plain.n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    f_ref, g_ref = plain.loss_and_grad(x0)
    calls = _counting(model)
    f, g = joined.loss_and_grad(x0)
    assert len(calls) == 1  # one pass of 23 samples instead of six batches
    torch.testing.assert_close(f, f_ref, rtol=1e-13, atol=0)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(joined.loss(x0), plain.loss(x0), rtol=1e-13, atol=0)
    # A pass never holds more activations than the budget allows, nor fewer samples than a batch.
    per_sample = (6 + 6 + 3) * 8  # Linear, Tanh, Linear outputs in float64
    budget = objective_module.REGROUP_BYTES
    try:
        objective_module.REGROUP_BYTES = 4 * per_sample * 10
        assert [b[0].shape[0] for b in Objective(model, loss_fn, Batches((x, y), batch_size=4), regroup=True).batches] == [8, 8, 7]
        objective_module.REGROUP_BYTES = 1
        assert [b[0].shape[0] for b in Objective(model, loss_fn, Batches((x, y), batch_size=4), regroup=True).batches] == [4] * 5 + [3]
    finally:
        objective_module.REGROUP_BYTES = budget
    # A planned number of samples per pass (the audit's memory plan) is taken as given.
    assert [b[0].shape[0] for b in Objective(model, loss_fn, Batches((x, y), batch_size=4), regroup=9).batches] == [8, 8, 7]
    assert [b[0].shape[0] for b in Objective(model, loss_fn, (x, y), regroup=10).batches] == [10, 10, 3]


def test_regrouping_keeps_batches_whose_samples_interact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)).double().train()
    x, y = _data(23)
    obj = Objective(model, nn.CrossEntropyLoss(), Batches((x, y), batch_size=5), regroup=True)
    assert [b[0].shape[0] for b in obj.batches] == [5, 5, 5, 5, 3]
    model.eval()
    obj = Objective(model, nn.CrossEntropyLoss(), Batches((x, y), batch_size=5), regroup=True)
    assert [b[0].shape[0] for b in obj.batches] == [23]


def test_objective_leaves_model_untouched():
    model, data = _mlp(), _data()
    before = [p.clone() for p in model.parameters()]
    obj = Objective(model, nn.CrossEntropyLoss(), data)
    obj.loss_and_grad(obj.x0() + 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_objective_rejects_nonscalar_loss_and_nan_params():
    model, data = _mlp(), _data()
    with pytest.raises(ValueError, match="reduction='none'"):
        Objective(model, nn.CrossEntropyLoss(reduction="none"), data)
    obj = Objective(model, lambda out, target: nn.functional.cross_entropy(out, target, reduction="none"), data)
    with pytest.raises(ValueError, match="scalar"):
        obj.loss(obj.x0())
    with torch.no_grad():
        model[0].bias[1] = float("inf")
    with pytest.raises(ValueError, match="0.bias.*inf"):
        Objective(model, nn.CrossEntropyLoss(), data)


def test_non_finite_frozen_parameters_buffers_and_data_are_named_before_any_pass(tmp_path):
    import sharpkit as sk

    x, y = _data()
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    model[0].weight.requires_grad_(False)
    with torch.no_grad():
        model[0].weight[2, 1] = float("nan")
    with pytest.raises(ValueError, match="frozen parameter '0.weight' contains NaN"):
        sk.hessian(model, nn.CrossEntropyLoss(), (x, y))
    with torch.no_grad():
        model[0].weight[2, 1] = 0.5
        model[1].running_var[3] = float("nan")
    with pytest.raises(ValueError, match=r"parameter '0.bias' contains inf"):
        broken = _mlp()
        with torch.no_grad():
            broken[0].bias[0] = float("inf")
        sk.hessian(broken, nn.CrossEntropyLoss(), (x, y))
    for measure in (lambda: sk.hessian(model, nn.CrossEntropyLoss(), (x, y)),
                    lambda: sk.keskar_sharpness(model, nn.CrossEntropyLoss(), (x, y))):
        with pytest.raises(ValueError, match="buffer '1.running_var' contains NaN"):
            measure()
    # An infinite buffer or frozen parameter can be meant (a -inf attention mask): only NaN ones
    # are refused.
    with torch.no_grad():
        model[1].running_var[3] = 1.0
    model.register_buffer("mask", torch.tensor([0.0, float("-inf")], dtype=torch.float64))
    model.frozen_mask = nn.Parameter(torch.tensor([float("-inf"), 0.0], dtype=torch.float64), requires_grad=False)
    assert sk.hessian(model, nn.CrossEntropyLoss(), (x, y)).n == FlatParams(model).n
    # Data: named by what holds it and where, for every measurement (the audit: a usage error,
    # not an error row for each checkpoint).
    bad = x.clone()
    bad[9, 2] = float("inf")
    batches = [(x[:8], y[:8]), (bad[8:], y[8:])]
    for measure in (lambda: sk.hessian(model, nn.CrossEntropyLoss(), batches),
                    lambda: sk.keskar_sharpness(model, nn.CrossEntropyLoss(), batches)):
        with pytest.raises(ValueError, match=r"the data's inputs hold inf \(batch 1"):
            measure()
    # NaN targets may be meant (a loss that masks missing labels).
    def masked_mse(out, target):
        known = ~torch.isnan(target)
        return ((out - target.nan_to_num()) ** 2 * known).sum() / known.sum()

    partly_labelled = torch.randn(23, 3, dtype=x.dtype)
    partly_labelled[::4, 1] = float("nan")
    assert torch.isfinite(Objective(model, masked_mse, [(x, partly_labelled)]).loss(FlatParams(model).get()))
    mlp = _mlp()
    torch.save(mlp.state_dict(), tmp_path / "ck.pt")
    with pytest.raises(ValueError, match="inputs hold inf"):
        sk.audit([tmp_path / "ck.pt"], _mlp, batches, metrics="trace", out=tmp_path / "a.jsonl", progress=False)
    assert not (tmp_path / "a.jsonl").exists() or (tmp_path / "a.jsonl").read_text(encoding="utf-8") == ""


def test_targets_outside_the_models_classes_are_named(tmp_path):
    import sharpkit as sk

    x, y = _data()
    y = y.clone()
    y[17] = 7  # the model has 3 outputs
    batches = [(x[:8], y[:8]), (x[8:16], y[8:16]), (x[16:], y[16:])]
    message = r"class-index targets must lie in \[0, 3\) for the model.s 3 outputs .* this batch holds 7"
    # An IndexError of the loss's own, with targets in range, is left as it is.
    def buggy(out, target):
        return nn.functional.cross_entropy(out, target) + [0.0][1]

    with pytest.raises(IndexError, match="list index out of range"):
        Objective(_mlp(), buggy, _data()).loss(FlatParams(_mlp()).get())
    # An ignore_index at or above the class count (255 in segmentation) is not "outside".
    x, y255 = _data()
    y255 = y255.clone()
    y255[:4] = 255
    def buggy255(out, target):
        return nn.functional.cross_entropy(out, target, ignore_index=255) + [0.0][1]

    buggy255.ignore_index = 255
    with pytest.raises(IndexError, match="list index out of range"):
        Objective(_mlp(), buggy255, (x, y255)).loss(FlatParams(_mlp()).get())
    y255[6] = 30
    with pytest.raises(ValueError, match="this batch holds 30"):
        Objective(_mlp(), nn.CrossEntropyLoss(ignore_index=255), (x, y255)).loss(FlatParams(_mlp()).get())
    obj = Objective(_mlp(), nn.CrossEntropyLoss(), batches)
    for measure in (lambda: obj.loss(obj.x0()),
                    lambda: sk.keskar_sharpness(_mlp(), nn.CrossEntropyLoss(), batches),
                    lambda: sk.hessian(_mlp(), nn.CrossEntropyLoss(), batches, engine="generic").dense()):
        with pytest.raises(ValueError, match=message):
            measure()
    torch.save(_mlp().state_dict(), tmp_path / "ck.pt")
    with pytest.raises(ValueError, match=message):  # (was an IndexError from planning the passes)
        sk.audit([tmp_path / "ck.pt"], _mlp, batches, metrics="trace", progress=False)


def test_tensor_file_roundtrip(tmp_path):
    x, y = _data(12)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=x.numpy(), y_train=y.numpy())
    ds = load_tensor_file(path)
    assert ds.x_train.shape == (12, 4) and "no test split" in ds.name
    pt = tmp_path / "d.pt"
    torch.save({"x": x, "y": y, "x_test": x[:3], "y_test": y[:3]}, pt)
    ds = load_dataset(str(pt))
    assert ds.x_test.shape == (3, 4) and ds.num_classes == int(y.max()) + 1
    with pytest.raises(ValueError, match="unknown data set"):
        load_dataset("cifar-10")
    with pytest.raises(FileNotFoundError):
        load_tensor_file(tmp_path / "missing.npz")


def test_mnist1d_is_generated_offline_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARPKIT_CACHE", str(tmp_path))
    from sharpkit.data import load_mnist1d

    a = load_mnist1d(num_samples=200)
    assert a.x_train.shape == (160, 40) and a.x_test.shape == (40, 40)
    assert len(list(tmp_path.glob("mnist1d-*.npz"))) == 1
    b = load_mnist1d(num_samples=200)
    assert torch.equal(a.x_train, b.x_train)
