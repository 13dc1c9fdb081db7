"""The study driver against a demanding user: factories that keep their module, one-sample batches,
settings that cannot run, an unusable --out, re-runs with other settings, damaged snapshots."""
from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

from sharpkit.cli import main
from sharpkit.study.models import build_model, make_f1
from sharpkit.study.pipeline import run_study
from sharpkit.study.train import TrainConfig, train

from test_study import _tiny, api, npz  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)

KEPT_NET = """
import torch
from torch import nn
torch.manual_seed(0)
NET = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
START = [p.detach().clone() for p in NET.parameters()]
def make(input_shape, num_classes):
    return NET
"""


def test_factory_returning_a_kept_module_gets_copies(tmp_path, npz, api, monkeypatch):
    """A factory handing out one module it keeps: the study trained that module in place (the
    user's network changed) and its SB and LB models of every seed were one object, so every
    measurement after training read the last trained weights (identical SB and LB rows)."""
    (tmp_path / "kept_net_mod.py").write_text(KEPT_NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "kept_net_mod", raising=False)
    import kept_net_mod

    spec = "kept_net_mod:make"
    assert build_model(spec, (12,), 3, seed=0) is not kept_net_mod.NET
    cfg = _tiny(npz, models=(spec,), seeds=(0, 1), eps=(1e-3,), solvers=("pga",), subspace_dim=10)
    with pytest.warns(RuntimeWarning, match="same initial weights for seeds 0 and 1"):
        results = run_study(cfg, tmp_path / "study", progress=False, threads=1)
    for p, p0 in zip(kept_net_mod.NET.parameters(), kept_net_mod.START):
        assert torch.equal(p, p0)  # the user's module is untouched
    m = results["models"][spec]
    lam = {(c["role"], c["seed"]): c["lambda_max"]["value"] for c in m["curvature"]}
    for seed in (0, 1):
        assert lam[("sb", seed)] != lam[("lb", seed)]
    # Every run started from the factory's weights (LB did not continue from SB's).
    start = torch.cat([p.reshape(-1) for p in kept_net_mod.START]).double()
    for run in m["runs"]:
        net = build_model(spec, (12,), 3, seed=0)
        net.load_state_dict(torch.load(tmp_path / "study" / run["checkpoint"], weights_only=False)["model"])
        x = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).double()
        assert float((x - start).norm()) == pytest.approx(run["dist_from_init"], rel=1e-5)


class _Recorder(nn.Module):
    """Cross-entropy that records each minibatch's loss (float64) and size."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[float, int]] = []

    def forward(self, out, y):
        loss = nn.functional.cross_entropy(out, y)
        self.seen.append((float(loss.detach().double()), int(y.shape[0])))
        return loss


def test_epoch_loss_is_the_mean_over_the_samples_trained_on():
    """9 samples in batches of 4 with BatchNorm: the last, one-sample batch is skipped, and the
    epoch loss divided the other 8 samples' loss by 9 (about 11 % low)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(9, 6, generator=g), torch.randint(0, 3, (9,), generator=g)
    loss_fn = _Recorder()
    r = train(make_f1((6,), 3, width=8, depth=1), loss_fn, (x, y), TrainConfig(4, max_epochs=1), seed=0)
    assert [b for _, b in loss_fn.seen] == [4, 4]
    ref = math.fsum(v * b for v, b in loss_fn.seen) / 8
    assert r.history[1]["train_loss"] == pytest.approx(ref, rel=1e-12)


def test_one_sample_batches_with_batchnorm_are_refused(tmp_path, npz, api):
    """Batch size 1 with BatchNorm skipped every batch: the model was never trained and its epoch
    loss reported as 0.0."""
    x, y = torch.randn(9, 6), torch.randint(0, 3, (9,))
    with pytest.raises(ValueError, match="BatchNorm cannot train on one-sample batches"):
        train(make_f1((6,), 3, width=8, depth=1), nn.CrossEntropyLoss(), (x, y), TrainConfig(1, max_epochs=2), seed=0)
    plain = nn.Sequential(nn.Linear(6, 3))  # without BatchNorm batch 1 is plain SGD-style training
    assert train(plain, nn.CrossEntropyLoss(), (x, y), TrainConfig(1, max_epochs=1), seed=0).history[1]["train_loss"] > 0
    with pytest.raises(ValueError, match="BatchNorm, which cannot train on batches of 1 sample"):
        run_study(_tiny(npz, models=("f1",), sb=1), tmp_path / "s", progress=False, threads=1)
    assert not (tmp_path / "s" / "runs").exists()  # refused before any training


@pytest.mark.parametrize("over, message", [
    ({"seeds": ()}, "seeds is empty"),
    ({"seeds": (0, 0)}, "seeds must be distinct"),
    ({"max_epochs": 0}, "max_epochs must be an integer >= 1"),
    ({"patience": 0}, "patience must be an integer >= 1"),
    ({"solvers": ("newton",)}, "solvers must be chosen from"),
    ({"eps": (float("nan"),)}, "eps must be a positive finite number"),
    ({"lr": 0.0}, "lr must be a positive finite number"),
    ({"curve_points": 1}, "curve_points must be an integer >= 2"),
    ({"trace_matvecs": 2}, "trace_matvecs must be an integer >= 3"),  # (Hutch++ needs 3 products)
    ({"sweep_models": ("c1",)}, "sweep_models names 'c1'"),
    ({"sweep": (8, 500)}, "--sweep batch size 500 exceeds the 160 training samples"),
])
def test_settings_that_cannot_run_are_refused_before_training(over, message, tmp_path, npz, api):
    """Through the API these were an IndexError (no seeds), a ZeroDivisionError (max_epochs 0), a
    ValueError only after every training (a bad solver), or silently accepted (a sweep batch larger
    than the training set trained full-batch and was labelled 500)."""
    cfg = _tiny(npz, **{"models": ("f1",), "seeds": (0,), **over})
    with pytest.raises(ValueError, match=message):
        run_study(cfg, tmp_path / "s", progress=False, threads=1)
    assert not (tmp_path / "s" / "runs").exists()


def test_unusable_out_and_misapplied_flags_exit_2(tmp_path, npz, capsys):
    a_file = tmp_path / "taken"
    a_file.write_text("not a directory")
    assert main(["study", "--data", npz, "--out", str(a_file), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "is an existing file, not a directory" in err and "Traceback" not in err
    assert main(["study", "--data", npz, "--out", str(a_file / "sub"), "--no-progress"]) == 2
    assert "cannot be written" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # was ignored without a word
        main(["study", "--data", npz, "--num-samples", "500", "--out", str(tmp_path / "s")])
    assert exc.value.code == 2 and "--num-samples applies to --data mnist1d only" in capsys.readouterr().err


def test_rerun_with_other_settings_leaves_no_stale_tables_or_figures(tmp_path, npz, api):
    """Re-running in the same --out with the other model first moves the sweep and warm start to it:
    fig_sweep_f1.png and fig_warm_f1.png of the first run stayed beside the new results."""
    out = tmp_path / "study"
    small = dict(seeds=(0, 1), eps=(1e-3,), solvers=("pga",), warm_epochs=(1,))
    run_study(_tiny(npz, models=("f1", "c1"), **small), out, progress=False, threads=1)
    assert (out / "fig_sweep_f1.png").exists() and (out / "table2_accuracy_c1.csv").exists()
    (out / "fig_mine.png").write_bytes(b"the user's")  # not the study's: kept
    results = run_study(_tiny(npz, models=("c1",), **small), out, progress=False, threads=1)
    listed = set(results["figures"]) | set(results["tables"])
    on_disk = {p.name for p in out.iterdir() if p.suffix in (".png", ".csv")}
    assert on_disk == listed | {"fig_mine.png"}
    assert "fig_sweep_c1.png" in on_disk and not any("f1" in name for name in on_disk)
    saved = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert set(saved["tables"]) == set(results["tables"]) and "runs.csv" in saved["tables"]


def test_damaged_or_missing_warm_start_snapshot_is_redone(tmp_path, npz, api):
    """A damaged epoch-k snapshot of the SB run was a traceback (UnpicklingError) when its warm start
    was to be trained; a missing one silently dropped that k from Fig. 5."""
    out = tmp_path / "study"
    cfg = _tiny(npz, models=("f1",), seeds=(0,), eps=(1e-3,), solvers=("pga",))
    first = run_study(cfg, out, progress=False, threads=1)["models"]["f1"]
    assert [w["k"] for w in first["warm_start"]] == [0, 1, 2]
    sb_dir = out / first["runs"][0]["checkpoint"].rsplit("/", 1)[0]
    assert first["runs"][0]["role"] == "sb"
    (sb_dir / "epoch1.pt").write_bytes(b"garbage")
    (sb_dir / "epoch2.pt").unlink()
    for info in out.glob("runs/f1-b32-s0-*/model.json"):  # the warm starts are to be trained again
        if json.loads(info.read_text(encoding="utf-8"))["training"]["warm_start"]:
            (info.parent / "final.pt").unlink()
    for p in (out / "cache").glob("noise-*.json"):
        p.unlink()
    with pytest.warns(RuntimeWarning, match="the SB run is trained again"):
        again = run_study(cfg, out, progress=False, threads=1)
    m = again["models"]["f1"]
    assert m["warm_start"] == first["warm_start"] and m["noise_scale"] == first["noise_scale"]
    assert again["stats"]["trainings_run"] == 3  # the SB run and the two warm starts


def _straight_and_resumed(device: str, tmp_path, old_format: bool = False):
    """c1 (dropout) trained 4 epochs straight, and 2 epochs then resumed from its checkpoint to 4."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 12, generator=g), torch.randint(0, 3, (40,), generator=g)
    loss_fn = nn.CrossEntropyLoss()

    def net():
        return build_model("c1", (12,), 3, seed=0, channels=4, hidden=(8,)).to(device)

    straight = net()
    train(straight, loss_fn, (x, y), TrainConfig(8, max_epochs=4, patience=10), seed=0, device=device)
    ckpt = tmp_path / f"{device}.pt"
    train(net(), loss_fn, (x, y), TrainConfig(8, max_epochs=2, patience=10), seed=0, device=device, checkpoint=ckpt)
    if old_format:  # checkpoints written before the RNG states were bytes held tensors
        state = torch.load(ckpt, weights_only=False)
        state["generator"], state["torch_rng"] = (torch.frombuffer(bytearray(state[k]), dtype=torch.uint8)
                                                  for k in ("generator", "torch_rng"))
        del state["cuda_rng"]
        torch.save(state, ckpt)
    resumed = net()
    r = train(resumed, loss_fn, (x, y), TrainConfig(8, max_epochs=4, patience=10), seed=0, device=device, checkpoint=ckpt)
    assert r.resumed_from == 2 and r.epochs == 4
    return straight, resumed


def test_resume_reads_checkpoints_with_tensor_rng_states(tmp_path):
    straight, resumed = _straight_and_resumed("cpu", tmp_path, old_format=True)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_resume_on_gpu_is_exact(tmp_path):
    """On CUDA the checkpoint's RNG states were loaded onto the GPU (torch.load's map_location), where
    torch.set_rng_state refuses them (TypeError: RNG state must be a torch.ByteTensor), and the GPU's
    own RNG, which draws the dropout masks there, was not saved."""
    straight, resumed = _straight_and_resumed("cuda", tmp_path)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_curves_pass_through_both_minimizers(tmp_path, npz, api):
    """With 5 points the SB-LB grid was -1, -0.25, 0.5, 1.25, 2: the report's 'loss next to SB' and
    'next to LB' were read at α = -0.25 and 1.25, and neither curve went through a minimizer."""
    out = tmp_path / "study"
    cfg = _tiny(npz, models=("f1",), seeds=(0,), eps=(1e-3,), solvers=("pga",), curve_points=5)
    results = run_study(cfg, out, progress=False, threads=1)
    m = results["models"]["f1"]
    curve = m["curves"]["linear"]["train"]
    a = curve["alphas"]
    assert 0.0 in a and 1.0 in a and len(a) == 7
    # The loss at α = 0 and 1 is the SB and LB model's own (float64 reference; BatchNorm on batch
    # statistics of the whole training split, one chunk, as the curves are computed).
    data = np.load(out / "train.npz")
    x, y = torch.tensor(data["x_train"]).double(), torch.tensor(data["y_train"]).long()
    for role, alpha in (("sb", 0.0), ("lb", 1.0)):
        run = next(r for r in m["runs"] if r["role"] == role)
        net = build_model("f1", (12,), 3, seed=0, width=16, depth=2)
        net.load_state_dict(torch.load(out / run["checkpoint"], weights_only=False)["model"])
        with torch.no_grad():
            ref = float(nn.functional.cross_entropy(net.double().train()(x), y))
        assert curve["loss"][a.index(alpha)] == pytest.approx(ref, rel=1e-5)
    assert 0.0 in m["slices"]["sb"]["alphas"]
    # The default grids already hold 0 and 1: they are unchanged.
    from sharpkit.study.pipeline import _grid_with

    grid = np.linspace(-1.0, 2.0, 25)
    assert _grid_with(grid, (0.0, 1.0)) is grid
