// Per-neuron moments on CPU (the C++/OpenMP twin of the GPU neuron kernels): for X (B, r, m)
// float16 (passed as uint16 bits), targets Y (r, k) float64 (already shifted by the caller),
// fold ids (r,) int32 (-1 = skip the row) and a per-neuron shift c (B, m) float32, returns
//   sx[b, j] = Σ (x - c),  sxx[b, j] = Σ (x - c)²,  sxy[b, j, t] = Σ (x - c) y_t   (float64)
// over the kept rows. The shift and all accumulation are in double: the CPU pass is memory-bound, so the extra
// precision is free. Work is split over (layer, block of columns) with OpenMP.
#include "cpu_kernels.h"
#include "half.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace probes_cpu {
namespace {

constexpr int64_t kCols = 256;  // columns per work item: their accumulators stay in L1

}  // namespace

void neuron_moments(const uint16_t *xp, int64_t B, int64_t r, int64_t m, const double *yp,
                    int64_t k, const int32_t *fp, const float *cp, double *o_sx, double *o_sxx,
                    double *o_sxy) {
  std::vector<int64_t> rows;
  rows.reserve(r);
  for (int64_t i = 0; i < r; ++i)
    if (fp[i] >= 0) rows.push_back(i);

  const int64_t nblk = (m + kCols - 1) / kCols;
  const int64_t items = B * nblk;
  {
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
}

}  // namespace probes_cpu
