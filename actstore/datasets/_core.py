"""Loading, validating and normalising entity datasets (see actstore.datasets for the contract)."""
from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from actstore.datasets import KINDS, PLACE_TARGETS, TIME_TARGETS, DatasetError

# How many offending rows an error message lists before summarising the rest.
MAX_REPORTED = 5


# --------------------------------------------------------------------------------------------
# The table every loader produces
# --------------------------------------------------------------------------------------------
@dataclass
class EntityDataset:
    """One row per entity; see the package docstring for the columns of ``table``."""

    name: str
    kind: str
    table: pd.DataFrame
    targets: tuple[str, ...]
    group_columns: tuple[str, ...]
    source: str
    sha256: str  # of the source bytes; head() keeps it (a prefix of the same source)
    n_dropped: int = 0

    @property
    def entities(self) -> list[str]:
        return self.table["entity"].tolist()

    @property
    def target_array(self) -> np.ndarray:
        """(n, len(targets)) float64, columns in the order of ``targets``."""
        return self.table[list(self.targets)].to_numpy(dtype=np.float64, copy=True)

    @property
    def is_test(self) -> np.ndarray:
        return self.table["is_test"].to_numpy(dtype=bool, copy=True)

    def __len__(self) -> int:
        return len(self.table)

    def head(self, n: int) -> "EntityDataset":
        """The first ``n`` rows (same name, source and sha256)."""
        return replace(self, table=self.table.iloc[: max(int(n), 0)].reset_index(drop=True))

    def summary(self) -> dict:
        """JSON-able description: rows, test rows, entity types, target ranges, groups."""
        t = self.table
        targets = {}
        for col in self.targets:
            v = t[col].to_numpy(dtype=np.float64)
            targets[col] = (
                {"min": float(v.min()), "max": float(v.max()), "mean": float(v.mean())}
                if len(v) else {"min": None, "max": None, "mean": None}
            )
        types = t["entity_type"].value_counts()
        return {
            "name": self.name,
            "kind": self.kind,
            "source": self.source,
            "sha256": self.sha256,
            "rows": int(len(t)),
            "test_rows": int(t["is_test"].sum()),
            "train_rows": int((~t["is_test"]).sum()),
            "n_dropped": int(self.n_dropped),
            "targets": targets,
            "entity_types": {str(k): int(v) for k, v in types.items()},
            "group_columns": {c: int(t[c].nunique()) for c in self.group_columns},
            "examples": t["entity"].head(3).tolist(),
        }


# --------------------------------------------------------------------------------------------
# The published schemas
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Schema:
    kind: str
    required: tuple[str, ...]  # published columns the loader reads; missing -> error
    signature: tuple[str, ...]  # columns that identify a CSV as this kind
    targets: tuple[str, ...]
    group_columns: tuple[str, ...]
    description: str


SCHEMAS: dict[str, Schema] = {
    "world_place": Schema(
        "world_place",
        required=("name", "country", "latitude", "longitude", "entity_type"),
        signature=("name", "country", "latitude", "longitude", "entity_type", "has_thumbnail"),
        targets=PLACE_TARGETS,
        group_columns=("country",),
        description="world places (populated places, structures, natural places); "
        "entity 'X (Y)' -> \"Y's X\"",
    ),
    "us_place": Schema(
        "us_place",
        required=("name", "latitude", "longitude", "state_name", "timezone", "entity_type"),
        signature=("name", "latitude", "longitude", "state_id", "state_name"),
        targets=PLACE_TARGETS,
        group_columns=("state_name", "timezone"),
        description="US places (cities, zips, counties, colleges, landmarks)",
    ),
    "nyc_place": Schema(
        "nyc_place",
        required=("name", "latitude", "longitude", "borough_name", "facility_t_name"),
        signature=("name", "latitude", "longitude", "borough_name", "facility_t_name"),
        targets=PLACE_TARGETS,
        group_columns=("borough_name",),
        description="New York City points of interest; names title-cased as in the paper",
    ),
    "art": Schema(
        "art",
        required=("title", "creator", "release_date", "entity_type"),
        signature=("title", "creator", "release_date"),
        targets=TIME_TARGETS,
        group_columns=("decade",),
        description="books, movies, songs; entity \"{creator}'s {title}\", year = release date",
    ),
    "historical_figure": Schema(
        "historical_figure",
        required=("name", "death_year"),
        signature=("name", "birth_year", "death_year"),
        targets=TIME_TARGETS,
        group_columns=("death_century",),
        description="historical figures; year = death year",
    ),
    "headline": Schema(
        "headline",
        required=("headline", "pub_date", "news_desk"),
        signature=("headline", "pub_date", "news_desk"),
        targets=TIME_TARGETS,
        group_columns=("news_desk", "pub_year"),
        description="New York Times headlines (with a final period); year = publication date",
    ),
}


def detect_kind(columns, path: str = "<csv>") -> str:
    """The one kind whose signature columns are all present, else a DatasetError."""
    cols = set(columns)
    matches = [k for k, s in SCHEMAS.items() if set(s.signature) <= cols]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise DatasetError(
            f"{path}: columns fit several dataset kinds ({', '.join(matches)}); pass --kind"
        )
    best = min(SCHEMAS.values(), key=lambda s: len(set(s.signature) - cols))
    missing = [c for c in best.signature if c not in cols]
    raise DatasetError(
        f"{path}: cannot tell which dataset kind this CSV is; its columns are "
        f"{', '.join(map(repr, columns))}. Closest kind is {best.kind}, which also needs "
        f"column(s) {', '.join(map(repr, missing))}. Pass --kind KIND (one of {', '.join(KINDS)})."
    )


# --------------------------------------------------------------------------------------------
# Name normalisation (the paper's rules, written here from its description)
# --------------------------------------------------------------------------------------------
_PAREN = re.compile(r"\((.*?)\)")


def normalise_world_name(name: str) -> str:
    """World places: "X (Y)" -> "Y's X"; failing that "X, Y" -> "Y's X" (split at the last comma).

    As in the paper, the text of the first parenthesis is moved to the front and every
    parenthesised part is removed; whitespace left behind is collapsed (the paper kept a
    trailing space, which only changes tokenisation).
    """
    m = _PAREN.search(name)
    if m:
        inner = m.group(1).strip()
        rest = " ".join(_PAREN.sub("", name).split())
        if inner and rest:
            return f"{inner}'s {rest}"
        return rest or inner
    if "," in name:
        head, _, tail = name.rpartition(",")
        if tail.strip() and head.strip():
            return f"{tail.strip()}'s {head.strip()}"
    return name


_NYC_STOP = frozenset({"AND", "OR", "OF", "THE", "A", "AT", "&", "IN", "TO"})
_NYC_ABBREV = frozenset({
    "FDNY", "NYCT", "YMCA", "LGA", "US", "NYC", "PS", "IS", "NYS", "UN", "NY", "EMS", "JCC",
    "NYU", "CC", "NYPD", "NYPA", "DHS",
})


def normalise_nyc_name(name: str) -> str:
    """NYC (published in capitals): stop words lower case, known abbreviations kept, other
    words capitalised ("PS 41 GREENWICH VILLAGE SCHOOL" -> "PS 41 Greenwich Village School")."""
    out = []
    for word in name.split():
        if word in _NYC_STOP:
            out.append(word.lower())
        elif word in _NYC_ABBREV:
            out.append(word)
        else:
            out.append(word.lower().capitalize())
    return " ".join(out)


def art_entity(creator: str, title: str) -> str:
    """"{creator}'s {title}"; a creator ending in "s" takes a bare apostrophe, as in the paper."""
    creator = creator.strip()
    return f"{creator}{chr(39) if creator.endswith('s') else chr(39) + 's'} {title.strip()}"


def fractional_year(ts: pd.Series) -> np.ndarray:
    """Calendar year plus the elapsed fraction of that year (UTC): 2020-07-02 -> 2020.5."""
    year = ts.dt.year.to_numpy(dtype=np.float64)
    day = ts.dt.day_of_year.to_numpy(dtype=np.float64) - 1.0
    secs = (ts.dt.hour * 3600 + ts.dt.minute * 60 + ts.dt.second).to_numpy(dtype=np.float64)
    days_in_year = np.where(ts.dt.is_leap_year.to_numpy(dtype=bool), 366.0, 365.0)
    return year + (day + secs / 86400.0) / days_in_year


# --------------------------------------------------------------------------------------------
# Validation: vectorised checks that collect (mask, column, message) problems
# --------------------------------------------------------------------------------------------
class _Checker:
    def __init__(self, path: str, raw: pd.DataFrame, text: str):
        self.path, self.raw, self.text = path, raw, text
        self.problems: list[tuple[np.ndarray, str, object]] = []

    def add(self, mask, column: str, message) -> None:
        mask = np.asarray(mask, dtype=bool)
        if mask.any():
            self.problems.append((mask, column, message))

    def text_col(self, col: str, what: str = "name") -> pd.Series:
        s = self.raw[col].str.strip()
        self.add((s == "").to_numpy(), col, lambda v: f"empty {what}")
        return s

    def number(self, col: str, lo: float | None = None, hi: float | None = None) -> np.ndarray:
        s = self.raw[col].str.strip()
        v = pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64)
        empty = (s == "").to_numpy()
        bad = ~np.isfinite(v)
        self.add(empty, col, lambda x: "missing value")
        self.add(bad & ~empty, col, lambda x: f"{x!r} is not a finite number")
        if lo is not None:
            with np.errstate(invalid="ignore"):
                out = np.isfinite(v) & ((v < lo) | (v > hi))
            self.add(out, col, lambda x: f"{x} is outside [{lo:g}, {hi:g}]")
        return v

    def date(self, col: str) -> np.ndarray:
        s = self.raw[col].str.strip()
        ts = pd.to_datetime(s, format="ISO8601", utc=True, errors="coerce")
        bad = ts.isna().to_numpy()
        self.add(bad, col, lambda x: f"cannot parse {x!r} as a date (expected YYYY-MM-DD)")
        # NaT rows get year NaN; they are either reported or dropped
        return fractional_year(ts)

    def is_test(self) -> np.ndarray | None:
        if "is_test" not in self.raw.columns:
            return None
        s = self.raw["is_test"].str.strip().str.lower()
        true = s.isin(["true", "1", "1.0", "yes"]).to_numpy()
        false = s.isin(["false", "0", "0.0", "no"]).to_numpy()
        self.add(~(true | false), "is_test", lambda x: f"{x!r} is not True/False")
        return true

    @property
    def bad_rows(self) -> np.ndarray:
        bad = np.zeros(len(self.raw), dtype=bool)
        for mask, _, _ in self.problems:
            bad |= mask
        return bad

    def error(self) -> DatasetError:
        lines = _record_lines(self.text)
        bad = self.bad_rows
        n_bad = int(bad.sum())
        details = []
        for i in np.flatnonzero(bad)[:MAX_REPORTED]:
            for mask, col, message in self.problems:
                if mask[i]:
                    details.append(
                        f"  line {lines[i]}, column '{col}': {message(self.raw[col].iat[i])}"
                    )
        more = f"\n  ... and {n_bad - MAX_REPORTED} more invalid rows" if n_bad > MAX_REPORTED else ""
        return DatasetError(
            f"{self.path}: {n_bad} invalid row(s) of {len(self.raw)}; fix them or drop them "
            f"with --drop-invalid (drop_invalid=True):\n" + "\n".join(details) + more
        )


def _record_lines(text: str) -> np.ndarray:
    """1-based line number in the file where each data record starts (quoted newlines and
    blank lines, which pandas skips, are accounted for)."""
    reader = csv.reader(io.StringIO(text))
    starts, prev_end = [], 0
    for record in reader:
        start, prev_end = prev_end + 1, reader.line_num
        if record:
            starts.append(start)
    return np.asarray(starts[1:], dtype=np.int64)


# --------------------------------------------------------------------------------------------
# CSV loading
# --------------------------------------------------------------------------------------------
def _read_text(path: Path) -> tuple[str, str]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DatasetError(f"{path}: is a directory, not a CSV file") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DatasetError(f"{path}: line {line}: not valid UTF-8 ({exc.reason})") from None
    return text, hashlib.sha256(data).hexdigest()


def _surplus_fields(text: str) -> str:
    reader = csv.reader(io.StringIO(text))
    header = next(reader, [])
    prev_end = reader.line_num
    for record in reader:
        start, prev_end = prev_end + 1, reader.line_num
        if len(record) > len(header):
            return f"line {start} has {len(record)} fields, the header {len(header)}"
    return "rows have more fields than the header"


def load_csv(path, kind: str | None = None, drop_invalid: bool = False,
             name: str | None = None) -> EntityDataset:
    """Load one CSV in a paper schema; ``kind`` None -> recognised from the columns."""
    path = Path(path).expanduser().resolve()
    text, sha = _read_text(path)
    try:
        with warnings.catch_warnings():
            # index_col=False: never turn surplus fields into an index (silently shifting
            # every column); pandas then warns about the surplus instead, which is an error
            warnings.simplefilter("error", pd.errors.ParserWarning)
            raw = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False,
                              index_col=False)
    except pd.errors.EmptyDataError:
        raise DatasetError(f"{path}: empty file (no header line)") from None
    except pd.errors.ParserError as exc:
        raise DatasetError(f"{path}: malformed CSV: {exc}") from None
    except pd.errors.ParserWarning:
        raise DatasetError(f"{path}: malformed CSV: {_surplus_fields(text)}") from None
    raw = raw.fillna("")  # rows with too few fields
    raw.columns = [str(c).strip() for c in raw.columns]
    if kind is None:
        kind = detect_kind(list(raw.columns), str(path))
    elif kind not in SCHEMAS:
        raise DatasetError(f"unknown dataset kind {kind!r}; choose one of {', '.join(KINDS)}")
    schema = SCHEMAS[kind]
    missing = [c for c in schema.required if c not in raw.columns]
    if missing:
        raise DatasetError(
            f"{path}: missing column(s) {', '.join(map(repr, missing))} required for kind "
            f"{kind} (line 1 has: {', '.join(raw.columns)})"
        )
    chk = _Checker(str(path), raw, text)
    table = _BUILD[kind](chk)
    is_test = chk.is_test()
    bad = chk.bad_rows
    if bad.any() and not drop_invalid:
        raise chk.error()
    if is_test is None:  # a CSV without a split gets the built-ins' name-hash split
        from actstore.datasets.builtin import hash_split

        is_test = hash_split(table["entity"].tolist())
    table.insert(len(schema.targets) + 2, "is_test", is_test)
    table = table.loc[~bad].reset_index(drop=True)
    return EntityDataset(
        name=name or path.stem, kind=kind, table=table, targets=schema.targets,
        group_columns=schema.group_columns, source=str(path), sha256=sha,
        n_dropped=int(bad.sum()),
    )


def _group(raw: pd.DataFrame, col: str) -> pd.Series:
    s = raw[col].str.strip()
    return s.where(s != "", "unknown")


def _frame(name, entity, targets: dict, entity_type, groups: dict) -> pd.DataFrame:
    cols = {"name": name, "entity": entity, **targets, "entity_type": entity_type, **groups}
    df = pd.DataFrame({k: (v.to_numpy() if isinstance(v, pd.Series) else v)
                       for k, v in cols.items()})
    for k in targets:
        df[k] = df[k].astype(np.float64)
    return df


def _build_world(c: _Checker) -> pd.DataFrame:
    name = c.text_col("name")
    lat, lon = c.number("latitude", -90, 90), c.number("longitude", -180, 180)
    return _frame(name, [normalise_world_name(n) for n in name],
                  {"latitude": lat, "longitude": lon},
                  _group(c.raw, "entity_type"), {"country": _group(c.raw, "country")})


def _build_us(c: _Checker) -> pd.DataFrame:
    name = c.text_col("name")
    lat, lon = c.number("latitude", -90, 90), c.number("longitude", -180, 180)
    return _frame(name, name, {"latitude": lat, "longitude": lon},
                  _group(c.raw, "entity_type"),
                  {"state_name": _group(c.raw, "state_name"),
                   "timezone": _group(c.raw, "timezone")})


def _build_nyc(c: _Checker) -> pd.DataFrame:
    name = c.text_col("name")
    lat, lon = c.number("latitude", -90, 90), c.number("longitude", -180, 180)
    return _frame(name, [normalise_nyc_name(n) for n in name],
                  {"latitude": lat, "longitude": lon},
                  _group(c.raw, "facility_t_name"), {"borough_name": _group(c.raw, "borough_name")})


def _decade_of(year: np.ndarray) -> list[str]:
    return [str(int(y // 10 * 10)) if np.isfinite(y) else "unknown" for y in year]


def _build_art(c: _Checker) -> pd.DataFrame:
    title = c.text_col("title", "title")
    creator = c.text_col("creator", "creator")
    year = c.date("release_date")
    entity = [art_entity(a, t) for a, t in zip(creator, title)]
    return _frame(title, entity, {"year": year}, _group(c.raw, "entity_type"),
                  {"decade": _decade_of(year)})


def _build_historical(c: _Checker) -> pd.DataFrame:
    name = c.text_col("name")
    year = c.number("death_year")
    century = [str(int(y // 100)) if np.isfinite(y) else "unknown" for y in year]
    return _frame(name, name, {"year": year}, "person", {"death_century": century})


def _build_headline(c: _Checker) -> pd.DataFrame:
    headline = c.text_col("headline", "headline")
    year = c.date("pub_date")
    # the paper appended a final period to every headline (the published CSV has it)
    entity = headline.where(headline.str.endswith("."), headline + ".")
    return _frame(headline, entity, {"year": year}, "headline",
                  {"news_desk": _group(c.raw, "news_desk"),
                   "pub_year": [str(int(y)) if np.isfinite(y) else "unknown"
                                      for y in year]})


_BUILD = {
    "world_place": _build_world,
    "us_place": _build_us,
    "nyc_place": _build_nyc,
    "art": _build_art,
    "historical_figure": _build_historical,
    "headline": _build_headline,
}


# --------------------------------------------------------------------------------------------
# Cache and lookup by name
# --------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """$ACTSTORE_CACHE, else $XDG_CACHE_HOME/actstore, else ~/.cache/actstore."""
    env = os.environ.get("ACTSTORE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "actstore"


def paper_path(kind: str) -> Path:
    return cache_dir() / "paper" / f"{kind}.csv"


def load_dataset(name_or_path: str, kind: str | None = None,
                 drop_invalid: bool = False) -> EntityDataset:
    """A built-in name, a paper kind (fetched into the cache), or a CSV path."""
    from actstore.datasets.builtin import BUILTINS, load_builtin

    key = str(name_or_path)
    if key in BUILTINS:
        if kind is not None and kind != BUILTINS[key].kind:
            raise DatasetError(f"built-in dataset {key} is of kind {BUILTINS[key].kind}, "
                               f"not {kind}")
        return load_builtin(key)
    if key in SCHEMAS:
        path = paper_path(key)
        if not path.exists():
            raise DatasetError(
                f"paper dataset {key!r} is not in the cache ({path}); run "
                f"`actstore datasets fetch {key}` (downloads it once), or pass a CSV path"
            )
        return load_csv(path, kind=kind or key, drop_invalid=drop_invalid, name=key)
    path = Path(key).expanduser()
    if not path.exists():
        raise DatasetError(
            f"no dataset {key!r}: not a built-in ({', '.join(BUILTINS)}), not a paper dataset "
            f"({', '.join(KINDS)}), and no such file"
        )
    return load_csv(path, kind=kind, drop_invalid=drop_invalid)


def list_datasets() -> list[dict]:
    """Every dataset load_dataset knows by name, with where it comes from and availability."""
    from actstore.datasets.builtin import BUILTINS, builtin_cache_path
    from actstore.datasets.fetch import dataset_url

    out = []
    for name, spec in BUILTINS.items():
        out.append({
            "name": name, "kind": spec.kind, "source": "builtin", "available": True,
            "cached": builtin_cache_path(name).exists(), "description": spec.description,
            "targets": list(SCHEMAS[spec.kind].targets), "group_columns": list(spec.group_columns),
        })
    for kind, schema in SCHEMAS.items():
        path = paper_path(kind)
        out.append({
            "name": kind, "kind": kind, "source": "paper", "available": path.exists(),
            "cached": path.exists(), "path": str(path), "url": dataset_url(kind),
            "description": schema.description, "targets": list(schema.targets),
            "group_columns": list(schema.group_columns),
        })
    return out
