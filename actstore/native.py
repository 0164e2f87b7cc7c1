"""The compiled helpers of ``actstore._native`` (C++/OpenMP): the fp16 overflow scan the
extractor runs on every batch before narrowing to float16, and the crc32c of a store's blocks.

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

__all__ = ["FP16_MAX", "OPENMP", "find_fp16_overflow", "crc32c", "pread_crc"]

FP16_MAX = 65504.0
#: whether the scan was built with OpenMP (runs on all cores)
OPENMP: bool = bool(_native.openmp)


def find_fp16_overflow(x: np.ndarray) -> int:
    """Flat index of the first value float16 cannot hold (|x| > 65504, inf, NaN), or -1."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return int(_native.find_fp16_overflow(x.reshape(-1)))


def crc32c(data) -> int:
    """crc32c (Castagnoli) of ``bytes`` or of an array's C-order bytes, read in place (a
    non-contiguous array is copied first). Hardware instructions where the CPU has them."""
    if isinstance(data, np.ndarray) and not data.flags.c_contiguous:
        data = np.ascontiguousarray(data)
    return int(_native.crc32c(data))


def pread_crc(fd: int, offset: int, buffers: list) -> tuple[int, list[int]]:
    """Read file ``fd`` from ``offset`` into the C-contiguous numpy ``buffers``, one after
    another, returning (bytes read, crc32c of each buffer). The caller reads while a helper
    thread checksums in cache-sized pieces, so the check costs little beyond the read. Fewer
    bytes than the buffers hold: the file ended. A failed read raises OSError."""
    got, crcs = _native.pread_crc(int(fd), int(offset), list(buffers))
    return int(got), [int(c) for c in crcs]
