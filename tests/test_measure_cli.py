"""The single-measurement commands: sharpness, spectrum, landscape."""
import json

import pytest
import torch
from torch import nn

import sharpkit as sk
from sharpkit.cli import main

FACTORY = '''
import torch.nn as nn
def make(input_shape, num_classes):
    return nn.Sequential(nn.Linear(input_shape[0], 8), nn.Tanh(), nn.Linear(8, num_classes))
'''


@pytest.fixture
def setup(tmp_path, monkeypatch):
    (tmp_path / "tiny_nets.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=g)
    y = torch.randint(0, 3, (60,), generator=g)
    torch.save({"x_train": x, "y_train": y}, tmp_path / "data.pt")
    ckpts = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
        path = tmp_path / f"m{seed}.pt"
        torch.save(model.state_dict(), path)
        ckpts.append((path, model))
    return tmp_path, x, y, ckpts


def test_sharpness_command_matches_api(setup):
    tmp, x, y, ckpts = setup
    out = tmp / "s.json"
    rc = main(["sharpness", "--model", "tiny_nets:make", "--checkpoint", str(ckpts[0][0]), "--data",
               str(tmp / "data.pt"), "--epsilon", "1e-3", "5e-4", "--dtype", "float64", "--out", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["results"]
    model = ckpts[0][1].double()
    for row in rows:
        ref = sk.keskar_sharpness(model, nn.CrossEntropyLoss(), (x.double(), y), epsilon=row["epsilon"])
        assert row["value"] == pytest.approx(ref.value, rel=1e-6)
    assert rows[0]["value"] >= rows[1]["value"] >= 0


def test_sharpness_command_passes_the_apgd_start_options(setup):
    tmp, x, y, ckpts = setup
    out = tmp / "a.json"
    rc = main(["sharpness", "--model", "tiny_nets:make", "--checkpoint", str(ckpts[0][0]), "--data",
               str(tmp / "data.pt"), "--solver", "apgd", "--restarts", "2", "--first-step", "sign",
               "--dtype", "float64", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert (result["restarts"], result["first_step"]) == (2, "sign")
    model = ckpts[0][1].double()
    ref = sk.keskar_sharpness(model, nn.CrossEntropyLoss(), (x.double(), y), solver="apgd", restarts=2,
                              first_step="sign")
    assert result["results"][0]["value"] == pytest.approx(ref.value, rel=1e-9)
    assert result["results"][0]["num_evals"] == 1 + 10 + 10


def test_spectrum_command_matches_explicit_hessian(setup):
    tmp, x, y, ckpts = setup
    out = tmp / "e.json"
    rc = main(["spectrum", "--model", "tiny_nets:make", "--checkpoint", str(ckpts[0][0]), "--data",
               str(tmp / "data.pt"), "--k", "2", "--tol", "1e-8", "--dtype", "float64", "--trace", "20",
               "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    model = ckpts[0][1].double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = list(params)
    flat = torch.cat([v.reshape(-1) for v in params.values()])

    def loss(vec):
        views, i = {}, 0
        for k in names:
            n = params[k].numel()
            views[k] = vec[i : i + n].view_as(params[k])
            i += n
        return nn.functional.cross_entropy(torch.func.functional_call(model, views, (x.double(),)), y)

    evals = torch.linalg.eigvalsh(torch.func.hessian(loss)(flat)).flip(0)
    assert result["eigenvalues"] == pytest.approx(evals[:2].tolist(), rel=1e-6)
    assert abs(result["trace"]["value"] - float(evals.sum())) <= 4 * result["trace"]["stderr"] + 1e-9


def test_landscape_command_writes_curve_and_plot(setup):
    tmp, x, y, ckpts = setup
    out, png = tmp / "l.json", tmp / "l.png"
    rc = main(["landscape", "--model", "tiny_nets:make", "--a", str(ckpts[0][0]), "--b", str(ckpts[1][0]),
               "--data", str(tmp / "data.pt"), "--points", "5", "--dtype", "float64", "--out", str(out),
               "--plot", str(png)])
    assert rc == 0
    curve = json.loads(out.read_text())
    assert curve["alphas"] == pytest.approx([-1.0, -0.25, 0.5, 1.25, 2.0])
    a, b = ckpts[0][1].double(), ckpts[1][1].double()
    with torch.no_grad():
        mid = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        for pm, pa, pb in zip(mid.parameters(), a.parameters(), b.parameters()):
            pm.copy_(0.5 * pa + 0.5 * pb)
        ref = nn.functional.cross_entropy(mid(x.double()), y).item()
    assert curve["loss"][2] == pytest.approx(ref, rel=1e-9)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_exit_with_usage_error(setup, capsys):
    tmp, *_ = setup
    with pytest.raises(SystemExit) as exc:
        main(["sharpness", "--model", "tiny_nets:make", "--epsilon", "-1"])
    assert exc.value.code == 2
    assert "must be > 0" in capsys.readouterr().err


def test_bad_input_is_one_line_and_exit_2(setup, capsys):
    tmp, x, y, ckpts = setup
    base = ["sharpness", "--model", "tiny_nets:make", "--data", str(tmp / "data.pt")]
    with pytest.raises(SystemExit) as exc:
        main(base + ["--restarts", "0"])
    assert exc.value.code == 2 and "--restarts: must be a positive integer" in capsys.readouterr().err
    assert main(base + ["--subspace-dim", "100000"]) == 2
    assert "sharpkit sharpness: error: subspace_dim must be at most" in capsys.readouterr().err
    assert main(base + ["--checkpoint", str(tmp / "missing.pt")]) == 2
    assert "sharpkit sharpness: error:" in capsys.readouterr().err
    assert main(["spectrum", "--model", "tiny_nets:make", "--data", str(tmp / "nothing.npz")]) == 2
    assert "sharpkit spectrum: error:" in capsys.readouterr().err
