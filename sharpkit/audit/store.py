"""Durable audit results: one JSON object per line, appended atomically.

Each row is written with a single ``os.write`` of the whole line on a descriptor opened with
``O_APPEND``, then ``fsync``: a crash leaves either the complete line or a torn tail with no
newline.  Opening the store repairs such a tail (truncating the file to its last complete line),
so a killed run never leaves a torn line behind, and rows are keyed so that a re-run skips what
is done and never appends a duplicate.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

__all__ = ["ResultStore", "row_key"]


def row_key(identity: str, config: dict[str, Any]) -> str:
    """Key of a result row: the checkpoint's identity (content hash) and the metric configuration."""
    blob = json.dumps({"id": identity, "config": config}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class ResultStore:
    """An append-only JSONL file of result rows keyed by ``row["key"]``.

    Args:
        path: the ``.jsonl`` file (created with its parent folder when absent).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.repaired_bytes = self._repair()
        self._rows: dict[str, dict[str, Any]] = {}
        for row in self._read():
            self._rows.setdefault(row["key"], row)

    def _repair(self) -> int:
        """Drop a torn last line (no trailing newline, or not valid JSON); return bytes removed."""
        if not self.path.exists():
            return 0
        with open(self.path, "rb+") as fh:
            data = fh.read()
            keep = len(data)
            if data and not data.endswith(b"\n"):
                keep = data.rfind(b"\n") + 1
            # A complete last line that does not parse is as good as torn: drop it as well.
            while keep > 0:
                start = data.rfind(b"\n", 0, keep - 1) + 1
                try:
                    json.loads(data[start:keep])
                    break
                except ValueError:
                    keep = start
            if keep != len(data):
                fh.truncate(keep)
                fh.flush()
                os.fsync(fh.fileno())
        return len(data) - keep

    def _read(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with open(self.path, "r", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    raise ValueError(f"{self.path}:{lineno}: not a JSON line ({exc}); is this an audit results file?") from None
                if not isinstance(row, dict) or "key" not in row:
                    raise ValueError(f"{self.path}:{lineno}: row without a 'key'; is this an audit results file?")
                yield row

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
        """Append ``row`` durably unless its key is already stored; True when written."""
        key = row["key"]
        if key in self._rows:
            return False
        line = (json.dumps(row, sort_keys=True, allow_nan=True) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, line)
            if written != len(line):  # a short write on a full disk: undo what was written
                os.ftruncate(fd, os.fstat(fd).st_size - written)
                raise OSError(f"{self.path}: short write ({written} of {len(line)} bytes)")
            os.fsync(fd)
        finally:
            os.close(fd)
        self._rows[key] = row
        return True
