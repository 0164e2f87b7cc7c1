// Host-side interface of the CUDA statistics kernels (no CUDA headers: the pybind11 bindings are
// compiled by the host compiler).
#pragma once
#include <cstdint>

namespace probes_cuda {

constexpr int kMaxFolds = 64;

// Rows of fold f are positions [off[f], off[f+1]) of the row list (idx, or the rows themselves
// when idx is null). Passed by value as a kernel parameter: no device allocation needed.
struct FoldOffsets {
  int off[kMaxFolds + 1];
};

// xtx[(b*F + f), i, j] += Σ_rows (x_i - c_i)(x_j - c_j), X fp16 (B, r, d) with element strides
// (sxb, sxr, 1), shift c float32 (B, d), xtx float64 (B*F, d, d) contiguous. Async on `stream`.
void gram_launch(const void* X, int B, int64_t sxb, int64_t sxr, int d, const int* idx,
                 const FoldOffsets& offs, int F, const float* shift, double* xtx, void* stream);

// sx[(b*F+f), j] += Σ (x_j - c_j); sxx (nullable) += Σ (x_j - c_j)²; sxy[(b*F+f), j, t] +=
// Σ (x_j - c_j) y_t with Y float32 (rows, k) contiguous, indexed by the same row ids as X.
void moments_launch(const void* X, int B, int64_t sxb, int64_t sxr, int m, const int* idx,
                    const FoldOffsets& offs, int F, const float* shift, const float* Y, int k,
                    double* sx, double* sxx, double* sxy, void* stream);

// G[b*M + m, i, j] += scale[m] · Σ_rows W[m, row] x_i x_j (no shift), X fp16 (B, n, d) with
// element strides (sxb, sxr, 1), W float32 (M, n) contiguous with |W| <= 1 (x·w must fit in
// fp16), scale float32 (M,), G float64 (B*M, d, d) contiguous, exactly symmetric. Async.
void wgram_launch(const void* X, int B, int64_t sxb, int64_t sxr, int n, int d, const float* W,
                  int M, const float* scale, double* G, void* stream);

void synchronize(void* stream);
int device_count();

}  // namespace probes_cuda
