"""Reading a store: :class:`ActivationStore` and :func:`open_store` (``actstore.open``).

A store holds, for one model + dataset, the activations at one token position of every text
(or at every token: a ragged store) after each layer in ``layers`` (hidden-state indices: 0 =
embeddings, l = output of block l, before the final norm), one array per site (resid,
attn_out, mlp_out, neurons), the entity table and the metadata. Every layer argument of the API
is such an index; positions in the arrays stay internal. Zarr v3 (a directory) and HDF5 (one
file) behave alike; docs/store-format.md is the spec (versions 1 and 2 open).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from actstore.errors import StoreError
from actstore.io import PARTIAL_SUFFIX
from actstore.store.checks import (
    Problem,
    first_line,
    problem_error,
    structure_problems,
    summary,
)
from actstore.store.checksums import Checksums, codes_crc, column_crc
from actstore.store.chunks import BlockReader
from actstore.store.format import (
    CATEGORIES_GROUP,
    CODES_GROUP,
    PROGRESS_GROUP,
    SITES,
    TOKENS_GROUP,
    as_torch,
    check_header,
    detect_format,
    filled_header,
    table_from_columns,
)
from actstore.store.progress import Progress
from actstore.store.shard_files import BlockWriter
from actstore.store.views import iter_batches as _iter_batches
from actstore.store.views import to_xarray as _to_xarray

__all__ = ["ActivationStore", "open_store", "NO_VERIFY_ENV", "FSYNC_ENV"]

# Set to 1 to skip content verification on read by default (open_store(verify=None)).
NO_VERIFY_ENV = "ACTSTORE_NO_VERIFY"
# Set to 0 to write without fsync (scratch stores on a file system where fsync is slow): a power
# loss may then lose recorded blocks, which `actstore verify` finds. bench/RESULTS.md "Store
# integrity" has the cost.
FSYNC_ENV = "ACTSTORE_FSYNC"


def _site(site: str, array: str | None) -> str:
    """``site``, or ``array`` (its old name) when a caller gives that."""
    if array is None:
        return site
    if site not in ("resid", array):
        raise StoreError(f"site={site!r} and array={array!r} disagree; give site only")
    return array


def _ranges(xs: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    out, run = [], []
    for x in xs:
        if run and x == run[-1] + 1:
            run.append(x)
        else:
            if run:
                out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = [x]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out)


class ActivationStore(Progress, BlockWriter):
    """An open store. Use :func:`open_store` (``actstore.open``) or
    :func:`~actstore.store.create.create_store` to get one.

    Attributes
    ----------
    path, format : Path, {"zarr", "hdf5"}
    layers : list of int
        The hidden-state indices held (0 = embeddings, l = output of block l).
    n_layers, n_rows, d_model : int
        ``n_rows``: rows of the activation arrays (tokens in a ragged store).
    d_mlp : int or None
        MLP width when the store holds neurons.
    position : {"last-entity", "last", "mean", "first-entity", "all"}
        Which token(s) of each text a row holds ("all": every token, a ragged store).
    sites : tuple of str
        The activation arrays held, in ``SITES`` order ("resid", "attn_out", "mlp_out",
        "neurons").
    d_sites : dict of str to int
        The width of each site array.
    n_texts : int
        Rows of the entity table (``n_rows`` unless ``ragged``).
    target_kinds : dict of str to str
        "regression" or "class" per target (version-1 stores: all "regression").
    ragged : bool
        Rows are tokens (position "all"): ``text_offsets`` and ``token_ids`` map them to texts.
    dtype : {"float16", "bfloat16", "float32"}
    meta : dict
        How the store was made (model, prompt, dataset, ...).
    rows_done : int
        Rows ``[0, rows_done)`` are complete; reads never go past it.
    verify : bool
        Reads compare every row block they return with its checksum (StoreError naming the
        file on a mismatch); a store made before checksums reads unverified.
    durable : bool
        Writes flush each row block, its checksums and the progress record to the disk
        (fsync) before ``rows_done`` advances (default; ``ACTSTORE_FSYNC=0`` turns it off).
    targets, group_columns, rows_per_chunk, compression

    Examples
    --------
    >>> s = actstore.open("w.zarr")         # doctest: +SKIP
    >>> s.layers                             # doctest: +SKIP
    [1, 2, ..., 30]
    >>> X = s.layer(12)                      # hidden state 12 = output of block 12
    """

    def __init__(self, path: Path, fmt: str, header: dict, handle, mode: str,
                 verify: bool = True):
        self.path = Path(path)
        self.format = fmt
        self._h = handle
        self.mode = mode
        self._header = header
        full = filled_header(header)     # version 1: the version-2 fields' defaults
        self.position = str(full["position"])
        self.sites = tuple(full["sites"])
        self.d_sites = {str(k): int(v) for k, v in full["d_sites"].items()}
        self.n_texts = int(full["n_texts"])
        self.target_kinds = dict(full["target_kinds"])
        self.ragged = bool(full["ragged"])
        self._tokens: dict = {}
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
        self._readers: dict = {}
        self._checksums: Checksums | None = None
        self.verify = bool(verify)
        self.durable = os.environ.get(FSYNC_ENV, "1").strip() != "0"

    # -- header
    @property
    def header(self) -> dict:
        """Everything recorded at creation (format, shapes, layers, dtype, meta...)."""
        return dict(self._header)

    @property
    def arrays(self) -> tuple[str, ...]:
        """The site arrays held (the name before sites existed; same as ``sites``)."""
        return self.sites

    def __len__(self) -> int:
        return self.n_rows

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.path)!r}, format={self.format}, "
                f"layers={self.n_layers}, rows={self.rows_done}/{self.n_rows}, "
                f"d_model={self.d_model}, dtype={self.dtype}"
                + (f", d_mlp={self.d_mlp}" if self.d_mlp else "")
                + (f", sites={','.join(self.sites)}" if self.sites != ("resid",) else "")
                + (f", position={self.position}" if self.position != "last-entity" else "")
                + (f", texts={self.n_texts}" if self.ragged else "") + ")")

    # -- entity table
    @property
    def entity_kinds(self) -> dict[str, str]:
        """Each entity column's kind: "str", "float64", "int64" or "bool" (header order)."""
        return dict(self._header["entity_kinds"])

    @property
    def entities(self):
        """The entity table, same columns (and order) as ``EntityDataset.table``."""
        if self._entities is None:
            cols = self._header["entity_columns"]
            kinds = self._header["entity_kinds"]
            crcs = self.checksums.entities() if self.verify else None
            self._entities = table_from_columns(
                cols, kinds, lambda c: self._entity_column(c, kinds[c], crcs))
        return self._entities.copy()

    def _entity_column(self, c: str, kind: str, crcs: dict | None,
                       group: str = "entities") -> np.ndarray:
        """One stored column of ``group`` (entities, entity_codes, tokens), checked against its
        crc32c when there is one (a code array: with its code table)."""
        key = f"{group}/{c}"     # Zarr: one chunk of all values, c/0
        file = (str(self.path / key / "c" / "0") if self.format == "zarr"
                else f"{self.path} (dataset {key})")
        what = {"entities": "entity column", CODES_GROUP: "entity code array",
                TOKENS_GROUP: "token array"}[group]
        try:
            ds = self._h[group][c]
            v = ds.asstr()[:] if self.format == "hdf5" and kind == "str" else ds[:]
            if group == CODES_GROUP:
                cats = (list(self._h[CATEGORIES_GROUP][c].asstr()[:]) if self.format == "hdf5"
                        else list(ds.attrs["categories"]))
        except Exception as exc:  # noqa: BLE001 - a missing or damaged chunk: name the file
            raise problem_error(Problem(file, f"{what} {c!r} cannot be read "
                                        f"({first_line(exc)})", group)) from None
        got = (None if not crcs or c not in crcs else
               codes_crc(v, cats) if group == CODES_GROUP else column_crc(v, kind))
        if got is not None and got != crcs[c]:
            raise problem_error(Problem(file, f"{what} {c!r}: checksum mismatch (the "
                                        "column is not what was written)", group))
        return (v, cats) if group == CODES_GROUP else v

    def entity_codes(self, column: str) -> tuple[np.ndarray, list[str]]:
        """The numeric view of a str entity column: (int32 codes, code table), with
        ``table[codes]`` equal to the column (what readers without zarr's string type, such
        as tensorstore, read from ``entity_codes/<column>``).

        Parameters
        ----------
        column : str
            A str column of the entity table.

        Returns
        -------
        codes : (n_texts,) int32 array
        categories : list of str
            The sorted unique strings.

        Raises
        ------
        StoreError
            The column is not a str column, or the store predates code arrays (version 1).
        """
        kinds = self._header["entity_kinds"]
        if kinds.get(column) != "str":
            strs = [c for c, k in kinds.items() if k == "str"]
            raise StoreError(f"{self.path}: {column!r} is not a str entity column; code arrays "
                             f"exist for {strs}")
        if column not in (self._h[CODES_GROUP] if CODES_GROUP in self._h else ()):
            raise StoreError(f"{self.path}: no code array for {column!r} (a store of format "
                             "version 1); read store.entities instead")
        crcs = self.checksums.table(CODES_GROUP) if self.verify else None
        codes, cats = self._entity_column(column, "int32", crcs, CODES_GROUP)
        return np.asarray(codes, dtype=np.int32), [str(x) for x in cats]

    # -- ragged stores: rows are tokens
    def _token_array(self, name: str) -> np.ndarray | None:
        if not self.ragged:
            return None
        if name not in self._tokens:
            crcs = self.checksums.table(TOKENS_GROUP) if self.verify else None
            kind = "int64" if name == "offsets" else "int32"
            v = np.asarray(self._entity_column(name, kind, crcs, TOKENS_GROUP), dtype=kind)
            if name == "offsets" and (len(v) != self.n_texts + 1 or v[0] != 0
                                      or v[-1] != self.n_rows or (v[1:] < v[:-1]).any()):
                # cheap, and a store without checksums may hold anything
                raise problem_error(Problem(
                    str(self.path / TOKENS_GROUP / "offsets") if self.format == "zarr"
                    else f"{self.path} (dataset {TOKENS_GROUP}/offsets)",
                    f"token offsets are not {self.n_texts + 1} non-decreasing values from 0 to "
                    f"n_rows={self.n_rows}", TOKENS_GROUP))
            self._tokens[name] = v
        return self._tokens[name]

    @property
    def text_offsets(self) -> np.ndarray | None:
        """Ragged stores: (n_texts + 1,) int64, the rows of text i are
        ``text_offsets[i]:text_offsets[i + 1]``; None otherwise."""
        return self._token_array("offsets")

    @property
    def token_ids(self) -> np.ndarray | None:
        """Ragged stores: (n_rows,) int32, the token id of each row; None otherwise."""
        return self._token_array("ids")

    def target_array(self, names=None) -> np.ndarray:
        """(n_texts, k) float64 targets, columns in ``names`` order (default: ``targets``)."""
        if names is None:
            names = self.targets
        names = (names,) if isinstance(names, str) else tuple(names)
        ent = self.entities
        missing = [n for n in names if n not in ent.columns]
        if missing:
            raise StoreError(f"{self.path}: no target column(s) {missing}; have "
                             f"{list(self.targets)}")
        return ent[list(names)].to_numpy(dtype=np.float64)

    @property
    def is_test(self) -> np.ndarray:
        ent = self.entities
        if "is_test" not in ent.columns:
            return np.zeros(self.n_texts, dtype=bool)
        return ent["is_test"].to_numpy(dtype=bool)

    # -- layers: hidden-state indices for users, positions inside
    def _position(self, layer) -> int:
        """The position in ``layers`` of hidden-state index ``layer`` (negative: counted from
        the last stored layer, as Python indexes a list); StoreError listing the held layers."""
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise StoreError(f"a layer is a hidden-state index (an int), got {layer!r}")
        layer = int(layer)
        if layer < 0 and -self.n_layers <= layer:
            return self.n_layers + layer
        try:
            return self.layers.index(layer)
        except ValueError:
            raise StoreError(
                f"{self.path}: layer {layer} is not in this store; it holds hidden-state "
                f"layers {_ranges(self.layers)} (0 = embeddings, l = output of block l)") from None

    def _positions(self, layers) -> list[int]:
        if layers is None:
            return list(range(self.n_layers))
        if isinstance(layers, (int, np.integer)):
            layers = [layers]
        return [self._position(x) for x in layers]

    # -- reading
    @property
    def checksums(self) -> Checksums:
        """The store's checksum tables (``checksums.present``: False for a store made before
        checksums)."""
        if self._checksums is None:
            self._checksums = Checksums(self)
        return self._checksums

    def _array(self, site: str):
        if site not in SITES:
            raise StoreError(f"unknown site {site!r}; choose one of {', '.join(SITES)}")
        if site not in self.sites:
            flag = "--neurons" if site == "neurons" else f"--sites {site}"
            what = "neuron" if site == "neurons" else site
            raise StoreError(f"{self.path}: this store has no {what} activations; it holds "
                             f"{', '.join(self.sites)} (extract with {flag})")
        return self._h[site]

    def _reader(self, site: str) -> BlockReader:
        r = self._readers.get(site)
        if r is None:
            r = self._readers[site] = BlockReader(self, site, self._array(site))
        return r

    def _to_out(self, x: np.ndarray, as_: str):
        if as_ == "numpy":
            return x
        if as_ == "torch":
            return as_torch(x, self.dtype)
        raise StoreError(f"as_ must be 'numpy' or 'torch', not {as_!r}")

    def layer(self, layer: int, site: str = "resid", as_: str = "numpy", *,
              array: str | None = None):
        """The completed rows of one layer.

        Parameters
        ----------
        layer : int
            Hidden-state index (0 = embeddings, l = output of block l, as Hugging Face
            ``hidden_states[l]``); it must be one the store holds (see ``layers``).
        site : {"resid", "attn_out", "mlp_out", "neurons"}
            One the store holds (see ``sites``).
        as_ : {"numpy", "torch"}
            numpy returns the stored dtype (bfloat16 as its raw uint16 bits); torch returns
            float16, bfloat16 or float32 tensors.

        Returns
        -------
        (rows_done, d) array

        Raises
        ------
        StoreError
            ``verify`` and a row block that fails its checksum (or a shard that cannot be
            read): the message names the file, the layer and the rows.
        """
        site = _site(site, array)
        p = self._position(layer)
        x = self._reader(site).read([p], 0, self.rows_done, self.verify)[0]
        return self._to_out(x, as_)

    def read(self, rows: slice, layers=None, site: str = "resid", *,
             array: str | None = None) -> np.ndarray:
        """(L, r, d) for a row slice and hidden-state ``layers`` (default all) of ``site``
        (``array=`` is an alias of ``site=``), stored dtype.

        With ``verify`` (the default) every row block the slice touches is read whole and
        checked against its checksum. Only rows ``[0, rows_done)`` are readable (later rows are
        not written yet; in HDF5 they are uninitialised bytes): an open-ended slice stops at
        ``rows_done`` and negative indices count from it; an explicit stop past ``rows_done``
        is an error."""
        return self._read_positions(rows, self._positions(layers), _site(site, array))

    def _read_positions(self, rows: slice, pos: list[int], array: str) -> np.ndarray:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise StoreError("rows must be a contiguous slice, e.g. slice(0, 1024)")
        done = self.rows_done
        if rows.stop is not None and rows.stop > done:
            raise StoreError(f"{self.path}: rows {rows.start or 0}:{rows.stop} go past rows_done="
                             f"{done} (of {self.n_rows}); rows at or after it are not written "
                             "yet (resume the extraction to complete the store)")
        start, stop, _ = rows.indices(done)
        return self._reader(array).read(pos, start, max(start, stop), self.verify)

    def iter_chunks(self, rows: int | None = None, layers=None, site: str = "resid",
                    start: int = 0, stop: int | None = None, *, array: str | None = None
                    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(row_start, block)`` with block (L, r, d) in the stored dtype for the
        hidden-state ``layers`` (default all) of ``site`` (``array=``: an alias).

        ``rows`` is the block height (default: ``rows_per_chunk``; rounded up to a multiple of
        it so reads are chunk-aligned). Iteration covers ``[start, min(stop, rows_done))``.
        Each block is verified as :meth:`read` verifies (``verify``).
        """
        site = _site(site, array)
        self._array(site)                 # an unknown site fails before the first block
        R = self.rows_per_chunk
        step = R if rows is None else max(R, -(-int(rows) // R) * R)
        end = self.rows_done if stop is None else min(int(stop), self.rows_done)
        pos = self._positions(layers)
        s = int(start)
        while s < end:
            # align later blocks to chunk boundaries even if `start` is not
            e = min(end, (s // R) * R + step)
            yield s, self._read_positions(slice(s, e), pos, site)
            s = e

    def close(self) -> None:
        self._readers.clear()     # they hold h5py datasets of the file
        self._writers.clear()
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

    # -- the read API for training loops and the PyData stack (actstore/store/views.py)
    iter_batches = _iter_batches
    to_xarray = _to_xarray


def open_store(path, mode: str = "r", exclusive: bool = True, verify: bool | None = None,
               check: bool = True) -> ActivationStore:
    """Open an existing store (``actstore.open``).

    Parameters
    ----------
    path : str or Path
        A Zarr v3 directory or an HDF5 file made by ``actstore extract``.
    mode : {"r", "a"}
        Read-only, or read/write (for resuming).
    exclusive : bool
        Mode "a": this process is the store's only writer, so it removes temporaries a killed
        writer left and folds per-range progress records into ``rows_done``
        (:meth:`ActivationStore.finalize_ranges`). Parallel writers (distributed extraction
        ranks other than 0) open with ``exclusive=False``, which touches nothing.
    verify : bool, optional
        Compare every row block a read returns with its checksum (whole blocks are read).
        Default: True, unless the environment sets ``ACTSTORE_NO_VERIFY=1``.
    check : bool
        Run the open-time checks (header, arrays' metadata and ``rows_done`` agree; every
        shard and checksum file below ``rows_done`` is there with its size; every entity
        column is complete). Only a repair, after
        :func:`actstore.store.integrity.check_store`, opens a damaged store without them.

    Returns
    -------
    ActivationStore

    Raises
    ------
    StoreError
        For anything that is not an activation store of format version 1 or 2 (the message says
        what it is instead), and for a store that fails the open-time checks (the message
        names the file, the array, layers and rows, and whether ``--repair`` can fix it).

    Examples
    --------
    >>> s = actstore.open("w.zarr")     # doctest: +SKIP
    >>> s.layer(s.layers[-1]).shape     # doctest: +SKIP
    (1024, 576)
    """
    path = Path(path)
    if mode not in ("r", "a", "r+"):
        raise StoreError(f"mode must be 'r' or 'a', not {mode!r}")
    mode = "a" if mode == "r+" else mode
    fmt = detect_format(path)
    if fmt == "zarr":
        handle, header = _open_zarr(path, mode, exclusive)
    else:
        handle, header = _open_hdf5(path, mode)
    check_header(path, header, handle.close if fmt == "hdf5" else None)
    if verify is None:
        verify = os.environ.get(NO_VERIFY_ENV, "") in ("", "0")
    store = ActivationStore(path, fmt, header, handle, mode, verify=verify)
    if check:
        problems = structure_problems(store)
        if problems:
            store.close()
            raise StoreError(summary(problems, path), replaceable=True)
    if mode == "a" and exclusive and fmt == "zarr" and (path / PROGRESS_GROUP).exists():
        store.finalize_ranges()
    return store


def _open_zarr(path: Path, mode: str, exclusive: bool):
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
    return handle, header


def _open_hdf5(path: Path, mode: str):
    import h5py
    try:
        # no chunk cache for writers: a failed write (full disk) then fails at once and leaves
        # no dirty chunk behind, which HDF5 would retry at close and at exit (a crash)
        handle = (h5py.File(path, "r") if mode == "r"
                  else h5py.File(path, "r+", rdcc_nbytes=0))
    except OSError as exc:
        hint = (" (HDF5 allows one writer and no readers at once: close other handles, "
                "e.g. store.close())" if "already open" in str(exc) or "lock" in str(exc)
                else "")
        raise StoreError(f"{path}: cannot open HDF5 file: {exc}{hint}") from None
    raw = handle.attrs.get("actstore")
    try:
        header = json.loads(raw) if raw is not None else None
    except ValueError:
        header = "unreadable"
    if isinstance(header, dict) and "rows_done" not in handle:
        handle.close()
        raise StoreError(f"{path}: incomplete store (creation was interrupted); "
                         "re-create it with --overwrite", replaceable=True)
    return handle, header


def _remove_partials(path: Path) -> None:
    """Drop temporary files a killed writer left behind (zarr writes via tmp + rename)."""
    for p in path.rglob(f"*{PARTIAL_SUFFIX}"):
        try:
            p.unlink()
        except OSError:
            pass
