"""Integrity of a store (issue 13): open-time checks, checksums verified on read, actstore
verify / check_store, durability (fsync before rows_done advances), HDF5 on a full disk, and
--overwrite deleting only the format's files. Every damage case of the issue is here."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from actstore.store import StoreError, create_store, open_store, remove_store


def check_store(*args, **kw):
    from actstore.store.integrity import check_store as check  # (imported late: the tests
    return check(*args, **kw)                                   # also run against older code)

V1 = Path(__file__).resolve().parents[1] / "fixtures" / "v1"
N, L, D, DM, R = 37, 3, 10, 14, 8      # 5 row blocks, the last one 5 rows


def _table(n):
    rng = np.random.default_rng(0)
    return pd.DataFrame({
        "name": [f"Place {i}" for i in range(n)],
        "entity": [f"Place {i}" for i in range(n)],
        "latitude": rng.uniform(-90, 90, n),
        "longitude": rng.uniform(-180, 180, n),
        "is_test": np.arange(n) % 5 == 0,
        "country": [f"C{i % 4}" for i in range(n)],
    })


def _store(path, fmt=None, neurons=False, compression=None, dtype="float16", seed=1):
    """A complete store of random data; returns (path, resid (L, N, D), neurons or None)."""
    rng = np.random.default_rng(seed)
    st = create_store(path, layers=[1, 2, 3], n_rows=N, d_model=D, entities=_table(N),
                      targets=("latitude", "longitude"), group_columns=("country",),
                      meta={"model": {"id": "tiny"}}, format=fmt, dtype=dtype,
                      d_mlp=DM if neurons else None, rows_per_chunk=R, compression=compression)
    x = rng.standard_normal((L, N, D)).astype(np.float16 if dtype == "float16" else np.float32)
    nx = rng.standard_normal((L, N, DM)).astype(x.dtype) if neurons else None
    for s in range(0, N, R):
        e = min(N, s + R)
        st.write_rows(s, x[:, s:e], None if nx is None else nx[:, s:e])
        st.mark_done(e)
    st.close()
    return Path(path), x, nx


def _shard(path, b, array="resid"):
    return Path(path) / array / "c" / "0" / str(b) / "0"


def _flip(f: Path, offset: int) -> None:
    """Change one byte so that a float16 stays finite (toggle the lowest mantissa bit)."""
    raw = bytearray(f.read_bytes())
    raw[offset] ^= 0x01
    f.write_bytes(bytes(raw))


# ----------------------------------------------------------------------------- open-time checks

def test_deleted_shard_below_rows_done_is_an_error_at_open(tmp_path):
    p, _, _ = _store(tmp_path / "s.zarr")
    _shard(p, 1).unlink()
    with pytest.raises(StoreError) as ei:
        open_store(p)
    msg = str(ei.value)
    assert str(_shard(p, 1)) in msg and "shard file missing" in msg and "\n" not in msg
    assert "[resid, layers 1-3, rows 8-15]" in msg
    assert "re-extract rows 8-15: actstore extract ... --repair" in msg


@pytest.mark.parametrize("size", [0, 100])
def test_empty_or_truncated_shard_is_an_error_at_open(tmp_path, size):
    p, _, _ = _store(tmp_path / "s.zarr")
    f = _shard(p, 4)
    f.write_bytes(f.read_bytes()[:size])
    with pytest.raises(StoreError, match=rf"{f}: shard file has {size} bytes, expected \d+ .*"
                                         r"rows 32-36\]; re-extract rows 32-36"):
        open_store(p)


def test_fit_all_layers_refuses_a_store_with_a_missing_shard(tmp_path):
    """The issue's case: fastprobe fit exited 0 with another R² and best layer."""
    from probes.fit import fit_all_layers

    p, _, _ = _store(tmp_path / "s.zarr")
    fit_all_layers(p)                                   # a sound store fits
    _shard(p, 2).unlink()
    with pytest.raises(StoreError, match="shard file missing"):
        fit_all_layers(p)


@pytest.mark.parametrize("field,value,expect", [
    ("shape", [3, 37, 12], r"shape \(3, 37, 12\) does not match the header's \(3, 37, 10\)"),
    ("data_type", "float32", "dtype float32 does not match the header's float16"),
])
def test_edited_array_metadata_is_an_error_at_open(tmp_path, field, value, expect):
    p, _, _ = _store(tmp_path / "s.zarr")
    meta_file = p / "resid" / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta[field] = value
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=f"{meta_file}: array metadata: {expect}") as ei:
        open_store(p)
    assert "not repairable by --repair" in str(ei.value)


def test_missing_array_metadata_and_edited_layer_array(tmp_path):
    p, _, _ = _store(tmp_path / "s.zarr")
    q = tmp_path / "q.zarr"
    shutil.copytree(p, q)
    (p / "resid" / "zarr.json").unlink()
    with pytest.raises(StoreError, match=r"resid/zarr.json: array metadata: missing or "
                                         r"unreadable .*not repairable"):
        open_store(p)
    import zarr
    zarr.open_group(str(q), mode="r+")["layer"][:] = np.array([3, 2, 1], dtype=np.int32)
    with pytest.raises(StoreError, match=r"holds layers \[3, 2, 1\], the header \[1, 2, 3\]"):
        open_store(q)


def test_hdf5_structure_is_checked_at_open(tmp_path):
    import h5py
    p, _, _ = _store(tmp_path / "s.h5", fmt="hdf5")
    q = tmp_path / "q.h5"
    shutil.copy(p, q)
    with h5py.File(p, "r+") as f:
        del f["layer"]
        f["layer"] = np.array([3, 2, 1], dtype=np.int32)
    with pytest.raises(StoreError, match=rf"{p} \(dataset layer\): array metadata: holds "
                                         r"layers \[3, 2, 1\]"):
        open_store(p)
    with h5py.File(q, "r+") as f:
        del f["entities/latitude"]
    with pytest.raises(StoreError, match=r"\(dataset entities/latitude\): entity column "
                                         r"'latitude': missing"):
        open_store(q)


@pytest.mark.parametrize("fmt,name", [("zarr", "s.zarr"), ("hdf5", "s.h5")])
@pytest.mark.parametrize("rows_done", [-3, N + 1])
def test_rows_done_outside_the_store_is_an_error(tmp_path, fmt, name, rows_done):
    p, _, _ = _store(tmp_path / name, fmt=fmt)
    if fmt == "zarr":
        meta = json.loads((p / "zarr.json").read_text())
        meta["attributes"]["rows_done"] = rows_done
        (p / "zarr.json").write_text(json.dumps(meta))
    else:
        import h5py
        with h5py.File(p, "r+") as f:
            f["rows_done"][0] = rows_done
    with pytest.raises(StoreError, match=rf"rows_done={rows_done} is not a row count in "
                                         rf"\[0, {N}\]"):
        open_store(p)


def test_deleted_entity_chunk_is_an_error_at_open(tmp_path):
    """The issue's case: latitude read as zeros, then the fit blamed a 'constant' target."""
    p, _, _ = _store(tmp_path / "s.zarr")
    chunk = p / "entities" / "latitude" / "c" / "0"
    chunk.unlink()
    with pytest.raises(StoreError, match=rf"{chunk}: entity column 'latitude': chunk file "
                                         r"missing \[entities, rows 0-36\]; not repairable"):
        open_store(p)


def test_truncated_entity_chunk_is_a_one_line_error(tmp_path):
    p, _, _ = _store(tmp_path / "s.zarr")
    chunk = p / "entities" / "latitude" / "c" / "0"
    chunk.write_bytes(chunk.read_bytes()[:40])
    s = open_store(p)        # present and not empty: only reading it finds the damage
    with pytest.raises(StoreError, match=rf"{chunk}: entity column 'latitude' cannot be read"):
        s.entities
    rep = check_store(p)
    assert [pr.file for pr in rep.problems] == [str(chunk)] and not rep.repairable


def test_replaced_entity_column_fails_its_checksum(tmp_path):
    import zarr
    p, _, _ = _store(tmp_path / "s.zarr")
    zarr.open_group(str(p), mode="r+")["entities/latitude"][:5] = 0.0
    with pytest.raises(StoreError, match="entity column 'latitude': checksum mismatch"):
        open_store(p).target_array()
    assert open_store(p, verify=False).target_array()[0, 0] == 0.0


def test_deleted_checksum_file_is_an_error_at_open(tmp_path):
    p, _, _ = _store(tmp_path / "s.zarr")
    f = p / "integrity" / "resid" / "c" / "0" / "3"
    f.unlink()
    with pytest.raises(StoreError, match=rf"{f}: checksum file missing .*rows 24-31\]; "
                                         "re-extract rows 24-31"):
        open_store(p)


# ----------------------------------------------------------------------------- checksums on read

def test_swapped_shards_are_caught_on_every_read_path(tmp_path):
    p, x, _ = _store(tmp_path / "s.zarr")
    a, b = _shard(p, 0), _shard(p, 1)
    tmp = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(tmp)
    s = open_store(p)            # same sizes: the structure is fine
    for read in (lambda: s.layer(2), lambda: s.read(slice(0, 8)),
                 lambda: s.read(slice(3, 5), layers=[3]),    # a partial block is read whole
                 lambda: list(s.iter_chunks(layers=[1]))):
        with pytest.raises(StoreError, match=rf"{a}: checksum mismatch \(stored crc32c [0-9a-f]"
                                             rf"{{8}}, data [0-9a-f]{{8}}\).* \[resid, layer \d, "
                                             r"rows 0-7\]; re-extract rows 0-7: actstore extract "
                                             r"\.\.\. --repair"):
            read()
    np.testing.assert_array_equal(s.read(slice(16, 37)), x[:, 16:])  # other blocks still read
    # verification off (for speed): the swapped data is read as it is
    raw = open_store(p, verify=False).layer(1)
    np.testing.assert_array_equal(raw[:8], x[0, 8:16])


def test_verification_can_be_turned_off_from_the_environment(tmp_path, monkeypatch):
    p, _, _ = _store(tmp_path / "s.zarr")
    _flip(_shard(p, 2), 7)
    with pytest.raises(StoreError, match="checksum mismatch"):
        open_store(p).layer(1)
    monkeypatch.setenv("ACTSTORE_NO_VERIFY", "1")
    assert not open_store(p).verify
    open_store(p).layer(1)
    assert open_store(p, verify=True).verify


@pytest.mark.parametrize("fmt,name", [("zarr", "s.zarr"), ("hdf5", "s.h5")])
def test_a_finite_bit_flip_is_caught(tmp_path, fmt, name):
    p, x, nx = _store(tmp_path / name, fmt=fmt, neurons=True)
    if fmt == "zarr":
        f, offset = _shard(p, 2, "neurons"), 1 * R * DM * 2 + 11     # layer 2, rows 16-23
    else:
        import h5py
        with h5py.File(p, "r") as h:
            offset = h["neurons"].id.get_chunk_info_by_coord((1, 16, 0)).byte_offset + 11
        f = p
    _flip(f, offset)
    s = open_store(p)
    np.testing.assert_array_equal(s.layer(2), x[1])                # resid is intact
    with pytest.raises(StoreError, match=r"checksum mismatch .*\[neurons, layer 2, rows 16-23\]"):
        s.layer(2, array="neurons")
    with pytest.raises(StoreError, match="checksum mismatch"):
        s.read(slice(20, 21), layers=[2], array="neurons")
    np.testing.assert_array_equal(s.layer(3, array="neurons"), nx[2])
    s.close()
    rep = check_store(p)
    assert [(pr.array, pr.layers, pr.rows, pr.repairable) for pr in rep.problems] == [
        ("neurons", (2, 2), (16, 24), True)]
    assert rep.bad_rows == [(16, 24)]


def test_compressed_store_damage_is_caught(tmp_path):
    p, x, _ = _store(tmp_path / "c.zarr", compression="zstd")
    f = _shard(p, 1)
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    f.write_bytes(bytes(raw))
    s = open_store(p)
    np.testing.assert_array_equal(s.read(slice(0, 8)), x[:, :8])
    with pytest.raises(StoreError, match=rf"{f}: (checksum mismatch|cannot be decoded)"):
        s.read(slice(8, 16))


def test_a_store_made_before_checksums_reads_unverified(tmp_path):
    p = tmp_path / "v1.zarr"
    shutil.copytree(V1 / "store_zarr", p)
    s = open_store(p)
    assert not s.checksums.present and s.layer(1).shape == (120, 32)
    rep = check_store(p)
    assert rep.ok and not rep.checksums and rep.blocks_checked == 2 * 8
    h = open_store(V1 / "store_h5.h5")
    assert not h.checksums.present and h.layer(0).shape == (120, 32)
    h.close()
    _shard(p, 3).unlink()                       # the structure is still checked
    with pytest.raises(StoreError, match="shard file missing"):
        open_store(p)


# ----------------------------------------------------------------------------- direct reader

@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_direct_reader_equals_zarrs_reads(tmp_path, dtype):
    import zarr
    p, x, _ = _store(tmp_path / "s.zarr", dtype=dtype)
    s = open_store(p)
    assert s._reader("resid").layout is not None      # our layout: read directly
    z = zarr.open_group(str(p), mode="r")["resid"]
    for verify in (True, False):
        s.verify = verify
        for rows, layers in [((0, 37), None), ((5, 30), [3, 1]), ((8, 16), [2]),
                             ((36, 37), [1, 3]), ((0, 1), [2, 3]), ((33, 36), None)]:
            pos = [0, 1, 2] if layers is None else [la - 1 for la in layers]
            got = s.read(slice(*rows), layers=layers)
            want = np.stack([z[q, rows[0]:rows[1]] for q in pos])
            assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
            assert got.flags.c_contiguous and got.flags.writeable


def test_direct_reader_reads_chunks_zarr_left_out(tmp_path):
    """Shards written by zarr itself may leave an all-zero inner chunk out (index entry of
    2**64-1): the direct reader returns zeros there, as zarr does."""
    import zarr
    st = create_store(tmp_path / "s.zarr", layers=[1, 2, 3], n_rows=16, d_model=D,
                      entities=_table(16), targets=("latitude",), group_columns=(), meta={},
                      rows_per_chunk=R)
    block = np.random.default_rng(0).standard_normal((L, 16, D)).astype(np.float16)
    block[1, :8] = 0
    st._h["resid"][:, :] = block         # zarr's own writer, write_empty_chunks=False
    st.mark_done(16)
    st.close()
    assert _shard(tmp_path / "s.zarr", 0).stat().st_size < 3 * R * D * 2
    s = open_store(tmp_path / "s.zarr", verify=False, check=False)
    z = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["resid"]
    assert s.read(slice(0, 16)).tobytes() == z[:].tobytes() == block.tobytes()


# ----------------------------------------------------------------------------- actstore verify

def _verify(*args):
    from actstore.cli import main
    return main(["verify", *map(str, args)])


def test_actstore_verify_names_every_bad_file(tmp_path, capsys):
    p, _, _ = _store(tmp_path / "s.zarr", neurons=True)
    assert _verify(p) == 0
    out = capsys.readouterr().out
    assert "OK (zarr, rows_done 37; 10 row block(s) read and compared" in out
    _shard(p, 1).unlink()                                     # structure
    _flip(_shard(p, 2), 3)                                    # content, layer 1
    _flip(_shard(p, 3, "neurons"), 2 * R * DM * 2 + 1)        # content, layer 3
    assert _verify(p) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 4
    assert out[0].startswith(f"{_shard(p, 1)}: shard file missing")
    assert out[1].startswith(f"{_shard(p, 2)}: checksum mismatch in 1 of 3 layers")
    assert "[resid, layer 1, rows 16-23]" in out[1]
    assert "[neurons, layer 3, rows 24-31]" in out[2]
    assert "all repairable: re-extract rows 8-31" in out[3]
    assert _verify(p, "--json") == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["bad_rows"] == [[8, 32]] and doc["repairable"] and not doc["ok"]
    assert {(pr["array"], tuple(pr["rows"])) for pr in doc["problems"]} == {
        ("resid", (8, 16)), ("resid", (16, 24)), ("neurons", (24, 32))}
    assert _verify(p, "--quick") == 1                         # the stat finds the missing file
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


def test_actstore_verify_exit_codes_and_unrepairable_stores(tmp_path, capsys):
    assert _verify(tmp_path / "nothing.zarr") == 2            # not a store: a usage error
    with pytest.raises(SystemExit) as ei:
        _verify()
    assert ei.value.code == 2
    p, _, _ = _store(tmp_path / "s.zarr")
    _shard(p, 0).unlink()
    (p / "entities" / "name" / "c" / "0").unlink()            # the entity table is damaged
    assert _verify(p) == 1
    out = capsys.readouterr().out
    assert "re-extract" not in out and "not repairable by --repair" in out
    rep = check_store(p)
    assert not rep.repairable and rep.bad_rows == [] and len(rep.problems) == 2
    old = tmp_path / "old.zarr"
    shutil.copytree(V1 / "store_zarr", old)
    assert _verify(old) == 0
    assert "no checksums" in capsys.readouterr().out


def test_check_store_reports_a_damaged_header(tmp_path):
    p, _, _ = _store(tmp_path / "s.zarr")
    meta = json.loads((p / "zarr.json").read_text())
    del meta["attributes"]["actstore"]["dtype"]
    (p / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="header is damaged .*dtype"):
        open_store(p)
    rep = check_store(p)
    assert len(rep.problems) == 1 and not rep.repairable
    assert rep.problems[0].file == str(p / "zarr.json")


def test_check_store_takes_an_open_store_and_bad_rows_merge(tmp_path):
    p, _, _ = _store(tmp_path / "s.zarr")
    _flip(_shard(p, 0), 1)
    _flip(_shard(p, 1), 1)
    _flip(_shard(p, 4), 1)
    with open_store(p) as s:
        rep = check_store(s)
    assert rep.bad_rows == [(0, 16), (32, 37)] and rep.repairable
    assert all(pr.layers == (1, 1) for pr in rep.problems)


# ----------------------------------------------------------------------------- writers

def test_each_row_block_has_its_own_checksum_file(tmp_path):
    """Parallel writers never write the same file: a block's crcs go to integrity/<array>/c/0/b,
    written by that block's writer, nothing shared is rewritten."""
    st = create_store(tmp_path / "s.zarr", layers=[1, 2, 3], n_rows=N, d_model=D,
                      entities=_table(N), targets=("latitude",), group_columns=(), meta={},
                      rows_per_chunk=R)
    st.close()
    shared = [p for p in (tmp_path / "s.zarr").rglob("*") if p.is_file()]
    before = {p: p.read_bytes() for p in shared}
    x = np.random.default_rng(0).standard_normal((L, N, D)).astype(np.float16)
    writers = [open_store(tmp_path / "s.zarr", mode="a", exclusive=False) for _ in range(2)]
    writers[1].write_rows(16, x[:, 16:24])
    writers[0].write_rows(0, x[:, :16])
    assert {p: p.read_bytes() for p in shared} == before
    crc_dir = tmp_path / "s.zarr" / "integrity" / "resid" / "c" / "0"
    assert sorted(int(f.name) for f in crc_dir.iterdir()) == [0, 1, 2]
    import zarr

    from actstore.store.checksums import block_crcs
    table = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["integrity/resid"][:]
    np.testing.assert_array_equal(table[:, 2], block_crcs(x[:, 16:24]))
    assert (table[:, 3:] == 0).all()


@pytest.mark.parametrize("fmt,name", [("zarr", "s.zarr"), ("hdf5", "s.h5")])
def test_rows_done_advances_after_data_and_checksums_are_on_disk(tmp_path, monkeypatch,
                                                                 fmt, name):
    """Power loss: the shard, its checksum file and then the progress record are fsynced,
    in that order, before write_rows / mark_done return."""
    st = create_store(tmp_path / name, layers=[1, 2, 3], n_rows=N, d_model=D,
                      entities=_table(N), targets=("latitude",), group_columns=(), meta={},
                      rows_per_chunk=R, format=fmt)
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)
    if not Path("/proc/self/fd").exists():
        pytest.skip("needs /proc to name the synced files")
    monkeypatch.setattr(os, "fsync", spy)
    st.write_rows(8, np.ones((L, 8, D), np.float16))
    st.write_rows(0, np.ones((L, 8, D), np.float16))
    st.mark_done(16)
    monkeypatch.undo()
    if fmt == "hdf5":
        assert synced and all(f == str(tmp_path / name) for f in synced)
        return
    root = str(tmp_path / name)
    shard = [i for i, f in enumerate(synced) if "/resid/c/0/1/." in f]
    crc = [i for i, f in enumerate(synced) if "/integrity/resid/c/0/.1." in f]
    top = [i for i, f in enumerate(synced) if f.startswith(f"{root}/.zarr.json.")]
    assert shard and crc and top and shard[0] < crc[0] < top[-1], synced
    assert synced[-1] == root            # the rename of zarr.json, last
    assert f"{root}/resid/c/0/1" in synced and f"{root}/integrity/resid/c/0" in synced  # dirs


def test_fsync_can_be_turned_off_for_scratch_stores(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setenv("ACTSTORE_FSYNC", "0")
    st = create_store(tmp_path / "s.zarr", layers=[1, 2, 3], n_rows=N, d_model=D,
                      entities=_table(N), targets=("latitude",), group_columns=(), meta={},
                      rows_per_chunk=R)
    assert not st.durable
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd))
    st.write_rows(0, np.ones((L, 8, D), np.float16))
    st.mark_done(8)
    assert calls == [] and open_store(tmp_path / "s.zarr").layer(1).shape == (8, D)


def test_a_dropped_store_closes_its_file_at_once(tmp_path):
    """No reference cycle (store <-> checksums, readers, writers): dropping the last reference
    closes an HDF5 file without waiting for the garbage collector."""
    import gc
    import weakref
    p, _, _ = _store(tmp_path / "s.h5", fmt="hdf5", neurons=True)
    gc.disable()
    try:
        s = open_store(p)
        s.layer(1)
        s.layer(2, array="neurons")
        s.entities
        ref = weakref.ref(s)
        del s
        assert ref() is None
        w = open_store(p, mode="a")        # the read-only handle is gone: a writer may open
        w.write_rows(0, np.ones((L, 8, D), np.float16), np.ones((L, 8, DM), np.float16))
        ref = weakref.ref(w)
        del w
        assert ref() is None
    finally:
        gc.enable()


def test_write_atomic_fsync_syncs_the_file_and_new_directories(tmp_path, monkeypatch):
    from actstore import io
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)
    if not Path("/proc/self/fd").exists():
        pytest.skip("needs /proc to name the synced files")
    monkeypatch.setattr(os, "fsync", spy)
    io.write_atomic(tmp_path / "a" / "b" / "f.bin", b"x", mkdir=True, fsync=True)
    io.write_atomic(tmp_path / "g.bin", b"y")
    monkeypatch.undo()
    assert len(synced) == 4 and synced[0].endswith(".partial")
    assert sorted(synced[1:]) == [str(tmp_path), str(tmp_path / "a"), str(tmp_path / "a" / "b")]
    assert (tmp_path / "a" / "b" / "f.bin").read_bytes() == b"x"


_FULL_DISK = """
import os, resource, signal, sys
import numpy as np, pandas as pd
from actstore.store import create_store, open_store
p = sys.argv[1]
L, n, d, R = 4, 1024, 256, 256
ent = pd.DataFrame({"name": [f"x{i}" for i in range(n)], "lat": np.zeros(n)})
st = create_store(p, layers=[1, 2, 3, 4], n_rows=n, d_model=d, entities=ent, targets=("lat",),
                  group_columns=(), meta={}, rows_per_chunk=R, format="hdf5")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # a write past the limit fails (EFBIG)
limit = os.path.getsize(p) // 2
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
try:
    for s in range(0, n, R):
        st.write_rows(s, np.ones((L, R, d), np.float16))
        st.mark_done(s + R)
except OSError as exc:
    print("write failed:", exc.errno, flush=True)
st.close()
print("closed", open_store(p).rows_done, flush=True)
try:                                               # creating a store past the limit
    create_store(p + ".2.h5", layers=[1, 2, 3, 4], n_rows=n, d_model=d, entities=ent,
                 targets=("lat",), group_columns=(), meta={}, rows_per_chunk=R)
except ValueError as exc:
    print("create failed:", exc, flush=True)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE semantics of Linux")
def test_hdf5_write_on_a_full_disk_fails_cleanly(tmp_path):
    """A write the file system refuses (a full disk; here a file-size limit, which fails the
    same write() call) raised in h5py's chunk cache at flush and crashed the process at exit
    (exit 139). Now the write fails at once, the file closes, rows_done keeps the last good
    block, and the process ends normally."""
    script = tmp_path / "full.py"
    script.write_text(textwrap.dedent(_FULL_DISK))
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "s.h5")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert "write failed: 27" in r.stdout                     # EFBIG
    done = int(r.stdout.split("closed")[1].split()[0])
    assert done < 1024 and done % 256 == 0
    assert check_store(tmp_path / "s.h5").ok
    assert f"create failed: cannot create store {tmp_path / 's.h5.2.h5'}: it needs " in r.stdout
    assert "file-size limit" in r.stdout and not (tmp_path / "s.h5.2.h5").exists()


# ----------------------------------------------------------------------------- --overwrite

def test_overwrite_refuses_a_store_holding_user_files(tmp_path):
    p, _, _ = _store(tmp_path / "s.zarr", neurons=True)
    (p / "notes.txt").write_text("mine")
    (p / "resid" / "plot.png").write_bytes(b"png")
    (p / "entities" / "latitude" / "c" / "backup").mkdir()
    with pytest.raises(StoreError, match=rf"refusing to delete {p}: it holds 3 entries that "
                                         r"are not part of an activation store \(entities/"
                                         r"latitude/c/backup/, notes.txt, resid/plot.png\)"):
        remove_store(p)
    with pytest.raises(StoreError, match="notes.txt"):
        create_store(p, layers=[1], n_rows=2, d_model=4, entities=_table(2), targets=(),
                     group_columns=(), meta={}, overwrite=True)
    assert (p / "notes.txt").read_text() == "mine" and (p / "resid" / "plot.png").exists()
    assert _shard(p, 0).exists() and open_store(p).rows_done == N   # nothing deleted


def test_overwrite_refuses_a_symlink_inside_and_deletes_a_clean_store(tmp_path):
    p, _, _ = _store(tmp_path / "s.zarr", neurons=True)
    outside = tmp_path / "keep"
    outside.mkdir()
    (outside / "data.bin").write_bytes(b"1")
    (p / "resid" / "c" / "link").symlink_to(outside)
    with pytest.raises(StoreError, match="resid/c/link"):
        remove_store(p)
    (p / "resid" / "c" / "link").unlink()
    # what the format defines: progress records, temporaries a killed writer left
    st = open_store(p, mode="a", exclusive=False)
    st.begin_ranges()
    st.range_record(8, 16).update(16)
    (p / "resid" / "c" / "0" / "1" / ".0.abc.partial").write_bytes(b"x")
    st.close()
    remove_store(p)
    assert not p.exists() and (outside / "data.bin").read_bytes() == b"1"


def test_overwrite_of_an_interrupted_creation_and_an_empty_directory(tmp_path):
    p, _, _ = _store(tmp_path / "s.zarr")
    for sub in ("resid", "neurons", "entities", "integrity", "layer"):
        shutil.rmtree(p / sub, ignore_errors=True)
    meta = json.loads((p / "zarr.json").read_text())
    meta["attributes"] = {}
    (p / "zarr.json").write_text(json.dumps(meta))
    remove_store(p)
    assert not p.exists()
    (tmp_path / "e").mkdir()
    remove_store(tmp_path / "e")
    assert not (tmp_path / "e").exists()
