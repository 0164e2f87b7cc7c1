"""The store format's constants and codecs (docs/store-format.md is the specification).

One place for: the format name and versions, the sites (activation arrays), positions and
dtypes a store may hold, the chunk size rule, the dtype codec (numpy has no bfloat16: it is
stored as its raw 16 bits), the entity-table column kinds, the store identity a fit records,
and the header check (version 2; a version-1 header is read with its defaults filled in).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from actstore.errors import StoreError

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "READ_VERSIONS", "SITES", "ARRAYS", "POSITIONS",
           "TARGET_KINDS", "DTYPES", "COMPRESSIONS", "DEFAULT_COMPRESSION", "PROGRESS_GROUP",
           "RANGE_KEY", "INTEGRITY_GROUP", "TOKENS_GROUP", "CODES_GROUP", "CATEGORIES_GROUP",
           "ZARR_ENTRIES", "ENTITY_KINDS", "site_dim", "filled_header",
           "default_rows_per_chunk", "storage_dtype", "to_storage", "as_torch", "as_compute",
           "detect_format", "format_from_path", "column_kind", "column_values",
           "table_from_columns", "store_identity", "check_header", "header_problem"]

FORMAT_NAME = "actstore-activations"
FORMAT_VERSION = 2
# Version 1 (one position, sites resid + neurons) still opens: filled_header gives its defaults.
READ_VERSIONS = (1, 2)
# The activation arrays ("sites") a store may hold, in the order the header lists them:
# resid = hidden state after each block; attn_out / mlp_out = each block's attention / MLP
# output before it is added to the residual stream; neurons = the MLP down projection's input.
SITES = ("resid", "attn_out", "mlp_out", "neurons")
ARRAYS = SITES     # the name before sites existed
# Which token(s) of a text give its row(s); "all" makes the store ragged (rows are tokens).
POSITIONS = ("last-entity", "last", "mean", "first-entity", "all")
TARGET_KINDS = ("regression", "class")
DTYPES = ("float16", "bfloat16", "float32")
# bench/RESULTS.md "Extraction (SmolLM2-135M, CPU)": fp16 hidden states are close to
# incompressible, so compression buys a few percent of disk for a large cost in speed.
DEFAULT_COMPRESSION = "none"
COMPRESSIONS = ("none", "zstd", "blosc")
# Per-range progress records of distributed writers: zarr groups progress/<start>-<stop>/
# whose zarr.json attribute "actstore_range" each belongs to exactly one writer process.
PROGRESS_GROUP = "progress"
RANGE_KEY = "actstore_range"
# Content checksums (crc32c per array, layer and row block; entity columns): a zarr group
# integrity/ (HDF5: datasets integrity/<name>). Stores made before them lack it: they read,
# unverified (docs/store-format.md "Integrity").
INTEGRITY_GROUP = "integrity"
# Ragged stores (position "all"): tokens/offsets (int64, n_texts + 1) and tokens/ids (int32,
# n_rows), the rows of text i being offsets[i]:offsets[i+1].
TOKENS_GROUP = "tokens"
# A numeric view of every str entity column for readers without zarr's string type
# (tensorstore): entity_codes/<column> int32, its code table in the attribute "categories"
# (Zarr); HDF5 keeps each code table as a string dataset entity_categories/<column> (an HDF5
# attribute is limited to 64 KiB).
CODES_GROUP = "entity_codes"
CATEGORIES_GROUP = "entity_categories"
# The top-level names of a Zarr store directory.
ZARR_ENTRIES = frozenset({"zarr.json", *SITES, "layer", "entities", PROGRESS_GROUP,
                          INTEGRITY_GROUP, TOKENS_GROUP, CODES_GROUP})
ENTITY_KINDS = ("str", "float64", "bool", "int64")


def site_dim(site: str) -> str:
    """The name of a site array's last dimension: "neuron" for neurons, else "dim"."""
    return "neuron" if site == "neurons" else "dim"


def default_rows_per_chunk(d: int) -> int:
    """Rows per chunk: a power of two giving ~1 MiB fp16 chunks, clamped to [64, 1024]."""
    r = 1 << max(0, int(np.floor(np.log2(max(1, (1 << 20) // (2 * max(1, d)))))))
    return int(min(1024, max(64, r)))


# ----------------------------------------------------------------------------- dtype codec
# torch is imported inside the codec functions: `import actstore` must stay light.

def storage_dtype(dtype: str) -> np.dtype:
    """The numpy dtype a store of ``dtype`` holds (bfloat16: its raw bits as uint16)."""
    if dtype not in DTYPES:
        raise StoreError(f"unknown dtype {dtype!r}; choose one of {DTYPES}")
    return np.dtype("uint16") if dtype == "bfloat16" else np.dtype(dtype)


def to_storage(x, dtype: str) -> np.ndarray:
    """A CPU torch float tensor -> numpy in the store's ``dtype`` (bfloat16 as raw uint16)."""
    import torch

    if dtype == "float16":
        return x.to(torch.float16).numpy()
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return x.to(torch.float32).numpy()


def as_torch(block, dtype: str, contiguous: bool = True):
    """A stored numpy block as a torch tensor of its true dtype (bfloat16 from its raw bits);
    torch tensors pass through. ``contiguous=False`` keeps a strided block's strides (no copy)
    for a reader that takes them."""
    import torch

    if isinstance(block, torch.Tensor):
        return block
    if contiguous:
        block = np.ascontiguousarray(block)
    if dtype == "bfloat16":
        return torch.from_numpy(block.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(block)


def as_compute(block, dtype: str, contiguous: bool = True):
    """A stored block as a tensor the kernels take: float16/float32 as stored, bfloat16 as
    float32 (exact); ``contiguous`` as :func:`as_torch`."""
    t = as_torch(block, dtype, contiguous)
    return t.float() if dtype == "bfloat16" else t


# ----------------------------------------------------------------------------- containers

def detect_format(path: Path) -> str:
    """"zarr" or "hdf5" for an existing store path, else StoreError."""
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


def format_from_path(path: Path, format: str | None) -> str:
    """The format to create: ``format`` if given, else hdf5 for a .h5/.hdf5 suffix, else zarr."""
    if format is not None:
        if format not in ("zarr", "hdf5"):
            raise StoreError(f"unknown store format {format!r}; choose 'zarr' or 'hdf5'")
        return format
    return "hdf5" if Path(path).suffix.lower() in (".h5", ".hdf5") else "zarr"


# ----------------------------------------------------------------------------- entity table

def column_kind(s) -> str:
    """The stored kind of a pandas column: bool, int64, float64 or str."""
    import pandas as pd

    if pd.api.types.is_bool_dtype(s):
        return "bool"
    if pd.api.types.is_integer_dtype(s):
        return "int64"
    if pd.api.types.is_float_dtype(s):
        return "float64"
    return "str"


def column_values(s, kind: str) -> np.ndarray:
    """A pandas column as the array stored for ``kind`` (missing strings stored as "")."""
    if kind == "str":
        return np.array(["" if (v is None or (isinstance(v, float) and np.isnan(v))) else str(v)
                         for v in s.tolist()], dtype=object)
    return s.to_numpy(dtype=kind)


def table_from_columns(columns: list[str], kinds: dict, get):
    """The entity table as a DataFrame, ``get(column)`` reading each stored column."""
    import pandas as pd

    data = {}
    for c in columns:
        v = get(c)
        if kinds[c] == "str":
            v = pd.Series(np.asarray(v).astype(object), dtype=object)
        data[c] = v
    return pd.DataFrame(data)


# ----------------------------------------------------------------------------- identity

def store_identity(store) -> dict:
    """What identifies a store's content: its metadata's creation time, dataset sha256, prompt
    name and model id, and its completed rows. A fit records it (results.json
    ``store_identity``); ``fastprobe neurons --probe`` and ``actstore run`` compare it, so a
    store re-extracted at the same path with another prompt or dataset is caught. Works on any
    object with ``meta`` and ``rows_done``."""
    meta = store.meta if isinstance(getattr(store, "meta", None), dict) else {}
    ds, pr, mo = meta.get("dataset"), meta.get("prompt"), meta.get("model")
    return {
        "created": meta.get("created"),
        "dataset_sha256": ds.get("sha256") if isinstance(ds, dict) else None,
        "prompt": pr.get("name") if isinstance(pr, dict) else (pr if isinstance(pr, str) else None),
        "model_id": mo.get("id") if isinstance(mo, dict) else (mo if isinstance(mo, str) else None),
        "n_rows": int(store.rows_done),
    }


def check_header(path, header, on_fail=None) -> None:
    """StoreError unless ``header`` is an actstore header of a version this code reads (1 or 2)
    (``on_fail()`` runs first, e.g. to close a file handle)."""
    def fail(msg, replaceable=False):
        if on_fail is not None:
            on_fail()
        raise StoreError(msg, replaceable=replaceable)
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        fail(f"{path}: not an activation store (no '{FORMAT_NAME}' header)")
    v = header.get("format_version")
    if isinstance(v, bool) or v not in READ_VERSIONS:
        fail(f"{path}: store format version {v} is not supported (this actstore reads "
             f"versions {', '.join(map(str, READ_VERSIONS))}); re-extract it with this version "
             "(or open it with the actstore that wrote it)", replaceable=True)
    bad = header_problem(header)
    if bad:
        fail(f"{path}: the store header is damaged ({bad}); the store cannot be read or "
             "repaired: re-create it (actstore extract ... --overwrite)", replaceable=True)


def _is_int(x, low: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def header_problem(h: dict) -> str | None:
    """What is wrong with the fields of an actstore header (version 1 or 2), or None."""
    cols = h.get("entity_columns")
    kinds = h.get("entity_kinds")
    checks = [
        ("n_rows", _is_int(h.get("n_rows"), 1)), ("d_model", _is_int(h.get("d_model"), 1)),
        ("d_mlp", h.get("d_mlp") is None or _is_int(h.get("d_mlp"), 1)),
        ("layers", isinstance(h.get("layers"), list) and len(h["layers"]) > 0
         and all(_is_int(x) for x in h["layers"]) and len(set(h["layers"])) == len(h["layers"])),
        ("dtype", h.get("dtype") in DTYPES),
        ("rows_per_chunk", _is_int(h.get("rows_per_chunk"), 1)),
        ("compression", h.get("compression", "none") in COMPRESSIONS),
        ("entity_columns", isinstance(cols, list) and all(isinstance(c, str) for c in cols)),
        ("entity_kinds", isinstance(kinds, dict) and isinstance(cols, list)
         and all(kinds.get(c) in ENTITY_KINDS for c in cols)),
        ("targets", isinstance(h.get("targets"), list) and isinstance(cols, list)
         and all(t in cols for t in h["targets"])),
        ("group_columns", isinstance(h.get("group_columns"), list) and isinstance(cols, list)
         and all(t in cols for t in h["group_columns"])),
        ("meta", isinstance(h.get("meta"), dict)),
    ]
    if h.get("format_version") != 1:
        checks += _v2_checks(h)
    bad = [k for k, ok in checks if not ok]
    return None if not bad else "invalid or missing " + ", ".join(bad)


def _v2_checks(h: dict) -> list[tuple[str, bool]]:
    """The fields version 2 adds: (name, valid) pairs."""
    sites, d_sites, tk = h.get("sites"), h.get("d_sites"), h.get("target_kinds")
    ok_sites = (isinstance(sites, list) and len(sites) > 0 and all(s in SITES for s in sites)
                and sites == [s for s in SITES if s in sites])
    ragged = h.get("position") == "all"
    n_texts = h.get("n_texts")
    return [
        ("position", h.get("position") in POSITIONS),
        # layer 0 (the embeddings) has no attention, MLP or neurons: only resid holds it
        ("sites", ok_sites and (not isinstance(h.get("layers"), list) or 0 not in h["layers"]
                                or sites == ["resid"])),
        ("d_sites", ok_sites and isinstance(d_sites, dict) and set(d_sites) == set(sites)
         and all(_is_int(d_sites[s], 1) for s in sites)
         and (d_sites.get("neurons") == h.get("d_mlp"))
         and all(d_sites[s] == h.get("d_model") for s in sites if s != "neurons")),
        ("n_texts", _is_int(n_texts, 1) and (ragged or n_texts == h.get("n_rows"))),
        ("ragged", h.get("ragged") is ragged),
        ("target_kinds", isinstance(tk, dict) and isinstance(h.get("targets"), list)
         and set(tk) == set(h["targets"]) and all(v in TARGET_KINDS for v in tk.values())),
    ]


def filled_header(h: dict) -> dict:
    """The header with every version-2 field: a version-1 header gains the defaults (position
    "last-entity", sites resid (+ neurons), d_sites from d_model / d_mlp, n_texts = n_rows,
    every target "regression", not ragged); a version-2 header is returned as is (a copy)."""
    out = dict(h)
    if h.get("format_version") == 1:
        sites = ["resid"] + (["neurons"] if h.get("d_mlp") is not None else [])
        out.update({
            "position": "last-entity",
            "sites": sites,
            "d_sites": {s: int(h["d_mlp"] if s == "neurons" else h["d_model"]) for s in sites},
            "n_texts": int(h["n_rows"]),
            "target_kinds": {t: "regression" for t in h["targets"]},
            "ragged": False,
        })
    return out
