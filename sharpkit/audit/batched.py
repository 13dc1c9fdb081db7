"""Objectives over many parameter vectors at once: the engines the audit's metrics run on.

An *engine* holds ``B`` reference points ``X`` (shape ``(B, n)``: B checkpoints of one
architecture) and evaluates, for a batch of points ``W`` (also ``(B, n)``, row b belonging to
checkpoint b):

- ``loss(W) -> (B,)`` float64, the sample-weighted mean loss of each row;
- ``loss_and_grad(W) -> ((B,), (B, n))`` from the same pass (the solver contract:
  ``num_problems``, ``dim``, ``loss_and_grad(Y)``);
- ``hvp(V) -> (B, n)``, the Hessian of each checkpoint's loss at its ``X[b]`` times ``V[b]``.

:class:`StackedObjective` runs the model under ``torch.func.vmap(functional_call)`` with the B
parameter vectors (and buffers) stacked, so one pass over the data serves every checkpoint.
:class:`SingleObjective` is the one-at-a-time engine (B = 1) on :class:`sharpkit.objective.Objective`.
Both accumulate sample-weighted sums over ``as_batches(data)`` in one place (``_accumulate``)
and divide once, where a distributed all-reduce of the sums belongs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn
from torch.func import functional_call, vmap

from .. import distributed as _dist
from ..data import Batches, BatchSurvey, regroup_batches, survey_batches, to_device
from ..objective import DataWeights, Objective, check_mean_reduced, checked_loss, probe_largest_batch, survey_weights
from ..curvature.engines import twice_differentiable_attention
from ..curvature.stable_loss import curvature_loss
from ..params import FlatParams, converts, working_dtypes

__all__ = ["StackedObjective", "SingleObjective", "stack_checkpoints", "estimate_group_size", "GroupPlan"]


def stack_checkpoints(
    model: nn.Module, states: list[Mapping[str, torch.Tensor]], device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stack fitted state dicts: ``(X, frozen)``.

    ``X`` (shape ``(G, n)``) holds each checkpoint's trainable parameters in
    :class:`~sharpkit.params.FlatParams` order; ``frozen`` maps every other state entry (buffers,
    frozen parameters) to a ``(G, ...)`` tensor.  Floating tensors are cast to ``dtype``, but for
    frozen ones in another precision than the trainable parameters (they keep the model's).
    """
    flat = FlatParams(model)
    trainable = set(flat.names)
    X = torch.stack(
        [torch.cat([s[name].reshape(-1).to(device, dtype) for name in flat.names]) for s in states]
    )
    # A tensor registered under several names (tied weights: a decoder sharing the embedding's
    # matrix) is in the state dict once per name; functional_call takes it under one name only
    # (tied names given twice raise), and a tied trainable parameter comes from X.
    named = model.state_dict(keep_vars=True)
    trainable_ids = {id(named[name]) for name in flat.names if name in named}
    first: dict[int, str] = {}
    for name, tensor in named.items():
        first.setdefault(id(tensor), name)
    aliases = {name for name, t in named.items() if id(t) in trainable_ids or first[id(t)] != name}
    # Frozen floating tensors in the trainable parameters' precision are cast to ``dtype``, others
    # keep the model's own (a frozen float64 head computes in float64), as model_tensors does.
    cast = working_dtypes(model)
    frozen = {}
    for name in states[0]:
        if name in trainable or name in aliases:
            continue
        own = named[name].dtype if name in named else states[0][name].dtype
        to = (dtype if converts(own, cast) else own) if own.is_floating_point else None
        frozen[name] = torch.stack([s[name].to(device, to) for s in states])
    return X, frozen


class _HvpCache:
    """First-order graphs kept across Hessian-vector products, one per data batch.

    The primal pass (forward, then backward with ``create_graph``) does not depend on the vector,
    so where memory allows (``keep=True``) it is done once per batch and every later HVP costs
    only the second backward.  Otherwise each HVP redoes it.
    """

    def __init__(self, keep: bool):
        self.keep = keep
        self.graphs: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def hvp(self, batches, make_graph, V: torch.Tensor, reduce: bool = False) -> torch.Tensor:
        """Sum over the ``(batch, weight)`` items of ``batches`` of ``d(g_b . V)/dx`` with
        ``(x, g_b) = make_graph(item)`` (g_b already carries the batch's weight); with ``reduce``,
        also over the ranks holding shards."""
        out = torch.zeros_like(V)
        # (attention by kernels with second derivatives, as in the curvature engines)
        with twice_differentiable_attention(), _dist.sharded_pass([out], enabled=reduce, same=[V]):
            if self.keep and self.graphs is None:
                self.graphs = [make_graph(item) for item in batches]
            for item in self.graphs if self.keep else batches:
                xr, g = item if self.keep else make_graph(item)
                (hv,) = torch.autograd.grad(g, xr, V, retain_graph=self.keep)
                out += hv
        return out


class StackedObjective:
    """B checkpoints of one architecture evaluated together under ``vmap``.

    Args:
        model: the architecture (its own tensors are never read or written; it is used as a
            functional template).  Call inside :func:`~sharpkit.params.measurement_mode`.
        loss_fn: mean-reduced ``loss_fn(outputs, targets) -> scalar``.
        batches: the data (:class:`~sharpkit.data.Batches`).
        X: ``(B, n)`` reference parameter vectors (their device and dtype are the evaluation's).
        frozen: ``{name: (B, ...)}`` buffers and frozen parameters.
        weights: the data's :class:`~sharpkit.objective.DataWeights` for ``loss_fn`` when already
            known (None: from a read of ``batches``, reduced over the ranks of sharded data).
        keep_graphs: keep each batch's first-order graph across HVPs (default True; memory
            about four times the activations of all data for B checkpoints).
        max_rows: regroup the data into chunks of at most this many samples (None: keep the
            batches; see :func:`sharpkit.data.regroup_batches`).  Only for models whose samples do not interact
            (BatchNorm in eval mode): the sample-weighted sums are the same, and B x max_rows
            activations stay closer to the CPU caches.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        batches: Batches,
        X: torch.Tensor,
        frozen: dict[str, torch.Tensor],
        weights: DataWeights | None = None,
        keep_graphs: bool = True,
        max_rows: int | None = None,
    ):
        if X.dim() != 2:
            raise ValueError(f"X must have shape (B, n), got {tuple(X.shape)}")
        check_mean_reduced(loss_fn)
        self.model = model
        self.loss_fn = loss_fn
        self.sharded = batches.is_sharded  # this rank's share: sums are reduced across ranks
        self.batches = batches if max_rows is None else regroup_batches(batches, max_rows)
        self.flat = FlatParams(model)
        if X.shape[1] != self.flat.n:
            raise ValueError(f"X has {X.shape[1]} columns but the model has {self.flat.n} trainable parameters")
        self.X = X.detach()
        self.frozen = frozen
        self.device, self.dtype = X.device, X.dtype
        self.weights = weights if weights is not None else survey_weights(batches, loss_fn, batches.is_sharded)[1]
        self.num_samples = self.weights.num_samples
        self.num_problems, self.dim = X.shape
        self.num_evals = 0
        self.num_hvps = 0
        self._cache = _HvpCache(keep_graphs)

        def losses(fn: Callable):
            def one(x: torch.Tensor, buffers: dict[str, torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor):
                tensors = dict(buffers)
                tensors.update(self.flat.as_dict(x))
                return checked_loss(fn, functional_call(model, tensors, (inputs,)), targets)

            return vmap(one, in_dims=(0, 0, None, None))

        self._batched = losses(loss_fn)
        # Hessian products differentiate the loss in its form precise at saturated softmax.
        self._batched_curvature = losses(curvature_loss(loss_fn))

    def batch_losses(self, W: torch.Tensor, batch, curvature: bool = False) -> torch.Tensor:
        """``(B,)`` mean losses of one batch at the rows of ``W`` (differentiable in ``W``);
        ``curvature``: by :func:`~sharpkit.curvature.stable_loss.curvature_loss`'s form."""
        inputs, targets = to_device(batch, self.device, self.dtype)
        return (self._batched_curvature if curvature else self._batched)(W, self.frozen, inputs, targets)

    def _check(self, W: torch.Tensor) -> torch.Tensor:
        if W.shape != self.X.shape:
            raise ValueError(f"expected points of shape {tuple(self.X.shape)}, got {tuple(W.shape)}")
        return W.detach().to(self.device, self.dtype)

    def _accumulate(self, W: torch.Tensor, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sample-weighted sums over the data (the one place an all-reduce would go), divided once."""
        total = torch.zeros(self.num_problems, device=self.device, dtype=torch.float64)
        grad = torch.zeros_like(W) if with_grad else None
        with _dist.sharded_pass([total] + ([grad] if with_grad else []), enabled=self.sharded, same=[W]):
            for batch, w in self.weights.weighted(self.batches):
                if with_grad:
                    Wr = W.clone().requires_grad_(True)
                    losses = self.batch_losses(Wr, batch)
                    # Rows are independent, so the gradient of the sum is each row's own gradient.
                    (g,) = torch.autograd.grad((losses * (w / self.weights.total)).sum(), Wr)
                    grad += g
                else:
                    with torch.no_grad():
                        losses = self.batch_losses(W, batch)
                total += losses.detach().double() * w
        self.num_evals += 1
        return total / self.weights.total, grad

    def loss(self, W: torch.Tensor) -> torch.Tensor:
        """``(B,)`` float64 losses at the rows of ``W``."""
        return self._accumulate(self._check(W), with_grad=False)[0]

    def loss_and_grad(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``((B,) float64 losses, (B, n) gradients)`` at the rows of ``W``, from one pass."""
        total, grad = self._accumulate(self._check(W), with_grad=True)
        return total, grad

    def hvp(self, V: torch.Tensor) -> torch.Tensor:
        """``(B, n)``: row b is ``H_b V[b]`` with ``H_b`` the Hessian of checkpoint b's loss at ``X[b]``."""
        V = self._check(V)
        self.num_hvps += 1

        def graph(item):
            batch, w = item
            Xr = self.X.clone().requires_grad_(True)
            losses = self.batch_losses(Xr, batch, curvature=True)
            (g,) = torch.autograd.grad((losses * (w / self.weights.total)).sum(), Xr, create_graph=True)
            return Xr, g

        return self._cache.hvp(self.weights.weighted(self.batches), graph, V, reduce=self.sharded).detach()


class SingleObjective:
    """The one-at-a-time engine: one checkpoint (B = 1) on :class:`sharpkit.objective.Objective`.

    Args:
        objective: built on the model with the checkpoint's weights loaded.
        keep_graphs: keep each batch's first-order graph across HVPs (default True).
    """

    def __init__(self, objective: Objective, keep_graphs: bool = True):
        self.objective = objective
        self.X = objective.x0().unsqueeze(0)
        self.device, self.dtype = self.X.device, self.X.dtype
        self.num_problems, self.dim = self.X.shape
        self.num_hvps = 0
        self._cache = _HvpCache(keep_graphs)

    @property
    def num_evals(self) -> int:
        return self.objective.num_evals

    def _check(self, W: torch.Tensor) -> torch.Tensor:
        if W.shape != self.X.shape:
            raise ValueError(f"expected points of shape {tuple(self.X.shape)}, got {tuple(W.shape)}")
        return W.detach().to(self.device, self.dtype)

    def loss(self, W: torch.Tensor) -> torch.Tensor:
        return self.objective.loss(self._check(W)[0]).reshape(1)

    def loss_and_grad(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f, g = self.objective.loss_and_grad(self._check(W)[0])
        return f.reshape(1), g.unsqueeze(0)

    def hvp(self, V: torch.Tensor) -> torch.Tensor:
        """``(1, n)``: the Hessian at the checkpoint times ``V[0]``."""
        obj = self.objective
        self.num_hvps += 1
        loss_fn = curvature_loss(obj.loss_fn)  # as StackedObjective.hvp

        def graph(item):
            batch, w = item
            xr = self.X[0].clone().requires_grad_(True)
            loss = obj.batch_loss(xr, batch, loss_fn) * (w / obj.weights.total)
            (g,) = torch.autograd.grad(loss, xr, create_graph=True)
            return xr, g

        return self._cache.hvp(obj.weights.weighted(obj.batches), graph, self._check(V)[0],
                               reduce=obj.distributed).detach().unsqueeze(0)


def _available_bytes(device: torch.device) -> int:
    """Free memory on ``device``: CUDA's free bytes, else the host's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


# On a CPU, stacking checkpoints under vmap saves per-batch overhead but runs the arithmetic less
# efficiently (batched GEMMs, larger working sets).  With 16 MNIST-1D MLP checkpoints on a 2-core
# x86 and the batches as given, stacking was 2.7x faster than one at a time with batches of 100
# samples, 1.6x with 250, 0.9x with 500 and 0.66x with one batch of 4000; with the data regrouped
# into passes of 4000 (bn="eval") one at a time is faster at batches of 100 too (5.8 s against
# 6.8 s stacked; benchmarks/bench_audit.py).  Above this mean batch size (after regrouping, where
# allowed) the automatic plan measures one checkpoint at a time on a CPU.
CPU_STACK_MAX_BATCH = 400


@dataclass(frozen=True)
class GroupPlan:
    """How the audit groups checkpoints: ``group_size`` checkpoints stacked, each needing about
    ``bytes_per_checkpoint``; ``keep_graphs`` whether HVP graphs of all batches are kept;
    ``pass_rows`` the most samples per checkpoint one pass may hold when the data may be
    regrouped (:func:`sharpkit.data.regroup_batches`), else None (the batches as given)."""

    group_size: int
    bytes_per_checkpoint: int
    keep_graphs: bool
    pass_rows: int | None = None


def estimate_group_size(
    model: nn.Module,
    batches: Batches | BatchSurvey,
    device: torch.device,
    dtype: torch.dtype,
    vectors_per_checkpoint: int,
    memory_fraction: float = 0.25,
    max_group: int = 64,
    available_bytes: int | None = None,
    regroup_rows: int | None = None,
    loss_fn: Callable | None = None,
) -> GroupPlan:
    """How many checkpoints to stack, from free memory.

    Per checkpoint the audit holds ``vectors_per_checkpoint`` parameter-sized vectors (points,
    gradients, Lanczos basis...) and activations about four times over (forward, first and second
    backward, the kept HVP graph): of all the data when HVP graphs are kept, else of the largest
    batch.  Graphs are kept when one checkpoint's share fits.  The group uses at most
    ``memory_fraction`` (default 0.25) of the free memory (``available_bytes``, default: measured)
    and at most ``max_group`` (default 64) checkpoints; never fewer than one.

    ``regroup_rows`` (None: the batches stay as given): the data may be regrouped into passes of
    up to this many samples per checkpoint (samples independent); the plan's
    ``pass_rows`` is that, or less where the group's memory requires, never below the largest
    batch; None too where joining batches would change the objective (the model's samples
    interact, or given ``loss_fn`` the loss is not a per-sample mean:
    :func:`sharpkit.objective.probe_largest_batch`).  On a CPU with mean batches (after
    regrouping) above ``CPU_STACK_MAX_BATCH`` samples the group is 1 (stacking measured slower
    there).  Reads the data once (not when ``batches`` is given as their survey) and runs
    forwards of the largest batch and of its halves.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    n = FlatParams(model).n
    survey = batches if isinstance(batches, BatchSurvey) else survey_batches(batches)
    num_batches, rows, total = survey.num_batches, survey.largest_size, survey.num_samples
    per_sample, obstacle = probe_largest_batch(model, survey, device, dtype, loss_fn)
    if obstacle is not None:
        regroup_rows = None
    budget = memory_fraction * (_available_bytes(device) if available_bytes is None else available_bytes)
    keep = itemsize * (n * vectors_per_checkpoint + 4 * per_sample * total)
    per = keep if keep <= budget else itemsize * (n * vectors_per_checkpoint + 4 * per_sample * rows)
    group = int(min(max_group, max(1, budget // max(per, 1))))

    def pass_rows(members: int) -> int | None:
        if regroup_rows is None:
            return None
        if keep <= budget:  # the kept graphs already count every sample's activations
            return max(1, int(regroup_rows))
        room = (budget / members - itemsize * n * vectors_per_checkpoint) / (itemsize * 4 * max(per_sample, 1.0))
        return int(min(regroup_rows, max(rows, room)))

    mean_batch = total / max(1, num_batches) if regroup_rows is None else min(total, pass_rows(1))
    if device.type == "cpu" and mean_batch > CPU_STACK_MAX_BATCH:
        group = 1  # compute-bound batches: stacking does not pay on a CPU (see CPU_STACK_MAX_BATCH)
    return GroupPlan(group, int(per), keep <= budget, pass_rows(group))
