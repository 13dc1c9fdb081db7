"""Test configuration: Triton runs under its CPU interpreter unless a GPU is present."""
import os

import torch

# Must be set before any Triton kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def one_thread():
    """One intra-op thread for the duration (modules of tiny models use it: extra threads only add
    contention on a shared machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def mlp_factory_module(tmp_path, monkeypatch):
    """``write(name, hidden)``: a module ``name`` in ``tmp_path``, importable for the test, whose
    ``make(input_shape, num_classes)`` builds Linear(d, hidden)-Tanh-Linear(hidden, classes) (the
    ``module:factory`` model spec of the CLIs)."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(name: str, hidden: int) -> None:
        (tmp_path / f"{name}.py").write_text(
            "import torch.nn as nn\n"
            "def make(input_shape, num_classes):\n"
            f"    return nn.Sequential(nn.Linear(input_shape[0], {hidden}), nn.Tanh(), nn.Linear({hidden}, num_classes))\n")

    return write


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield
