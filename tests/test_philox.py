"""Philox-4x32-10 known-answer tests (Random123's kat_vectors) on every backend that exposes it."""
import pytest
import torch

from sharpkit.kernels._backend import backends
from sharpkit.kernels.philox import gaussian_block, philox4x32_batch

# (counter, key, expected output) from Random123's known-answer vectors for philox4x32_10.
KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]

CPU_BACKENDS = ["torch", "cpp", "triton"]
GPU_BACKENDS = ["torch", "triton", "cuda", "cupy"]


def _kat_tensors(device):
    counters = torch.tensor([c for c, _, _ in KAT], dtype=torch.int64, device=device)
    keys = torch.tensor([k for _, k, _ in KAT], dtype=torch.int64, device=device)
    expected = torch.tensor([e for _, _, e in KAT], dtype=torch.int64)
    return counters, keys, expected


def _require(backend):
    why = backends()[backend]
    if why != "ok":
        pytest.skip(f"{backend}: {why}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_known_answers_cpu(backend):
    _require(backend)
    counters, keys, expected = _kat_tensors("cpu")
    got = philox4x32_batch(counters, keys, backend)
    assert torch.equal(got.cpu(), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_known_answers_gpu(backend):
    _require(backend)
    counters, keys, expected = _kat_tensors("cuda")
    got = philox4x32_batch(counters, keys, backend)
    assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_random_counters_agree_with_reference(backend):
    """Beyond the three vectors: random counters and keys, bit-for-bit equal to the torch definition."""
    _require(backend)
    gen = torch.Generator().manual_seed(1)
    counters = torch.randint(0, 2**32, (37, 4), generator=gen, dtype=torch.int64)
    keys = torch.randint(0, 2**32, (37, 2), generator=gen, dtype=torch.int64)
    assert torch.equal(philox4x32_batch(counters, keys, backend), philox4x32_batch(counters, keys, "torch"))


def test_gaussian_block_follows_the_spec():
    """A[i, j] from counter (i_lo, i_hi, j >> 1, 0) and key (seed_lo, seed_hi), Box-Muller cos/sin,
    recomputed here in float64 from the raw Philox words of one (row, pair)."""
    import math

    seed, row, pair = (7 << 32) | 11, (3 << 32) | 5, 2
    counters = torch.tensor([[row & 0xFFFFFFFF, row >> 32, pair, 0]])
    keys = torch.tensor([[seed & 0xFFFFFFFF, seed >> 32]])
    r0, r1 = philox4x32_batch(counters, keys)[0, :2].tolist()
    u1, u2 = (r0 + 0.5) / 2**32, (r1 + 0.5) / 2**32
    radius = math.sqrt(-2 * math.log(u1))
    got = gaussian_block(seed, row, 1, 2 * pair + 2, torch.float64)[0]
    assert got[2 * pair].item() == pytest.approx(radius * math.cos(2 * math.pi * u2), rel=1e-12, abs=1e-12)
    assert got[2 * pair + 1].item() == pytest.approx(radius * math.sin(2 * math.pi * u2), rel=1e-12, abs=1e-12)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="counters"):
        philox4x32_batch(torch.zeros(3, 3, dtype=torch.int64), torch.zeros(3, 2, dtype=torch.int64))
