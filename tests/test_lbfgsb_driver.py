"""sharpkit's L-BFGS-B driver runs scipy's routine without minimize's per-coordinate setup; its
iterates must be scipy.optimize.minimize's, bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import Bounds, minimize

from sharpkit.sharpness import _lbfgsb


def nonconvex(n: int, seed: int):
    """f(x) = -(x'Ax/2 + b'x + 0.1 sum sin(3x)) with A indefinite: several local minima in a box."""
    rng = np.random.default_rng(seed)
    Q = rng.standard_normal((n, n))
    A = (Q + Q.T) / np.sqrt(n)
    b = rng.standard_normal(n)
    calls = []

    def fg(x):
        calls.append(x.copy())
        f = -(0.5 * x @ A @ x + b @ x + 0.1 * np.sin(3 * x).sum())
        g = -(A @ x + b + 0.3 * np.cos(3 * x))
        return float(f), g

    return fg, calls


def scipy_reference(fg, bound, max_iter):
    res = minimize(fg, np.zeros_like(bound), jac=True, method="L-BFGS-B", bounds=Bounds(-bound, bound),
                   options={"maxiter": max_iter})
    return res


@pytest.mark.parametrize("n, max_iter, seed", [(1, 10, 0), (7, 10, 1), (50, 10, 2), (300, 25, 3), (300, 200, 4)])
def test_driver_matches_scipy_minimize_bit_for_bit(n, max_iter, seed):
    rng = np.random.default_rng(100 + seed)
    bound = rng.uniform(0.0, 2.0, n)
    bound[: n // 5] = 0.0  # fixed coordinates (scale 0) stay at 0
    fg_ref, calls_ref = nonconvex(n, seed)
    ref = scipy_reference(fg_ref, bound, max_iter)
    fg, calls = nonconvex(n, seed)
    out = _lbfgsb.minimize_box(fg, bound, max_iter)
    assert _lbfgsb._fast_path_available()
    np.testing.assert_array_equal(out.x, ref.x)
    assert out.fun == ref.fun
    assert (out.nit, out.nfev, out.message, out.success) == (ref.nit, ref.nfev, ref.message, ref.success)
    # The same points were evaluated, in the same order.
    assert len(calls) == len(calls_ref)
    for a, b in zip(calls, calls_ref):
        np.testing.assert_array_equal(a, b)
    assert np.all(np.abs(out.x) <= bound)


def test_long_run_converges_and_says_so():
    n = 40
    fg, _ = nonconvex(n, 5)
    out = _lbfgsb.minimize_box(fg, np.full(n, 0.5), max_iter=1000)
    ref = scipy_reference(nonconvex(n, 5)[0], np.full(n, 0.5), 1000)
    assert out.success and ref.success and out.message == ref.message
    np.testing.assert_array_equal(out.x, ref.x)


def test_known_first_value_is_not_recomputed():
    n = 20
    fg, calls = nonconvex(n, 6)
    first = fg(np.zeros(n))
    calls.clear()
    out = _lbfgsb.minimize_box(fg, np.ones(n), 10, first=first)
    ref = scipy_reference(nonconvex(n, 6)[0], np.ones(n), 10)
    assert not any(not c.any() for c in calls)  # x = 0 never evaluated again
    assert out.nfev == ref.nfev == len(calls) + 1
    np.testing.assert_array_equal(out.x, ref.x)


def test_public_path_is_used_and_agrees_when_the_fast_path_is_unavailable(monkeypatch):
    n = 30
    monkeypatch.setattr(_lbfgsb, "_fast_path_available", lambda: False)
    fg, _ = nonconvex(n, 7)
    out = _lbfgsb.minimize_box(fg, np.ones(n), 10)
    ref = scipy_reference(nonconvex(n, 7)[0], np.ones(n), 10)
    np.testing.assert_array_equal(out.x, ref.x)
    assert (out.nit, out.nfev) == (ref.nit, ref.nfev)


def test_public_path_runs_when_setulb_rejects_its_arguments(monkeypatch):
    """A scipy whose private routine changed its calling convention: the public path, same result."""

    def changed(*args, **kwargs):
        raise TypeError("setulb() takes 18 positional arguments")

    public, real_public = [], _lbfgsb._public_minimize
    monkeypatch.setattr(_lbfgsb, "_compiled_routine", lambda: changed)
    monkeypatch.setattr(_lbfgsb, "_public_minimize", lambda *a: public.append(1) or real_public(*a))
    n = 30
    fg, calls = nonconvex(n, 8)
    out = _lbfgsb.minimize_box(fg, np.ones(n), 10)
    ref = scipy_reference(nonconvex(n, 8)[0], np.ones(n), 10)
    assert public == [1]
    np.testing.assert_array_equal(out.x, ref.x)
    assert (out.nit, out.nfev) == (ref.nit, ref.nfev) and len(calls) == ref.nfev


def test_routine_runs_with_scipy_blas_on_one_thread(monkeypatch):
    """Spinning BLAS workers would take the cores from the model's passes between calls."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    real = _lbfgsb._compiled_routine()
    seen = []

    def recording(*args):
        seen.append(max((d["num_threads"] for d in threadpoolctl.threadpool_info() if d["user_api"] == "blas"),
                        default=1))
        return real(*args)

    monkeypatch.setattr(_lbfgsb, "_compiled_routine", lambda: recording)
    fg, _ = nonconvex(20, 9)
    out = _lbfgsb.minimize_box(fg, np.ones(20), 10)
    ref = scipy_reference(nonconvex(20, 9)[0], np.ones(20), 10)
    np.testing.assert_array_equal(out.x, ref.x)
    assert seen and set(seen) == {1}
