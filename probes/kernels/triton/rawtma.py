"""Gram mode "rawtma": no copy of the chunk. ``_gram_raw_tma_kernel`` reads the raw fp16 rows in
place through TMA descriptors (each fold's rows contiguous; interleaved folds get one gather
copy first) and multiplies raw values (exact products, float32 sums); ``_add_centred_kernel``
then adds the chunk into the float64 totals re-expressed about the shift c,
Σ(x-c)(x-c)ᵀ = G - (s cᵀ + c sᵀ) + n c cᵀ, in the one pass a plain add costs. The column sums
come from the moments kernel (or the CUDA module's, when the GPU bench measured it faster).

Accuracy guard: centring raw float32 sums magnifies their rounding by Σx² / Σ(x - x̄)² per
column, so a chunk with any column above RAW_MAX_RATIO is refused (the caller then uses
"preshift"): the mode is never less accurate than preshift.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from probes.kernels import cuda as cuda_backend
from probes.kernels.triton.column_moments import moments
from probes.kernels.triton.common import (
    INTERPRET,
    Chunk,
    counts_tensor,
    store_gram_tile,
    tile_grid,
    tile_of,
    tma_descriptor,
)
from probes.kernels.triton.configs import TUNING, PreConfig

__all__ = ["RAW_MAX_RATIO", "ADD_BLOCK", "add_centred", "raw_accurate", "tma_ready", "update"]

#: "rawtma" multiplies raw fp16 values and centres the float32 sums in float64 afterwards, which
#: magnifies their float32 rounding by Σx² / Σ(x - x̄)² of the column (1 + mean² / variance).
#: Chunks with any column above this bound (|mean| > ~16 standard deviations, or a constant
#: column) go through "preshift" instead; at the bound the centred Gram keeps about the accuracy
#: of preshift's fp16 rounding of x - c. Real residual streams stay below it (bench/RESULTS.md,
#: "Measurements moved out of code comments").
RAW_MAX_RATIO = 256.0

#: tile of _add_centred_kernel: 64 x 64 float64 tiles spill on sm_90
ADD_BLOCK = 32


@triton.jit
def _gram_raw_tma_kernel(DA, DB, TA, TB, G, d, r, r0, nf, F, f, n_tm, n_tn,
                         BM: tl.constexpr, BN: tl.constexpr, BLOCK_R: tl.constexpr):
    """Gram of the RAW fp16 rows [r0, r0 + nf) of every layer b (fold f), read in place.
    Whole BLOCK_R-row blocks stream through DA / DB, TMA descriptors (blocks BLOCK_R x BM / BN)
    over the contiguous chunk viewed as (B * r, d); the last, shorter block through TA / TB,
    3-D descriptors (blocks 1 x BLOCK_R x BM / BN) over just the fold's rows (B, nf, d), so TMA
    zero-fills past the fold's end instead of reading the next fold's rows (masked pointer loads
    there made the kernel spill registers on sm_90). TMA also zero-fills columns >= d. Writes
    float32 tile (I, J) of matrix b * F + f of G."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    ti, tj = tile_of(pid, n_tm, n_tn, BM, BN)
    n_full = nf // BLOCK_R * BLOCK_R
    row0 = b * r + r0
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for q in range(0, n_full, BLOCK_R):
        a = DA.load([row0 + q, ti * BM])
        c = DB.load([row0 + q, tj * BN])
        acc = tl.dot(tl.trans(a), c, acc)
    if n_full < nf:
        a = TA.load([b, n_full, ti * BM]).reshape(BLOCK_R, BM)
        c = TB.load([b, n_full, tj * BN]).reshape(BLOCK_R, BN)
        acc = tl.dot(tl.trans(a), c, acc)
    store_gram_tile(G, acc, b * F + f, ti, tj, d, BM, BN)


@triton.jit
def _add_centred_kernel(XTX, G, S, C, NF, d, F, BLOCK: tl.constexpr):
    """XTX[bf] += G[bf] - (s cᵀ + c sᵀ) + n c cᵀ in float64, bf = b * F + f: adds a chunk's
    raw float32 Gram G = Σ x xᵀ into totals kept about the shift c (B, d), given the chunk's raw
    Σx S (B*F, d) and row counts NF (F,). One pass over G and XTX (the plain add's traffic);
    (i, j) and (j, i) get bit-identical values, so XTX stays exactly symmetric."""
    pi = tl.program_id(0)
    pj = tl.program_id(1)
    bf = tl.program_id(2)
    b = bf // F
    n = tl.load(NF + bf % F)
    i = pi * BLOCK + tl.arange(0, BLOCK)
    j = pj * BLOCK + tl.arange(0, BLOCK)
    mi = i < d
    mj = j < d
    s_i = tl.load(S + bf * d + i, mask=mi, other=0.0)
    s_j = tl.load(S + bf * d + j, mask=mj, other=0.0)
    c_i = tl.load(C + b * d + i, mask=mi, other=0.0)
    c_j = tl.load(C + b * d + j, mask=mj, other=0.0)
    off = bf.to(tl.int64) * d * d + i[:, None].to(tl.int64) * d + j[None, :]
    m = mi[:, None] & mj[None, :]
    g = tl.load(G + off, mask=m, other=0.0).to(tl.float64)
    x = tl.load(XTX + off, mask=m, other=0.0)
    fix = ((s_i[:, None] * c_j[None, :] + c_i[:, None] * s_j[None, :])
           - n * (c_i[:, None] * c_j[None, :]))
    tl.store(XTX + off, x + (g - fix), mask=m)


def add_centred(xtx, g32, s_raw, shift, counts) -> None:
    """xtx (B*F, d, d) float64 += g32 - (s cᵀ + c sᵀ) + n c cᵀ (see _add_centred_kernel);
    s_raw (B*F, d) float64 raw Σx of the chunk, shift (B, d), counts (F,)."""
    BF, d, _ = xtx.shape
    F = len(counts)
    c = shift.to(torch.float64).contiguous()
    blk = 16 if INTERPRET else ADD_BLOCK
    # no fused multiply-add: fma(s_i, c_j, c_i * s_j) rounds the two products differently for
    # (i, j) and (j, i), and the totals must stay exactly symmetric
    _add_centred_kernel[(triton.cdiv(d, blk), triton.cdiv(d, blk), BF)](
        xtx, g32, s_raw.contiguous(), c, counts_tensor(counts, xtx.device), d, F, BLOCK=blk,
        num_warps=4, enable_fp_fusion=False)


def raw_accurate(counts, s_c, q_c, shift) -> bool:
    """The accuracy guard (see RAW_MAX_RATIO) from a chunk's column moments about the shift c:
    s_c = Σ(x - c), q_c = Σ(x - c)² (B, F, d) float64; folds without rows skipped."""
    n = counts_tensor(counts, s_c.device).view(1, -1, 1)
    c = shift.to(torch.float64).unsqueeze(1)
    live = n > 0
    spread = q_c - s_c * s_c / n.clamp(min=1)                   # Σ(x - x̄)²
    raw_sq = q_c + 2 * c * s_c + n * c * c                        # Σx²
    ok = (spread > 0) & (raw_sq <= RAW_MAX_RATIO * spread)
    return bool((ok | ~live).all())


def tma_ready(X) -> bool:
    """A chunk TMA can read in place as (B * r, d): contiguous, rows 16-byte aligned."""
    return X.is_contiguous() and X.shape[2] % 8 == 0 and X.data_ptr() % 16 == 0


def _sums(X, Y32, shift32, fold, F):
    """Σ(x - c), Σ(x - c)², Σ(x - c)yᵀ (B, F, d[, k]) float64, from the moments kernel or, when
    the GPU bench measured it faster here (TUNING "rawtma_sums"), the CUDA module's."""
    B, r, d = X.shape
    if TUNING.get(d, X.device, "rawtma_sums") == "cuda":
        z = dict(dtype=torch.float64, device=X.device)
        sx, sxx = torch.zeros(B, F, d, **z), torch.zeros(B, F, d, **z)
        sxy = torch.zeros(B, F, d, Y32.shape[1], **z)
        cuda_backend.moments(X, Y32.contiguous(), shift32, sx, sxy, sxx, fold=fold, n_folds=F)
        return sx, sxx, sxy
    return moments(X, Y32, shift32, fold=fold, n_folds=F, squares=True)


def _in_place_rows(c: Chunk):
    """(X, Y32, ranges, fold ids) the kernels read: the chunk itself when each fold's rows are
    one contiguous range and TMA can read it; else one copy with each fold's rows together
    (skipped rows dropped, as the pre-shift pass would), or a contiguous, aligned copy."""
    X, Y32, ranges, fold = c.X, c.Y32, c.ranges, c.fold
    if ranges is not None and tma_ready(X):
        return X, Y32, ranges, fold
    if c.idx is None:                  # every row in fold 0, but a strided or unaligned view
        return (X.contiguous() if not X.is_contiguous() else X.clone()), Y32, [(0, c.r)], None
    # folds interleaved (test rows among train rows, k-fold ids): one gather copy
    X = X.index_select(1, c.idx.long())
    Y32 = Y32.index_select(0, c.idx.long())
    starts = np.concatenate([[0], np.cumsum(c.counts)[:-1]])
    ranges = [(int(a), int(n)) for a, n in zip(starts, c.counts)]
    fold = None if c.F == 1 else torch.repeat_interleave(
        torch.arange(c.F, dtype=torch.int32, device=X.device),
        torch.as_tensor(c.counts, device=X.device))
    return X, Y32, ranges, fold


def _raw_gram(X, ranges, F, cfg: PreConfig) -> torch.Tensor:
    """The float32 raw Gram (B * F, d, d) of each fold's row range of X, through TMA."""
    B, r, d = X.shape
    bm, bn, block_r, warps, stages = cfg[:5]
    n_tm, n_tn, n_prog = tile_grid(d, bm, bn)
    X2 = X.view(B * r, d)
    da, db = tma_descriptor(X2, [block_r, bm]), tma_descriptor(X2, [block_r, bn])
    g32 = torch.empty(B * F, d, d, dtype=torch.float32, device=X.device)
    for f, (r0, nf) in enumerate(ranges):
        if nf == 0:
            g32.view(B, F, d, d)[:, f].zero_()
            continue
        Xf = X[:, r0:r0 + nf]
        ta, tb = tma_descriptor(Xf, [1, block_r, bm]), tma_descriptor(Xf, [1, block_r, bn])
        _gram_raw_tma_kernel[(n_prog, B)](da, db, ta, tb, g32, d, r, r0, nf, F, f, n_tm, n_tn,
                                          BM=bm, BN=bn, BLOCK_R=block_r, num_warps=warps,
                                          num_stages=stages)
    return g32


def update(stats, c: Chunk, cfg: PreConfig) -> bool:
    """Add one chunk into ``stats`` in "rawtma" mode. Returns False, having added nothing,
    when the chunk fails the accuracy guard (the caller then uses preshift)."""
    X, Y32, ranges, fold_k = _in_place_rows(c)
    B, F, d = c.B, c.F, c.d
    sx_c, sxx_c, sxy_c = _sums(X, Y32, c.shift32, fold_k, F)
    # the kernels subtract the shift rounded to float32 (as in every mode; choose_shift gives
    # float32-exact shifts), so the raw sums are rebuilt about that same value
    c32 = c.shift32.to(torch.float64)
    if not raw_accurate(c.counts, sx_c, sxx_c, c32):
        return False
    g32 = _raw_gram(X, ranges, F, cfg)
    s_raw = sx_c + counts_tensor(c.counts, X.device).view(1, F, 1) * c32.unsqueeze(1)
    add_centred(stats.xtx.view(B * F, d, d), g32, s_raw.view(B * F, d), c32, c.counts)
    del g32
    stats.sx += sx_c
    stats.xty += sxy_c
    stats.add_targets(c.Yd, c.fold, c.counts)
    return True
