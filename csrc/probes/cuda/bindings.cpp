// pybind11 bindings of `probes._C_cuda`: raw device pointers (integers) + shapes + a
// stream handle, so any CUDA array library can call in (probes/kernels/cuda.py wraps torch and
// CuPy arrays). Importing this module needs the CUDA driver library only when a kernel runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "stats_kernels.h"

namespace py = pybind11;
using probes_cuda::FoldOffsets;

namespace {

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

FoldOffsets offsets(const std::vector<int64_t>& off) {
  if (off.size() < 2 || off.size() > probes_cuda::kMaxFolds + 1)
    throw std::invalid_argument("fold offsets need between 2 and " +
                                std::to_string(probes_cuda::kMaxFolds + 1) + " entries");
  FoldOffsets o{};
  for (size_t i = 0; i < off.size(); ++i) {
    if (off[i] < 0 || off[i] > INT32_MAX) throw std::invalid_argument("fold offset out of range");
    o.off[i] = static_cast<int>(off[i]);
  }
  return o;
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "probes CUDA kernels: shifted and weighted Gram (WMMA tensor cores), column moments";
  m.attr("max_folds") = probes_cuda::kMaxFolds;

  m.def(
      "gram",
      [](uintptr_t X, int B, int64_t sxb, int64_t sxr, int d, uintptr_t idx,
         const std::vector<int64_t>& off, uintptr_t shift, uintptr_t xtx, uintptr_t stream) {
        const int F = static_cast<int>(off.size()) - 1;
        probes_cuda::gram_launch(ptr<const void>(X), B, sxb, sxr, d, ptr<const int>(idx),
                                   offsets(off), F, ptr<const float>(shift), ptr<double>(xtx),
                                   ptr<void>(stream));
      },
      py::arg("X"), py::arg("B"), py::arg("sxb"), py::arg("sxr"), py::arg("d"), py::arg("idx"),
      py::arg("off"), py::arg("shift"), py::arg("xtx"), py::arg("stream"),
      "xtx[b*F+f] += Σ (x-c)(x-c)ᵀ over fold f's rows. Pointers are device addresses (int); "
      "idx = 0 means rows off[0]..off[F] in order.");

  m.def(
      "moments",
      [](uintptr_t X, int B, int64_t sxb, int64_t sxr, int mcols, uintptr_t idx,
         const std::vector<int64_t>& off, uintptr_t shift, uintptr_t Y, int k, uintptr_t sx,
         uintptr_t sxx, uintptr_t sxy, uintptr_t stream) {
        const int F = static_cast<int>(off.size()) - 1;
        probes_cuda::moments_launch(ptr<const void>(X), B, sxb, sxr, mcols, ptr<const int>(idx),
                                      offsets(off), F, ptr<const float>(shift),
                                      ptr<const float>(Y), k, ptr<double>(sx), ptr<double>(sxx),
                                      ptr<double>(sxy), ptr<void>(stream));
      },
      py::arg("X"), py::arg("B"), py::arg("sxb"), py::arg("sxr"), py::arg("m"), py::arg("idx"),
      py::arg("off"), py::arg("shift"), py::arg("Y"), py::arg("k"), py::arg("sx"), py::arg("sxx"),
      py::arg("sxy"), py::arg("stream"),
      "sx += Σ(x-c), sxx += Σ(x-c)² (sxx = 0 skips), sxy += Σ(x-c)yᵀ per column, per layer*fold.");

  m.def(
      "weighted_gram",
      [](uintptr_t X, int B, int64_t sxb, int64_t sxr, int n, int d, uintptr_t W, int M,
         uintptr_t scale, uintptr_t G, uintptr_t stream) {
        probes_cuda::wgram_launch(ptr<const void>(X), B, sxb, sxr, n, d, ptr<const float>(W), M,
                                  ptr<const float>(scale), ptr<double>(G), ptr<void>(stream));
      },
      py::arg("X"), py::arg("B"), py::arg("sxb"), py::arg("sxr"), py::arg("n"), py::arg("d"),
      py::arg("W"), py::arg("M"), py::arg("scale"), py::arg("G"), py::arg("stream"),
      "G[b*M+m] += scale[m] · Σ W[m,row] x xᵀ (weighted Gram, |W| <= 1, exactly symmetric).");

  m.def("synchronize", [](uintptr_t stream) { probes_cuda::synchronize(ptr<void>(stream)); },
        py::arg("stream") = 0);
  m.def("device_count", &probes_cuda::device_count);
}
