"""The native fp16 overflow scan against a numpy reference, its crc32c against the definition
and google_crc32c."""
import os

import numpy as np
import pytest

from actstore import _native, native


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


def crc32c_bitwise(data: bytes) -> int:
    """CRC32C one bit at a time from its definition (reflected polynomial 0x82F63B78)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 100, 1023])
def test_crc32c_matches_its_definition(n):
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
    want = crc32c_bitwise(data)
    assert native.crc32c(data) == want
    assert _native.crc32c(data, portable=True) == want
    assert native.crc32c(b"123456789") == 0xE3069283    # the standard check value


# around the three-stream round of 3 x 4096 bytes, and several rounds plus a tail
@pytest.mark.parametrize("n", [12287, 12288, 12289, 3 * 12288 + 13, 1_000_003])
def test_crc32c_matches_google_crc32c_on_long_input(n):
    import google_crc32c  # zarr's CRC32C (a zarr dependency)

    rng = np.random.default_rng(n)
    data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    want = int(google_crc32c.value(data))
    assert native.crc32c(data) == want
    assert _native.crc32c(data, portable=True) == want
    k = int(rng.integers(0, n))       # continuing from a previous result
    assert _native.crc32c(data[k:], _native.crc32c(data[:k])) == want


def test_crc32c_combine_joins_two_checksums():
    rng = np.random.default_rng(7)
    for na, nb in [(0, 5), (5, 0), (1, 1), (100, 3), (4096, 70_001), (1 << 20, 12345)]:
        a = rng.integers(0, 256, na, dtype=np.uint8).tobytes()
        b = rng.integers(0, 256, nb, dtype=np.uint8).tobytes()
        assert _native.crc32c_combine(native.crc32c(a), native.crc32c(b), nb) == \
            native.crc32c(a + b)


def test_crc32c_reads_arrays_in_place_and_copies_only_strided_ones():
    x = np.random.default_rng(1).normal(size=(3, 50, 37)).astype(np.float16)
    assert native.crc32c(x[1]) == crc32c_bitwise(x[1].tobytes())
    assert native.crc32c(x[:, :, 2]) == crc32c_bitwise(np.ascontiguousarray(x[:, :, 2]).tobytes())
    with pytest.raises(ValueError, match="C-contiguous"):
        _native.crc32c(x[:, :, 2])


@pytest.mark.parametrize("sizes", [[1], [5, 70_000, 3], [1_500_000, 2_000_001], [0, 10]])
def test_pread_crc_reads_spans_in_order_with_each_crc(tmp_path, sizes):
    rng = np.random.default_rng(len(sizes))
    data = rng.integers(0, 256, sum(sizes) + 100, dtype=np.uint8).tobytes()
    f = tmp_path / "blob"
    f.write_bytes(data)
    bufs = [np.empty(n, np.uint8) for n in sizes]
    fd = os.open(f, os.O_RDONLY)
    try:
        got, crcs = native.pread_crc(fd, 7, bufs)
        assert got == sum(sizes)
        at = 7
        for b, c in zip(bufs, crcs):
            assert bytes(b) == data[at:at + b.size]
            assert c == native.crc32c(data[at:at + b.size])
            at += b.size
        # the file ends inside the second buffer: fewer bytes, and no error
        short = [np.empty(50, np.uint8), np.empty(10**6, np.uint8)]
        got, _ = native.pread_crc(fd, len(data) - 80, short)
        assert got == 80
        with pytest.raises(ValueError, match="C-contiguous"):
            native.pread_crc(fd, 0, [np.empty((4, 4), np.uint8)[:, 1]])
    finally:
        os.close(fd)
    with pytest.raises(OSError):
        native.pread_crc(fd, 0, [np.empty(4, np.uint8)])      # a closed descriptor
