"""What every backend's ``weighted_gram`` shares: the argument checks, the power-of-two weight
scales and the final add into ``out``.

``weighted_gram(X, w)`` = G (B, M, d, d) with G[b, m] = Σ_i w[m, i] x_{b,i} x_{b,i}ᵀ (no shift),
the Hessian XᵀWX of a Newton/IRLS step for M weight vectors at once. Weights are any finite
numbers (negative allowed). Kernels that round w·x to 16 bits divide each weight set by a
power of two ≥ max|w| first and multiply the tile by it after, both exact.
"""
from __future__ import annotations

import numpy as np
import torch

from probes.errors import StatsError

__all__ = ["as_tensor", "check_weighted", "pow2_scale", "mirror_upper", "finish"]

_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def as_tensor(a) -> torch.Tensor:
    """A torch view of a numpy array, a torch tensor, or a CUDA array (dlpack)."""
    if isinstance(a, torch.Tensor):
        return a.detach()
    if hasattr(a, "__cuda_array_interface__") or (hasattr(a, "__dlpack__")
                                                   and not isinstance(a, np.ndarray)):
        return torch.from_dlpack(a)
    return torch.from_numpy(np.ascontiguousarray(a))


def check_weighted(X, w, out=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(X, w) as torch tensors on X's device after the shape, dtype and value checks.

    X (B, n, d) float16/bfloat16/float32/float64; w (M, n) or (n,) (M = 1), any real dtype,
    finite; out None or a float32/float64 tensor (B, M, d, d) on X's device.
    """
    Xt, wt = as_tensor(X), as_tensor(w)
    if Xt.ndim != 3:
        raise StatsError(f"X must be (B, n, d) (layers, rows, features), got shape "
                         f"{tuple(Xt.shape)}; add a leading axis for one layer")
    if Xt.dtype not in _X_DTYPES:
        Xt = Xt.to(torch.float32)
    if wt.ndim == 1:
        wt = wt[None]
    B, n, d = Xt.shape
    if wt.ndim != 2 or wt.shape[1] != n:
        raise StatsError(f"w must be (M, n) = (M, {n}) row weights, got shape {tuple(wt.shape)}")
    wt = wt.to(device=Xt.device, dtype=torch.float64 if wt.dtype == torch.float64
               else torch.float32)
    if wt.numel() and not bool(torch.isfinite(wt).all()):
        raise StatsError("w has NaN or infinite weights; pass finite row weights")
    if out is not None:
        shape = (B, wt.shape[0], d, d)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape \
                or out.dtype not in (torch.float32, torch.float64) or out.device != Xt.device:
            raise StatsError(f"out must be a float32 or float64 torch tensor of shape {shape} "
                             f"on {Xt.device}")
    return Xt, wt


def pow2_scale(w: torch.Tensor) -> torch.Tensor:
    """(M,) float32 powers of two s_m ≥ max_i |w[m, i]| (1 for an all-zero set): w / s lies in
    [-1, 1] and both the division and the final multiplication are exact."""
    mx = w.abs().amax(dim=1).to(torch.float64) if w.shape[1] else torch.zeros(w.shape[0])
    e = torch.ceil(torch.log2(mx.clamp_min(1e-300)))
    s = torch.where(mx > 0, torch.exp2(e), torch.ones_like(mx))
    return s.to(device=w.device, dtype=torch.float32)


def mirror_upper(G: torch.Tensor) -> torch.Tensor:
    """G with its strict lower triangle replaced by the transposed upper one (exactly
    symmetric; the upper triangle and the diagonal are kept)."""
    upper = torch.triu(torch.ones(G.shape[-2:], dtype=torch.bool, device=G.device))
    return torch.where(upper, G, G.transpose(-1, -2))


def finish(G: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """out += G and return out, or G as float32 when out is None."""
    if out is None:
        return G.to(torch.float32)
    out += G.to(out.dtype)
    return out
