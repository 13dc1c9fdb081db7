"""The single-measurement commands: sharpness, spectrum, landscape."""
import io
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import sharpkit as sk
from sharpkit.cli import main

FACTORY = '''
import torch.nn as nn
def make(input_shape, num_classes):
    return nn.Sequential(nn.Linear(input_shape[0], 8), nn.Tanh(), nn.Linear(8, num_classes))
def make_bn(input_shape, num_classes):
    return nn.Sequential(nn.Linear(input_shape[0], 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, num_classes))
def make7():
    return nn.Sequential(nn.Linear(7, 3))
def huge(input_shape, num_classes):  # outputs near 1e18: the loss overflows float32 inside a wide box
    model = nn.Linear(input_shape[0], num_classes)
    model.weight.data.fill_(1e17)
    return model
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
    rows = json.loads(out.read_text(encoding="utf-8"))["results"]
    model = ckpts[0][1].double()
    for row in rows:
        ref = sk.keskar_sharpness(model, nn.CrossEntropyLoss(), (x.double(), y), epsilon=row["epsilon"])
        assert row["value"] == pytest.approx(ref.value, rel=1e-6)
    assert rows[0]["value"] >= rows[1]["value"] >= 0


def _sharpness_json(setup, *options: str) -> dict:
    """``sharpkit sharpness`` on the first checkpoint in float64 with ``options``; its JSON output
    (the command must succeed)."""
    tmp, _, _, ckpts = setup
    out = tmp / "a.json"
    rc = main(["sharpness", "--model", "tiny_nets:make", "--checkpoint", str(ckpts[0][0]), "--data",
               str(tmp / "data.pt"), *options, "--dtype", "float64", "--out", str(out)])
    assert rc == 0
    return json.loads(out.read_text(encoding="utf-8"))


def test_sharpness_command_passes_the_apgd_start_options(setup):
    tmp, x, y, ckpts = setup
    result = _sharpness_json(setup, "--solver", "apgd", "--restarts", "2", "--first-step", "sign")
    assert (result["restarts"], result["first_step"]) == (2, "sign")
    model = ckpts[0][1].double()
    ref = sk.keskar_sharpness(model, nn.CrossEntropyLoss(), (x.double(), y), solver="apgd", restarts=2,
                              first_step="sign")
    assert result["results"][0]["value"] == pytest.approx(ref.value, rel=1e-9)
    assert result["results"][0]["num_evals"] == 1 + 10 + 10


@pytest.mark.parametrize("progress", [True, False])
def test_spectrum_shows_its_products_on_stderr(setup, capsys, progress):
    tmp, x, y, ckpts = setup
    out = tmp / "p.json"
    args = ["spectrum", "--model", "tiny_nets:make", "--checkpoint", str(ckpts[0][0]), "--data", str(tmp / "data.pt"),
            "--trace", "12", "--density", "1", "--out", str(out)]
    assert main(args + ([] if progress else ["--no-progress"])) == 0
    err = capsys.readouterr().err
    result = json.loads(out.read_text(encoding="utf-8"))
    if progress:
        assert "eigenvalues" in err and "trace" in err and "density" in err
        assert "12/12" in err  # the trace's bar counts its products against the budget
    else:
        assert "product" not in err
    assert result["trace"]["num_matvecs"] == 12


def test_spectrum_command_matches_explicit_hessian(setup):
    tmp, x, y, ckpts = setup
    out = tmp / "e.json"
    rc = main(["spectrum", "--model", "tiny_nets:make", "--checkpoint", str(ckpts[0][0]), "--data",
               str(tmp / "data.pt"), "--k", "2", "--tol", "1e-8", "--dtype", "float64", "--trace", "20",
               "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text(encoding="utf-8"))
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
    curve = json.loads(out.read_text(encoding="utf-8"))
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


def _bn_checkpoints(tmp):
    paths, models = [], []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
        model[1].running_mean.normal_()  # running statistics far from the batch's: eval != train
        model[1].running_var.uniform_(0.5, 2.0)
        paths.append(tmp / f"bn{seed}.pt")
        torch.save(model.state_dict(), paths[-1])
        models.append(model.double())
    return paths, models


def test_landscape_command_passes_bn_and_records_it(setup):
    tmp, x, y, _ = setup
    (a, b), (model_a, model_b) = _bn_checkpoints(tmp)
    base = ["landscape", "--model", "tiny_nets:make_bn", "--a", str(a), "--b", str(b), "--data",
            str(tmp / "data.pt"), "--points", "3", "--dtype", "float64", "--out", str(tmp / "l.json")]
    curves = {}
    for bn in ("train", "eval"):
        if bn == "eval":  # eval mode needs one set of running statistics: b takes a's
            model_b[1].load_state_dict(model_a[1].state_dict())
            torch.save(model_b.float().state_dict(), b)
            model_b.double()
        assert main(base + (["--bn", bn] if bn == "eval" else [])) == 0  # train is the default
        curves[bn] = json.loads((tmp / "l.json").read_text(encoding="utf-8"))
        ref = sk.interpolate(model_a, model_b, nn.CrossEntropyLoss(), (x.double(), y), [-1.0, 0.5, 2.0], bn=bn)
        assert curves[bn]["bn"] == bn
        assert curves[bn]["loss"] == pytest.approx(ref.loss.tolist(), rel=1e-9)
    assert curves["eval"]["loss"] != pytest.approx(curves["train"]["loss"], rel=1e-3)


def test_landscape_command_in_eval_mode_refuses_differing_running_statistics(setup, capsys):
    tmp, *_ = setup
    a, b = _bn_checkpoints(tmp)[0]
    argv = ["landscape", "--model", "tiny_nets:make_bn", "--a", str(a), "--b", str(b), "--data",
            str(tmp / "data.pt"), "--points", "3", "--bn", "eval", "--out", str(tmp / "l.json")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "sharpkit landscape: error:" in err and "running statistics" in err and "bn='train'" in err
    assert not (tmp / "l.json").exists()


def test_sharpness_command_runs_the_adaptive_solver_given(setup):
    tmp, x, y, ckpts = setup
    result = _sharpness_json(setup, "--kind", "adaptive-worst", "--solver", "pga", "--epsilon", "0.5")
    assert result["solver"] == "pga" and result["max_iter"] == 20  # the API's default for adaptive kinds
    model = ckpts[0][1].double()
    refs = {solver: sk.adaptive_sharpness(model, nn.CrossEntropyLoss(), (x.double(), y), rho=0.5,
                                          solver=solver).value for solver in ("pga", "apgd")}
    assert refs["pga"] != pytest.approx(refs["apgd"], rel=1e-6)  # the check below tells them apart
    assert result["results"][0]["value"] == pytest.approx(refs["pga"], rel=1e-9)


@pytest.mark.parametrize("kind, absent", [
    ("keskar", ("restarts", "first_step", "norm", "adaptive")),  # lbfgsb: one start at y = 0
    ("adaptive-average", ("solver", "restarts", "first_step", "subspace_dim")),  # random draws
])
def test_sharpness_json_records_only_the_options_used(setup, kind, absent):
    tmp, *_ = setup
    out = tmp / "s.json"
    assert main(["sharpness", "--model", "tiny_nets:make", "--data", str(tmp / "data.pt"), "--kind", kind,
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert not set(absent) & set(result)


@pytest.mark.parametrize("options, named", [
    (["--kind", "adaptive-worst", "--solver", "lbfgsb"], "--solver lbfgsb"),
    (["--solver", "lbfgsb", "--restarts", "3"], "--restarts"),
    (["--first-step", "sign"], "--first-step"),  # the default solver, lbfgsb, takes no first step
    (["--kind", "adaptive-average", "--solver", "pga"], "--solver"),
    (["--norm", "l2"], "--norm"),
    (["--kind", "adaptive-worst", "--subspace-dim", "3"], "--subspace-dim"),
    (["--kind", "adaptive-worst", "--norm", "l2", "--first-step", "sign"], "--first-step"),
])
def test_sharpness_options_the_measurement_would_ignore_are_usage_errors(setup, capsys, options, named):
    tmp, *_ = setup
    out = tmp / "s.json"
    rc = main(["sharpness", "--model", "tiny_nets:make", "--data", str(tmp / "data.pt"), "--out", str(out)] + options)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("sharpkit sharpness: error: " + named), err
    assert not out.exists()


@pytest.mark.parametrize("command, option, value", [
    ("sharpness", "--device", "foo"),
    pytest.param("sharpness", "--device", "cuda",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
    ("sharpness", "--batch-size", "0"),
    ("sharpness", "--out", "."),
    ("spectrum", "--trace", "-5"),
    ("spectrum", "--trace", "2"),
    ("spectrum", "--density", "-1"),
    ("spectrum", "--k", "0"),
    ("landscape", "--points", "-3"),
    ("landscape", "--plot", "."),
])
def test_bad_option_values_stop_at_parsing(setup, capsys, command, option, value):
    tmp, _, _, ckpts = setup
    args = [command, "--model", "tiny_nets:make", "--data", str(tmp / "data.pt"), option, value]
    if command == "landscape":
        args += ["--a", str(ckpts[0][0]), "--b", str(ckpts[1][0])]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert f"argument {option}:" in capsys.readouterr().err


def test_bad_data_or_model_is_one_line_and_exit_2(setup, capsys):
    tmp, x, y, _ = setup
    good = (tmp / "data.pt").read_bytes()
    (tmp / "cut.pt").write_bytes(good[: len(good) // 2])  # a truncated torch zip archive
    (tmp / "junk.pt").write_bytes(b"\x80\x02junk")  # not a pickle torch can read
    (tmp / "cut.npz").write_bytes(b"PK\x03\x04" + b"\0" * 20)  # a broken zip
    cases = [  # the arguments, and what the one line must say
        (["--model", "tiny_nets:make", "--data", str(tmp / "cut.pt")], str(tmp / "cut.pt")),
        (["--model", "tiny_nets:make", "--data", str(tmp / "junk.pt")], str(tmp / "junk.pt")),
        (["--model", "tiny_nets:make", "--data", str(tmp / "cut.npz")], str(tmp / "cut.npz")),
        (["--model", "tiny_nets:make7", "--data", str(tmp / "data.pt")], "model and data do not fit"),
        (["--model", "tiny_nets:make", "--data", str(tmp / "data.pt"), "--loss", "mse"], "model and data do not fit"),
    ]
    for command in ("sharpness", "spectrum"):
        for args, said in cases:
            assert main([command] + args) == 2, args
            err = capsys.readouterr().err
            assert err.startswith(f"sharpkit {command}: error: ") and said in err and err.count("\n") == 1, err


def test_unwritable_output_keeps_the_result(setup, capsys, monkeypatch):
    tmp, *_ = setup
    import sharpkit.files

    def fail(path, text):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(sharpkit.files, "atomic_write_text", fail)
    rc = main(["sharpness", "--model", "tiny_nets:make", "--data", str(tmp / "data.pt"), "--out", str(tmp / "s.json")])
    captured = capsys.readouterr()
    assert rc == 2 and "cannot write --out" in captured.err
    assert json.loads(captured.out)["results"][0]["value"] >= 0  # printed instead of lost


def test_a_type_error_inside_a_measurement_is_not_reported_as_bad_input(setup, monkeypatch):
    tmp, *_ = setup

    def broken(*args, **kwargs):
        raise TypeError("a bug deep inside the solver")

    monkeypatch.setattr(sk, "keskar_sharpness", broken)
    with pytest.raises(TypeError, match="a bug deep inside"):
        main(["sharpness", "--model", "tiny_nets:make", "--data", str(tmp / "data.pt")])


def test_closed_stdout_stops_quietly(monkeypatch):
    class ClosedPipe(io.TextIOBase):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["backends", "--json"]) == 1


def test_backends_into_a_closed_pipe_has_no_traceback():
    # The reader closes its end before the command (still importing torch) writes anything.
    proc = subprocess.Popen([sys.executable, "-m", "sharpkit", "backends", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def _strict_json(text: str):
    """``text`` parsed as strict JSON: NaN, Infinity and -Infinity are errors."""
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_outputs_are_strict_json_with_non_finite_numbers_as_null(setup, capsys):
    tmp, *_ = setup
    # Hutch++ with 3 products leaves one residual sample: no standard error.
    out = tmp / "s.json"
    assert main(["spectrum", "--model", "tiny_nets:make", "--data", str(tmp / "data.pt"), "--trace", "3",
                 "--no-progress", "--out", str(out)]) == 0
    trace = _strict_json(out.read_text(encoding="utf-8"))["trace"]
    assert trace["stderr"] is None and trace["num_matvecs"] == 3
    # The loss overflows inside the box: max_loss and value are inf.
    g = torch.Generator().manual_seed(0)
    torch.save({"x_train": torch.randn(20, 5, generator=g), "y_train": torch.randn(20, 3, generator=g)},
               tmp / "targets.pt")
    args = ["sharpness", "--model", "tiny_nets:huge", "--data", str(tmp / "targets.pt"), "--loss", "mse",
            "--epsilon", "100"]
    capsys.readouterr()
    assert main(args) == 0  # to stdout
    row = _strict_json(capsys.readouterr().out)["results"][0]
    assert row["value"] is None and row["max_loss"] is None and row["loss"] > 0
    assert row["nonfinite_evals"] >= 1  # the points left out of the maximum are counted in the results
    assert main(args + ["--out", str(out)]) == 0
    assert _strict_json(out.read_text(encoding="utf-8"))["results"][0]["max_loss"] is None
    # A measurement whose losses are all finite says so.
    assert main(args[:-1] + ["1e-3", "--out", str(out)]) == 0
    assert _strict_json(out.read_text(encoding="utf-8"))["results"][0]["nonfinite_evals"] == 0


def test_tensors_in_outputs_are_strict_json_too(capsys):
    import argparse

    from sharpkit.measure_cli import _emit

    _emit(argparse.Namespace(out=None), {"small": torch.tensor([float("nan"), 1.0]),
                                         "scalar": torch.tensor(float("inf")), "nested": {"x": [float("-inf"), 2.0]}})
    assert _strict_json(capsys.readouterr().out) == {"small": [None, 1.0], "scalar": None, "nested": {"x": [None, 2.0]}}


@pytest.mark.parametrize("operator", ["hessian", "ggn"])
def test_spectrum_of_non_finite_data_is_one_line_and_exit_2(setup, capsys, operator):
    tmp, x, y, _ = setup
    x = x.clone()
    x[3, 1] = float("nan")
    torch.save({"x_train": x, "y_train": y}, tmp / "nan.pt")
    for options in (["--k", "2"], ["--trace", "6"], ["--density", "2"]):
        rc = main(["spectrum", "--model", "tiny_nets:make", "--data", str(tmp / "nan.pt"), "--operator", operator,
                   "--no-progress", "--out", str(tmp / "s.json"), *options])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1, err
        assert err.startswith("sharpkit spectrum: error: the data's inputs hold NaN (batch 0"), err
        assert not (tmp / "s.json").exists()


@pytest.mark.parametrize("command", ["sharpness", "spectrum", "landscape"])
def test_negative_seed_stops_at_parsing(setup, capsys, monkeypatch, command):
    tmp, _, _, ckpts = setup
    import sharpkit.measure_cli as measure_cli

    def never(*args, **kwargs):
        raise AssertionError("the data were loaded before the seed was checked")

    monkeypatch.setattr(measure_cli, "resolve_data", never)
    args = [command, "--model", "tiny_nets:make", "--data", str(tmp / "data.pt"), "--seed", "-1"]
    if command == "landscape":
        args += ["--a", str(ckpts[0][0]), "--b", str(ckpts[1][0])]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert "argument --seed: must be a non-negative integer, got -1" in capsys.readouterr().err
