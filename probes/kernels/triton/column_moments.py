"""The moments kernel: per column of every layer, Σ(x - c), Σ(x - c)², Σ(x - c)·y_t over the
rows of each fold (the neuron correlations, and the column sums of the "raw" and "rawtma"
Gram modes). Programs split the rows for parallelism and write float32 partial sums, which
are added in float64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from probes.kernels.triton.common import check_x, fold_index, row_args, sm_count
from probes.kernels.triton.configs import TUNING, MomentsTiling, moments_tilings

__all__ = ["moments"]


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


def _row_splits(splits, max_rows, n_programs, br, device):
    """(splits, rows_per_split): row ranges per (column block, layer, fold) program, a multiple
    of BLOCK_R rows each; by default enough programs to fill the card several times over."""
    if splits is None:
        want = 4 * sm_count(device)
        splits = max(1, min(triton.cdiv(want, n_programs), triton.cdiv(max(max_rows, 1), 256)))
    rows_per_split = triton.cdiv(max(max_rows, 1), splits)
    rows_per_split = triton.cdiv(rows_per_split, br) * br
    return max(1, triton.cdiv(max(max_rows, 1), rows_per_split)), rows_per_split


def moments(X, Y, shift, fold=None, n_folds: int = 1, squares: bool = True,
            block_n: int | None = None, block_r: int | None = None, splits: int | None = None,
            stages: int | None = None, tiling=None):
    """Per-column moments of X (B, r, m) fp16 about ``shift`` (B, m) over rows grouped by fold.

    Returns float64 tensors sx (B, F, m), sxx (B, F, m) (zeros if not squares), sxy (B, F, m, k).
    ``tiling``: a MomentsTiling (default: the one tuned for this m on this device, else
    moments_tilings()[0]); block_n, block_r, stages override its fields.
    """
    X = check_x(X)
    B, r, m = X.shape
    k = Y.shape[1]
    dev = X.device
    F = n_folds
    idx, off, counts, _ = fold_index(fold, r, F, dev)
    idx, off, gather = row_args(idx, off, r, dev)
    KP = triton.next_power_of_2(max(k, 1))
    t = MomentsTiling(*(tiling or TUNING.get(m, dev, "moments") or moments_tilings()[0]))
    bn, br, warps, ns = block_n or t[0], block_r or t[1], t[2], stages or t[3]
    n_cb = triton.cdiv(m, bn)
    max_rows = int(counts.max()) if len(counts) else 0
    splits, rows_per_split = _row_splits(splits, max_rows, n_cb * B * F, br, dev)
    out = torch.empty(splits, B * F, m, 2 + KP, dtype=torch.float32, device=dev)
    Y32 = Y.to(device=dev, dtype=torch.float32).contiguous()
    shift32 = shift.to(device=dev, dtype=torch.float32).contiguous()
    _moments_kernel[(n_cb, B * F, splits)](
        X, Y32, idx, off, shift32, out, m, k, F, rows_per_split,
        X.stride(0), X.stride(1), X.stride(2), Y32.stride(0), Y32.stride(1),
        BLOCK_N=bn, BLOCK_R=br, KP=KP, GATHER=gather, SQUARES=bool(squares), NS=ns,
        num_warps=warps)
    tot = out.to(torch.float64).sum(0).view(B, F, m, 2 + KP)
    return tot[..., 0], tot[..., 1], tot[..., 2:2 + k]
