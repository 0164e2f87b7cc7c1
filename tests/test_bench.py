"""The ridge bench (bench/probe.py) runs on the fit's current store API: its in-memory store
once fell behind format version 2 (ragged, sites) and `python -m bench.probe` failed."""
from __future__ import annotations

from bench.probe import bench_shape, write_results_md


def test_ridge_bench_runs_chooses_sklearns_alphas_and_writes_its_section(tmp_path):
    rows = bench_shape("tiny", L=3, n=600, d=24, sk_layers=3, our_layers=3,
                       precisions=("float64", "float32"), backend="auto")
    assert [r["precision"] for r in rows] == ["float64", "float32"]
    for r in rows:
        assert r["form"] == "primal" and r["alphas_same"] == "3/3", r
        assert r["fit_s"] > 0 and r["floor_s"] > 0
    md = tmp_path / "RESULTS.md"
    write_results_md(rows, str(md), "a note")          # the CLI passes --results as a string
    text = md.read_text()
    assert "## Ridge probes on every layer" in text and "a note" in text
    assert text.count("| 3 x 600 x 24") == 2


def test_ridge_bench_dual_form_floor_counts_the_kernel_eigendecomposition(tmp_path):
    (r,) = bench_shape("wide", L=2, n=120, d=200, sk_layers=2, our_layers=2,
                       precisions=("float64",), backend="auto")
    assert r["form"] == "dual" and r["alphas_same"] == "2/2"
    assert r["floor_eigh_s"] > 0 and r["vs_floor_eigh"] < r["vs_floor"]
    write_results_md([r], tmp_path / "R.md", "")
    assert "| 2 x 120 x 200 | dual" in (tmp_path / "R.md").read_text()
