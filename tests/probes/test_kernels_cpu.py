"""The C++/OpenMP statistics kernel (backend "cpu") against the torch float64 reference.

Tolerances, relative to the natural scale of each quantity:
- float64 mode: 1e-12 (double throughout; only the summation order differs from the reference);
- float32 mode: 2e-6 for Σx, ΣxyT and XᵀX (x - shift rounded to float32, XᵀX summed in float32
  over blocks of <= block_rows rows, then in float64; Σx and ΣxyT are summed in double), measured
  against natural scales: |err_ij| / sqrt(D_i D_j) with D the reference diagonal of XᵀX, and the
  same Cauchy-Schwarz scales for Σx and ΣxyT. n, Σy, ΣyyT: 1e-12 in both modes.
Both kernels of each precision run (AVX-512 where the CPU has it, and AVX2 forced by
PROBES_CPU_ISA=avx2).
Shapes are odd on purpose: d not a multiple of the 48/24/12-wide panels or of the 144/72-wide macro
tiles, r = 1, d > r, B = 1 and 3, k = 1..3, F = 1 and 5, rows skipped with fold -1, large offsets.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from bench.kernels import benchmark_gram_update
from probes.errors import BackendUnavailable
from probes.kernels import cpu as cpu_backend
from probes.kernels import gram_update, reference, resolve_backend
from probes.kernels.backend import OPS, Backend
from probes.stats import GramStats, choose_shift

pytestmark = pytest.mark.skipif(not cpu_backend.is_available(),
                                reason=cpu_backend.unavailable_reason())
_C = pytest.importorskip("probes._C")

FIELDS = ("n", "sx", "xtx", "sy", "yty", "xty")
TOL = {"float64": 1e-12, "float32": 2e-6}


def _chunk(rng, B, r, d, k, F, offset=0.0, skip=0.25):
    X = (rng.normal(size=(B, r, d)) * rng.uniform(0.5, 4.0, size=(B, 1, d))
         + offset * rng.uniform(-1, 1, size=(B, 1, d))).astype(np.float16)
    Y = rng.normal(size=(r, k)) * 2.0 + 5.0
    fold = rng.integers(0, F, size=r).astype(np.int32)
    fold[rng.random(r) < skip] = -1
    return X, Y, fold


def _assert_stats_close(got: GramStats, want: GramStats, precision: str):
    for name in ("n", "sy", "yty"):                     # double from the same inputs
        a, b = getattr(got, name), getattr(want, name)
        scale = max(float(b.abs().max()), 1e-300)
        err = float((a - b).abs().max()) / scale
        assert err <= 1e-12, f"{name}: relative error {err:.2e}"
    # Natural scales (Cauchy-Schwarz bounds of Σ|x|, Σ|x y|, Σ|x x|): the centred sums themselves
    # may be ~0, so relative-to-value would be meaningless for them.
    tol = TOL[precision]
    n = want.n.view(1, -1, 1)
    D = torch.diagonal(want.xtx, dim1=-2, dim2=-1)                          # (B, F, d)
    Dy = torch.diagonal(want.yty, dim1=-2, dim2=-1)                         # (F, k)
    checks = {
        "sx": (got.sx - want.sx, torch.sqrt(n * D)),
        "xty": (got.xty - want.xty, torch.sqrt(D.unsqueeze(-1) * Dy.unsqueeze(0).unsqueeze(-2))),
        "xtx": (got.xtx - want.xtx, torch.sqrt(D.unsqueeze(-1) * D.unsqueeze(-2))),
    }
    for name, (diff, scale) in checks.items():
        err = float((diff.abs() / scale.clamp_min(1e-300)).max())
        assert err <= tol, f"{name} ({precision}): relative error {err:.2e} > {tol:.0e}"
    assert torch.equal(got.xtx, got.xtx.transpose(-1, -2)), "xtx must be exactly symmetric"


#: each precision runs the AVX-512 kernel where the CPU has it; "-avx2" forces the AVX2 one, so
#: both are checked on an AVX-512 machine
MODES = ["float32", "float32-avx2", "float64", "float64-avx2"]


@contextlib.contextmanager
def _isa(mode):
    """The environment that selects ``mode``'s kernel; yields the precision to pass."""
    old = os.environ.get("PROBES_CPU_ISA")
    if mode.endswith("-avx2"):
        os.environ["PROBES_CPU_ISA"] = "avx2"
    try:
        yield mode.removesuffix("-avx2")
    finally:
        if old is None:
            os.environ.pop("PROBES_CPU_ISA", None)
        else:
            os.environ["PROBES_CPU_ISA"] = old


def _run_both(X, Y, fold, B, d, k, F, mode, shift=None, block_rows=2048, backend_input=None):
    shift = choose_shift(X, fold) if shift is None else shift
    want = GramStats.zeros(B, d, k, F, shift=shift)
    reference.gram_update(want, X, Y, fold)
    got = GramStats.zeros(B, d, k, F, shift=shift)
    Xi, Yi, fi = backend_input if backend_input is not None else (X, Y, fold)
    with _isa(mode) as precision:
        cpu_backend.gram_update(got, Xi, Yi, fi, precision=precision, block_rows=block_rows)
    return got, want


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B,r,d,k,F", [
    (1, 1, 1, 1, 1),        # a single row, a single column
    (1, 1, 37, 2, 5),       # r = 1 with F = 5
    (3, 45, 25, 3, 5),      # d one past a 24-wide panel (AVX2 float, AVX-512 double)
    (1, 64, 161, 1, 1),     # d > r, crosses macro tiles in every mode
    (3, 130, 13, 2, 1),     # B = 3, d < one panel
    (2, 90, 150, 3, 5),     # d just past a 144-column macro tile
    (1, 203, 77, 2, 1),     # r not a multiple of the 128-row inner step, d past a 48-wide panel
    (2, 70, 300, 1, 2),     # d past two 144-column macro tiles
])
def test_cpu_matches_reference(mode, B, r, d, k, F):
    rng = np.random.default_rng(1000 * B + 10 * r + d + k)
    X, Y, fold = _chunk(rng, B, r, d, k, F, offset=200.0)
    if r == 1:
        fold[:] = F - 1
    got, want = _run_both(X, Y, fold, B, d, k, F, mode)
    _assert_stats_close(got, want, mode.removesuffix("-avx2"))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("block_rows", [1, 7, 64])
def test_cpu_row_blocks(mode, block_rows):
    """Blocks smaller than a fold's rows: many flushes into the float64 totals."""
    rng = np.random.default_rng(block_rows)
    B, r, d, k, F = 2, 150, 30, 2, 3
    X, Y, fold = _chunk(rng, B, r, d, k, F, offset=10.0)
    got, want = _run_both(X, Y, fold, B, d, k, F, mode, block_rows=block_rows)
    _assert_stats_close(got, want, mode.removesuffix("-avx2"))


def test_gram_kernel_names_the_micro_kernel_of_each_mode():
    """Both precisions take the AVX-512 kernel exactly where the CPU has AVX-512, unless
    PROBES_CPU_ISA=avx2."""
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    isa = "avx512" if " avx512f" in flags else "avx2"
    old = os.environ.pop("PROBES_CPU_ISA", None)
    try:
        assert _C.gram_kernel(False) == f"{isa}-float"
        assert _C.gram_kernel(True) == f"{isa}-double"
    finally:
        if old is not None:
            os.environ["PROBES_CPU_ISA"] = old
    with _isa("float64-avx2"):
        assert (_C.gram_kernel(False), _C.gram_kernel(True)) == ("avx2-float", "avx2-double")


def test_cpu_fold_none_and_all_rows_skipped():
    rng = np.random.default_rng(7)
    X, Y, _ = _chunk(rng, 2, 33, 19, 2, 1)
    got, want = _run_both(X, Y, None, 2, 19, 2, 1, "float32")
    _assert_stats_close(got, want, "float32")
    s = GramStats.zeros(2, 19, 2, 3)
    cpu_backend.gram_update(s, X, Y, np.full(33, -1, np.int32))
    for name in FIELDS:
        assert float(getattr(s, name).abs().max()) == 0.0


def test_cpu_accumulates_over_chunks_and_torch_input():
    rng = np.random.default_rng(8)
    B, d, k, F = 3, 41, 1, 5
    X, Y, fold = _chunk(rng, B, 200, d, k, F, offset=50.0)
    shift = choose_shift(X[:, :60], fold[:60])
    want = GramStats.zeros(B, d, k, F, shift=shift)
    reference.gram_update(want, X, Y, fold)
    got = GramStats.zeros(B, d, k, F, shift=shift)
    for a, b in ((0, 60), (60, 61), (61, 200)):     # includes a one-row chunk
        gram_update(got, torch.from_numpy(X[:, a:b]), torch.from_numpy(Y[a:b, 0]),
                    torch.from_numpy(fold[a:b]), backend="cpu", precision="float64")
    _assert_stats_close(got, want, "float64")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cpu_float_inputs(dtype):
    rng = np.random.default_rng(9)
    X = rng.normal(size=(2, 50, 29)).astype(dtype) + 3.0
    Y = rng.normal(size=(50, 2))
    fold = rng.integers(-1, 2, size=50).astype(np.int32)
    got, want = _run_both(X, Y, fold, 2, 29, 2, 2, "float64")
    _assert_stats_close(got, want, "float64")


def test_cpu_shift_not_float32_and_noncontiguous_stats():
    """A user shift float32 cannot hold, and stats the kernel cannot write in place, still work."""
    rng = np.random.default_rng(10)
    X, Y, fold = _chunk(rng, 2, 70, 26, 2, 2, offset=30.0)
    shift = choose_shift(X) + 1e-9                       # not representable in float32
    got, want = _run_both(X, Y, fold, 2, 26, 2, 2, "float32", shift=shift)
    assert torch.equal(got.shift, want.shift)
    _assert_stats_close(got, want, "float32")
    s = GramStats.zeros(2, 26, 2, 2, shift=choose_shift(X))
    s.xtx = s.xtx.transpose(-1, -2)                       # a non-contiguous view
    cpu_backend.gram_update(s, X, Y, fold, precision="float64")
    w = GramStats.zeros(2, 26, 2, 2, shift=choose_shift(X))
    reference.gram_update(w, X, Y, fold)
    _assert_stats_close(s, w, "float64")


def test_shift_keeps_float32_exact_with_large_offsets():
    """With activations far from 0, the shift is what keeps the float32 path accurate."""
    rng = np.random.default_rng(11)
    B, r, d = 1, 500, 16
    X = (rng.normal(size=(B, r, d)) + 2000.0).astype(np.float16)   # fp16 spacing 1.0 or 2.0 here
    Y = rng.normal(size=(r, 1))
    errs = {}
    for name, shift in (("shifted", choose_shift(X)), ("unshifted", torch.zeros(B, d))):
        got = GramStats.zeros(B, d, 1, 1, shift=shift)
        want = GramStats.zeros(B, d, 1, 1, shift=shift)
        cpu_backend.gram_update(got, X, Y, None, precision="float32")
        reference.gram_update(want, X, Y, None)
        cg, cw = got.centered(), want.centered()
        D = torch.diagonal(cw.Sxx, dim1=-2, dim2=-1)
        scale = torch.sqrt(D.unsqueeze(-1) * D.unsqueeze(-2))
        errs[name] = float(((cg.Sxx - cw.Sxx).abs() / scale).max())
    assert errs["shifted"] <= 1e-5, errs
    assert errs["unshifted"] > 100 * errs["shifted"], errs    # the cancellation the shift avoids


def _all_finite_fp16() -> np.ndarray:
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    v = bits.view(np.float16)
    return v[np.isfinite(v)]


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_fp16_conversion_every_finite_value(precision):
    """Every finite fp16 (zeros, subnormals, ±65504) goes through F16C, including the scalar tail
    path (d = 31 is not a multiple of 8): Σx, Σx² and Σx·y per column against numpy float64."""
    vals = _all_finite_fp16()                           # 63488 values
    d = 31
    r = len(vals) // d
    X = vals[: r * d].reshape(1, r, d)
    rng = np.random.default_rng(12)
    Y = rng.normal(size=(r, 1))
    s = GramStats.zeros(1, d, 1, 1)                     # shift 0: the raw values
    cpu_backend.gram_update(s, X, Y, None, precision=precision)
    X64 = X[0].astype(np.float64)
    np.testing.assert_allclose(s.sx[0, 0].numpy(), X64.sum(0), rtol=1e-12,
                               atol=1e-12 * np.abs(X64).sum(0).max())
    np.testing.assert_allclose(s.xty[0, 0, :, 0].numpy(), X64.T @ Y[:, 0], rtol=0,
                               atol=1e-12 * (np.abs(X64).T @ np.abs(Y[:, 0])).max())
    diag = torch.diagonal(s.xtx[0, 0]).numpy()
    # float32 mode: 65504² fits float32; block sums of squares round at 2^-24 relative
    np.testing.assert_allclose(diag, (X64 ** 2).sum(0),
                               rtol=1e-12 if precision == "float64" else 2e-6)


def test_fp16_extremes_exact_in_float64_mode():
    tiny = np.float16(2.0 ** -24)                       # smallest subnormal
    big_sub = np.float16(2.0 ** -14 - 2.0 ** -24)       # largest subnormal
    X = np.array([[[65504.0, -65504.0, tiny, big_sub, -0.0, 1.0, 0.5, 65504.0, tiny]]], np.float16)
    X = np.repeat(X, 3, axis=1)                         # r = 3, d = 9 (one full + a tail of 1)
    Y = np.ones((3, 1))
    s = GramStats.zeros(1, 9, 1, 1)
    cpu_backend.gram_update(s, X, Y, None, precision="float64")
    x = X[0, 0].astype(np.float64)
    assert np.array_equal(s.sx[0, 0].numpy(), 3 * x)
    assert np.array_equal(s.xtx[0, 0].numpy(), 3 * np.outer(x, x))


def test_cpu_threads_run_concurrently():
    """The kernel releases the GIL; concurrent calls on separate stats stay correct."""
    rng = np.random.default_rng(13)
    X, Y, fold = _chunk(rng, 2, 300, 60, 2, 2, offset=5.0)
    results = [GramStats.zeros(2, 60, 2, 2, shift=choose_shift(X)) for _ in range(3)]
    threads = [threading.Thread(target=cpu_backend.gram_update, args=(s, X, Y, fold),
                                kwargs=dict(precision="float64")) for s in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    want = GramStats.zeros(2, 60, 2, 2, shift=choose_shift(X))
    reference.gram_update(want, X, Y, fold)
    for s in results:
        _assert_stats_close(s, want, "float64")


def test_cpu_rejects_bad_input():
    s = GramStats.zeros(1, 4, 1, 2)
    X = np.zeros((1, 3, 4), np.float16)
    with pytest.raises(ValueError, match=r"\[-1, 2\)"):
        cpu_backend.gram_update(s, X, np.zeros((3, 1)), np.array([0, 2, 0], np.int32))
    with pytest.raises(ValueError, match="precision"):
        cpu_backend.gram_update(s, X, np.zeros((3, 1)), np.zeros(3, np.int32), precision="float16")
    Y, ok = np.zeros((3, 1)), np.zeros(3, np.int32)
    out = dict(shift=s.shift.numpy(), n=s.n.numpy(), sx=s.sx.numpy(), xtx=s.xtx.numpy(),
               sy=s.sy.numpy(), yty=s.yty.numpy(), xty=s.xty.numpy())
    with pytest.raises(ValueError, match="fold id 5 at row 1"):
        _C.gram_update(X, Y, np.array([0, 5, 0], np.int32), **out)
    with pytest.raises(ValueError, match="xtx has the wrong shape"):
        _C.gram_update(X, Y, ok, **dict(out, xtx=np.zeros((1, 2, 4, 3))))
    with pytest.raises(ValueError, match="float64"):
        _C.gram_update(X, Y, ok, **dict(out, sx=out["sx"].astype(np.float32)))


def test_benchmark_callable_reports_both_floors():
    res = benchmark_gram_update(2, 40, 30, k=1, n_folds=2, backend="cpu", repeat=1)
    assert res["backend"] == "cpu" and res["precision"] == "float32"
    for key in ("seconds", "floor_syrk_seconds", "floor_gemm_seconds", "gflops", "ratio_gemm"):
        assert res[key] > 0
    assert res["gflops"] == pytest.approx(2 * 2 * 40 * 30 * 30 / res["seconds"] / 1e9)


@pytest.mark.parametrize("module", ["reference", "cpu", "cuda", "triton"])
def test_every_backend_implements_the_backend_protocol(module):
    mod = pytest.importorskip(f"probes.kernels.{module}")
    assert isinstance(mod, Backend)
    assert set(mod.missing_ops()) <= set(OPS)
    assert mod.is_available() or mod.unavailable_reason()


def test_dispatch_skips_a_backend_that_lacks_the_op(monkeypatch):
    # a build of probes._C without the neuron kernel: auto takes torch, a named cpu says why
    monkeypatch.setattr(cpu_backend, "missing_ops", lambda: ("neuron_update",))
    assert resolve_backend("auto", None, op="gram_update") == "cpu"
    assert resolve_backend("auto", None, op="neuron_update") == "torch"
    with pytest.raises(BackendUnavailable, match="lacks neuron_update"):
        resolve_backend("cpu", op="neuron_update")


def test_the_dispatcher_imports_without_torch():
    # the CLIs build their parsers from modules that import probes.kernels (resolve)
    code = "import sys, probes.kernels; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"


# ------------------------------------------------------------------ fp16 centring (LOO pass input)

EPS = {torch.float32: 2.0 ** -23, torch.float64: 2.0 ** -52}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,r,d", [(1, 1, 1), (3, 37, 7), (2, 129, 24), (4, 65, 577)])
def test_centred_equals_the_float64_reference(B, r, d, dtype):
    rng = np.random.default_rng(B * 1000 + r + d)
    X = (rng.normal(size=(B, r, d)) * 40 + 300).astype(np.float16)
    X[0, 0, 0] = np.float16(6e-8)                          # a subnormal converts exactly too
    mean = torch.from_numpy(rng.normal(size=(B, d)) * 300)
    got = cpu_backend.centred(torch.from_numpy(X), mean, dtype=dtype)
    want = X.astype(np.float64) - mean.to(dtype).double().numpy()[:, None, :]
    assert got.dtype == dtype and got.shape == (B, r, d) and got.is_contiguous()
    # the conversion is exact; only the subtraction rounds, in dtype
    np.testing.assert_allclose(got.double().numpy(), want, rtol=EPS[dtype], atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_centred_reads_strided_rows_into_a_buffer_and_falls_back_for_other_inputs(dtype):
    rng = np.random.default_rng(5)
    store = rng.normal(size=(6, 300, 40)).astype(np.float16)
    mean = torch.from_numpy(rng.normal(size=(3, 40))).to(dtype)
    view = torch.from_numpy(store)[2:5, 100:171]        # a layer-major store's row slice
    assert not view.is_contiguous()
    want = view.double() - mean.double()[:, None, :]
    buf = torch.full((3, 71, 40), np.nan, dtype=dtype)
    got = cpu_backend.centred(view, mean, out=buf, dtype=dtype)
    assert got is buf
    np.testing.assert_allclose(got.double().numpy(), want.numpy(), rtol=EPS[dtype], atol=0)
    wide = view.to(dtype)
    by_torch = cpu_backend.centred(wide, mean, dtype=dtype)             # not fp16: torch
    assert torch.equal(by_torch, got) and by_torch.data_ptr() != wide.data_ptr()
    cols = torch.from_numpy(store)[:3, :50, ::2]                         # strided columns
    m2 = mean[:, :20].contiguous()
    assert torch.equal(cpu_backend.centred(cols, m2, dtype=dtype),
                       cols.to(dtype) - m2[:, None, :])
    with pytest.raises(ValueError, match="out must be"):
        _C.centre_f16(view.numpy(), mean.numpy(), np.zeros((3, 70, 40), mean.numpy().dtype))
    with pytest.raises(ValueError, match="mean must be float32 or float64"):
        _C.centre_f16(view.numpy(), mean.numpy().astype(np.float16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_centred_picks_rows_by_index(dtype):
    """``rows``: only those rows of a strided fp16 chunk, in the given order (repeats allowed),
    the same by the C++ kernel and by torch (a float32 chunk); indices outside X refused."""
    rng = np.random.default_rng(6)
    store = rng.normal(size=(5, 200, 33)).astype(np.float16)
    mean = torch.from_numpy(rng.normal(size=(2, 33))).to(dtype)
    view = torch.from_numpy(store)[1:3, 50:127]
    rows = torch.tensor([76, 0, 3, 3, 41, 2])
    want = view.double()[:, rows] - mean.double()[:, None, :]
    buf = torch.full((2 * 6 * 33 + 7,), np.nan, dtype=dtype)[:2 * 6 * 33].view(2, 6, 33)
    got = cpu_backend.centred(view, mean, out=buf, dtype=dtype, rows=rows)
    assert got is buf
    np.testing.assert_allclose(got.double().numpy(), want.numpy(), rtol=EPS[dtype], atol=0)
    by_torch = cpu_backend.centred(view.to(torch.float32), mean, dtype=dtype, rows=rows)
    np.testing.assert_allclose(by_torch.double().numpy(), want.numpy(), rtol=EPS[dtype], atol=0)
    empty = cpu_backend.centred(view, mean, dtype=dtype, rows=torch.zeros(0, dtype=torch.int64))
    assert empty.shape == (2, 0, 33)
    with pytest.raises(ValueError, match="rows holds 77, outside"):
        _C.centre_f16(view.numpy(), mean.numpy(), None, np.array([1, 77]))

