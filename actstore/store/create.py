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
from actstore.store.checksums import (
    codes_crc,
    column_crc,
    create_hdf5_integrity,
    create_zarr_integrity,
)
from actstore.store.format import (
    CATEGORIES_GROUP,
    CODES_GROUP,
    COMPRESSIONS,
    DEFAULT_COMPRESSION,
    DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    POSITIONS,
    SITES,
    TARGET_KINDS,
    TOKENS_GROUP,
    ZARR_ENTRIES,
    column_kind,
    column_values,
    default_rows_per_chunk,
    format_from_path,
    site_dim,
    storage_dtype,
)
from actstore.store.layout import store_files
from actstore.store.reader import ActivationStore

__all__ = ["create_store", "remove_store", "entity_codes"]


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


def _check_request(layers, n_rows, dtype, entities, targets, group_columns, n_texts) -> None:
    if not layers:
        raise StoreError("a store needs at least one layer")
    if len(set(layers)) != len(layers):
        raise StoreError(f"duplicate layers in {layers}")
    if dtype not in DTYPES:
        raise StoreError(f"unknown dtype {dtype!r}; choose one of {DTYPES}")
    if int(n_rows) <= 0:
        raise StoreError("a store needs at least one row (the dataset is empty)")
    if len(entities) != n_texts:
        what = (f"n_texts={n_texts} (len(offsets) - 1)" if n_texts != n_rows
                else f"n_rows={n_rows}")
        raise StoreError(f"entity table has {len(entities)} rows, store has {what}")
    missing = [t for t in list(targets) + list(group_columns) if t not in entities.columns]
    if missing:
        raise StoreError(f"entity table lacks column(s) {missing}")


def _sites(sites: dict | None, d_model: int, d_mlp: int | None, layers: list[int]
           ) -> tuple[dict[str, int], int | None]:
    """The site arrays (name -> width, in SITES order) and d_mlp, checked."""
    if sites is None:
        sites = {"resid": int(d_model), **({"neurons": int(d_mlp)} if d_mlp is not None else {})}
    if not isinstance(sites, dict) or not sites:
        raise StoreError(f"sites must be a non-empty dict site -> width, got {sites!r}")
    unknown = [s for s in sites if s not in SITES]
    if unknown:
        raise StoreError(f"unknown site(s) {unknown}; choose from {', '.join(SITES)}")
    out = {s: int(sites[s]) for s in SITES if s in sites}
    if any(d <= 0 for d in out.values()):
        raise StoreError(f"site widths must be positive, got {out}")
    wrong = [s for s, d in out.items() if s != "neurons" and d != int(d_model)]
    if wrong:
        raise StoreError(f"site(s) {wrong} must have width d_model={d_model} (they are added "
                         f"to the residual stream), got {out}")
    if "neurons" in out:
        if d_mlp is not None and int(d_mlp) != out["neurons"]:
            raise StoreError(f"d_mlp={d_mlp} differs from the neurons site's width "
                             f"{out['neurons']}; give one of them")
        d_mlp = out["neurons"]
    elif d_mlp is not None:
        raise StoreError(f"d_mlp={d_mlp} given but sites {list(out)} have no neurons; add "
                         "\"neurons\" to sites or drop d_mlp")
    if 0 in layers and list(out) != ["resid"]:
        others = [s for s in out if s != "resid"]
        raise StoreError(f"layer 0 (the embeddings) has no {', '.join(others)}: drop layer 0 "
                         "from the layers or keep only the resid site")
    return out, d_mlp


def _tokens(tokens, n_rows: int, position: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The ragged index (offsets int64, ids int32), checked; None for one row per text."""
    if position not in POSITIONS:
        raise StoreError(f"unknown position {position!r}; choose one of {', '.join(POSITIONS)}")
    if (tokens is None) != (position != "all"):
        raise StoreError("position 'all' needs tokens=(offsets, ids), and only it takes them "
                         f"(position={position!r}, tokens {'given' if tokens else 'missing'})")
    if tokens is None:
        return None
    try:
        offsets, ids = tokens
    except (TypeError, ValueError):
        raise StoreError("tokens must be a pair (offsets, ids) of arrays") from None
    offsets, ids = np.asarray(offsets), np.asarray(ids)
    if offsets.ndim != 1 or ids.ndim != 1 or offsets.dtype.kind not in "iu" \
            or ids.dtype.kind not in "iu":
        raise StoreError("tokens offsets and ids must be 1-D integer arrays, got "
                         f"{offsets.dtype}{offsets.shape} and {ids.dtype}{ids.shape}")
    if len(ids) != n_rows:
        raise StoreError(f"a ragged store has one row per token: n_rows={n_rows} but "
                         f"{len(ids)} token ids")
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != n_rows:
        raise StoreError(f"token offsets must start at 0 and end at n_rows={n_rows}, got "
                         f"{len(offsets)} offsets"
                         + (f" from {offsets[0]} to {offsets[-1]}" if len(offsets) else ""))
    step = np.diff(offsets)
    if (step < 0).any():
        i = int(np.flatnonzero(step < 0)[0])
        raise StoreError(f"token offsets must be non-decreasing: offsets[{i}]={offsets[i]} > "
                         f"offsets[{i + 1}]={offsets[i + 1]}")
    if ids.min() < np.iinfo(np.int32).min or ids.max() > np.iinfo(np.int32).max:
        raise StoreError("token ids do not fit int32")
    return offsets.astype(np.int64), ids.astype(np.int32)


def _target_kinds(target_kinds: dict | None, targets) -> dict[str, str]:
    if target_kinds is None:
        return {t: "regression" for t in targets}
    if not isinstance(target_kinds, dict) or set(target_kinds) != set(targets):
        raise StoreError(f"target_kinds must name every target exactly once: targets "
                         f"{list(targets)}, target_kinds {target_kinds!r}")
    bad = {t: k for t, k in target_kinds.items() if k not in TARGET_KINDS}
    if bad:
        raise StoreError(f"target kinds must be one of {TARGET_KINDS}, got {bad}")
    return {t: str(target_kinds[t]) for t in targets}


def entity_codes(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """(int32 codes, sorted unique strings) of a str column: ``categories[codes] == values``."""
    cats, codes = np.unique(np.asarray(values, dtype=object).astype(str), return_inverse=True)
    return codes.astype(np.int32).reshape(-1), [str(c) for c in cats]


def create_store(path, *, layers: list[int], n_rows: int, d_model: int, entities,
                 targets: tuple[str, ...], group_columns: tuple[str, ...], meta: dict,
                 format: str | None = None, dtype: str = "float16", d_mlp: int | None = None,
                 rows_per_chunk: int | None = None, compression: str | None = None,
                 overwrite: bool = False, sites: dict[str, int] | None = None,
                 position: str = "last-entity", target_kinds: dict[str, str] | None = None,
                 tokens: tuple[np.ndarray, np.ndarray] | None = None) -> ActivationStore:
    """Create an empty store (``rows_done = 0``, format version 2) and return it open for
    writing.

    Parameters
    ----------
    path : str or Path
        A directory (Zarr v3) or a .h5 / .hdf5 file (HDF5).
    layers : list of int
        Hidden-state indices the store will hold (0 = embeddings, l = output of block l).
    n_rows, d_model : int
        Rows of the activation arrays (tokens when ``position`` is "all") and model width.
    entities : pandas.DataFrame
        The entity table (one row per text: ``n_rows`` rows, or ``len(offsets) - 1`` for a
        ragged store), containing ``targets`` and ``group_columns``.
    targets, group_columns : tuple of str
    meta : dict
        How the store is made (JSON-serialisable).
    format : {"zarr", "hdf5"}, optional
        Default: zarr, or hdf5 for a .h5 / .hdf5 path.
    dtype : {"float16", "bfloat16", "float32"}
    d_mlp : int, optional
        MLP width when the store holds neurons (or give ``sites["neurons"]``).
    rows_per_chunk : int, optional
        Default: :func:`~actstore.store.format.default_rows_per_chunk` of d_model.
    compression : {"none", "zstd", "blosc"}, optional
    overwrite : bool
        Replace an existing store at ``path`` (only a store or an empty directory).
    sites : dict of str to int, optional
        The activation arrays and their widths, from ``SITES`` ("resid", "attn_out",
        "mlp_out": d_model; "neurons": d_mlp). Default: resid (+ neurons when ``d_mlp``).
    position : {"last-entity", "last", "mean", "first-entity", "all"}
        Recorded in the header; "all" (one row per token) needs ``tokens``.
    target_kinds : dict of str to str, optional
        "regression" or "class" per target. Default: every target "regression".
    tokens : (offsets, ids), optional
        Position "all" only: int64 offsets (n_texts + 1; text i has rows
        ``offsets[i]:offsets[i+1]``, from 0 to n_rows, non-decreasing) and the token id of
        every row (n_rows).

    Returns
    -------
    ActivationStore
        Open for writing.

    Raises
    ------
    StoreError
        A request that is inconsistent (the message names the argument), or a path that
        exists (without ``overwrite``) or cannot be written.
    """
    path = Path(path)
    fmt = format_from_path(path, format)
    layers = [int(x) for x in layers]
    n_rows = int(n_rows)
    tok = _tokens(tokens, n_rows, position)
    n_texts = n_rows if tok is None else len(tok[0]) - 1
    _check_request(layers, n_rows, dtype, entities, targets, group_columns, n_texts)
    arrays, d_mlp = _sites(sites, d_model, d_mlp, layers)
    kinds_t = _target_kinds(target_kinds, targets)
    try:
        meta_json = json.loads(json.dumps(meta))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"store metadata must be JSON-serialisable: {exc}") from None
    R = int(rows_per_chunk or default_rows_per_chunk(d_model))
    if R <= 0:
        raise StoreError("rows_per_chunk must be positive")
    R = min(R, n_rows)
    comp = DEFAULT_COMPRESSION if compression is None else compression
    if fmt == "hdf5" and compression is None:
        comp = "none"
    _compressors(comp, fmt)  # validate early

    _clear_path(path, overwrite)
    content = _content(entities, {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "n_rows": n_rows,
        "d_model": int(d_model),
        "d_mlp": None if d_mlp is None else int(d_mlp),
        "layers": layers,
        "dtype": dtype,
        "rows_per_chunk": R,
        "compression": comp,
        "targets": list(targets),
        "group_columns": list(group_columns),
        # entity_columns, entity_kinds: from the table (_content)
        "meta": meta_json,
        "position": position,
        "sites": list(arrays),
        "d_sites": dict(arrays),
        "n_texts": int(n_texts),
        "target_kinds": kinds_t,
        "ragged": tok is not None,
    }, arrays, tok)
    header = content.header
    L = len(layers)
    npdt = storage_dtype(dtype)
    if fmt == "hdf5":
        _check_room(path, sum(L * n_rows * d * npdt.itemsize for d in arrays.values()))
    try:
        if fmt == "zarr":
            handle = _create_zarr(path, content, L, n_rows, R, npdt, comp)
            _sync_tree(path)
        else:
            handle = _create_hdf5(path, content, L, n_rows, R, npdt)
    except (OSError, RuntimeError) as exc:   # h5py raises RuntimeError for a failed flush
        _delete(path)  # the half-created store this call just made
        # h5py's messages span lines: the errno's text, else the first line
        reason = (os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno
                  else first_line(exc))
        raise StoreError(f"cannot create store {path}: {reason}") from None
    return ActivationStore(path, fmt, header, handle, "a")


class _Content:
    """What a new store holds besides its (empty) activation arrays."""

    def __init__(self, header, arrays, values, codes, tokens, tables):
        self.header, self.arrays, self.values = header, arrays, values
        self.codes, self.tokens, self.tables = codes, tokens, tables


def _content(entities, fields: dict, arrays: dict, tok) -> _Content:
    """The header (``fields`` + the entity table's columns and kinds, in the header's key
    order), the stored column values, code arrays, token index and their checksums."""
    ent = entities.reset_index(drop=True)
    columns = [str(c) for c in ent.columns]
    kinds = {c: column_kind(ent[c]) for c in columns}
    header = {}
    for k, v in fields.items():
        header[k] = v
        if k == "group_columns":
            header["entity_columns"], header["entity_kinds"] = columns, kinds
    values = {c: column_values(ent[c], kinds[c]) for c in columns}
    codes = {c: entity_codes(values[c]) for c in columns if kinds[c] == "str"}
    tables = {
        "entities": {c: column_crc(values[c], kinds[c]) for c in columns},
        CODES_GROUP: {c: codes_crc(*codes[c]) for c in codes},
        TOKENS_GROUP: ({} if tok is None else {"offsets": column_crc(tok[0], "int64"),
                                               "ids": column_crc(tok[1], "int32")}),
    }
    return _Content(header, arrays, values, codes, tok, tables)


def _clear_path(path: Path, overwrite: bool) -> None:
    """Make room for a new store at ``path`` (removing a store there only with ``overwrite``)."""
    if path.exists():
        if not overwrite:
            raise StoreError(f"{path} already exists (use overwrite / --overwrite to replace it)")
        remove_store(path)
    if not path.parent.exists():
        raise StoreError(f"cannot create {path}: directory {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise StoreError(f"cannot create {path}: directory {path.parent} is not writable")


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


def _create_zarr(path, content: _Content, L, N, R, npdt, comp):
    import zarr
    header = content.header
    # the header first (an interrupted creation is recognisable as a store), rows_done last
    g = zarr.open_group(str(path), mode="w-", zarr_format=3, attributes={"actstore": header})
    for name, d in content.arrays.items():
        # chunk (1, R, d): one layer's rows read contiguously; shard (L, R, d): one row block
        # of every layer is one file, written whole (no read-modify-write of shards).
        g.create_array(name, shape=(L, N, d), dtype=npdt, chunks=(1, R, d), shards=(L, R, d),
                       compressors=_compressors(comp, "zarr"), fill_value=0,
                       dimension_names=["layer", "row", site_dim(name)])
    la = g.create_array("layer", shape=(L,), dtype="int32", chunks=(L,), compressors=None,
                        dimension_names=["layer"])
    la[:] = np.asarray(header["layers"], dtype=np.int32)
    # a ragged store's entity table has one row per text, not per (token) row
    text_dim = "text" if header["ragged"] else "row"

    def column(group, name, values, dtype, dim, attributes=None):
        a = group.create_array(name, shape=(len(values),), dtype=dtype,
                               chunks=(max(1, len(values)),), dimension_names=[dim],
                               attributes=attributes)
        # every chunk is stored, also one equal to the fill value: a missing one is damage
        a.with_config({"write_empty_chunks": True})[:] = values

    eg = g.create_group("entities")
    kinds = header["entity_kinds"]
    for c in header["entity_columns"]:
        k = kinds[c]
        column(eg, c, content.values[c], str if k == "str" else k, text_dim)
    cg = g.create_group(CODES_GROUP)
    for c, (codes, cats) in content.codes.items():
        column(cg, c, codes, "int32", text_dim, {"categories": cats})
    if content.tokens is not None:
        tg = g.create_group(TOKENS_GROUP)
        offsets, ids = content.tokens
        column(tg, "offsets", offsets, "int64", "text_edge")
        column(tg, "ids", ids, "int32", "row")
    create_zarr_integrity(g, content.arrays, L, N, R, content.tables)
    # rows_done last: a store without it was never fully created
    g.attrs.update({"rows_done": 0})
    return g


def _create_hdf5(path, content: _Content, L, N, R, npdt):
    import h5py
    header = content.header
    # no chunk cache: a failed write (full disk) fails at once and leaves no dirty chunk that
    # HDF5 would retry at close and at exit (where it crashed the process)
    f = h5py.File(path, "w-", rdcc_nbytes=0)
    text = h5py.string_dtype("utf-8")
    try:
        # the header first (an interrupted creation is recognisable), rows_done last
        f.attrs["actstore"] = json.dumps(header)
        for name, d in content.arrays.items():
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            f.create_dataset(name, shape=(L, N, d), dtype=npdt, chunks=(1, R, d), dcpl=dcpl,
                             fill_time="never", track_times=False)
        f.create_dataset("layer", data=np.asarray(header["layers"], dtype=np.int32))
        eg = f.create_group("entities")
        kinds = header["entity_kinds"]
        for c in header["entity_columns"]:
            vals = content.values[c]
            if kinds[c] == "str":
                eg.create_dataset(c, data=vals.astype(object), dtype=text)
            else:
                eg.create_dataset(c, data=vals)
        if content.codes:
            cg, kg = f.create_group(CODES_GROUP), f.create_group(CATEGORIES_GROUP)
            for c, (codes, cats) in content.codes.items():
                cg.create_dataset(c, data=codes)
                kg.create_dataset(c, data=np.array(cats, dtype=object), dtype=text)
        if content.tokens is not None:
            tg = f.create_group(TOKENS_GROUP)
            tg.create_dataset("offsets", data=content.tokens[0])
            tg.create_dataset("ids", data=content.tokens[1])
        create_hdf5_integrity(f, content.arrays, L, N, R, content.tables)
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
