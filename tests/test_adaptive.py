"""Adaptive / standard sharpness: closed forms, m-sharpness against per-chunk runs, model untouched, errors."""
import pytest
import torch
from torch import nn

import sharpkit as sk
from test_sharpness_helpers import (Linear1, SeparableQuadratic, assert_same_state, blobs, dummy_data, mean_loss, mlp,
                                    state)


@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("solver", ["apgd", "pga"])
def test_worst_linf_quadratic_closed_form(adaptive, solver):
    model = SeparableQuadratic(30, seed=2)
    rho = 0.05
    theta = model.theta.detach()
    c = theta.abs() if adaptive else torch.ones_like(theta)
    d = (theta - model.c).abs()
    f0 = float((0.5 * model.a * d**2).sum())
    fmax = float((0.5 * model.a * (d + rho * c) ** 2).sum())
    r = sk.adaptive_sharpness(model, mean_loss, dummy_data(), rho=rho, adaptive=adaptive, solver=solver)
    assert r.loss == pytest.approx(f0, rel=1e-12)
    assert r.value == pytest.approx(fmax - f0, rel=1e-6)
    assert r.measure == "adaptive-worst" and r.num_evals == 21


@pytest.mark.parametrize("adaptive", [True, False])
def test_worst_l2_ellipsoid_linear_closed_form(adaptive):
    model = Linear1(25, seed=3)
    rho = 0.1
    theta = model.theta.detach()
    c = theta.abs() if adaptive else torch.ones_like(theta)
    r = sk.adaptive_sharpness(model, mean_loss, dummy_data(), rho=rho, norm="l2", adaptive=adaptive)
    # max of g.δ over ||δ / c||_2 <= rho is rho ||g ⊙ c||_2, at δ = rho c ⊙ (g ⊙ c) / ||g ⊙ c||
    assert r.value == pytest.approx(rho * float((model.g * c).norm()), rel=1e-10)
    assert float((r.perturbation / c).norm()) == pytest.approx(rho, rel=1e-10)


@pytest.mark.parametrize("norm,second_moment", [("linf", 1 / 3), ("l2", 1.0)])
def test_average_case_quadratic(norm, second_moment):
    # At the minimum E f(w + rho c ξ) - f(w) = rho² / 2 sum a c² E[ξ²] (uniform: 1/3, Gaussian: 1).
    model = SeparableQuadratic(4000, seed=4, at_minimum=True)
    rho = 0.1
    c = model.theta.detach().abs()
    expected = float(0.5 * rho**2 * (model.a * c**2).sum() * second_moment)
    r = sk.adaptive_sharpness(model, mean_loss, dummy_data(), rho=rho, norm=norm, kind="average", max_iter=20)
    assert r.value == pytest.approx(expected, rel=0.03)
    assert r.perturbation is None and r.measure == "adaptive-average" and r.num_evals == 21
    again = sk.adaptive_sharpness(model, mean_loss, dummy_data(), rho=rho, norm=norm, kind="average", max_iter=20)
    assert again.value == r.value  # seeded


def test_m_sharpness_is_the_mean_of_per_chunk_sharpness():
    model = mlp((6, 10, 3), seed=5)
    x, y = blobs(70, seed=5)
    rho, m = 0.05, 16
    r = sk.adaptive_sharpness(model, nn.CrossEntropyLoss(), (x, y), rho=rho, m=m, num_examples=56, max_iter=8)
    chunks = [(x[s : min(s + m, 56)], y[s : min(s + m, 56)]) for s in range(0, 56, m)]  # 16, 16, 16, 8
    singles = [sk.adaptive_sharpness(model, nn.CrossEntropyLoss(), ch, rho=rho, max_iter=8) for ch in chunks]
    w = torch.tensor([len(ch[0]) for ch in chunks], dtype=torch.float64) / 56
    assert r.value == pytest.approx(float(sum(wi * s.value for wi, s in zip(w, singles))), rel=1e-9)
    assert r.loss == pytest.approx(float(sum(wi * s.loss for wi, s in zip(w, singles))), rel=1e-12)
    assert r.perturbation.shape == (4, sk.FlatParams(model).n)
    for b, s in enumerate(singles):
        assert torch.allclose(r.perturbation[b], s.perturbation, rtol=1e-9, atol=1e-15)
    assert r.info["num_problems"] == 4


def test_worst_case_bounds_and_model_untouched():
    model = mlp((6, 10, 10, 3), bn=True, seed=6)
    model.train()
    data = blobs(40, seed=6)
    before = state(model)
    x0 = sk.FlatParams(model).get()
    for norm in ("linf", "l2"):
        for kind in ("worst", "average"):
            for bn in ("eval", "train"):
                r = sk.adaptive_sharpness(model, nn.CrossEntropyLoss(), data, rho=0.02, norm=norm, kind=kind, bn=bn,
                                          max_iter=4)
                assert_same_state(model, before)
                assert r.value >= 0 or kind == "average"
                if kind == "worst":
                    ratio = r.perturbation / (0.02 * x0.abs())
                    ratio = ratio[x0 != 0]
                    size = ratio.abs().max() if norm == "linf" else ratio.norm()
                    assert float(size) <= 1 + 1e-9
    r = sk.adaptive_sharpness(model, nn.CrossEntropyLoss(), data, rho=0.02, m=8, max_iter=3)
    assert_same_state(model, before)


def test_bad_inputs():
    model = mlp((4, 5, 2), seed=0)
    data = blobs(10, dim=4, classes=2)
    ce = nn.CrossEntropyLoss()
    for rho in (0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="rho"):
            sk.adaptive_sharpness(model, ce, data, rho=rho)
    with pytest.raises(ValueError, match="norm"):
        sk.adaptive_sharpness(model, ce, data, rho=0.1, norm="l1")
    with pytest.raises(ValueError, match="kind"):
        sk.adaptive_sharpness(model, ce, data, rho=0.1, kind="best")
    with pytest.raises(ValueError, match="m must"):
        sk.adaptive_sharpness(model, ce, data, rho=0.1, m=0)
    with pytest.raises(ValueError, match="solver"):
        sk.adaptive_sharpness(model, ce, data, rho=0.1, solver="lbfgsb")
    with pytest.raises(ValueError, match="empty"):
        sk.adaptive_sharpness(model, ce, (torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, dtype=torch.long)),
                              rho=0.1)
    x_nan = data[0].clone()
    x_nan[3, 1] = float("nan")
    before = state(model)
    for kind in ("worst", "average"):
        with pytest.raises(ValueError, match="inputs hold NaN"):
            sk.adaptive_sharpness(model, ce, (x_nan, data[1]), rho=0.1, kind=kind)
    assert_same_state(model, before)


def test_m_sharpness_perturbation_has_a_row_per_chunk_even_for_one_chunk():
    model = mlp((6, 10, 3), seed=5)
    x, y = blobs(70, seed=5)
    n = sk.FlatParams(model).n
    for m, chunks in ((16, 5), (128, 1)):  # 70 examples: 16 * 4 + 6, or all in one chunk
        r = sk.adaptive_sharpness(model, nn.CrossEntropyLoss(), (x, y), rho=0.05, m=m, max_iter=3)
        assert r.perturbation.shape == (chunks, n) and r.info["num_problems"] == chunks
    one = sk.adaptive_sharpness(model, nn.CrossEntropyLoss(), (x, y), rho=0.05, max_iter=3)
    assert one.perturbation.shape == (n,)  # without m: the one problem's perturbation
    assert torch.equal(r.perturbation[0], one.perturbation)


def test_adaptive_must_be_a_bool():
    import numpy as np

    model = mlp((4, 5, 2), seed=0)
    data = blobs(10, dim=4, classes=2)
    ce = nn.CrossEntropyLoss()
    for bad in ("False", "True", 0, 1, None):  # "False" used to be taken as True
        with pytest.raises(ValueError, match="adaptive must be True or False"):
            sk.adaptive_sharpness(model, ce, data, rho=0.1, adaptive=bad)
    for value in (False, True):
        r = sk.adaptive_sharpness(model, ce, data, rho=0.1, adaptive=np.bool_(value), max_iter=3)
        assert r.value == sk.adaptive_sharpness(model, ce, data, rho=0.1, adaptive=value, max_iter=3).value
        assert r.info["adaptive"] is value
