// Matrix-free Gaussian subspace on the CPU: A's entries are generated from (seed, row, column)
// by Philox inside the product loops, so no n x p matrix is ever stored.  OpenMP splits rows.
#include <cstdint>
#include <vector>

#include "sk_cpu.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace sk {
namespace {

// Rows per OpenMP work item: large enough to amortise scheduling, small enough to balance.
constexpr std::int64_t kRowChunk = 256;

struct Key {
  sk_u32 k0, k1;
  explicit Key(sk_u64 seed) : k0((sk_u32)seed), k1((sk_u32)(seed >> 32)) {}
};

// Rows row0 .. row0 + rows - 1 of A into out (rows x p, row-major).
template <typename T>
void fill(sk_u64 seed, std::int64_t row0, std::int64_t rows, std::int64_t p, T* out) {
  const Key key(seed);
  const std::int64_t pairs = (p + 1) / 2;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (rows * p >= 4096)
#endif
  for (std::int64_t r = 0; r < rows; ++r) {
    T* dst = out + r * p;
    for (std::int64_t k = 0; k < pairs; ++k) {
      T a, b;
      sk_gauss_pair((sk_u64)(row0 + r), (sk_u32)k, key.k0, key.k1, a, b);
      dst[2 * k] = a;
      if (2 * k + 1 < p) dst[2 * k + 1] = b;
    }
  }
}

// out[r] = sum_j A[row0 + r, j] z[j]; accumulates in double.
template <typename T>
void matvec(sk_u64 seed, std::int64_t row0, std::int64_t rows, std::int64_t p, const T* z, T* out) {
  const Key key(seed);
  const std::int64_t pairs = p / 2;  // full pairs; an odd last column is handled after the loop
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, kRowChunk) if (rows * p >= 4096)
#endif
  for (std::int64_t r = 0; r < rows; ++r) {
    const sk_u64 row = (sk_u64)(row0 + r);
    double acc = 0.0;
    for (std::int64_t k = 0; k < pairs; ++k) {
      T a, b;
      sk_gauss_pair(row, (sk_u32)k, key.k0, key.k1, a, b);
      acc += (double)a * (double)z[2 * k] + (double)b * (double)z[2 * k + 1];
    }
    if (p & 1) {
      T a, b;
      sk_gauss_pair(row, (sk_u32)pairs, key.k0, key.k1, a, b);
      acc += (double)a * (double)z[p - 1];
    }
    out[r] = (T)acc;
  }
}

// out[j] = sum_r A[row0 + r, j] g[r]; each thread keeps a double partial sum, combined at the end.
template <typename T>
void rmatvec(sk_u64 seed, std::int64_t row0, std::int64_t rows, std::int64_t p, const T* g, T* out) {
  const Key key(seed);
  const std::int64_t pairs = (p + 1) / 2;
  std::vector<double> total(2 * pairs, 0.0);
#ifdef _OPENMP
#pragma omp parallel if (rows * p >= 4096)
#endif
  {
    std::vector<double> acc(2 * pairs, 0.0);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, kRowChunk) nowait
#endif
    for (std::int64_t r = 0; r < rows; ++r) {
      const sk_u64 row = (sk_u64)(row0 + r);
      const double gr = (double)g[r];
      for (std::int64_t k = 0; k < pairs; ++k) {
        T a, b;
        sk_gauss_pair(row, (sk_u32)k, key.k0, key.k1, a, b);
        acc[2 * k] += gr * (double)a;
        acc[2 * k + 1] += gr * (double)b;
      }
    }
#ifdef _OPENMP
#pragma omp critical
#endif
    for (std::int64_t j = 0; j < 2 * pairs; ++j) total[j] += acc[j];
  }
  for (std::int64_t j = 0; j < p; ++j) out[j] = (T)total[j];
}

void check(std::int64_t row0, std::int64_t rows, std::int64_t p, int dtype, const char* op) {
  check_dtype_cpu(dtype, op);
  if (row0 < 0 || rows < 0 || p < 0) throw std::invalid_argument(std::string(op) + ": negative size");
}

void fill_py(sk_u64 seed, std::int64_t row0, std::int64_t rows, std::int64_t p, std::uintptr_t out, int dtype) {
  check(row0, rows, p, dtype, "GaussianSubspace.materialize");
  pybind11::gil_scoped_release release;
  if (dtype == SK_F32) fill(seed, row0, rows, p, ptr<float>(out));
  else fill(seed, row0, rows, p, ptr<double>(out));
}

void matvec_py(sk_u64 seed, std::int64_t row0, std::int64_t rows, std::int64_t p, std::uintptr_t z,
               std::uintptr_t out, int dtype) {
  check(row0, rows, p, dtype, "GaussianSubspace.matvec");
  pybind11::gil_scoped_release release;
  if (dtype == SK_F32) matvec(seed, row0, rows, p, ptr<const float>(z), ptr<float>(out));
  else matvec(seed, row0, rows, p, ptr<const double>(z), ptr<double>(out));
}

void rmatvec_py(sk_u64 seed, std::int64_t row0, std::int64_t rows, std::int64_t p, std::uintptr_t g,
                std::uintptr_t out, int dtype) {
  check(row0, rows, p, dtype, "GaussianSubspace.rmatvec");
  pybind11::gil_scoped_release release;
  if (dtype == SK_F32) rmatvec(seed, row0, rows, p, ptr<const float>(g), ptr<float>(out));
  else rmatvec(seed, row0, rows, p, ptr<const double>(g), ptr<double>(out));
}

// Philox-4x32-10 on count (counter, key) sets, for the known-answer tests.
void philox_py(std::uintptr_t ctr, std::uintptr_t key, std::uintptr_t out, std::int64_t count) {
  const sk_u32* c = ptr<const sk_u32>(ctr);
  const sk_u32* k = ptr<const sk_u32>(key);
  sk_u32* o = ptr<sk_u32>(out);
  for (std::int64_t i = 0; i < count; ++i) {
    sk_u32 c0 = c[4 * i], c1 = c[4 * i + 1], c2 = c[4 * i + 2], c3 = c[4 * i + 3];
    sk_philox4x32_10(c0, c1, c2, c3, k[2 * i], k[2 * i + 1]);
    o[4 * i] = c0;
    o[4 * i + 1] = c1;
    o[4 * i + 2] = c2;
    o[4 * i + 3] = c3;
  }
}

}  // namespace

void register_subspace(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("subspace_fill", &fill_py, py::arg("seed"), py::arg("row0"), py::arg("rows"), py::arg("p"), py::arg("out"),
        py::arg("dtype"), "Rows row0..row0+rows-1 of A into a contiguous rows x p buffer.");
  m.def("subspace_matvec", &matvec_py, py::arg("seed"), py::arg("row0"), py::arg("rows"), py::arg("p"),
        py::arg("z"), py::arg("out"), py::arg("dtype"), "out = A[row0:row0+rows] @ z, entries generated on the fly.");
  m.def("subspace_rmatvec", &rmatvec_py, py::arg("seed"), py::arg("row0"), py::arg("rows"), py::arg("p"),
        py::arg("g"), py::arg("out"), py::arg("dtype"), "out = A[row0:row0+rows].T @ g, entries generated on the fly.");
  m.def("philox4x32", &philox_py, py::arg("counters"), py::arg("keys"), py::arg("out"), py::arg("count"),
        "Philox-4x32-10 of count uint32x4 counters under uint32x2 keys.");
}

}  // namespace sk
