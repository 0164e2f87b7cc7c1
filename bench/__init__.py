"""Benchmarks: one module per family (run as ``python -m bench.NAME``), helpers in ``common``;
measurements go to bench/RESULTS.md."""
