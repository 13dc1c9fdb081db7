"""Durable audit results: one JSON object per line, appended atomically.

Each row is written with a single ``os.write`` of the whole line on a descriptor opened with
``O_APPEND``, then ``fsync``: a crash leaves either the complete line or a torn tail with no
newline.  Opening the store drops such a tail (at most one line, which must look like the start of
a row and follow a complete row, or begin as the audit's rows do), so a killed run never leaves a
torn line behind; any other line that is not a row makes the store refuse the file instead of
"repairing" it, so that a mistyped ``--out`` (an HTML report, a CSV, a one-line JSON-like file) is
never truncated.  Rows are keyed so that a re-run skips what is done and never appends a
duplicate.  Non-finite numbers (NaN, inf) are written as ``null``: strict JSON, which jq and other
readers accept.

An open store holds an exclusive advisory lock (``flock``) on its file, so that a second audit on
the same file stops at once instead of measuring and appending every row again; where ``fcntl``
is missing (Windows) or the file system has no such locks, the store works without it.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent audits of one file go undetected
    fcntl = None

__all__ = ["ResultStore", "row_key", "json_safe", "check_output_file"]


def row_key(identity: str, config: dict[str, Any]) -> str:
    """Key of a result row: the checkpoint's identity (content hash) and the metric configuration."""
    blob = json.dumps({"id": identity, "config": config}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf), however nested, replaced by ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def check_output_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a file the audit can write, checked before any measuring starts.

    Raises ``ValueError`` (naming ``what``, e.g. ``"--report"``) when ``path`` is a directory, lies
    under a file, or cannot be written: the file is opened for appending (nothing written), or a
    file is made and removed in its nearest existing folder (permission bits alone do not tell:
    root passes them even in ``/proc`` or on a read-only file system).  Found after hours of
    measuring, such a mistake would lose the results.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path}: is a directory, not a file")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # the folder its parents would be made in
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{what} {path}: {folder} is not a directory")
    if not os.access(path if path.exists() else folder, os.W_OK):
        raise ValueError(f"{what} {path}: not writable (permission denied)")
    try:
        if path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_NONBLOCK", 0)))  # (a FIFO: no wait)
        else:
            tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        where = "" if path.exists() else f" in {folder}"
        raise ValueError(f"{what} {path}: cannot be written{where} ({exc.strerror or exc})") from None
    return path


# How an audit row begins (json.dumps with sorted keys: "checkpoint" sorts first, or the metric
# "adaptive" where a row has it): a torn tail that begins so is the store's own even when no
# complete row precedes it.
_ROW_PREFIXES = (b'{"adaptive": ', b'{"checkpoint": ')


def _row_start(tail: bytes) -> bool:
    """Whether ``tail`` begins as an audit row does (or is cut inside that beginning)."""
    return any(tail.startswith(p) or p.startswith(tail) for p in _ROW_PREFIXES)


# Descriptor flags of the store's file: appends only, no newline translation (Windows).
_APPEND_FLAGS = os.O_WRONLY | os.O_APPEND | getattr(os, "O_BINARY", 0)


class ResultStore:
    """An append-only JSONL file of result rows keyed by ``row["key"]``, locked while open.

    Args:
        path: the ``.jsonl`` file (created with its parent folder when absent; a file created
            here and left empty is removed again by :meth:`close`).

    The store holds an exclusive ``flock`` on the file until :meth:`close` (also as a context
    manager, or when garbage collected): a second store on the same file, in this process or
    another, is refused at once.

    Raises:
        ValueError: ``path`` cannot be written (:func:`check_output_file`), another store (another
            audit) holds it, or it holds a complete line that is not a result row, or a torn
            last line that is not one of the store's (the file is left untouched).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = check_output_file(path, "results file")
        self._fd: int | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd, self._created = self._open_locked()
        except OSError as exc:
            raise ValueError(f"results file {self.path}: cannot be written ({exc.strerror or exc})") from None
        self._rows: dict[str, dict[str, Any]] = {}
        try:
            self.repaired_bytes = self._load()
        except OSError as exc:
            self.close()
            raise ValueError(f"results file {self.path}: cannot be read ({exc.strerror or exc})") from None
        except BaseException:
            self.close()
            raise

    def _open_locked(self) -> tuple[int, bool]:
        """``(descriptor, created)``: the file opened for appending, with its exclusive lock held."""
        while True:
            try:
                fd, created = os.open(self.path, _APPEND_FLAGS | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                try:
                    fd, created = os.open(self.path, _APPEND_FLAGS), False
                except FileNotFoundError:  # removed in between: create it after all
                    continue
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        os.close(fd)
                        raise ValueError(
                            f"results file {self.path}: another audit is writing it (the file is locked); "
                            "wait for it to finish or write to another file"
                        ) from None
                    # Other errors (ENOLCK, EOPNOTSUPP): a file system without flock; go on unlocked.
            try:
                current = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                current = False
            if current:
                return fd, created
            # The store that held the lock removed the file it had created empty: open the new one.
            os.close(fd)

    def close(self) -> None:
        """Release the file and its lock; remove it if this store created it and it is still empty."""
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is None:
            return
        try:
            if self._created and os.fstat(fd).st_size == 0:
                os.unlink(self.path)  # while still locked: no other store has opened it meanwhile
        except OSError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # at interpreter exit the os module may be gone; the OS drops the lock anyway
            pass

    def _load(self) -> int:
        """Read every row; drop a torn tail; return the bytes dropped.

        Every line is checked before anything is truncated: a file that is not a results file
        raises and keeps every byte.  A torn tail is dropped only where it is the store's: after
        a complete row, or beginning as an audit row does (a crash in the file's first append).
        """
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline
        for lineno, line in enumerate(lines, 1):
            if line.strip():
                row = self._parse(line, lineno)
                self._rows.setdefault(row["key"], row)
        if not tail:
            return 0
        tail_lineno = len(lines) + 1
        try:
            json.loads(tail)
        except ValueError:
            # A torn append is the start of one of our rows ('{"...'), after one of our rows or
            # beginning as an audit row; anything else (a one-line file of the user's) is foreign.
            if not (tail.startswith(b'{"') and (self._rows or _row_start(tail))):
                raise ValueError(f"{self.path}:{tail_lineno}: not a JSON line; not an audit results file") from None
            os.ftruncate(self._fd, len(data) - len(tail))
            os.fsync(self._fd)
            return len(tail)
        # A whole row cut just before its newline: keep it, and end the line so appends stay apart.
        row = self._parse(tail, tail_lineno)
        self._rows.setdefault(row["key"], row)
        os.write(self._fd, b"\n")
        os.fsync(self._fd)
        return 0

    def _parse(self, line: bytes, lineno: int) -> dict[str, Any]:
        try:
            row = json.loads(line)
        except ValueError as exc:  # also UnicodeDecodeError: a binary file
            raise ValueError(f"{self.path}:{lineno}: not a JSON line ({exc}); not an audit results file") from None
        if not isinstance(row, dict) or "key" not in row:
            raise ValueError(f"{self.path}:{lineno}: row without a 'key'; not an audit results file")
        return row

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, key: str) -> dict[str, Any] | None:
        return self._rows.get(key)

    def rows(self) -> list[dict[str, Any]]:
        """All rows, in the order they were first written."""
        return list(self._rows.values())

    def append(self, row: dict[str, Any]) -> bool:
        """Append ``row`` durably unless its key is already stored; True when written.

        Non-finite floats are stored as ``null`` (see :func:`json_safe`).
        """
        key = row["key"]
        if key in self._rows:
            return False
        if self._fd is None:
            raise ValueError(f"results file {self.path}: the store is closed")
        row = json_safe(row)
        line = (json.dumps(row, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
        written = os.write(self._fd, line)
        if written != len(line):  # a short write on a full disk: undo what was written
            os.ftruncate(self._fd, os.fstat(self._fd).st_size - written)
            raise OSError(f"{self.path}: short write ({written} of {len(line)} bytes)")
        os.fsync(self._fd)
        self._rows[key] = row
        return True
