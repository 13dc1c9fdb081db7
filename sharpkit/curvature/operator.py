"""Curvature operators: the Hessian or generalized Gauss-Newton matrix of the sample-weighted mean
loss over all of ``data``, as a matrix-free linear operator on the flat parameter space."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from .. import distributed as _dist
from ..data import regroup_batches
from ..objective import Objective, regroup_rows
from ..params import is_batchnorm, measurement_mode
from .engines import DEFAULT_BLOCK_SIZE, ENGINES, KINDS, HVPEngine, make_engine

__all__ = ["CurvatureOperator", "hessian", "ggn"]

# Data with at most this many samples keep their primal passes (gradient graphs) across products
# by default; larger data recompute them (memory grows with the kept graphs).
CACHE_MAX_SAMPLES = 8192
# Small batches are joined into passes of up to this many samples (``regroup``): per-batch
# overhead dominates small batches.  Top eigenvalue / Hutch++ trace (64 products) of a 74 k-parameter
# MLP on 4000 MNIST-1D samples, 2-core CPU, fused engine: batches of 128 as given 0.77-1.00 / 2.64 s,
# joined (4 passes of up to 1024) 0.48 / 1.65 s, one batch of 4000 0.46 / 1.60 s; generic engine
# 1.60-1.93 / 3.39 s, joined (8 passes: its memory bound for 16 directions) 0.89-1.03 / 2.70 s,
# one batch 0.65 / 2.80-3.03 s.
# benchmarks/bench_curvature.py --small-batches has the table.
CURVATURE_PASS_ROWS = 1024


@contextlib.contextmanager
def _curvature_mode(model: nn.Module, bn: str, copy_tensors: bool = True, restore_objects: bool = True) -> Iterator[None]:
    """:func:`measurement_mode`, and with ``bn="train"`` BatchNorm told not to track running
    statistics while we differentiate through it: it then normalises with batch statistics and has no
    buffer update to perform (an in-place update would break forward-mode AD and vmap).
    ``copy_tensors=False`` for products: they run on the operator's own copies of the tensors;
    ``restore_objects=False`` for products on a model without shared modules (see :func:`preserved`)."""
    with measurement_mode(model, bn, copy_tensors, restore_objects):
        touched = []
        if bn == "train":
            for m in model.modules():
                if is_batchnorm(m) and m.track_running_stats:
                    m.track_running_stats = False
                    touched.append(m)
        try:
            yield
        finally:
            for m in touched:
                m.track_running_stats = True


class CurvatureOperator:
    """``H`` (or ``G``) of ``f(x) = sum_b w_b loss_b(x) / sum_b w_b`` at the model's current parameters
    (``w_b`` the batch's samples, or its weight for cross-entropy with ignored targets or class
    weights: :class:`~sharpkit.objective.DataWeights`).

    Use :func:`hessian` / :func:`ggn` to build one.  ``op @ V`` takes ``V`` of shape ``(n,)`` or
    ``(n, k)`` and returns the same shape (in ``V``'s dtype; computed in the operator's
    :attr:`dtype`).  The k columns share every pass over the data and one primal pass per batch;
    columns are processed ``chunk_size`` at a time when given (memory).

    Attributes:
        shape: ``(n, n)``.
        num_matvecs: number of matrix-vector products so far (a product with k columns counts k).
        num_passes: number of passes over the data so far.
        engine_info: which engine and AD mode ran, and why (fused not supported, forward-mode fallback).
        flat: the :class:`~sharpkit.params.FlatParams` layout (parameter blocks, for per-layer work).
    """

    def __init__(
        self,
        kind: str,
        model: nn.Module,
        loss_fn: Any,
        data: Any,
        *,
        bn: str = "eval",
        engine: str = "auto",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        cache: bool | None = None,
        chunk_size: int | None = None,
        ad: str = "auto",
        regroup: bool = True,
    ):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (outputs, targets) -> scalar, got {type(loss_fn).__name__}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        self.kind, self.model, self.loss_fn, self.bn = kind, model, loss_fn, bn
        self.chunk_size = chunk_size
        with _curvature_mode(model, bn):
            self.objective = Objective(model, loss_fn, data, device=device, dtype=dtype)
            # The operator is the curvature at the state of construction: own copies of the
            # buffers/frozen tensors (where dtype and device match they would alias the model's,
            # and measurement_mode's in-place restore would invalidate the kept gradient graphs).
            self.objective._frozen = {k: v.detach().clone() for k, v in self.objective._frozen.items()}
            self.flat = self.objective.flat
            self.x = self.objective.x0()
            # The objective read this rank's data once (its survey); planning the passes runs one
            # forward: a failure on one rank must stop every rank, not leave the others in the next
            # collective.
            survey = self.objective.survey
            num_batches = survey.num_batches
            # Decisions every rank must share (each pass's sums have the engine's shape; a rank
            # that caches stops reading a loader the others still read in step), taken from all
            # ranks' data: the most batches any rank holds, the first sample shape (a rank may
            # hold none).
            shared = _dist.gather_objects((num_batches, survey.input_shape))
            most_batches = max(count for count, _ in shared)
            input_shape = next((shape for _, shape in shared if shape is not None), None)
            with _dist.agree("planning the data passes"):
                self.objective.check_reduction()  # (a summed loss would scale every product)
                if cache is None:
                    cache = most_batches == 1 or self.objective.num_samples <= CACHE_MAX_SAMPLES
                self.cache = bool(cache)
                self.engine: HVPEngine = make_engine(
                    kind, model, self.objective.loss_fn, self.flat, self.x, engine=engine, dtype=self.objective.dtype,
                    device=self.objective.device, cache=self.cache, objective=self.objective, ad=ad, bn=bn,
                    input_shape=input_shape,
                )
                if regroup and num_batches > 1 and not _dist.uses_batch_statistics(model):
                    # After the engine: its preference says how many directions one pass carries.
                    rows = regroup_rows(model, survey, self.objective.device, self.objective.dtype,
                                        vectors=self.preferred_block_size, max_rows=CURVATURE_PASS_ROWS,
                                        loss_fn=self.objective.loss_fn)
                    if rows is not None:
                        self.objective.batches = regroup_batches(self.objective.batches, rows)
                        num_batches = survey.regrouped_count(rows)
        self.num_batches = num_batches
        # Products skip putting the model's tensor objects back unless a module is registered twice
        # (functional_call leaves plain tensors behind only then): decided once, not per product.
        self._restore_objects = self.objective._shared_modules
        self._batch_weights: list[float] | None = None  # each batch's weight, after the first pass
        self.num_matvecs = 0
        self.num_passes = 0

    # -- properties ------------------------------------------------------------------------------------

    @property
    def n(self) -> int:
        return self.flat.n

    @property
    def shape(self) -> tuple[int, int]:
        return (self.flat.n, self.flat.n)

    @property
    def dtype(self) -> torch.dtype:
        return self.objective.dtype

    @property
    def device(self) -> torch.device:
        return self.objective.device

    @property
    def num_samples(self) -> int:
        return self.objective.num_samples

    @property
    def preferred_block_size(self) -> int:
        """How many vectors one product should carry when the caller may choose (trace probes):
        the engine's preference, else ``DEFAULT_BLOCK_SIZE`` (16)."""
        return int(getattr(self.engine, "preferred_block_size", DEFAULT_BLOCK_SIZE))

    @property
    def engine_info(self) -> dict[str, Any]:
        info = dict(getattr(self.engine, "info", {"engine": getattr(self.engine, "name", "?")}))
        info.update({"kind": self.kind, "bn": self.bn, "num_batches": self.num_batches, "cache": self.cache})
        return info

    def __repr__(self) -> str:
        return (f"CurvatureOperator({self.kind}, n={self.n}, samples={self.num_samples}, "
                f"engine={getattr(self.engine, 'name', '?')}, dtype={self.dtype})")

    # -- products --------------------------------------------------------------------------------------

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``op @ V`` for ``V`` of shape ``(n,)`` or ``(n, k)``."""
        if not isinstance(V, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor of shape ({self.n},) or ({self.n}, k), got {type(V).__name__}")
        if V.dim() not in (1, 2) or V.shape[0] != self.n:
            raise ValueError(f"expected a vector of shape ({self.n},) or matrix ({self.n}, k), got {tuple(V.shape)}")
        if not V.is_floating_point():
            raise TypeError(f"expected a floating-point tensor, got {V.dtype}")
        vec = V.dim() == 1
        W = V.reshape(self.n, -1).to(self.device, self.dtype)
        k = W.shape[1]
        if k == 0:
            return V.clone()
        out = self._accumulate(W)
        self.num_matvecs += k
        out = out.to(V.device, V.dtype)
        return out[:, 0] if vec else out

    __matmul__ = matmat

    def _batches(self) -> Iterator[tuple[int, torch.Tensor | None, torch.Tensor | None, float]]:
        """``(index, inputs, targets, weight)`` of each batch that carries weight in the objective
        (:class:`~sharpkit.objective.DataWeights`).  Once every batch's primal pass is kept by the
        engine, the data are not read again (inputs and targets are None): a DataLoader would
        collate every batch anew for each product, and a shuffling one would pair the kept passes
        with other samples."""
        weights, cached = self._batch_weights, getattr(self.engine, "is_cached", None)
        if weights is not None and cached is not None and all(cached(b) for b in range(len(weights))):
            for b, w in enumerate(weights):
                yield b, None, None, w
            return
        seen = []
        for b, ((inputs, targets), w) in enumerate(self.objective.weights.weighted(self.objective.batches)):
            seen.append(w)
            yield b, inputs, targets, w
        self._batch_weights = seen

    def _accumulate(self, W: torch.Tensor) -> torch.Tensor:
        """The one data pass: ``sum_b w_b * engine(b) @ W`` (reduced across ranks) ``/ sum_b w_b``."""
        k = W.shape[1]
        step = self.chunk_size or k
        if self.num_batches == 1 and step >= k and not self.objective.distributed:
            # One batch, one product: the engine's fresh result is already the mean (no sum buffer).
            with _curvature_mode(self.model, self.bn, copy_tensors=False, restore_objects=self._restore_objects):
                for b, inputs, targets, _ in self._batches():
                    out = self.engine.batch_matmat(b, inputs, targets, W)
            self.num_passes += 1
            return out
        total = torch.zeros(self.n, k, device=self.device, dtype=self.dtype)
        with _curvature_mode(self.model, self.bn, copy_tensors=False, restore_objects=self._restore_objects), \
                _dist.sharded_pass([total], enabled=self.objective.distributed, same=[W]):
            for b, inputs, targets, w in self._batches():
                for s in range(0, k, step):
                    total[:, s:s + step].add_(self.engine.batch_matmat(b, inputs, targets, W[:, s:s + step]), alpha=w)
        self.num_passes += 1
        return total.div_(self.objective.weights.total)

    def to_scipy(self):
        """A :class:`scipy.sparse.linalg.LinearOperator` (float64 numpy in and out; ``matmat`` batched)."""
        from scipy.sparse.linalg import LinearOperator

        def mv(v: np.ndarray) -> np.ndarray:
            return self.matmat(torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)).reshape(-1)).numpy()

        def mm(V: np.ndarray) -> np.ndarray:
            return self.matmat(torch.from_numpy(np.ascontiguousarray(V, dtype=np.float64))).numpy()

        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, matmat=mm, rmatmat=mm, dtype=np.float64)

    def dense(self) -> torch.Tensor:
        """The full ``(n, n)`` matrix (n products; for small models and checks only)."""
        eye = torch.eye(self.n, dtype=self.dtype, device=self.device)
        return self.matmat(eye)


def hessian(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    bn: str = "eval",
    engine: str = "auto",
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    cache: bool | None = None,
    chunk_size: int | None = None,
    ad: str = "auto",
    regroup: bool = True,
) -> CurvatureOperator:
    """The Hessian of the sample-weighted mean loss over ``data`` at ``model``'s parameters.

    Args:
        model: the network (left exactly as found).
        loss_fn: mean-reduced ``loss_fn(outputs, targets) -> scalar``.
        data: ``(inputs, targets)`` tensors or an iterable of such batches (uneven batches exact).
        bn: "eval" (default; BatchNorm running statistics) or "train" (batch statistics per batch).
            Dropout is off either way; running buffers are never changed.
        engine: "auto" (default; fused where supported, else generic), "generic" or "fused".
        dtype, device: precision and device of the products (default: the parameters'); use
            ``torch.float64`` for checks.
        cache: keep each batch's primal pass across products (default: when the data are a single
            batch or at most 8192 samples).
        chunk_size: process at most this many columns of ``V`` at once (default: all).
        ad: the generic engine's AD mode: "auto", "forward-over-reverse" or "reverse-over-reverse".
        regroup: join consecutive small batches into passes of up to ``CURVATURE_PASS_ROWS`` (1024)
            samples, within a memory bound for the directions a pass carries (default True; the
            same operator, fewer calls).  Not done where BatchNorm uses batch statistics, nor where
            joining would change the objective (a model whose samples interact, a loss that is not
            a per-sample mean: :func:`sharpkit.objective.probe_largest_batch`).
    """
    return CurvatureOperator("hessian", model, loss_fn, data, bn=bn, engine=engine, dtype=dtype, device=device,
                             cache=cache, chunk_size=chunk_size, ad=ad, regroup=regroup)


def ggn(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    bn: str = "eval",
    engine: str = "auto",
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    cache: bool | None = None,
    chunk_size: int | None = None,
    ad: str = "auto",
    regroup: bool = True,
) -> CurvatureOperator:
    """The generalized Gauss-Newton matrix ``sum_b w_b J_b^T H_loss,b J_b / sum_b w_b`` (J the Jacobian of
    the model output in the parameters); arguments as for :func:`hessian`.

    The documented short form is ``ggn(model, loss_fn, data, engine="auto")``: a fourth positional
    argument that names an engine ("auto", "generic", "fused") is taken as ``engine`` (no BatchNorm
    policy has those names), so ``ggn(model, loss_fn, data, "fused")`` means ``engine="fused"``.
    """
    if isinstance(bn, str) and bn in ENGINES:
        if engine != "auto":
            raise ValueError(f"ggn: got engine={engine!r} and a fourth positional argument {bn!r} that names an engine; "
                             "pass the BatchNorm policy as bn='eval' or bn='train'")
        bn, engine = "eval", bn
    return CurvatureOperator("ggn", model, loss_fn, data, bn=bn, engine=engine, dtype=dtype, device=device,
                             cache=cache, chunk_size=chunk_size, ad=ad, regroup=regroup)
