"""``sharpkit landscape`` (and ``spectrum``'s argument checks) against float64 references built by hand."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from sharpkit.cli import main

FACTORY = '''
import torch.nn as nn
def make(input_shape, num_classes):
    return nn.Sequential(nn.Linear(input_shape[0], 8), nn.Tanh(), nn.Linear(8, num_classes))
def make_bn(input_shape, num_classes):
    return nn.Sequential(nn.Linear(input_shape[0], 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, num_classes))
'''


def _make(bn=False):
    layers = [nn.Linear(5, 8)] + ([nn.BatchNorm1d(8)] if bn else []) + [nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    (tmp_path / "landscape_nets.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    g = torch.Generator().manual_seed(0)
    # Inputs exactly representable in float32: sharpkit.data reads file inputs as float32.
    x = torch.randn(60, 5, generator=g).double()
    y = torch.randint(0, 3, (60,), generator=g)
    torch.save({"x_train": x, "y_train": y}, tmp_path / "data.pt")
    models = {}
    for bn in (False, True):
        for seed in (1, 2):
            torch.manual_seed(seed)
            m = _make(bn)
            if bn:
                m[1].running_mean.normal_()
                m[1].running_var.uniform_(0.5, 2.0)
            torch.save(m.state_dict(), tmp_path / f"{'bn' if bn else 'm'}{seed}.pt")
            models[bn, seed] = m.double()
    return tmp_path, x, y, models


def _point(models, alpha, bn):
    """The network at (1 - alpha) x_a + alpha x_b, in float64, built by hand (buffers from a)."""
    a, b = models[bn, 1], models[bn, 2]
    m = _make(bn).double()
    m.load_state_dict(a.state_dict())
    with torch.no_grad():
        for pm, pa, pb in zip(m.parameters(), a.parameters(), b.parameters()):
            pm.copy_((1 - alpha) * pa + alpha * pb)
    return m


def _landscape(tmp, *options):
    out = tmp / "curve.json"
    rc = main(["landscape", "--a", str(tmp / "m1.pt"), "--b", str(tmp / "m2.pt"), "--data", str(tmp / "data.pt"),
               "--dtype", "float64", "--out", str(out), *options])
    return rc, out


def test_alphas_are_the_decimal_ones_asked_for(setup):
    tmp, x, y, models = setup
    rc, out = _landscape(tmp, "--model", "landscape_nets:make", "--alpha-min", "0", "--alpha-max", "1",
                         "--points", "11")
    assert rc == 0
    curve = json.loads(out.read_text(encoding="utf-8"))
    assert curve["alphas"] == np.linspace(0.0, 1.0, 11).tolist()  # 0.1, not float32's 0.10000000149
    for alpha, loss, acc in zip(curve["alphas"], curve["loss"], curve["accuracy"]):
        with torch.no_grad():
            logits = _point(models, alpha, False)(x)
        assert loss == pytest.approx(float(nn.functional.cross_entropy(logits, y)), rel=1e-13, abs=0)
        assert acc == float((logits.argmax(1) == y).double().mean())


def test_uneven_batches_are_sample_weighted_and_bn_uses_each_batch(setup):
    tmp, x, y, models = setup
    # 60 samples in batches of 13: the last has 8.  Without BatchNorm, batching changes nothing.
    rc, out = _landscape(tmp, "--model", "landscape_nets:make", "--points", "4", "--batch-size", "13")
    assert rc == 0
    curve = json.loads(out.read_text(encoding="utf-8"))
    for alpha, loss in zip(curve["alphas"], curve["loss"]):
        with torch.no_grad():
            ref = float(nn.functional.cross_entropy(_point(models, alpha, False)(x), y))
        assert loss == pytest.approx(ref, rel=1e-13, abs=0)
    # With BatchNorm (--bn train, the default) each batch of 13 (and the last of 8) uses its own statistics.
    out = tmp / "bn.json"
    assert main(["landscape", "--model", "landscape_nets:make_bn", "--a", str(tmp / "bn1.pt"), "--b",
                 str(tmp / "bn2.pt"), "--data", str(tmp / "data.pt"), "--dtype", "float64", "--points", "3",
                 "--batch-size", "13", "--out", str(out)]) == 0
    curve = json.loads(out.read_text(encoding="utf-8"))
    for alpha, loss, acc in zip(curve["alphas"], curve["loss"], curve["accuracy"]):
        m = _point(models, alpha, True)
        total, correct = 0.0, 0
        for s in range(0, 60, 13):
            xb, yb = x[s:s + 13], y[s:s + 13]
            h = m[0](xb)
            h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + m[1].eps) * m[1].weight + m[1].bias
            with torch.no_grad():
                logits = m[3](torch.tanh(h))
            total += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(1) == yb).sum())
        assert loss == pytest.approx(total / 60, rel=1e-12, abs=0)
        assert acc == pytest.approx(correct / 60, rel=0, abs=1e-15)


def test_non_finite_inputs_are_one_line_and_exit_2(setup, capsys):
    tmp, x, y, _ = setup
    x = x.clone()
    x[41, 3] = float("nan")
    torch.save({"x_train": x, "y_train": y}, tmp / "nan.pt")
    out = tmp / "curve.json"
    rc = main(["landscape", "--model", "landscape_nets:make", "--a", str(tmp / "m1.pt"), "--b", str(tmp / "m2.pt"),
               "--data", str(tmp / "nan.pt"), "--batch-size", "20", "--points", "3", "--no-progress",
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith("sharpkit landscape: error: the data's inputs hold NaN (batch 2"), err
    assert not out.exists()


def test_regression_curve_has_null_accuracy_and_still_plots(setup):
    tmp, x, _, models = setup
    g = torch.Generator().manual_seed(5)
    targets = torch.randn(60, 3, generator=g).double()  # (file targets are read as float32 too)
    torch.save({"x_train": x, "y_train": targets}, tmp / "reg.pt")
    out, png = tmp / "reg.json", tmp / "reg.png"
    rc = main(["landscape", "--model", "landscape_nets:make", "--a", str(tmp / "m1.pt"), "--b", str(tmp / "m2.pt"),
               "--data", str(tmp / "reg.pt"), "--loss", "mse", "--dtype", "float64", "--points", "3",
               "--out", str(out), "--plot", str(png)])
    assert rc == 0
    curve = json.loads(out.read_text(encoding="utf-8"))
    assert curve["accuracy"] is None
    with torch.no_grad():
        ref = float(nn.functional.mse_loss(_point(models, 0.5, False)(x), targets))
    assert curve["loss"][1] == pytest.approx(ref, rel=1e-13, abs=0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_spectrum_k_above_the_parameter_count_is_one_line(setup, capsys):
    tmp, *_ = setup
    out = tmp / "s.json"
    rc = main(["spectrum", "--model", "landscape_nets:make", "--data", str(tmp / "data.pt"), "--k", "1000",
               "--out", str(out)])  # the progress bar is on
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    n = 5 * 8 + 8 + 8 * 3 + 3
    assert err == f"sharpkit spectrum: error: --k 1000: the model has only {n} trainable parameters (eigenvalues)\n"
    assert not out.exists()


@pytest.mark.parametrize("command, phrases", [
    ("landscape", ["--alpha-min ALPHA_MIN", "(default -1)", "(default 2)", "sin(alpha pi/2) x_b",
                   "checkpoints then replace"]),
    ("spectrum", ["largest (LA, default)", "generalized Gauss-Newton"]),
    ("sharpness", ["random draws"]),
])
def test_help_describes_every_option(command, phrases, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for phrase in phrases:
        assert phrase in text, phrase
    assert ".pt/.pth file (keys x_train, y_train)" in text


def test_plot_format_follows_the_suffix(setup, capsys):
    tmp, *_ = setup
    base = ["--model", "landscape_nets:make", "--points", "2"]
    rc, _ = _landscape(tmp, *base, "--plot", str(tmp / "curve.pdf"))
    assert rc == 0 and (tmp / "curve.pdf").read_bytes()[:5] == b"%PDF-"  # not PNG bytes in a .pdf
    rc, _ = _landscape(tmp, *base, "--plot", str(tmp / "curve"))
    assert rc == 0 and (tmp / "curve").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp / "curve.json").unlink()
    capsys.readouterr()
    rc, out = _landscape(tmp, *base, "--plot", str(tmp / "curve.xyz"))
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"sharpkit landscape: error: --plot {tmp / 'curve.xyz'}: cannot write .xyz"), err
    assert not out.exists() and not (tmp / "curve.xyz").exists()


@pytest.mark.parametrize("progress", [True, False])
def test_landscape_shows_its_points_on_stderr(setup, capsys, progress):
    tmp, *_ = setup
    rc, out = _landscape(tmp, "--model", "landscape_nets:make", "--points", "5",
                         *([] if progress else ["--no-progress"]))
    err = capsys.readouterr().err
    assert rc == 0 and len(json.loads(out.read_text(encoding="utf-8"))["loss"]) == 5
    assert ("5/5" in err) == progress and ("point/s" in err) == progress, err
