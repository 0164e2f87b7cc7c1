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
