"""Data files and the MNIST-1D cache: precision kept, labels saved as floats and targets without a
sample dimension explained, a damaged cache generated again."""
import json

import numpy as np
import pytest
import torch
from torch import nn

import sharpkit as sk
from sharpkit.cli import main
from sharpkit.data import as_batches, load_tensor_file

@pytest.fixture
def files(tmp_path, mlp_factory_module):
    mlp_factory_module("data_nets", hidden=6)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 5, generator=g, dtype=torch.float64) * (1 + 1e-9)  # values float32 cannot hold
    y = torch.randint(0, 3, (30,), generator=g)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    return tmp_path, x, y, model


def test_floating_inputs_and_targets_keep_their_precision(tmp_path):
    x = torch.randn(8, 3, dtype=torch.float64)
    torch.save({"x_train": x, "y_train": x[:, 0].clone()}, tmp_path / "reg.pt")
    ds = load_tensor_file(tmp_path / "reg.pt")
    assert ds.x_train.dtype == torch.float64 and torch.equal(ds.x_train, x)
    assert ds.y_train.dtype == torch.float64 and ds.num_classes == 0  # regression targets, not rounded
    np.savez(tmp_path / "img.npz", x_train=np.arange(24, dtype=np.uint8).reshape(8, 3), y_train=np.arange(8) % 2)
    ds = load_tensor_file(tmp_path / "img.npz")
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64 and ds.num_classes == 2


def test_float64_data_file_is_measured_in_float64_without_rounding(files):
    tmp, x, y, model = files
    torch.save({"x_train": x, "y_train": y}, tmp / "d64.pt")
    with torch.no_grad():
        ref = float(nn.functional.cross_entropy(model(x), y))
    out = tmp / "curve.json"
    args = ["landscape", "--model", "data_nets:make", "--a", str(tmp / "w.pt"), "--b", str(tmp / "w.pt"),
            "--data", str(tmp / "d64.pt"), "--alpha-min", "0", "--alpha-max", "1", "--points", "2",
            "--out", str(out), "--no-progress"]
    assert main(args + ["--dtype", "float64"]) == 0
    assert json.loads(out.read_text(encoding="utf-8"))["loss"] == pytest.approx([ref, ref], rel=1e-14, abs=0)
    assert main(args) == 0  # the default float32 measurement casts the inputs
    assert json.loads(out.read_text(encoding="utf-8"))["loss"] == pytest.approx([ref, ref], rel=1e-5)


def test_study_rounds_a_float64_data_file_to_float32_once(tmp_path):
    from sharpkit.study.pipeline import Study, StudyConfig

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 40, generator=g, dtype=torch.float64), torch.randint(0, 3, (64,), generator=g)
    np.savez(tmp_path / "d64.npz", x_train=x.numpy(), y_train=y.numpy())
    np.savez(tmp_path / "d32.npz", x_train=x.float().numpy(), y_train=y.numpy())
    keys = []
    for name in ("d64.npz", "d32.npz"):
        config = StudyConfig(data=str(tmp_path / name), models=("f1",), f1_width=8, f1_depth=1, sb=4, lb=16,
                             seeds=(0,), max_epochs=1)
        study = Study(config, tmp_path / name.replace(".npz", ""), progress=False)
        assert study.ds.x_train.dtype == torch.float32 and study.ds.x_test.dtype == torch.float32
        keys.append(study.data_key["content"])
    assert keys[0] == keys[1]  # the trainings of a float64 file are those of its float32 rounding, as before


def test_class_labels_saved_as_floats_are_explained(files, capsys):
    tmp, x, y, _ = files
    torch.save({"x_train": x.float(), "y_train": y.double()}, tmp / "yfloat.pt")
    for model in ("data_nets:make", "f1(width=8,depth=1)"):  # the second is sized by the targets
        rc = main(["landscape", "--model", model, "--a", str(tmp / "w.pt"), "--b", str(tmp / "w.pt"),
                   "--data", str(tmp / "yfloat.pt"), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1, err
        assert "the targets are float64 with one value per sample: cross-entropy takes class labels as integers" in err
        assert "mis-shaped" not in err
    # The same targets are fine for a regression loss.
    rc = main(["sharpness", "--model", "data_nets:make", "--data", str(tmp / "yfloat.pt"), "--loss", "mse",
               "--max-iter", "1", "--out", str(tmp / "s.json")])
    assert rc == 2 and "mis-shaped" not in capsys.readouterr().err  # the 3-output model meets 1-wide targets
    with pytest.raises(ValueError, match="cross-entropy takes class labels as integers"):
        sk.audit([tmp / "w.pt"], model=lambda: nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)),
                 data=(x.float(), y.double()), metrics=("trace",), out=tmp / "a.jsonl")


def test_targets_without_a_sample_dimension_are_named(files, capsys):
    tmp, x, y, _ = files
    torch.save({"x_train": x[0], "y_train": y[0]}, tmp / "one.pt")
    with pytest.raises(ValueError, match=r"need a first \(sample\) dimension, got shapes \(5,\) and \(\)"):
        load_tensor_file(tmp / "one.pt")
    rc = main(["landscape", "--model", "data_nets:make", "--a", str(tmp / "w.pt"), "--b", str(tmp / "w.pt"),
               "--data", str(tmp / "one.pt"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "need a first (sample) dimension" in err and "IndexError" not in err, err
    with pytest.raises(ValueError, match="need a first"):
        as_batches((x[0], y[0]))
    with pytest.raises(ValueError, match="batch 1: inputs and targets need a first"):
        sk.hessian(nn.Linear(5, 3), nn.CrossEntropyLoss(), [(x[:4].float(), y[:4]), (x[4].float(), y[4])])


def test_a_damaged_mnist1d_cache_is_generated_again(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARPKIT_CACHE", str(tmp_path))
    first = sk.load_mnist1d(num_samples=50)
    (path,) = tmp_path.glob("mnist1d-*.npz")
    path.write_bytes(path.read_bytes()[:300])  # truncated: not a zip any more
    with pytest.warns(UserWarning, match="unreadable"):
        again = sk.load_mnist1d(num_samples=50)
    assert torch.equal(again.x_train, first.x_train) and torch.equal(again.y_test, first.y_test)
    np.load(path).close()  # rewritten whole
