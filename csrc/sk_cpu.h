// Helpers shared by the C++ CPU kernels: raw-pointer arguments, dtype dispatch, errors.
#pragma once
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include <pybind11/pybind11.h>

#include "sk_common.h"

namespace sk {

// Tensors cross the boundary as tensor.data_ptr() integers, so the build needs no torch.
template <typename T>
inline T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

inline void check_dtype_cpu(int dtype, const char* op) {
  if (dtype != SK_F32 && dtype != SK_F64)
    throw std::invalid_argument(std::string(op) + ": the cpp backend supports float32 and float64 only");
}

// The pybind11 registration functions of the CPU ops (one per csrc/*.cpp); listed in bindings.cpp.
void register_box_ascent(pybind11::module_& m);
void register_subspace(pybind11::module_& m);

}  // namespace sk
