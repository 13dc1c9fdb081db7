"""ε-sharpness on inputs users really pass: tied weights, BatchNorm without running statistics,
calls under no_grad, non-finite trial points, numpy/tensor arguments, large loaders."""
import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

import sharpkit as sk
from sharpkit.data import as_batches
from test_sharpness_helpers import blobs, mlp


class TiedLM(nn.Module):
    """A tiny language model whose output layer reuses the embedding (weight tying)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x)))


def test_tied_weights_from_several_batches_equal_one_batch():
    gen = torch.Generator().manual_seed(1)
    X, Y = torch.randint(0, 11, (40,), generator=gen), torch.randint(0, 11, (40,), generator=gen)
    model, ce = TiedLM().double(), nn.CrossEntropyLoss()
    one = sk.keskar_sharpness(model, ce, (X, Y), solver="apgd")
    two = sk.keskar_sharpness(model, ce, [(X[:16], Y[:16]), (X[16:], Y[16:])], solver="apgd")
    assert two.value == pytest.approx(one.value, rel=1e-9)
    avg = sk.adaptive_sharpness(model, ce, [(X[:16], Y[:16]), (X[16:], Y[16:])], rho=0.05)
    assert avg.value == pytest.approx(sk.adaptive_sharpness(model, ce, (X, Y), rho=0.05).value, rel=1e-9)


def _per_batch_loss(model, loss_fn, batches):
    total = sum(float(loss_fn(model(x), y)) * x.shape[0] for x, y in batches)
    return total / sum(x.shape[0] for x, _ in batches)


def test_batchnorm_without_running_statistics_keeps_the_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.ReLU(),
                          nn.Linear(8, 3)).double().eval()
    X, Y = torch.randn(23, 4, dtype=torch.float64), torch.randint(0, 3, (23,))
    batches = [(X[:10], Y[:10]), (X[10:], Y[10:])]
    ce = nn.CrossEntropyLoss()
    with torch.no_grad():
        expected = _per_batch_loss(model, ce, batches)
        joined = float(ce(model(X), Y))
    assert abs(expected - joined) > 1e-4  # joining the batches would change the objective
    assert sk.keskar_sharpness(model, ce, batches, max_iter=2).loss == pytest.approx(expected, rel=1e-12)
    assert sk.adaptive_sharpness(model, ce, batches, rho=0.01, max_iter=2).loss == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_measurements_work_under_no_grad(context):
    model = mlp((4, 6, 3), seed=0)
    data = blobs(30, dim=4, classes=3)
    ce = nn.CrossEntropyLoss()
    plain = [sk.keskar_sharpness(model, ce, data, solver=s).value for s in ("lbfgsb", "apgd")]
    plain.append(sk.keskar_sharpness(model, ce, data, subspace_dim=5).value)
    plain.append(sk.adaptive_sharpness(model, ce, data, rho=0.05).value)
    with context():
        inside = [sk.keskar_sharpness(model, ce, data, solver=s).value for s in ("lbfgsb", "apgd")]
        inside.append(sk.keskar_sharpness(model, ce, data, subspace_dim=5).value)
        inside.append(sk.adaptive_sharpness(model, ce, data, rho=0.05).value)
        top = sk.eigenvalues(sk.hessian(model, ce, data), k=1).values[0]
    assert inside == plain
    assert float(top) == pytest.approx(float(sk.eigenvalues(sk.hessian(model, ce, data), k=1).values[0]), rel=1e-9)


def test_lbfgsb_reports_the_loss_of_the_point_it_returns_when_its_line_search_fails():
    # The loss overflows to inf inside the box: scipy's line search fails and goes back to an
    # earlier iterate while reporting the failed trial's value.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))
    data = (torch.randn(50, 10), torch.randn(50, 5))

    def huge_mse(out, target):
        return ((out - target) ** 2).mean() * 1e33

    res = sk.keskar_sharpness(model, huge_mse, data, epsilon=2.0, solver="lbfgsb")
    x = sk.FlatParams(model).get()
    probe = copy.deepcopy(model)
    sk.FlatParams(probe).set_(x + res.perturbation)
    with torch.no_grad():
        at_perturbation = float(huge_mse(probe(data[0]), data[1]))
    assert np.isfinite(res.max_loss)
    assert res.max_loss == pytest.approx(at_perturbation, rel=1e-6)
    assert res.info.get("reevaluated") is True


def test_lbfgsb_normal_run_does_not_reevaluate_and_info_is_json():
    model = mlp((4, 6, 3), seed=0)
    res = sk.keskar_sharpness(model, nn.CrossEntropyLoss(), blobs(30, dim=4, classes=3), solver="lbfgsb")
    assert "reevaluated" not in res.info
    assert res.num_evals == res.info["nfev"]  # scipy counts the start at y = 0 too
    json.dumps(res.info)


def test_m_sharpness_reads_only_the_examples_it_uses():
    class Loader:
        pulled = 0

        def __iter__(self):
            gen = torch.Generator().manual_seed(0)
            for _ in range(200):
                Loader.pulled += 1
                yield torch.randn(128, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (128,), generator=gen)

    model = mlp((4, 6, 3), seed=0)
    res = sk.adaptive_sharpness(model, nn.CrossEntropyLoss(), Loader(), rho=0.1, m=128, num_examples=256, max_iter=2)
    assert Loader.pulled == 2
    assert res.info["num_problems"] == 2


def test_materialize_stops_at_max_samples():
    X, Y = torch.arange(10.0).reshape(10, 1), torch.arange(10)
    batches = as_batches([(X[:4], Y[:4]), (X[4:], Y[4:])])
    xs, ys = batches.materialize(max_samples=6)
    assert ys.tolist() == [0, 1, 2, 3, 4, 5]
    assert batches.materialize()[1].tolist() == list(range(10))


def test_batches_can_be_split_again():
    X, Y = torch.zeros(10, 2), torch.zeros(10)
    assert [x.shape[0] for x, _ in as_batches(as_batches((X, Y)), batch_size=3)] == [3, 3, 3, 1]
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            as_batches(as_batches((X, Y)), batch_size=bad)


def test_mixed_parameter_dtypes_are_named():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2).double())
    with pytest.raises(ValueError, match=r"one dtype.*'1.weight'"):
        sk.FlatParams(model)


def test_numpy_and_tensor_arguments_are_accepted():
    model = mlp((4, 6, 3), seed=0)
    data = blobs(30, dim=4, classes=3)
    ce = nn.CrossEntropyLoss()
    ref = sk.keskar_sharpness(model, ce, data, epsilon=1e-3, subspace_dim=5, max_iter=3)
    for eps, p, it in ((np.float32(1e-3), np.int64(5), np.int32(3)), (torch.tensor(1e-3), torch.tensor(5), 3)):
        res = sk.keskar_sharpness(model, ce, data, epsilon=eps, subspace_dim=p, max_iter=it)
        assert res.value == pytest.approx(ref.value, rel=1e-6)


def test_seed_restarts_and_negative_loss_errors():
    model = mlp((4, 6, 3), seed=0)
    data = blobs(30, dim=4, classes=3)
    ce = nn.CrossEntropyLoss()
    for seed in (None, -1, 1.5, 2**64):  # (2**64: torch's "Overflow when unpacking long long" after the passes)
        with pytest.raises(ValueError, match="seed must be an integer in"):
            sk.keskar_sharpness(model, ce, data, seed=seed, solver="apgd", restarts=3)
        with pytest.raises(ValueError, match="seed must be an integer in"):
            sk.adaptive_sharpness(model, ce, data, rho=0.1, seed=seed, restarts=3)
    for seed in (2**63, 2**64 - 1):  # the largest seeds are seeds
        assert sk.keskar_sharpness(model, ce, data, seed=seed, solver="apgd", restarts=3, subspace_dim=2).value > 0
        assert sk.adaptive_sharpness(model, ce, data, rho=0.1, seed=seed, restarts=3, max_iter=2).value > 0
    with pytest.raises(ValueError, match="restarts"):
        sk.keskar_sharpness(model, ce, data, solver="lbfgsb", restarts=2)

    def shifted(out, target):
        return ce(out, target) - 5.0

    with pytest.raises(ValueError, match="loss > −1"):
        sk.keskar_sharpness(model, shifted, data)


@pytest.mark.parametrize("call, message", [
    (lambda m, d: sk.keskar_sharpness(m, nn.CrossEntropyLoss(), d, solver="lbfgsb", first_step="sign"),
     "first_step='sign' applies to solver='pga'/'apgd'"),
    (lambda m, d: sk.keskar_sharpness(m, nn.CrossEntropyLoss(), d, solver="lbfgsb", step_size=0.01),
     "step_size=0.01 applies to solver='pga'/'apgd'"),
    (lambda m, d: sk.adaptive_sharpness(m, nn.CrossEntropyLoss(), d, rho=0.1, kind="average", solver="pga"),
     "solver='pga' applies to kind='worst'"),
    (lambda m, d: sk.adaptive_sharpness(m, nn.CrossEntropyLoss(), d, rho=0.1, kind="average", restarts=5),
     "restarts=5 applies to kind='worst'"),
    (lambda m, d: sk.adaptive_sharpness(m, nn.CrossEntropyLoss(), d, rho=0.1, kind="average", first_step="sign"),
     "first_step='sign' applies to kind='worst'"),
    (lambda m, d: sk.adaptive_sharpness(m, nn.CrossEntropyLoss(), d, rho=0.1, norm="l2", first_step="sign"),
     "first_step='sign' applies to the box"),
    (lambda m, d: sk.adaptive_sharpness(m, nn.CrossEntropyLoss(), d, rho=0.1, num_examples=100),
     "num_examples=100 applies to m-sharpness"),
])
def test_options_a_measurement_would_ignore_are_errors(call, message):
    x, y = blobs()
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(mlp(), (x, y))


def test_defaults_given_explicitly_are_the_defaults():
    x, y = blobs()
    model = mlp()
    base = sk.adaptive_sharpness(model, nn.CrossEntropyLoss(), (x, y), rho=0.1, max_iter=3).value
    same = sk.adaptive_sharpness(model, nn.CrossEntropyLoss(), (x, y), rho=0.1, max_iter=3, solver="apgd", restarts=1,
                                 step_size=2.0, first_step="gradient").value
    assert same == base
    k = sk.keskar_sharpness(model, nn.CrossEntropyLoss(), (x, y), solver="apgd", max_iter=3)
    k2 = sk.keskar_sharpness(model, nn.CrossEntropyLoss(), (x, y), solver="apgd", max_iter=3, step_size=2.0,
                             first_step="gradient")
    assert k.value == k2.value


@pytest.mark.parametrize("measure", ["keskar", "adaptive"])
@pytest.mark.parametrize("option, value, message", [
    ("dtype", torch.int32, "dtype must be None or a floating-point torch.dtype"),
    ("dtype", "float64", "dtype must be None or a floating-point torch.dtype"),  # as sk.hessian: no names
    ("dtype", torch.complex64, "dtype must be None or a floating-point torch.dtype"),
    ("device", "foo", "device 'foo' is not usable here"),
    pytest.param("device", "cuda", "device 'cuda' is not usable here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
    ("device", "cuda:99", "device 'cuda:99' is not usable here"),
])
def test_dtype_and_device_are_checked_before_any_data_pass(measure, option, value, message):
    class Untouchable:  # data that must not be read
        def __iter__(self):
            raise AssertionError("the data were read before the arguments were checked")

    model = mlp((4, 6, 3), seed=0)
    call = sk.keskar_sharpness if measure == "keskar" else lambda *a, **k: sk.adaptive_sharpness(*a, rho=0.1, **k)
    with pytest.raises(ValueError, match=message):
        call(model, nn.CrossEntropyLoss(), Untouchable(), **{option: value})
    if value == "foo":  # also where the ascent's precision is checked against the device first
        with pytest.raises(ValueError, match=message):
            call(model.float(), nn.CrossEntropyLoss(), Untouchable(), solver="apgd", ascent_dtype="bfloat16",
                 device=value)


def test_dtype_and_device_given_explicitly():
    model = mlp((4, 6, 3), seed=0)
    data = blobs(30, dim=4, classes=3)
    ce = nn.CrossEntropyLoss()
    for call in (lambda **kw: sk.keskar_sharpness(model, ce, data, solver="apgd", max_iter=3, **kw),
                 lambda **kw: sk.adaptive_sharpness(model, ce, data, rho=0.1, max_iter=3, **kw)):
        ref = call()
        assert call(device="cpu", dtype=torch.float64).value == ref.value
        assert call(device=torch.device("cpu"), dtype=torch.float32).value == pytest.approx(ref.value, rel=1e-3)


def test_a_model_without_trainable_parameters_is_named_first():
    model = mlp((4, 6, 3), seed=0).requires_grad_(False)
    data = blobs(30, dim=4, classes=3)
    for subspace_dim in (None, 1):  # not "subspace_dim must be at most ... n=0"
        with pytest.raises(ValueError, match="the model has no parameters with requires_grad=True"):
            sk.keskar_sharpness(model, nn.CrossEntropyLoss(), data, subspace_dim=subspace_dim)
