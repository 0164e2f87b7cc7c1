"""ActivationStore: fp16 hidden states per (layer, row) plus the entity table and metadata.

One store holds, for one model + prompt + dataset:

* ``resid``   (n_layers, n_rows, d_model), float16 by default: hidden state at the last entity
  token after each layer listed in ``layers`` (HF ``output_hidden_states`` indexing: 0 =
  embeddings, i = output of decoder block i-1, before the final norm).
* ``neurons`` (n_layers, n_rows, d_mlp), optional: MLP neuron activations (input of down_proj).
* the entity table (every column of ``EntityDataset.table``) and all metadata.
* ``rows_done``: rows ``[0, rows_done)`` are complete and durable; the resume point.

Several processes may write disjoint row blocks of one Zarr store at once (distributed
extraction); their progress is kept in per-range records folded into ``rows_done`` by one
process (``finalize_ranges``; docs/store-format.md, "Row ranges").

Two formats with one interface: Zarr v3 (default; a directory, readable by plain ``zarr.open``)
and HDF5 (one file, via h5py). docs/store-format.md is the specification.

Durability rule: row blocks are written whole (``rows_per_chunk`` rows, every layer at once),
and ``rows_done`` is advanced only by ``mark_done`` after the block's write returned. Zarr's
local store writes each shard to a temporary file and renames it, so a killed process leaves
either the old or the new shard, never half of one. The HDF5 file allocates every chunk when it
is created and keeps ``rows_done`` in a small pre-allocated dataset, so later writes only
overwrite raw bytes in place and never change the file's structure.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np

# pandas is imported inside functions: `import actstore` (and `actstore --help`) stays fast.

FORMAT_NAME = "actstore-activations"
FORMAT_VERSION = 1
ARRAYS = ("resid", "neurons")
DTYPES = ("float16", "bfloat16", "float32")
# Chosen by measurement on real SmolLM2 fp16 activations (bench/RESULTS.md, "store
# compression"): fp16 hidden states are close to incompressible, so compression buys a few
# percent of disk for a large cost in write/read speed. Default is none.
DEFAULT_COMPRESSION = "none"
COMPRESSIONS = ("none", "zstd", "blosc")


class StoreError(ValueError):
    """A store that cannot be created, opened or written as asked (message says why).

    ``replaceable``: the path holds what ``overwrite`` may delete (an activation store of
    another format version, an interrupted creation, an empty directory), so suggesting
    --overwrite is safe; for anything else it is not.
    """

    def __init__(self, message: str, replaceable: bool = False):
        super().__init__(message)
        self.replaceable = replaceable


def default_rows_per_chunk(d: int) -> int:
    """Rows per chunk: a power of two giving ~1 MiB fp16 chunks, clamped to [64, 1024]."""
    r = 1 << max(0, int(np.floor(np.log2(max(1, (1 << 20) // (2 * max(1, d)))))))
    return int(min(1024, max(64, r)))


def _numpy_dtype(dtype: str):
    if dtype == "bfloat16":
        # numpy has no bfloat16: store its raw 16 bits (documented in store-format.md).
        return np.dtype("uint16")
    return np.dtype(dtype)


def _detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "zarr.json").exists():
            return "zarr"
        raise StoreError(f"{path}: a directory but not a Zarr v3 store (no zarr.json)",
                         replaceable=not any(path.iterdir()))
    if path.is_file():
        with open(path, "rb") as f:
            head = f.read(8)
        if head == b"\x89HDF\r\n\x1a\n":
            return "hdf5"
        raise StoreError(f"{path}: not an activation store (neither Zarr v3 nor HDF5)")
    raise StoreError(f"{path}: no such store")


def _format_from_path(path: Path, format: str | None) -> str:
    if format is not None:
        if format not in ("zarr", "hdf5"):
            raise StoreError(f"unknown store format {format!r}; choose 'zarr' or 'hdf5'")
        return format
    return "hdf5" if path.suffix.lower() in (".h5", ".hdf5") else "zarr"


# What an interrupted Zarr creation can leave at the top level of the store directory.
_ZARR_ENTRIES = {"zarr.json", "resid", "neurons", "layer", "entities", "progress"}
# Per-range progress records of distributed writers: zarr groups progress/<start>-<stop>/
# whose zarr.json attribute "actstore_range" each belongs to exactly one writer process.
PROGRESS_GROUP = "progress"
RANGE_KEY = "actstore_range"


def merge_intervals(intervals) -> list[tuple[int, int]]:
    """Sorted, merged half-open row intervals (touching ones join; empty ones dropped)."""
    out: list[list[int]] = []
    for a, b in sorted((int(a), int(b)) for a, b in intervals if int(b) > int(a)):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _write_json_atomic(path: Path, obj, indent=None) -> None:
    # temporary + rename, as zarr writes its own files: a killed writer leaves the old record
    # or the new one (a leftover *.partial is removed by the next exclusive open)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    tmp.write_text(json.dumps(obj, indent=indent))
    os.replace(tmp, path)


class ShardFiles:
    """Writes whole shards of one sharded, uncompressed Zarr v3 array straight to their files.

    zarr's own write path copies every shard three times in Python (merge into a fill-value
    array, encode, concatenate) and, by default, compares each inner chunk with the fill value:
    250 MB/s on a 2-core box, too slow for a GPU that produces ~470 MB/s of Llama-2-7B hidden
    states (bench/RESULTS.md). For our layout a shard is just the (L, R, d) row block's bytes,
    one (1, R, d) inner chunk per layer in C order, followed by the shard index and its CRC32C,
    so it is written here with the row block's own buffers: the bytes are identical to what
    zarr writes with ``write_empty_chunks=True`` (tests/actstore compare them file for file).
    Like zarr's LocalStore, each shard goes to a temporary ``*.partial`` file that is renamed
    into place, so a killed writer leaves the old shard or the new one.

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
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"0.{os.getpid()}.partial")
            try:
                with open(tmp, "wb") as f:
                    for layer in range(L):  # each (1, R, d) inner chunk is contiguous
                        f.write(np.ascontiguousarray(part[layer]).data)
                    f.write(self._index)
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise


class RangeRecord:
    """Progress of one writer over the window-aligned row range ``[start, stop)``: rows
    ``[start, done)`` are written and durable. Each record has one writer process, so no two
    processes ever rewrite the same file (zarr attribute updates are read-modify-write)."""

    def __init__(self, store_path: Path, start: int, stop: int):
        self.start, self.stop = int(start), int(stop)
        self.dir = Path(store_path) / PROGRESS_GROUP / f"{self.start}-{self.stop}"
        self.done = self.start

    def update(self, done: int) -> None:
        done = int(done)
        if not self.start <= done <= self.stop:
            raise StoreError(f"range record [{self.start}, {self.stop}): done={done} outside it")
        self.dir.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(self.dir / "zarr.json", {
            "zarr_format": 3, "node_type": "group",
            "attributes": {RANGE_KEY: {"start": self.start, "stop": self.stop, "done": done}}})
        self.done = done


def _is_store_or_empty(path: Path) -> bool:
    """True for an activation store of any version, complete or not, and an empty directory:
    the only things ``overwrite`` may delete (never a user's other files)."""
    if path.is_dir():
        entries = {p.name for p in path.iterdir()}
        if not entries:
            return True
        try:
            node = json.loads((path / "zarr.json").read_text())
        except (OSError, ValueError):
            return False
        if not isinstance(node, dict) or node.get("node_type") != "group":
            return False
        attrs = node.get("attributes") or {}
        head = attrs.get("actstore")
        if isinstance(head, dict) and head.get("format") == FORMAT_NAME:
            return True
        # a creation killed before its attributes were written: our entries and nothing else
        return not attrs and entries <= _ZARR_ENTRIES
    if path.is_file():
        try:
            import h5py
            with h5py.File(path, "r") as f:
                raw = f.attrs.get("actstore")
            head = json.loads(raw) if raw is not None else None
        except Exception:  # noqa: BLE001 - not HDF5, unreadable, locked: not provably ours
            return False
        return isinstance(head, dict) and head.get("format") == FORMAT_NAME
    return False


def _delete(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def remove_store(path) -> None:
    """Delete the activation store at ``path`` (any version, complete or not) or an empty
    directory; nothing if ``path`` does not exist. Anything else raises :class:`StoreError`."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not _is_store_or_empty(path):
        raise StoreError(f"refusing to delete {path}: not an activation store; "
                         "choose another path (or delete it yourself)")
    _delete(path)


# ----------------------------------------------------------------------------- entity table

def _column_kind(s) -> str:
    import pandas as pd
    if pd.api.types.is_bool_dtype(s):
        return "bool"
    if pd.api.types.is_integer_dtype(s):
        return "int64"
    if pd.api.types.is_float_dtype(s):
        return "float64"
    return "str"


def _column_values(s, kind: str) -> np.ndarray:
    if kind == "str":
        # Missing strings are stored as "" (the table never needs NaN in text columns).
        return np.array(["" if (v is None or (isinstance(v, float) and np.isnan(v))) else str(v)
                         for v in s.tolist()], dtype=object)
    return s.to_numpy(dtype=kind)


def _table_from_columns(columns: list[str], kinds: dict, get):
    import pandas as pd
    data = {}
    for c in columns:
        v = get(c)
        if kinds[c] == "str":
            v = pd.Series(np.asarray(v).astype(object), dtype=object)
        data[c] = v
    return pd.DataFrame(data)


# ----------------------------------------------------------------------------- the store

class ActivationStore:
    """An open store. Use :func:`create_store` or :func:`open_store` to get one.

    Attributes: ``path, format, n_layers, n_rows, d_model, d_mlp`` (None without neurons),
    ``layers`` (hidden-state indices), ``dtype`` ("float16" | "bfloat16" | "float32"),
    ``meta`` (model, prompt, dataset, ... as recorded by the writer), ``rows_done``,
    ``targets``, ``group_columns``, ``rows_per_chunk``, ``compression``.
    Arrays read in the stored dtype; bfloat16 comes back as torch.bfloat16 with ``as_="torch"``
    and as its raw uint16 bits in numpy.
    """

    def __init__(self, path: Path, fmt: str, header: dict, handle, mode: str):
        self.path = Path(path)
        self.format = fmt
        self._h = handle
        self.mode = mode
        self._header = header
        self.layers = [int(x) for x in header["layers"]]
        self.n_layers = len(self.layers)
        self.n_rows = int(header["n_rows"])
        self.d_model = int(header["d_model"])
        self.d_mlp = None if header.get("d_mlp") is None else int(header["d_mlp"])
        self.dtype = header["dtype"]
        self.rows_per_chunk = int(header["rows_per_chunk"])
        self.targets = tuple(header["targets"])
        self.group_columns = tuple(header["group_columns"])
        self.compression = header.get("compression", "none")
        self.meta = dict(header["meta"])
        self._entities = None
        self._writers: dict = {}

    # -- header
    @property
    def header(self) -> dict:
        """Everything recorded at creation (format, shapes, layers, dtype, meta...)."""
        return dict(self._header)

    @property
    def rows_done(self) -> int:
        if self.format == "zarr":
            return int(self._h.attrs["rows_done"])
        return int(self._h["rows_done"][0])

    @property
    def complete(self) -> bool:
        return self.rows_done >= self.n_rows

    @property
    def arrays(self) -> tuple[str, ...]:
        return ("resid",) + (("neurons",) if self.d_mlp is not None else ())

    def __len__(self) -> int:
        return self.n_rows

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.path)!r}, format={self.format}, layers={self.n_layers}, "
                f"rows={self.rows_done}/{self.n_rows}, d_model={self.d_model}, dtype={self.dtype}"
                + (f", d_mlp={self.d_mlp}" if self.d_mlp else "") + ")")

    # -- entity table
    @property
    def entities(self):
        """The entity table, same columns (and order) as ``EntityDataset.table``."""
        if self._entities is None:
            cols = self._header["entity_columns"]
            kinds = self._header["entity_kinds"]
            grp = self._h["entities"]
            if self.format == "zarr":
                get = lambda c: grp[c][:]  # noqa: E731
            else:
                def get(c):
                    ds = grp[c]
                    return ds.asstr()[:] if kinds[c] == "str" else ds[:]
            self._entities = _table_from_columns(cols, kinds, get)
        return self._entities.copy()

    def target_array(self, names=None) -> np.ndarray:
        """(n_rows, k) float64 targets, columns in ``names`` order (default: ``targets``)."""
        names = self.targets if names is None else tuple([names] if isinstance(names, str) else names)
        ent = self.entities
        missing = [n for n in names if n not in ent.columns]
        if missing:
            raise StoreError(f"{self.path}: no target column(s) {missing}; have {list(self.targets)}")
        return ent[list(names)].to_numpy(dtype=np.float64)

    @property
    def is_test(self) -> np.ndarray:
        ent = self.entities
        if "is_test" not in ent.columns:
            return np.zeros(self.n_rows, dtype=bool)
        return ent["is_test"].to_numpy(dtype=bool)

    # -- reading
    def _array(self, array: str):
        if array not in ARRAYS:
            raise StoreError(f"unknown array {array!r}; choose one of {ARRAYS}")
        if array == "neurons" and self.d_mlp is None:
            raise StoreError(f"{self.path}: this store has no neuron activations "
                             "(extract with --neurons)")
        return self._h[array]

    def _positions(self, layers) -> list[int]:
        if layers is None:
            return list(range(self.n_layers))
        if isinstance(layers, (int, np.integer)):
            layers = [int(layers)]
        pos = [int(i) for i in layers]
        for i in pos:
            if not -self.n_layers <= i < self.n_layers:
                raise StoreError(f"layer position {i} out of range: the store has {self.n_layers} "
                                 f"layers (hidden-state indices {self.layers})")
        return [i % self.n_layers for i in pos]

    def _to_out(self, x: np.ndarray, as_: str):
        if as_ == "numpy":
            return x
        if as_ == "torch":
            import torch
            if self.dtype == "bfloat16":
                return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
            return torch.from_numpy(x)
        raise StoreError(f"as_ must be 'numpy' or 'torch', not {as_!r}")

    def layer(self, i: int, array: str = "resid", as_: str = "numpy"):
        """(rows_done, d) for layer POSITION i (an index into ``layers``), stored dtype."""
        (p,) = self._positions([i])
        n = self.rows_done
        x = np.asarray(self._array(array)[p, :n])
        return self._to_out(x, as_)

    def read(self, rows: slice, layers=None, array: str = "resid") -> np.ndarray:
        """(L, r, d) for a row slice and layer POSITIONS (default all), stored dtype.

        Only rows ``[0, rows_done)`` are readable (later rows are not written yet; in HDF5 they
        are uninitialised bytes): an open-ended slice stops at ``rows_done`` and negative
        indices count from it; an explicit stop past ``rows_done`` is an error."""
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise StoreError("rows must be a contiguous slice, e.g. slice(0, 1024)")
        done = self.rows_done
        if rows.stop is not None and rows.stop > done:
            raise StoreError(f"{self.path}: rows {rows.start or 0}:{rows.stop} go past rows_done="
                             f"{done} (of {self.n_rows}); rows at or after it are not written "
                             "yet (resume the extraction to complete the store)")
        start, stop, _ = rows.indices(done)
        arr = self._array(array)
        pos = self._positions(layers)
        if not pos:
            return np.empty((0, max(0, stop - start), arr.shape[2]), dtype=arr.dtype)
        if pos == list(range(pos[0], pos[-1] + 1)):  # contiguous layers: one read
            return np.asarray(arr[pos[0]:pos[-1] + 1, start:stop])
        return np.stack([np.asarray(arr[p, start:stop]) for p in pos])

    def iter_chunks(self, rows: int | None = None, layers=None, array: str = "resid",
                    start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(row_start, block)`` with block (L, r, d) in the stored dtype.

        ``rows`` is the block height (default: ``rows_per_chunk``; rounded up to a multiple of
        it so reads are chunk-aligned). Iteration covers ``[start, min(stop, rows_done))``.
        """
        R = self.rows_per_chunk
        step = R if rows is None else max(R, -(-int(rows) // R) * R)
        end = self.rows_done if stop is None else min(int(stop), self.rows_done)
        pos = self._positions(layers)
        s = int(start)
        while s < end:
            # align later blocks to chunk boundaries even if `start` is not
            e = min(end, (s // R) * R + step)
            yield s, self.read(slice(s, e), layers=pos, array=array)
            s = e

    # -- writing
    def _check_writable(self):
        if self.mode == "r":
            raise StoreError(f"{self.path}: store is open read-only (open_store(path, mode='a'))")

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
        npdt = _numpy_dtype(self.dtype)
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

    def mark_done(self, rows_done: int) -> None:
        """Record that rows ``[0, rows_done)`` are written (call only after their write)."""
        self._check_writable()
        rows_done = int(rows_done)
        if not 0 <= rows_done <= self.n_rows:
            raise StoreError(f"rows_done={rows_done} outside [0, {self.n_rows}]")
        if self.format == "zarr":
            self._h.attrs["rows_done"] = rows_done   # rewrites zarr.json atomically
        else:
            self._h["rows_done"][0] = rows_done      # in-place raw write, pre-allocated
            self._h.flush()

    # -- row ranges (distributed extraction; docs/store-format.md "Row ranges")
    @property
    def ranges_done(self) -> list[tuple[int, int]]:
        """Finished row intervals ``[start, stop)`` past ``rows_done`` (left by a distributed
        extraction that stopped early; empty for a complete or prefix-written store). Readers
        of this API still see only ``[0, rows_done)``."""
        if self.format != "zarr":
            return []
        return [(int(a), int(b)) for a, b in self._h.attrs.get("ranges_done", [])]

    def range_records(self) -> list[tuple[int, int, int]]:
        """(start, stop, done) of every per-range progress record (writers running or killed)."""
        if self.format != "zarr":
            return []
        out = []
        for f in sorted((self.path / PROGRESS_GROUP).glob("*/zarr.json")):
            try:
                r = json.loads(f.read_text())["attributes"][RANGE_KEY]
                out.append((int(r["start"]), int(r["stop"]), int(r["done"])))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # a record is only a hint that rows are done: ignoring one is safe
        return out

    def done_intervals(self) -> list[tuple[int, int]]:
        """Every written, durable row interval: ``[0, rows_done)``, ``ranges_done`` and the
        per-range records, merged and sorted."""
        iv = [(0, self.rows_done)] + self.ranges_done
        iv += [(a, d) for a, _, d in self.range_records()]
        return merge_intervals(iv)

    def _set_done(self, intervals) -> None:
        iv = merge_intervals(intervals)
        prefix = iv[0][1] if iv and iv[0][0] == 0 else 0
        rest = [[a, b] for a, b in iv if a > 0]
        if self.format != "zarr":
            if rest:
                raise StoreError(f"{self.path}: HDF5 stores record only a rows_done prefix; "
                                 f"rows {rest} are not adjacent to it")
            self.mark_done(prefix)
            return
        attrs = dict(self._h.attrs)
        new = {k: v for k, v in attrs.items() if k != "ranges_done"}
        new["rows_done"] = int(min(prefix, self.n_rows))
        if rest:
            new["ranges_done"] = rest
        if new != attrs:
            self._h.attrs.put(new)  # one atomic rewrite of zarr.json

    def mark_rows(self, start: int, stop: int) -> None:
        """Record that rows ``[start, stop)`` are written (the single-writer form of
        :meth:`mark_done` for blocks that need not extend the prefix). Only one process may
        call it on a store: it rewrites the group attributes."""
        self._check_writable()
        if not 0 <= int(start) <= int(stop) <= self.n_rows:
            raise StoreError(f"rows [{start}, {stop}) outside [0, {self.n_rows}]")
        self._set_done([(0, self.rows_done), (start, stop)] + self.ranges_done)

    def range_record(self, start: int, stop: int) -> RangeRecord:
        """A progress record for one writer's range (distributed extraction). Call
        :meth:`begin_ranges` once (one process) before writers create records."""
        if self.format != "zarr":
            raise StoreError(f"{self.path}: only Zarr stores take parallel writers "
                             "(HDF5 files allow one writer)")
        return RangeRecord(self.path, start, stop)

    def begin_ranges(self) -> None:
        """Create the (zarr group) directory that holds per-range records (one process)."""
        self._check_writable()
        g = self.path / PROGRESS_GROUP
        g.mkdir(exist_ok=True)
        if not (g / "zarr.json").exists():
            _write_json_atomic(g / "zarr.json", {"zarr_format": 3, "node_type": "group",
                                                 "attributes": {}})

    def finalize_ranges(self, finished=None) -> int:
        """Fold the per-range records into ``rows_done`` / ``ranges_done`` and delete them;
        returns ``rows_done`` (``n_rows`` once every range is complete). One process only, with
        no writer running: rank 0 after the others finished, or an exclusive ``open_store``.

        ``finished``: the durable ``(start, stop)`` row ranges the writers of this run report
        (rank 0 gathers them over the process group). They are folded instead of listing the
        records: on a network file system (NFS attribute caching) a directory listing may miss
        a record another node has just written. None: list the records (an exclusive open,
        e.g. after a crash, when every record is long written)."""
        self._check_writable()
        if self.format != "zarr":
            return self.rows_done
        if finished is None:
            self._set_done(self.done_intervals())
        else:
            self._set_done([(0, self.rows_done)] + self.ranges_done
                           + [(int(a), int(b)) for a, b in finished])
        g = self.path / PROGRESS_GROUP
        if g.exists():
            # the records are folded: a leftover (an NFS silly-rename file) is only a hint
            # that the next exclusive open folds again, so failing to delete one is harmless
            shutil.rmtree(g, ignore_errors=finished is not None)
        return self.rows_done

    def close(self) -> None:
        if self.format == "hdf5" and self._h is not None:
            try:
                self._h.close()
            except Exception:  # pragma: no cover - closing twice
                pass
        self._h = None if self.format == "hdf5" else self._h

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------- create / open

def _compressors(name: str, fmt: str):
    if name not in COMPRESSIONS:
        raise StoreError(f"unknown compression {name!r}; choose one of {COMPRESSIONS}")
    if fmt == "hdf5":
        if name != "none":
            # Pre-allocated chunks (crash safety) rule out HDF5 filters; see store-format.md.
            raise StoreError("HDF5 stores are uncompressed (chunks are pre-allocated so a "
                             "killed run cannot corrupt the file); use --format zarr to compress")
        return None
    import zarr
    if name == "none":
        return None
    if name == "zstd":
        return [zarr.codecs.ZstdCodec(level=3)]
    return [zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=2)]


def create_store(path, *, layers: list[int], n_rows: int, d_model: int, entities,
                 targets: tuple[str, ...], group_columns: tuple[str, ...], meta: dict,
                 format: str | None = None, dtype: str = "float16", d_mlp: int | None = None,
                 rows_per_chunk: int | None = None, compression: str | None = None,
                 overwrite: bool = False) -> ActivationStore:
    """Create an empty store (``rows_done = 0``) and return it open for writing.

    ``format``: "zarr" (default, or inferred "hdf5" from a .h5/.hdf5 suffix). ``meta`` must be
    JSON-serialisable. ``entities`` must have ``n_rows`` rows and contain ``targets``.
    ``overwrite`` replaces an existing store at ``path``; otherwise an existing path is an error.
    """
    path = Path(path)
    fmt = _format_from_path(path, format)
    layers = [int(x) for x in layers]
    if not layers:
        raise StoreError("a store needs at least one layer")
    if len(set(layers)) != len(layers):
        raise StoreError(f"duplicate layers in {layers}")
    if dtype not in DTYPES:
        raise StoreError(f"unknown dtype {dtype!r}; choose one of {DTYPES}")
    if int(n_rows) <= 0:
        raise StoreError("a store needs at least one row (the dataset is empty)")
    if len(entities) != n_rows:
        raise StoreError(f"entity table has {len(entities)} rows, store has n_rows={n_rows}")
    missing = [t for t in list(targets) + list(group_columns) if t not in entities.columns]
    if missing:
        raise StoreError(f"entity table lacks column(s) {missing}")
    try:
        meta_json = json.loads(json.dumps(meta))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"store metadata must be JSON-serialisable: {exc}") from None
    R = int(rows_per_chunk or default_rows_per_chunk(d_model))
    if R <= 0:
        raise StoreError("rows_per_chunk must be positive")
    R = min(R, int(n_rows)) if n_rows >= 1 else R
    comp = DEFAULT_COMPRESSION if compression is None else compression
    if fmt == "hdf5" and compression is None:
        comp = "none"
    _compressors(comp, fmt)  # validate early

    if path.exists():
        if not overwrite:
            raise StoreError(f"{path} already exists (use overwrite / --overwrite to replace it)")
        remove_store(path)
    if not path.parent.exists():
        raise StoreError(f"cannot create {path}: directory {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise StoreError(f"cannot create {path}: directory {path.parent} is not writable")

    ent = entities.reset_index(drop=True)
    columns = [str(c) for c in ent.columns]
    kinds = {c: _column_kind(ent[c]) for c in columns}
    header = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "n_rows": int(n_rows),
        "d_model": int(d_model),
        "d_mlp": None if d_mlp is None else int(d_mlp),
        "layers": layers,
        "dtype": dtype,
        "rows_per_chunk": R,
        "compression": comp,
        "targets": list(targets),
        "group_columns": list(group_columns),
        "entity_columns": columns,
        "entity_kinds": kinds,
        "meta": meta_json,
    }
    L = len(layers)
    npdt = _numpy_dtype(dtype)
    arrays = {"resid": int(d_model)}
    if d_mlp is not None:
        arrays["neurons"] = int(d_mlp)
    try:
        if fmt == "zarr":
            handle = _create_zarr(path, header, arrays, L, int(n_rows), R, npdt, comp, ent, kinds)
        else:
            handle = _create_hdf5(path, header, arrays, L, int(n_rows), R, npdt, ent, kinds)
    except OSError as exc:
        _delete(path)  # the half-created store this call just made
        raise StoreError(f"cannot create store {path}: {exc.strerror or exc}") from None
    return ActivationStore(path, fmt, header, handle, "a")


def _create_zarr(path, header, arrays, L, N, R, npdt, comp, ent, kinds):
    import zarr
    # the header first (an interrupted creation is recognisable as a store), rows_done last
    g = zarr.open_group(str(path), mode="w-", zarr_format=3, attributes={"actstore": header})
    for name, d in arrays.items():
        # chunk (1, R, d): one layer's rows read contiguously; shard (L, R, d): one row block
        # of every layer is one file, written whole (no read-modify-write of shards).
        g.create_array(name, shape=(L, N, d), dtype=npdt, chunks=(1, R, d), shards=(L, R, d),
                       compressors=_compressors(comp, "zarr"), fill_value=0,
                       dimension_names=["layer", "row", "dim" if name == "resid" else "neuron"])
    la = g.create_array("layer", shape=(L,), dtype="int32", chunks=(L,), compressors=None,
                        dimension_names=["layer"])
    la[:] = np.asarray(header["layers"], dtype=np.int32)
    eg = g.create_group("entities")
    for c in header["entity_columns"]:
        k = kinds[c]
        vals = _column_values(ent[c], k)
        a = eg.create_array(c, shape=(N,), dtype=(str if k == "str" else k), chunks=(N,),
                            dimension_names=["row"])
        a[:] = vals
    # rows_done last: a store without it was never fully created
    g.attrs.update({"rows_done": 0})
    return g


def _create_hdf5(path, header, arrays, L, N, R, npdt, ent, kinds):
    import h5py
    f = h5py.File(path, "w-")
    try:
        # the header first (an interrupted creation is recognisable), rows_done last
        f.attrs["actstore"] = json.dumps(header)
        for name, d in arrays.items():
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            f.create_dataset(name, shape=(L, N, d), dtype=npdt, chunks=(1, R, d), dcpl=dcpl,
                             fill_time="never", track_times=False)
        f.create_dataset("layer", data=np.asarray(header["layers"], dtype=np.int32))
        eg = f.create_group("entities")
        for c in header["entity_columns"]:
            k = kinds[c]
            vals = _column_values(ent[c], k)
            if k == "str":
                eg.create_dataset(c, data=vals.astype(object), dtype=h5py.string_dtype("utf-8"))
            else:
                eg.create_dataset(c, data=vals)
        f.create_dataset("rows_done", data=np.zeros(1, dtype=np.int64))
        f.flush()
    except BaseException:
        f.close()
        raise
    return f


def open_store(path, mode: str = "r", exclusive: bool = True) -> ActivationStore:
    """Open an existing store. ``mode``: "r" (read-only) or "a" (read/write, for resuming).

    Refuses, with :class:`StoreError`, anything that is not an activation store of this
    format version. ``exclusive`` (mode "a"): this process is the store's only writer, so it
    removes temporaries a killed writer left and folds per-range progress records into
    ``rows_done`` (:meth:`ActivationStore.finalize_ranges`). Parallel writers (distributed
    extraction ranks other than 0) open with ``exclusive=False``, which touches nothing.
    """
    path = Path(path)
    if mode not in ("r", "a", "r+"):
        raise StoreError(f"mode must be 'r' or 'a', not {mode!r}")
    mode = "a" if mode == "r+" else mode
    fmt = _detect_format(path)
    if fmt == "zarr":
        import zarr
        try:
            handle = zarr.open_group(str(path), mode="r" if mode == "r" else "r+")
        except Exception as exc:  # zarr raises several types for a broken directory
            raise StoreError(f"{path}: cannot open as Zarr v3 group: {exc}") from None
        attrs = dict(handle.attrs)
        header = attrs.get("actstore")
        if "rows_done" not in attrs and header is not None:
            raise StoreError(f"{path}: incomplete store (creation was interrupted); "
                             "re-create it with --overwrite", replaceable=True)
        if mode == "a" and exclusive:
            _remove_partials(path)
    else:
        import h5py
        try:
            handle = h5py.File(path, "r" if mode == "r" else "r+")
        except OSError as exc:
            hint = (" (HDF5 allows one writer and no readers at once: close other handles, "
                    "e.g. store.close())" if "already open" in str(exc) or "lock" in str(exc)
                    else "")
            raise StoreError(f"{path}: cannot open HDF5 file: {exc}{hint}") from None
        raw = handle.attrs.get("actstore")
        header = json.loads(raw) if raw is not None else None
        if header is not None and "rows_done" not in handle:
            handle.close()
            raise StoreError(f"{path}: incomplete store (creation was interrupted); "
                             "re-create it with --overwrite", replaceable=True)
    _check_header(path, header, handle if fmt == "hdf5" else None)
    store = ActivationStore(path, fmt, header, handle, mode)
    if mode == "a" and exclusive and fmt == "zarr" and (path / PROGRESS_GROUP).exists():
        store.finalize_ranges()
    return store


def _check_header(path, header, h5handle=None):
    def fail(msg, replaceable=False):
        if h5handle is not None:
            h5handle.close()
        raise StoreError(msg, replaceable=replaceable)
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        fail(f"{path}: not an activation store (no '{FORMAT_NAME}' header)")
    v = header.get("format_version")
    if v != FORMAT_VERSION:
        fail(f"{path}: store format version {v} is not supported (this actstore reads "
             f"version {FORMAT_VERSION}); re-extract it with this version",
             replaceable=True)


def _remove_partials(path: Path) -> None:
    """Drop temporary files a killed writer left behind (zarr writes via tmp + rename)."""
    for p in path.rglob("*.partial"):
        try:
            p.unlink()
        except OSError:
            pass
