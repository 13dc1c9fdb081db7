// Shared by the C++ CPU kernels (g++), the CUDA kernels (nvcc) and CuPy's runtime compilation
// (NVRTC).  It must therefore include NO header: NVRTC has no host standard library.  Host
// translation units include <cmath> before this file; device code gets logf/sinf/... built in.
//
// Philox-4x32-10 (Salmon et al. 2011) and the Box-Muller map that define GaussianSubspace's
// entries; sharpkit/kernels/philox.py is the specification:
//   A[i, j] from counter (i_lo, i_hi, j >> 1, 0), key (seed_lo, seed_hi);
//   u1 = (r0 + 0.5) * 2^-32, u2 = (r1 + 0.5) * 2^-32 (computed in the entry's working precision,
//   float for every dtype but double);  A[i, 2k] = sqrt(-2 ln u1) cos(2 pi u2),
//   A[i, 2k+1] = sqrt(-2 ln u1) sin(2 pi u2).
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define SK_HD __host__ __device__ __forceinline__
#else
#define SK_HD inline
#endif

typedef unsigned int sk_u32;
typedef unsigned long long sk_u64;

// dtype codes shared with sharpkit/kernels/_backend.py (DTYPE_CODES).
enum { SK_F32 = 0, SK_F64 = 1, SK_F16 = 2, SK_BF16 = 3 };

#define SK_PHILOX_M0 0xD2511F53u
#define SK_PHILOX_M1 0xCD9E8D57u
#define SK_PHILOX_W0 0x9E3779B9u
#define SK_PHILOX_W1 0xBB67AE85u

SK_HD sk_u32 sk_mulhi(sk_u32 a, sk_u32 b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return (sk_u32)(((sk_u64)a * (sk_u64)b) >> 32);
#endif
}

// Ten Philox-4x32 rounds in place on c[0..3] with key (k0, k1).
SK_HD void sk_philox4x32_10(sk_u32& c0, sk_u32& c1, sk_u32& c2, sk_u32& c3, sk_u32 k0, sk_u32 k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    const sk_u32 hi0 = sk_mulhi(SK_PHILOX_M0, c0), lo0 = SK_PHILOX_M0 * c0;
    const sk_u32 hi1 = sk_mulhi(SK_PHILOX_M1, c2), lo1 = SK_PHILOX_M1 * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += SK_PHILOX_W0;
    k1 += SK_PHILOX_W1;
  }
}

// The pair (A[row, 2k], A[row, 2k+1]) in float (the working precision of float32/16/bf16).
SK_HD void sk_gauss_pair(sk_u64 row, sk_u32 k, sk_u32 key0, sk_u32 key1, float& a, float& b) {
  sk_u32 c0 = (sk_u32)row, c1 = (sk_u32)(row >> 32), c2 = k, c3 = 0u;
  sk_philox4x32_10(c0, c1, c2, c3, key0, key1);
  // (float)c rounds to nearest, as torch's int64 -> float32 conversion in the reference does.
  const float u1 = ((float)c0 + 0.5f) * 2.3283064365386963e-10f;
  const float u2 = ((float)c1 + 0.5f) * 2.3283064365386963e-10f;
  const float radius = sqrtf(-2.0f * logf(u1));
  const float angle = 6.2831853071795864769f * u2;
  a = radius * cosf(angle);
  b = radius * sinf(angle);
}

// The same pair in double precision (float64 results).
SK_HD void sk_gauss_pair(sk_u64 row, sk_u32 k, sk_u32 key0, sk_u32 key1, double& a, double& b) {
  sk_u32 c0 = (sk_u32)row, c1 = (sk_u32)(row >> 32), c2 = k, c3 = 0u;
  sk_philox4x32_10(c0, c1, c2, c3, key0, key1);
  const double u1 = ((double)c0 + 0.5) * 2.3283064365386963e-10;
  const double u2 = ((double)c1 + 0.5) * 2.3283064365386963e-10;
  const double radius = sqrt(-2.0 * log(u1));
  const double angle = 6.283185307179586476925 * u2;
  a = radius * cos(angle);
  b = radius * sin(angle);
}

// One element of the projected-box ascent step (the definition is box_ascent_step_reference).
// C is the compute type.  NaN in x, y, g or y_prev propagates to the result, as in the reference
// (torch.maximum/minimum propagate NaN; plain comparisons would drop a NaN bound).
template <typename C>
SK_HD C sk_box_clamp(C v, C bound) {
  C r = v < -bound ? -bound : v;
  r = r > bound ? bound : r;
  return bound != bound ? bound : r;
}

template <typename C>
SK_HD C sk_box_ascent_one(C x, C y, C g, C yp, C eps, C step, C mu, C one_minus_mu, bool sign_mode,
                          bool momentum) {
  const C bound = eps * ((x < C(0) ? -x : x) + C(1));
  const C dir = sign_mode ? (g > C(0) ? C(1) : (g < C(0) ? C(-1) : g)) : g;
  C z = sk_box_clamp(y + step * dir, bound);
  if (momentum) z = sk_box_clamp(y + mu * (z - y) + one_minus_mu * (y - yp), bound);
  return z;
}
