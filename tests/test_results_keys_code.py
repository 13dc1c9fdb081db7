"""Results keys follow the code of the user's model and loss, not only their names and layers.

An audit (and a study with a custom model) reuses stored rows whose key matches.  A model class
whose ``forward`` was edited, or a loss function whose body was, is another measurement: its rows
must be computed again, never served from the file.  The same source in another process must give
the same key, or nothing would ever be reused.
"""
from __future__ import annotations

import functools
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import sharpkit as sk
from sharpkit.distributed import digest
from sharpkit.inputs import identity

NET = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)

    def act(self, h):
        return torch.{act}(h)

    def forward(self, x):
        return self.b({body})

def loss(out, y):
    return nn.functional.cross_entropy(torch.{loss_act}(out), y)
"""


def load(act: str = "relu", body: str = "self.act(self.a(x))", loss_act: str = "relu") -> dict:
    """The names a user's module ``usermodel`` defines, from one version of its source."""
    namespace = {"__name__": "usermodel"}
    exec(compile(NET.format(act=act, body=body, loss_act=loss_act), "usermodel.py", "exec"), namespace)
    return namespace


def test_an_edited_forward_or_helper_is_another_model():
    base = identity(load()["Net"]())
    assert identity(load()["Net"]()) == base  # the same source: the same key
    # a helper that forward calls, with one function name swapped (the byte code is the same)
    assert identity(load(act="tanh")["Net"]()) != base
    assert identity(load(body="self.act(self.a(x)) * 2")["Net"]()) != base


def test_an_edited_loss_function_is_another_loss():
    base = identity(load()["loss"])
    assert identity(load()["loss"]) == base
    assert identity(load(loss_act="tanh")["loss"]) != base
    assert base.startswith("usermodel.loss[")


def test_functions_held_by_a_layer_count():
    class Lambda(nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, x):
            return self.fn(x)

    def model(fn):
        return nn.Sequential(nn.Linear(4, 4), Lambda(fn), nn.Linear(4, 2))

    assert identity(model(torch.relu)) == identity(model(torch.relu))
    assert identity(model(torch.relu)) != identity(model(torch.tanh))


def test_partial_losses_with_weights_whose_reprs_agree():
    w1 = torch.ones(2000)
    w2 = w1.clone()
    w2[1000] = 2.0  # torch's repr of a 2000-element tensor elides the middle
    assert repr(w1) == repr(w2)
    a = functools.partial(nn.functional.cross_entropy, weight=w1)
    b = functools.partial(nn.functional.cross_entropy, weight=w2)
    assert identity(a) != identity(b)
    assert identity(a) == identity(functools.partial(nn.functional.cross_entropy, weight=w1.clone()))


def test_digest_tells_functions_apart_by_the_names_they_read():
    # the cross-rank check compares losses by digest; these two have the same byte code
    assert digest(lambda x: torch.relu(x)) != digest(lambda x: torch.tanh(x))


def test_the_key_is_the_same_in_another_process(tmp_path):
    (tmp_path / "usermodel.py").write_text(NET.format(act="relu", body="self.act(self.a(x))", loss_act="relu"))
    script = textwrap.dedent("""
        import json, sys
        import usermodel
        from sharpkit.inputs import identity
        print(json.dumps([identity(usermodel.Net()), identity(usermodel.loss)]))
    """)
    keys = []
    for seed in ("1", "2"):  # another string hash seed each time
        run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                             env={"PYTHONHASHSEED": seed, "PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
                             check=True)
        keys.append(json.loads(run.stdout.strip().splitlines()[-1]))
    assert keys[0] == keys[1]
    assert keys[0][0].startswith("Net[") and keys[0][1].startswith("usermodel.loss[")


def test_audit_remeasures_a_model_whose_forward_changed(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    net = load()["Net"]()
    ckpt = tmp_path / "w.pt"
    torch.save(net.state_dict(), ckpt)
    out = tmp_path / "audit.jsonl"

    def audit(source: dict) -> dict:
        (row,) = sk.audit(ckpt, source["Net"](), (x, y), metrics="top-eig", out=out, loss_fn=source["loss"])
        return row

    first = audit(load())
    edited = audit(load(act="tanh"))
    assert edited["loss"] != pytest.approx(first["loss"])  # measured anew with the edited model
    fresh = sk.audit(ckpt, load(act="tanh")["Net"](), (x, y), metrics="top-eig", loss_fn=load()["loss"])[0]
    assert edited["loss"] == pytest.approx(fresh["loss"], rel=1e-6)
    assert edited["top-eig"] == pytest.approx(fresh["top-eig"], rel=1e-4)
    again = audit(load())  # the first version again: its stored row
    assert again["loss"] == first["loss"] and again["top-eig"] == first["top-eig"]
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2


def test_a_torch_layers_activation_function_counts_and_torch_models_keep_their_keys():
    def layer(act):
        torch.manual_seed(0)
        return nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, activation=act, batch_first=True)

    assert identity(layer(nn.functional.relu)) == identity(layer(nn.functional.relu))
    assert identity(layer(nn.functional.relu)) != identity(layer(nn.functional.gelu))  # not in its repr
    # a model of torch's layers only: the key it had before code was part of keys
    mlp = nn.Sequential(nn.Linear(40, 100), nn.ReLU(), nn.Linear(100, 10))
    assert identity(mlp) == "Sequential[d71fb999fbe3]"
    assert identity(nn.CrossEntropyLoss(), tensors=True) == "CrossEntropyLoss[af8e6029505e]"
