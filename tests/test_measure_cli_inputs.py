"""Data whose batches differ in sample shape: the model is probed on each shape before measuring."""
import json

import pytest
import torch

from sharpkit.cli import main

FACTORY = '''
import torch
import torch.nn as nn

def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(30, 5, generator=g), torch.randint(0, 3, (30,), generator=g)

def ragged():  # the second batch's samples are one feature short
    x, y = _data()
    return [(x[:15], y[:15]), (x[15:, :4], y[15:])]

def make(input_shape, num_classes):
    return nn.Sequential(nn.Linear(input_shape[0], 8), nn.Tanh(), nn.Linear(8, num_classes))

class Pool(nn.Module):  # takes any number of features
    def __init__(self, num_classes):
        super().__init__()
        self.lin = nn.Linear(1, num_classes)

    def forward(self, x):
        return self.lin(x.mean(1, keepdim=True))

def pool(input_shape, num_classes):
    return Pool(num_classes)
'''


@pytest.fixture
def tmp(tmp_path, monkeypatch):
    (tmp_path / "ragged_data.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    import sys

    sys.modules.pop("ragged_data", None)
    importlib.invalidate_caches()
    module = importlib.import_module("ragged_data")
    torch.manual_seed(0)
    for name in ("a", "b"):
        torch.save(module.make((5,), 3).state_dict(), tmp_path / f"{name}.pt")
    return tmp_path


@pytest.mark.parametrize("command", ["sharpness", "spectrum", "landscape"])
def test_a_later_batch_the_model_cannot_take_is_one_line_and_exit_2(tmp, capsys, command):
    extra = {"sharpness": ["--max-iter", "1"], "spectrum": ["--no-progress"],
             "landscape": ["--a", str(tmp / "a.pt"), "--b", str(tmp / "b.pt"), "--no-progress"]}[command]
    out = tmp / "r.json"
    rc = main([command, "--model", "ragged_data:make", "--data", "ragged_data:ragged", "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err  # one line, not a traceback from inside the measurement
    assert err.startswith(f"sharpkit {command}: error: model and data do not fit at batch 1 "), err
    assert "samples have shape (4,)" in err
    assert not out.exists()


def test_batches_of_different_widths_run_where_the_model_takes_them(tmp):
    out = tmp / "r.json"
    assert main(["sharpness", "--model", "ragged_data:pool", "--data", "ragged_data:ragged", "--max-iter", "1",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text(encoding="utf-8"))["results"][0]["loss"] > 0
