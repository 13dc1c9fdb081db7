"""``sk.audit`` as users with real checkpoint folders meet it: tied weights (stacked and one at a
time, safetensors' one-name-per-tensor files), and a checkpoint rewritten while the audit runs
(its row belongs to the content read)."""
from __future__ import annotations

import hashlib
import json
import shutil
import sys

import pytest
import torch
from torch import nn

from sharpkit.audit import audit
from sharpkit.audit.checkpoints import CheckpointError, fit_state_dict


pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)


def toy_data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


class Tied(nn.Module):
    """Two layers sharing one weight matrix (as a language model's embedding and decoder)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _save(folder, factory, count=3):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        torch.manual_seed(100 + i)
        m = factory()
        paths.append(folder / f"step_{(i + 1) * 10}.pt")
        torch.save(m.state_dict(), paths[-1])
    return paths


METRICS = "keskar,keskar-subspace,adaptive,top-eig,trace"
OPTIONS = dict(metrics=METRICS, subspace_dim=5, max_iter=3, lanczos_steps=8, trace_samples=4, dtype="float64")


def test_tied_weights_batched_equals_one_at_a_time(tmp_path):
    # Stacked, the tied name came twice to functional_call: "functional_call got multiple values
    # for keys ['a.weight', 'b.weight'], which are tied" stopped the whole audit.
    _save(tmp_path / "ck", Tied)
    stacked = audit(tmp_path / "ck", Tied, toy_data(), group_size=3, **OPTIONS)
    single = audit(tmp_path / "ck", Tied, toy_data(), group_size=1, **OPTIONS)
    for a, b in zip(stacked, single):
        assert a["status"] == b["status"] == "ok", (a.get("error"), b.get("error"))
        assert a["group_size"] == 3 and b["group_size"] == 1
        for m in ["loss", *METRICS.split(",")]:
            assert a[m] == pytest.approx(b[m], rel=1e-9, abs=1e-12), m


def test_tied_weight_saved_under_one_name_and_tied_names_that_differ(tmp_path):
    model = Tied()
    sd = model.state_dict()
    # safetensors' save_model keeps one name per shared tensor: the other takes its value.
    one_name = {k: v for k, v in sd.items() if k != "b.weight"}
    fitted = fit_state_dict(one_name, Tied(), "one_name.safetensors")
    assert torch.equal(fitted["b.weight"], sd["a.weight"])
    # Different values under tied names: loading keeps one, stacking the other; neither is the file's.
    untied = {**sd, "b.weight": sd["b.weight"] + 1}
    with pytest.raises(CheckpointError, match="'a.weight' and 'b.weight' are one tensor in the model"):
        fit_state_dict(untied, Tied(), "untied.pt")


def test_tied_safetensors_file_is_measured(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_model

    torch.manual_seed(0)
    model = Tied()
    save_model(model, str(tmp_path / "tied.safetensors"))
    torch.save(model.state_dict(), tmp_path / "tied.pt")
    rows = audit(tmp_path, Tied, toy_data(), metrics="keskar", max_iter=2, dtype="float64")
    assert [r["status"] for r in rows] == ["ok", "ok"], [r.get("error") for r in rows]
    assert rows[0]["keskar"] == pytest.approx(rows[1]["keskar"], rel=1e-12)


@pytest.mark.parametrize("duplicate", [False, True])
def test_checkpoint_rewritten_during_the_audit_is_keyed_by_the_content_read(tmp_path, monkeypatch, duplicate):
    # A training run still writing last.pt: hashed as one content, read as another.  The row was
    # stored under the first content's hash with the second's numbers, and a later audit of a file
    # holding the first content was served them.
    a, b = _save(tmp_path / "src", make_mlp, count=2)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(a, run / "last.pt")
    if duplicate:  # an identical file listed too: it still needs the first content's row
        shutil.copy(a, run / "step_10.pt")
    truth = {p: audit(p, make_mlp, toy_data(), metrics="keskar", max_iter=3)[0]["keskar"] for p in (a, b)}
    assert truth[a] != pytest.approx(truth[b])

    audit_module = sys.modules["sharpkit.audit"]
    real_describe = audit_module.describe_checkpoint

    def describe_then_rewrite(path, name=None):
        ck = real_describe(path, name)
        if path.name == "last.pt":
            shutil.copy(b, path)  # written after the audit hashed it, before it reads it
        return ck

    monkeypatch.setattr(audit_module, "describe_checkpoint", describe_then_rewrite)
    out = tmp_path / "audit.jsonl"
    rows = audit(run, make_mlp, toy_data(), metrics="keskar", max_iter=3, out=out, group_size=1)
    monkeypatch.undo()
    by_name = {r["name"]: r for r in rows}
    assert by_name["last.pt"]["keskar"] == pytest.approx(truth[b], rel=1e-12)
    if duplicate:
        assert by_name["step_10.pt"]["keskar"] == pytest.approx(truth[a], rel=1e-12)
    # Every stored row holds the numbers of the content its sha256 names.
    sha = {hashlib.sha256(p.read_bytes()).hexdigest(): truth[p] for p in (a, b)}
    stored = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(stored) == (2 if duplicate else 1)
    for r in stored:
        assert r["status"] == "ok" and r["keskar"] == pytest.approx(sha[r["sha256"]], rel=1e-12)

    # The first content, audited later from the same results file, is measured, not served b's row.
    again = audit(a, make_mlp, toy_data(), metrics="keskar", max_iter=3, out=out)[0]
    assert again["keskar"] == pytest.approx(truth[a], rel=1e-12)


@pytest.fixture
def reviewnets(tmp_path, monkeypatch):
    """An importable module for MODULE:FACTORY / MODULE:FUNCTION specs."""
    (tmp_path / "reviewnets.py").write_text(
        "import torch\nfrom torch import nn\n"
        "def make_mlp():\n    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))\n"
        "def data():\n    g = torch.Generator().manual_seed(1)\n"
        "    return torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("reviewnets", None)


@pytest.mark.parametrize("link", [False, True])
def test_cli_refuses_a_report_written_over_the_results_file(tmp_path, reviewnets, capsys, link):
    # The report (written last, by rename) replaced the JSONL results: every row lost, exit 0, and
    # the next run refused the file as "not an audit results file".
    from sharpkit.cli import main

    _save(tmp_path / "ck", make_mlp, count=1)
    out = tmp_path / "audit.jsonl"
    report = tmp_path / "report.html"
    if link:
        report.symlink_to(out)
    code = main(["audit", str(tmp_path / "ck"), "--model", "reviewnets:make_mlp", "--data", "reviewnets:data",
                 "--max-iter", "2", "--device", "cpu", "--no-progress", "--out", str(out),
                 "--report", str(report if link else out)])
    assert code == 2
    assert "is the --out results file" in capsys.readouterr().err
    assert not out.exists()


def test_lightning_checkpoint_with_objects_in_its_hyper_parameters(tmp_path):
    # Lightning saves save_hyperparameters()'s values beside the weights: a Namespace, a Path, a loss
    # module.  weights_only=True refused the whole file ("Unsupported global: GLOBAL
    # argparse.Namespace"); the weights are read with those objects left inert.
    import argparse
    import pathlib

    if not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        pytest.skip("torch < 2.6")
    torch.manual_seed(0)
    model = make_mlp()
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    torch.save({
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {"args": argparse.Namespace(lr=0.1), "root": pathlib.Path("/data"),
                             "criterion": nn.CrossEntropyLoss()},
        "epoch": 12, "global_step": 3400,
    }, tmp_path / "epoch=12-step=3400.ckpt")
    rows = audit(tmp_path, make_mlp, toy_data(), metrics="keskar", max_iter=2, dtype="float64")
    by_name = {r["name"]: r for r in rows}
    ckpt = by_name["epoch=12-step=3400.ckpt"]
    assert ckpt["status"] == "ok", ckpt["error"]
    assert (ckpt["epoch"], ckpt["step"]) == (12, 3400)
    assert ckpt["keskar"] == pytest.approx(by_name["plain.pt"]["keskar"], rel=1e-12)


def test_whole_pickled_model_is_refused_with_a_clear_message(tmp_path):
    if not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        pytest.skip("torch < 2.6")
    torch.save(make_mlp(), tmp_path / "model.pt")
    row = audit(tmp_path / "model.pt", make_mlp, toy_data(), metrics="keskar", max_iter=2)[0]
    assert row["status"] == "error"
    assert "pickles a torch.nn.modules.container.Sequential object, not a state dict" in row["error"]
    assert "save model.state_dict() instead" in row["error"]


def _relu_regressor() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


@pytest.mark.parametrize("group_size", [1, 2])
def test_rows_say_where_the_ascent_met_a_loss_that_was_not_finite(tmp_path, group_size):
    """At epsilon = 1e8 a float32 ReLU regressor's squared error overflows at the box's corners:
    the value is then the maximum over the finite points only.  The solver warns; each row's
    details count that checkpoint's skipped points (they said nothing before)."""
    _save(tmp_path / "ck", _relu_regressor, count=2)
    g = torch.Generator().manual_seed(2)
    data = (torch.randn(30, 6, generator=g), torch.randn(30, 2, generator=g))
    with pytest.warns(RuntimeWarning, match="not finite"):
        rows = audit(tmp_path / "ck", _relu_regressor, data, loss_fn="mse", metrics="keskar,adaptive",
                     epsilon=1e8, rho=1e8, max_iter=3, group_size=group_size)
    for row in rows:
        assert row["status"] == "ok", row.get("error")
        assert row["details"]["keskar"]["nonfinite_evals"] >= 1
        assert row["details"]["adaptive"]["nonfinite_evals"] >= 1
    rows = audit(tmp_path / "ck", _relu_regressor, data, loss_fn="mse", metrics="keskar", epsilon=1e-3,
                 max_iter=3, group_size=group_size)
    assert all("nonfinite_evals" not in row["details"]["keskar"] for row in rows)
