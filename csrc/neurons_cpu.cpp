// Per-neuron moments on CPU (the C++/OpenMP twin of the GPU neuron kernels): for X (B, r, m)
// float16 (passed as uint16 bits), targets Y (r, k) float64 (already shifted by the caller),
// fold ids (r,) int32 (-1 = skip the row) and a per-neuron shift c (B, m) float32, returns
//   sx[b, j] = Σ (x - c),  sxx[b, j] = Σ (x - c)²,  sxy[b, j, t] = Σ (x - c) y_t   (float64)
// over the kept rows. The shift and all accumulation are in double: the CPU pass is memory-bound, so the extra
// precision is free. Work is split over (layer, block of columns) with OpenMP.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace py = pybind11;

namespace {

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      uint32_t mm = man;
      do { ++e; mm <<= 1; } while (!(mm & 0x400u));
      bits = sign | ((127 - 15 - e) << 23) | ((mm & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

constexpr int64_t kCols = 256;  // columns per work item: their accumulators stay in L1

py::tuple neuron_moments(py::array_t<uint16_t, py::array::c_style> X,
                         py::array_t<double, py::array::c_style> Y,
                         py::array_t<int32_t, py::array::c_style> fold,
                         py::array_t<float, py::array::c_style> shift) {
  if (X.ndim() != 3) throw std::invalid_argument("X must be (B, r, m) float16 bits (uint16)");
  const int64_t B = X.shape(0), r = X.shape(1), m = X.shape(2);
  if (Y.ndim() != 2 || Y.shape(0) != r)
    throw std::invalid_argument("Y must be (r, k) float64 with r = " + std::to_string(r));
  const int64_t k = Y.shape(1);
  if (fold.ndim() != 1 || fold.shape(0) != r)
    throw std::invalid_argument("fold must be (r,) int32 with r = " + std::to_string(r));
  if (shift.ndim() != 2 || shift.shape(0) != B || shift.shape(1) != m)
    throw std::invalid_argument("shift must be (B, m) float32");

  py::array_t<double> sx({B, m}), sxx({B, m}), sxy({B, m, k});
  const uint16_t* xp = X.data();
  const double* yp = Y.data();
  const int32_t* fp = fold.data();
  const float* cp = shift.data();
  double* o_sx = sx.mutable_data();
  double* o_sxx = sxx.mutable_data();
  double* o_sxy = sxy.mutable_data();

  std::vector<int64_t> rows;
  rows.reserve(r);
  for (int64_t i = 0; i < r; ++i)
    if (fp[i] >= 0) rows.push_back(i);

  const int64_t nblk = (m + kCols - 1) / kCols;
  const int64_t items = B * nblk;
  {
    py::gil_scoped_release release;
#ifdef ACTSTORE_OPENMP
#pragma omp parallel for schedule(dynamic, 1)
#endif
    for (int64_t it = 0; it < items; ++it) {
      const int64_t b = it / nblk, j0 = (it % nblk) * kCols, j1 = std::min(m, j0 + kCols);
      const int64_t w = j1 - j0;
      std::vector<double> s(w, 0.0), ss(w, 0.0), sy(w * k, 0.0);
      std::vector<double> x(w);
      const float* c = cp + b * m + j0;
      for (int64_t row : rows) {
        const uint16_t* xr = xp + (b * r + row) * m + j0;
        for (int64_t j = 0; j < w; ++j) x[j] = static_cast<double>(half_to_float(xr[j])) - static_cast<double>(c[j]);
        for (int64_t j = 0; j < w; ++j) {
          const double v = x[j];
          s[j] += v;
          ss[j] += v * v;
        }
        const double* yr = yp + row * k;
        for (int64_t t = 0; t < k; ++t) {
          const double yt = yr[t];
          double* acc = sy.data() + t * w;
          for (int64_t j = 0; j < w; ++j) acc[j] += x[j] * yt;
        }
      }
      for (int64_t j = 0; j < w; ++j) {
        o_sx[b * m + j0 + j] = s[j];
        o_sxx[b * m + j0 + j] = ss[j];
        for (int64_t t = 0; t < k; ++t) o_sxy[(b * m + j0 + j) * k + t] = sy[t * w + j];
      }
    }
  }
  return py::make_tuple(sx, sxx, sxy);
}

}  // namespace

void register_neurons_cpu(py::module_& m) {
  m.def("neuron_moments", &neuron_moments, py::arg("X"), py::arg("Y"), py::arg("fold"),
        py::arg("shift"),
        "Per-neuron Σ(x-c), Σ(x-c)², Σ(x-c)y over rows with fold >= 0; X (B, r, m) float16 as "
        "uint16 bits, Y (r, k) float64, fold (r,) int32, shift (B, m) float32. Returns float64 "
        "(sx (B, m), sxx (B, m), sxy (B, m, k)).");
}
