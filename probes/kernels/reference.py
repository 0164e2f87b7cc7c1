"""Reference backend ("torch"): the statistics update in plain torch float64.

Every other backend is tested against this one. It is exact up to float64 rounding: each x is
converted to float64 and the shift subtracted in float64 before any product.
"""
from __future__ import annotations

import numpy as np
import torch

from probes.kernels.weighted import check_weighted, finish, mirror_upper
from probes.stats import GramStats, NeuronStats, prepare_neuron_chunk, validate_chunk

__all__ = ["is_available", "unavailable_reason", "missing_ops", "gram_update", "neuron_update",
           "weighted_gram"]


def is_available() -> bool:
    """Always: plain torch, on whatever device the statistics live."""
    return True


def unavailable_reason() -> str:
    return ""


def missing_ops() -> tuple[str, ...]:
    """None: the reference implements every op."""
    return ()


def _as_tensor(a, device) -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    return t.to(device=device, dtype=torch.float64)


def gram_update(stats: GramStats, X, Y, fold=None, precision: str | None = None) -> GramStats:
    """Add the rows of X (B, r, d), Y (r, k) with fold ids (r,) (-1 = skip) into ``stats``.

    ``precision`` is accepted for a uniform signature; this backend always works in float64.
    """
    if precision not in (None, "float64", "float32"):
        raise ValueError(f"precision must be 'float32' or 'float64', got {precision!r}")
    r, k = validate_chunk(stats, X, Y, fold)
    dev = stats.device
    Xd = _as_tensor(X, dev) - stats.shift.to(torch.float64).unsqueeze(1)      # (B, r, d)
    Yd = _as_tensor(Y, dev).reshape(r, k)
    if fold is None:
        f = torch.zeros(r, dtype=torch.long, device=dev)
    else:
        f = (fold if isinstance(fold, torch.Tensor) else torch.from_numpy(np.asarray(fold)))
        f = f.to(device=dev, dtype=torch.long)
    dt = stats.dtype
    for g in range(stats.n_folds):
        m = f == g
        if not bool(m.any()):
            continue
        Xg, Yg = Xd[:, m], Yd[m]                                       # (B, rg, d), (rg, k)
        stats.n[g] += float(m.sum())
        stats.sx[:, g] += Xg.sum(1).to(dt)
        stats.xtx[:, g] += (Xg.transpose(1, 2) @ Xg).to(dt)
        stats.xty[:, g] += (Xg.transpose(1, 2) @ Yg).to(dt)
        stats.sy[g] += Yg.sum(0).to(dt)
        stats.yty[g] += (Yg.T @ Yg).to(dt)
    return stats


def neuron_update(stats: NeuronStats, X, Y, fold=None) -> NeuronStats:
    """The torch float64 reference: every activation converted to float64 before any product."""
    Xt, Yc, keep, _ = prepare_neuron_chunk(stats, X, Y, fold)
    dev = stats.device
    Xd = Xt.to(device=dev, dtype=torch.float64)[:, keep] - stats.shift.unsqueeze(1)   # (B, rk, m)
    Yk = Yc[keep]
    stats.n += float(keep.sum())
    stats.sx += Xd.sum(1)
    stats.sxx += (Xd * Xd).sum(1)
    stats.sxy += torch.einsum("brm,rk->bmk", Xd, Yk)
    stats.sy += Yk.sum(0)
    stats.syy += (Yk * Yk).sum(0)
    return stats


def weighted_gram(X, w, out=None) -> torch.Tensor:
    """G[b, m] = Σ_i w[m, i] x_{b,i} x_{b,i}ᵀ in float64 throughout (the oracle).

    X (B, n, d), w (M, n); returns (B, M, d, d) float32, or adds into ``out`` (float32 or
    float64, so a float64 ``out`` keeps the float64 result) and returns it.
    """
    Xt, wt = check_weighted(X, w, out)
    Xd = Xt.to(torch.float64)
    wd = wt.to(torch.float64)
    B, _, d = Xd.shape
    G = torch.empty(B, wd.shape[0], d, d, dtype=torch.float64, device=Xd.device)
    for m in range(wd.shape[0]):
        G[:, m] = (Xd * wd[m][None, :, None]).transpose(1, 2) @ Xd
    return finish(mirror_upper(G), out)
