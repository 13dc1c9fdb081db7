"""Backend availability and dispatch shared by every fused op (one place for this concern).

Backends, fastest first per device:

* ``"cuda"``   sharpkit._C_cuda (csrc/*.cu compiled by nvcc at install time, static cudart);
* ``"triton"`` Triton kernels in sharpkit/kernels/*.py (GPU; CPU tensors only under
  ``TRITON_INTERPRET=1``, for testing, and never chosen by ``"auto"`` there);
* ``"cupy"``   the same csrc/*.cu compiled at run time by CuPy (NVRTC) when _C_cuda is missing;
* ``"cpp"``    sharpkit._C, C++ CPU kernels (OpenMP where the compiler had it);
* ``"torch"``  the reference definitions, any device and dtype.

Native kernels receive raw pointers (``tensor.data_ptr()``), sizes and the dtype codes below.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from ..params import canonical_device

BACKENDS: tuple[str, ...] = ("torch", "cpp", "triton", "cuda", "cupy")
GPU_PREFERENCE: tuple[str, ...] = ("cuda", "triton", "cupy", "torch")
CPU_PREFERENCE: tuple[str, ...] = ("cpp", "torch")

# Codes shared with csrc/sk_common.h (SK_F32, ...) and the suffixes of the CUDA entry points.
DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
DTYPE_SUFFIX: dict[torch.dtype, str] = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16",
                                        torch.bfloat16: "bf16"}
# dtypes each backend accepts (torch: any floating dtype).
CPU_DTYPES = (torch.float32, torch.float64)
GPU_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _installed_extension(name: str) -> Path | None:
    """The file of compiled module ``sharpkit.<name>`` in the installed sharpkit distribution."""
    try:
        dist = importlib.metadata.distribution("sharpkit")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if len(f.parts) == 2 and f.parts[0] == "sharpkit" and f.name.startswith(name + ".") and \
                f.suffix in (".so", ".pyd"):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    return None


def load_native(name: str) -> Any:
    """Import the compiled module ``sharpkit.<name>`` (``_C``, ``_C_cuda``).

    When sharpkit is imported from a source checkout (e.g. tests run from the repository root
    after a non-editable ``pip install .``), the checkout has no compiled modules: fall back to
    those of the installed distribution.
    """
    full = f"sharpkit.{name}"
    try:
        return importlib.import_module(full)
    except ImportError:
        path = _installed_extension(name)
        if path is None:
            raise
    spec = importlib.util.spec_from_file_location(full, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[full] = module
    return module


def _import_reason(name: str) -> tuple[Any, str]:
    try:
        return load_native(name), "ok"
    except Exception as exc:  # ImportError, or a broken shared library (OSError)
        return None, f"cannot import sharpkit.{name}: {exc}"


@functools.lru_cache(maxsize=None)
def cpp_module() -> tuple[Any, str]:
    """(sharpkit._C or None, "ok" or why not)."""
    mod, why = _import_reason("_C")
    if mod is None:
        why += " (sharpkit was installed without its native core; reinstall with `pip install .`)"
    return mod, why


@functools.lru_cache(maxsize=None)
def cuda_module() -> tuple[Any, str]:
    """(sharpkit._C_cuda or None, "ok" or why not)."""
    try:
        mod = load_native("_C_cuda")
    except ImportError:
        return None, "sharpkit was built without CUDA kernels (no nvcc at install time, or SHARPKIT_CUDA=OFF)"
    except Exception as exc:
        return None, f"cannot import sharpkit._C_cuda: {exc}"
    if not torch.cuda.is_available():
        return None, "sharpkit._C_cuda is built, but no CUDA GPU is visible to torch"
    status = mod.status()
    return (mod, "ok") if status == "ok" else (None, status)


MIN_TRITON = (3, 2)  # as the [triton] extra of pyproject.toml


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_import_reason() -> str:
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception as exc:
        return f"cannot import triton: {exc}"
    # torch pins its own Triton (torch 2.5: 3.1), which may be older than the [triton] extra asks
    version = tuple(int(part) for part in re.findall(r"\d+", triton.__version__)[:2])
    if version < MIN_TRITON:
        return (f"Triton {triton.__version__} is older than {'.'.join(map(str, MIN_TRITON))}, the oldest "
                "sharpkit's kernels are written for (torch 2.6 and newer bring a recent enough Triton)")
    return "ok"


@functools.lru_cache(maxsize=None)
def _interpreter_reason() -> str:
    """"ok" where Triton's CPU interpreter runs a probe kernel (once per process), else why not."""
    import numpy
    import triton

    from . import _triton
    try:
        _triton.interpreter_probe()
    except Exception as exc:  # the interpreter's own failure, named with the versions that cause it
        return (f"Triton {triton.__version__}'s CPU interpreter cannot run sharpkit's kernels under NumPy "
                f"{numpy.__version__} ({type(exc).__name__}: {exc}); Triton 3.8 runs them (Triton 3.6 "
                "and older fail on loops over runtime bounds under NumPy 2.4 and newer)")
    return "ok"


def triton_reason() -> str:
    why = _triton_import_reason()
    if why != "ok":
        return why
    if triton_interpreted():
        return _interpreter_reason()
    if torch.cuda.is_available():
        return "ok"
    return "needs a CUDA GPU (or TRITON_INTERPRET=1 to test on CPU tensors)"


def kernel_source_dir() -> Path | None:
    """The folder holding the .cu sources: installed beside the package, or csrc/ of a checkout."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / "box_ascent.cu").is_file():
            return candidate
    return None


@functools.lru_cache(maxsize=None)
def _cupy_import_reason() -> str:
    try:
        import cupy  # noqa: F401
    except Exception as exc:
        return f"cannot import cupy: {exc}"
    if kernel_source_dir() is None:
        return "the CUDA kernel sources (csrc/*.cu) are not installed"
    return "ok"


def cupy_reason() -> str:
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    return _cupy_import_reason()


def backends() -> dict[str, str]:
    """``{name: "ok" or the reason it is unusable}`` for torch, cpp, triton, cuda, cupy."""
    return {
        "torch": "ok",
        "cpp": cpp_module()[1],
        "triton": triton_reason(),
        "cuda": cuda_module()[1],
        "cupy": cupy_reason(),
    }


def _reason(name: str) -> str:
    return {"torch": lambda: "ok", "cpp": lambda: cpp_module()[1], "triton": triton_reason,
            "cuda": lambda: cuda_module()[1], "cupy": cupy_reason}[name]()


def resolve(backend: str, device: torch.device, dtype: torch.dtype, op: str) -> str:
    """The concrete backend for tensors on ``device`` of ``dtype``.

    ``"auto"`` picks the fastest usable backend that supports them (CPU: cpp, else torch;
    GPU: cuda > triton > cupy > torch).  An explicit name is checked and raises a clear error when
    it cannot run here or cannot take these tensors.
    """
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(f"{op}: backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    on_gpu = device.type == "cuda"
    if backend == "auto":
        for name in GPU_PREFERENCE if on_gpu else CPU_PREFERENCE:
            if _supports(name, device, dtype) is None and _reason(name) == "ok":
                return name
        return "torch"
    why = _reason(backend)
    if why != "ok":
        raise RuntimeError(f"{op}: backend {backend!r} is unusable here: {why}")
    problem = _supports(backend, device, dtype)
    if problem is not None:
        raise ValueError(f"{op}: backend {backend!r} {problem}")
    return backend


def for_autograd(backend: str, tensors, op: str) -> str:
    """``backend``, or "torch" where an input needs autograd history: the fused kernels write
    their outputs directly and record none, so differentiating through them would silently give
    zero gradients.  An explicit other backend is then an error."""
    if not (torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)):
        return backend
    if backend not in ("auto", "torch"):
        raise ValueError(f"{op}: backend {backend!r} records no autograd history, but an input requires grad; "
                         "use backend='torch' (or 'auto'), or detach the inputs")
    return "torch"


def partially_overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` share memory without being the same elements in the same order.

    The fused kernels read every element before writing the element at the same index, so an
    output may *be* an input (same storage offset, shape and strides); any other overlap (a
    shifted view, a transposed view of the same storage) lets a write land on an element that is
    still to be read.  Conservative: byte ranges that intersect count as overlapping.

    Addresses are compared, not storages: tensors made from overlapping views of one outside
    buffer (``torch.from_numpy(buf[:-1])`` and ``torch.from_numpy(buf[1:])``, DLPack) have
    separate storages over the same memory.
    """
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device or a.device.type == "meta":
        return False
    if (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape
            and a.stride() == b.stride()):
        return False

    def span(t: torch.Tensor) -> tuple[int, int]:  # torch strides are never negative
        extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
        return t.data_ptr(), t.data_ptr() + (extent + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def check_dense_tensor(op: str, name: str, t: Any) -> None:
    """TypeError naming ``op``'s argument ``name`` unless it is a dense (strided) tensor: the kernels
    read dense memory (a sparse tensor failed with "unsupported memory format")."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{op}: {name} must be a dense (strided) tensor, got layout {t.layout}")


def check_same_device(op: str, reference: str, tensors: dict[str, torch.Tensor | None]) -> None:
    """Raise a ValueError naming the first tensor not on the device of ``tensors[reference]``.

    The native and Triton kernels receive raw pointers: a tensor on another device would be read
    through a pointer the kernel cannot use (a crash, or an illegal-address error that poisons the
    CUDA context), so a device mismatch is refused before any launch.
    """
    device = tensors[reference].device
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device}, {reference} is on {device}; "
                             "move them to one device")


def _supports(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if backend ``name`` can take tensors of this device/dtype, else why not."""
    if name == "torch":
        return None
    if name == "cpp":
        if device.type != "cpu":
            return f"runs on CPU tensors only, got device {device}"
        if dtype not in CPU_DTYPES:
            return f"supports float32/float64 only, got {dtype}"
        return None
    if name == "triton":
        if device.type == "cpu" and not triton_interpreted():
            return "runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
        if device.type not in ("cpu", "cuda"):
            return f"cannot run on device {device}"
        if dtype not in GPU_DTYPES:
            return f"does not support {dtype}"
        if device.type == "cpu" and dtype == torch.bfloat16:
            # The interpreter rounds float32 -> bfloat16 toward zero, not to nearest (1.0 + 2**-8 +
            # 2**-10 is stored as 1.0): up to a whole bfloat16 ulp off, silently.
            return ("cannot take bfloat16 CPU tensors: Triton's interpreter rounds bfloat16 results toward zero; "
                    "use backend 'torch'")
        return None
    # cuda, cupy
    if device.type != "cuda":
        return f"runs on CUDA tensors only, got device {device}"
    if dtype not in GPU_DTYPES:
        return f"does not support {dtype}"
    return None


# ---- launching the CUDA kernels (compiled by nvcc into _C_cuda, or by CuPy at run time) ----------

def ptr(t: torch.Tensor | None) -> tuple[str, int]:
    """A pointer kernel argument (NULL for None)."""
    return ("p", 0 if t is None else t.data_ptr())


@functools.lru_cache(maxsize=None)
def _cupy_module(source: str, device_index: int):
    import cupy

    folder = kernel_source_dir()
    code = (folder / source).read_text(encoding="utf-8")
    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(code=code, options=("-I" + str(folder), "--std=c++17"))
        module.compile()
    return module


def _cupy_arg(code: str, value: Any):
    import numpy as np

    kinds = {"p": np.uint64, "Q": np.uint64, "q": np.int64, "i": np.int32, "I": np.uint32, "f": np.float32,
             "d": np.float64}
    return kinds[code](value)


def launch(backend: str, source: str, name: str, grid: Sequence[int], block: Sequence[int],
           args: Sequence[tuple[str, Any]], device: torch.device, shared_bytes: int = 0) -> None:
    """Launch kernel ``name`` (an extern "C" entry point of csrc/``source``) on the current stream.

    ``args`` are ``(code, value)`` pairs; codes: p pointer, q int64, Q uint64, i int32, I uint32,
    f float32, d float64.
    """
    grid3 = (list(grid) + [1, 1, 1])[:3]
    block3 = (list(block) + [1, 1, 1])[:3]
    if grid3[0] == 0:
        return
    index = canonical_device(device).index
    stream = torch.cuda.current_stream(index).cuda_stream
    if backend == "cuda":
        mod, why = cuda_module()
        if mod is None:
            raise RuntimeError(f"backend 'cuda' is unusable here: {why}")
        mod.launch(name, grid3, block3, shared_bytes, index, stream, list(args))
    elif backend == "cupy":
        import cupy

        kernel = _cupy_module(source, index).get_function(name)
        # RawKernel launches on CuPy's current stream: make it torch's current stream.
        with cupy.cuda.Device(index), cupy.cuda.ExternalStream(stream):
            kernel(tuple(grid3), tuple(block3), tuple(_cupy_arg(c, v) for c, v in args), shared_mem=shared_bytes)
    else:
        raise ValueError(f"launch: backend must be 'cuda' or 'cupy', got {backend!r}")


@functools.lru_cache(maxsize=None)
def multiprocessor_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
