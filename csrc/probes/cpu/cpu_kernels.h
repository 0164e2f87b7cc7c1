// Host interface of the CPU statistics kernels of `probes._C` (plain C++, no pybind11: only
// bindings.cpp knows the binding layer, as csrc/probes/cuda/bindings.cpp does on CUDA).
#pragma once
#include <cstdint>

namespace probes_cpu {

enum class InKind { F16, F32, F64 };

// One chunk X (B, r, d) of `kind`, targets Y (r, k) float64 and fold ids (r,) int32 in
// [-1, F) (-1 = skip the row; null = every row in fold 0, F == 1), shift (B, d) float64, and
// the float64 totals it is added into: n (F,), sx (B, F, d), xtx (B, F, d, d), sy (F, k),
// yty (F, k, k), xty (B, F, d, k). Everything C-contiguous; the caller validates shapes.
struct GramProblem {
  const void *X;
  InKind kind;
  int64_t B, r, d, k, F;
  const double *Y;
  const int32_t *fold;
  const double *shift;
  double *n, *sx, *xtx, *sy, *yty, *xty;
  int64_t block_rows;
};

// Adds the chunk into the totals: blocks of <= block_rows rows of one fold summed in float32
// about float32(shift) (float64 = false) or in double throughout (float64 = true).
void gram_update(const GramProblem &P, bool float64);

// The micro-kernel gram_update runs in that mode on this CPU: "avx2-float", "avx2-double",
// "avx512-float" or "avx512-double" (AVX-512 CPUs, unless PROBES_CPU_ISA=avx2).
const char *gram_kernel(bool float64);

// Per-neuron moments about c over the rows with fold >= 0: sx[b, j] = Σ(x - c),
// sxx[b, j] = Σ(x - c)², sxy[b, j, t] = Σ(x - c) y_t, all (over)written in float64.
// X (B, r, m) float16 bits, Y (r, k) float64, fold (r,) int32, shift (B, m) float32.
void neuron_moments(const uint16_t *X, int64_t B, int64_t r, int64_t m, const double *Y,
                    int64_t k, const int32_t *fold, const float *shift, double *sx, double *sxx,
                    double *sxy);

// out (B, r, d) = X - mean[b] for X float16 bits with element strides (layer_stride,
// row_stride, 1), mean (B, d) and out (C-contiguous) both float32 or both float64; row i of out
// is row rows[i] of X when rows is not null (r indices, each valid), else row i.
void centre_f16(const uint16_t *X, int64_t B, int64_t r, int64_t d, int64_t layer_stride,
                int64_t row_stride, const int64_t *rows, const float *mean, float *out);
void centre_f16(const uint16_t *X, int64_t B, int64_t r, int64_t d, int64_t layer_stride,
                int64_t row_stride, const int64_t *rows, const double *mean, double *out);

}  // namespace probes_cpu
