"""Content checksums of a store: crc32c of every (array, layer, row block) and of every entity
column, written when the data is written and compared when it is read.

The checksum of a block is the crc32c of the decoded chunk's C-order bytes (the block's rows
inside the array, never the padding of the last block), so it does not depend on the codec.
Zarr: ``integrity/<site>`` is a uint32 array (n_layers, n_blocks) with one chunk file per row
block, written by that block's writer (parallel writers never share a file);
``integrity/entities`` holds one crc per entity column, ``integrity/entity_codes`` one per code
array (with its code table) and ``integrity/tokens`` those of a ragged store's offsets and ids
(each with the attribute ``columns``). HDF5: the same as pre-allocated datasets. A store
without ``integrity`` (made before checksums) reads unverified.
"""
from __future__ import annotations

import json
import weakref
from pathlib import Path

import numpy as np

from actstore.io import write_atomic
from actstore.native import crc32c  # the compiled one, equal to zarr's codec (tested)
from actstore.store.format import CODES_GROUP, INTEGRITY_GROUP, TOKENS_GROUP
from actstore.store.layout import checksum_key, n_blocks

__all__ = ["crc32c", "block_crcs", "column_crc", "codes_crc", "TABLES", "Checksums",
           "create_zarr_integrity", "create_hdf5_integrity"]


def block_crcs(block: np.ndarray) -> np.ndarray:
    """(L,) uint32: the crc32c of each layer's rows of an (L, r, d) block."""
    return np.array([crc32c(block[i]) for i in range(block.shape[0])], dtype=np.uint32)


# The column tables with checksums: entity columns, their code arrays, a ragged store's tokens.
TABLES = ("entities", CODES_GROUP, TOKENS_GROUP)


def _str_bytes(values) -> bytes:
    parts = []
    for v in values:
        b = str(v).encode("utf-8")
        parts.append(np.uint64(len(b)).astype("<u8").tobytes())
        parts.append(b)
    return b"".join(parts)


def column_crc(values, kind: str) -> int:
    """crc32c of a column: numbers and booleans as their little-endian bytes (bool: one
    byte each); strings as, per value, its UTF-8 length (uint64 LE) and bytes."""
    if kind == "str":
        return crc32c(_str_bytes(values))
    dt = {"float64": "<f8", "int64": "<i8", "int32": "<i4", "bool": "u1"}[kind]
    return crc32c(np.ascontiguousarray(np.asarray(values).astype(dt, copy=False)))


def codes_crc(codes, categories) -> int:
    """crc32c of a code array and its code table: the codes' int32 LE bytes, then the
    categories as :func:`column_crc` encodes strings."""
    raw = np.ascontiguousarray(np.asarray(codes).astype("<i4", copy=False)).tobytes()
    return crc32c(raw + _str_bytes(categories))


class Checksums:
    """The checksum tables of one open store: ``present`` (the store has them), ``get(array,
    b)`` (the (L,) crcs of row block ``b``, or None where no checksum file exists), ``put``
    (write one block's crcs, durable when ``fsync``), ``entities()`` (column -> crc)."""

    def __init__(self, store):
        self.store = weakref.proxy(store)   # no reference cycle: a dropped store closes at once
        self.fmt = store.format
        self._cache: dict = {}
        if self.fmt == "zarr":
            self.present = (store.path / INTEGRITY_GROUP / "zarr.json").is_file()
        else:
            self.present = store._h is not None and INTEGRITY_GROUP in store._h

    def path(self, array: str, b: int) -> Path:
        """The file that holds block ``b``'s checksums (HDF5: the store file)."""
        return self.store.path / checksum_key(array, b) if self.fmt == "zarr" else self.store.path

    def get(self, array: str, b: int) -> np.ndarray | None:
        if not self.present:
            return None
        key = (array, b)
        if key not in self._cache:
            L = self.store.n_layers
            if self.fmt == "zarr":
                try:
                    raw = self.path(array, b).read_bytes()
                except FileNotFoundError:
                    return None
                if len(raw) != 4 * L:
                    return None
                self._cache[key] = np.frombuffer(raw, "<u4").astype(np.uint32)
            else:
                table = self._h5_table(array)
                if table is None:
                    return None
                self._cache.update({(array, j): table[:, j] for j in range(table.shape[1])})
        return self._cache.get(key)

    def _h5_table(self, array: str) -> np.ndarray | None:
        ds = self.store._h[INTEGRITY_GROUP].get(array)
        return None if ds is None else np.asarray(ds[:], dtype=np.uint32)

    def put(self, array: str, b: int, crcs: np.ndarray, fsync: bool = True) -> None:
        crcs = np.asarray(crcs, dtype=np.uint32)
        if self.fmt == "zarr":
            write_atomic(self.path(array, b), crcs.astype("<u4").tobytes(), mkdir=True,
                         fsync=fsync)
        else:
            self.store._h[INTEGRITY_GROUP][array][:, b] = crcs   # pre-allocated: in place
        self._cache[(array, b)] = crcs

    def entities(self) -> dict[str, int] | None:
        """Entity column -> crc32c, or None without checksums."""
        return self.table("entities")

    def table(self, name: str) -> dict[str, int] | None:
        """Column -> crc32c of one of :data:`TABLES` ("entities", "entity_codes", "tokens"),
        None without checksums, {} when the table is missing or damaged."""
        if not self.present:
            return None
        key = ("table", name)
        if key not in self._cache:
            if self.fmt == "zarr":
                node = self.store.path / INTEGRITY_GROUP / name
                try:
                    cols = json.loads((node / "zarr.json").read_text())["attributes"]["columns"]
                    crcs = np.frombuffer((node / "c" / "0").read_bytes(), "<u4")
                except (OSError, ValueError, KeyError, TypeError):
                    return {}
            else:
                ds = self.store._h[INTEGRITY_GROUP].get(name)
                if ds is None:
                    return {}
                try:
                    cols, crcs = json.loads(ds.attrs["columns"]), np.asarray(ds[:])
                except (KeyError, ValueError, TypeError, OSError):
                    return {}
            if not isinstance(cols, list):
                return {}
            self._cache[key] = ({str(c): int(x) for c, x in zip(cols, crcs)}
                                if len(cols) == len(crcs) else {})
        return self._cache[key]


def create_zarr_integrity(g, arrays: dict, L: int, N: int, R: int, tables: dict) -> None:
    """The ``integrity`` group of a new Zarr store: one uint32 (L, n_blocks) array per site
    array, one chunk file (the L crcs of a row block) per block, written with the block; and
    the column tables' crcs (``tables``: {"entities" | "entity_codes" | "tokens": {column:
    crc}}; a table without columns is not created but ``entities``), written now."""
    ig = g.create_group(INTEGRITY_GROUP)
    for name in arrays:
        ig.create_array(name, shape=(L, n_blocks(N, R)), dtype="uint32", chunks=(L, 1),
                        compressors=None, fill_value=0, dimension_names=["layer", "block"])
    for table, crcs in tables.items():
        cols = list(crcs)
        if not cols and table != "entities":
            continue
        ea = ig.create_array(table, shape=(len(cols),), dtype="uint32",
                             chunks=(max(1, len(cols)),), compressors=None, fill_value=0,
                             dimension_names=["column"], attributes={"columns": cols})
        if cols:
            ea.with_config({"write_empty_chunks": True})[:] = np.array(
                [crcs[c] for c in cols], dtype=np.uint32)


def create_hdf5_integrity(f, arrays: dict, L: int, N: int, R: int, tables: dict) -> None:
    """The same for HDF5: datasets ``integrity/<site>`` (L, n_blocks) uint32, allocated now and
    overwritten in place per block, and one dataset per column table."""
    ig = f.create_group(INTEGRITY_GROUP)
    for name in arrays:
        ig.create_dataset(name, data=np.zeros((L, n_blocks(N, R)), dtype=np.uint32))
    for table, crcs in tables.items():
        cols = list(crcs)
        if not cols and table != "entities":
            continue
        ea = ig.create_dataset(table, data=np.array([crcs[c] for c in cols],
                                                    dtype=np.uint32).reshape(len(cols)))
        ea.attrs["columns"] = json.dumps(cols)
