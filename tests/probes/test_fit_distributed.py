"""Distributed fit (torch.distributed, gloo on CPU): ranks stream their own rows, statistics
and LOO sums are all-reduced, rank 0 writes; results equal the one-process fit_all_layers.

Ranks are forked by ``actstore.distributed.launch_local``; one slow test drives the real
``torchrun -m probes fit`` command line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from actstore.distributed import launch_local
from actstore.store import create_store, open_store
from probes.distributed import LocalReducer, Reducer, RowShard
from probes.fit import fit_all_layers, fit_all_layers_distributed

REPO = Path(__file__).resolve().parents[2]
TOL = dict(rtol=1e-8, atol=1e-10)


def make_store(path, n=150, d=12, L=3, R=16, seed=0):
    """Activations with a planted linear map to (latitude, longitude) plus noise and a large
    mean (so the shift matters), n not a multiple of R."""
    rng = np.random.default_rng(seed)
    lat, lon = rng.uniform(-60, 60, n), rng.uniform(-170, 170, n)
    ent = pd.DataFrame({"name": [f"p{i}" for i in range(n)], "entity": [f"p{i}" for i in range(n)],
                        "latitude": lat, "longitude": lon, "is_test": rng.random(n) < 0.25,
                        "country": rng.choice(["a", "b", "c"], n)})
    st = create_store(path, layers=list(range(1, L + 1)), n_rows=n, d_model=d, entities=ent,
                      targets=("latitude", "longitude"), group_columns=("country",), meta={},
                      rows_per_chunk=R)
    W = rng.standard_normal((L, 2, d))
    y = np.stack([lat / 60, lon / 170], 1)
    X = (np.einsum("nk,lkd->lnd", y, W) * np.arange(1, L + 1)[:, None, None]
         + rng.standard_normal((L, n, d)) + 5.0).astype(np.float16)
    for s in range(0, n, R):
        st.write_rows(s, X[:, s:s + R])
    st.mark_done(n)
    st.close()
    return path


def _fit_rank(store, out, kw):
    res = fit_all_layers_distributed(store, **kw)
    rank = int(os.environ["RANK"])
    if res is None:
        Path(f"{out}.none{rank}").write_text("")
        return
    np.savez(out, **{k: v for k, v in res["arrays"].items()})
    Path(f"{out}.json").write_text(json.dumps({"layers": res["layers"], "form": res["form"],
                                               "n_train": res["n_train"]}))


def _compare(out, ref):
    got = np.load(out)
    for k in ("coef", "intercept", "alpha", "cv_scores", "predictions", "is_test", "layers"):
        np.testing.assert_allclose(got[k], ref["arrays"][k], **TOL, err_msg=k)
    meta = json.loads(Path(f"{out}.json").read_text())
    assert meta["form"] == ref["form"] and meta["n_train"] == ref["n_train"]
    for a, b in zip(meta["layers"], ref["layers"]):
        assert a["alpha"] == b["alpha"] and a["layer"] == b["layer"]
        assert abs(a["test"]["r2"] - b["test"]["r2"]) < 1e-9
        assert a["row_norms"]["outliers"] == b["row_norms"]["outliers"]   # every rank's rows
        assert abs(a["row_norms"]["threshold"] - b["row_norms"]["threshold"]) < 1e-9


@pytest.mark.parametrize("world,kw", [
    (2, dict(cv="loo", backend="torch")),
    (3, dict(cv=3, alpha_per_target=True, backend="cpu", split="group:country")),
    (2, dict(cv="loo", backend="cpu", row_norm="clip")),   # thresholds from every rank's rows
    (2, dict(cv=3, backend="torch", row_norm="unit")),     # each rank rescales its own rows
])
def test_distributed_fit_equals_one_process(tmp_path, world, kw):
    store = make_store(tmp_path / "s.zarr")
    kw = dict(kw, layers=None, memory_bytes=1 << 30)
    ref = fit_all_layers(store, **kw)
    assert ref["form"] == "primal" and ref["layers"][-1]["test"]["r2"] > 0.5   # real signal
    out = tmp_path / "r.npz"
    assert launch_local(_fit_rank, world, (store, out, kw)) == [0] * world
    _compare(out, ref)
    assert sorted(p.name for p in tmp_path.glob("r.npz.none*")) == [
        f"r.npz.none{r}" for r in range(1, world)]


def test_layer_batches_and_a_rank_without_rows(tmp_path):
    """Layers in several batches (each batch its own collectives) and more ranks than chunks."""
    store = make_store(tmp_path / "s.zarr", n=40, R=16)   # 3 chunks, 4 ranks
    assert RowShard(3, 4, 16).rows(40) == (40, 40)
    assert [RowShard(r, 4, 16).rows(40) for r in range(3)] == [(0, 16), (16, 32), (32, 40)]
    kw = dict(backend="torch", memory_bytes=1)            # one layer per batch
    ref = fit_all_layers(store, **kw)
    out = tmp_path / "r.npz"
    assert launch_local(_fit_rank, 4, (store, out, kw)) == [0, 0, 0, 0]
    _compare(out, ref)


def test_dual_form_runs_on_rank_0(tmp_path):
    store = make_store(tmp_path / "s.zarr", n=60, d=80)        # n_train < d: dual form
    kw = dict(backend="torch")
    ref = fit_all_layers(store, **kw)
    assert ref["form"] == "dual"
    out = tmp_path / "r.npz"
    assert launch_local(_fit_rank, 2, (store, out, kw)) == [0, 0]
    _compare(out, ref)
    assert (tmp_path / "r.npz.none1").exists()


def test_one_process_is_plain_fit_all_layers(tmp_path):
    store = make_store(tmp_path / "s.zarr", n=60)
    a = fit_all_layers_distributed(store, backend="torch")
    b = fit_all_layers(store, backend="torch")
    np.testing.assert_array_equal(a["arrays"]["predictions"], b["arrays"]["predictions"])


def test_local_reducer_is_the_identity():
    """One process: every row is its own and every reduction hands back what it is given;
    LocalReducer and RowShard answer the same Reducer protocol."""
    local = LocalReducer()
    assert local.is_main and local.rows(37) == (0, 37)
    local.agree()
    err = ValueError("x")
    assert local.alike(err) is err
    preds = np.ones((2, 5, 1))
    assert local.reduce_predictions(preds, "cpu") is preds
    assert local.share_rows(preds, "cpu") is preds
    assert local.any_bad([True, False]).tolist() == [True, False]
    assert local.reduce_stats(stats := object()) is stats
    with pytest.raises(ValueError, match="x"):
        local.agree(err)
    methods = [m for m in vars(Reducer) if not m.startswith("_")]
    assert set(methods) == {"rows", "agree", "alike", "any_bad", "reduce_stats", "reduce_loo",
                            "reduce_predictions", "share_rows"}
    for cls in (LocalReducer, RowShard):
        assert all(callable(getattr(cls, m)) for m in methods) and hasattr(cls, "is_main")


def _fit_rank_error(store, out, kw):
    """Every rank must stop with the FitError (none left waiting in a collective)."""
    from probes.fit import FitError
    rank = int(os.environ["RANK"])
    try:
        fit_all_layers_distributed(store, **kw)
    except FitError as exc:
        Path(f"{out}.err{rank}").write_text(f"{type(exc).__name__}: {exc}")
        return
    raise AssertionError("no error")


def test_nan_test_row_on_rank_0_stops_every_rank(tmp_path):
    """k-fold, one layer per batch: a non-finite *test* row in rank 0's rows shows up only in
    rank 0's reduced predictions; the other rank must not go on to the next batch's
    all-reduce and wait there."""
    path = make_store(tmp_path / "s.zarr", n=40, R=16)      # rank 0: rows 0..32, rank 1: 32..40
    st = open_store(path, mode="a")
    row = int(np.nonzero(st.is_test[:16])[0][0])
    block = st.read(slice(0, 16))
    block[0, row, 3] = np.inf                             # layer 1 (the first batch)
    st.write_rows(0, block)
    st.close()
    out = tmp_path / "r"
    kw = dict(backend="torch", cv=3, memory_bytes=1)
    assert launch_local(_fit_rank_error, 2, (path, out, kw), timeout=120) == [0, 0]
    want = f"layer 1 has NaN or inf activations, first at row {row}, dim 3"
    e0, e1 = (Path(f"{out}.err{r}").read_text() for r in (0, 1))
    assert e0.startswith("FitError: ") and want in e0
    assert e1.startswith("_PeerCopy: ") and want in e1   # printed by rank 0 only


def _cli_fit_rank(store, out, kw, fail_rank):
    """`fastprobe fit` as the CLI runs it (stderr to a file per rank); rank ``fail_rank`` cannot
    open the store (as when it is not on a file system that every node sees)."""
    from contextlib import redirect_stderr

    from actstore.store import StoreError
    from probes.fit.cli import cli_fit
    rank = int(os.environ["RANK"])
    if rank == fail_rank:
        def cannot(path, *a, **k):
            raise StoreError(f"{path}: no such store")
        import probes.distributed
        probes.distributed.open_store = cannot
    with open(f"{out}.stderr{rank}", "w", buffering=1) as f, redirect_stderr(f):
        try:
            cli_fit(store, **kw)
            code = 0
        except SystemExit as exc:
            code = exc.code
    raise SystemExit(code)


@pytest.mark.parametrize("case", ["rank-local", "every rank"])
def test_cli_errors_are_printed_by_the_rank_that_meets_them(tmp_path, case):
    path = make_store(tmp_path / "s.zarr", n=40, R=16)
    out = tmp_path / "o"
    if case == "rank-local":
        args = (path, out, dict(backend="torch"), 1)
    else:
        args = (path, out, dict(backend="torch", targets=["nope"]), None)
    assert launch_local(_cli_fit_rank, 2, args, timeout=120) == [2, 2]
    e0, e1 = (Path(f"{out}.stderr{r}").read_text().strip() for r in (0, 1))
    if case == "rank-local":
        assert e1 == f"[rank 1] fastprobe: error: {path}: no such store"
        assert e0 == f"fastprobe: error: rank 1 failed: {path}: no such store"
    else:
        assert e0.startswith("fastprobe: error: unknown target 'nope'") and e1 == ""


@pytest.mark.slow
def test_torchrun_fastprobe_fit_cli(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    from actstore.distributed import _free_port
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-port", str(_free_port()), "-m", "probes", "fit",
                        "--all-layers", str(store), "--out", str(tmp_path / "o"), "--quiet"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("best layer") == 1          # rank 0 prints, rank 1 is quiet
    got = json.loads((tmp_path / "o" / "results.json").read_text())
    ref = fit_all_layers(open_store(store))
    assert got["best_layer"] == ref["best_layer"]
    for a, b in zip(got["layers"], ref["layers"]):
        assert a["alpha"] == b["alpha"]
        assert abs(a["test"]["r2"] - b["test"]["r2"]) < 1e-9
        assert a["row_norms"]["outliers"] == b["row_norms"]["outliers"]   # every rank's rows
        assert abs(a["row_norms"]["threshold"] - b["row_norms"]["threshold"]) < 1e-9
    coef = np.load(tmp_path / "o" / "probes.npz")["coef"]
    np.testing.assert_allclose(coef, ref["arrays"]["coef"].astype(np.float32), rtol=1e-5,
                               atol=1e-7)
    # an error is reported once, by rank 0, and the job fails
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-port", str(_free_port()), "-m", "probes", "fit",
                        "--all-layers", str(store), "--target", "nope"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and p.stderr.count("unknown target 'nope'") == 1

