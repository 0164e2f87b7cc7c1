// Fused statistics pass on CPU: one chunk of activations X (B, r, d) (fp16, fp32 or fp64),
// targets Y (r, k) float64 and fold ids (r,) int32 (-1 = skip the row) are added into float64
// per-layer, per-fold totals: n, Σx, ΣxxT (full symmetric), ΣxyT, Σy, ΣyyT. Every x is shifted
// by a per-layer constant first (x - c), which keeps the float32 products well conditioned.
//
// Layout of the work (per fold, per block of <= block_rows rows of that fold, per group of layers):
//  1. pack: fp16 -> float (F16C), subtract the shift, store column panels P[p][t][W] (W columns
//     of every row, contiguous); X is read row by row (threads split rows), then Σx and ΣxyT of
//     each panel's columns are added in double from the packed rows (threads split panels);
//  2. SYRK: the upper triangle of panel pairs, split into macro tiles of NPB x NPB panels, each a
//     work item of the OpenMP loop; a register-tiled FMA micro-kernel (4 rows x 3 vectors)
//     accumulates a macro tile over the whole row block in the accumulation type T (float or
//     double) in a thread-private buffer, KC rows at a time so both operand panels stay in L1;
//  3. flush: the macro tile is added into the float64 totals, into both halves (the mirror), so
//     the totals stay fully symmetric without a separate pass.
// float32 mode sums at most block_rows rows in float32 before adding into float64, which bounds
// the rounding error; float64 mode uses double throughout (the exactness tests use it).
#include "cpu_kernels.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef ACTSTORE_OPENMP
#include <omp.h>
#endif

namespace probes_cpu {
namespace {

// ------------------------------------------------------------------------------------ SIMD shim
template <class T> struct Simd;
template <> struct Simd<float> {
  using V = __m256;
  static constexpr int L = 8;
  static V load(const float *p) { return _mm256_loadu_ps(p); }
  static void store(float *p, V v) { _mm256_storeu_ps(p, v); }
  static V bcast(const float *p) { return _mm256_broadcast_ss(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
};
template <> struct Simd<double> {
  using V = __m256d;
  static constexpr int L = 4;
  static V load(const double *p) { return _mm256_loadu_pd(p); }
  static void store(double *p, V v) { _mm256_storeu_pd(p, v); }
  static V bcast(const double *p) { return _mm256_broadcast_sd(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
};

constexpr int MR = 4;  // rows of the register tile
constexpr int NV = 3;  // vectors per register-tile row: 12 accumulators + 3 loads + 1 broadcast
template <class T> constexpr int panel_width() { return NV * Simd<T>::L; }  // 24 float, 12 double
constexpr int NPB = 6;         // panels per macro tile side (144 float / 72 double columns)
constexpr int KC = 128;        // rows per inner step: two 12 KiB operand chunks stay in L1
constexpr int64_t kRowGroup = 32;  // rows per conversion work item
constexpr size_t kPackBudget = size_t(32) << 20;  // bytes of packed panels per layer group (~L3)

struct AlignedFree {
  void operator()(void *p) const { std::free(p); }
};
template <class T> std::unique_ptr<T[], AlignedFree> aligned_array(size_t n) {
  size_t bytes = ((n * sizeof(T) + 63) / 64) * 64;
  void *p = std::aligned_alloc(64, bytes ? bytes : 64);
  if (!p) throw std::bad_alloc();
  return std::unique_ptr<T[], AlignedFree>(static_cast<T *>(p));
}

// C[MR x W] (row stride ldc) += A_panel[t][0..MR) * B_panel[t][0..W) over kc rows.
// a points at column offset s*MR of panel row 0; both panels have row stride W.
template <class T>
inline void micro_kernel(const T *__restrict a, const T *__restrict b, int kc, T *__restrict c,
                         int ldc) {
  using S = Simd<T>;
  constexpr int W = panel_width<T>();
  constexpr int L = S::L;
  typename S::V acc[MR][NV];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) acc[i][v] = S::load(c + i * ldc + v * L);
  for (int t = 0; t < kc; ++t) {
    const typename S::V b0 = S::load(b), b1 = S::load(b + L), b2 = S::load(b + 2 * L);
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      const typename S::V ai = S::bcast(a + i);
      acc[i][0] = S::fma(ai, b0, acc[i][0]);
      acc[i][1] = S::fma(ai, b1, acc[i][1]);
      acc[i][2] = S::fma(ai, b2, acc[i][2]);
    }
    a += W;
    b += W;
  }
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) S::store(c + i * ldc + v * L, acc[i][v]);
}

// ------------------------------------------------------------------------------------ input rows
// Convert n <= W values of one row segment to float/double (exact for fp16 -> float).
template <class T, int W>
inline void load_row(const void *base, InKind kind, int64_t offset, int n, T *out) {
  if (kind == InKind::F16) {
    const uint16_t *src = static_cast<const uint16_t *>(base) + offset;
    alignas(32) float tmp[W + 8];
    int j = 0;
    for (; j + 8 <= n; j += 8)
      _mm256_store_ps(tmp + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(src + j))));
    if (j < n) {  // tail through a zero-padded buffer: same instruction, same rounding
      alignas(16) uint16_t pad[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      std::memcpy(pad, src + j, size_t(n - j) * sizeof(uint16_t));
      _mm256_store_ps(tmp + j, _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i *>(pad))));
    }
    for (int i = 0; i < n; ++i) out[i] = static_cast<T>(tmp[i]);
  } else if (kind == InKind::F32) {
    const float *src = static_cast<const float *>(base) + offset;
    for (int i = 0; i < n; ++i) out[i] = static_cast<T>(src[i]);
  } else {
    const double *src = static_cast<const double *>(base) + offset;
    for (int i = 0; i < n; ++i) out[i] = static_cast<T>(src[i]);
  }
}

// One full panel row from fp16: convert, subtract the shift, store (W = 24 floats / 12 doubles).
inline void pack_f16(const uint16_t *src, const float *sh, float *dst) {
  for (int v = 0; v < 3; ++v) {
    const __m256 x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(src + 8 * v)));
    _mm256_storeu_ps(dst + 8 * v, _mm256_sub_ps(x, _mm256_loadu_ps(sh + 8 * v)));
  }
}
inline void pack_f16(const uint16_t *src, const double *sh, double *dst) {
  for (int v = 0; v < 3; ++v) {
    const __m128 h = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(src + 4 * v)));
    _mm256_storeu_pd(dst + 4 * v, _mm256_sub_pd(_mm256_cvtps_pd(h), _mm256_loadu_pd(sh + 4 * v)));
  }
}
static_assert(NV == 3, "pack_f16 writes three vectors per panel row");

struct Tile {
  int64_t layer;  // position inside the layer group
  int I, J;       // macro-tile indices, I <= J
  int cost;       // panel pairs, for ordering big items first
};

template <class T> void run(const GramProblem &P) {
  constexpr int W = panel_width<T>();
  const int64_t B = P.B, d = P.d, k = P.k, F = P.F, r = P.r;
  const int64_t n_pan = (d + W - 1) / W;
  const int64_t n_mac = (n_pan + NPB - 1) / NPB;
  const int ldc = NPB * W;

  // Rows of each fold, in order; -1 rows are skipped.
  std::vector<std::vector<int64_t>> rows(F);
  for (int64_t t = 0; t < r; ++t) {
    const int32_t f = P.fold ? P.fold[t] : 0;
    if (f >= 0) rows[f].push_back(t);
  }

  // Target moments (double; tiny).
  for (int64_t f = 0; f < F; ++f) {
    for (int64_t t : rows[f]) {
      const double *y = P.Y + t * k;
      P.n[f] += 1.0;
      for (int64_t a = 0; a < k; ++a) {
        P.sy[f * k + a] += y[a];
        for (int64_t c = 0; c < k; ++c) P.yty[(f * k + a) * k + c] += y[a] * y[c];
      }
    }
  }

  int64_t max_rows = 0;
  for (auto &v : rows) max_rows = std::max<int64_t>(max_rows, int64_t(v.size()));
  if (max_rows == 0) return;
  const int64_t R_cap = std::min<int64_t>(std::max<int64_t>(P.block_rows, 1), max_rows);
  const size_t layer_bytes = size_t(R_cap) * size_t(n_pan) * W * sizeof(T);
  const int64_t LG = std::max<int64_t>(1, std::min<int64_t>(B, int64_t(kPackBudget / std::max<size_t>(layer_bytes, 1))));
  const size_t panel_stride = size_t(R_cap) * W;  // elements
  const size_t layer_stride = panel_stride * size_t(n_pan);
  // The packed buffer is reused across calls by the calling thread: a fresh allocation each
  // call would page-fault and zero tens of MiB per chunk.
  thread_local std::unique_ptr<T[], AlignedFree> packed_cache;
  thread_local size_t packed_cap = 0;
  const size_t packed_need = layer_stride * size_t(LG);
  if (packed_cap < packed_need) {
    packed_cache.reset();
    packed_cache = aligned_array<T>(packed_need);
    packed_cap = packed_need;
  }
  T *const packed_base = packed_cache.get();

  // Shift in the accumulation type (float mode subtracts the float-rounded shift).
  std::vector<T> shiftT(size_t(B * d));
  for (int64_t i = 0; i < B * d; ++i) shiftT[i] = static_cast<T>(P.shift[i]);

  // One macro-tile accumulator per OpenMP thread, allocated here: nothing inside the parallel
  // region may throw.
#ifdef ACTSTORE_OPENMP
  const int n_threads = omp_get_max_threads();
#else
  const int n_threads = 1;
#endif
  auto tile_bufs = aligned_array<T>(size_t(n_threads) * size_t(ldc) * ldc);
  auto xy_bufs = aligned_array<double>(size_t(n_threads) * size_t(k) * W);

  // Macro tiles, largest first so the dynamic schedule ends balanced.
  std::vector<Tile> tiles_one_layer;
  for (int J = 0; J < n_mac; ++J)
    for (int I = 0; I <= J; ++I) {
      const int pi = int(std::min<int64_t>(NPB, n_pan - int64_t(I) * NPB));
      const int pj = int(std::min<int64_t>(NPB, n_pan - int64_t(J) * NPB));
      tiles_one_layer.push_back({0, I, J, I == J ? pi * (pi + 1) / 2 : pi * pj});
    }
  std::stable_sort(tiles_one_layer.begin(), tiles_one_layer.end(),
                   [](const Tile &a, const Tile &b) { return a.cost > b.cost; });

  for (int64_t f = 0; f < F; ++f) {
    const std::vector<int64_t> &idx = rows[f];
    for (int64_t r0 = 0; r0 < int64_t(idx.size()); r0 += R_cap) {
      const int64_t R = std::min<int64_t>(R_cap, int64_t(idx.size()) - r0);
      const int64_t *ridx = idx.data() + r0;
      for (int64_t b0 = 0; b0 < B; b0 += LG) {
        const int64_t nb = std::min<int64_t>(LG, B - b0);
        std::vector<Tile> tiles;
        tiles.reserve(tiles_one_layer.size() * size_t(nb));
        for (const Tile &tl : tiles_one_layer)  // cost-major order across layers
          for (int64_t l = 0; l < nb; ++l) tiles.push_back({l, tl.I, tl.J, tl.cost});
        const int64_t n_pack = nb * n_pan;
        const int64_t n_rgrp = (R + kRowGroup - 1) / kRowGroup;
        const int64_t n_conv = nb * n_rgrp;
        const int64_t n_tiles = int64_t(tiles.size());

#ifdef ACTSTORE_OPENMP
#pragma omp parallel num_threads(n_threads)
#endif
        {
          // ---- 1a. convert + shift + pack, row-sequential reads of X (items: layer x row group).
#ifdef ACTSTORE_OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
          for (int64_t item = 0; item < n_conv; ++item) {
            const int64_t l = item / n_rgrp, t_beg = (item % n_rgrp) * kRowGroup, b = b0 + l;
            const int64_t t_end = std::min<int64_t>(R, t_beg + kRowGroup);
            T *lp = packed_base + size_t(l) * layer_stride;
            const T *shl = shiftT.data() + b * d;
            alignas(32) T x[W];
            for (int64_t t = t_beg; t < t_end; ++t) {
              const int64_t base = (b * r + ridx[t]) * d;
              for (int64_t p = 0; p < n_pan; ++p) {
                const int64_t j0 = p * W;
                const int w = int(std::min<int64_t>(W, d - j0));
                if (w == W && P.kind == InKind::F16) {  // the common case, straight SIMD
                  pack_f16(static_cast<const uint16_t *>(P.X) + base + j0, shl + j0,
                           lp + size_t(p) * panel_stride + size_t(t) * W);
                  continue;
                }
                load_row<T, W>(P.X, P.kind, base + j0, w, x);
                for (int j = 0; j < w; ++j) x[j] -= shl[j0 + j];
                for (int j = w; j < W; ++j) x[j] = T(0);
                std::memcpy(lp + size_t(p) * panel_stride + size_t(t) * W, x, sizeof(x));
              }
            }
          }  // implicit barrier: all panels packed

          // ---- 1b. Σx and ΣxyT of each panel's columns in double, from the packed rows.
#ifdef ACTSTORE_OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
          for (int64_t item = 0; item < n_pack; ++item) {
            const int64_t l = item / n_pan, p = item % n_pan, b = b0 + l;
            const int64_t j0 = p * W;
            const int w = int(std::min<int64_t>(W, d - j0));
            const T *src = packed_base + size_t(l) * layer_stride + size_t(p) * panel_stride;
            double sxl[W] = {};
#ifdef ACTSTORE_OPENMP
            double *const xyl = xy_bufs.get() + size_t(omp_get_thread_num()) * size_t(k) * W;
#else
            double *const xyl = xy_bufs.get();
#endif
            std::fill(xyl, xyl + size_t(k) * W, 0.0);  // (k, W): vectorises over columns
            for (int64_t t = 0; t < R; ++t) {
              const T *x = src + size_t(t) * W;
              for (int j = 0; j < W; ++j) sxl[j] += double(x[j]);
              const double *y = P.Y + ridx[t] * k;
              for (int64_t a = 0; a < k; ++a) {
                double *xa = xyl + a * W;
                const double ya = y[a];
                for (int j = 0; j < W; ++j) xa[j] += double(x[j]) * ya;
              }
            }
            double *sxo = P.sx + (b * F + f) * d + j0;
            double *xyo = P.xty + ((b * F + f) * d + j0) * k;
            for (int j = 0; j < w; ++j) {
              sxo[j] += sxl[j];
              for (int64_t a = 0; a < k; ++a) xyo[j * k + a] += xyl[size_t(a) * W + j];
            }
          }

          // ---- 2./3. SYRK over macro tiles, flush into the float64 totals (both halves).
#ifdef ACTSTORE_OPENMP
          T *const cbuf = tile_bufs.get() + size_t(omp_get_thread_num()) * size_t(ldc) * ldc;
#else
          T *const cbuf = tile_bufs.get();
#endif
#ifdef ACTSTORE_OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
          for (int64_t it = 0; it < n_tiles; ++it) {
            const Tile tl = tiles[it];
            const int64_t b = b0 + tl.layer;
            const T *lp = packed_base + size_t(tl.layer) * layer_stride;
            const int64_t pi0 = int64_t(tl.I) * NPB, pj0 = int64_t(tl.J) * NPB;
            const int64_t pi1 = std::min<int64_t>(pi0 + NPB, n_pan), pj1 = std::min<int64_t>(pj0 + NPB, n_pan);
            T *C = cbuf;
            std::fill(C, C + size_t(ldc) * ldc, T(0));
            for (int64_t t0 = 0; t0 < R; t0 += KC) {
              const int kc = int(std::min<int64_t>(KC, R - t0));
              for (int64_t pj = pj0; pj < pj1; ++pj) {
                const T *bp = lp + size_t(pj) * panel_stride + size_t(t0) * W;
                const int64_t pi_end = std::min(pi1, pj + 1);
                for (int64_t pi = pi0; pi < pi_end; ++pi) {
                  const T *ap = lp + size_t(pi) * panel_stride + size_t(t0) * W;
                  T *cblk = C + size_t(pi - pi0) * W * ldc + size_t(pj - pj0) * W;
                  for (int s = 0; s < W / MR; ++s)
                    micro_kernel<T>(ap + s * MR, bp, kc, cblk + size_t(s) * MR * ldc, ldc);
                }
              }
            }
            double *G = P.xtx + (b * F + f) * d * d;
            for (int64_t pj = pj0; pj < pj1; ++pj) {
              const int64_t pi_end = std::min(pi1, pj + 1);
              const int64_t cj0 = pj * W, wj = std::min<int64_t>(W, d - cj0);
              for (int64_t pi = pi0; pi < pi_end; ++pi) {
                const int64_t ci0 = pi * W, wi = std::min<int64_t>(W, d - ci0);
                const T *cblk = C + size_t(pi - pi0) * W * ldc + size_t(pj - pj0) * W;
                for (int64_t i = 0; i < wi; ++i) {
                  double *g = G + (ci0 + i) * d + cj0;
                  const T *c = cblk + size_t(i) * ldc;
                  for (int64_t j = 0; j < wj; ++j) g[j] += double(c[j]);
                }
                if (pi != pj)  // mirror into the lower half
                  for (int64_t j = 0; j < wj; ++j) {
                    double *g = G + (cj0 + j) * d + ci0;
                    for (int64_t i = 0; i < wi; ++i) g[i] += double(cblk[size_t(i) * ldc + j]);
                  }
              }
            }
          }
        }  // omp parallel
      }
    }
  }
}

}  // namespace

void gram_update(const GramProblem &P, bool float64) {
  if (P.r == 0) return;
  if (float64) run<double>(P);
  else run<float>(P);
}

}  // namespace probes_cpu
