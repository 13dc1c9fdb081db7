import base64
import csv
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import sharpkit
from sharpkit.cli import main
from sharpkit.objective import Objective
from sharpkit.params import measurement_mode
from sharpkit.study import build_model
from sharpkit.study.pipeline import StudyConfig, run_study
from sharpkit.study.report import paired_test

PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)


@pytest.fixture
def npz(tmp_path):
    """A small separable 3-class problem with 12 features, as a user's .npz file."""
    g = np.random.default_rng(0)
    w = g.normal(size=(12, 3))
    x = g.normal(size=(200, 12)).astype(np.float32)
    y = (x @ w + 0.3 * g.normal(size=(200, 3))).argmax(1)
    path = tmp_path / "toy.npz"
    np.savez(path, x_train=x[:160], y_train=y[:160], x_test=x[160:], y_test=y[160:])
    return str(path)


class FakeAPI:
    """Stand-ins for the measurement API with the promised signatures (cheap, deterministic);
    they record calls so the tests can check what the study asked for."""

    def __init__(self):
        self.calls = []

    def _grad(self, model, loss_fn, data, bn):
        with measurement_mode(model, bn):
            obj = Objective(model, loss_fn, data)
            x = obj.x0()
            f, g = obj.loss_and_grad(x)
            return obj, x, float(f), g

    def keskar_sharpness(self, model, loss_fn, data, epsilon=1e-3, subspace_dim=None, solver="lbfgsb",
                         max_iter=10, seed=0, bn="eval"):
        self.calls.append(("keskar", solver, subspace_dim))
        with measurement_mode(model, bn):
            obj = Objective(model, loss_fn, data)
            x = obj.x0()
            f, g = obj.loss_and_grad(x)
            y = epsilon * (x.abs() + 1) * g.sign()
            f1 = float(obj.loss(x + y))
        f = float(f)
        return SimpleNamespace(value=100 * (f1 - f) / (1 + f), loss=f, max_loss=f1, num_evals=2)

    def hessian(self, model, loss_fn, data, bn="eval"):
        return SimpleNamespace(model=model, loss_fn=loss_fn, data=data, bn=bn)

    def eigenvalues(self, H, k=1, tol=1e-3, seed=0, v0=None):
        self.calls.append(("eig", v0 is not None))
        _, _, _, g = self._grad(H.model, H.loss_fn, H.data, H.bn)
        return SimpleNamespace(values=torch.tensor([float(g.norm())]), vectors=(g / g.norm()).reshape(-1, 1),
                               num_matvecs=2 if v0 is not None else 5)

    def trace(self, H, method="hutch++", num_matvecs=100, seed=0):
        _, _, _, g = self._grad(H.model, H.loss_fn, H.data, H.bn)
        return SimpleNamespace(value=float(g.pow(2).sum()), stderr=0.0, num_matvecs=num_matvecs)


@pytest.fixture
def api(monkeypatch):
    fake = FakeAPI()
    for name in ("keskar_sharpness", "hessian", "eigenvalues", "trace"):
        monkeypatch.setattr(sharpkit, name, getattr(fake, name), raising=False)
    return fake


def _tiny(npz, **over):
    base = dict(data=npz, models=("f1", "c1"), f1_width=16, f1_depth=2, c1_channels=4, c1_hidden=(8,),
                sb=8, lb=32, seeds=(0, 1, 2), max_epochs=3, patience=2, sharpness_samples=64,
                curvature_samples=64, warm_epochs=(0, 1, 2), track_every=1, curve_points=5, lb_epochs_factor=1.0)
    base.update(over)
    return StudyConfig(**base)


def test_quick_pipeline_end_to_end(tmp_path, npz, api):
    out = tmp_path / "study"
    results = run_study(_tiny(npz), out, progress=False, threads=1)
    # results.json: every number, config, environment, seeds
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert data["config"]["seeds"] == [0, 1, 2]
    assert data["environment"]["torch"] == torch.__version__ and data["environment"]["device"] == "cpu"
    assert data["resolved"]["sb"] == 8 and data["resolved"]["lb"] == 32
    f1 = data["models"]["f1"]
    assert len(f1["runs"]) == 6 and {r["role"] for r in f1["runs"]} == {"sb", "lb"}
    # 2 eps x 2 solvers x 2 spaces x 6 minimizers
    assert len(f1["sharpness"]) == 48
    assert [r["batch"] for r in f1["sweep"]] == [8, 16, 32]
    assert [r["k"] for r in f1["warm_start"]] == [0, 1, 2]
    # Each run's model.json tells the trainings of one batch and seed apart: LB, and the warm starts
    # from the SB run's epoch-k weights.
    infos = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(out.glob("runs/f1-b32-s0-*/model.json"))]
    starts = sorted((i["training"]["warm_start"] or {"epoch": 0})["epoch"] for i in infos)
    assert starts == [0, 1, 2] and all(i["training"]["batch"] == 32 and i["training"]["seed"] == 0 for i in infos)
    sb_run = [i for i in infos if i["training"]["warm_start"]][0]["training"]["warm_start"]["run"]
    assert sb_run.startswith("f1-b8-s0-") and (out / "runs" / sb_run / "epoch1.pt").exists()
    assert "sweep" not in data["models"]["c1"]  # extras only for the first model by default
    assert {n["epoch"] for n in f1["noise_scale"]} >= {0, "final"}
    assert f1["curves"]["sin"]["test"]["alphas"] == [-1.0, -0.25, 0.0, 0.5, 1.0, 1.25, 2.0]  # 5 points, 0 and 1
    track = [r for r in f1["runs"] if r["seed"] == 0 and r["role"] == "lb"][0]["tracking"]
    epochs = [h["epoch"] for h in track]
    assert epochs[0] == 0 and epochs == sorted(set(epochs)) and len(epochs) >= 3 and track[-1]["lambda_max"] > 0
    assert any(warm for kind, warm in api.calls if kind == "eig")  # Lanczos warm-started along training
    verdicts = data["summary"]["models"]["f1"]["verdicts"]
    assert any("Generalization gap" in v["claim"] for v in verdicts)
    assert all(v["verdict"] for v in verdicts)
    assert results["summary"]["models"].keys() == {"f1", "c1"}
    # CSV tables parse and hold the rows
    with open(out / "sharpness.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 48 * 2 and float(rows[0]["value"]) == pytest.approx(f1["sharpness"][0]["value"])
    for name in ("table2_accuracy_f1.csv", "table3_sharpness_full_c1.csv", "verdicts.csv", "sweep.csv", "runs.csv"):
        with open(out / name, encoding="utf-8") as fh:
            assert len(list(csv.DictReader(fh))) > 0, name
    # PNG figures and a self-contained HTML report embedding them
    pngs = sorted(p.name for p in out.glob("fig_*.png"))
    assert len(f1["slices"]["lb"]["loss"]) == 5
    assert {"fig_slice_c1.png", "fig_interp_linear_f1.png", "fig_sweep_f1.png", "fig_warm_f1.png", "fig_tracking_f1.png",
            "fig_sharpness_c1.png"} <= set(pngs)
    assert all((out / p).read_bytes().startswith(PNG) for p in pngs)
    page = (out / "report.html").read_text(encoding="utf-8")
    embedded = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(embedded) == len(pngs)
    assert all(base64.b64decode(e).startswith(PNG) for e in embedded)
    assert "Table 3" in page and "205.14" in page  # paper numbers side by side
    assert not list(out.rglob(".*.tmp*"))  # atomic writes leave no temporaries


def test_resume_skips_finished_work(tmp_path, npz, api):
    out = tmp_path / "study"
    cfg = _tiny(npz, models=("f1",), seeds=(0, 1), eps=(1e-3,), solvers=("apgd",))
    first = run_study(cfg, out, progress=False, threads=1)["stats"]
    # 2 seeds x (SB, LB) + the sweep's middle batch + 2 warm starts
    assert first["trainings_run"] == 7 and first["measurements_run"] > 0
    api.calls.clear()
    again = run_study(cfg, out, progress=False, threads=1)
    assert again["stats"]["trainings_run"] == 0 and again["stats"]["trainings_reused"] >= 7
    assert again["stats"]["measurements_run"] == 0 and api.calls == []
    # An interrupted training (checkpoint written, no final weights) resumes from its last epoch.
    run_dir = next(p for p in (out / "runs").iterdir() if p.name.startswith("f1-b32-s1-"))
    (run_dir / "final.pt").unlink()
    third = run_study(cfg, out, progress=False, threads=1)
    assert third["stats"]["trainings_run"] == 1 and third["stats"]["measurements_run"] == 0
    ckpt = torch.load(run_dir / "final.pt", weights_only=False)
    assert ckpt["record"]["resumed_from_epoch"] == ckpt["record"]["epochs"]
    # More seeds reuse the finished ones.
    more = run_study(_tiny(npz, models=("f1",), seeds=(0, 1, 2), eps=(1e-3,), solvers=("apgd",)), out, progress=False, threads=1)
    assert more["stats"]["trainings_run"] == 2


def test_training_runs_on_one_thread_whatever_the_setting(tmp_path, npz, api, monkeypatch):
    """Trained models must not depend on --threads or on the machine's load (which picks it)."""
    from sharpkit.study import pipeline

    seen = []
    real_train = pipeline.train

    def recording_train(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_train(*args, **kwargs)

    monkeypatch.setattr(pipeline, "train", recording_train)
    cfg = _tiny(npz, models=("f1",), seeds=(0,), eps=(1e-3,), solvers=("apgd",))
    results = run_study(cfg, tmp_path / "study", progress=False, threads=2)
    assert seen and set(seen) == {pipeline.TRAINING_THREADS}
    assert torch.get_num_threads() == 2  # the measurements keep the study's setting
    assert results["environment"]["training_threads"] == pipeline.TRAINING_THREADS


def test_epoch_cap_scales_with_batch(tmp_path, npz):
    from sharpkit.study.pipeline import Study

    study = Study(_tiny(npz, max_epochs=10, lb_epochs_factor=4.0), tmp_path / "s", progress=False)
    assert [study.epoch_cap(b) for b in (8, 16, 32)] == [10, 20, 40]
    key = study.train_key("f1", 32, 0, track=True)
    assert key["max_epochs"] == 40 and key["track"]["every"] == 4
    # The study's run keys: the first seed tracked, its SB run (first model) with warm-start snapshots.
    first_sb, later_lb = study.run_key("f1", "sb", study.config.seeds[0]), study.run_key("f1", "lb", study.config.seeds[-1])
    assert first_sb["track"] is not None and first_sb["snapshots"] and first_sb["batch"] == study.sb
    assert later_lb["track"] is None and not later_lb["snapshots"] and later_lb["batch"] == study.lb
    with pytest.raises(ValueError, match="role"):
        study.run_key("f1", "large", 0)


def test_training_resume_is_exact(tmp_path, npz):
    from sharpkit.data import load_tensor_file
    from sharpkit.study.train import TrainConfig, train

    ds = load_tensor_file(npz)
    loss_fn = nn.CrossEntropyLoss()
    straight = build_model("c1", (12,), 3, seed=0, channels=4, hidden=(8,))
    r = train(straight, loss_fn, ds.train, TrainConfig(8, max_epochs=4, patience=10), seed=0)
    assert r.epochs == 4 and r.stopped == "cap"
    part = build_model("c1", (12,), 3, seed=0, channels=4, hidden=(8,))
    train(part, loss_fn, ds.train, TrainConfig(8, max_epochs=2, patience=10), seed=0, checkpoint=tmp_path / "c.pt")
    resumed = build_model("c1", (12,), 3, seed=0, channels=4, hidden=(8,))
    r2 = train(resumed, loss_fn, ds.train, TrainConfig(8, max_epochs=4, patience=10), seed=0, checkpoint=tmp_path / "c.pt")
    assert r2.resumed_from == 2 and r2.epochs == 4
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert [h["train_loss"] for h in r.history[1:]] == [h["train_loss"] for h in r2.history[1:]]


def test_models_and_factories(tmp_path, monkeypatch):
    f1 = build_model("f1", (40,), 10, seed=0, width=32, depth=5)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in f1.modules()) == 5
    c1 = build_model("c1", (40,), 10, seed=0, channels=8)
    assert c1.eval()(torch.randn(3, 40)).shape == (3, 10)
    assert c1(torch.randn(3, 2, 40)[:, :1].reshape(3, 40)).shape == (3, 10)
    assert torch.equal(build_model("f1", (4,), 3, seed=1, width=8)[1].weight, build_model("f1", (4,), 3, seed=1, width=8)[1].weight)
    (tmp_path / "mynets.py").write_text(
        "import torch.nn as nn\n"
        "def net(input_shape, num_classes):\n    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], num_classes))\n"
        "def bare():\n    return nn.Linear(4, 3)\n"
        "def wrong(a, b):\n    return 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert build_model("mynets:net", (6,), 4, seed=0)(torch.randn(2, 6)).shape == (2, 4)
    assert isinstance(build_model("mynets:bare", (4,), 3, seed=0), nn.Linear)
    with pytest.raises(TypeError, match="expected torch.nn.Module"):
        build_model("mynets:wrong", (4,), 3, seed=0)
    with pytest.raises(ValueError, match="no callable"):
        build_model("mynets:missing", (4,), 3, seed=0)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet", (4,), 3, seed=0)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("f1", (4,), 1, seed=0)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--sb", "0"], "--sb must be >= 2"),
        (["--sb", "64", "--lb", "32"], "must be smaller than --lb"),
        (["--solvers", "newton"], "--solvers must be chosen from"),
        (["--eps=-1e-3"], "--eps values must be positive"),
        (["--eps", "0,1e-3"], "--eps values must be positive"),
        (["--eps", "abc"], "--eps must be comma-separated numbers"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--seeds", "1,1"], "distinct"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
        (["--sweep", "1,64"], "--sweep batch sizes must be >= 2"),
        (["--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_bad_flags_exit_2(flags, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["study", "--out", str(tmp_path / "x"), *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_data_exits_2(capsys, tmp_path):
    assert main(["study", "--data", "imagenet", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "unknown data set 'imagenet'" in capsys.readouterr().err
    assert main(["study", "--data", str(tmp_path / "none.npz"), "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_runs_a_user_setting(capsys, tmp_path, npz, api):
    out = tmp_path / "cli"
    code = main(["study", "--data", npz, "--model", "f1", "--sb", "8", "--lb", "32", "--seeds", "0,5", "--epochs", "1",
                 "--eps", "1e-3", "--solvers", "pga", "--sweep", "8,32", "--warm-epochs", "1", "--out", str(out),
                 "--no-progress", "--threads", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "report.html" in printed and "[f1]" in printed
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert data["config"]["seeds"] == [0, 5] and data["config"]["solvers"] == ["pga"]
    assert {r["solver"] for r in data["models"]["f1"]["sharpness"]} == {"pga"}


def test_paired_test_matches_scipy():
    from scipy import stats

    sb = [1.0, 1.4, 0.9, 1.2, 1.1]
    lb = [3.0, 2.1, 2.9, 4.2, 2.0]
    r = paired_test(sb, lb, lb_greater=True, log=True)
    ref = stats.ttest_rel(np.log(lb), np.log(sb), alternative="greater")
    assert r["t"] == pytest.approx(ref.statistic) and r["p"] == pytest.approx(ref.pvalue)
    assert r["verdict"] == "reproduced"
    assert r["ratio_geomean"] == pytest.approx(np.exp(np.mean(np.log(np.array(lb) / np.array(sb)))))
    assert paired_test(lb, sb, lb_greater=True)["verdict"] == "not reproduced"
    assert paired_test([1.0, 2.0], [2.0, 3.0])["verdict"].startswith("same direction (too few seeds")
    assert paired_test([None], [None])["verdict"] == "not measured"


def test_real_measurement_api_wiring():
    """With the real API installed, the study's calls return plain numbers and leave the model as found."""
    from sharpkit.study import measure

    try:
        for name in ("keskar_sharpness", "hessian", "eigenvalues", "trace"):
            measure._api(name)
    except measure.Unavailable as exc:
        pytest.skip(str(exc))

    model = build_model("f1", (6,), 3, seed=0, width=8, depth=2).double()
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(40, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (40,), generator=g))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = measure.keskar(model, nn.CrossEntropyLoss(), data, 1e-3, "lbfgsb", None, 10, 0, "eval")
    assert s["value"] >= 0 and s["max_loss"] >= s["loss"]
    info, vec = measure.top_eigen(model, nn.CrossEntropyLoss(), data, "eval", 1e-6, 0)
    info2, _ = measure.top_eigen(model, nn.CrossEntropyLoss(), data, "eval", 1e-6, 0, v0=vec)
    assert info2["value"] == pytest.approx(info["value"], rel=1e-3) and info2["warm"]
    t = measure.hessian_trace(model, nn.CrossEntropyLoss(), data, "eval", 30, 0)
    assert np.isfinite(t["value"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------- cache keys and resume
def _one_run(npz, **over):
    """The cheapest study: one model, one seed, SB and LB only."""
    return _tiny(npz, **{"models": ("f1",), "seeds": (0,), "eps": (1e-3,), "solvers": ("apgd",), "sweep": (8, 32),
                         "warm_epochs": (0,), **over})


def test_rewritten_data_file_is_trained_anew(tmp_path, npz, api):
    out = tmp_path / "study"
    first = run_study(_one_run(npz), out, progress=False, threads=1)["stats"]
    assert first["trainings_run"] == 2
    d = dict(np.load(npz))
    np.savez(npz, **{**d, "x_train": d["x_train"] * 2})  # same path, same shapes, other numbers
    again = run_study(_one_run(npz), out, progress=False, threads=1)["stats"]
    assert again["trainings_run"] == 2 and again["trainings_reused"] == 0
    assert again["measurements_run"] == first["measurements_run"]  # nothing measured on the old data reused


def _write_nets(tmp_path, monkeypatch, body):
    """(Re)write the user's model module ``mynets`` and make the next import read it afresh."""
    import importlib
    import sys

    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # an edit of equal size must not hit a stale .pyc
    (tmp_path / "mynets.py").write_text("from torch import nn\n" + body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mynets", raising=False)
    importlib.invalidate_caches()


NET = ("def make_net(input_shape, num_classes):\n"
       "    return nn.Sequential(nn.Linear(input_shape[0], {w}), nn.BatchNorm1d({w}), nn.{act}(), nn.Linear({w}, num_classes))\n")


def test_edited_model_factory_is_trained_anew(tmp_path, npz, api, monkeypatch):
    out = tmp_path / "study"
    cfg = _one_run(npz, models=("mynets:make_net",))
    _write_nets(tmp_path, monkeypatch, NET.format(w=32, act="ReLU"))
    first = run_study(cfg, out, progress=False, threads=1)["stats"]
    assert first["trainings_run"] == 2
    assert run_study(cfg, out, progress=False, threads=1)["stats"]["trainings_run"] == 0  # unchanged: resumes
    _write_nets(tmp_path, monkeypatch, NET.format(w=32, act="Tanh"))  # same parameter shapes
    stats = run_study(cfg, out, progress=False, threads=1)["stats"]
    assert stats["trainings_run"] == 2 and stats["measurements_run"] == first["measurements_run"]
    _write_nets(tmp_path, monkeypatch, NET.format(w=64, act="Tanh"))  # other shapes: no load_state_dict error
    assert run_study(cfg, out, progress=False, threads=1)["stats"]["trainings_run"] == 2


def test_damaged_or_unfitting_cached_weights_are_redone(tmp_path, npz, api):
    from sharpkit.study.pipeline import Study

    out = tmp_path / "study"
    run_study(_one_run(npz), out, progress=False, threads=1)
    study = Study(_one_run(npz), out, progress=False)
    run_dir = study.run_dir(study.run_key("f1", "lb", 0))
    reference = torch.load(run_dir / "final.pt", weights_only=False)
    # A final.pt under the right key whose weights do not fit the model: retrained, with a warning.
    wrong = dict(reference, model={k: torch.zeros(1) for k in reference["model"]})
    torch.save(wrong, run_dir / "final.pt")
    with pytest.warns(RuntimeWarning, match="does not fit the model"):
        stats = run_study(_one_run(npz), out, progress=False, threads=1)["stats"]
    assert stats["trainings_run"] == 1
    # A truncated final.pt and a truncated checkpoint.pt: trained afresh, to the same weights.
    (run_dir / "final.pt").write_bytes(b"not a torch file")
    (run_dir / "checkpoint.pt").write_bytes((run_dir / "checkpoint.pt").read_bytes()[:100])
    with pytest.warns(RuntimeWarning, match="cannot be read"):
        stats = run_study(_one_run(npz), out, progress=False, threads=1)["stats"]
    assert stats["trainings_run"] == 1
    redone = torch.load(run_dir / "final.pt", weights_only=False)
    assert redone["record"]["resumed_from_epoch"] == 0
    assert all(torch.equal(v, reference["model"][k]) for k, v in redone["model"].items())


# ---------------------------------------------------------------------- unusable inputs
def _bad_file(tmp_path, npz, **change):
    d = dict(np.load(npz))
    d.update(change)
    path = tmp_path / "bad.npz"
    np.savez(path, **d)
    return str(path)


def _nan_row(x, row):
    x = x.copy()
    x[row, 3] = np.nan
    return x


BAD_DATA = {
    "nan_train": (lambda d: {"x_train": _nan_row(d["x_train"], 5)}, "x_train holds NaN or infinite values"),
    "nan_test_row": (lambda d: {"x_test": _nan_row(d["x_test"], 7)}, "x_test holds NaN or infinite values"),
    "negative_label": (lambda d: {"y_train": np.where(np.arange(160) == 3, -1, d["y_train"])}, "labels must be in [0, 3)"),
    "labels_2d": (lambda d: {"y_train": np.eye(3, dtype=np.int64)[d["y_train"]]}, "one integer class label per sample"),
    "test_width": (lambda d: {"x_test": d["x_test"][:, :10]}, "test samples have shape (10,), training samples (12,)"),
    "one_class": (lambda d: {"y_train": 0 * d["y_train"], "y_test": 0 * d["y_test"]}, "a single class"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_unusable_data_exit_2_before_training(case, tmp_path, npz, capsys, api):
    change, message = BAD_DATA[case]
    path = _bad_file(tmp_path, npz, **change(dict(np.load(npz))))
    out = tmp_path / "out"
    code = main(["study", "--data", path, "--model", "f1", "--sb", "8", "--lb", "32", "--seeds", "1", "--epochs", "1",
                 "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (out / "runs").exists()  # nothing trained


BAD_NETS = {
    "wrong_outputs": ("def net(input_shape, num_classes):\n    return nn.Linear(input_shape[0], 2)\n",
                      "gives outputs of shape (4, 2) for 4 samples; the study needs (4, 3)"),
    "raises": ("def net(input_shape, num_classes):\n    raise RuntimeError('boom')\n", "cannot be built"),
    "wrong_input": ("def net(input_shape, num_classes):\n    return nn.Linear(5, num_classes)\n", "does not run on samples"),
    "no_parameters": ("def net(input_shape, num_classes):\n    return nn.Flatten()\n", "no trainable parameters"),
    "fewer_parameters_than_p": ("def net(input_shape, num_classes):\n    return nn.Linear(input_shape[0], num_classes)\n",
                                "has 39 trainable parameters, fewer than the random subspace's dimension p = 100"),
}


@pytest.mark.parametrize("case", sorted(BAD_NETS))
def test_unusable_model_exits_2_before_training(case, tmp_path, npz, capsys, monkeypatch, api):
    body, message = BAD_NETS[case]
    _write_nets(tmp_path, monkeypatch, body)
    out = tmp_path / "out"
    code = main(["study", "--data", npz, "--model", "mynets:net", "--sb", "8", "--lb", "32", "--seeds", "1",
                 "--epochs", "1", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "mynets:net" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (out / "runs").exists()



@pytest.mark.parametrize("spec, message", [("resnet", "unknown model"),
                                           ("nomod_sharpkit_test:x", "cannot import module 'nomod_sharpkit_test'"),
                                           ("sharpkit.study.models:no_such_factory", "no_such_factory"),
                                           ("f1(widht=64)", "unknown size 'widht' for f1")])
def test_unimportable_model_spec_is_one_line(spec, message, tmp_path, npz, capsys):
    code = main(["study", "--data", npz, "--model", spec, "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and message in err
    assert err.count("\n") == 1 and "usage:" not in err and "Traceback" not in err

# ---------------------------------------------------------------------- report
def test_spearman_p_values_are_exact_for_few_points():
    from scipy import stats

    from sharpkit.study.report import spearman

    def p(x, y):
        return spearman(x, y)[1]

    # Exact two-sided permutation p-values (scipy's t-approximation gives 0 for the first two).
    assert p([1, 2, 3], [1, 2, 3]) == pytest.approx(2 / 6)
    assert p([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(2 / 24)
    assert p([1, 2, 3, 4, 5], [1, 2, 3, 5, 4]) == pytest.approx(10 / 120)  # rho = 0.9
    assert p([1, 2, 3, 4, 5], [1, 2, 3, 4, 5]) == pytest.approx(2 / 120)
    x, y = [1, 2, 3, 4, 5, 6], [1, 1, 2, 2, 3, 3]  # ties
    ref = stats.permutation_test((y,), lambda v: stats.spearmanr(x, v).statistic, permutation_type="pairings")
    assert spearman(x, y)[:2] == pytest.approx((stats.spearmanr(x, y).statistic, ref.pvalue))
    # More points: random orderings from a fixed seed, never p = 0.
    r = spearman(range(12), range(12))
    assert r[0] == 1.0 and 0 < r[1] < 1e-3 and r[1] == spearman(range(12), range(12))[1]


def test_trend_verdicts_need_significance():
    from sharpkit.study.report import summarize

    def results(points):
        runs = [{"role": role, "seed": 0, "batch": 8, "test_acc": 0.9, "train_acc": 1.0, "dist_from_init": 1.0}
                for role in ("sb", "lb")]
        sweep = [{"batch": 8 * 2 ** i, "sharpness": 1.0 + i, "test_acc": 0.9 - 0.01 * i, "lambda_max": 1.0 + i}
                 for i in range(points)]
        return {"config": {"subspace_dim": 100, "eps": [], "solvers": []},
                "models": {"f1": {"runs": runs, "sharpness": [], "curvature": [], "sweep": sweep}}}

    def fig4(points):
        return next(v for v in summarize(results(points))["models"]["f1"]["verdicts"] if v["claim"].startswith("Fig. 4"))

    v = fig4(4)  # a perfect ranking of 4 batch sizes: p = 1/12, not significant
    assert v["verdict"] == "same direction, not significant" and "exact permutation test" in v["statistic"]
    assert fig4(5)["verdict"] == "reproduced"  # p = 1/60


def test_paired_test_with_equal_differences():
    from sharpkit.study.report import _verdict

    three = paired_test([1.0, 1.0, 1.0], [2.0, 2.0, 2.0])
    assert three["p"] == pytest.approx(0.125) and three["verdict"] == "same direction, not significant"
    five = paired_test([1.0] * 5, [2.0] * 5)
    assert five["p"] == pytest.approx(1 / 32) and five["verdict"] == "reproduced"
    stat = _verdict("claim", "", "", five)["statistic"]
    assert "sign test" in stat and "inf" not in stat and "nan" not in stat
    assert paired_test([1.0] * 4, [1.0] * 4)["verdict"] == "not reproduced"


def test_unsorted_seeds_noise_order_and_epoch_caps(tmp_path, npz, api):
    out = tmp_path / "study"
    cfg = _tiny(npz, models=("f1",), seeds=(2, 0), eps=(1e-3,), solvers=("apgd",), sweep=(8, 32), lb_epochs_factor=2.0)
    results = run_study(cfg, out, progress=False, threads=1)
    s = results["summary"]["models"]["f1"]
    # The pipeline tracks the smallest seed (0), whatever the order given.
    assert any(v["claim"].startswith("Fig. 6") for v in s["verdicts"])
    assert s["tracking"]["end"]["sb"] is not None and s["tracking"]["end"]["lb"] is not None
    assert [n["epoch"] for n in results["models"]["f1"]["noise_scale"]][-1] == "final"
    assert "capped at 3 epochs at SB and 6 at LB" in (out / "report.html").read_text(encoding="utf-8")


# ---------------------------------------------------------------------- the study's checkpoints, measured elsewhere
def test_recorded_commands_measure_the_study_checkpoints(tmp_path, npz, api, capsys, monkeypatch):
    """The audit line the study prints (and records) and each run's model.json command measure the
    study's own checkpoints, on the data they were trained on: the loss they report is the training
    loss the study recorded.  Plain --model f1 (the paper's 5 x 512) does not load them."""
    import shlex

    out = tmp_path / "study"
    assert main(["study", "--data", npz, "--sb", "8", "--lb", "32", "--seeds", "1", "--epochs", "1", "--eps", "1e-3",
                 "--solvers", "apgd", "--sweep", "8,32", "--warm-epochs", "0", "--out", str(out), "--no-progress",
                 "--threads", "1"]) == 0
    printed = [line.strip() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("sharpkit audit")]
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    models = results["models"]
    assert printed == [models["f1"]["audit_command"], models["c1"]["audit_command"]]
    assert models["f1"]["spec"] == "f1(width=128,depth=5)" and models["c1"]["spec"] == "c1(channels=32,hidden=256x128)"
    assert printed[0] == (f"sharpkit audit '{out.as_posix()}/runs/f1-b*/final.pt' --model 'f1(width=128,depth=5)' "
                          f"--data {out.as_posix()}/train.npz")
    html_page = (out / "report.html").read_text(encoding="utf-8")
    assert "Measuring these checkpoints" in html_page and "c1(channels=32,hidden=256x128)" in html_page
    # train.npz is the study's data: the training split it trained on (and its test split).
    saved, d = np.load(out / "train.npz"), np.load(npz)
    assert all(np.array_equal(saved[k], d[k]) for k in ("x_train", "y_train", "x_test", "y_test"))
    train_loss = {r["checkpoint"]: r["train_loss"] for m in models.values() for r in m["runs"]}
    assert len(train_loss) == 4

    monkeypatch.undo()  # the real measurement API from here on
    for line in printed:
        argv = shlex.split(line)
        assert argv[0] == "sharpkit"
        assert main(argv[1:] + ["--out", str(tmp_path / "audit.jsonl"), "--no-progress"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    for r in rows:
        ckpt = Path(r["checkpoint"]).relative_to(out).as_posix()
        assert r["loss"] == pytest.approx(train_loss[ckpt], rel=1e-5)

    # Each run folder's model.json: the spec, the data (relative to the folder) and a sharpness command.
    run = models["c1"]["runs"][1]
    info = json.loads((out / Path(run["checkpoint"]).parent / "model.json").read_text(encoding="utf-8"))
    assert info["spec"] == models["c1"]["spec"] and info["model"] == "c1"
    assert (out / Path(run["checkpoint"]).parent / info["train_data"]).resolve() == (out / "train.npz").resolve()
    argv = shlex.split(info["command"])
    assert main(argv[1:] + ["--device", "cpu", "--max-iter", "2", "--out", str(tmp_path / "s.json")]) == 0
    measured = json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))
    assert measured["results"][0]["loss"] == pytest.approx(run["train_loss"], rel=1e-5)

    # The paper-sized plain spec does not fit them (the reviewer's failed attempt), reported in one line.
    capsys.readouterr()
    assert main(["sharpness", "--model", "f1", "--checkpoint", str(out / models["f1"]["runs"][0]["checkpoint"]),
                 "--data", str(out / "train.npz"), "--device", "cpu"]) == 2
    assert "mis-shaped keys" in capsys.readouterr().err


def test_train_split_and_run_info_are_left_alone_on_resume(tmp_path, npz, api):
    """A resumed study rewrites neither train.npz (the audit keys its rows by the file's SHA-256) nor
    model.json; a study folder from before them gets them on resume."""
    out = tmp_path / "study"
    run_study(_one_run(npz), out, progress=False, threads=1)
    files = [out / "train.npz", *sorted(out.glob("runs/*/model.json"))]
    assert len(files) == 3
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    again = run_study(_one_run(npz), out, progress=False, threads=1)
    assert again["stats"]["trainings_run"] == 0
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == before
    for p in files:
        p.unlink()
    run_study(_one_run(npz), out, progress=False, threads=1)
    assert {p: p.read_bytes() for p in files} == {p: b for p, (_, b) in before.items()}


def test_default_study_keys_are_unchanged(tmp_path, npz, monkeypatch):
    """Recording the sized specs changed no training key: the default study's and --quick's runs
    resume (the ids below are those of sharpkit before the specs were recorded; the environment
    part of the keys came later)."""
    from sharpkit.study.pipeline import Study, default_config, quick_config
    from sharpkit.study.store import key_id

    monkeypatch.chdir(tmp_path)  # the data path is part of the key: the same relative name as when pinned
    expected = {
        False: {"f1-sb": "0b052852b071827e", "f1-lb": "b06af69961379fdd", "c1-sb": "42b4cc2819435e75", "c1-lb": "58f4d1dd963b5bb4"},
        True: {"f1-sb": "e159f163c2e39c63", "f1-lb": "1c69c5f17b20148d", "c1-sb": "0065578db91bda5c", "c1-lb": "e3ee65f65e922cdf"},
    }
    for quick, ids in expected.items():
        study = Study((quick_config if quick else default_config)(data="toy.npz", sb=8, lb=32), tmp_path / "s",
                      progress=False)
        # Apart from the environment a training's floats depend on (device, torch version, ...),
        # which the keys hold since: a change there retrains, by design.
        keys = {f"{m}-{r}": study.run_key(m, r, 0) for m in ("f1", "c1") for r in ("sb", "lb")}
        assert {name: key_id({k: v for k, v in key.items() if k != "env"}) for name, key in keys.items()} == ids
        assert all(key["env"]["device"] == "cpu" for key in keys.values())
        assert study.model_spec("c1") == ("c1(channels=16,hidden=128x64)" if quick else "c1(channels=32,hidden=256x128)")


def test_sized_spec_builds_the_study_model(tmp_path, npz):
    from sharpkit.data import as_batches
    from sharpkit.inputs import resolve_model
    from sharpkit.study.pipeline import Study

    study = Study(_tiny(npz), tmp_path / "s", progress=False)
    assert study.model_spec("f1") == "f1(width=16,depth=2)" and study.model_spec("c1") == "c1(channels=4,hidden=8)"
    batches = as_batches((study.ds.x_train, study.ds.y_train))
    for name in ("f1", "c1"):
        spec = study.model_spec(name)
        ours, theirs = study.new_model(name, 3), build_model(spec, study.input_shape, study.ds.num_classes, seed=3)
        assert repr(ours) == repr(theirs)
        assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.state_dict().items())  # same init too
        measured, _ = resolve_model(spec, batches, None, seed=3)  # what --model SPEC builds in the measurement commands
        assert {k: v.shape for k, v in measured.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    # Plain names stay the paper's sizes; a size given both in the spec and as an argument must agree.
    assert build_model("f1", (40,), 10, seed=0)[1].out_features == 512
    c1 = build_model("c1", (40,), 10, seed=0)
    assert c1[1].out_channels == 64 and [m.out_features for m in c1 if isinstance(m, nn.Linear)] == [384, 192, 10]
    assert build_model("f1(width=8)", (4,), 3, seed=0, width=8, depth=2)[4].out_features == 8
    with pytest.raises(ValueError, match="gives width=8, the call width=16"):
        build_model("f1(width=8)", (4,), 3, seed=0, width=16)
    assert isinstance(build_model(" c1( channels = 4 , hidden = 8 x 4 , dropout=0.25 )", (12,), 3, seed=0), nn.Module)


def test_model_spec_round_trip():
    from sharpkit.study.models import format_model_spec, parse_model_spec

    assert format_model_spec("f1", width=128, depth=5) == "f1(width=128,depth=5)"
    assert format_model_spec("c1", hidden=[256, 128], channels=32) == "c1(channels=32,hidden=256x128)"
    assert format_model_spec("c1", channels=8, hidden=(), dropout=0.25) == "c1(channels=8,hidden=none,dropout=0.25)"
    assert format_model_spec("f1") == "f1" and format_model_spec("mypkg.nets:make") == "mypkg.nets:make"
    for spec in ("f1(width=128,depth=5)", "c1(channels=8,hidden=none,dropout=0.25)", "c1(channels=32,hidden=256x128)"):
        name, sizes = parse_model_spec(spec)
        assert format_model_spec(name, **sizes) == spec
    assert parse_model_spec("f1()") == ("f1", {}) and parse_model_spec("pkg.m:f") == ("pkg.m:f", {})


BAD_SPECS = [
    ("f1(widht=128)", "unknown size 'widht' for f1 (use width, depth)"),
    ("c1(width=128)", "unknown size 'width' for c1 (use channels, hidden, dropout)"),
    ("f1(width=0)", "width must be a positive integer, got '0'"),
    ("f1(width=1e3)", "width must be a positive integer, got '1e3'"),
    ("f1(width=abc,depth=5)", "width must be a positive integer, got 'abc'"),
    ("c1(hidden=256,128)", "'128' is not key=value (hidden sizes are joined by x, e.g. hidden=256x128)"),
    ("c1(hidden=256x)", "hidden must be positive integers joined by x"),
    ("c1(dropout=1.5)", "dropout must be a number in [0, 1)"),
    ("f1(width=8,width=16)", "width is given twice"),
    ("f1(width=8,)", "an empty entry between commas"),
    ("f1(width=8", "expected NAME(key=value,...), e.g. f1(width=128,depth=5)"),
    ("resnet(width=8)", "sizes in parentheses apply to f1 and c1 only"),
    ("mypkg.nets:make(width=8)", "sizes in parentheses apply to f1 and c1 only"),
]


@pytest.mark.parametrize("spec, message", BAD_SPECS)
def test_bad_model_spec_is_a_clear_error(spec, message, npz, capsys):
    with pytest.raises(ValueError) as exc:
        build_model(spec, (12,), 3, seed=0)
    assert message in str(exc.value) and spec in str(exc.value) and "\n" not in str(exc.value)
    # The measurement commands and the study report it in one line, exit 2.
    assert main(["sharpness", "--model", spec, "--data", npz, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_study_model_flag_takes_sized_specs(tmp_path):
    from sharpkit.cli import build_parser
    from sharpkit.study.cli import config_from_args

    args = build_parser().parse_args(["study", "--model", "f1(width=64,depth=3), c1,c1(channels=8,hidden=16x8)",
                                      "--out", str(tmp_path)])
    assert config_from_args(args).models == ("f1(width=64,depth=3)", "c1", "c1(channels=8,hidden=16x8)")
