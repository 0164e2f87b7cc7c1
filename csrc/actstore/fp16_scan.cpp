// Scan a float32 buffer for values float16 cannot hold (|x| > 65504, inf, NaN).
// The extractor runs it on every batch before narrowing to fp16, so overflow is an error,
// never a silent inf in the store.
#include "fp16_scan.h"

#include <algorithm>
#include <cmath>

namespace actstore_native {
namespace {

constexpr float kFp16Max = 65504.0f;

// First flat index i in [begin, end) with !(|x[i]| <= 65504), or `end` if none.
// The comparison is written so that NaN also fails it.
int64_t first_bad(const float *x, int64_t begin, int64_t end) {
  constexpr int64_t kBlock = 4096;  // scan a block branch-free, then locate inside it
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t e = std::min(end, b + kBlock);
    bool bad = false;
    for (int64_t i = b; i < e; ++i) bad |= !(std::fabs(x[i]) <= kFp16Max);
    if (bad)
      for (int64_t i = b; i < e; ++i)
        if (!(std::fabs(x[i]) <= kFp16Max)) return i;
  }
  return end;
}

}  // namespace

int64_t find_fp16_overflow(const float *x, int64_t n) {
  int64_t found = n;
#ifdef ACTSTORE_OPENMP
  const int64_t chunk = 1 << 16;
  const int64_t n_chunks = (n + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) reduction(min : found) if (n_chunks > 1)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t b = c * chunk, e = std::min(n, b + chunk);
    const int64_t i = first_bad(x, b, e);
    if (i < e) found = std::min(found, i);
  }
#else
  found = first_bad(x, 0, n);
#endif
  return found == n ? -1 : found;
}

}  // namespace actstore_native
