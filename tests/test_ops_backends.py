"""The native build, backend availability, and the CUDA sources' NVRTC-compatibility (the "cupy"
backend compiles them at run time)."""
import ctypes
import glob
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sharpkit as sk
from sharpkit.kernels import _backend

CUDA_SOURCES = ["box_ascent.cu", "subspace.cu", "ce_hvp.cu"]


def test_backends_lists_every_backend_with_a_reason():
    table = sk.ops.backends()
    assert set(table) == {"torch", "cpp", "triton", "cuda", "cupy"}
    assert table["torch"] == "ok"
    for name, why in table.items():
        assert isinstance(why, str) and why, name
    if not torch.cuda.is_available():
        assert table["cuda"] != "ok" and table["cupy"] != "ok"


def test_native_cpu_module_is_built():
    # `pip install .` always builds sharpkit._C; a missing module means a broken install.
    assert sk.ops.backends()["cpp"] == "ok", sk.ops.backends()["cpp"]
    assert isinstance(_backend.load_native("_C").has_openmp, bool)


def test_import_needs_neither_triton_nor_cupy():
    code = (
        "import sys\n"
        "sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "sys.modules['cupy'] = None\n"
        "import torch, sharpkit as sk\n"
        "t = sk.ops.backends()\n"
        "assert t['triton'].startswith('cannot import triton'), t\n"
        "assert t['cupy'] != 'ok', t\n"
        "x = torch.ones(4)\n"
        "y, w = sk.ops.box_ascent_step(x, x * 0, x, 0.1, 0.05)\n"
        "assert torch.allclose(y, torch.full((4,), 0.05)), y\n"
        "print('ok')\n"
    )
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_plain_import_does_not_load_triton():
    code = "import sys, sharpkit; print('triton' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def _kernel_names(source: Path) -> set[str]:
    return set(re.findall(r'extern "C" __global__ void (?:__launch_bounds__\(\w+\)\s*)?(\w+)', source.read_text(encoding="utf-8"))
               ) | _macro_kernel_names(source)


def _macro_kernel_names(source: Path) -> set[str]:
    # Entry points stamped out per dtype by SK_FOR_EACH_DTYPE: registered names are the contract.
    return set(re.findall(r"SK_KERNEL\((\w+)\)", source.read_text(encoding="utf-8")))


def test_kernel_sources_are_found_and_register_their_kernels():
    folder = _backend.kernel_source_dir()
    assert folder is not None
    for source in CUDA_SOURCES:
        names = _macro_kernel_names(folder / source)
        suffixes = {"f32", "f64", "f16", "bf16"}
        stem = {"box_ascent.cu": ["sk_box_ascent"], "subspace.cu": ["sk_subspace_fill", "sk_subspace_matvec",
                                                                     "sk_subspace_rmatvec"],
                "ce_hvp.cu": ["sk_ce_hvp"]}[source]
        for base in stem:
            assert {f"{base}_{s}" for s in suffixes} <= names, (source, names)


def test_cuda_module_imports_without_a_gpu():
    try:
        cuda = _backend.load_native("_C_cuda")
    except ImportError:
        pytest.skip("built without CUDA (no nvcc)")
    folder = _backend.kernel_source_dir()
    registered = set(cuda.kernels())
    for source in CUDA_SOURCES:
        assert _macro_kernel_names(folder / source) <= registered
    status = cuda.status()
    assert isinstance(status, str)
    if not torch.cuda.is_available():
        assert status != "ok"


def _find_nvrtc():
    candidates = []
    try:
        import nvidia

        for base in nvidia.__path__:
            candidates += sorted(glob.glob(os.path.join(base, "*", "lib", "libnvrtc.so*")))
    except ImportError:
        pass
    candidates += sorted(glob.glob("/usr/local/cuda*/lib64/libnvrtc.so*"))
    for path in candidates:
        if ".alt." in path:
            continue
        try:
            # libnvrtc dlopens its builtins library by name: load it first from the same folder.
            for builtins in sorted(glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so*"))):
                if ".alt." not in builtins:
                    ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


@pytest.mark.parametrize("source", CUDA_SOURCES)
def test_cuda_sources_compile_with_nvrtc(source):
    """What CuPy's RawModule does with csrc/*.cu: NVRTC, no host headers, __CUDACC_RTC__ defined.
    Needs libnvrtc (pip install nvidia-cuda-nvrtc); no GPU."""
    nvrtc = _find_nvrtc()
    if nvrtc is None:
        pytest.skip("libnvrtc not found (pip install nvidia-cuda-nvrtc)")
    folder = _backend.kernel_source_dir()
    code = (folder / source).read_bytes()
    prog = ctypes.c_void_p()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), code, source.encode(), 0, None, None) == 0
    options = [f"-I{folder}".encode(), b"--std=c++17", b"-arch=compute_80"]
    opts = (ctypes.c_char_p * len(options))(*options)
    status = nvrtc.nvrtcCompileProgram(prog, len(options), opts)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    assert status == 0, log.value.decode(errors="replace")


def test_triton_kernels_compile_for_gpus():
    """The Triton kernels compile to PTX/cubin for sm_90 and sm_80 without a GPU (the interpreter
    cannot catch what only the GPU compiler rejects, e.g. an fp32-only intrinsic on fp64)."""
    if _backend._triton_import_reason() != "ok":
        pytest.skip(_backend._triton_import_reason())
    code = "from sharpkit.kernels import _triton; print(len(_triton.compile_all(90)), len(_triton.compile_all(80)))"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    if result.returncode != 0 and "ptxas" in result.stderr and "not found" in result.stderr.lower():
        pytest.skip("Triton's ptxas is not available here")
    assert result.returncode == 0, result.stderr[-3000:]
    expected = 4 * (2 + 3) + 1  # dtypes x (box ascent variants + subspace kernels) + Philox
    assert result.stdout.split() == [str(expected), str(expected)]
