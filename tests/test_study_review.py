"""The study driver as a demanding user runs it: failed runs leave nothing behind, resumes and
re-runs give the same tables, and the report's numbers are the stored raw results'."""
from __future__ import annotations

import errno
import json

import numpy as np
import pytest

from sharpkit.cli import main
from sharpkit.study import pipeline
from sharpkit.study.pipeline import run_study

from test_study import _tiny, api, npz  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)


@pytest.mark.parametrize("case", ["missing", "damaged", "nan", "model"])
def test_a_study_that_cannot_start_creates_nothing(case, tmp_path, npz, capsys, monkeypatch):
    """A bad --data (missing, unreadable, unusable) or a model that does not run stopped the study
    with exit 2 but left DIR/cache behind, an empty folder, in a DIR that did not exist before."""
    data, model = npz, "f1"
    if case == "missing":
        data = str(tmp_path / "none.npz")
    elif case == "damaged":
        data = str(tmp_path / "bad.npz")
        (tmp_path / "bad.npz").write_bytes(b"not an npz file")
    elif case == "nan":
        d = dict(np.load(npz))
        d["x_train"][3, 0] = np.nan
        data = str(tmp_path / "nan.npz")
        np.savez(data, **d)
    else:
        (tmp_path / "wrongnet.py").write_text(
            "from torch import nn\ndef make(input_shape, num_classes):\n    return nn.Linear(5, num_classes)\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        model = "wrongnet:make"
    out = tmp_path / "new" / "study"
    code = main(["study", "--data", data, "--model", model, "--out", str(out), "--no-progress", "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("sharpkit study: error: ")
    assert not (tmp_path / "new").exists()
    # An existing DIR (a finished study's, say) gets no empty cache folder either.
    existing = tmp_path / "existing"
    existing.mkdir()
    assert main(["study", "--data", data, "--model", model, "--out", str(existing), "--no-progress"]) == 2
    assert list(existing.iterdir()) == []


def test_unwritable_output_removes_the_folders_it_made(tmp_path, npz, monkeypatch):
    """The write check runs after the folders are made; when it fails they go again (root ignores
    permissions here, so the failure is simulated)."""
    def refuse(*args, **kwargs):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(pipeline.tempfile, "mkstemp", refuse)
    with pytest.raises(ValueError, match=r"cannot be written \(Permission denied\)"):
        run_study(_tiny(npz, models=("f1",), seeds=(0,)), tmp_path / "a" / "b", progress=False, threads=1)
    assert not (tmp_path / "a").exists()
