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
from pathlib import Path
from typing import Any

from ..files import atomic_torch_save, atomic_write_bytes, atomic_write_text

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_torch_save", "StepCache", "key_id"]


def key_id(key: dict) -> str:
    """A short stable name for a step key (sha1 of its canonical JSON)."""
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StepCache:
    """Finished measurements as one JSON file per step under ``root``: ``{"key": ..., "value": ...}``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
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
