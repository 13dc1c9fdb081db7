"""Data as users hand it over, and the objective over it: the sample-weighted mean over all the data,
whatever the container (tuple, uneven list, shuffled DataLoader, generator, IterableDataset), for
class weights, ignored targets and keyword partials of cross-entropy, with gradients and Hessian
products combining the same way.  References: the loss of all the data at once, its gradient and
its explicit Hessian in float64 (torch.func).  Bad input gets a ValueError/TypeError naming it."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian
from torch.utils.data import DataLoader, IterableDataset, TensorDataset, WeightedRandomSampler

import sharpkit as sk
from sharpkit.data import as_batches, load_tensor_file
from sharpkit.objective import Objective

F64 = torch.float64
N = 23
WEIGHT = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=F64)


def _mlp(outputs: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, outputs)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 3, generator=g, dtype=F64)
    y = torch.randint(0, 4, (N,), generator=g)
    return x, y


def _reference(model, loss_fn, x, y):
    """(loss, gradient, Hessian) of ``loss_fn`` over all the data at once, in float64."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    x0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()

    def f(v):
        params = dict(zip(names, (t.view(s) for t, s in zip(v.split([s.numel() for s in shapes]), shapes))))
        return loss_fn(functional_call(model, params, (x,)), y)

    v = x0.clone().requires_grad_(True)
    value = f(v)
    (grad,) = torch.autograd.grad(value, v)
    return float(value.detach()), grad, hessian(f)(x0)


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _value(model, loss_fn, data) -> float:
    obj = Objective(model, loss_fn, data)
    return float(obj.loss(obj.x0()))


def _assert_exact(model, loss_fn, data, x, y, engines=("generic", "fused")):
    value, grad, H = _reference(model, loss_fn, x, y)
    obj = Objective(model, loss_fn, data)
    got, g = obj.loss_and_grad(obj.x0())
    assert float(got) == pytest.approx(value, rel=1e-13)
    assert float(obj.loss(obj.x0())) == pytest.approx(value, rel=1e-13)
    assert _rel(g, grad) < 1e-12
    V = torch.randn(obj.n, 3, generator=torch.Generator().manual_seed(5), dtype=F64)
    for engine in engines:
        assert _rel(sk.hessian(model, loss_fn, data, engine=engine) @ V, H @ V) < 1e-12, engine


class _Chunks(IterableDataset):
    def __init__(self, x, y, size):
        self.x, self.y, self.size = x, y, size

    def __iter__(self):
        for s in range(0, len(self.x), self.size):
            yield self.x[s:s + self.size], self.y[s:s + self.size]


CONTAINERS = {
    "tuple": lambda x, y: (x, y),
    "uneven-list": lambda x, y: [(x[:10], y[:10]), (x[10:13], y[10:13]), [x[13:], y[13:]]],
    "loader-shuffled": lambda x, y: DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True),
    "generator": lambda x, y: ((x[s:s + 7], y[s:s + 7]) for s in range(0, N, 7)),
    "iterable-dataset": lambda x, y: _Chunks(x, y, 6),
}


@pytest.mark.parametrize("container", sorted(CONTAINERS))
def test_weighted_cross_entropy_with_ignored_targets_is_exact_in_every_container(container):
    """torch's weighted mean is sum(w_y l) / sum(w_y) over the targets kept: batches combine by
    those sums, not by their sample counts."""
    x, y = _data()
    y[[0, 3, 4, 11, 20]] = -100
    model, loss = _mlp(), nn.CrossEntropyLoss(weight=WEIGHT)
    value, grad, H = _reference(model, loss, x, y)
    obj = Objective(model, loss, CONTAINERS[container](x, y))
    got, g = obj.loss_and_grad(obj.x0())
    assert float(got) == pytest.approx(value, rel=1e-13) and _rel(g, grad) < 1e-12
    V = torch.randn(obj.n, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    H_sk = sk.hessian(model, loss, CONTAINERS[container](x, y), engine="generic")
    assert _rel(H_sk @ V, H @ V) < 1e-12


@pytest.mark.parametrize("case", ["weight", "ignore_index", "both"])
def test_keyword_partials_of_cross_entropy_weigh_batches_like_the_module(case):
    """partial(F.cross_entropy, weight=w) was weighed by sample counts: 0.29% off the loss over all
    the data (1.450813 against 1.455022) on these uneven batches."""
    x, y = _data()
    kwargs = {"weight": {"weight": WEIGHT}, "ignore_index": {"ignore_index": 2},
              "both": {"weight": WEIGHT.float(), "ignore_index": 2}}[case]  # (float32 weights: moved to float64)
    loss = functools.partial(F.cross_entropy, **kwargs)
    data = [(x[:10], y[:10]), (x[10:13], y[10:13]), (x[13:], y[13:])]
    reference_loss = functools.partial(F.cross_entropy, **{k: v.double() if torch.is_tensor(v) else v
                                                           for k, v in kwargs.items()})
    _assert_exact(_mlp(), reference_loss if case == "both" else loss, data, x, y, engines=("generic",))
    value, _, _ = _reference(_mlp(), reference_loss, x, y)
    obj = Objective(_mlp(), loss, data)
    assert float(obj.loss(obj.x0())) == pytest.approx(value, rel=1e-13)
    assert sk.keskar_sharpness(_mlp(), loss, data, max_iter=2).loss == pytest.approx(value, rel=1e-13)


def test_sequence_outputs_probabilities_and_mse_shapes():
    x, y = _data()
    # (N, C, T) outputs with (N, T) targets, padding ignored, class weights.
    seq = nn.Sequential(nn.Linear(3, 8), nn.Unflatten(1, (4, 2))).double()
    t = torch.randint(0, 4, (N, 2), generator=torch.Generator().manual_seed(2))
    t[::4, 1] = -100
    _assert_exact(seq, nn.CrossEntropyLoss(weight=WEIGHT), [(x[:9], t[:9]), (x[9:], t[9:])], x, t,
                  engines=("generic",))
    # One-hot float targets: a per-sample mean, class weights inside each sample's sum.
    p = F.one_hot(y, 4).double()
    _assert_exact(_mlp(), nn.CrossEntropyLoss(weight=WEIGHT), [(x[:9], p[:9]), (x[9:], p[9:])], x, p)
    # MSE: (N, 1) outputs against (N, 1) targets; (N,) targets are refused, not broadcast to (N, N).
    r = torch.randn(N, 1, generator=torch.Generator().manual_seed(3), dtype=F64)
    _assert_exact(_mlp(1), nn.MSELoss(), [(x[:9], r[:9]), (x[9:], r[9:])], x, r)
    with pytest.raises(ValueError, match=r"outputs of shape \(9, 1\) with targets of shape \(9,\)"):
        _value(_mlp(1), nn.MSELoss(), [(x[:9], r[:9, 0]), (x[9:], r[9:, 0])])


def test_class_targets_of_the_wrong_shape_or_dtype_are_named():
    x, y = _data()
    with pytest.raises(ValueError, match=r"class-index targets of shape \(23, 1\) for outputs of shape \(23, 4\): "
                                         r"they must be shaped \(23,\) \(squeeze the last dimension\)"):
        sk.keskar_sharpness(_mlp(), nn.CrossEntropyLoss(), (x, y[:, None]), max_iter=1)
    with pytest.raises(ValueError, match=r"floating targets of shape \(23,\).*class labels must be integers"):
        _value(_mlp(), F.cross_entropy, (x, y.double()))


def test_summed_losses_are_refused():
    """A loss summing over samples made every value depend on the batching: the objective over
    two batches was 15.33 and over one batch 30.28 (the mean loss: 1.32), the Hessian's trace
    20.68 (mean: 1.66)."""
    x, y = _data()
    model = _mlp()
    summed = lambda out, t: F.cross_entropy(out, t, reduction="sum")  # noqa: E731
    for data in ((x, y), [(x[:10], y[:10]), (x[10:], y[10:])]):
        with pytest.raises(ValueError, match="sums over the samples instead of averaging them"):
            _value(model, summed, data)
        with pytest.raises(ValueError, match="sums over the samples"):
            sk.keskar_sharpness(model, summed, data, max_iter=1)
    with pytest.raises(ValueError, match="sums over the samples"):  # (found where the passes are planned)
        sk.hessian(model, summed, [(x[:10], y[:10]), (x[10:], y[10:])])
    with pytest.raises(ValueError, match=r"partial\(cross_entropy, reduction='sum'\): sharpkit needs a mean-reduced"):
        sk.keskar_sharpness(model, functools.partial(F.cross_entropy, reduction="sum"), (x, y))
    with pytest.raises(ValueError, match="reduction='none'"):
        Objective(model, functools.partial(F.mse_loss, reduction="none"), (x, y))
    # A mean over the samples in a lambda is fine, and exact.
    mean = lambda out, t: F.cross_entropy(out, t)  # noqa: E731
    _assert_exact(model, mean, [(x[:10], y[:10]), (x[10:], y[10:])], x, y, engines=("generic",))


def test_loaders_that_draw_other_samples_on_every_pass_are_refused():
    """A shuffled loader with drop_last=True left out 3 other samples of 23 on every pass: three
    evaluations of one objective at one point gave 1.3407, 1.2965, 1.2799."""
    x, y = _data()
    ds = TensorDataset(x, y)
    model = _mlp()
    for loader, match in ((DataLoader(ds, batch_size=5, shuffle=True, drop_last=True), "leaves out another 3 of its 23"),
                          (DataLoader(ds, batch_size=5, sampler=WeightedRandomSampler(torch.ones(N), N)),
                           "draws its samples at random")):
        with pytest.raises(ValueError, match=match):
            Objective(model, nn.CrossEntropyLoss(), loader)
        with pytest.raises(ValueError, match=match):
            sk.interpolate(model, model, nn.CrossEntropyLoss(), loader, [0.0])
    # Exact where every pass sees every sample: shuffled without drop_last, or drop_last that drops nothing.
    _assert_exact(model, nn.CrossEntropyLoss(), DataLoader(ds, batch_size=5, shuffle=True), x, y, engines=("generic",))
    even = DataLoader(TensorDataset(x[:20], y[:20]), batch_size=5, shuffle=True, drop_last=True)
    _assert_exact(model, nn.CrossEntropyLoss(), even, x[:20], y[:20], engines=("generic",))


def test_non_finite_targets_of_torch_losses_are_named():
    x, y = _data()
    r = torch.randn(N, 1, dtype=F64)
    r[15] = float("nan")
    data = [(x[:10], r[:10]), (x[10:], r[10:])]
    with pytest.raises(ValueError, match=r"targets hold NaN \(batch 1, counting from 0\): MSELoss"):
        Objective(_mlp(1), nn.MSELoss(), data)  # (the objective was NaN)
    p = F.one_hot(y, 4).double()
    p[2, 0] = float("inf")
    with pytest.raises(ValueError, match=r"targets hold inf \(batch 0"):
        sk.hessian(_mlp(), nn.CrossEntropyLoss(), (x, p))
    # A loss of the user's own may mask missing targets: measured as it defines them.
    def masked(out, t):
        keep = ~torch.isnan(t)
        return ((out[keep] - t[keep]) ** 2).mean()

    keep = ~torch.isnan(r)
    with torch.no_grad():
        want = float(((_mlp(1)(x)[keep] - r[keep]) ** 2).mean())
    assert _value(_mlp(1), masked, (x, r)) == pytest.approx(want, rel=1e-13)


def test_data_that_carry_a_graph_are_constants():
    """Inputs and targets requiring grad (a teacher's outputs) failed the fused engine with 'a leaf
    Variable that requires grad is being used in an in-place operation'."""
    x, _ = _data()
    t = torch.randn(N, 2, dtype=F64)
    xg, tg = x.clone().requires_grad_(True), t.clone().requires_grad_(True)
    model = _mlp(2)
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=F64)
    for engine in ("generic", "fused"):
        want = sk.hessian(model, nn.MSELoss(), [(x[:9], t[:9]), (x[9:], t[9:])], engine=engine) @ V
        got = sk.hessian(model, nn.MSELoss(), [(xg[:9], tg[:9]), (xg[9:], tg[9:])], engine=engine) @ V
        assert _rel(got, want) < 1e-14
    assert xg.grad is None and tg.grad is None


def test_containers_that_are_not_batches_are_named():
    x, y = _data()
    model = _mlp()
    cases = [({"x": x, "y": y}, r"data is a dict \(keys \['x', 'y'\]\)"),
             ([{"x": x, "y": y}], r"batch 0 is not .* dict with keys \['x', 'y'\]: map each batch"),
             (x, r"data is one tensor of shape \(23, 3\)"),
             ((x.numpy(), y.numpy()), "pair of ndarray and ndarray: sharpkit takes tensors"),
             ([(x, y, y)], r"got tuple of 3: Tensor, Tensor, Tensor")]
    for data, match in cases:
        with pytest.raises(TypeError, match=match):
            Objective(model, nn.CrossEntropyLoss(), data)
    gen = ((x[s:s + 7], y[s:s + 7]) for s in range(0, N, 7))
    list(gen)  # used up before the measurement
    with pytest.raises(ValueError, match="the iterator yielded no batches .* read only once"):
        Objective(model, nn.CrossEntropyLoss(), gen)
    for data in ((x[:0], y[:0]), [], [(x[:0], y[:0])], DataLoader(TensorDataset(x[:0], y[:0]), batch_size=2)):
        with pytest.raises(ValueError, match="data is empty"):
            Objective(model, nn.CrossEntropyLoss(), data)
    with pytest.raises(ValueError, match="batch 1: inputs have 3 samples but targets 2"):
        Objective(model, nn.CrossEntropyLoss(), [(x, y), (x[:3], y[:2])])


# ---- data files ---------------------------------------------------------------------------------------

def _npz(tmp_path, name, **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("arrays, match", [
    (dict(x_train=np.zeros((8, 3)), y_train=np.arange(7)), "x_train has 8 samples but y_train 7"),
    (dict(x_train=np.zeros((8, 3)), y_train=np.arange(8), x_test=np.zeros((4, 3)), y_test=np.arange(3)),
     "x_test has 4 samples but y_test 3"),
    (dict(x_train=np.zeros((8, 3)), y_train=np.arange(8), x_test=np.zeros((4, 3))), "holds x_test but not y_test"),
    (dict(x_train=np.zeros((8, 3)), y_train=np.arange(8), x_test=np.zeros((0, 3)), y_test=np.zeros(0, np.int64)),
     "the test split is empty"),
    (dict(x=np.zeros((8, 3)), y=np.arange(8), x_train=np.ones((4, 3)), y_train=np.arange(4)),
     "holds both x_train and x"),
    (dict(x_train=np.zeros((8, 3)), y_train=np.arange(8), x_test=np.zeros((4, 3)), y_test=np.array([0.5, 1, 2, 3])),
     "y_test values that are not whole numbers"),
    (dict(x_train=np.zeros((8, 3), np.complex64), y_train=np.arange(8)), "x_train holds complex numbers"),
    (dict(x_train=np.array(["a"] * 8), y_train=np.arange(8)), "x_train holds <U1 values"),
    (dict(x_train=np.array([{}] * 8, dtype=object), y_train=np.arange(8)), "cannot load: not a .npz archive of numeric"),
])
def test_bad_npz_files_are_named(tmp_path, arrays, match):
    """Before: mismatched lengths loaded silently (failing later), a test label 0.5 was truncated to
    class 0, x_test without y_test was ignored, x beside x_train ignored, complex inputs lost their
    imaginary part, an empty test split failed in torch.max, a string array in torch.as_tensor."""
    path = _npz(tmp_path, "bad.npz", **arrays)
    with pytest.raises(ValueError, match=match) as info:
        load_tensor_file(path)
    assert str(path) in str(info.value)


def test_data_files_refuse_pickles_and_keep_good_data(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("unpickled",))

    torch.save({"x_train": Payload(), "y_train": torch.arange(8)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refused: the file holds objects other than tensors"):
        load_tensor_file(tmp_path / "evil.pt")
    (tmp_path / "junk.npz").write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match="junk.npz: cannot load"):
        load_tensor_file(tmp_path / "junk.npz")
    (tmp_path / "dir.npz").mkdir()
    with pytest.raises(ValueError, match="not a file"):
        load_tensor_file(tmp_path / "dir.npz")
    # Labels in unsigned dtypes, bool labels, -100 padding: int64 classes.
    ds = load_tensor_file(_npz(tmp_path, "u16.npz", x_train=np.arange(24, dtype=np.uint16).reshape(8, 3),
                               y_train=np.array([0, 1, 2, 3, 0, 1, 2, 3], np.uint16)))
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64 and ds.num_classes == 4
    ds = load_tensor_file(_npz(tmp_path, "pad.npz", x_train=np.zeros((4, 3)), y_train=np.array([[0, -100], [2, 1],
                                                                                               [1, -100], [0, 0]])))
    assert ds.num_classes == 3 and int(ds.y_train.min()) == -100
    ds = load_tensor_file(_npz(tmp_path, "ok.npz", x_train=np.zeros((8, 3)), y_train=np.arange(8) % 3,
                               x_test=np.ones((2, 3)), y_test=np.array([2.0, 0.0])))
    assert ds.y_test.dtype == torch.int64 and ds.y_test.tolist() == [2, 0] and ds.num_classes == 3
    x = torch.randn(8, 3, requires_grad=True)
    torch.save({"x": x, "y": torch.arange(8) % 2}, tmp_path / "graph.pt")
    ds = load_tensor_file(tmp_path / "graph.pt")
    assert not ds.x_train.requires_grad and torch.equal(ds.x_train, x.detach())


def test_batch_statistics_over_a_shuffling_loader_are_refused():
    """With BatchNorm on batch statistics, a shuffled loader groups other samples on every pass: one
    objective at one point gave 1.5131, 1.5042, 1.5346 on three evaluations."""
    from sharpkit.params import measurement_mode

    x, y = _data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 4)).double()
    shuffled = DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True)
    with pytest.raises(ValueError, match=r"batch statistics \(bn='train'\) .* new random order .*RandomSampler"):
        sk.keskar_sharpness(model, nn.CrossEntropyLoss(), shuffled, bn="train", max_iter=1)
    with measurement_mode(model, "train"), pytest.raises(ValueError, match="new random order"):
        Objective(model, nn.CrossEntropyLoss(), shuffled)
    # Running statistics (bn='eval'), or a fixed order, are one objective.
    with measurement_mode(model, "eval"):
        assert len({_value(model, nn.CrossEntropyLoss(), shuffled) for _ in range(3)}) <= 2  # (summation order)
    fixed = DataLoader(TensorDataset(x, y), batch_size=5)
    with measurement_mode(model, "train"):
        assert len({_value(model, nn.CrossEntropyLoss(), fixed) for _ in range(3)}) == 1


def test_summed_loss_found_when_the_first_batch_holds_one_sample():
    """The first batch of one sample cannot tell a sum from a mean: the check waits for a batch
    that can (the summed loss was taken for a mean, silently)."""
    from sharpkit.objective import Objective
    from sharpkit.params import FlatParams

    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 3, (9,))
    data = [(x[:1], y[:1]), (x[1:], y[1:])]
    summed = lambda out, t: F.cross_entropy(out, t, reduction="sum")  # noqa: E731
    x0 = FlatParams(model).get()
    with pytest.raises(ValueError, match="sums over the samples"):
        Objective(model, summed, data).loss(x0)
    with pytest.raises(ValueError, match="sums over the samples"):
        Objective(model, summed, data).check_reduction()
    # A mean loss in a lambda passes on the same data and gives the float64 mean.
    mean = lambda out, t: F.cross_entropy(out, t)  # noqa: E731
    with torch.no_grad():
        ref = F.cross_entropy(x @ model.weight.T + model.bias, y).item()
    assert abs(Objective(model, mean, data).loss(x0).item() - ref) < 1e-12


class _DictOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return {"pred": self.lin(x), "hidden": x}


@pytest.mark.parametrize("loss_fn", [nn.MSELoss(), nn.functional.mse_loss, nn.CrossEntropyLoss()])
def test_torch_loss_given_a_dict_output_is_a_clear_error(loss_fn):
    """A model returning a dict (HF-style) with a torch loss that cannot read it: a ValueError
    naming the output's keys and the remedy, in the objective, the curvature and the sharpness
    (torch said "'dict' object has no attribute 'size'")."""
    torch.manual_seed(0)
    model = _DictOutput()
    targets = torch.randint(0, 3, (6,)) if isinstance(loss_fn, nn.CrossEntropyLoss) else torch.randn(6, 3)
    data = (torch.randn(6, 4), targets)
    words = r"returned a dict with keys \['pred', 'hidden'\]: pass a loss that picks"
    from sharpkit.objective import Objective
    from sharpkit.params import FlatParams

    with pytest.raises(ValueError, match=words):
        Objective(model, loss_fn, data).loss(FlatParams(model).get())
    with pytest.raises(ValueError, match=words):
        sk.hessian(model, loss_fn, data) @ torch.ones(FlatParams(model).n)
    with pytest.raises(ValueError, match=words):
        sk.keskar_sharpness(model, loss_fn, data, epsilon=1e-3)


def test_curvature_names_mismatched_targets_where_it_is_set_up():
    """sk.hessian with MSE targets of another shape than the outputs: the ValueError comes when the
    operator is built, not at its first product."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match=r"outputs of shape \(10, 3\) with targets of shape \(10, 2\)"):
        sk.hessian(model, nn.MSELoss(), (x, torch.randn(10, 2)))
    with pytest.raises(ValueError, match="class-index targets of shape"):
        sk.hessian(model, nn.CrossEntropyLoss(), (x, torch.randint(0, 3, (10, 1))))
