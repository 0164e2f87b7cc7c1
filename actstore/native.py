"""The compiled fp16 overflow scan (``actstore._native``, C++/OpenMP) the extractor runs on
every batch before narrowing to float16.

The module is part of every install; an import error becomes one clear message instead of a bare
ImportError. The probe kernels are compiled into ``probes._C`` / ``probes._C_cuda``.
"""
from __future__ import annotations

import numpy as np

try:
    from actstore import _native
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "actstore's compiled module is missing; reinstall with `pip install .` "
        f"(a C++17 compiler and CMake are needed): {exc}"
    ) from exc

__all__ = ["FP16_MAX", "OPENMP", "find_fp16_overflow"]

FP16_MAX = 65504.0
#: whether the scan was built with OpenMP (runs on all cores)
OPENMP: bool = bool(_native.openmp)


def find_fp16_overflow(x: np.ndarray) -> int:
    """Flat index of the first value float16 cannot hold (|x| > 65504, inf, NaN), or -1."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return int(_native.find_fp16_overflow(x.reshape(-1)))
