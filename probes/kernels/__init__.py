"""Backend dispatch for the statistics pass.

``gram_update(stats, X, Y, fold=None, backend="auto")`` adds one chunk of rows into a
:class:`probes.stats.GramStats`. Backends (imported lazily, each a module exposing
``gram_update(stats, X, Y, fold, **options)``):

- ``torch``  : probes.kernels.reference — float64 torch, the reference for every other backend
- ``cpu``    : probes.kernels.cpu — the C++/OpenMP kernel in ``actstore._native``
- ``triton`` : probes.kernels.triton_kernels — fused Triton kernel (CUDA tensors)
- ``cuda``   : probes.kernels.cuda — CUDA C++ kernel in ``actstore._native_cuda``

A backend module may define ``is_available() -> bool`` (checked before use); without it, a
successful import means available. ``auto`` picks triton, then cuda, for CUDA inputs, else cpu
(torch if the compiled module lacks the kernel).
"""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["BACKENDS", "BackendUnavailable", "available_backends", "resolve_backend",
           "get_backend", "gram_update", "benchmark_gram_update", "preferred_chunk_rows",
           "GRAM_BLOCK_ROWS"]

BACKENDS = ("torch", "cpu", "triton", "cuda")
_MODULES = {
    "torch": "probes.kernels.reference",
    "cpu": "probes.kernels.cpu",
    "triton": "probes.kernels.triton_kernels",
    "cuda": "probes.kernels.cuda",
}


class BackendUnavailable(ValueError):
    """A named backend cannot run here (not built, not installed, or no device)."""


def _load(name: str) -> tuple[ModuleType | None, str]:
    """(module, "") if the backend can run here, else (None, reason)."""
    try:
        mod = importlib.import_module(_MODULES[name])
    except ImportError as exc:  # missing optional dependency or module not written/built
        return None, f"{_MODULES[name]} cannot be imported: {exc}"
    check = getattr(mod, "is_available", None)
    if check is not None:
        try:
            ok = bool(check())
        except Exception as exc:  # noqa: BLE001 - report any probe failure as unavailability
            return None, f"{name} availability check failed: {exc}"
        if not ok:
            reason = getattr(mod, "unavailable_reason", None)
            return None, (reason() if callable(reason) else f"{name} backend is not available here")
    return mod, ""


def available_backends() -> list[str]:
    """Names of the backends that can run in this process, in BACKENDS order."""
    return [b for b in BACKENDS if _load(b)[0] is not None]


def _device_type(device) -> str:
    if device is None:
        return "cpu"
    import torch

    return torch.device(device).type


def resolve_backend(name: str = "auto", device=None, gpu_order=("triton", "cuda")) -> str:
    """The concrete backend for ``name`` given the data's device (torch.device, str or None).

    auto: for data on CUDA the first of ``gpu_order`` that can run (the Gram statistics: Triton,
    then the CUDA module), else "cpu" (or "torch" when the compiled kernel is missing).
    A named backend that cannot run raises BackendUnavailable with the reason.
    """
    if name is None:
        name = "auto"
    name = str(name).lower()
    if name == "auto":
        if _device_type(device) == "cuda":
            for cand in gpu_order:
                if _load(cand)[0] is not None:
                    return cand
        return "cpu" if _load("cpu")[0] is not None else "torch"
    if name not in _MODULES:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    mod, reason = _load(name)
    if mod is None:
        raise BackendUnavailable(f"backend {name!r} is not available: {reason}")
    return name


def get_backend(name: str) -> ModuleType:
    """The backend module for a concrete name (after :func:`resolve_backend`)."""
    mod, reason = _load(name)
    if mod is None:
        raise BackendUnavailable(f"backend {name!r} is not available: {reason}")
    return mod


def _device_of(X):
    dev = getattr(X, "device", None)  # torch tensors (and CuPy arrays) carry a device
    if dev is None:
        return None
    try:
        import torch

        return dev if isinstance(dev, torch.device) else torch.device("cuda", int(getattr(dev, "id", 0)))
    except Exception:  # noqa: BLE001
        return None


def gram_update(stats, X, Y, fold=None, backend: str = "auto", precision: str | None = None):
    """Add one chunk into ``stats`` and return it.

    X (B, r, d) float16 (float32/float64 accepted), numpy or torch, CPU or CUDA; Y (r, k);
    fold (r,) int with values in [0, F) or -1 (row skipped), None = every row in fold 0 (F == 1).
    ``precision``: "float32" (blocks of rows summed in float32, added into float64 totals) or
    "float64" (double throughout); None = the backend's default (float32 for compiled backends,
    float64 for torch).
    """
    name = resolve_backend(backend, _device_of(X))
    mod = get_backend(name)
    opts = {} if precision is None else {"precision": precision}
    mod.gram_update(stats, X, Y, fold, **opts)
    return stats


def benchmark_gram_update(B: int, r: int, d: int, k: int = 2, n_folds: int = 1, backend: str = "cpu",
                          precision: str | None = None, repeat: int = 3, seed: int = 0) -> dict:
    """Time one ``gram_update`` of a random fp16 chunk (B, r, d) against its float32 floor.

    The floor is the same matrix product done by the platform's float32 BLAS, per layer:
    ``A.T @ A`` (numpy on CPU, which calls SYRK, i.e. r·d·(d+1) flops) and a general product
    ``Aᵀ @ A'`` of two distinct buffers (GEMM, 2·r·d² flops); torch.matmul on CUDA for GPU
    backends. Returns seconds (best of ``repeat``) and GFLOP/s counted as 2·B·r·d² for all three,
    so the numbers compare time for the same product; ``ratio_gemm`` = ours / GEMM seconds.
    """
    import time

    import numpy as np
    import torch

    from probes.stats import GramStats, choose_shift

    rng = np.random.default_rng(seed)
    Xn = rng.standard_normal((B, r, d), dtype=np.float32).astype(np.float16)
    Yn = rng.standard_normal((r, k))
    fold = (np.arange(r) % n_folds).astype(np.int32)
    name = resolve_backend(backend, "cuda" if backend in ("cuda", "triton") else None)
    on_gpu = name in ("cuda", "triton")
    dev = torch.device("cuda" if on_gpu else "cpu")
    X = torch.from_numpy(Xn).to(dev) if on_gpu else Xn
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    shift = choose_shift(Xn[:, : min(r, 1024)])

    def best(fn):
        ts = []
        for _ in range(max(1, repeat)):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    stats = GramStats.zeros(B, d, k, n_folds, shift=shift, device=dev)
    t_ours = best(lambda: gram_update(stats, X, Yn, fold, backend=name, precision=precision))
    if on_gpu:
        A = torch.from_numpy(Xn).to(dev).float()
        A2 = A.clone()
        t_syrk = best(lambda: [A[b].T @ A[b] for b in range(B)])
        t_gemm = best(lambda: [A[b].T @ A2[b] for b in range(B)])
    else:
        A = Xn.astype(np.float32)
        A2 = A.copy()
        t_syrk = best(lambda: [A[b].T @ A[b] for b in range(B)])
        t_gemm = best(lambda: [A[b].T @ A2[b] for b in range(B)])
    flops = 2.0 * B * r * d * d
    return {
        "backend": name, "precision": precision or ("float64" if name == "torch" else "float32"),
        "B": B, "r": r, "d": d, "k": k, "n_folds": n_folds,
        "seconds": t_ours, "gflops": flops / t_ours / 1e9,
        "floor_syrk_seconds": t_syrk, "floor_syrk_gflops": flops / t_syrk / 1e9,
        "floor_gemm_seconds": t_gemm, "floor_gemm_gflops": flops / t_gemm / 1e9,
        "ratio_gemm": t_ours / t_gemm, "ratio_syrk": t_ours / t_syrk,
    }


#: rows the compiled CPU kernel sums in float32 before adding into the float64 totals
GRAM_BLOCK_ROWS = 2048


def preferred_chunk_rows(d: int, B: int = 1, n_folds: int = 1, max_bytes: int | None = None,
                         itemsize: int = 2) -> int:
    """Rows per ``gram_update`` call that keep the CPU kernel near its peak.

    Each call ends by adding its sums into the float64 totals (B·F·d² values read and written), so
    small calls at large d are memory-bound: at d = 4096, 128-row calls take about twice as long as
    2048-row calls. The answer is GRAM_BLOCK_ROWS rows per fold (rows are split among folds),
    lowered if one chunk of B layers would exceed ``max_bytes`` (at ``itemsize`` bytes a value),
    never below 64. Small d (<= 256) gains nothing from large chunks: 512.
    """
    rows = GRAM_BLOCK_ROWS * max(1, int(n_folds)) if d > 256 else 512
    if max_bytes is not None:
        rows = min(rows, int(max_bytes) // max(1, int(B) * int(d) * int(itemsize)))
    return max(64, int(rows))


def fold_groups(f, n_folds: int):
    """Rows grouped by fold, on the host: ``f`` (r,) integer fold ids (-1 = skip) as numpy.
    Returns (order, counts, off): ``order`` int32 row indices sorted by fold with skipped rows
    dropped, or None when every row is in fold 0 (no gather needed); ``counts`` (F,) int64;
    ``off`` (F+1,) int64 offsets of each fold in ``order``. The GPU backends move ``order``
    to the device their own way (torch or CuPy)."""
    import numpy as np

    f = np.asarray(f).astype(np.int64).reshape(-1)
    counts = np.bincount(f[f >= 0], minlength=n_folds)[:n_folds]
    off = np.zeros(n_folds + 1, dtype=np.int64)
    off[1:] = np.cumsum(counts)
    if n_folds == 1 and counts[0] == len(f):
        return None, counts, off
    order = np.argsort(f, kind="stable")
    return order[f[order] >= 0].astype(np.int32), counts, off
