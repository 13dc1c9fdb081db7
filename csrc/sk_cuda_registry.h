// Host-side registry of CUDA kernels, so that Python can launch any extern "C" __global__ kernel
// of csrc/*.cu by name (the same names CuPy uses when it compiles the same sources at run time).
#pragma once
#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

namespace sk {

void cuda_register_kernel(const char* name, const void* function);
std::vector<std::string> cuda_kernel_names();
// Empty string on success, else the CUDA error text.
std::string cuda_launch(const std::string& name, const unsigned* grid, const unsigned* block, unsigned shared_bytes,
                        int device, std::uintptr_t stream, void** args);
std::string cuda_status();
int cuda_runtime_version();

struct KernelRegistrar {
  KernelRegistrar(std::initializer_list<std::pair<const char*, const void*>> kernels) {
    for (const auto& k : kernels) cuda_register_kernel(k.first, k.second);
  }
};

}  // namespace sk

// Usage (host part of a .cu file):  SK_REGISTER_KERNELS(my_op, SK_KERNEL(kernel_a), SK_KERNEL(kernel_b));
#define SK_KERNEL(k) std::pair<const char*, const void*>(#k, reinterpret_cast<const void*>(&k))
#define SK_REGISTER_KERNELS(tag, ...) static ::sk::KernelRegistrar sk_kernel_registrar_##tag{__VA_ARGS__}
