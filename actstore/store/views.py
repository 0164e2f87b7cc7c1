"""Views of a store for other projects: :func:`iter_batches` (training-loop batches with bounded
memory) and :func:`to_xarray` (an xarray Dataset, lazy through dask when it is installed).

Both read through the store's verified block reader (:meth:`ActivationStore.read`), one row
block (``rows_per_chunk`` rows, one shard) at a time, so neither holds a whole layer in memory.
They are bound to :class:`~actstore.store.reader.ActivationStore` as ``store.iter_batches`` and
``store.to_xarray``; docs/python-api.md shows them in use.
"""
from __future__ import annotations

import threading
from typing import Iterator

import numpy as np

from actstore.errors import StoreError
from actstore.store.format import as_torch

__all__ = ["iter_batches", "to_xarray", "decode", "target_codes"]

SPLITS = ("train", "test")


# ----------------------------------------------------------------------------- helpers

def decode(block: np.ndarray, dtype: str) -> np.ndarray:
    """A stored numpy block as numbers numpy can compute with: float16/float32 as stored,
    bfloat16 (stored as its raw 16 bits) widened to float32 exactly."""
    if dtype != "bfloat16":
        return block
    return (np.ascontiguousarray(block).astype(np.uint32) << 16).view(np.float32)


def target_codes(values: np.ndarray, kind: str) -> np.ndarray:
    """One entity column as float64 numbers: numeric columns as they are, bool as 0/1, text as
    its index in the sorted distinct values (the code table of ``entity_codes/<column>``)."""
    if kind == "str":
        return np.unique(np.asarray(values).astype(str), return_inverse=True)[1].astype(
            np.float64)
    return np.asarray(values).astype(np.float64)


def _target_matrix(store, targets) -> tuple[list[str], np.ndarray] | tuple[None, None]:
    """(names, (n_texts, k) float64) of ``targets`` ("a,b" or names), or (None, None)."""
    if targets is None:
        return None, None
    names = ([t.strip() for t in targets.split(",") if t.strip()] if isinstance(targets, str)
             else [str(t) for t in targets])
    if not names:
        raise StoreError("targets names no column; pass e.g. targets='latitude' or "
                         f"targets={list(store.targets)}")
    kinds = store.entity_kinds
    missing = [n for n in names if n not in kinds]
    if missing:
        raise StoreError(f"{store.path}: no entity column(s) {missing} for targets; its columns "
                         f"are {list(kinds)} (targets recorded: {list(store.targets)})")
    ent = store.entities
    Y = np.stack([target_codes(ent[n].to_numpy(), kinds[n]) for n in names], axis=1)
    return names, Y


def _text_mask(store, split: str | None) -> np.ndarray | None:
    """(n_texts,) bool: the texts of ``split`` (None: every text)."""
    if split is None:
        return None
    if split not in SPLITS:
        raise StoreError(f"split must be 'train', 'test' or None, not {split!r}")
    ent = store.entities
    is_test = (ent["is_test"].to_numpy(dtype=bool) if "is_test" in ent.columns
               else np.zeros(len(ent), dtype=bool))
    return is_test if split == "test" else ~is_test


def _site(store, site: str) -> int:
    """The width of ``site``; StoreError listing the store's sites when it has no such array."""
    if site not in store.sites:
        raise StoreError(f"{store.path}: no site {site!r} in this store; it holds "
                         f"{list(store.sites)} (extract with --sites to add others)")
    return int(store.d_sites[site])


def _layer_list(store, layers) -> list[int]:
    """Hidden-state indices (None: all; an int: that one; negative: from the last stored
    layer), each checked against the store (StoreError listing the held layers)."""
    if layers is not None and not isinstance(layers, (int, np.integer)) and not list(layers):
        raise StoreError("layers=[] selects no layer; pass None for every layer")
    return [store.layers[p] for p in store._positions(layers)]


def _text_of(store, rows: np.ndarray) -> np.ndarray:
    """The text index of each row: the row itself, or for a ragged store the text whose token
    rows ``offsets[t]:offsets[t + 1]`` contain it."""
    if not store.ragged:
        return rows
    return np.searchsorted(np.asarray(store.text_offsets), rows, side="right") - 1


class _Out:
    """Turns a batch's numpy pieces into the caller's arrays (numpy or torch, dtype, device)."""

    def __init__(self, store, as_: str, device, dtype):
        if as_ not in ("torch", "numpy"):
            raise StoreError(f"as_ must be 'torch' or 'numpy', not {as_!r}")
        self.stored, self.as_, self.device = store.dtype, as_, device
        if as_ == "numpy":
            if device is not None:
                raise StoreError("device is for torch batches (as_='torch'); numpy arrays "
                                 "live on the CPU")
            try:
                self.dtype = None if dtype is None else np.dtype(dtype)
            except TypeError:
                raise StoreError(f"dtype {dtype!r} is not a numpy dtype (as_='numpy' takes "
                                 "e.g. 'float32' or np.float32)") from None
            return
        import torch  # deferred: `import actstore` stays light

        if dtype is not None and not isinstance(dtype, torch.dtype):
            try:             # a name ("float32", "bfloat16") or a numpy dtype
                name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
            except TypeError:
                name = None
            got = getattr(torch, name, None) if isinstance(name, str) else None
            if not isinstance(got, torch.dtype):
                raise StoreError(f"dtype must be a torch dtype or its name, e.g. 'float32', "
                                 f"not {dtype!r}")
            dtype = got
        self.dtype = dtype
        self.device = None if device is None else torch.device(device)

    def x(self, block: np.ndarray):
        if self.as_ == "numpy":
            x = decode(block, self.stored)
            return x if self.dtype is None else x.astype(self.dtype, copy=False)
        t = as_torch(block, self.stored)
        if self.dtype is not None or self.device is not None:
            t = t.to(device=self.device, dtype=self.dtype)
        return t

    def y(self, y: np.ndarray | None):
        if y is None or self.as_ == "numpy":
            return y
        t = as_torch(y, "float64")
        return t if self.device is None else t.to(self.device)

    def index(self, ix: np.ndarray):
        return ix if self.as_ == "numpy" else as_torch(ix, "int64")


# ----------------------------------------------------------------------------- iter_batches

def iter_batches(store, batch_size: int = 1024, *, layers=None, site: str = "resid",
                 targets=None, split: str | None = None, shuffle: bool = False, seed: int = 0,
                 as_: str = "torch", device=None, dtype=None) -> Iterator[dict]:
    """Batches of rows for a training loop, read one row block at a time.

    Memory stays bounded by one row block (``rows_per_chunk`` rows of the chosen layers) plus
    one batch, whatever the store's size: no layer is ever read whole.

    Parameters
    ----------
    store : ActivationStore
        An open store (``store.iter_batches(...)`` passes itself).
    batch_size : int
        Rows per batch; the last batch holds what is left.
    layers : int, list of int or None
        Hidden-state indices (0 = embeddings, l = output of block l; negative: from the last
        stored layer); None = every layer the store holds.
    site : str
        The array to read ("resid", "attn_out", "mlp_out", "neurons"; see ``store.sites``).
    targets : str, list of str or None
        Entity columns returned as ``y`` (float64: numbers as they are, bool as 0/1, text as
        its index in the sorted distinct values); None: no ``y``.
    split : {"train", "test", None}
        Only rows whose text has ``is_test`` False ("train") or True ("test"); None: all.
    shuffle : bool
        Visit the row blocks in a random order and permute the rows inside each block (a
        block-level shuffle: batches mix rows of one or two neighbouring blocks, which is
        what bounded memory allows). Seeded by ``seed``: the same seed gives the same batches.
    seed : int
        Seed of the shuffle.
    as_ : {"torch", "numpy"}
        torch: tensors (``x`` in the stored dtype unless ``dtype``, on ``device``; ``y`` on
        ``device`` too; ``rows`` and ``text`` stay on the CPU). numpy: arrays (bfloat16 is
        decoded to float32, numpy has no bfloat16).
    device : str or torch.device, optional
        Where ``x`` and ``y`` go (torch only), e.g. "cuda".
    dtype : str, torch.dtype or numpy dtype, optional
        The dtype of ``x`` (default: the stored dtype; bfloat16 as float32 for numpy).

    Yields
    ------
    dict
        ``"x"``: (B, L, d) activations (L = number of layers, in ``layers`` order, even for one
        layer); ``"y"``: (B, k) float64 targets or None; ``"rows"``: (B,) int64 row indices in
        the store; for a ragged store (``position == "all"``: rows are tokens) also ``"text"``:
        (B,) int64, the entity-table row (text) of each token.

    Raises
    ------
    StoreError
        An unknown site (the message lists the store's), layer, target column, split, ``as_``
        or dtype: raised by this call, before the first batch; a row block failing its
        checksum while iterating (the message names the file).

    Examples
    --------
    >>> for batch in store.iter_batches(256, layers=12, targets="label", split="train",
    ...                                 shuffle=True, seed=epoch, device="cuda"):  # doctest: +SKIP
    ...     loss = loss_fn(probe(batch["x"][:, 0].float()), batch["y"])
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise StoreError(f"batch_size must be a positive integer, got {batch_size!r}")
    _site(store, site)
    layer_list = _layer_list(store, layers)
    _, Y = _target_matrix(store, targets)
    keep = _text_mask(store, split)
    out = _Out(store, as_, device, dtype)
    return _batches(store, int(batch_size), layer_list, site, Y, keep, bool(shuffle), int(seed),
                    out)


def _blocks(store, shuffle: bool, rng) -> list[tuple[int, int]]:
    """The row blocks ``[start, stop)`` of rows ``[0, rows_done)``, shuffled or in order."""
    R, done = store.rows_per_chunk, store.rows_done
    blocks = [(s, min(done, s + R)) for s in range(0, done, R)]
    if shuffle:
        blocks = [blocks[i] for i in rng.permutation(len(blocks))]
    return blocks


def _batches(store, batch_size: int, layers: list[int], site: str, Y, keep, shuffle: bool,
             seed: int, out: _Out) -> Iterator[dict]:
    rng = np.random.default_rng(seed)
    xs: list[np.ndarray] = []       # the carried rows: (r, L, d) pieces, at most one batch
    rs: list[np.ndarray] = []       # plus the block being cut
    have = 0
    for a, e in _blocks(store, shuffle, rng):
        rows = np.arange(a, e, dtype=np.int64)
        if keep is not None:
            rows = rows[keep[_text_of(store, rows)]]
            if rows.size == 0:
                continue                        # a block with no row of the split: not read
        if shuffle:
            rows = rows[rng.permutation(rows.size)]
        block = store.read(slice(a, e), layers=layers, site=site)     # (L, e - a, d)
        if rows.size != e - a or shuffle:
            block = block[:, rows - a]
        xs.append(np.ascontiguousarray(block.transpose(1, 0, 2)))
        rs.append(rows)
        del block
        have += rows.size
        while have >= batch_size:
            x = xs[0] if len(xs) == 1 else np.concatenate(xs)
            r = rs[0] if len(rs) == 1 else np.concatenate(rs)
            yield _batch(store, x[:batch_size], r[:batch_size], Y, out)
            xs, rs = [x[batch_size:]], [r[batch_size:]]
            have -= batch_size
    if have:
        yield _batch(store, np.concatenate(xs), np.concatenate(rs), Y, out)


def _batch(store, x: np.ndarray, rows: np.ndarray, Y, out: _Out) -> dict:
    text = _text_of(store, rows)
    batch = {"x": out.x(x), "y": out.y(None if Y is None else Y[text]),
             "rows": out.index(rows)}
    if store.ragged:
        batch["text"] = out.index(np.asarray(text, dtype=np.int64))
    return batch


# ----------------------------------------------------------------------------- xarray

class _LazySite:
    """A read-only (layer, row, dim) array over one site for ``dask.array.from_array``: each
    read goes through ``store.read`` (verified), bfloat16 decoded to float32."""

    def __init__(self, store, site: str, d: int):
        self.store, self.site = store, site
        self.shape = (store.n_layers, int(store.rows_done), d)
        self.dtype = np.dtype("float32") if store.dtype == "bfloat16" else np.dtype(store.dtype)
        self.ndim = 3
        # h5py serialises calls itself but one file handle is not meant for threads racing
        # over its lazily built caches; the Zarr reads are plain preads and run in parallel
        self._lock = threading.Lock() if store.format == "hdf5" else None

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (3 - len(key))
        picks, squeeze = [], []
        for axis, k in enumerate(key):
            if isinstance(k, (int, np.integer)):
                k = int(k) + (self.shape[axis] if k < 0 else 0)
                squeeze.append(axis)
                k = slice(k, k + 1)
            if not isinstance(k, slice):
                raise IndexError("a lazy store array takes ints and slices")
            picks.append(range(*k.indices(self.shape[axis])))
        lp, rp, dp = picks
        if not len(lp) or not len(rp) or not len(dp):
            out = np.empty((len(lp), len(rp), len(dp)), dtype=self.dtype)
        else:
            layers = [self.store.layers[p] for p in lp]
            rows = slice(min(rp), max(rp) + 1)
            if self._lock is None:
                block = self.store.read(rows, layers=layers, site=self.site)
            else:
                with self._lock:
                    block = self.store.read(rows, layers=layers, site=self.site)
            if rp.step != 1:
                block = block[:, np.asarray(rp) - rows.start]
            if dp != range(self.shape[2]):
                block = block[:, :, np.asarray(dp)]
            out = decode(block, self.store.dtype)
        return out.squeeze(tuple(squeeze)) if squeeze else out


def _coord_name(col: str, taken: set[str]) -> str:
    """An entity column's coordinate name: itself unless a dimension or the data variable
    already has it (then ``entity_<col>``)."""
    return f"entity_{col}" if col in taken else col


def to_xarray(store, site: str = "resid"):
    """One site of the store as an :class:`xarray.Dataset`.

    Parameters
    ----------
    store : ActivationStore
        An open store (``store.to_xarray(...)`` passes itself); keep it open while the
        Dataset is read.
    site : str
        The array ("resid", "attn_out", "mlp_out", "neurons"; see ``store.sites``).

    Returns
    -------
    xarray.Dataset
        Data variable named ``site``, dims ``(layer, row, dim)`` over the completed rows;
        coords ``layer`` (hidden-state indices: 0 = embeddings, l = output of block l) and
        ``row``; every entity column is a coordinate along ``row`` (renamed ``entity_<col>``
        if it clashes with a dimension or the variable). A ragged store (``position ==
        "all"``: rows are tokens) puts the entity columns along a ``text_row`` dimension and
        gives each row ``text_index`` (its text) and ``token_id``. Lazy (a dask array of one
        chunk per layer and row block, each read verified) when dask is installed, else read
        into memory. bfloat16 is decoded to float32.

    Raises
    ------
    StoreError
        xarray is not installed (``pip install xarray dask``), or the store has no such site
        (the message lists its sites).
    """
    try:
        import xarray as xr  # deferred: an optional dependency (the test extra has it)
    except ImportError:
        raise StoreError("store.to_xarray needs xarray: pip install xarray dask (dask makes "
                         "it lazy)") from None
    d = _site(store, site)
    source = _LazySite(store, site, d)
    try:
        import dask.array as da  # deferred: optional; without it the Dataset is in memory
    except ImportError:
        da = None
    if da is not None:
        data = da.from_array(source, chunks=(1, store.rows_per_chunk, d), asarray=True,
                             fancy=False, lock=False, meta=np.empty((0, 0, 0), source.dtype),
                             name=f"actstore-{site}-{store.path}-{store.meta.get('created')}"
                                  f"-{store.rows_done}")
    else:
        data = np.empty(source.shape, dtype=source.dtype)
        for start, block in store.iter_chunks(site=site):
            data[:, start:start + block.shape[1]] = decode(block, store.dtype)
    n = source.shape[1]
    coords: dict = {"layer": ("layer", np.asarray(store.layers, dtype=np.int64)),
                    "row": ("row", np.arange(n, dtype=np.int64))}
    taken = {"layer", "row", "dim", "text_row", "text_index", "token_id", site}
    ent = store.entities
    if store.ragged:
        rows = np.arange(n, dtype=np.int64)
        coords["text_index"] = ("row", _text_of(store, rows).astype(np.int64))
        coords["token_id"] = ("row", np.asarray(store.token_ids)[:n].astype(np.int64))
        for c in ent.columns:
            coords[_coord_name(c, taken)] = ("text_row", ent[c].to_numpy())
    else:
        for c in ent.columns:
            coords[_coord_name(c, taken)] = ("row", ent[c].to_numpy()[:n])
    attrs = {"site": site, "dtype": store.dtype, "position": store.position,
             "store": str(store.path)}
    return xr.Dataset({site: (("layer", "row", "dim"), data)}, coords=coords, attrs=attrs)
