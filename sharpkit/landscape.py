"""Loss-landscape curves: 1-D paths between two minimizers (Keskar et al. Fig. 2/3/7) and slices
along filter-normalised random directions around one minimizer (Li et al. 2018).

Every point is one pass over the data of one :class:`~sharpkit.objective.Objective` per curve or
slice (its batches, sample weights, shards under torch.distributed and input checks, read once),
accumulating the weighted loss beside the correct predictions.  The user's models are never
written: slices pass their points to the objective, paths are written into one private copy.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import torch
from torch import nn

from . import distributed as _dist
from .data import to_device
from .objective import Objective, checked_loss, ignore_index_of
from .params import FlatParams, check_finite_parameters, measurement_mode, preserved, private_copy

__all__ = ["Curve", "Surface", "interpolate", "evaluate", "random_direction", "slice_1d", "slice_2d"]

PATHS = ("linear", "sin")


@dataclass
class Curve:
    """Loss and accuracy along a 1-D path.

    ``alphas``: the path coordinates; ``loss``: mean loss at each (same units as ``loss_fn``);
    ``accuracy``: fraction of correct argmax predictions in [0, 1] (NaN where the task is not
    classification).
    """

    alphas: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray
    meta: dict = field(default_factory=dict)


@dataclass
class Surface:
    """Loss and accuracy on a 2-D grid: ``loss[i, j]`` at ``(alphas[i], betas[j])``."""

    alphas: np.ndarray
    betas: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray


_F = TypeVar("_F", bound=Callable[..., Any])


def _outside_inference_mode(fn: _F) -> _F:
    """Run ``fn`` with inference mode off, as every sharpkit measurement does: under a caller's
    ``torch.inference_mode()`` the private copy of a model and the sums would be inference tensors,
    which can be neither restored (no version counter) nor added to outside it."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode(False):
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]


@_outside_inference_mode
def evaluate(
    model: nn.Module,
    loss_fn,
    data: Any,
    bn: str = "eval",
    device: torch.device | str | None = None,
) -> tuple[float, float]:
    """``(mean loss, accuracy)`` of ``model`` over ``data`` (the loss over all the data, exact with uneven
    batches: weighted as :class:`sharpkit.objective.DataWeights` says).

    ``bn``: "eval" (running statistics) or "train" (each batch's statistics); dropout is off and
    the model is restored exactly.  Accuracy is the fraction of samples whose argmax output equals
    an integer target (targets equal to the loss's ``ignore_index`` left out, as the loss leaves
    them).  It is NaN when the outputs are not an ``(N, C)`` tensor of class scores (a dict or tuple
    of outputs, which ``loss_fn`` reads, has no accuracy), and when some output is NaN (a diverged
    model's loss and accuracy are both NaN: an argmax over NaN is no prediction).

    Raises ``ValueError`` for inputs holding NaN or inf (naming the batch) and for empty data.
    """
    model = _measurable(model)
    with measurement_mode(model, bn):
        # (a diverged training run is recorded: its NaN loss and accuracy are the answer)
        objective = Objective(model, loss_fn, data, device=device, finite_parameters=False)
        return _loss_and_accuracy(objective, objective.x0(), bn)


def _measurable(model: nn.Module) -> nn.Module:
    """``model``, or where none of its parameters is trainable, a private copy whose floating
    parameters are: the :class:`~sharpkit.objective.Objective` evaluates the model at a vector of its
    trainable parameters, and a landscape only evaluates (it never differentiates), so a frozen
    checkpoint is measured whole."""
    if any(p.requires_grad for p in model.parameters()):
        return model
    copy = private_copy(model)
    for p in copy.parameters():
        if p.is_floating_point():
            p.requires_grad_(True)
    return copy


def _loss_and_accuracy(objective: Objective, x: torch.Tensor, bn: str) -> tuple[float, float]:
    """``(mean loss, accuracy)`` at parameters ``x`` in one pass over ``objective``'s data: the loss is
    :meth:`Objective.loss <sharpkit.objective.Objective.loss>`'s (same batches, weights, shards and
    checks), computed here beside the accuracy because that needs the outputs, which ``loss``
    does not return.  Call inside the :func:`~sharpkit.params.measurement_mode` the objective was built in."""
    ignore = ignore_index_of(objective.loss_fn)
    # Sums [loss * w, correct, batches that are not classification, targets scored, batches with
    # NaN outputs], reduced over ranks when the data are sharded (the point's digest travels with
    # them: ranks at different points are refused).
    sums = torch.zeros(5, dtype=torch.float64)
    with torch.no_grad(), _dist.sharded_pass([sums], enabled=objective.distributed, same=[x]):
        # A loss summing over the samples (a lambda around reduction='sum') is refused (once per objective).
        objective.check_reduction()
        for index, batch in enumerate(objective.batches):
            inputs, targets = to_device(batch, objective.device, objective.dtype)
            try:
                out = objective.batch_output(x, inputs)
            except ValueError as exc:
                if bn == "train" and "more than 1 value per channel" in str(exc):
                    raise ValueError(f"batch {index} holds {inputs.shape[0]} sample(s): BatchNorm with batch "
                                     "statistics (bn='train') needs more than one value per channel; batch the "
                                     "data otherwise or use bn='eval'") from exc
                raise
            w = objective.weights.of(batch)
            if w > 0:  # (a batch whose every target is ignored has no mean loss)
                sums[0] += float(checked_loss(objective.loss_fn, out, targets)) * w
            if isinstance(out, torch.Tensor) and isinstance(targets, torch.Tensor) and out.dim() == 2 \
                    and not targets.is_floating_point() and targets.dim() == 1:
                if out.is_floating_point() and bool(torch.isnan(out).any()):
                    sums[4] += 1  # argmax of a NaN row is the NaN's index: no prediction
                scored = targets != ignore if ignore is not None else torch.ones_like(targets, dtype=torch.bool)
                sums[1] += float(((out.argmax(dim=1) == targets) & scored).sum())
                sums[3] += float(scored.sum())
            else:
                sums[2] += 1
    loss_sum, correct, other, scored_total, nan_outputs = sums.tolist()
    defined = other == 0 and nan_outputs == 0 and scored_total > 0
    return loss_sum / objective.weights.total, (correct / scored_total if defined else math.nan)


@_outside_inference_mode
def interpolate(
    model_a: nn.Module,
    model_b: nn.Module,
    loss_fn,
    data: Any,
    alphas: Sequence[float] | np.ndarray | torch.Tensor = tuple(np.linspace(-1.0, 2.0, 25)),
    path: str = "linear",
    bn: str = "eval",
    device: torch.device | str | None = None,
    on_point: Callable[[float, float, float], None] | None = None,
) -> Curve:
    """Loss and accuracy along a path from ``model_a`` (alpha = 0) to ``model_b`` (alpha = 1).

    ``path="linear"``: ``x(alpha) = (1 - alpha) x_a + alpha x_b`` (Keskar et al. Fig. 2/3 with
    a = SB, b = LB).  ``path="sin"``: ``x(alpha) = cos(alpha pi/2) x_a + sin(alpha pi/2) x_b``
    (their Fig. 7).  ``alphas`` default: 25 points in [-1, 2].

    ``bn`` (default "eval", sharpkit's convention): BatchNorm uses its running statistics and
    dropout is off.  Running statistics of two different networks do not combine along a path
    (beyond the end points an interpolated variance can turn negative), so with ``bn="eval"`` the
    two models must hold the same running statistics, or a ``ValueError`` names the layers that
    differ.  For networks with BatchNorm pass ``bn="train"``, the authors' protocol (as the study
    and ``sharpkit interpolate`` do): each batch is normalised with its own statistics at every
    point; pass ``data`` as one ``(X, Y)`` pair for full-batch statistics (a DataLoader that
    reshuffles is refused there: every point would see other batches).  Both models must have
    the same architecture; neither is modified.  Every floating parameter moves along the path,
    trainable or frozen; other buffers come from ``model_a``.
    ``device``: where to evaluate (default: ``model_a``'s device).  ``on_point(alpha, loss,
    accuracy)``, when given, is called after each point (progress).
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    alphas_np = _coordinates(alphas, "alphas")
    check_finite_parameters(model_a)
    check_finite_parameters(model_b)
    # Every floating parameter moves along the path, trainable or frozen (the whole network).
    pa, pb = _floating_parameters(model_a), _floating_parameters(model_b)
    _check_same_parameters(pa, pb)
    if bn == "eval":
        _check_same_running_statistics(model_a, model_b)
    work = _measurable(private_copy(model_a))  # one private copy; the user's models are only read
    if device is not None:
        work.to(device)  # (then evaluated where it is: no copy of the model per point)
    pw = _floating_parameters(work)
    ends = {k: (pa[k].detach().to(pw[k]), pb[k].detach().to(pw[k])) for k in pw}
    losses, accs = [], []
    # The copy's hooks are the user's functions: one writing a tensor it holds by closure (a
    # buffer of model_a or model_b) would change the user's model, so both are restored on exit.
    with preserved(model_a), preserved(model_b), measurement_mode(work, bn):
        # Each point is written into the copy, frozen parameters included: the objective evaluates
        # at the copy's trainable vector (x0) and reads its other tensors as they are (aliases:
        # the copy is on the objective's device and in its dtype).
        objective = Objective(work, loss_fn, data)
        for a in alphas_np:
            if path == "linear":
                ca, cb = 1.0 - a, a
            else:
                ca, cb = math.cos(a * math.pi / 2), math.sin(a * math.pi / 2)
            with torch.no_grad():
                for k, p in pw.items():
                    xa, xb = ends[k]
                    p.copy_(ca * xa + cb * xb)
            loss, acc = _loss_and_accuracy(objective, objective.x0(), bn)
            losses.append(loss)
            accs.append(acc)
            if on_point is not None:
                on_point(float(a), loss, acc)
    return Curve(alphas_np, np.asarray(losses), np.asarray(accs), {"path": path, "bn": bn})


def _floating_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.is_floating_point()}


def _check_same_parameters(pa: dict[str, torch.Tensor], pb: dict[str, torch.Tensor]) -> None:
    """``ValueError`` naming the parameters that model_a and model_b do not share with one shape."""
    only_a, only_b = sorted(set(pa) - set(pb)), sorted(set(pb) - set(pa))
    shapes = [f"{k}: {tuple(pa[k].shape)} vs {tuple(pb[k].shape)}" for k in pa if k in pb and pa[k].shape != pb[k].shape]
    if only_a or only_b or shapes:
        parts = ([f"only in model_a: {', '.join(only_a[:5])}"] if only_a else []) + \
                ([f"only in model_b: {', '.join(only_b[:5])}"] if only_b else []) + \
                ([f"shapes differ: {'; '.join(shapes[:5])}"] if shapes else [])
        raise ValueError("model_a and model_b must have the same architecture (" + "; ".join(parts) + ")")


def _check_same_running_statistics(model_a: nn.Module, model_b: nn.Module) -> None:
    """``ValueError`` naming the normalisation layers whose running statistics differ between the
    two models: under ``bn="eval"`` a path would otherwise use ``model_a``'s at every point, so its
    end at alpha = 1 would not be ``model_b``."""
    buffers_b = dict(model_b.named_buffers())
    differ = []
    for name, module in model_a.named_modules():
        if not isinstance(module, nn.modules.batchnorm._NormBase) or module.running_mean is None:
            continue
        for stat in ("running_mean", "running_var"):
            key = f"{name}.{stat}" if name else stat
            other = buffers_b.get(key)
            if other is None or other.shape != getattr(module, stat).shape or \
                    not torch.equal(getattr(module, stat).detach().cpu(), other.detach().cpu()):
                differ.append(name or "(the model itself)")
                break
    if differ:
        raise ValueError(
            "interpolate with bn='eval' needs the same BatchNorm running statistics in both models, "
            f"but they differ in {', '.join(differ[:5])}{' ...' if len(differ) > 5 else ''}: statistics of two "
            "networks do not interpolate.  Pass bn='train' (each batch's own statistics, the authors' "
            "protocol), or copy one model's running statistics into the other first if a fixed "
            "normalisation is what you want")


def random_direction(model: nn.Module, seed: int = 0, filter_normalize: bool = True) -> torch.Tensor:
    """A Gaussian direction in parameter space (shape ``(n,)``), filter-normalised (Li et al. 2018).

    Each filter (row of a weight: output unit or conv channel) of ``d`` is rescaled to the norm of
    the matching filter of the weights, ``d_f <- d_f ||w_f|| / ||d_f||``; 1-D parameters (biases,
    BatchNorm scales) are zeroed, as Li et al. do.  ``filter_normalize=False`` returns the raw
    Gaussian direction.
    """
    flat = FlatParams(model)
    gen = torch.Generator().manual_seed(int(seed))
    d = torch.randn(flat.n, generator=gen, dtype=torch.float64).to(flat.device, flat.dtype)
    if not filter_normalize:
        return d
    x = flat.get()
    for dv, wv in zip(flat.views(d), flat.views(x)):
        if dv.dim() <= 1:
            dv.zero_()
            continue
        d2, w2 = dv.reshape(dv.shape[0], -1), wv.reshape(wv.shape[0], -1)
        dv.copy_((d2 * (w2.norm(dim=1, keepdim=True) / d2.norm(dim=1, keepdim=True).clamp_min(1e-12))).view_as(dv))
    return d


@_outside_inference_mode
def slice_1d(
    model: nn.Module,
    loss_fn,
    data: Any,
    alphas: Sequence[float] = tuple(np.linspace(-1.0, 1.0, 21)),
    direction: torch.Tensor | None = None,
    seed: int = 0,
    bn: str = "eval",
) -> Curve:
    """Loss and accuracy at ``x + alpha d`` (``d``: ``direction`` or :func:`random_direction` (seed))."""
    surf = _grid(model, loss_fn, data, alphas, [0.0], direction, None, seed, bn, names=("direction", "direction"))
    return Curve(surf.alphas, surf.loss[:, 0], surf.accuracy[:, 0], {"path": "direction", "bn": bn})


@_outside_inference_mode
def slice_2d(
    model: nn.Module,
    loss_fn,
    data: Any,
    alphas: Sequence[float] = tuple(np.linspace(-1.0, 1.0, 11)),
    betas: Sequence[float] = tuple(np.linspace(-1.0, 1.0, 11)),
    directions: tuple[torch.Tensor, torch.Tensor] | None = None,
    seed: int = 0,
    bn: str = "eval",
) -> Surface:
    """Loss and accuracy at ``x + alpha d1 + beta d2`` on a grid (two filter-normalised directions
    drawn from ``seed`` and ``seed + 1`` unless ``directions`` are given)."""
    if directions is None:
        d1 = d2 = None
    elif isinstance(directions, (tuple, list)) and len(directions) == 2:
        d1, d2 = directions
    else:
        count = f" of {len(directions)}" if isinstance(directions, (tuple, list)) else ""
        raise ValueError(f"directions must be a pair (d1, d2) of parameter-space vectors, got "
                         f"{type(directions).__name__}{count}")
    return _grid(model, loss_fn, data, alphas, betas, d1, d2, seed, bn)


def _grid(model, loss_fn, data, alphas, betas, d1, d2, seed, bn,
          names: tuple[str, str] = ("first direction", "second direction")) -> Surface:
    a_np, b_np = _coordinates(alphas, "alphas"), _coordinates(betas, "betas")
    check_finite_parameters(model)
    flat = FlatParams(model)
    d1 = random_direction(model, seed) if d1 is None else _direction(d1, flat, names[0])
    d2 = random_direction(model, seed + 1) if d2 is None else _direction(d2, flat, names[1])
    x = flat.get()
    loss = np.empty((a_np.size, b_np.size))
    acc = np.empty_like(loss)
    # The points are passed to the objective (functional_call): the model's own tensors are only
    # read, and measurement_mode restores whatever its hooks write.
    with measurement_mode(model, bn):
        objective = Objective(model, loss_fn, data)
        for i, a in enumerate(a_np):
            for j, b in enumerate(b_np):
                loss[i, j], acc[i, j] = _loss_and_accuracy(objective, x + float(a) * d1 + float(b) * d2, bn)
    return Surface(a_np, b_np, loss, acc)


def _coordinates(values: Any, name: str) -> np.ndarray:
    """``values`` (a number, a sequence, an array or a tensor) as a flat float64 array: ``ValueError``
    naming ``name`` when it is empty or holds NaN or inf (a point there has no loss)."""
    try:
        out = np.asarray(torch.as_tensor(values, dtype=torch.float64).cpu().numpy(), dtype=np.float64).reshape(-1)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{name} must be numbers (a sequence, an array or a tensor): {exc}") from None
    if out.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{name} must be finite, got {out[~np.isfinite(out)][0]}")
    return out


def _direction(d: Any, flat: FlatParams, name: str) -> torch.Tensor:
    """A direction given by the user as a finite vector of ``flat``'s length, on its device and dtype."""
    if not isinstance(d, torch.Tensor):
        try:
            d = torch.as_tensor(np.asarray(d, dtype=np.float64))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"a {name} must be a tensor of shape ({flat.n},): {exc}") from None
    if tuple(d.shape) != (flat.n,):
        raise ValueError(f"a {name} must have shape ({flat.n},) (the model's trainable parameters), "
                         f"got {tuple(d.shape)}")
    if not d.is_floating_point():
        d = d.double()
    if not bool(torch.isfinite(d).all()):
        bad = "NaN" if bool(torch.isnan(d).any()) else "inf"
        raise ValueError(f"the {name} holds {bad}: every point along it would be non-finite")
    return d.detach().to(flat.device, flat.dtype)
