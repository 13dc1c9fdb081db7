// Device-side storage types for the CUDA kernels, header-free so NVRTC (CuPy) compiles it too.
// float16 / bfloat16 are handled as raw 16-bit patterns converted to and from float here, which
// avoids cuda_fp16.h / cuda_bf16.h (not always on NVRTC's include path).
#pragma once
#include "sk_common.h"

struct sk_half { unsigned short bits; };
struct sk_bf16 { unsigned short bits; };

template <typename S> struct SkTraits { typedef float compute; };  // float32, float16, bfloat16
template <> struct SkTraits<double> { typedef double compute; };

__device__ __forceinline__ float sk_load(const float* p) { return *p; }
__device__ __forceinline__ double sk_load(const double* p) { return *p; }
__device__ __forceinline__ float sk_load(const sk_half* p) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(p->bits));
  return f;
}
__device__ __forceinline__ float sk_load(const sk_bf16* p) {
  return __uint_as_float(((unsigned)p->bits) << 16);
}

__device__ __forceinline__ void sk_store(float* p, float v) { *p = v; }
__device__ __forceinline__ void sk_store(double* p, double v) { *p = v; }
__device__ __forceinline__ void sk_store(sk_half* p, float v) {
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
  p->bits = h;
}
__device__ __forceinline__ void sk_store(sk_bf16* p, float v) {
  // Round to nearest even; NaN stays a (quiet) NaN.  Portable to any architecture.
  unsigned u = __float_as_uint(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    p->bits = (unsigned short)((u >> 16) | 0x40u);
  } else {
    u += 0x7fffu + ((u >> 16) & 1u);
    p->bits = (unsigned short)(u >> 16);
  }
}

// Instantiates one extern "C" entry point per storage dtype: NAME_f32, NAME_f64, NAME_f16, NAME_bf16.
#define SK_FOR_EACH_DTYPE(M) M(f32, float) M(f64, double) M(f16, sk_half) M(bf16, sk_bf16)
