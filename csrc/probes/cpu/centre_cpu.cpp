// The LOO pass's float32 input on CPU: out = float32(X) - mean for fp16 rows X (B, r, d) and a
// per-layer mean (B, d). torch converts fp16 one value at a time (about 0.3 G values/s per
// core here); F16C converts 8 per instruction, fused with the subtraction, so the pass writes
// its float32 block once. Rows may be strided (a layer-major store's row slice); columns not.
#include "cpu_kernels.h"
#include "half.h"

#include <cstdint>

namespace probes_cpu {

void centre_f16(const uint16_t *X, int64_t B, int64_t r, int64_t d, int64_t layer_stride,
                int64_t row_stride, const float *mean, float *out) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < r; ++i) {
      const uint16_t *src = X + b * layer_stride + i * row_stride;
      const float *m = mean + b * d;
      float *dst = out + (b * r + i) * d;
      int64_t j = 0;
#if defined(__F16C__)
      for (; j + 8 <= d; j += 8) {
        const __m256 x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(src + j)));
        _mm256_storeu_ps(dst + j, _mm256_sub_ps(x, _mm256_loadu_ps(m + j)));
      }
#endif
      for (; j < d; ++j) dst[j] = half_to_float(src[j]) - m[j];
    }
  }
}

}  // namespace probes_cpu
