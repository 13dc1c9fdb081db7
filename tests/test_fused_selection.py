"""engine="auto" must not pick the fused engine where calling the model or the loss runs anything
the fused engine does not write out (it never calls the modules): hooks (per module, global, on the
loss module), a forward or call machinery replaced on a subclass or on the instance, a Sequential
that iterates its children otherwise.  Each case: the fused engine is refused with the reason,
"auto" falls back to the generic engine, and the products match the explicit float64 Hessian/GGN
of what the model computes."""
import pytest
import torch
from torch import nn

import sharpkit as sk
from sharpkit.curvature.fused import fused_support

RTOL = 1e-6


def explicit(model, loss_fn, X, Y, kind):
    """(n, n) float64 Hessian (autograd double backward) or J^T H_z J of loss_fn(model(X), Y) in the
    trainable parameters, through the modules' own calls (hooks and overrides run)."""
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.cat([p.detach().reshape(-1) for p in params])

    def outputs(xx):
        tensors, o = {}, 0
        for (name, p) in ((n, p) for n, p in model.named_parameters() if p.requires_grad):
            tensors[name] = xx[o:o + p.numel()].view_as(p)
            o += p.numel()
        return torch.func.functional_call(model, tensors, (X,))

    if kind == "hessian":
        return torch.autograd.functional.hessian(lambda xx: loss_fn(outputs(xx), Y), x)
    z = outputs(x).detach()
    J = torch.autograd.functional.jacobian(outputs, x).reshape(z.numel(), x.numel())
    Hz = torch.autograd.functional.hessian(lambda zz: loss_fn(zz.view_as(z), Y), z.reshape(-1))
    return J.T @ Hz.reshape(z.numel(), z.numel()) @ J


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()


class Doubled(nn.Linear):
    def __call__(self, x):
        return super().__call__(x) * 2


class DoubledImpl(nn.Linear):
    def _call_impl(self, *args, **kwargs):
        return super()._call_impl(*args, **kwargs) * 2


class Reversed(nn.Sequential):
    def __iter__(self):
        return iter(list(self._modules.values())[::-1])


def _fwd_hook(model, loss_fn):
    model[1].register_forward_hook(lambda m, i, o: o * 2)
    return model, loss_fn, "'1' (Tanh) has forward hooks"


def _bwd_hook(model, loss_fn):
    model[1].register_full_backward_hook(lambda m, gi, go: (gi[0] * 5,))
    return model, loss_fn, "'1' (Tanh) has backward hooks"


def _loss_hook(model, loss_fn):
    loss_fn.register_forward_hook(lambda m, i, o: o * 3)
    return model, loss_fn, "loss_fn CrossEntropyLoss has forward hooks"


def _loss_pre_hook(model, loss_fn):
    loss_fn.register_forward_pre_hook(lambda m, i: (i[0] * 2, i[1]))
    return model, loss_fn, "loss_fn CrossEntropyLoss has forward hooks"


def _instance_forward(model, loss_fn):
    model[1].forward = lambda x: torch.tanh(x) * 2
    return model, loss_fn, "'1' (Tanh) overrides forward()"


def _loss_instance_forward(model, loss_fn):
    loss_fn.forward = lambda a, b: nn.functional.cross_entropy(a * 2, b)
    return model, loss_fn, "loss_fn CrossEntropyLoss overrides forward()"


def _call_override(model, loss_fn):
    model[0] = Doubled(4, 5).double()
    return model, loss_fn, "'0' (Doubled) overrides forward()"


def _call_impl_override(model, loss_fn):
    model[0] = DoubledImpl(4, 5).double()
    return model, loss_fn, "'0' (DoubledImpl) overrides forward()"


def _sequential_iter(model, loss_fn):
    inner = Reversed(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).double()
    return nn.Sequential(inner, nn.Linear(4, 3)).double().eval(), loss_fn, "'0' (Reversed) overrides forward()"


CASES = {f.__name__[1:]: f for f in (_fwd_hook, _bwd_hook, _loss_hook, _loss_pre_hook, _instance_forward,
                                      _loss_instance_forward, _call_override, _call_impl_override, _sequential_iter)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_auto_falls_back_where_calling_the_modules_does_more(case):
    model, loss_fn, words = CASES[case](mlp(), nn.CrossEntropyLoss())
    reason = fused_support(model, loss_fn)
    assert reason is not None and words in reason, reason
    X, Y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    for kind, build in (("hessian", sk.hessian), ("ggn", sk.ggn)):
        H = explicit(model, loss_fn, X, Y, kind)
        V = torch.randn(H.shape[0], 3, dtype=torch.float64)
        op = build(model, loss_fn, (X, Y), engine="auto")
        assert op.engine_info["engine"] == "generic" and words in op.engine_info["why_not_fused"]
        assert ((op @ V - H @ V).norm() / (H @ V).norm()).item() < RTOL
        with pytest.raises(ValueError, match="not possible"):
            build(model, loss_fn, (X, Y), engine="fused")


@pytest.mark.filterwarnings("ignore:Full backward hook")
@pytest.mark.parametrize("kind", ["forward", "forward_pre", "backward"])
def test_global_module_hooks_rule_out_the_fused_engine(kind):
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    register = getattr(nn.modules.module, f"register_module_{kind}_hook" if kind != "backward"
                       else "register_module_full_backward_hook")
    if kind == "forward":
        hook = register(lambda m, i, o: o * 2 if isinstance(m, nn.Tanh) else None)
    elif kind == "forward_pre":
        hook = register(lambda m, i: (i[0] * 3,) if isinstance(m, nn.Linear) else None)
    else:
        hook = register(lambda m, gi, go: (gi[0] * 5,) if isinstance(m, nn.Tanh) else None)
    try:
        assert "global module" in fused_support(model, loss_fn)
        X, Y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
        H = explicit(model, loss_fn, X, Y, "hessian")
        V = torch.randn(H.shape[0], 2, dtype=torch.float64)
        op = sk.hessian(model, loss_fn, (X, Y), engine="auto")
        assert op.engine_info["engine"] == "generic" and "global module" in op.engine_info["why_not_fused"]
        assert ((op @ V - H @ V).norm() / (H @ V).norm()).item() < RTOL
    finally:
        hook.remove()
    assert fused_support(model, loss_fn) is None


def test_standard_models_and_frozen_parametrizations_still_take_the_fused_engine():
    # (no false alarms: a plain model, ReLU(inplace), Dropout, Identity, nested Sequentials, a frozen
    # parametrized weight, which is a constant of the map)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Identity(),
                          nn.Sequential(nn.Sequential(nn.Linear(5, 5), nn.SiLU(inplace=True))), nn.Linear(5, 3))
    model = model.double().eval()
    torch.nn.utils.parametrizations.weight_norm(model[0])
    for p in model[0].parametrizations.weight.parameters():
        p.requires_grad_(False)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    assert fused_support(model, loss_fn) is None
    X, Y = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    for kind, build in (("hessian", sk.hessian), ("ggn", sk.ggn)):
        H = explicit(model, loss_fn, X, Y, kind)
        V = torch.randn(H.shape[0], 2, dtype=torch.float64)
        op = build(model, loss_fn, (X, Y), engine="auto")
        assert op.engine_info["engine"] == "fused"
        assert ((op @ V - H @ V).norm() / (H @ V).norm()).item() < RTOL
