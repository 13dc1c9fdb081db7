"""Counter-based Philox-4x32-10 in plain torch integer arithmetic: the definition of
:class:`~sharpkit.kernels.subspace.GaussianSubspace`'s entries that every backend reproduces.

Entry ``A[i, j]`` (``i < n`` rows, ``j < p`` columns) is defined by ``(seed, i, j)`` alone:

* counter ``(i mod 2**32, i div 2**32, j div 2, 0)``, key ``(seed mod 2**32, (seed div 2**32) mod 2**32)``;
* ten Philox-4x32 rounds give ``r0..r3``; ``u1 = (r0 + 0.5) / 2**32``, ``u2 = (r1 + 0.5) / 2**32``;
* Box-Muller: ``A[i, j] = sqrt(-2 ln u1) * (cos(2 pi u2) if j is even else sin(2 pi u2))``.

uint32 values live in int64 tensors; 32x32-bit products are split into 16-bit halves so that
nothing overflows int64.
"""
from __future__ import annotations

import math
import operator

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
MASK32 = 0xFFFFFFFF
ROUNDS = 10


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of ``a * m`` for uint32 ``a`` (int64 tensor) and constant ``m``."""
    s = a * (m & 0xFFFF)
    t = a * (m >> 16)
    low_part = s + ((t & 0xFFFF) << 16)
    return (low_part >> 32) + (t >> 16), low_part & MASK32


def philox4x32(c0, c1, c2, c3, seed: int):
    """Ten Philox-4x32 rounds on int64 tensors holding uint32 counters; returns ``(r0, r1, r2, r3)``."""
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(ROUNDS):
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def gaussian_block(
    seed: int,
    row_start: int,
    num_rows: int,
    p: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Rows ``row_start : row_start + num_rows`` of A (shape ``(num_rows, p)``), computed from scratch.

    ``seed`` in [0, 2**64); ``row_start``, ``num_rows`` and ``p`` non-negative integers (rows are
    held in int64, so ``row_start + num_rows <= 2**63``).
    """
    values = []
    for name, value in (("seed", seed), ("row_start", row_start), ("num_rows", num_rows), ("p", p)):
        try:
            if isinstance(value, bool):
                raise TypeError
            values.append(operator.index(value))  # int, numpy integers, 0-d integer tensors
        except TypeError:
            raise TypeError(f"gaussian_block: {name} must be an int, got {type(value).__name__}") from None
    seed, row_start, num_rows, p = values
    if seed < 0 or seed >= 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    if row_start < 0 or num_rows < 0 or p < 0:
        raise ValueError(f"gaussian_block: row_start, num_rows and p must be >= 0, got {row_start}, {num_rows}, {p}")
    if row_start + num_rows > 2**63:
        raise ValueError(f"gaussian_block: rows {row_start}..{row_start + num_rows} exceed 2**63")
    # Offsets from row_start, not arange(row_start, row_start + num_rows): that end is 2**63 for
    # the last int64 row and overflows.
    rows = torch.arange(num_rows, device=device, dtype=torch.int64)
    if num_rows:
        rows += row_start
    pairs = torch.arange((p + 1) // 2, device=device, dtype=torch.int64)
    c0 = (rows & MASK32)[:, None].expand(num_rows, pairs.numel())
    c1 = (rows >> 32)[:, None].expand_as(c0)
    c2 = pairs[None, :].expand_as(c0)
    c3 = torch.zeros_like(c0)
    r0, r1, _, _ = philox4x32(c0, c1, c2, c3, seed)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    scale = 2.0**-32
    u1 = (r0.to(work) + 0.5) * scale
    u2 = (r1.to(work) + 0.5) * scale
    radius = torch.sqrt(-2.0 * torch.log(u1))
    angle = (2.0 * math.pi) * u2
    out = torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), dim=-1)
    return out.reshape(num_rows, 2 * pairs.numel())[:, :p].to(dtype)


def _as_int32_bits(values: torch.Tensor) -> torch.Tensor:
    """uint32 values (in an int64 tensor) -> the same 32-bit patterns as int32."""
    v = values.to(torch.int64) & MASK32
    return torch.where(v >= 1 << 31, v - (1 << 32), v).to(torch.int32).contiguous()


def philox4x32_batch(counters: torch.Tensor, keys: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """Philox-4x32-10 of ``counters`` (m, 4) under ``keys`` (m, 2) on one backend, for known-answer
    tests: every backend that generates GaussianSubspace entries exposes its Philox here.

    Values are uint32 held in integer tensors; the result is an int64 tensor (m, 4) of uint32 values
    on the inputs' device.
    """
    from ._backend import launch, resolve

    for name, t in (("counters", counters), ("keys", keys)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"philox4x32_batch: {name} must be a torch.Tensor, got {type(t).__name__}")
    if counters.ndim != 2 or counters.shape[1] != 4 or keys.shape != (counters.shape[0], 2):
        raise ValueError(f"philox4x32_batch: need counters (m, 4) and keys (m, 2), got "
                         f"{tuple(counters.shape)} and {tuple(keys.shape)}")
    for name, t in (("counters", counters), ("keys", keys)):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"philox4x32_batch: {name} must be an integer tensor of uint32 values, got {t.dtype}")
        # int32 tensors may hold uint32 values as bit patterns; wider ones must hold them as values.
        # Checked in int64: torch has no min/max/comparisons for uint16/32/64 on CPU (uint64 values
        # of 2**63 and above come out negative there, and are refused as well).
        if t.dtype != torch.int32 and t.numel():
            wide = t.to(torch.int64)
            bad = ((wide < 0) | (wide > MASK32)).flatten().nonzero()
            if bad.numel():
                value = int(wide.flatten()[bad[0, 0]])
                value += (1 << 64) if t.dtype == torch.uint64 and value < 0 else 0
                raise ValueError(f"philox4x32_batch: {name} must hold uint32 values in [0, 2**32), got {value}")
    if keys.device != counters.device:
        raise ValueError(f"philox4x32_batch: keys are on {keys.device}, counters on {counters.device}")
    name = resolve(backend, counters.device, torch.float32, "philox4x32_batch")
    m = counters.shape[0]
    if name == "torch":
        c = counters.to(torch.int64) & MASK32
        k = keys.to(torch.int64) & MASK32
        rows = []
        for i in range(m):
            seed = int(k[i, 0]) | (int(k[i, 1]) << 32)
            rows.append(torch.stack(philox4x32(*(c[i, j : j + 1] for j in range(4)), seed=seed), dim=1))
        return torch.cat(rows) if rows else torch.zeros(0, 4, dtype=torch.int64, device=counters.device)
    c32, k32 = _as_int32_bits(counters), _as_int32_bits(keys)
    out = torch.empty_like(c32)
    if m == 0:
        return out.to(torch.int64)
    if name == "cpp":
        from ._backend import cpp_module

        cpp_module()[0].philox4x32(c32.data_ptr(), k32.data_ptr(), out.data_ptr(), m)
    elif name == "triton":
        from . import _triton

        out = _triton.philox4x32(c32, k32)
    else:
        launch(name, "subspace.cu", "sk_philox4x32", (-(-m // 128),), (128,),
               [("p", c32.data_ptr()), ("p", k32.data_ptr()), ("p", out.data_ptr()), ("q", m)], counters.device)
    return out.to(torch.int64) & MASK32
