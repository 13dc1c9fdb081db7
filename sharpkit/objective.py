"""The objective every measurement shares: the sample-weighted mean loss over ``data`` as a
function of the flat parameter vector.

Evaluation goes through :func:`torch.func.functional_call` with views of a flat vector, so the
model's own tensors are never written; BatchNorm/dropout follow the ``bn`` policy of
:func:`sharpkit.params.measurement_mode`.
"""
from __future__ import annotations

import copy
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from . import distributed as _dist
from .data import (Batches, BatchSurvey, as_batches, class_index_targets, random_order, regroup_batches, survey_batches,
                   to_device)
from .params import (
    FlatParams,
    check_finite_parameters,
    has_shared_modules,
    measurement_mode,
    model_tensors,
    tensor_objects_kept,
)

__all__ = ["Objective", "LossFn", "activation_elements", "probe_largest_batch", "loss_on_device",
           "regroup_rows", "check_mean_reduced", "ignore_index_of", "sample_weigher", "batch_weigher", "DataWeights",
           "survey_weights", "join_obstacle", "samples_interact", "batches_stay_whole", "checked_loss",
           "check_loss_reduction", "check_finite_targets"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Regrouping (``Objective(regroup=True)``): passes of at most this many samples, and activations
# of at most this many bytes per pass (counted four times over: forward, backward and their
# temporaries).  Small batches cost per-call overhead: ε-sharpness (Auto-PGD) on 4000 MNIST-1D
# samples in batches of 128 took 0.43 s for a 74 k-parameter MLP and 3.40 s for a 1.08 M one,
# 0.18 s and 1.70 s regrouped (benchmarks/bench_sharpness.py --small-batches).
REGROUP_MAX_ROWS = 16384
REGROUP_BYTES = 256 << 20


class Objective:
    """``f(x) = sum_b w_b * loss_fn(model_x(X_b), Y_b) / sum_b w_b`` on the flat parameters x, with
    ``w_b`` the batch's samples (or, for cross-entropy with ignored targets or class weights, the
    sum its mean divides by: :func:`batch_weigher`), so that ``f`` is the loss over all the data.

    Args:
        model: the network; only read.  Call inside :func:`~sharpkit.params.measurement_mode`
            to fix its BatchNorm/dropout behaviour.
        loss_fn: mean-reduced loss ``loss_fn(outputs, targets) -> scalar``.
        data: ``(X, Y)`` tensors or an iterable of batches.
        device, dtype: where/in what precision to evaluate (default: the parameters' own);
            floating inputs are cast to ``dtype``.
        distributed: shard the data across the ranks of the torch.distributed process group and
            sum each pass over them (see :mod:`sharpkit.distributed`).  ``None`` (default): when a
            group of more than one process is initialised; ``True``: initialise one from the
            torchrun environment if needed; ``False``: every rank evaluates all the data.  Data
            already sharded (:func:`sharpkit.distributed.local_data`) are always reduced.
        regroup: evaluate the data in passes other than its batches where that gives the same
            objective (:func:`sharpkit.data.regroup_batches`): ``True`` joins consecutive batches
            up to ``REGROUP_MAX_ROWS`` samples and ``REGROUP_BYTES`` of activations, never fewer
            samples than the largest batch; an int is the samples per pass (the caller planned the
            memory).  ``True`` does not join when BatchNorm uses batch statistics or the model's
            samples interact otherwise (:func:`samples_interact`), nor where joining would change
            a batch's loss (:func:`join_obstacle`); an int joins regardless.  Default False.
        finite_parameters: refuse a model holding NaN or inf (:func:`check_finite_parameters`,
            default True); False only to record a diverged model's (NaN) loss.

    Construction reads the data once (:attr:`survey`), plus forwards of the largest batch and
    of its halves when ``regroup=True``.

    Attributes:
        num_samples: samples in all the data (over all ranks when distributed).
        weights: the :class:`DataWeights` of the batches (over all ranks).
        survey: the :class:`~sharpkit.data.BatchSurvey` of this rank's batches as given (before
            any regrouping; it holds the largest batch).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Any,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        distributed: bool | None = None,
        regroup: bool | int = False,
        finite_parameters: bool = True,
    ):
        batches = as_batches(data)
        self.distributed: bool = _dist.resolve(distributed) or batches.is_sharded
        if self.distributed:
            # Ranks measuring different models or losses would sum a mixture of measurements; a
            # NaN parameter on one rank is then an error on every rank, not on that rank alone.
            _dist.check_same("the model and loss measured", model, loss_fn, dtype=dtype, device=device)
        if finite_parameters:
            check_finite_parameters(model)
        self.model = model
        self.flat = FlatParams(model)
        if device is not None:
            from .inputs import resolve_device  # (inputs imports this module)

            self.device = resolve_device(device)  # an unusable device named here, not mid-pass
        else:
            self.device = self.flat.device
        self.dtype = dtype or self.flat.dtype
        check_mean_reduced(loss_fn)
        self.loss_fn = loss_on_device(loss_fn, self.device, self.dtype)
        if _dist.uses_batch_statistics(model):
            sampler = random_order(batches)
            if sampler is not None:
                raise ValueError(f"BatchNorm uses batch statistics (bn='train') and the data's DataLoader draws a new "
                                 f"random order on every pass ({sampler}): each pass groups other samples into "
                                 "batches, so the objective would change from one evaluation to the next; use "
                                 "shuffle=False (or bn='eval')")
        self.batches: Batches = (
            _dist.shard(batches, keep_batches=batches_stay_whole(model, batches, self.device, self.dtype))
            if self.distributed else batches
        )
        # The one read of this rank's data; the total weight over all ranks divides every pass's
        # reduced sums.  A failure on one rank (here, or in the forward that plans the passes
        # below) stops every rank instead of leaving the others in the next collective.
        self.survey: BatchSurvey
        self.survey, self.weights = survey_weights(self.batches, loss_fn, self.distributed)
        self.num_samples = self.weights.num_samples
        if regroup is not False and not _dist.uses_batch_statistics(model):
            with _dist.agree("planning the data passes"):
                rows = (regroup_rows(model, self.survey, self.device, self.dtype, loss_fn=self.loss_fn)
                        if regroup is True else int(regroup))
            if rows is not None:
                self.batches = regroup_batches(self.batches, rows)
        self.num_evals = 0
        self._shared_modules = has_shared_modules(model)
        trainable = set(self.flat.names)
        self._frozen = {n: t for n, t in model_tensors(model, self.device, self.dtype).items() if n not in trainable}
        # A lambda or wrapper summing over the samples is found on the first batch of the first
        # pass (torch's own losses: their reduction was read above).
        self._reduction_checked = is_torch_loss(loss_fn)
        self._head_checked = False  # (check_reduction's forward, done once)

    @property
    def n(self) -> int:
        return self.flat.n

    def x0(self) -> torch.Tensor:
        """The model's current parameter vector on this objective's device and dtype."""
        return self.flat.get().to(self.device, self.dtype)

    def batch_output(self, x: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """The model's output on ``inputs`` (already on this objective's device/dtype) at parameters
        ``x`` (differentiable in ``x``)."""
        tensors = dict(self._frozen)
        tensors.update(self.flat.as_dict(x))
        if self._shared_modules:
            with tensor_objects_kept(self.model):
                return functional_call(self.model, tensors, (inputs,))
        return functional_call(self.model, tensors, (inputs,))

    def batch_loss(self, x: torch.Tensor, batch, loss_fn: LossFn | None = None) -> torch.Tensor:
        """Mean loss of one batch at parameters ``x`` (differentiable in ``x``), by ``loss_fn`` if
        given (another form of this objective's loss, e.g. the curvature engines'), else
        :attr:`loss_fn`."""
        inputs, targets = to_device(batch, self.device, self.dtype)
        return checked_loss(self.loss_fn if loss_fn is None else loss_fn, self.batch_output(x, inputs), targets)

    def check_reduction(self, rows: int = 64) -> None:
        """The loss's arguments (:func:`checked_loss`: target shapes and classes) and, unless a pass
        has checked already, its reduction (:func:`check_loss_reduction`) on the first ``rows``
        samples of this rank's largest batch at the starting point: for work whose passes do not go
        through :meth:`loss` / :meth:`loss_and_grad` (curvature products), so that bad input is
        named where the work is set up.  One forward of ``rows`` samples, once."""
        if self._head_checked or self.survey.largest is None:
            return
        self._head_checked = True
        x, y = self.survey.largest  # (the first batch may hold one sample, which tells nothing)
        inputs, targets = to_device((x[:rows], y[:rows]), self.device, self.dtype)
        with torch.no_grad():
            outputs = self.batch_output(self.x0(), inputs)
            loss = checked_loss(self.loss_fn, outputs, targets)
            if not self._reduction_checked:
                self._check_reduction_on(inputs, targets, outputs, loss)

    def _check_reduction_on(self, inputs: torch.Tensor, targets: Any, outputs: Any, loss: torch.Tensor) -> None:
        """:func:`check_loss_reduction` on one batch's outputs and loss; later passes skip it once
        a batch of at least two samples has been checked (one sample cannot tell a sum from a mean)."""
        self._reduction_checked = getattr(inputs, "shape", (0,))[0] >= 2
        if isinstance(outputs, torch.Tensor):
            check_loss_reduction(self.loss_fn, (inputs, targets), outputs.detach(), whole=loss.detach())

    def _pass_loss(self, x: torch.Tensor, batch) -> torch.Tensor:
        """:meth:`batch_loss` in a pass of :meth:`loss` / :meth:`loss_and_grad`; the first one also
        checks that the loss averages over the samples (:func:`check_loss_reduction`, on the halves
        of the batch's outputs: two more calls of the loss, once)."""
        if self._reduction_checked:
            return self.batch_loss(x, batch)
        inputs, targets = to_device(batch, self.device, self.dtype)
        outputs = self.batch_output(x, inputs)
        loss = checked_loss(self.loss_fn, outputs, targets)
        self._check_reduction_on(inputs, targets, outputs, loss)
        return loss

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """``f(x)`` as a 0-dim tensor (no graph)."""
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        with torch.no_grad(), _dist.sharded_pass([total], enabled=self.distributed, same=[x]):
            for batch, w in self.weights.weighted(self.batches):
                total += self._pass_loss(x, batch).double() * w
        self.num_evals += 1
        return total / self.weights.total

    def loss_and_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f(x), grad f(x))``: the loss as a float64 0-dim tensor, the gradient shaped like ``x``.

        Objective and gradient come from the same pass with the same sample weights, so they are
        consistent (what L-BFGS-B's line search needs).
        """
        x = x.detach()
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        grad = torch.zeros_like(x)
        # enable_grad: callers may measure inside torch.no_grad().
        with torch.enable_grad(), _dist.sharded_pass([total, grad], enabled=self.distributed, same=[x]):
            for batch, w in self.weights.weighted(self.batches):
                xr = x.clone().requires_grad_(True)
                loss = self._pass_loss(xr, batch)
                (g,) = torch.autograd.grad(loss * (w / self.weights.total), xr)
                grad += g
                total += loss.detach().double() * w
        self.num_evals += 1
        return total / self.weights.total, grad


def loss_on_device(loss_fn: LossFn, device: torch.device, dtype: torch.dtype) -> LossFn:
    """``loss_fn``, or a copy of a loss module whose floating tensors (class weights) are moved to
    ``device``/``dtype``: evaluating in another precision must not meet float32 class weights.  A
    keyword ``functools.partial`` gets its floating tensor keywords (``weight=``) moved likewise."""
    func, keywords = _unwrapped(loss_fn)
    if keywords and not isinstance(func, nn.Module):
        moved = {k: v.to(device, dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                 for k, v in keywords.items()}
        if any(moved[k] is not keywords[k] for k in keywords):
            return functools.partial(func, **moved)
        return loss_fn
    if not isinstance(loss_fn, nn.Module):
        return loss_fn
    tensors = list(loss_fn.parameters()) + list(loss_fn.buffers())
    if all(not t.is_floating_point() or (t.device == device and t.dtype == dtype) for t in tensors):
        return loss_fn
    return copy.deepcopy(loss_fn).to(device, dtype)


def activation_elements(model: nn.Module, batch, device: torch.device, dtype: torch.dtype) -> int:
    """Elements of every module output in one forward of ``batch`` (a proxy for activation memory)."""
    return _probe_forward(model, batch, device, dtype)[0]


def _probe_forward(model: nn.Module, batch, device: torch.device, dtype: torch.dtype) -> tuple[int, Any]:
    """One forward of ``batch`` without gradients: (elements of every module output, the output)."""
    total = 0

    def hook(_module, _inputs, output):
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        inputs, _ = to_device(batch, device, dtype)
        out = _forward(model, inputs, device, dtype)
    finally:
        for h in handles:
            h.remove()
    return total, out


def _forward(model: nn.Module, inputs: torch.Tensor, device: torch.device, dtype: torch.dtype) -> Any:
    with torch.no_grad(), tensor_objects_kept(model):
        return functional_call(model, model_tensors(model, device, dtype), (inputs,))


def _same_outputs(whole: torch.Tensor, joined: torch.Tensor) -> bool:
    """Whether ``whole`` (outputs on a batch) equals ``joined`` (its halves' outputs stacked) up to
    rounding: exactly for integer outputs; for floating ones the same non-finite entries (a -inf
    mask) and the finite ones within a tolerance for the other GEMM blockings and algorithms that
    half batches take (float32 on CUDA: TF32 convolutions round to about 1e-3).  Capped, so that
    low precision does not wave interaction through (a false "interact" only keeps the batches)."""
    if not whole.is_floating_point():
        return torch.equal(whole, joined)
    finite = torch.isfinite(whole)
    if not torch.equal(finite, torch.isfinite(joined)) or not torch.equal(whole[~finite].nan_to_num(),
                                                                         joined[~finite].nan_to_num()):
        return False
    if not bool(finite.any()):
        return True
    rtol = min(5e-2, max(1e-6, 1000 * torch.finfo(whole.dtype).eps))
    if whole.is_cuda and whole.dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        rtol = max(rtol, 1e-2)
    w, j = whole[finite], joined[finite]
    return float((w - j).abs().max()) <= rtol * max(float(w.abs().max()), 1e-30)


def samples_interact(model: nn.Module, batch, outputs: Any, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the samples of a batch interact in ``model`` (so that batches must not be joined), or None.

    ``outputs`` is the model's output on ``batch``; the model runs on the batch's two halves and
    each output tensor must equal the halves' outputs stacked (to rounding).  Batch statistics
    outside BatchNorm modules (``F.batch_norm(training=True)``, a layer subtracting the batch mean)
    fail this, as do outputs that are not per-sample.  A batch of one sample cannot be split: its
    model is then taken to mix samples (:func:`probe_largest_batch` probes one-sample batches on
    the first two joined)."""
    inputs = to_device(batch, device, dtype)[0]
    m = inputs.shape[0]
    if m < 2:
        return "the batches hold one sample each, so whether the model's samples interact cannot be checked"
    k = m // 2
    whole = torch.utils._pytree.tree_flatten(outputs)[0]
    first = torch.utils._pytree.tree_flatten(_forward(model, inputs[:k], device, dtype))[0]
    second = torch.utils._pytree.tree_flatten(_forward(model, inputs[k:], device, dtype))[0]
    if not whole or len(first) != len(whole) or len(second) != len(whole):
        return "the model's outputs are not per-sample tensors"
    for w, a, b in zip(whole, first, second):
        if not all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in (w, a, b)) \
                or (w.shape[0], a.shape[0], b.shape[0]) != (m, k, m - k) or a.shape[1:] != w.shape[1:]:
            return "the model's outputs are not per-sample tensors"
        if not _same_outputs(w, torch.cat([a, b])):
            return (f"the model's outputs on a batch of {m} samples differ from its outputs on the batch's halves: "
                    "its samples interact (batch statistics?)")
    return None


_SIGNED_INTEGERS = (torch.int16, torch.int32, torch.int64)

# Losses that compare outputs and targets element by element: torch broadcasts mismatched shapes
# with only a warning ((N, 1) outputs against (N,) targets become an (N, N) comparison).
_ELEMENTWISE_LOSSES = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss)
_ELEMENTWISE_FUNCTIONS = (F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss)
_CLASS_INDEX_FUNCTIONS = (F.cross_entropy, F.nll_loss)


def _unwrapped(loss_fn: Any) -> tuple[Any, dict[str, Any]]:
    """``(function, keyword options)`` of a ``functools.partial`` that binds only keywords
    (``partial(F.cross_entropy, weight=w, ignore_index=0)``), else ``(loss_fn, {})``."""
    if isinstance(loss_fn, functools.partial) and not loss_fn.args:
        return loss_fn.func, dict(loss_fn.keywords)
    return loss_fn, {}


def is_class_index_loss(loss_fn: Any) -> bool:
    """Cross-entropy/NLL as sharpkit recognises them (torch's modules and functions, and keyword
    partials of either): losses whose targets are class indices or class probabilities."""
    func, _ = _unwrapped(loss_fn)
    return isinstance(func, (nn.CrossEntropyLoss, nn.NLLLoss)) or any(func is f for f in _CLASS_INDEX_FUNCTIONS)


def _loss_name(loss_fn: Any) -> str:
    func, keywords = _unwrapped(loss_fn)
    name = getattr(func, "__name__", type(func).__name__)
    return f"partial({name}, {', '.join(f'{k}=...' for k in keywords)})" if keywords else name


def checked_loss(loss_fn: LossFn, outputs: Any, targets: Any) -> torch.Tensor:
    """``loss_fn(outputs, targets)``, which must be a scalar tensor; an element-wise regression loss
    (MSE, L1, smooth L1, Huber) must get targets shaped like the outputs, and class-index targets
    must index the outputs' classes.  ValueError otherwise.
    Runs in every pass; the loss's reduction is checked once, where a measurement is set up
    (:func:`check_mean_reduced`)."""
    if not isinstance(outputs, torch.Tensor) and is_torch_loss(loss_fn):
        # (torch's own message, e.g. "'dict' object has no attribute 'size'", names neither side)
        keys = f" with keys {list(outputs)}" if isinstance(outputs, dict) else ""
        picks = "the logits" if is_class_index_loss(loss_fn) else "the output it compares"
        raise ValueError(f"{_loss_name(loss_fn)} needs the model's output as a tensor, but the model returned a "
                         f"{type(outputs).__name__}{keys}: pass a loss that picks {picks}, e.g. "
                         "loss_fn=lambda out, y: F.cross_entropy(out['logits'], y)")
    func, _ = _unwrapped(loss_fn)
    elementwise = isinstance(func, _ELEMENTWISE_LOSSES) or any(func is f for f in _ELEMENTWISE_FUNCTIONS)
    tensors = isinstance(outputs, torch.Tensor) and isinstance(targets, torch.Tensor)
    if elementwise and tensors and outputs.shape != targets.shape:
        raise ValueError(f"{_loss_name(loss_fn)} compares outputs of shape {tuple(outputs.shape)} with targets of "
                         f"shape {tuple(targets.shape)}: they must match (torch would broadcast them into a loss over "
                         "every output-target pair)")
    if tensors and outputs.dim() >= 2 and is_class_index_loss(loss_fn):
        _check_class_targets(loss_fn, outputs, targets)
    loss = _call_loss(loss_fn, outputs, targets)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar (mean-reduced) tensor, got {shape}")
    return loss


def _check_class_targets(loss_fn: Any, outputs: torch.Tensor, targets: torch.Tensor) -> None:
    """ValueError where cross-entropy/NLL targets do not fit outputs ``(N, C, ...)``: class indices
    must be shaped ``(N, ...)``, class probabilities like the outputs (torch's own messages, "0D or
    1D target tensor expected", name neither shape)."""
    n_c, rest = tuple(outputs.shape[:2]), tuple(outputs.shape[2:])
    if targets.is_floating_point():
        if targets.shape != outputs.shape:
            hint = (": class labels must be integers (int64)" if targets.shape == outputs.shape[:1] + outputs.shape[2:]
                    else "")
            raise ValueError(f"{_loss_name(loss_fn)} got floating targets of shape {tuple(targets.shape)} for outputs "
                             f"of shape {tuple(outputs.shape)}: class probabilities must be shaped like the outputs"
                             f"{hint}")
    elif targets.dtype != torch.bool and tuple(targets.shape) != (n_c[0],) + rest:
        hint = " (squeeze the last dimension)" if tuple(targets.shape) == (n_c[0],) + rest + (1,) else ""
        raise ValueError(f"{_loss_name(loss_fn)} got class-index targets of shape {tuple(targets.shape)} for outputs "
                         f"of shape {tuple(outputs.shape)}: they must be shaped {(n_c[0],) + rest}{hint}")


def _call_loss(loss_fn: LossFn, outputs: Any, targets: Any) -> Any:
    """``loss_fn(outputs, targets)``; class-index targets outside the outputs' classes are a
    ValueError naming both (cross-entropy's "Target 10 is out of bounds" does not say whose)."""
    try:
        return loss_fn(outputs, targets)
    except IndexError as exc:
        if isinstance(outputs, torch.Tensor) and outputs.dim() >= 2 and isinstance(targets, torch.Tensor) \
                and not targets.is_floating_point() and targets.numel():
            c = outputs.shape[1]
            ignore = ignore_index_of(loss_fn)
            ignore = -100 if ignore is None else ignore  # (a wrapper of cross-entropy: its default)
            outside = ((targets >= c) | (targets < 0)) & (targets != ignore)
            if bool(outside.any()):  # (else the loss failed for a reason of its own)
                raise ValueError(f"class-index targets must lie in [0, {c}) for the model's {c} outputs (or equal the "
                                 f"loss's ignore_index); this batch holds {int(targets[outside][0])}") from exc
        raise


def is_torch_loss(loss_fn: Any) -> bool:
    """Whether ``loss_fn`` is one of torch's own losses (a ``torch.nn`` loss module of torch's own
    class, a ``torch.nn.functional`` function, or a keyword partial of either): none of them leaves
    a NaN or inf target out of its value."""
    func, _ = _unwrapped(loss_fn)
    if isinstance(func, nn.Module):
        return type(func).__module__ == "torch.nn.modules.loss"
    return getattr(func, "__module__", None) == "torch.nn.functional"


def check_finite_targets(loss_fn: Any, targets: Any, index: int) -> None:
    """ValueError naming batch ``index`` where floating ``targets`` hold NaN or inf: the loss (one
    of torch's, which do not mask targets) would be non-finite at every parameter value.  (A loss
    of the user's own may leave such targets out: not checked for those.)"""
    if isinstance(targets, torch.Tensor) and targets.is_floating_point() and not bool(torch.isfinite(targets).all()):
        bad = "NaN" if bool(torch.isnan(targets).any()) else "inf"
        raise ValueError(f"the data's targets hold {bad} (batch {index}, counting from 0): {_loss_name(loss_fn)} "
                         f"over them is non-finite at every parameter value; drop those samples (or use a loss of "
                         "your own that leaves them out)")


def check_loss_reduction(loss_fn: Any, batch: Any, outputs: Any, whole: torch.Tensor | None = None) -> None:
    """ValueError where ``loss_fn`` sums over the samples instead of averaging them (a lambda or
    wrapper around ``reduction='sum'``, which :func:`check_mean_reduced` cannot see): on
    ``outputs``, the model's outputs on ``batch`` (at least 2 samples), its value equals the sum of
    its values on the two halves and not their weighted mean.  Every measurement would then
    depend on how the data are batched (a Hessian N times too large on one batch of N).  Nothing
    is said where it cannot be told (one sample, outputs that are not per-sample, a half without
    weight or without a scalar loss).  The loss's own errors propagate, as a pass would raise them
    (sharpkit's passes already split and join batches: a loss must take any number of samples).
    ``whole``: the loss on the whole batch where already computed (not computed again)."""
    m = batch[0].shape[0] if batch is not None else 0
    if m < 2 or not isinstance(outputs, torch.Tensor) or outputs.dim() == 0 or outputs.shape[0] != m:
        return
    _, y = to_device(batch, outputs.device, outputs.dtype)
    k = m // 2
    parts = [(outputs, y), (outputs[:k], y[:k]), (outputs[k:], y[k:])]
    weigh = batch_weigher(loss_fn)
    with torch.no_grad():
        values = [whole if whole is not None else _call_loss(loss_fn, outputs, y)]
        values += [_call_loss(loss_fn, o, t) for o, t in parts[1:]]
    if not all(isinstance(v, torch.Tensor) and v.numel() == 1 for v in values):
        return  # (not a scalar: the measurement's first pass says so)
    whole, first, second = (float(v) for v in values)
    w1, w2 = weigh(parts[1]), weigh(parts[2])
    if not (w1 > 0 and w2 > 0 and all(math.isfinite(v) for v in (whole, first, second))):
        return
    _refuse_summed(loss_fn, m, (whole, first, second), (w1, w2), outputs.dtype)


def _refuse_summed(loss_fn: Any, m: int, values: tuple[float, float, float], weights: tuple[float, float],
                   dtype: torch.dtype) -> None:
    """The ValueError of :func:`check_loss_reduction` where ``values`` (the loss on a batch of ``m``
    samples and on its two halves, of these ``weights``) show a sum over the samples."""
    (whole, first, second), (w1, w2) = values, weights
    mean, total = (w1 * first + w2 * second) / (w1 + w2), first + second
    rtol = max(1e-6, 1000 * torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-6
    scale = max(abs(whole), abs(mean), abs(total), 1e-30)
    if abs(whole - total) <= rtol * scale < abs(whole - mean):
        raise ValueError(f"loss_fn {_loss_name(loss_fn)} sums over the samples instead of averaging them: on {m} "
                         f"samples it gives {whole:.6g}, the sum of its values on the two halves ({first:.6g} + "
                         f"{second:.6g}), not their mean ({mean:.6g}); sharpkit needs a mean-reduced loss "
                         "(reduction='mean')")


def check_mean_reduced(loss_fn: Any) -> None:
    """ValueError for a loss module whose ``reduction`` is not ``"mean"``: the objective is the
    weighted mean of batch means (:class:`DataWeights`), and a summed (or unreduced) loss would make
    it depend on how the data are batched."""
    func, keywords = _unwrapped(loss_fn)
    reduction = keywords.get("reduction", getattr(func, "reduction", "mean"))
    if keywords.get("size_average") is False or keywords.get("reduce") is False:
        reduction = "sum" if keywords.get("reduce") is not False else "none"  # (torch's legacy options)
    if reduction != "mean":
        name = (f"partial({getattr(func, '__name__', type(func).__name__)}, reduction={reduction!r})" if keywords
                else f"{type(loss_fn).__name__}(reduction={reduction!r})")
        raise ValueError(f"loss_fn {name}: sharpkit needs a mean-reduced "
                         "loss (reduction='mean'); the objective is the sample-weighted mean of the batches' losses")


def ignore_index_of(loss_fn: Any) -> Any:
    """The target value ``loss_fn`` leaves out of its mean: a loss module's ``ignore_index``, -100
    for ``F.cross_entropy``/``F.nll_loss`` (their default), None for a loss without one."""
    func, keywords = _unwrapped(loss_fn)
    if any(func is f for f in _CLASS_INDEX_FUNCTIONS):
        return keywords.get("ignore_index", -100)
    return getattr(loss_fn, "ignore_index", None)


def sample_weigher(loss_fn: Any) -> Callable[[Any], torch.Tensor] | None:
    """Each sample's weight in a batch's mean loss, as a function of the batch (a float64 tensor
    of one weight per sample), for losses whose mean is not over samples; None for the others
    (every sample weighs 1).

    Cross-entropy/NLL with class-index targets divide by the sum of the class weights of the
    target entries not equal to ``ignore_index`` (their count without class weights; each entry
    counts, so a sequence of L tokens weighs L): a sample weighs its entries' share of that sum,
    and weighing each batch by its samples' sum makes the objective the loss over all the data at
    once, however they are batched or split.  Probability targets are averaged over samples.
    Only these modules and functions are recognised, and ``functools.partial`` of the functions
    binding keywords only (``partial(F.cross_entropy, weight=w)``); another wrapper (a lambda) is
    taken as a per-sample mean.  ValueError for class-index targets outside the class weights."""
    func, keywords = _unwrapped(loss_fn)
    if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
        class_weights = loss_fn.weight
    elif any(func is f for f in _CLASS_INDEX_FUNCTIONS):  # (a keyword partial of one: its weight)
        class_weights = keywords.get("weight")
    else:
        return None
    ignore = ignore_index_of(loss_fn)

    def weigh(batch) -> torch.Tensor:
        targets = batch[1]
        n = batch[0].shape[0]
        if not isinstance(targets, torch.Tensor) or targets.is_floating_point():
            return torch.ones(n, dtype=torch.float64)
        # (Batches yield int64 targets; a batch given here directly is converted the same way.)
        entries = class_index_targets(targets).reshape(n, -1)
        kept = entries != ignore
        if class_weights is None:
            return kept.sum(1).to("cpu", torch.float64)
        c = class_weights.shape[0]
        valid = entries[kept]
        if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= c):
            raise ValueError(f"class-index targets must lie in [0, {c}) for the loss's {c} class weights (or equal "
                             f"ignore_index={ignore}); found {int(valid.min())}..{int(valid.max())}")
        w = class_weights.to(entries.device, torch.float64)[entries.clamp(0, c - 1)] * kept
        return w.sum(1).cpu()

    return weigh


def batch_weigher(loss_fn: Any) -> Callable[[Any], float]:
    """A batch's weight in the objective: its samples' :func:`sample_weigher` weights summed
    (its sample count for a per-sample mean loss)."""
    per_sample = sample_weigher(loss_fn)
    if per_sample is None:
        return lambda batch: float(batch[0].shape[0])
    return lambda batch: float(per_sample(batch).sum())


@dataclass(frozen=True)
class DataWeights:
    """How the batches' mean losses combine into the objective:
    ``f = sum_b w_b * loss_b / total`` over all the data (all ranks).

    Attributes:
        weigh: ``w_b`` of a batch (the sum of :func:`sample_weigher`'s weights), or None where
            every sample weighs ``per_sample`` (no per-batch count needed).
        num_samples: samples in all the data.
        total: the sum of ``w_b`` over all the data (the loss's own total weight, so that
            objectives over parts of the data combine: m-sharpness's chunks).
        per_sample: each sample's weight where ``weigh`` is None (1 for a per-sample mean loss).
    """

    weigh: Callable[[Any], float] | None
    num_samples: int
    total: float
    per_sample: float = 1.0

    def of(self, batch) -> float:
        """``w_b`` of ``batch``."""
        return batch[0].shape[0] * self.per_sample if self.weigh is None else self.weigh(batch)

    def weighted(self, batches: Iterable) -> Iterator[tuple[Any, float]]:
        """``(batch, w_b)`` for the batches that carry weight (a batch whose every target is
        ignored has no mean loss: it is skipped)."""
        for batch in batches:
            w = self.of(batch)
            if w > 0:
                yield batch, w


def survey_weights(batches: Batches, loss_fn: Any, distributed: bool,
                   what: str = "reading the data") -> tuple[BatchSurvey, DataWeights]:
    """One read of this rank's ``batches`` (:func:`sharpkit.data.survey_batches`) and the
    objective's :class:`DataWeights` for ``loss_fn`` over all ranks (one
    :func:`~sharpkit.distributed.sharded_pass` when ``distributed``; a failure on one rank stops
    every rank).  ValueError for data without samples, or whose every target is ignored, and for
    floating targets holding NaN or inf where ``loss_fn`` is one of torch's losses
    (:func:`check_finite_targets`)."""
    per_sample = sample_weigher(loss_fn)
    sums = torch.zeros(3, dtype=torch.float64)  # samples, sum of their weights, sum of squares
    ignored = [0]  # targets equal to -100 where the loss is not one whose ignore_index is known
    check_targets = is_torch_loss(loss_fn)
    index = [0]

    def finite_targets(batch) -> None:
        if check_targets:
            check_finite_targets(loss_fn, batch[1], index[0])
        index[0] += 1

    def weigh(batch) -> float:
        finite_targets(batch)
        s = per_sample(batch)
        sums[2] += (s * s).sum()
        return float(s.sum())

    def count_samples(batch) -> float:
        finite_targets(batch)
        targets = batch[1]
        if isinstance(targets, torch.Tensor) and targets.dtype in _SIGNED_INTEGERS:
            ignored[0] += int((targets == -100).sum())
        return float(batch[0].shape[0])

    with _dist.sharded_pass([sums], enabled=distributed, what=what):
        survey = survey_batches(batches, count_samples if per_sample is None else weigh)
        sums[0] += survey.num_samples
        sums[1] += sum(survey.weights)
    samples, total, squares = sums.tolist()
    num_samples = int(round(samples))
    if num_samples == 0:
        raise ValueError("data is empty: it holds no samples" + (" on any rank" if distributed else ""))
    if per_sample is None:
        if ignored[0] and len(survey.sizes) > 1:
            what_loss = getattr(loss_fn, "__name__", type(loss_fn).__name__)
            warnings.warn(
                f"sharpkit: the targets hold -100 (cross-entropy's ignore_index) {ignored[0]} times, but loss_fn "
                f"{what_loss} is not nn.CrossEntropyLoss / nn.NLLLoss / F.cross_entropy / F.nll_loss, so each batch "
                "weighs its number of samples; if the loss leaves those targets out of its mean, the objective is "
                "not the loss over all the data at once (batches with more of them weigh too much).  Pass the loss "
                "module itself with outputs (N, C, ...) and targets (N, ...), or the data as one batch",
                RuntimeWarning, stacklevel=3)
        return survey, DataWeights(None, num_samples, float(num_samples))
    if not total > 0:
        raise ValueError("every target of the data equals the loss's ignore_index or has class weight 0: "
                         "the mean loss is undefined")
    # Cauchy-Schwarz: squares * samples >= total^2, with equality exactly where every sample
    # weighs the same: then weighing by samples is the same objective, however the batches are
    # later joined or split.
    if squares * samples - total * total <= 1e-12 * squares * samples:
        return survey, DataWeights(None, num_samples, total, total / samples)
    return survey, DataWeights(batch_weigher(loss_fn), num_samples, total)


def join_obstacle(loss_fn: LossFn, batch: Any, outputs: Any = None) -> str | None:
    """Why joining batches into larger passes would change the objective, or None.

    Joining keeps ``sum_b w_b * loss_b / total`` only when each batch's loss is the weighted mean
    of per-sample terms, with the weights of :func:`batch_weigher` (the samples for most losses).
    The loss is probed on ``outputs``, the model's outputs on ``batch`` (of at least 2 samples):
    its loss must equal the weighted mean of the losses of its two halves (to rounding).  A loss
    equal to their sum is a ValueError (:func:`check_loss_reduction`).
    """
    m = batch[0].shape[0] if batch is not None else 0
    if outputs is None or m < 2 or not isinstance(outputs, torch.Tensor) or outputs.shape[:1] != (m,):
        return None
    _, y = to_device(batch, outputs.device, outputs.dtype)
    k = m // 2
    weigh = batch_weigher(loss_fn)
    parts = [(outputs, y), (outputs[:k], y[:k]), (outputs[k:], y[k:])]
    weights = [weigh(part) for part in parts]
    if not all(w > 0 for w in weights):
        return None  # (a half without weight: nothing to compare)
    with torch.no_grad():
        losses = [_call_loss(loss_fn, out, t) for out, t in parts]
    if not all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in losses):
        return None  # not a scalar: the measurement's first pass says so
    whole, first, second = (float(v) for v in losses)
    halves = (weights[1] * first + weights[2] * second) / (weights[1] + weights[2])
    if not (math.isfinite(whole) and math.isfinite(halves)):
        return None  # a non-finite loss is reported by the measurement itself
    rtol = max(1e-6, 1000 * torch.finfo(outputs.dtype).eps)
    if abs(whole - halves) > rtol * max(abs(whole), abs(halves), 1e-12):
        # A sum over the samples is no objective at all: refused, not merely kept apart.
        _refuse_summed(loss_fn, m, (whole, first, second), (weights[1], weights[2]), outputs.dtype)
        return (f"loss_fn is not a per-sample mean: on {m} samples it gives {whole:.6g}, the weighted mean "
                f"of its halves {halves:.6g}")
    return None


def batches_stay_whole(model: nn.Module, data: Any, device: torch.device | None = None,
                       dtype: torch.dtype | None = None, bn: str | None = None) -> bool:
    """Whether sharding must keep each batch whole on one rank (:func:`sharpkit.distributed.shard`):
    BatchNorm uses batch statistics (judged as ``bn`` will set it, or as the modules are), or
    ``data`` is one ``(X, Y)`` pair, which sharding would split by rows, and the model's samples
    interact (:func:`samples_interact`, probed on its first 64 rows, in ``device``/``dtype``:
    default the parameters').  Call inside :func:`~sharpkit.params.measurement_mode` or give
    ``bn`` (dropout must be off for the probe)."""
    if _dist.uses_batch_statistics(model, bn):
        return True
    batches = as_batches(data)
    if batches.is_sharded:  # each rank's own data: nothing left to split
        return False
    pair = batches.single_pair()
    if pair is None or pair[0].shape[0] < 2:
        return False
    flat = FlatParams(model)
    device = flat.device if device is None else device
    dtype = flat.dtype if dtype is None else dtype
    probe = (pair[0][:64], pair[1][:64])

    def interact() -> bool:
        outputs = _forward(model, to_device(probe, device, dtype)[0], device, dtype)
        return samples_interact(model, probe, outputs, device, dtype) is not None

    # (A model that fails on the data fails here on every rank: each raises, none waits.)
    with _dist.agree("probing the model on the data"):
        if bn is None:
            whole = interact()
        else:
            with measurement_mode(model, bn):
                whole = interact()
    return whole


def probe_largest_batch(model: nn.Module, survey: BatchSurvey, device: torch.device, dtype: torch.dtype,
                        loss_fn: LossFn | None = None) -> tuple[float, str | None]:
    """Forwards of the survey's largest batch and of its halves: module-output elements per sample
    (not bytes; :func:`activation_elements`) and why joining the batches would change the objective
    (the model's samples interact: :func:`samples_interact`; given ``loss_fn``, the loss is not a
    per-sample mean: :func:`join_obstacle`), None when it would not.  ``(0.0, None)`` without batches."""
    if survey.largest is None:
        return 0.0, None
    elements, outputs = _probe_forward(model, survey.largest, device, dtype)
    per_sample = elements / survey.largest_size
    if survey.num_batches < 2:
        return per_sample, None  # (nothing to join)
    probe = survey.largest
    if survey.largest_size < 2 and len(survey.head) == 2 and survey.layouts[0] == survey.layouts[1]:
        # Batches of one sample: the join itself is the probe (the first two batches).
        probe = tuple(torch.cat(parts) for parts in zip(*survey.head))
        outputs = _forward(model, to_device(probe, device, dtype)[0], device, dtype)
    obstacle = join_obstacle(loss_on_device(loss_fn, device, dtype), probe, outputs) if loss_fn is not None else None
    if obstacle is None:
        obstacle = samples_interact(model, probe, outputs, device, dtype)
    return per_sample, obstacle


def regroup_rows(
    model: nn.Module,
    batches: Batches | BatchSurvey,
    device: torch.device,
    dtype: torch.dtype,
    vectors: int = 1,
    max_rows: int = REGROUP_MAX_ROWS,
    loss_fn: LossFn | None = None,
) -> int | None:
    """Samples per pass when joining small batches: at most ``max_rows`` and ``REGROUP_BYTES`` of
    activations, counted four times over (forward, backward, temporaries) for each of ``vectors``
    directions a pass carries, never fewer than the largest batch.  None when there is nothing
    to join (one batch) or when joining would change the objective (the model's samples interact,
    or given ``loss_fn`` the loss is not a per-sample mean: :func:`probe_largest_batch`).
    ``batches`` may be given as their survey (then not read again); forwards of the largest batch
    and of its halves run either way."""
    if isinstance(batches, BatchSurvey):
        survey = batches
    else:
        survey = survey_batches(batches)
    if survey.num_batches < 2:
        return None
    rows = survey.largest_size
    elements_per_sample, obstacle = probe_largest_batch(model, survey, device, dtype, loss_fn)
    if obstacle is not None:
        return None
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_sample = max(1.0, elements_per_sample) * itemsize
    return int(max(rows, min(max_rows, REGROUP_BYTES // (4 * per_sample * max(1, vectors)))))
