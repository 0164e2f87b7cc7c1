"""The older single-kernel Gram modes, "shift-in" and "raw": ``_gram_kernel`` walks one fold's
rows (gathered through an index when folds interleave) per (upper-triangle tile, layer, fold)
program and accumulates XᵢᵀXⱼ in float32 on tensor cores. "shift-in" subtracts the float32
shift and rounds x - c to fp16 before the product (as preshift); "raw" multiplies the raw
values (exact products) and re-expresses the chunk about the shift in float64 afterwards. The
first kept tile of each row block can also sum Σx and XᵀY ("fused"), else the moments kernel
does. Each program writes both halves of its tile into a float32 chunk Gram (exactly
symmetric), which is added into the float64 totals: use chunks of >= 8k rows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from probes.kernels.triton.column_moments import moments
from probes.kernels.triton.common import (
    INTERPRET,
    Chunk,
    counts_tensor,
    row_args,
    tile_grid,
    tile_of,
)
from probes.kernels.triton.configs import (
    TUNING,
    GramConfig,
    autotune,
    default_gram_config,
    gram_configs,
)
from probes.kernels.triton.rawtma import add_centred

__all__ = ["tune_gram", "update"]


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
    ti, tj = tile_of(pid, n_tm, n_tn, BM, BN)
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


def _scratch(B, F, d, k, device):
    """Outputs of one launch: (shift32 (B, d), sx (B*F, d), g32 (B*F, d, d), xty (B*F, d, k))."""
    z = dict(dtype=torch.float64, device=device)
    return (torch.zeros(B, d, dtype=torch.float32, device=device), torch.zeros(B * F, d, **z),
            torch.empty(B * F, d, d, dtype=torch.float32, device=device),
            torch.zeros(B * F, d, k, **z))


def _kp(k: int) -> int:
    return max(16, triton.next_power_of_2(max(k, 1)))


def launch_gram(X, Y, idx, off, outs, cfg, shift_in_kernel, diag_stats, with_moments=False):
    """Run the Gram kernel. outs = (shift32 (B, d), sx (B*F, d) float64 (added to),
    g32 (B*F, d, d) float32 (overwritten with this chunk's Gram), xty (B*F, d, k) float64
    (added to)). ``with_moments`` (tuning only): also run the moments kernel when not fused."""
    shift, sx, xtx, xty = outs
    B, r, d = X.shape
    k = Y.shape[1]
    idx, off, gather = row_args(idx, off, r, X.device)
    F = off.numel() - 1
    bm, bn, block_r, warps, stages = cfg[:5]
    n_tm, n_tn, n_prog = tile_grid(d, bm, bn)
    _gram_kernel[(n_prog, B * F)](X, Y, idx, off, shift, sx, xtx, xty,
                                  d, k, F, n_tm, n_tn,
                                  X.stride(0), X.stride(1), X.stride(2), Y.stride(0), Y.stride(1),
                                  BM=bm, BN=bn, BLOCK_R=block_r, KP=_kp(k), GATHER=gather,
                                  SHIFT_IN=bool(shift_in_kernel), DIAG_STATS=bool(diag_stats),
                                  num_warps=warps, num_stages=stages)
    if with_moments and not diag_stats:
        moments(X, Y, shift, squares=False)


def tune_gram(d: int, device, B: int = 2, rows: int = 4096, configs=None, shift_in_kernel=True,
              verbose=False) -> GramConfig:
    """Time each candidate tiling of the shift-in (or raw) kernel on scratch outputs (never on
    real statistics) and remember the fastest for this (d, device). Returns it."""
    if INTERPRET:
        return default_gram_config(d)
    X = torch.randn(B, rows, d, device=device).to(torch.float16)
    Y = torch.randn(rows, 2, device=device)

    def make_run(cfg):
        outs = _scratch(B, 1, d, 2, device)
        return lambda: launch_gram(X, Y, None, None, outs, cfg, shift_in_kernel, cfg[5],
                                   with_moments=True)

    return autotune("shift-in" if shift_in_kernel else "raw", d, device,
                    list(configs or gram_configs()), make_run, default_gram_config(d), verbose)


def _recentre(stats, c: Chunk, g32, s_c, xy_c) -> None:
    """Add raw sums (about 0) into the totals about c: Σ(x-c)(x-c)ᵀ = G - s cᵀ - c sᵀ + n c cᵀ,
    Σ(x-c) = s - n c, Σ(x-c)yᵀ = Σxyᵀ - c (Σy)ᵀ."""
    B, F, d, k, dev = c.B, c.F, c.d, c.k, c.device
    add_centred(stats.xtx.view(B * F, d, d), g32, s_c.reshape(B * F, d), stats.shift, c.counts)
    shift = stats.shift.to(torch.float64).unsqueeze(1)                       # (B, 1, d)
    n = counts_tensor(c.counts, dev).view(1, F, 1)
    stats.sx += s_c - n * shift
    sy_chunk = torch.zeros(F, k, dtype=torch.float64, device=dev)
    f = (torch.zeros(c.r, dtype=torch.long, device=dev) if c.fold is None else
         torch.as_tensor(c.fold).to(device=dev, dtype=torch.long).reshape(-1))
    keep = f >= 0
    sy_chunk.index_add_(0, f[keep], c.Yd[keep])
    stats.xty += xy_c - shift.unsqueeze(-1) * sy_chunk.view(1, F, 1, k)


def update(stats, c: Chunk, shift_in_kernel: bool, config=None) -> None:
    """Add one chunk into ``stats`` in "shift-in" (or, False, "raw") mode; ``config``: a
    GramConfig, default the tuned one for this d, else default_gram_config(d)."""
    B, F, d, k, dev = c.B, c.F, c.d, c.k, c.device
    what = "shift-in" if shift_in_kernel else "raw"
    cfg = config or TUNING.get(d, dev, what) or default_gram_config(d)
    fused = bool(cfg[5]) if len(cfg) > 5 else True
    # this chunk's sums about the kernel's shift (c, or 0 for raw products): float32 Gram,
    # float64 Σx and Σxyᵀ
    shift_k = c.shift32 if shift_in_kernel else torch.zeros_like(c.shift32)
    g32 = torch.empty(B * F, d, d, dtype=torch.float32, device=dev)
    s_c = torch.zeros(B * F, d, dtype=torch.float64, device=dev)
    xy_c = torch.zeros(B * F, d, k, dtype=torch.float64, device=dev)
    launch_gram(c.X, c.Y32, c.idx, c.off, (shift_k, s_c, g32, xy_c), cfg, shift_in_kernel, fused)
    if not fused:
        s_c, _, xy_c = moments(c.X, c.Y32, shift_k, fold=c.fold, n_folds=F, squares=False)
    s_c, xy_c = s_c.view(B, F, d), xy_c.view(B, F, d, k)
    if shift_in_kernel:
        stats.xtx.view(B * F, d, d).add_(g32)
        stats.sx += s_c
        stats.xty += xy_c
    else:
        _recentre(stats, c, g32, s_c, xy_c)
    del g32
    stats.add_targets(c.Yd, c.fold, c.counts)
