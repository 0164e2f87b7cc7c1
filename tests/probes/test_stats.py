"""GramStats and NeuronStats algebra (their shared AdditiveStats base), the torch float64
reference backend and the backend dispatch.

The reference is checked against an independent numpy float64 computation (einsum on the
raw rows); everything here is float64, so the tolerance is 1e-12 relative to the data's scale.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from probes.kernels import (
    BackendUnavailable,
    available_backends,
    gram_update,
    reference,
    resolve_backend,
)
from probes.stats import (
    AdditiveStats,
    GramStats,
    NeuronStats,
    StatsError,
    choose_shift,
    validate_chunk,
)

RTOL64 = 1e-12


def _chunk(rng, B, r, d, k, F, offset=0.0, skip=0.2):
    X = (rng.normal(size=(B, r, d)) * 2.0 + offset + rng.normal(size=(B, 1, d))).astype(np.float16)
    Y = rng.normal(size=(r, k)) * 3.0 + 1.0
    fold = rng.integers(0, F, size=r).astype(np.int32)
    fold[rng.random(r) < skip] = -1
    return X, Y, fold


def _numpy_stats(X, Y, fold, F, shift):
    """Independent float64 computation of every field, folds by boolean masks."""
    X = X.astype(np.float64) - np.asarray(shift)[:, None, :]
    B, _, d = X.shape
    k = Y.shape[1]
    out = dict(n=np.zeros(F), sx=np.zeros((B, F, d)), xtx=np.zeros((B, F, d, d)),
               sy=np.zeros((F, k)), yty=np.zeros((F, k, k)), xty=np.zeros((B, F, d, k)))
    for f in range(F):
        m = fold == f
        Xf, Yf = X[:, m], Y[m]
        out["n"][f] = m.sum()
        out["sx"][:, f] = Xf.sum(1)
        out["xtx"][:, f] = np.einsum("bri,brj->bij", Xf, Xf)
        out["xty"][:, f] = np.einsum("bri,rk->bik", Xf, Yf)
        out["sy"][f] = Yf.sum(0)
        out["yty"][f] = Yf.T @ Yf
    return out


def _close(a, b, rtol, scale=None):
    a = a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b = b.numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    s = scale if scale is not None else max(np.abs(b).max(initial=0.0), 1e-300)
    err = np.abs(a - b).max(initial=0.0) / s
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.1e}"


@pytest.mark.parametrize("B,r,d,k,F", [(1, 1, 1, 1, 1), (3, 40, 7, 3, 5), (2, 9, 30, 2, 1),
                                       (1, 25, 4, 1, 2)])
def test_reference_matches_numpy(B, r, d, k, F):
    rng = np.random.default_rng(100 + B * r + d)
    X, Y, fold = _chunk(rng, B, r, d, k, F, offset=50.0)
    if r == 1:
        fold[:] = 0
    shift = choose_shift(X)
    s = GramStats.zeros(B, d, k, F, shift=shift)
    reference.gram_update(s, X, Y, fold)
    want = _numpy_stats(X, Y, fold, F, shift.numpy())
    for name, val in want.items():
        _close(getattr(s, name), val, RTOL64)
    assert torch.equal(s.xtx, s.xtx.transpose(-1, -2))


def test_reference_accepts_torch_and_numpy_and_fold_none():
    rng = np.random.default_rng(1)
    X, Y, _ = _chunk(rng, 2, 30, 6, 2, 1)
    a = GramStats.zeros(2, 6, 2, 1)
    b = GramStats.zeros(2, 6, 2, 1)
    gram_update(a, X, Y, None, backend="torch")
    gram_update(b, torch.from_numpy(X), torch.from_numpy(Y), torch.zeros(30, dtype=torch.int32),
                backend="torch")
    for name in ("n", "sx", "xtx", "sy", "yty", "xty"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert a.n_rows == 30


@pytest.mark.parametrize("sel", [None, [0, 2], np.array([True, False, True, True]), [3]])
def test_centered_matches_direct_centering(sel):
    rng = np.random.default_rng(2)
    B, r, d, k, F = 2, 80, 9, 2, 4
    X, Y, fold = _chunk(rng, B, r, d, k, F, offset=300.0)
    s = GramStats.zeros(B, d, k, F, shift=choose_shift(X))
    reference.gram_update(s, X, Y, fold)
    c = s.centered(sel)
    if sel is None:
        folds = np.arange(F)
    else:
        folds = np.nonzero(sel)[0] if np.asarray(sel).dtype == bool else np.asarray(sel)
    m = np.isin(fold, folds)
    Xm = X.astype(np.float64)[:, m]
    Ym = Y[m]
    Xc = Xm - Xm.mean(1, keepdims=True)
    Yc = Ym - Ym.mean(0)
    assert c.n == m.sum()
    _close(c.mean_x, Xm.mean(1), RTOL64)
    _close(c.mean_y, Ym.mean(0), RTOL64)
    # centred sums lose the offset's digits to cancellation: compare on the centred scale
    _close(c.Sxx, np.einsum("bri,brj->bij", Xc, Xc), 1e-10)
    _close(c.Sxy, np.einsum("bri,rk->bik", Xc, Yc), 1e-10)
    _close(c.Syy, Yc.T @ Yc, 1e-10)
    assert torch.equal(c.Sxx, c.Sxx.transpose(-1, -2))


def test_totals_and_select():
    rng = np.random.default_rng(3)
    X, Y, fold = _chunk(rng, 2, 50, 5, 3, 3)
    s = GramStats.zeros(2, 5, 3, 3)
    reference.gram_update(s, X, Y, fold)
    t = s.totals()
    assert t.n_folds == 1 and float(t.n[0]) == (fold >= 0).sum()
    _close(t.xtx[:, 0], s.xtx.sum(1), RTOL64)
    u = s.select([1])
    _close(u.xty[:, 0], s.xty[:, 1], 0.0, scale=1.0)
    with pytest.raises(StatsError, match="out of range"):
        s.select([3])
    with pytest.raises(StatsError, match="empty"):
        s.select(np.zeros(3, dtype=bool))


def test_add_merges_chunks_and_reshifts_exactly():
    rng = np.random.default_rng(4)
    B, d, k, F = 2, 8, 2, 2
    X1, Y1, f1 = _chunk(rng, B, 30, d, k, F, offset=80.0)
    X2, Y2, f2 = _chunk(rng, B, 20, d, k, F, offset=80.0)
    sh1, sh2 = choose_shift(X1), choose_shift(X2)
    a = GramStats.zeros(B, d, k, F, shift=sh1)
    reference.gram_update(a, X1, Y1, f1)
    b = GramStats.zeros(B, d, k, F, shift=sh2)        # another shift: += must re-express it
    reference.gram_update(b, X2, Y2, f2)
    whole = GramStats.zeros(B, d, k, F, shift=sh1)
    reference.gram_update(whole, np.concatenate([X1, X2], 1), np.concatenate([Y1, Y2]),
                          np.concatenate([f1, f2]))
    c = a + b
    a += b
    for m in (a, c):
        assert torch.equal(m.shift, sh1)
        assert torch.equal(m.xtx, m.xtx.transpose(-1, -2))
        for name in ("n", "sx", "xtx", "sy", "yty", "xty"):
            _close(getattr(m, name), getattr(whole, name), 1e-11)
    # reshift to zero equals a pass with no shift at all
    z = whole.reshift(torch.zeros(B, d))
    direct = GramStats.zeros(B, d, k, F)
    reference.gram_update(direct, np.concatenate([X1, X2], 1), np.concatenate([Y1, Y2]),
                          np.concatenate([f1, f2]))
    for name in ("sx", "xtx", "xty"):
        _close(getattr(z, name), getattr(direct, name), 1e-13)
    with pytest.raises(StatsError, match="cannot add"):
        a += GramStats.zeros(B, d, k, F + 1)


def test_zeros_validation_and_shapes():
    s = GramStats.zeros(3, 5, 2, 4, shift=np.ones((3, 5)))
    assert (s.B, s.d, s.k, s.n_folds) == (3, 5, 2, 4)
    assert s.xtx.shape == (3, 4, 5, 5) and s.xty.shape == (3, 4, 5, 2) and s.yty.shape == (4, 2, 2)
    assert s.dtype == torch.float64 and s.xtx.is_contiguous()
    s.check()
    with pytest.raises(StatsError, match="shift must have shape"):
        GramStats.zeros(3, 5, 2, 1, shift=np.ones((3, 4)))
    with pytest.raises(StatsError, match="NaN or inf"):
        GramStats.zeros(1, 2, 1, 1, shift=np.array([[0.0, np.nan]]))
    with pytest.raises(StatsError, match=">= 1"):
        GramStats.zeros(0, 5, 2, 1)
    assert s.nbytes() == 8 * (15 + 4 + 60 + 300 + 8 + 16 + 120)



def test_base_shared_by_gram_and_neuron_stats():
    """clone / to / nbytes / check / device / dtype / merging come from one base and behave
    the same way on both kinds of statistics."""
    rng = np.random.default_rng(11)
    X, Y, fold = _chunk(rng, 2, 30, 4, 2, 1)
    g = GramStats.zeros(2, 4, 2, 1, shift=choose_shift(X))
    reference.gram_update(g, X, Y, np.where(fold < 0, -1, 0).astype(np.int32))
    nst = NeuronStats.for_chunk(X, Y, fold)
    reference.neuron_update(nst, X, Y, fold)
    for s in (g, nst):
        assert isinstance(s, AdditiveStats) and s.check() is s
        c = s.clone()
        assert type(c) is type(s) and all(c.tensors()[k] is not v and torch.equal(c.tensors()[k], v)
                                          for k, v in s.tensors().items())
        f32 = s.to(dtype=torch.float32)
        assert type(f32) is type(s) and f32.dtype == torch.float32 and s.dtype == torch.float64
        assert s.device == torch.device("cpu")
        assert s.nbytes() == sum(t.numel() * 8 for t in s.tensors().values())
        twice = s + s
        assert type(twice) is type(s)
        for name in s._ADDITIVE:
            assert torch.equal(getattr(twice, name), 2 * getattr(s, name)), name
        assert torch.equal(twice.shift, s.shift)
        with pytest.raises(TypeError):
            s += 1
    assert list(nst.tensors()) == ["shift", "yshift", "n", "sx", "sxx", "sxy", "sy", "syy"]
    # NeuronStats merge only about the same shifts; shapes must agree for both kinds
    other = NeuronStats.zeros(2, 4, 2)
    with pytest.raises(StatsError, match="different shifts"):
        nst += other
    with pytest.raises(StatsError, match=r"cannot add NeuronStats of dims \(B, m, k\)"):
        nst += NeuronStats.zeros(2, 5, 2)
    bad = nst.clone()
    bad.sxy = bad.sxy[:, :, :1]
    with pytest.raises(StatsError, match=r"NeuronStats.sxy has shape \(2, 4, 1\)"):
        bad.check()

def test_validate_chunk_errors():
    s = GramStats.zeros(2, 4, 2, 3)
    X = np.zeros((2, 5, 4), np.float16)
    Y = np.zeros((5, 2))
    assert validate_chunk(s, X, Y, np.zeros(5, np.int32)) == (5, 2)
    with pytest.raises(StatsError, match=r"X must have shape \(B, r, d\)"):
        validate_chunk(s, np.zeros((2, 5, 3), np.float16), Y, np.zeros(5, np.int32))
    with pytest.raises(StatsError, match="Y must have shape"):
        validate_chunk(s, X, np.zeros((4, 2)), np.zeros(5, np.int32))
    with pytest.raises(StatsError, match="fold ids are required"):
        validate_chunk(s, X, Y, None)
    with pytest.raises(StatsError, match=r"\[-1, 3\)"):
        validate_chunk(s, X, Y, np.array([0, 1, 2, 3, 0], np.int32))
    with pytest.raises(StatsError, match=r"\[-1, 3\)"):
        validate_chunk(s, X, Y, np.array([0, -2, 0, 0, 0], np.int32))
    with pytest.raises(StatsError, match="integers"):
        validate_chunk(s, X, Y, np.zeros(5))
    s1 = GramStats.zeros(1, 4, 1, 1)
    # (r,) target, k == 1
    assert validate_chunk(s1, np.zeros((1, 5, 4)), np.zeros(5), None) == (5, 1)


def test_choose_shift_is_float32_mean_of_kept_rows():
    rng = np.random.default_rng(5)
    X = (rng.normal(size=(2, 20, 3)) + 1000.0 / 3).astype(np.float16)
    fold = np.zeros(20, np.int32)
    fold[:5] = -1
    c = choose_shift(X, fold)
    want = X[:, 5:].astype(np.float64).mean(1)
    assert c.dtype == torch.float64 and c.shape == (2, 3)
    np.testing.assert_allclose(c.numpy(), want, rtol=1e-7)
    assert torch.equal(c, c.float().double())                   # exactly representable in float32
    assert torch.equal(choose_shift(X, np.full(20, -1)), choose_shift(X))   # nothing kept: all rows
    with pytest.raises(StatsError, match="NaN or inf"):
        choose_shift(np.full((1, 2, 2), np.inf, np.float16))


def test_auto_on_a_gpu_takes_the_first_runnable_of_gpu_order(monkeypatch):
    # the Gram statistics prefer Triton, the neuron moments the CUDA module (measured faster);
    # a backend that cannot run is skipped
    from probes.kernels import NEURON_GPU_ORDER
    from probes.kernels import backend as kernels

    runnable = {"triton", "cuda", "cpu", "torch"}
    monkeypatch.setattr(kernels, "_load",
                        lambda n: (object(), "") if n in runnable else (None, "no"))
    assert kernels.resolve_backend("auto", "cuda") == "triton"
    assert kernels.resolve_backend("auto", "cuda", gpu_order=NEURON_GPU_ORDER) == "cuda"
    assert kernels.resolve_backend("auto", "cpu", gpu_order=NEURON_GPU_ORDER) == "cpu"
    runnable.discard("cuda")
    assert kernels.resolve_backend("auto", "cuda", gpu_order=NEURON_GPU_ORDER) == "triton"


def test_dispatch_resolution():
    names = available_backends()
    assert names[0] == "torch"
    assert resolve_backend("torch") == "torch"
    assert resolve_backend("auto", "cpu") in ("cpu", "torch")
    assert resolve_backend("auto", None) == ("cpu" if "cpu" in names else "torch")
    with pytest.raises(BackendUnavailable, match="unknown backend 'gpu'"):
        resolve_backend("gpu")
    for name in ("cuda", "triton"):
        if name not in names:
            with pytest.raises(BackendUnavailable, match=f"backend '{name}' is not available"):
                resolve_backend(name)
            with pytest.raises(ValueError):
                gram_update(GramStats.zeros(1, 2, 1, 1), np.zeros((1, 1, 2), np.float16),
                            np.zeros((1, 1)), backend=name)


def test_all_reduce_single_rank_keeps_stats():
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not built in")
    rng = np.random.default_rng(6)
    X, Y, fold = _chunk(rng, 1, 10, 3, 1, 2)
    s = GramStats.zeros(1, 3, 1, 2, shift=choose_shift(X))
    reference.gram_update(s, X, Y, fold)
    before = s.clone()
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        s.all_reduce_()
    finally:
        dist.destroy_process_group()
    for name in ("shift", "n", "sx", "xtx", "sy", "yty", "xty"):
        assert torch.equal(getattr(s, name), getattr(before, name))


def test_preferred_chunk_rows():
    from probes.kernels import GRAM_BLOCK_ROWS, preferred_chunk_rows

    assert preferred_chunk_rows(4096) == GRAM_BLOCK_ROWS
    assert preferred_chunk_rows(4096, n_folds=5) == 5 * GRAM_BLOCK_ROWS
    assert preferred_chunk_rows(4096, B=32, max_bytes=64 << 20) == (64 << 20) // (32 * 4096 * 2)
    assert preferred_chunk_rows(4096, B=32, max_bytes=1) == 64
    assert preferred_chunk_rows(100) == 512


def _rank_main(rank, world, store_path, chunks, shifts, out_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        X, Y, fold = chunks[rank]
        s = GramStats.zeros(X.shape[0], X.shape[2], Y.shape[1], 2, shift=shifts[rank])
        reference.gram_update(s, X, Y, fold)
        s.all_reduce_()
        if rank == 1:
            torch.save({name: getattr(s, name)
                        for name in ("shift", "n", "sx", "xtx", "sy", "yty", "xty")}, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes importing torch: ~10 s on the 2-core CI machine
def test_all_reduce_two_ranks_with_different_shifts(tmp_path):
    """Two processes with their own rows and shifts end with the statistics of all rows, about
    rank 0's shift."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    rng = np.random.default_rng(7)
    chunks = [_chunk(rng, 2, 30, 5, 2, 2, offset=40.0), _chunk(rng, 2, 25, 5, 2, 2, offset=40.0)]
    shifts = [choose_shift(c[0]) for c in chunks]
    out = tmp_path / "rank1.pt"
    mp.spawn(_rank_main, args=(2, str(tmp_path / "store"), chunks, shifts, str(out)), nprocs=2,
             join=True)
    got = torch.load(out)
    want = GramStats.zeros(2, 5, 2, 2, shift=shifts[0])
    reference.gram_update(want, np.concatenate([c[0] for c in chunks], 1),
                          np.concatenate([c[1] for c in chunks]),
                          np.concatenate([c[2] for c in chunks]))
    assert torch.equal(got["shift"], shifts[0])
    for name in ("n", "sx", "xtx", "sy", "yty", "xty"):
        _close(got[name], getattr(want, name), 1e-11)
