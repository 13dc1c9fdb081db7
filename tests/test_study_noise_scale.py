import numpy as np
import pytest
import torch
from torch import nn

from sharpkit.study.noise_scale import gradient_noise_scale


pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)


def _problem(n=60):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)).double()
    g = torch.Generator().manual_seed(1)
    return model, (torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))


def _exact(model, data):
    """|G|^2 and tr(Sigma) (per-sample covariance, 1/N) from explicit per-sample gradients in float64."""
    x, y = data
    grads = []
    for i in range(x.shape[0]):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    G = torch.stack(grads)
    mean = G.mean(0)
    return float(mean.pow(2).sum()), float((G - mean).pow(2).sum(1).mean())


def test_noise_scale_is_unbiased_against_per_sample_gradients():
    model, data = _problem()
    grad_sq, trace_sigma = _exact(model, data)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # The estimator is linear in the two mean squared norms, so its average over shuffles
    # converges to the exact values (sampling without replacement is accounted for).
    est = [gradient_noise_scale(model, nn.CrossEntropyLoss(), data, 3, 20, seed=s) for s in range(150)]
    g_hat = np.mean([e.grad_sq for e in est])
    t_hat = np.mean([e.trace_sigma for e in est])
    g_se = np.std([e.grad_sq for e in est]) / np.sqrt(len(est))
    t_se = np.std([e.trace_sigma for e in est]) / np.sqrt(len(est))
    assert abs(t_hat - trace_sigma) < 4 * t_se + 1e-12
    assert abs(g_hat - grad_sq) < 4 * g_se + 1e-12
    assert est[0].batches_small == 20 and est[0].batches_big == 3
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_identical_samples_have_no_noise():
    model, (x, y) = _problem()
    x, y = x[:1].repeat(40, 1), y[:1].repeat(40)
    r = gradient_noise_scale(model, nn.CrossEntropyLoss(), (x, y), 2, 10)
    assert r.trace_sigma == pytest.approx(0.0, abs=1e-12)
    assert r.b_simple == pytest.approx(0.0, abs=1e-9)
    assert r.grad_sq == pytest.approx(r.mean_sq_big, rel=1e-12)


def test_bad_batch_sizes():
    model, data = _problem()
    with pytest.raises(ValueError, match="b_small < b_big"):
        gradient_noise_scale(model, nn.CrossEntropyLoss(), data, 10, 10)
    with pytest.raises(ValueError, match="exceeds"):
        gradient_noise_scale(model, nn.CrossEntropyLoss(), data, 10, 100)
