"""The checks :func:`~actstore.store.reader.open_store` runs on every open (cheap: metadata and a
stat per file): the header, each array's metadata and ``rows_done`` agree, every shard and
checksum file below ``rows_done`` exists with its expected size (every site array), every
entity column, code array and (ragged stores) token array is complete. Each finding is a
:class:`Problem` that names the file, the array, layers and rows, and says whether
re-extracting those rows (``actstore extract ... --repair``) repairs it.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from actstore.errors import StoreError
from actstore.store.format import (
    CATEGORIES_GROUP,
    CODES_GROUP,
    INTEGRITY_GROUP,
    TOKENS_GROUP,
    storage_dtype,
)
from actstore.store.layout import (
    block_rows,
    blocks_of,
    checksum_key,
    n_blocks,
    our_layout,
    shard_key,
)
from actstore.store.progress import merge_intervals

__all__ = ["Problem", "REPAIR", "RECREATE", "structure_problems", "settle", "summary", "span",
           "problem_error", "first_line"]

REPAIR = "actstore extract ... --repair"
RECREATE = "re-create the store (actstore extract ... --overwrite)"


def span(a: int, b: int) -> str:
    """'5' or '5-9' for the closed range a..b."""
    return str(a) if a == b else f"{a}-{b}"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a store.

    Attributes
    ----------
    file : str
        The file (for HDF5: the store file and the dataset).
    message : str
        What is wrong, in words.
    array : str or None
        A site ("resid", "attn_out", "mlp_out", "neurons"), "layer", "entities",
        "entity_codes", "tokens", "integrity", "rows_done" or None (the store as a whole).
    layers : (int, int) or None
        First and last hidden-state index concerned.
    rows : (int, int) or None
        Rows ``[start, stop)`` concerned.
    repairable : bool
        Re-extracting ``rows`` (``actstore extract ... --repair``) repairs it: a row block's
        data or checksum in a store whose header and entity table are intact.
    """

    file: str
    message: str
    array: str | None = None
    layers: tuple[int, int] | None = None
    rows: tuple[int, int] | None = None
    repairable: bool = False

    def line(self) -> str:
        """The one-line report: file, what, where, and the way to repair it."""
        where = [self.array] if self.array else []
        if self.layers is not None:
            a, b = self.layers
            where.append(f"layer{'s' if a != b else ''} {span(a, b)}")
        if self.rows is not None:
            where.append(f"rows {span(self.rows[0], self.rows[1] - 1)}")
        text = f"{self.file}: {self.message}" + (f" [{', '.join(where)}]" if where else "")
        if self.repairable and self.rows is not None:
            return f"{text}; re-extract rows {span(self.rows[0], self.rows[1] - 1)}: {REPAIR}"
        return f"{text}; not repairable by --repair: {RECREATE}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers) if self.layers else None
        d["rows"] = list(self.rows) if self.rows else None
        return d


def problem_error(p: Problem) -> StoreError:
    """The StoreError of one problem (its one line); ``.problem`` keeps the problem, for
    :func:`actstore.store.integrity.check_store`, which lists them instead of stopping."""
    err = StoreError(p.line(), replaceable=True)
    err.problem = p
    return err


def first_line(exc: BaseException, width: int = 120) -> str:
    """``Type: first line of the message`` (shortened): a foreign error inside a one-line one."""
    text = (str(exc).splitlines() or [""])[0][:width]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def settle(problems: list[Problem]) -> list[Problem]:
    """Re-extracting rows repairs a store only when everything else is intact (header, entity
    table, arrays' metadata, rows_done): if any problem is not a row block's, none is
    repairable."""
    if all(p.repairable for p in problems):
        return list(problems)
    return [replace(p, repairable=False) for p in problems]


def summary(problems: list[Problem], path) -> str:
    """One line for an error: the first problem, and how many more ``actstore verify`` lists."""
    more = len(problems) - 1
    return problems[0].line() + (f" (and {more} more problem{'s' if more > 1 else ''}: "
                                 f"actstore verify {path})" if more > 0 else "")


def _file(store, key: str) -> str:
    return str(store.path / key) if store.format == "zarr" else f"{store.path} (dataset {key})"


def _all_layers(store) -> tuple[int, int]:
    return (store.layers[0], store.layers[-1])


def structure_problems(store) -> list[Problem]:
    """Everything :func:`open_store` checks, in order: progress, arrays, entity table, files.
    Row-block problems are repairable only when the rest is intact (:func:`settle`)."""
    probs = _progress_problems(store)
    arrays, found = _array_problems(store)
    probs += found
    probs += _entity_problems(store)
    if not any(p.array == "rows_done" for p in probs) and store.format == "zarr":
        probs += _file_problems(store, arrays)
    return settle(probs)


def _progress_problems(store) -> list[Problem]:
    n = store.n_rows
    if store.format == "zarr":
        attrs, key = dict(store._h.attrs), "zarr.json"
        done, ranges = attrs.get("rows_done"), attrs.get("ranges_done", [])
    else:
        key = "rows_done"
        try:
            ds = store._h["rows_done"]
            done = int(ds[0]) if ds.shape == (1,) and ds.dtype.kind in "iu" else None
        except Exception:  # noqa: BLE001 - any damage: reported below
            done = None
        ranges = []
    if isinstance(done, (int, np.integer)) and not isinstance(done, bool) and 0 <= done <= n:
        ok = isinstance(ranges, list) and all(
            isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) for x in r)
            and int(done) <= r[0] < r[1] <= n for r in ranges)
        if ok:
            return []
        msg = f"ranges_done {ranges!r} is not a list of row ranges inside [{done}, {n}]"
    else:
        msg = f"rows_done={done!r} is not a row count in [0, {n}] (n_rows)"
    return [Problem(_file(store, key), msg, array="rows_done")]


def _meta_mismatch(arr, want_shape, want_dtype, want_chunks, want_shards) -> str | None:
    got = [("shape", tuple(arr.shape), want_shape), ("dtype", np.dtype(arr.dtype), want_dtype)]
    if want_chunks is not None:
        got.append(("chunks", tuple(arr.chunks or ()), want_chunks))
    if want_shards is not None:
        got.append(("shards", tuple(getattr(arr, "shards", None) or ()), want_shards))
    for what, have, want in got:
        if have != want:
            return f"{what} {have} does not match the header's {want}"
    return None


def _array_problems(store) -> tuple[dict, list[Problem]]:
    """The activation arrays and ``layer``: present, shaped, typed and chunked as the header
    says. Returns the arrays that passed (name -> array) and the problems."""
    L, N, R = store.n_layers, store.n_rows, store.rows_per_chunk
    zarr = store.format == "zarr"
    npdt = storage_dtype(store.dtype)
    widths = store.d_sites
    ok, probs = {}, []
    for name in store.arrays + ("layer",):
        key = f"{name}/zarr.json" if zarr else name
        try:
            arr = store._h[name]
            if name == "layer":
                bad = _meta_mismatch(arr, (L,), np.dtype("int32"), (L,) if zarr else None, None)
                if bad is None and not np.array_equal(np.asarray(arr[:]), store.layers):
                    bad = f"holds layers {np.asarray(arr[:]).tolist()}, the header {store.layers}"
            else:
                d = widths[name]
                bad = _meta_mismatch(arr, (L, N, d), npdt, (1, R, d), (L, R, d) if zarr else None)
        except Exception as exc:  # noqa: BLE001 - missing or unreadable metadata
            bad = f"missing or unreadable ({first_line(exc)})"
        if bad is None:
            ok[name] = arr
        else:
            probs.append(Problem(_file(store, key), f"array metadata: {bad}",
                                 array=name, layers=_all_layers(store)))
    return ok, probs


def _entity_problems(store) -> list[Problem]:
    """Every entity column of the header: present, of n_texts values of its kind, and (Zarr)
    every chunk file there; the same for the code array of every str column and a ragged
    store's tokens (version 2). A store made before checksums may lack the chunk of a bool
    column that is all False (zarr does not store a chunk equal to the fill value)."""
    T = store.n_texts
    kinds = store._header["entity_kinds"]
    has_crcs = store.checksums.present
    v2 = store._header.get("format_version") != 1
    columns = [("entities", c, kinds[c], T) for c in store._header["entity_columns"]]
    if v2:
        columns += [(CODES_GROUP, c, "int32", T) for c in store._header["entity_columns"]
                    if kinds[c] == "str"]
    if store.ragged:
        columns += [(TOKENS_GROUP, "offsets", "int64", T + 1),
                    (TOKENS_GROUP, "ids", "int32", store.n_rows)]
    probs = []
    for table in ("entities", CODES_GROUP, TOKENS_GROUP):
        want = {c for g, c, _, _ in columns if g == table}
        if not has_crcs or (table != "entities" and not want):
            continue
        if set(store.checksums.table(table) or {}) != want:
            key = f"{INTEGRITY_GROUP}/{table}"
            probs.append(Problem(_file(store, key), f"{table} checksums missing, unreadable or "
                                 "not those of the header's columns", array=INTEGRITY_GROUP))
    what = {"entities": "entity column", CODES_GROUP: "entity code array",
            TOKENS_GROUP: "token array"}
    for group, c, kind, n in columns:
        key = f"{group}/{c}"
        try:
            a = store._h[group][c]
            bad = None if tuple(a.shape) == (n,) else f"shape {tuple(a.shape)}, expected ({n},)"
            if bad is None and kind != "str" and np.dtype(a.dtype) != np.dtype(kind):
                bad = f"dtype {a.dtype}, expected {kind}"
            if bad is None and group == CODES_GROUP:
                cats = (store._h[CATEGORIES_GROUP][c] if store.format == "hdf5"
                        else a.attrs.get("categories"))
                if cats is None or (store.format == "zarr" and not isinstance(cats, list)):
                    bad = "code table (attribute 'categories') missing"
        except Exception as exc:  # noqa: BLE001 - missing or unreadable metadata
            a, bad = None, f"missing or unreadable ({type(exc).__name__})"
        if bad is not None:
            probs.append(Problem(_file(store, key + ("/zarr.json" if store.format == "zarr"
                                                      else "")),
                                 f"{what[group]} {c!r}: {bad}", array=group))
            continue
        if store.format != "zarr" or (not has_crcs and kind == "bool"):
            continue
        step = int(a.chunks[0]) if a.chunks else n
        for i in range(n_blocks(n, step)):
            f = store.path / key / "c" / str(i)
            size = f.stat().st_size if f.is_file() else None
            if not size:
                probs.append(Problem(str(f), f"{what[group]} {c!r}: chunk file "
                                     + ("missing" if size is None else "is empty"),
                                     array=group, rows=None if store.ragged
                                     else block_rows(i, step, n)))
    return probs


def _integrity_meta(store, name: str, L: int, nb: int) -> str | None:
    try:
        meta = json.loads((store.path / INTEGRITY_GROUP / name / "zarr.json").read_text())
        ok = (meta["shape"] == [L, nb] and meta["data_type"] == "uint32"
              and meta["chunk_grid"]["configuration"]["chunk_shape"] == [L, 1])
        return None if ok else "shape, dtype or chunks differ from (n_layers, n_blocks) uint32"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"missing or unreadable ({type(exc).__name__})"


def _file_problems(store, arrays: dict) -> list[Problem]:
    """Zarr: a stat of every shard and checksum file of the finished row blocks."""
    L, N, R = store.n_layers, store.n_rows, store.rows_per_chunk
    blocks = blocks_of(merge_intervals([(0, store.rows_done)] + store.ranges_done), R)
    has_crcs = store.checksums.present
    probs = []
    for name in store.arrays:
        if name not in arrays:
            continue     # its metadata is reported already
        layout = our_layout(arrays[name])
        want = layout.shard_nbytes if layout is not None else None
        crc_meta = _integrity_meta(store, name, L, n_blocks(N, R)) if has_crcs else None
        if crc_meta is not None:
            probs.append(Problem(str(store.path / INTEGRITY_GROUP / name / "zarr.json"),
                                 f"checksum array metadata: {crc_meta}", array=INTEGRITY_GROUP))
        for b in blocks:
            rows = block_rows(b, R, N)
            for key, expect, what in ((shard_key(name, b), want, "shard"),
                                      (checksum_key(name, b), 4 * L, "checksum")):
                if what == "checksum" and (not has_crcs or crc_meta is not None):
                    continue
                msg = _size_problem(store.path / key, expect, 16 * L + 4, what)
                if msg:
                    probs.append(Problem(str(store.path / key), msg, array=name,
                                         layers=_all_layers(store), rows=rows,
                                         repairable=True))
    return probs


def _size_problem(f: Path, expect: int | None, least: int, what: str) -> str | None:
    try:
        size = os.stat(f).st_size
    except FileNotFoundError:
        return f"{what} file missing (below rows_done)"
    except OSError as exc:
        return f"{what} file unreadable ({exc.strerror})"
    if expect is not None and size != expect:
        return f"{what} file has {size} bytes, expected {expect} (truncated or replaced)"
    if expect is None and size < least:
        return f"{what} file has {size} bytes, less than its index ({least})"
    return None
