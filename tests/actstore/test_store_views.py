"""store.iter_batches and store.to_xarray (actstore/store/views.py): the rows of store.layer(),
one row block per read, seeded shuffles, splits, numpy/torch and dtypes, ragged stores, Zarr and
HDF5, bfloat16."""
from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
import torch

from actstore.store import StoreError, create_store, open_store
from actstore.store.chunks import BlockReader
from actstore.store.format import as_compute, to_storage

N, L, D, R = 37, 3, 10, 8
FORMATS = [("zarr", "s.zarr"), ("hdf5", "s.h5")]


def _entities(n: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({
        "name": [f"e{i}" for i in range(n)],
        "entity": [f"Entity {i}" for i in range(n)],
        "score": rng.normal(size=n),
        "year": np.arange(1900, 1900 + n, dtype=np.int64),
        "label": [("b", "a", "c")[i % 3] for i in range(n)],
        "is_test": np.arange(n) % 4 == 0,
    })


def _write(path, fmt=None, dtype="float16", n=N, **kw):
    """A complete store of random values; returns (path, (L, n, D) float32 values)."""
    ent = kw.pop("entities", None)
    ent = _entities(n) if ent is None else ent
    vals = np.random.default_rng(1).standard_normal((L, kw.get("n_rows", n), D)).astype(
        np.float32)
    st = create_store(path, layers=[0, 2, 5], n_rows=kw.pop("n_rows", n), d_model=D,
                      entities=ent, targets=("score", "year"), group_columns=(),
                      meta={"model": {"id": "tiny"}}, format=fmt, dtype=dtype,
                      rows_per_chunk=R, **kw)
    stored = to_storage(torch.from_numpy(vals), dtype)
    for s in range(0, st.n_rows, R):
        e = min(st.n_rows, s + R)
        st.write_rows(s, stored[:, s:e])
        st.mark_done(e)
    st.close()
    return path, vals


@pytest.fixture(params=FORMATS, ids=[f for f, _ in FORMATS])
def store(request, tmp_path):
    fmt, name = request.param
    path, _ = _write(tmp_path / name, fmt)
    s = open_store(path)
    yield s
    s.close()


def _all_layers(s) -> np.ndarray:
    """(n, L, d) float32 from store.layer(), the reference."""
    return np.stack([as_compute(s.layer(x), s.dtype).float().numpy() for x in s.layers], 1)


def _cat(batches, key):
    return np.concatenate([np.asarray(b[key]) for b in batches])


def test_batches_equal_layer_rows(store):
    batches = list(store.iter_batches(5, targets=("score", "year"), as_="numpy"))
    assert [len(b["rows"]) for b in batches] == [5] * 7 + [2]
    np.testing.assert_array_equal(_cat(batches, "rows"), np.arange(N))
    np.testing.assert_array_equal(_cat(batches, "x"), _all_layers(store))
    np.testing.assert_array_equal(_cat(batches, "y"), store.target_array(("score", "year")))
    b = batches[0]
    assert b["x"].dtype == np.float16 and b["y"].dtype == np.float64
    assert b["rows"].dtype == np.int64 and "text" not in b


def test_batches_torch_layers_dtype(store):
    ref = _all_layers(store)
    batches = list(store.iter_batches(16, layers=[5, 0], dtype="float32"))
    x = torch.cat([b["x"] for b in batches])
    assert x.dtype == torch.float32 and x.shape == (N, 2, D)
    np.testing.assert_array_equal(x.numpy(), ref[:, [2, 0]])
    assert batches[0]["y"] is None and batches[0]["rows"].dtype == torch.int64
    x = next(store.iter_batches(4, dtype=np.float64))["x"]       # a numpy dtype works too
    assert x.dtype == torch.float64
    one = next(store.iter_batches(4, layers=-1, device="cpu", targets="label"))
    assert one["x"].dtype == torch.float16 and one["x"].shape == (4, 1, D)
    # a text target is its index among the sorted distinct values: a, b, c -> 0, 1, 2
    np.testing.assert_array_equal(one["y"][:, 0].numpy(), [1.0, 0.0, 2.0, 1.0])
    assert one["y"].dtype == torch.float64


def test_reads_one_block_at_a_time(store, monkeypatch):
    spans = []
    real = BlockReader.read

    def counting(self, pos, start, stop, verify):
        spans.append((start, stop))
        return real(self, pos, start, stop, verify)

    monkeypatch.setattr(BlockReader, "read", counting)
    for shuffle in (False, True):
        spans.clear()
        n = sum(len(b["rows"]) for b in store.iter_batches(1000, shuffle=shuffle))
        assert n == N                                      # one batch larger than the store
        assert spans and all(e - s <= R and s % R == 0 for s, e in spans)
        assert sorted(spans) == [(s, min(N, s + R)) for s in range(0, N, R)]
    spans.clear()
    list(store.iter_batches(3, split="test"))
    assert all(e - s <= R for s, e in spans)


def test_shuffle_is_seeded_and_blockwise(store):
    def order(seed):
        return [b["rows"].tolist() for b in store.iter_batches(6, shuffle=True, seed=seed)]

    a, again, other = order(3), order(3), order(4)
    assert a == again and a != other
    flat = [r for b in a for r in b]
    assert sorted(flat) == list(range(N)) and flat != list(range(N))
    # block order + a permutation inside each block: every block's rows come out together
    blocks = [r // R for r in flat]
    assert sum(x != y for x, y in zip(blocks, blocks[1:])) == -(-N // R) - 1
    # the values follow their rows
    ref = _all_layers(store)
    for b in store.iter_batches(6, shuffle=True, seed=3, as_="numpy"):
        np.testing.assert_array_equal(b["x"], ref[b["rows"]])


def test_split(store):
    is_test = store.entities["is_test"].to_numpy()
    ref = _all_layers(store)
    for split, want in (("train", ~is_test), ("test", is_test)):
        bs = list(store.iter_batches(4, split=split, as_="numpy", targets="score"))
        rows = _cat(bs, "rows")
        np.testing.assert_array_equal(rows, np.flatnonzero(want))
        np.testing.assert_array_equal(_cat(bs, "x"), ref[rows])
        np.testing.assert_array_equal(_cat(bs, "y")[:, 0], store.entities["score"][rows])
    shuffled = _cat(list(store.iter_batches(4, split="test", shuffle=True, as_="numpy")), "rows")
    assert sorted(shuffled) == np.flatnonzero(is_test).tolist()


@pytest.mark.parametrize("bad,match", [
    ({"site": "attn_out"}, r"no site 'attn_out'.*\['resid'\]"),
    ({"layers": 4}, "layer 4 is not in this store"),
    ({"layers": []}, "selects no layer"),
    ({"split": "val"}, "split must be"),
    ({"as_": "jax"}, "as_ must be"),
    ({"targets": "nope"}, r"no entity column\(s\) \['nope'\]"),
    ({"as_": "numpy", "device": "cuda"}, "device is for torch"),
    ({"dtype": "float99"}, "torch dtype"),
])
def test_bad_arguments_fail_at_the_call(store, bad, match):
    with pytest.raises(StoreError, match=match):
        store.iter_batches(8, **bad)       # before the first batch: no next() needed


@pytest.mark.parametrize("fmt,name", FORMATS)
def test_bfloat16(tmp_path, fmt, name):
    path, vals = _write(tmp_path / name, fmt, dtype="bfloat16")
    with open_store(path) as s:
        ref = vals.transpose(1, 0, 2)
        exact = torch.from_numpy(vals).to(torch.bfloat16).float().numpy().transpose(1, 0, 2)
        xn = _cat(list(s.iter_batches(10, as_="numpy")), "x")
        assert xn.dtype == np.float32
        np.testing.assert_array_equal(xn, exact)
        np.testing.assert_allclose(xn, ref, rtol=1e-2, atol=1e-2)
        xt = torch.cat([b["x"] for b in s.iter_batches(10)])
        assert xt.dtype == torch.bfloat16
        np.testing.assert_array_equal(xt.float().numpy(), exact)
        xr = pytest.importorskip("xarray")
        ds = s.to_xarray()
        assert isinstance(ds, xr.Dataset) and ds["resid"].dtype == np.float32
        np.testing.assert_array_equal(ds["resid"].values, exact.transpose(1, 0, 2))


def test_to_xarray_equals_layer(store):
    xr = pytest.importorskip("xarray")
    da = pytest.importorskip("dask.array")
    ds = store.to_xarray()
    assert isinstance(ds, xr.Dataset)
    v = ds["resid"]
    assert v.dims == ("layer", "row", "dim") and v.shape == (L, N, D)
    assert isinstance(v.data, da.Array)                              # lazy
    assert ds["layer"].values.tolist() == [0, 2, 5]
    for x in store.layers:
        np.testing.assert_array_equal(v.sel(layer=x).values, store.layer(x))
    assert ds["label"].dims == ("row",) and ds["label"].values.tolist() == \
        store.entities["label"].tolist()
    np.testing.assert_array_equal(ds["score"].values, store.entities["score"])
    # lazy reductions and selections read what they need
    np.testing.assert_allclose(v.mean("row").values, _all_layers(store).mean(0), atol=2e-3)
    sub = v.isel(layer=1, row=slice(3, 30, 4), dim=[7, 1]).values
    np.testing.assert_array_equal(sub, store.layer(2)[3:30:4][:, [7, 1]])
    assert ds.attrs["site"] == "resid" and ds.attrs["position"] == store.position


def test_to_xarray_without_dask_reads_into_memory(store, monkeypatch):
    pytest.importorskip("xarray")
    monkeypatch.setitem(sys.modules, "dask", None)
    monkeypatch.setitem(sys.modules, "dask.array", None)
    v = store.to_xarray()["resid"]
    assert isinstance(v.data, np.ndarray)
    np.testing.assert_array_equal(v.values, np.stack([store.layer(x) for x in store.layers]))


def test_to_xarray_without_xarray_says_what_to_install(store, monkeypatch):
    monkeypatch.setitem(sys.modules, "xarray", None)
    with pytest.raises(StoreError, match="pip install xarray"):
        store.to_xarray()


def test_to_xarray_unknown_site(store):
    pytest.importorskip("xarray")
    with pytest.raises(StoreError, match=r"no site 'neurons'.*\['resid'\]"):
        store.to_xarray(site="neurons")


# ----------------------------------------------------------------------------- v2: sites, ragged

@pytest.mark.parametrize("fmt,name", FORMATS)
def test_other_sites(tmp_path, fmt, name):
    ent = _entities(N)
    st = create_store(tmp_path / name, layers=[1, 2, 3], n_rows=N, d_model=D, entities=ent,
                      targets=("score",), group_columns=(), meta={}, format=fmt,
                      rows_per_chunk=R, sites={"resid": D, "attn_out": D, "mlp_out": D})
    rng = np.random.default_rng(2)
    vals = {k: rng.standard_normal((L, N, D)).astype(np.float16)
            for k in ("resid", "attn_out", "mlp_out")}
    st.write_rows(0, vals)
    st.mark_done(N)
    st.close()
    with open_store(tmp_path / name) as s:
        for site, want in vals.items():
            x = _cat(list(s.iter_batches(9, site=site, as_="numpy")), "x")
            np.testing.assert_array_equal(x, want.transpose(1, 0, 2))
        if pytest.importorskip("xarray"):
            np.testing.assert_array_equal(s.to_xarray("mlp_out")["mlp_out"].values,
                                          vals["mlp_out"])


@pytest.mark.parametrize("fmt,name", FORMATS)
def test_ragged_store(tmp_path, fmt, name):
    lengths = np.array([3, 1, 7, 5, 2, 9, 4, 6], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    n_tok = int(offsets[-1])
    ids = np.arange(100, 100 + n_tok, dtype=np.int32)
    ent = _entities(len(lengths))
    path, vals = _write(tmp_path / name, fmt, n=len(lengths), entities=ent, n_rows=n_tok,
                        position="all", tokens=(offsets, ids))
    text_of = np.repeat(np.arange(len(lengths)), lengths)
    with open_store(path) as s:
        assert s.ragged and s.n_rows == n_tok and s.n_texts == len(lengths)
        bs = list(s.iter_batches(7, targets="score", as_="numpy"))
        np.testing.assert_array_equal(_cat(bs, "rows"), np.arange(n_tok))
        np.testing.assert_array_equal(_cat(bs, "text"), text_of)
        np.testing.assert_array_equal(_cat(bs, "y")[:, 0], ent["score"].to_numpy()[text_of])
        np.testing.assert_array_equal(_cat(bs, "x"), _all_layers(s))
        test_rows = np.flatnonzero(ent["is_test"].to_numpy()[text_of])
        got = _cat(list(s.iter_batches(4, split="test", shuffle=True, seed=1)), "rows")
        assert sorted(got.tolist()) == test_rows.tolist()
        t = next(s.iter_batches(5))
        assert t["text"].dtype == torch.int64
        if pytest.importorskip("xarray"):
            ds = s.to_xarray()
            assert ds["resid"].shape == (L, n_tok, D)
            np.testing.assert_array_equal(ds["text_index"].values, text_of)
            np.testing.assert_array_equal(ds["token_id"].values, ids)
            assert ds["label"].dims == ("text_row",)
            np.testing.assert_array_equal(ds["resid"].sel(layer=5).values, s.layer(5))
    assert vals.shape == (L, n_tok, D)


@pytest.mark.parametrize("name", ["store_zarr", "store_h5.h5"])
def test_version_1_fixture_stores(name):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "fixtures" / "v1" / name
    with open_store(path) as s:                       # read-only: the fixture stays as it is
        assert s.header["format_version"] == 1
        site = s.sites[-1]                            # the zarr one holds neurons
        bs = list(s.iter_batches(50, site=site, targets=s.targets, as_="numpy"))
        np.testing.assert_array_equal(
            _cat(bs, "x"), np.stack([s.layer(x, site=site) for x in s.layers], 1))
        np.testing.assert_array_equal(_cat(bs, "y"), s.target_array())
        if pytest.importorskip("xarray"):
            np.testing.assert_array_equal(s.to_xarray()["resid"].sel(layer=s.layers[0]).values,
                                          s.layer(s.layers[0]))
