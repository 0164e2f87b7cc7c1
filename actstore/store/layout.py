"""Where a Zarr store's files are and what they hold: the shard of each row block and its size,
the checksum file of each block, our uncompressed shard layout (the same bytes zarr writes), and
every name the format defines, which is all that ``--overwrite`` may delete
(docs/store-format.md, "Zarr v3 layout" and "Integrity")."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from actstore.io import PARTIAL_SUFFIX
from actstore.native import crc32c
from actstore.store.format import (
    CODES_GROUP,
    INTEGRITY_GROUP,
    PROGRESS_GROUP,
    SITES,
    TOKENS_GROUP,
)

__all__ = ["n_blocks", "block_rows", "blocks_of", "shard_key", "checksum_key", "ShardLayout",
           "our_layout", "foreign_entries", "store_files"]

EMPTY = np.uint64(2**64 - 1)   # a shard index entry of a chunk that is not stored


def n_blocks(n_rows: int, rows_per_chunk: int) -> int:
    """The number of row blocks (shards) of a store."""
    return -(-int(n_rows) // int(rows_per_chunk))


def block_rows(b: int, rows_per_chunk: int, n_rows: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of row block ``b`` (the last one may be short)."""
    R = int(rows_per_chunk)
    return b * R, min(int(n_rows), (b + 1) * R)


def blocks_of(intervals, rows_per_chunk: int) -> list[int]:
    """The row blocks that overlap any ``[start, stop)`` interval, sorted."""
    R = int(rows_per_chunk)
    out: set[int] = set()
    for a, b in intervals:
        if int(b) > int(a):
            out.update(range(int(a) // R, -(-int(b) // R)))
    return sorted(out)


def shard_key(array: str, b: int) -> str:
    """The shard file of row block ``b`` (chunk grid (1, n_blocks, 1), "/" keys)."""
    return f"{array}/c/0/{b}/0"


def checksum_key(array: str, b: int) -> str:
    """The checksum file of row block ``b``: chunk (0, b) of ``integrity/<array>``."""
    return f"{INTEGRITY_GROUP}/{array}/c/0/{b}"


class ShardLayout:
    """Our uncompressed shard: the (L, R, d) block's bytes, one (1, R, d) inner chunk per layer
    in C order, then the shard index ((offset, nbytes) per chunk, little-endian uint64) and its
    CRC32C. This is what zarr writes for the layout :func:`our_layout` accepts."""

    def __init__(self, L: int, R: int, d: int, itemsize: int):
        self.L, self.R, self.d, self.itemsize = int(L), int(R), int(d), int(itemsize)
        self.chunk_nbytes = self.R * self.d * self.itemsize
        index = np.empty((self.L, 2), dtype="<u8")
        index[:, 0] = np.arange(self.L, dtype=np.uint64) * self.chunk_nbytes
        index[:, 1] = self.chunk_nbytes
        raw = index.tobytes()
        self.index = raw + np.uint32(crc32c(raw)).astype("<u4").tobytes()
        self.shard_nbytes = self.L * self.chunk_nbytes + len(self.index)

    def parse_index(self, raw: bytes) -> np.ndarray | None:
        """(L, 2) offsets and sizes from a shard's last bytes, or None if its CRC32C fails."""
        if len(raw) != len(self.index):
            return None
        body = raw[:-4]
        if crc32c(body) != int(np.frombuffer(raw[-4:], "<u4")[0]):
            return None
        return np.frombuffer(body, "<u8").reshape(self.L, 2)


def our_layout(arr) -> ShardLayout | None:
    """The :class:`ShardLayout` of a zarr array when it is our uncompressed layout on a local
    file system, else None (compression, another codec chain or key encoding, another store)."""
    try:
        from zarr.storage import LocalStore

        if not isinstance(arr.store, LocalStore) or sys.byteorder != "little":
            return None
        meta = json.loads(json.dumps(arr.metadata.to_dict(), default=str))
        L, _, d = (int(x) for x in arr.shape)
        R = int(meta["chunk_grid"]["configuration"]["chunk_shape"][1])
        little = {"name": "bytes", "configuration": {"endian": "little"}}
        want = {
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [L, R, d]}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "codecs": [{"name": "sharding_indexed", "configuration": {
                "chunk_shape": [1, R, d], "codecs": [little],
                "index_codecs": [little, {"name": "crc32c"}], "index_location": "end"}}],
            "storage_transformers": [],
        }
        if any(meta.get(k) != v for k, v in want.items()) or float(meta["fill_value"]) != 0:
            return None
        return ShardLayout(L, R, d, arr.dtype.itemsize)
    except Exception:  # noqa: BLE001 - anything unexpected: zarr's own path is always right
        return None


# ----------------------------------------------------------------------------- what is ours
# A zarr array directory: zarr.json and chunk files under c/ whose path parts are integers.
_ARRAY = "array"
_FILE = "file"


def _schema(header: dict | None) -> dict:
    """The names a store directory may hold: name -> _FILE, _ARRAY or a sub-schema ("*": any
    name). With a header, entity columns (and their code arrays) are the header's."""
    cols = header.get("entity_columns") if isinstance(header, dict) else None
    kinds = header.get("entity_kinds") if isinstance(header, dict) else None
    if isinstance(cols, list):
        entities = {str(c): _ARRAY for c in cols}
        codes = ({str(c): _ARRAY for c in cols if kinds.get(c) == "str"}
                 if isinstance(kinds, dict) else {"*": _ARRAY})
    else:
        entities = codes = {"*": _ARRAY}
    tables = ("entities", CODES_GROUP, TOKENS_GROUP)
    return {
        "zarr.json": _FILE, "layer": _ARRAY,
        **{a: _ARRAY for a in SITES},
        "entities": {"zarr.json": _FILE, **entities},
        CODES_GROUP: {"zarr.json": _FILE, **codes},
        TOKENS_GROUP: {"zarr.json": _FILE, "offsets": _ARRAY, "ids": _ARRAY},
        PROGRESS_GROUP: {"zarr.json": _FILE, "*range": {"zarr.json": _FILE}},
        INTEGRITY_GROUP: {"zarr.json": _FILE, **{t: _ARRAY for t in tables},
                          **{a: _ARRAY for a in SITES}},
    }


def _is_range(name: str) -> bool:
    a, sep, b = name.partition("-")
    return bool(sep) and a.isdigit() and b.isdigit()


def _walk(d: Path, rule, rel: str, files: list, dirs: list, foreign: list) -> None:
    """Sort what is below directory ``d`` into the format's files and dirs, and foreign
    entries (never following a symbolic link)."""
    for e in sorted(os.scandir(d), key=lambda e: e.name):
        name, sub = e.name, f"{rel}{e.name}"
        is_dir = e.is_dir(follow_symlinks=False)
        is_file = e.is_file(follow_symlinks=False)
        if is_file and name.endswith(PARTIAL_SUFFIX):      # a killed writer's temporary
            files.append(sub)
            continue
        if rule == _ARRAY:
            want = _FILE if name == "zarr.json" else ("chunks" if name == "c" else None)
        elif rule == "chunks":
            want = "chunks" if name.isdigit() else None
        else:
            want = rule.get(name) or (rule.get("*range") if _is_range(name) else rule.get("*"))
        if rule == "chunks" and name.isdigit() and is_file:
            want = _FILE
        if want == _FILE and is_file:
            files.append(sub)
        elif want is not None and want != _FILE and is_dir:
            dirs.append(sub)
            _walk(Path(e.path), want, sub + "/", files, dirs, foreign)
        else:
            foreign.append(sub + ("/" if is_dir else ""))


def store_files(path, header: dict | None) -> tuple[list[str], list[str], list[str]]:
    """(files, directories, foreign entries) of a Zarr store directory, relative paths: what the
    format defines (for ``header``'s entity columns) and everything else."""
    files: list[str] = []
    dirs: list[str] = []
    foreign: list[str] = []
    _walk(Path(path), _schema(header), "", files, dirs, foreign)
    return files, dirs, foreign


def foreign_entries(path, header: dict | None) -> list[str]:
    """Entries of a Zarr store directory that the format does not define (user files...)."""
    return store_files(path, header)[2]
