"""Weight norm: torch differentiates torch._weight_norm twice wrongly, so a Hessian through a
trainable weight norm is refused by name; the GGN (first derivatives only) and a frozen weight norm
are measured, against float64 references."""
import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrizations

import sharpkit as sk
from sharpkit.params import FlatParams


def _model(style: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    if style == "parametrization":
        parametrizations.weight_norm(model[2])
    else:
        with pytest.warns(FutureWarning):  # torch.nn.utils.weight_norm is deprecated in favour of the above
            torch.nn.utils.weight_norm(model[2])
    return model


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(9, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (9,), generator=g)


def _loss_of(model, x, y):
    flat = FlatParams(model)
    fixed = {n: t.detach() for n, t in list(model.named_parameters()) + list(model.named_buffers())
             if n not in flat.names}

    def outputs(v):
        return functional_call(model, {**fixed, **flat.as_dict(v)}, (x,))

    return flat, outputs


@pytest.mark.parametrize("style", ["parametrization", "hook"])
@pytest.mark.parametrize("engine", ["auto", "generic"])
def test_hessian_through_a_trainable_weight_norm_is_refused(style, engine):
    model = _model(style)
    with pytest.raises(ValueError, match=r"2\.weight is under a weight norm with trainable factors.*sk\.ggn"):
        sk.hessian(model, nn.CrossEntropyLoss(), _data(), engine=engine)


@pytest.mark.parametrize("style", ["parametrization", "hook"])
def test_ggn_through_a_weight_norm_is_the_explicit_ggn(style):
    model = _model(style)
    x, y = _data()
    flat, outputs = _loss_of(model, x, y)
    v0 = flat.get().detach()
    J = torch.autograd.functional.jacobian(outputs, v0)  # (N, C, n)
    p = torch.softmax(outputs(v0), 1).detach()
    H_out = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # cross-entropy's Hessian in the logits
    explicit = torch.einsum("bci,bcd,bdj->ij", J, H_out, J) / x.shape[0]
    got = sk.ggn(model, nn.CrossEntropyLoss(), (x, y)).dense()
    assert torch.allclose(got, explicit, rtol=1e-10, atol=1e-12)


def test_hessian_with_a_frozen_weight_norm_is_measured():
    model = _model("parametrization")
    for t in model[2].parametrizations.weight.parameters():
        t.requires_grad_(False)
    x, y = _data()
    flat, outputs = _loss_of(model, x, y)
    v0 = flat.get().detach()

    def grad(v):
        v = v.clone().requires_grad_(True)
        return torch.autograd.grad(nn.functional.cross_entropy(outputs(v), y), v)[0]

    h = 1e-5  # central differences of the exact gradient: first derivatives of weight_norm are right
    fd = torch.stack([(grad(v0 + h * e) - grad(v0 - h * e)) / (2 * h) for e in torch.eye(v0.numel(),
                                                                                            dtype=torch.float64)], 1)
    got = sk.hessian(model, nn.CrossEntropyLoss(), (x, y)).dense()
    assert torch.allclose(got, fd, rtol=1e-6, atol=1e-8)


def test_audit_curvature_through_a_trainable_weight_norm_is_refused(tmp_path):
    model = _model("parametrization")
    torch.save(model.state_dict(), tmp_path / "wn.pt")
    for metrics in ("top-eig", "trace"):  # (the audit's own products gave a top eigenvalue 0.6% off)
        with pytest.raises(ValueError, match=r"2\.weight is under a weight norm"):
            sk.audit([tmp_path / "wn.pt"], _model("parametrization"), _data(), metrics=metrics,
                     out=tmp_path / "a.jsonl")
    rows = sk.audit([tmp_path / "wn.pt"], _model("parametrization"), _data(), metrics="keskar", max_iter=2,
                    out=tmp_path / "a.jsonl")  # first derivatives only: measured
    assert rows[0]["status"] == "ok" and rows[0]["keskar"] >= 0
