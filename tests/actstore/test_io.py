"""The one atomic writer: whole files or none, no temporaries left behind, checks before the
rename, the previous file kept when anything fails."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from actstore import io


def _names(d):
    return sorted(p.name for p in d.iterdir())


def test_writes_bytes_text_json_and_streams(tmp_path):
    io.write_atomic(tmp_path / "a.bin", b"\x00\x01")
    io.write_atomic(tmp_path / "b.txt", "é")
    io.write_json(tmp_path / "c.json", {"x": [1, 2.5]}, indent=None)
    io.write_atomic(tmp_path / "d.npz", lambda f: np.savez(f, y=np.arange(3)))
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "é"
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": [1, 2.5]}
    assert np.load(tmp_path / "d.npz")["y"].tolist() == [0, 1, 2]
    assert _names(tmp_path) == ["a.bin", "b.txt", "c.json", "d.npz"]


def test_a_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "t.csv"
    io.write_atomic(target, b"old")

    def boom(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match="No space"):
        io.write_atomic(target, boom)
    monkeypatch.setattr(io.os, "replace", lambda a, b: (_ for _ in ()).throw(OSError(13, "denied")))
    with pytest.raises(OSError, match="denied"):
        io.write_atomic(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old" and _names(tmp_path) == ["t.csv"]


def test_check_runs_on_the_temporary_before_the_rename(tmp_path):
    target = tmp_path / "d.csv"
    seen = []

    def reject(tmp):
        seen.append(tmp.read_bytes())
        assert tmp.name.endswith(io.PARTIAL_SUFFIX)
        raise ValueError("not a CSV")
    with pytest.raises(ValueError, match="not a CSV"):
        io.write_atomic(target, b"garbage", check=reject)
    assert seen == [b"garbage"] and not target.exists() and _names(tmp_path) == []
    io.write_atomic(target, b"a,b", check=lambda tmp: None)
    assert target.read_bytes() == b"a,b"


def test_mkdir_and_cache_dir(tmp_path, monkeypatch):
    io.write_atomic(tmp_path / "x" / "y" / "z.txt", "z", mkdir=True)
    assert (tmp_path / "x" / "y" / "z.txt").read_text() == "z"
    monkeypatch.setenv("ACTSTORE_CACHE", str(tmp_path / "c"))
    assert io.cache_dir() == tmp_path / "c"
    assert os.path.basename(io.cache_dir()) == "c"
