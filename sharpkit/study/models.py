"""Networks for the study: an F1-style MLP, a C1-style 1-D conv net, and user factories.

Keskar et al. (Table 1): F1 is ``784 -> 5 x [512, BN, ReLU] -> 10``; C1 is two
``[conv 64 5x5, BN, ReLU, maxpool 3/2]`` blocks, then dense 384 and dense 192 (each BN, ReLU,
dropout 0.5) and a linear classifier.  Here both take sequences (MNIST-1D: length 40) and the
widths are arguments so the study can fit a time budget.

A model spec names one: ``f1`` and ``c1`` are the paper's sizes; ``f1(width=128,depth=5)`` and
``c1(channels=32,hidden=256x128)`` give sizes (the study records its models this way, so that the
measurement commands rebuild them); ``package.module:factory`` is the user's own.
"""
from __future__ import annotations

import copy
import importlib
import inspect
import math
import re
from typing import Any, Callable, Sequence

import torch
from torch import nn

__all__ = ["make_f1", "make_c1", "build_model", "sized_by_data", "parse_model_spec", "format_model_spec", "MODEL_NAMES"]

MODEL_NAMES = ("f1", "c1")


def make_f1(input_shape: Sequence[int], num_classes: int, width: int = 512, depth: int = 5) -> nn.Module:
    """F1-style MLP: flatten -> ``depth`` x [Linear(width), BatchNorm1d, ReLU] -> Linear(num_classes).

    Args:
        input_shape: shape of one sample (without the batch dimension), e.g. ``(40,)``.
        num_classes: outputs.  width: hidden units per layer (paper: 512).  depth: hidden layers (paper: 5).
    """
    _check_dims(input_shape, num_classes)
    if width < 1 or depth < 1:
        raise ValueError(f"f1 needs width >= 1 and depth >= 1, got width={width}, depth={depth}")
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = math.prod(input_shape)
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), nn.BatchNorm1d(width), nn.ReLU()]
        fan_in = width
    layers.append(nn.Linear(fan_in, num_classes))
    return nn.Sequential(*layers)


def make_c1(
    input_shape: Sequence[int],
    num_classes: int,
    channels: int = 64,
    hidden: Sequence[int] = (384, 192),
    dropout: float = 0.5,
) -> nn.Module:
    """C1-style 1-D conv net.

    ``2 x [Conv1d(channels, kernel 5, padding 2), BatchNorm1d, ReLU, MaxPool1d(3, stride 2)]``, then
    one ``[Linear, BatchNorm1d, ReLU, Dropout(dropout)]`` per entry of ``hidden`` (paper: 384, 192),
    then ``Linear(num_classes)``.  Input samples of shape ``(L,)`` are read as one channel,
    ``(C, L)`` as C channels.
    """
    _check_dims(input_shape, num_classes)
    if len(input_shape) == 1:
        in_ch, length = 1, int(input_shape[0])
        head: list[nn.Module] = [nn.Unflatten(1, (1, length))]
    elif len(input_shape) == 2:
        in_ch, length = int(input_shape[0]), int(input_shape[1])
        head = []
    else:
        raise ValueError(f"c1 takes samples of shape (L,) or (C, L), got {tuple(input_shape)}")
    layers = head
    for _ in range(2):
        if length < 3:
            raise ValueError(f"c1: sequences of length {input_shape[-1]} are too short for two pooling stages")
        layers += [
            nn.Conv1d(in_ch, channels, kernel_size=5, padding=2),
            nn.BatchNorm1d(channels),
            nn.ReLU(),
            nn.MaxPool1d(kernel_size=3, stride=2),
        ]
        in_ch, length = channels, (length - 3) // 2 + 1
    layers.append(nn.Flatten())
    fan_in = in_ch * length
    for h in hidden:
        layers += [nn.Linear(fan_in, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Dropout(dropout)]
        fan_in = h
    layers.append(nn.Linear(fan_in, num_classes))
    return nn.Sequential(*layers)


def _check_dims(input_shape: Sequence[int], num_classes: int) -> None:
    if len(input_shape) == 0 or any(int(d) < 1 for d in input_shape):
        raise ValueError(f"input_shape must be a non-empty tuple of positive sizes, got {tuple(input_shape)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 for a classifier, got {num_classes}")


def _positive_int(text: str) -> int:
    if not re.fullmatch(r"[0-9]+", text) or int(text) < 1:
        raise ValueError("must be a positive integer")
    return int(text)


def _hidden_sizes(text: str) -> tuple[int, ...]:
    if text == "none":
        return ()
    parts = [p.strip() for p in text.split("x")]
    if not all(re.fullmatch(r"[0-9]+", p) and int(p) >= 1 for p in parts):
        raise ValueError("must be positive integers joined by x (e.g. 256x128), or none")
    return tuple(int(p) for p in parts)


def _dropout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value < 1.0:
        raise ValueError("must be a number in [0, 1)")
    return value


# The sizes a spec may give, per built-in model, in the order specs are written: name -> parser.
SIZE_KEYS: dict[str, dict[str, Callable[[str], Any]]] = {
    "f1": {"width": _positive_int, "depth": _positive_int},
    "c1": {"channels": _positive_int, "hidden": _hidden_sizes, "dropout": _dropout},
}
_EXAMPLES = {"f1": "f1(width=128,depth=5)", "c1": "c1(channels=32,hidden=256x128)"}


def parse_model_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``(name, sizes)`` of a model spec: ``"f1"`` -> ``("f1", {})``,
    ``"c1(channels=32,hidden=256x128)"`` -> ``("c1", {"channels": 32, "hidden": (256, 128)})``;
    a ``module:factory`` spec is returned as its own name with no sizes.

    Raises ``ValueError`` in one line, naming the spec, for a malformed spec, a size key the model
    does not have, a repeated key or a bad value.
    """
    if "(" not in spec and ")" not in spec:
        return spec, {}
    m = re.fullmatch(r"\s*([^()\s]+)\s*\((.*)\)\s*", spec)
    if m is None:
        raise ValueError(f"model spec {spec!r}: expected NAME(key=value,...), e.g. {_EXAMPLES['f1']}")
    name, body = m.group(1), m.group(2)
    if name not in SIZE_KEYS:
        raise ValueError(f"model spec {spec!r}: sizes in parentheses apply to f1 and c1 only "
                         f"(e.g. {_EXAMPLES['f1']}, {_EXAMPLES['c1']})")
    keys = SIZE_KEYS[name]
    sizes: dict[str, Any] = {}
    for item in body.split(",") if body.strip() else []:
        key, eq, value = (part.strip() for part in item.partition("="))
        if not item.strip():
            raise ValueError(f"model spec {spec!r}: an empty entry between commas")
        if not eq or not key:
            hint = " (hidden sizes are joined by x, e.g. hidden=256x128)" if name == "c1" and "hidden" in sizes else ""
            raise ValueError(f"model spec {spec!r}: {item.strip()!r} is not key=value{hint}")
        if key not in keys:
            raise ValueError(f"model spec {spec!r}: unknown size {key!r} for {name} (use {', '.join(keys)})")
        if key in sizes:
            raise ValueError(f"model spec {spec!r}: {key} is given twice")
        try:
            sizes[key] = keys[key](value)
        except ValueError as exc:
            raise ValueError(f"model spec {spec!r}: {key} {exc}, got {value!r}") from None
    return name, sizes


def format_model_spec(name: str, **sizes: Any) -> str:
    """The spec that :func:`build_model` reads back as ``name`` with ``sizes``, e.g.
    ``format_model_spec("f1", width=128, depth=5) == "f1(width=128,depth=5)"``; ``name`` alone when
    no sizes are given (for ``f1``/``c1``: the paper's sizes)."""
    if name not in SIZE_KEYS:
        if sizes:
            raise ValueError(f"sizes apply to f1 and c1 only, not to {name!r}")
        return name
    unknown = set(sizes) - set(SIZE_KEYS[name])
    if unknown:
        raise ValueError(f"unknown size {sorted(unknown)[0]!r} for {name} (use {', '.join(SIZE_KEYS[name])})")

    def text(key: str, value: Any) -> str:
        if key == "hidden":
            return "x".join(str(int(h)) for h in value) if len(value) else "none"
        return repr(float(value)) if key == "dropout" else str(int(value))

    items = [f"{k}={text(k, sizes[k])}" for k in SIZE_KEYS[name] if k in sizes]
    spec = f"{name}({','.join(items)})" if items else name
    parse_model_spec(spec)  # what is written reads back (positive sizes, dropout in [0, 1))
    return spec


def resolve_factory(spec: str) -> Callable[..., nn.Module]:
    """``f1``, ``c1`` (with or without sizes) or ``package.module:function`` -> a callable building the model."""
    name, _ = parse_model_spec(spec)
    if name == "f1":
        return make_f1
    if name == "c1":
        return make_c1
    if ":" not in spec:
        raise ValueError(f"unknown model {spec!r}: use f1, c1 (sized: {_EXAMPLES['f1']}, {_EXAMPLES['c1']}) "
                         "or module:factory (e.g. mypkg.nets:make_net)")
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ValueError(f"model spec {spec!r} must look like module:factory")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ValueError(f"model spec {spec!r}: cannot import module {mod_name!r} ({exc})") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"model spec {spec!r}: {mod_name!r} has no callable {attr!r}")
    return factory


def sized_by_data(spec: str) -> bool:
    """Whether :func:`build_model` sizes ``spec``'s model by the data: the built-in models, and a
    ``module:factory`` taking ``(input_shape, num_classes)``."""
    return parse_model_spec(spec)[0] in MODEL_NAMES or _takes_two(resolve_factory(spec))


def build_model(
    spec: str, input_shape: Sequence[int], num_classes: int, seed: int, **kwargs
) -> nn.Module:
    """Build the model named by ``spec`` with its initial weights drawn from ``seed``.

    Built-in names take their sizes from the spec (``f1(width=128,depth=5)``) or from ``kwargs``
    (``width``, ``depth`` for f1; ``channels``, ``hidden``, ``dropout`` for c1; a size given both
    ways must agree); plain ``f1``/``c1`` without kwargs are the paper's sizes.  A
    ``module:factory`` is called as ``factory(input_shape, num_classes)`` when it accepts two
    arguments, else with none; it must return an ``nn.Module``, and what is returned is a copy of it
    (a factory that returns a module it keeps never sees that module changed).  The global RNG is
    left as it was.

    Raises ``ValueError`` in one line naming the spec: for an unusable spec, and for any exception
    the user's factory raises (chained as its cause), e.g. ``model spec 'nets:make': make((40,),
    10) raised RuntimeError: boom``.
    """
    factory = resolve_factory(spec)
    name, sizes = parse_model_spec(spec)
    for key, value in kwargs.items():
        if key in sizes and _size_value(sizes[key]) != _size_value(value):
            raise ValueError(f"model spec {spec!r} gives {key}={sizes[key]!r}, the call {key}={value!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name in MODEL_NAMES:
            model = factory(tuple(input_shape), num_classes, **{**sizes, **kwargs})
        else:
            args = (tuple(input_shape), num_classes) if _takes_two(factory) else ()
            try:
                model = factory(*args)
            except Exception as exc:  # the user's code: an unusable model spec, with the cause chained
                from ..audit.checkpoints import error_summary

                call = f"{spec.partition(':')[2]}({', '.join(map(repr, args))})"
                raise ValueError(
                    f"model spec {spec!r}: {call} raised {type(exc).__name__}: {error_summary(exc)}"
                ) from exc
    if not isinstance(model, nn.Module):
        raise TypeError(f"model factory {spec!r} returned {type(model).__name__}, expected torch.nn.Module")
    if name not in MODEL_NAMES:
        # A factory may hand out a module it keeps (a global network, a cached instance): the
        # caller trains what it gets in place, so it gets its own copy.  Without it the user's
        # module was trained, and the study's SB and LB models of every seed were one object.
        try:
            model = copy.deepcopy(model)
        except Exception as exc:
            from ..audit.checkpoints import error_summary

            raise ValueError(f"model spec {spec!r}: the model it returns cannot be copied "
                             f"({type(exc).__name__}: {error_summary(exc)})") from exc
    return model


def _size_value(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _takes_two(fn: Callable) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    params = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    varargs = any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values())
    return varargs or len(params) >= 2
