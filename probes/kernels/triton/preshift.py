"""Gram mode "preshift" (the default): ``_prep_kernel`` reads the chunk once and writes a copy
XS = fp16(x - c) with each fold's rows contiguous (skipped rows dropped), padded with zero rows
to a multiple of BLOCK_R and zero columns to a multiple of the tile, summing Σ(x - c) and
Σ(x - c)yᵀ in float32 from the exact x - c on the way. Then ``_gram_tma_kernel`` (Hopper TMA
descriptor loads) or ``_gram_pre_kernel`` (pointer loads) is a plain, mask-free tensor-core Gram
per (upper-triangle tile, layer, fold) over the fold's row range, into a float32 chunk Gram that
is added into the float64 totals (or, ``fused_add``, added by the kernel itself).

Precision: x - c rounded to fp16 (2^-11 relative) before the product, float32 accumulation:
~1e-3 relative (Frobenius) against float64 at worst. Costs a second copy of the chunk in memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from probes.kernels.triton.common import (
    INTERPRET,
    Chunk,
    prepare_chunk,
    row_args,
    sm_count,
    store_gram_tile,
    tile_grid,
    tile_of,
    tma_descriptor,
)
from probes.kernels.triton.configs import (
    TUNING,
    PreConfig,
    PrepTiling,
    autotune,
    default_pre_config,
    prep_tilings,
    preshift_configs,
)
from probes.stats import GramStats

__all__ = ["gram_preshift", "prep_tiling", "tune_preshift", "update"]


@triton.jit
def _prep_kernel(X, Y, IDX, OFF, OFFP, SHIFT, XS, OUT,
                 d, d_pad, k, F, rows_tot, rows_per_split,
                 s_xb, s_xr, s_xd, s_yr, s_yk,
                 BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, KP: tl.constexpr,
                 GATHER: tl.constexpr, NS: tl.constexpr = 1):
    """Pre-shift pass: XS[b, OFFP[f] + q, :] = fp16(x - c) for the q-th kept row of fold f
    (rows in fold order, test rows dropped), zero rows up to the padded end OFFP[f + 1] and zero
    columns up to d_pad, so the Gram kernel needs no masks. Also
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
    ti, tj = tile_of(pid, n_tm, n_tn, BM, BN)
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
    store_gram_tile(G, acc, bf, ti, tj, d, BM, BN, ACC)


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
    ti, tj = tile_of(pid, n_tm, n_tn, BM, BN)
    p0 = tl.load(OFFP + f)
    p1 = tl.load(OFFP + f + 1)
    row0 = b * rows_tot
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r in range(p0, p1, BLOCK_R):
        a = DA.load([row0 + r, ti * BM])
        c = DB.load([row0 + r, tj * BN])
        acc = tl.dot(tl.trans(a), c, acc)
    store_gram_tile(G, acc, bf, ti, tj, d, BM, BN, ACC)


def prep_tiling(B, F, d_pad, n_pad_max, device, KP=2, tiling=None):
    """(BLOCK_N, BLOCK_R, warps, splits, rows_per_split, stages) of the pre-shift pass: row
    splits so that the grid fills the card several times over."""
    # <= 181 registers on sm_90 without spills at the default (KP <= 4 at 16 rows; fewer rows
    # for more targets keep the (rows, BLOCK_N, KP) accumulator the same size)
    bn, br2, warps, rows_prog, stages = PrepTiling(*(tiling or prep_tilings()[0]))
    br = max(1, min(br2, (4 * br2) // KP))
    n_cb = triton.cdiv(d_pad, bn)
    want = 16 * sm_count(device)
    # many short programs: a grid of only ~1.5 waves of long programs left half the card idle
    # in its last wave
    splits = max(triton.cdiv(want, n_cb * B * F), triton.cdiv(max(n_pad_max, 1), rows_prog))
    splits = max(1, min(splits, triton.cdiv(max(n_pad_max, 1), 8 * br)))
    rps = triton.cdiv(triton.cdiv(max(n_pad_max, 1), splits), br) * br
    splits = max(1, triton.cdiv(max(n_pad_max, 1), rps))
    return bn, br, warps, splits, rps, stages


@dataclass
class _Plan:
    """Layout of one chunk's padded, fold-ordered copy, processed in groups of layers."""

    d_pad: int             # columns padded to a multiple of the tile
    offp: torch.Tensor     # (F + 1,) int32: padded row offsets of the folds
    rows_tot: int          # padded rows of one layer
    bounds: list           # [(b0, b1)] layer groups
    gsz: int               # layers per group
    KP: int                # targets rounded up to a power of two
    prep: tuple            # prep_tiling(): (BLOCK_N, BLOCK_R, warps, splits, rows/split, stages)


def _plan(c: Chunk, cfg: PreConfig, groups: int, prep) -> _Plan:
    block_r, unit = cfg[2], max(cfg[0], cfg[1])
    d_pad = triton.cdiv(c.d, unit) * unit
    cnt_pad = [triton.cdiv(int(n), block_r) * block_r for n in c.counts]
    offp = np.zeros(c.F + 1, dtype=np.int32)
    offp[1:] = np.cumsum(cnt_pad)
    groups = max(1, min(int(groups), c.B))
    gsz = triton.cdiv(c.B, groups)
    KP = triton.next_power_of_2(max(c.k, 1))
    prep = prep or TUNING.get(c.d, c.device, "prep")
    return _Plan(d_pad, torch.from_numpy(offp).to(c.device), int(offp[-1]),
                 [(b0, min(c.B, b0 + gsz)) for b0 in range(0, c.B, gsz)], gsz, KP,
                 prep_tiling(gsz, c.F, d_pad, max(cnt_pad), c.device, KP, prep))


def _launch_prep(c: Chunk, p: _Plan, b0: int, b1: int, XS, part) -> None:
    """The pre-shift pass of layers [b0, b1) into XS; partial sums into ``part``."""
    idx, off, gather = row_args(c.idx, c.off, c.r, c.device)
    pbn, pbr, pw, splits, rps, pns = p.prep
    X, Y32 = c.X, c.Y32
    _prep_kernel[(triton.cdiv(p.d_pad, pbn), (b1 - b0) * c.F, splits)](
        X[b0:b1], Y32, idx, off, p.offp, c.shift32[b0:b1], XS, part, c.d, p.d_pad, c.k, c.F,
        p.rows_tot, rps, X.stride(0), X.stride(1), X.stride(2), Y32.stride(0), Y32.stride(1),
        BLOCK_N=pbn, BLOCK_R=pbr, KP=p.KP, GATHER=gather, NS=pns, num_warps=pw)


def _launch_gram(c: Chunk, p: _Plan, cfg: PreConfig, n_layers: int, XS, G, acc: bool) -> None:
    """The Gram of ``n_layers`` pre-shifted layers in XS into G (their B*F matrices)."""
    bm, bn, block_r, warps, stages, tma = cfg
    n_tm, n_tn, n_prog = tile_grid(c.d, bm, bn)
    grid = (n_prog, n_layers * c.F)
    if tma:
        xs2 = XS.view(p.gsz * p.rows_tot, p.d_pad)
        da, db = tma_descriptor(xs2, [block_r, bm]), tma_descriptor(xs2, [block_r, bn])
        _gram_tma_kernel[grid](da, db, p.offp, G, c.d, p.rows_tot, c.F, n_tm, n_tn,
                               BM=bm, BN=bn, BLOCK_R=block_r, ACC=acc, num_warps=warps,
                               num_stages=stages)
    else:
        _gram_pre_kernel[grid](XS, p.offp, G, c.d, p.d_pad, p.rows_tot, c.F, n_tm, n_tn,
                               BM=bm, BN=bn, BLOCK_R=block_r, ACC=acc, num_warps=warps,
                               num_stages=stages)


def _overlapped(dev, n_groups: int, n_slots: int, prep, gram, buffers) -> None:
    """prep(g) of group g + 1 on a high-priority side stream while gram(g) of group g runs on
    the current stream; group g reuses slot g % n_slots once gram(g - n_slots) is done."""
    main = torch.cuda.current_stream(dev)
    side = torch.cuda.Stream(device=dev, priority=-1)   # prep blocks first as SMs free up
    side.wait_stream(main)                       # inputs and buffers are ready
    prepped = [torch.cuda.Event() for _ in range(n_groups)]
    grammed = [torch.cuda.Event() for _ in range(n_groups)]
    for gi in range(n_groups):
        with torch.cuda.stream(side):
            if gi >= n_slots:                    # the slot's previous Gram must be done
                side.wait_event(grammed[gi - n_slots])
            prep(gi)
            prepped[gi].record(side)
        main.wait_event(prepped[gi])
        gram(gi)
        grammed[gi].record(main)
    main.wait_stream(side)
    for t in buffers:
        t.record_stream(side)


def gram_preshift(c: Chunk, cfg: PreConfig, groups: int = 1, into=None, prep=None):
    """One chunk in preshift mode: (g32 (B*F, d, d) float32, s_c (B, F, d) float64,
    xy_c (B, F, d, k) float64), all about the shift. ``into`` (a float64 (B*F, d, d) tensor,
    the totals): the Gram kernel adds its tiles into it directly and g32 is None.

    ``groups`` > 1: the layers go in that many groups; the pre-shift pass of group g+1 runs on a
    side stream while the Gram of group g runs, and the padded copy is held for two groups only.
    ``prep``: a PrepTiling (default: the tuned one for this d, else prep_tilings()[0])."""
    B, F, d, dev = c.B, c.F, c.d, c.device
    p = _plan(c, cfg, groups, prep)
    n_slots = min(2, len(p.bounds))
    slots = [torch.empty(p.gsz, p.rows_tot, p.d_pad, dtype=torch.float16, device=dev)
             for _ in range(n_slots)]
    W, splits = 1 + p.KP, p.prep[3]
    # per group a contiguous (splits, layers_in_group * F, d, W) block of float32 partial sums
    part = torch.empty(splits * B * F * d * W, dtype=torch.float32, device=dev)
    parts = [part[splits * b0 * F * d * W:splits * b1 * F * d * W].view(splits, (b1 - b0) * F, d, W)
             for b0, b1 in p.bounds]
    g32 = torch.empty(B * F, d, d, dtype=torch.float32, device=dev) if into is None else into

    def prep_group(gi):
        _launch_prep(c, p, *p.bounds[gi], slots[gi % n_slots], parts[gi])

    def gram_group(gi):
        b0, b1 = p.bounds[gi]
        _launch_gram(c, p, cfg, b1 - b0, slots[gi % n_slots], g32[b0 * F:b1 * F],
                     into is not None)

    if len(p.bounds) == 1 or dev.type != "cuda":
        for gi in range(len(p.bounds)):
            prep_group(gi)
            gram_group(gi)
    else:
        _overlapped(dev, len(p.bounds), n_slots, prep_group, gram_group, slots + [part])
    slots.clear()
    tot = torch.cat([q.to(torch.float64).sum(0) for q in parts]).view(B, F, d, W)
    return (None if into is not None else g32), tot[..., 0], tot[..., 1:1 + c.k]


def update(stats, c: Chunk, cfg: PreConfig, groups=None, fused_add: bool = False,
           prep=None) -> None:
    """Add one chunk into ``stats`` in preshift mode (see gram_preshift); ``groups`` default:
    the tuned value for this d, else 1."""
    B, F, d = c.B, c.F, c.d
    ng = groups or TUNING.get(d, c.device, "preshift groups", 1)
    into = stats.xtx.view(B * F, d, d) if fused_add else None
    g32, s_c, xy_c = gram_preshift(c, cfg, ng, into, prep)
    if g32 is not None:
        stats.xtx.view(B * F, d, d).add_(g32)
        del g32
    stats.sx += s_c
    stats.xty += xy_c
    stats.add_targets(c.Yd, c.fold, c.counts)


def tune_preshift(d: int, device, B: int = 2, rows: int = 8192, configs=None, verbose=False):
    """Time each preshift tiling on scratch statistics; remember and return the fastest."""
    if INTERPRET:
        return default_pre_config(d)
    X = torch.randn(B, rows, d, device=device).to(torch.float16)
    Y = torch.randn(rows, 2, device=device)

    def make_run(cfg):
        st = GramStats.zeros(B, d, 2, device=device)
        return lambda: update(st, prepare_chunk(st, X, Y, None), PreConfig(*cfg))

    return autotune("preshift", d, device, list(configs or preshift_configs()), make_run,
                    default_pre_config(d), verbose)
