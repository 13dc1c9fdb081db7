"""The precision a sharpness is measured in: 16-bit models are measured in float32, and a 16-bit
``dtype`` is refused (perturbations of relative size ε and the loss changes they cause are below
16-bit rounding: the value came out exactly 0)."""
import copy
import warnings

import pytest
import torch
from torch import nn

import sharpkit as sk
from test_sharpness_helpers import SeparableQuadratic, assert_same_state, blobs, dummy_data, mean_loss, mlp, state


def _models():
    model32 = mlp((6, 12, 12, 3), seed=0, dtype=torch.float32)
    low = {dt: copy.deepcopy(model32).to(dt) for dt in (torch.bfloat16, torch.float16)}
    return low, blobs(60, dtype=torch.float32)


@pytest.mark.parametrize("low_dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_model_is_measured_in_float32(low_dtype):
    low, data = _models()
    model = low[low_dtype]
    exact = copy.deepcopy(model).float()  # the same values, converted exactly
    ce = nn.CrossEntropyLoss()
    before = state(model)
    for call in (lambda m: sk.keskar_sharpness(m, ce, data, epsilon=1e-3),
                 lambda m: sk.keskar_sharpness(m, ce, data, epsilon=5e-4, solver="apgd"),
                 lambda m: sk.keskar_sharpness(m, ce, data, subspace_dim=5, seed=3),
                 lambda m: sk.adaptive_sharpness(m, ce, data, rho=0.01),
                 lambda m: sk.adaptive_sharpness(m, ce, data, rho=0.05, kind="average", max_iter=5)):
        got, ref = call(model), call(exact)
        # (in bfloat16 the Keskar values were exactly 0.0 and the adaptive ones 0.0 or multiples of 2^-8)
        assert got.value == ref.value and got.loss == ref.loss
        if got.perturbation is not None:
            assert got.perturbation.dtype == torch.float32
    assert_same_state(model, before)
    assert all(p.dtype == low_dtype for p in model.parameters())
    # ascent_dtype needs the values measured in float32, which they now are
    steps = sk.keskar_sharpness(model, ce, data, solver="apgd", ascent_dtype="bfloat16")
    assert steps.value > 0


@pytest.mark.parametrize("measure", ["keskar", "adaptive"])
@pytest.mark.parametrize("low_dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_dtype_is_refused(measure, low_dtype):
    low, data = _models()
    call = sk.keskar_sharpness if measure == "keskar" else lambda *a, **k: sk.adaptive_sharpness(*a, rho=0.1, **k)
    for model in (low[low_dtype], low[low_dtype].float()):
        with pytest.raises(ValueError, match="cannot resolve a sharpness"):
            call(model, nn.CrossEntropyLoss(), data, dtype=low_dtype)


def test_lbfgsb_stopping_at_its_start_says_so():
    # A quadratic 1e-7 from its minimum: every gradient coordinate is below scipy's pgtol (1e-5), so
    # the paper's protocol stops at y = 0 with "convergence" and sharpness 0, while the box maximum
    # is at a corner, 100 * sum(a/2 * (eps (|theta| + 1))^2) / (1 + f) up to the offset.
    model = SeparableQuadratic(30, seed=2, at_minimum=True)
    with torch.no_grad():
        model.theta.add_(1e-7)
    eps = 1e-3
    a, theta = model.a, model.theta.detach()
    f0 = float((0.5 * a * (theta - model.c) ** 2).sum())
    corner = float((0.5 * a * ((theta - model.c).abs() + eps * (theta.abs() + 1)) ** 2).sum())
    best = 100 * (corner - f0) / (1 + f0)
    with pytest.warns(RuntimeWarning, match="L-BFGS-B took no step"):
        r = sk.keskar_sharpness(model, mean_loss, dummy_data(), epsilon=eps)
    assert r.value == 0.0 and r.info["nit"] == 0 and r.info["stopped_at_start"] is True
    assert sk.keskar_sharpness(model, mean_loss, dummy_data(), epsilon=eps, solver="apgd").value == pytest.approx(best)
    # an ordinary run says nothing
    model = mlp((6, 12, 12, 3), seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = sk.keskar_sharpness(model, nn.CrossEntropyLoss(), blobs(60))
    assert r.value > 0 and "stopped_at_start" not in r.info
