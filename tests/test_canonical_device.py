"""sharpkit.params.canonical_device: "cuda" without an index is the current CUDA device; every
other device is returned as it is."""
from __future__ import annotations

import pytest
import torch

from sharpkit.params import canonical_device


@pytest.mark.parametrize("name", ["cpu", "cpu:0", "cuda:1", "meta"])
def test_devices_with_an_index_or_not_cuda_are_unchanged(name):
    assert canonical_device(name) == torch.device(name)
    assert canonical_device(torch.device(name)) == torch.device(name)
    assert isinstance(canonical_device(name), torch.device)


def test_cpu_keeps_its_name():
    assert str(canonical_device("cpu")) == "cpu" and str(canonical_device("cpu:0")) == "cpu:0"


def test_bare_cuda_gets_the_current_index(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert canonical_device("cuda") == torch.device("cuda", 3)
    assert canonical_device(torch.device("cuda")) == torch.device("cuda", 3)
    assert canonical_device("cuda:1") == torch.device("cuda", 1)  # an index given is kept
    # The kernels' launch index reads it.
    from sharpkit.kernels.box_ascent import _index

    assert _index(torch.device("cuda")) == 3 and _index(torch.device("cuda", 1)) == 1


def test_bare_cuda_without_cuda_is_unchanged(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def no_device():
        raise AssertionError("current_device asked for without CUDA")

    monkeypatch.setattr(torch.cuda, "current_device", no_device)
    assert canonical_device("cuda") == torch.device("cuda")


@pytest.mark.gpu
def test_bare_cuda_is_where_torch_puts_a_tensor():
    where = torch.zeros(1, device="cuda").device
    assert where.index is not None
    assert canonical_device("cuda") == where
    assert canonical_device(torch.device("cuda")) == torch.device("cuda", torch.cuda.current_device())
    from sharpkit.kernels.subspace import GaussianSubspace

    assert GaussianSubspace(8, 2, device="cuda").device == where
    if torch.cuda.device_count() > 1:
        with torch.cuda.device(1):
            assert canonical_device("cuda") == torch.device("cuda", 1) == torch.zeros(1, device="cuda").device
