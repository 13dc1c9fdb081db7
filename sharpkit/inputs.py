"""What users name on the command line or pass to the API, resolved and checked before any
measurement: data specs, model specs, devices, and whether the model runs on the data.

Shared by ``sharpkit audit`` (:mod:`sharpkit.audit`) and the single-model commands
(:mod:`sharpkit.measure_cli`).  Descriptions returned here identify content (a data file's
SHA-256, a fingerprint of data in memory, a model's architecture, a loss and its options): the
audit keys its stored rows by them.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from typing import Any, Callable

import torch
from torch import nn
from torch.func import functional_call

from .audit.checkpoints import error_summary, file_sha256
from .data import Batches, as_batches, load_dataset, to_device
from .distributed import class_digest, digest, is_torch_code, without_addresses
from .objective import check_loss_reduction, check_mean_reduced, checked_loss, is_class_index_loss, loss_on_device
from .params import measurement_mode, model_tensors

__all__ = ["LOSSES", "resolve_data", "resolve_model", "resolve_model_classes", "resolve_device", "default_device",
           "check_class_targets", "check_model_runs", "identity"]


LOSSES: dict[str, Callable[[], nn.Module]] = {
    "cross_entropy": nn.CrossEntropyLoss,
    "mse": nn.MSELoss,
}


def resolve_data(spec: Any, batch_size: int | None = None,
                 describe: bool = True) -> tuple[Batches, str, int | None]:
    """``(batches, description, num_classes)`` for a data spec or data object.

    ``spec``: ``"mnist1d"``, ``"digits"``, a ``.pt``/``.npz`` file (training split, via
    :func:`sharpkit.data.load_dataset`), ``"module:function"`` returning a DataLoader or an
    ``(inputs, targets)`` pair, or such data directly.  ``batch_size`` splits tensor data.

    The description identifies the data's content (it keys the audit's result rows): a file's
    SHA-256 (not its name: a renamed or copied file keeps its rows), the name of a built-in set,
    or for data in memory and from ``module:function`` a :func:`_fingerprint` of the samples.
    ``describe=False`` skips the description (returned as ""), which reads the data, and a file,
    once more.  Raises ``ValueError`` naming the spec when the data cannot be read.
    """
    num_classes = None
    fingerprint = True  # data in memory and from module:function are identified by their samples
    if isinstance(spec, str):
        if ":" in spec and not os.path.exists(spec) and not spec.endswith((".pt", ".pth", ".npz")):
            import importlib

            mod_name, _, attr = spec.partition(":")
            try:
                fn = getattr(importlib.import_module(mod_name), attr)
            except (ImportError, AttributeError) as exc:
                raise ValueError(f"data spec {spec!r}: cannot find {attr!r} in module {mod_name!r} ({exc})") from None
            try:
                data = fn()
            except Exception as exc:  # the user's function: an unusable --data, with the cause chained
                raise ValueError(f"data spec {spec!r}: {attr}() raised {type(exc).__name__}: {error_summary(exc)}") from exc
            desc = spec
        else:
            try:
                ds = load_dataset(spec)
            except Exception as exc:  # corrupt, truncated, not a data file (zip, pickle, torch errors)
                if isinstance(exc, ValueError) and spec in str(exc):
                    raise  # sharpkit's own message, naming the data already
                raise ValueError(f"data {spec!r}: cannot load ({type(exc).__name__}: {error_summary(exc)})") from exc
            data, num_classes, fingerprint = ds.train, ds.num_classes or None, False
            # A file's bytes alone identify it: rewritten data must not meet old rows, and a renamed
            # or copied file keeps them.
            desc = (f"file@{file_sha256(spec)[:16]}:train" if os.path.isfile(spec) else f"{spec}:train") \
                if describe else ""
    else:
        data, desc = spec, "data"
    batches = as_batches(data, batch_size)
    if not describe:
        return batches, "", num_classes
    n = batches.num_samples()
    if fingerprint:
        desc = f"{desc}:{_fingerprint(batches)}"
    return batches, f"{desc}:{n}", num_classes


def _fingerprint(batches: Batches) -> str:
    """A content hash of data in memory: of its samples and batch sizes, not of their order.

    Rows of different data never collide, while a loader that shuffles (the same samples in
    another order on every pass) keeps its fingerprint, so that its audits resume.  Each sample
    (input and target bytes) is hashed on its own; the sorted digests are hashed together.
    """
    digests: list[bytes] = []
    sizes: list[int] = []
    layout: set[tuple] = set()
    for x, y in batches:
        n = int(x.shape[0])
        sizes.append(n)
        if n == 0:
            continue
        rows = []
        for role, t in (("x", x), ("y", y)):
            t = t.detach().cpu().contiguous()
            layout.add((role, tuple(t.shape[1:]), str(t.dtype)))
            raw = memoryview(t.reshape(n, -1).view(torch.uint8).numpy().tobytes())
            width = len(raw) // n
            rows.append([raw[i * width:(i + 1) * width] for i in range(n)])
        for xb, yb in zip(*rows):
            h = hashlib.sha256(xb)
            h.update(yb)
            digests.append(h.digest()[:16])
    h = hashlib.sha256(repr((sorted(layout), sorted(sizes))).encode())
    h.update(b"".join(sorted(digests)))
    return h.hexdigest()[:16]


def _count_classes(batches: Batches) -> int:
    """Classes of the targets: for integer labels the largest over all batches plus one (a loader
    sorted by class shows only the first classes in its first batch), else a target row's width."""
    y = next(iter(batches))[1]
    if y.is_floating_point():
        return y.shape[1] if y.dim() > 1 else 1
    return max(int(t.max().item()) for _, t in batches if t.numel()) + 1


def resolve_model(spec: Any, batches: Batches, num_classes: int | None, seed: int = 0) -> tuple[nn.Module, str]:
    """``(model, description)`` for an ``nn.Module``, a zero-argument factory, or a spec string.

    Strings are resolved by the study's model registry (``f1``, ``c1`` at the paper's sizes, sized
    ones such as ``f1(width=128,depth=5)`` or ``c1(channels=32,hidden=256x128)`` as a study records
    its models, ``module:factory``), which is given the data's sample shape and class count
    (``num_classes``, or counted from the targets).  The description identifies the architecture
    (see :func:`identity`).
    """
    model, desc, _ = resolve_model_classes(spec, batches, num_classes, seed)
    return model, desc


def resolve_model_classes(spec: Any, batches: Batches, num_classes: int | None,
                          seed: int = 0) -> tuple[nn.Module, str, int | None]:
    """:func:`resolve_model`'s ``(model, description)``, and the number of classes the model was
    built for where that came from the data's integer labels (a built-in model, or a
    ``module:factory`` taking ``(input_shape, num_classes)``), else None: a checkpoint trained
    for other classes can then be told why it does not fit.
    """
    if isinstance(spec, nn.Module):
        return spec, identity(spec), None
    if callable(spec) and not isinstance(spec, str):
        try:
            model = spec()
        except Exception as exc:  # the user's factory: an unusable model, with the cause chained
            name = getattr(spec, "__qualname__", type(spec).__name__)
            raise ValueError(f"model factory {name}() raised {type(exc).__name__}: {error_summary(exc)}") from exc
        if not isinstance(model, nn.Module):
            raise TypeError(f"model factory returned {type(model).__name__}, expected torch.nn.Module")
        return model, identity(model), None
    if not isinstance(spec, str):
        raise TypeError(f"model must be an nn.Module, a factory or a spec string, got {type(spec).__name__}")
    from .study.models import build_model, sized_by_data

    x, y = next(iter(batches))
    if num_classes is None:
        num_classes = _count_classes(batches)
    num_classes = max(num_classes, 2)
    model = build_model(spec, tuple(x.shape[1:]), num_classes, seed)
    from_labels = sized_by_data(spec) and not y.is_floating_point()
    return model, f"{spec}|{identity(model)}", num_classes if from_labels else None


_PLAIN_TYPES = (bool, int, float, str, tuple, type(None))


def _plain_attributes(obj: Any) -> dict[str, Any]:
    """An object's public attributes of plain types: the options a loss module's repr omits
    (``label_smoothing``, ``ignore_index``) and a custom module's settings."""
    return {k: v for k, v in sorted(getattr(obj, "__dict__", {}).items())
            if not k.startswith("_") and k != "training" and isinstance(v, _PLAIN_TYPES)}


def _held_function(fn: Any) -> str:
    """A function a layer holds: torch's by name (their code goes with the torch version), others by
    a digest of their code (and a partial's arguments)."""
    if is_torch_code(fn) and hasattr(fn, "__qualname__"):
        return f"{fn.__module__}.{fn.__qualname__}"
    return f"{digest(fn):x}"


def identity(obj: Any, tensors: bool = False) -> str:
    """What identifies a model or a loss in the results key (memory addresses left out).

    A module: ``Class[digest]`` of its class, its repr (layers, activations), every submodule's
    plain attributes and the functions it holds (a lambda layer's), the code of every class in it
    outside torch (:func:`~sharpkit.distributed.class_digest`: an edited ``forward`` is another
    model), its tensors' names and shapes, and with ``tensors`` their values (a loss's class
    weights; a model's come from each checkpoint instead).  A function: its qualified name, and a
    digest of its code unless it is torch's.  Anything else: its repr and plain attributes, and a
    digest of its class's code and its attributes (a ``functools.partial``'s function and
    arguments).  Code is digested as compiled, so another Python version gives other keys.
    """
    if isinstance(obj, nn.Module):
        h = hashlib.sha256(f"{type(obj).__module__}.{type(obj).__qualname__}\n{obj!r}".encode())
        for name, module in obj.named_modules():
            h.update(without_addresses(f"\n{name}: {_plain_attributes(module)}").encode())
            held = {k: _held_function(v) for k, v in sorted(vars(module).items())
                    if not k.startswith("_") and callable(v) and not isinstance(v, (nn.Module, type))}
            if held:  # (a TransformerEncoderLayer's activation is not in its repr)
                h.update(f"\n{name} holds: {held}".encode())
        # (torch's classes by name only, in the repr: keys of models built from them are unchanged)
        own = {type(m) for m in obj.modules() if not is_torch_code(type(m))}
        for cls in sorted(own, key=lambda c: (c.__module__, c.__qualname__)):
            h.update(f"\n{cls.__module__}.{cls.__qualname__}: {class_digest(cls):x}".encode())
        for name, t in obj.state_dict().items():
            h.update(f"\n{name}: {tuple(t.shape)} {t.dtype}".encode())
            if tensors:
                h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return f"{type(obj).__name__}[{h.hexdigest()[:12]}]"
    if hasattr(obj, "__qualname__"):
        name = f"{getattr(obj, '__module__', None)}.{obj.__qualname__}"
        return name if is_torch_code(obj) else f"{name}[{digest(obj):x}]"
    return f"{without_addresses(f'{obj!r} {_plain_attributes(obj)}')}[{digest(obj):x}]"


def default_device() -> torch.device:
    """The commands' device when none is given: the GPU where CUDA is available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` (default cpu) checked up front: an unknown name, or a device this torch build or
    machine does not have, is a ``ValueError`` before any data are read, not a traceback halfway."""
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
        if dev.type == "meta":
            raise ValueError("a meta device holds no data")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(f"this machine has {torch.cuda.device_count()} CUDA device(s)")
        torch.empty(1, device=dev)
    except (RuntimeError, AssertionError, TypeError, ValueError) as exc:  # AssertionError: a CPU-only build
        raise ValueError(f"device {str(device)!r} is not usable here: {error_summary(exc)}") from None
    return dev


def check_class_targets(loss_fn: Callable, targets: torch.Tensor) -> None:
    """ValueError where a cross-entropy/NLL loss meets floating targets of one value per sample
    (class labels saved as floats): the loss takes integer labels or ``(N, C)`` probabilities, and
    a model sized by such targets, or a checkpoint for it, would be blamed instead."""
    if is_class_index_loss(loss_fn) and targets.is_floating_point() and targets.dim() == 1:
        raise ValueError(f"the targets are {str(targets.dtype).replace('torch.', '')} with one value per sample: "
                         "cross-entropy takes class labels as integers (save them as int64) or class "
                         "probabilities of shape (N, C); for regression targets use an MSE loss")


def check_model_runs(model: nn.Module, loss_fn: Callable, batches: Batches, device: torch.device,
                      dtype: torch.dtype, bn: str) -> None:
    """Run the model and the loss on two samples of the first batch (model left as found).

    A model that does not fit the data (input width, number of classes, targets the loss refuses)
    is then a usage error naming the problem, raised before any checkpoint is read.
    """
    check_mean_reduced(loss_fn)
    x, y = next(iter(batches))
    check_class_targets(loss_fn, y)
    inputs, targets = to_device((x[:2], y[:2]), device, dtype)
    # Warnings stay quiet here: the measurement itself raises them again.
    with measurement_mode(model, bn), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = functional_call(model, model_tensors(model, device, dtype), (inputs,))
            # (checked_loss: MSE broadcasts mismatched shapes, class labels against logits, with only a warning)
            checked_loss(loss_on_device(loss_fn, device, dtype), out, targets)
        except Exception as exc:
            raise ValueError(
                f"the model does not run on the data ({type(exc).__name__}: {error_summary(exc)}); samples have "
                f"shape {tuple(x.shape[1:])}, targets {tuple(y.shape[1:])} of {str(y.dtype).replace('torch.', '')}"
            ) from exc
        # A lambda or wrapper summing over the samples: every value would depend on the batching.
        check_loss_reduction(loss_on_device(loss_fn, device, dtype), (inputs, targets), out)
