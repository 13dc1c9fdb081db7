"""Every measurement leaves the model exactly as it found it, and measures the model as it is.

Black-box checks through the public API on unusual models (parametrizations, weight and spectral
norm in both of torch's forms, tied and shared weights, frozen parameters, BatchNorm with a
cumulative average, parameters and frozen parts of mixed precision, forward hooks that keep
state), with bn="eval" and bn="train", also when the measurement stops midway; and the numbers
against float64 references written out by hand.
"""
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

import sharpkit as sk
from sharpkit.params import FlatParams

CE = nn.CrossEntropyLoss()
_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return (t.view(_INTS[t.element_size()]) if t.is_floating_point() else t).clone()


def _data(n: int = 24, d: int = 5, c: int = 3, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g)
    return [(x[i:i + 8], y[i:i + 8]) for i in range(0, n, 8)]


DATA = _data()


class _Tap(nn.Module):
    """Keeps its last input and counts its calls (a feature-extraction module)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        self.last = x
        return x


def _mlp(momentum=0.1, width=6) -> nn.Sequential:
    return nn.Sequential(nn.Linear(5, width), nn.BatchNorm1d(width, momentum=momentum), nn.Tanh(), nn.Dropout(0.3),
                         nn.Linear(width, 3))


def _build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "bn_cumulative":
        m = _mlp(momentum=None)
    elif kind == "orthogonal":
        m = _mlp(width=5)
        torch.nn.utils.parametrizations.orthogonal(m[0])
    elif kind == "spectral_norm":
        m = _mlp()
        torch.nn.utils.parametrizations.spectral_norm(m[0])
    elif kind == "old_spectral_norm":
        m = _mlp()
        torch.nn.utils.spectral_norm(m[0])
    elif kind == "old_weight_norm":
        m = _mlp()
        torch.nn.utils.weight_norm(m[0])
    elif kind == "tied":
        m = nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3))
        m[3].weight = m[0].weight
    elif kind == "shared_module":
        lin = nn.Linear(5, 5)
        m = nn.Sequential(lin, nn.BatchNorm1d(5), nn.Tanh(), lin, nn.Tanh(), nn.Linear(5, 3))
    elif kind == "frozen":
        m = _mlp()
        m[0].weight.requires_grad_(False)
        m[1].bias.requires_grad_(False)
    elif kind == "tap":
        m = nn.Sequential(nn.Linear(5, 6), _Tap(), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    else:
        raise KeyError(kind)
    m.register_buffer("scratch", torch.arange(3.0), persistent=False)
    m.train()
    m(torch.randn(16, 5, generator=torch.Generator().manual_seed(3)))  # running statistics, spectral u
    return m


def _snapshot(model: nn.Module):
    """Every tensor the model holds (parameters, buffers, tensor attributes such as the older
    weight norm's ``weight``): object, bits, storage, requires_grad and .grad; module flags and
    attributes."""
    tensors = {}
    modules = []
    for name, m in model.named_modules(remove_duplicate=False):
        attrs = {k: v for k, v in vars(m).items() if isinstance(v, (torch.Tensor, int, float, bool))}
        modules.append((name, m, m.training, dict(m._parameters), dict(m._buffers), attrs))
        for t in [*m._parameters.values(), *m._buffers.values(), *(v for v in attrs.values()
                                                                    if isinstance(v, torch.Tensor))]:
            if t is not None and id(t) not in tensors:
                tensors[id(t)] = (t, _bits(t), t.data_ptr(), t.requires_grad,
                                  None if t.grad is None else (t.grad, _bits(t.grad)))
    return modules, tensors


def _differences(model: nn.Module, snapshot) -> list[str]:
    modules, tensors = snapshot
    out = []
    now = list(model.named_modules(remove_duplicate=False))
    if [n for n, _ in now] != [n for n, *_ in modules]:
        return ["modules changed"]
    for (name, m, training, params, buffers, attrs), (_, m2) in zip(modules, now):
        if m2 is not m or m.training != training:
            out.append(f"{name!r}: module or training flag")
        for kind, old, new in (("parameter", params, m._parameters), ("buffer", buffers, m._buffers)):
            if set(old) != set(new) or any(new[k] is not v for k, v in old.items()):
                out.append(f"{name!r}: {kind} objects")
        now_attrs = {k: v for k, v in vars(m).items() if isinstance(v, (torch.Tensor, int, float, bool))}
        if set(now_attrs) != set(attrs) or any(now_attrs[k] is not v and (isinstance(v, torch.Tensor) or now_attrs[k] != v)
                                               for k, v in attrs.items()):
            out.append(f"{name!r}: attributes {sorted(set(now_attrs) ^ set(attrs)) or 'changed'}")
    for t, bits, ptr, requires_grad, grad in tensors.values():
        if not torch.equal(_bits(t), bits) or t.data_ptr() != ptr or t.requires_grad != requires_grad:
            out.append(f"tensor {tuple(t.shape)}: values, storage or requires_grad")
        if (grad is None) != (t.grad is None) or (grad is not None and (t.grad is not grad[0]
                                                                          or not torch.equal(_bits(t.grad), grad[1]))):
            out.append(f"tensor {tuple(t.shape)}: .grad")
    return out


def _n(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _measurements(bn: str, loss=CE):
    return {
        "ggn_generic": lambda m: sk.ggn(m, loss, DATA, bn=bn, engine="generic") @ torch.linspace(-1, 1, _n(m)),
        "hessian_top_eigenvalue": lambda m: sk.eigenvalues(sk.hessian(m, loss, DATA, bn=bn), k=1, tol=1e-2).values,
        "keskar_lbfgsb": lambda m: sk.keskar_sharpness(m, loss, DATA, epsilon=1e-2, max_iter=2, bn=bn).value,
        "keskar_subspace_apgd": lambda m: sk.keskar_sharpness(m, loss, DATA, epsilon=1e-2, subspace_dim=3,
                                                              solver="apgd", max_iter=2, bn=bn).value,
        "adaptive_m": lambda m: sk.adaptive_sharpness(m, loss, DATA, rho=0.05, m=8, max_iter=2, bn=bn).value,
    }


UNUSUAL = ["bn_cumulative", "orthogonal", "spectral_norm", "old_spectral_norm", "tied", "shared_module", "frozen",
           "tap"]


@pytest.mark.parametrize("bn", ["eval", "train"])
@pytest.mark.parametrize("kind", UNUSUAL)
def test_unusual_models_are_left_exactly_as_found(kind, bn):
    for name, measure in _measurements(bn).items():
        model = _build(kind)
        trainable = [p for p in model.parameters() if p.requires_grad]
        trainable[-1].grad = torch.full_like(trainable[-1], 0.25)  # an existing .grad keeps its values
        fired = []
        model.register_forward_hook(lambda *args: fired.append(1))
        snapshot = _snapshot(model)
        value = measure(model)
        assert bool(torch.isfinite(torch.as_tensor(value)).all()), name
        assert _differences(model, snapshot) == [], name
        fired.clear()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # still drives the model's own tensors
        before = trainable[-1].detach().clone()
        model.eval()
        model(DATA[0][0])
        assert fired == [1], name
        optimizer.step()
        assert torch.equal(trainable[-1].detach(), before - 0.5 * 0.25), name


class _Stop(Exception):
    pass


def _raising_loss(at: int, exc: type):
    calls = [0]

    def loss(outputs, targets):
        calls[0] += 1
        if calls[0] >= at:  # (from then on: a probe that tolerates a failing loss meets the next call)
            raise exc("stop")
        return F.cross_entropy(outputs, targets)

    return loss


@pytest.mark.parametrize("exc", [_Stop, KeyboardInterrupt])
@pytest.mark.parametrize("kind", ["spectral_norm", "tap"])
def test_a_measurement_stopped_midway_leaves_the_model_as_found(kind, exc):
    for bn in ("eval", "train"):
        for name in _measurements(bn):
            stopped = 0
            for at in (2, 8):  # (in the set-up's probes, or in the measurement's passes)
                model = _build(kind)
                snapshot = _snapshot(model)
                try:
                    _measurements(bn, _raising_loss(at, exc))[name](model)
                except exc:
                    stopped += 1
                assert _differences(model, snapshot) == [], (name, at, bn)
            assert stopped, name


# -- the state that torch keeps outside parameters and buffers ----------------------------------------


@pytest.mark.parametrize("kind", ["old_weight_norm", "old_spectral_norm", "tap"])
def test_tensor_attributes_and_counters_are_put_back(kind):
    """The older weight_norm / spectral_norm hooks compute ``module.weight`` into the module at
    every forward, and a module may keep its last input and count its calls: after a measurement
    they were the measurement's (a weight at a perturbed point, carrying its autograd graph)."""
    for measure in (lambda m: sk.ggn(m, CE, DATA, engine="generic") @ torch.ones(_n(m)),
                    lambda m: sk.keskar_sharpness(m, CE, DATA, solver="apgd", max_iter=2, epsilon=1e-2)):
        model = _build(kind)
        module = model[1] if kind == "tap" else model[0]
        name = "last" if kind == "tap" else "weight"
        kept, bits = getattr(module, name), _bits(getattr(module, name))
        calls = getattr(module, "calls", None)
        measure(model)
        assert getattr(module, name) is kept and torch.equal(_bits(kept), bits)
        assert getattr(module, "calls", None) == calls


def test_an_attribute_set_during_a_measurement_is_removed():
    model = nn.Sequential(nn.Linear(5, 6), _Tap(), nn.Linear(6, 3))  # never run: no 'last' yet
    sk.keskar_sharpness(model, CE, DATA, solver="apgd", max_iter=2)
    assert not hasattr(model[1], "last") and model[1].calls == 0


def test_a_buffer_written_by_a_hook_holding_it_is_restored_by_products():
    """A pre-hook that writes a buffer it holds (not looked up through the module, so
    functional_call's copies do not shield it): Hessian products stopped with "wrote to 'seen' in
    place during a read-only measurement" and left the buffer written."""
    torch.manual_seed(0)
    model = _mlp()
    seen = torch.zeros((), dtype=torch.int64)
    model.register_buffer("seen", seen)
    model.register_forward_pre_hook(lambda module, args: seen.add_(1) and None)
    v = torch.linspace(-1, 1, _n(model))
    H = sk.hessian(model, CE, DATA, engine="generic")
    first = H @ v
    assert int(seen) == 0
    assert torch.equal(H @ v, first)
    assert torch.equal(sk.ggn(model, CE, DATA) @ v, sk.ggn(model, CE, DATA) @ v) and int(seen) == 0


def test_a_parameter_written_in_place_by_the_forward_is_still_named():
    class Writes(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)
            self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)
            frozen = self.frozen

            def hook(module, args):
                with torch.no_grad():
                    frozen.mul_(1.0)  # the object itself, not the measurement's copy

            self.register_forward_pre_hook(hook)

        def forward(self, x):
            return self.lin(x) * self.frozen

    with pytest.raises(RuntimeError, match="'frozen' in place"):
        sk.hessian(Writes(), CE, DATA, engine="generic") @ torch.ones(18)


# -- the caller's autocast and parametrization cache ------------------------------------------------


def test_a_callers_autocast_does_not_change_the_numbers():
    """Measured inside a training step's torch.autocast(bfloat16): ε-sharpness 14 % and adaptive
    sharpness 11 % off, the Hessian 1.2 %, and the fused engine stopped with a dtype error."""
    torch.manual_seed(0)
    model = _mlp()
    model(DATA[0][0])
    v = torch.linspace(-1, 1, _n(model))
    measures = {
        "keskar": lambda: sk.keskar_sharpness(model, CE, DATA, epsilon=1e-3).value,
        "adaptive": lambda: sk.adaptive_sharpness(model, CE, DATA, rho=0.01, max_iter=3).value,
        "hessian_generic": lambda: (sk.hessian(model, CE, DATA, engine="generic") @ v).tolist(),
        "hessian_fused": lambda: (sk.hessian(model, CE, DATA, engine="fused") @ v).tolist(),
        "interpolate": lambda: sk.interpolate(model, model, CE, DATA, alphas=[0.0]).loss.tolist(),
    }
    expected = {k: f() for k, f in measures.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = {k: f() for k, f in measures.items()}
        assert torch.is_autocast_enabled("cpu")  # the caller's region is still on
    assert got == expected


def test_ascent_dtype_still_runs_in_low_precision_under_a_callers_autocast():
    torch.manual_seed(0)
    model = _mlp()
    run = lambda dtype: sk.keskar_sharpness(model, CE, DATA, epsilon=0.2, solver="apgd", max_iter=3,  # noqa: E731
                                            ascent_dtype=dtype)
    expected, full = run("bfloat16"), run(None)
    assert expected.max_loss != full.max_loss  # (the bfloat16 steps reach another point)
    with torch.autocast("cpu", dtype=torch.float16):
        got = run("bfloat16")
    assert got.max_loss == expected.max_loss and got.info["ascent_dtype"] == "bfloat16"


def test_parametrize_cache_does_not_freeze_the_measured_weight():
    """Under parametrize.cached() the orthogonal weight was computed once, from the model's own
    tensors, and reused at every point the measurement evaluated: Hessian products 74 % off,
    ε-sharpness 0.954 instead of 1.212."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3))
    torch.nn.utils.parametrizations.orthogonal(model[0])
    v = torch.linspace(-1, 1, _n(model))
    hv = sk.hessian(model, CE, DATA, engine="generic") @ v
    keskar = sk.keskar_sharpness(model, CE, DATA, solver="apgd", max_iter=3, epsilon=1e-2).value
    with parametrize.cached():
        model(DATA[0][0])
        cache = dict(parametrize._cache)
        assert torch.equal(sk.hessian(model, CE, DATA, engine="generic") @ v, hv)
        assert sk.keskar_sharpness(model, CE, DATA, solver="apgd", max_iter=3, epsilon=1e-2).value == keskar
        assert parametrize._cache == cache and parametrize._cache_enabled == 1  # the caller's cache kept
    assert parametrize._cache_enabled == 0


# -- parts of mixed precision --------------------------------------------------------------------------


class _MixedNet(nn.Module):
    """A float32 body and a float64 head; the model casts between them itself."""

    def __init__(self, head_trainable: bool):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(5, 4)
        self.head = nn.Linear(4, 3).double().requires_grad_(head_trainable)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)).double())


def _mixed_reference(model: _MixedNet):
    """The objective as a function of the float64 trainable vector, written out by hand."""
    W1, b1 = model.body.weight.detach().double(), model.body.bias.detach().double()
    W2, b2 = model.head.weight.detach().double(), model.head.bias.detach().double()
    trainable_head = model.head.weight.requires_grad

    def f(x):
        w1, c1 = x[:20].view(4, 5), x[20:24]
        w2, c2 = (x[24:36].view(3, 4), x[36:39]) if trainable_head else (W2, b2)
        losses = [F.cross_entropy(torch.tanh(xb.double() @ w1.T + c1) @ w2.T + c2, yb) for xb, yb in DATA]
        return sum(losses) / len(losses)

    x0 = torch.cat([W1.reshape(-1), b1] + ([W2.reshape(-1), b2] if trainable_head else []))
    return f, x0


def test_a_frozen_part_of_another_precision_keeps_it():
    """A frozen float64 head on a float32 body (the model casts between them itself) was cast to
    float32 for the measurement: every measurement stopped with "mat1 and mat2 must have the same
    dtype"."""
    model = _MixedNet(head_trainable=False)
    f, x0 = _mixed_reference(model)
    H = torch.autograd.functional.hessian(f, x0)
    v = torch.linspace(-1, 1, x0.numel(), dtype=torch.float64)
    for engine in ("generic", "auto"):
        hv = sk.hessian(model, CE, DATA, engine=engine, dtype=torch.float64) @ v
        torch.testing.assert_close(hv, H @ v, rtol=1e-9, atol=1e-12)
    hv32 = sk.hessian(model, CE, DATA) @ v.float()  # in the model's own precision
    torch.testing.assert_close(hv32.double(), H @ v, rtol=2e-5, atol=1e-6)
    gv = sk.ggn(model, CE, DATA, engine="generic") @ v.float()
    assert bool(torch.isfinite(gv).all())

    res = sk.keskar_sharpness(model, CE, DATA, epsilon=1e-2, max_iter=3)
    assert math.isclose(res.loss, float(f(x0)), rel_tol=1e-6)  # (the body rounds in float32)
    assert math.isclose(res.max_loss, float(f(x0 + res.perturbation.double())), rel_tol=1e-6)
    res = sk.adaptive_sharpness(model, CE, DATA, rho=0.05, max_iter=3)
    assert math.isclose(res.max_loss, float(f(x0 + res.perturbation.double())), rel_tol=1e-6)
    assert model.body.weight.dtype == torch.float32 and model.head.weight.dtype == torch.float64


def test_trainable_parameters_of_two_precisions_are_refused_with_a_way_out():
    model = _MixedNet(head_trainable=True)
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"one dtype.*'head.weight' is torch.float64.*copy"):
        sk.keskar_sharpness(model, CE, DATA)
    assert _differences(model, snapshot) == []


@pytest.mark.parametrize("bn", ["eval", "train"])
def test_a_model_built_under_inference_mode_is_measured(bn):
    """Its parameters and buffers are inference tensors: products stopped with "Inference tensors
    do not track version counter", sharpness with "Inference tensors cannot be saved for
    backward"."""
    def build():
        torch.manual_seed(0)
        return _mlp()

    plain = build()
    with torch.inference_mode():
        model = build()
    assert model[0].weight.is_inference()
    for name, measure in _measurements(bn).items():
        assert torch.equal(torch.as_tensor(measure(model)), torch.as_tensor(measure(plain))), name
    assert model[0].weight.is_inference() and torch.equal(model[0].weight, plain[0].weight)
