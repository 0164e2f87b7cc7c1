"""The paper's six CSV schemas: loading, validation and the paper's name normalisation.

:func:`load_csv` reads a CSV in a published schema (its kind recognised from the columns or
given), checks every value (vectorised; errors name file, line and column) and builds the
:class:`~actstore.datasets.table.EntityDataset`. Names are normalised as the paper does:
"X (Y)" -> "Y's X" for world places, NYC names title-cased, art "{creator}'s {title}".
"""
from __future__ import annotations

import csv
import hashlib
import io
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from actstore.datasets.table import KINDS, SCHEMAS, EntityDataset, detect_kind, hash_split
from actstore.errors import DatasetError
from actstore.io import cache_dir

__all__ = ["load_csv", "paper_path", "normalise_world_name", "normalise_nyc_name", "art_entity",
           "fractional_year", "MAX_REPORTED"]

# How many offending rows an error message lists before summarising the rest (and how many
# reasons the one-line error of a CSV without a single valid row gives).
MAX_REPORTED = 5
ALL_DROPPED_REPORTED = 3


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

    def details(self, rows: int) -> list[str]:
        """"line L, column 'C': problem" for the first ``rows`` invalid rows."""
        lines = _record_lines(self.text)
        out = []
        for i in np.flatnonzero(self.bad_rows)[:rows]:
            for mask, col, message in self.problems:
                if mask[i]:
                    out.append(f"line {lines[i]}, column '{col}': "
                               f"{message(self.raw[col].iat[i])}")
        return out

    def error(self) -> DatasetError:
        n_bad = int(self.bad_rows.sum())
        more = (f"\n  ... and {n_bad - MAX_REPORTED} more invalid rows"
                if n_bad > MAX_REPORTED else "")
        return DatasetError(
            f"{self.path}: {n_bad} invalid row(s) of {len(self.raw)}; fix them or drop them "
            f"with --drop-invalid (drop_invalid=True):\n"
            + "\n".join("  " + d for d in self.details(MAX_REPORTED)) + more
        )

    def all_dropped_error(self, kind: str) -> DatasetError:
        """--drop-invalid would leave no row: one line with how many and the first reasons."""
        first = self.details(ALL_DROPPED_REPORTED)
        n = len(self.raw)
        more = f" (first {len(first)} reasons)" if n > ALL_DROPPED_REPORTED else ""
        return DatasetError(
            f"{self.path}: all {n} rows are invalid as kind {kind}, so --drop-invalid "
            f"(drop_invalid=True) drops every one and nothing is left{more}: "
            f"{'; '.join(first)}. Fix the file, or check that it is a {kind} CSV (--kind)")


def _record_lines(text: str, delimiter: str = ",") -> np.ndarray:
    """1-based line number in the file where each data record starts (quoted newlines and
    blank lines, which pandas skips, are accounted for)."""
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    starts, prev_end = [], 0
    for record in reader:
        start, prev_end = prev_end + 1, reader.line_num
        if record:
            starts.append(start)
    return np.asarray(starts[1:], dtype=np.int64)


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


def _surplus_fields(text: str, delimiter: str = ",") -> str:
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
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
    if len(raw) and bad.all():   # dropping would leave nothing: say so before any work starts
        raise chk.all_dropped_error(kind)
    if is_test is None:  # a CSV without a split gets the built-ins' name-hash split
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


def paper_path(kind: str) -> Path:
    """Where ``actstore datasets fetch KIND`` keeps the paper's CSV in the user cache."""
    return cache_dir() / "paper" / f"{kind}.csv"
