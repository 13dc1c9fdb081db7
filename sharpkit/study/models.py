"""Networks for the study: an F1-style MLP, a C1-style 1-D conv net, and user factories.

Keskar et al. (Table 1): F1 is ``784 -> 5 x [512, BN, ReLU] -> 10``; C1 is two
``[conv 64 5x5, BN, ReLU, maxpool 3/2]`` blocks, then dense 384 and dense 192 (each BN, ReLU,
dropout 0.5) and a linear classifier.  Here both take sequences (MNIST-1D: length 40) and the
widths are arguments so the study can fit a time budget.
"""
from __future__ import annotations

import importlib
import inspect
import math
from typing import Callable, Sequence

import torch
from torch import nn

__all__ = ["make_f1", "make_c1", "build_model", "MODEL_NAMES"]

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


def resolve_factory(spec: str) -> Callable[..., nn.Module]:
    """``f1``, ``c1`` or ``package.module:function`` -> a callable building the model."""
    if spec == "f1":
        return make_f1
    if spec == "c1":
        return make_c1
    if ":" not in spec:
        raise ValueError(f"unknown model {spec!r}: use f1, c1 or module:factory (e.g. mypkg.nets:make_net)")
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


def build_model(
    spec: str, input_shape: Sequence[int], num_classes: int, seed: int, **kwargs
) -> nn.Module:
    """Build the model named by ``spec`` with its initial weights drawn from ``seed``.

    Built-in names take ``kwargs`` (``width``, ``depth`` for f1; ``channels``, ``hidden``,
    ``dropout`` for c1).  A ``module:factory`` is called as ``factory(input_shape, num_classes)``
    when it accepts two arguments, else with none; it must return an ``nn.Module``.  The global
    RNG is left as it was.
    """
    factory = resolve_factory(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec in MODEL_NAMES:
            model = factory(tuple(input_shape), num_classes, **kwargs)
        else:
            model = factory(tuple(input_shape), num_classes) if _takes_two(factory) else factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model factory {spec!r} returned {type(model).__name__}, expected torch.nn.Module")
    return model


def _takes_two(fn: Callable) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    params = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    varargs = any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values())
    return varargs or len(params) >= 2
