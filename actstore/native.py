"""Access to the compiled kernels (``actstore._native``, C++/OpenMP; ``actstore._native_cuda``).

The CPU module is part of every install; the CUDA module exists only where nvcc was found at
build time. Import errors are turned into one clear message instead of a bare ImportError.
"""
from __future__ import annotations

import numpy as np

try:
    from actstore import _native as cpu  # noqa: F401
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "actstore's compiled module is missing; reinstall with `pip install .` "
        f"(a C++17 compiler and CMake are needed): {exc}"
    ) from exc

try:
    from actstore import _native_cuda as cuda  # noqa: F401
except ImportError:
    cuda = None

FP16_MAX = 65504.0


def find_fp16_overflow(x: np.ndarray) -> int:
    """Flat index of the first value float16 cannot hold (|x| > 65504, inf, NaN), or -1."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return int(cpu.find_fp16_overflow(x.reshape(-1)))
