"""Hessian/GGN-matrix products of one batch's mean loss: the engine interface and the generic engine.

An engine computes ``(curvature of THIS batch's mean loss at x) @ V`` for ``V`` of shape ``(n, k)``;
:class:`~sharpkit.curvature.operator.CurvatureOperator` sums those products over the batches with
sample weights.  Two engines exist:

* :class:`GenericEngine` (any model, through :mod:`torch.func`), with two ways of differentiating:

  - ``"forward-over-reverse"``: ``vmap`` over ``jvp(grad(f))``.  The k directions share one primal
    forward/backward per call (the primal is not batched by vmap).  Used when the primal pass is
    not cached.
  - ``"reverse-over-reverse"`` (double backward): the gradient graph of the batch is built once
    with ``create_graph=True`` and kept; every product is then one batched backward through it
    (``is_grads_batched``), so repeated products do not redo the primal pass.  Used when the
    primal is cached, and as the fallback where forward-mode AD fails for a model (e.g.
    ``nn.MSELoss``: "ZeroTensors are immutable", pytorch issue 123996); the fallback is recorded in
    :attr:`GenericEngine.info` and announced with a warning.

* the fused engine of :mod:`sharpkit.curvature.fused` (sequential MLPs), selected by
  :func:`make_engine` for ``engine="auto"`` where it supports the model.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import torch
from torch import nn
from torch.func import grad, jvp, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..data import to_device
from ..objective import Objective, checked_loss
from ..params import FlatParams
from .stable_loss import curvature_loss

# Vectors per product when the caller may choose (e.g. trace probes) and the engine states no
# preference: they then share every pass over the data.
DEFAULT_BLOCK_SIZE = 16

__all__ = ["HVPEngine", "GenericEngine", "make_engine", "KINDS", "ENGINES", "AD_MODES"]

KINDS = ("hessian", "ggn")
ENGINES = ("auto", "generic", "fused")
AD_MODES = ("auto", "forward-over-reverse", "reverse-over-reverse")

FOR, ROR = "forward-over-reverse", "reverse-over-reverse"


@runtime_checkable
class HVPEngine(Protocol):
    """What :class:`~sharpkit.curvature.operator.CurvatureOperator` needs from an engine."""

    name: str

    def batch_matmat(self, batch_index: int, inputs: torch.Tensor | None, targets: torch.Tensor | None,
                     V: torch.Tensor) -> torch.Tensor:
        """(Hessian or GGN of THIS batch's mean loss at x) @ V, V of shape (n, k) -> (n, k).
        May cache the batch's primal pass keyed by batch_index; inputs and targets may be None
        where :meth:`is_cached` says that pass is kept."""
        ...

    def is_cached(self, batch_index: int) -> bool:
        """True when products for ``batch_index`` need no data (its primal pass is kept)."""
        ...


@contextlib.contextmanager
def twice_differentiable_attention() -> Iterator[None]:
    """Attention computed by kernels torch can differentiate twice, for the duration.

    ``F.scaled_dot_product_attention`` (used by ``nn.MultiheadAttention`` and the transformer
    layers) picks a fused kernel (flash / memory-efficient) whose backward has no derivative and
    no forward-mode rule: every Hessian or GGN product of a model with attention failed with
    "derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
    implemented".  Inside, it uses the math kernel (the same function, composed of differentiable
    ops), and the transformer layers' inference fast path (``_native_multi_head_attention``,
    ``_transformer_encoder_layer_fwd``, taken under forward-mode AD, which they do not support) is
    off.  The flags are put back on exit."""
    with contextlib.ExitStack() as stack:
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
        except ImportError:  # pragma: no cover (torch < 2.3)
            pass
        else:
            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        mha = getattr(torch.backends, "mha", None)
        if mha is not None and hasattr(mha, "get_fastpath_enabled") and hasattr(mha, "set_fastpath_enabled"):
            previous = mha.get_fastpath_enabled()
            mha.set_fastpath_enabled(False)
            stack.callback(mha.set_fastpath_enabled, previous)
        yield


def trainable_weight_norm(model: nn.Module) -> str | None:
    """The first module weight of ``model`` under a weight norm with trainable factors (the
    ``parametrizations.weight_norm`` parametrization or the older ``weight_norm`` hook), or None.

    torch differentiates ``torch._weight_norm`` twice wrongly (torch 2.13 on a CPU: the Hessian of
    a small classifier 36% off finite differences, not even symmetric; forward mode is not
    implemented), so no Hessian through it can be trusted.  First derivatives, and with them the
    GGN, are right."""
    from torch.nn.utils.parametrizations import _WeightNorm
    from torch.nn.utils.weight_norm import WeightNorm

    for name, module in model.named_modules():
        where = f"{name}." if name else ""
        for tensor, plist in getattr(module, "parametrizations", {}).items():
            if any(isinstance(p, _WeightNorm) for p in plist) and any(t.requires_grad for t in plist.parameters()):
                return where + tensor
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, WeightNorm) and any(
                    getattr(module, hook.name + suffix).requires_grad for suffix in ("_g", "_v")):
                return where + hook.name
    return None


def check_hessian_computable(model: nn.Module) -> None:
    """ValueError where torch cannot differentiate ``model``'s loss twice exactly
    (:func:`trainable_weight_norm`), naming the module and what to measure instead."""
    site = trainable_weight_norm(model)
    if site is not None:
        raise ValueError(
            f"the Hessian of this model cannot be computed exactly: {site} is under a weight norm with trainable "
            "factors, and torch's second derivative of weight_norm is wrong; measure the GGN (sk.ggn), or remove "
            "the weight norm (torch.nn.utils.parametrize.remove_parametrizations) and measure the plain weight")


class OutputLayout:
    """How a model's output maps to the one vector whose Jacobian the GGN takes.

    A tensor output is that vector itself.  A tuple, list or dict of tensors (HF-style
    ``{"logits": ..., "hidden": ...}``; the loss then picks what it compares) contributes all its
    floating-point tensors, flattened and concatenated: the GGN ``J^T H_out J`` of the whole output,
    where the outputs the loss does not read add nothing.  Other leaves (integer tensors, None,
    numbers) are handed to the loss unchanged.

    Built from one output (for the tree structure and shapes); ``ValueError`` where no leaf is a
    floating-point tensor."""

    def __init__(self, out: Any):
        self.single = isinstance(out, torch.Tensor)
        leaves, self.spec = tree_flatten(out)
        self.index = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if not self.index:
            kinds = sorted({type(t).__name__ if not isinstance(t, torch.Tensor) else f"{t.dtype} tensor" for t in leaves})
            raise ValueError(f"the GGN needs the model's output to hold floating-point tensors; it returned "
                             f"{type(out).__name__} of {', '.join(kinds) or 'nothing'}")
        self.shapes = [tuple(leaves[i].shape) for i in self.index]
        self.sizes = [math.prod(shape) for shape in self.shapes]
        # Tensors that are not in the vector (integer outputs) come from each evaluation
        # (:meth:`others`); anything else (None, numbers, strings) is kept from this one.
        self.tensors = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and i not in self.index]
        self.constants = [None if isinstance(t, torch.Tensor) else t for t in leaves]

    def flatten(self, out: Any) -> torch.Tensor:
        """The output's floating-point tensors as one vector (a tensor output: itself)."""
        if self.single:
            return out
        leaves = tree_flatten(out)[0]
        return torch.cat([leaves[i].reshape(-1) for i in self.index])

    def others(self, out: Any) -> list[torch.Tensor]:
        """The output's tensors that are not in the vector (a list of tensors only: torch.func's
        ``has_aux`` takes nothing else)."""
        if self.single:
            return []
        leaves = tree_flatten(out)[0]
        return [leaves[i] for i in self.tensors]

    def unflatten(self, flat: torch.Tensor, others: list[torch.Tensor]) -> Any:
        """The output rebuilt around ``flat`` (what :meth:`flatten` gave, or a tensor like it) and
        ``others`` (what :meth:`others` gave)."""
        if self.single:
            return flat
        leaves = list(self.constants)
        for i, t in zip(self.tensors, others):
            leaves[i] = t
        for i, part, shape in zip(self.index, flat.split(self.sizes), self.shapes):
            leaves[i] = part.reshape(shape)
        return tree_unflatten(leaves, self.spec)


class GenericEngine:
    """Exact Hessian or GGN products of one batch's mean loss for any model, via :mod:`torch.func`.

    Args:
        kind: "hessian" or "ggn" (``J^T H_loss J``, J the Jacobian of the model output in x).
        objective: the :class:`~sharpkit.objective.Objective` that evaluates the model functionally
            (its device and dtype are the engine's).
        x: the parameter vector ``(n,)`` at which the curvature is taken.
        cache: keep each batch's gradient graph (keyed by ``batch_index``) across calls.
        ad: "auto" (reverse-over-reverse on cached graphs, forward-over-reverse otherwise, with the
            reverse fallback where forward mode fails), or force one of :data:`AD_MODES`.
    """

    name = "generic"

    def __init__(self, kind: str, objective: Objective, x: torch.Tensor, *, cache: bool = True, ad: str = "auto"):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if ad not in AD_MODES:
            raise ValueError(f"ad must be one of {AD_MODES}, got {ad!r}")
        if kind == "hessian":
            check_hessian_computable(objective.model)
        self.kind = kind
        self.objective = objective
        self.x = x.detach().to(objective.device, objective.dtype)
        # The loss differentiated twice: the objective's, in a form precise at saturated softmax.
        self.loss_fn = curvature_loss(objective.loss_fn)
        self.cache = bool(cache)
        self.ad = ad
        self._forward_ok = ad != ROR  # becomes False for good once forward mode fails on this model
        self._graphs: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}
        self.info: dict[str, Any] = {"engine": self.name, "kind": kind, "cache": self.cache, "ad": None}

    # -- public ----------------------------------------------------------------------------------------

    def batch_matmat(self, batch_index: int, inputs: torch.Tensor, targets: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """(curvature of this batch's mean loss at x) @ V for V ``(n, k)`` -> ``(n, k)``."""
        with twice_differentiable_attention():
            return self._batch_matmat(batch_index, inputs, targets, V)

    def _batch_matmat(self, batch_index: int, inputs: torch.Tensor, targets: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        V = V.detach().to(self.objective.device, self.objective.dtype)
        if self.is_cached(batch_index):
            self.info["ad"] = ROR
            return self._graphs[batch_index](V)
        inputs, targets = to_device((inputs, targets), self.objective.device, self.objective.dtype)
        if not self._uses_graph():
            try:
                out = self._forward(inputs, targets, V)
                self.info["ad"] = FOR
                return out
            except (RuntimeError, NotImplementedError) as exc:
                if self.ad == FOR:
                    raise
                self._fall_back(exc)
        fn = self._graphs.get(batch_index) if self.cache else None
        if fn is None:
            fn = self._graph(inputs, targets)
            if self.cache:
                self._graphs[batch_index] = fn
        self.info["ad"] = ROR
        return fn(V)

    def _uses_graph(self) -> bool:
        return self.ad == ROR or (self.ad == "auto" and (self.cache or not self._forward_ok))

    def is_cached(self, batch_index: int) -> bool:
        """True when the batch's gradient graph is kept (products then need no data)."""
        return self.cache and self._uses_graph() and batch_index in self._graphs

    def clear_cache(self) -> None:
        """Drop the kept gradient graphs."""
        self._graphs.clear()

    # -- forward-over-reverse --------------------------------------------------------------------------

    def _forward(self, inputs: torch.Tensor, targets: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        obj, x = self.objective, self.x
        if self.kind == "hessian":
            def loss(p: torch.Tensor) -> torch.Tensor:
                return obj.batch_loss(p, (inputs, targets), self.loss_fn)

            g = grad(loss)
            return vmap(lambda v: jvp(g, (x,), (v,))[1], in_dims=1, out_dims=1)(V)

        layout: list[OutputLayout] = []

        def model_out(p: torch.Tensor) -> tuple[torch.Tensor, list[Any]]:
            # The output as one vector (tuple/dict outputs: OutputLayout); its other leaves as aux.
            out = obj.batch_output(p, inputs)
            if not layout:
                layout.append(OutputLayout(out))
            return layout[0].flatten(out), layout[0].others(out)

        out, pullback, rest = vjp(model_out, x, has_aux=True)
        out = out.detach()
        g_out = grad(lambda o: checked_loss(self.loss_fn, layout[0].unflatten(o, rest), targets))

        def one(v: torch.Tensor) -> torch.Tensor:
            jv = jvp(model_out, (x,), (v,), has_aux=True)[1]
            hjv = jvp(g_out, (out,), (jv,))[1]
            return pullback(hjv)[0]

        return vmap(one, in_dims=1, out_dims=1)(V)

    def _fall_back(self, exc: BaseException) -> None:
        self._forward_ok = False
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        self.info["fallback"] = f"forward-mode AD failed ({reason}); using reverse-over-reverse (double backward)"
        warnings.warn(
            f"sharpkit: forward-mode AD failed for this model/loss ({reason}); "
            "falling back to reverse-over-reverse (double backward) products",
            RuntimeWarning,
            stacklevel=4,
        )

    # -- reverse-over-reverse on a kept graph ----------------------------------------------------------

    def _graph(self, inputs: torch.Tensor, targets: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """Build the batch's differentiable gradient (or output/loss-gradient) graph once; return the
        ``V -> curvature @ V`` closure that backpropagates through it."""
        obj = self.objective
        xr = self.x.clone().requires_grad_(True)
        with torch.enable_grad():
            if self.kind == "hessian":
                loss = obj.batch_loss(xr, (inputs, targets), self.loss_fn)
                (g,) = torch.autograd.grad(loss, xr, create_graph=True)
                if not g.requires_grad:  # the loss is linear in x: zero Hessian
                    return lambda V: torch.zeros_like(V)

                def hessian_mm(V: torch.Tensor) -> torch.Tensor:
                    return _batched_vjp(g, xr, V)

                return hessian_mm

            tree = obj.batch_output(xr, inputs)
            layout = OutputLayout(tree)  # (a tuple/dict output: its floating tensors as one vector)
            out, others = layout.flatten(tree), [t.detach() for t in layout.others(tree)]
            if not out.requires_grad:  # no output depends on the parameters: zero GGN
                return lambda V: torch.zeros_like(V)
            # J v through the "double vjp" trick: u -> J^T u is linear in u; differentiate it in u.
            u = torch.zeros_like(out, requires_grad=True)
            (jtu,) = torch.autograd.grad(out, xr, u, create_graph=True)
            o = out.detach().requires_grad_(True)
            (g_out,) = torch.autograd.grad(checked_loss(self.loss_fn, layout.unflatten(o, others), targets), o,
                                           create_graph=True, allow_unused=True)
            if g_out is None:  # the loss reads none of the outputs that depend on the parameters
                return lambda V: torch.zeros_like(V)

        def ggn_mm(V: torch.Tensor) -> torch.Tensor:
            jv = _batched_vjp(jtu, u, V)  # (*out.shape, k) laid out as columns
            k = V.shape[1]
            jv = jv.reshape(-1, k)
            hjv = _batched_vjp(g_out, o, jv) if g_out.requires_grad else torch.zeros_like(jv)
            return _batched_vjp(out, xr, hjv)

        return ggn_mm


def _batched_vjp(y: torch.Tensor, x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Columns ``(dy/dx)^T w`` for the k columns of ``W`` (``(y.numel(), k)``) -> ``(x.numel(), k)``,
    keeping the graph.  On a GPU one batched backward (vmap) where autograd supports it; one
    backward per column on a CPU, for one column, and where the batched one fails."""
    k = W.shape[1]
    cols = W.t().reshape(k, *y.shape)
    if k == 1 or W.device.type == "cpu":
        # On a CPU the vmapped double backward costs more per column than a loop of plain ones: the
        # C1-style conv net (114 k parameters, 2048 MNIST-1D samples, 2 threads) 0.13 / 0.16 s per
        # column in blocks of 4 / 16 against 0.053-0.068 s looped: its Hutch++ trace (30 products)
        # 3.9 -> 1.7 s; the F1-style MLP's 0.71 -> 0.52 s (benchmarks/results/cpu_profile_20261130T072400Z.txt).
        return _looped_vjp(y, x, cols)
    try:
        (res,) = torch.autograd.grad(y, x, cols, retain_graph=True, is_grads_batched=True, allow_unused=True)
        if res is None:
            return torch.zeros(x.numel(), k, dtype=W.dtype, device=W.device)
        return res.reshape(k, -1).t()
    except (RuntimeError, NotImplementedError):
        return _looped_vjp(y, x, cols)


def _looped_vjp(y: torch.Tensor, x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``(x.numel(), k)``: one backward through the kept graph per row of ``cols`` ``(k, *y.shape)``."""
    out = []
    for j in range(cols.shape[0]):
        (r,) = torch.autograd.grad(y, x, cols[j], retain_graph=True, allow_unused=True)
        out.append(torch.zeros_like(x).reshape(-1) if r is None else r.reshape(-1))
    return torch.stack(out, 1)


def make_engine(
    kind: str,
    model: nn.Module,
    loss_fn: Any,
    flat: FlatParams,
    x: torch.Tensor,
    *,
    engine: str = "auto",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    cache: bool = True,
    objective: Objective | None = None,
    ad: str = "auto",
    bn: str | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> HVPEngine:
    """Build the engine for ``model``; call inside :func:`~sharpkit.params.measurement_mode`.

    ``engine``: "generic" (torch.func, any model), "fused" (sequential MLPs; raises ``ValueError``
    with the reason where unsupported) or "auto" (fused where supported, else generic; the reason is
    kept in the returned engine's ``info["why_not_fused"]``).  ``objective`` is needed by the generic
    engine (the operator passes its own).  ``ad`` selects the generic engine's differentiation mode.  ``bn``: the
    measurement's BatchNorm policy (None: read the modules' flags).  ``input_shape``: the shape of
    a batch of inputs, checked against what the fused engine handles (None: not checked).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    why_not = None
    if engine in ("auto", "fused"):
        try:
            from . import fused
        except ImportError as exc:
            fused, why_not = None, f"the fused engine is not available ({exc})"
        if fused is not None:
            why_not = fused.fused_support(model, loss_fn, bn=bn)
            if why_not is None:
                try:
                    eng = fused.FusedEngine(kind, model, loss_fn, flat, x, dtype=dtype, device=device, cache=cache)
                except ValueError as exc:  # e.g. a parameter no supported layer uses
                    why_not = str(exc)
                else:
                    why_not = None if input_shape is None else eng.why_not_inputs(input_shape)
                    if why_not is None:
                        return eng
        if engine == "fused":
            raise ValueError(f"engine='fused' is not possible here: {why_not}")
    if objective is None:
        raise TypeError("the generic engine needs the objective (sharpkit.objective.Objective) to evaluate the model")
    eng = GenericEngine(kind, objective, x, cache=cache, ad=ad)
    if why_not is not None:
        eng.info["why_not_fused"] = why_not
    return eng
