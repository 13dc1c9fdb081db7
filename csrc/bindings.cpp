// Python bindings of sharpkit's native kernels.  This one file builds two modules:
//
//   sharpkit._C       (always)         the C++ CPU ops, one register_<op>() per csrc/<op>.cpp;
//   sharpkit._C_cuda  (nvcc found)     a generic launcher for the extern "C" __global__ kernels
//                                      of csrc/*.cu (compiled with -DSK_CUDA_MODULE).
//
// Arguments are raw pointers (tensor.data_ptr()), sizes, dtype codes (sk_common.h) and, for CUDA,
// the device index and the stream handle: the build needs neither torch nor a GPU.
//
// Adding an op:
//   * CPU: write csrc/<op>.cpp defining sk::register_<op>(pybind11::module_&), declare it in
//     sk_cpu.h and add one line `X(<op>)` to SK_CPU_OPS below.
//   * CUDA: write csrc/<op>.cu with extern "C" __global__ kernels (no host headers before the
//     `#ifndef __CUDACC_RTC__` host part, so CuPy can compile the same file), and in that host part
//     one line `SK_REGISTER_KERNELS(<op>, SK_KERNEL(kernel_a), SK_KERNEL(kernel_b));`
//     (sk_cuda_registry.h).  Python launches them by name through sharpkit.kernels._backend.launch
//     (the same call serves the "cupy" backend); nothing to add here.
// CMakeLists.txt picks up csrc/*.cpp and csrc/*.cu by glob (re-run the install after adding one).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace py = pybind11;

#ifndef SK_CUDA_MODULE

#include "sk_cpu.h"

#define SK_CPU_OPS(X) \
  X(box_ascent)       \
  X(subspace)

PYBIND11_MODULE(_C, m) {
  m.doc() = "sharpkit native CPU kernels (raw-pointer interface; see sharpkit/kernels/_backend.py)";
#ifdef _OPENMP
  m.attr("has_openmp") = true;
#else
  m.attr("has_openmp") = false;
#endif
#define SK_REGISTER_CPU(op) sk::register_##op(m);
  SK_CPU_OPS(SK_REGISTER_CPU)
#undef SK_REGISTER_CPU
}

#else  // SK_CUDA_MODULE

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "sk_cuda_registry.h"

// One kernel argument as Python passes it: (type code, value).  Codes: 'p' pointer, 'q' int64,
// 'Q' uint64, 'i' int32, 'I' uint32, 'f' float32, 'd' float64.
union SkArg {
  std::uint64_t u64;
  std::int64_t i64;
  std::int32_t i32;
  std::uint32_t u32;
  float f32;
  double f64;
};

static void launch(const std::string& name, std::vector<unsigned> grid, std::vector<unsigned> block,
                   unsigned shared_bytes, int device, std::uintptr_t stream,
                   const std::vector<std::pair<std::string, py::object>>& args) {
  if (grid.size() != 3 || block.size() != 3) throw std::invalid_argument("grid and block must have 3 entries");
  std::vector<SkArg> storage(args.size());
  std::vector<void*> pointers(args.size());
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& code = args[i].first;
    const py::object& v = args[i].second;
    if (code == "p" || code == "Q") storage[i].u64 = v.cast<std::uint64_t>();
    else if (code == "q") storage[i].i64 = v.cast<std::int64_t>();
    else if (code == "i") storage[i].i32 = v.cast<std::int32_t>();
    else if (code == "I") storage[i].u32 = v.cast<std::uint32_t>();
    else if (code == "f") storage[i].f32 = v.cast<float>();
    else if (code == "d") storage[i].f64 = v.cast<double>();
    else throw std::invalid_argument("unknown kernel argument code '" + code + "'");
    pointers[i] = &storage[i];
  }
  std::string error;
  {
    py::gil_scoped_release release;
    error = sk::cuda_launch(name, grid.data(), block.data(), shared_bytes, device, stream, pointers.data());
  }
  if (!error.empty()) throw std::runtime_error(error);
}

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "sharpkit CUDA kernels (static cudart; launched by name, see sharpkit/kernels/_backend.py)";
  m.def("launch", &launch, py::arg("name"), py::arg("grid"), py::arg("block"), py::arg("shared_bytes"),
        py::arg("device"), py::arg("stream"), py::arg("args"),
        "Launch the registered kernel `name` on `stream` of `device`.");
  m.def("kernels", &sk::cuda_kernel_names, "Names of the registered kernels.");
  m.def("status", &sk::cuda_status, "'ok', or why CUDA is unusable (driver, devices).");
  m.attr("cuda_runtime_version") = sk::cuda_runtime_version();
}

#endif  // SK_CUDA_MODULE
