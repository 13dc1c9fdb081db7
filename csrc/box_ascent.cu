// Fused projected-box ascent step on the GPU (definition: sharpkit/kernels/box_ascent.py).
// One pass: read x, y, g (and y_prev), write y_new and w = x + y_new.
// Kernel part: no host headers, so CuPy's NVRTC compiles this same file (sharpkit backend "cupy").
#include "sk_cuda_types.cuh"

// Elements per thread per grid-stride step: independent loads in flight hide memory latency.
#define SK_BOX_UNROLL 4

template <typename S>
__device__ __forceinline__ void sk_box_ascent_impl(const S* x, const S* y,
                                                   const S* g, const S* yp,
                                                   S* y_out, S* w_out, long long n,
                                                   double eps_d, double step_d, double mu_d, double omu_d,
                                                   int sign_mode, int momentum) {
  typedef typename SkTraits<S>::compute C;
  const C eps = (C)eps_d, step = (C)step_d, mu = (C)mu_d, omu = (C)omu_d;
  const long long tile = (long long)blockDim.x * SK_BOX_UNROLL;
  for (long long base = (long long)blockIdx.x * tile + threadIdx.x; base < n; base += (long long)gridDim.x * tile) {
    C xv[SK_BOX_UNROLL], yv[SK_BOX_UNROLL], gv[SK_BOX_UNROLL], pv[SK_BOX_UNROLL];
#pragma unroll
    for (int u = 0; u < SK_BOX_UNROLL; ++u) {
      const long long i = base + (long long)u * blockDim.x;
      if (i < n) {
        xv[u] = sk_load(x + i);
        yv[u] = sk_load(y + i);
        gv[u] = sk_load(g + i);
        pv[u] = momentum ? sk_load(yp + i) : C(0);
      }
    }
#pragma unroll
    for (int u = 0; u < SK_BOX_UNROLL; ++u) {
      const long long i = base + (long long)u * blockDim.x;
      if (i < n) {
        const C z = sk_box_ascent_one<C>(xv[u], yv[u], gv[u], pv[u], eps, step, mu, omu, sign_mode != 0, momentum != 0);
        sk_store(y_out + i, z);
        sk_store(w_out + i, xv[u] + z);
      }
    }
  }
}

#define SK_BOX_ASCENT_ENTRY(suffix, S)                                                                         \
  extern "C" __global__ void sk_box_ascent_##suffix(const S* x, const S* y, const S* g, const S* yp, S* y_out, \
                                                     S* w_out, long long n, double eps, double step, double mu, \
                                                     double omu, int sign_mode, int momentum) {                \
    sk_box_ascent_impl<S>(x, y, g, yp, y_out, w_out, n, eps, step, mu, omu, sign_mode, momentum);              \
  }
SK_FOR_EACH_DTYPE(SK_BOX_ASCENT_ENTRY)

#ifndef __CUDACC_RTC__
#include "sk_cuda_registry.h"
SK_REGISTER_KERNELS(box_ascent, SK_KERNEL(sk_box_ascent_f32), SK_KERNEL(sk_box_ascent_f64),
                    SK_KERNEL(sk_box_ascent_f16), SK_KERNEL(sk_box_ascent_bf16));
#endif
