"""Anyone's table as an :class:`~actstore.datasets.table.EntityDataset` (kind ``"table"``).

:class:`TableSpec` says which columns hold the text (or the entity and a template), the
targets, groups, split and id. :func:`load_table` reads a CSV, TSV, Parquet or JSON Lines file,
a directory written by ``datasets.save_to_disk`` (``DIR@SPLIT`` for a DatasetDict) or
``hf:NAME[:CONFIG][@SPLIT]`` (the Hugging Face ``datasets`` cache; the hub only when online),
checks every row (errors name the row, and the line for text files) and builds the table:
``name, entity, text, entity_start, entity_end, <targets>, is_test, entity_type, <groups>``.
Row numbers in messages count data rows from 0 (as ``df.iloc`` / ``ds[i]``).
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from actstore.datasets.paper import MAX_REPORTED, _read_text, _record_lines, _surplus_fields
from actstore.datasets.table import EntityDataset, hash_split
from actstore.errors import DatasetError
from actstore.io import file_sha256

__all__ = ["TableSpec", "load_table", "read_columns", "parse_hf", "TARGET_KINDS",
           "RESERVED_COLUMNS", "MAX_CLASS_INT_VALUES", "FILE_SUFFIXES"]

TARGET_KINDS = ("regression", "class")
# the columns load_table writes itself; a target or group column may not be called so
RESERVED_COLUMNS = ("name", "entity", "text", "entity_start", "entity_end", "is_test",
                    "entity_type")
# an integer target with at most this many distinct values is a class target (labels 0/1,
# ratings 1-5, ...); more (a year column) and it is a regression target
MAX_CLASS_INT_VALUES = 20
FILE_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet",
                 ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_INT = re.compile(r"[+-]?\d+")
_SPLIT_WORDS = {"train": False, "test": True, "false": False, "true": True}
_OWN_TABLE = ("--text-column COL (the full text), or --entity-column COL with --template "
              "'... {entity} ...'")


def _names(value, flag: str) -> tuple[str, ...]:
    """A tuple of column names from a tuple/list or a comma list ("a,b", the CLI's form)."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    out = tuple(str(v).strip() for v in items)
    if any(not v for v in out):
        raise DatasetError(f"{flag} {value!r} has an empty column name; write names separated "
                           f"by commas, e.g. {flag} a,b")
    return out


@dataclass(frozen=True)
class TableSpec:
    """Which columns of your own table feed the model and the probes.

    Three modes: ``text_column`` alone (the text is the column, no entity); ``entity_column``
    with ``template`` (the text is the template with ``{entity}`` replaced); ``text_column``
    with ``entity_column`` (the entity is found in its text, first occurrence).
    """

    text_column: str | None = None
    """--text-column: the column holding the full text fed to the model (no template)."""
    entity_column: str | None = None
    """--entity-column: the column holding the entity; with --template it is put in the
    template, with --text-column it is located in the text (its tokens are the entity span)."""
    template: str | None = None
    """--template: the text around the entity, with ``{entity}`` exactly once
    ("The capital of {entity} is"); other braces are literal. Needs --entity-column."""
    targets: tuple[str, ...] = ()
    """--targets: target columns ("a,b" or a tuple); ``name:class`` / ``name:regression`` force
    the kind, else float -> regression, bool/string -> class, integer -> class when it has at
    most 20 distinct values, else regression. None: extract only."""
    group_columns: tuple[str, ...] = ()
    """--group-columns: columns kept (with their type) for hold-out experiments."""
    split_column: str | None = None
    """--split-column: the train/test split: bool (True = test; 0/1 too) or the strings
    train/test. None: a hash of the id (of the text without --id-column), about 20 % test."""
    id_column: str | None = None
    """--id-column: the column naming each row (the ``name`` column); None: the row number."""

    def __post_init__(self):
        object.__setattr__(self, "targets", _names(self.targets, "--targets"))
        object.__setattr__(self, "group_columns", _names(self.group_columns, "--group-columns"))
        if self.text_column is None and self.entity_column is None:
            raise DatasetError(f"a table needs {_OWN_TABLE}")
        if self.template is not None:
            if self.text_column is not None:
                raise DatasetError("--template builds the text from --entity-column; with "
                                   "--text-column the text is given: drop one of the two")
            if self.entity_column is None:
                raise DatasetError("--template needs --entity-column COL (the column whose "
                                   "values replace {entity})")
            n = self.template.count("{entity}")
            if n != 1:
                raise DatasetError(
                    f"template {self.template!r} " + ("has no {entity}" if n == 0 else
                                                      f"has {{entity}} {n} times")
                    + "; write it exactly once where the entity goes, e.g. "
                    "'The capital of {entity} is'")
        elif self.text_column is None:
            raise DatasetError("--entity-column needs --template '... {entity} ...' (or "
                               "--text-column COL holding the full text the entity is in)")

    @property
    def mode(self) -> str:
        """"text" (text only), "template" (entity + template) or "located" (text + entity)."""
        if self.template is not None:
            return "template"
        return "located" if self.entity_column is not None else "text"

    def target_requests(self) -> list[tuple[str, str | None]]:
        """(column, forced kind or None) per target, the ``:class``/``:regression`` suffix
        split off (a name whose suffix is neither is taken whole)."""
        out = []
        for t in self.targets:
            col, sep, kind = t.rpartition(":")
            out.append((col.strip(), kind) if sep and kind in TARGET_KINDS else (t, None))
        return out


# ----------------------------------------------------------------------------- reading

@dataclass
class _Source:
    raw: pd.DataFrame          # the columns asked for
    columns: list[str]         # every column of the source (for the missing-column error)
    label: str                 # path or hf:... for messages and ``source``
    name: str
    sha256: str
    from_text: bool            # values are the strings of a CSV/TSV (numbers still to parse)
    lines: np.ndarray | None   # line of the file where each row starts (text files)
    class_columns: frozenset   # HF ClassLabel columns: integer codes of categories


def read_columns(source: str, columns) -> _Source:
    """Read ``columns`` of a table file, a saved HF dataset dir or ``hf:...`` (see module).

    Parameters
    ----------
    source : str
        A path (``.csv``, ``.tsv``, ``.parquet``, ``.jsonl``/``.ndjson``, a ``save_to_disk``
        directory, ``DIR@SPLIT``) or ``hf:NAME[:CONFIG][@SPLIT]``.
    columns : iterable of str
        The columns needed; a missing one is a DatasetError naming it and listing the columns.

    Returns
    -------
    _Source
        The columns (``raw``), every column name, label, name, sha256 and how to read values.
    """
    columns = list(dict.fromkeys(columns))
    if source.startswith("hf:"):
        return _read_hf(source, columns)
    path = Path(source).expanduser()
    split = None
    if not path.exists() and "@" in source:
        base, _, split = source.rpartition("@")
        if Path(base).expanduser().is_dir():
            path = Path(base).expanduser()
        else:
            split = None
    if not path.exists():
        raise DatasetError(f"no dataset {source!r}: no such file or directory (a table is a "
                           f"{', '.join(sorted(FILE_SUFFIXES))} file, a directory saved with "
                           f"datasets.save_to_disk, or hf:NAME[:CONFIG][@SPLIT])")
    path = path.resolve()
    if path.is_dir():
        return _read_saved(path, split, columns)
    fmt = FILE_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise DatasetError(f"{path}: unknown table format {path.suffix!r}; use one of "
                           f"{', '.join(sorted(FILE_SUFFIXES))}, a directory saved with "
                           f"datasets.save_to_disk, or hf:NAME")
    return {"csv": _read_delimited, "tsv": _read_delimited, "parquet": _read_parquet,
            "jsonl": _read_jsonl}[fmt](path, columns, fmt)


def _check_columns(label: str, have: list[str], want: list[str]) -> None:
    missing = [c for c in want if c not in have]
    if missing:
        raise DatasetError(f"{label}: no column(s) {', '.join(map(repr, missing))}; its columns "
                           f"are {', '.join(map(repr, have))}")


def _read_delimited(path: Path, columns: list[str], fmt: str) -> _Source:
    text, sha = _read_text(path)
    sep = "\t" if fmt == "tsv" else ","
    try:
        with warnings.catch_warnings():
            # surplus fields would shift every column silently (see paper.load_csv)
            warnings.simplefilter("error", pd.errors.ParserWarning)
            raw = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False,
                              index_col=False)
    except pd.errors.EmptyDataError:
        raise DatasetError(f"{path}: empty file (no header line)") from None
    except pd.errors.ParserError as exc:
        raise DatasetError(f"{path}: malformed {fmt.upper()}: {exc}") from None
    except pd.errors.ParserWarning:
        raise DatasetError(f"{path}: malformed {fmt.upper()}: "
                           f"{_surplus_fields(text, sep)}") from None
    raw = raw.fillna("")  # rows with too few fields
    raw.columns = [str(c).strip() for c in raw.columns]
    _check_columns(str(path), list(raw.columns), columns)
    return _Source(raw[columns].astype(object), list(raw.columns), str(path), path.stem, sha,
                   True, _record_lines(text, sep), frozenset())


def _arrow_frame(table) -> pd.DataFrame:
    """An Arrow table as pandas with nullable ints/bools (an int column with nulls stays int)."""
    import pyarrow as pa  # deferred: only Parquet and HF datasets need it

    mapping = {pa.bool_(): pd.BooleanDtype()}
    for t in (pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.uint8(), pa.uint16(),
              pa.uint32(), pa.uint64()):
        mapping[t] = pd.Int64Dtype()
    df = table.to_pandas(types_mapper=mapping.get)
    # strings as Python objects (None when missing), whatever pandas' default string dtype
    return pd.DataFrame({c: (df[c].astype(object).where(df[c].notna(), None)
                             if pd.api.types.is_string_dtype(df[c]) else df[c])
                         for c in df.columns})


def _read_parquet(path: Path, columns: list[str], fmt: str) -> _Source:
    import pyarrow as pa  # deferred: only Parquet and HF datasets need pyarrow
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        have = list(pf.schema_arrow.names)
        _check_columns(str(path), have, columns)
        table = pf.read(columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(f"{path}: cannot read as Parquet: {exc}") from None
    return _Source(_arrow_frame(table), have, str(path), path.stem, file_sha256(path), False,
                   None, frozenset())


def _read_jsonl(path: Path, columns: list[str], fmt: str) -> _Source:
    data = path.read_bytes()
    records, lines, have = [], [], {}
    for i, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DatasetError(f"{path}: line {i}: not a JSON object ({exc})") from None
        if not isinstance(rec, dict):
            raise DatasetError(f"{path}: line {i}: a {type(rec).__name__}, not a JSON object "
                               f"({{\"column\": value, ...}} per line)")
        records.append(rec)
        lines.append(i)
        have.update(dict.fromkeys(rec))
    _check_columns(str(path), list(have), columns)
    # object columns keep the JSON types (an int column with a null stays int)
    raw = pd.DataFrame({c: pd.Series([r.get(c) for r in records], dtype=object)
                        for c in columns})
    return _Source(raw, list(have), str(path), path.stem, hashlib.sha256(data).hexdigest(),
                   False, np.asarray(lines, dtype=np.int64), frozenset())


def parse_hf(source: str) -> tuple[str, str | None, str | None]:
    """``hf:NAME[:CONFIG][@SPLIT]`` -> (NAME, CONFIG or None, SPLIT or None)."""
    rest = source[3:] if source.startswith("hf:") else source
    rest, at, split = rest.partition("@")
    name, colon, config = rest.partition(":")
    if not name.strip() or (colon and not config) or (at and not split):
        raise DatasetError(f"{source!r}: write a Hugging Face dataset as hf:NAME, "
                           f"hf:NAME:CONFIG, hf:NAME@SPLIT or hf:NAME:CONFIG@SPLIT "
                           f"(e.g. hf:imdb@test)")
    return name.strip(), (config or None), (split or None)


def _one_split(obj, label: str, how: str):
    """A Dataset from a Dataset or a DatasetDict with one split; else say which exist."""
    if not hasattr(obj, "keys"):
        return obj
    splits = list(obj.keys())
    if len(splits) == 1:
        return obj[splits[0]]
    raise DatasetError(f"{label} has the splits {', '.join(splits)}; pick one with {how} "
                       f"(e.g. {how.replace('SPLIT', splits[0])})")


def _from_hf(ds, label: str, name: str, columns: list[str]) -> _Source:
    """A loaded ``datasets.Dataset`` as a _Source (only ``columns`` converted to pandas)."""
    have = list(ds.column_names)
    _check_columns(label, have, columns)
    sub = ds.select_columns(columns)
    table = sub.with_format("arrow")[:] if len(sub) else sub.data.table.slice(0, 0)
    class_cols = frozenset(c for c in columns
                           if type(ds.features[c]).__name__ == "ClassLabel")
    files = sorted(Path(f["filename"]) for f in ds.cache_files)
    if files:
        # the arrow files hold the data: their hashes (cached by path/size/mtime) in order
        h = hashlib.sha256()
        for f in files:
            h.update(f"{f.name}\0{file_sha256(f)}\n".encode())
        sha = h.hexdigest()
    else:  # an in-memory dataset: hash the Arrow stream of the whole table
        import pyarrow as pa  # deferred: only HF datasets need it

        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, ds.data.table.schema) as w:
            w.write_table(ds.data.table)
        sha = hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()
    return _Source(_arrow_frame(table), have, label, name, sha, False, None, class_cols)


def _read_saved(path: Path, split: str | None, columns: list[str]) -> _Source:
    if not ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        raise DatasetError(f"{path}: a directory, but not a dataset saved with "
                           f"datasets.Dataset.save_to_disk (no state.json or "
                           f"dataset_dict.json); pass a table file or such a directory")
    import datasets  # deferred: a heavy import only saved HF datasets need

    try:
        obj = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot load the saved dataset: {exc}") from None
    label = f"{path}@{split}" if split else str(path)
    if split is not None:
        if not hasattr(obj, "keys"):
            raise DatasetError(f"{path} is one Dataset, not a DatasetDict: it has no splits; "
                               f"drop @{split}")
        if split not in obj:
            raise DatasetError(f"{path} has no split {split!r}; its splits are "
                               f"{', '.join(obj.keys())}")
        obj = obj[split]
    ds = _one_split(obj, str(path), f"{path}@SPLIT")
    return _from_hf(ds, label, path.name, columns)


def _read_hf(source: str, columns: list[str]) -> _Source:
    name, config, split = parse_hf(source)
    import datasets  # deferred: a heavy import only hf: datasets need

    try:
        # the datasets library reads its cache first and the hub only when online
        obj = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # noqa: BLE001 - any failure of the library is one clear line
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if datasets.config.HF_HUB_OFFLINE:
            raise DatasetError(
                f"{source}: not found in the Hugging Face datasets cache "
                f"({datasets.config.HF_DATASETS_CACHE}) and offline mode is on "
                f"(HF_DATASETS_OFFLINE / HF_HUB_OFFLINE): load it once online, or pass a "
                f"directory saved with save_to_disk ({msg})") from None
        raise DatasetError(f"{source}: the datasets library cannot load it: {msg}") from None
    ds = _one_split(obj, source, f"hf:{name}{':' + config if config else ''}@SPLIT")
    return _from_hf(ds, source, name.rsplit("/", 1)[-1], columns)


# ----------------------------------------------------------------------------- values

class _Rows:
    """Row problems: (mask, column, message per value); reported or dropped together."""

    def __init__(self, src: _Source):
        self.src, self.n = src, len(src.raw)
        self.problems: list[tuple[np.ndarray, str, Callable[[object], str]]] = []

    def add(self, mask, column: str, message: Callable[[object], str]) -> None:
        mask = np.asarray(mask, dtype=bool)
        if mask.any():
            self.problems.append((mask, column, message))

    @property
    def bad(self) -> np.ndarray:
        bad = np.zeros(self.n, dtype=bool)
        for mask, _, _ in self.problems:
            bad |= mask
        return bad

    def where(self, i: int) -> str:
        lines = self.src.lines
        return f"row {i}" + (f" (line {lines[i]})" if lines is not None else "")

    def details(self, limit: int) -> list[str]:
        out = []
        for i in np.flatnonzero(self.bad)[:limit]:
            for mask, col, message in self.problems:
                if mask[i]:
                    out.append(f"{self.where(i)}, column '{col}': "
                               f"{message(self.src.raw[col].iat[i])}")
        return out

    def error(self, n_bad: int, n_rows: int) -> DatasetError:
        more = (f"\n  ... and {n_bad - MAX_REPORTED} more invalid rows"
                if n_bad > MAX_REPORTED else "")
        return DatasetError(
            f"{self.src.label}: {n_bad} invalid row(s) of {n_rows}; fix them or drop them "
            f"with --drop-invalid (drop_invalid=True):\n"
            + "\n".join("  " + d for d in self.details(MAX_REPORTED)) + more)


def _missing(values: list) -> np.ndarray:
    return np.array([v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v))
                     for v in values], dtype=bool)


def _strings(src: _Source, col: str) -> tuple[list[str], np.ndarray]:
    """A column as text (missing -> "") and its missing mask; text files keep the raw text."""
    values = src.raw[col].tolist()
    miss = _missing(values)
    out = ["" if m else (v if isinstance(v, str) else _scalar_str(v))
           for v, m in zip(values, miss)]
    return out, miss


def _scalar_str(v) -> str:
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v)


def _typed(src: _Source, col: str) -> tuple[str, list, np.ndarray]:
    """(kind, values, missing): kind bool | int | float | str, or a description of another
    type. CSV/TSV strings are parsed: all true/false -> bool, all integers -> int, all numbers
    -> float. Missing: an empty CSV field, null, NaN."""
    s = src.raw[col]
    values = s.tolist()
    miss = _missing(values)
    if src.from_text:
        strip = [str(v).strip() for v in values]
        miss = np.array([v == "" for v in strip], dtype=bool)
        present = [v for v, m in zip(strip, miss) if not m]
        if present and all(v.lower() in ("true", "false") for v in present):
            return "bool", [None if m else v.lower() == "true" for v, m in zip(strip, miss)], miss
        if present and all(_INT.fullmatch(v) for v in present):
            return "int", [None if m else int(v) for v, m in zip(strip, miss)], miss
        num = pd.to_numeric(pd.Series(present, dtype=object), errors="coerce")
        if present and num.notna().all():
            return "float", [None if m else float(v) for v, m in zip(strip, miss)], miss
        return "str", [None if m else v for v, m in zip(strip, miss)], miss
    if pd.api.types.is_bool_dtype(s):
        return "bool", [None if m else bool(v) for v, m in zip(values, miss)], miss
    if pd.api.types.is_integer_dtype(s):
        return "int", [None if m else int(v) for v, m in zip(values, miss)], miss
    if pd.api.types.is_float_dtype(s):
        return "float", [None if m else float(v) for v, m in zip(values, miss)], miss
    present = [v for v, m in zip(values, miss) if not m]
    types = {type(v) for v in present}
    if not types or types <= {str}:
        return "str", [None if m else v for v, m in zip(values, miss)], miss
    if types <= {bool, np.bool_}:
        return "bool", [None if m else bool(v) for v, m in zip(values, miss)], miss
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
           for v in present):
        return "int", [None if m else int(v) for v, m in zip(values, miss)], miss
    if all(isinstance(v, (int, float, np.integer, np.floating))
           and not isinstance(v, (bool, np.bool_)) for v in present):
        return "float", [None if m else float(v) for v, m in zip(values, miss)], miss
    return (f"mixed ({', '.join(sorted(t.__name__ for t in types))})"
            if len(types) > 1 else types.pop().__name__), values, miss


def _number(v) -> float | None:
    """A value as a float, None when it is not a number (bools count as 0/1)."""
    if isinstance(v, (bool, np.bool_)):
        return float(v)
    if isinstance(v, (int, float, np.integer, np.floating)):
        return float(v)
    try:
        return float(str(v).strip())
    except ValueError:
        return None


def _target(rows: _Rows, col: str, forced: str | None) -> tuple[str, np.ndarray]:
    """(kind, values) of a target column; bad values are row problems."""
    src = rows.src
    kind, values, miss = _typed(src, col)
    if kind not in ("bool", "int", "float", "str"):
        raise DatasetError(f"{src.label}: target column '{col}' holds {kind} values; a target "
                           f"must hold numbers, booleans or strings")
    rows.add(miss, col, lambda v: "missing target value")
    if forced is None:
        if kind == "float":
            forced = "regression"
        elif kind == "int" and col not in src.class_columns:
            n_distinct = len({v for v in values if v is not None})
            forced = "class" if n_distinct <= MAX_CLASS_INT_VALUES else "regression"
        else:
            forced = "class"
    if forced == "regression":
        num = [None if m else _number(v) for v, m in zip(values, miss)]
        nan = np.array([x is None for x in num]) & ~miss
        rows.add(nan, col, lambda v: f"{v!r} is not a number (a regression target; or "
                                     f"make it a class target with '{col}:class')")
        out = np.array([np.nan if x is None else x for x in num], dtype=np.float64)
        rows.add(~np.isfinite(out) & ~miss & ~nan, col,
                 lambda v: f"{v!r} is not a finite number")
        return "regression", out
    if kind == "bool":
        return "class", np.array([bool(v) for v in values], dtype=bool)
    if kind == "float" and all(float(v).is_integer() for v in values if v is not None
                               and np.isfinite(v)):
        kind, values = "int", [None if v is None or not np.isfinite(v) else int(v)
                               for v in values]
    if kind == "int":
        return "class", np.array([0 if v is None else v for v in values], dtype=np.int64)
    return "class", np.array(["" if v is None else _scalar_str(v) for v in values],
                             dtype=object)


def _split(rows: _Rows, col: str) -> np.ndarray:
    src = rows.src
    kind, values, miss = _typed(src, col)
    rows.add(miss, col, lambda v: "missing split value (train or test)")
    if kind == "bool":
        return np.array([bool(v) for v in values], dtype=bool)
    if kind == "int" and {v for v in values if v is not None} <= {0, 1}:
        return np.array([v == 1 for v in values], dtype=bool)
    words = [None if m else _SPLIT_WORDS.get(str(v).strip().lower()) for v, m in
             zip(values, miss)]
    bad = np.array([w is None for w in words]) & ~miss
    if bad.any():
        seen = list(dict.fromkeys(str(v) for v, b in zip(values, bad) if b))
        listed = ", ".join(map(repr, seen[:10])) + (", ..." if len(seen) > 10 else "")
        rows.add(bad, col, lambda v: f"{v!r} is not a split: the split column must be bool "
                                     f"(True = test) or 'train'/'test'; its other values are "
                                     f"{listed} (map them to train/test, or drop those rows)")
    return np.array([bool(w) for w in words], dtype=bool)


def _group(src: _Source, col: str) -> np.ndarray:
    """A group column with its type; missing values (or a mixed column) -> str, "unknown"."""
    kind, values, miss = _typed(src, col)
    if not miss.any():
        if kind == "bool":
            return np.array(values, dtype=bool)
        if kind == "int":
            return np.array(values, dtype=np.int64)
        if kind == "float":
            return np.array(values, dtype=np.float64)
    return np.array(["unknown" if m else _scalar_str(v) for v, m in zip(values, miss)],
                    dtype=object)


def _singletons(rows: _Rows, kinds: dict, values: dict, keep: np.ndarray) -> bool:
    """Add a problem for each class with one kept row; True when any was added."""
    added = False
    for col, kind in kinds.items():
        if kind != "class":
            continue
        v = pd.Series(values[col][keep])
        counts = v.value_counts()
        lone = set(counts.index[counts == 1])
        if lone:
            mask = np.zeros(rows.n, dtype=bool)
            mask[np.flatnonzero(keep)[v.isin(lone).to_numpy()]] = True
            hint = (f", or treat it as a number with '{col}:regression'"
                    if values[col].dtype.kind in "iu" else "")
            rows.add(mask, col, lambda x, col=col, hint=hint: (
                f"class {x!r} of target '{col}' has only this row; a class needs at least two "
                f"rows (drop it with --drop-invalid{hint})"))
            added = True
    return added


# ----------------------------------------------------------------------------- the loader

def load_table(source, spec: TableSpec, drop_invalid: bool = False) -> EntityDataset:
    """Load your own table as an EntityDataset of kind "table".

    Parameters
    ----------
    source : str or Path
        A ``.csv``, ``.tsv``, ``.parquet`` or ``.jsonl``/``.ndjson`` file, a directory written
        by ``datasets.save_to_disk`` (``DIR@SPLIT`` picks a split of a DatasetDict), or
        ``hf:NAME[:CONFIG][@SPLIT]``.
    spec : TableSpec
        The columns: text or entity + template, targets, groups, split, id.
    drop_invalid : bool
        Drop invalid rows (counted in ``n_dropped``) instead of raising.

    Returns
    -------
    EntityDataset
        ``kind`` "table", ``target_kinds`` per target, ``has_entity`` False for a text-only
        table, ``template`` for the entity + template mode; ``table`` columns ``name, entity,
        text, entity_start, entity_end, <targets>, is_test, entity_type, <groups>``.

    Raises
    ------
    DatasetError
        Before any model is loaded: a missing column (naming it, listing the columns), a
        bad template, and every invalid row (row number, column, value) unless dropped.
    """
    if not isinstance(spec, TableSpec):
        raise DatasetError(f"table= takes a TableSpec, not {type(spec).__name__}")
    requests = spec.target_requests()
    targets = tuple(c for c, _ in requests)
    dup = sorted({c for c in targets if targets.count(c) > 1})
    if dup:
        raise DatasetError(f"target(s) {', '.join(map(repr, dup))} named more than once")
    clash = [c for c in dict.fromkeys(targets + spec.group_columns) if c in RESERVED_COLUMNS]
    if clash:
        raise DatasetError(
            f"column(s) {', '.join(map(repr, clash))} cannot be a target or group column: the "
            f"table writes its own {', '.join(RESERVED_COLUMNS)}; rename them in your data")
    wanted = [c for c in (spec.text_column, spec.entity_column, spec.split_column,
                          spec.id_column) if c is not None]
    src = read_columns(str(source), [*wanted, *targets, *spec.group_columns])
    rows = _Rows(src)
    n = rows.n

    texts, entities, start, end = _texts(rows, spec)
    kinds, values = {}, {}
    for col, forced in requests:
        kinds[col], values[col] = _target(rows, col, forced)
    is_test = _split(rows, spec.split_column) if spec.split_column else None
    if spec.id_column:
        names, miss = _strings(src, spec.id_column)
        rows.add(miss, spec.id_column, lambda v: "missing id")
    else:
        names = [str(i) for i in range(n)]

    if rows.problems and not drop_invalid:
        raise rows.error(int(rows.bad.sum()), n)
    # a class with a single row (after dropping the other bad rows; dropping may make more)
    while _singletons(rows, kinds, values, ~rows.bad):
        if not drop_invalid:
            raise rows.error(int(rows.bad.sum()), n)
    keep = ~rows.bad
    if n and not keep.any():
        first = rows.details(3)
        raise DatasetError(f"{src.label}: all {n} rows are invalid, so --drop-invalid "
                           f"(drop_invalid=True) leaves nothing: {'; '.join(first)}")
    for col, kind in kinds.items():
        classes = pd.unique(values[col][keep])
        if kind == "class" and keep.any() and len(classes) < 2:
            raise DatasetError(
                f"{src.label}: target '{col}' has a single class ({classes[0]!r}) in "
                f"{int(keep.sum())} rows; a class target needs at least two classes"
                + (f" (or make it a number with '{col}:regression')"
                   if values[col].dtype.kind in "iuf" else ""))

    if is_test is None:
        # equal ids (or, without --id-column, equal texts) always land on the same side
        is_test = hash_split(names if spec.id_column else texts)
    cols = {"name": names, "entity": entities, "text": texts, "entity_start": start,
            "entity_end": end}
    cols.update(values)
    cols["is_test"] = np.asarray(is_test, dtype=bool)
    cols["entity_type"] = [""] * n
    for g in spec.group_columns:
        if g not in cols:
            cols[g] = _group(src, g)
    table = pd.DataFrame({k: (np.asarray(v, dtype=object) if isinstance(v, list) else v)
                          for k, v in cols.items()})
    table = table.loc[keep].reset_index(drop=True)
    return EntityDataset(
        name=src.name, kind="table", table=table, targets=targets,
        group_columns=spec.group_columns, source=src.label, sha256=src.sha256,
        n_dropped=int((~keep).sum()), target_kinds=kinds,
        has_entity=spec.entity_column is not None, template=spec.template)


def _texts(rows: _Rows, spec: TableSpec):
    """(texts, entities, entity_start, entity_end) per the spec's mode; bad rows noted."""
    src, n = rows.src, rows.n
    start = np.full(n, -1, dtype=np.int64)
    end = np.full(n, -1, dtype=np.int64)
    entities = [""] * n
    if spec.entity_column is not None:
        raw, _ = _strings(src, spec.entity_column)
        entities = [e.strip() for e in raw]  # surrounding spaces come from the template/text
        rows.add(np.array([e == "" for e in entities], dtype=bool), spec.entity_column,
                 lambda v: "empty entity")
    if spec.template is not None:
        at = spec.template.index("{entity}")
        texts = [spec.template.replace("{entity}", e) for e in entities]
        start[:] = at
        end[:] = at + np.array([len(e) for e in entities], dtype=np.int64)
        return texts, entities, start, end
    texts, _ = _strings(src, spec.text_column)
    rows.add(np.array([t.strip() == "" for t in texts], dtype=bool), spec.text_column,
             lambda v: "empty text")
    if spec.entity_column is not None:
        found = np.array([t.find(e) if e else 0 for t, e in zip(texts, entities)],
                         dtype=np.int64)
        lost = found < 0
        text_col = spec.text_column
        rows.add(lost, spec.entity_column,
                 lambda v: f"entity {str(v).strip()!r} is not in its text (column "
                           f"'{text_col}')")
        start[:] = np.where(lost, -1, found)
        end[:] = np.where(lost, -1, found + np.array([len(e) for e in entities]))
    return texts, entities, start, end
