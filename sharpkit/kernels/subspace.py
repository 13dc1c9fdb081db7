"""Matrix-free Gaussian random subspace A (n x p), entries generated on the fly from (seed, i, j).

A is never stored: products walk over blocks of rows, generating each block's entries with
Philox (:mod:`sharpkit.kernels.philox` defines them) and discarding them, so memory stays
O(block_rows * p) however large n is.  The fast backends generate the entries inside the product
kernels (C++: OpenMP over rows; Triton: ``tl.umulhi`` Philox; CUDA/CuPy: ``__umulhi``).
"""
from __future__ import annotations

import operator

import torch

from ..params import canonical_device
from ._backend import DTYPE_CODES, DTYPE_SUFFIX, cpp_module, for_autograd, launch, multiprocessor_count, ptr, resolve
from .philox import gaussian_block

DEFAULT_BLOCK_ROWS = 1 << 14
# CUDA launch shapes (csrc/subspace.cu: SK_RMV_THREADS threads, SK_RMV_PAIRS column pairs per block).
_CUDA_THREADS = 256
_CUDA_RMV_PAIRS = 8
_CUDA_MAX_GRID_Y = 65535


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool):
        raise TypeError(f"GaussianSubspace: {name} must be an int, got bool")
    try:
        value = operator.index(value)  # int, numpy integers, 0-d integer tensors
    except TypeError:
        raise TypeError(f"GaussianSubspace: {name} must be an int, got {type(value).__name__}") from None
    if value < low or (high is not None and value >= high):
        bound = f"[{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"GaussianSubspace: {name} must be {bound}, got {value}")
    return int(value)


class GaussianSubspace:
    """A random n x p matrix with i.i.d. N(0, 1) entries defined by ``(seed, i, j)``.

    Args:
        n: rows (the parameter count).  p: columns (the subspace dimension, e.g. 100).
        seed: integer in [0, 2**64); the same seed gives the same A (to float rounding) on every
            backend, device and block size.
        backend: ``"auto"`` (fastest usable for ``device``) or one of :func:`sharpkit.ops.backends`' names.
        dtype: of the results (default float32; float16/bfloat16 on GPU backends and torch).
        device: of the results (default CPU).
        block_rows: rows handled per step (default 16384); the torch backend and ``gram`` hold
            ``block_rows * p`` entries at a time.
    """

    def __init__(
        self,
        n: int,
        p: int,
        seed: int = 0,
        backend: str = "auto",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        block_rows: int = DEFAULT_BLOCK_ROWS,
    ):
        # Row indices are int64 in every backend (and in the C++ entry points): rows 0 .. 2**63 - 1.
        self.n = _check_int("n", n, 0, (1 << 63) + 1)
        self.p = _check_int("p", p, 0, 1 << 33)
        self.seed = _check_int("seed", seed, 0, 1 << 64)
        self.block_rows = _check_int("block_rows", block_rows, 1)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"GaussianSubspace: dtype must be a floating torch.dtype, got {dtype!r}")
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"GaussianSubspace: device {str(self.device)!r} asked for, but CUDA is not available here")
        self.device = canonical_device(self.device)
        self.backend = resolve(backend, self.device, dtype, "GaussianSubspace")
        self._requested_backend = backend
        # Products accumulate in float32 for the 16-bit dtypes.
        self._work = dtype if dtype in (torch.float32, torch.float64) else torch.float32

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.p)

    def __repr__(self) -> str:
        return (f"GaussianSubspace(n={self.n}, p={self.p}, seed={self.seed}, backend={self.backend!r}, "
                f"dtype={self.dtype}, device={self.device})")

    def _chunks(self):
        for start in range(0, self.n, self.block_rows):
            yield start, min(self.block_rows, self.n - start)

    def _backend_for(self, v: torch.Tensor, what: str) -> str:
        """This call's backend: the torch path where ``v`` needs autograd history (see
        :func:`~sharpkit.kernels._backend.for_autograd`)."""
        return "torch" if for_autograd(self._requested_backend, (v,), f"GaussianSubspace.{what}") == "torch" \
            else self.backend

    def _vector(self, v: torch.Tensor, length: int, what: str) -> torch.Tensor:
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"GaussianSubspace.{what} expects a torch.Tensor, got {type(v).__name__}")
        if v.shape != (length,):
            raise ValueError(f"GaussianSubspace.{what} expects shape ({length},), got {tuple(v.shape)}")
        if v.is_complex():  # converting would drop the imaginary part (with only a warning)
            raise TypeError(f"GaussianSubspace.{what} expects a real tensor, got {v.dtype}")
        if v.layout != torch.strided:
            raise TypeError(f"GaussianSubspace.{what} expects a dense (strided) tensor, got layout {v.layout}")
        return v.to(self.device, self.dtype).contiguous()

    # ---- entries -------------------------------------------------------------------------------

    def rows(self, start: int, count: int) -> torch.Tensor:
        """Rows ``start : start + count`` of A, shape ``(count, p)``, generated by this backend."""
        start = _check_int("start", start, 0)
        count = _check_int("count", count, 0)
        if start + count > self.n:
            raise ValueError(f"GaussianSubspace.rows: rows {start}..{start + count} exceed n={self.n}")
        if self.backend == "torch":
            return gaussian_block(self.seed, start, count, self.p, self.dtype, self.device)
        out = torch.empty(count, self.p, dtype=self.dtype, device=self.device)
        if count == 0 or self.p == 0:
            return out
        if self.backend == "cpp":
            cpp_module()[0].subspace_fill(self.seed, start, count, self.p, out.data_ptr(), DTYPE_CODES[self.dtype])
        elif self.backend == "triton":
            from . import _triton

            _triton.subspace_fill(self.seed, start, out)
        else:
            total = count * ((self.p + 1) // 2)
            blocks = min(_cdiv(total, _CUDA_THREADS), multiprocessor_count(self.device.index) * 32)
            launch(self.backend, "subspace.cu", f"sk_subspace_fill_{DTYPE_SUFFIX[self.dtype]}", (blocks,),
                   (_CUDA_THREADS,), [ptr(out), ("q", start), ("q", count), ("q", self.p), *self._key_args()],
                   self.device)
        return out

    def materialize(self) -> torch.Tensor:
        """A itself (n x p): for tests and small n only (it stores n * p entries)."""
        return self.rows(0, self.n)

    def _key_args(self) -> list[tuple[str, int]]:
        return [("I", self.seed & 0xFFFFFFFF), ("I", self.seed >> 32)]

    # ---- products ------------------------------------------------------------------------------

    def matvec(self, z: torch.Tensor) -> torch.Tensor:
        """``A @ z`` for z of shape ``(p,)`` (converted to this dtype/device) -> ``(n,)``."""
        backend = self._backend_for(z, "matvec")
        z = self._vector(z, self.p, "matvec")
        out = torch.empty(self.n, dtype=self.dtype, device=self.device)
        if self.p == 0:
            return out.zero_()
        for start, count in self._chunks():
            part = out[start : start + count]
            if backend == "torch":
                # In the working precision, rounded once into part (as rmatvec and the GPU kernels):
                # float16/bfloat16 entries and products would round every term.
                block = gaussian_block(self.seed, start, count, self.p, self._work, self.device)
                part.copy_(block @ z.to(self._work))
            elif backend == "cpp":
                cpp_module()[0].subspace_matvec(self.seed, start, count, self.p, z.data_ptr(), part.data_ptr(),
                                                DTYPE_CODES[self.dtype])
            elif backend == "triton":
                from . import _triton

                _triton.subspace_matvec(self.seed, start, z, part)
            else:
                blocks = min(_cdiv(count, _CUDA_THREADS), multiprocessor_count(self.device.index) * 16)
                launch(backend, "subspace.cu", f"sk_subspace_matvec_{DTYPE_SUFFIX[self.dtype]}", (blocks,),
                       (_CUDA_THREADS,), [ptr(z), ptr(part), ("q", start), ("q", count), ("q", self.p),
                                          *self._key_args()], self.device)
        return out

    def rmatvec(self, g: torch.Tensor) -> torch.Tensor:
        """``A.T @ g`` for g of shape ``(n,)`` (converted to this dtype/device) -> ``(p,)``."""
        backend = self._backend_for(g, "rmatvec")
        g = self._vector(g, self.n, "rmatvec")
        total = torch.zeros(self.p, dtype=self._work, device=self.device)
        if self.p == 0:
            return total.to(self.dtype)
        for start, count in self._chunks():
            part = g[start : start + count]
            if backend == "torch":
                block = gaussian_block(self.seed, start, count, self.p, self._work, self.device)
                total = total + block.T @ part.to(self._work)  # (out of place: autograd may follow it)
            elif backend == "cpp":
                piece = torch.empty(self.p, dtype=self.dtype, device=self.device)
                cpp_module()[0].subspace_rmatvec(self.seed, start, count, self.p, part.data_ptr(), piece.data_ptr(),
                                                 DTYPE_CODES[self.dtype])
                total += piece
            elif backend == "triton":
                from . import _triton

                total += _triton.subspace_rmatvec(self.seed, start, part, self.p)
            else:
                gx = min(_cdiv(count, _CUDA_THREADS), multiprocessor_count(self.device.index) * 4)
                gy = _cdiv((self.p + 1) // 2, _CUDA_RMV_PAIRS)
                partial = torch.empty(gx, self.p, dtype=self._work, device=self.device)
                # gridDim.y is at most 65535: slices of column pairs, each writing its own columns.
                for y0 in range(0, gy, _CUDA_MAX_GRID_Y):
                    launch(backend, "subspace.cu", f"sk_subspace_rmatvec_{DTYPE_SUFFIX[self.dtype]}",
                           (gx, min(_CUDA_MAX_GRID_Y, gy - y0)), (_CUDA_THREADS,),
                           [ptr(part), ptr(partial), ("q", start), ("q", count), ("q", self.p),
                            ("q", y0 * _CUDA_RMV_PAIRS), *self._key_args()], self.device)
                total += partial.sum(0)
        return total.to(self.dtype)

    def gram(self) -> torch.Tensor:
        """``A.T @ A`` (p x p), accumulated block by block (float32 for 16-bit dtypes)."""
        out = torch.zeros(self.p, self.p, dtype=self._work, device=self.device)
        for start, count in self._chunks():
            block = self.rows(start, count).to(self._work)
            out += block.T @ block
        return out.to(self.dtype)
