"""Integer class-index targets of any integer dtype (uint8, int16, int32) reach every measurement as
int64: the objective and its sample weights, the generic and fused curvature engines, ε-sharpness,
landscapes (their accuracy) and audits.  Floating targets (MSE) and bool targets are untouched.
References: the same measurement with int64 targets, and accuracy counted from float64 logits."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import sharpkit as sk
from sharpkit.data import as_batches, class_index_targets
from sharpkit.objective import Objective

F64 = torch.float64
CLASSES = 160  # so that 156 is a class: as uint8 it equals -100 (cross-entropy's ignore_index)


def _case():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, CLASSES)).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 4, generator=g, dtype=F64)
    y = torch.randint(0, CLASSES, (9,), generator=g)
    y[:3] = 156
    with torch.no_grad():
        y[3:6] = model(x[3:6]).argmax(1)  # three correct predictions, none of them class 156
    loss = nn.CrossEntropyLoss(weight=torch.rand(CLASSES, generator=g, dtype=F64) + 0.5)
    return model, loss, x, y


class _Spy(nn.CrossEntropyLoss):
    """Cross-entropy that records the dtype of every target tensor it is given."""

    def __init__(self, weight, seen):
        super().__init__(weight=weight)
        self.seen = seen

    def forward(self, outputs, targets):
        self.seen.add(targets.dtype)
        return super().forward(outputs, targets)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_integer_class_targets_measure_like_int64(dtype):
    model, loss, x, y = _case()
    batches = {t: [(x[:4], y[:4].to(t)), (x[4:], y[4:].to(t))] for t in (torch.int64, dtype)}

    obj = Objective(model, loss, batches[torch.int64])
    V = torch.randn(obj.n, 3, generator=torch.Generator().manual_seed(0), dtype=F64)

    def measure(data):
        obj = Objective(model, loss, data)
        value, grad = obj.loss_and_grad(obj.x0())
        return {
            "loss": float(value), "grad": grad,
            "H-generic": sk.hessian(model, loss, data, engine="generic", regroup=False) @ V,
            "H-fused": sk.hessian(model, loss, data, engine="fused", regroup=False) @ V,
            "G-fused": sk.ggn(model, loss, data, engine="fused", regroup=False) @ V,
            "keskar": sk.keskar_sharpness(model, loss, data, epsilon=1e-3, solver="pga", max_iter=3).value,
            "accuracy": sk.interpolate(model, model, loss, data, [0.0]).accuracy[0],
        }

    want, got = measure(batches[torch.int64]), measure(batches[dtype])
    for key, ref in want.items():
        if isinstance(ref, torch.Tensor):
            assert float((got[key] - ref).norm()) <= 1e-12 * float(ref.norm()), key
        else:
            assert got[key] == pytest.approx(ref, rel=1e-12, abs=1e-15), key
    # Accuracy from float64 logits: 3 of 9 right (a uint8 156 compared as -100 dropped 3 samples: 3 of 6).
    with torch.no_grad():
        assert want["accuracy"] == pytest.approx(float((model(x).argmax(1) == y).double().mean()))
    assert got["accuracy"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32])
def test_every_path_hands_the_loss_int64_targets(dtype, tmp_path):
    model, loss, x, y = _case()
    data = [(x[:4], y[:4].to(dtype)), (x[4:], y[4:].to(dtype))]
    seen: set = set()
    spy = _Spy(loss.weight, seen)
    obj = Objective(model, spy, data)
    obj.loss_and_grad(obj.x0())
    sk.hessian(model, spy, data, engine="generic") @ torch.ones(obj.n, dtype=F64)
    sk.keskar_sharpness(model, spy, data, solver="pga", max_iter=2)
    sk.interpolate(model, model, spy, data, [0.0, 0.5])
    paths = []
    for seed in (0, 1):  # two checkpoints: the audit measures them stacked
        torch.manual_seed(seed)
        paths.append(tmp_path / f"c{seed}.pt")
        torch.save(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, CLASSES)).double().state_dict(), paths[-1])
    rows = sk.audit([str(p) for p in paths], model, data, metrics=["top-eig"], loss_fn=spy, dtype=F64,
                    group_size=2, lanczos_steps=8)
    assert [r["status"] for r in rows] == ["ok", "ok"], rows
    assert seen == {torch.int64}


def test_only_integer_targets_are_converted():
    x = torch.randn(5, 3)
    for t in (torch.randn(5, 1), torch.randn(5).double(), torch.rand(5) > 0.5, torch.arange(5)):
        assert class_index_targets(t) is t  # floating (MSE), bool and int64 targets: the same tensor
        (_, got), = list(as_batches((x, t)))
        assert got is t
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
        t = torch.tensor([0, 1, 2, 3, 4], dtype=dtype)
        (_, got), = list(as_batches([(x, t)]))
        assert got.dtype == torch.int64 and torch.equal(got, torch.arange(5))


@pytest.mark.parametrize("loss_fn", [
    nn.CrossEntropyLoss(), nn.NLLLoss(), nn.functional.cross_entropy,
    functools.partial(nn.functional.cross_entropy, label_smoothing=0.1),
    functools.partial(nn.functional.nll_loss, ignore_index=3),
])
def test_float_labels_refused_for_every_form_of_class_loss(loss_fn):
    """The check made before a CLI sizes a model from the targets knows the class losses as the
    objective does, keyword partials included."""
    from sharpkit.inputs import check_class_targets

    with pytest.raises(ValueError, match="class labels as integers"):
        check_class_targets(loss_fn, torch.tensor([0.0, 2.0, 1.0]))
    check_class_targets(loss_fn, torch.tensor([0, 2, 1]))  # integer labels pass
    check_class_targets(nn.MSELoss(), torch.tensor([0.0, 2.0, 1.0]))  # regression targets pass
