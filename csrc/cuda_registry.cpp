// The kernel registry and launcher behind sharpkit._C_cuda (compiled only with CUDA).
#include "sk_cuda_registry.h"

#include <cuda_runtime.h>

#include <map>
#include <mutex>

namespace sk {
namespace {

std::map<std::string, const void*>& registry() {
  static std::map<std::string, const void*> kernels;  // built during static initialisation
  return kernels;
}

}  // namespace

void cuda_register_kernel(const char* name, const void* function) { registry()[name] = function; }

std::vector<std::string> cuda_kernel_names() {
  std::vector<std::string> names;
  for (const auto& kv : registry()) names.push_back(kv.first);
  return names;
}

int cuda_runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

std::string cuda_status() {
  int driver = 0;
  if (cudaDriverGetVersion(&driver) != cudaSuccess || driver == 0) return "no CUDA driver found";
  if (driver < CUDART_VERSION)
    return "the CUDA driver (" + std::to_string(driver) + ") is older than the runtime sharpkit was built with (" +
           std::to_string(CUDART_VERSION) + ")";
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return std::string("cudaGetDeviceCount failed: ") + cudaGetErrorString(err);
  }
  if (count == 0) return "no CUDA device visible";
  return "ok";
}

std::string cuda_launch(const std::string& name, const unsigned* grid, const unsigned* block, unsigned shared_bytes,
                        int device, std::uintptr_t stream, void** args) {
  auto it = registry().find(name);
  if (it == registry().end()) return "no CUDA kernel named '" + name + "' in sharpkit._C_cuda";
  // The static runtime keeps its own current device: follow the caller's tensors.
  cudaError_t err = cudaSetDevice(device);
  if (err == cudaSuccess)
    err = cudaLaunchKernel(it->second, dim3(grid[0], grid[1], grid[2]), dim3(block[0], block[1], block[2]), args,
                           shared_bytes, reinterpret_cast<cudaStream_t>(stream));
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later launches are not blamed
    return "CUDA launch of '" + name + "' failed: " + cudaGetErrorString(err);
  }
  return "";
}

}  // namespace sk
