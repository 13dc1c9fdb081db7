// Softmax cross-entropy Hessian product for k stacked directions (definition:
// sharpkit/kernels/ce_hvp.py, ce_hvp_reference):
//
//   out[m, :] = s[i] * p_i * (q - <p_i, q>),   q = r[m, :] - r[m, ref[i]],
//   p_i = exp(z[i, :] - lse[i]),  i = m / k
//
// for the rows m of the (M = N*k, C) stack r.  ref[i] is the index of row i's largest logit: the
// shift leaves the product unchanged and keeps it precise where p is within rounding of one-hot
// (see the Python module).  The logits z are in the compute dtype (float32 for 16-bit r).  One warp
// per row (grid-stride over rows): a first sweep accumulates <p_i, q>, a second writes the product;
// p is recomputed from the logits in both sweeps instead of being stored, so no (N, C) or (k, N, C)
// temporary exists.  out may alias r: r[m, ref[i]] is read by every lane before the first sweep,
// the warp reduction between the sweeps orders all reads before any write, and each other element
// is read before it is written by the same thread.
// Kernel part: no host headers, so CuPy's NVRTC compiles this same file (sharpkit backend "cupy").
#include "sk_cuda_types.cuh"

template <typename C>
__device__ __forceinline__ C sk_warp_sum(C v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float sk_exp(float x) { return __expf(x); }
__device__ __forceinline__ double sk_exp(double x) { return exp(x); }

template <typename S>
__device__ __forceinline__ void sk_ce_hvp_impl(const typename SkTraits<S>::compute* __restrict__ z,
                                               const typename SkTraits<S>::compute* lse,
                                               const typename SkTraits<S>::compute* scale, const long long* ref,
                                               const S* r, S* out, long long rows, long long k, long long cols) {
  typedef typename SkTraits<S>::compute C;
  const int lane = threadIdx.x & 31;
  const long long warps_per_block = blockDim.x >> 5;
  const long long warp = (long long)blockIdx.x * warps_per_block + (threadIdx.x >> 5);
  const long long stride = (long long)gridDim.x * warps_per_block;
  for (long long m = warp; m < rows; m += stride) {
    const long long i = m / k;
    const C* zi = z + i * cols;
    const S* rm = r + m * cols;
    S* om = out + m * cols;
    const C l = lse[i];
    const C ra = sk_load(rm + ref[i]);
    C dot = C(0);
    for (long long c = lane; c < cols; c += 32) dot += sk_exp(zi[c] - l) * (sk_load(rm + c) - ra);
    dot = sk_warp_sum(dot);
    const C s = scale[i];
    for (long long c = lane; c < cols; c += 32) {
      const C p = sk_exp(zi[c] - l);
      sk_store(om + c, s * p * ((sk_load(rm + c) - ra) - dot));
    }
  }
}

#define SK_CE_HVP_ENTRY(suffix, S)                                                                           \
  extern "C" __global__ void sk_ce_hvp_##suffix(const SkTraits<S>::compute* z, const SkTraits<S>::compute* lse, \
                                                const SkTraits<S>::compute* scale, const long long* ref,           \
                                                const S* r, S* out, long long rows, long long k, long long cols) { \
    sk_ce_hvp_impl<S>(z, lse, scale, ref, r, out, rows, k, cols);                                                  \
  }
SK_FOR_EACH_DTYPE(SK_CE_HVP_ENTRY)

#ifndef __CUDACC_RTC__
#include "sk_cuda_registry.h"
SK_REGISTER_KERNELS(ce_hvp, SK_KERNEL(sk_ce_hvp_f32), SK_KERNEL(sk_ce_hvp_f64), SK_KERNEL(sk_ce_hvp_f16),
                    SK_KERNEL(sk_ce_hvp_bf16));
#endif
