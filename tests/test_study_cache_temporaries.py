"""The study's folder after a killed run: the atomic writer's temporaries that a SIGKILL leaves
behind are removed by the next study in that folder, never while another live study may be
writing them, and never anything else."""
from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sharpkit.study.pipeline import run_study
from sharpkit.study.store import LOCK_NAME, remove_stale_temporaries

from test_study import _tiny, api, npz  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)

FILES_PY = Path(__file__).resolve().parents[1] / "sharpkit" / "files.py"
# A writer killed in the middle of sharpkit.files.atomic_write (loaded alone: no torch import).
KILLED_WRITER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("skfiles", sys.argv[1])
files = importlib.util.module_from_spec(spec)
spec.loader.exec_module(files)
def write(fh):
    fh.write(b"half of a result")
    fh.flush()
    print("writing", flush=True)
    time.sleep(60)
files.atomic_write(sys.argv[2], write)
"""


def _killed_writer(target: Path) -> Path:
    """The temporary that a writer of ``target`` killed with SIGKILL left next to it."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(FILES_PY), str(target)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"writing\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (tmp,) = [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.{proc.pid}.")]
    return tmp


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _small(npz):
    return _tiny(npz, models=("f1",), seeds=(0,), eps=(1e-3,), solvers=("pga",), sweep_models=(), curve_points=2)


def test_temporaries_of_a_killed_run_are_removed_by_the_next(tmp_path, npz, api):
    """A run killed while writing left .<name>.<pid>.<hex>.tmp files in DIR, DIR/cache and the run
    folders forever (3 here after one rerun, and one more per kill)."""
    out = tmp_path / "study"
    first = run_study(_small(npz), out, progress=False, threads=1)
    run_dir = out / first["models"]["f1"]["runs"][0]["checkpoint"].rsplit("/", 1)[0]
    entry = next((out / "cache").glob("eval-*.json"))
    left = [_killed_writer(out / "results.json"), _killed_writer(entry), _killed_writer(run_dir / "final.pt")]
    assert all(p.is_file() for p in left)
    mine = [out / ".notes.txt.1.tmp", run_dir / "keep.tmp"]  # not the writer's names: the user's
    for p in mine:
        p.write_text("the user's")
    again = run_study(_small(npz), out, progress=False, threads=1)
    assert not any(p.exists() for p in left)
    assert all(p.read_text(encoding="utf-8") == "the user's" for p in mine)
    assert again["stats"]["temporaries_removed"] == 3
    assert again["stats"]["trainings_run"] == 0 and again["stats"]["measurements_run"] == 0  # nothing mistaken
    same = ("key", "checkpoint", "train_loss", "test_acc", "dist_from_init")
    assert [{k: r[k] for k in same} for r in again["models"]["f1"]["runs"]] == [
        {k: r[k] for k in same} for r in first["models"]["f1"]["runs"]]


def test_temporaries_are_kept_while_another_study_holds_the_folder(tmp_path, npz, api):
    """Another live study holds DIR's lock: a temporary, even of a writer no longer running, is
    left alone until a study finds the folder to itself."""
    out = tmp_path / "study"
    run_study(_small(npz), out, progress=False, threads=1)
    tmp = out / "cache" / f".eval-0123456789abcdef.json.{_dead_pid()}.0123456789ab.tmp"
    tmp.write_text("{}")
    fd = os.open(out / LOCK_NAME, os.O_RDWR)  # another study: a lock of its own open file
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        held = run_study(_small(npz), out, progress=False, threads=1)
        assert tmp.exists() and held["stats"]["temporaries_removed"] == 0
    finally:
        os.close(fd)
    alone = run_study(_small(npz), out, progress=False, threads=1)
    assert not tmp.exists() and alone["stats"]["temporaries_removed"] == 1


def test_only_temporaries_of_writers_not_running_are_removed(tmp_path):
    runs = tmp_path / "runs" / "f1-b8-s0-0123456789abcdef"
    runs.mkdir(parents=True)
    dead, alive = _dead_pid(), os.getpid()
    stale = [tmp_path / f".report.html.{dead}.a1b2c3d4e5f6.tmp", runs / f".final.pt.{dead}.a1b2c3d4e5f6.tmp"]
    kept = [tmp_path / f".report.html.{alive}.a1b2c3d4e5f6.tmp",  # a writer of this process, in flight
            tmp_path / f".write-check-abc{dead}",  # the output check's probe (every rank makes one)
            tmp_path / f"report.html.{dead}.a1b2c3d4e5f6.tmp",  # not hidden: not the writer's
            tmp_path / f".report.html.{dead}.a1b2c3.tmp"]
    for p in stale + kept:
        p.write_text("x")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)
