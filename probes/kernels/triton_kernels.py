"""Triton backend: the statistics pass and the neuron moments as fused GPU kernels.

``gram_update(stats, X, Y, fold)`` adds one chunk X (B, r, d) float16 CUDA, Y (r, k), fold (r,)
(-1 = skip) into a :class:`probes.stats.GramStats` held in float64 on the same device.

Kernel ``_gram_kernel``: one program per (upper-triangle tile pair (I, J) of the d x d Gram,
layer b, fold f). It walks the fold's rows in blocks of BLOCK_R, loads the two fp16 column tiles,
subtracts the float32 shift, rounds the shifted values to fp16 and accumulates XᵢᵀXⱼ in float32
with ``tl.dot`` (tensor cores). Diagonal programs (I == J) also accumulate Σx and XᵀY (float32,
IEEE dot) for their columns, so X is read by one kernel only. At the end each program adds its
float32 tile into the float64 statistics (and the mirrored tile below the diagonal).

Precision (stated, tested): the shifted value x - c is rounded to fp16 before the product, a
relative rounding of at most 2^-11 per value; with float32 accumulation the Gram agrees with the
float64 reference to ~1e-3 relative (Frobenius) on random data, typically far better because the
roundings average out. ``shift_in_kernel=False`` instead multiplies the raw fp16 values (exact
products) and re-expresses the chunk about the shift in float64 afterwards: better when the
shift is small relative to the spread, and faster on tensor cores (no conversion in the loop).

Kernel ``_moments_kernel`` (neurons, and Σx / XᵀY in the raw mode): for every column of every
layer, Σx, Σx², Σx·y_t over a row range; programs split rows for parallelism and write float32
partials that are summed in float64.

Under ``TRITON_INTERPRET=1`` (read by ``triton.jit`` when this module is imported) the kernels run
on CPU tensors; the tests use that on tiny shapes.
"""
from __future__ import annotations

import os

import numpy as np
import torch

import triton
import triton.language as tl

__all__ = ["gram_update", "neuron_update", "is_available", "unavailable_reason",
           "gram_configs", "GramConfig", "moments"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def is_available() -> bool:
    return INTERPRET or torch.cuda.is_available()


def unavailable_reason() -> str:
    return "the Triton backend needs a CUDA GPU (or TRITON_INTERPRET=1 for CPU tests)"


# ----------------------------------------------------------------------------------- kernels
@triton.jit
def _tile_of(pid, n_tiles):
    """(I, J) with I <= J of the pid-th upper-triangle tile, row-major over I."""
    ti = pid * 0
    rem = pid
    while rem >= n_tiles - ti:
        rem -= n_tiles - ti
        ti += 1
    return ti, ti + rem


@triton.jit
def _gram_kernel(X, Y, IDX, OFF, SHIFT, SX, XTX, XTY,
                 d, k, F, n_tiles,
                 s_xb, s_xr, s_xd, s_yr, s_yk,
                 BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, KP: tl.constexpr,
                 GATHER: tl.constexpr, SHIFT_IN: tl.constexpr, DIAG_STATS: tl.constexpr):
    pid = tl.program_id(0)
    bf = tl.program_id(1)
    b = bf // F
    f = bf % F
    ti, tj = _tile_of(pid, n_tiles)
    r0 = tl.load(OFF + f)
    r1 = tl.load(OFF + f + 1)

    ci = ti * BLOCK + tl.arange(0, BLOCK)
    cj = tj * BLOCK + tl.arange(0, BLOCK)
    mi = ci < d
    mj = cj < d
    kk = tl.arange(0, KP)
    mk = kk < k
    xb = X + b.to(tl.int64) * s_xb
    if SHIFT_IN:
        shi = tl.load(SHIFT + b * d + ci, mask=mi, other=0.0)
        shj = tl.load(SHIFT + b * d + cj, mask=mj, other=0.0)
    diag = ti == tj

    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    acc_s = tl.zeros((BLOCK,), dtype=tl.float32)
    acc_y = tl.zeros((BLOCK, KP), dtype=tl.float32)
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
            if diag:
                acc_s += tl.sum(xi32, axis=0)
                yv = tl.load(Y + rows[:, None] * s_yr + kk[None, :] * s_yk,
                             mask=mr[:, None] & mk[None, :], other=0.0)
                acc_y = tl.dot(tl.trans(xi32), yv, acc_y, input_precision="ieee")

    # diagonal tiles: average with the transpose so the totals are exactly symmetric
    acc = tl.where(diag, (acc + tl.trans(acc)) * 0.5, acc)
    base = XTX + bf.to(tl.int64) * d * d
    m2 = mi[:, None] & mj[None, :]
    p = base + ci[:, None].to(tl.int64) * d + cj[None, :]
    old = tl.load(p, mask=m2, other=0.0)
    tl.store(p, old + acc.to(tl.float64), mask=m2)
    if ti != tj:
        pt = base + cj[:, None].to(tl.int64) * d + ci[None, :]
        m2t = mj[:, None] & mi[None, :]
        oldt = tl.load(pt, mask=m2t, other=0.0)
        tl.store(pt, oldt + tl.trans(acc).to(tl.float64), mask=m2t)
    if DIAG_STATS:
        if diag:
            ps = SX + bf.to(tl.int64) * d + ci
            tl.store(ps, tl.load(ps, mask=mi, other=0.0) + acc_s.to(tl.float64), mask=mi)
            py = XTY + bf.to(tl.int64) * d * k + ci[:, None] * k + kk[None, :]
            my = mi[:, None] & mk[None, :]
            tl.store(py, tl.load(py, mask=my, other=0.0) + acc_y.to(tl.float64), mask=my)


@triton.jit
def _moments_kernel(X, Y, IDX, OFF, SHIFT, OUT,
                    m, k, F, rows_per_split,
                    s_xb, s_xr, s_xd, s_yr, s_yk,
                    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, KP: tl.constexpr,
                    GATHER: tl.constexpr, SQUARES: tl.constexpr):
    """OUT[split, b, f, j, :] = [Σx, Σx², Σx·y_0 .. Σx·y_{KP-1}] (float32) over one row range."""
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
    for r in range(lo, hi, BLOCK_R):
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
    """(BLOCK, BLOCK_R, num_warps, num_stages)."""

    def __new__(cls, block, block_r, warps, stages):
        return super().__new__(cls, (block, block_r, warps, stages))


def gram_configs() -> list[GramConfig]:
    """Candidate tilings: 128x128 tiles with 8 warps suit H100/H200 tensor cores; smaller for
    small d and for the interpreter."""
    if INTERPRET:
        return [GramConfig(16, 16, 1, 1)]
    return [GramConfig(128, 64, 8, 3), GramConfig(128, 32, 8, 4), GramConfig(128, 64, 8, 4),
            GramConfig(64, 64, 4, 3), GramConfig(128, 128, 8, 2)]


_TUNED: dict = {}


def _default_config(d: int) -> GramConfig:
    if INTERPRET:
        return gram_configs()[0]
    if d <= 256:
        return GramConfig(64, 64, 4, 3)
    return GramConfig(128, 64, 8, 3)


def tune_gram(d: int, device, B: int = 2, rows: int = 4096, configs=None, shift_in_kernel=True,
              verbose=False) -> GramConfig:
    """Time each candidate config on scratch outputs (never on real statistics) and remember the
    fastest for this (d, device). Returns it."""
    from triton.testing import do_bench

    configs = list(configs or gram_configs())
    X = torch.randn(B, rows, d, device=device).to(torch.float16)
    Y = torch.randn(rows, 2, device=device)
    best, best_t = None, float("inf")
    for cfg in configs:
        outs = _scratch(B, 1, d, 2, device)
        try:
            t = do_bench(lambda: _launch_gram(X, Y, None, None, outs, cfg, shift_in_kernel, True),
                         warmup=5, rep=30, return_mode="median")
        except Exception as exc:  # noqa: BLE001 - a config may not fit this card (shared memory)
            if verbose:
                print(f"  config {tuple(cfg)} failed: {type(exc).__name__}: {exc}")
            continue
        if verbose:
            print(f"  config {tuple(cfg)}: {t:.3f} ms")
        if t < best_t:
            best, best_t = cfg, t
    if best is None:
        best = _default_config(d)
    _TUNED[(d, str(device), shift_in_kernel)] = best
    return best


def _scratch(B, F, d, k, device):
    z = dict(dtype=torch.float64, device=device)
    return (torch.zeros(B, d, **z), torch.zeros(B * F, d, **z), torch.zeros(B * F, d, d, **z),
            torch.zeros(B * F, d, k, **z))


def _kp(k: int) -> int:
    return max(16, triton.next_power_of_2(max(k, 1)))


def _launch_gram(X, Y, idx, off, outs, cfg, shift_in_kernel, diag_stats):
    """Run the Gram kernel. outs = (shift32 (B, d), sx (B*F, d), xtx (B*F, d, d), xty (B*F, d, k))."""
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
    block, block_r, warps, stages = cfg
    n_tiles = triton.cdiv(d, block)
    grid = (n_tiles * (n_tiles + 1) // 2, B * F)
    _gram_kernel[grid](X, Y, idx, off, shift, sx, xtx, xty,
                       d, k, F, n_tiles,
                       X.stride(0), X.stride(1), X.stride(2), Y.stride(0), Y.stride(1),
                       BLOCK=block, BLOCK_R=block_r, KP=_kp(k), GATHER=gather,
                       SHIFT_IN=bool(shift_in_kernel), DIAG_STATS=bool(diag_stats),
                       num_warps=warps, num_stages=stages)


# ----------------------------------------------------------------------------------- helpers
def _fold_index(fold, r: int, F: int, device):
    """Rows grouped by fold: (idx int32 (n_kept,), off int32 (F+1,), counts (F,)) or
    (None, None, counts) when every row is in fold 0 (contiguous, no gather)."""
    if fold is None:
        return None, None, np.array([r], dtype=np.int64)
    f = fold.detach().cpu().numpy() if isinstance(fold, torch.Tensor) else np.asarray(fold)
    f = f.astype(np.int64).reshape(-1)
    counts = np.bincount(f[f >= 0], minlength=F)[:F]
    if F == 1 and counts[0] == r:
        return None, None, counts
    order = np.argsort(f, kind="stable")
    order = order[f[order] >= 0]
    off = np.zeros(F + 1, dtype=np.int32)
    off[1:] = np.cumsum(counts)
    return (torch.from_numpy(order.astype(np.int32)).to(device),
            torch.from_numpy(off).to(device), counts)


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


def _y_stats(stats, Yd, fold, counts, F):
    """n, Σy, ΣyyT per fold in float64 (tiny)."""
    dev = stats.device
    if fold is None:
        f = torch.zeros(Yd.shape[0], dtype=torch.long, device=dev)
    else:
        f = (fold if isinstance(fold, torch.Tensor) else torch.from_numpy(np.asarray(fold)))
        f = f.to(device=dev, dtype=torch.long).reshape(-1)
    keep = f >= 0
    fk, Yk = f[keep], Yd[keep]
    stats.n += torch.as_tensor(counts, dtype=stats.dtype).to(dev)
    stats.sy.index_add_(0, fk, Yk)
    stats.yty.index_add_(0, fk, Yk.unsqueeze(-1) * Yk.unsqueeze(-2))


# ----------------------------------------------------------------------------------- public
def gram_update(stats, X, Y, fold=None, precision=None, shift_in_kernel: bool = True,
                config=None):
    """Add X (B, r, d) fp16, Y (r, k), fold (r,) (-1 = skip) into ``stats`` (float64, same device).

    ``shift_in_kernel``: subtract the shift before the fp16 product (default) or multiply raw
    values and move the chunk to the shift in float64 afterwards (see the module docstring).
    ``config``: a GramConfig; default: the tuned one for this d if ``tune_gram`` ran, else a
    fixed sensible tiling.
    """
    from probes.stats import validate_chunk

    r, k = validate_chunk(stats, X, Y, fold)
    X = _check_x(X)
    dev = stats.device
    if X.device != dev:
        raise ValueError(f"X is on {X.device} but the statistics are on {dev}")
    B, _, d = X.shape
    F = stats.n_folds
    Yd = (Y if isinstance(Y, torch.Tensor) else torch.from_numpy(np.asarray(Y)))
    Yd = Yd.to(device=dev, dtype=torch.float64).reshape(r, k)
    idx, off, counts = _fold_index(fold, r, F, dev)
    if r == 0 or counts.sum() == 0:
        return stats
    Y32 = Yd.to(torch.float32).contiguous()
    shift32 = stats.shift.to(torch.float32).contiguous()
    cfg = config or _TUNED.get((d, str(dev), bool(shift_in_kernel))) or _default_config(d)

    for name in ("sx", "xtx", "xty"):
        if not getattr(stats, name).is_contiguous():
            setattr(stats, name, getattr(stats, name).contiguous())
    if shift_in_kernel:
        outs = (shift32, stats.sx.view(B * F, d), stats.xtx.view(B * F, d, d),
                stats.xty.view(B * F, d, k))
        _launch_gram(X, Y32, idx, off, outs, cfg, True, True)
    else:
        # raw sums of this chunk: Σx and ΣxyT into scratch, ΣxxT straight into the statistics;
        # then re-express about c: Σ(x-c)(x-c)ᵀ = G - s cᵀ - c sᵀ + n c cᵀ, Σ(x-c) = s - n c,
        # Σ(x-c)yᵀ = Σxyᵀ - c (Σy)ᵀ.
        s_raw = torch.zeros(B * F, d, dtype=torch.float64, device=dev)
        xy_raw = torch.zeros(B * F, d, k, dtype=torch.float64, device=dev)
        outs = (shift32, s_raw, stats.xtx.view(B * F, d, d), xy_raw)
        _launch_gram(X, Y32, idx, off, outs, cfg, False, True)
        c = stats.shift.to(torch.float64).unsqueeze(1)                       # (B, 1, d)
        n = torch.as_tensor(counts, dtype=torch.float64, device=dev).view(1, F, 1)
        s = s_raw.view(B, F, d)
        stats.xtx -= (s.unsqueeze(-1) * c.unsqueeze(-2) + c.unsqueeze(-1) * s.unsqueeze(-2)
                      - n.unsqueeze(-1) * (c.unsqueeze(-1) * c.unsqueeze(-2)))
        stats.sx += s - n * c
        sy_chunk = torch.zeros(F, k, dtype=torch.float64, device=dev)
        f = (torch.zeros(r, dtype=torch.long, device=dev) if fold is None else
             torch.as_tensor(fold).to(device=dev, dtype=torch.long).reshape(-1))
        keep = f >= 0
        sy_chunk.index_add_(0, f[keep], Yd[keep])
        stats.xty += xy_raw.view(B, F, d, k) - c.unsqueeze(-1) * sy_chunk.view(1, F, 1, k)
    _y_stats(stats, Yd, fold, counts, F)
    return stats


def moments(X, Y, shift, fold=None, n_folds: int = 1, squares: bool = True,
            block_n: int | None = None, block_r: int | None = None, splits: int | None = None):
    """Per-column moments of X (B, r, m) fp16 about ``shift`` (B, m) over rows grouped by fold.

    Returns float64 tensors sx (B, F, m), sxx (B, F, m) (zeros if not squares), sxy (B, F, m, k).
    """
    X = _check_x(X)
    B, r, m = X.shape
    k = Y.shape[1]
    dev = X.device
    F = n_folds
    idx, off, counts = _fold_index(fold, r, F, dev)
    gather = idx is not None
    if not gather:
        off = torch.tensor([0, r], dtype=torch.int32, device=dev)
        idx = off
    KP = triton.next_power_of_2(max(k, 1))
    if INTERPRET:
        bn, br, warps = block_n or 16, block_r or 8, 1
    else:
        bn, br, warps = block_n or 256, block_r or 8, 8
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
                          num_warps=warps)
    tot = out.to(torch.float64).sum(0).view(B, F, m, 2 + KP)
    return tot[..., 0], tot[..., 1], tot[..., 2:2 + k]


def neuron_update(stats, X, Y, fold=None):
    """Add X (B, r, m) fp16 neuron activations into a probes.neurons.NeuronStats (rows with
    fold -1 skipped)."""
    from probes.neurons import prepare_neuron_chunk

    X, Yc, keep, fold01 = prepare_neuron_chunk(stats, X, Y, fold)
    if not bool(keep.any()):
        return stats
    X = _check_x(X)
    if X.device != stats.device:
        raise ValueError(f"X is on {X.device} but the statistics are on {stats.device}")
    sx, sxx, sxy = moments(X, Yc, stats.shift, fold=fold01, n_folds=1)
    stats.add_moments(keep, sx[:, 0], sxx[:, 0], sxy[:, 0], Yc)
    return stats
