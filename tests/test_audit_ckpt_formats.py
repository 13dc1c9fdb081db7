"""``sk.audit`` on the checkpoint files training code writes: each is measured with the weights a
float64 model loaded by hand holds (the loss equal to that model's), or refused with an error row
naming the problem.  Wrappers (``{"model": sd, "optimizer": ..., "epoch": 3}``, ``"net"``,
``.pth.tar``), EMA copies beside the model, prefixes, the step and epoch saved in the file, 16- and
64-bit files, weight_norm, views, symbolic links, pickled modules and optimizer files."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from sharpkit.audit import audit
from sharpkit.audit.checkpoints import find_checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)

OPTIONS = dict(metrics="keskar", max_iter=1, dtype="float64")


def toy_data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def make_bn() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def trained_state(factory=make_bn, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    m = factory()
    m.train()
    with torch.no_grad():
        m(torch.randn(16, 6))
    return {k: v.clone() for k, v in m.state_dict().items()}


def reference_loss(factory, state: dict[str, torch.Tensor]) -> float:
    """The float64 loss of ``factory()`` with ``state`` loaded by hand (torch's own strict load)."""
    m = factory().double()
    m.load_state_dict(state, strict=True)
    x, y = toy_data()
    with torch.no_grad():
        return nn.functional.cross_entropy(m.eval()(x.double()), y).item()


def by_name(rows):
    return {r["name"]: r for r in rows}


def test_training_script_wrappers_and_prefixes_measure_the_models_weights(tmp_path):
    # "net" (pytorch-cifar's {"net": sd, "acc": ..., "epoch": ...}) was "holds no tensors", and a
    # directory's checkpoint.pth.tar (PyTorch's ImageNet example) was skipped without a row.
    sd = trained_state()
    opt = torch.optim.SGD(make_bn().parameters(), lr=0.1, momentum=0.9)
    files = {
        "wrap_model.pt": {"model": sd, "optimizer": opt.state_dict(), "epoch": 3, "step": 1200},
        "wrap_state_dict.pt": {"state_dict": sd},
        "wrap_msd.pt": {"model_state_dict": sd, "optimizer_state_dict": opt.state_dict()},
        "wrap_net.pth": {"net": sd, "acc": 91.5, "epoch": 3},
        "checkpoint.pth.tar": {"state_dict": {"module." + k: v for k, v in sd.items()}, "arch": "bn"},
        "lightning_model.ckpt": {"state_dict": {"model." + k: v for k, v in sd.items()}},
        "lightning_net.ckpt": {"state_dict": {"net." + k: v for k, v in sd.items()}},
        "compiled.pt": {"_orig_mod." + k: v for k, v in sd.items()},
        "nested.ckpt": {"state_dict": {"model.module._orig_mod." + k: v for k, v in sd.items()}},
    }
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
    ref = reference_loss(make_bn, sd)
    rows = by_name(audit(tmp_path, make_bn, toy_data(), **OPTIONS))
    assert sorted(rows) == sorted(files)
    for name, row in rows.items():
        assert row["status"] == "ok", (name, row["error"])
        assert row["loss"] == pytest.approx(ref, rel=1e-13, abs=0), name
    assert rows["wrap_net.pth"]["weights"] == "entry 'net'"
    assert rows["checkpoint.pth.tar"]["weights"] == "entry 'state_dict'; prefix 'module.' removed"
    assert rows["nested.ckpt"]["weights"] == "entry 'state_dict'; prefix 'model.module._orig_mod.' removed"
    assert rows["compiled.pt"]["weights"] == "prefix '_orig_mod.' removed"


def test_ema_copy_beside_the_model_is_named_and_entry_measures_it(tmp_path):
    sd, ema = trained_state(seed=0), trained_state(seed=1)
    torch.save({"model": sd, "model_ema": ema, "epoch": 2}, tmp_path / "deit.pth")
    torch.save({"state_dict": sd, "state_dict_ema": ema}, tmp_path / "timm.pth.tar")
    ref, ref_ema = reference_loss(make_bn, sd), reference_loss(make_bn, ema)
    assert abs(ref - ref_ema) > 1e-3
    out = tmp_path / "a.jsonl"
    rows = by_name(audit(tmp_path, make_bn, toy_data(), out=out, **OPTIONS))
    assert rows["deit.pth"]["loss"] == pytest.approx(ref, rel=1e-13)
    assert rows["deit.pth"]["weights"] == "entry 'model' (also in the file, not measured: 'model_ema')"
    assert rows["timm.pth.tar"]["weights"] == "entry 'state_dict' (also in the file, not measured: 'state_dict_ema')"
    # entry= measures the EMA copy, under other keys than the model's rows; a file without it is an error row.
    rows = by_name(audit(tmp_path, make_bn, toy_data(), out=out, entry="model_ema", **OPTIONS))
    assert rows["deit.pth"]["status"] == "ok" and rows["deit.pth"]["loss"] == pytest.approx(ref_ema, rel=1e-13)
    assert rows["deit.pth"]["weights"] == "entry 'model_ema' (also in the file, not measured: 'model')"
    assert rows["timm.pth.tar"]["status"] == "error"
    assert "no entry 'model_ema' (entries holding weights: 'state_dict', 'state_dict_ema'" in rows["timm.pth.tar"]["error"]
    assert len(out.read_text(encoding="utf-8").splitlines()) == 4


def test_step_and_epoch_saved_in_the_file_fill_in_what_the_name_lacks(tmp_path):
    sd = trained_state(make_mlp)
    torch.save({"model": sd, "epoch": 3, "step": 1200}, tmp_path / "last.pt")
    torch.save({"state_dict": sd, "epoch": torch.tensor(4), "global_step": torch.tensor(50)}, tmp_path / "best.ckpt")
    # The name wins where it names a number: epoch 5 in the name, 4 saved (a 0- against a 1-based count).
    torch.save({"model": {k: v + 0.01 for k, v in sd.items()}, "epoch": 4, "step": 7}, tmp_path / "epoch_5.pt")
    out = tmp_path / "a.jsonl"
    first = by_name(audit(tmp_path, make_mlp, toy_data(), out=out, **OPTIONS))
    assert (first["last.pt"]["epoch"], first["last.pt"]["step"]) == (3, 1200)
    assert (first["best.ckpt"]["epoch"], first["best.ckpt"]["step"]) == (4, 50)
    assert (first["epoch_5.pt"]["epoch"], first["epoch_5.pt"]["step"]) == (5, 7)
    assert (first["epoch_5.pt"]["saved_epoch"], first["epoch_5.pt"]["saved_step"]) == (4, 7)
    # Rows served from the results file say the same (the file is not read again).
    again = by_name(audit(tmp_path, make_mlp, toy_data(), out=out, **OPTIONS))
    for name, row in first.items():
        assert {k: again[name][k] for k in ("step", "epoch", "weights", "loss")} == \
               {k: row[k] for k in ("step", "epoch", "weights", "loss")}, name
    # A state dict at the top of the file has no saved position (a buffer may be called "step").
    torch.save(sd, tmp_path / "plain.pt")
    plain = audit(tmp_path / "plain.pt", make_mlp, toy_data(), **OPTIONS)[0]
    assert (plain["step"], plain["epoch"], plain["weights"]) == (None, None, None)


def test_float64_checkpoint_audited_in_float64_keeps_its_values(tmp_path):
    # Loaded into the float32 factory's model first, its weights were rounded: loss 4.6e-11 off.
    torch.manual_seed(0)
    m = make_mlp().double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1e-9 * torch.randn_like(p))  # values float32 cannot hold
    torch.save(m.state_dict(), tmp_path / "w64.pt")
    x, y = toy_data()
    with torch.no_grad():
        ref = nn.functional.cross_entropy(m(x.double()), y).item()
    for group_size in (1, 2):
        paths = [tmp_path / "w64.pt"] * 1 if group_size == 1 else [tmp_path / "w64.pt", tmp_path / "other.pt"]
        if group_size == 2:
            torch.save(make_mlp().state_dict(), tmp_path / "other.pt")
        row = audit(paths, make_mlp, toy_data(), group_size=group_size, **OPTIONS)[0]
        assert row["loss"] == pytest.approx(ref, rel=1e-14, abs=0), group_size


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_checkpoint_for_a_float32_model(tmp_path, dtype):
    low = {k: v.to(dtype) if v.is_floating_point() else v for k, v in trained_state().items()}
    torch.save(low, tmp_path / "low.pt")
    row = audit(tmp_path / "low.pt", make_bn, toy_data(), **OPTIONS)[0]
    assert row["loss"] == pytest.approx(reference_loss(make_bn, low), rel=1e-13, abs=0)


def make_weight_norm() -> nn.Module:
    m = make_mlp()
    nn.utils.parametrizations.weight_norm(m[0])
    return m


def test_weight_norm_checkpoint_is_measured_and_a_plain_model_is_told_why_it_does_not_fit(tmp_path):
    torch.manual_seed(0)
    m = make_weight_norm()
    with torch.no_grad():
        m[0].parametrizations.weight.original0.mul_(1.7)
    sd = m.state_dict()
    assert "0.parametrizations.weight.original1" in sd
    torch.save(sd, tmp_path / "wn.pt")
    torch.save({k: v * 1.1 for k, v in sd.items()}, tmp_path / "wn2.pt")
    for group_size in (1, 2):
        rows = by_name(audit(tmp_path, make_weight_norm, toy_data(), group_size=group_size, **OPTIONS))
        assert rows["wn.pt"]["loss"] == pytest.approx(reference_loss(make_weight_norm, sd), rel=1e-13)
    row = audit(tmp_path / "wn.pt", make_mlp, toy_data(), **OPTIONS)[0]
    assert row["status"] == "error"
    assert "missing keys: 0.weight; unexpected keys: 0.parametrizations.weight.original0" in row["error"]
    assert "the checkpoint has reparametrized weights" in row["error"]


def test_views_shared_storage_and_non_contiguous_tensors(tmp_path):
    sd = trained_state(make_mlp)
    flat = torch.cat([v.reshape(-1) for v in sd.values()])
    views, offset = {}, 0
    for k, v in sd.items():  # every tensor a view of one storage
        views[k] = flat[offset: offset + v.numel()].view(v.shape)
        offset += v.numel()
    torch.save(views, tmp_path / "views.pt")
    torch.save({k: v.t().contiguous().t() if v.dim() == 2 else v for k, v in sd.items()}, tmp_path / "transposed.pt")
    torch.save({k: torch.stack([v, -v], -1)[..., 0] for k, v in sd.items()}, tmp_path / "strided.pt")
    ref = reference_loss(make_mlp, sd)
    for group_size in (1, 3):
        for row in audit(tmp_path, make_mlp, toy_data(), group_size=group_size, **OPTIONS):
            assert row["loss"] == pytest.approx(ref, rel=1e-13), row["name"]


def test_extra_tensors_inside_the_state_dict_are_refused(tmp_path):
    sd = trained_state(make_mlp)
    torch.save({**sd, "0.weight_exp_avg": torch.zeros(8, 6)}, tmp_path / "moments.pt")
    row = audit(tmp_path / "moments.pt", make_mlp, toy_data(), **OPTIONS)[0]
    assert row["status"] == "error" and "unexpected keys: 0.weight_exp_avg" in row["error"]


def test_symbolic_links(tmp_path):
    # A broken link (last.pt after its target was cleaned up) was skipped without a row.
    sd = trained_state(make_mlp)
    torch.save(sd, tmp_path / "epoch_3.pt")
    (tmp_path / "last.pt").symlink_to(tmp_path / "epoch_3.pt")
    (tmp_path / "gone.pt").symlink_to(tmp_path / "deleted.pt")
    assert [p.name for p in find_checkpoints([tmp_path])] == ["epoch_3.pt", "gone.pt", "last.pt"]
    rows = by_name(audit(tmp_path, make_mlp, toy_data(), **OPTIONS))
    assert rows["gone.pt"]["status"] == "error"
    assert f"broken symbolic link (its target {tmp_path / 'deleted.pt'} does not exist)" in rows["gone.pt"]["error"]
    assert rows["last.pt"]["loss"] == rows["epoch_3.pt"]["loss"] == pytest.approx(reference_loss(make_mlp, sd), rel=1e-13)
    given = audit(tmp_path / "gone.pt", make_mlp, toy_data(), **OPTIONS)[0]  # named on its own too
    assert "broken symbolic link" in given["error"]


def test_pickled_module_under_an_entry_and_optimizer_files_say_what_they_hold(tmp_path):
    if not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        pytest.skip("torch < 2.6")
    m = make_mlp()
    torch.save({"model": m, "epoch": 3}, tmp_path / "module_in_dict.pt")
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.randn(3, 6)).sum().backward()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    rows = by_name(audit(tmp_path, make_mlp, toy_data(), **OPTIONS))
    assert ("pickles a torch.nn.modules.container.Sequential object under 'model', not a state dict"
            in rows["module_in_dict.pt"]["error"])
    assert "save model.state_dict() instead" in rows["module_in_dict.pt"]["error"]
    assert "holds an optimizer's state (param_groups, state), not a model's weights" in rows["optimizer.pt"]["error"]


def test_cli_entry_flag_and_note_on_other_weights(tmp_path, mlp_factory_module, capsys):
    from sharpkit.cli import main

    mlp_factory_module("ckpt_formats_nets", hidden=8)
    sd, ema = trained_state(make_mlp, seed=0), trained_state(make_mlp, seed=1)
    torch.save({"model": sd, "model_ema": ema}, tmp_path / "run.pt")
    x, y = toy_data()
    torch.save({"x_train": x, "y_train": y}, tmp_path / "data.pt")
    args = ["audit", str(tmp_path / "run.pt"), "--model", "ckpt_formats_nets:make", "--data", str(tmp_path / "data.pt"),
            "--max-iter", "1", "--dtype", "float64", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "a.jsonl")]
    assert main(args) == 0
    assert "hold other weights beside those measured, e.g. run.pt: entry 'model'" in capsys.readouterr().err
    assert main(args + ["--entry", "model_ema"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["config"].get("entry") for r in rows] == [None, "model_ema"]
    assert [r["loss"] for r in rows] == pytest.approx([reference_loss(make_mlp, sd), reference_loss(make_mlp, ema)],
                                                      rel=1e-13)


def test_a_path_that_could_not_be_read_is_told_afresh_on_each_audit(tmp_path):
    # Its error row is keyed by the path: a later audit was served the stored "file not found"
    # for a path that had become a directory (or an unreadable file) since.
    out = tmp_path / "a.jsonl"
    first = audit(tmp_path / "step_1.pt", make_mlp, toy_data(), out=out, **OPTIONS)[0]
    assert first["error"].endswith("step_1.pt: file not found")
    (tmp_path / "step_1.pt").mkdir()
    again = audit(tmp_path / "step_1.pt", make_mlp, toy_data(), out=out, **OPTIONS)[0]
    assert "directory holds no checkpoint files" in again["error"]
    (tmp_path / "step_1.pt").rmdir()
    sd = trained_state(make_mlp)
    torch.save(sd, tmp_path / "step_1.pt")
    row = audit(tmp_path / "step_1.pt", make_mlp, toy_data(), out=out, **OPTIONS)[0]
    assert row["status"] == "ok" and row["loss"] == pytest.approx(reference_loss(make_mlp, sd), rel=1e-13)
