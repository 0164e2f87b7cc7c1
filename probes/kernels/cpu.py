"""CPU backend ("cpu"): the fused C++/OpenMP statistics kernels in ``probes._C``.

float32 mode (default): fp16 -> float32 (F16C), x - float32(shift), blocks of at most
``block_rows`` rows of one fold summed in float32 by a register-tiled FMA SYRK, then added into
the float64 totals. float64 mode: the same in double throughout. Σx, ΣxyT, Σy, ΣyyT are always
accumulated in double. The GIL is released while the kernel runs.
"""
from __future__ import annotations

import numpy as np
import torch

from probes.errors import BackendUnavailable, StatsError
from probes.kernels.weighted import check_weighted, mirror_upper
from probes.stats import GramStats, NeuronStats, prepare_neuron_chunk, validate_chunk

try:
    from probes import _C
    _IMPORT_ERROR = ""
except ImportError as exc:  # not built (a source checkout without `make native`)
    _C = None
    _IMPORT_ERROR = str(exc)

__all__ = ["is_available", "unavailable_reason", "missing_ops", "gram_update", "neuron_update",
           "weighted_gram", "centred"]

_PRECISIONS = ("float32", "float64")
#: the compiled function behind each op
_KERNELS = {"gram_update": "gram_update", "neuron_update": "neuron_moments"}


def missing_ops() -> tuple[str, ...]:
    """Ops whose kernel this build of probes._C lacks (all of them when it is not built);
    weighted_gram runs on torch and is never missing."""
    return tuple(op for op, fn in _KERNELS.items() if not hasattr(_C, fn))


def is_available() -> bool:
    return _C is not None and "gram_update" not in missing_ops()


def unavailable_reason() -> str:
    if _C is None:
        return f"probes._C is not built (run `make native`): {_IMPORT_ERROR}"
    missing = missing_ops()
    if missing:
        return f"probes._C lacks {', '.join(missing)} (rebuild with `make native`)"
    return ""


def centred(X: torch.Tensor, mean: torch.Tensor, out: torch.Tensor | None = None,
            dtype: torch.dtype = torch.float32, rows: torch.Tensor | None = None) -> torch.Tensor:
    """X - mean[:, None, :] in ``dtype`` (float32 or float64) for X (B, r, d) and mean (B, d),
    into ``out`` (a contiguous (B, r', d) tensor of ``dtype``, e.g. a buffer reused across
    chunks) or a new tensor; ``rows`` (int64 indices, optional): only those rows of X, in that
    order (r' of them), with no gathered copy of X.

    A CPU float16 X with contiguous rows goes through ``probes._C.centre_f16`` (F16C, OpenMP:
    torch converts fp16 one value at a time); anything else, or a build without it, through
    torch. Both are exact up to the subtraction's rounding in ``dtype``."""
    m = mean.detach().to(dtype)
    if (X.dtype == torch.float16 and X.device.type == "cpu" and mean.device.type == "cpu"
            and X.dim() == 3 and X.stride(2) == 1 and hasattr(_C, "centre_f16")
            and (out is None or (out.device.type == "cpu" and out.dtype == dtype
                                 and out.is_contiguous()))
            and (rows is None or rows.device.type == "cpu")):
        o = _C.centre_f16(X.detach().numpy(), m.contiguous().numpy(),
                          None if out is None else out.numpy(),
                          None if rows is None else rows.to(torch.int64).contiguous().numpy())
        return out if out is not None else torch.from_numpy(o)
    if rows is not None:
        X = X[:, rows.to(X.device)]
    if out is None:
        return X.to(dtype) - m[:, None, :]
    return torch.sub(X, m[:, None, :], out=out)


def _to_numpy_x(X) -> np.ndarray:
    if isinstance(X, torch.Tensor):
        X = X.detach()
        if X.dtype not in (torch.float16, torch.float32, torch.float64):
            X = X.to(torch.float32)  # bfloat16 and integers: exact or nearest float32
        X = X.cpu().contiguous().numpy()
    X = np.asarray(X)
    if X.dtype not in (np.float16, np.float32, np.float64):
        X = X.astype(np.float32)
    return np.ascontiguousarray(X)


def _to_numpy(a, dtype) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.ascontiguousarray(a, dtype=dtype)


def _direct_target(stats: GramStats, precision: str) -> bool:
    """Whether the kernel can write into stats' own memory (CPU, float64, contiguous, and in
    float32 mode a shift that float32 represents exactly)."""
    for name in ("shift", "n", "sx", "xtx", "sy", "yty", "xty"):
        t = getattr(stats, name)
        if t.device.type != "cpu" or t.dtype != torch.float64 or not t.is_contiguous():
            return False
    if precision == "float32":
        s = stats.shift
        if not torch.equal(s, s.to(torch.float32).to(torch.float64)):
            return False
    return True


def gram_update(stats: GramStats, X, Y, fold=None, precision: str = "float32",
                block_rows: int = 2048) -> GramStats:
    """Add X (B, r, d), Y (r, k), fold (r,) into ``stats`` with the C++ kernel (see module doc)."""
    if "gram_update" in missing_ops():
        raise BackendUnavailable(unavailable_reason())
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
    if int(block_rows) < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    r, k = validate_chunk(stats, X, Y, fold)
    Xn = _to_numpy_x(X)
    Yn = _to_numpy(Y, np.float64).reshape(r, k)
    fn = None if fold is None else _to_numpy(fold, np.int32).reshape(r)
    if _direct_target(stats, precision):
        target = stats
    else:
        # Accumulate about the float32-rounded shift on CPU, then merge; += re-expresses the
        # piece about stats.shift exactly and moves it to stats' device.
        shift = stats.shift.detach().to("cpu", torch.float64)
        if precision == "float32":
            shift = shift.to(torch.float32).to(torch.float64)
        target = GramStats.zeros(stats.B, stats.d, stats.k, stats.n_folds, shift=shift)
    _C.gram_update(
        Xn, Yn, fn, target.shift.numpy(), target.n.numpy(), target.sx.numpy(), target.xtx.numpy(),
        target.sy.numpy(), target.yty.numpy(), target.xty.numpy(),
        float64=(precision == "float64"), block_rows=int(block_rows))
    if target is not stats:
        stats += target
    return stats


def neuron_update(stats: NeuronStats, X, Y, fold=None) -> NeuronStats:
    """Add X (B, r, m) float16, Y (r, k), fold (r,) into ``stats`` with the C++ kernel (float64
    accumulation)."""
    if "neuron_update" in missing_ops():
        raise BackendUnavailable(unavailable_reason())
    Xt, Yc, keep, fold01 = prepare_neuron_chunk(stats, X, Y, fold)
    Xn = Xt.detach().cpu().numpy() if isinstance(Xt, torch.Tensor) else np.asarray(Xt)
    if Xn.dtype != np.float16:
        raise StatsError(f"the cpu backend needs float16 activations, got {Xn.dtype}")
    Xn = np.ascontiguousarray(Xn)
    f = (np.zeros(Xn.shape[1], np.int32) if fold01 is None else fold01)
    sx, sxx, sxy = _C.neuron_moments(
        Xn.view(np.uint16), np.ascontiguousarray(Yc.cpu().numpy(), dtype=np.float64),
        f, np.ascontiguousarray(stats.shift.cpu().numpy(), dtype=np.float32))
    dev = stats.device
    stats.add_moments(keep, torch.from_numpy(sx).to(dev), torch.from_numpy(sxx).to(dev),
                      torch.from_numpy(sxy).to(dev), Yc)
    return stats



#: rows of one layer summed in float32 before the add into the float64 totals
WEIGHTED_BLOCK_ROWS = 8192


def weighted_gram(X, w, out=None, block_rows: int = WEIGHTED_BLOCK_ROWS) -> torch.Tensor:
    """G[b, m] = Σ_i w[m, i] x_{b,i} x_{b,i}ᵀ by torch float32 matmuls on the CPU.

    Per layer, weight set and block of ``block_rows`` rows: (x·w)ᵀx as one float32 matmul
    (weights may be negative, so no √w·x SYRK; one matmul per weight set is faster than a
    broadcast batch), each block's sum added into float64 sums of one layer; the upper triangle
    mirrored (exact symmetry). X and out on the CPU. Returns (B, M, d, d) float32, or adds
    into ``out`` and returns it.
    """
    Xt, wt = check_weighted(X, w, out)
    if Xt.device.type != "cpu":
        raise ValueError(f"the cpu backend needs X on the CPU, got {Xt.device}; use "
                         "backend='auto' (triton or cuda for GPU data)")
    B, n, d = Xt.shape
    M = wt.shape[0]
    step = max(1, int(block_rows))
    w32 = wt.to(torch.float32)
    res = out if out is not None else torch.empty(B, M, d, d, dtype=torch.float32)
    for b in range(B):                      # float64 sums of one layer at a time (M·d² values)
        Gb = torch.zeros(M, d, d, dtype=torch.float64)
        for r0 in range(0, n, step):
            xb = Xt[b, r0:r0 + step].to(torch.float32)                     # (r, d)
            for m in range(M):
                Gb[m] += ((xb * w32[m, r0:r0 + step, None]).T @ xb).to(torch.float64)
        Gb = mirror_upper(Gb).to(res.dtype)
        if out is None:
            res[b] = Gb
        else:
            res[b] += Gb
    return res
