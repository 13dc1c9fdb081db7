"""Power iteration's ``converged`` against explicit float64 matrices (torch.linalg.eigvalsh): a
Rayleigh quotient that has stopped moving is not enough (eigenvalues +l and -l among the wanted,
near-equal magnitudes of opposite signs); the residual must be small too."""
from __future__ import annotations

import math

import pytest
import torch

import sharpkit as sk

F64 = torch.float64

# +5 and -5 at the top of the magnitudes; the others separated, the rest a small band.
PM = [5.0, -5.0, 3.0, -2.0, 1.0, -0.5] + torch.linspace(-0.1, 0.1, 14).tolist()


def _with_spectrum(d, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    d = torch.as_tensor(d, dtype=F64)
    Q, _ = torch.linalg.qr(torch.randn(d.numel(), d.numel(), generator=torch.Generator().manual_seed(seed), dtype=F64))
    A = (Q * d) @ Q.t()
    return (A + A.t()) / 2, Q


def _wanted(evals: torch.Tensor, which: str, k: int) -> torch.Tensor:
    return {"LA": evals.flip(0), "SA": evals, "LM": evals[evals.abs().argsort(descending=True)]}[which][:k]


class _Counting:
    """An explicit matrix that counts the columns it multiplies."""

    def __init__(self, A: torch.Tensor):
        self.A, self.shape, self.dtype, self.columns = A, tuple(A.shape), F64, 0

    def __matmul__(self, V: torch.Tensor) -> torch.Tensor:
        self.columns += V.shape[1]
        return self.A @ V


@pytest.mark.parametrize("tol", [1e-3, 1e-8])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_power_plus_minus_pair_among_the_wanted_is_not_converged(k, tol):
    # The iterate alternates in the span of the +5/-5 eigenvectors, a e1 + b e2 <-> a e1 - b e2,
    # with the constant Rayleigh quotient 5 (a^2 - b^2) = 2.518 here (residual 4.3): it was
    # returned as converged (which="LM", every k and tol).
    A, _ = _with_spectrum(PM)
    op = _Counting(A)
    r = sk.eigenvalues(op, k=k, method="power", which="LM", tol=tol)
    assert not r.converged, r.values
    # The first run never settles: it runs to max_steps (100); no product is left uncounted.
    assert r.iterations >= 100 and r.num_matvecs == r.iterations == op.columns
    assert any(abs(abs(float(x)) - 5.0) > 1.0 for x in r.values)  # (the value is indeed not +-5)


@pytest.mark.parametrize("which", ["LA", "SA"])
def test_power_algebraic_extremes_next_to_a_plus_minus_pair(which):
    # "LA"/"SA" start with a largest-magnitude run for the shift: on +-5 it never converges.  For
    # k = 1 of the right sign its value is the answer: 2.518 for "LA" was returned as converged (5
    # is right).  Where the shifted run's values all come out positive they are the wanted ones
    # whatever the shift, and the result is converged and right.  ("SA" on -A: the same iterates,
    # -2.518 returned as converged.)
    sign = 1.0 if which == "LA" else -1.0
    A = sign * _with_spectrum(PM)[0]
    evals = torch.linalg.eigvalsh(A)
    for tol in (1e-3, 1e-8):
        for k in (1, 2, 3):
            r = sk.eigenvalues(A, k=k, method="power", which=which, tol=tol)
            want = _wanted(evals, which, k)
            if r.converged:
                assert float((r.values - want).abs().max()) <= 20 * tol * 5.0, (k, tol, r.values, want)
            if k >= 2:
                assert r.converged, (k, tol, r.values)
            assert r.num_matvecs == r.iterations
        r = sk.eigenvalues(A, k=1, method="power", which=which, tol=tol)
        assert not r.converged and float(r.values[0]) == pytest.approx(sign * 2.518, abs=1e-3)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_power_shift_from_an_unconverged_run_is_checked(k):
    # A start in the +-5 span with quotient 0.5: the first run stopped after 2 products with 0.5 as
    # converged, and its shift 0.5 leaves -4.5 the second magnitude of H + 0.5 I: "LA" returned
    # [0.5], [5, -5], [5, 3, -5] as converged.
    A, Q = _with_spectrum(PM)
    v0 = Q[:, 0] + math.sqrt(0.9 / 1.1) * Q[:, 1]
    assert float(v0 @ A @ v0 / (v0 @ v0)) == pytest.approx(0.5, rel=1e-9)
    r = sk.eigenvalues(A, k=k, method="power", which="LA", v0=v0)
    assert not r.converged, r.values
    assert float((r.values - _wanted(torch.linalg.eigvalsh(A), "LA", k)).abs().max()) > 0.4


@pytest.mark.parametrize("second", [-4.9, -4.75, -4.5])
def test_power_near_equal_magnitudes_of_opposite_signs(second):
    # Eigenvalues 5 and -rho 5: the quotient moves by about (1 - rho^2) of its error a step, so it
    # met tol while about tol / (1 - rho^2) off: 4.882 (2.3 % off at tol 1e-3) for -4.9 and 8.6 tol
    # off for -4.75, both as converged.  Now a converged value meets the residual test,
    # ||r|| <= 2 sqrt(tol) |theta|, and so |theta - 5| <= ||r||^2 / gap <= 4 tol theta^2 / gap.
    A, _ = _with_spectrum([5.0, second, 3.0, 1.0] + torch.linspace(-0.25, 0.25, 16).tolist())
    top = float(torch.linalg.eigvalsh(A)[-1])
    for tol in (1e-3, 1e-4, 1e-6):
        r = sk.eigenvalues(A, k=1, method="power", which="LM", tol=tol)
        theta = float(r.values[0])
        if second == -4.9 and tol == 1e-3:
            assert not r.converged  # (rho = 0.98: not within the 100 default steps)
        if not r.converged:
            continue
        gap = theta - 3.0  # (theta ~ 5: the nearest other eigenvalue is 3)
        res = float(r.residuals[0])
        assert res <= 2 * math.sqrt(tol) * abs(theta)
        assert abs(theta - top) <= res ** 2 / gap + 1e-12
        assert abs(theta - top) <= 4 * tol * theta ** 2 / gap, (tol, theta)
    # A larger budget lets rho = 0.98 converge too, to the same accuracy.
    r = sk.eigenvalues(A, k=1, method="power", which="LM", tol=1e-3, max_steps=2000)
    assert r.converged
    assert abs(float(r.values[0]) - top) <= 4 * 1e-3 * float(r.values[0]) ** 2 / (float(r.values[0]) - 3.0)


def test_power_converged_runs_unchanged_on_separated_spectra():
    # Where the quotient's test already meant an eigenpair, nothing changes: same values, products
    # and steps as the Rayleigh-quotient test alone (every stop here has residual < 2 sqrt(tol) |theta|).
    A, _ = _with_spectrum([10.0, 5.0, -3.0] + torch.linspace(-1, 1, 37).tolist())
    evals = torch.linalg.eigvalsh(A)
    for which, k, tol in (("LM", 2, 1e-10), ("LA", 2, 1e-6), ("SA", 1, 1e-8), ("LM", 3, 1e-4)):
        r = sk.eigenvalues(A, k=k, method="power", which=which, tol=tol, max_steps=500)
        assert r.converged and r.num_matvecs == r.iterations
        assert float((r.values - _wanted(evals, which, k)).abs().max()) <= 10 * tol * 10.0, (which, k, r.values)
