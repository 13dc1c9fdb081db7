"""scipy's L-BFGS-B on a box, driven without scipy's per-coordinate Python setup.

``scipy.optimize.minimize(method="L-BFGS-B")`` converts the bounds coordinate by coordinate in
Python (``new_bounds_to_old``, ``old_bound_to_new`` and the ``nbd`` loop): about 3 µs per
coordinate, 3 s for a model of 10⁶ parameters, more than ten of the solver's iterations cost.
:func:`minimize_box` runs the same compiled routine (``scipy.optimize._lbfgsb.setulb``) with the
same options and the same caching of repeated points as ``minimize`` but builds the bound arrays
with numpy, so the iterates are identical (tested bit for bit), and runs the routine with scipy's
BLAS on one thread (:func:`_one_blas_thread`).  ``setulb`` is private; its
calling convention is the one of scipy >= 1.15 (the C translation of the Fortran code).  With an
older scipy, or when the first call rejects its arguments, the public ``minimize`` runs instead.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = ["LbfgsbOutcome", "minimize_box"]

# scipy.optimize.minimize's defaults for L-BFGS-B (the paper's protocol changes only maxiter).
MAXCOR = 10
FTOL = 2.2204460492503131e-09
GTOL = 1e-5
MAXFUN = 15000
MAXLS = 20

# setulb's task codes (scipy >= 1.15).
_TASK_FG, _TASK_NEW_X, _TASK_CONVERGENCE, _TASK_STOP = 3, 1, 4, 5
_STOP_MAXITER, _STOP_MAXFUN = 504, 502

FunAndGrad = Callable[[np.ndarray], "tuple[float, np.ndarray]"]


@dataclass
class LbfgsbOutcome:
    """The final iterate ``x``, its objective ``fun``; ``nit``, ``nfev``, ``message``, ``success``
    as in scipy's ``OptimizeResult``."""

    x: np.ndarray
    fun: float
    nit: int
    nfev: int
    message: str
    success: bool


def minimize_box(fun_and_grad: FunAndGrad, bound: np.ndarray, max_iter: int,
                 first: tuple[float, np.ndarray] | None = None) -> LbfgsbOutcome:
    """Minimise ``fun_and_grad`` over ``|x| <= bound`` from ``x = 0`` with scipy's L-BFGS-B.

    Args:
        fun_and_grad: ``x -> (f, g)`` in float64.  bound: ``(n,)`` float64 half-widths (finite, >= 0).
        max_iter: L-BFGS-B iterations (``maxiter``).  first: ``(f, g)`` at ``x = 0`` when already
            known (it then counts as the first evaluation without a call, as in ``minimize``).
    """
    bound = np.ascontiguousarray(bound, dtype=np.float64)
    # minimize evaluates x0 when it sets up its ScalarFunction; done here so that both paths share it.
    f0, g0 = fun_and_grad(np.zeros_like(bound)) if first is None else first
    first = (float(f0), np.asarray(g0, dtype=np.float64))
    if _fast_path_available():
        outcome = _drive_setulb(fun_and_grad, bound, max_iter, first)
        if outcome is not None:
            return outcome
    return _public_minimize(fun_and_grad, bound, max_iter, first)


def _fast_path_available() -> bool:
    try:
        import scipy

        _compiled_routine()
    except (ImportError, AttributeError):
        return False
    major, minor = (int(p) for p in scipy.__version__.split(".")[:2])
    return (major, minor) >= (1, 15)


def _compiled_routine():
    """scipy's compiled L-BFGS-B step (private; see the module docstring)."""
    from scipy.optimize import _lbfgsb

    return _lbfgsb.setulb


_blas_controller = None


def _one_blas_thread():
    """scipy's BLAS on one thread while the context lasts.  With more, its worker threads keep
    spinning after each call to the routine and take the cores from the model's next pass: L-BFGS-B
    on a 74k-parameter MLP took 0.70-0.79 s instead of 0.22-0.26 s on 2 cores (2.7 s instead of
    2.1 s at 10^6 parameters).  A no-op without threadpoolctl."""
    global _blas_controller
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return contextlib.nullcontext()
    if _blas_controller is None:  # built once: enumerating the loaded libraries takes about 1 ms
        _blas_controller = ThreadpoolController()
    return _blas_controller.limit(limits=1, user_api="blas")


class _Cached:
    """``minimize``'s ScalarFunction semantics: a point equal to the last one is not re-evaluated.
    ``first`` is ``(f, g)`` at ``x0``, already evaluated (it counts as the first evaluation)."""

    def __init__(self, fun_and_grad: FunAndGrad, x0: np.ndarray, first: tuple[float, np.ndarray]):
        self.fun_and_grad = fun_and_grad
        self.x, self.value, self.nfev = x0.copy(), first, 1

    def __call__(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        if not np.array_equal(x, self.x):
            f, g = self.fun_and_grad(x.copy())
            self.nfev += 1
            self.x, self.value = x.copy(), (float(f), np.asarray(g, dtype=np.float64))
        return self.value


def _drive_setulb(fun_and_grad: FunAndGrad, bound: np.ndarray, max_iter: int, first) -> LbfgsbOutcome | None:
    """The fast path; None when this scipy's ``setulb`` does not take the expected arguments (its
    first call, before any evaluation beyond ``x0``)."""
    from scipy.optimize._lbfgsb_py import status_messages, task_messages

    setulb = _compiled_routine()

    n, m = bound.shape[0], MAXCOR
    x = np.zeros(n, dtype=np.float64)
    evaluate = _Cached(fun_and_grad, x, first)
    low, up = -bound, bound.copy()
    nbd = np.full(n, 2, dtype=np.int32)  # 2: bounded below and above
    f = np.array(0.0, dtype=np.float64)
    g = np.zeros(n, dtype=np.float64)
    wa = np.zeros(2 * m * n + 5 * n + 11 * m * m + 8 * m, dtype=np.float64)
    iwa = np.zeros(3 * n, dtype=np.int32)
    task = np.zeros(2, dtype=np.int32)
    ln_task = np.zeros(2, dtype=np.int32)
    lsave = np.zeros(4, dtype=np.int32)
    isave = np.zeros(44, dtype=np.int32)
    dsave = np.zeros(29, dtype=np.float64)
    factr, nit = FTOL / np.finfo(float).eps, 0
    started = False
    while True:
        g = g.astype(np.float64)
        try:
            with _one_blas_thread():
                setulb(m, x, low, up, nbd, f, g, factr, GTOL, wa, iwa, task, lsave, isave, dsave, MAXLS, ln_task)
        except (TypeError, ValueError):
            if started:
                raise
            return None
        started = True
        if task[0] == _TASK_FG:
            f, g = evaluate(x)
        elif task[0] == _TASK_NEW_X:
            nit += 1
            if nit >= max_iter:
                task[0], task[1] = _TASK_STOP, _STOP_MAXITER
            elif evaluate.nfev > MAXFUN:
                task[0], task[1] = _TASK_STOP, _STOP_MAXFUN
        else:
            break
    success = task[0] == _TASK_CONVERGENCE
    message = status_messages[int(task[0])] + ": " + task_messages[int(task[1])]
    return LbfgsbOutcome(x=x, fun=float(f), nit=nit, nfev=evaluate.nfev, message=message, success=success)


def _public_minimize(fun_and_grad: FunAndGrad, bound: np.ndarray, max_iter: int, first) -> LbfgsbOutcome:
    from scipy.optimize import Bounds, minimize

    x0 = np.zeros_like(bound)
    evaluate = _Cached(fun_and_grad, x0, first)
    res = minimize(evaluate, x0, jac=True, method="L-BFGS-B", bounds=Bounds(-bound, bound),
                   options={"maxiter": max_iter})
    return LbfgsbOutcome(x=np.asarray(res.x, dtype=np.float64), fun=float(res.fun), nit=int(res.nit),
                         nfev=evaluate.nfev, message=str(res.message), success=bool(res.success))
