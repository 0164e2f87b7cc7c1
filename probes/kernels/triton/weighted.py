"""The weighted Gram G[b, m] = Σ_i w[m, i] x_{b,i} x_{b,i}ᵀ (the Newton Hessian XᵀWX) in Triton.

One program per (upper-triangle tile, layer·weight set), looping over the rows: the tile of
x·w (float32) is split into a 16-bit high part and a 16-bit remainder in X's dtype, and both
go through the tensor cores against the raw x tile (exact in its own dtype), so the products
keep ~2⁻²² relative precision with float32 accumulation. float32 X: one IEEE float32 dot.
Weights are divided by a power of two ≥ max|w| (exact) so x·w cannot overflow float16.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from probes.kernels.triton.common import INTERPRET, store_gram_tile, tile_grid, tile_of
from probes.kernels.weighted import check_weighted, pow2_scale

__all__ = ["weighted_gram", "default_config", "WEIGHTED_CONFIGS"]

#: (BM, BN, BLOCK_R, num_warps, num_stages) the GPU bench tries for 16-bit X (first = default)
WEIGHTED_CONFIGS = ((128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 3),
                    (64, 64, 64, 4, 3))
#: float32 X (IEEE dots, no tensor cores): smaller tiles
F32_CONFIG = (64, 64, 32, 4, 2)
#: under the interpreter: small tiles, so tests on tiny shapes cross tile edges
INTERPRET_CONFIG = (16, 16, 16, 1, 1)


@triton.jit
def _wgram_kernel(X, W, S, G, n, d, M, n_tm, n_tn, s_xb, s_xr, s_xd,
                  BM: tl.constexpr, BN: tl.constexpr, BLOCK_R: tl.constexpr,
                  SPLIT: tl.constexpr, ACC: tl.constexpr):
    """G[bm] (+)= S[m] · Σ_rows (x_I · w)ᵀ x_J for one BM x BN tile (I, J) with I <= J."""
    pid = tl.program_id(0)
    bm = tl.program_id(1)
    b = bm // M
    m = bm % M
    ti, tj = tile_of(pid, n_tm, n_tn, BM, BN)
    ci = ti * BM + tl.arange(0, BM)
    cj = tj * BN + tl.arange(0, BN)
    mi = ci < d
    mj = cj < d
    xb = X + b.to(tl.int64) * s_xb
    wm = W + m.to(tl.int64) * n
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r0 in range(0, n, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mr = rows < n
        roff = rows[:, None].to(tl.int64) * s_xr
        xa = tl.load(xb + roff + ci[None, :] * s_xd, mask=mr[:, None] & mi[None, :], other=0.0)
        xc = tl.load(xb + roff + cj[None, :] * s_xd, mask=mr[:, None] & mj[None, :], other=0.0)
        wv = tl.load(wm + rows, mask=mr, other=0.0)
        a = xa.to(tl.float32) * wv[:, None]
        if SPLIT:
            hi = a.to(xc.dtype)
            lo = (a - hi.to(tl.float32)).to(xc.dtype)
            acc = tl.dot(tl.trans(hi), xc, acc)
            acc = tl.dot(tl.trans(lo), xc, acc)
        else:
            acc = tl.dot(tl.trans(a), xc.to(tl.float32), acc, input_precision="ieee")
    acc = acc * tl.load(S + m)
    store_gram_tile(G, acc, bm, ti, tj, d, BM, BN, ACC)


def default_config(dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """The tiling :func:`weighted_gram` uses for X of this dtype when none is given."""
    if INTERPRET:
        return INTERPRET_CONFIG
    return WEIGHTED_CONFIGS[0] if dtype in (torch.float16, torch.bfloat16) else F32_CONFIG


def weighted_gram(X, w, out=None, config=None) -> torch.Tensor:
    """G[b, m] = Σ_i w[m, i] x_{b,i} x_{b,i}ᵀ with the Triton kernel (see module doc).

    X (B, n, d) float16/bfloat16 (tensor cores, split products) or float32/float64 (IEEE
    float32 dots) on a CUDA device (CPU under TRITON_INTERPRET=1); w (M, n). Returns
    (B, M, d, d) float32, or adds into ``out`` (float32/float64) and returns it. ``config``:
    (BM, BN, BLOCK_R, num_warps, num_stages), default :func:`default_config`.
    """
    Xt, wt = check_weighted(X, w, out)
    if Xt.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"the triton backend needs X on a CUDA device, got {Xt.device}")
    if Xt.dtype == torch.float64:
        Xt = Xt.to(torch.float32)
    B, n, d = Xt.shape
    M = wt.shape[0]
    split = Xt.dtype in (torch.float16, torch.bfloat16)
    bm_, bn_, br, warps, stages = config or default_config(Xt.dtype)
    scale = pow2_scale(wt)
    w32 = (wt / scale.to(wt.dtype)[:, None]).to(torch.float32).contiguous()
    acc = out is not None and out.is_contiguous()
    G = out if acc else torch.zeros(B, M, d, d, dtype=torch.float32, device=Xt.device)
    if B * M == 0 or d == 0:
        return G
    n_tm, n_tn, n_prog = tile_grid(d, bm_, bn_)
    _wgram_kernel[(n_prog, B * M)](
        Xt, w32, scale, G, n, d, M, n_tm, n_tn, Xt.stride(0), Xt.stride(1), Xt.stride(2),
        BM=bm_, BN=bn_, BLOCK_R=br, SPLIT=split, ACC=acc, num_warps=warps, num_stages=stages)
    if out is not None and not acc:
        out += G.to(out.dtype)
        return out
    return G
