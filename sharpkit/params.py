"""The flat parameter space: one contiguous vector <-> a model's trainable parameters.

Every sharpkit measurement works on the vector x of a model's parameters with
``requires_grad=True``, taken in ``model.named_parameters()`` order and flattened like
``torch.nn.utils.parameters_to_vector``.  :class:`FlatParams` reads that vector, writes
``x + y`` into the model in place (no reallocation of the model's tensors) and restores it
bit for bit.  :func:`preserved` snapshots everything a measurement could touch (parameters,
buffers, train/eval flags) and puts it back on exit, even after an exception.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from torch.nn.parameter import is_lazy

__all__ = ["FlatParams", "preserved", "measurement_mode", "check_finite_parameters"]


@dataclass(frozen=True)
class ParamBlock:
    """One parameter tensor's place in the flat vector: ``flat[offset:offset + numel]``."""

    name: str
    shape: torch.Size
    offset: int
    numel: int

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.numel)


class FlatParams:
    """A contiguous vector view of ``model``'s trainable parameters.

    The layout (names, shapes, offsets) is fixed at construction; the model's tensors are
    never replaced, only written in place with ``copy_``.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no parameters with requires_grad=True")
        self.names: list[str] = [n for n, _ in named]
        self.params: list[torch.Tensor] = [p for _, p in named]
        blocks, offset = [], 0
        for n, p in named:
            blocks.append(ParamBlock(n, p.shape, offset, p.numel()))
            offset += p.numel()
        self.blocks: list[ParamBlock] = blocks
        self.n: int = offset
        first = self.params[0]
        self.device, self.dtype = first.device, first.dtype
        for n, p in named:
            if p.dtype != first.dtype or p.device != first.device:
                raise ValueError(
                    f"the trainable parameters must share one dtype and device: {self.names[0]!r} is "
                    f"{first.dtype} on {first.device}, {n!r} is {p.dtype} on {p.device} (measure a copy converted "
                    "to one, e.g. copy.deepcopy(model).to(torch.float64), or freeze the parameters of the other "
                    "precision: frozen parts keep their own)"
                )

    def __len__(self) -> int:
        return self.n

    def get(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A new contiguous copy of the parameter vector x (shape ``(n,)``)."""
        flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        return flat if dtype is None else flat.to(dtype)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``flat`` (shape ``(n,)`` or ``(n, k)``) shaped like each parameter.

        For ``(n, k)`` input the views have shape ``(*param.shape, k)``.
        """
        self._check(flat)
        trailing = tuple(flat.shape[1:])
        return [flat[b.slice].view(*b.shape, *trailing) for b in self.blocks]

    def as_dict(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: view}`` for :func:`torch.func.functional_call`."""
        return dict(zip(self.names, self.views(flat)))

    def set_(self, x: torch.Tensor) -> None:
        """Write the vector ``x`` into the model's parameters in place."""
        self._check(x, vector=True)
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.views(x.to(self.dtype)))

    def set_sum_(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Write ``x + y`` into the model in place (``x`` the reference point, ``y`` a perturbation)."""
        self._check(x, vector=True)
        self._check(y, vector=True)
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.views(x.to(self.dtype)))
            torch._foreach_add_(self.params, self.views(y.to(self.dtype)))

    def _check(self, flat: torch.Tensor, vector: bool = False) -> None:
        if flat.dim() == 0 or flat.shape[0] != self.n or (vector and flat.dim() != 1):
            want = f"({self.n},)" if vector else f"({self.n},) or ({self.n}, k)"
            raise ValueError(f"expected a parameter-space tensor of shape {want}, got {tuple(flat.shape)}")


def canonical_device(device: torch.device | str) -> torch.device:
    """``device`` as the one device it names: "cuda" without an index is the current CUDA device
    (``torch.device("cuda", torch.cuda.current_device())``, where torch puts a tensor sent to
    "cuda"); every other device, CPU ones included, is returned as it is ("cpu:0" stays "cpu:0"),
    and so is "cuda" where CUDA is not available."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def model_tensors(model: nn.Module, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` by name, detached, on ``device``, for
    :func:`torch.func.functional_call`.  A tied tensor is listed once (``state_dict()`` would list
    each alias, which functional_call rejects).

    The model is evaluated in ``dtype``: floating tensors in the precision of its trainable
    parameters (:func:`working_dtypes`) are cast to ``dtype``.  Floating tensors in another
    precision keep it: a model that computes part of itself in another precision, such as a frozen
    float64 head after ``x.double()`` or a frozen float16 backbone after ``x.half()``, casts its
    activations to that part's precision itself (cast to ``dtype``, such a part failed with "mat1
    and mat2 must have the same dtype")."""
    cast = working_dtypes(model)
    named = list(model.named_parameters()) + list(model.named_buffers())
    out = {k: v.detach().to(device, dtype if converts(v.dtype, cast) else None) for k, v in named}
    # A model built or loaded under torch.inference_mode() holds inference tensors, which autograd
    # cannot save for backward: the measurement gets normal copies.
    return {k: v.clone() if v.is_inference() else v for k, v in out.items()}


def private_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` for work that must not touch the user's (points of a landscape,
    checkpoints of an audit).  Tensors that modules keep as attributes and that a forward computed
    (the ``weight`` of the older ``weight_norm``/``spectral_norm`` hooks) are not leaves, which
    ``copy.deepcopy`` refuses: they are copied detached (the next forward recomputes them).
    Inference tensors (a model built under ``torch.inference_mode()``) become normal ones."""
    memo = {id(v): v.detach().clone() for m in model.modules() for v in vars(m).values()
            if isinstance(v, torch.Tensor) and not v.is_leaf}
    return copy.deepcopy(model, memo)


def working_dtypes(model: nn.Module) -> set[torch.dtype] | None:
    """The floating dtypes a measurement in another precision converts: those of the trainable
    parameters, else of all floating parameters; None (every floating tensor) for a model without
    floating parameters."""
    for trainable_only in (True, False):
        found = {p.dtype for p in model.parameters() if p.is_floating_point() and (p.requires_grad or not trainable_only)}
        if found:
            return found
    return None


def converts(own: torch.dtype, cast: set[torch.dtype] | None) -> bool:
    """Whether a measurement in another precision converts a tensor of dtype ``own``, ``cast``
    being the model's :func:`working_dtypes`: floating tensors in the working precision (all
    floating ones where ``cast`` is None); a part kept in another precision keeps it."""
    return own.is_floating_point and (cast is None or own in cast)


def convert_working_precision(model: nn.Module, dtype: torch.dtype) -> None:
    """Convert ``model`` in place to ``dtype`` where a measurement in ``dtype`` would
    (:func:`converts`), so that a state dict of that precision loaded into it keeps its values.
    Parameters keep their objects (tied weights stay tied).  Only for a private copy of the user's
    model (:func:`private_copy`)."""
    cast = working_dtypes(model)
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None and converts(p.dtype, cast) and p.dtype != dtype:
                p.data = p.data.to(dtype)
        for name, b in module._buffers.items():
            if b is not None and converts(b.dtype, cast) and b.dtype != dtype:
                module._buffers[name] = b.to(dtype)


def has_shared_modules(model: nn.Module) -> bool:
    """True when a submodule of ``model`` is registered under more than one name."""
    return sum(1 for _ in model.named_modules(remove_duplicate=False)) > sum(1 for _ in model.modules())


@contextlib.contextmanager
def tensor_objects_kept(model: nn.Module) -> Iterator[None]:
    """Put every module's parameter and buffer objects back on exit.

    :func:`torch.func.functional_call` does not restore the Parameters of a module registered
    under two names (it leaves plain tensors behind): the values stay right, but the model would be
    cut off from its optimizer and ``copy.deepcopy`` would fail.
    """
    slots = [(m, dict(m._parameters), dict(m._buffers)) for m in model.modules()]
    try:
        yield
    finally:
        for m, params, buffers in slots:
            for store, original in ((m._parameters, params), (m._buffers, buffers)):
                for key, tensor in original.items():
                    if store.get(key) is not tensor:
                        store[key] = tensor


# Integer dtypes of each width: floating tensors are compared through their bit patterns.
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed as integers of its element width (complex as pairs of floats first), so that
    equality is bitwise: NaN equals the same NaN, -0.0 differs from 0.0."""
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.is_floating_point():
        t = t.view(_BITS[t.element_size()])
    return t


def same_bits(t: torch.Tensor, saved: torch.Tensor) -> bool:
    """True when ``t`` holds exactly ``saved``'s bits (same shape, dtype and device, every element
    bitwise equal).  False where that cannot be told cheaply (sparse, quantized or meta tensors, a
    tensor subclass without integer views), so that the caller writes ``saved`` back as it always did."""
    if (t.layout != torch.strided or t.is_quantized or t.is_meta or t.dtype != saved.dtype
            or t.device != saved.device or t.shape != saved.shape):
        return False
    if t.is_floating_point() and t.element_size() not in _BITS:
        return False
    try:
        return torch.equal(_bits(t.detach()), _bits(saved))
    except (RuntimeError, TypeError, NotImplementedError):
        return False


# Module attributes that :func:`preserved` puts back: tensors a module keeps outside its parameters
# and buffers, and plain values.  Containers and other objects are left alone (torch keeps its own
# bookkeeping in them, e.g. an RNN's list of flat weights, which it re-synchronises itself).
_PLAIN_VALUES = (bool, int, float, complex, str, bytes, type(None))


def _kept_attribute(value: object) -> bool:
    return isinstance(value, (torch.Tensor, *_PLAIN_VALUES))


def _restore_attributes(module: nn.Module, saved: dict[str, object]) -> None:
    """Put back ``module``'s tensor and plain attributes as ``saved`` (a copy of its ``__dict__``)
    holds them, the same objects, and remove such attributes set since."""
    current = module.__dict__
    for key in [k for k, v in current.items() if k not in saved and _kept_attribute(v)]:
        del current[key]
    for key, value in saved.items():
        if current.get(key, _MISSING) is not value and _kept_attribute(value):
            current[key] = value


_MISSING = object()


@contextlib.contextmanager
def preserved(model: nn.Module, copy_tensors: bool = True, restore_objects: bool = True) -> Iterator[nn.Module]:
    """Restore ``model``'s parameters, buffers, train/eval flags and module attributes bit for bit
    on exit.

    Only the tensors whose bits changed are written back (each is compared with its copy): a
    tensor left as it was keeps its in-place version counter, so a ``backward()`` pending from
    before the block (a loss computed, then measured, then differentiated) still works.
    With ``copy_tensors=False`` (for work that only reads the model's tensors, such as a pass
    through ``functional_call`` with other tensors, where a copy of every parameter per pass would
    cost as much as the pass itself) the parameters are not copied: their in-place version counters
    are checked on exit instead, and a parameter written in place raises ``RuntimeError`` naming
    it.  Buffers are copied either way (they are small next to the parameters, and a forward hook
    holding one, such as a call counter, writes it even under ``functional_call``).
    ``restore_objects=False`` skips putting every module's parameter and buffer objects back
    (:func:`tensor_objects_kept`, a walk of all modules): only for work that replaces none of them,
    e.g. ``functional_call`` passes on a model without shared modules (:func:`has_shared_modules`).

    Module attributes that are tensors or plain values (numbers, strings, None) are put back as
    the same objects, and such attributes added inside are removed: the ``weight`` that the older
    ``torch.nn.utils.weight_norm`` / ``spectral_norm`` hooks compute into the module at every
    forward, an activation a module or hook keeps (``self.last = x``), a call counter.  Containers
    mutated in place (a list a hook appends to) are not restored.
    """
    modules = list(model.modules())
    # Inference tensors (a model built under torch.inference_mode()) cannot be written outside
    # inference mode, where measurements run, and have no version counter: nothing to restore.
    params = [(k, t) for k, t in model.named_parameters() if not t.is_inference()]
    buffers = [(k, t) for k, t in model.named_buffers() if not t.is_inference()]
    training = [m.training for m in modules]
    attributes = [dict(m.__dict__) for m in modules]  # (sorted out on exit: a copy is cheaper)

    copied = params + buffers if copy_tensors else buffers
    saved = [t.detach().clone() for _, t in copied]
    versions = None if copy_tensors else [t._version for _, t in params]
    try:
        with tensor_objects_kept(model) if restore_objects else contextlib.nullcontext():
            yield model
        if versions is not None:  # (checked only when the body succeeded: an error in flight wins)
            changed = [name for (name, t), v in zip(params, versions) if t._version != v]
            if changed:
                raise RuntimeError(f"the model's forward pass wrote to {changed[0]!r} in place during a "
                                   "read-only measurement; sharpkit cannot restore it without a copy")
    finally:
        for m, flag, attrs in zip(modules, training, attributes):
            _restore_attributes(m, attrs)
            m.training = flag
        with torch.no_grad():
            for (_, t), s in zip(copied, saved):
                # A write back bumps the tensor's version counter (and would invalidate the
                # autograd graphs that saved it): only where the bits differ.
                if not same_bits(t, s):
                    t.copy_(s)


@contextlib.contextmanager
def private_running_statistics(model: nn.Module) -> Iterator[None]:
    """Give every BatchNorm module copies of its buffers (running mean, variance, batch count)
    for the duration, and put the module's own tensors back on exit.

    With batch statistics (``bn="train"``) each forward pass updates the running buffers in place.
    Written and restored, the model's tensors would end with the values they had but with newer
    version counters, which breaks a pending ``backward()`` whose graph saved them (a BatchNorm
    layer in train mode saves its running statistics).  On the copies the model's own buffers are
    never written.  A buffer shared by several modules gets one copy, shared the same way.
    """
    copies: dict[int, torch.Tensor] = {}
    slots = []
    for m in model.modules():
        if not is_batchnorm(m):
            continue
        for key, t in m._buffers.items():
            if t is None or is_lazy(t):
                continue
            if id(t) not in copies:
                copies[id(t)] = t.detach().clone()
            slots.append((m, key, t))
    try:
        for m, key, t in slots:
            m._buffers[key] = copies[id(t)]
        yield
    finally:
        for m, key, t in slots:
            m._buffers[key] = t


BN_POLICIES = ("eval", "train")

# Device types whose autocast state a measurement switches off (the ones torch.autocast knows).
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla")


@contextlib.contextmanager
def autocast_off() -> Iterator[None]:
    """Switch off every ``torch.autocast`` region the caller is in, for the duration.

    A measurement called inside a training step's ``torch.autocast(dtype=torch.bfloat16)`` ran its
    passes in bfloat16: ε-sharpness 0.170 instead of 0.197 (14 % off) and adaptive sharpness 11 %
    off on a small MLP, and the fused engine stopped with "self and mat2 must have the same dtype".
    The measurement's precision is its ``dtype`` (and ``ascent_dtype``, which enters its own
    autocast region inside this one)."""
    with contextlib.ExitStack() as stack:
        for device_type in _AUTOCAST_DEVICES:
            try:
                enabled = torch.is_autocast_enabled(device_type)
            except (RuntimeError, TypeError, ValueError):  # a device type this torch build does not know
                continue
            if enabled:
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


@contextlib.contextmanager
def parametrizations_uncached() -> Iterator[None]:
    """Evaluate parametrized tensors afresh at every use, for the duration, even inside the
    caller's ``torch.nn.utils.parametrize.cached()``; the caller's cache is put back on exit.

    Under ``cached()`` a parametrized weight is computed once from the module's own tensors and
    reused: the measurement's passes, which evaluate the model at other parameters (through
    ``functional_call``), all saw the cached weight of the unperturbed model (an orthogonal
    layer's Hessian-vector product 74 % off, its ε-sharpness 0.954 instead of 1.212)."""
    from torch.nn.utils import parametrize

    enabled, cache = parametrize._cache_enabled, parametrize._cache
    parametrize._cache_enabled, parametrize._cache = 0, {}
    try:
        yield
    finally:
        parametrize._cache_enabled, parametrize._cache = enabled, cache


def is_batchnorm(module: nn.Module) -> bool:
    """True for BatchNorm1d/2d/3d and SyncBatchNorm (modules with running statistics)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


@contextlib.contextmanager
def measurement_mode(
    model: nn.Module, bn: str = "eval", copy_tensors: bool = True, restore_objects: bool = True
) -> Iterator[nn.Module]:
    """Put ``model`` in the state a measurement needs and restore everything afterwards.

    Dropout is always off (the whole model is put in eval mode).  ``bn="eval"`` makes BatchNorm
    use its running statistics; ``bn="train"`` makes it normalise with each batch's statistics.
    Either way the running buffers are restored on exit (a measurement never changes them), as
    are the parameters and every module's train/eval flag (``copy_tensors``, ``restore_objects``:
    see :func:`preserved`).  With ``bn="train"`` (and ``copy_tensors``) BatchNorm updates copies of
    its running buffers (:func:`private_running_statistics`): the model's own are not written, so
    that an autograd graph built before the measurement stays valid.
    Gradients are enabled inside (a measurement differentiates even when the caller runs under
    ``torch.no_grad()`` or ``torch.inference_mode()``), a caller's ``torch.autocast`` is off
    (:func:`autocast_off`; the measurement's precision is its ``dtype``) and so is the cache of
    ``torch.nn.utils.parametrize.cached()`` (:func:`parametrizations_uncached`).
    """
    if bn not in BN_POLICIES:
        raise ValueError(f"bn must be one of {BN_POLICIES}, got {bn!r}")
    with torch.inference_mode(False), torch.enable_grad(), autocast_off(), parametrizations_uncached(), \
            preserved(model, copy_tensors, restore_objects):
        model.eval()
        if bn == "train":
            for m in model.modules():
                if is_batchnorm(m):
                    m.train()
        with private_running_statistics(model) if bn == "train" and copy_tensors else contextlib.nullcontext():
            yield model


def check_finite_parameters(model: nn.Module) -> None:
    """Raise ``ValueError`` naming the first trainable parameter that holds NaN or inf, or the first
    frozen parameter or floating buffer that holds NaN (BatchNorm statistics; an infinite one can
    be meant, as a -inf attention mask is)."""
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            continue
        if p.requires_grad and not bool(torch.isfinite(p.detach()).all()):
            bad = "NaN" if bool(torch.isnan(p.detach()).any()) else "inf"
            raise ValueError(f"parameter {name!r} contains {bad}; sharpness of a non-finite model is undefined")
        if not p.requires_grad and bool(torch.isnan(p.detach()).any()):
            raise ValueError(f"frozen parameter {name!r} contains NaN; the model's outputs would be NaN")
    for name, b in model.named_buffers():
        if b.is_floating_point() and bool(torch.isnan(b).any()):
            raise ValueError(f"buffer {name!r} contains NaN; the model's outputs would be NaN")


def num_parameters(model: nn.Module) -> int:
    """Number of trainable scalars (the dimension n of the parameter space)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def describe(n: int) -> str:
    """Human-readable parameter count, e.g. ``1.3M``."""
    if n < 1000:
        return str(n)
    exp = min(int(math.log10(n)) // 3, 3)
    if exp < 3 and round(n / 10 ** (3 * exp), 1) >= 1000:  # 999_999 -> 1.0M, not 1000.0k
        exp += 1
    return f"{n / 10 ** (3 * exp):.1f}{'kMG'[exp - 1]}"
