// pybind11 entry of the CPU module `actstore._native`. Kernels live in their own files and
// register themselves here; every function takes numpy buffers (or raw pointers), never torch.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_fp16_scan(py::module_ &m);
void register_gram_cpu(py::module_ &m);
void register_neurons_cpu(py::module_ &m);

PYBIND11_MODULE(_native, m) {
  m.doc() = "actstore native CPU kernels (C++/OpenMP)";
#ifdef ACTSTORE_OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
  register_fp16_scan(m);
  register_gram_cpu(m);
  register_neurons_cpu(m);
}
