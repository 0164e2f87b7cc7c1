// CUDA kernels of the statistics pass (`probes._C_cuda`): the shifted Gram XᵀX on tensor
// cores (WMMA, fp16 in, fp32 accumulate, fp64 out), the weighted Gram Σ w x xᵀ (same tiles)
// and per-column moments (Σx, Σx², Σx·y) for
// the Gram's Σx / XᵀY and for the neuron correlations. Raw device pointers + shapes + a stream
// handle in, so torch, CuPy or any CUDA-array library can call them (bindings.cpp).
#include "stats_kernels.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <stdexcept>
#include <string>

using namespace nvcuda;

namespace probes_cuda {
namespace {

constexpr int BM = 128;          // square output tile of the Gram
constexpr int BK = 32;           // rows consumed per main-loop step
constexpr int THREADS = 256;     // 8 warps: 4 (tile rows) x 2 (tile cols), 32 x 64 each
constexpr int LDS = BM + 8;      // padded shared row in halves (272 B: 16-B aligned, no conflicts)

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

__device__ __forceinline__ void tile_of(int pid, int T, int& ti, int& tj) {
  ti = 0;
  int rem = pid;
  while (rem >= T - ti) { rem -= T - ti; ++ti; }
  tj = ti + rem;
}

__device__ __forceinline__ int64_t row_at(const int* idx, int pos) {
  return idx ? static_cast<int64_t>(idx[pos]) : static_cast<int64_t>(pos);
}

// Load a BK x BM tile of shifted fp16 values (rows [pos0, pos1) of the fold, columns col0..)
// into registers. VEC: 8 halves per 16-B load (needs d % 8 == 0 and 16-B aligned rows).
template <bool VEC>
struct TileLoader {
  static constexpr int PER = VEC ? (BK * BM / 8) / THREADS : (BK * BM) / THREADS;  // 2 or 16
  __half2 v[VEC ? PER * 4 : PER / 2 + 1];

  __device__ void load(const __half* Xb, int64_t sxr, const int* idx, int pos, int pos1, int col0,
                       int d, const float* shift_b) {
    const int t = threadIdx.x;
    if constexpr (VEC) {
#pragma unroll
      for (int i = 0; i < PER; ++i) {
        const int e = t + i * THREADS;
        const int rr = e / (BM / 8), cc = (e % (BM / 8)) * 8;
        const int col = col0 + cc;
        uint4 raw = make_uint4(0, 0, 0, 0);
        float sh[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        const bool ok = (pos + rr < pos1) && (col < d);
        if (ok) {
          raw = *reinterpret_cast<const uint4*>(Xb + row_at(idx, pos + rr) * sxr + col);
#pragma unroll
          for (int q = 0; q < 8; ++q) sh[q] = shift_b[col + q];
        }
        const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          float2 f = __half22float2(h[q]);
          v[i * 4 + q] = ok ? __floats2half2_rn(f.x - sh[2 * q], f.y - sh[2 * q + 1])
                            : __floats2half2_rn(0.f, 0.f);
        }
      }
    } else {
#pragma unroll
      for (int i = 0; i < PER; i += 2) {
        float a[2];
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          const int e = t + (i + q) * THREADS;
          const int rr = e / BM, cc = e % BM;
          const int col = col0 + cc;
          a[q] = 0.f;
          if (pos + rr < pos1 && col < d)
            a[q] = __half2float(Xb[row_at(idx, pos + rr) * sxr + col]) - shift_b[col];
        }
        v[i / 2] = __floats2half2_rn(a[0], a[1]);
      }
    }
  }

  __device__ void store(__half (*S)[LDS]) const {
    const int t = threadIdx.x;
    if constexpr (VEC) {
#pragma unroll
      for (int i = 0; i < PER; ++i) {
        const int e = t + i * THREADS;
        const int rr = e / (BM / 8), cc = (e % (BM / 8)) * 8;
        *reinterpret_cast<uint4*>(&S[rr][cc]) = *reinterpret_cast<const uint4*>(&v[i * 4]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < PER; i += 2) {
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          const int e = t + (i + q) * THREADS;
          S[e / BM][e % BM] = q == 0 ? __low2half(v[i / 2]) : __high2half(v[i / 2]);
        }
      }
    }
  }
};

// One block per (upper-triangle tile pair, layer*fold). Accumulates Σ (x-c)ᵢ(x-c)ⱼᵀ over the
// fold's rows in fp32 and adds the tile (and its mirror) into xtx (B*F, d, d) float64.
template <bool VEC>
__global__ void __launch_bounds__(THREADS) gram_kernel(const __half* __restrict__ X, int64_t sxb,
                                                       int64_t sxr, const int* __restrict__ idx,
                                                       FoldOffsets offs, const float* __restrict__ shift,
                                                       double* __restrict__ xtx, int d, int F, int T) {
  __shared__ __align__(128) __half As[BK][LDS];
  __shared__ __align__(128) __half Bs[BK][LDS];
  __shared__ __align__(128) float scratch[THREADS / 32][16 * 16];

  int ti, tj;
  tile_of(blockIdx.x, T, ti, tj);
  const int bf = blockIdx.y;
  const int b = bf / F, f = bf % F;
  const int r0 = offs.off[f], r1 = offs.off[f + 1];
  const __half* Xb = X + static_cast<int64_t>(b) * sxb;
  const float* sh = shift + static_cast<int64_t>(b) * d;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int m0 = (warp / 2) * 32, n0 = (warp % 2) * 64;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  TileLoader<VEC> la, lb;
  if (r0 < r1) {
    la.load(Xb, sxr, idx, r0, r1, ti * BM, d, sh);
    lb.load(Xb, sxr, idx, r0, r1, tj * BM, d, sh);
  }
  for (int pos = r0; pos < r1; pos += BK) {
    __syncthreads();  // previous step's reads of As/Bs are done
    la.store(As);
    lb.store(Bs);
    __syncthreads();
    if (pos + BK < r1) {  // prefetch the next step while the tensor cores work on this one
      la.load(Xb, sxr, idx, pos + BK, r1, ti * BM, d, sh);
      lb.load(Xb, sxr, idx, pos + BK, r1, tj * BM, d, sh);
    }
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::col_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fb[4];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &As[kk][m0 + 16 * i], LDS);
#pragma unroll
      for (int j = 0; j < 4; ++j) wmma::load_matrix_sync(fb[j], &Bs[kk][n0 + 16 * j], LDS);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }

  double* out = xtx + static_cast<int64_t>(bf) * d * d;
  float* sc = scratch[warp];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      wmma::store_matrix_sync(sc, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        const int e = lane + 32 * q;
        const int gi = ti * BM + m0 + 16 * i + e / 16;
        const int gj = tj * BM + n0 + 16 * j + e % 16;
        if (gi < d && gj < d) {
          const double v = sc[e];
          out[static_cast<int64_t>(gi) * d + gj] += v;
          if (ti != tj) out[static_cast<int64_t>(gj) * d + gi] += v;
        }
      }
      __syncwarp();
    }
  }
}

// Raw fp16 tile loader of the weighted Gram: a BK x BM tile of x (rows [pos, pos1), columns
// col0..) kept as loaded; with a weight row w, store_split writes hi = fp16(x·w) and
// lo = fp16(x·w - hi) (the products keep ~2^-22 relative precision through fp16 MMAs).
template <bool VEC>
struct RawLoader {
  static constexpr int PER = VEC ? (BK * BM / 8) / THREADS : (BK * BM) / THREADS;  // 2 or 16
  uint4 v4[VEC ? PER : 1];
  __half v1[VEC ? 1 : PER];
  float wr[PER];

  __device__ void load(const __half* Xb, int64_t sxr, int pos, int pos1, int col0, int d,
                       const float* w) {
    const int t = threadIdx.x;
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      const int e = t + i * THREADS;
      const int rr = VEC ? e / (BM / 8) : e / BM;
      const int cc = VEC ? (e % (BM / 8)) * 8 : e % BM;
      const bool row_ok = pos + rr < pos1;
      const bool ok = row_ok && (col0 + cc < d);
      const __half* p = Xb + static_cast<int64_t>(pos + rr) * sxr + col0 + cc;
      if constexpr (VEC) {
        v4[i] = ok ? *reinterpret_cast<const uint4*>(p) : make_uint4(0, 0, 0, 0);
      } else {
        v1[i] = ok ? *p : __float2half(0.f);
      }
      wr[i] = (w != nullptr && row_ok) ? w[pos + rr] : 0.f;
    }
  }

  __device__ void store_raw(__half (*S)[LDS]) const {
    const int t = threadIdx.x;
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      const int e = t + i * THREADS;
      if constexpr (VEC) {
        *reinterpret_cast<uint4*>(&S[e / (BM / 8)][(e % (BM / 8)) * 8]) = v4[i];
      } else {
        S[e / BM][e % BM] = v1[i];
      }
    }
  }

  __device__ void store_split(__half (*Hi)[LDS], __half (*Lo)[LDS]) const {
    const int t = threadIdx.x;
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      const int e = t + i * THREADS;
      if constexpr (VEC) {
        const int rr = e / (BM / 8), cc = (e % (BM / 8)) * 8;
        const __half* h = reinterpret_cast<const __half*>(&v4[i]);
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          const float a = __half2float(h[q]) * wr[i];
          const __half hi = __float2half_rn(a);
          Hi[rr][cc + q] = hi;
          Lo[rr][cc + q] = __float2half_rn(a - __half2float(hi));
        }
      } else {
        const float a = __half2float(v1[i]) * wr[i];
        const __half hi = __float2half_rn(a);
        Hi[e / BM][e % BM] = hi;
        Lo[e / BM][e % BM] = __float2half_rn(a - __half2float(hi));
      }
    }
  }
};

// One block per (upper-triangle tile pair, layer*weight set): G[b*M+m] += scale[m] ·
// Σ_rows (x_I·w)ᵀ x_J, the x·w tile as hi + lo fp16 parts (two MMAs), fp32 accumulation,
// entries i <= j computed and mirrored (exactly symmetric), added into float64.
template <bool VEC>
__global__ void __launch_bounds__(THREADS) wgram_kernel(const __half* __restrict__ X, int64_t sxb,
                                                        int64_t sxr, int n,
                                                        const float* __restrict__ W,
                                                        const float* __restrict__ scale,
                                                        double* __restrict__ G, int d, int M,
                                                        int T) {
  __shared__ __align__(128) __half Ah[BK][LDS];
  __shared__ __align__(128) __half Al[BK][LDS];
  __shared__ __align__(128) __half Bs[BK][LDS];
  __shared__ __align__(128) float scratch[THREADS / 32][16 * 16];

  int ti, tj;
  tile_of(blockIdx.x, T, ti, tj);
  const int bm = blockIdx.y;
  const int b = bm / M, m = bm % M;
  const __half* Xb = X + static_cast<int64_t>(b) * sxb;
  const float* wm = W + static_cast<int64_t>(m) * n;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int m0 = (warp / 2) * 32, n0 = (warp % 2) * 64;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  RawLoader<VEC> la, lb;
  if (n > 0) {
    la.load(Xb, sxr, 0, n, ti * BM, d, wm);
    lb.load(Xb, sxr, 0, n, tj * BM, d, nullptr);
  }
  for (int pos = 0; pos < n; pos += BK) {
    __syncthreads();  // previous step's reads of the shared tiles are done
    la.store_split(Ah, Al);
    lb.store_raw(Bs);
    __syncthreads();
    if (pos + BK < n) {  // prefetch the next step while the tensor cores work on this one
      la.load(Xb, sxr, pos + BK, n, ti * BM, d, wm);
      lb.load(Xb, sxr, pos + BK, n, tj * BM, d, nullptr);
    }
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::col_major> fh[2], fl[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fb[4];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(fh[i], &Ah[kk][m0 + 16 * i], LDS);
        wmma::load_matrix_sync(fl[i], &Al[kk][m0 + 16 * i], LDS);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) wmma::load_matrix_sync(fb[j], &Bs[kk][n0 + 16 * j], LDS);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          wmma::mma_sync(acc[i][j], fh[i], fb[j], acc[i][j]);
          wmma::mma_sync(acc[i][j], fl[i], fb[j], acc[i][j]);
        }
    }
  }

  double* out = G + static_cast<int64_t>(bm) * d * d;
  const double s = static_cast<double>(scale[m]);
  float* sc = scratch[warp];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      wmma::store_matrix_sync(sc, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        const int e = lane + 32 * q;
        const int gi = ti * BM + m0 + 16 * i + e / 16;
        const int gj = tj * BM + n0 + 16 * j + e % 16;
        if (gi <= gj && gj < d) {  // (j, i) of a diagonal tile is rounded differently: mirror
          const double v = static_cast<double>(sc[e]) * s;
          out[static_cast<int64_t>(gi) * d + gj] += v;
          if (gi != gj) out[static_cast<int64_t>(gj) * d + gi] += v;
        }
      }
      __syncwarp();
    }
  }
}

constexpr int MT = 128;  // threads per moments block
constexpr int KC = 4;    // targets per launch (more targets: several launches)

// Per-column moments over a row range of one fold: Σx, Σx² (optional), Σx·y_t, x shifted.
// V consecutive columns per thread (V = 8: one 16-B load per row).
template <int V>
__global__ void __launch_bounds__(MT) moments_kernel(const __half* __restrict__ X, int64_t sxb,
                                                     int64_t sxr, const int* __restrict__ idx,
                                                     FoldOffsets offs, const float* __restrict__ shift,
                                                     const float* __restrict__ Y, int k, int k0,
                                                     double* __restrict__ sx, double* __restrict__ sxx,
                                                     double* __restrict__ sxy, int m, int F,
                                                     int rows_per_split) {
  const int bf = blockIdx.y;
  const int b = bf / F, f = bf % F;
  const int lo = offs.off[f] + blockIdx.z * rows_per_split;
  const int hi = min(lo + rows_per_split, offs.off[f + 1]);
  const int c0 = (blockIdx.x * MT + threadIdx.x) * V;
  if (c0 >= m || lo >= hi) return;
  const int kc = min(KC, k - k0);
  const __half* Xb = X + static_cast<int64_t>(b) * sxb;
  float c[V], s[V], ss[V], xy[V][KC];
#pragma unroll
  for (int q = 0; q < V; ++q) {
    c[q] = (c0 + q < m) ? shift[static_cast<int64_t>(b) * m + c0 + q] : 0.f;
    s[q] = ss[q] = 0.f;
#pragma unroll
    for (int t = 0; t < KC; ++t) xy[q][t] = 0.f;
  }
#pragma unroll 4
  for (int pos = lo; pos < hi; ++pos) {  // unrolled: several 16-B loads in flight per thread
    const int64_t row = row_at(idx, pos);
    float x[V];
    if constexpr (V == 8) {
      const uint4 raw = *reinterpret_cast<const uint4*>(Xb + row * sxr + c0);
      const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const float2 v2 = __half22float2(h[q]);
        x[2 * q] = v2.x - c[2 * q];
        x[2 * q + 1] = v2.y - c[2 * q + 1];
      }
    } else {
#pragma unroll
      for (int q = 0; q < V; ++q)
        x[q] = (c0 + q < m) ? __half2float(Xb[row * sxr + c0 + q]) - c[q] : 0.f;
    }
    float y[KC];
#pragma unroll
    for (int t = 0; t < KC; ++t) y[t] = (t < kc) ? Y[row * k + k0 + t] : 0.f;
#pragma unroll
    for (int q = 0; q < V; ++q) {
      s[q] += x[q];
      ss[q] = fmaf(x[q], x[q], ss[q]);
#pragma unroll
      for (int t = 0; t < KC; ++t) xy[q][t] = fmaf(x[q], y[t], xy[q][t]);
    }
  }
  const int64_t base = static_cast<int64_t>(bf) * m;
#pragma unroll
  for (int q = 0; q < V; ++q) {
    const int col = c0 + q;
    if (col >= m) break;
    if (k0 == 0) {
      atomicAdd(&sx[base + col], static_cast<double>(s[q]));
      if (sxx) atomicAdd(&sxx[base + col], static_cast<double>(ss[q]));
    }
    for (int t = 0; t < kc; ++t)
      atomicAdd(&sxy[(base + col) * k + k0 + t], static_cast<double>(xy[q][t]));
  }
}

int sm_count() {
  int dev = 0, n = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  return n;
}

void check_offsets(const FoldOffsets& offs, int F) {
  if (F < 1 || F > kMaxFolds)
    throw std::invalid_argument("number of folds must be in [1, " + std::to_string(kMaxFolds) + "]");
  for (int f = 0; f < F; ++f)
    if (offs.off[f] > offs.off[f + 1] || offs.off[f] < 0)
      throw std::invalid_argument("fold offsets must be non-decreasing and >= 0");
}

}  // namespace

void gram_launch(const void* X, int B, int64_t sxb, int64_t sxr, int d, const int* idx,
                 const FoldOffsets& offs, int F, const float* shift, double* xtx, void* stream) {
  check_offsets(offs, F);
  if (B < 1 || d < 1) throw std::invalid_argument("gram: B and d must be >= 1");
  const int T = (d + BM - 1) / BM;
  dim3 grid(T * (T + 1) / 2, B * F);
  auto s = static_cast<cudaStream_t>(stream);
  const bool vec = (d % 8 == 0) && (sxr % 8 == 0) && (sxb % 8 == 0) &&
                   (reinterpret_cast<uintptr_t>(X) % 16 == 0);
  const auto* Xh = static_cast<const __half*>(X);
  if (vec)
    gram_kernel<true><<<grid, THREADS, 0, s>>>(Xh, sxb, sxr, idx, offs, shift, xtx, d, F, T);
  else
    gram_kernel<false><<<grid, THREADS, 0, s>>>(Xh, sxb, sxr, idx, offs, shift, xtx, d, F, T);
  check(cudaGetLastError(), "gram_kernel launch");
}

void wgram_launch(const void* X, int B, int64_t sxb, int64_t sxr, int n, int d, const float* W,
                  int M, const float* scale, double* G, void* stream) {
  if (B < 1 || d < 1 || M < 1 || n < 0)
    throw std::invalid_argument("weighted_gram: B, d and M must be >= 1 and n >= 0");
  if (n == 0) return;
  const int T = (d + BM - 1) / BM;
  dim3 grid(T * (T + 1) / 2, B * M);
  auto s = static_cast<cudaStream_t>(stream);
  const bool vec = (d % 8 == 0) && (sxr % 8 == 0) && (sxb % 8 == 0) &&
                   (reinterpret_cast<uintptr_t>(X) % 16 == 0);
  const auto* Xh = static_cast<const __half*>(X);
  if (vec)
    wgram_kernel<true><<<grid, THREADS, 0, s>>>(Xh, sxb, sxr, n, W, scale, G, d, M, T);
  else
    wgram_kernel<false><<<grid, THREADS, 0, s>>>(Xh, sxb, sxr, n, W, scale, G, d, M, T);
  check(cudaGetLastError(), "wgram_kernel launch");
}

void moments_launch(const void* X, int B, int64_t sxb, int64_t sxr, int m, const int* idx,
                    const FoldOffsets& offs, int F, const float* shift, const float* Y, int k,
                    double* sx, double* sxx, double* sxy, void* stream) {
  check_offsets(offs, F);
  if (B < 1 || m < 1 || k < 1) throw std::invalid_argument("moments: B, m and k must be >= 1");
  int max_rows = 0;
  for (int f = 0; f < F; ++f) max_rows = std::max(max_rows, offs.off[f + 1] - offs.off[f]);
  if (max_rows == 0) return;
  const bool vec = (m % 8 == 0) && (sxr % 8 == 0) && (sxb % 8 == 0) &&
                   (reinterpret_cast<uintptr_t>(X) % 16 == 0);
  const int V = vec ? 8 : 1;
  const int nx = (m + MT * V - 1) / (MT * V);
  // enough blocks to cover every multiprocessor several times; each keeps >= 64 rows
  const int want = 8 * sm_count();
  int splits = std::max(1, want / std::max(1, nx * B * F));
  splits = std::min(splits, std::max(1, max_rows / 64));
  const int rps = (max_rows + splits - 1) / splits;
  splits = (max_rows + rps - 1) / rps;
  dim3 grid(nx, B * F, splits);
  auto s = static_cast<cudaStream_t>(stream);
  const auto* Xh = static_cast<const __half*>(X);
  for (int k0 = 0; k0 < k; k0 += KC) {
    if (vec)
      moments_kernel<8><<<grid, MT, 0, s>>>(Xh, sxb, sxr, idx, offs, shift, Y, k, k0, sx, sxx, sxy,
                                            m, F, rps);
    else
      moments_kernel<1><<<grid, MT, 0, s>>>(Xh, sxb, sxr, idx, offs, shift, Y, k, k0, sx, sxx, sxy,
                                            m, F, rps);
    check(cudaGetLastError(), "moments_kernel launch");
  }
}

void synchronize(void* stream) {
  check(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)), "cudaStreamSynchronize");
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
}

}  // namespace probes_cuda
