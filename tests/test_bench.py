"""The ridge bench (bench/probe.py) runs on the fit's current store API: its in-memory store
once fell behind format version 2 (ragged, sites) and `python -m bench.probe` failed."""
from __future__ import annotations

from bench.probe import bench_shape


def test_ridge_bench_runs_and_chooses_sklearns_alphas():
    rows = bench_shape("tiny", L=3, n=600, d=24, sk_layers=3, our_layers=3,
                       precisions=("float64", "float32"), backend="auto")
    assert [r["precision"] for r in rows] == ["float64", "float32"]
    for r in rows:
        assert r["form"] == "primal" and r["alphas_same"] == "3/3", r
        assert r["fit_s"] > 0 and r["floor_s"] > 0
