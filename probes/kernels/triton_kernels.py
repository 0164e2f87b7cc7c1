"""Triton backend: the statistics pass and the neuron moments as fused GPU kernels.

``gram_update(stats, X, Y, fold)`` adds one chunk X (B, r, d) float16 CUDA, Y (r, k), fold (r,)
(-1 = skip) into a :class:`probes.stats.GramStats` held in float64 on the same device.

Kernel ``_gram_kernel``: one program per (BM x BN output tile (I, J) of the d x d Gram that
holds entries with i <= j, layer b, fold f). It walks the fold's rows in blocks of BLOCK_R, loads the two fp16 column tiles,
subtracts the float32 shift, rounds the shifted values to fp16 and accumulates XᵢᵀXⱼ in float32
with ``tl.dot`` (tensor cores). The first tile of each row block also accumulates Σx and XᵀY
(float32, IEEE dot) for its columns, so X is read by one kernel only. At the end each program writes
the i <= j part of its float32 tile, and the i < j part to the mirrored positions, into a
float32 chunk Gram that is then added into the float64 totals (so they stay exactly
symmetric). That add costs d² x 20 bytes per layer and chunk: use chunks of >= 8k rows.

Precision (stated, tested): the shifted value x - c is rounded to fp16 before the product, a
relative rounding of at most 2^-11 per value; with float32 accumulation the Gram agrees with the
float64 reference to ~1e-3 relative (Frobenius) on random data, typically far better because the
roundings average out. ``shift_in_kernel=False`` instead multiplies the raw fp16 values (exact
products) and re-expresses the chunk about the shift in float64 afterwards: better when the
shift is small relative to the spread, and faster on tensor cores (no conversion in the loop).

Default mode "preshift" (``gram_update(..., mode="preshift")``): ``_prep_kernel`` reads the chunk
once and writes a copy XS = fp16(x - c) with the rows of each fold contiguous (test rows dropped),
each fold's rows padded with zero rows to a multiple of BLOCK_R and the columns padded with zeros
to a multiple of the tile; the same pass sums Σ(x - c) and Σ(x - c)yᵀ in float32 from the exact
x - c. Then ``_gram_tma_kernel`` (Hopper TMA descriptor loads) or ``_gram_pre_kernel`` (pointer
loads) is a plain, mask-free tensor-core Gram per (tile, layer, fold) over the fold's row range.
Precision as "shift-in" (the same fp16 rounding of x - c), speed of a plain GEMM plus one
read + write of the chunk; costs a second copy of the chunk in GPU memory.

Mode "rawtma" (``mode="rawtma"``; the GPU bench makes it the default when it measures faster):
no copy at all. ``_gram_raw_tma_kernel`` reads the raw fp16 chunk in place through TMA
descriptors over its (B * r, d) view (when the folds' rows are interleaved, e.g. test rows among
train rows, one gather copy first puts each fold's rows together; a fold's last partial row
block comes through a 3-D descriptor over just that fold's rows, which TMA zero-fills past the
fold's end), multiplies raw values (exact
products, float32 sums); ``_add_centred_kernel`` then adds the chunk into the float64 totals
re-expressed about the shift c, Σ(x-c)(x-c)ᵀ = G - (s cᵀ + c sᵀ) + n c cᵀ, in the same single
pass the plain add costs. Σ(x - c), Σ(x - c)², Σ(x - c)yᵀ come from ``_moments_kernel`` (one
read of the chunk). Centring raw float32 sums magnifies their rounding by Σx² / Σ(x - x̄)² per
column, so a chunk with any column above RAW_MAX_RATIO (a mean beyond ~16 standard deviations,
or a constant column) is done by "preshift" instead: the mode is never less accurate than that.

Kernel ``_moments_kernel`` (neurons, and Σx / XᵀY in the raw modes): for every column of every
layer, Σx, Σx², Σx·y_t over a row range; programs split rows for parallelism and write float32
partials that are summed in float64.

Under ``TRITON_INTERPRET=1`` (read by ``triton.jit`` when this module is imported) the kernels run
on CPU tensors; the tests use that on tiny shapes.
"""
from __future__ import annotations

import collections
import os

import numpy as np
import torch

import triton
import triton.language as tl

__all__ = ["gram_update", "neuron_update", "is_available", "unavailable_reason",
           "gram_configs", "GramConfig", "preshift_configs", "PreConfig", "MODES", "moments",
           "prep_tilings", "PrepTiling", "rawtma_configs", "RAW_MAX_RATIO",
           "moments_tilings", "MomentsTiling"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def is_available() -> bool:
    return INTERPRET or torch.cuda.is_available()


def unavailable_reason() -> str:
    return "the Triton backend needs a CUDA GPU (or TRITON_INTERPRET=1 for CPU tests)"


# ----------------------------------------------------------------------------------- kernels
@triton.jit
def _tile_of(pid, n_tm, n_tn, BM: tl.constexpr, BN: tl.constexpr):
    """(I, J) of the pid-th tile, row-major over I, among the BM x BN tiles of a d x d matrix
    that hold at least one entry with i <= j: row block I keeps J >= (BM * I) // BN."""
    ti = pid * 0
    rem = pid
    while rem >= n_tn - (BM * ti) // BN:
        rem -= n_tn - (BM * ti) // BN
        ti += 1
    return ti, (BM * ti) // BN + rem


@triton.jit
def _gram_kernel(X, Y, IDX, OFF, SHIFT, SX, XTX, XTY,
                 d, k, F, n_tm, n_tn,
                 s_xb, s_xr, s_xd, s_yr, s_yk,
                 BM: tl.constexpr, BN: tl.constexpr, BLOCK_R: tl.constexpr, KP: tl.constexpr,
                 GATHER: tl.constexpr, SHIFT_IN: tl.constexpr, DIAG_STATS: tl.constexpr):
    pid = tl.program_id(0)
    bf = tl.program_id(1)
    b = bf // F
    f = bf % F
    ti, tj = _tile_of(pid, n_tm, n_tn, BM, BN)
    r0 = tl.load(OFF + f)
    r1 = tl.load(OFF + f + 1)

    ci = ti * BM + tl.arange(0, BM)
    cj = tj * BN + tl.arange(0, BN)
    mi = ci < d
    mj = cj < d
    kk = tl.arange(0, KP)
    mk = kk < k
    xb = X + b.to(tl.int64) * s_xb
    if SHIFT_IN:
        shi = tl.load(SHIFT + b * d + ci, mask=mi, other=0.0)
        shj = tl.load(SHIFT + b * d + cj, mask=mj, other=0.0)
    # the first kept tile of each row block also sums Σx and XᵀY for the block's columns
    owner = tj == (BM * ti) // BN

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc_s = tl.zeros((BM,), dtype=tl.float32)
    acc_y = tl.zeros((BM, KP), dtype=tl.float32)
    for r in range(r0, r1, BLOCK_R):
        rr = r + tl.arange(0, BLOCK_R)
        mr = rr < r1
        if GATHER:
            rows = tl.load(IDX + rr, mask=mr, other=0).to(tl.int64)
        else:
            rows = rr.to(tl.int64)
        mri = mr[:, None] & mi[None, :]
        mrj = mr[:, None] & mj[None, :]
        xi = tl.load(xb + rows[:, None] * s_xr + ci[None, :] * s_xd, mask=mri, other=0.0)
        xj = tl.load(xb + rows[:, None] * s_xr + cj[None, :] * s_xd, mask=mrj, other=0.0)
        if SHIFT_IN:
            xi32 = tl.where(mri, xi.to(tl.float32) - shi[None, :], 0.0)
            xj32 = tl.where(mrj, xj.to(tl.float32) - shj[None, :], 0.0)
            acc = tl.dot(tl.trans(xi32.to(tl.float16)), xj32.to(tl.float16), acc)
        else:
            xi32 = xi.to(tl.float32)
            acc = tl.dot(tl.trans(xi), xj, acc)
        if DIAG_STATS:
            if owner:
                acc_s += tl.sum(xi32, axis=0)
                yv = tl.load(Y + rows[:, None] * s_yr + kk[None, :] * s_yk,
                             mask=mr[:, None] & mk[None, :], other=0.0)
                acc_y = tl.dot(tl.trans(xi32), yv, acc_y, input_precision="ieee")

    # this chunk's Gram goes to a float32 buffer G (B*F, d, d), added into the float64 totals
    # afterwards: a float64 read-modify-write here would need ~4x the registers and spill.
    # Entries with i <= j go to (i, j), entries with i < j also to (j, i): every entry of G is
    # written exactly once (no zeroing needed) and G is exactly symmetric.
    base = XTX + bf.to(tl.int64) * d * d
    upper = ci[:, None] <= cj[None, :]
    tl.store(base + ci[:, None] * d + cj[None, :], acc, mask=mi[:, None] & mj[None, :] & upper)
    if tj * BN + BN - 1 > ti * BM:      # the tile has entries strictly above the diagonal
        tl.store(base + cj[:, None] * d + ci[None, :], tl.trans(acc),
                 mask=mj[:, None] & mi[None, :] & (cj[:, None] > ci[None, :]))
    if DIAG_STATS:
        if owner:
            ps = SX + bf.to(tl.int64) * d + ci
            tl.store(ps, tl.load(ps, mask=mi, other=0.0) + acc_s.to(tl.float64), mask=mi)
            py = XTY + bf.to(tl.int64) * d * k + ci[:, None] * k + kk[None, :]
            my = mi[:, None] & mk[None, :]
            tl.store(py, tl.load(py, mask=my, other=0.0) + acc_y.to(tl.float64), mask=my)


@triton.jit
def _prep_kernel(X, Y, IDX, OFF, OFFP, SHIFT, XS, OUT,
                 d, d_pad, k, F, rows_tot, rows_per_split,
                 s_xb, s_xr, s_xd, s_yr, s_yk,
                 BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, KP: tl.constexpr,
                 GATHER: tl.constexpr, NS: tl.constexpr = 1):
    """Pre-shift pass of the "preshift" mode: XS[b, OFFP[f] + q, :] = fp16(x - c) for the q-th
    kept row of fold f (rows in fold order, test rows dropped), zero rows up to the padded end
    OFFP[f + 1] and zero columns up to d_pad, so the Gram kernel needs no masks. Also
    OUT[split, b, f, j, :] = [Σ(x-c), Σ(x-c)·y_0 ..] (float32, exact x - c) over its rows."""
    pid_n = tl.program_id(0)
    bf = tl.program_id(1)
    sp = tl.program_id(2)
    b = bf // F
    f = bf % F
    r0 = tl.load(OFF + f)
    n_f = tl.load(OFF + f + 1) - r0
    p0 = tl.load(OFFP + f)
    n_p = tl.load(OFFP + f + 1) - p0
    lo = sp * rows_per_split
    hi = tl.minimum(lo + rows_per_split, n_p)

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mc = cols < d
    mcp = cols < d_pad
    kk = tl.arange(0, KP)
    mk = kk < k
    sh = tl.load(SHIFT + b * d + cols, mask=mc, other=0.0)
    xb = X + b.to(tl.int64) * s_xb
    ob = XS + (b.to(tl.int64) * rows_tot + p0) * d_pad

    a_s = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    a_xy = tl.zeros((BLOCK_R, BLOCK_N, KP), dtype=tl.float32)
    for q in tl.range(lo, hi, BLOCK_R, num_stages=NS):   # NS > 1: loads ahead via cp.async
        qq = q + tl.arange(0, BLOCK_R)
        mr = qq < n_f
        if GATHER:
            rows = tl.load(IDX + r0 + qq, mask=mr, other=0).to(tl.int64)
        else:
            rows = (r0 + qq).to(tl.int64)
        mm = mr[:, None] & mc[None, :]
        x = tl.load(xb + rows[:, None] * s_xr + cols[None, :] * s_xd, mask=mm, other=0.0)
        xs = tl.where(mm, x.to(tl.float32) - sh[None, :], 0.0)
        tl.store(ob + qq[:, None].to(tl.int64) * d_pad + cols[None, :], xs.to(tl.float16),
                 mask=(qq < hi)[:, None] & mcp[None, :])
        yv = tl.load(Y + rows[:, None] * s_yr + kk[None, :] * s_yk,
                     mask=mr[:, None] & mk[None, :], other=0.0)
        a_s += xs
        a_xy += xs[:, :, None] * yv[:, None, :]

    W = 1 + KP
    o = OUT + ((sp * tl.num_programs(1) + bf).to(tl.int64) * d + cols) * W
    tl.store(o, tl.sum(a_s, axis=0), mask=mc)
    tl.store(o[:, None] + 1 + kk[None, :], tl.sum(a_xy, axis=0), mask=mc[:, None] & mk[None, :])


@triton.jit
def _store_gram_tile(G, acc, bf, ti, tj, d, BM: tl.constexpr, BN: tl.constexpr,
                     ACC: tl.constexpr = False):
    """Write the i <= j part of a float32 tile to (i, j) and the i < j part to (j, i) of the
    bf-th d x d matrix of G: every entry is written once and G is exactly symmetric.
    ACC: G holds the float64 totals and the tile is added into them (no float32 chunk Gram, no
    separate add pass; each entry belongs to exactly one tile, so there is no race)."""
    ci = ti * BM + tl.arange(0, BM)
    cj = tj * BN + tl.arange(0, BN)
    mi = ci < d
    mj = cj < d
    base = G + bf.to(tl.int64) * d * d
    upper = ci[:, None] <= cj[None, :]
    m = mi[:, None] & mj[None, :] & upper
    p = base + ci[:, None].to(tl.int64) * d + cj[None, :]
    if ACC:
        tl.store(p, tl.load(p, mask=m, other=0.0) + acc.to(tl.float64), mask=m)
    else:
        tl.store(p, acc, mask=m)
    if tj * BN + BN - 1 > ti * BM:      # the tile has entries strictly above the diagonal
        mt = mj[:, None] & mi[None, :] & (cj[:, None] > ci[None, :])
        pt = base + cj[:, None].to(tl.int64) * d + ci[None, :]
        if ACC:
            tl.store(pt, tl.load(pt, mask=mt, other=0.0) + tl.trans(acc).to(tl.float64), mask=mt)
        else:
            tl.store(pt, tl.trans(acc), mask=mt)


@triton.jit
def _gram_pre_kernel(XS, OFFP, G, d, d_pad, rows_tot, F, n_tm, n_tn,
                     BM: tl.constexpr, BN: tl.constexpr, BLOCK_R: tl.constexpr,
                     ACC: tl.constexpr = False):
    """Plain Gram of the pre-shifted, padded fp16 copy (see _prep_kernel): fold f of layer b
    is the contiguous row range [OFFP[f], OFFP[f+1]) (a multiple of BLOCK_R) and columns are
    padded with zeros to d_pad (a multiple of BM and BN), so no load is masked."""
    pid = tl.program_id(0)
    bf = tl.program_id(1)
    b = bf // F
    f = bf % F
    ti, tj = _tile_of(pid, n_tm, n_tn, BM, BN)
    p0 = tl.load(OFFP + f)
    p1 = tl.load(OFFP + f + 1)
    rr = tl.arange(0, BLOCK_R).to(tl.int64)
    base = XS + b.to(tl.int64) * rows_tot * d_pad
    pa = base + (p0 + rr)[:, None] * d_pad + (ti * BM + tl.arange(0, BM))[None, :]
    pb = base + (p0 + rr)[:, None] * d_pad + (tj * BN + tl.arange(0, BN))[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r in range(p0, p1, BLOCK_R):
        a = tl.load(pa)
        c = tl.load(pb)
        acc = tl.dot(tl.trans(a), c, acc)
        pa += BLOCK_R * d_pad
        pb += BLOCK_R * d_pad
    _store_gram_tile(G, acc, bf, ti, tj, d, BM, BN, ACC)


@triton.jit
def _gram_tma_kernel(DA, DB, OFFP, G, d, rows_tot, F, n_tm, n_tn,
                     BM: tl.constexpr, BN: tl.constexpr, BLOCK_R: tl.constexpr,
                     ACC: tl.constexpr = False):
    """As _gram_pre_kernel, loading through Hopper TMA tensor descriptors DA (block BLOCK_R x
    BM) and DB (BLOCK_R x BN) over the (B * rows_tot, d_pad) view of the pre-shifted copy."""
    pid = tl.program_id(0)
    bf = tl.program_id(1)
    b = bf // F
    f = bf % F
    ti, tj = _tile_of(pid, n_tm, n_tn, BM, BN)
    p0 = tl.load(OFFP + f)
    p1 = tl.load(OFFP + f + 1)
    row0 = b * rows_tot
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r in range(p0, p1, BLOCK_R):
        a = DA.load([row0 + r, ti * BM])
        c = DB.load([row0 + r, tj * BN])
        acc = tl.dot(tl.trans(a), c, acc)
    _store_gram_tile(G, acc, bf, ti, tj, d, BM, BN, ACC)


@triton.jit
def _gram_raw_tma_kernel(DA, DB, TA, TB, G, d, r, r0, nf, F, f, n_tm, n_tn,
                         BM: tl.constexpr, BN: tl.constexpr, BLOCK_R: tl.constexpr):
    """Gram of the RAW fp16 rows [r0, r0 + nf) of every layer b (fold f, "rawtma" mode), read
    in place. Whole BLOCK_R-row blocks stream through DA / DB, TMA descriptors (blocks
    BLOCK_R x BM / BN) over the contiguous chunk viewed as (B * r, d); the last, shorter block
    through TA / TB, 3-D descriptors (blocks 1 x BLOCK_R x BM / BN) over just the fold's rows
    (B, nf, d), so TMA zero-fills past the fold's end instead of reading the next fold's rows
    (masked pointer loads there made the kernel spill registers on sm_90). TMA also zero-fills
    columns >= d. Writes float32 tile (I, J) of matrix b * F + f of G."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    ti, tj = _tile_of(pid, n_tm, n_tn, BM, BN)
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
    _store_gram_tile(G, acc, b * F + f, ti, tj, d, BM, BN)


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
    fix = (s_i[:, None] * c_j[None, :] + c_i[:, None] * s_j[None, :]) - n * (c_i[:, None] * c_j[None, :])
    tl.store(XTX + off, x + (g - fix), mask=m)


@triton.jit
def _moments_kernel(X, Y, IDX, OFF, SHIFT, OUT,
                    m, k, F, rows_per_split,
                    s_xb, s_xr, s_xd, s_yr, s_yk,
                    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, KP: tl.constexpr,
                    GATHER: tl.constexpr, SQUARES: tl.constexpr, NS: tl.constexpr = 1):
    """OUT[split, b, f, j, :] = [Σx, Σx², Σx·y_0 .. Σx·y_{KP-1}] (float32) over one row range.
    NS > 1 software-pipelines the row loop: NS - 1 row blocks are loaded ahead (cp.async into
    shared memory), for more bytes in flight than one block per program."""
    pid_n = tl.program_id(0)
    bf = tl.program_id(1)
    sp = tl.program_id(2)
    b = bf // F
    f = bf % F
    r0 = tl.load(OFF + f)
    r1 = tl.load(OFF + f + 1)
    lo = r0 + sp * rows_per_split
    hi = tl.minimum(lo + rows_per_split, r1)

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mc = cols < m
    kk = tl.arange(0, KP)
    mk = kk < k
    sh = tl.load(SHIFT + b * m + cols, mask=mc, other=0.0)
    xb = X + b.to(tl.int64) * s_xb

    a_s = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    a_ss = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    a_xy = tl.zeros((BLOCK_R, BLOCK_N, KP), dtype=tl.float32)
    for r in tl.range(lo, hi, BLOCK_R, num_stages=NS):
        rr = r + tl.arange(0, BLOCK_R)
        mr = rr < hi
        if GATHER:
            rows = tl.load(IDX + rr, mask=mr, other=0).to(tl.int64)
        else:
            rows = rr.to(tl.int64)
        mm = mr[:, None] & mc[None, :]
        x = tl.load(xb + rows[:, None] * s_xr + cols[None, :] * s_xd, mask=mm, other=0.0)
        x = tl.where(mm, x.to(tl.float32) - sh[None, :], 0.0)
        yv = tl.load(Y + rows[:, None] * s_yr + kk[None, :] * s_yk,
                     mask=mr[:, None] & mk[None, :], other=0.0)
        a_s += x
        if SQUARES:
            a_ss += x * x
        a_xy += x[:, :, None] * yv[:, None, :]

    W = 2 + KP
    ob = OUT + ((sp * tl.num_programs(1) + bf).to(tl.int64) * m + cols) * W
    tl.store(ob, tl.sum(a_s, axis=0), mask=mc)
    tl.store(ob + 1, tl.sum(a_ss, axis=0), mask=mc)
    pxy = ob[:, None] + 2 + kk[None, :]
    tl.store(pxy, tl.sum(a_xy, axis=0), mask=mc[:, None] & (kk[None, :] < KP))


# ----------------------------------------------------------------------------------- configs
class GramConfig(tuple):
    """(BM, BN, BLOCK_R, num_warps, num_stages, fused): output tile BM x BN, rows per step
    BLOCK_R; fused: Σx and XᵀY in the Gram kernel (else in the moments kernel, one more read
    of X but fewer registers in the Gram kernel)."""

    def __new__(cls, bm, bn, block_r, warps, stages, fused=True):
        return super().__new__(cls, (bm, bn, block_r, warps, stages, bool(fused)))


def gram_configs() -> list[GramConfig]:
    """Candidate tilings for H100/H200 tensor cores, best guess first (chosen from the sm_90
    compiler's register report: these keep the main loop free of spills), then a small tiling
    for small d; one tiny tiling for the interpreter."""
    if INTERPRET:
        return [GramConfig(16, 32, 16, 1, 1, True)]
    return [GramConfig(128, 128, 32, 8, 4, True), GramConfig(128, 128, 64, 8, 3, False),
            GramConfig(128, 128, 32, 8, 4, False), GramConfig(128, 256, 32, 8, 3, False),
            GramConfig(64, 64, 64, 4, 3, False)]


_TUNED: dict = {}
TUNE_LOG: dict = {}   # (d, device, shift_in_kernel) -> {config: median ms}


def _default_config(d: int) -> GramConfig:
    if INTERPRET:
        return gram_configs()[0]
    if d <= 256:
        return GramConfig(64, 64, 64, 4, 3, False)
    return GramConfig(128, 128, 32, 8, 4, True)


def tune_gram(d: int, device, B: int = 2, rows: int = 4096, configs=None, shift_in_kernel=True,
              verbose=False) -> GramConfig:
    """Time each candidate config on scratch outputs (never on real statistics) and remember the
    fastest for this (d, device). Returns it."""
    if INTERPRET:
        return _default_config(d)
    from triton.testing import do_bench

    configs = list(configs or gram_configs())
    X = torch.randn(B, rows, d, device=device).to(torch.float16)
    Y = torch.randn(rows, 2, device=device)
    best, best_t = None, float("inf")
    timings = {}
    for cfg in configs:
        outs = _scratch(B, 1, d, 2, device)
        try:
            t = do_bench(lambda: _launch_gram(X, Y, None, None, outs, cfg, shift_in_kernel, cfg[5],
                                              with_moments=True),
                         warmup=5, rep=30, return_mode="median")
        except Exception as exc:  # noqa: BLE001 - a config may not fit this card (shared memory)
            if verbose:
                print(f"  config {tuple(cfg)} failed: {type(exc).__name__}: {exc}")
            continue
        timings[tuple(cfg)] = t
        if verbose:
            print(f"  config {tuple(cfg)}: {t:.3f} ms")
        if t < best_t:
            best, best_t = cfg, t
    if best is None:
        best = _default_config(d)
    _TUNED[(d, str(device), shift_in_kernel)] = best
    TUNE_LOG[(d, str(device), shift_in_kernel)] = timings
    return best


def _scratch(B, F, d, k, device):
    z = dict(dtype=torch.float64, device=device)
    return (torch.zeros(B, d, dtype=torch.float32, device=device), torch.zeros(B * F, d, **z),
            torch.empty(B * F, d, d, dtype=torch.float32, device=device),
            torch.zeros(B * F, d, k, **z))


def _kp(k: int) -> int:
    return max(16, triton.next_power_of_2(max(k, 1)))


def _launch_gram(X, Y, idx, off, outs, cfg, shift_in_kernel, diag_stats, with_moments=False):
    """Run the Gram kernel. outs = (shift32 (B, d), sx (B*F, d) float64 (added to),
    g32 (B*F, d, d) float32 (overwritten with this chunk's Gram), xty (B*F, d, k) float64
    (added to)). ``with_moments`` (tuning only): also run the moments kernel when not fused."""
    shift, sx, xtx, xty = outs
    B, r, d = X.shape
    k = Y.shape[1]
    if off is None:
        off = torch.tensor([0, r], dtype=torch.int32, device=X.device)
        gather = False
        idx = off  # unused
    else:
        gather = True
    F = off.numel() - 1
    bm, bn, block_r, warps, stages = cfg[:5]
    n_tm, n_tn = triton.cdiv(d, bm), triton.cdiv(d, bn)
    n_prog = sum(n_tn - (bm * i) // bn for i in range(n_tm))
    grid = (n_prog, B * F)
    _gram_kernel[grid](X, Y, idx, off, shift, sx, xtx, xty,
                       d, k, F, n_tm, n_tn,
                       X.stride(0), X.stride(1), X.stride(2), Y.stride(0), Y.stride(1),
                       BM=bm, BN=bn, BLOCK_R=block_r, KP=_kp(k), GATHER=gather,
                       SHIFT_IN=bool(shift_in_kernel), DIAG_STATS=bool(diag_stats),
                       num_warps=warps, num_stages=stages)
    if with_moments and not diag_stats:
        moments(X, Y, shift, squares=False)


class PreConfig(tuple):
    """Tiling of the "preshift" mode: (BM, BN, BLOCK_R, num_warps, num_stages, tma): output tile
    BM x BN, rows per step BLOCK_R (= the padding unit of each fold's rows), TMA descriptor
    loads (Hopper) or plain pointer loads."""

    def __new__(cls, bm, bn, block_r, warps, stages, tma=False):
        return super().__new__(cls, (bm, bn, block_r, warps, stages, bool(tma)))


def preshift_configs() -> list[PreConfig]:
    """Candidates for H100/H200, best guess first (sm_90 compile check: no spills, HGMMA)."""
    if INTERPRET:
        return [PreConfig(16, 32, 16, 1, 1, False)]
    return [PreConfig(128, 256, 64, 8, 3, True), PreConfig(128, 256, 64, 8, 4, True),
            PreConfig(128, 128, 64, 8, 4, True), PreConfig(128, 128, 128, 8, 3, True),
            PreConfig(256, 128, 64, 8, 3, True), PreConfig(128, 128, 64, 8, 3, False)]


def rawtma_configs() -> list[PreConfig]:
    """Tilings the GPU bench tries for "rawtma" (always TMA loads; the tma flag is ignored):
    the TMA tilings of preshift_configs() (the interpreter's tiny one on CPU)."""
    return [c for c in preshift_configs() if c[5]] or preshift_configs()[:1]


# pointer-load tiling used when TMA descriptors fail on this Triton/driver (no spills on sm_90)
_PTR_FALLBACK = PreConfig(128, 128, 64, 8, 3, False)


def _default_pre_config(d: int) -> PreConfig:
    if INTERPRET:
        return preshift_configs()[0]
    if d <= 256:
        return PreConfig(64, 64, 64, 4, 3, False)
    return preshift_configs()[0]


def tune_preshift(d: int, device, B: int = 2, rows: int = 8192, configs=None, verbose=False):
    """Time each preshift tiling on scratch statistics; remember and return the fastest."""
    if INTERPRET:
        return _default_pre_config(d)
    from triton.testing import do_bench

    from probes.stats import GramStats

    X = torch.randn(B, rows, d, device=device).to(torch.float16)
    Y = torch.randn(rows, 2, device=device)
    best, best_t, timings = None, float("inf"), {}
    for cfg in list(configs or preshift_configs()):
        st = GramStats.zeros(B, d, 2, device=device)
        try:
            t = do_bench(lambda: gram_update(st, X, Y, mode="preshift", config=cfg),
                         warmup=5, rep=30, return_mode="median")
        except Exception as exc:  # noqa: BLE001 - a config may not fit this card
            if verbose:
                print(f"  preshift {tuple(cfg)} failed: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        timings[tuple(cfg)] = t
        if verbose:
            print(f"  preshift {tuple(cfg)}: {t:.3f} ms")
        if t < best_t:
            best, best_t = cfg, t
    best = best or _default_pre_config(d)
    _TUNED[(d, str(device), "preshift")] = best
    TUNE_LOG[(d, str(device), "preshift")] = timings
    return best


class PrepTiling(tuple):
    """Tiling of the pre-shift pass: BLOCK_N columns x BLOCK_R rows per step (BLOCK_R for up to
    four targets, fewer rows for more targets so BLOCK_R x targets stays bounded), warps, at
    most ``rows`` rows per program (more programs, shorter ones), and ``stages`` of the row loop
    (> 1: row blocks loaded ahead through cp.async)."""

    def __new__(cls, bn, br, warps, rows, stages=1):
        return super().__new__(cls, (int(bn), int(br), int(warps), int(rows), int(stages)))


def prep_tilings() -> list[PrepTiling]:
    """Candidates the GPU bench times (the first is the default). On an H200 the default moved
    21 GB in 12.5 ms (40 % of the copy ceiling); 64-row steps on 8 warps with per-step row sums
    took 22.3 ms."""
    if INTERPRET:
        return [PrepTiling(16, 8, 1, 2048), PrepTiling(32, 4, 1, 16, 2)]
    # the pipelined ones compile for sm_90 without spills (bench/gpu_compile_check.py)
    return [PrepTiling(128, 16, 4, 2048), PrepTiling(256, 16, 8, 2048),
            PrepTiling(128, 32, 8, 2048), PrepTiling(64, 32, 4, 2048),
            PrepTiling(128, 16, 4, 512), PrepTiling(128, 8, 4, 2048),
            PrepTiling(128, 16, 4, 2048, 3), PrepTiling(256, 16, 8, 2048, 3),
            PrepTiling(128, 8, 4, 2048, 4)]


def _prep_tiling(B, F, d_pad, n_pad_max, device, KP=2, tiling=None):
    """(BLOCK_N, BLOCK_R, warps, splits, rows_per_split, stages) of the pre-shift pass: row
    splits so that the grid fills the card several times over."""
    # <= 181 registers on sm_90 without spills at the default (KP <= 4 at 16 rows; fewer rows
    # for more targets keep the (rows, BLOCK_N, KP) accumulator the same size)
    bn, br2, warps, rows_prog, stages = PrepTiling(*(tiling or prep_tilings()[0]))
    br = max(1, min(br2, (4 * br2) // KP))
    n_cb = triton.cdiv(d_pad, bn)
    sms = (torch.cuda.get_device_properties(device).multi_processor_count
           if device.type == "cuda" else 2)
    want = 16 * sms
    # many short programs: a grid of only ~1.5 waves of long programs left half the card idle
    # in its last wave
    splits = max(triton.cdiv(want, n_cb * B * F), triton.cdiv(max(n_pad_max, 1), rows_prog))
    splits = max(1, min(splits, triton.cdiv(max(n_pad_max, 1), 8 * br)))
    rps = triton.cdiv(triton.cdiv(max(n_pad_max, 1), splits), br) * br
    splits = max(1, triton.cdiv(max(n_pad_max, 1), rps))
    return bn, br, warps, splits, rps, stages


def _gram_preshift(X, Y32, idx, off, counts, shift32, cfg, groups: int = 1, into=None,
                   prep=None):
    """Pre-shift mode of one chunk: returns (g32 (B*F, d, d) float32, s_c (B, F, d) float64,
    xy_c (B, F, d, k) float64), all about the shift. ``into`` (a float64 (B*F, d, d) tensor,
    the totals): the Gram kernel adds its tiles into it directly and g32 is None.

    ``groups`` > 1: the layers go in that many groups; the pre-shift pass of group g+1 runs on a
    side stream while the Gram of group g runs (the Gram is compute-bound and leaves room on
    each SM for a pre-shift block), and the padded copy is held for two groups only."""
    B, r, d = X.shape
    k = Y32.shape[1]
    dev = X.device
    F = len(counts)
    bm, bn, block_r, warps, stages, tma = cfg
    unit = max(bm, bn)
    d_pad = triton.cdiv(d, unit) * unit
    cnt_pad = [triton.cdiv(int(c), block_r) * block_r for c in counts]
    offp_h = np.zeros(F + 1, dtype=np.int32)
    offp_h[1:] = np.cumsum(cnt_pad)
    rows_tot = int(offp_h[-1])
    offp = torch.from_numpy(offp_h).to(dev)
    gather = idx is not None
    if not gather:
        off = torch.tensor([0, r], dtype=torch.int32, device=dev)
        idx = off
    KP = triton.next_power_of_2(max(k, 1))
    groups = max(1, min(int(groups), B))
    gsz = triton.cdiv(B, groups)
    bounds = [(b0, min(B, b0 + gsz)) for b0 in range(0, B, gsz)]
    n_slots = min(2, len(bounds))
    slots = [torch.empty(gsz, rows_tot, d_pad, dtype=torch.float16, device=dev)
             for _ in range(n_slots)]
    prep = prep or _TUNED.get((d, str(dev), "prep"))
    pbn, pbr, pw, splits, rps, pns = _prep_tiling(gsz, F, d_pad, max(cnt_pad), dev, KP, prep)
    W = 1 + KP
    # per group a contiguous (splits, layers_in_group * F, d, W) block of float32 partial sums
    part = torch.empty(splits * B * F * d * W, dtype=torch.float32, device=dev)
    parts = [part[splits * b0 * F * d * W:splits * b1 * F * d * W].view(splits, (b1 - b0) * F, d, W)
             for b0, b1 in bounds]
    n_tm, n_tn = triton.cdiv(d, bm), triton.cdiv(d, bn)
    n_prog = sum(n_tn - (bm * i) // bn for i in range(n_tm))
    g32 = (torch.empty(B * F, d, d, dtype=torch.float32, device=dev) if into is None else into)
    acc = into is not None
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

    def prep(gi):
        b0, b1 = bounds[gi]
        XS = slots[gi % n_slots]
        pg = parts[gi]
        _prep_kernel[(triton.cdiv(d_pad, pbn), (b1 - b0) * F, splits)](
            X[b0:b1], Y32, idx, off, offp, shift32[b0:b1], XS, pg, d, d_pad, k, F, rows_tot, rps,
            X.stride(0), X.stride(1), X.stride(2), Y32.stride(0), Y32.stride(1),
            BLOCK_N=pbn, BLOCK_R=pbr, KP=KP, GATHER=gather, NS=pns, num_warps=pw)

    def gram(gi):
        b0, b1 = bounds[gi]
        XS = slots[gi % n_slots]
        grid = (n_prog, (b1 - b0) * F)
        gg = g32[b0 * F:b1 * F]
        if tma:
            xs2 = XS.view(gsz * rows_tot, d_pad)
            da = TensorDescriptor.from_tensor(xs2, [block_r, bm])
            db = TensorDescriptor.from_tensor(xs2, [block_r, bn])
            _gram_tma_kernel[grid](da, db, offp, gg, d, rows_tot, F, n_tm, n_tn,
                                   BM=bm, BN=bn, BLOCK_R=block_r, ACC=acc, num_warps=warps,
                                   num_stages=stages)
        else:
            _gram_pre_kernel[grid](XS, offp, gg, d, d_pad, rows_tot, F, n_tm, n_tn,
                                   BM=bm, BN=bn, BLOCK_R=block_r, ACC=acc, num_warps=warps,
                                   num_stages=stages)

    if len(bounds) == 1 or dev.type != "cuda":
        for gi in range(len(bounds)):
            prep(gi)
            gram(gi)
    else:
        main = torch.cuda.current_stream(dev)
        side = torch.cuda.Stream(device=dev, priority=-1)   # prep blocks first as SMs free up
        side.wait_stream(main)                       # inputs and buffers are ready
        prepped = [torch.cuda.Event() for _ in bounds]
        grammed = [torch.cuda.Event() for _ in bounds]
        for gi in range(len(bounds)):
            with torch.cuda.stream(side):
                if gi >= n_slots:                    # the slot's previous Gram must be done
                    side.wait_event(grammed[gi - n_slots])
                prep(gi)
                prepped[gi].record(side)
            main.wait_event(prepped[gi])
            gram(gi)
            grammed[gi].record(main)
        main.wait_stream(side)
        for t in slots + [part]:
            t.record_stream(side)
    del slots
    tot = torch.cat([p.to(torch.float64).sum(0) for p in parts]).view(B, F, d, W)
    return (None if acc else g32), tot[..., 0], tot[..., 1:1 + k]


# ----------------------------------------------------------------------------------- helpers
def _fold_index(fold, r: int, F: int, device):
    """Rows grouped by fold: (idx int32 (n_kept,), off int32 (F+1,), counts (F,), ranges) or
    (None, None, counts, ranges) when every row is in fold 0 (contiguous, no gather). ``ranges``:
    [(first_row, n_rows)] per fold when each fold's rows are one contiguous range of the chunk
    (what "rawtma" reads in place), else None."""
    if fold is None:
        return None, None, np.array([r], dtype=np.int64), [(0, r)]
    from probes.stats import fold_groups

    f = fold.detach().cpu().numpy() if isinstance(fold, torch.Tensor) else np.asarray(fold)
    order, counts, off = fold_groups(f, F)
    if order is None:
        return None, None, counts, [(0, r)]
    # order lists each fold's rows ascending: a fold is contiguous iff first + count - 1 == last
    ranges = [(int(order[a]) if c else 0, int(c)) for a, c in zip(off[:-1], counts)]
    if any(c and order[a + c - 1] - order[a] + 1 != c for a, c in zip(off[:-1], counts)):
        ranges = None
    return (torch.from_numpy(order).to(device),
            torch.from_numpy(off.astype(np.int32)).to(device), counts, ranges)


#: "rawtma" multiplies raw fp16 values and centres the float32 sums in float64 afterwards, which
#: magnifies their float32 rounding by Σx² / Σ(x - x̄)² of the column (1 + mean² / variance).
#: Chunks with any column above this bound (|mean| > ~16 standard deviations, or a constant
#: column) go through "preshift" instead; at the bound the centred Gram keeps about the accuracy
#: of preshift's fp16 rounding of x - c. Real SmolLM2 world_place layers: at most 143.
RAW_MAX_RATIO = 256.0


def _counts(counts, device):
    """Per-fold row counts (F,) as a float64 tensor on the device."""
    return torch.as_tensor(np.asarray(counts, dtype=np.float64), device=device)


def _raw_accurate(counts, s_c, q_c, shift) -> bool:
    """The accuracy guard of "rawtma" (see RAW_MAX_RATIO) from a chunk's column moments about
    the shift c: s_c = Σ(x - c), q_c = Σ(x - c)² (B, F, d) float64; folds without rows skipped."""
    n = _counts(counts, s_c.device).view(1, -1, 1)
    c = shift.to(torch.float64).unsqueeze(1)
    live = n > 0
    spread = q_c - s_c * s_c / n.clamp(min=1)                   # Σ(x - x̄)²
    raw_sq = q_c + 2 * c * s_c + n * c * c                        # Σx²
    ok = (spread > 0) & (raw_sq <= RAW_MAX_RATIO * spread)
    return bool((ok | ~live).all())


ADD_BLOCK = 32    # tile of _add_centred_kernel: 64 x 64 float64 tiles spill on sm_90


def _add_centred(xtx, g32, s_raw, shift, counts):
    """xtx (B*F, d, d) float64 += g32 - (s cᵀ + c sᵀ) + n c cᵀ (see _add_centred_kernel);
    s_raw (B*F, d) float64 raw Σx of the chunk, shift (B, d), counts (F,)."""
    BF, d, _ = xtx.shape
    F = len(counts)
    c = shift.to(torch.float64).contiguous()
    blk = 16 if INTERPRET else ADD_BLOCK
    # no fused multiply-add: fma(s_i, c_j, c_i * s_j) rounds the two products differently for
    # (i, j) and (j, i), and the totals must stay exactly symmetric
    _add_centred_kernel[(triton.cdiv(d, blk), triton.cdiv(d, blk), BF)](
        xtx, g32, s_raw.contiguous(), c, _counts(counts, xtx.device), d, F, BLOCK=blk,
        num_warps=4, enable_fp_fusion=False)


def _tma_ready(X) -> bool:
    """A chunk TMA can read in place as (B * r, d): contiguous, rows 16-byte aligned."""
    return X.is_contiguous() and X.shape[2] % 8 == 0 and X.data_ptr() % 16 == 0


def _rawtma_sums(X, Y32, shift32, fold, F):
    """Σ(x - c), Σ(x - c)², Σ(x - c)yᵀ (B, F, d[, k]) float64 for rawtma, from this module's
    moments kernel or, when the GPU bench measured it faster here (_TUNED "rawtma_sums"), the
    CUDA module's (67 % of the H200's copy ceiling against 19 % for the first Triton tilings)."""
    B, r, d = X.shape
    if _TUNED.get((d, str(X.device), "rawtma_sums")) == "cuda":
        from probes.kernels import cuda as ck

        z = dict(dtype=torch.float64, device=X.device)
        sx, sxx = torch.zeros(B, F, d, **z), torch.zeros(B, F, d, **z)
        sxy = torch.zeros(B, F, d, Y32.shape[1], **z)
        ck.moments(X, Y32.contiguous(), shift32, sx, sxy, sxx, fold=fold, n_folds=F)
        return sx, sxx, sxy
    return moments(X, Y32, shift32, fold=fold, n_folds=F, squares=True)


def _gram_rawtma(stats, X, Y32, Yd, fold, idx, counts, ranges, shift32, cfg) -> bool:
    """"rawtma" mode for one chunk (see gram_update). Returns False, having added nothing,
    when the chunk fails the accuracy guard (the caller then uses preshift). ``idx``, ``ranges``:
    from _fold_index (the kept rows in fold order, None when all rows are fold 0; each fold's
    contiguous row range, None when the folds interleave)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    F = len(counts)
    fold_k = fold                      # the fold ids of the rows the kernels read
    if ranges is None or not _tma_ready(X):
        if idx is not None:
            # folds interleaved (test rows among train rows, k-fold ids): one gather copy puts
            # each fold's rows together and drops skipped rows, as the pre-shift pass would
            X = X.index_select(1, idx.long())
            Y32 = Y32.index_select(0, idx.long())
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            ranges = [(int(a), int(c)) for a, c in zip(starts, counts)]
            fold_k = None if F == 1 else torch.repeat_interleave(
                torch.arange(F, dtype=torch.int32, device=X.device),
                torch.as_tensor(counts, device=X.device))
        else:                          # every row in fold 0, but a strided or unaligned view
            X = X.contiguous() if not X.is_contiguous() else X.clone()
            ranges, fold_k = [(0, X.shape[1])], None
    B, r, d = X.shape
    sx_c, sxx_c, sxy_c = _rawtma_sums(X, Y32, shift32, fold_k, F)
    # the kernels subtract the shift rounded to float32 (as in every mode; choose_shift gives
    # float32-exact shifts), so the raw sums are rebuilt about that same value
    c32 = shift32.to(torch.float64)
    if not _raw_accurate(counts, sx_c, sxx_c, c32):
        return False
    bm, bn, block_r, warps, stages = cfg[:5]
    n_tm, n_tn = triton.cdiv(d, bm), triton.cdiv(d, bn)
    n_prog = sum(n_tn - (bm * i) // bn for i in range(n_tm))
    X2 = X.view(B * r, d)
    da = TensorDescriptor.from_tensor(X2, [block_r, bm])
    db = TensorDescriptor.from_tensor(X2, [block_r, bn])
    g32 = torch.empty(B * F, d, d, dtype=torch.float32, device=X.device)
    for f, (r0, nf) in enumerate(ranges):
        if nf == 0:
            g32.view(B, F, d, d)[:, f].zero_()
            continue
        Xf = X[:, r0:r0 + nf]
        ta = TensorDescriptor(Xf, list(Xf.shape), list(Xf.stride()), [1, block_r, bm])
        tb = TensorDescriptor(Xf, list(Xf.shape), list(Xf.stride()), [1, block_r, bn])
        _gram_raw_tma_kernel[(n_prog, B)](da, db, ta, tb, g32, d, r, r0, nf, F, f, n_tm, n_tn,
                                          BM=bm, BN=bn, BLOCK_R=block_r, num_warps=warps,
                                          num_stages=stages)
    s_raw = sx_c + _counts(counts, X.device).view(1, F, 1) * c32.unsqueeze(1)
    _add_centred(stats.xtx.view(B * F, d, d), g32, s_raw.view(B * F, d), c32, counts)
    del g32
    stats.sx += sx_c
    stats.xty += sxy_c
    stats.add_targets(Yd, fold, counts)
    return True


def _check_x(X, d_expected=None):
    if not isinstance(X, torch.Tensor):
        X = torch.as_tensor(np.asarray(X))
    if X.dtype != torch.float16:
        raise ValueError(f"the triton backend needs float16 activations, got {X.dtype}")
    if not INTERPRET and X.device.type != "cuda":
        raise ValueError(f"the triton backend needs CUDA tensors, got X on {X.device}")
    if X.stride(-1) != 1:
        X = X.contiguous()
    return X


# ----------------------------------------------------------------------------------- public
MODES = ("preshift", "rawtma", "shift-in", "raw")
#: how many chunks took each path of gram_update in this process (rawtma hands a chunk to
#: preshift when its accuracy guard refuses it): the bench and the tests read it
PATHS: collections.Counter = collections.Counter()


def gram_update(stats, X, Y, fold=None, precision=None, shift_in_kernel: bool | None = None,
                config=None, mode: str | None = None, groups: int | None = None,
                fused_add: bool = False, prep=None):
    """Add X (B, r, d) fp16, Y (r, k), fold (r,) (-1 = skip) into ``stats`` (float64, same device).

    ``mode`` (see the module docstring): "preshift" (default) writes a shifted, fold-ordered,
    padded fp16 copy of the chunk and runs a plain Gram on it; "rawtma" reads the raw chunk in
    place through TMA and centres in float64 (in place when each fold's rows are contiguous, else
    after one gather copy; d a multiple of 8; chunks that fail its accuracy guard go through
    preshift); "shift-in" subtracts the shift
    inside the Gram kernel; "raw" multiplies raw values and moves the chunk to the shift in
    float64 afterwards. ``shift_in_kernel`` (older spelling): True = "shift-in", False = "raw".
    ``groups`` (preshift): pipeline the pre-shift pass of the next group of layers with the Gram
    of this one on two streams (default: the tuned value for this d, else 1).
    ``fused_add`` (preshift): the Gram kernel adds its float32 tiles straight into the float64
    totals instead of writing a float32 chunk Gram that a second pass adds (the default: on an
    H200 the float64 read-modify-write in the epilogue, tensor cores idle, cost 58.8 ms against
    53.4 ms for the separate add at 32 x 40000 x 4096).
    ``prep`` (preshift): a PrepTiling for the pre-shift pass (default: the tuned one for this d,
    else ``prep_tilings()[0]``).
    ``config``: a PreConfig (preshift) or GramConfig (the other modes; a GramConfig alone
    selects "shift-in"); default: the tuned one for this d if ``tune_*`` ran, else a fixed
    sensible tiling.
    """
    from probes.stats import validate_chunk

    if precision not in (None, "float32"):
        raise ValueError(f"the triton backend sums each chunk in float32 (into float64 totals); "
                         f"precision={precision!r} needs backend='torch' or 'cpu'")
    r, k = validate_chunk(stats, X, Y, fold)
    X = _check_x(X)
    dev = stats.device
    if X.device != dev:
        raise ValueError(f"X is on {X.device} but the statistics are on {dev}")
    B, _, d = X.shape
    F = stats.n_folds
    Yd = (Y if isinstance(Y, torch.Tensor) else torch.from_numpy(np.asarray(Y)))
    Yd = Yd.to(device=dev, dtype=torch.float64).reshape(r, k)
    idx, off, counts, ranges = _fold_index(fold, r, F, dev)
    if r == 0 or counts.sum() == 0:
        return stats
    Y32 = Yd.to(torch.float32).contiguous()
    shift32 = stats.shift.to(torch.float32).contiguous()
    defaulted = mode is None and shift_in_kernel is None and config is None
    if mode is None:
        if shift_in_kernel is not None:
            mode = "shift-in" if shift_in_kernel else "raw"
        elif isinstance(config, GramConfig):
            mode = "shift-in"
        else:
            mode = _TUNED.get((d, str(dev), "mode"), "preshift")
    if mode not in MODES:
        raise ValueError(f"unknown triton Gram mode {mode!r}; one of {MODES}")
    defaulted_to_raw = mode == "rawtma" and defaulted   # tuned default, not asked for by name
    for name in ("sx", "xtx", "xty"):
        if not getattr(stats, name).is_contiguous():
            setattr(stats, name, getattr(stats, name).contiguous())
    if mode == "rawtma":
        usable = X.shape[2] % 8 == 0
        if not usable and not defaulted_to_raw:
            raise ValueError("mode='rawtma' needs d a multiple of 8 (TMA reads 16-byte aligned "
                             "rows); use mode='preshift'")
        if usable:
            cfg = PreConfig(*(config or _TUNED.get((d, str(dev), "rawtma"))
                              or _default_pre_config(d)))
            try:
                if _gram_rawtma(stats, X, Y32, Yd, fold, idx, counts, ranges, shift32, cfg):
                    PATHS["rawtma"] += 1
                    return stats
                PATHS["rawtma refused by the accuracy guard: preshift"] += 1
            except Exception as exc:  # noqa: BLE001 - e.g. no TMA on this card: use preshift
                if (not defaulted_to_raw or INTERPRET
                        or isinstance(exc, torch.cuda.OutOfMemoryError)):
                    raise
                PATHS["rawtma failed: preshift"] += 1
                import warnings

                warnings.warn(f"triton rawtma Gram failed ({type(exc).__name__}: {exc}); "
                              f"using preshift for d={d} from now on", RuntimeWarning)
                _TUNED[(d, str(dev), "mode")] = "preshift"
        else:
            PATHS["rawtma unusable (d % 8): preshift"] += 1
        # the accuracy guard refused this chunk (or d does not suit TMA): preshift
        mode, config = "preshift", None
    if mode == "preshift":
        key = (d, str(dev), "preshift")
        cfg = PreConfig(*(config or _TUNED.get(key) or _default_pre_config(d)))
        ng = groups or _TUNED.get(key + ("groups",), 1)
        into = stats.xtx.view(B * F, d, d) if fused_add else None
        try:
            try:
                g32, s_c, xy_c = _gram_preshift(X, Y32, idx, off, counts, shift32, cfg, ng, into,
                                                prep)
            except Exception:  # noqa: BLE001 - TMA descriptors unsupported here: pointer loads
                if config is not None or not cfg[5] or INTERPRET:
                    raise
                _TUNED[key] = _PTR_FALLBACK
                g32, s_c, xy_c = _gram_preshift(X, Y32, idx, off, counts, shift32,
                                                _PTR_FALLBACK, ng, into, prep)
        except Exception as exc:  # noqa: BLE001 - last resort for the default: the older mode
            if not defaulted or INTERPRET or isinstance(exc, torch.cuda.OutOfMemoryError):
                raise
            import warnings

            warnings.warn(f"triton preshift Gram failed ({type(exc).__name__}: {exc}); "
                          f"using the shift-in kernel for d={d} from now on", RuntimeWarning)
            _TUNED[(d, str(dev), "mode")] = "shift-in"
            return gram_update(stats, X, Y, fold, precision=precision, mode="shift-in")
        if g32 is not None:
            stats.xtx.view(B * F, d, d).add_(g32)
            del g32
        stats.sx += s_c
        stats.xty += xy_c
        stats.add_targets(Yd, fold, counts)
        PATHS["preshift"] += 1
        return stats
    shift_in_kernel = mode == "shift-in"
    cfg = config or _TUNED.get((d, str(dev), bool(shift_in_kernel))) or _default_config(d)
    fused = bool(cfg[5]) if len(cfg) > 5 else True
    # this chunk's sums about the kernel's shift (c, or 0 for raw products): float32 Gram,
    # float64 Σx and Σxyᵀ
    shift_k = shift32 if shift_in_kernel else torch.zeros_like(shift32)
    g32 = torch.empty(B * F, d, d, dtype=torch.float32, device=dev)
    s_c = torch.zeros(B * F, d, dtype=torch.float64, device=dev)
    xy_c = torch.zeros(B * F, d, k, dtype=torch.float64, device=dev)
    _launch_gram(X, Y32, idx, off, (shift_k, s_c, g32, xy_c), cfg, shift_in_kernel, fused)
    if not fused:
        sxm, _, sxym = moments(X, Y32, shift_k, fold=fold, n_folds=F, squares=False)
        s_c, xy_c = sxm, sxym
    s_c, xy_c = s_c.view(B, F, d), xy_c.view(B, F, d, k)
    if shift_in_kernel:
        stats.xtx.view(B * F, d, d).add_(g32)
        stats.sx += s_c
        stats.xty += xy_c
    else:
        # re-express the raw sums about c: Σ(x-c)(x-c)ᵀ = G - s cᵀ - c sᵀ + n c cᵀ,
        # Σ(x-c) = s - n c, Σ(x-c)yᵀ = Σxyᵀ - c (Σy)ᵀ
        _add_centred(stats.xtx.view(B * F, d, d), g32, s_c.reshape(B * F, d), stats.shift, counts)
        c = stats.shift.to(torch.float64).unsqueeze(1)                       # (B, 1, d)
        n = _counts(counts, dev).view(1, F, 1)
        stats.sx += s_c - n * c
        sy_chunk = torch.zeros(F, k, dtype=torch.float64, device=dev)
        f = (torch.zeros(r, dtype=torch.long, device=dev) if fold is None else
             torch.as_tensor(fold).to(device=dev, dtype=torch.long).reshape(-1))
        keep = f >= 0
        sy_chunk.index_add_(0, f[keep], Yd[keep])
        stats.xty += xy_c - c.unsqueeze(-1) * sy_chunk.view(1, F, 1, k)
    del g32
    stats.add_targets(Yd, fold, counts)
    return stats


class MomentsTiling(tuple):
    """Tiling of the moments kernel: BLOCK_N columns x BLOCK_R rows per step, warps, and
    ``stages`` of the row loop (> 1: row blocks loaded ahead through cp.async)."""

    def __new__(cls, bn, br, warps, stages=1):
        return super().__new__(cls, (int(bn), int(br), int(warps), int(stages)))


def moments_tilings() -> list[MomentsTiling]:
    """Candidates the GPU bench times (the first is the default). On an H200 the first three
    read 11008-column neuron activations at ~805 GB/s (19 % of the copy ceiling), where the
    CUDA kernel (one 16-byte load per thread and row, 4 rows in flight) reached 67 %; the
    pipelined ones keep more bytes in flight (no spills on sm_90, bench/gpu_compile_check.py)."""
    if INTERPRET:
        return [MomentsTiling(16, 8, 1), MomentsTiling(32, 4, 1, 2)]
    return [MomentsTiling(256, 16, 8), MomentsTiling(128, 32, 8), MomentsTiling(512, 8, 4),
            MomentsTiling(256, 16, 8, 3), MomentsTiling(256, 16, 8, 4),
            MomentsTiling(1024, 4, 4), MomentsTiling(256, 8, 4, 4)]


def moments(X, Y, shift, fold=None, n_folds: int = 1, squares: bool = True,
            block_n: int | None = None, block_r: int | None = None, splits: int | None = None,
            stages: int | None = None, tiling=None):
    """Per-column moments of X (B, r, m) fp16 about ``shift`` (B, m) over rows grouped by fold.

    Returns float64 tensors sx (B, F, m), sxx (B, F, m) (zeros if not squares), sxy (B, F, m, k).
    ``tiling``: a MomentsTiling (default: the one tuned for this m on this device, else
    moments_tilings()[0]); block_n, block_r, stages override its fields.
    """
    X = _check_x(X)
    B, r, m = X.shape
    k = Y.shape[1]
    dev = X.device
    F = n_folds
    idx, off, counts, _ = _fold_index(fold, r, F, dev)
    gather = idx is not None
    if not gather:
        off = torch.tensor([0, r], dtype=torch.int32, device=dev)
        idx = off
    KP = triton.next_power_of_2(max(k, 1))
    t = MomentsTiling(*(tiling or _TUNED.get((m, str(dev), "moments")) or moments_tilings()[0]))
    bn, br, warps, ns = block_n or t[0], block_r or t[1], t[2], stages or t[3]
    n_cb = triton.cdiv(m, bn)
    max_rows = int(counts.max()) if len(counts) else 0
    if splits is None:
        # enough programs to fill the card several times over
        want = 4 * (torch.cuda.get_device_properties(dev).multi_processor_count
                    if dev.type == "cuda" else 2)
        splits = max(1, min(triton.cdiv(want, n_cb * B * F), triton.cdiv(max(max_rows, 1), 256)))
    rows_per_split = triton.cdiv(max(max_rows, 1), splits)
    rows_per_split = triton.cdiv(rows_per_split, br) * br
    splits = max(1, triton.cdiv(max(max_rows, 1), rows_per_split))
    out = torch.empty(splits, B * F, m, 2 + KP, dtype=torch.float32, device=dev)
    Y32 = Y.to(device=dev, dtype=torch.float32).contiguous()
    shift32 = shift.to(device=dev, dtype=torch.float32).contiguous()
    grid = (n_cb, B * F, splits)
    _moments_kernel[grid](X, Y32, idx, off, shift32, out, m, k, F, rows_per_split,
                          X.stride(0), X.stride(1), X.stride(2), Y32.stride(0), Y32.stride(1),
                          BLOCK_N=bn, BLOCK_R=br, KP=KP, GATHER=gather, SQUARES=bool(squares),
                          NS=ns, num_warps=warps)
    tot = out.to(torch.float64).sum(0).view(B, F, m, 2 + KP)
    return tot[..., 0], tot[..., 1], tot[..., 2:2 + k]


def neuron_update(stats, X, Y, fold=None, **tiling):
    """Add X (B, r, m) fp16 neuron activations into a probes.neurons.NeuronStats (rows with
    fold -1 skipped). ``tiling``: block_n, block_r, splits, stages, tiling of :func:`moments`."""
    from probes.stats import prepare_neuron_chunk

    X, Yc, keep, fold01 = prepare_neuron_chunk(stats, X, Y, fold)
    if not bool(keep.any()):
        return stats
    X = _check_x(X)
    if X.device != stats.device:
        raise ValueError(f"X is on {X.device} but the statistics are on {stats.device}")
    sx, sxx, sxy = moments(X, Yc, stats.shift, fold=fold01, n_folds=1, **tiling)
    stats.add_moments(keep, sx[:, 0], sxx[:, 0], sxy[:, 0], Yc)
    return stats
