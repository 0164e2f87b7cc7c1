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
           "get_backend", "gram_update"]

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


def resolve_backend(name: str = "auto", device=None) -> str:
    """The concrete backend for ``name`` given the data's device (torch.device, str or None).

    auto: "triton" if the data is on CUDA and Triton works, else "cuda" if the data is on CUDA and
    the CUDA module was built, else "cpu" (or "torch" when the compiled kernel is missing).
    A named backend that cannot run raises BackendUnavailable with the reason.
    """
    if name is None:
        name = "auto"
    name = str(name).lower()
    if name == "auto":
        if _device_type(device) == "cuda":
            for cand in ("triton", "cuda"):
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
