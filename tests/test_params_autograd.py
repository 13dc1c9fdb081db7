"""A measurement leaves the model's tensors untouched: a backward() pending from before it works.

A researcher who logs sharpness in the middle of a training step computes the loss, measures, then
calls ``loss.backward()``.  That backward needs the tensors its graph saved (the weights, and a
train-mode BatchNorm's running statistics) at the version they had: a measurement may not write
them, not even to put back the values they already hold.
"""
import math

import pytest
import torch
from torch import nn

import sharpkit as sk
from sharpkit.params import measurement_mode, preserved

CE = nn.CrossEntropyLoss()


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN payloads and the sign of zero count), independent of sharpkit's."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.detach(), b.detach()
    if a.is_floating_point():
        ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, b = a.view(ints), b.view(ints)
    return torch.equal(a, b)


def _model(batchnorm: bool) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(6, 8)] + ([nn.BatchNorm1d(8)] if batchnorm else []) + [nn.ReLU(), nn.Dropout(0.2),
                                                                                nn.Linear(8, 3)]
    return nn.Sequential(*layers)


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)


def _keskar(solver):
    def run(model, data, bn):
        return sk.keskar_sharpness(model, CE, data, epsilon=1e-2, solver=solver, max_iter=3, bn=bn).value
    return run


def _adaptive(model, data, bn):
    return sk.adaptive_sharpness(model, CE, data, rho=0.05, max_iter=3, bn=bn).value


def _hessian(model, data, bn):
    H = sk.hessian(model, CE, data, bn=bn)
    v = torch.linspace(-1.0, 1.0, H.n)
    Hv = H @ v
    lam = sk.eigenvalues(H, k=1, tol=1e-2).values
    return float(Hv.norm()), float(lam[0])


MEASUREMENTS = {
    "keskar_lbfgsb": _keskar("lbfgsb"),
    "keskar_apgd": _keskar("apgd"),
    "adaptive": _adaptive,
    "hessian_eigenvalues": _hessian,
}


def _state(model: nn.Module):
    """Everything a measurement must leave as it was: tensor objects, their bits and flags."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return ([(name, t, t.detach().clone(), t.requires_grad) for name, t in tensors],
            [m.training for m in model.modules()])


def _assert_same_state(model: nn.Module, state) -> None:
    tensors, training = state
    now = list(model.named_parameters()) + list(model.named_buffers())
    assert [n for n, _ in now] == [n for n, *_ in tensors]
    for (name, t), (_, t0, saved, requires_grad) in zip(now, tensors):
        assert t is t0, f"{name} was replaced"
        assert _bits_equal(t, saved), f"{name} changed"
        assert t.requires_grad == requires_grad, f"{name}.requires_grad changed"
    assert [m.training for m in model.modules()] == training


@pytest.mark.parametrize("measure", sorted(MEASUREMENTS))
@pytest.mark.parametrize("bn", ["eval", "train"])
@pytest.mark.parametrize("batchnorm", [False, True], ids=["mlp", "mlp_bn"])
def test_backward_pending_from_before_a_measurement(measure, bn, batchnorm):
    data = _data()
    x, y = data

    reference = _model(batchnorm).train()
    torch.manual_seed(5)  # the same dropout mask in both models
    CE(reference(x), y).backward()

    model = _model(batchnorm).train()
    torch.manual_seed(5)
    loss = CE(model(x), y)
    state = _state(model)
    value = MEASUREMENTS[measure](model, data, bn)
    assert all(math.isfinite(v) for v in (value if isinstance(value, tuple) else (value,)))
    _assert_same_state(model, state)

    loss.backward()  # failed with "modified by an inplace operation"
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad), name


@pytest.mark.parametrize("bn", ["eval", "train"])
def test_measurement_gives_the_same_value_with_a_pending_graph(bn):
    data = _data()
    plain = _model(True).train()
    plain(data[0])  # the same running statistics as the model below
    expected = _keskar("apgd")(plain, data, bn)
    model = _model(True).train()
    loss = CE(model(data[0]), data[1])
    assert _keskar("apgd")(model, data, bn) == expected
    loss.backward()


def test_preserved_keeps_the_version_of_tensors_left_as_they_were():
    model = _model(True)
    tensors = list(model.parameters()) + list(model.buffers())
    versions = [t._version for t in tensors]
    with preserved(model):
        model.eval()
        model(torch.randn(4, 6))
    assert [t._version for t in tensors] == versions


def test_preserved_restores_changed_tensors_bit_for_bit():
    model = _model(True).train()
    w, b = model[0].weight, model[0].bias
    mean, count = model[1].running_mean, model[1].num_batches_tracked
    with torch.no_grad():
        w[0, 0] = -0.0  # equal to 0.0 under ==, not bitwise
        b[0] = float("nan")
        b[1] = float("nan")
        b.view(torch.int32)[1] |= 1  # another NaN payload
    before = [t.detach().clone() for t in (w, b, mean, count)]
    with preserved(model):
        with torch.no_grad():
            w[0, 0] = 0.0
            b.view(torch.int32)[0] |= 2  # NaN -> another NaN
            b[1] = float("nan")  # the canonical NaN, unlike the one saved
        model(torch.randn(4, 6))  # updates the running statistics
    for t, s in zip((w, b, mean, count), before):
        assert _bits_equal(t, s)
    assert w.detach().view(torch.int32)[0, 0] == torch.tensor(-0.0).view(torch.int32)


def test_same_bits_is_bitwise():
    from sharpkit.params import same_bits

    a = torch.tensor([0.0, float("nan"), 1.0], dtype=torch.float64)
    assert same_bits(a, a.clone())
    assert not same_bits(a, torch.tensor([-0.0, float("nan"), 1.0], dtype=torch.float64))
    assert not same_bits(a, a.float())
    assert not same_bits(a, a[:2].clone())
    c = torch.tensor([1 + 2j, float("nan")], dtype=torch.complex128)
    assert same_bits(c, c.clone())
    assert not same_bits(c, torch.tensor([1 - 2j, float("nan")], dtype=torch.complex128))
    h = torch.tensor([float("nan"), -0.0], dtype=torch.bfloat16)
    assert same_bits(h, h.clone())
    assert not same_bits(h, torch.tensor([float("nan"), 0.0], dtype=torch.bfloat16))
    i = torch.arange(5)
    assert same_bits(i, i.clone()) and not same_bits(i, i + 1)
    t = torch.ones(3, 4).t()  # strides do not matter, only values
    assert same_bits(t, t.contiguous())


def test_batch_statistics_update_copies_of_the_running_buffers():
    model = _model(True)
    bn = model[1]
    own = dict(bn._buffers)
    versions = {k: t._version for k, t in own.items()}
    values = {k: t.clone() for k, t in own.items()}
    with measurement_mode(model, "train"):
        assert all(bn._buffers[k] is not t for k, t in own.items())
        model(torch.randn(4, 6))
        assert int(bn.num_batches_tracked) == 1  # the forward did update (its copies)
    assert all(bn._buffers[k] is t for k, t in own.items())
    assert {k: t._version for k, t in own.items()} == versions
    assert all(torch.equal(own[k], values[k]) for k in own)


def test_private_running_statistics_keeps_a_shared_buffer_shared():
    from sharpkit.params import private_running_statistics

    a, b = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    b.running_mean = a.running_mean  # one tensor, two modules
    model = nn.Sequential(a, b)
    own = a.running_mean
    with private_running_statistics(model):
        assert a.running_mean is b.running_mean and a.running_mean is not own
    assert a.running_mean is own and b.running_mean is own


def test_private_running_statistics_puts_the_buffers_back_after_an_error():
    from sharpkit.params import private_running_statistics

    model = _model(True)
    own = dict(model[1]._buffers)
    with pytest.raises(RuntimeError, match="boom"):
        with private_running_statistics(model):
            raise RuntimeError("boom")
    assert all(model[1]._buffers[k] is t for k, t in own.items())


# -- data made under torch.inference_mode() ----------------------------------------------------------


def _inference_copy(data):
    with torch.inference_mode():
        return tuple(t.clone() for t in data)


INFERENCE_MEASUREMENTS = {
    **MEASUREMENTS,
    "hessian_generic": lambda model, data, bn: (sk.hessian(model, CE, data, engine="generic")
                                                @ torch.linspace(-1.0, 1.0, 83)).tolist(),
    "ggn": lambda model, data, bn: (sk.ggn(model, CE, data) @ torch.linspace(-1.0, 1.0, 83)).tolist(),
    "adaptive_m": lambda model, data, bn: sk.adaptive_sharpness(model, CE, data, rho=0.05, m=8, max_iter=3).value,
}


@pytest.mark.parametrize("measure", sorted(INFERENCE_MEASUREMENTS))
def test_measurements_on_inference_mode_data(measure):
    data = _data()
    inference = _inference_copy(data)
    assert all(t.is_inference() for t in inference)
    model = _model(False)  # 83 parameters
    expected = INFERENCE_MEASUREMENTS[measure](model, data, "eval")
    # failed with "Inference tensors cannot be saved for backward"
    assert INFERENCE_MEASUREMENTS[measure](model, inference, "eval") == expected
    batches = [tuple(t[i:i + 8] for t in inference) for i in range(0, 32, 8)]
    assert all(math.isfinite(v) for v in torch.tensor(INFERENCE_MEASUREMENTS[measure](model, batches, "eval"))
               .reshape(-1).tolist())
    with torch.inference_mode():  # the caller still in inference mode
        assert INFERENCE_MEASUREMENTS[measure](model, inference, "eval") == expected


def test_to_device_copies_only_inference_tensors():
    from sharpkit.data import to_device

    x, y = _data()
    assert all(a is b for a, b in zip(to_device((x, y), "cpu"), (x, y)))  # normal tensors: no copy
    xi, yi = _inference_copy((x, y))
    for inside in (False, True):
        with torch.inference_mode(inside):
            out = to_device((xi, yi), "cpu")
        assert not any(t.is_inference() for t in out)
        assert torch.equal(out[0], x) and torch.equal(out[1], y) and out[1].dtype == y.dtype
    x64, _ = to_device((xi, yi), "cpu", torch.float64)
    assert not x64.is_inference() and x64.dtype == torch.float64
