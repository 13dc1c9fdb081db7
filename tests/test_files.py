"""Atomic writers: complete files or the old file, never a torn one, no temporary left behind."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sharpkit.files import atomic_save_npz, atomic_torch_save, atomic_write, atomic_write_text


def test_writers_round_trip(tmp_path):
    atomic_write_text(tmp_path / "a" / "b.txt", "ε-sharpness\n")
    assert (tmp_path / "a" / "b.txt").read_text(encoding="utf-8") == "ε-sharpness\n"
    atomic_torch_save({"w": torch.arange(3.0)}, tmp_path / "s.pt")
    assert torch.equal(torch.load(tmp_path / "s.pt", weights_only=True)["w"], torch.arange(3.0))
    atomic_save_npz(tmp_path / "d.npz", {"x": np.eye(2)})
    assert np.array_equal(np.load(tmp_path / "d.npz")["x"], np.eye(2))
    assert sorted(p.name for p in tmp_path.rglob("*") if p.name.startswith(".")) == []


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")

    def half_then_fail(fh):
        fh.write(b"new, half written")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_concurrent_writers_of_one_path_each_write_whole_files(tmp_path):
    # Threads share a pid (as processes on different nodes can): each writer needs its own
    # temporary file, or one truncates the other's and the result is torn.
    import threading

    path = tmp_path / "shared.bin"
    contents = {name: name.encode() * (64 << 10) for name in ("A", "BB", "CCC")}
    errors: list[BaseException] = []
    start = threading.Barrier(len(contents))

    def writer(data: bytes) -> None:
        def write(fh):
            start.wait()
            for i in range(0, len(data), 4096):
                fh.write(data[i:i + 4096])

        try:
            atomic_write(path, write)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    for _ in range(5):
        threads = [threading.Thread(target=writer, args=(d,)) for d in contents.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert path.read_bytes() in contents.values()
    assert [p.name for p in tmp_path.iterdir()] == ["shared.bin"]
