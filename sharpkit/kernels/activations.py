"""Second-order terms of elementwise activations for k stacked directions (fused HVP engine).

For ``h = sigma(z)`` with ``z`` of shape ``(N, d)`` and k directions stacked as ``(N, k, d)``,
Pearlmutter's R-operator needs

    R-forward:   Rh  = sigma'(z) * Rz
    R-backward:  Rgz = sigma'(z) * Rgh + sigma''(z) * gh * Rz      (exact Hessian)
                 Rgz = sigma'(z) * Rgh                              (Gauss-Newton)

where ``gh = dL/dh`` (N, d) is the primal backward quantity.  ``z`` and ``gh`` are read once per
element and broadcast over the k directions.

This file holds the torch reference (the definition), Triton kernels that compute sigma' and
sigma'' from ``z`` inline, and :class:`ActivationTerms`, the dispatch the engine uses: on CPU it
caches sigma'(z) and sigma''(z) * gh once per primal pass and applies them with broadcast
multiplies; on GPU it keeps ``z`` and ``gh`` and launches the Triton kernels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _backend

try:  # Triton is optional: without it the torch path runs.
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except Exception:  # pragma: no cover - exercised only where Triton is missing
    _HAVE_TRITON = False

__all__ = [
    "ACTIVATIONS",
    "activation",
    "derivatives",
    "rforward_reference",
    "rbackward_reference",
    "rforward",
    "rbackward",
    "ActivationTerms",
]

# Kind codes shared with the Triton kernel.
ACTIVATIONS: dict[str, int] = {
    "relu": 0,
    "leaky_relu": 1,
    "gelu": 2,
    "gelu_tanh": 3,
    "tanh": 4,
    "sigmoid": 5,
    "silu": 6,
}
# Kinds whose second derivative vanishes almost everywhere (piecewise linear).
PIECEWISE_LINEAR = ("relu", "leaky_relu")

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_C = 0.044715

BLOCK = 1024  # elements per Triton program


def _check_kind(kind: str) -> None:
    if kind not in ACTIVATIONS:
        raise ValueError(f"unknown activation {kind!r}; supported: {sorted(ACTIVATIONS)}")


def activation(kind: str, z: torch.Tensor, alpha: float = 0.01) -> torch.Tensor:
    """``sigma(z)`` exactly as the corresponding torch module computes it (``alpha``: LeakyReLU slope)."""
    _check_kind(kind)
    if kind == "relu":
        return torch.relu(z)
    if kind == "leaky_relu":
        return F.leaky_relu(z, alpha)
    if kind == "gelu":
        return F.gelu(z)
    if kind == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if kind == "tanh":
        return torch.tanh(z)
    if kind == "sigmoid":
        return torch.sigmoid(z)
    return F.silu(z)


def derivatives(kind: str, z: torch.Tensor, alpha: float = 0.01) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(sigma'(z), sigma''(z))``; the second is None for piecewise-linear kinds (zero a.e.).

    At a kink torch's autograd convention is used: ReLU'(0) = 0, LeakyReLU'(0) = alpha.
    """
    _check_kind(kind)
    if kind == "relu":
        return (z > 0).to(z.dtype), None
    if kind == "leaky_relu":
        return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, alpha)), None
    if kind == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * _INV_SQRT_2))
        pdf = torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
        return cdf + z * pdf, pdf * (2.0 - z * z)
    if kind == "gelu_tanh":
        u = _SQRT_2_OVER_PI * (z + _GELU_C * z * z * z)
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_C * z * z)
        ddu = _SQRT_2_OVER_PI * 6.0 * _GELU_C * z
        t = torch.tanh(u)
        sech2 = 1.0 - t * t
        return 0.5 * (1.0 + t) + 0.5 * z * sech2 * du, sech2 * (du - z * t * du * du + 0.5 * z * ddu)
    if kind == "tanh":
        t = torch.tanh(z)
        d1 = 1.0 - t * t
        return d1, -2.0 * t * d1
    s = torch.sigmoid(z)
    ds = s * (1.0 - s)
    if kind == "sigmoid":
        return ds, ds * (1.0 - 2.0 * s)
    # silu: z * s
    return s + z * ds, ds * (2.0 + z * (1.0 - 2.0 * s))


def _check_stack(z: torch.Tensor, stacked: torch.Tensor, name: str) -> None:
    if z.dim() != 2 or stacked.dim() != 3 or stacked.shape[0] != z.shape[0] or stacked.shape[2] != z.shape[1]:
        raise ValueError(
            f"{name} must have shape (N, k, d) for z of shape (N, d); got z {tuple(z.shape)}, "
            f"{name} {tuple(stacked.shape)}"
        )


def rforward_reference(kind: str, z: torch.Tensor, rz: torch.Tensor, alpha: float = 0.01) -> torch.Tensor:
    """Definition: ``sigma'(z)[:, None, :] * Rz`` for ``z`` (N, d), ``Rz`` (N, k, d)."""
    _check_stack(z, rz, "Rz")
    d1, _ = derivatives(kind, z, alpha)
    return d1[:, None, :] * rz


def rbackward_reference(
    kind: str,
    z: torch.Tensor,
    gh: torch.Tensor,
    rz: torch.Tensor,
    rgh: torch.Tensor,
    alpha: float = 0.01,
    exact: bool = True,
) -> torch.Tensor:
    """Definition: ``sigma'(z) * Rgh + sigma''(z) * gh * Rz`` (the last term only when ``exact``)."""
    _check_stack(z, rgh, "Rgh")
    d1, d2 = derivatives(kind, z, alpha)
    out = d1[:, None, :] * rgh
    if exact and d2 is not None:
        _check_stack(z, rz, "Rz")
        out = out + (d2 * gh)[:, None, :] * rz
    return out


# ---- Triton kernels --------------------------------------------------------------------------------

if _HAVE_TRITON:

    @triton.jit
    def _tanh_sech2(u):
        """(tanh(u), 1 - tanh(u)^2) from e = exp(-2|u|): no cancellation near saturation."""
        e = tl.exp(-2.0 * tl.abs(u))
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(u < 0, -t, t)
        return t, 4.0 * e / ((1.0 + e) * (1.0 + e))

    @triton.jit
    def _derivs(z, KIND: tl.constexpr, alpha, NEED_D2: tl.constexpr):
        """(sigma'(z), sigma''(z)) elementwise, in z's (compute) dtype."""
        # Constants, not z * 0: NaN/inf in z must not leak into the piecewise-constant derivatives
        # (the reference and autograd give ReLU'(NaN) = 0).
        if KIND == 0:  # relu
            d1 = tl.where(z > 0, 1.0, 0.0)
            d2 = 0.0
        elif KIND == 1:  # leaky_relu
            d1 = tl.where(z > 0, 1.0, alpha)
            d2 = 0.0
        elif KIND == 2:  # gelu (erf)
            cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
            pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
            d1 = cdf + z * pdf
            d2 = pdf * (2.0 - z * z)
        elif KIND == 3:  # gelu (tanh approximation)
            u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
            du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
            ddu = 0.7978845608028654 * 6.0 * 0.044715 * z
            t, sech2 = _tanh_sech2(u)
            d1 = 0.5 * (1.0 + t) + 0.5 * z * sech2 * du
            d2 = sech2 * (du - z * t * du * du + 0.5 * z * ddu)
        elif KIND == 4:  # tanh
            t, d1 = _tanh_sech2(z)
            d2 = -2.0 * t * d1
        elif KIND == 5:  # sigmoid
            s = tl.sigmoid(z)
            d1 = s * (1.0 - s)
            d2 = d1 * (1.0 - 2.0 * s)
        else:  # silu
            s = tl.sigmoid(z)
            ds = s * (1.0 - s)
            d1 = s + z * ds
            d2 = ds * (2.0 + z * (1.0 - 2.0 * s))
        return d1, d2

    @triton.jit
    def _act_rforward_kernel(z_ptr, rz_ptr, out_ptr, alpha_ptr, total, kd, d,
                             KIND: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < total
        # Element (n, j, c) of the (N, k, d) stack reads z[n, c]: z is broadcast over k.
        zi = (offs // kd) * d + offs % d
        alpha = tl.load(alpha_ptr)
        z = tl.load(z_ptr + zi, mask=mask, other=0.0).to(alpha.dtype)
        rz = tl.load(rz_ptr + offs, mask=mask, other=0.0).to(alpha.dtype)
        d1, _ = _derivs(z, KIND, alpha, False)
        tl.store(out_ptr + offs, (d1 * rz).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _act_rbackward_kernel(z_ptr, gh_ptr, rz_ptr, rgh_ptr, out_ptr, alpha_ptr, total, kd, d,
                              KIND: tl.constexpr, EXACT: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < total
        zi = (offs // kd) * d + offs % d
        alpha = tl.load(alpha_ptr)
        z = tl.load(z_ptr + zi, mask=mask, other=0.0).to(alpha.dtype)
        rgh = tl.load(rgh_ptr + offs, mask=mask, other=0.0).to(alpha.dtype)
        d1, d2 = _derivs(z, KIND, alpha, EXACT)
        out = d1 * rgh
        if EXACT:
            gh = tl.load(gh_ptr + zi, mask=mask, other=0.0).to(alpha.dtype)
            rz = tl.load(rz_ptr + offs, mask=mask, other=0.0).to(alpha.dtype)
            out += d2 * gh * rz
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _alpha_tensor(alpha: float | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # A one-element tensor, not a Python float: Triton would pass floats as float32.  A tensor
    # made beforehand avoids a host-to-device copy (which CUDA graph capture forbids).
    if isinstance(alpha, torch.Tensor):
        return alpha
    return torch.tensor([alpha], dtype=_compute_dtype(dtype), device=device)


def _resolve(backend: str, t: torch.Tensor, op: str) -> str:
    """"triton" or "torch" (these ops have no C++/CUDA version; "auto" takes Triton on GPU)."""
    if backend == "auto":
        if t.device.type == "cuda" and _HAVE_TRITON and t.dtype in _backend.GPU_DTYPES:
            return "triton"
        return "torch"
    name = _backend.resolve(backend, t.device, t.dtype, op)
    if name == "triton" and not _HAVE_TRITON:
        raise RuntimeError(f"{op}: backend 'triton' is unusable here: cannot import triton")
    if name not in ("triton", "torch"):
        raise ValueError(f"{op}: no {name!r} implementation; use 'auto', 'triton' or 'torch'")
    return name


def _check_operands(op: str, main: str, tensors: dict[str, torch.Tensor], out: torch.Tensor | None) -> None:
    """One floating dtype and one device for every operand, and an ``out`` shaped like the result.

    The kernels write ``main``'s dtype; mixed dtypes would make the result's dtype depend on the
    backend (torch promotes), so they are refused by name instead."""
    ref = tensors[main]
    for name, t in tensors.items():
        _backend.check_dense_tensor(op, name, t)
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must have a floating dtype, got {t.dtype}")
        if t.dtype != ref.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}, {main} has {ref.dtype}")
    _backend.check_same_device(op, main, tensors)
    if out is not None and (not isinstance(out, torch.Tensor) or out.shape != ref.shape or out.dtype != ref.dtype
                            or out.device != ref.device or out.layout != torch.strided):
        got = (tuple(out.shape), out.dtype, out.device, out.layout) if isinstance(out, torch.Tensor) \
            else type(out).__name__
        raise ValueError(f"{op}: out must match {main} (shape {tuple(ref.shape)}, {ref.dtype}, {ref.device}, "
                         f"strided), got {got}")


def _kernel_output(out: torch.Tensor | None, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The buffer the kernel writes: ``out`` itself when it is contiguous and overlaps no input
    other than element for element (in place on Rz/Rgh is fine), else a fresh one (copied to
    ``out`` afterwards): the kernels write linear offsets."""
    if out is not None and out.is_contiguous() and not any(_backend.partially_overlaps(out, t) for t in inputs):
        return out
    return torch.empty(inputs[1].shape, dtype=inputs[1].dtype, device=inputs[1].device)


def rforward(kind: str, z: torch.Tensor, rz: torch.Tensor, alpha: float = 0.01, backend: str = "auto",
             out: torch.Tensor | None = None) -> torch.Tensor:
    """``sigma'(z) * Rz`` over k stacked directions; ``out`` may alias ``rz`` (in place)."""
    _check_kind(kind)
    _check_stack(z, rz, "Rz")
    _check_operands("activation rforward", "Rz", {"z": z, "Rz": rz}, out)
    if _resolve(backend, rz, "activation rforward") == "torch":
        res = rforward_reference(kind, z, rz, alpha)
        return res if out is None else out.copy_(res)
    z, rz = z.contiguous(), rz.contiguous()
    dst = _kernel_output(out, (z, rz))
    total = rz.numel()
    if total:
        _act_rforward_kernel[(triton.cdiv(total, BLOCK),)](
            z, rz, dst, _alpha_tensor(alpha, rz.dtype, rz.device), total, rz.shape[1] * rz.shape[2],
            rz.shape[2], KIND=ACTIVATIONS[kind], BLOCK=BLOCK)
    return dst if out is None or dst is out else out.copy_(dst)


def rbackward(kind: str, z: torch.Tensor, gh: torch.Tensor | None, rz: torch.Tensor | None, rgh: torch.Tensor,
              alpha: float = 0.01, exact: bool = True, backend: str = "auto",
              out: torch.Tensor | None = None) -> torch.Tensor:
    """``sigma'(z) * Rgh + sigma''(z) * gh * Rz`` (second term only when ``exact``); ``out`` may alias ``rgh``."""
    _check_kind(kind)
    _check_stack(z, rgh, "Rgh")
    exact = exact and kind not in PIECEWISE_LINEAR
    if exact and (gh is None or rz is None):
        raise ValueError("the exact R-backward needs gh and Rz")
    if exact and (rz.shape != rgh.shape or gh.shape != z.shape):
        raise ValueError(f"gh must match z {tuple(z.shape)} and Rz match Rgh {tuple(rgh.shape)}; got gh "
                         f"{tuple(gh.shape)}, Rz {tuple(rz.shape)}")
    _check_operands("activation rbackward", "Rgh",
                    {"z": z, "Rgh": rgh, **({"gh": gh, "Rz": rz} if exact else {})}, out)
    if _resolve(backend, rgh, "activation rbackward") == "torch":
        res = rbackward_reference(kind, z, gh, rz, rgh, alpha, exact)
        return res if out is None else out.copy_(res)
    z, rgh = z.contiguous(), rgh.contiguous()
    if exact:
        gh, rz = gh.contiguous(), rz.contiguous()
    dst = _kernel_output(out, (z, rgh) + ((gh, rz) if exact else ()))
    total = rgh.numel()
    if total:
        _act_rbackward_kernel[(triton.cdiv(total, BLOCK),)](
            z, gh if exact else z, rz if exact else rgh, rgh, dst, _alpha_tensor(alpha, rgh.dtype, rgh.device),
            total, rgh.shape[1] * rgh.shape[2], rgh.shape[2], KIND=ACTIVATIONS[kind], EXACT=exact, BLOCK=BLOCK)
    return dst if out is None or dst is out else out.copy_(dst)


class ActivationTerms:
    """The per-layer state the fused engine keeps for one activation across matvecs.

    Built in the primal forward from ``z``; :meth:`set_output_grad` receives ``gh = dL/dh`` in the
    primal backward.  The torch path caches ``sigma'(z)`` and ``sigma''(z) * gh`` (two (N, d)
    tensors, reused by every direction); the Triton path keeps ``z`` and ``gh`` and recomputes the
    derivatives inside the kernels.
    """

    def __init__(self, kind: str, z: torch.Tensor, alpha: float = 0.01, exact: bool = True, backend: str = "auto"):
        _check_kind(kind)
        self.kind, self.alpha = kind, float(alpha)
        self.exact = exact and kind not in PIECEWISE_LINEAR
        self.backend = _resolve(backend, z, "activation terms")
        self.z = z
        self.gh: torch.Tensor | None = None
        if self.backend == "torch":
            d1, d2 = derivatives(kind, z, alpha)
            self.d1 = d1[:, None, :]
            self._d2 = d2 if self.exact else None
            self.c2: torch.Tensor | None = None
        else:
            self._alpha = _alpha_tensor(self.alpha, z.dtype, z.device)

    def output(self) -> torch.Tensor:
        """``sigma(z)``."""
        return activation(self.kind, self.z, self.alpha)

    def input_grad(self, gh: torch.Tensor) -> torch.Tensor:
        """Primal backward: store ``gh`` and return ``dL/dz = sigma'(z) * gh``."""
        if self.exact:
            self.gh = gh
        if self.backend == "torch":
            if self.exact:
                self.c2 = (self._d2 * gh)[:, None, :]
            self._d2 = None
            return self.d1[:, 0, :] * gh
        d1, _ = derivatives(self.kind, self.z, self.alpha)
        return d1 * gh

    def rforward(self, rz: torch.Tensor) -> torch.Tensor:
        """``sigma'(z) * Rz`` (a new tensor; ``rz`` is kept by the caller for the R-backward)."""
        if self.backend == "torch":
            return rz * self.d1
        return rforward(self.kind, self.z, rz, self._alpha, backend="triton")

    def rforward_(self, rz: torch.Tensor) -> torch.Tensor:
        """``sigma'(z) * Rz`` written over ``rz`` (when the R-backward will not need ``Rz``)."""
        if self.backend == "torch":
            return rz.mul_(self.d1)
        return rforward(self.kind, self.z, rz, self._alpha, backend="triton", out=rz)

    def rbackward(self, rgh: torch.Tensor, rz: torch.Tensor | None) -> torch.Tensor:
        """``sigma'(z) * Rgh (+ sigma''(z) * gh * Rz)``, written over ``rgh`` (which is consumed)."""
        exact = self.exact and rz is not None
        if self.backend == "torch":
            if exact and (rz.data_ptr() == rgh.data_ptr() or _backend.partially_overlaps(rz, rgh)):
                rz = rz.clone()  # rgh.mul_ would change Rz before the sigma'' term reads it
            rgh.mul_(self.d1)
            if exact:
                rgh.addcmul_(self.c2, rz)
            return rgh
        return rbackward(self.kind, self.z, self.gh, rz, rgh, self._alpha, exact=exact, backend="triton", out=rgh)
