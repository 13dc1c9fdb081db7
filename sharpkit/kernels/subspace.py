"""Matrix-free Gaussian random subspace A (n x p), entries generated on the fly from (seed, i, j).

A is never stored: products walk over blocks of rows, generating each block with Philox
(:mod:`sharpkit.kernels.philox` defines the entries) and discarding it, so memory stays
O(block_rows * p) however large n is.
"""
from __future__ import annotations

import torch

from .philox import gaussian_block

DEFAULT_BLOCK_ROWS = 1 << 14


class GaussianSubspace:
    """A random n x p matrix with i.i.d. N(0, 1) entries defined by ``(seed, i, j)``.

    Args:
        n: rows (the parameter count).  p: columns (the subspace dimension, e.g. 100).
        seed: 64-bit seed; the same seed gives the same A on every backend and device.
        backend: ``"auto"`` or one of :func:`sharpkit.ops.backends`' names.
        dtype, device: of the products' results (default float32 on CPU).
        block_rows: rows generated per block (memory ``block_rows * p`` elements).
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
        if n < 0 or p < 0:
            raise ValueError(f"GaussianSubspace needs n >= 0 and p >= 0, got n={n}, p={p}")
        if block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {block_rows}")
        self.n, self.p, self.seed = int(n), int(p), int(seed)
        self.backend = backend
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.block_rows = block_rows

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.p)

    def _blocks(self):
        for start in range(0, self.n, self.block_rows):
            rows = min(self.block_rows, self.n - start)
            yield start, gaussian_block(self.seed, start, rows, self.p, self.dtype, self.device)

    def matvec(self, z: torch.Tensor) -> torch.Tensor:
        """``A @ z`` for z of shape ``(p,)`` -> ``(n,)``."""
        if z.shape != (self.p,):
            raise ValueError(f"matvec expects z of shape ({self.p},), got {tuple(z.shape)}")
        out = torch.empty(self.n, dtype=self.dtype, device=self.device)
        zz = z.to(self.device, self.dtype)
        for start, block in self._blocks():
            out[start : start + block.shape[0]] = block @ zz
        return out

    def rmatvec(self, g: torch.Tensor) -> torch.Tensor:
        """``A.T @ g`` for g of shape ``(n,)`` -> ``(p,)``."""
        if g.shape != (self.n,):
            raise ValueError(f"rmatvec expects g of shape ({self.n},), got {tuple(g.shape)}")
        out = torch.zeros(self.p, dtype=self.dtype, device=self.device)
        gg = g.to(self.device, self.dtype)
        for start, block in self._blocks():
            out += block.T @ gg[start : start + block.shape[0]]
        return out

    def gram(self) -> torch.Tensor:
        """``A.T @ A`` (p x p)."""
        out = torch.zeros(self.p, self.p, dtype=self.dtype, device=self.device)
        for _, block in self._blocks():
            out += block.T @ block
        return out

    def materialize(self) -> torch.Tensor:
        """A itself (n x p) — for tests and small n only."""
        return gaussian_block(self.seed, 0, self.n, self.p, self.dtype, self.device)
