"""Adam training until the training loss stops improving, with resumable per-epoch checkpoints.

A checkpoint (model, optimizer, RNG states, history) is written atomically after every epoch,
so an interrupted training resumes at the last finished epoch.  ``on_epoch`` hooks (sharpness
tracking, snapshots for warm starts) run after each epoch; what they return is stored in the
history, hence survives a resume too.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..data import to_device
from .store import atomic_torch_save, load_weights_record

__all__ = ["TrainConfig", "TrainResult", "train"]


@dataclass(frozen=True)
class TrainConfig:
    """How one model is trained.

    batch_size: samples per Adam step (the last, smaller batch of an epoch is kept).
    max_epochs: the cap.  patience: stop after this many epochs without the epoch training loss
    improving on its best by more than ``min_rel_improvement`` (relative) or 1e-4 (absolute).  lr: Adam's step size
    (default 1e-3, Adam's defaults otherwise).
    """

    batch_size: int
    max_epochs: int = 100
    patience: int = 5
    min_rel_improvement: float = 0.01
    lr: float = 1e-3


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # one entry per epoch (epoch 0 = the start)
    epochs: int = 0
    stopped: str = ""  # "converged" or "cap"
    resumed_from: int = 0


EpochHook = Callable[[int, nn.Module, dict], "dict | None"]


def train(
    model: nn.Module,
    loss_fn,
    train_data: tuple[torch.Tensor, torch.Tensor],
    config: TrainConfig,
    seed: int,
    device: torch.device | str = "cpu",
    checkpoint: str | os.PathLike | None = None,
    on_epoch: EpochHook | None = None,
    progress: Any = None,
    hook_state: dict | None = None,
) -> TrainResult:
    """Train ``model`` in place with Adam on ``train_data = (X, Y)``; returns the history.

    Each epoch visits the training set once in a fresh random order drawn from ``seed``.  The
    epoch loss is the sample-weighted mean of the minibatch losses seen during the epoch (train
    mode; a last batch of one sample, which BatchNorm cannot train on, is skipped and not counted).
    With ``checkpoint`` the state after each epoch is saved there and a later call with the
    same path resumes from it (a checkpoint that cannot be read or does not fit ``model`` is
    ignored with a warning and training starts afresh).  ``on_epoch(epoch, model, entry)`` is
    called after epoch 0 (before any step) and after each epoch; a dict it returns is merged into
    that epoch's history entry.  ``progress``: a tqdm bar advanced once per epoch (optional).
    ``hook_state``: a dict that ``on_epoch`` keeps between epochs (a warm-start vector, say); it is
    saved in each checkpoint with the epoch and refilled from it on resume, so that a resumed
    training's hook carries on as it would have without the interruption.
    """
    x, y = train_data
    n = x.shape[0]
    if n == 0:
        raise ValueError("the training set is empty")
    if config.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {config.batch_size}")
    if (config.batch_size == 1 or n == 1) and _has_batchnorm(model):
        raise ValueError(f"batch_size {config.batch_size} on {n} training samples: a model with BatchNorm cannot "
                         "train on one-sample batches (need batch_size >= 2 and 2 or more samples)")
    device = torch.device(device)
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + config.batch_size)
    result = TrainResult()
    ckpt = Path(checkpoint) if checkpoint is not None else None
    # An unreadable checkpoint, or one of another architecture, is ignored (with a warning).
    state = load_weights_record(ckpt, model, device) if ckpt is not None and ckpt.exists() else None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(_rng_tensor(state["generator"]))
        torch.set_rng_state(_rng_tensor(state["torch_rng"]))
        if device.type == "cuda" and state.get("cuda_rng") is not None:  # dropout masks drawn on the GPU
            torch.cuda.set_rng_state(_rng_tensor(state["cuda_rng"]), device)
        result.history = state["history"]
        result.resumed_from = result.epochs = len(result.history) - 1
        if hook_state is not None:  # (checkpoints written before hook states: none saved)
            hook_state.clear()
            hook_state.update(state.get("hook_state") or {})
    else:
        torch.manual_seed(int(seed) + 7919)  # dropout masks
        entry = {"epoch": 0, "train_loss": math.nan}
        if on_epoch is not None:
            entry.update(on_epoch(0, model, entry) or {})
        result.history.append(entry)
    if progress is not None and result.epochs:
        progress.update(result.epochs)

    def _save() -> None:
        if ckpt is not None:
            atomic_torch_save(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    # RNG states as bytes: torch.load's map_location (the training device) moved
                    # tensors to the GPU, where set_rng_state refuses them.
                    "generator": _rng_bytes(gen.get_state()),
                    "torch_rng": _rng_bytes(torch.get_rng_state()),
                    "cuda_rng": _rng_bytes(torch.cuda.get_rng_state(device)) if device.type == "cuda" else None,
                    "history": result.history,
                    "stopped": result.stopped,
                    "hook_state": None if hook_state is None else dict(hook_state),
                },
                ckpt,
            )

    while not result.stopped:
        if _converged(result.history, config):
            result.stopped = "converged"
            break
        if result.epochs >= config.max_epochs:
            result.stopped = "cap"
            break
        model.train()
        perm = torch.randperm(n, generator=gen)
        total, seen = 0.0, 0
        for s in range(0, n, config.batch_size):
            idx = perm[s : s + config.batch_size]
            if idx.numel() == 1 and _has_batchnorm(model):
                continue  # BatchNorm cannot train on a single sample
            xb, yb = to_device((x[idx], y[idx]), device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training diverged: loss {float(loss.detach())} at epoch {result.epochs + 1}")
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.numel()
            seen += idx.numel()
        result.epochs += 1
        # The mean over the samples trained on: a skipped one-sample batch has no loss to weigh.
        entry = {"epoch": result.epochs, "train_loss": total / seen}
        if on_epoch is not None:
            entry.update(on_epoch(result.epochs, model, entry) or {})
        result.history.append(entry)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{entry['train_loss']:.4f}")
        _save()
    _save()
    model.eval()
    return result


def _rng_bytes(state: torch.Tensor) -> bytes:
    return state.cpu().numpy().tobytes()


def _rng_tensor(state: bytes | torch.Tensor) -> torch.Tensor:
    """An RNG state for ``set_state``/``set_rng_state`` (a CPU uint8 tensor) from a checkpoint's
    bytes, or from the tensor of a checkpoint written before they were bytes (wherever it was loaded)."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", torch.uint8)
    return torch.frombuffer(bytearray(state), dtype=torch.uint8)


def _converged(history: list[dict], config: TrainConfig) -> bool:
    """True when the best epoch loss is more than ``patience`` epochs old (to relative tolerance)."""
    losses = [h["train_loss"] for h in history[1:]]
    if len(losses) <= config.patience:
        return False
    best_before = min(losses[: -config.patience])
    recent = min(losses[-config.patience :])
    # An absolute floor too: near zero loss, relative changes are noise.
    return recent > best_before - max(config.min_rel_improvement * best_before, 1e-4)


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
