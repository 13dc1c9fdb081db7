"""Triton kernels of the fused ops (imported only when the "triton" backend runs, so that
``import sharpkit`` never needs Triton).

On GPU they compile for the device; under ``TRITON_INTERPRET=1`` they run on CPU tensors through
Triton's interpreter (tests only: about a millisecond per program instance, so keep grids small).
Philox is written with ``tl.umulhi`` on uint32 (no ``tl.randn``), reproducing
:mod:`sharpkit.kernels.philox` exactly.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

# Elements per program of the box ascent kernel, rows and column pairs per subspace tile.
BOX_BLOCK = 1024
SUBSPACE_ROWS = 32
SUBSPACE_PAIRS = 16
# CUDA caps grid dimensions 1 and 2 at 65535 programs: the column-pair axis of the subspace kernels
# is launched in slices of at most this many programs (p above ~2 million columns otherwise fails).
MAX_GRID_Y = 65535


@triton.jit
def _runtime_loop_probe(out_ptr, n, BLOCK: tl.constexpr):
    """Counts the steps of a loop over a runtime bound, the pattern every kernel here uses."""
    acc = tl.zeros([BLOCK], tl.float32)
    for _ in range(0, n, BLOCK):
        acc += 1.0
    tl.store(out_ptr + tl.arange(0, BLOCK), acc)


def interpreter_probe() -> None:
    """Raises where Triton's CPU interpreter cannot run the kernels here (Triton 3.6 and older
    fail on loops over runtime bounds under NumPy 2.4 and newer: 'only 0-dimensional arrays can
    be converted to Python scalars')."""
    out = torch.zeros(4)
    _runtime_loop_probe[(1,)](out, 9, BLOCK=4)
    if out.tolist() != [3.0] * 4:
        raise RuntimeError(f"a loop of 3 steps counted {out.tolist()}")


@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten Philox-4x32 rounds on uint32 tensors (counter c0..c3, key k0, k1)."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _gauss_pair(rows, pairs, keys_ptr, F64: tl.constexpr, LIBDEVICE: tl.constexpr):
    """(A[rows, 2 * pairs], A[rows, 2 * pairs + 1]) for int64 ``rows`` (a column) and ``pairs``
    (a row); float32 unless F64.  ``keys_ptr``: the seed's two 32-bit halves (int32 bit patterns).

    LIBDEVICE (GPU): libdevice's sqrt/log/cos/sin (``tl.sqrt`` lowers to ``sqrt.approx``), so the
    entries do not depend on how a Triton version lowers the tl math functions.  The interpreter
    has no libdevice and computes tl.sqrt/tl.log/tl.cos/tl.sin with numpy."""
    c2 = pairs.to(tl.uint32)
    c0 = rows.to(tl.uint32) + c2 * 0  # low 32 bits of the row, broadcast to the tile
    c1 = (rows >> 32).to(tl.uint32) + c2 * 0
    c2 = c2 + c0 * 0
    c3 = c0 * 0
    k0 = c3 + tl.load(keys_ptr).to(tl.uint32, bitcast=True)
    k1 = c3 + tl.load(keys_ptr + 1).to(tl.uint32, bitcast=True)
    r0, r1, _, _ = _philox4x32_10(c0, c1, c2, c3, k0, k1)
    if F64:
        u1 = (r0.to(tl.float64) + 0.5) * 2.3283064365386963e-10
        u2 = (r1.to(tl.float64) + 0.5) * 2.3283064365386963e-10
        two_pi = tl.full([1, 1], 6.283185307179586, tl.float64)
    else:
        u1 = (r0.to(tl.float32) + 0.5) * 2.3283064365386963e-10
        u2 = (r1.to(tl.float32) + 0.5) * 2.3283064365386963e-10
        two_pi = tl.full([1, 1], 6.283185307179586, tl.float32)
    angle = two_pi * u2
    if LIBDEVICE:
        radius = libdevice.sqrt(-2.0 * libdevice.log(u1))
        return radius * libdevice.cos(angle), radius * libdevice.sin(angle)
    else:
        radius = tl.sqrt(-2.0 * tl.log(u1))
        return radius * tl.cos(angle), radius * tl.sin(angle)


@triton.jit
def _philox_kernel(ctr_ptr, key_ptr, out_ptr, count, BLOCK: tl.constexpr):
    # int64: 4 * i passes 2**31 from m = 2**29 sets on.
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < count
    # uint32 values travel as int32 bit patterns (torch's uint32 support is partial).
    c0 = tl.load(ctr_ptr + 4 * i, mask=mask, other=0).to(tl.uint32, bitcast=True)
    c1 = tl.load(ctr_ptr + 4 * i + 1, mask=mask, other=0).to(tl.uint32, bitcast=True)
    c2 = tl.load(ctr_ptr + 4 * i + 2, mask=mask, other=0).to(tl.uint32, bitcast=True)
    c3 = tl.load(ctr_ptr + 4 * i + 3, mask=mask, other=0).to(tl.uint32, bitcast=True)
    k0 = tl.load(key_ptr + 2 * i, mask=mask, other=0).to(tl.uint32, bitcast=True)
    k1 = tl.load(key_ptr + 2 * i + 1, mask=mask, other=0).to(tl.uint32, bitcast=True)
    r0, r1, r2, r3 = _philox4x32_10(c0, c1, c2, c3, k0, k1)
    tl.store(out_ptr + 4 * i, r0.to(tl.int32, bitcast=True), mask=mask)
    tl.store(out_ptr + 4 * i + 1, r1.to(tl.int32, bitcast=True), mask=mask)
    tl.store(out_ptr + 4 * i + 2, r2.to(tl.int32, bitcast=True), mask=mask)
    tl.store(out_ptr + 4 * i + 3, r3.to(tl.int32, bitcast=True), mask=mask)


def philox4x32(counters: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Philox-4x32-10 of ``counters`` (m, 4) under ``keys`` (m, 2), uint32 values held as int32 bit
    patterns; returns (m, 4) int32 bit patterns."""
    counters, keys = counters.contiguous(), keys.contiguous()
    out = torch.empty_like(counters)
    m = counters.shape[0]
    if m:
        _philox_kernel[(triton.cdiv(m, 64),)](counters, keys, out, m, BLOCK=64)
    return out


@triton.jit
def _box_ascent_kernel(x_ptr, y_ptr, g_ptr, yp_ptr, yo_ptr, wo_ptr, scal_ptr, n,
                       SIGN: tl.constexpr, MOMENTUM: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    # eps, step, mu, 1 - mu come from a small tensor in the compute dtype: Triton would turn
    # Python floats into float32 arguments and lose float64 precision.
    eps = tl.load(scal_ptr)
    step = tl.load(scal_ptr + 1)
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    g = tl.load(g_ptr + offs, mask=mask)
    if not F64:  # float32 compute for float32/16/bf16, as the CUDA and C++ kernels
        x = x.to(tl.float32)
        y = y.to(tl.float32)
        g = g.to(tl.float32)
    bound = eps * (tl.abs(x) + 1.0)
    if SIGN:
        d = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, g))  # sign(NaN) = NaN, as torch.sign
    else:
        d = g
    v = y + step * d
    z = tl.where(v < -bound, -bound, v)
    z = tl.where(z > bound, bound, z)
    z = tl.where(bound != bound, bound, z)  # a NaN bound propagates, as torch.maximum/minimum
    if MOMENTUM:
        mu = tl.load(scal_ptr + 2)
        omu = tl.load(scal_ptr + 3)
        yp = tl.load(yp_ptr + offs, mask=mask)
        if not F64:
            yp = yp.to(tl.float32)
        v = y + mu * (z - y) + omu * (y - yp)
        z = tl.where(v < -bound, -bound, v)
        z = tl.where(z > bound, bound, z)
        z = tl.where(bound != bound, bound, z)
    tl.store(yo_ptr + offs, z.to(yo_ptr.dtype.element_ty), mask=mask)
    tl.store(wo_ptr + offs, (x + z).to(wo_ptr.dtype.element_ty), mask=mask)


def box_ascent(x, y, g, y_prev, y_out, w_out, epsilon: float, step: float, sign_mode: bool, mu: float,
               block: int = BOX_BLOCK) -> None:
    """Launch the fused box ascent kernel on contiguous tensors (outputs preallocated)."""
    n = x.numel()
    f64 = x.dtype == torch.float64
    scalars = torch.tensor([epsilon, step, mu, 1.0 - mu], dtype=torch.float64 if f64 else torch.float32,
                           device=x.device)
    momentum = y_prev is not None
    _box_ascent_kernel[(triton.cdiv(n, block),)](
        x, y, g, y_prev if momentum else x, y_out, w_out, scalars, n,
        SIGN=sign_mode, MOMENTUM=momentum, F64=f64, BLOCK=block)


@triton.jit
def _subspace_fill_kernel(out_ptr, row0, rows, p, pair0, keys_ptr, F64: tl.constexpr, LIBDEVICE: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    k = pair0 + tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    a, b = _gauss_pair((row0 + r)[:, None], k[None, :], keys_ptr, F64, LIBDEVICE)
    rmask = (r < rows)[:, None]
    base = out_ptr + r[:, None] * p + 2 * k[None, :]
    tl.store(base, a.to(out_ptr.dtype.element_ty), mask=rmask & (2 * k < p)[None, :])
    tl.store(base + 1, b.to(out_ptr.dtype.element_ty), mask=rmask & (2 * k + 1 < p)[None, :])


@triton.jit
def _subspace_matvec_kernel(z_ptr, out_ptr, row0, rows, p, keys_ptr, F64: tl.constexpr,
                            LIBDEVICE: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    pairs = (p + 1) // 2
    if F64:
        acc = tl.zeros([BLOCK_R], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, pairs, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        a, b = _gauss_pair((row0 + r)[:, None], k[None, :], keys_ptr, F64, LIBDEVICE)
        ze = tl.load(z_ptr + 2 * k, mask=2 * k < p, other=0.0).to(acc.dtype)
        zo = tl.load(z_ptr + 2 * k + 1, mask=2 * k + 1 < p, other=0.0).to(acc.dtype)
        acc += tl.sum(a * ze[None, :] + b * zo[None, :], axis=1)
    tl.store(out_ptr + r, acc.to(out_ptr.dtype.element_ty), mask=r < rows)


@triton.jit
def _subspace_rmatvec_kernel(g_ptr, partial_ptr, row0, rows, p, pair0, keys_ptr, F64: tl.constexpr,
                             LIBDEVICE: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    # Program (i, j): rows i*BLOCK_R.., column pairs pair0 + j*BLOCK_K..; partial[i, :] gets its
    # sums and the host adds the partials over i (deterministic, no atomics).
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    k = pair0 + tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    a, b = _gauss_pair((row0 + r)[:, None], k[None, :], keys_ptr, F64, LIBDEVICE)
    gr = tl.load(g_ptr + r, mask=r < rows, other=0.0).to(a.dtype)
    se = tl.sum(a * gr[:, None], axis=0)
    so = tl.sum(b * gr[:, None], axis=0)
    base = partial_ptr + tl.program_id(0).to(tl.int64) * p + 2 * k
    tl.store(base, se, mask=2 * k < p)
    tl.store(base + 1, so, mask=2 * k + 1 < p)


def _pair_slices(p: int, block_pairs: int) -> list[tuple[int, int]]:
    """``(first column pair, programs)`` of each launch over the (p + 1) // 2 column pairs, at most
    ``MAX_GRID_Y`` programs (of ``block_pairs`` pairs) each."""
    programs = triton.cdiv((p + 1) // 2, block_pairs)
    return [(j * block_pairs, min(MAX_GRID_Y, programs - j)) for j in range(0, programs, MAX_GRID_Y)]


def _keys(seed: int, device: torch.device) -> torch.Tensor:
    """The seed's (low, high) 32-bit halves as int32 bit patterns on ``device``."""
    halves = [(seed >> shift) & 0xFFFFFFFF for shift in (0, 32)]
    return torch.tensor([h - (1 << 32) if h >= 1 << 31 else h for h in halves], dtype=torch.int32, device=device)


def subspace_fill(seed: int, row0: int, out: torch.Tensor, block_rows: int = SUBSPACE_ROWS,
                  block_pairs: int = SUBSPACE_PAIRS) -> None:
    """Rows ``row0 .. row0 + out.shape[0] - 1`` of A into the contiguous ``out`` (rows, p)."""
    rows, p = out.shape
    if rows == 0 or p == 0:
        return
    keys = _keys(seed, out.device)
    for pair0, programs in _pair_slices(p, block_pairs):
        _subspace_fill_kernel[(triton.cdiv(rows, block_rows), programs)](
            out, row0, rows, p, pair0, keys, F64=out.dtype == torch.float64, LIBDEVICE=out.is_cuda,
            BLOCK_R=block_rows, BLOCK_K=block_pairs)


def subspace_matvec(seed: int, row0: int, z: torch.Tensor, out: torch.Tensor, block_rows: int = SUBSPACE_ROWS,
                    block_pairs: int = SUBSPACE_PAIRS) -> None:
    """``out = A[row0 : row0 + len(out)] @ z``."""
    rows, p = out.shape[0], z.shape[0]
    if rows == 0:
        return
    keys = _keys(seed, out.device)
    _subspace_matvec_kernel[(triton.cdiv(rows, block_rows),)](
        z, out, row0, rows, p, keys, F64=out.dtype == torch.float64, LIBDEVICE=out.is_cuda,
        BLOCK_R=block_rows, BLOCK_K=block_pairs)


def subspace_rmatvec(seed: int, row0: int, g: torch.Tensor, p: int, block_rows: int = SUBSPACE_ROWS,
                     block_pairs: int = SUBSPACE_PAIRS) -> torch.Tensor:
    """``A[row0 : row0 + len(g)].T @ g`` in the compute dtype (float32, or float64 for float64)."""
    rows = g.shape[0]
    work = torch.float64 if g.dtype == torch.float64 else torch.float32
    if rows == 0 or p == 0:
        return torch.zeros(p, dtype=work, device=g.device)
    keys = _keys(seed, g.device)
    gx = triton.cdiv(rows, block_rows)
    partial = torch.empty(gx, p, dtype=work, device=g.device)
    for pair0, programs in _pair_slices(p, block_pairs):  # each slice writes its own columns
        _subspace_rmatvec_kernel[(gx, programs)](g, partial, row0, rows, p, pair0, keys, F64=work == torch.float64,
                                                 LIBDEVICE=g.is_cuda, BLOCK_R=block_rows, BLOCK_K=block_pairs)
    return partial.sum(0)


def compile_all(capability: int = 90) -> list[str]:
    """Compile every kernel of this file for an NVIDIA GPU of ``capability`` (e.g. 90, 80) without
    needing one (Triton's bundled ptxas); returns the compiled variants.  A check for machines
    without a GPU: the interpreter runs the kernels' semantics, this catches what only the GPU
    compiler rejects.  Must run without TRITON_INTERPRET (kernels must be JIT functions)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", capability, 32)
    done = []

    def build(fn, signature, constexprs):
        sig = dict(signature, **{k: "constexpr" for k in constexprs})
        triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=target)
        done.append(f"{fn.__name__}{constexprs}")

    for dt in ("fp32", "fp64", "fp16", "bf16"):
        p = "*" + dt
        for sign, mom in ((True, True), (False, False)):
            build(_box_ascent_kernel,
                  {"x_ptr": p, "y_ptr": p, "g_ptr": p, "yp_ptr": p, "yo_ptr": p, "wo_ptr": p,
                   "scal_ptr": "*fp64" if dt == "fp64" else "*fp32", "n": "i64"},
                  {"SIGN": sign, "MOMENTUM": mom, "F64": dt == "fp64", "BLOCK": BOX_BLOCK})
        common = {"row0": "i64", "rows": "i64", "p": "i64", "keys_ptr": "*i32"}
        sliced = {"row0": "i64", "rows": "i64", "p": "i64", "pair0": "i64", "keys_ptr": "*i32"}
        tiles = {"F64": dt == "fp64", "LIBDEVICE": True, "BLOCK_R": SUBSPACE_ROWS, "BLOCK_K": SUBSPACE_PAIRS}
        work = "*fp64" if dt == "fp64" else "*fp32"
        build(_subspace_fill_kernel, {"out_ptr": p, **sliced}, tiles)
        build(_subspace_matvec_kernel, {"z_ptr": p, "out_ptr": p, **common}, tiles)
        build(_subspace_rmatvec_kernel, {"g_ptr": p, "partial_ptr": work, **sliced}, tiles)
    build(_philox_kernel, {"ctr_ptr": "*i32", "key_ptr": "*i32", "out_ptr": "*i32", "count": "i32"}, {"BLOCK": 64})
    return done
