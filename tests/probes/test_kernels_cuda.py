"""CUDA C++ kernels (probes._C_cuda) vs the torch float64 reference.

Without a GPU only the build is checked (the module exists wherever nvcc was found at build
time and imports without a device). On a GPU (marked ``gpu``): Gram and moments on odd shapes,
through torch and through CuPy arrays.

Bounds (relative Frobenius norm vs float64): XᵀX 2e-3 (x - c rounded to fp16 for the tensor
cores, float32 accumulation); Σx, XᵀY, neuron moments 1e-5 (float32 accumulation per row range);
n, Σy, ΣyyT 1e-12 (float64).
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from probes.kernels import cuda as ck
from probes.kernels import reference
from probes.kernels.reference import neuron_update as reference_neuron_update
from probes.stats import GramStats, NeuronStats, choose_shift

gpu = pytest.mark.gpu


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def test_cuda_module_built_where_nvcc_exists():
    if shutil.which("nvcc") is None and ck._ext is None:
        pytest.skip("no nvcc on this machine: the CUDA module is not built here")
    assert ck._ext is not None, \
        f"nvcc is present but the CUDA module is missing: {ck._IMPORT_ERROR}"
    if not torch.cuda.is_available():
        assert ck._ext.device_count() == 0
        assert not ck.is_available()
        assert "no CUDA device" in ck.unavailable_reason()


def make(B, r, d, k, F, seed, skip=True):
    g = torch.Generator().manual_seed(seed)
    X = (torch.randn(B, r, d, generator=g) * 2 + 1 + torch.randn(B, 1, d, generator=g)).half()
    Y = torch.randn(r, k, generator=g, dtype=torch.float64) * 10 + 3
    fold = torch.randint(-1 if skip else 0, F, (r,), generator=g, dtype=torch.int32)
    return X, Y, fold


# (B, r, d, k, F): d % 8 != 0 (scalar loads) and == 0 (16-byte loads), d not a multiple of 128,
# d > r, a single short chunk, k > 4 (several moment launches), many folds
SHAPES = [(3, 1000, 300, 2, 2), (2, 777, 129, 3, 4), (1, 50, 520, 1, 1), (2, 33, 64, 6, 1),
          (4, 2048, 256, 2, 5), (1, 1, 17, 1, 1)]


@gpu
@pytest.mark.parametrize("shape", SHAPES)
def test_gram_update_matches_reference(shape):
    B, r, d, k, F = shape
    X, Y, fold = make(B, r, d, k, F, seed=r + d, skip=r > 1)
    shift = choose_shift(make(B, 8, d, k, 1, seed=5)[0])
    got = GramStats.zeros(B, d, k, F, shift=shift, device="cuda")
    # start from non-zero totals: the kernels must add, not overwrite
    X0, Y0, f0 = make(B, 64, d, k, F, seed=99)
    reference.gram_update(got, X0.cuda(), Y0.cuda(), f0.cuda())
    want = got.to("cpu")
    ck.gram_update(got, X.cuda(), Y.cuda(), fold.cuda() if F > 1 or r > 1 else None)
    reference.gram_update(want, X, Y, fold if F > 1 or r > 1 else None)
    for name, tol in (("n", 1e-12), ("sy", 1e-12), ("yty", 1e-12), ("sx", 1e-5), ("xty", 1e-5),
                      ("xtx", 2e-3)):
        assert rel(getattr(got, name), getattr(want, name)) <= tol, name
    x = got.xtx.cpu()
    assert rel(x, x.transpose(-1, -2)) < 1e-6


@gpu
def test_gram_noncontiguous_layers_and_strided_rows():
    B, r, d, k = 3, 300, 136, 2
    big, Y, _ = make(B + 2, r * 2, d, k, 1, seed=3)
    X = big[1:1 + B, ::2]                     # layer and row strides, unit stride along d
    shift = choose_shift(X)
    got = GramStats.zeros(B, d, k, shift=shift, device="cuda")
    want = GramStats.zeros(B, d, k, shift=shift)
    Yr = Y[::2]
    ck.gram_update(got, X.cuda(), Yr.cuda())
    reference.gram_update(want, X, Yr)
    assert rel(got.xtx, want.xtx) < 2e-3 and rel(got.xty, want.xty) < 1e-5


@gpu
@pytest.mark.parametrize("shape", [(3, 1001, 1037, 2), (2, 4000, 4096, 3), (1, 5, 9, 1),
                                   (2, 300, 11008, 2)])
def test_neuron_update_matches_reference(shape):
    B, r, m, k = shape
    g = torch.Generator().manual_seed(m)
    X = (torch.randn(B, r, m, generator=g) * 1.5 + 0.7).half()
    Y = torch.randn(r, k, generator=g, dtype=torch.float64) * 5 + 1900
    fold = torch.randint(-1, 1, (r,), generator=g, dtype=torch.int32)
    X0 = (torch.randn(B, 4, m, generator=g) * 1.5 + 0.7).half()
    got = NeuronStats.for_chunk(X0, Y[:4], device="cuda")
    want = NeuronStats.for_chunk(X0, Y[:4])
    ck.neuron_update(got, X.cuda(), Y.cuda(), fold.cuda())
    reference_neuron_update(want, X, Y, fold)
    assert float(got.n) == float(want.n)
    for name in ("sx", "sxx", "sxy", "sy", "syy"):
        assert rel(getattr(got, name), getattr(want, name)) <= 1e-5, name


@gpu
def test_cupy_arrays_without_torch_statistics():
    cp = pytest.importorskip("cupy")
    B, r, d, k, F = 2, 500, 200, 2, 3
    X, Y, fold = make(B, r, d, k, F, seed=8)
    shift = choose_shift(make(B, 8, d, k, 1, seed=9)[0])
    Xc = cp.asarray(X.numpy())
    Yc = cp.asarray(Y.numpy().astype(np.float32))
    cc = cp.asarray(shift.numpy().astype(np.float32))
    xtx = cp.zeros((B, F, d, d), cp.float64)
    sx = cp.zeros((B, F, d), cp.float64)
    xty = cp.zeros((B, F, d, k), cp.float64)
    counts = ck.gram(Xc, cc, xtx, fold=cp.asarray(fold.numpy()), n_folds=F)
    ck.moments(Xc, Yc, cc, sx, xty, fold=fold.numpy(), n_folds=F)
    cp.cuda.get_current_stream().synchronize()
    want = GramStats.zeros(B, d, k, F, shift=shift)
    reference.gram_update(want, X, Y.float().double(), fold)
    assert np.array_equal(counts, want.n.numpy().astype(np.int64))
    assert rel(torch.from_numpy(cp.asnumpy(xtx)), want.xtx) < 2e-3
    assert rel(torch.from_numpy(cp.asnumpy(sx)), want.sx) < 1e-5
    assert rel(torch.from_numpy(cp.asnumpy(xty)), want.xty) < 1e-5


@gpu
def test_bad_arguments_raise():
    X = torch.randn(1, 4, 8, device="cuda").half()
    with pytest.raises(ValueError, match="dtype"):
        ck.gram(X, torch.zeros(1, 8, device="cuda", dtype=torch.float64),
                torch.zeros(1, 1, 8, 8, device="cuda", dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        ck.gram(X, torch.zeros(1, 8, device="cuda"), torch.zeros(1, 1, 8, 9, device="cuda",
                                                                 dtype=torch.float64))
    with pytest.raises(ValueError, match="fold ids"):
        ck.gram(X, torch.zeros(1, 8, device="cuda"),
                torch.zeros(1, 1, 8, 8, device="cuda", dtype=torch.float64),
                fold=np.array([0, 1, 0, 0]), n_folds=1)
