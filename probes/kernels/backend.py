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
from probes.errors import BackendUnavailable

__all__ = ["BACKENDS", "BackendUnavailable", "available_backends", "resolve_backend", "resolve",
           "get_backend", "gram_update", "neuron_update", "NEURON_GPU_ORDER", "preferred_chunk_rows",
           "GRAM_BLOCK_ROWS"]

BACKENDS = ("torch", "cpu", "triton", "cuda")
_MODULES = {
    "torch": "probes.kernels.reference",
    "cpu": "probes.kernels.cpu",
    "triton": "probes.kernels.triton_kernels",
    "cuda": "probes.kernels.cuda",
}


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


def resolve(backend: str | None = "auto", device=None, gpu_order=("triton", "cuda")):
    """THE resolver of where and how the numbers are computed: ``(backend name, torch.device)``.

    device: as given, else cuda for the cuda/triton backends and for auto when a GPU is
    present, else cpu. backend: :func:`resolve_backend` for data on that device
    (``gpu_order``: auto's preference on a GPU). A CUDA device without a GPU, an unknown or
    unavailable backend: :class:`BackendUnavailable` with the reason.
    """
    import torch

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


def _on_cuda(X) -> bool:
    import torch

    if isinstance(X, torch.Tensor):
        return X.device.type == "cuda"
    return hasattr(X, "__cuda_array_interface__")


#: auto's order for the moments on a GPU: the CUDA kernel read 11008-column activations at 67 %
#: of the H200's copy ceiling, the Triton one at 19 % (bench/RESULTS.md, 27 Nov 2026)
NEURON_GPU_ORDER = ("cuda", "triton")


def neuron_update(stats, X, Y, fold=None, backend: str = "auto"):
    """Add one chunk X (B, r, m) float16 with targets Y (r, k) into ``stats``.

    backend: auto (for CUDA data the first of NEURON_GPU_ORDER that runs; else cpu, else
    torch) | torch | cpu | triton | cuda.
    """
    name = (backend or "auto").lower()
    if name == "auto":
        if _on_cuda(X):
            for cand in NEURON_GPU_ORDER:
                try:
                    return get_backend(cand).neuron_update(stats, X, Y, fold)
                except (BackendUnavailable, ImportError):
                    continue
        from probes.kernels.cpu import _neuron_available
        name = "cpu" if _neuron_available() else "torch"
    if name not in _MODULES:
        raise BackendUnavailable(f"unknown backend {backend!r}; choose auto, "
                                 f"{', '.join(BACKENDS)}")
    return get_backend(name).neuron_update(stats, X, Y, fold)


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
