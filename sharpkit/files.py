"""Atomic file writes: the one place sharpkit writes a result file.

Every writer goes through :func:`atomic_write`: the content goes to a temporary file in the same
folder, is flushed and fsynced, then ``os.replace``-d over the target, so a reader (or a re-run after
a crash) sees either the old file or the complete new one, never a torn one.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import IO, Any, Callable

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_torch_save", "atomic_save_npz"]


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(fh)`` on a temporary binary file next to ``path``, fsync it and move it over
    ``path`` (parent folders are created).  On error the temporary file is removed and ``path`` is
    left as it was.  Returns ``path`` as a :class:`~pathlib.Path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own for each writer ("x": created here or an error), not just the pid: threads
    # share a pid, and so can processes on different nodes writing to a shared folder.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    try:
        with open(tmp, "xb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def _fsync_directory(folder: Path) -> None:
    """Make the rename itself durable (where the platform lets a directory be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically."""
    import torch

    return atomic_write(path, lambda fh: torch.save(obj, fh))


def atomic_save_npz(path: str | os.PathLike, arrays: dict[str, Any]) -> Path:
    """``numpy.savez(**arrays)`` to ``path`` atomically (``path`` is used as given, no ``.npz`` added)."""
    import numpy as np

    return atomic_write(path, lambda fh: np.savez(fh, **arrays))
