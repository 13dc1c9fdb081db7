#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "sharpkit native CPU kernels";
  m.attr("has_openmp") = false;
}
