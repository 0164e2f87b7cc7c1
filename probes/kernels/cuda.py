"""CUDA C++ backend (``probes._C_cuda``): the statistics pass without Triton. Two layers:

- :func:`gram` and :func:`moments` take any CUDA arrays — torch tensors or CuPy arrays (anything
  with ``__cuda_array_interface__``) — and accumulate into caller-owned float64 outputs, on the
  caller's current stream.
- :func:`weighted_gram`: Σ w x xᵀ per layer and weight set (Newton Hessians), torch tensors.
- :func:`gram_update` / :func:`neuron_update` fill :class:`probes.stats.GramStats` /
  :class:`probes.stats.NeuronStats` (torch), like the other backends.

Kernels (csrc/probes/cuda/): a WMMA Gram (fp16 tensor cores, fp32 accumulation, 128x128
upper-triangle tiles, x - c rounded to fp16 as in the Triton kernel: ~1e-3 relative Frobenius
error at worst, float64 totals) and a memory-bound moments kernel (Σx, Σx², XᵀY in float32 per
row range, added into float64 with atomics).
"""
from __future__ import annotations

import numpy as np
import torch

from probes.kernels.weighted import check_weighted, pow2_scale
from probes.stats import fold_groups, prepare_neuron_chunk, validate_chunk

__all__ = ["is_available", "unavailable_reason", "missing_ops", "gram", "moments", "gram_update",
           "neuron_update", "weighted_gram"]

try:
    from probes import _C_cuda as _ext
    _IMPORT_ERROR = ""
except ImportError as exc:  # built without nvcc
    _ext = None
    _IMPORT_ERROR = str(exc)


def is_available() -> bool:
    return _ext is not None and _ext.device_count() > 0


def unavailable_reason() -> str:
    if _ext is None:
        return ("probes._C_cuda is not built (nvcc was not found at build time): "
                f"{_IMPORT_ERROR}")
    return "probes._C_cuda is built but no CUDA device is visible"


def missing_ops() -> tuple[str, ...]:
    """The ops a stale build of the module lacks (weighted_gram came later); none when it is
    current (or unavailable as a whole)."""
    if _ext is None or hasattr(_ext, "weighted_gram"):
        return ()
    return ("weighted_gram",)


# --------------------------------------------------------------------------- array plumbing
def _lib(a) -> str:
    mod = type(a).__module__.split(".")[0]
    if mod == "torch":
        return "torch"
    if hasattr(a, "__cuda_array_interface__"):
        return "cupy" if mod == "cupy" else "cai"
    raise TypeError(f"expected a CUDA array (torch tensor or CuPy array), got {type(a).__name__}")


_ITEMSIZE = {"f2": 2, "f4": 4, "f8": 8, "i4": 4}


class _Info:
    """Device pointer, shape, element strides and dtype code of a CUDA array."""

    def __init__(self, a, name):
        lib = _lib(a)
        self.lib = lib
        if lib == "torch":
            if a.device.type != "cuda":
                raise ValueError(f"{name} must be on a CUDA device, got {a.device}")
            self.ptr = int(a.data_ptr())
            self.shape = tuple(int(s) for s in a.shape)
            self.strides = tuple(int(s) for s in a.stride())
            self.code = {"torch.float16": "f2", "torch.float32": "f4", "torch.float64": "f8",
                         "torch.int32": "i4"}.get(str(a.dtype), str(a.dtype))
            self.device = int(a.device.index or 0)
        else:
            cai = a.__cuda_array_interface__
            self.ptr = int(cai["data"][0])
            self.shape = tuple(int(s) for s in cai["shape"])
            self.code = cai["typestr"][1:]
            size = _ITEMSIZE.get(self.code, 1)
            if cai.get("strides") is None:
                st, acc = [], 1
                for s in reversed(self.shape):
                    st.append(acc)
                    acc *= s
                self.strides = tuple(reversed(st))
            else:
                self.strides = tuple(int(s) // size for s in cai["strides"])
            self.device = int(getattr(getattr(a, "device", None), "id", 0) or 0)
        self.name = name

    def need(self, code, shape=None, contiguous=False):
        if self.code != code:
            raise ValueError(f"{self.name} must have dtype {code}, got {self.code}")
        if shape is not None and self.shape != tuple(shape):
            raise ValueError(f"{self.name} must have shape {tuple(shape)}, got {self.shape}")
        if contiguous:
            acc = 1
            for s, st in zip(reversed(self.shape), reversed(self.strides)):
                if s > 1 and st != acc:
                    raise ValueError(f"{self.name} must be C-contiguous")
                acc *= s
        return self


def _stream_of(x, stream):
    if stream is not None:
        return int(getattr(stream, "cuda_stream", getattr(stream, "ptr", stream)))
    if x.lib == "torch":
        return int(torch.cuda.current_stream(x.device).cuda_stream)
    if x.lib == "cupy":
        import cupy  # deferred: only CuPy callers have it

        return int(cupy.cuda.get_current_stream().ptr)
    return 0


def _fold_rows(fold, r, n_folds, like):
    """(idx device int32 array or None, offsets list of F+1 ints, counts np.ndarray)."""
    if fold is None:
        return None, [0, r], np.array([r])
    if hasattr(fold, "get") and not isinstance(fold, np.ndarray):       # CuPy
        f = fold.get()
    elif type(fold).__module__.startswith("torch"):
        f = fold.detach().cpu().numpy()
    else:
        f = np.asarray(fold)
    f = f.astype(np.int64).reshape(-1)
    if f.shape[0] != r:
        raise ValueError(f"fold must have shape ({r},), got {f.shape}")
    if r and (f.min() < -1 or f.max() >= n_folds):
        raise ValueError(f"fold ids must lie in [-1, {n_folds}), got [{f.min()}, {f.max()}]")
    order, counts, off = fold_groups(f, n_folds)
    off = off.tolist()
    if order is None:
        return None, off, counts
    if like.lib == "torch":
        idx = torch.from_numpy(order).to(f"cuda:{like.device}")
    else:
        import cupy  # deferred: only CuPy callers have it

        with cupy.cuda.Device(like.device):
            idx = cupy.asarray(order)
    return idx, off, counts


class _on_device:
    def __init__(self, info):
        self.info = info
        self.ctx = None

    def __enter__(self):
        if self.info.lib == "torch":
            self.ctx = torch.cuda.device(self.info.device)
        else:
            import cupy  # deferred: only CuPy callers have it

            self.ctx = cupy.cuda.Device(self.info.device)
        self.ctx.__enter__()

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)


def _ptr_of(a):
    if a is None:
        return 0
    if type(a).__module__.startswith("torch"):
        return int(a.data_ptr())
    return int(a.__cuda_array_interface__["data"][0])


# --------------------------------------------------------------------------- low level
def gram(X, shift, xtx, fold=None, n_folds: int = 1, stream=None):
    """xtx[b, f] += Σ (x - c)(x - c)ᵀ over the rows of fold f (fold (r,) ints, -1 = skip).

    X (B, r, d) float16 with unit stride along d; shift (B, d) float32 contiguous; xtx
    (B, F, d, d) float64 contiguous. Any CUDA arrays (torch, CuPy). Returns the row counts (F,).
    """
    if _ext is None:
        raise RuntimeError(unavailable_reason())
    x = _Info(X, "X").need("f2")
    if len(x.shape) != 3 or x.strides[2] != 1:
        raise ValueError(f"X must be (B, r, d) with unit stride along d, got shape {x.shape}")
    B, r, d = x.shape
    c = _Info(shift, "shift").need("f4", (B, d), contiguous=True)
    g = _Info(xtx, "xtx").need("f8", (B, n_folds, d, d), contiguous=True)
    idx, off, counts = _fold_rows(fold, r, n_folds, x)
    if off[-1] == 0:
        return counts
    with _on_device(x):
        _ext.gram(x.ptr, B, x.strides[0], x.strides[1], d, _ptr_of(idx), off, c.ptr, g.ptr,
                  _stream_of(x, stream))
    return counts


def moments(X, Y, shift, sx, sxy, sxx=None, fold=None, n_folds: int = 1, stream=None):
    """Per column j of every layer b and fold f: sx += Σ(x - c), sxx += Σ(x - c)² (if given),
    sxy += Σ(x - c) y. X (B, r, m) float16; Y (r, k) float32 contiguous; shift (B, m) float32;
    sx, sxx (B, F, m) and sxy (B, F, m, k) float64 contiguous. Returns the row counts (F,)."""
    if _ext is None:
        raise RuntimeError(unavailable_reason())
    x = _Info(X, "X").need("f2")
    if len(x.shape) != 3 or x.strides[2] != 1:
        raise ValueError(f"X must be (B, r, m) with unit stride along m, got shape {x.shape}")
    B, r, m = x.shape
    y = _Info(Y, "Y").need("f4", contiguous=True)
    if len(y.shape) != 2 or y.shape[0] != r:
        raise ValueError(f"Y must be (r, k) = ({r}, k), got {y.shape}")
    k = y.shape[1]
    c = _Info(shift, "shift").need("f4", (B, m), contiguous=True)
    s1 = _Info(sx, "sx").need("f8", (B, n_folds, m), contiguous=True)
    s2 = _Info(sxx, "sxx").need("f8", (B, n_folds, m), contiguous=True) if sxx is not None else None
    s3 = _Info(sxy, "sxy").need("f8", (B, n_folds, m, k), contiguous=True)
    idx, off, counts = _fold_rows(fold, r, n_folds, x)
    if off[-1] == 0:
        return counts
    with _on_device(x):
        _ext.moments(x.ptr, B, x.strides[0], x.strides[1], m, _ptr_of(idx), off, c.ptr, y.ptr, k,
                     s1.ptr, s2.ptr if s2 else 0, s3.ptr, _stream_of(x, stream))
    return counts


# --------------------------------------------------------------------------- torch statistics
def _as_torch(a):
    if isinstance(a, torch.Tensor):
        return a
    if hasattr(a, "__cuda_array_interface__") or hasattr(a, "__dlpack__"):
        return torch.from_dlpack(a)
    return torch.from_numpy(np.ascontiguousarray(a))


def gram_update(stats, X, Y, fold=None, precision=None):
    """Add X (B, r, d) float16 CUDA (torch or CuPy), Y (r, k), fold (r,) into GramStats on the
    same CUDA device (float64)."""
    if precision not in (None, "float32"):
        raise ValueError(f"the cuda backend sums each chunk in float32 (into float64 totals); "
                         f"precision={precision!r} needs backend='torch' or 'cpu'")
    r, k = validate_chunk(stats, X, Y, fold)
    Xt = _as_torch(X)
    if Xt.dtype != torch.float16:
        raise ValueError(f"the cuda backend needs float16 activations, got {Xt.dtype}")
    dev = stats.device
    if Xt.device != dev or dev.type != "cuda":
        raise ValueError(f"X ({Xt.device}) and the statistics ({dev}) must be on one CUDA device")
    if Xt.stride(2) != 1:
        Xt = Xt.contiguous()
    B, _, d = Xt.shape
    F = stats.n_folds
    Yd = _as_torch(Y).to(device=dev, dtype=torch.float64).reshape(r, k)
    Y32 = Yd.to(torch.float32).contiguous()
    shift32 = stats.shift.to(torch.float32).contiguous()
    for name in ("sx", "xtx", "xty"):
        if not getattr(stats, name).is_contiguous():
            setattr(stats, name, getattr(stats, name).contiguous())
    fold_t = None if fold is None else _as_torch(fold)
    counts = gram(Xt, shift32, stats.xtx, fold=fold_t, n_folds=F)
    moments(Xt, Y32, shift32, stats.sx, stats.xty, None, fold=fold_t, n_folds=F)
    stats.add_targets(Yd, fold_t, counts)
    return stats


def neuron_update(stats, X, Y, fold=None):
    """Add X (B, r, m) float16 CUDA neuron activations into a NeuronStats on that device."""
    Xt, Yc, keep, fold01 = prepare_neuron_chunk(stats, _as_torch(X), Y, fold)
    if not bool(keep.any()):
        return stats
    if Xt.dtype != torch.float16 or Xt.device != stats.device or Xt.device.type != "cuda":
        raise ValueError("the cuda backend needs float16 X on the statistics' CUDA device")
    if Xt.stride(2) != 1:
        Xt = Xt.contiguous()
    B, r, m = Xt.shape
    k = Yc.shape[1]
    z = dict(dtype=torch.float64, device=stats.device)
    sx, sxx = torch.zeros(B, 1, m, **z), torch.zeros(B, 1, m, **z)
    sxy = torch.zeros(B, 1, m, k, **z)
    moments(Xt, Yc.to(torch.float32).contiguous(), stats.shift.to(torch.float32).contiguous(),
            sx, sxy, sxx, fold=fold01, n_folds=1)
    stats.add_moments(keep, sx[:, 0], sxx[:, 0], sxy[:, 0], Yc)
    return stats


def weighted_gram(X, w, out=None) -> torch.Tensor:
    """G[b, m] = Σ_i w[m, i] x_{b,i} x_{b,i}ᵀ with the WMMA kernel: X (B, n, d) float16 on a
    CUDA device (torch or CuPy), w (M, n). x·w is split into fp16 hi + lo parts (two MMAs,
    ~2⁻²² relative per product), float32 accumulation per tile over all rows, float64 totals.
    Returns (B, M, d, d) float32, or adds into ``out`` (float32/float64) and returns it."""
    if _ext is None or "weighted_gram" in missing_ops():
        raise RuntimeError(unavailable_reason() if _ext is None else
                           "probes._C_cuda lacks weighted_gram: rebuild it (pip install -e .)")
    Xt, wt = check_weighted(X, w, out)
    if Xt.dtype != torch.float16:
        raise ValueError(f"the cuda backend needs float16 activations, got {Xt.dtype}; use "
                         "backend='triton' for bfloat16/float32")
    if Xt.device.type != "cuda":
        raise ValueError(f"the cuda backend needs X on a CUDA device, got {Xt.device}")
    if Xt.stride(2) != 1:
        Xt = Xt.contiguous()
    B, n, d = Xt.shape
    M = wt.shape[0]
    scale = pow2_scale(wt)
    w32 = (wt / scale.to(wt.dtype)[:, None]).to(torch.float32).contiguous()
    direct = out is not None and out.dtype == torch.float64 and out.is_contiguous()
    res = out if out is not None else torch.empty(B, M, d, d, dtype=torch.float32,
                                                  device=Xt.device)
    # float64 sums of a group of layers at a time (at most ~2 GiB), then added into res
    group = B if direct else max(1, (1 << 28) // max(1, M * d * d))
    for b0 in range(0, B if B * M and d and n else 0, group):
        nb = min(group, B - b0)
        G = res[b0:b0 + nb] if direct else torch.zeros(nb, M, d, d, dtype=torch.float64,
                                                        device=Xt.device)
        with torch.cuda.device(Xt.device):
            _ext.weighted_gram(int(Xt[b0].data_ptr()), nb, Xt.stride(0), Xt.stride(1), n, d,
                               int(w32.data_ptr()), M, int(scale.data_ptr()), int(G.data_ptr()),
                               int(torch.cuda.current_stream(Xt.device).cuda_stream))
        if direct:
            continue
        if out is None:
            res[b0:b0 + nb] = G
        else:
            res[b0:b0 + nb] += G.to(res.dtype)
    if out is None and not (B * M and d and n):
        res.zero_()
    return res
