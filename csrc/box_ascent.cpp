// Fused projected-box ascent step on the CPU: one pass reading x, y, g (and y_prev) and writing
// y_new and w = x + y_new.  OpenMP splits the range across threads; the loop body is branch-free
// (selects only), so the compiler vectorises it.  No __restrict__: out= buffers may alias y or x
// (each element is read before it is written, which `omp simd` allows).
#include <cstdint>

#include "sk_cpu.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace sk {
namespace {

// Below this many elements a parallel region costs more than it saves.
constexpr std::int64_t kParallelMin = 1 << 15;

template <typename T, bool SIGN, bool MOM>
void box_ascent_kernel(const T* x, const T* y, const T* g,
                       const T* yp, T* y_out, T* w_out, std::int64_t n,
                       T eps, T step, T mu, T one_minus_mu) {
#ifdef _OPENMP
#pragma omp parallel for simd schedule(static) if (n >= kParallelMin)
#endif
  for (std::int64_t i = 0; i < n; ++i) {
    const T xi = x[i];
    const T z = sk_box_ascent_one<T>(xi, y[i], g[i], MOM ? yp[i] : T(0), eps, step, mu, one_minus_mu, SIGN, MOM);
    y_out[i] = z;
    w_out[i] = xi + z;
  }
}

template <typename T>
void box_ascent_typed(std::uintptr_t x, std::uintptr_t y, std::uintptr_t g, std::uintptr_t yp,
                      std::uintptr_t y_out, std::uintptr_t w_out, std::int64_t n, double eps, double step,
                      bool sign_mode, double mu, double one_minus_mu) {
  const bool mom = yp != 0;
  auto run = [&](auto sign_tag, auto mom_tag) {
    box_ascent_kernel<T, decltype(sign_tag)::value, decltype(mom_tag)::value>(
        ptr<const T>(x), ptr<const T>(y), ptr<const T>(g), ptr<const T>(yp), ptr<T>(y_out), ptr<T>(w_out), n,
        T(eps), T(step), T(mu), T(one_minus_mu));
  };
  using t = std::true_type;
  using f = std::false_type;
  if (sign_mode) {
    mom ? run(t{}, t{}) : run(t{}, f{});
  } else {
    mom ? run(f{}, t{}) : run(f{}, f{});
  }
}

void box_ascent(std::uintptr_t x, std::uintptr_t y, std::uintptr_t g, std::uintptr_t yp, std::uintptr_t y_out,
                std::uintptr_t w_out, std::int64_t n, int dtype, double eps, double step, bool sign_mode, double mu,
                double one_minus_mu) {
  check_dtype_cpu(dtype, "box_ascent_step");
  if (n < 0) throw std::invalid_argument("box_ascent_step: negative size");
  pybind11::gil_scoped_release release;
  if (dtype == SK_F32)
    box_ascent_typed<float>(x, y, g, yp, y_out, w_out, n, eps, step, sign_mode, mu, one_minus_mu);
  else
    box_ascent_typed<double>(x, y, g, yp, y_out, w_out, n, eps, step, sign_mode, mu, one_minus_mu);
}

}  // namespace

void register_box_ascent(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("box_ascent", &box_ascent, py::arg("x"), py::arg("y"), py::arg("g"), py::arg("y_prev"), py::arg("y_out"),
        py::arg("w_out"), py::arg("n"), py::arg("dtype"), py::arg("epsilon"), py::arg("step"), py::arg("sign_mode"),
        py::arg("momentum"), py::arg("one_minus_momentum"),
        "Fused box ascent step on raw float32/float64 pointers (y_prev = 0: no momentum).");
}

}  // namespace sk
