"""The statistics kernels: one op set, several backends (docs/fastprobe.md, "Backends").

``backend`` holds the :class:`~probes.kernels.backend.Backend` protocol, the registry, THE
resolver of backend and device (:func:`resolve`) and the dispatching ops :func:`gram_update`,
:func:`neuron_update` and :func:`weighted_gram` (the Newton Hessian XᵀWX); ``reference``
(torch float64, the oracle), ``cpu`` (C++/OpenMP, ``probes._C``), ``cuda`` (CUDA C++,
``probes._C_cuda``) and ``triton`` implement them; ``weighted`` holds the weighted Gram's
shared checks.
"""
from __future__ import annotations

from probes.errors import BackendUnavailable
from probes.kernels.backend import (
    BACKENDS,
    GRAM_BLOCK_ROWS,
    NEURON_GPU_ORDER,
    OPS,
    Backend,
    available_backends,
    get_backend,
    gram_update,
    neuron_update,
    preferred_chunk_rows,
    resolve,
    resolve_backend,
    weighted_gram,
)

__all__ = ["BACKENDS", "Backend", "BackendUnavailable", "GRAM_BLOCK_ROWS", "NEURON_GPU_ORDER",
           "OPS", "available_backends", "get_backend", "gram_update", "neuron_update",
           "preferred_chunk_rows", "resolve", "resolve_backend", "weighted_gram"]
