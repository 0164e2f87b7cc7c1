// Fused statistics pass on CPU: one chunk of activations X (B, r, d) (fp16, fp32 or fp64),
// targets Y (r, k) float64 and fold ids (r,) int32 (-1 = skip the row) are added into float64
// per-layer, per-fold totals: n, Σx, ΣxxT (full symmetric), ΣxyT, Σy, ΣyyT. Every x is shifted
// by a per-layer constant first (x - c), which keeps the float32 products well conditioned.
//
// Layout of the work (per fold, per block of <= block_rows rows of that fold, per group of layers):
//  1. pack: fp16 -> float (F16C), subtract the shift, store column panels P[p][t][W] (W columns
//     of every row, contiguous); X is read row by row (threads split rows), then Σx and ΣxyT of
//     each panel's columns are added in double from the packed rows (threads split panels);
//  2. SYRK: the upper triangle of panel pairs, split into macro tiles (144 columns; 72 for the
//     AVX2 double kernel), each a
//     work item of the OpenMP loop; a register-tiled FMA micro-kernel (MR rows x 3 vectors)
//     accumulates a macro tile over the whole row block in the accumulation type T (float or
//     double) in a thread-private buffer, KC rows at a time so the operand panels stay near L1;
//  3. flush: the macro tile is added into the float64 totals, into both halves (the mirror), so
//     the totals stay fully symmetric without a separate pass.
// float32 mode sums at most block_rows rows in float32 before adding into float64, which bounds
// the rounding error; float64 mode uses double throughout (the exactness tests use it).
//
// Two micro-kernels per type: AVX2 (4 rows x 3 ymm; panels of 24 float / 12 double) and, where
// the CPU has it, AVX-512 (8 rows x 3 zmm; panels of 48 float / 24 double), chosen at run time
// (PROBES_CPU_ISA=avx2 forces AVX2). The AVX-512 one holds 24 accumulators in 32 registers, so
// a row step loads 11 vectors for 24 FMAs instead of 7 for 12: in double, 2.3x the AVX2 kernel
// alone on a 2-core Zen 4, and the whole pass 1.2x (82 GF/s, 80-90 % of the machine's float64
// matmul rate; float32 1.05x). bench/RESULTS.md, "AVX-512 micro-kernels".
#include "cpu_kernels.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <strings.h>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
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

constexpr int MR = 4;  // rows of the AVX2 register tile
constexpr int NV = 3;  // vectors per register-tile row: 12 accumulators + 3 loads + 1 broadcast
// Panel width W (columns per packed panel) of the AVX2 kernels: 24 float, 12 double.
template <class T> constexpr int panel_width() { return NV * Simd<T>::L; }
// The AVX-512 kernels: 8 rows x 3 zmm = 24 accumulators, panels of 3 zmm.
template <class T> constexpr int wide_width() { return 3 * 64 / int(sizeof(T)); }  // 48 / 24
constexpr int kWideMR = 8;
template <class T, int W> constexpr bool is_wide() { return W == wide_width<T>(); }
static_assert(!is_wide<float, panel_width<float>()>() && !is_wide<double, panel_width<double>()>(),
              "the AVX2 and AVX-512 panels differ in width");
// Panels per macro tile side: 144 columns (72 for the AVX2 double kernel).
template <int W> constexpr int npb() { return W >= 48 ? 3 : 6; }
constexpr int KC = 128;        // rows per inner step: operand chunks of 12 KiB (AVX2) or 24 KiB
                               // (AVX-512; 64 and 256 rows measured no better)
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

// AVX-512 operations by element type, for the kernel below (compiled for AVX-512 alone).
#define PROBES_AVX512 __attribute__((target("avx512f"), always_inline)) inline
PROBES_AVX512 __m512d zload(const double *p) { return _mm512_loadu_pd(p); }
PROBES_AVX512 __m512 zload(const float *p) { return _mm512_loadu_ps(p); }
PROBES_AVX512 void zstore(double *p, __m512d v) { _mm512_storeu_pd(p, v); }
PROBES_AVX512 void zstore(float *p, __m512 v) { _mm512_storeu_ps(p, v); }
PROBES_AVX512 __m512d zbcast(double x) { return _mm512_set1_pd(x); }
PROBES_AVX512 __m512 zbcast(float x) { return _mm512_set1_ps(x); }
PROBES_AVX512 __m512d zfma(__m512d a, __m512d b, __m512d c) { return _mm512_fmadd_pd(a, b, c); }
PROBES_AVX512 __m512 zfma(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
#undef PROBES_AVX512
template <class T> struct ZmmOf;
template <> struct ZmmOf<double> { using V = __m512d; };
template <> struct ZmmOf<float> { using V = __m512; };
template <class T> using Zmm = typename ZmmOf<T>::V;

// The AVX-512 kernel: C[8 x W] += A_panel[t][0..8) * B_panel[t][0..W) over kc rows, panels of
// W = 3 zmm (24 double, 48 float). Compiled for AVX-512 alone and called only where the CPU
// has it (a call per kc rows: the rest of the file stays AVX2).
template <class T>
__attribute__((target("avx512f"), noinline)) void micro_kernel_wide(
    const T *__restrict a, const T *__restrict b, int kc, T *__restrict c, int ldc) {
  constexpr int W = wide_width<T>(), L = W / 3;
  Zmm<T> acc[kWideMR][3];
#pragma GCC unroll 8
  for (int i = 0; i < kWideMR; ++i)
#pragma GCC unroll 3
    for (int v = 0; v < 3; ++v) acc[i][v] = zload(c + i * ldc + v * L);
  for (int t = 0; t < kc; ++t) {
    const Zmm<T> b0 = zload(b), b1 = zload(b + L), b2 = zload(b + 2 * L);
#pragma GCC unroll 8
    for (int i = 0; i < kWideMR; ++i) {
      const Zmm<T> ai = zbcast(a[i]);
      acc[i][0] = zfma(ai, b0, acc[i][0]);
      acc[i][1] = zfma(ai, b1, acc[i][1]);
      acc[i][2] = zfma(ai, b2, acc[i][2]);
    }
    a += W;
    b += W;
  }
#pragma GCC unroll 8
  for (int i = 0; i < kWideMR; ++i)
#pragma GCC unroll 3
    for (int v = 0; v < 3; ++v) zstore(c + i * ldc + v * L, acc[i][v]);
}

// Whether the AVX-512 kernels run here: the CPU (and OS) support it and PROBES_CPU_ISA is not
// "avx2".
bool wide_isa() {
  static const bool cpu = __builtin_cpu_supports("avx512f");
  const char *env = std::getenv("PROBES_CPU_ISA");
  return cpu && !(env && strcasecmp(env, "avx2") == 0);
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

// One full panel row of W values from fp16: convert, subtract the shift, store.
template <int W> inline void pack_f16(const uint16_t *src, const float *sh, float *dst) {
  static_assert(W % 8 == 0, "float panels are whole ymm vectors");
  for (int v = 0; v < W / 8; ++v) {
    const __m256 x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(src + 8 * v)));
    _mm256_storeu_ps(dst + 8 * v, _mm256_sub_ps(x, _mm256_loadu_ps(sh + 8 * v)));
  }
}
template <int W> inline void pack_f16(const uint16_t *src, const double *sh, double *dst) {
  static_assert(W % 4 == 0, "double panels are whole ymm vectors");
  for (int v = 0; v < W / 4; ++v) {
    const __m128 h = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(src + 4 * v)));
    _mm256_storeu_pd(dst + 4 * v, _mm256_sub_pd(_mm256_cvtps_pd(h), _mm256_loadu_pd(sh + 4 * v)));
  }
}

struct Tile {
  int64_t layer;  // position inside the layer group
  int I, J;       // macro-tile indices, I <= J
  int cost;       // panel pairs, for ordering big items first
};

// Rows of each fold, in order; -1 rows are skipped.
std::vector<std::vector<int64_t>> fold_rows(const GramProblem &P) {
  std::vector<std::vector<int64_t>> rows(P.F);
  for (int64_t t = 0; t < P.r; ++t) {
    const int32_t f = P.fold ? P.fold[t] : 0;
    if (f >= 0) rows[f].push_back(t);
  }
  return rows;
}

// Target moments n, Σy, ΣyyT (double; tiny).
void add_target_moments(const GramProblem &P, const std::vector<std::vector<int64_t>> &rows) {
  const int64_t k = P.k;
  for (int64_t f = 0; f < P.F; ++f) {
    for (int64_t t : rows[f]) {
      const double *y = P.Y + t * k;
      P.n[f] += 1.0;
      for (int64_t a = 0; a < k; ++a) {
        P.sy[f * k + a] += y[a];
        for (int64_t c = 0; c < k; ++c) P.yty[(f * k + a) * k + c] += y[a] * y[c];
      }
    }
  }
}

// Macro tiles (I <= J) of npb x npb panels of one layer, largest first so the dynamic schedule
// ends balanced.
std::vector<Tile> macro_tiles(int64_t n_pan, int64_t n_mac, int npb) {
  std::vector<Tile> tiles;
  for (int J = 0; J < n_mac; ++J)
    for (int I = 0; I <= J; ++I) {
      const int pi = int(std::min<int64_t>(npb, n_pan - int64_t(I) * npb));
      const int pj = int(std::min<int64_t>(npb, n_pan - int64_t(J) * npb));
      tiles.push_back({0, I, J, I == J ? pi * (pi + 1) / 2 : pi * pj});
    }
  std::stable_sort(tiles.begin(), tiles.end(),
                   [](const Tile &a, const Tile &b) { return a.cost > b.cost; });
  return tiles;
}

// The packed panels, reused across calls by the calling thread: a fresh allocation each call
// would page-fault and zero tens of MiB per chunk.
template <class T> T *packed_buffer(size_t need) {
  thread_local std::unique_ptr<T[], AlignedFree> packed_cache;
  thread_local size_t packed_cap = 0;
  if (packed_cap < need) {
    packed_cache.reset();
    packed_cache = aligned_array<T>(need);
    packed_cap = need;
  }
  return packed_cache.get();
}

// The layout of one call: column panels of W, blocks of <= R_cap rows of one fold, groups of
// LG layers packed at once, and the buffers the work items share.
template <class T, int W_> struct Work {
  static constexpr int W = W_;
  const GramProblem &P;
  int64_t n_pan, n_mac, R_cap, LG;
  size_t panel_stride, layer_stride;  // elements
  int ldc;
  T *packed;
  std::vector<T> shift;  // (B, d) in T: float mode subtracts the float-rounded shift

  Work(const GramProblem &p, int64_t max_rows) : P(p) {
    n_pan = (P.d + W - 1) / W;
    n_mac = (n_pan + npb<W>() - 1) / npb<W>();
    ldc = npb<W>() * W;
    R_cap = std::min<int64_t>(std::max<int64_t>(P.block_rows, 1), max_rows);
    const size_t layer_bytes = size_t(R_cap) * size_t(n_pan) * W * sizeof(T);
    LG = std::max<int64_t>(
        1, std::min<int64_t>(P.B, int64_t(kPackBudget / std::max<size_t>(layer_bytes, 1))));
    panel_stride = size_t(R_cap) * W;
    layer_stride = panel_stride * size_t(n_pan);
    packed = packed_buffer<T>(layer_stride * size_t(LG));
    shift.resize(size_t(P.B * P.d));
    for (int64_t i = 0; i < P.B * P.d; ++i) shift[i] = static_cast<T>(P.shift[i]);
  }
};

// 1a. Convert + shift + pack rows [t_beg, t_end) of layer b0 + l of the block (rows ridx).
template <class T, int W>
void pack_rows(const Work<T, W> &w, int64_t b0, int64_t l, const int64_t *ridx, int64_t t_beg,
               int64_t t_end) {
  const GramProblem &P = w.P;
  const int64_t b = b0 + l, d = P.d;
  T *lp = w.packed + size_t(l) * w.layer_stride;
  const T *shl = w.shift.data() + b * d;
  alignas(32) T x[W];
  for (int64_t t = t_beg; t < t_end; ++t) {
    const int64_t base = (b * P.r + ridx[t]) * d;
    for (int64_t p = 0; p < w.n_pan; ++p) {
      const int64_t j0 = p * W;
      const int n = int(std::min<int64_t>(W, d - j0));
      T *dst = lp + size_t(p) * w.panel_stride + size_t(t) * W;
      if (n == W && P.kind == InKind::F16) {  // the common case, straight SIMD
        pack_f16<W>(static_cast<const uint16_t *>(P.X) + base + j0, shl + j0, dst);
        continue;
      }
      load_row<T, W>(P.X, P.kind, base + j0, n, x);
      for (int j = 0; j < n; ++j) x[j] -= shl[j0 + j];
      for (int j = n; j < W; ++j) x[j] = T(0);
      std::memcpy(dst, x, sizeof(x));
    }
  }
}

// 1b. Σx and ΣxyT of panel p of layer b0 + l in double, from its R packed rows, into fold f's
// totals; xyl: a (k, W) scratch of this thread (vectorises over columns).
template <class T, int W>
void panel_sums(const Work<T, W> &w, int64_t b0, int64_t l, int64_t p, int64_t f,
                const int64_t *ridx, int64_t R, double *xyl) {
  const GramProblem &P = w.P;
  const int64_t b = b0 + l, k = P.k, d = P.d, j0 = p * W;
  const int n = int(std::min<int64_t>(W, d - j0));
  const T *src = w.packed + size_t(l) * w.layer_stride + size_t(p) * w.panel_stride;
  double sxl[W] = {};
  std::fill(xyl, xyl + size_t(k) * W, 0.0);
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
  double *sxo = P.sx + (b * P.F + f) * d + j0;
  double *xyo = P.xty + ((b * P.F + f) * d + j0) * k;
  for (int j = 0; j < n; ++j) {
    sxo[j] += sxl[j];
    for (int64_t a = 0; a < k; ++a) xyo[j * k + a] += xyl[size_t(a) * W + j];
  }
}

// 2. SYRK of one macro tile over the block's R packed rows into C (ldc x ldc, zeroed here),
// KC rows at a time so the operand panels stay near L1.
template <class T, int W>
void syrk_tile(const Work<T, W> &w, const Tile &tl, int64_t R, T *C) {
  constexpr int NPB = npb<W>();
  const T *lp = w.packed + size_t(tl.layer) * w.layer_stride;
  const int64_t pi0 = int64_t(tl.I) * NPB, pj0 = int64_t(tl.J) * NPB;
  const int64_t pi1 = std::min<int64_t>(pi0 + NPB, w.n_pan);
  const int64_t pj1 = std::min<int64_t>(pj0 + NPB, w.n_pan);
  std::fill(C, C + size_t(w.ldc) * w.ldc, T(0));
  for (int64_t t0 = 0; t0 < R; t0 += KC) {
    const int kc = int(std::min<int64_t>(KC, R - t0));
    for (int64_t pj = pj0; pj < pj1; ++pj) {
      const T *bp = lp + size_t(pj) * w.panel_stride + size_t(t0) * W;
      const int64_t pi_end = std::min(pi1, pj + 1);
      for (int64_t pi = pi0; pi < pi_end; ++pi) {
        const T *ap = lp + size_t(pi) * w.panel_stride + size_t(t0) * W;
        T *cblk = C + size_t(pi - pi0) * W * w.ldc + size_t(pj - pj0) * W;
        if constexpr (is_wide<T, W>()) {
          for (int s = 0; s < W / kWideMR; ++s)
            micro_kernel_wide<T>(ap + s * kWideMR, bp, kc, cblk + size_t(s) * kWideMR * w.ldc,
                              w.ldc);
        } else {
          static_assert(W == panel_width<T>(), "the AVX2 kernel's panels");
          for (int s = 0; s < W / MR; ++s)
            micro_kernel<T>(ap + s * MR, bp, kc, cblk + size_t(s) * MR * w.ldc, w.ldc);
        }
      }
    }
  }
}

// 3. Add a macro tile into the float64 totals of layer b, fold f, and its mirror into the
// lower half, so the totals stay fully symmetric without a separate pass.
template <class T, int W>
void flush_tile(const Work<T, W> &w, const Tile &tl, int64_t b, int64_t f, const T *C) {
  constexpr int NPB = npb<W>();
  const int64_t d = w.P.d, ldc = w.ldc;
  const int64_t pi0 = int64_t(tl.I) * NPB, pj0 = int64_t(tl.J) * NPB;
  const int64_t pi1 = std::min<int64_t>(pi0 + NPB, w.n_pan);
  const int64_t pj1 = std::min<int64_t>(pj0 + NPB, w.n_pan);
  double *G = w.P.xtx + (b * w.P.F + f) * d * d;
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

inline int thread_id() {
#ifdef ACTSTORE_OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// One block: R rows (ridx) of fold f, layers [b0, b0 + nb): pack, sums, SYRK + flush, each an
// OpenMP work-sharing loop of one parallel region. tile_bufs / xy_bufs: per-thread scratch,
// allocated by the caller (nothing inside the parallel region may throw).
template <class T, int W>
void run_block(const Work<T, W> &w, int64_t f, const int64_t *ridx, int64_t R, int64_t b0,
               int64_t nb, const std::vector<Tile> &tiles_one_layer, T *tile_bufs,
               double *xy_bufs, int n_threads) {
  std::vector<Tile> tiles;
  tiles.reserve(tiles_one_layer.size() * size_t(nb));
  for (const Tile &tl : tiles_one_layer)  // cost-major order across layers
    for (int64_t l = 0; l < nb; ++l) tiles.push_back({l, tl.I, tl.J, tl.cost});
  const int64_t n_pack = nb * w.n_pan;
  const int64_t n_rgrp = (R + kRowGroup - 1) / kRowGroup;
  const int64_t n_conv = nb * n_rgrp;
  const int64_t n_tiles = int64_t(tiles.size());
  const size_t xy_size = size_t(w.P.k) * W, tile_size = size_t(w.ldc) * w.ldc;
  (void)n_threads;
#ifdef ACTSTORE_OPENMP
#pragma omp parallel num_threads(n_threads)
#endif
  {
    // ---- 1a. convert + shift + pack, row-sequential reads of X (items: layer x row group).
#ifdef ACTSTORE_OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t item = 0; item < n_conv; ++item) {
      const int64_t t_beg = (item % n_rgrp) * kRowGroup;
      pack_rows(w, b0, item / n_rgrp, ridx, t_beg, std::min<int64_t>(R, t_beg + kRowGroup));
    }  // implicit barrier: all panels packed
    // ---- 1b. Σx and ΣxyT of each panel's columns in double, from the packed rows.
#ifdef ACTSTORE_OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t item = 0; item < n_pack; ++item)
      panel_sums(w, b0, item / w.n_pan, item % w.n_pan, f, ridx, R,
                 xy_bufs + size_t(thread_id()) * xy_size);
    // ---- 2./3. SYRK over macro tiles, flush into the float64 totals (both halves).
    T *const cbuf = tile_bufs + size_t(thread_id()) * tile_size;
#ifdef ACTSTORE_OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t it = 0; it < n_tiles; ++it) {
      syrk_tile(w, tiles[it], R, cbuf);
      flush_tile(w, tiles[it], b0 + tiles[it].layer, f, cbuf);
    }
  }  // omp parallel
}

template <class T, int W> void run(const GramProblem &P) {
  const std::vector<std::vector<int64_t>> rows = fold_rows(P);
  add_target_moments(P, rows);
  int64_t max_rows = 0;
  for (auto &v : rows) max_rows = std::max<int64_t>(max_rows, int64_t(v.size()));
  if (max_rows == 0) return;
  const Work<T, W> w(P, max_rows);
#ifdef ACTSTORE_OPENMP
  const int n_threads = omp_get_max_threads();
#else
  const int n_threads = 1;
#endif
  auto tile_bufs = aligned_array<T>(size_t(n_threads) * size_t(w.ldc) * w.ldc);
  auto xy_bufs = aligned_array<double>(size_t(n_threads) * size_t(P.k) * W);
  const std::vector<Tile> tiles_one_layer = macro_tiles(w.n_pan, w.n_mac, npb<W>());
  for (int64_t f = 0; f < P.F; ++f) {
    const std::vector<int64_t> &idx = rows[f];
    for (int64_t r0 = 0; r0 < int64_t(idx.size()); r0 += w.R_cap) {
      const int64_t R = std::min<int64_t>(w.R_cap, int64_t(idx.size()) - r0);
      for (int64_t b0 = 0; b0 < P.B; b0 += w.LG)
        run_block(w, f, idx.data() + r0, R, b0, std::min<int64_t>(w.LG, P.B - b0),
                  tiles_one_layer, tile_bufs.get(), xy_bufs.get(), n_threads);
    }
  }
}

}  // namespace

const char *gram_kernel(bool float64) {
  if (wide_isa()) return float64 ? "avx512-double" : "avx512-float";
  return float64 ? "avx2-double" : "avx2-float";
}

void gram_update(const GramProblem &P, bool float64) {
  if (P.r == 0) return;
  const bool wide = wide_isa();
  if (float64 && wide) run<double, wide_width<double>()>(P);
  else if (float64) run<double, panel_width<double>()>(P);
  else if (wide) run<float, wide_width<float>()>(P);
  else run<float, panel_width<float>()>(P);
}

}  // namespace probes_cpu
