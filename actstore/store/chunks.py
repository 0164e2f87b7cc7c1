"""Reading rows of an activation array, verified against the store's checksums.

:class:`BlockReader` reads our uncompressed Zarr shards itself (each inner chunk's bytes at the
offset the shard index gives, checked by its CRC32C: no zarr machinery per chunk, byte for byte
what zarr returns, tested) and anything else through zarr or h5py. With verification every row
block a read touches is read whole and its crc32c compared with the one written with it, so a
partial-block read costs a whole block (docs/store-format.md "Integrity").
"""
from __future__ import annotations

import os
import weakref

import numpy as np

from actstore.errors import StoreError
from actstore.native import pread_crc
from actstore.store.checks import Problem, first_line, problem_error
from actstore.store.checksums import crc32c
from actstore.store.layout import EMPTY, block_rows, checksum_key, our_layout, shard_key

__all__ = ["BlockReader"]


class BlockReader:
    """Reads ``(positions, rows)`` of one activation array of an open store."""

    def __init__(self, store, array: str, arr):
        # a proxy: no reference cycle, so a dropped store (an HDF5 file) closes at once
        self.store, self.array, self.arr = weakref.proxy(store), array, arr
        self.layout = our_layout(arr) if store.format == "zarr" else None
        self.d = int(arr.shape[2])
        self.dtype = np.dtype(arr.dtype)
        self._paths: dict[int, str] = {}       # block -> its shard file
        self._indexes: dict[int, tuple] = {}   # block -> ((size, mtime, inode), parsed index)

    def read(self, pos: list[int], start: int, stop: int, verify: bool) -> np.ndarray:
        """(len(pos), stop - start, d) in the stored dtype; ``verify``: every block touched is
        read whole and checked (nothing is checked in a store without checksums)."""
        checks = self.store.checksums if verify else None
        if checks is None or not checks.present or stop <= start or not pos:
            return self._read(pos, start, stop, None)
        R, n = self.store.rows_per_chunk, self.store.n_rows
        bs, be = (start // R) * R, min(n, -(-stop // R) * R)
        out = self._read(pos, bs, be, checks)
        if (bs, be) == (start, stop):
            return out
        return np.ascontiguousarray(out[:, start - bs:stop - bs])

    def _read(self, pos: list[int], start: int, stop: int, checks) -> np.ndarray:
        if self.layout is None:
            out = self._generic(pos, start, stop)
            if checks is not None:
                for b, a, e in self._blocks(start, stop):
                    want = self._want(checks, b)
                    for i, p in enumerate(pos):
                        self._compare(b, p, want[p], crc32c(out[i, a - start:e - start]))
            return out
        out = np.empty((len(pos), max(0, stop - start), self.d), dtype=self.dtype)
        for b, a, e in self._blocks(start, stop):
            want = None if checks is None else self._want(checks, b)
            self._direct(b, pos, a, e, out[:, a - start:e - start], want)
        return out

    def _blocks(self, start: int, stop: int):
        """(block, first row, end row) of each row block that ``[start, stop)`` touches."""
        R, n = self.store.rows_per_chunk, self.store.n_rows
        for b in range(start // R, -(-stop // R)):
            b0, b1 = block_rows(b, R, n)
            yield b, max(start, b0), min(stop, b1)

    def _problem(self, key: str, message: str, b: int, layer: int | None = None) -> StoreError:
        s = self.store
        layers = (layer, layer) if layer is not None else (s.layers[0], s.layers[-1])
        file = str(s.path / key) if s.format == "zarr" else f"{s.path} (dataset {key})"
        return problem_error(Problem(file, message, array=self.array, layers=layers,
                                     rows=block_rows(b, s.rows_per_chunk, s.n_rows),
                                     repairable=True))

    def _want(self, checks, b: int) -> np.ndarray:
        want = checks.get(self.array, b)
        if want is None:
            key = (checksum_key(self.array, b) if self.store.format == "zarr"
                   else f"integrity/{self.array}")
            raise self._problem(key, "checksum file missing or damaged", b)
        return want

    def _compare(self, b: int, p: int, want, got: int) -> None:
        if int(want) != got:
            key = shard_key(self.array, b) if self.store.format == "zarr" else self.array
            raise self._problem(key, f"checksum mismatch (stored crc32c {int(want):08x}, data "
                                f"{got:08x}): the data is not what was written (bit flips, or "
                                "another block's data)", b, self.store.layers[p])

    def _generic(self, pos: list[int], start: int, stop: int) -> np.ndarray:
        """zarr or h5py: one read for contiguous layers, else one per layer."""
        arr = self.arr
        try:
            if pos == list(range(pos[0], pos[-1] + 1)):
                return np.asarray(arr[pos[0]:pos[-1] + 1, start:stop])
            return np.stack([np.asarray(arr[p, start:stop]) for p in pos])
        except Exception as exc:  # noqa: BLE001 - a damaged chunk: name the files
            if isinstance(exc, StoreError):
                raise
            b = start // self.store.rows_per_chunk
            key = shard_key(self.array, b) if self.store.format == "zarr" else self.array
            raise self._problem(key, f"cannot be decoded ({first_line(exc)})", b) from None

    def _direct(self, b: int, pos: list[int], a: int, e: int, out: np.ndarray, want) -> None:
        """Rows ``[a, e)`` of block ``b`` for ``pos`` into ``out`` (len(pos), e - a, d), from
        the shard file itself; ``want``: the block's crcs (then ``[a, e)`` is the whole
        block)."""
        lay, key = self.layout, shard_key(self.array, b)
        skip = (a - b * lay.R) * lay.d * lay.itemsize    # bytes of the chunk before row a
        try:
            fd = os.open(self._file(b, key), os.O_RDONLY)
        except FileNotFoundError:
            raise self._problem(key, "shard file missing", b) from None
        try:
            size, idx = self._index(fd, b, key)
            runs: list[list] = []     # [offset, [(i, p), ...]]: chunks adjacent in the file
            for i, p in enumerate(pos):
                off, nb = idx[p]
                if off == EMPTY and nb == EMPTY:        # a chunk zarr did not store: zeros
                    out[i] = 0
                    if want is not None:
                        self._compare(b, p, want[p], crc32c(out[i]))
                    continue
                if nb != lay.chunk_nbytes or int(off) + int(nb) > size - len(lay.index):
                    raise self._problem(key, "shard index damaged (a chunk outside the file)",
                                        b, self.store.layers[p])
                whole = skip == 0 and out[i].nbytes == lay.chunk_nbytes
                last = runs[-1] if runs else None
                if (whole and last is not None and last[2] and len(last[1]) < 512
                        and last[0] + len(last[1]) * lay.chunk_nbytes == int(off)):
                    last[1].append((i, p))
                else:
                    runs.append([int(off), [(i, p)], whole])
            for off, members, _ in runs:
                self._run(fd, off + skip, out, members, b, key, want)
        finally:
            os.close(fd)

    def _file(self, b: int, key: str) -> str:
        path = self._paths.get(b)
        if path is None:
            path = self._paths[b] = str(self.store.path / key)
        return path

    def _index(self, fd: int, b: int, key: str):
        """(file size, (L, 2) chunk offsets and sizes) of the open shard of block ``b``; the
        parsed index is reused while the file's size and modification time stay the same (a
        layer-by-layer read opens each shard once per layer)."""
        st = os.fstat(fd)
        stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
        hit = self._indexes.get(b)
        if hit is not None and hit[0] == stamp:
            return st.st_size, hit[1]
        n_index = len(self.layout.index)
        idx = (self.layout.parse_index(os.pread(fd, n_index, st.st_size - n_index))
               if st.st_size >= n_index else None)
        if idx is None:
            raise self._problem(key, f"shard index damaged (file of {st.st_size} bytes)", b)
        self._indexes[b] = (stamp, idx)
        return st.st_size, idx

    def _run(self, fd: int, offset: int, out: np.ndarray, members: list, b: int, key: str,
             want) -> None:
        """Read chunks that lie one after another in the file, ``members`` = (i, position),
        into ``out[i]`` with one call, then check each against ``want``. The bytes go straight
        into ``out`` (reading into a bytes object and copying it into a fresh array page-faults
        in user space); verified, a second thread checksums each piece right behind the read
        (``actstore.native.pread_crc``; bench/RESULTS.md "Store integrity")."""
        dst = [out[i] for i, _ in members]
        total = sum(x.nbytes for x in dst)
        if want is not None:
            got, crcs = pread_crc(fd, offset, dst)
        elif hasattr(os, "preadv"):
            got, crcs = os.preadv(fd, [memoryview(x).cast("B") for x in dst], offset), None
        else:
            got, crcs = pread_crc(fd, offset, dst)
        if got != total:
            raise self._problem(key, "shard file truncated", b, self.store.layers[members[0][1]])
        if want is not None:
            for (_, p), crc in zip(members, crcs):
                self._compare(b, p, want[p], crc)
