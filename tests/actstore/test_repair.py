"""``actstore extract ... --repair`` (issue 13): the row blocks `actstore verify` finds damaged
are re-extracted in place, the rest of the store is left as it is, and damage a re-extraction
cannot fix is refused before anything is written."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from actstore.extract import ExtractError, extract
from actstore.store import StoreError, open_store
from actstore.store.integrity import check_store

KW = dict(batch_size=5, rows_per_chunk=8, progress=False, neurons=True)   # 40 rows: 5 blocks


def _shard(path: Path, b: int, array: str = "resid") -> Path:
    return path / array / "c" / "0" / str(b) / "0"


def _flip(f: Path, offset: int) -> None:
    raw = bytearray(f.read_bytes())
    raw[offset] ^= 0x01
    f.write_bytes(bytes(raw))


def _arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    s = open_store(path)
    try:
        return s.read(slice(0, s.n_rows)), s.read(slice(0, s.n_rows), array="neurons")
    finally:
        s.close()


@pytest.fixture
def lm(tiny_model, tiny_tokenizer):
    return (tiny_model, tiny_tokenizer)


def test_repair_rewrites_only_the_damaged_blocks(tmp_path, lm, world_csv):
    out = tmp_path / "s.zarr"
    extract(lm, world_csv, "coords", out, **KW).store.close()
    want = _arrays(out)
    _shard(out, 1).unlink()                                   # rows 8-15: shard deleted
    _flip(_shard(out, 3, "neurons"), 2 * 8 * 64 + 5)          # rows 24-31: a bit flip
    (out / "integrity" / "resid" / "c" / "0" / "4").unlink()  # rows 32-39: checksum lost
    untouched = {b: _shard(out, b).read_bytes() for b in (0, 2)}
    stamps = {b: _shard(out, b).stat().st_mtime_ns for b in (0, 2)}

    with pytest.raises(ExtractError, match=r"shard file missing .*--repair"):
        extract(lm, world_csv, "coords", out, **KW)          # a plain resume refuses
    res = extract(lm, world_csv, "coords", out, repair=True, **KW)
    assert res.repaired == [(8, 16), (24, 40)]
    assert res.rows == 24                                     # three blocks of eight rows
    assert "repaired rows 8-15, 24-39" in res.summary()
    res.store.close()
    assert check_store(out).ok
    got = _arrays(out)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    for b in (0, 2):                                          # intact blocks were not rewritten
        assert _shard(out, b).read_bytes() == untouched[b]
        assert _shard(out, b).stat().st_mtime_ns == stamps[b]


def test_repair_of_a_clean_store_only_resumes(tmp_path, lm, world_csv):
    out = tmp_path / "s.zarr"
    full = extract(lm, world_csv, "coords", tmp_path / "full.zarr", **KW)
    full.store.close()
    extract(lm, world_csv, "coords", out, stop_after_rows=16, **KW).store.close()
    res = extract(lm, world_csv, "coords", out, repair=True, **KW)
    assert res.repaired == [] and res.rows == 24 and res.store.complete
    res.store.close()
    np.testing.assert_array_equal(_arrays(out)[0], _arrays(tmp_path / "full.zarr")[0])


def test_repair_and_resume_in_one_run(tmp_path, lm, world_csv):
    out = tmp_path / "s.zarr"
    extract(lm, world_csv, "coords", tmp_path / "full.zarr", **KW).store.close()
    extract(lm, world_csv, "coords", out, stop_after_rows=24, **KW).store.close()
    f = _shard(out, 0)
    f.write_bytes(f.read_bytes()[:100])                       # truncated
    res = extract(lm, world_csv, "coords", out, repair=True, **KW)
    assert res.repaired == [(0, 8)] and res.rows == 24 and res.store.complete
    res.store.close()
    for a, b in zip(_arrays(out), _arrays(tmp_path / "full.zarr")):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fmt,name,compression", [("hdf5", "s.h5", None),
                                                   ("zarr", "z.zarr", "zstd")])
def test_repair_hdf5_and_compressed_zarr(tmp_path, lm, world_csv, fmt, name, compression):
    out = tmp_path / name
    extract(lm, world_csv, "coords", out, compression=compression, **KW).store.close()
    want = _arrays(out)
    if fmt == "hdf5":
        import h5py
        with h5py.File(out, "r") as h:
            offset = h["resid"].id.get_chunk_info_by_coord((1, 16, 0)).byte_offset + 7
        _flip(out, offset)
    else:
        f = _shard(out, 2)
        raw = bytearray(f.read_bytes())
        raw[len(raw) // 3] ^= 0xFF
        f.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="rows 16-23"):
        open_store(out).read(slice(16, 24))
    res = extract(lm, world_csv, "coords", out, repair=True, **KW)
    assert res.repaired == [(16, 24)]
    res.store.close()
    assert check_store(out).ok
    for a, b in zip(_arrays(out), want):
        np.testing.assert_array_equal(a, b)


def test_repair_refuses_damage_it_cannot_fix_and_writes_nothing(tmp_path, lm, world_csv):
    out = tmp_path / "s.zarr"
    extract(lm, world_csv, "coords", out, **KW).store.close()
    _shard(out, 1).unlink()
    (out / "entities" / "latitude" / "c" / "0").unlink()      # the entity table: not rows
    before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*"))
    with pytest.raises(ExtractError, match=r"--repair re-extracts damaged row blocks only, and "
                                           r"this store has other damage: .*latitude"):
        extract(lm, world_csv, "coords", out, repair=True, **KW)
    assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*")) == before
    assert not Path(f"{out}.actstore-lock").exists()          # the lock was released


def test_repair_option_errors(tmp_path, lm, world_csv):
    with pytest.raises(ExtractError, match="give one of them"):
        extract(lm, world_csv, "coords", tmp_path / "s.zarr", repair=True, overwrite=True)
    with pytest.raises(ExtractError, match="--repair needs an existing store"):
        extract(lm, world_csv, "coords", tmp_path / "none.zarr", repair=True, **KW)
    out = tmp_path / "s.zarr"
    extract(lm, world_csv, "coords", out, **KW).store.close()
    shutil.rmtree(out / "resid" / "c" / "0" / "1")
    # other settings than the store's: refused as a resume is, nothing rewritten
    with pytest.raises(ExtractError, match="different settings .*prompt"):
        extract(lm, world_csv, "where_is", out, repair=True, **KW)
    assert not _shard(out, 1).exists()


def test_verify_then_repair_on_the_command_line(tmp_path, tiny_model_dir, world_csv, capsys):
    """What a user does: verify names the damage and the command, the command repairs it."""
    from actstore.cli import main

    out = tmp_path / "s.zarr"
    cmd = ["extract", "--model", str(tiny_model_dir), "--dataset", str(world_csv), "--prompt",
           "coords", "--out", str(out), "--rows-per-chunk", "8", "--no-progress",
           "--device", "cpu"]
    assert main(cmd) == 0
    want = open_store(out).read(slice(0, 40))
    _flip(_shard(out, 2), 8 * 64 + 3)
    capsys.readouterr()
    assert main(["verify", str(out)]) == 1
    text = capsys.readouterr().out
    assert "rows 16-23" in text and "--repair" in text
    assert main(cmd + ["--repair"]) == 0
    assert "repaired rows 16-23" in capsys.readouterr().out
    assert main(["verify", str(out)]) == 0
    np.testing.assert_array_equal(open_store(out).read(slice(0, 40)), want)
