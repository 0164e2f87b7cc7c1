"""The native fp16 overflow scan against a numpy reference."""
import numpy as np
import pytest

from actstore import native


def reference(x: np.ndarray) -> int:
    bad = np.flatnonzero(~(np.abs(x.reshape(-1).astype(np.float32)) <= 65504.0))
    return int(bad[0]) if bad.size else -1


@pytest.mark.parametrize("n", [0, 1, 7, 4095, 4097, 65536 * 3 + 5])
def test_scan_matches_numpy_on_random_input(n):
    rng = np.random.default_rng(n)
    x = rng.normal(scale=1000.0, size=n).astype(np.float32)
    assert native.find_fp16_overflow(x) == reference(x) == -1
    for _ in range(5):
        if n == 0:
            break
        y = x.copy()
        idx = rng.choice(n, size=min(n, 3), replace=False)
        y[idx] = rng.choice([65504.5, -7e4, np.inf, -np.inf, np.nan], size=idx.size)
        assert native.find_fp16_overflow(y) == reference(y) == int(idx.min())


def test_scan_boundary_values_and_shapes():
    x = np.array([[65504.0, -65504.0], [0.0, 1e-8]], dtype=np.float32)
    assert native.find_fp16_overflow(x) == -1  # the fp16 maximum itself fits
    x[1, 1] = np.nextafter(np.float32(65504.0), np.float32(np.inf))
    assert native.find_fp16_overflow(x) == 3
    # non-contiguous and float64 input are converted, indices are of the C-order flattening
    big = np.zeros((4, 6), dtype=np.float64)
    big[2, 4] = 1e5
    assert native.find_fp16_overflow(big[:, ::2]) == 2 * 3 + 2


def test_module_reports_openmp():
    assert isinstance(native.OPENMP, bool)
