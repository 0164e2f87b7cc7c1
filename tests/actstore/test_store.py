"""ActivationStore: roundtrip (zarr + hdf5), plain-zarr readability, refusals, chunk rules."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import actstore
from actstore.store import (
    FORMAT_NAME,
    FORMAT_VERSION,
    StoreError,
    create_store,
    default_rows_per_chunk,
    open_store,
)


def _table(n, rng):
    return pd.DataFrame({
        "name": [f"Place {i} (Land)" for i in range(n)],
        "entity": [f"Land's Place {i}" if i % 3 else "Zürich – ü" for i in range(n)],
        "latitude": rng.uniform(-90, 90, n),
        "longitude": rng.uniform(-180, 180, n),
        "is_test": rng.random(n) < 0.2,
        "entity_type": ["city" if i % 2 else "river" for i in range(n)],
        "country": [None if i == 3 else f"C{i % 4}" for i in range(n)],
    })


def _make(path, n=37, L=3, d=10, R=8, fmt=None, d_mlp=None, rng=None, **kw):
    rng = rng or np.random.default_rng(0)
    ent = _table(n, rng)
    meta = {"model": {"id": "tiny"}, "prompt": {"name": "empty", "template": "{entity}"}}
    return create_store(path, layers=list(range(1, L + 1)), n_rows=n, d_model=d, entities=ent,
                        targets=("latitude", "longitude"), group_columns=("country",), meta=meta,
                        format=fmt, d_mlp=d_mlp, rows_per_chunk=R, **kw), ent


@pytest.mark.parametrize("fmt,name", [("zarr", "s.zarr"), ("hdf5", "s.h5")])
def test_roundtrip(tmp_path, fmt, name):
    rng = np.random.default_rng(1)
    n, L, d, dm, R = 37, 3, 10, 14, 8
    st, ent = _make(tmp_path / name, n, L, d, R, fmt=fmt, d_mlp=dm, rng=rng)
    full = rng.standard_normal((L, n, d)).astype(np.float16)
    neu = rng.standard_normal((L, n, dm)).astype(np.float16)
    for s in range(0, n, R):
        e = min(n, s + R)
        st.write_rows(s, full[:, s:e], neurons=neu[:, s:e])
        st.mark_done(e)
    st.close()

    s2 = actstore.open(tmp_path / name)
    assert s2.format == fmt and s2.rows_done == n and s2.complete
    assert (s2.n_layers, s2.n_rows, s2.d_model, s2.d_mlp) == (L, n, d, dm)
    assert s2.layers == [1, 2, 3] and s2.dtype == "float16" and s2.rows_per_chunk == R
    assert s2.meta["prompt"]["template"] == "{entity}"
    got = s2.entities
    assert list(got.columns) == list(ent.columns)
    pd.testing.assert_series_equal(got["latitude"], ent["latitude"])
    assert got["is_test"].dtype == bool and (got["is_test"] == ent["is_test"]).all()
    assert got["entity"].tolist() == ent["entity"].tolist()
    assert got["country"][3] == "" and got["country"][4] == "C0"
    np.testing.assert_array_equal(s2.target_array(), ent[["latitude", "longitude"]].to_numpy())
    np.testing.assert_array_equal(s2.target_array("longitude")[:, 0], ent["longitude"])
    np.testing.assert_array_equal(s2.is_test, ent["is_test"].to_numpy())
    assert s2.layers == [1, 2, 3]               # hidden-state indices, not positions
    for i, layer in enumerate(s2.layers):
        np.testing.assert_array_equal(s2.layer(layer), full[i])
    t = s2.layer(-1, array="neurons", as_="torch")   # negative: from the last stored layer
    assert str(t.dtype) == "torch.float16"
    np.testing.assert_array_equal(t.numpy(), neu[-1])
    np.testing.assert_array_equal(s2.read(slice(5, 30), layers=[3, 1]), full[[2, 0], 5:30])
    blocks = list(s2.iter_chunks(rows=20, layers=[2]))
    assert [b[0] for b in blocks] == [0, 24]  # 20 rounded up to whole chunks of 8
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks], axis=1), full[[1]])
    blocks = list(s2.iter_chunks(start=10, stop=30))
    assert [b[0] for b in blocks] == [10, 16, 24]
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks], axis=1), full[:, 10:30])
    s2.close()


def test_partial_store_reads_stop_at_rows_done(tmp_path):
    st, _ = _make(tmp_path / "p.zarr", n=37, R=8)
    x = np.ones((3, 8, 10), np.float16)
    st.write_rows(0, x)
    st.write_rows(8, 2 * x)
    st.mark_done(16)
    s2 = open_store(tmp_path / "p.zarr")
    assert s2.rows_done == 16 and not s2.complete
    assert s2.layer(1).shape == (16, 10)
    assert [s for s, _ in s2.iter_chunks()] == [0, 8]
    # read never returns rows past rows_done (uninitialised bytes in HDF5)
    assert s2.read(slice(0, None)).shape == (3, 16, 10)
    assert s2.read(slice(None)).shape == (3, 16, 10)
    np.testing.assert_array_equal(s2.read(slice(8, None))[:, :, 0], 2)
    np.testing.assert_array_equal(s2.read(slice(-8, None))[:, :, 0], 2)  # counted from rows_done
    assert s2.read(slice(0, 16)).shape == (3, 16, 10)
    with pytest.raises(StoreError, match="go past rows_done=16"):
        s2.read(slice(8, 24))
    with pytest.raises(StoreError, match="go past rows_done=16"):
        s2.read(slice(0, 37))


def test_plain_zarr_can_read_it(tmp_path):
    import zarr
    rng = np.random.default_rng(2)
    st, ent = _make(tmp_path / "z.zarr", n=20, R=8, rng=rng)
    full = rng.standard_normal((3, 20, 10)).astype(np.float16)
    st.write_rows(0, full[:, :16])
    st.write_rows(16, full[:, 16:])
    st.mark_done(20)
    g = zarr.open(str(tmp_path / "z.zarr"), mode="r")
    a = g["resid"]
    assert a.shape == (3, 20, 10) and a.dtype == np.float16
    assert a.chunks == (1, 8, 10) and a.shards == (3, 8, 10)
    assert a.metadata.dimension_names == ("layer", "row", "dim")
    np.testing.assert_array_equal(a[:], full)
    np.testing.assert_array_equal(g["layer"][:], [1, 2, 3])
    assert [str(v) for v in g["entities/entity"][:]] == ent["entity"].tolist()
    np.testing.assert_array_equal(g["entities/latitude"][:], ent["latitude"].to_numpy())
    hdr = g.attrs["actstore"]
    assert hdr["format"] == FORMAT_NAME and hdr["format_version"] == FORMAT_VERSION
    assert g.attrs["rows_done"] == 20


@pytest.mark.parametrize("fmt,name", [("zarr", "v.zarr"), ("hdf5", "v.h5")])
def test_other_format_version_refused(tmp_path, fmt, name):
    st, _ = _make(tmp_path / name, fmt=fmt)
    st.close()
    if fmt == "zarr":
        import zarr
        g = zarr.open_group(str(tmp_path / name), mode="r+")
        hdr = dict(g.attrs["actstore"])
        hdr["format_version"] = FORMAT_VERSION + 1
        g.attrs["actstore"] = hdr
    else:
        import h5py
        with h5py.File(tmp_path / name, "r+") as f:
            hdr = json.loads(f.attrs["actstore"])
            hdr["format_version"] = FORMAT_VERSION + 1
            f.attrs["actstore"] = json.dumps(hdr)
    with pytest.raises(StoreError, match=f"format version {FORMAT_VERSION + 1} is not supported"):
        open_store(tmp_path / name)


def test_not_a_store_refused(tmp_path):
    import zarr
    zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    with pytest.raises(StoreError, match="not an activation store"):
        open_store(tmp_path / "g.zarr")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(StoreError, match="not an activation store"):
        open_store(tmp_path / "x.txt")
    with pytest.raises(StoreError, match="no such store"):
        open_store(tmp_path / "missing.zarr")
    (tmp_path / "d").mkdir()
    with pytest.raises(StoreError, match="not a Zarr v3 store"):
        open_store(tmp_path / "d")


def test_write_rules(tmp_path):
    st, _ = _make(tmp_path / "w.zarr", n=37, R=8)
    x = np.zeros((3, 8, 10), np.float16)
    with pytest.raises(StoreError, match="whole chunks"):
        st.write_rows(4, x)                       # not chunk-aligned
    with pytest.raises(StoreError, match="whole chunks"):
        st.write_rows(0, x[:, :5])                # partial chunk not at the end
    st.write_rows(32, x[:, :5])                   # the last, short chunk is fine
    with pytest.raises(StoreError, match="dtype"):
        st.write_rows(0, x.astype(np.float32))
    with pytest.raises(StoreError, match="n_layers=3"):
        st.write_rows(0, x[:2])
    with pytest.raises(StoreError, match="outside"):
        st.mark_done(38)
    ro = open_store(tmp_path / "w.zarr")
    with pytest.raises(StoreError, match="read-only"):
        ro.write_rows(0, x)
    with pytest.raises(StoreError, match="no neuron activations"):
        ro.layer(1, array="neurons")
    # a hidden-state index the store does not hold: the error lists those it holds
    with pytest.raises(StoreError, match=r"layer 0 is not in this store; it holds hidden-state "
                                         r"layers 1-3 \(0 = embeddings"):
        ro.layer(0)
    with pytest.raises(StoreError, match="layer 4 is not in this store"):
        ro.read(slice(0, 8), layers=[1, 4])
    with pytest.raises(StoreError, match="layer -4 is not in this store"):
        list(ro.iter_chunks(layers=[-4]))


def test_create_refusals(tmp_path):
    with pytest.raises(StoreError, match="already exists"):
        _make(tmp_path / "a.zarr")
        _make(tmp_path / "a.zarr")
    st, _ = _make(tmp_path / "a.zarr", overwrite=True)
    assert st.rows_done == 0
    with pytest.raises(StoreError, match="does not exist"):
        _make(tmp_path / "nodir" / "a.zarr")
    with pytest.raises(StoreError, match="JSON"):
        create_store(tmp_path / "j.zarr", layers=[1], n_rows=2, d_model=4,
                     entities=pd.DataFrame({"name": ["a", "b"]}), targets=(), group_columns=(),
                     meta={"x": object()})
    with pytest.raises(StoreError, match="empty"):
        create_store(tmp_path / "e.zarr", layers=[1], n_rows=0, d_model=4,
                     entities=pd.DataFrame({"name": []}), targets=(), group_columns=(), meta={})
    with pytest.raises(StoreError, match="lacks column"):
        create_store(tmp_path / "c.zarr", layers=[1], n_rows=2, d_model=4,
                     entities=pd.DataFrame({"name": ["a", "b"]}), targets=("year",),
                     group_columns=(), meta={})
    with pytest.raises(StoreError, match="uncompressed"):
        _make(tmp_path / "c.h5", compression="zstd")


@pytest.mark.parametrize("comp", ["zstd", "blosc"])
def test_compressed_zarr_roundtrip(tmp_path, comp):
    rng = np.random.default_rng(3)
    st, _ = _make(tmp_path / "c.zarr", n=16, R=8, compression=comp, rng=rng)
    full = rng.standard_normal((3, 16, 10)).astype(np.float16)
    st.write_rows(0, full)
    st.mark_done(16)
    s2 = open_store(tmp_path / "c.zarr")
    assert s2.compression == comp
    np.testing.assert_array_equal(s2.read(slice(0, 16)), full)


def test_bfloat16_store_roundtrip_as_torch(tmp_path):
    import torch
    x = torch.randn(3, 8, 10, dtype=torch.bfloat16)
    st, _ = _make(tmp_path / "b.zarr", n=8, R=8, dtype="bfloat16")
    st.write_rows(0, x.view(torch.int16).numpy().view(np.uint16))
    st.mark_done(8)
    got = open_store(tmp_path / "b.zarr").layer(2, as_="torch")
    assert got.dtype == torch.bfloat16 and torch.equal(got, x[1])


def test_default_rows_per_chunk():
    assert default_rows_per_chunk(576) == 512
    assert default_rows_per_chunk(4096) == 128
    assert default_rows_per_chunk(16) == 1024
    assert default_rows_per_chunk(100000) == 64


@pytest.mark.parametrize("fmt,name", [("zarr", "o.zarr"), ("hdf5", "o.h5")])
def test_overwrite_deletes_only_stores(tmp_path, fmt, name):
    """overwrite replaces a store (also another version or an interrupted creation) or an empty
    directory, and refuses, deleting nothing, anything else at the path."""
    from actstore.store import remove_store
    user = tmp_path / name
    if fmt == "zarr":
        user.mkdir()
        (user / "thesis.tex").write_text("years of work")
    else:
        user.write_bytes(b"not hdf5 at all")
    with pytest.raises(StoreError, match=f"refusing to delete {user}: not an activation store"):
        _make(user, fmt=fmt, overwrite=True)
    assert (user / "thesis.tex").read_text() == "years of work" if fmt == "zarr" \
        else user.read_bytes() == b"not hdf5 at all"
    if fmt == "zarr":  # a plain zarr group of someone else's is not ours either
        import zarr
        g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
        g.create_array("data", shape=(3,), dtype="int8")
        with pytest.raises(StoreError, match="refusing to delete"):
            remove_store(tmp_path / "g.zarr")
        assert (tmp_path / "g.zarr" / "data").exists()
        user = tmp_path / "empty"
        user.mkdir()
        _make(user, fmt=fmt, overwrite=True)[0].close()  # an empty directory: fine
    # another format version, and a store whose creation was interrupted: replaced
    for p in (tmp_path / ("v" + name), tmp_path / ("i" + name)):
        _make(p, fmt=fmt)[0].close()
        if p.name.startswith("i"):
            if fmt == "zarr":
                meta = json.loads((p / "zarr.json").read_text())
                del meta["attributes"]["rows_done"]
                (p / "zarr.json").write_text(json.dumps(meta))
            else:
                import h5py
                with h5py.File(p, "r+") as f:
                    del f["rows_done"]
            with pytest.raises(StoreError, match="incomplete store") as ei:
                open_store(p)
        else:
            _bump_version(p, fmt)
            with pytest.raises(StoreError, match="not supported") as ei:
                open_store(p)
        assert ei.value.replaceable
        st, _ = _make(p, fmt=fmt, overwrite=True)
        assert st.rows_done == 0
        st.close()


def _bump_version(path, fmt):
    if fmt == "zarr":
        meta = json.loads((path / "zarr.json").read_text())
        meta["attributes"]["actstore"]["format_version"] = FORMAT_VERSION + 1
        (path / "zarr.json").write_text(json.dumps(meta))
    else:
        import h5py
        with h5py.File(path, "r+") as f:
            hdr = json.loads(f.attrs["actstore"])
            hdr["format_version"] = FORMAT_VERSION + 1
            f.attrs["actstore"] = json.dumps(hdr)


def test_interrupted_zarr_creation_is_recognised(tmp_path, monkeypatch):
    """The header is written first: a creation killed half-way is an incomplete store (which
    overwrite may replace), not 'not an activation store'."""
    import zarr

    def killed(self, *a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(zarr.Group, "create_array", killed)
    with pytest.raises(KeyboardInterrupt):
        _make(tmp_path / "k.zarr")
    monkeypatch.undo()
    with pytest.raises(StoreError, match="incomplete store") as ei:
        open_store(tmp_path / "k.zarr")
    assert ei.value.replaceable
    st, _ = _make(tmp_path / "k.zarr", overwrite=True)
    assert st.rows_done == 0


def _shard_files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("dtype,n", [("float16", 37), ("bfloat16", 40), ("float32", 24)])
def test_direct_shard_files_equal_zarrs_own_bytes(tmp_path, dtype, n):
    """ShardFiles writes exactly the files zarr writes for the same blocks (including the
    zero-padded edge shard and the CRC32C-checked index), and zarr reads them back."""
    import zarr

    from actstore.store import ShardFiles
    from actstore.store.format import storage_dtype as _numpy_dtype

    rng = np.random.default_rng(7)
    L, d, dm, R = 3, 10, 14, 8
    npdt = _numpy_dtype(dtype)
    full = rng.standard_normal((L, n, d)).astype(np.float32)
    neu = rng.standard_normal((L, n, dm)).astype(np.float32)
    if npdt == np.uint16:                       # bfloat16 bits: the top half of float32
        full, neu = (a.view(np.uint32) >> 16 for a in (full, neu))
    full, neu = full.astype(npdt), neu.astype(npdt)
    st, _ = _make(tmp_path / "ours.zarr", n, L, d, R, d_mlp=dm, dtype=dtype)
    assert all(ShardFiles.for_array(st._h[a]) is not None for a in ("resid", "neurons"))
    for s in range(0, n, 2 * R):                # windows of two shards, the last one short
        e = min(n, s + 2 * R)
        st.write_rows(s, full[:, s:e], neurons=neu[:, s:e])
    st.close()
    # zarr's own writer, same layout, same blocks
    g = zarr.open_group(str(tmp_path / "zarr.zarr"), mode="w", zarr_format=3)
    for name, x in (("resid", full), ("neurons", neu)):
        a = g.create_array(name, shape=x.shape, dtype=npdt, chunks=(1, R, x.shape[2]),
                           shards=(L, R, x.shape[2]), compressors=None, fill_value=0)
        a = a.with_config({"write_empty_chunks": True})
        for s in range(0, n, R):
            a[:, s:s + R] = x[:, s:s + R]
        ours = _shard_files(tmp_path / "ours.zarr" / name / "c")
        theirs = _shard_files(tmp_path / "zarr.zarr" / name / "c")
        assert len(ours) == -(-n // R) and ours.keys() == theirs.keys()
        for key in ours:
            assert ours[key] == theirs[key], f"{name}/c/{key} differs from zarr's bytes"
    z = zarr.open_group(str(tmp_path / "ours.zarr"), mode="r")
    np.testing.assert_array_equal(z["resid"][:], full)
    np.testing.assert_array_equal(z["neurons"][:], neu)
    assert not list((tmp_path / "ours.zarr").rglob("*.partial"))


def test_direct_shard_files_only_for_our_layout(tmp_path):
    """Compressed stores and foreign layouts keep zarr's own write path."""
    import zarr

    from actstore.store import ShardFiles

    st, _ = _make(tmp_path / "c.zarr", n=16, R=8, compression="zstd")
    assert ShardFiles.for_array(st._h["resid"]) is None
    g = zarr.open_group(str(tmp_path / "f.zarr"), mode="w", zarr_format=3)
    plain = g.create_array("x", shape=(3, 16, 10), dtype="float16", chunks=(1, 8, 10),
                           compressors=None)
    assert ShardFiles.for_array(plain) is None
    other = g.create_array("y", shape=(3, 16, 10), dtype="float16", chunks=(1, 8, 5),
                           shards=(3, 8, 10), compressors=None)
    assert ShardFiles.for_array(other) is None
    ones = g.create_array("z", shape=(3, 16, 10), dtype="float16", chunks=(1, 8, 10),
                          shards=(3, 8, 10), compressors=None, fill_value=1)
    assert ShardFiles.for_array(ones) is None       # edge shards are padded with zeros
    ours = g.create_array("w", shape=(3, 16, 10), dtype="float16", chunks=(1, 8, 10),
                          shards=(3, 8, 10), compressors=None, fill_value=0)
    assert ShardFiles.for_array(ours) is not None


def test_failed_shard_write_leaves_old_shard_and_no_temporary(tmp_path, monkeypatch):
    """A write that dies mid-shard (full disk) leaves the previous shard file intact."""
    from actstore import io as io_mod

    rng = np.random.default_rng(4)
    st, _ = _make(tmp_path / "s.zarr", n=16, R=8)
    first = rng.standard_normal((3, 8, 10)).astype(np.float16)
    st.write_rows(0, first)
    st.mark_done(8)
    real_replace = io_mod.os.replace

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io_mod.os, "replace", full_disk)
    with pytest.raises(OSError):
        st.write_rows(0, rng.standard_normal((3, 8, 10)).astype(np.float16))
    monkeypatch.setattr(io_mod.os, "replace", real_replace)
    assert not list((tmp_path / "s.zarr").rglob("*.partial"))
    np.testing.assert_array_equal(open_store(tmp_path / "s.zarr").read(slice(0, 8)), first)
