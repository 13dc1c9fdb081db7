"""Tests of ``sk.audit`` / ``sharpkit audit``: checkpoint formats and bad input, the stacked (vmap)
objective against float64 references, batched == one at a time, the durable store (torn lines,
duplicates, kill and resume), the report and the command line."""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import sharpkit as sk
from sharpkit.audit import audit
from sharpkit.audit.batched import SingleObjective, StackedObjective, estimate_group_size, stack_checkpoints
from sharpkit.audit.checkpoints import (
    CheckpointError,
    find_checkpoints,
    fit_state_dict,
    load_state_dict,
    parse_step,
)
from sharpkit.audit.metrics import hutchinson_trace, lanczos_top
from sharpkit.audit.report import format_table, render_html, sort_rows, write_html
from sharpkit.audit.store import ResultStore
from sharpkit.data import as_batches
from sharpkit.objective import Objective
from sharpkit.params import FlatParams

ALL_METRICS = "keskar,keskar-subspace,adaptive,top-eig,trace"

# A module the CLI and the subprocesses import by name (MODULE:FACTORY, MODULE:FUNCTION).
NETS_SOURCE = textwrap.dedent(
    """
    import os, time
    import torch
    from torch import nn

    def make_mlp():
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def make_bn():
        return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    class Slow(nn.Module):
        # Sleeps in every forward so that a test can kill the audit mid-run.
        def __init__(self):
            super().__init__()
            self.net = make_mlp()
        def forward(self, x):
            time.sleep(float(os.environ.get("AUDIT_TEST_SLEEP", "0")))
            return self.net(x)

    def make_slow():
        return Slow()

    def data():
        g = torch.Generator().manual_seed(1)
        return torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)

    def loader():
        x, y = data()
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)

    def make_relu():  # the same tensors as make_mlp, another activation
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))

    def make_classes(input_shape, num_classes):  # sized by the audit from the data
        return nn.Sequential(nn.Linear(input_shape[0], 8), nn.Tanh(), nn.Linear(8, num_classes))

    def sorted_loader():
        # Sorted by class, like an ImageFolder without shuffling: the first batch holds class 0 only.
        x, y = data()
        order = torch.argsort(y, stable=True)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[order], y[order]), batch_size=8)

    def shuffled_loader():
        x, y = data()
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True)

    def make_raising(input_shape, num_classes):
        raise RuntimeError("factory boom")

    def env_data():
        # Other data of the same size when AUDIT_TEST_DATA_SEED changes.
        g = torch.Generator().manual_seed(int(os.environ.get("AUDIT_TEST_DATA_SEED", "1")))
        return torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
    """
)


pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)


@pytest.fixture
def nets(tmp_path, monkeypatch):
    """Import path with the ``auditnets`` module."""
    (tmp_path / "auditnets.py").write_text(NETS_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("auditnets", None)
    import auditnets

    return auditnets


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def make_bn() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def toy_data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def save_checkpoints(folder: Path, factory=make_mlp, count: int = 4, prefix: str = "step_") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        torch.manual_seed(100 + i)
        m = factory()
        for b in m.buffers():  # distinct BN running statistics per checkpoint
            if b.is_floating_point():
                b.add_(torch.rand_like(b) * 0.5)
        path = folder / f"{prefix}{(i + 1) * 10}.pt"
        torch.save(m.state_dict(), path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize(
    "name, expected",
    [
        ("epoch=3-step=1200.ckpt", (1200, 3)),
        ("ckpt_step_500.pt", (500, None)),
        ("model-e07.pt", (None, 7)),
        ("iter1000.safetensors", (1000, None)),
        ("ckpt_0040.pt", (40, None)),
        ("final.pt", (None, None)),
        ("run2_v3.pt", (None, None)),
        ("epoch_2.pth", (None, 2)),
        # Scientific notation is a hyper-parameter, not an epoch.
        ("lr1e-3_epoch5.pt", (None, 5)),
        ("wd5e-4-step=100.ckpt", (100, None)),
        ("lr_2.5E-4_ckpt_0040.pt", (40, None)),
        ("lr1e-3.pt", (None, None)),
        ("EPOCH_7.PT", (None, 7)),
        # A "." separates a keyword from its number too; a bare "e" after a "." is an epoch.
        ("weights.epoch.3.pt", (None, 3)),
        ("model.e5.pt", (None, 5)),
        ("lr1.e-3.pt", (None, None)),
        # A number glued to a word names the model or a version, not a step; after ckpt it is one.
        ("resnet18.pt", (None, None)),
        ("model_v3.pt", (None, None)),
        ("ckpt0040.pt", (40, None)),
        ("resnet18_0040.pt", (40, None)),
        # The parent directory when the file name has nothing (Hugging Face), never over it.
        ("hf/checkpoint-500/pytorch_model.bin", (500, None)),
        ("runs/epoch_3/model.safetensors", (None, 3)),
        ("snapshots/000200/model.pt", (200, None)),
        ("runs/2/epoch_1.pt", (None, 1)),
        ("run3/last.ckpt", (None, None)),
        # The directory gives what the file name lacks: the epoch above a step's file.
        ("runs/epoch_3/ckpt_000100.pt", (100, 3)),
        ("epoch_3/step_100.pt", (100, 3)),
        ("step_400/model-e2.pt", (400, 2)),
        ("epoch_5/epoch_1.pt", (None, 1)),
        ("epoch_2/epoch_2_v3.pt", (None, 2)),
        # A hexadecimal hash (a study's run folder) holds no epoch or step; a bare "e" number must
        # end its word.
        ("runs/f1-b320-s0-fc2e6e997992ccb6/final.pt", (None, None)),
        ("runs/f1-b20-s0-e12ab/final.pt", (None, None)),
        ("run-abc12345/step_10.pt", (10, None)),
        ("deadbeef/0040.pt", (40, None)),
        ("12345678.pt", (12345678, None)),
    ],
)
def test_parse_step(name, expected):
    assert parse_step(name) == expected


def test_display_names_tell_files_apart():
    from sharpkit.audit.checkpoints import display_names

    assert display_names(["a/b/epoch_1.pt", "a/b/epoch_2.pt"]) == ["epoch_1.pt", "epoch_2.pt"]
    # Every row says which run it belongs to, not only the two that clash.
    assert display_names(["runs/sb/epoch_1.pt", "runs/lb/epoch_1.pt", "runs/sb/epoch_2.pt"]) == [
        "sb/epoch_1.pt", "lb/epoch_1.pt", "sb/epoch_2.pt"]
    hf = [f"hf/checkpoint-{s}/pytorch_model.bin" for s in (500, 1000)]
    assert display_names(hf) == ["checkpoint-500/pytorch_model.bin", "checkpoint-1000/pytorch_model.bin"]
    assert display_names(["/x.pt", "/d/x.pt"]) == ["/x.pt", "d/x.pt"]


def test_find_checkpoints_dirs_globs_missing_and_duplicates(tmp_path):
    paths = save_checkpoints(tmp_path / "a", count=3)
    (tmp_path / "a" / "notes.txt").write_text("not a checkpoint")
    found = find_checkpoints([tmp_path / "a", str(tmp_path / "a" / "step_1*.pt"), tmp_path / "nope.pt", paths[0]])
    assert found == sorted(paths) + [tmp_path / "nope.pt"]


def test_find_checkpoints_globs_expand_directories_and_filter_suffixes(tmp_path):
    sb = save_checkpoints(tmp_path / "runs" / "sb", count=2)
    lb = save_checkpoints(tmp_path / "runs" / "lb", count=2)
    (tmp_path / "runs" / "sb" / "log.txt").write_text("not a checkpoint")
    upper = tmp_path / "runs" / "sb" / "FINAL.PT"
    upper.write_bytes(sb[0].read_bytes())
    deep = save_checkpoints(tmp_path / "runs" / "lb" / "deep", count=1)
    # A pattern matching directories gives their checkpoint files (suffixes in any case), no log.txt.
    assert find_checkpoints([str(tmp_path / "runs" / "*")]) == sorted(lb) + sorted([*sb, upper])
    assert find_checkpoints([str(tmp_path / "runs" / "sb" / "*")]) == sorted([*sb, upper])
    # ** reaches any depth.
    assert set(find_checkpoints([str(tmp_path / "runs" / "**" / "*.pt")])) == {*sb, *lb, *deep}
    # A directory is still not searched below its own files.
    assert find_checkpoints([tmp_path / "runs" / "lb"]) == sorted(lb)


def test_specs_yielding_nothing_get_error_rows(tmp_path, nets, capsys):
    from sharpkit.cli import main

    good = save_checkpoints(tmp_path / "ck", count=1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "log.txt").write_text("x")
    specs = [str(good[0]), str(tmp_path / "nothing" / "*.pt"), str(tmp_path / "empty"), str(tmp_path / "logs" / "*")]
    assert find_checkpoints(specs)[1:] == [Path(p) for p in specs[1:]]
    rows = audit(specs, make_mlp, toy_data(), max_iter=1)
    assert [r["status"] for r in rows] == ["ok", "error", "error", "error"]
    assert "pattern matches no checkpoint file" in rows[1]["error"]
    assert "directory holds no checkpoint files" in rows[2]["error"]
    assert "pattern matches no checkpoint file" in rows[3]["error"]
    # On the command line: reported as failed checkpoints (exit 1), not "no checkpoints given".
    torch.save(dict(zip(("x", "y"), toy_data())), tmp_path / "data.pt")
    code = main(["audit", str(tmp_path / "empty"), str(tmp_path / "nothing" / "*.pt"), "--model", "auditnets:make_mlp",
                 "--data", str(tmp_path / "data.pt"), "--out", str(tmp_path / "a.jsonl"), "--no-progress"])
    assert code == 1
    captured = capsys.readouterr()
    assert "no checkpoints given" not in captured.err and "holds no checkpoint files" in captured.out


def test_formats_torch_safetensors_lightning_ddp(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    m = make_bn()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    torch.save(sd, tmp_path / "plain.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    torch.save(
        {"epoch": 3, "global_step": 120, "state_dict": {"model." + k: v for k, v in sd.items()},
         "optimizer_states": [], "hyper_parameters": {"lr": 0.1}},
        tmp_path / "epoch=3-step=120.ckpt",
    )
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "ddp.pth")
    target = make_bn()
    for name in ("plain.pt", "w.safetensors", "epoch=3-step=120.ckpt", "ddp.pth"):
        fitted = fit_state_dict(load_state_dict(tmp_path / name), target, name)
        assert list(fitted) == list(sd)
        for k in sd:
            assert torch.equal(fitted[k], sd[k]), (name, k)


def test_missing_num_batches_tracked_is_filled_like_torch(tmp_path):
    full = save_checkpoints(tmp_path / "full", make_bn, count=1)[0]
    sd = torch.load(full)
    lacking = {k: v for k, v in sd.items() if k != "1.num_batches_tracked"}
    (tmp_path / "old").mkdir()
    torch.save(lacking, tmp_path / "old" / "step_10.pt")
    model = make_bn()
    model.load_state_dict(lacking, strict=True)  # torch accepts it: BatchNorm fills the count in
    target = make_bn()
    target[1].num_batches_tracked.fill_(7)
    fitted = fit_state_dict(lacking, target, "old.pt")
    assert list(fitted) == list(sd) and int(fitted["1.num_batches_tracked"]) == 7  # the model's value
    assert int(target[1].num_batches_tracked) == 7
    # Any other missing key is still refused, the count named nowhere.
    with pytest.raises(CheckpointError, match=r"missing keys: 1\.running_mean$"):
        fit_state_dict({k: v for k, v in lacking.items() if k != "1.running_mean"}, make_bn(), "old.pt")
    # Behind a prefix too, and in a Lightning file.
    fitted = fit_state_dict({"model." + k: v for k, v in lacking.items()}, make_bn(), "old.ckpt")
    assert list(fitted) == list(sd)
    # Measured as the complete checkpoint is (the count never changes the loss).
    a, b = (audit([p], make_bn, toy_data(), metrics="keskar,top-eig", max_iter=2, lanczos_steps=3)[0]
            for p in (full, tmp_path / "old" / "step_10.pt"))
    assert b["status"] == "ok", b["error"]
    assert (b["loss"], b["keskar"], b["top-eig"]) == (a["loss"], a["keskar"], a["top-eig"])


def test_ambiguous_prefix_is_an_error_naming_the_candidates(tmp_path):
    sd = make_mlp().state_dict()
    ema = {k: v + 1 for k, v in sd.items()}
    path = tmp_path / "epoch=1-step=10.ckpt"
    torch.save({"state_dict": {**{"model." + k: v for k, v in sd.items()}, **{"ema." + k: v for k, v in ema.items()}}}, path)
    with pytest.raises(CheckpointError, match=r"several prefixes \('ema\.', 'model\.'\)"):
        fit_state_dict(load_state_dict(path), make_mlp(), str(path))
    rows = audit([path], make_mlp, toy_data(), max_iter=1)
    assert rows[0]["status"] == "error" and "'ema.', 'model.'" in rows[0]["error"]
    # One copy with extra keys beside it stays unambiguous.
    torch.save({"state_dict": {**{"model." + k: v for k, v in sd.items()}, "loss.weight": torch.ones(3)}}, path)
    assert list(fit_state_dict(load_state_dict(path), make_mlp(), str(path))) == list(sd)


def test_load_errors_keep_the_reason_without_terminal_escapes(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"garbage")
    pickled = tmp_path / "pickled.pt"
    torch.save({"cfg": torch.nn.ReLU()}, pickled)
    for path, reason in ((garbage, "Unsupported operand"), (pickled, "Unsupported global: GLOBAL torch.nn.modules.activation.ReLU")):
        with pytest.raises(CheckpointError) as info:
            load_state_dict(path)
        message = str(info.value)
        assert reason in message and "\x1b" not in message and "\n" not in message, message
        assert "In PyTorch 2.6" not in message  # torch's advice, not the reason


def _bad(path: Path, kind: str, model: nn.Module) -> Path:
    if kind == "missing":
        return path
    sd = model.state_dict()
    if kind == "corrupt":
        path.write_bytes(os.urandom(300))
    elif kind == "truncated":
        torch.save(sd, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty-file":
        path.write_bytes(b"")
    elif kind == "not-a-dict":
        torch.save([v for v in sd.values()], path)
    elif kind == "pickled-object":
        torch.save({"cfg": torch.nn.ReLU()}, path)  # weights_only=True refuses to unpickle a module
    elif kind == "missing-keys":
        torch.save({k: v for k, v in sd.items() if not k.startswith("2.")}, path)
    elif kind == "unexpected-keys":
        torch.save({**sd, "extra.weight": torch.zeros(2)}, path)
    elif kind == "misshaped":
        torch.save({**sd, "0.weight": torch.zeros(5, 6)}, path)
    elif kind == "nan":
        torch.save({**sd, "0.bias": torch.full((8,), float("nan"))}, path)
    elif kind == "inf":
        bad = sd["2.weight"].clone()
        bad[0, 0] = float("inf")
        torch.save({**sd, "2.weight": bad}, path)
    elif kind == "overflowing-loss":  # finite weights whose logits overflow float32
        torch.save({**sd, "2.weight": torch.full_like(sd["2.weight"], 3e38), "0.weight": sd["0.weight"] * 1e3}, path)
    elif kind == "unreadable":
        torch.save(sd, path)
        path.chmod(0)
    else:
        raise AssertionError(kind)
    return path


BAD_CASES = {
    "missing": "file not found",
    "corrupt": "cannot load",
    "truncated": "cannot load",
    "empty-file": "cannot load",
    "not-a-dict": "expected a state dict",
    "pickled-object": "weights_only=True",
    "missing-keys": "missing keys: 2.weight, 2.bias",
    "unexpected-keys": "unexpected keys: extra.weight",
    "misshaped": "mis-shaped keys: 0.weight (checkpoint (5, 6), model (8, 6))",
    "nan": "'0.bias' contains NaN",
    "inf": "'2.weight' contains inf",
    "unreadable": "not readable",
    "overflowing-loss": "sharpness is undefined",
}


@pytest.mark.parametrize("kind", sorted(BAD_CASES))
def test_bad_checkpoint_gets_error_row_others_measured(tmp_path, kind, monkeypatch):
    if kind == "unreadable" and os.geteuid() == 0:
        # root reads files whatever their mode: make the permission check report what it would.
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: not str(p).endswith("step_99.pt") and real_access(p, mode))
    good = save_checkpoints(tmp_path / "ck", count=2)
    bad = _bad(tmp_path / "ck" / "step_99.pt", kind, make_mlp())
    rows = audit([*good, bad], make_mlp, toy_data(), metrics="keskar", out=tmp_path / "a.jsonl", max_iter=2,
                 group_size=3)
    by_name = {r["name"]: r for r in rows}
    assert by_name["step_99.pt"]["status"] == "error"
    assert BAD_CASES[kind] in by_name["step_99.pt"]["error"]
    assert str(bad) in by_name["step_99.pt"]["error"]
    for p in good:
        assert by_name[p.name]["status"] == "ok" and math.isfinite(by_name[p.name]["keskar"])
    stored = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(r["name"] for r in stored) == sorted(by_name)


# --------------------------------------------------------------------------- engines vs float64 references


def _reference_loss_grad(model_factory, state, data, batch_size=None):
    """Plain nn.Module forward/backward per batch, sample-weighted, in float64."""
    m = model_factory().double().eval()
    m.load_state_dict(state)
    x, y = data
    n = x.shape[0]
    bs = batch_size or n
    total = 0.0
    m.zero_grad()
    for s in range(0, n, bs):
        xb, yb = x[s : s + bs].double(), y[s : s + bs]
        loss = nn.functional.cross_entropy(m(xb), yb)
        (loss * xb.shape[0] / n).backward()
        total += loss.item() * xb.shape[0]
    grad = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    return total / n, grad


@pytest.mark.parametrize("factory", [make_mlp, make_bn])
@pytest.mark.parametrize("batch_size", [None, 15])
def test_stacked_loss_and_grad_match_reference(tmp_path, factory, batch_size):
    paths = save_checkpoints(tmp_path, factory, count=3)
    model = factory().double().eval()
    states = [fit_state_dict(load_state_dict(p), model) for p in paths]
    data = toy_data()
    X, frozen = stack_checkpoints(model, states, torch.device("cpu"), torch.float64)
    eng = StackedObjective(model, nn.CrossEntropyLoss(), as_batches(data, batch_size), X, frozen)
    losses, grads = eng.loss_and_grad(X)
    assert torch.allclose(eng.loss(X), losses, rtol=1e-12, atol=0)
    for b, st in enumerate(states):
        ref_loss, ref_grad = _reference_loss_grad(factory, st, data, batch_size)
        assert losses[b].item() == pytest.approx(ref_loss, rel=1e-12)
        torch.testing.assert_close(grads[b], ref_grad, rtol=1e-10, atol=1e-12)


def _explicit_hessian(factory, state, data):
    m = factory().double().eval()
    m.load_state_dict(state)
    flat = FlatParams(m)
    x0 = flat.get()
    buffers = dict(m.named_buffers())
    xd, yd = data[0].double(), data[1]

    def f(x):
        out = torch.func.functional_call(m, {**buffers, **flat.as_dict(x)}, (xd,))
        return nn.functional.cross_entropy(out, yd)

    return torch.func.hessian(f)(x0)


@pytest.mark.parametrize("factory", [make_mlp, make_bn])
@pytest.mark.parametrize("batch_size", [None, 15])
def test_hvp_matches_explicit_hessian(tmp_path, factory, batch_size):
    paths = save_checkpoints(tmp_path, factory, count=2)
    model = factory().double().eval()
    states = [fit_state_dict(load_state_dict(p), model) for p in paths]
    data = toy_data()
    X, frozen = stack_checkpoints(model, states, torch.device("cpu"), torch.float64)
    batches = as_batches(data, batch_size)
    eng = StackedObjective(model, nn.CrossEntropyLoss(), batches, X, frozen)
    V = torch.randn_like(X)
    HV = eng.hvp(V)
    HV2 = eng.hvp(2 * V)  # second call reuses the cached graph when there is one batch
    for b, st in enumerate(states):
        H = _explicit_hessian(factory, st, data)
        torch.testing.assert_close(HV[b], H @ V[b], rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(HV2[b], 2 * (H @ V[b]), rtol=1e-9, atol=1e-11)
        model.load_state_dict(st)
        single = SingleObjective(Objective(model, nn.CrossEntropyLoss(), batches))
        torch.testing.assert_close(single.hvp(V[b : b + 1])[0], H @ V[b], rtol=1e-9, atol=1e-11)


def test_lanczos_and_hutchinson_against_explicit_hessian(tmp_path):
    paths = save_checkpoints(tmp_path, make_mlp, count=2)
    model = make_mlp().double().eval()
    states = [fit_state_dict(load_state_dict(p), model) for p in paths]
    data = toy_data()
    X, frozen = stack_checkpoints(model, states, torch.device("cpu"), torch.float64)
    eng = StackedObjective(model, nn.CrossEntropyLoss(), as_batches(data), X, frozen)
    n = X.shape[1]
    top = lanczos_top(eng, k=3, steps=n, seed=0)  # n steps: the Krylov space is all of R^n
    est, err = hutchinson_trace(eng, samples=300, seed=0)
    for b, st in enumerate(states):
        H = _explicit_hessian(make_mlp, st, data)
        evals = torch.linalg.eigvalsh(H).flip(0)[:3]
        torch.testing.assert_close(top[b], evals, rtol=1e-7, atol=1e-9)
        tr = float(torch.trace(H))
        assert err[b] > 0
        assert abs(float(est[b]) - tr) < 5 * float(err[b]) + 1e-9


@pytest.mark.parametrize("solver", ["apgd", "pga", "lbfgsb"])
def test_keskar_matches_sk_keskar_sharpness(tmp_path, solver):
    from sharpkit.sharpness.keskar import keskar_sharpness

    paths = save_checkpoints(tmp_path / "ck", count=3)
    data = toy_data()
    rows = audit(paths, make_mlp, data, metrics="keskar,keskar-subspace", solver=solver, max_iter=4,
                 subspace_dim=4, dtype="float64", group_size=3)
    for path, row in zip(paths, rows):
        model = make_mlp().double()
        model.load_state_dict(torch.load(path, weights_only=True))
        full = keskar_sharpness(model, nn.CrossEntropyLoss(), data, solver=solver, max_iter=4)
        sub = keskar_sharpness(model, nn.CrossEntropyLoss(), data, solver=solver, max_iter=4, subspace_dim=4)
        assert row["group_size"] == (1 if solver == "lbfgsb" else 3)
        assert row["loss"] == pytest.approx(full.loss, rel=1e-12)
        assert row["keskar"] == pytest.approx(full.value, rel=1e-8, abs=1e-10)
        assert row["keskar-subspace"] == pytest.approx(sub.value, rel=1e-8, abs=1e-10)


def test_ascent_starts_reach_the_rows_and_their_key(tmp_path):
    from sharpkit.sharpness.keskar import keskar_sharpness

    paths = save_checkpoints(tmp_path / "ck", count=2)
    data = toy_data()
    rows = audit(paths, make_mlp, data, metrics="keskar", max_iter=4, restarts=3, first_step="sign",
                 dtype="float64", group_size=2)
    default = audit(paths, make_mlp, data, metrics="keskar", max_iter=4, dtype="float64", group_size=2)
    assert rows[0]["config"]["first_step"] == "sign" and rows[0]["config"]["restarts"] == 3
    assert rows[0]["key"] != default[0]["key"]  # a stored row of one does not stand in for the other
    for path, row in zip(paths, rows):
        model = make_mlp().double()
        model.load_state_dict(torch.load(path, weights_only=True))
        ref = keskar_sharpness(model, nn.CrossEntropyLoss(), data, solver="apgd", max_iter=4, restarts=3,
                               first_step="sign")
        assert row["keskar"] == pytest.approx(ref.value, rel=1e-8, abs=1e-10)
        assert row["details"]["keskar"]["num_evals"] == ref.num_evals == 1 + 4 + 4 + (1 + 4)


def test_first_step_keys_only_box_ascents(tmp_path):
    """An l2 ball has one first step, so first_step changes neither the adaptive-l2 rows nor their
    key (a stored row serves both); on adaptive's box it keys the rows."""
    paths = save_checkpoints(tmp_path / "ck", count=2)
    data = toy_data()
    rows = {(norm, first): audit(paths, make_mlp, data, metrics="adaptive", adaptive_norm=norm, solver="apgd",
                                 max_iter=3, restarts=2, first_step=first, dtype="float64", group_size=2)
            for norm in ("l2", "linf") for first in ("gradient", "sign")}
    l2_gradient, l2_sign = rows["l2", "gradient"], rows["l2", "sign"]
    assert [r["key"] for r in l2_gradient] == [r["key"] for r in l2_sign]
    assert "first_step" not in l2_sign[0]["config"]
    assert [r["adaptive"] for r in l2_gradient] == [r["adaptive"] for r in l2_sign]
    assert rows["linf", "gradient"][0]["key"] != rows["linf", "sign"][0]["key"]


def test_default_ascent_steps_are_each_metrics_own(tmp_path):
    """Without max_iter, keskar takes the paper's 10 steps and adaptive the 20 of sk.adaptive_sharpness;
    the rows equal the API's defaults, and an explicit max_iter applies to both."""
    paths = save_checkpoints(tmp_path / "ck", count=2)
    data = toy_data()
    rows = audit(paths, make_mlp, data, metrics="keskar,adaptive", dtype="float64", group_size=2)
    for path, row in zip(paths, rows):
        model = make_mlp().double()
        model.load_state_dict(torch.load(path, weights_only=True))
        ce = nn.CrossEntropyLoss()
        keskar = sk.keskar_sharpness(model, ce, data, solver="apgd")
        adaptive = sk.adaptive_sharpness(model, ce, data, rho=2e-3)
        assert row["keskar"] == pytest.approx(keskar.value, rel=1e-8, abs=1e-10)
        assert row["adaptive"] == pytest.approx(adaptive.value, rel=1e-8, abs=1e-12)
        assert row["details"]["keskar"]["num_evals"] == 1 + 10
        assert row["details"]["adaptive"]["num_evals"] == 1 + 20
        assert (row["config"]["max_iter"], row["config"]["adaptive_max_iter"]) == (10, 20)
    both = audit(paths[:1], make_mlp, data, metrics="keskar,adaptive", dtype="float64", max_iter=5)
    assert both[0]["details"]["adaptive"]["num_evals"] == both[0]["details"]["keskar"]["num_evals"] == 1 + 5


# --------------------------------------------------------------------------- batched == one at a time


@pytest.mark.parametrize("factory", [make_mlp, make_bn])
def test_batched_equals_one_at_a_time(tmp_path, factory):
    paths = save_checkpoints(tmp_path / "ck", factory, count=5)
    kw = dict(metrics=ALL_METRICS, dtype="float64", subspace_dim=5, max_iter=4, lanczos_steps=8, k=2,
              trace_samples=4, batch_size=15)
    single = audit(paths, factory, toy_data(), group_size=1, **kw)
    batched = audit(paths, factory, toy_data(), group_size=3, **kw)
    assert [r["group_size"] for r in batched] == [3, 3, 3, 2, 2]
    for s, b in zip(single, batched):
        assert s["status"] == b["status"] == "ok"
        assert s["key"] == b["key"]
        for m in ("loss", "keskar", "keskar-subspace", "adaptive", "top-eig", "trace"):
            assert b[m] == pytest.approx(s[m], rel=1e-9, abs=1e-12), m
        assert b["details"]["top-eig"]["values"] == pytest.approx(s["details"]["top-eig"]["values"], rel=1e-9)
    # keskar is the paper's formula applied to the recorded losses.
    for r in batched:
        assert r["keskar"] == pytest.approx(100 * (r["details"]["keskar"]["max_loss"] - r["loss"]) / (1 + r["loss"]))
        assert r["keskar"] >= 0 and r["adaptive"] >= 0


def test_float32_batched_close_to_one_at_a_time(tmp_path):
    paths = save_checkpoints(tmp_path / "ck", count=4)
    kw = dict(metrics="keskar,top-eig", max_iter=3, lanczos_steps=6)
    single = audit(paths, make_mlp, toy_data(), group_size=1, **kw)
    batched = audit(paths, make_mlp, toy_data(), group_size=4, **kw)
    for s, b in zip(single, batched):
        # keskar is 100 * a difference of float32 losses: judge it on the scale of the loss.
        assert b["loss"] == pytest.approx(s["loss"], rel=1e-5)
        assert b["keskar"] == pytest.approx(s["keskar"], abs=100 * 1e-5 * (1 + s["loss"]))
        assert b["top-eig"] == pytest.approx(s["top-eig"], rel=1e-4)


@pytest.mark.parametrize("group_size", [1, 3])
def test_curvature_only_audit_evaluates_the_loss_once_per_group(tmp_path, monkeypatch, group_size):
    """The loss the finiteness check computes is the row's loss: no second pass for it."""
    calls = []
    for engine in (SingleObjective, StackedObjective):
        original = engine.loss

        def counted(self, X, _original=original):
            calls.append(X.shape[0])
            return _original(self, X)

        monkeypatch.setattr(engine, "loss", counted)
    paths = save_checkpoints(tmp_path / "ck", count=3)
    rows = audit(paths, make_mlp, toy_data(), metrics="top-eig,trace", dtype="float64", group_size=group_size,
                 lanczos_steps=4, trace_samples=2)
    assert len(calls) == 3 // group_size
    x, y = toy_data()
    for path, row in zip(paths, rows):
        model = make_mlp().double()
        model.load_state_dict(torch.load(path))
        with torch.no_grad():
            expected = float(nn.functional.cross_entropy(model(x.double()), y))
        assert row["loss"] == pytest.approx(expected, rel=1e-12)


def test_model_left_exactly_as_found(tmp_path):
    paths = save_checkpoints(tmp_path / "ck", make_bn, count=3)
    torch.manual_seed(7)
    model = make_bn().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    audit(paths, model, toy_data(), metrics="keskar,top-eig", group_size=2, max_iter=2, lanczos_steps=3)
    audit(paths, model, toy_data(), metrics="keskar", group_size=1, max_iter=2, bn="train")
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_group_size_from_memory(tmp_path):
    model = make_mlp()
    batches = as_batches(toy_data(), 10)
    cpu = torch.device("cpu")
    n = FlatParams(model).n
    acts = 8 + 8 + 3  # outputs of Linear, Tanh, Linear per sample
    keep = 4 * (10 * n + 4 * acts * 40)  # graphs of all 40 samples kept
    plan = estimate_group_size(model, batches, cpu, torch.float32, 10, available_bytes=1 << 40)
    assert plan.bytes_per_checkpoint == keep and plan.keep_graphs and plan.group_size == 64
    plan = estimate_group_size(model, batches, cpu, torch.float32, 10, memory_fraction=0.5, available_bytes=10 * keep)
    assert plan.group_size == 5 and plan.keep_graphs
    # Too little memory to keep every batch's graph: only the largest batch's activations count.
    plan = estimate_group_size(model, batches, cpu, torch.float32, 10, memory_fraction=1.0, available_bytes=keep - 1)
    assert not plan.keep_graphs and plan.bytes_per_checkpoint == 4 * (10 * n + 4 * acts * 10)
    assert plan.group_size == (keep - 1) // plan.bytes_per_checkpoint
    assert estimate_group_size(model, batches, cpu, torch.float32, 10, available_bytes=1).group_size == 1
    # The automatic choice is used when no group size is given.
    rows = audit(save_checkpoints(tmp_path, count=3), make_mlp, toy_data(), max_iter=2)
    assert all(r["group_size"] == 3 for r in rows)


def test_cpu_plan_does_not_stack_compute_bound_batches():
    from sharpkit.audit.batched import CPU_STACK_MAX_BATCH

    model = make_mlp()
    cpu = torch.device("cpu")
    X = torch.randn(3 * CPU_STACK_MAX_BATCH, 6)
    Y = torch.randint(0, 3, (X.shape[0],))
    big = as_batches((X, Y), None)  # one batch of 3 x the limit
    small = as_batches((X, Y), CPU_STACK_MAX_BATCH // 2)
    assert estimate_group_size(model, big, cpu, torch.float32, 10, available_bytes=1 << 40).group_size == 1
    assert estimate_group_size(model, small, cpu, torch.float32, 10, available_bytes=1 << 40).group_size == 64
    with pytest.raises(ValueError, match="empty"):
        estimate_group_size(model, as_batches([], None), cpu, torch.float32, 10)


def test_regroup_batches_joins_small_and_splits_large_batches():
    from sharpkit.data import regroup_batches

    g = torch.Generator().manual_seed(0)
    sizes = [3, 5, 0, 2, 11, 1, 4]  # an empty batch, one larger than the chunk
    data = [(torch.randn(k, 6, generator=g), torch.randint(0, 3, (k,), generator=g)) for k in sizes]
    chunks = list(regroup_batches(as_batches(data), 8))
    assert [x.shape[0] for x, _ in chunks] == [8, 2, 8, 8]
    assert all(x.shape[0] == y.shape[0] for x, y in chunks)
    torch.testing.assert_close(torch.cat([x for x, _ in chunks]), torch.cat([x for x, _ in data]), rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([y for _, y in chunks]), torch.cat([y for _, y in data]), rtol=0, atol=0)
    assert [x.shape[0] for x, _ in regroup_batches(as_batches(data), 8)] == [8, 2, 8, 8]  # re-iterable
    assert [x.shape[0] for x, _ in regroup_batches(as_batches(data), 100)] == [26]
    # Batches of different sample shapes are never joined.
    mixed = [(torch.zeros(2, 6), torch.zeros(2)), (torch.zeros(3, 5), torch.zeros(3)), (torch.zeros(1, 5), torch.zeros(1))]
    assert [tuple(x.shape) for x, _ in regroup_batches(as_batches(mixed), 10)] == [(2, 6), (4, 5)]
    with pytest.raises(ValueError, match="rows"):
        regroup_batches(as_batches(data), 0)


def test_plan_regroups_small_batches_within_memory():
    from sharpkit.audit.batched import CPU_STACK_MAX_BATCH

    model = make_mlp()
    cpu = torch.device("cpu")
    n = FlatParams(model).n
    acts = 8 + 8 + 3
    X = torch.randn(3 * CPU_STACK_MAX_BATCH, 6)
    Y = torch.randint(0, 3, (X.shape[0],))
    small = as_batches((X, Y), 10)
    # Batches as given: small ones are stacked; regrouped to passes above the CPU limit: one at a time.
    assert estimate_group_size(model, small, cpu, torch.float32, 10, available_bytes=1 << 40).pass_rows is None
    plan = estimate_group_size(model, small, cpu, torch.float32, 10, available_bytes=1 << 40, regroup_rows=4096)
    assert plan.group_size == 1 and plan.keep_graphs and plan.pass_rows == 4096
    assert estimate_group_size(model, small, cpu, torch.float32, 10, available_bytes=1 << 40,
                               regroup_rows=CPU_STACK_MAX_BATCH // 2).group_size == 64
    # Graphs not kept: the passes hold what memory allows, never fewer rows than the largest batch.
    room = 4 * (10 * n + 4 * acts * 1000)
    plan = estimate_group_size(model, small, cpu, torch.float32, 10, memory_fraction=1.0, available_bytes=room,
                               regroup_rows=4096)
    assert not plan.keep_graphs and plan.group_size == 1 and 999 <= plan.pass_rows <= 1000
    # Room for 100 rows of one checkpoint: below the CPU limit, so a group is stacked and its passes
    # shrink to what the group's memory holds.
    room = 4 * (10 * n + 4 * acts * 100)
    plan = estimate_group_size(model, small, cpu, torch.float32, 10, memory_fraction=1.0, available_bytes=room,
                               regroup_rows=4096)
    assert plan.group_size > 1 and 10 <= plan.pass_rows < 100
    assert plan.group_size * 4 * (10 * n + 4 * acts * plan.pass_rows) <= room
    plan = estimate_group_size(model, small, cpu, torch.float32, 10, memory_fraction=1.0, available_bytes=1,
                               regroup_rows=4096)
    assert plan.pass_rows == 10
    # Joining would change the objective of a loss that is not a (weighted) per-sample mean: the
    # batches stay as given.  A class-weighted cross-entropy is one, with each batch weighing its
    # targets' class weights.
    def squared(out, t):
        return nn.functional.cross_entropy(out, t) ** 2

    weighted = nn.CrossEntropyLoss(weight=torch.tensor([0.5, 1.0, 2.0]))
    for loss_fn, rows in ((squared, None), (weighted, 4096), (nn.CrossEntropyLoss(), 4096)):
        assert estimate_group_size(model, small, cpu, torch.float32, 10, available_bytes=1 << 40, regroup_rows=4096,
                                   loss_fn=loss_fn).pass_rows == rows


def test_one_at_a_time_audit_regroups_small_batches(tmp_path):
    paths = save_checkpoints(tmp_path / "ck", count=2)
    kw = dict(metrics="keskar,top-eig,trace", dtype="float64", max_iter=3, trace_samples=3, group_size=1)
    calls = []

    def counting_model():
        m = make_mlp()
        m.register_forward_hook(lambda *_: calls.append(1))
        return m

    whole = audit(paths, counting_model, toy_data(), **kw)
    calls_whole = len(calls)
    calls.clear()
    batched_data = audit(paths, counting_model, toy_data(), batch_size=4, **kw)
    # 40 samples in batches of 4 are measured in passes of all 40: as many forward calls as one batch,
    # plus the planning forwards of the largest batch's halves (whether its samples interact).
    assert len(calls) == calls_whole + 2
    for a, b in zip(whole, batched_data):
        for m in ("loss", "keskar", "top-eig", "trace"):
            assert a[m] == pytest.approx(b[m], rel=1e-10, abs=1e-12)
    # With batch statistics (bn="train") the batches are kept as given.
    bn_paths = save_checkpoints(tmp_path / "bn", make_bn, count=1)
    calls.clear()

    def counting_bn():
        m = make_bn()
        m.register_forward_hook(lambda *_: calls.append(1))
        return m

    audit(bn_paths, counting_bn, toy_data(), bn="train", batch_size=20, **kw)
    calls_20 = len(calls)
    calls.clear()
    audit(bn_paths, counting_bn, toy_data(), bn="train", batch_size=10, **kw)
    assert len(calls) > calls_20


def test_hvp_without_kept_graphs_and_split_batches(tmp_path):
    paths = save_checkpoints(tmp_path, make_mlp, count=2)
    model = make_mlp().double().eval()
    states = [fit_state_dict(load_state_dict(p), model) for p in paths]
    X, frozen = stack_checkpoints(model, states, torch.device("cpu"), torch.float64)
    V = torch.randn_like(X)
    loss = nn.CrossEntropyLoss()
    ref = StackedObjective(model, loss, as_batches(toy_data()), X, frozen)
    other = StackedObjective(model, loss, as_batches(toy_data()), X, frozen, keep_graphs=False, max_rows=7)
    assert len(list(other.batches)) == 6
    torch.testing.assert_close(other.hvp(V), ref.hvp(V), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(other.loss_and_grad(X)[1], ref.loss_and_grad(X)[1], rtol=1e-10, atol=1e-12)


def test_bn_train_batched_equals_one_at_a_time(tmp_path):
    paths = save_checkpoints(tmp_path / "ck", make_bn, count=3)
    kw = dict(metrics="keskar,trace", dtype="float64", max_iter=3, trace_samples=3, bn="train", batch_size=20)
    single = audit(paths, make_bn, toy_data(), group_size=1, **kw)
    batched = audit(paths, make_bn, toy_data(), group_size=3, **kw)
    for s, b in zip(single, batched):
        for m in ("loss", "keskar", "trace"):
            assert b[m] == pytest.approx(s[m], rel=1e-9), m


# --------------------------------------------------------------------------- store


def test_store_skips_done_and_never_duplicates(tmp_path):
    paths = save_checkpoints(tmp_path / "ck", count=3)
    out = tmp_path / "a.jsonl"
    first = audit(paths, make_mlp, toy_data(), out=out, max_iter=2)
    text = out.read_text(encoding="utf-8")
    again = audit(paths + [paths[0]], make_mlp, toy_data(), out=out, max_iter=2)
    assert out.read_text(encoding="utf-8") == text  # nothing recomputed, nothing appended
    assert [r["key"] for r in again] == [r["key"] for r in first]
    assert [r["finished_at"] for r in again] == [r["finished_at"] for r in first]
    # Another configuration is another key: new rows, the old ones kept.
    audit(paths, make_mlp, toy_data(), out=out, max_iter=2, epsilon=5e-4)
    lines = out.read_text(encoding="utf-8").splitlines()
    keys = [json.loads(line)["key"] for line in lines]
    assert len(lines) == 6 and len(set(keys)) == 6
    # A copy of a checkpoint under another name has the same content hash: measured once, stored
    # once, but each path gets its own row.
    copy = tmp_path / "ck" / "copy.pt"
    copy.write_bytes(paths[0].read_bytes())
    rows = audit([paths[0], copy], make_mlp, toy_data(), out=out, max_iter=2)
    assert [r["key"] for r in rows] == [first[0]["key"]] * 2
    assert [r["checkpoint"] for r in rows] == [str(paths[0]), str(copy)]
    assert [r["name"] for r in rows] == ["step_10.pt", "copy.pt"]
    assert len(out.read_text(encoding="utf-8").splitlines()) == 6


@pytest.mark.parametrize("tail", [b'{"key": "abc", "status": "o', b'{"key": "x"', b'{"'])
def test_store_repairs_torn_last_line(tmp_path, tail):
    path = tmp_path / "s.jsonl"
    with ResultStore(path) as store:  # (closed: an open store locks its file)
        assert store.append({"key": "k1", "v": 1}) and not store.append({"key": "k1", "v": 2})
        store.append({"key": "k2", "v": float("nan")})
    good = path.read_bytes()
    with open(path, "ab") as fh:
        fh.write(tail)
    reopened = ResultStore(path)
    assert reopened.repaired_bytes == len(tail)
    assert path.read_bytes() == good
    assert [r["key"] for r in reopened.rows()] == ["k1", "k2"] and reopened.get("k2")["v"] is None
    reopened.append({"key": "k3"})
    assert [json.loads(line)["key"] for line in path.read_text(encoding="utf-8").splitlines()] == ["k1", "k2", "k3"]


FOREIGN_FILES = {
    "html": b"<!DOCTYPE html>\n<html><body>\n<p>report</p>\n</body></html>\n",
    "html-no-final-newline": b"<!DOCTYPE html>\n<html><body></body></html>",
    "csv": b"name,keskar\nstep_10.pt,1.5\n",
    "one-line-text": b"notes",
    "complete-bad-last-line": b'{"key": "k1", "v": 1}\nnot json at all\n',
    "bad-line-in-the-middle": b'{"key": "k1"}\n<p>\n{"key": "k2"}\n',
    "binary": bytes(range(256)) + b"\n",
    # One line of the user's beginning like a row, without a newline: not a torn row of the store's.
    "json-like-one-line": b'{"model": "f1", "lr": 0.1, "note": "unfinished',
    "json-like-after-blank-lines": b'\n\n{"epochs": 3, ',
}


@pytest.mark.parametrize("kind", sorted(FOREIGN_FILES))
def test_store_refuses_foreign_file_and_leaves_it_intact(tmp_path, kind):
    path = tmp_path / "precious.out"
    path.write_bytes(FOREIGN_FILES[kind])
    with pytest.raises(ValueError, match="not an audit results file"):
        ResultStore(path)
    assert path.read_bytes() == FOREIGN_FILES[kind]


@pytest.mark.parametrize("metrics, cut", [("keskar", None), ("keskar,adaptive", None), ("trace", None),
                                          ("keskar,adaptive", 8), ("keskar", 5)])
def test_store_repairs_a_torn_first_row(tmp_path, metrics, cut):
    # A crash in the file's first append: the torn line begins as an audit row does (its first
    # key sorted: "checkpoint", or "adaptive" where the row has it).
    path = tmp_path / "a.jsonl"
    rows = audit(save_checkpoints(tmp_path / "ck", count=1), make_mlp, toy_data(), out=path, max_iter=1,
                 metrics=metrics, trace_samples=2)
    line = path.read_bytes()
    cut = len(line) // 2 if cut is None else cut  # (also inside the row's first key)
    path.write_bytes(line[:cut])
    store = ResultStore(path)
    assert store.repaired_bytes == cut and len(store) == 0 and path.read_bytes() == b""
    store.append(rows[0])
    assert path.read_bytes() == line


def test_cli_refuses_foreign_out_file(tmp_path, nets, capsys):
    from sharpkit.cli import main

    save_checkpoints(tmp_path / "ck", nets.make_mlp, count=1)
    report = tmp_path / "report.html"
    report.write_bytes(FOREIGN_FILES["html"])
    code = main(["audit", str(tmp_path / "ck"), "--model", "auditnets:make_mlp", "--data", "auditnets:data",
                 "--out", str(report), "--no-progress", "--max-iter", "1"])
    assert code == 2 and "not an audit results file" in capsys.readouterr().err
    assert report.read_bytes() == FOREIGN_FILES["html"]
    # A one-line configuration file of the user's, no final newline: refused, left byte for byte.
    cfg = tmp_path / "cfg.json"
    cfg.write_bytes(FOREIGN_FILES["json-like-one-line"])
    code = main(["audit", str(tmp_path / "ck"), "--model", "auditnets:make_mlp", "--data", "auditnets:data",
                 "--out", str(cfg), "--no-progress", "--max-iter", "1"])
    assert code == 2 and f"{cfg}:1: not a JSON line; not an audit results file" in capsys.readouterr().err
    assert cfg.read_bytes() == FOREIGN_FILES["json-like-one-line"]


@pytest.mark.skipif(sys.platform == "win32", reason="no flock on Windows: the store works unlocked")
def test_open_store_locks_its_file(tmp_path, nets, capsys):
    from sharpkit.cli import main

    path = tmp_path / "a.jsonl"
    first = ResultStore(path)
    first.append({"key": "k1"})
    # flock locks belong to an open file: a second open in this process conflicts as another process's would.
    with pytest.raises(ValueError, match=f"results file {path}: another audit is writing it"):
        ResultStore(path)
    paths = save_checkpoints(tmp_path / "ck", nets.make_mlp, count=1)
    with pytest.raises(ValueError, match="another audit is writing it"):
        audit(paths, make_mlp, toy_data(), out=path, max_iter=1)
    code = main(["audit", str(tmp_path / "ck"), "--model", "auditnets:make_mlp", "--data", "auditnets:data",
                 "--out", str(path), "--no-progress", "--max-iter", "1"])
    err = capsys.readouterr().err
    assert code == 2 and f"{path}: another audit is writing it" in err and "Traceback" not in err, err
    assert path.read_bytes() == b'{"key": "k1"}\n'  # nothing appended, nothing repaired
    first.close()
    with ResultStore(path) as again:
        assert len(again) == 1
    # The audit's lock is released however the audit ends (here: data it cannot use).
    with pytest.raises(ValueError, match="data is empty"):
        audit(paths, make_mlp, (torch.zeros(0, 6), torch.zeros(0, dtype=torch.long)), out=path)
    assert len(audit(paths, make_mlp, toy_data(), out=path, max_iter=1)) == 1
    assert len(path.read_text(encoding="utf-8").splitlines()) == 2


@pytest.mark.skipif(sys.platform == "win32", reason="no flock on Windows: the store works unlocked")
def test_second_audit_process_on_one_out_file_is_refused(tmp_path, nets, capsys):
    from sharpkit.cli import main

    out = tmp_path / "a.jsonl"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from sharpkit.audit.store import ResultStore; s = ResultStore(sys.argv[1]); "
         "print('open', flush=True); sys.stdin.read()", str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        save_checkpoints(tmp_path / "ck", nets.make_mlp, count=2)
        args = ["audit", str(tmp_path / "ck"), "--model", "auditnets:make_mlp", "--data", "auditnets:data",
                "--out", str(out), "--no-progress", "--max-iter", "1"]
        assert main(args) == 2
        assert f"results file {out}: another audit is writing it" in capsys.readouterr().err
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert main(args) == 0 and len(out.read_text(encoding="utf-8").splitlines()) == 2


def test_store_created_for_an_audit_that_stops_is_removed(tmp_path):
    out = tmp_path / "runs" / "a.jsonl"
    with pytest.raises(ValueError, match="data is empty"):
        audit(save_checkpoints(tmp_path / "ck", count=1), make_mlp, (torch.zeros(0, 6), torch.zeros(0, dtype=torch.long)),
              out=out)
    assert not out.exists()  # an empty results file is not left behind
    # A file that was there (even empty) is the user's: kept.
    out.write_bytes(b"")
    ResultStore(out).close()
    assert out.exists()


def test_store_keeps_a_whole_row_missing_its_newline(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'{"key": "k1", "v": 1}\n{"key": "k2", "v": 2}')
    store = ResultStore(path)
    assert store.repaired_bytes == 0 and [r["key"] for r in store.rows()] == ["k1", "k2"]
    store.append({"key": "k3"})
    assert [json.loads(line)["key"] for line in path.read_text(encoding="utf-8").splitlines()] == ["k1", "k2", "k3"]


def test_store_writes_strict_json(tmp_path):
    def strict(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    path = tmp_path / "s.jsonl"
    ResultStore(path).append({"key": "k", "loss": float("nan"), "details": {"values": [1.0, float("inf"), -float("inf")]}})
    row = json.loads(path.read_text(encoding="utf-8"), parse_constant=strict)
    assert row["loss"] is None and row["details"]["values"] == [1.0, None, None]


def test_store_rejects_foreign_file(tmp_path):
    path = tmp_path / "other.jsonl"
    path.write_text('{"a": 1}\n{"b": 2}\n')
    with pytest.raises(ValueError, match="row without a 'key'"):
        ResultStore(path)


def test_identical_files_under_several_paths_each_get_their_row(tmp_path):
    # Two runs from one initialisation share an identical epoch_0.pt.
    runs = tmp_path / "runs"
    for run in ("sb", "lb"):
        save_checkpoints(runs / run, count=2, prefix="epoch_")  # epoch_10.pt, epoch_20.pt
        (runs / run / "epoch_10.pt").rename(runs / run / "epoch_0.pt")
    torch.manual_seed(7)
    torch.save(make_mlp().state_dict(), runs / "lb" / "epoch_20.pt")  # the runs part after epoch 0
    assert (runs / "lb" / "epoch_0.pt").read_bytes() == (runs / "sb" / "epoch_0.pt").read_bytes()
    out = tmp_path / "a.jsonl"
    rows = audit(str(runs / "*"), make_mlp, toy_data(), out=out, max_iter=2)
    assert [r["name"] for r in rows] == ["lb/epoch_0.pt", "lb/epoch_20.pt", "sb/epoch_0.pt", "sb/epoch_20.pt"]
    assert [r["checkpoint"] for r in rows] == [str(runs / n) for n in ("lb/epoch_0.pt", "lb/epoch_20.pt", "sb/epoch_0.pt", "sb/epoch_20.pt")]
    assert [r["epoch"] for r in rows] == [0, 20, 0, 20]
    shared = [r for r in rows if r["name"].endswith("epoch_0.pt")]
    assert shared[0]["key"] == shared[1]["key"] and shared[0]["keskar"] == shared[1]["keskar"]
    assert len(out.read_text(encoding="utf-8").splitlines()) == 3  # measured and stored once
    assert "4 checkpoints" in render_html(rows, ["keskar"])
    # Resumed in another order: every row still carries its own path.
    again = audit([runs / "sb" / "epoch_0.pt", runs / "lb" / "epoch_0.pt"], make_mlp, toy_data(), out=out, max_iter=2)
    assert [r["checkpoint"] for r in again] == [str(runs / "sb" / "epoch_0.pt"), str(runs / "lb" / "epoch_0.pt")]
    assert [r["name"] for r in again] == ["sb/epoch_0.pt", "lb/epoch_0.pt"]
    assert len(out.read_text(encoding="utf-8").splitlines()) == 3


def test_identical_bad_files_get_errors_naming_their_own_path(tmp_path):
    good = save_checkpoints(tmp_path / "ck", count=1)
    first, second = tmp_path / "a" / "bad.pt", tmp_path / "b" / "bad.pt"
    for p in (first, second):
        p.parent.mkdir()
    torch.save({**make_mlp().state_dict(), "0.bias": torch.full((8,), float("nan"))}, first)
    second.write_bytes(first.read_bytes())  # one content, one stored row, two paths
    rows = audit([good[0], first, second], make_mlp, toy_data(), max_iter=1)
    assert [r["status"] for r in rows] == ["ok", "error", "error"]
    assert str(first) in rows[1]["error"] and str(second) in rows[2]["error"]
    assert str(first) not in rows[2]["error"]


def test_kill_and_resume(tmp_path, nets):
    ckdir = tmp_path / "ck"
    save_checkpoints(ckdir, nets.make_slow, count=8)
    out = tmp_path / "audit.jsonl"
    torch.save(dict(zip(("x", "y"), toy_data())), tmp_path / "data.pt")
    cmd = [sys.executable, "-m", "sharpkit", "audit", str(ckdir), "--model", "auditnets:make_slow",
           "--data", str(tmp_path / "data.pt"), "--out", str(out), "--group-size", "2", "--max-iter", "3",
           "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "AUDIT_TEST_SLEEP": "0.04", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    raw = out.read_bytes()
    assert raw.endswith(b"\n"), "torn last line"
    before = [json.loads(line) for line in raw.decode().splitlines()]
    assert 2 <= len(before) < 8
    resumed = subprocess.run(cmd, env={**env, "AUDIT_TEST_SLEEP": "0"}, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    after_raw = out.read_bytes()
    assert after_raw.startswith(raw)  # rows of the killed run kept as they were
    rows = [json.loads(line) for line in after_raw.decode().splitlines()]
    assert len(rows) == 8 and len({r["key"] for r in rows}) == 8
    assert sorted(r["name"] for r in rows) == sorted(p.name for p in ckdir.iterdir())
    assert all(r["status"] == "ok" for r in rows)


# --------------------------------------------------------------------------- report and CLI


def test_report_table_and_html(tmp_path):
    rows = [
        {"name": "b.pt", "step": 200, "epoch": None, "status": "ok", "loss": 0.5, "keskar": 2.0},
        {"name": "a.pt", "step": 100, "epoch": None, "status": "ok", "loss": 0.7, "keskar": 1.0},
        {"name": "z.pt", "checkpoint": "runs/z.pt", "step": None, "epoch": None, "status": "error",
         "error": "runs/z.pt: file not found"},
    ]
    assert [r["name"] for r in sort_rows(rows)] == ["a.pt", "b.pt", "z.pt"]
    table = format_table(rows, ["keskar"])
    lines = table.splitlines()
    assert lines[0].split() == ["name", "epoch", "step", "status", "loss", "keskar"]
    assert lines[2].split() == ["a.pt", "-", "100", "ok", "0.7", "1"]
    assert "error: z.pt: file not found" in table  # the row's name, then the reason: the path once
    path = write_html(tmp_path / "r" / "audit.html", rows, ["keskar"])
    doc = path.read_text(encoding="utf-8")
    assert doc.count("data:image/png;base64,") == 2  # loss and keskar against step
    assert "<td>a.pt</td>" in doc and "file not found" in doc and "src=\"http" not in doc
    assert not list((tmp_path / "r").glob(".*tmp*"))
    assert render_html([], ["keskar"]).startswith("<!DOCTYPE html>")


def test_report_says_what_each_column_measures_with_the_audits_settings(tmp_path, nets):
    paths = save_checkpoints(tmp_path / "ck", nets.make_mlp, count=1)
    metrics = ["keskar", "keskar-subspace", "adaptive", "top-eig", "trace"]
    rows = audit(paths, nets.make_mlp, toy_data(), metrics=metrics, epsilon=5e-4, subspace_dim=7, rho=0.05,
                 adaptive_norm="l2", max_iter=2, k=2, lanczos_steps=6, trace_samples=3)
    doc = render_html(rows, metrics)
    terms = dict(re.findall(r"<dt>(.*?)</dt><dd>(.*?)</dd>", doc))
    assert list(terms) == ["loss", *metrics]
    assert "in percent" in terms["keskar"] and "ε = 0.0005" in terms["keskar"] and "2 steps of apgd" in terms["keskar"]
    assert "p = 7" in terms["keskar-subspace"] and "ε = 0.0005" in terms["keskar-subspace"]
    assert "loss units" in terms["adaptive"] and "ρ = 0.05" in terms["adaptive"] and "‖δ ⊘ c‖₂" in terms["adaptive"]
    assert "2 steps of apgd" in terms["adaptive"]  # its own max_iter: 2 given for every ascent
    assert "6 steps" in terms["top-eig"] and "k = 2" in terms["top-eig"]
    assert "3 Rademacher probes" in terms["trace"]
    # the l∞ box and standard sharpness read as such
    rows = audit(paths, nets.make_mlp, toy_data(), metrics=["adaptive"], adaptive_scale=False, max_iter=1)
    (text,) = re.findall(r"<dt>adaptive</dt><dd>(.*?)</dd>", render_html(rows, ["adaptive"]))
    assert "|δ_i| ≤ ρ c_i with c_i = 1" in text and "1 step of apgd" in text


def test_cli_end_to_end(tmp_path, nets, capsys):
    from sharpkit.cli import main

    ckdir = tmp_path / "ck"
    paths = save_checkpoints(ckdir, nets.make_mlp, count=3, prefix="epoch=1-step=")
    torch.save(dict(zip(("x_train", "y_train"), toy_data())), tmp_path / "data.pt")
    out, report = tmp_path / "audit.jsonl", tmp_path / "audit.html"
    args = ["audit", str(ckdir / "*.pt"), "--model", "auditnets:make_mlp", "--data", str(tmp_path / "data.pt"),
            "--metrics", "keskar,top-eig", "--out", str(out), "--report", str(report), "--max-iter", "2",
            "--lanczos-steps", "4", "--dtype", "float64", "--group-size", "2"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "keskar" in captured.out and "top-eig" in captured.out
    assert "ckpt" in captured.err  # tqdm progress bar on stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["step"] for r in rows) == [10, 20, 30] and {r["epoch"] for r in rows} == {1}
    assert "data:image/png;base64," in report.read_text(encoding="utf-8")
    # Same rows through the Python API (same configuration -> same keys, nothing appended).
    api = sk.audit(paths, "auditnets:make_mlp", str(tmp_path / "data.pt"), metrics=["keskar", "top-eig"],
                   out=out, max_iter=2, lanczos_steps=4, dtype="float64")
    assert sorted(r["key"] for r in api) == sorted(r["key"] for r in rows)
    # One bad checkpoint: exit code 1, its error in the table, the others reported.
    (ckdir / "epoch=1-step=40.pt").write_bytes(b"garbage")
    assert main(args + ["--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "cannot load" in captured.out and "1 of 4 checkpoints failed" in captured.err
    # Bad arguments: exit code 2 with a message.
    assert main(["audit", str(ckdir), "--model", "auditnets:make_mlp", "--metrics", "sharpest"]) == 2
    assert "unknown metric" in capsys.readouterr().err
    assert main(["audit", str(ckdir), "--model", "auditnets:nope", "--data", str(tmp_path / "data.pt")]) == 2
    assert "nope" in capsys.readouterr().err


def test_table_error_lines_name_the_checkpoint_once(tmp_path):
    good = save_checkpoints(tmp_path / "ck", count=1)
    bad = tmp_path / "bad" / "nan.pt"
    bad.parent.mkdir()
    torch.save({**make_mlp().state_dict(), "0.bias": torch.full((8,), float("nan"))}, bad)
    missing = tmp_path / "bad" / "gone.pt"
    rows = audit([good[0], bad, missing], make_mlp, toy_data(), max_iter=1)
    errors = [line for line in format_table(rows, ["keskar"]).splitlines() if line.startswith("error:")]
    assert errors == [f"error: {rows[2]['name']}: file not found",
                      f"error: {rows[1]['name']}: tensor '0.bias' contains NaN; sharpness of a non-finite model is undefined"]
    # A message that does not start with the path is shown whole.
    row = {"name": "a.pt", "checkpoint": "runs/a.pt", "status": "error", "error": "the loss or a metric is not finite"}
    assert "error: a.pt: the loss or a metric is not finite" in format_table([row], ["keskar"])


def test_report_orders_rows_by_step_or_epoch_and_plots_that_axis(tmp_path, monkeypatch):
    from sharpkit.audit import report

    plots = []
    monkeypatch.setattr(report, "_plot", lambda rows, metric, axis: plots.append((metric, axis, [r["name"] for r in rows])) or "")

    def row(name, step, epoch):
        return {"name": name, "step": step, "epoch": epoch, "status": "ok", "loss": 0.5, "keskar": 1.0}

    # Every row has a step: by step, even where some also have an epoch.
    rows = [row("step=300.ckpt", 300, None), row("epoch=2-step=200.ckpt", 200, 2), row("epoch=1-step=100.ckpt", 100, 1)]
    assert [r["step"] for r in sort_rows(rows)] == [100, 200, 300]
    render_html(rows, ["keskar"])
    assert plots[-1] == ("keskar", "step", ["epoch=1-step=100.ckpt", "epoch=2-step=200.ckpt", "step=300.ckpt"])
    # One unnumbered last.ckpt: the others are still ordered and plotted by epoch; last.ckpt is
    # listed, not plotted at a made-up position.
    plots.clear()
    rows = [row("last.ckpt", None, None), row("epoch_2.pt", None, 2), row("epoch_10.pt", None, 10), row("epoch_1.pt", None, 1)]
    assert [r["name"] for r in sort_rows(rows)] == ["epoch_1.pt", "epoch_2.pt", "epoch_10.pt", "last.ckpt"]
    doc = render_html(rows, ["keskar"])
    assert plots == [(m, "epoch", ["epoch_1.pt", "epoch_2.pt", "epoch_10.pt"]) for m in ("loss", "keskar")]
    assert "Not plotted (no epoch in their paths): last.ckpt" in doc
    # An unnumbered row does not stop the others being ordered by step.
    rows = [row("last.ckpt", None, None), row("epoch=2-step=200.ckpt", 200, 2), row("step=300.ckpt", 300, None),
            row("epoch=1-step=100.ckpt", 100, 1)]
    assert [r["name"] for r in sort_rows(rows)] == ["epoch=1-step=100.ckpt", "epoch=2-step=200.ckpt", "step=300.ckpt", "last.ckpt"]
    # Epochs for most rows and steps for a few: by epoch, the step-only rows listed, not plotted.
    plots.clear()
    rows = [row("epoch_1.pt", None, 1), row("epoch_2.pt", None, 2), row("step-50.ckpt", 50, None)]
    assert [r["name"] for r in sort_rows(rows)] == ["epoch_1.pt", "epoch_2.pt", "step-50.ckpt"]
    assert "Not plotted (no epoch in their paths): step-50.ckpt" in render_html(rows, ["keskar"])
    # No numbers at all: by name, against the rows' order.
    plots.clear()
    render_html([row("b.pt", None, None), row("a.pt", None, None)], ["keskar"])
    assert plots[-1] == ("keskar", None, ["a.pt", "b.pt"])


def test_report_plots_one_line_per_run():
    from sharpkit.audit.report import _series

    rows = [{"name": f"{run}/epoch_{e}.pt", "epoch": e} for e in (1, 2) for run in ("sb", "lb")]
    assert [(run, [r["name"] for r in members]) for run, members in _series(rows)] == [
        ("sb", ["sb/epoch_1.pt", "sb/epoch_2.pt"]), ("lb", ["lb/epoch_1.pt", "lb/epoch_2.pt"])]
    hf = [{"name": f"checkpoint-{s}/pytorch_model.bin", "step": s} for s in (500, 1000)]
    assert _series(hf) == [(None, hf)]  # one checkpoint per folder: one line
    doc = render_html([{**r, "status": "ok", "loss": 0.1, "keskar": 1.0} for r in rows], ["keskar"])
    assert doc.count("data:image/png;base64,") == 2


def test_cli_help_documents_exit_codes():
    from sharpkit.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["audit"]
    text = sub.format_help()
    assert "exit codes" in text and "status \"error\"" in text
    # Identical files: one --out line per content, one row per path in the table and report.
    flat = " ".join(text.split())
    assert "one line per checkpoint content and configuration" in flat
    assert "measured once and stored in one --out line; each path gets its own row" in flat


def test_data_module_function_dataloader(tmp_path, nets):
    paths = save_checkpoints(tmp_path / "ck", nets.make_mlp, count=2)
    via_loader = audit(paths, "auditnets:make_mlp", "auditnets:loader", metrics="keskar", max_iter=2, dtype="float64")
    via_tensors = audit(paths, make_mlp, toy_data(), metrics="keskar", max_iter=2, dtype="float64", batch_size=16)
    for a, b in zip(via_loader, via_tensors):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-12)
        assert a["keskar"] == pytest.approx(b["keskar"], rel=1e-9)


def test_num_classes_counted_over_all_batches(tmp_path, nets):
    from sharpkit.audit import resolve_model

    batches = as_batches(nets.sorted_loader())
    assert int(next(iter(batches))[1].max()) == 0  # the first batch shows class 0 only
    model, _ = resolve_model("auditnets:make_classes", batches, num_classes=None)
    assert model[-1].out_features == 3
    paths = save_checkpoints(tmp_path / "ck", nets.make_mlp, count=2)
    rows = audit(paths, "auditnets:make_classes", "auditnets:sorted_loader", max_iter=1)
    assert [r["status"] for r in rows] == ["ok", "ok"], rows[0].get("error")


def _stored_keys(out: Path) -> list[str]:
    return [json.loads(line)["key"] for line in out.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_rewritten_data_file_is_not_served_old_rows(tmp_path, suffix):
    import numpy as np

    paths = save_checkpoints(tmp_path / "ck", count=1)
    data_file, out = tmp_path / f"train{suffix}", tmp_path / "a.jsonl"

    def write(seed):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
        if suffix == ".pt":
            torch.save({"x": x, "y": y}, data_file)
        else:
            np.savez(data_file, x_train=x.numpy(), y_train=y.numpy())

    write(1)
    first = audit(paths, make_mlp, str(data_file), out=out, max_iter=1)
    write(2)  # other data of the same size under the same name
    second = audit(paths, make_mlp, str(data_file), out=out, max_iter=1)
    assert second[0]["key"] != first[0]["key"] and second[0]["loss"] != first[0]["loss"]
    assert len(_stored_keys(out)) == 2
    write(2)  # the same bytes again: resumed
    assert audit(paths, make_mlp, str(data_file), out=out, max_iter=1)[0]["key"] == second[0]["key"]
    assert len(_stored_keys(out)) == 2


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_renamed_or_copied_data_file_keeps_its_rows(tmp_path, suffix):
    import numpy as np

    paths = save_checkpoints(tmp_path / "ck", count=1)
    data_file, out = tmp_path / f"train{suffix}", tmp_path / "a.jsonl"
    x, y = toy_data()
    if suffix == ".pt":
        torch.save({"x": x, "y": y}, data_file)
    else:
        np.savez(data_file, x_train=x.numpy(), y_train=y.numpy())
    first = audit(paths, make_mlp, str(data_file), out=out, max_iter=1)
    text = out.read_text(encoding="utf-8")
    copy = tmp_path / "elsewhere" / f"copy{suffix}"
    copy.parent.mkdir()
    copy.write_bytes(data_file.read_bytes())
    data_file.rename(tmp_path / f"renamed{suffix}")
    for moved in (copy, tmp_path / f"renamed{suffix}"):
        again = audit(paths, make_mlp, str(moved), out=out, max_iter=1)
        assert again[0]["key"] == first[0]["key"] and again[0]["finished_at"] == first[0]["finished_at"]
    assert out.read_text(encoding="utf-8") == text  # nothing measured again


def test_data_descriptions_of_other_specs_keep_their_keys(nets):
    # Stores written before file data were keyed by content alone keep their rows for these specs.
    from sharpkit.inputs import resolve_data

    assert resolve_data("mnist1d")[1] == "mnist1d:train:4000"
    assert resolve_data("digits")[1] == "digits:train:1438"
    assert resolve_data("auditnets:data")[1] == "auditnets:data:fee51d08f12c4bae:40"


def test_data_function_keyed_by_content_not_order(tmp_path, nets, monkeypatch):
    paths = save_checkpoints(tmp_path / "ck", nets.make_mlp, count=1)
    out = tmp_path / "a.jsonl"
    first = audit(paths, make_mlp, "auditnets:env_data", out=out, max_iter=1)
    monkeypatch.setenv("AUDIT_TEST_DATA_SEED", "2")  # the function now returns other data
    second = audit(paths, make_mlp, "auditnets:env_data", out=out, max_iter=1)
    assert second[0]["key"] != first[0]["key"] and second[0]["loss"] != first[0]["loss"]
    # A loader that shuffles on every pass keeps its key (the samples are the same): it resumes.
    keys = {audit(paths, make_mlp, "auditnets:shuffled_loader", out=out, max_iter=1)[0]["key"] for _ in range(3)}
    assert len(keys) == 1 and len(_stored_keys(out)) == 3


def test_model_architecture_and_loss_options_key_the_rows(tmp_path, nets):
    paths = save_checkpoints(tmp_path / "ck", nets.make_mlp, count=1)
    out = tmp_path / "a.jsonl"
    tanh = audit(paths, nets.make_mlp, toy_data(), out=out, max_iter=1)[0]
    relu = audit(paths, nets.make_relu, toy_data(), out=out, max_iter=1)[0]  # same tensors, other activation
    assert relu["key"] != tanh["key"] and relu["loss"] != tanh["loss"]
    smooth = audit(paths, nets.make_mlp, toy_data(), out=out, max_iter=1,
                   loss_fn=nn.CrossEntropyLoss(label_smoothing=0.5))[0]
    assert smooth["key"] != tanh["key"] and smooth["loss"] != tanh["loss"]
    weighted = audit(paths, nets.make_mlp, toy_data(), out=out, max_iter=1,
                     loss_fn=nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0])))[0]
    assert weighted["key"] != tanh["key"] and weighted["loss"] != tanh["loss"]
    # The built-in name, and the module it stands for, are one loss; a function is its qualified name.
    same = audit(paths, nets.make_mlp, toy_data(), out=out, max_iter=1, loss_fn=nn.CrossEntropyLoss())[0]
    assert same["key"] == tanh["key"]
    functional = audit(paths, nets.make_mlp, toy_data(), out=out, max_iter=1, loss_fn=nn.functional.cross_entropy)[0]
    assert functional["config"]["loss"] == "torch.nn.functional.cross_entropy"
    assert len(set(_stored_keys(out))) == 5


def test_misfit_output_layer_says_the_class_count_came_from_the_labels(tmp_path, nets):
    from sharpkit.study.models import build_model

    (tmp_path / "ck").mkdir()
    torch.save(build_model("f1(width=8,depth=1)", (6,), 3, seed=0).state_dict(), tmp_path / "ck" / "three.pt")
    x, y = toy_data()
    y = y.clone()
    y[5] = 3  # labels 0 ... 3: a model sized by the data gets 4 outputs
    note = "the model was built for 4 classes found in the data's labels"
    for spec in ("f1(width=8,depth=1)", "auditnets:make_classes"):
        if spec.startswith("auditnets"):
            torch.save(nets.make_classes((6,), 3).state_dict(), tmp_path / "ck" / "three.pt")
        (row,) = audit(tmp_path / "ck", spec, (x, y), max_iter=1)
        assert row["status"] == "error" and "(checkpoint (3, 8), model (4, 8))" in row["error"], row["error"]
        assert row["error"].endswith("; " + note)
    # The checkpoint's own width mismatch: nothing about classes.
    torch.save(build_model("f1(width=8,depth=1)", (6,), 4, seed=0).state_dict(), tmp_path / "ck" / "three.pt")
    (row,) = audit(tmp_path / "ck", "f1(width=9,depth=1)", (x, y), max_iter=1)
    assert "mis-shaped keys" in row["error"] and "classes" not in row["error"]
    # A model not sized by the data (a module, a zero-argument factory): its classes are its own.
    torch.save(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).state_dict(), tmp_path / "ck" / "three.pt")
    for model in (make_mlp(), "auditnets:make_mlp"):
        (row,) = audit(tmp_path / "ck", model, toy_data(), max_iter=1)
        assert "mis-shaped keys: 2.weight" in row["error"] and "classes" not in row["error"]


def test_builtin_model_names_resolve_through_study_registry():
    from sharpkit.audit import resolve_model

    model, desc = resolve_model("f1", as_batches(toy_data()), num_classes=3)
    assert desc.startswith("f1|") and model[-1].out_features == 3 and model[1].in_features == 6


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(metrics="keskar,sharpest"), "unknown metric"),
        (dict(metrics=""), "metrics is empty"),
        (dict(epsilon=-1.0), "epsilon must be a positive"),
        (dict(rho=float("nan")), "rho must be a positive"),
        (dict(solver="newton"), "unknown solver"),
        (dict(adaptive_norm="l1", metrics="adaptive"), "adaptive_norm"),
        (dict(solver="lbfgsb", adaptive_norm="l2", metrics="adaptive"), "boxes only"),
        (dict(k=5, lanczos_steps=3, metrics="top-eig"), "lanczos_steps >= 5"),
        (dict(first_step="corner"), "first_step"),
        (dict(restarts=0), "restarts"),
        (dict(group_size=0), "group_size"),
        (dict(loss_fn="hinge"), "unknown loss"),
        (dict(dtype="float17"), "unknown dtype"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    paths = save_checkpoints(tmp_path, count=1)
    with pytest.raises(ValueError, match=match):
        audit(paths, make_mlp, toy_data(), **kwargs)


def test_subspace_dim_above_parameter_count_refused_before_measuring(tmp_path, monkeypatch):
    from sharpkit.audit import batched

    paths = save_checkpoints(tmp_path, count=2)
    n = sum(p.numel() for p in make_mlp().parameters())  # 83
    assert audit(paths, make_mlp, toy_data(), metrics="keskar-subspace", subspace_dim=n, max_iter=1)[0]["status"] == "ok"
    # Not asked for keskar-subspace: the option does not matter.
    assert audit(paths[:1], make_mlp, toy_data(), metrics="top-eig", subspace_dim=n + 1, lanczos_steps=2,
                 group_size=1)[0]["status"] == "ok"
    monkeypatch.setattr(batched, "estimate_group_size", lambda *a, **k: pytest.fail("measuring started"))
    for gs in (1, 2):
        with pytest.raises(ValueError, match=f"subspace_dim must be at most the number of parameters n={n}, got {n + 1}"):
            audit(paths, make_mlp, toy_data(), metrics="keskar,keskar-subspace", subspace_dim=n + 1, group_size=gs)
    # As sk.keskar_sharpness says.
    with pytest.raises(ValueError, match=f"at most the number of parameters n={n}"):
        sk.keskar_sharpness(make_mlp(), nn.CrossEntropyLoss(), toy_data(), subspace_dim=n + 1)


def test_lanczos_options_checked_only_for_top_eig(tmp_path):
    paths = save_checkpoints(tmp_path, count=1)
    rows = audit(paths, make_mlp, toy_data(), metrics="keskar", k=5, lanczos_steps=3, max_iter=1)
    assert rows[0]["status"] == "ok"


def _usage_error_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Command-line mistakes that must give exit 2 and a message, before anything is measured."""
    import numpy as np

    torch.save(dict(zip(("x", "y"), toy_data())), tmp_path / "data.pt")
    (tmp_path / "garbage.pt").write_bytes(b"garbage")
    torch.save(dict(zip(("x", "y"), toy_data())), tmp_path / "truncated.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "truncated.pt").read_bytes()[:300])
    x, y = toy_data()
    np.savez(tmp_path / "truncated.npz", x_train=x.numpy(), y_train=y.numpy())
    (tmp_path / "truncated.npz").write_bytes((tmp_path / "truncated.npz").read_bytes()[:300])
    g = torch.Generator().manual_seed(0)
    torch.save({"x": torch.randn(40, 5, generator=g), "y": torch.randint(0, 3, (40,), generator=g)}, tmp_path / "narrow.pt")
    (tmp_path / "folder").mkdir()
    cuda = "cuda:99" if torch.cuda.is_available() else "cuda"
    return {
        "model-data-mismatch": (["--data", str(tmp_path / "narrow.pt")], "the model does not run on the data"),
        "unknown-device": (["--device", "foo"], "device 'foo' is not usable"),
        "absent-cuda": (["--device", cuda], f"device '{cuda}' is not usable"),
        "garbage-data": (["--data", str(tmp_path / "garbage.pt")], "cannot load"),
        "truncated-data-pt": (["--data", str(tmp_path / "truncated.pt")], "cannot load"),
        "truncated-data-npz": (["--data", str(tmp_path / "truncated.npz")], "cannot load"),
        "out-is-a-directory": (["--out", str(tmp_path / "folder")], "is a directory"),
        "report-is-a-directory": (["--report", str(tmp_path / "folder")], "is a directory"),
        "report-under-a-file": (["--report", str(tmp_path / "data.pt" / "r.html")], "is not a directory"),
        # Messages name the flags typed, not sk.audit's arguments.
        "group-size-zero": (["--group-size", "0"], "--group-size must be a positive integer"),
        "max-iter-zero": (["--max-iter", "0"], "--max-iter must be a positive integer, got 0"),
        "p-above-n": (["--metrics", "keskar-subspace", "--p", "84"],
                      "--p must be at most the number of parameters n=83, got 84"),
        "k-above-lanczos-steps": (["--metrics", "top-eig", "--k", "5", "--lanczos-steps", "3"],
                                  "--k 5 eigenvalues need --lanczos-steps >= 5, got 3"),
        "lbfgsb-l2": (["--metrics", "adaptive", "--solver", "lbfgsb", "--adaptive-norm", "l2"],
                      "--solver lbfgsb handles boxes only: use --adaptive-norm linf or --solver apgd"),
        # A folder nothing can be written in, whatever the permission bits say (root passes them).
        "out-unwritable": (["--out", "/proc/sharpkit-audit-test/a.jsonl"], "--out /proc/sharpkit-audit-test/a.jsonl: "),
    }


USAGE_ERRORS = ["model-data-mismatch", "unknown-device", "absent-cuda", "garbage-data", "truncated-data-pt",
                "truncated-data-npz", "out-is-a-directory", "report-is-a-directory", "report-under-a-file",
                "group-size-zero", "max-iter-zero", "p-above-n", "k-above-lanczos-steps", "lbfgsb-l2", "out-unwritable"]


@pytest.mark.parametrize("case", USAGE_ERRORS)
def test_cli_usage_errors_exit_2_before_measuring(tmp_path, nets, capsys, monkeypatch, case):
    from sharpkit.audit import batched
    from sharpkit.cli import main

    extra, message = _usage_error_cases(tmp_path)[case]
    save_checkpoints(tmp_path / "ck", nets.make_mlp, count=1)

    def no_measuring(*args, **kwargs):
        raise AssertionError("measuring started")

    monkeypatch.setattr(batched, "estimate_group_size", no_measuring)
    args = ["audit", str(tmp_path / "ck"), "--model", "auditnets:make_mlp", "--data", str(tmp_path / "data.pt"),
            "--out", str(tmp_path / "a.jsonl"), "--no-progress", "--max-iter", "1"]
    if case == "out-unwritable" and not os.path.isdir("/proc"):
        pytest.skip("no /proc here")
    assert main(args + extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    for name in ("group_size", "max_iter", "subspace_dim", "lanczos_steps", "adaptive_norm", "[Errno"):
        assert name not in err, err


def test_raising_model_factory_is_a_usage_error(tmp_path, nets, capsys, monkeypatch):
    from sharpkit.audit import batched
    from sharpkit.cli import main

    paths = save_checkpoints(tmp_path / "ck", nets.make_mlp, count=1)
    with pytest.raises(ValueError, match=r"^model spec 'auditnets:make_raising': make_raising\(\(6,\), 3\) raised "
                                         r"RuntimeError: factory boom$") as info:
        audit(paths, "auditnets:make_raising", toy_data(), max_iter=1)
    assert isinstance(info.value.__cause__, RuntimeError)

    def raising():
        raise RuntimeError("boom")

    with pytest.raises(ValueError, match=r"model factory .*raising\(\) raised RuntimeError: boom$"):
        audit(paths, raising, toy_data(), max_iter=1)
    monkeypatch.setattr(batched, "estimate_group_size", lambda *a, **k: pytest.fail("measuring started"))
    code = main(["audit", str(tmp_path / "ck"), "--model", "auditnets:make_raising", "--data", "auditnets:data",
                 "--out", str(tmp_path / "a.jsonl"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert "'auditnets:make_raising': make_raising((6,), 3) raised RuntimeError: factory boom" in err


def test_cli_messages_spell_arguments_as_flags():
    from sharpkit.audit.cli import as_flags

    assert as_flags("subspace_dim must be at most the number of parameters n=83, got 84") == (
        "--p must be at most the number of parameters n=83, got 84")
    assert as_flags("ascent_dtype='bfloat16' needs the model measured in float32") == (
        "--ascent-dtype bfloat16 needs the model measured in float32")
    # Names inside paths, words and other names are left alone.
    for text in ("results file /runs/max_iter_3/k=1/a.jsonl: is a directory", "the ascent solver's k-th step",
                 "data spec 'nets:group_size_data': boom"):
        assert as_flags(text) == text
    # The user's own words: about a --model/--data spec, or what their code raised.
    for text in ("model spec 'f1': k must be positive", "data spec 'nets:data': k must be positive",
                 "the model's factory make() raised ValueError: k must be positive"):
        assert as_flags(text) == text


def test_bad_data_and_loss(tmp_path):
    paths = save_checkpoints(tmp_path, count=2)
    with pytest.raises(ValueError, match="data is empty"):
        audit(paths, make_mlp, (torch.zeros(0, 6), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="no checkpoints given"):
        audit([], make_mlp, toy_data())
    def per_sample(out, target):
        return nn.functional.cross_entropy(out, target, reduction="none")

    for gs in (1, 2):
        with pytest.raises(ValueError, match="reduction='none'.*mean-reduced"):
            audit(paths, make_mlp, toy_data(), loss_fn=nn.CrossEntropyLoss(reduction="none"), group_size=gs, max_iter=1)
        with pytest.raises(ValueError, match="scalar"):
            audit(paths, make_mlp, toy_data(), loss_fn=per_sample, group_size=gs, max_iter=1)


@pytest.mark.parametrize("cuda, expected", [(True, "cuda"), (False, "cpu")])
def test_cli_device_defaults_to_cuda_where_available(cuda, expected, monkeypatch, tmp_path):
    import sys

    from sharpkit.cli import main

    audit_module = sys.modules["sharpkit.audit"]  # (sharpkit.audit the attribute is the function)

    seen = {}

    def fake_audit(*args, **kwargs):
        seen["device"] = kwargs["device"]
        return []

    monkeypatch.setattr(audit_module, "audit", fake_audit)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    main(["audit", str(tmp_path / "none.pt"), "--model", "f1", "--data", "mnist1d", "--out", str(tmp_path / "a.jsonl"),
          "--no-progress"])
    assert seen["device"] == expected


# --------------------------------------------------------------------------- precisions and the user's model


def test_bfloat16_model_is_audited_in_float32(tmp_path):
    """A 16-bit model's sharpness is below its rounding (keskar came out exactly 0.0): as
    sk.keskar_sharpness, the audit measures it in float32, and refuses an explicit 16-bit dtype."""
    paths = save_checkpoints(tmp_path / "ck", count=2)
    data = toy_data()
    rows = audit(paths, lambda: make_mlp().bfloat16(), data, metrics="keskar", max_iter=3, group_size=1)
    for path, row in zip(paths, rows):
        assert row["status"] == "ok" and row["config"]["dtype"] == "float32"
        model = make_mlp().bfloat16()
        model.load_state_dict(torch.load(path, weights_only=True))
        ref = sk.keskar_sharpness(model.float(), nn.CrossEntropyLoss(), data, solver="apgd", max_iter=3)
        assert row["keskar"] > 0 and row["keskar"] == pytest.approx(ref.value, rel=1e-5)
    with pytest.raises(ValueError, match="cannot resolve a sharpness"):
        audit(paths, make_mlp, data, metrics="keskar", dtype="bfloat16")


class _FrozenDoubleHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.head = nn.Linear(8, 3).double().requires_grad_(False)

    def forward(self, x):
        return self.head(self.body(x).double())


@pytest.mark.parametrize("group_size", [1, 2])
def test_frozen_part_in_another_precision_keeps_it(tmp_path, group_size):
    """A frozen float64 head after a float32 body: stacked, every floating tensor was cast to the
    measurement dtype and the head failed ('expected scalar type Float but found Double')."""
    paths = save_checkpoints(tmp_path / "ck", factory=_FrozenDoubleHead, count=2)
    data = toy_data()
    rows = audit(paths, _FrozenDoubleHead, data, metrics="top-eig", group_size=group_size)
    for path, row in zip(paths, rows):
        assert row["status"] == "ok", row.get("error")
        model = _FrozenDoubleHead().double()
        model.load_state_dict(torch.load(path, weights_only=True))
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        shapes = [model.get_parameter(n).shape for n in names]
        x, y = data[0].double(), data[1]

        def loss_at(flat):  # independent float64 reference: the dense Hessian of the body
            params = dict(zip(names, torch.split(flat, [s.numel() for s in shapes])))
            params = {n: t.reshape(s) for (n, t), s in zip(params.items(), shapes)}
            return nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

        flat = torch.cat([model.get_parameter(n).detach().reshape(-1) for n in names])
        top = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_at, flat))[-1]
        assert row["top-eig"] == pytest.approx(float(top), rel=1e-4)


def test_audit_never_loads_checkpoints_into_the_users_model(tmp_path):
    """Given as an instance, the model is copied: a model built under torch.inference_mode()
    holds tensors that cannot be written outside it ('Inplace update to inference tensor')."""
    paths = save_checkpoints(tmp_path / "ck", count=2)
    data = toy_data()
    with torch.inference_mode():
        user = make_mlp()
    before = {k: v.clone() for k, v in user.state_dict().items()}
    rows = audit(paths, user, data, metrics="top-eig", group_size=1)
    ref = audit(paths, make_mlp, data, metrics="top-eig", group_size=1)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert [r["top-eig"] for r in rows] == [r["top-eig"] for r in ref]
    assert all(torch.equal(user.state_dict()[k], v) for k, v in before.items())
