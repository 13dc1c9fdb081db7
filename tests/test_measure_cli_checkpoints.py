"""Checkpoints read by the single-measurement commands: exact in float64, and a misfit explained."""
import json

import pytest
import torch
from torch import nn

from sharpkit.cli import main

@pytest.fixture
def setup(tmp_path, mlp_factory_module):
    mlp_factory_module("ckpt_nets", hidden=8)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=g)  # float32 inputs (a data file keeps its inputs' dtype)
    y = torch.randint(0, 3, (40,), generator=g)
    torch.save({"x_train": x, "y_train": y}, tmp_path / "data.pt")
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        with torch.no_grad():  # weights that float32 cannot hold
            for p in m.parameters():
                p.add_(1e-9 * torch.randn_like(p))
        torch.save(m.state_dict(), tmp_path / f"w{seed}.pt")
        models.append(m)
    return tmp_path, x.double(), y, models


def test_float64_checkpoints_are_measured_without_float32_rounding(setup):
    tmp, x, y, (a, b) = setup
    with torch.no_grad():
        refs = [float(nn.functional.cross_entropy(m(x), y)) for m in (a, b)]
    out = tmp / "curve.json"
    assert main(["landscape", "--model", "ckpt_nets:make", "--a", str(tmp / "w1.pt"), "--b", str(tmp / "w2.pt"),
                 "--data", str(tmp / "data.pt"), "--dtype", "float64", "--alpha-min", "0", "--alpha-max", "1",
                 "--points", "2", "--out", str(out)]) == 0
    assert json.loads(out.read_text(encoding="utf-8"))["loss"] == pytest.approx(refs, rel=1e-14, abs=0)
    assert main(["sharpness", "--model", "ckpt_nets:make", "--checkpoint", str(tmp / "w1.pt"), "--data",
                 str(tmp / "data.pt"), "--dtype", "float64", "--max-iter", "1", "--out", str(out)]) == 0
    assert json.loads(out.read_text(encoding="utf-8"))["results"][0]["loss"] == pytest.approx(refs[0], rel=1e-14, abs=0)


def test_a_checkpoint_for_other_classes_than_the_labels_says_so(setup, capsys):
    tmp, x, y, _ = setup
    torch.save({"x_train": x.float(), "y_train": y % 2}, tmp / "two.pt")  # labels 0 and 1 only
    rc = main(["landscape", "--model", "ckpt_nets:make", "--a", str(tmp / "w1.pt"), "--b", str(tmp / "w2.pt"),
               "--data", str(tmp / "two.pt")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert "mis-shaped keys: 2.weight (checkpoint (3, 8), model (2, 8))" in err
    assert err.rstrip().endswith("the model was built for 2 classes found in the data's labels"), err
