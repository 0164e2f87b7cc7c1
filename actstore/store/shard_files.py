"""Writing row blocks: our uncompressed Zarr shards straight to their files (ShardFiles), any
other layout through zarr or h5py, each block's checksums after its data, all fsynced before
``rows_done`` may advance. Whole blocks only, never a read-modify-write of a shard."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from actstore.errors import StoreError
from actstore.io import fsync_dir, fsync_file, write_atomic
from actstore.store.checksums import block_crcs, crc32c
from actstore.store.format import storage_dtype
from actstore.store.layout import ShardLayout, our_layout, shard_key

__all__ = ["ShardFiles", "BlockWriter"]


class ShardFiles:
    """Writes whole shards of one sharded, uncompressed Zarr v3 array straight to their files.

    zarr's own write path copies every shard three times in Python (merge into a fill-value
    array, encode, concatenate) and, by default, compares each inner chunk with the fill value:
    250 MB/s on a 2-core box, too slow for a GPU that produces ~470 MB/s of Llama-2-7B hidden
    states (bench/RESULTS.md). For our layout a shard is just the (L, R, d) row block's bytes,
    one (1, R, d) inner chunk per layer in C order, followed by the shard index and its CRC32C
    (:class:`~actstore.store.layout.ShardLayout`), so it is written here with the row block's
    own buffers: the bytes are identical to what zarr writes with ``write_empty_chunks=True``
    (tests/actstore compare them file for file). Like zarr's LocalStore, each shard goes
    through a temporary file that is renamed into place (:func:`actstore.io.write_atomic`), so
    a killed writer leaves the old shard or the new one.

    :meth:`for_array` returns None for any other layout (compression, another codec chain,
    another key encoding, a non-local store): those keep zarr's path.
    """

    def __init__(self, root: Path, layout: ShardLayout):
        self.root = Path(root)
        self.layout = layout
        self.R = layout.R

    @classmethod
    def for_array(cls, arr) -> "ShardFiles | None":
        """The direct writer for a zarr array when its layout is ours, else None."""
        layout = our_layout(arr)
        return None if layout is None else cls(Path(arr.store.root) / arr.path, layout)

    def write(self, start: int, block: np.ndarray, crcs: bool = False,
              fsync: bool = False) -> dict[int, np.ndarray]:
        """Write rows [start, start + r) of every layer: block (L, r, d), whole shards (start a
        multiple of R; r too unless the block ends at the array's last row). ``crcs``: return
        each shard's (L,) crc32c of its rows (row block -> crcs), computed from the bytes
        written; ``fsync``: each shard is on the disk when this returns."""
        L, r, d = block.shape
        R = self.R
        out = {}
        for s0 in range(0, r, R):
            n = min(R, r - s0)
            part = block[:, s0:s0 + n]
            if n < R:                       # the edge shard is stored full size, zero-padded
                full = np.zeros((L, R, d), dtype=block.dtype)
                full[:, :n] = part
                part = full
            b = (start + s0) // R
            sums = np.zeros(L, dtype=np.uint32)

            def write(f, part=part, n=n, sums=sums):
                for layer in range(L):  # each (1, R, d) inner chunk is contiguous
                    if crcs and n == R:     # one copy, checksummed and written
                        raw = part[layer].tobytes()
                        sums[layer] = crc32c(raw)
                        f.write(raw)
                        continue
                    if crcs:
                        sums[layer] = crc32c(part[layer, :n])
                    f.write(np.ascontiguousarray(part[layer]).data)
                f.write(self.layout.index)
            write_atomic(self.root / "c" / "0" / str(b) / "0", write, mkdir=True, fsync=fsync)
            if crcs:
                out[b] = sums
        return out


class BlockWriter:
    """Mixin of :class:`~actstore.store.reader.ActivationStore`: the row-block writes."""

    def write_rows(self, start: int, blocks, neurons: np.ndarray | None = None) -> None:
        """Write rows ``[start, start + r)`` of every layer and site, and their checksums.

        Parameters
        ----------
        start : int
            First row; a multiple of ``rows_per_chunk``.
        blocks : dict of str to ndarray, or ndarray
            {site: (n_layers, r, d_site) block in the stored dtype} for every site of the store
            (``sites``); ``r`` is a multiple of ``rows_per_chunk`` unless the block ends at
            ``n_rows``. The older form ``write_rows(start, resid, neurons=None)`` (an array)
            still works.
        neurons : ndarray, optional
            The older form's neurons block.

        Notes
        -----
        With ``durable`` (the default) the data and the checksums are on the disk when it
        returns. Does not advance ``rows_done`` (call :meth:`mark_done` once the write
        returned).
        """
        self._check_writable()
        if isinstance(blocks, dict):
            if neurons is not None:
                raise StoreError("give the neurons block inside the dict of blocks "
                                 "(write_rows(start, {'resid': ..., 'neurons': ...}))")
        else:
            blocks = {"resid": blocks, **({"neurons": neurons} if neurons is not None else {})}
        self._check_blocks(start, blocks)
        sums = self.checksums.present
        for name in self.sites:
            crcs = self._writer(name)(self, start, blocks[name], sums)
            for b, c in crcs.items():
                self.checksums.put(name, b, c, fsync=self.durable)
        if self.format == "hdf5":
            self._h.flush()
            if self.durable:
                os.fsync(self._h.id.get_vfd_handle())

    def _check_blocks(self, start: int, blocks: dict) -> None:
        R = self.rows_per_chunk
        missing = [s for s in self.sites if blocks.get(s) is None]
        extra = [s for s in blocks if s not in self.sites and blocks[s] is not None]
        if missing or extra:
            raise StoreError(f"write_rows needs one block per site of the store "
                             f"({', '.join(self.sites)})"
                             + (f"; missing {missing}" if missing else "")
                             + (f"; not in the store: {extra}" if extra else ""))
        npdt = storage_dtype(self.dtype)
        r = None
        for name in self.sites:
            x = blocks[name]
            d = self.d_sites[name]
            if not isinstance(x, np.ndarray) or x.ndim != 3 or x.shape[0] != self.n_layers \
                    or x.shape[2] != d or (r is not None and x.shape[1] != r):
                want_r = "r" if r is None else str(r)
                raise StoreError(f"{name} block must be (n_layers={self.n_layers}, {want_r}, "
                                 f"{d}), got {tuple(getattr(x, 'shape', ()))}")
            if x.dtype != npdt:
                raise StoreError(f"{name} block has dtype {x.dtype}, store holds {self.dtype}")
            r = int(x.shape[1])
        end = start + r
        if start < 0 or start % R or end > self.n_rows or (r % R and end != self.n_rows) or r == 0:
            raise StoreError(f"write_rows({start}, r={r}): writes must cover whole chunks of "
                             f"{R} rows within [0, {self.n_rows})")

    def _writer(self, array: str):
        """write(store, start, block, crcs) -> {row block: crcs} for one array: direct shard
        files for our Zarr layout, else zarr (without its per-chunk fill-value comparison:
        every row block is real data) or h5py, then the crcs of the block as given. (The store
        is an argument, not captured: no reference cycle keeps a dropped store open.)"""
        w = self._writers.get(array)
        if w is None:
            arr = self._h[array]
            direct = ShardFiles.for_array(arr) if self.format == "zarr" else None
            if direct is not None:
                def w(store, start, block, crcs):
                    return direct.write(start, block, crcs=crcs, fsync=store.durable)
            else:
                if self.format == "zarr":
                    arr = arr.with_config({"write_empty_chunks": True})

                def w(store, start, block, crcs, arr=arr):
                    arr[:, start:start + block.shape[1]] = block
                    if store.format == "zarr" and store.durable:
                        store._sync_shards(array, start, block.shape[1])
                    return store._block_crcs(start, block) if crcs else {}
            self._writers[array] = w
        return w

    def _block_crcs(self, start: int, block: np.ndarray) -> dict[int, np.ndarray]:
        R = self.rows_per_chunk
        return {(start + s0) // R: block_crcs(block[:, s0:s0 + R])
                for s0 in range(0, block.shape[1], R)}

    def _sync_shards(self, array: str, start: int, r: int) -> None:
        """fsync the shard files zarr wrote for rows [start, start + r), and their entries."""
        R = self.rows_per_chunk
        for b in range(start // R, -(-(start + r) // R)):
            f = self.path / shard_key(array, b)
            fsync_file(f)                        # the file and its directory c/0/<b>
            fsync_dir(f.parent.parent)           # c/0, where zarr made <b>
