"""The fused batched Hessian/GGN-vector engine for sequential networks.

For ``nn.Sequential`` models (nested Sequentials too) of Linear, BatchNorm1d (eval: an affine map
with the running statistics), ReLU / LeakyReLU / GELU / Tanh / Sigmoid / SiLU, Dropout (off),
Flatten and Identity, ending in softmax cross-entropy or MSE, :class:`FusedEngine` computes
``H @ V`` (exact Hessian) or ``G @ V`` (generalized Gauss-Newton) of one batch's mean loss for k
directions at once:

* one primal pass (forward and backward) per batch, cached across calls when asked;
* Pearlmutter's R-forward and R-backward written out per layer, with the k directions stacked as
  ``(N, k, d)`` so that every product is one large GEMM (``torch.mm``/``addmm``);
* the elementwise second-order terms fused: the softmax cross-entropy Hessian product
  (:mod:`sharpkit.kernels.ce_hvp`) and the activations' ``sigma'(z) Rz`` / ``sigma''(z) Rz delta``
  (:mod:`sharpkit.kernels.activations`), Triton/CUDA on GPU;
* optionally, on GPU, the whole k-vector product captured once per (batch, k) in a CUDA graph.

Per layer ``y = a W^T + b`` with directions ``(V_W, V_b)`` the exact Hessian needs

    R-forward   Ry  = Ra W^T + a V_W^T + V_b
    R-backward  Rga = Rgy W + gy V_W             grad_W: Rgy^T a + gy^T Ra,   grad_b: sum Rgy

(``gy`` the primal gradient at the layer's output); the Gauss-Newton product drops the terms with
``gy`` and the activations' ``sigma''`` (it is ``J^T H_loss J``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..params import FlatParams, is_batchnorm
from ._standard import hooks_reason, overrides_forward
from .stable_loss import curvature_loss

__all__ = ["fused_support", "FusedEngine", "KINDS"]

KINDS = ("hessian", "ggn")


class _Unsupported(Exception):
    """Raised while parsing a model or loss the fused engine cannot handle (message: the reason)."""


# ---- model and loss parsing ---------------------------------------------------------------------

@dataclass
class _Layer:
    name: str  # the module's qualified name in the model ("" for the root)
    kind: str  # "linear", "bn", "act", "flatten"
    module: nn.Module
    act: str = ""
    alpha: float = 0.0


def _activation(module: nn.Module) -> tuple[str, float] | None:
    if isinstance(module, nn.ReLU):
        return "relu", 0.0
    if isinstance(module, nn.LeakyReLU):
        return "leaky_relu", float(module.negative_slope)
    if isinstance(module, nn.GELU):
        return ("gelu_tanh" if module.approximate == "tanh" else "gelu"), 0.0
    if isinstance(module, nn.Tanh):
        return "tanh", 0.0
    if isinstance(module, nn.Sigmoid):
        return "sigmoid", 0.0
    if isinstance(module, nn.SiLU):
        return "silu", 0.0
    return None


def _describe(name: str, module: nn.Module) -> str:
    return f"layer {name!r} ({type(module).__name__})" if name else f"the model ({type(module).__name__})"


def _parse_model(model: nn.Module, bn_train: bool | None) -> list[_Layer]:
    """The model as a flat list of supported layers; raises _Unsupported naming the first bad one.

    ``bn_train``: whether BatchNorm normalises with batch statistics (None: read each module's
    ``training`` flag, as set by :func:`sharpkit.params.measurement_mode`).
    """
    if not isinstance(model, nn.Sequential):
        raise _Unsupported(
            f"the fused engine needs an nn.Sequential of supported layers; the model is a {type(model).__name__}"
        )
    layers: list[_Layer] = []
    for name, m in model.named_modules():
        if overrides_forward(m):
            raise _Unsupported(f"{_describe(name, m)} overrides forward() (or how it is called); the fused engine knows the standard layers only")

    def walk(seq: nn.Sequential, prefix: str) -> None:
        # _modules, not named_children(): a module used twice (shared weights) must appear twice.
        for child_name, m in seq._modules.items():
            if m is None:
                continue
            name = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(m, nn.Sequential):
                walk(m, name)
            elif isinstance(m, nn.Linear):
                layers.append(_Layer(name, "linear", m))
            elif is_batchnorm(m):
                if not isinstance(m, nn.BatchNorm1d):
                    raise _Unsupported(f"{_describe(name, m)} is not supported by the fused engine (BatchNorm1d only)")
                # bn='train' first: the measurement then turns off tracking, which would read as
                # "no running statistics".
                if (m.training if bn_train is None else bn_train):
                    raise _Unsupported(
                        f"{_describe(name, m)} uses batch statistics (bn='train'); the fused engine supports"
                        " BatchNorm in eval mode (bn='eval') only"
                    )
                if not m.track_running_stats or m.running_mean is None:
                    raise _Unsupported(
                        f"{_describe(name, m)} has no running statistics, so it normalises with batch statistics;"
                        " the fused engine supports BatchNorm in eval mode (running statistics) only"
                    )
                layers.append(_Layer(name, "bn", m))
            elif _activation(m) is not None:
                act, alpha = _activation(m)
                layers.append(_Layer(name, "act", m, act=act, alpha=alpha))
            elif isinstance(m, nn.Flatten):
                if m.start_dim != 1 or m.end_dim != -1:
                    raise _Unsupported(f"{_describe(name, m)} must flatten dims 1..-1 (start_dim=1, end_dim=-1)")
                layers.append(_Layer(name, "flatten", m))
            elif isinstance(m, (nn.Dropout, nn.Identity)):
                continue  # dropout is off in every measurement
            else:
                raise _Unsupported(f"{_describe(name, m)} is not supported by the fused engine")

    walk(model, "")
    if not any(layer.kind in ("linear", "bn") for layer in layers):
        raise _Unsupported("the model has no Linear or BatchNorm1d layer with parameters")
    for layer in layers:
        for pname, p in layer.module.named_parameters(recurse=False):
            if pname not in ("weight", "bias"):
                raise _Unsupported(f"{_describe(layer.name, layer.module)} has an unexpected parameter {pname!r}")
    why = hooks_reason((_describe(name, m), m) for name, m in model.named_modules())
    if why is not None:
        raise _Unsupported(why)
    return layers


@dataclass
class _LossSpec:
    kind: str  # "ce" or "mse"
    weight: torch.Tensor | None = None
    label_smoothing: float = 0.0
    ignore_index: int = -100
    fn: Callable[..., torch.Tensor] | None = None


def _parse_loss(loss_fn: Any) -> _LossSpec:
    if overrides_forward(loss_fn):
        raise _Unsupported(f"loss_fn {type(loss_fn).__name__} overrides forward() (or how it is called); the fused engine knows the standard losses only")
    if isinstance(loss_fn, nn.Module):
        why = hooks_reason([(f"loss_fn {type(loss_fn).__name__}", loss_fn)])
        if why is not None:
            raise _Unsupported(why)
    if loss_fn is F.cross_entropy:
        return _LossSpec("ce", fn=loss_fn)
    if loss_fn is F.mse_loss:
        return _LossSpec("mse", fn=loss_fn)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.reduction != "mean":
            raise _Unsupported(f"CrossEntropyLoss(reduction={loss_fn.reduction!r}): the fused engine needs 'mean'")
        return _LossSpec("ce", loss_fn.weight, float(loss_fn.label_smoothing), int(loss_fn.ignore_index), loss_fn)
    if isinstance(loss_fn, nn.MSELoss):
        if loss_fn.reduction != "mean":
            raise _Unsupported(f"MSELoss(reduction={loss_fn.reduction!r}): the fused engine needs 'mean'")
        return _LossSpec("mse", fn=loss_fn)
    what = getattr(loss_fn, "__name__", type(loss_fn).__name__)
    raise _Unsupported(
        f"loss_fn {what} is not supported by the fused engine (nn.CrossEntropyLoss, nn.MSELoss, "
        "F.cross_entropy or F.mse_loss with mean reduction)"
    )


def fused_support(model: nn.Module, loss_fn: Any, bn: str | None = None) -> str | None:
    """None if :class:`FusedEngine` supports ``model`` with ``loss_fn``, else the reason (naming the layer).

    ``bn``: the BatchNorm policy of the measurement ("eval" or "train"); None reads the modules'
    ``training`` flags (call inside :func:`sharpkit.params.measurement_mode`).
    """
    if bn not in (None, "eval", "train"):
        raise ValueError(f"bn must be 'eval', 'train' or None, got {bn!r}")
    try:
        _parse_model(model, None if bn is None else bn == "train")
        _parse_loss(loss_fn)
    except _Unsupported as exc:
        return str(exc)
    return None


# ---- the engine -------------------------------------------------------------------------------------

@dataclass
class _Ref:
    """A layer tensor: its value at x, and its block in the flat vector (None: a constant)."""

    value: torch.Tensor | None
    block: int | None = None


@dataclass
class _Primal:
    """What one batch's primal pass leaves for the matvecs."""

    n: int
    saved: list[dict[str, Any]] = field(default_factory=list)
    head: Any = None  # CEHessian, or the MSE scale (float)
    input_shape: tuple[int, ...] = ()


def _rows(V: torch.Tensor, block: int = 65536) -> torch.Tensor:
    """``V.t().contiguous()`` for a tall (n, k) matrix, transposed in row blocks: torch's one-shot
    strided copy runs far below memory bandwidth for n ~ 1e6 (8x slower on a 2-core x86)."""
    if V.shape[1] == 1 or V.device.type != "cpu" or V.t().is_contiguous():
        return V.t().contiguous()  # (no copy when V is already a transposed row-major block)
    out = torch.empty(V.shape[1], V.shape[0], dtype=V.dtype, device=V.device)
    for i in range(0, V.shape[0], block):
        out[:, i:i + block].copy_(V[i:i + block].t())
    return out


class FusedEngine:
    """Hessian (``kind="hessian"``) or GGN (``kind="ggn"``) products of one batch's mean loss.

    Args:
        kind: "hessian" or "ggn".
        model: a supported sequential network (see :func:`fused_support`), in the state of the
            measurement (inside :func:`~sharpkit.params.measurement_mode`); only read.
        loss_fn: nn.CrossEntropyLoss / nn.MSELoss (mean) or F.cross_entropy / F.mse_loss.
        flat: the flat parameter layout of ``model``.
        x: the parameter vector (n,) at which the curvature is taken.
        dtype, device: the precision and device of the computation (default: ``x``'s).
        cache: keep each batch's primal pass (keyed by ``batch_index``) across calls.
        backend: kernel backend of the fused elementwise ops ("auto": Triton/CUDA on GPU, torch on CPU).
        cuda_graph: on GPU with ``cache``, capture the k-vector product once per (batch, k) in a
            CUDA graph and replay it (static shapes only).

        direction_chunk: how many of the k directions one R-pass carries (None: all; "auto"
            (default): all on GPU, 1 on CPU, where that measured fastest).
    """

    name = "fused"

    def __init__(
        self,
        kind: str,
        model: nn.Module,
        loss_fn: Any,
        flat: FlatParams,
        x: torch.Tensor,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        cache: bool = True,
        backend: str = "auto",
        cuda_graph: bool = False,
        direction_chunk: int | None | str = "auto",
    ):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        try:
            self.layers = _parse_model(model, None)
            self.loss = _parse_loss(loss_fn)
        except _Unsupported as exc:
            raise ValueError(str(exc)) from None
        self._curvature_loss = curvature_loss(self.loss.fn)  # its gradient is precise at saturated softmax
        if not isinstance(x, torch.Tensor) or x.shape != (flat.n,):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be the parameter vector of shape ({flat.n},), got {shape}")
        self.kind = kind
        self.exact = kind == "hessian"
        self.flat = flat
        self.device = torch.device(device) if device is not None else x.device
        self.dtype = dtype or x.dtype
        if not self.dtype.is_floating_point:
            raise TypeError(f"dtype must be floating point, got {self.dtype}")
        self.x = x.detach().to(self.device, self.dtype)
        if not bool(torch.isfinite(self.x).all()):
            raise ValueError("the parameter vector x contains NaN or inf")
        self.cache = cache
        self.backend = backend
        self.cuda_graph = bool(cuda_graph) and self.device.type == "cuda" and cache
        self._primals: dict[int, _Primal] = {}
        self._graphs: dict[tuple[int, int], tuple[Any, torch.Tensor, torch.Tensor]] = {}
        self._bind(model)
        self.num_matvecs = 0
        # Directions per R-pass.  On a GPU all k go through one set of large GEMMs.  On a CPU the
        # stacked R-activations (N x k x width) of many directions overflow the caches and every
        # elementwise pass streams them from memory: one direction at a time against the cached
        # primal pass measured fastest per vector (F1-style MLP, 2-core x86: k=16 at N=4096 went
        # from 10.3 to 6.2 forward passes per vector; benchmarks/bench_fused.py).
        if direction_chunk == "auto":
            direction_chunk = None if self.device.type == "cuda" else 1
        elif direction_chunk is not None and (not isinstance(direction_chunk, int) or direction_chunk < 1):
            raise ValueError(f"direction_chunk must be 'auto', None or a positive int, got {direction_chunk!r}")
        self.direction_chunk: int | None = direction_chunk
        self.info: dict[str, Any] = {"engine": self.name, "kind": kind, "cache": cache, "backend": backend,
                                     "cuda_graph": self.cuda_graph}

    def why_not_inputs(self, input_shape: tuple[int, ...]) -> str | None:
        """None if batches of inputs shaped ``input_shape`` (``(N, ...)``) fit the fused engine,
        else the reason: it needs ``(N, features)`` activations at every Linear and BatchNorm."""
        ndim = len(input_shape)
        for layer in self.layers:
            if layer.kind == "flatten":
                ndim = 2
            elif layer.kind in ("linear", "bn") and ndim != 2:
                return (f"the fused engine needs 2-D activations (N, features) at {_describe(layer.name, layer.module)},"
                        f" but inputs of shape {tuple(input_shape)} reach it with {ndim} dimensions")
        return None

    # -- parameters ----------------------------------------------------------------------------------

    def _bind(self, model: nn.Module) -> None:
        """Resolve each layer's tensors: views of x for trainable parameters, constants otherwise."""
        index = {id(p): i for i, p in enumerate(self.flat.params)}
        views = self.flat.views(self.x)
        covered: set[int] = set()

        def ref(t: torch.Tensor | None) -> _Ref:
            if t is None:
                return _Ref(None)
            i = index.get(id(t))
            if i is None:
                return _Ref(t.detach().to(self.device, self.dtype))
            covered.add(i)
            return _Ref(views[i], i)

        self._refs: list[dict[str, Any]] = []
        for layer in self.layers:
            m = layer.module
            if layer.kind == "linear":
                self._refs.append({"W": ref(m.weight), "b": ref(m.bias)})
            elif layer.kind == "bn":
                mean = m.running_mean.detach().to(self.device, self.dtype)
                rstd = torch.rsqrt(m.running_var.detach().to(self.device, self.dtype) + m.eps)
                self._refs.append({"gamma": ref(m.weight), "beta": ref(m.bias), "mean": mean, "rstd": rstd})
            else:
                self._refs.append({})
        missing = [self.flat.names[i] for i in range(len(self.flat.params)) if i not in covered]
        if missing:
            raise ValueError(f"parameters {missing} are not used by any supported layer of the model")
        self._first = min(
            i for i, r in enumerate(self._refs) if any(isinstance(v, _Ref) and v.block is not None for v in r.values())
        )

    # -- primal pass -----------------------------------------------------------------------------------

    def _primal(self, inputs: torch.Tensor, targets: torch.Tensor) -> _Primal:
        from ..kernels.activations import ActivationTerms
        from ..kernels.ce_hvp import CEHessian

        if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
            raise TypeError("inputs and targets must be tensors")
        if inputs.dim() == 0 or inputs.shape[0] == 0:
            raise ValueError(f"the batch is empty (inputs of shape {tuple(inputs.shape)})")
        if targets.shape[0] != inputs.shape[0]:
            raise ValueError(f"inputs have {inputs.shape[0]} samples but targets {targets.shape[0]}")
        h = inputs.to(self.device, self.dtype if inputs.is_floating_point() else None)
        if not h.is_floating_point():
            raise TypeError(f"the fused engine needs floating-point inputs, got {inputs.dtype}")
        n = h.shape[0]
        primal = _Primal(n=n, input_shape=tuple(h.shape))
        with torch.no_grad():
            for layer, refs in zip(self.layers, self._refs):
                rec: dict[str, Any] = {}
                if layer.kind in ("linear", "bn") and h.dim() != 2:
                    raise ValueError(
                        f"the fused engine needs 2-D activations (N, features) at {_describe(layer.name, layer.module)},"
                        f" got shape {tuple(h.shape)}; put an nn.Flatten() first"
                    )
                if layer.kind == "linear":
                    rec["a"] = h
                    h = F.linear(h, refs["W"].value, refs["b"].value)
                elif layer.kind == "bn":
                    ahat = (h - refs["mean"]) * refs["rstd"]
                    rec["ahat"] = ahat
                    h = ahat
                    if refs["gamma"].value is not None:
                        h = h * refs["gamma"].value
                    if refs["beta"].value is not None:
                        h = h + refs["beta"].value
                elif layer.kind == "act":
                    terms = ActivationTerms(layer.act, h.reshape(n, -1), layer.alpha, exact=self.exact,
                                            backend=self.backend)
                    rec["terms"], rec["shape"] = terms, tuple(h.shape)
                    h = terms.output().view(h.shape)
                elif layer.kind == "flatten":
                    rec["shape"] = tuple(h.shape)
                    h = h.reshape(n, -1)
                primal.saved.append(rec)
            logits = h
            spec = self.loss
            if spec.kind == "ce":
                scale = self._ce_scale(logits, targets)
                primal.head = CEHessian(logits, scale, backend=self.backend)
            else:
                t = targets.to(self.device, self.dtype)
                if t.shape != logits.shape:
                    raise ValueError(
                        f"MSE needs targets shaped like the outputs {tuple(logits.shape)}, got {tuple(t.shape)}"
                    )
                primal.head = 2.0 / logits.numel()
        if self.exact:
            g = self._loss_grad(logits, targets)
            with torch.no_grad():
                for i in range(len(self.layers) - 1, self._first - 1, -1):
                    layer, refs, rec = self.layers[i], self._refs[i], primal.saved[i]
                    if layer.kind == "linear":
                        rec["g"] = g
                        if i > self._first:
                            g = g @ refs["W"].value
                    elif layer.kind == "bn":
                        rec["g"] = g
                        if i > self._first:
                            g = g * self._bn_scale(refs)
                    elif layer.kind == "act":
                        g = rec["terms"].input_grad(g.reshape(n, -1)).view(rec["shape"])
                    elif layer.kind == "flatten":
                        g = g.reshape(rec["shape"])
        return primal

    @staticmethod
    def _bn_scale(refs: dict[str, Any]) -> torch.Tensor:
        gamma = refs["gamma"].value
        return refs["rstd"] if gamma is None else gamma * refs["rstd"]

    def _loss_value(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The batch's mean loss from its logits, in the form the curvature differentiates."""
        t = targets.to(self.device, self.dtype if targets.is_floating_point() else None)
        loss = self._curvature_loss(logits, t)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError("loss_fn must return a scalar (mean-reduced) tensor")
        return loss

    def _loss_grad(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """dL/dlogits of the batch's mean loss, by autograd through loss_fn (exact for any option), in
        its form precise at saturated softmax (:func:`~sharpkit.curvature.stable_loss.curvature_loss`)."""
        z = logits.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self._loss_value(z, targets), z)
        return g

    def _ce_scale(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-sample s_i with d2L/dz_i^2 = s_i (diag p_i - p_i p_i^T) for this cross-entropy."""
        if logits.dim() != 2:
            raise ValueError(f"cross-entropy needs logits of shape (N, C), got {tuple(logits.shape)}")
        n, c = logits.shape
        spec = self.loss
        work = torch.float64 if self.dtype == torch.float64 else torch.float32
        w = torch.ones(c, dtype=work, device=self.device) if spec.weight is None else spec.weight.to(self.device, work)
        eps = spec.label_smoothing
        t = targets.to(self.device)
        if t.is_floating_point():
            if t.shape != (n, c):
                raise ValueError(f"probability targets must have shape {(n, c)}, got {tuple(t.shape)}")
            t = t.to(work) * (1.0 - eps) + eps / c
            return (t * w).sum(1) / n
        if t.shape != (n,):
            raise ValueError(f"class-index targets must have shape ({n},), got {tuple(t.shape)}")
        valid = t != spec.ignore_index
        tv = torch.where(valid, t, torch.zeros_like(t))
        if bool(((tv < 0) | (tv >= c)).any()):
            raise ValueError(f"class-index targets must lie in [0, {c}) (or equal ignore_index)")
        valid_w = valid.to(work)  # (a bool tensor times a Python float would be float32)
        wy = w[tv] * valid_w
        denom = wy.sum()
        if float(denom) == 0.0:  # every target ignored: the loss does not depend on the logits
            return torch.zeros(n, dtype=work, device=self.device)
        return ((1.0 - eps) * wy + valid_w * (eps / c) * w.sum()) / denom

    # -- products ------------------------------------------------------------------------------------

    @property
    def preferred_block_size(self) -> int:
        """1 when every R-pass carries one direction (the CPU default): more directions per call then
        only move larger blocks through memory (Hutchinson trace on a 1e6-parameter MLP: 4.0 s with
        blocks of 1, 4.3 s with 16); else 16."""
        return 1 if self.direction_chunk == 1 else 16

    def batch_matmat(self, batch_index: int, inputs: torch.Tensor, targets: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """(Hessian or GGN of this batch's mean loss at x) @ V; V (n,) or (n, k) -> the same shape.

        With ``cache=True`` the primal pass is kept under ``batch_index`` (the caller must pass the
        same batch for the same index).
        """
        if not isinstance(V, torch.Tensor) or V.dim() not in (1, 2) or V.shape[0] != self.flat.n:
            shape = tuple(V.shape) if isinstance(V, torch.Tensor) else type(V).__name__
            raise ValueError(f"V must have shape ({self.flat.n},) or ({self.flat.n}, k), got {shape}")
        vec = V.dim() == 1
        V2 = V[:, None] if vec else V
        k = V2.shape[1]
        if k == 0:
            return torch.zeros(self.flat.n, 0, device=V.device, dtype=V.dtype)
        primal = self._primals.get(batch_index) if self.cache else None
        if primal is None or (inputs is not None and primal.input_shape[0] != inputs.shape[0]):
            primal = self._primal(inputs, targets)
            if self.cache:
                self._primals[batch_index] = primal
        Vt = _rows(V2.detach().to(self.device, self.dtype))
        chunk = self.direction_chunk or k
        if chunk >= k and self.cuda_graph:
            out = self._graphed(batch_index, primal, Vt)
        else:
            out = torch.empty(k, self.flat.n, device=self.device, dtype=self.dtype)
            for s in range(0, k, chunk):
                self._matmat(primal, Vt[s:s + chunk], out=out[s:s + chunk])
        self.num_matvecs += k
        # (n, k) as a transposed view: the caller accumulates it, a contiguous copy would be wasted.
        res = out.t().to(V.dtype)
        return res[:, 0] if vec else res

    def is_cached(self, batch_index: int) -> bool:
        """True when the batch's primal pass is kept (products then need no data)."""
        return self.cache and batch_index in self._primals

    def _vblock(self, ref: _Ref, blocks: list[torch.Tensor]) -> torch.Tensor | None:
        return None if ref.block is None else blocks[ref.block]

    def _matmat(self, primal: _Primal, Vt: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(k, n) directions -> (k, n) products, from a primal pass (no host synchronisation).
        ``out``: a row-contiguous (k, n) buffer to write the products into."""
        k, n_batch = Vt.shape[0], primal.n
        # Per-parameter contiguous (k, *shape) blocks, so that (k*out, in) views exist for the GEMMs.
        vblocks = [Vt[:, b.slice].contiguous().view(k, *b.shape) for b in self.flat.blocks]
        direct = out is not None and k == 1  # one direction: the output blocks can be views of out
        if direct:
            out.zero_()
            ob = [out[:, b.slice].view(k, *b.shape) for b in self.flat.blocks]
        else:
            ob = [torch.zeros_like(v) for v in vblocks]
        exact = self.exact
        rsaved: list[torch.Tensor | None] = [None] * len(self.layers)
        rh: torch.Tensor | None = None  # R of the current activations, (N, k, *features)
        # R-forward
        for i in range(self._first, len(self.layers)):
            layer, refs, rec = self.layers[i], self._refs[i], primal.saved[i]
            if layer.kind == "linear":
                W = refs["W"].value
                d_out, d_in = W.shape
                vw, vb = self._vblock(refs["W"], vblocks), self._vblock(refs["b"], vblocks)
                if exact:
                    rsaved[i] = rh
                if rh is not None:
                    rz = torch.mm(rh.view(n_batch * k, d_in), W.t()).view(n_batch, k, d_out)
                else:
                    rz = torch.zeros(n_batch, k, d_out, device=Vt.device, dtype=Vt.dtype)
                if vw is not None:  # a V_W^T for all k directions: one (N, in) x (in, k*out) GEMM
                    rz.view(n_batch, k * d_out).addmm_(rec["a"], vw.reshape(k * d_out, d_in).t())
                if vb is not None:
                    rz.add_(vb)
                rh = rz
            elif layer.kind == "bn":
                vg, vb = self._vblock(refs["gamma"], vblocks), self._vblock(refs["beta"], vblocks)
                if exact:
                    rsaved[i] = rh
                if rh is not None:
                    ry = rh * self._bn_scale(refs)
                else:
                    ry = torch.zeros(n_batch, k, rec["ahat"].shape[1], device=Vt.device, dtype=Vt.dtype)
                if vg is not None:
                    ry.addcmul_(rec["ahat"][:, None, :], vg)
                if vb is not None:
                    ry.add_(vb)
                rh = ry
            elif layer.kind == "act":
                rz = rh.reshape(n_batch, k, -1)
                terms = rec["terms"]
                if terms.exact:  # sigma'' term of the R-backward needs Rz: keep it
                    rsaved[i] = rz
                    rh = terms.rforward(rz)
                else:  # piecewise-linear (or GGN): Rz is not needed again, overwrite it
                    rh = terms.rforward_(rz.contiguous())
                rh = rh.view(n_batch, k, *rec["shape"][1:])
            elif layer.kind == "flatten":
                rh = rh.reshape(n_batch, k, -1)
        # the loss Hessian on the logits' R-values (in place)
        if self.loss.kind == "ce":
            rg = primal.head.apply_(rh)
        else:
            rg = rh.mul_(primal.head)
        # R-backward
        for i in range(len(self.layers) - 1, self._first - 1, -1):
            layer, refs, rec = self.layers[i], self._refs[i], primal.saved[i]
            if layer.kind == "linear":
                W = refs["W"].value
                d_out, d_in = W.shape
                a = rec["a"]
                rg2 = rg.view(n_batch, k * d_out)
                ra = rsaved[i]
                if refs["W"].block is not None:
                    ow = ob[refs["W"].block]
                    ow.view(k * d_out, d_in).addmm_(rg2.t(), a)  # Rgy^T a, all k in one GEMM
                    if exact and ra is not None:  # gy^T Ra -> (out, k, in)
                        ow.add_(torch.mm(rec["g"].t(), ra.view(n_batch, k * d_in)).view(d_out, k, d_in).transpose(0, 1))
                if refs["b"].block is not None:
                    ob[refs["b"].block].add_(rg.sum(0))
                if i > self._first:
                    rga = torch.mm(rg.view(n_batch * k, d_out), W).view(n_batch, k, d_in)
                    vw = self._vblock(refs["W"], vblocks)
                    if exact and vw is not None:  # gy V_W for all k: (N, out) x (out, k*in)
                        rga.view(n_batch, k * d_in).addmm_(rec["g"], vw.transpose(0, 1).reshape(d_out, k * d_in))
                    rg = rga
            elif layer.kind == "bn":
                ahat, ra = rec["ahat"], rsaved[i]
                if refs["gamma"].block is not None:
                    og = ob[refs["gamma"].block]
                    og.add_((rg * ahat[:, None, :]).sum(0))  # einsum would go through copies in bmm
                    if exact and ra is not None:
                        og.add_((ra * (rec["g"] * refs["rstd"])[:, None, :]).sum(0))
                if refs["beta"].block is not None:
                    ob[refs["beta"].block].add_(rg.sum(0))
                if i > self._first:
                    rga = rg * self._bn_scale(refs)
                    vg = self._vblock(refs["gamma"], vblocks)
                    if exact and vg is not None:
                        rga.addcmul_((rec["g"] * refs["rstd"])[:, None, :], vg)
                    rg = rga
            elif layer.kind == "act":
                rz = rsaved[i]
                rg = rec["terms"].rbackward(rg.reshape(n_batch, k, -1).contiguous(), rz).view(
                    n_batch, k, *rec["shape"][1:])
            elif layer.kind == "flatten":
                rg = rg.reshape(n_batch, k, *rec["shape"][1:])
        if direct:
            return out
        if out is not None:
            return torch.cat([o.view(k, -1) for o in ob], dim=1, out=out)
        return torch.cat([o.view(k, -1) for o in ob], dim=1)

    def _graphed(self, batch_index: int, primal: _Primal, Vt: torch.Tensor) -> torch.Tensor:
        """Replay (capturing on first use) the k-vector product of this batch as a CUDA graph."""
        key = (batch_index, Vt.shape[0])
        entry = self._graphs.get(key)
        if entry is None:
            static_v = Vt.clone()
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # compile the Triton kernels and settle the allocator first
                    self._matmat(primal, static_v)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self._matmat(primal, static_v)
            entry = (graph, static_v, static_out)
            self._graphs[key] = entry
        graph, static_v, static_out = entry
        static_v.copy_(Vt)
        graph.replay()
        return static_out.clone()

    def clear_cache(self) -> None:
        """Drop the cached primal passes and CUDA graphs."""
        self._primals.clear()
        self._graphs.clear()
