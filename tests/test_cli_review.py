"""The command line as a first-time user meets it: negative numbers in scientific notation, output
paths naming a folder, devices the study cannot use, the labels and bars the commands print, and
running out of memory."""
import json
import os
import re

import pytest
import torch
from torch import nn

import sharpkit as sk
from sharpkit.cli import build_parser, main

@pytest.fixture
def tiny(tmp_path, mlp_factory_module):
    mlp_factory_module("review_nets", hidden=4)
    g = torch.Generator().manual_seed(0)
    torch.save({"x_train": torch.randn(20, 3, generator=g), "y_train": torch.randint(0, 2, (20,), generator=g)},
               tmp_path / "data.pt")
    return tmp_path, ["--model", "review_nets:make", "--data", str(tmp_path / "data.pt")]


# ------------------------------------------------------------------ negative numbers


@pytest.mark.parametrize("argv, message", [
    (["sharpness", "--model", "f1", "--epsilon", "-1e-3"], "argument --epsilon: must be > 0 and finite, got -1e-3"),
    (["sharpness", "--model", "f1", "--epsilon", "1e-3", "-5E-4"], "must be > 0 and finite, got -5E-4"),
    (["sharpness", "--model", "f1", "--epsilon", "-inf"], "must be > 0 and finite, got -inf"),
    (["study", "--eps", "-1e-3,5e-4"], "--eps values must be positive"),
])
def test_negative_numbers_in_scientific_notation_reach_the_options_check(argv, message, capsys):
    # argparse before 3.13 took "-1e-3" for an option: "argument --epsilon: expected at least one argument"
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "expected" not in err.splitlines()[-1]


def test_negative_alpha_in_scientific_notation_is_a_value():
    args = build_parser().parse_args(["landscape", "--model", "f1", "--a", "a.pt", "--b", "b.pt",
                                      "--alpha-min", "-5e-1", "--alpha-max", "1.5E0"])
    assert args.alpha_min == -0.5 and args.alpha_max == 1.5


# ------------------------------------------------------------------ output paths


@pytest.mark.parametrize("name, message", [("new/", "expected a file path, not a folder"),
                                           ("", "empty path")])
def test_out_naming_a_folder_or_nothing_is_refused_before_measuring(tiny, name, message, capsys, monkeypatch):
    tmp, base = tiny
    monkeypatch.chdir(tmp)
    for option in (["sharpness", "--out"], ["landscape", "--a", "x.pt", "--b", "y.pt", "--plot"]):
        with pytest.raises(SystemExit) as exc:
            main([option[0], *base, *option[1:], name])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp / "new").exists()  # was written as a file named "new"


# ------------------------------------------------------------------ study devices


@pytest.mark.parametrize("device", ["meta", "mps", "xla"])
def test_study_refuses_a_device_this_machine_lacks_at_parsing(device, tmp_path, capsys):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has mps")
    out = tmp_path / "s"
    with pytest.raises(SystemExit) as exc:  # was a traceback once the data were moved (or at .item())
        main(["study", "--quick", "--device", device, "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"--device {device}" in err and "Traceback" not in err
    assert not out.exists()


def test_study_takes_cpu_with_an_index_as_cpu(tmp_path):
    from sharpkit.study.cli import config_from_args
    from sharpkit.study.pipeline import _device

    args = build_parser().parse_args(["study", "--device", "cpu:0", "--out", str(tmp_path / "s")])
    # torch.load's map_location refuses "cpu:0": the study (CLI or StudyConfig(device="cpu:0"))
    # failed when it reloaded a snapshot.
    device = _device(config_from_args(args).device)
    assert device == torch.device("cpu")
    torch.save({"w": torch.ones(2)}, tmp_path / "snap.pt")
    assert torch.load(tmp_path / "snap.pt", map_location=device, weights_only=True)["w"].sum() == 2


def test_study_verdicts_share_one_column(tmp_path, monkeypatch, capsys):
    import sharpkit.study.pipeline as pipeline
    import sharpkit.study.report as report

    verdicts = [{"verdict": "same direction (too few seeds to test)", "claim": "claim A"},
                {"verdict": "reproduced", "claim": "claim B"}]
    results = {"figures": [], "summary": {"models": {"f1": {"verdicts": verdicts}}}}
    monkeypatch.setattr(pipeline, "run_study", lambda *a, **k: results)
    monkeypatch.setattr(report, "measure_commands", lambda r: [])
    assert main(["study", "--quick", "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "claim" in line]
    assert len(lines) == 2 and lines[0].index("claim A") == lines[1].index("claim B")


# ------------------------------------------------------------------ what the commands print


def test_adaptive_sharpness_prints_rho_as_its_json_does(tiny, capsys):
    tmp, base = tiny
    out = tmp / "a.json"
    assert main(["sharpness", *base, "--kind", "adaptive-average", "--epsilon", "0.05", "--max-iter", "2",
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "adaptive-average rho=0.05:" in err and "eps=" not in err
    assert json.loads(out.read_text(encoding="utf-8"))["results"][0]["rho"] == 0.05


def test_density_progress_bar_has_a_total(tiny, capsys):
    tmp, base = tiny
    out = tmp / "d.json"
    assert main(["spectrum", *base, "--density", "2", "--out", str(out)]) == 0
    err = capsys.readouterr().err.replace("\r", "\n")
    n = sum(p.numel() for p in nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).parameters())  # 26 < 80 steps
    last = [line for line in err.splitlines() if line.startswith("density:")][-1]
    done = re.search(r" (\d+)/(\d+) ", last)  # (the bound 2n, or the products done where Lanczos broke down)
    assert "100%" in last and done and done[1] == done[2] and 0 < int(done[2]) <= 2 * n
    assert len(json.loads(out.read_text(encoding="utf-8"))["density"]["grid"]) > 0


# ------------------------------------------------------------------ out of memory


def test_out_of_memory_is_one_line_with_a_hint(tiny, capsys, monkeypatch):
    tmp, base = tiny

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore text")

    monkeypatch.setattr(sk, "keskar_sharpness", oom)
    assert main(["sharpness", *base]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "sharpkit sharpness: error: out of memory" in err and "--batch-size" in err
    assert os.path.exists(tmp / "data.pt")


@pytest.mark.parametrize("argv, message", [
    (["sharpness", "--epsilon", "-1"], "argument --epsilon: must be > 0"),
    (["audit"], "the following arguments are required"),
    (["nosuch"], "invalid choice: 'nosuch'"),
    (["study", "--seeds", "x"], "--seeds"),
])
def test_argument_errors_are_one_line(argv, message, capsys):
    """argparse printed its usage block (about 13 lines) before the error; every bad input is one
    line on stderr and exit status 2."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "--help" in err
    assert err.count("\n") == 1 and "usage:" not in err, err
