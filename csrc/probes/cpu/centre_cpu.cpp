// The LOO pass's input on CPU: out = X - mean in float32 or float64 for fp16 rows X (B, r, d)
// and a per-layer mean (B, d). torch converts fp16 one value at a time (about 0.3 G values/s per
// core here); F16C converts 8 per instruction, fused with the subtraction, so the pass writes
// its block once. Rows may be strided (a layer-major store's row slice) and picked by an index
// list (the LOO pass takes a chunk's train and test rows apart this way, with no gather copy);
// columns are contiguous.
#include "cpu_kernels.h"
#include "half.h"

#include <cstdint>

namespace probes_cpu {

namespace {

template <typename T>
void centre(const uint16_t *X, int64_t B, int64_t r, int64_t d, int64_t layer_stride,
            int64_t row_stride, const int64_t *rows, const T *mean, T *out) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < r; ++i) {
      const uint16_t *src = X + b * layer_stride + (rows ? rows[i] : i) * row_stride;
      const T *m = mean + b * d;
      T *dst = out + (b * r + i) * d;
      int64_t j = 0;
#if defined(__F16C__)
      for (; j + 8 <= d; j += 8) {
        const __m256 x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(src + j)));
        if constexpr (sizeof(T) == 4) {
          _mm256_storeu_ps(dst + j, _mm256_sub_ps(x, _mm256_loadu_ps(m + j)));
        } else {
          _mm256_storeu_pd(dst + j, _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(x)),
                                                  _mm256_loadu_pd(m + j)));
          _mm256_storeu_pd(dst + j + 4, _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)),
                                                      _mm256_loadu_pd(m + j + 4)));
        }
      }
#endif
      for (; j < d; ++j) dst[j] = static_cast<T>(half_to_float(src[j])) - m[j];
    }
  }
}

}  // namespace

void centre_f16(const uint16_t *X, int64_t B, int64_t r, int64_t d, int64_t layer_stride,
                int64_t row_stride, const int64_t *rows, const float *mean, float *out) {
  centre(X, B, r, d, layer_stride, row_stride, rows, mean, out);
}

void centre_f16(const uint16_t *X, int64_t B, int64_t r, int64_t d, int64_t layer_stride,
                int64_t row_stride, const int64_t *rows, const double *mean, double *out) {
  centre(X, B, r, d, layer_stride, row_stride, rows, mean, out);
}

}  // namespace probes_cpu
