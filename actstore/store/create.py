"""Creating and removing stores: :func:`create_store` writes the header first, then the arrays,
entity table and checksums, and ``rows_done`` last (an interrupted creation is recognisable);
:func:`remove_store` deletes only the files the store format defines, and refuses a store that
holds anything else (a user's files) or a path that is not a store."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from actstore.errors import StoreError
from actstore.io import fsync_dir, fsync_file
from actstore.store.checks import first_line
from actstore.store.checksums import column_crc, create_hdf5_integrity, create_zarr_integrity
from actstore.store.format import (
    COMPRESSIONS,
    DEFAULT_COMPRESSION,
    DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    ZARR_ENTRIES,
    column_kind,
    column_values,
    default_rows_per_chunk,
    format_from_path,
    storage_dtype,
)
from actstore.store.layout import store_files
from actstore.store.reader import ActivationStore

__all__ = ["create_store", "remove_store"]


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
        return not attrs and entries <= ZARR_ENTRIES
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


def _zarr_header(path: Path) -> dict | None:
    try:
        head = json.loads((path / "zarr.json").read_text())["attributes"]["actstore"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return head if isinstance(head, dict) else None


def _delete_zarr_store(path: Path) -> None:
    """Delete the files and directories the Zarr store format defines, and refuse (deleting
    nothing) if the directory holds anything else."""
    files, dirs, foreign = store_files(path, _zarr_header(path))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more"
                                          if len(foreign) > 5 else "")
        raise StoreError(f"refusing to delete {path}: it holds {len(foreign)} "
                         f"entr{'y' if len(foreign) == 1 else 'ies'} that are not part of an "
                         f"activation store ({shown}); move them out of the store, or choose "
                         "another path")
    for f in files:
        (path / f).unlink(missing_ok=True)
    for d in sorted(dirs, key=lambda d: d.count("/"), reverse=True) + [""]:
        try:
            os.rmdir(path / d)
        except FileNotFoundError:
            pass
        except OSError:
            left = sorted(p.name for p in (path / d).iterdir())
            raise StoreError(f"cannot finish deleting {path}: {path / d} now holds "
                             f"{', '.join(left[:5])}, which appeared while it was deleted; "
                             "move it away and retry") from None


def remove_store(path) -> None:
    """Delete the activation store at ``path`` (any version, complete or not) or an empty
    directory; nothing if ``path`` does not exist. Only the files the store format defines are
    deleted: a store directory that also holds anything else (a user's file, a foreign
    directory, a symbolic link) is refused with the entries named, and anything that is not a
    store raises :class:`StoreError`."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not _is_store_or_empty(path):
        raise StoreError(f"refusing to delete {path}: not an activation store; "
                         "choose another path (or delete it yourself)")
    if path.is_dir():
        _delete_zarr_store(path)
    else:
        path.unlink()


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


def _check_request(layers, n_rows, dtype, entities, targets, group_columns) -> None:
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


def create_store(path, *, layers: list[int], n_rows: int, d_model: int, entities,
                 targets: tuple[str, ...], group_columns: tuple[str, ...], meta: dict,
                 format: str | None = None, dtype: str = "float16", d_mlp: int | None = None,
                 rows_per_chunk: int | None = None, compression: str | None = None,
                 overwrite: bool = False) -> ActivationStore:
    """Create an empty store (``rows_done = 0``) and return it open for writing.

    Parameters
    ----------
    path : str or Path
        A directory (Zarr v3) or a .h5 / .hdf5 file (HDF5).
    layers : list of int
        Hidden-state indices the store will hold (0 = embeddings, l = output of block l).
    n_rows, d_model : int
    entities : pandas.DataFrame
        The entity table (``n_rows`` rows, containing ``targets`` and ``group_columns``).
    targets, group_columns : tuple of str
    meta : dict
        How the store is made (JSON-serialisable).
    format : {"zarr", "hdf5"}, optional
        Default: zarr, or hdf5 for a .h5 / .hdf5 path.
    dtype : {"float16", "bfloat16", "float32"}
    d_mlp : int, optional
        MLP width when the store holds neurons.
    rows_per_chunk : int, optional
        Default: :func:`~actstore.store.format.default_rows_per_chunk`.
    compression : {"none", "zstd", "blosc"}, optional
    overwrite : bool
        Replace an existing store at ``path`` (only a store or an empty directory).

    Returns
    -------
    ActivationStore
        Open for writing.
    """
    path = Path(path)
    fmt = format_from_path(path, format)
    layers = [int(x) for x in layers]
    _check_request(layers, n_rows, dtype, entities, targets, group_columns)
    try:
        meta_json = json.loads(json.dumps(meta))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"store metadata must be JSON-serialisable: {exc}") from None
    R = int(rows_per_chunk or default_rows_per_chunk(d_model))
    if R <= 0:
        raise StoreError("rows_per_chunk must be positive")
    R = min(R, int(n_rows))
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
    kinds = {c: column_kind(ent[c]) for c in columns}
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
    npdt = storage_dtype(dtype)
    arrays = {"resid": int(d_model)}
    if d_mlp is not None:
        arrays["neurons"] = int(d_mlp)
    if fmt == "hdf5":
        _check_room(path, sum(L * int(n_rows) * d * npdt.itemsize for d in arrays.values()))
    values = {c: column_values(ent[c], kinds[c]) for c in columns}
    crcs = {c: column_crc(values[c], kinds[c]) for c in columns}
    try:
        if fmt == "zarr":
            handle = _create_zarr(path, header, arrays, L, int(n_rows), R, npdt, comp, values,
                                  crcs)
            _sync_tree(path)
        else:
            handle = _create_hdf5(path, header, arrays, L, int(n_rows), R, npdt, values, crcs)
    except (OSError, RuntimeError) as exc:   # h5py raises RuntimeError for a failed flush
        _delete(path)  # the half-created store this call just made
        # h5py's messages span lines: the errno's text, else the first line
        reason = (os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno
                  else first_line(exc))
        raise StoreError(f"cannot create store {path}: {reason}") from None
    return ActivationStore(path, fmt, header, handle, "a")


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _check_room(path: Path, nbytes: int) -> None:
    """An HDF5 store allocates all its chunks when it is created: refuse at once when they cannot
    fit (free space, the process's file-size limit). HDF5 cannot recover from a write that fails
    while it creates the file's structure: it crashes the process when it exits (exit 139)."""
    need = int(nbytes * 1.01) + (1 << 20)          # + HDF5 metadata and the entity table
    free = shutil.disk_usage(path.parent).free
    if free < need:
        raise StoreError(f"cannot create store {path}: it needs {_size(need)} and "
                         f"{path.parent} has {_size(free)} free; free some space or write "
                         "elsewhere")
    try:
        import resource
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, OSError, ValueError):
        return
    if limit != resource.RLIM_INFINITY and limit < need:
        raise StoreError(f"cannot create store {path}: it needs {_size(need)}, more than this "
                         f"process's file-size limit ({_size(limit)}, ulimit -f); raise the limit "
                         "or use --format zarr")


def _sync_tree(path: Path) -> None:
    """Flush every file and directory of a new Zarr store to the disk: the header, metadata,
    entity table and checksums are durable before any row block is."""
    for d, _, names in os.walk(path, topdown=False):
        for n in names:
            fsync_file(Path(d) / n)
        fsync_dir(d)
    fsync_dir(path.parent)


def _create_zarr(path, header, arrays, L, N, R, npdt, comp, values, crcs):
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
    kinds = header["entity_kinds"]
    for c in header["entity_columns"]:
        k = kinds[c]
        a = eg.create_array(c, shape=(N,), dtype=(str if k == "str" else k), chunks=(N,),
                            dimension_names=["row"])
        # every chunk is stored, also one equal to the fill value: a missing one is damage
        a.with_config({"write_empty_chunks": True})[:] = values[c]
    create_zarr_integrity(g, arrays, L, N, R, crcs)
    # rows_done last: a store without it was never fully created
    g.attrs.update({"rows_done": 0})
    return g


def _create_hdf5(path, header, arrays, L, N, R, npdt, values, crcs):
    import h5py
    # no chunk cache: a failed write (full disk) fails at once and leaves no dirty chunk that
    # HDF5 would retry at close and at exit (where it crashed the process)
    f = h5py.File(path, "w-", rdcc_nbytes=0)
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
        kinds = header["entity_kinds"]
        for c in header["entity_columns"]:
            vals = values[c]
            if kinds[c] == "str":
                eg.create_dataset(c, data=vals.astype(object), dtype=h5py.string_dtype("utf-8"))
            else:
                eg.create_dataset(c, data=vals)
        create_hdf5_integrity(f, arrays, L, N, R, crcs)
        f.create_dataset("rows_done", data=np.zeros(1, dtype=np.int64))
        f.flush()
        os.fsync(f.id.get_vfd_handle())
    except BaseException:
        _discard_hdf5(f)
        raise
    return f


def _discard_hdf5(f) -> None:
    """Close a half-created HDF5 file (the caller deletes it), also on a full disk: its file
    descriptor is pointed at /dev/null first, so the metadata HDF5 writes at close goes nowhere
    instead of failing. (A failed close leaves the file open inside HDF5, which retries at exit
    and crashes the process: exit 139.)"""
    try:
        null = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(null, f.id.get_vfd_handle())
        finally:
            os.close(null)
    except Exception:  # noqa: BLE001 - best effort: the close below still runs
        pass
    try:
        f.close()
    except Exception:  # noqa: BLE001 - the original error is the one to report
        pass
