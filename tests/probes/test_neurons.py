"""Neuron statistics: streaming moments (every backend here vs the float64 reference), Pearson vs
numpy, rank transform and Spearman vs scipy.

Bounds: the cpu backend accumulates in double from exact fp16 values: 1e-10 relative to the
reference; Pearson from streamed moments vs numpy.corrcoef on the same fp16 values: 1e-9.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from probes.errors import BackendUnavailable, StatsError
from probes.kernels import neuron_update
from probes.kernels.reference import neuron_update as reference_neuron_update
from probes.neurons import neuron_correlations, rank_transform, spearman
from probes.stats import NeuronStats

scipy_stats = pytest.importorskip("scipy.stats")


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def chunks(B, m, k, sizes, seed):
    g = np.random.default_rng(seed)
    out = []
    for r in sizes:
        X = (g.standard_normal((B, r, m)) * 1.3
             + g.standard_normal((B, 1, m)) * 3).astype(np.float16)
        Y = g.standard_normal((r, k)) * 20 + 1950
        fold = g.integers(-1, 3, size=r).astype(np.int32)
        out.append((X, Y, fold))
    return out


def test_pearson_matches_numpy_over_streamed_chunks():
    B, m, k = 2, 13, 2
    data = chunks(B, m, k, [17, 1, 30], seed=1)
    st = NeuronStats.for_chunk(*data[0])
    for X, Y, f in data:
        reference_neuron_update(st, X, Y, f)
    keepX = np.concatenate([X[:, f >= 0] for X, _, f in data], axis=1).astype(np.float64)
    keepY = np.concatenate([Y[f >= 0] for _, Y, f in data], axis=0)
    assert int(st.n) == keepY.shape[0]
    r = st.pearson().numpy()
    for b in range(B):
        for j in range(m):
            for t in range(k):
                want = np.corrcoef(keepX[b, :, j], keepY[:, t])[0, 1]
                assert abs(r[b, j, t] - want) < 1e-9
    assert np.allclose(st.means().numpy(), keepX.mean(1), atol=1e-9)


def test_cpu_backend_matches_reference():
    from probes.kernels import cpu as cpu_backend

    if not cpu_backend.is_available() or "neuron_update" in cpu_backend.missing_ops():
        pytest.fail(cpu_backend.unavailable_reason())
    B, m, k = 3, 301, 3   # m not a multiple of the 256-column work item
    data = chunks(B, m, k, [40, 7], seed=2)
    got = NeuronStats.for_chunk(*chunks(B, m, k, [5], seed=3)[0])
    want = got.clone()
    for X, Y, f in data:
        neuron_update(got, X, Y, f, backend="cpu")
        reference_neuron_update(want, X, Y, f)
    assert float(got.n) == float(want.n)
    for name in ("sx", "sxx", "sxy", "sy", "syy"):
        assert rel(getattr(got, name), getattr(want, name)) < 1e-10, name
    # auto on CPU data picks the compiled kernel and gives the same numbers
    auto = NeuronStats.for_chunk(*chunks(B, m, k, [5], seed=3)[0])
    for X, Y, f in data:
        neuron_update(auto, X, Y, f)
    assert torch.allclose(auto.sxy, got.sxy, rtol=0, atol=0)


def test_constant_neuron_and_all_rows_skipped():
    X = np.ones((1, 6, 3), np.float16)
    X[0, :, 1] = np.arange(6)
    Y = np.arange(6, dtype=np.float64).reshape(6, 1)
    st = NeuronStats.zeros(1, 3, 1)
    reference_neuron_update(st, X, Y)
    r = st.pearson()
    assert r[0, 0, 0] == 0 and abs(float(r[0, 1, 0]) - 1) < 1e-12
    before = st.clone()
    reference_neuron_update(st, X, Y, np.full(6, -1, np.int32))
    assert torch.equal(st.sxy, before.sxy) and float(st.n) == 6


def test_bad_inputs():
    st = NeuronStats.zeros(2, 4, 1)
    with pytest.raises(StatsError, match="X must have shape"):
        reference_neuron_update(st, np.zeros((1, 3, 4), np.float16), np.zeros((3, 1)))
    with pytest.raises(StatsError, match="Y must have shape"):
        reference_neuron_update(st, np.zeros((2, 3, 4), np.float16), np.zeros((4, 1)))
    with pytest.raises(StatsError, match="fold ids"):
        reference_neuron_update(st, np.zeros((2, 3, 4), np.float16), np.zeros((3, 1)),
                                np.array([0, -2, 0], np.int32))
    with pytest.raises(StatsError, match="at least 2 rows"):
        st.pearson()
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        neuron_update(st, np.zeros((2, 3, 4), np.float16), np.zeros((3, 1)), backend="fpga")


def test_rank_transform_matches_scipy_with_ties():
    g = np.random.default_rng(4)
    x = g.integers(0, 5, size=(31, 6)).astype(np.float32)     # many ties
    got = rank_transform(torch.from_numpy(x), dim=0).numpy()
    want = np.stack([scipy_stats.rankdata(x[:, j]) for j in range(6)], axis=1)
    assert np.array_equal(got, want)
    x2 = g.standard_normal((5, 40))
    assert np.array_equal(rank_transform(torch.from_numpy(x2), dim=1).numpy(),
                          np.stack([scipy_stats.rankdata(row) for row in x2]))
    x3 = g.integers(0, 4, size=(3, 17, 4)).astype(np.float64)  # a middle dimension, ties
    assert np.array_equal(rank_transform(torch.from_numpy(x3), dim=1).numpy(),
                          scipy_stats.rankdata(x3, axis=1))
    assert rank_transform(torch.zeros(0, 3)).shape == (0, 3)
    assert torch.equal(rank_transform(torch.tensor([[2.0, 5.0]])),
                       torch.ones(1, 2, dtype=torch.float64))


def test_spearman_matches_scipy():
    g = np.random.default_rng(5)
    r, m, k = 57, 9, 2
    X = (g.standard_normal((r, m)) * 2).astype(np.float16)
    X[:, 3] = 1.0                                            # constant column -> 0
    Y = np.c_[X[:, 0].astype(np.float64) ** 3 + g.standard_normal(r) * 0.1, g.standard_normal(r)]
    mask = g.random(r) > 0.2
    got = spearman(torch.from_numpy(X), torch.from_numpy(Y), mask=torch.from_numpy(mask),
                   column_block=4).numpy()
    for j in range(m):
        for t in range(k):
            if j == 3:
                assert got[j, t] == 0
                continue
            want = scipy_stats.spearmanr(X[mask, j].astype(np.float64), Y[mask, t]).statistic
            assert abs(got[j, t] - want) < 1e-12
    assert got[0, 0] > 0.95


def small_store(tmp_path, L=2, n=45, d=8, m=19):
    pd = pytest.importorskip("pandas")
    from actstore.store import create_store

    g = np.random.default_rng(6)
    ent = pd.DataFrame({"name": [f"e{i}" for i in range(n)], "latitude": g.uniform(-60, 60, n),
                        "longitude": g.uniform(-180, 180, n), "is_test": g.random(n) < 0.3})
    st = create_store(tmp_path / "s.zarr", layers=list(range(1, L + 1)), n_rows=n, d_model=d,
                      entities=ent, targets=("latitude", "longitude"), group_columns=(),
                      meta={}, d_mlp=m, rows_per_chunk=16)
    neur = (g.standard_normal((L, n, m)) + ent["latitude"].to_numpy()[None, :, None] / 30
            ).astype(np.float16)
    for s0 in range(0, n, 16):
        s1 = min(n, s0 + 16)
        st.write_rows(s0, g.standard_normal((L, s1 - s0, d)).astype(np.float16), neur[:, s0:s1])
    st.mark_done(n)
    return st, ent, neur


def test_neuron_correlations_from_a_store(tmp_path):
    L, m = 2, 19
    st, ent, neur = small_store(tmp_path, L=L, m=m)
    Y = ent[["latitude", "longitude"]].to_numpy()
    train = ~ent["is_test"].to_numpy()
    res = neuron_correlations(st, Y, rows_mask=train, backend="torch", device="cpu", chunk_rows=16)
    assert res["layers"] == [1, 2] and res["n_rows"] == int(train.sum())
    for b in range(L):
        for j in (0, 7, m - 1):
            for t in range(2):
                x = neur[b, train, j].astype(np.float64)
                want = np.corrcoef(x, Y[train, t])[0, 1]
                assert abs(float(res["pearson"][b, j, t]) - want) < 1e-9
                want = scipy_stats.spearmanr(x, Y[train, t]).statistic
                assert abs(float(res["spearman"][b, j, t]) - want) < 1e-12
    assert float(res["pearson"][:, :, 0].mean()) > 0.3      # the planted latitude signal


@pytest.mark.gpu
def test_neuron_correlations_on_gpu_match_cpu(tmp_path):
    st, ent, _ = small_store(tmp_path, L=3, n=300, d=16, m=1037)
    Y = ent[["latitude", "longitude"]].to_numpy()
    mask = ~ent["is_test"].to_numpy()
    cpu = neuron_correlations(st, Y, rows_mask=mask, backend="torch", device="cpu", chunk_rows=64)
    for backend in ("auto", "triton", "cuda"):
        gpu = neuron_correlations(st, Y, rows_mask=mask, backend=backend, device="cuda",
                                  chunk_rows=64)
        assert (gpu["pearson"] - cpu["pearson"]).abs().max() < 1e-5, backend
        assert (gpu["spearman"] - cpu["spearman"]).abs().max() < 1e-12, backend
