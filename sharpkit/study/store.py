"""The study's content-addressed cache of finished steps (atomic writers re-exported from
:mod:`sharpkit.files`).

Every finished step (a training, a measurement) is stored under a key that spells out everything
it depends on; a re-run with the same output directory finds it and skips the work, and runs with
different settings can share a directory without mixing results.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..audit.checkpoints import error_summary
from ..files import atomic_torch_save, atomic_write_bytes, atomic_write_text

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_torch_save", "StepCache", "key_id",
           "tensors_digest", "load_weights_record"]


def key_id(key: dict) -> str:
    """A short stable name for a step key (sha1 of its canonical JSON)."""
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """A content hash of named tensors (names, dtypes, shapes and bytes): keys a step by the data
    it read, so that rewritten data never meet results of the old data."""
    h = hashlib.sha256()
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def load_weights_record(path: str | os.PathLike, model: nn.Module, device: torch.device | str) -> dict | None:
    """The dict saved at ``path`` (a finished training or a training checkpoint, its weights under
    ``"model"``) if it can be read and its weights fit ``model``; else None, with a warning.

    These files are the study's own cache: a damaged one, or one written for another architecture,
    is a cache miss (the step is redone and the file overwritten), not a reason to stop the study.
    Nothing is loaded into ``model``.
    """
    try:
        saved = torch.load(path, map_location=device, weights_only=False)
    except Exception as exc:  # truncated, not a torch file, unpickling errors: all mean "unreadable"
        return _miss(path, f"cannot be read ({type(exc).__name__}: {error_summary(exc)})")
    weights = saved.get("model") if isinstance(saved, dict) else None
    if not isinstance(weights, Mapping):
        return _miss(path, "holds no model weights")
    have = {k: tuple(v.shape) for k, v in weights.items() if isinstance(v, torch.Tensor)}
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if have != want:
        wrong = sorted(set(have) ^ set(want) | {k for k in set(have) & set(want) if have[k] != want[k]})
        return _miss(path, f"does not fit the model ({len(wrong)} tensors differ in name or shape, e.g. {wrong[0]!r})")
    return saved


def _miss(path: str | os.PathLike, why: str) -> None:
    warnings.warn(f"{path} {why}: ignored, the step is redone", RuntimeWarning, stacklevel=3)
    return None


class StepCache:
    """Finished measurements as one JSON file per step under ``root``: ``{"key": ..., "value": ...}``."""

    def __init__(self, root: str | os.PathLike):
        # The folder is made by the first put (atomic_write_text creates it): a study that stops
        # before storing anything leaves no empty cache behind.
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def path(self, key: dict) -> Path:
        return self.root / f"{key.get('kind', 'step')}-{key_id(key)}.json"

    def get(self, key: dict) -> Any | None:
        p = self.path(key)
        if not p.exists():
            return None
        try:
            stored = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # a damaged entry is recomputed
        if stored.get("key") != json.loads(json.dumps(key, default=str)):
            return None
        self.hits += 1
        return stored["value"]

    def put(self, key: dict, value: Any) -> Any:
        atomic_write_text(self.path(key), json.dumps({"key": key, "value": value}, default=str, indent=1))
        self.misses += 1
        return value
