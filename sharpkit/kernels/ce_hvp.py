"""Softmax cross-entropy Hessian product for k stacked directions (fused HVP engine).

The Hessian of ``logsumexp(z_i) - <t_i, z_i>`` with respect to the logits ``z_i`` of one sample is
``diag(p_i) - p_i p_i^T`` with ``p_i = softmax(z_i)``.  For a mean-reduced loss each sample carries
a scale ``s_i`` (``1/N`` for plain ``nn.CrossEntropyLoss``).  The op is, for ``z`` (N, C),
``R`` (N, k, C) and ``s`` (N,),

    out[i, j, :] = s_i * p_i * (R[i, j, :] - <p_i, R[i, j, :]>)

(equal to ``s_i (p_i * r - p_i (p_i^T r))``).  The kernels recompute ``p_i = exp(z_i - lse_i)``
from the logits and the per-row ``lse`` (N floats), so the extra memory is O(N) instead of the
O(k N C) of the eager chain (softmax, product, reduction, broadcast).  ``out`` may alias ``R``.

Saturated softmax.  Every backend first subtracts from each row of ``R`` its entry at the row's
largest logit ``a_i`` (``ref``, N indices): the product is unchanged, since the rows of
``diag(p) - p p^T`` sum to zero, but ``R[a] - <p, R>`` would otherwise cancel.  When ``p_a`` is
within rounding of 1 (a well-fitted sample: margin above about 17 in float32, 37 in float64) the
true entries are of the order of ``1 - p_a``, far below ``eps * |R|``; computed plainly they are
rounding noise (a float32 product of such samples 62% off at margin 20), shifted they keep their
relative precision.

Backends: "torch" (the definition), "triton" (GPU; CPU tensors under ``TRITON_INTERPRET=1``),
"cuda" / "cupy" (csrc/ce_hvp.cu).  ``"auto"``: CUDA > Triton > CuPy on GPU, torch on CPU.
"""
from __future__ import annotations

import torch

from ..params import canonical_device
from . import _backend

try:  # Triton is optional: without it the torch path runs.
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except Exception:  # pragma: no cover - exercised only where Triton is missing
    _HAVE_TRITON = False

__all__ = ["ce_hvp_reference", "ce_hvp", "CEHessian", "compute_dtype"]

# Elements per Triton tile (rows x columns); one row per tile when C is larger than this.
TILE = 4096
MAX_BLOCK_C = 4096
CUDA_THREADS = 256  # 8 warps per block, one row per warp


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise (half precision accumulates in float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(logits: torch.Tensor, r: torch.Tensor, scale: torch.Tensor, lse: torch.Tensor | None,
           ref: torch.Tensor | None = None) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (N, C), got {tuple(logits.shape)}")
    n, c = logits.shape
    if r.dim() not in (2, 3) or r.shape[0] != n or r.shape[-1] != c:
        raise ValueError(f"R must have shape (N, C) or (N, k, C) with (N, C) = {(n, c)}, got {tuple(r.shape)}")
    if scale.shape != (n,):
        raise ValueError(f"scale must have shape ({n},), got {tuple(scale.shape)}")
    if lse is not None and lse.shape != (n,):
        raise ValueError(f"lse must have shape ({n},), got {tuple(lse.shape)}")
    if ref is not None and (ref.shape != (n,) or ref.dtype != torch.int64):
        raise ValueError(f"ref must be an int64 tensor of shape ({n},), got {ref.dtype} {tuple(ref.shape)}")
    if not (logits.is_floating_point() and r.is_floating_point()):
        raise TypeError(f"logits and R must be floating point, got {logits.dtype} and {r.dtype}")
    _backend.check_same_device("ce_hvp", "R", {"R": r, "logits": logits, "scale": scale, "lse": lse, "ref": ref})


def largest_logit(logits: torch.Tensor) -> torch.Tensor:
    """(N,) int64: each row's index of its largest logit, the entry every backend shifts ``R`` by."""
    if logits.shape[1] == 0:
        return torch.zeros(logits.shape[0], dtype=torch.int64, device=logits.device)
    return logits.argmax(dim=-1)


def ce_hvp_reference(logits: torch.Tensor, r: torch.Tensor, scale: torch.Tensor,
                     lse: torch.Tensor | None = None, ref: torch.Tensor | None = None) -> torch.Tensor:
    """The definition, computed in :func:`compute_dtype` and returned in ``R``'s dtype.
    ``ref``: :func:`largest_logit` of ``logits`` if already known."""
    _check(logits, r, scale, lse, ref)
    work = compute_dtype(r.dtype)
    z = logits.to(work)
    lse = torch.logsumexp(z, dim=-1) if lse is None else lse.to(work)
    p = torch.exp(z - lse[:, None])
    stacked = r.dim() == 3
    rr = r.to(work) if stacked else r.to(work)[:, None, :]
    if rr.numel():
        idx = (largest_logit(logits) if ref is None else ref)[:, None, None].expand(-1, rr.shape[1], 1)
        rr = rr - rr.gather(-1, idx)
    dot = torch.einsum("nkc,nc->nk", rr, p)
    out = scale.to(work)[:, None, None] * p[:, None, :] * (rr - dot[..., None])
    return (out if stacked else out[:, 0, :]).to(r.dtype)


# ---- Triton ---------------------------------------------------------------------------------------

if _HAVE_TRITON:

    @triton.jit
    def _ce_hvp_kernel(z_ptr, lse_ptr, s_ptr, ref_ptr, r_ptr, out_ptr, M, K, C,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE: tl.constexpr):
        # Rows m of the (M = N*k, C) stack; row m belongs to sample m // k, whose logits row is
        # re-read (from cache) for each of its k directions instead of storing softmax.
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        rmask = rows < M
        samp = rows // K
        lse = tl.load(lse_ptr + samp, mask=rmask, other=0.0)
        s = tl.load(s_ptr + samp, mask=rmask, other=0.0)
        zrow = z_ptr + samp[:, None] * C
        rrow = r_ptr + rows[:, None] * C
        orow = out_ptr + rows[:, None] * C
        # The row's entry at its largest logit, read before any write (out may alias r).
        ra = tl.load(r_ptr + rows * C + tl.load(ref_ptr + samp, mask=rmask, other=0), mask=rmask, other=0.0)
        ra = ra.to(lse.dtype)[:, None]
        if SINGLE:
            cols = tl.arange(0, BLOCK_C)
            m2 = rmask[:, None] & (cols < C)[None, :]
            z = tl.load(zrow + cols[None, :], mask=m2, other=0.0).to(lse.dtype)
            p = tl.where(m2, tl.exp(z - lse[:, None]), 0.0)
            r = tl.load(rrow + cols[None, :], mask=m2, other=0.0).to(lse.dtype) - ra
            dot = tl.sum(p * r, axis=1)
            out = s[:, None] * p * (r - dot[:, None])
            tl.store(orow + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=m2)
        else:
            dot = tl.zeros([BLOCK_M], dtype=lse.dtype)
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                m2 = rmask[:, None] & (cols < C)[None, :]
                z = tl.load(zrow + cols[None, :], mask=m2, other=0.0).to(lse.dtype)
                p = tl.where(m2, tl.exp(z - lse[:, None]), 0.0)
                r = tl.load(rrow + cols[None, :], mask=m2, other=0.0).to(lse.dtype) - ra
                dot += tl.sum(p * r, axis=1)
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                m2 = rmask[:, None] & (cols < C)[None, :]
                z = tl.load(zrow + cols[None, :], mask=m2, other=0.0).to(lse.dtype)
                p = tl.where(m2, tl.exp(z - lse[:, None]), 0.0)
                r = tl.load(rrow + cols[None, :], mask=m2, other=0.0).to(lse.dtype) - ra
                out = s[:, None] * p * (r - dot[:, None])
                tl.store(orow + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=m2)


def _blocks(c: int, block_c: int | None) -> tuple[int, int, bool]:
    """(BLOCK_M, BLOCK_C, single pass?) for rows of length ``c``."""
    bc = block_c or min(MAX_BLOCK_C, triton.next_power_of_2(max(c, 1)))
    single = c <= bc
    bm = max(1, min(64, TILE // bc)) if single else 1
    return bm, bc, single


def _launch_triton(z, lse, s, ref, r2, out2, k: int, block_c: int | None = None) -> None:
    m, c = r2.shape
    bm, bc, single = _blocks(c, block_c)
    _ce_hvp_kernel[(triton.cdiv(m, bm),)](z, lse, s, ref, r2, out2, m, k, c, BLOCK_M=bm, BLOCK_C=bc,
                                          SINGLE=single)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _launch_native(backend: str, z, lse, s, ref, r2, out2, k: int) -> None:
    m, c = r2.shape
    warps = CUDA_THREADS // 32
    index = canonical_device(r2.device).index
    blocks = max(1, min(_cdiv(m, warps), 32 * _backend.multiprocessor_count(index)))
    name = "sk_ce_hvp_" + _backend.DTYPE_SUFFIX[r2.dtype]
    args = [_backend.ptr(z), _backend.ptr(lse), _backend.ptr(s), _backend.ptr(ref), _backend.ptr(r2), _backend.ptr(out2),
            ("q", m), ("q", k), ("q", c)]
    _backend.launch(backend, "ce_hvp.cu", name, (blocks,), (CUDA_THREADS,), args, r2.device)


def ce_hvp(logits: torch.Tensor, r: torch.Tensor, scale: torch.Tensor, lse: torch.Tensor | None = None,
           backend: str = "auto", out: torch.Tensor | None = None, block_c: int | None = None) -> torch.Tensor:
    """``s_i * p_i * (R - <p_i, R>)`` for ``R`` (N, C) or (N, k, C); see the module docstring.

    Args:
        logits: (N, C).  r: the directions' logit perturbations.  scale: (N,) per-sample weights.
        lse: (N,) ``logsumexp(logits, -1)`` if already known (saves a reduction).
        backend: "auto", "torch", "triton", "cuda" or "cupy".
        out: result buffer shaped like ``r`` (may be ``r`` itself: the op is safe in place).
        block_c: Triton column block (tests use it to exercise the multi-chunk path).
    Returns ``out`` (or a new tensor) in ``r``'s dtype.
    """
    return _ce_hvp(logits, r, scale, lse, backend, out, block_c, None)


def _ce_hvp(logits: torch.Tensor, r: torch.Tensor, scale: torch.Tensor, lse: torch.Tensor | None, backend: str,
            out: torch.Tensor | None, block_c: int | None, ref: torch.Tensor | None) -> torch.Tensor:
    """:func:`ce_hvp` given ``ref``, :func:`largest_logit` of ``logits`` (None: computed here).  The
    kernels index rows by ``ref`` unchecked, so it is private: only :class:`CEHessian` passes its own."""
    _check(logits, r, scale, lse, ref)
    name = _backend.resolve(backend, r.device, r.dtype, "ce_hvp")
    if name == "cpp":  # no C++ version: the torch definition is the CPU path
        name = "torch"
    if name == "triton" and not _HAVE_TRITON:
        raise RuntimeError("ce_hvp: backend 'triton' is unusable here: cannot import triton")
    if out is not None and (out.shape != r.shape or out.dtype != r.dtype or out.device != r.device):
        raise ValueError(f"out must match R: shape {tuple(r.shape)}, {r.dtype}, {r.device}")
    if block_c is not None and (isinstance(block_c, bool) or not isinstance(block_c, int) or block_c < 1
                                or block_c & (block_c - 1)):
        raise ValueError(f"ce_hvp: block_c must be a positive power of two (or None), got {block_c!r}")
    if name == "torch":
        res = ce_hvp_reference(logits, r, scale, lse, ref)
        return res if out is None else out.copy_(res)
    work = compute_dtype(r.dtype)
    # The definition reads the logits in the compute dtype, never rounded to a 16-bit R's dtype
    # first (that would shift p by up to |z| * 2**-11 relative for float16, 2**-8 for bfloat16).
    # Triton converts whatever it loads, so it takes the logits as they are; the CUDA kernels read
    # them in the compute dtype.
    z = (logits if name == "triton" else logits.to(work)).contiguous()
    lse = (torch.logsumexp(z.to(work), dim=-1) if lse is None else lse.to(work)).contiguous()
    s = scale.to(work).contiguous()
    ref = (largest_logit(logits) if ref is None else ref).contiguous()
    n, c = logits.shape
    k = r.shape[1] if r.dim() == 3 else 1
    src = r.contiguous()
    # out may be r itself (each row is read before it is written); any other sharing of memory
    # with an input, or a non-contiguous out, goes through a fresh buffer.
    direct = out is not None and out.is_contiguous() and not any(
        _backend.partially_overlaps(out, t) for t in (src, z, lse, s, ref))
    dst = out if direct else torch.empty_like(src)
    if n * k * c:
        r2, o2 = src.view(n * k, c), dst.view(n * k, c)
        if name == "triton":
            _launch_triton(z, lse, s, ref, r2, o2, k, block_c)
        else:
            _launch_native(name, z, lse, s, ref, r2, o2, k)
    if out is not None and dst is not out:
        out.copy_(dst)
        return out
    return dst


class CEHessian:
    """The loss-Hessian product the engine applies to the logits' R-values, for one batch.

    Keeps ``logits`` and ``lse`` (O(N C) + O(N)); on the torch (CPU) path it also keeps
    ``softmax(logits)`` once, which every direction reuses.
    """

    def __init__(self, logits: torch.Tensor, scale: torch.Tensor, backend: str = "auto"):
        work = compute_dtype(logits.dtype)
        self.logits = logits
        self.lse = torch.logsumexp(logits.to(work), dim=-1)
        self.scale = scale.to(work)
        self.ref = largest_logit(logits)
        name = _backend.resolve(backend, logits.device, logits.dtype, "ce_hvp")
        self.backend = "torch" if name == "cpp" else name
        if self.backend in ("cuda", "cupy"):  # the CUDA kernels read the logits in the compute dtype
            self.logits = logits.to(work).contiguous()
        if self.backend == "torch":
            self.p = torch.exp(logits.to(work) - self.lse[:, None]).to(logits.dtype)
            self.sp = (self.scale[:, None] * self.p).to(logits.dtype)[:, None, :]

    def apply_(self, r: torch.Tensor) -> torch.Tensor:
        """The product for ``r`` (N, k, C), written over ``r`` and returned."""
        if self.backend == "torch":
            if r.numel():  # shift by the entry at the largest logit (module docstring)
                r.sub_(r.gather(-1, self.ref[:, None, None].expand(-1, r.shape[1], 1)))
            dot = (r * self.p[:, None, :]).sum(-1, keepdim=True)  # (N, k, 1): <p_i, r_ij>
            r.sub_(dot).mul_(self.sp)
            return r
        return _ce_hvp(self.logits, r, self.scale, self.lse, self.backend, r, None, self.ref)
