"""The backend registry, THE resolver of backend and device, and the dispatching ops.

A backend is a module that implements :class:`Backend`: every op of :data:`OPS`, plus
``is_available()`` / ``unavailable_reason()`` (can it run here at all) and ``missing_ops()``
(the ops it cannot run in this build although available, e.g. a stale compiled module).
``torch`` = :mod:`probes.kernels.reference` (float64, the oracle), ``cpu`` = C++/OpenMP
(``probes._C``), ``triton`` = fused Triton kernels, ``cuda`` = CUDA C++ (``probes._C_cuda``).
``auto`` picks, for CUDA data, the first runnable backend of a GPU order (the Gram statistics:
triton then cuda; the neuron moments: :data:`NEURON_GPU_ORDER`), else cpu, else torch.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Protocol, runtime_checkable

from probes.errors import BackendUnavailable

__all__ = ["BACKENDS", "Backend", "BackendUnavailable", "OPS", "available_backends",
           "resolve_backend", "resolve", "get_backend", "gram_update", "neuron_update",
           "NEURON_GPU_ORDER", "preferred_chunk_rows", "GRAM_BLOCK_ROWS", "weighted_gram",
           "WEIGHTED_GPU_ORDER"]

BACKENDS = ("torch", "cpu", "triton", "cuda")
#: the ops every backend implements (or lists in its ``missing_ops()``)
OPS = ("gram_update", "neuron_update", "weighted_gram")
_MODULES = {
    "torch": "probes.kernels.reference",
    "cpu": "probes.kernels.cpu",
    "triton": "probes.kernels.triton",
    "cuda": "probes.kernels.cuda",
}


@runtime_checkable
class Backend(Protocol):
    """What a backend module provides (checked when it is loaded)."""

    def is_available(self) -> bool:
        """Whether the backend can run in this process (built, device present)."""

    def unavailable_reason(self) -> str:
        """One actionable line saying why it cannot run ("" when it can)."""

    def missing_ops(self) -> tuple[str, ...]:
        """The ops of OPS this build cannot run although the backend is available."""

    def gram_update(self, stats, X, Y, fold=None, **options):
        """Add one chunk X (B, r, d), Y (r, k), fold (r,) into a GramStats; return it."""

    def neuron_update(self, stats, X, Y, fold=None, **options):
        """Add one chunk X (B, r, m), Y (r, k), fold (r,) into a NeuronStats; return it."""

    def weighted_gram(self, X, w, out=None, **options):
        """G[b, m] = Σ_i w[m, i] x_{b,i} x_{b,i}ᵀ, (B, M, d, d) float32, or added into out."""


def _load(name: str) -> tuple[ModuleType | None, str]:
    """(module, "") if the backend can run here, else (None, reason)."""
    try:
        mod = importlib.import_module(_MODULES[name])
    except ImportError as exc:  # missing optional dependency or module not built
        return None, f"{_MODULES[name]} cannot be imported: {exc}"
    if not isinstance(mod, Backend):
        lacking = [a for a in ("is_available", "unavailable_reason", "missing_ops") + OPS
                   if not callable(getattr(mod, a, None))]
        return None, f"{_MODULES[name]} does not implement the Backend protocol: {lacking}"
    try:
        ok = bool(mod.is_available())
    except Exception as exc:  # noqa: BLE001 - report any probe failure as unavailability
        return None, f"{name} availability check failed: {exc}"
    return (mod, "") if ok else (None, mod.unavailable_reason())


def _lacks(name: str, op: str | None) -> str:
    """Why backend ``name`` cannot run ``op`` here ("" when it can; op None: any op)."""
    mod, reason = _load(name)
    if mod is None:
        return reason
    if op is not None and op in mod.missing_ops():
        return f"{name} lacks {op} in this build: {mod.unavailable_reason()}"
    return ""


def available_backends() -> list[str]:
    """Names of the backends that can run in this process, in BACKENDS order."""
    return [b for b in BACKENDS if _load(b)[0] is not None]


def _device_type(device) -> str:
    """The type ("cuda", "cpu", ...) of a torch.device, a string such as "cuda:1", or None
    (host data); parsed without torch, which ``fastprobe --help`` must not load."""
    if device is None:
        return "cpu"
    return getattr(device, "type", None) or str(device).split(":")[0]


def resolve_backend(name: str = "auto", device=None, gpu_order=("triton", "cuda"),
                    op: str | None = None) -> str:
    """The concrete backend for ``name`` given the data's device (torch.device, str or None).

    auto: for data on CUDA the first of ``gpu_order`` that can run (``op``, if given), else
    "cpu" (or "torch" when the compiled kernel is missing). A named backend that cannot run
    (that op) raises BackendUnavailable with the reason.
    """
    name = "auto" if name is None else str(name).lower()
    if name == "auto":
        if _device_type(device) == "cuda":
            for cand in gpu_order:
                if not _lacks(cand, op):
                    return cand
        return "cpu" if not _lacks("cpu", op) else "torch"
    if name not in _MODULES:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of auto, "
                                 f"{', '.join(BACKENDS)}")
    reason = _lacks(name, op)
    if reason:
        raise BackendUnavailable(f"backend {name!r} is not available: {reason}")
    return name


def resolve(backend: str | None = "auto", device=None, gpu_order=("triton", "cuda")):
    """THE resolver of where and how the numbers are computed: ``(backend name, torch.device)``.

    device: as given, else cuda for the cuda/triton backends and for auto when a GPU is
    present, else cpu. backend: :func:`resolve_backend` for data on that device
    (``gpu_order``: auto's preference on a GPU). A CUDA device without a GPU, an unknown or
    unavailable backend: :class:`BackendUnavailable` with the reason.
    """
    import torch  # deferred: the CLIs import this module to build their parsers, without torch

    name = "auto" if backend is None else str(backend).lower()
    if device is None:
        gpu = name in ("cuda", "triton") or (name == "auto" and torch.cuda.is_available())
        device = "cuda" if gpu else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable(f"backend {name!r} / device {dev} needs a CUDA GPU and none "
                                 "is available")
    return resolve_backend(name, dev, gpu_order), dev


def get_backend(name: str) -> ModuleType:
    """The backend module for a concrete name (after :func:`resolve_backend`)."""
    mod, reason = _load(name)
    if mod is None:
        raise BackendUnavailable(f"backend {name!r} is not available: {reason}")
    return mod


def _device_of(X):
    """The device of a torch tensor (torch.device) or a CUDA array (``__cuda_array_interface__``,
    "cuda:N"); None for host arrays (numpy's ``.device`` is the string "cpu")."""
    if type(X).__module__.split(".")[0] == "torch":
        return X.device
    if hasattr(X, "__cuda_array_interface__"):
        return f"cuda:{int(getattr(getattr(X, 'device', None), 'id', 0) or 0)}"
    return None


def gram_update(stats, X, Y, fold=None, backend: str = "auto", precision: str | None = None):
    """Add one chunk into ``stats`` and return it.

    X (B, r, d) float16 (float32/float64 accepted), numpy or torch, CPU or CUDA; Y (r, k);
    fold (r,) int with values in [0, F) or -1 (row skipped), None = every row in fold 0 (F == 1).
    ``precision``: "float32" (blocks of rows summed in float32, added into float64 totals) or
    "float64" (double throughout); None = the backend's default (float32 for compiled backends,
    float64 for torch).
    """
    name = resolve_backend(backend, _device_of(X), op="gram_update")
    opts = {} if precision is None else {"precision": precision}
    get_backend(name).gram_update(stats, X, Y, fold, **opts)
    return stats


#: auto's order for the moments on a GPU: the CUDA kernel reads wide neuron activations several
#: times as fast as the Triton one (bench/RESULTS.md, "GPU statistics kernels and extraction —
#: NVIDIA H200, 2026-11-27 14:08–14:31 UTC (session 3)", neuron correlations)
NEURON_GPU_ORDER = ("cuda", "triton")


def neuron_update(stats, X, Y, fold=None, backend: str = "auto"):
    """Add one chunk X (B, r, m) float16 with targets Y (r, k) into ``stats``.

    backend: auto (for CUDA data the first of NEURON_GPU_ORDER that runs; else cpu, else
    torch) | torch | cpu | triton | cuda.
    """
    name = resolve_backend(backend, _device_of(X), NEURON_GPU_ORDER, op="neuron_update")
    return get_backend(name).neuron_update(stats, X, Y, fold)


#: auto's order for the weighted Gram on a GPU (not yet measured against each other)
WEIGHTED_GPU_ORDER = ("triton", "cuda")


def weighted_gram(X, w, *, backend: str = "auto", out=None):
    """The weighted Gram of every layer for several weight sets: the Newton/IRLS Hessian XᵀWX.

    Parameters
    ----------
    X : array (B, n, d) float16, bfloat16 or float32 (float64 accepted), numpy or torch, CPU
        or CUDA: B layers, n rows, d features (no shift is subtracted).
    w : array (M, n) or (n,) float32/float64 row weights, M weight sets (e.g. folds × Newton
        problems); any finite values, negative allowed.
    backend : auto (for CUDA data the first of WEIGHTED_GPU_ORDER that runs, else cpu, else
        torch) | torch (float64 reference) | cpu | triton | cuda.
    out : None, or a float32/float64 torch tensor (B, M, d, d) on X's device that the result
        is ADDED into (stream over row chunks by calling once per chunk).

    Returns
    -------
    torch.Tensor
        (B, M, d, d) float32 (``out`` itself when given) with G[b, m] = Σ_i w[m, i] x_{b,i}
        x_{b,i}ᵀ, exactly symmetric. Precision: docs/fastprobe.md, "Weighted Gram".
    """
    name = resolve_backend(backend, _device_of(X), WEIGHTED_GPU_ORDER, op="weighted_gram")
    return get_backend(name).weighted_gram(X, w, out=out)


#: rows the compiled CPU kernel sums in float32 before adding into the float64 totals
GRAM_BLOCK_ROWS = 2048


def preferred_chunk_rows(d: int, B: int = 1, n_folds: int = 1, max_bytes: int | None = None,
                         itemsize: int = 2) -> int:
    """Rows per ``gram_update`` call that keep the CPU kernel near its peak.

    Each call ends by adding its sums into the float64 totals (B·F·d² values read and written), so
    small calls at large d are memory-bound (bench/RESULTS.md, "Measurements moved out of code
    comments"). The answer is GRAM_BLOCK_ROWS rows per fold (rows are split among folds),
    lowered if one chunk of B layers would exceed ``max_bytes`` (at ``itemsize`` bytes a value),
    never below 64. Small d (<= 256) gains nothing from large chunks: 512.
    """
    rows = GRAM_BLOCK_ROWS * max(1, int(n_folds)) if d > 256 else 512
    if max_bytes is not None:
        rows = min(rows, int(max_bytes) // max(1, int(B) * int(d) * int(itemsize)))
    return max(64, int(rows))
