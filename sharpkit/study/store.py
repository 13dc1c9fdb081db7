"""The study's content-addressed cache of finished steps (atomic writers re-exported from
:mod:`sharpkit.files`).

Every finished step (a training, a measurement) is stored under a key that spells out everything
it depends on; a re-run with the same output directory finds it and skips the work, and runs with
different settings can share a directory without mixing results.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..audit.checkpoints import error_summary
from ..files import atomic_torch_save, atomic_write_bytes, atomic_write_text

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_torch_save", "StepCache", "key_id",
           "tensors_digest", "load_weights_record", "canonical", "hold_folder", "remove_stale_temporaries",
           "LOCK_NAME"]

# The temporary files of sharpkit.files.atomic_write: ".<target>.<pid>.<12 hex>.tmp".  A writer
# killed with SIGKILL (or a power cut) leaves one behind; nothing ever reads them.
TEMP_NAME = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{12}\.tmp$")
# The study's folder lock (DIR/.sharpkit-study.lock): every live study holds it shared, and a study
# that starts while no other one holds it (it gets the lock exclusively) removes stale temporaries.
LOCK_NAME = ".sharpkit-study.lock"


def key_id(key: dict) -> str:
    """A short stable name for a step key (sha1 of its canonical JSON)."""
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def canonical(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples as lists, other objects as their str): keys built
    in memory and keys read from a file compare equal exactly when their :func:`key_id` agree."""
    return json.loads(json.dumps(obj, default=str))


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (True when that cannot be told: the safe side)."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process, or a platform without signal 0
    return True


def remove_stale_temporaries(root: str | os.PathLike) -> list[Path]:
    """Remove the atomic writer's temporaries in ``root``, ``root/cache`` and ``root/runs/*``
    whose writer process is not alive on this machine; returns the paths removed.

    Call it only while holding ``root``'s lock exclusively (:func:`hold_folder` does): the lock
    proves that no other study is writing there, the pid check guards against any other writer
    on this machine (a study of an older sharpkit, which takes no lock).
    """
    root = Path(root)
    folders = [root, root / "cache"]
    runs = root / "runs"
    if runs.is_dir():
        folders += sorted(p for p in runs.iterdir() if p.is_dir())
    removed = []
    for folder in folders:
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            continue
        for name in names:
            m = TEMP_NAME.match(name)
            if m is None or _pid_alive(int(m.group(1))):
                continue
            path = folder / name
            try:
                if path.is_file() and not path.is_symlink():
                    path.unlink()
                    removed.append(path)
            except OSError:
                continue  # gone already, or not ours to remove: left as it is
    return removed


@contextlib.contextmanager
def hold_folder(root: str | os.PathLike) -> Iterator[list[Path]]:
    """Hold ``root``'s study lock (shared) for the block; yields the stale temporaries removed.

    Several studies may share a folder (each holds the lock shared).  The one that starts while no
    other holds it gets the lock exclusively for a moment and removes the temporaries that killed
    writers left (:func:`remove_stale_temporaries`); while another study holds the lock nothing is
    removed, since its temporaries may be in the middle of being written.  Where file locks are not
    available (no ``fcntl``, a file system that refuses them) nothing is removed either.
    """
    try:
        import fcntl
    except ImportError:  # Windows: nothing proves a temporary stale
        yield []
        return
    root = Path(root)
    try:
        fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield []
        return
    removed: list[Path] = []
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another live study: its temporaries are not ours to judge
            exclusive = False
        except OSError:  # no locks on this file system: nothing proves a temporary stale
            exclusive = None
        else:
            exclusive = True
        if exclusive:
            removed = remove_stale_temporaries(root)
        if exclusive is not None:
            fcntl.flock(fd, fcntl.LOCK_SH)  # (from exclusive: a conversion; else waits out a cleanup)
        yield removed
    finally:
        os.close(fd)  # releases the lock


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
    """Finished measurements as one JSON file per step under ``root``:
    ``{"key": ..., "value": ..., "provenance": ...}``.

    ``provenance`` (a dict: versions, device) is stored with each entry written here; the
    provenances of the entries read back are counted in ``sources`` (canonical JSON -> count), so
    that a report can say when its numbers come from more than one environment.
    """

    def __init__(self, root: str | os.PathLike, provenance: dict | None = None):
        # The folder is made by the first put (atomic_write_text creates it): a study that stops
        # before storing anything leaves no empty cache behind.
        self.root = Path(root)
        self.provenance = provenance
        self.hits = 0
        self.misses = 0
        self.sources: dict[str, int] = {}

    def path(self, key: dict) -> Path:
        return self.root / f"{key.get('kind', 'step')}-{key_id(key)}.json"

    def get(self, key: dict) -> Any | None:
        p = self.path(key)
        if not p.exists():
            return None
        try:
            stored = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None  # a damaged entry is recomputed
        if not isinstance(stored, dict) or "value" not in stored or stored.get("key") != canonical(key):
            return None
        self.hits += 1
        source = json.dumps(stored.get("provenance"), sort_keys=True)
        self.sources[source] = self.sources.get(source, 0) + 1
        return stored["value"]

    def put(self, key: dict, value: Any) -> Any:
        entry = {"key": key, "value": value, "provenance": self.provenance}
        atomic_write_text(self.path(key), json.dumps(entry, default=str, indent=1))
        self.misses += 1
        source = json.dumps(canonical(self.provenance), sort_keys=True)
        self.sources[source] = self.sources.get(source, 0) + 1
        return value
