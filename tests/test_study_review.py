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


def test_a_model_named_twice_is_refused(tmp_path, npz, capsys):
    """--model f1,f1 trained and measured f1 twice, the second results overwriting the first."""
    code = main(["study", "--data", npz, "--model", "f1,c1,f1", "--out", str(tmp_path / "s"), "--no-progress"])
    assert code == 2 and "models names 'f1' more than once" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_tables_are_the_stored_runs_mean_and_std(tmp_path, npz, api):
    """Each cell of Tables 2-4 is the mean ± sample std (ddof=1) over the seeds of the raw values
    results.json stores, each sharpness the paper's 100 (max f - f) / (1 + f); a sized f1 has the
    paper's F1 numbers beside its own (they were left out: only plain 'f1' matched)."""
    spec = "f1(width=16,depth=2)"
    cfg = _tiny(npz, models=(spec,), seeds=(0, 1, 2), eps=(1e-3, 5e-4), solvers=("pga",), sweep_models=(), curve_points=2)
    run_study(cfg, tmp_path / "s", progress=False, threads=1)
    saved = json.loads((tmp_path / "s" / "results.json").read_text(encoding="utf-8"))
    m, tables = saved["models"][spec], saved["summary"]["models"][spec]["tables"]

    def cell(values):
        v = np.asarray(values, dtype=np.float64)
        return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}"

    acc = {row["metric"]: row for row in tables["table2_accuracy"]}
    for split in ("train_acc", "test_acc"):
        for role in ("sb", "lb"):
            values = [100 * r[split] for r in m["runs"] if r["role"] == role]
            assert len(values) == 3 and acc[split][role] == cell(values)
    assert acc["test_acc"]["paper_sb"] == "98.03 ± 0.07" and acc["test_acc"]["paper_lb"] == "97.81 ± 0.07"
    for tname, space in (("table3_sharpness_full", "full"), ("table4_sharpness_subspace", "p=100")):
        assert [row["eps"] for row in tables[tname]] == [1e-3, 5e-4]
        for row in tables[tname]:
            for role in ("sb", "lb"):
                rows = [r for r in m["sharpness"] if (r["eps"], r["space"], r["role"]) == (row["eps"], space, role)]
                assert sorted(r["seed"] for r in rows) == [0, 1, 2]
                for r in rows:
                    assert r["value"] == pytest.approx(100 * (r["max_loss"] - r["loss"]) / (1 + r["loss"]), rel=1e-12)
                assert row[role] == cell([r["value"] for r in rows])
        assert tables[tname][0]["paper_lb"] == ("205.14 ± 69.52" if space == "full" else "9.22 ± 0.56")
    page = (tmp_path / "s" / "report.html").read_text(encoding="utf-8")
    assert f"{spec} ({m['num_params']} parameters)" in page and "parameters, {})" not in page


def test_a_data_file_named_another_way_resumes(tmp_path, npz, monkeypatch):
    """The training keys held --data as typed: the same file as toy.npz, ./toy.npz or by its
    absolute path (or the same relative name from another folder) trained every model again."""
    from sharpkit.study.store import key_id

    def run_ids(data: str) -> set[str]:
        study = pipeline.Study(_tiny(data, models=("f1",), seeds=(0,)), tmp_path / "study", progress=False)
        return {key_id(study.run_key("f1", role, 0)) for role in ("sb", "lb")}

    monkeypatch.chdir(tmp_path)
    ids = run_ids("toy.npz")
    assert run_ids("./toy.npz") == ids and run_ids(npz) == ids
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert run_ids("../toy.npz") == ids
    # A file of the same name with other content is other data.
    d = dict(np.load(npz))
    d["x_train"] = d["x_train"] * 2
    np.savez(tmp_path / "sub" / "toy.npz", **d)
    assert not run_ids("toy.npz") & ids


@pytest.mark.parametrize("flags", [["--warm-epochs", "1,50", "--epochs", "3"], ["--warm-epochs", "9", "--quick"]])
def test_warm_start_epochs_beyond_the_cap_are_refused(flags, tmp_path, capsys):
    """--warm-epochs 50 with --epochs 3 was dropped without a word: Fig. 5 had k = 0 alone and read
    'not measured'."""
    with pytest.raises(SystemExit) as exc:
        main(["study", "--out", str(tmp_path / "s"), *flags])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "exceeds the small batch's epoch cap" in err and err.count("\n") == 1
    assert not (tmp_path / "s").exists()


def test_a_seed_too_large_for_torch_is_refused_before_any_work(tmp_path, npz, capsys):
    """--seeds 0,20000000000000 trained seed 0 and then stopped with 'Overflow when unpacking long
    long' (the training order is drawn from seed * 1000003 + batch, beyond 2**64)."""
    out = tmp_path / "s"
    code = main(["study", "--data", npz, "--model", "f1", "--seeds", "0,20000000000000", "--out", str(out),
                 "--no-progress"])
    assert code == 2 and "seeds must be at most 4294967295" in capsys.readouterr().err
    assert not out.exists()
    assert pipeline.MAX_SEED * 1_000_003 + 10**9 < 2**64  # the largest derived seed, batches up to 1e9


DIVERGING_NET = """
from torch import nn
class Net(nn.Module):
    def __init__(self, d, k):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, k))
    def forward(self, x):  # logits beyond float32 while training: the loss is inf at the first step
        return self.body(x) * (1e38 if self.training else 1.0)
def make(input_shape, num_classes):
    return Net(input_shape[0], num_classes)
"""


def test_a_diverged_training_is_one_line_naming_the_run(tmp_path, npz, capsys, monkeypatch):
    """A training whose loss turned inf ended the command with a FloatingPointError traceback
    ('training diverged: loss inf at epoch 1', naming no training)."""
    (tmp_path / "divnet.py").write_text(DIVERGING_NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(["study", "--data", npz, "--model", "divnet:make", "--seeds", "1", "--epochs", "1", "--out",
                 str(tmp_path / "s"), "--no-progress", "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("sharpkit study: error: train divnet:make b=") and "seed=0" in err
    assert "training diverged: loss inf at epoch 1" in err
