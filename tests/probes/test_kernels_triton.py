"""Triton kernels vs the torch float64 reference.

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set here before
the kernels module is imported: ``triton.jit`` reads it when a kernel is defined) on tiny shapes.
On a GPU the same tests run compiled, on somewhat larger shapes.

Error bounds (relative Frobenius norm against float64):
- XᵀX with the shift applied in the kernel or in the pre-shift pass ("preshift", the default): the
  shifted value is rounded to fp16 (2^-11 relative) before the tensor-core product, products
  accumulate in float32: bound 2e-3.
- XᵀX on raw fp16 values (exact products, float32 accumulation, shift applied in float64): 1e-5
  on data whose mean is comparable to its spread (as here).
- Σx, XᵀY, neuron moments (float32 accumulation of exact-ish terms): 1e-5.
- n, Σy, ΣyyT (computed in float64): 1e-12.
"""
from __future__ import annotations

import importlib
import os
import zlib

import pytest
import torch

CUDA = torch.cuda.is_available()
_SET_ENV = not CUDA and os.environ.get("TRITON_INTERPRET") is None
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import numpy as np  # noqa: E402
from test_fit import ALPHAS, entity_table, make_store  # noqa: E402

from probes import kernels  # noqa: E402
from probes.fit import fit_all_layers  # noqa: E402
from probes.kernels import cuda as ck  # noqa: E402
from probes.kernels import neuron_update, reference  # noqa: E402
from probes.kernels.reference import neuron_update as reference_neuron_update  # noqa: E402
from probes.stats import GramStats, NeuronStats, choose_shift  # noqa: E402

#: the package's modules in import order: a reload (the interpreter switched) redoes them all
_MODULES = [f"probes.kernels.triton.{m}" for m in
            ("common", "configs", "column_moments", "rawtma", "shiftin", "preshift")]


def _reload_triton():
    for name in _MODULES:
        importlib.reload(importlib.import_module(name))
    return importlib.reload(importlib.import_module("probes.kernels.triton"))


tk = importlib.import_module("probes.kernels.triton")
if not CUDA and not tk.INTERPRET:  # imported earlier in this process without the interpreter
    tk = _reload_triton()

DEV = "cuda" if CUDA else "cpu"


@pytest.fixture(scope="module", autouse=True)
def _leave_triton_as_found():
    """Other test modules must not see interpreted kernels or a 'triton available' on CPU."""
    yield
    if _SET_ENV:
        os.environ.pop("TRITON_INTERPRET", None)
        _reload_triton()
# (B, r, d, k, F): odd sizes, not multiples of the tiles; d > r; a single short chunk
SHAPES_CPU = [(2, 37, 40, 3, 3), (1, 5, 33, 1, 1)]
SHAPES_GPU = [(3, 1000, 300, 2, 2), (2, 777, 129, 3, 4), (1, 50, 520, 1, 1), (5, 64, 64, 2, 1)]
SHAPES = SHAPES_GPU if CUDA else SHAPES_CPU


def rel(a, b):
    b = b.to(torch.float64)
    return float((a.to(torch.float64) - b).norm() / b.norm().clamp_min(1e-300))


def make_chunk(B, r, d, k, F, gen, mean=1.0, scale=2.0, skip=True):
    X = (torch.randn(B, r, d, generator=gen) * scale + mean
         + torch.randn(B, 1, d, generator=gen)).to(torch.float16)
    Y = torch.randn(r, k, generator=gen, dtype=torch.float64) * 10 + 3
    lo = -1 if skip else 0
    fold = torch.randint(lo, F, (r,), generator=gen, dtype=torch.int32)
    if F == 1 and not skip:
        fold = None
    return X, Y, fold


def check_close(got: GramStats, want: GramStats, xtx_tol):
    for name, tol in (("n", 1e-12), ("sy", 1e-12), ("yty", 1e-12), ("sx", 1e-5),
                      ("xty", 1e-5), ("xtx", xtx_tol)):
        a, b = getattr(got, name).cpu(), getattr(want, name).cpu()
        assert torch.isfinite(a).all(), name
        assert rel(a, b) <= tol, f"{name}: relative error {rel(a, b):.3g} > {tol}"
    # symmetric by construction (both halves written)
    x = got.xtx.cpu()
    assert torch.equal(x, x.transpose(-1, -2))


def check_chunk_vs_reference(B, r, d, k, F, seed, xtx_tol=2e-3, **update):
    """One random chunk (folds and skipped rows) through tk.gram_update(**update) against the
    float64 reference; the shift comes from a separate small chunk."""
    gen = torch.Generator().manual_seed(seed)
    X, Y, fold = make_chunk(B, r, d, k, F, gen)
    shift = choose_shift(make_chunk(B, 8, d, k, 1, gen)[0])
    got = GramStats.zeros(B, d, k, F, shift=shift, device=DEV)
    want = GramStats.zeros(B, d, k, F, shift=shift)
    tk.gram_update(got, X.to(DEV), Y.to(DEV), fold.to(DEV), **update)
    reference.gram_update(want, X, Y, fold)
    check_close(got, want, xtx_tol)


def rawtma_chunks():
    """Chunks that took the rawtma path so far (it hands refused chunks to preshift)."""
    return tk.TUNING.paths["rawtma"]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["preshift", "shift-in", "raw"])
def test_gram_matches_reference(shape, mode):
    B, r, d, k, F = shape
    # crc32, not hash(): str hashes are salted per process, so failures would not reproduce
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, mode)).encode()))
    X, Y, fold = make_chunk(B, r, d, k, F, gen, skip=F > 1 or r > 10)
    # the shift of a pass comes from its first chunk: here another draw, so sums are not ~0
    shift = choose_shift(make_chunk(B, 8, d, k, 1, gen)[0])
    got = GramStats.zeros(B, d, k, F, shift=shift, device=DEV)
    want = GramStats.zeros(B, d, k, F, shift=shift)
    tk.gram_update(got, X.to(DEV), Y.to(DEV), None if fold is None else fold.to(DEV), mode=mode)
    reference.gram_update(want, X, Y, fold)
    check_close(got, want, 1e-5 if mode == "raw" else 2e-3)


def test_shift_in_kernel_flag_selects_the_mode():
    B, r, d, k, F = 1, 19, 20, 2, 1
    gen = torch.Generator().manual_seed(5)
    X, Y, _ = make_chunk(B, r, d, k, F, gen)
    shift = choose_shift(make_chunk(B, 8, d, k, 1, gen)[0])
    a, b = (GramStats.zeros(B, d, k, shift=shift, device=DEV) for _ in range(2))
    tk.gram_update(a, X.to(DEV), Y.to(DEV), shift_in_kernel=False)
    tk.gram_update(b, X.to(DEV), Y.to(DEV), mode="raw")
    assert torch.equal(a.xtx, b.xtx)
    with pytest.raises(ValueError, match="mode"):
        tk.gram_update(a, X.to(DEV), Y.to(DEV), mode="bogus")


@pytest.mark.parametrize("cfg", [(16, 32, 16, 1, 1, True), (32, 16, 16, 1, 1, False),
                                 (16, 16, 32, 1, 1, True)] if not CUDA
                         else [tuple(c) for c in tk.preshift_configs()]
                         + [(64, 64, 64, 4, 3, False)])
@pytest.mark.parametrize("k", [1, 3])
def test_preshift_tilings(cfg, k):
    # TMA descriptor and pointer loads, tall/wide/square tiles, folds with test rows dropped
    # (each fold's rows padded to BLOCK_R), d not a multiple of the tile
    B, r, d, F = (2, 29, 45, 3) if not CUDA else (2, 1100, 600, 3)
    check_chunk_vs_reference(B, r, d, k, F, sum(cfg) + k, config=tk.PreConfig(*cfg))


def test_gram_accumulates_over_chunks_and_skips_rows():
    B, r, d, k, F = (2, 23, 24, 2, 2) if not CUDA else (4, 513, 200, 2, 2)
    gen = torch.Generator().manual_seed(7)
    X1, Y1, f1 = make_chunk(B, r, d, k, F, gen)
    X2, Y2, f2 = make_chunk(B, r + 3, d, k, F, gen, mean=-0.5)
    shift = choose_shift(X1, f1)
    got = GramStats.zeros(B, d, k, F, shift=shift, device=DEV)
    want = GramStats.zeros(B, d, k, F, shift=shift)
    for X, Y, f in ((X1, Y1, f1), (X2, Y2, f2)):
        tk.gram_update(got, X.to(DEV), Y.to(DEV), f.to(DEV))
        reference.gram_update(want, X, Y, f)
    check_close(got, want, 2e-3)
    # a chunk whose rows are all skipped changes nothing
    before = got.clone()
    tk.gram_update(got, X1.to(DEV), Y1.to(DEV), torch.full((r,), -1, dtype=torch.int32, device=DEV))
    for name in ("n", "sx", "xtx", "xty", "sy", "yty"):
        assert torch.equal(getattr(got, name), getattr(before, name)), name


@pytest.mark.parametrize("cfg", [(32, 16, 16, 1, 1, True), (16, 16, 32, 1, 1, False)] if not CUDA
                         else [(128, 256, 32, 8, 3, False), (64, 64, 64, 4, 3, False),
                               (128, 128, 32, 8, 4, True), (128, 128, 64, 8, 3, False)])
def test_gram_other_tilings(cfg):
    # tall, square and wide tiles map the upper triangle differently; Σx and XᵀY come from the
    # Gram kernel (fused) or the moments kernel; all must agree
    B, r, d, k, F = (1, 21, 50, 2, 2) if not CUDA else (2, 700, 600, 2, 2)
    check_chunk_vs_reference(B, r, d, k, F, sum(cfg), config=tk.GramConfig(*cfg))


@pytest.mark.parametrize("groups", [2, 3])
def test_preshift_layer_groups(groups):
    # the pre-shift pass of the next group of layers overlaps the Gram of this one (two CUDA
    # streams); an uneven last group; results as without groups
    B, r, d, k, F = (5, 23, 20, 2, 2) if not CUDA else (5, 1500, 300, 2, 2)
    gen = torch.Generator().manual_seed(40 + groups)
    X, Y, fold = make_chunk(B, r, d, k, F, gen)
    shift = choose_shift(make_chunk(B, 8, d, k, 1, gen)[0])
    got = GramStats.zeros(B, d, k, F, shift=shift, device=DEV)
    one = GramStats.zeros(B, d, k, F, shift=shift, device=DEV)
    want = GramStats.zeros(B, d, k, F, shift=shift)
    tk.gram_update(got, X.to(DEV), Y.to(DEV), fold.to(DEV), mode="preshift", groups=groups)
    tk.gram_update(one, X.to(DEV), Y.to(DEV), fold.to(DEV), mode="preshift", groups=1)
    reference.gram_update(want, X, Y, fold)
    check_close(got, want, 2e-3)
    assert torch.equal(got.xtx, one.xtx)      # same tiles, same row order
    for name in ("sx", "xty"):                # row splits of the pre-shift pass may differ
        assert rel(getattr(got, name), getattr(one, name)) < 1e-6, name


def test_gram_rejects_non_fp16():
    st = GramStats.zeros(1, 8, 1, device=DEV)
    with pytest.raises(ValueError, match="float16"):
        tk.gram_update(st, torch.randn(1, 4, 8, device=DEV), torch.randn(4, 1, device=DEV))


@pytest.mark.parametrize("shape", [(3, 29, 21, 2), (1, 1, 5, 1)] if not CUDA
                         else [(3, 1001, 1037, 2), (2, 300, 4096, 3), (1, 7, 9, 1)])
def test_neuron_moments_match_reference(shape):
    B, r, m, k = shape
    gen = torch.Generator().manual_seed(11 + r)
    X = (torch.randn(B, r, m, generator=gen) * 1.5 + 0.7).to(torch.float16)
    Y = torch.randn(r, k, generator=gen, dtype=torch.float64) * 5 + 1900
    fold = torch.randint(-1, 1, (r,), generator=gen, dtype=torch.int32) if r > 1 else None
    # shifts from another draw (a pass takes them from its first chunk), so sums are not ~0
    X0 = (torch.randn(B, 4, m, generator=gen) * 1.5 + 0.7).to(torch.float16)
    Y0 = torch.randn(4, k, generator=gen, dtype=torch.float64) * 5 + 1900
    got = NeuronStats.for_chunk(X0, Y0, device=DEV)
    want = NeuronStats.for_chunk(X0, Y0)
    tk.neuron_update(got, X.to(DEV), Y.to(DEV), None if fold is None else fold.to(DEV))
    reference_neuron_update(want, X, Y, fold)
    assert float(got.n) == float(want.n)
    for name in ("sx", "sxx", "sxy", "sy", "syy"):
        a, b = getattr(got, name).cpu(), getattr(want, name).cpu()
        if b.norm() == 0:
            assert a.norm() < 1e-6, name
        else:
            assert rel(a, b) <= 1e-5, f"{name}: {rel(a, b):.3g}"
    if float(want.n) >= 2:
        assert (got.pearson().cpu() - want.pearson()).abs().max() < 1e-4


@pytest.mark.parametrize("tiling", [tuple(t) for t in tk.moments_tilings()])
def test_moments_tilings(tiling):
    # every moments tiling the GPU bench tries (pipelined row loops included) gives the float64
    # sums: columns not a multiple of BLOCK_N, rows not a multiple of BLOCK_R, two folds, rows
    # skipped
    B, r, m, k, F = (2, 37, 45, 3, 2) if not CUDA else (3, 2100, 1100, 2, 2)
    gen = torch.Generator().manual_seed(sum(tiling))
    X = (torch.randn(B, r, m, generator=gen) * 1.5 + 0.7).to(torch.float16)
    Y = torch.randn(r, k, generator=gen, dtype=torch.float64) * 5 + 40
    fold = torch.randint(-1, F, (r,), generator=gen, dtype=torch.int32)
    shift = (torch.randn(B, m, generator=gen) * 0.3 + 0.7).to(torch.float32)
    sx, sxx, sxy = tk.moments(X.to(DEV), Y.to(DEV), shift.to(DEV), fold=fold.to(DEV), n_folds=F,
                              tiling=tk.MomentsTiling(*tiling))
    x = X.double() - shift.double()[:, None, :]
    for f in range(F):
        keep = fold == f
        xf, yf = x[:, keep], Y[keep]
        assert rel(sx[:, f].cpu(), xf.sum(1)) <= 1e-5
        assert rel(sxx[:, f].cpu(), (xf * xf).sum(1)) <= 1e-5
        assert rel(sxy[:, f].cpu(), torch.einsum("brm,rk->bmk", xf, yf)) <= 1e-5


def test_float64_precision_is_refused():
    st = GramStats.zeros(1, 8, 1, device=DEV)
    X = torch.randn(1, 4, 8).half().to(DEV)
    with pytest.raises(ValueError, match="float32"):
        tk.gram_update(st, X, torch.randn(4, 1, device=DEV), precision="float64")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU; run bench/gpu_check.sh on a GPU machine")
def test_auto_dispatch_on_cuda_picks_triton_and_matches():
    assert kernels.resolve_backend("auto", torch.device("cuda")) == "triton"
    gen = torch.Generator().manual_seed(21)
    X, Y, fold = make_chunk(2, 3000, 4096, 2, 3, gen)
    shift = choose_shift(make_chunk(2, 8, 4096, 2, 1, gen)[0])
    got = GramStats.zeros(2, 4096, 2, 3, shift=shift, device="cuda")
    want = GramStats.zeros(2, 4096, 2, 3, shift=shift, device="cuda")
    kernels.gram_update(got, X.cuda(), Y.cuda(), fold.cuda())
    reference.gram_update(want, X.cuda(), Y.cuda(), fold.cuda())
    check_close(got, want, 2e-3)
    ns = NeuronStats.for_chunk(X[:, :8], Y[:8], device="cuda")
    nw = ns.clone()
    neuron_update(ns, X.cuda(), Y.cuda(), fold.cuda())
    reference_neuron_update(nw, X.cuda(), Y.cuda(), fold.cuda())
    assert rel(ns.sxy, nw.sxy) < 1e-5 and rel(ns.sxx, nw.sxx) < 1e-5


def test_preshift_fused_add_equals_separate_add():
    # the Gram kernel adding its tiles into the float64 totals gives exactly what a
    # float32 chunk Gram added afterwards gives, over two chunks (non-zero totals), with folds
    B, r, d, k, F = (2, 19, 37, 2, 2) if not CUDA else (3, 900, 520, 2, 2)
    gen = torch.Generator().manual_seed(77)
    chunks = [make_chunk(B, r, d, k, F, gen), make_chunk(B, r + 5, d, k, F, gen, mean=0.7)]
    shift = choose_shift(chunks[0][0], chunks[0][2])
    fused = GramStats.zeros(B, d, k, F, shift=shift, device=DEV)
    apart = GramStats.zeros(B, d, k, F, shift=shift, device=DEV)
    want = GramStats.zeros(B, d, k, F, shift=shift)
    for X, Y, f in chunks:
        tk.gram_update(fused, X.to(DEV), Y.to(DEV), f.to(DEV), mode="preshift", fused_add=True)
        tk.gram_update(apart, X.to(DEV), Y.to(DEV), f.to(DEV), mode="preshift", fused_add=False)
        reference.gram_update(want, X, Y, f)
    assert torch.equal(fused.xtx, apart.xtx)
    assert torch.equal(fused.xtx, fused.xtx.transpose(-1, -2))   # exactly symmetric
    check_close(fused, want, 2e-3)


@pytest.mark.parametrize("prep", [tuple(t) for t in tk.prep_tilings()])
def test_preshift_prep_tilings(prep):
    # every pre-shift tiling the GPU bench tries gives the reference statistics: columns and
    # rows not multiples of the block, several programs per fold, test rows dropped
    B, r, d, k, F = (2, 37, 45, 3, 2) if not CUDA else (2, 2100, 600, 3, 2)
    check_chunk_vs_reference(B, r, d, k, F, sum(prep), mode="preshift", prep=tk.PrepTiling(*prep))


def sorted_folds(r, F, gen):
    """Fold ids whose rows are contiguous per fold (what "rawtma" reads in place), with skipped
    rows (-1) before, between and after the folds' ranges."""
    sizes = torch.randint(1, 2 * r // (F + 1) + 2, (F,), generator=gen).tolist()
    ids = [-1] * 2
    for f, n in enumerate(sizes):
        ids += [f] * n + [-1] * (f % 2)
    ids += [-1] * 3
    return torch.tensor(ids, dtype=torch.int32)


@pytest.mark.parametrize("cfg", [(16, 32, 16, 1, 1), (32, 16, 16, 1, 1), (16, 16, 32, 1, 1)]
                         if not CUDA else [tuple(c)[:5] for c in tk.rawtma_configs()])
@pytest.mark.parametrize("F", [1, 3])
def test_rawtma_matches_reference(cfg, F):
    # raw chunk read in place through 3-D TMA descriptors, one per fold's contiguous rows;
    # rows and columns not multiples of the tiles; two chunks, so the float64 re-centring adds
    # into non-zero totals
    B, r, d, k = (2, 29, 40, 3) if not CUDA else (3, 1100, 600, 2)
    gen = torch.Generator().manual_seed(sum(cfg) + F)
    shift = choose_shift(make_chunk(B, 8, d, k, 1, gen)[0])
    got = GramStats.zeros(B, d, k, F, shift=shift, device=DEV)
    want = GramStats.zeros(B, d, k, F, shift=shift)
    before = rawtma_chunks()
    for _ in range(2):
        fold = sorted_folds(r, F, gen) if F > 1 else None
        rr = r if fold is None else len(fold)
        X, Y, _ = make_chunk(B, rr, d, k, 1, gen)
        tk.gram_update(got, X.to(DEV), Y.to(DEV), None if fold is None else fold.to(DEV),
                       mode="rawtma", config=tk.PreConfig(*cfg, True))
        reference.gram_update(want, X, Y, fold)
    check_close(got, want, 1e-5)
    assert rawtma_chunks() == before + 2


def test_rawtma_guard_hands_far_off_mean_columns_to_preshift():
    # a column whose mean is 200 standard deviations away (and a constant one): centring raw
    # float32 sums would lose it, so the chunk goes through preshift, bit for bit
    B, r, d, k = 1, 24, 16, 2
    gen = torch.Generator().manual_seed(3)
    X, Y, _ = make_chunk(B, r, d, k, 1, gen)
    shift = choose_shift(X)
    far_off = 1000.0 + torch.randn(r, generator=gen) * 5
    for col, values in ((3, far_off), (5, torch.full((r,), 7.0))):
        Xb = X.clone()
        Xb[0, :, col] = values.to(torch.float16)
        a, b = (GramStats.zeros(B, d, k, shift=shift, device=DEV) for _ in range(2))
        refused = tk.TUNING.paths["rawtma refused by the accuracy guard: preshift"]
        tk.gram_update(a, Xb.to(DEV), Y.to(DEV), mode="rawtma")
        assert tk.TUNING.paths["rawtma refused by the accuracy guard: preshift"] == refused + 1
        tk.gram_update(b, Xb.to(DEV), Y.to(DEV), mode="preshift")
        assert torch.equal(a.xtx, b.xtx) and torch.equal(a.sx, b.sx)
    # the same data without those columns passes the guard (raw products, not preshift's)
    a, b = (GramStats.zeros(B, d, k, shift=shift, device=DEV) for _ in range(2))
    tk.gram_update(a, X.to(DEV), Y.to(DEV), mode="rawtma")
    tk.gram_update(b, X.to(DEV), Y.to(DEV), mode="preshift")
    assert not torch.equal(a.xtx, b.xtx)


def test_rawtma_interleaved_folds_and_test_rows():
    # folds interleaved with skipped (test) rows: one gather copy, then the same kernels
    shapes = ((2, 37, 24, 2, 3), (1, 30, 16, 1, 1)) if not CUDA else ((3, 1500, 520, 2, 4),)
    for B, r, d, k, F in shapes:
        before = rawtma_chunks()
        check_chunk_vs_reference(B, r, d, k, F, 100 + F, xtx_tol=1e-5, mode="rawtma")
        assert rawtma_chunks() == before + 1


def test_rawtma_layout_rules():
    B, r, d, k = 1, 20, 16, 1
    gen = torch.Generator().manual_seed(9)
    X, Y, _ = make_chunk(B, r, d, k, 1, gen)
    odd = GramStats.zeros(B, 13, k, device=DEV)
    with pytest.raises(ValueError, match="multiple of 8"):
        tk.gram_update(odd, X[:, :, :13].contiguous().to(DEV), Y.to(DEV), mode="rawtma")
    # as the tuned default it falls back to preshift quietly (d = 13, here)
    with tk.TUNING.override(13, odd.device, "mode", "rawtma"):
        a, b = (GramStats.zeros(B, 13, k, device=DEV) for _ in range(2))
        tk.gram_update(a, X[:, :, :13].contiguous().to(DEV), Y.to(DEV))
        tk.gram_update(b, X[:, :, :13].contiguous().to(DEV), Y.to(DEV), mode="preshift")
        assert torch.equal(a.xtx, b.xtx)
    # a strided view of the chunk (every row in fold 0) is copied, then read through TMA
    wide = make_chunk(B, r, 2 * d, k, 1, gen)[0]
    view = wide[:, :, :d]
    got = GramStats.zeros(B, d, k, device=DEV)
    want = GramStats.zeros(B, d, k)
    tk.gram_update(got, view.to(DEV), Y.to(DEV), mode="rawtma")
    reference.gram_update(want, view.contiguous(), Y, None)
    check_close(got, want, 1e-5)

@pytest.mark.parametrize("mode", ["rawtma", "preshift"])
def test_fit_all_layers_through_the_triton_modes(tmp_path, mode):
    # the whole fit with the Triton statistics as its tuned default mode: many chunks, test rows
    # (fold -1) among the train rows, three folds; same alphas and predictions as float64 torch
    d = 24 if not CUDA else 200
    ent = entity_table(150 if not CUDA else 600, seed=12)
    make_store(tmp_path / "s.zarr", ent, d=d, L=2, R=32)
    before = dict(tk.TUNING.paths)
    with tk.TUNING.override(d, DEV, "mode", mode):
        for cv in ("loo", 3):
            ref = fit_all_layers(tmp_path / "s.zarr", alphas=ALPHAS, backend="torch", cv=cv,
                                 chunk_rows=37)
            got = fit_all_layers(tmp_path / "s.zarr", alphas=ALPHAS, backend="triton",
                                 device=DEV, cv=cv, chunk_rows=37)
            np.testing.assert_array_equal(got["arrays"]["alpha"], ref["arrays"]["alpha"])
            np.testing.assert_allclose(got["arrays"]["predictions"], ref["arrays"]["predictions"],
                                       rtol=1e-3,
                                       atol=1e-3 * np.abs(ref["arrays"]["predictions"]).max())
    took = tk.TUNING.paths_since(before)
    # the chunks went that way (rawtma's guard may hand a chunk whose fold has only a few
    # rows, so a noisy spread, to preshift), and nothing failed
    assert took.get(mode, 0) >= 4 and not any("failed" in p for p in took), took
    if mode == "preshift":
        assert set(took) == {"preshift"}, took


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU; run bench/gpu_check.sh on a GPU machine")
def test_rawtma_with_the_cuda_modules_sums():
    # rawtma takes its column sums from the CUDA module's moments kernel when the bench tuned it
    if not ck.is_available():
        pytest.skip(ck.unavailable_reason())
    B, r, d, k, F = 3, 1500, 520, 2, 3
    with tk.TUNING.override(d, DEV, "rawtma_sums", "cuda"):
        before = rawtma_chunks()
        check_chunk_vs_reference(B, r, d, k, F, 321, xtx_tol=1e-5, mode="rawtma")
        check_chunk_vs_reference(B, r, d, k, 1, 322, xtx_tol=1e-5, mode="rawtma")
        assert rawtma_chunks() == before + 2


def test_tuning_state_keys_and_override():
    st = tk.TuningState()
    with pytest.raises(KeyError, match="unknown tuning choice"):
        st.set(64, DEV, "bogus", 1)
    st.set(64, DEV, "mode", "rawtma")
    with st.override(64, DEV, "mode", "preshift"):
        assert st.get(64, DEV, "mode") == "preshift"
    assert st.get(64, DEV, "mode") == "rawtma"
    with st.override(32, DEV, "prep", tk.prep_tilings()[0]):
        assert st.get(32, DEV, "prep") == tk.prep_tilings()[0]
    assert st.get(32, DEV, "prep", "none") == "none"
    before = dict(st.paths)
    st.took("preshift")
    assert st.paths_since(before) == {"preshift": 1}
    # under the interpreter the tuners return the default tiling untimed
    assert tk.tune_preshift(40, DEV) == tk.preshift_configs()[0]
