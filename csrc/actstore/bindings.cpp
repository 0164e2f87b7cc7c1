// pybind11 entry of `actstore._native`, the only file here that knows the binding layer: the
// fp16 overflow scan the extractor runs on every batch. The probe kernels are in probes._C.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "fp16_scan.h"

namespace py = pybind11;

PYBIND11_MODULE(_native, m) {
  m.doc() = "actstore native helpers (C++/OpenMP): the fp16 overflow scan";
#ifdef ACTSTORE_OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
  m.def(
      "find_fp16_overflow",
      [](py::array_t<float, py::array::c_style> arr) {
        const float *x = arr.data();
        const int64_t n = arr.size();
        py::gil_scoped_release nogil;
        return actstore_native::find_fp16_overflow(x, n);
      },
      py::arg("x"),
      "Flat index of the first element of a C-contiguous float32 array that float16 cannot\n"
      "represent (|x| > 65504, inf or NaN), or -1 if every value fits.");
}
