"""Writing row blocks: our uncompressed Zarr shards straight to their files (ShardFiles), any
other layout through zarr or h5py. Whole blocks only, never a read-modify-write of a shard."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from actstore.errors import StoreError
from actstore.io import write_atomic
from actstore.store.format import storage_dtype

__all__ = ["ShardFiles", "BlockWriter"]


class ShardFiles:
    """Writes whole shards of one sharded, uncompressed Zarr v3 array straight to their files.

    zarr's own write path copies every shard three times in Python (merge into a fill-value
    array, encode, concatenate) and, by default, compares each inner chunk with the fill value:
    250 MB/s on a 2-core box, too slow for a GPU that produces ~470 MB/s of Llama-2-7B hidden
    states (bench/RESULTS.md). For our layout a shard is just the (L, R, d) row block's bytes,
    one (1, R, d) inner chunk per layer in C order, followed by the shard index and its CRC32C,
    so it is written here with the row block's own buffers: the bytes are identical to what
    zarr writes with ``write_empty_chunks=True`` (tests/actstore compare them file for file).
    Like zarr's LocalStore, each shard goes through a temporary file that is renamed into place
    (:func:`actstore.io.write_atomic`), so a killed writer leaves the old shard or the new one.

    :meth:`for_array` returns None for any other layout (compression, another codec chain,
    another key encoding, a non-local store): those keep zarr's path.
    """

    def __init__(self, root: Path, shape, R: int, itemsize: int):
        import google_crc32c  # zarr's own CRC32C implementation (a zarr dependency)

        self.root = Path(root)
        L, _, d = (int(x) for x in shape)
        self.R = int(R)
        chunk = self.R * d * int(itemsize)
        index = np.empty((L, 2), dtype="<u8")          # (offset, nbytes) per inner chunk
        index[:, 0] = np.arange(L, dtype=np.uint64) * chunk
        index[:, 1] = chunk
        raw = index.tobytes()
        self._index = raw + np.uint32(google_crc32c.value(raw)).astype("<u4").tobytes()

    @classmethod
    def for_array(cls, arr) -> "ShardFiles | None":
        """The direct writer for a zarr array when its layout is ours, else None."""
        import sys

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
            return cls(Path(arr.store.root) / arr.path, arr.shape, R, arr.dtype.itemsize)
        except Exception:  # noqa: BLE001 - anything unexpected: zarr's own path is always right
            return None

    def write(self, start: int, block: np.ndarray) -> None:
        """Write rows [start, start + r) of every layer: block (L, r, d), whole shards (start a
        multiple of R; r too unless the block ends at the array's last row)."""
        L, r, d = block.shape
        R = self.R
        for s0 in range(0, r, R):
            n = min(R, r - s0)
            part = block[:, s0:s0 + n]
            if n < R:                       # the edge shard is stored full size, zero-padded
                full = np.zeros((L, R, d), dtype=block.dtype)
                full[:, :n] = part
                part = full
            path = self.root / "c" / "0" / str((start + s0) // R) / "0"

            def write(f, part=part):
                for layer in range(L):  # each (1, R, d) inner chunk is contiguous
                    f.write(np.ascontiguousarray(part[layer]).data)
                f.write(self._index)
            write_atomic(path, write, mkdir=True)


class BlockWriter:
    """Mixin of :class:`~actstore.store.reader.ActivationStore`: the row-block writes."""

    def write_rows(self, start: int, resid: np.ndarray, neurons: np.ndarray | None = None) -> None:
        """Write rows ``[start, start + r)`` for every layer. Whole chunks only: ``start`` is a
        multiple of ``rows_per_chunk`` and ``r`` is too, unless the block ends at ``n_rows``.
        Does not advance ``rows_done`` (call :meth:`mark_done` once the write returned)."""
        self._check_writable()
        R = self.rows_per_chunk
        r = int(resid.shape[1]) if resid.ndim == 3 else -1
        if resid.ndim != 3 or resid.shape[0] != self.n_layers or resid.shape[2] != self.d_model:
            raise StoreError(f"resid block must be (n_layers={self.n_layers}, r, "
                             f"d_model={self.d_model}), got {tuple(resid.shape)}")
        end = start + r
        if start < 0 or start % R or end > self.n_rows or (r % R and end != self.n_rows) or r == 0:
            raise StoreError(f"write_rows({start}, r={r}): writes must cover whole chunks of "
                             f"{R} rows within [0, {self.n_rows})")
        npdt = storage_dtype(self.dtype)
        if resid.dtype != npdt:
            raise StoreError(f"resid block has dtype {resid.dtype}, store holds {self.dtype}")
        if (neurons is None) != (self.d_mlp is None):
            raise StoreError("neurons must be given exactly when the store has d_mlp"
                             f" (d_mlp={self.d_mlp})")
        if neurons is not None:
            if neurons.shape != (self.n_layers, r, self.d_mlp) or neurons.dtype != npdt:
                raise StoreError(f"neurons block must be ({self.n_layers}, {r}, {self.d_mlp}) "
                                 f"{self.dtype}, got {tuple(neurons.shape)} {neurons.dtype}")
        self._writer("resid")(start, resid)
        if neurons is not None:
            self._writer("neurons")(start, neurons)
        if self.format == "hdf5":
            self._h.flush()

    def _writer(self, array: str):
        """write(start, block) for one array: direct shard files for our Zarr layout, else
        zarr (without its per-chunk fill-value comparison: every row block is real data) or
        h5py."""
        w = self._writers.get(array)
        if w is None:
            arr = self._h[array]
            if self.format == "zarr":
                direct = ShardFiles.for_array(arr)
                if direct is not None:
                    w = direct.write
                else:
                    arr = arr.with_config({"write_empty_chunks": True})
            if w is None:
                def w(start, block, arr=arr):
                    arr[:, start:start + block.shape[1]] = block
            self._writers[array] = w
        return w
