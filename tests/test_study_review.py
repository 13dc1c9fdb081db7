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


class _Killed(Exception):
    """Stands for a SIGKILL: the training stops between two epochs' checkpoints."""


def _interrupt_training_at(monkeypatch, batch: int, epoch: int) -> None:
    """Make the tracked training at ``batch`` stop during ``epoch`` (after epoch - 1's checkpoint)."""
    real = pipeline.train

    def train(model, loss_fn, data, cfg, seed, device, checkpoint=None, on_epoch=None, **kw):
        def hook(e, m, entry):
            if cfg.batch_size == batch and e == epoch:
                raise _Killed
            return on_epoch(e, m, entry)

        return real(model, loss_fn, data, cfg, seed, device, checkpoint=checkpoint, on_epoch=hook, **kw)

    monkeypatch.setattr(pipeline, "train", train)


def test_resumed_tracking_is_the_uninterrupted_runs(tmp_path, npz, api, monkeypatch):
    """Fig. 6's top eigenvalues along training are warm-started from the previous epoch's vector,
    which the checkpoint did not hold: a training resumed after an interruption started its next
    estimate cold (here 5 products instead of 2, warm False; with the real Lanczos λ_max 7.0263
    against 7.0273 on a study's LB run), so its tracking differed from an uninterrupted run's."""
    cfg = _tiny(npz, models=("f1",), seeds=(0,), eps=(1e-3,), solvers=("pga",), warm_epochs=(1,))
    ref = run_study(cfg, tmp_path / "ref", progress=False, threads=1)["models"]["f1"]
    with monkeypatch.context() as patch:
        _interrupt_training_at(patch, batch=32, epoch=3)
        with pytest.raises(_Killed):
            run_study(cfg, tmp_path / "resumed", progress=False, threads=1)
    resumed = run_study(cfg, tmp_path / "resumed", progress=False, threads=1)
    lb = next(r for r in resumed["models"]["f1"]["runs"] if r["role"] == "lb")
    assert [h["epoch"] for h in lb["tracking"]] == [0, 1, 2, 3]
    run_dir = tmp_path / "resumed" / lb["checkpoint"].rsplit("/", 1)[0]
    import torch

    assert torch.load(run_dir / "final.pt", weights_only=False)["record"]["resumed_from_epoch"] == 2
    for name in ("runs", "sharpness", "curvature", "sweep", "warm_start", "noise_scale"):
        # (as JSON: epoch 0's train_loss is NaN, which equals nothing)
        got, want = (json.dumps(_no_seconds(m[name]), sort_keys=True) for m in (resumed["models"]["f1"], ref))
        assert got == want, name


def _no_seconds(obj):
    """``obj`` without its wall-clock timings (which no two runs share)."""
    if isinstance(obj, dict):
        return {k: _no_seconds(v) for k, v in obj.items() if k not in ("seconds", "train_seconds")}
    if isinstance(obj, list):
        return [_no_seconds(v) for v in obj]
    return obj
