"""actstore.datasets: the paper's CSVs, synthetic CSVs in the published schemas, validation
errors, drop_invalid, and the offline built-ins."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from actstore.datasets import (
    KINDS,
    DatasetError,
    EntityDataset,
    art_entity,
    build_builtin,
    detect_kind,
    fractional_year,
    hash_split,
    list_datasets,
    load_csv,
    load_dataset,
    normalise_nyc_name,
    normalise_world_name,
)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    # every test gets its own empty cache; nothing is written to ~/.cache
    monkeypatch.setenv("ACTSTORE_CACHE", str(tmp_path / "cache"))


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


WORLD_HEADER = ["name", "entity_subtype", "country", "latitude", "longitude", "has_thumbnail",
                "page_views", "entity_type", "total_area", "population", "is_test"]
ART_HEADER = ["title", "creator", "release_date", "length", "page_name", "page_views",
              "entity_type", "is_test", "decade"]
HIST_HEADER = ["wiki_id", "name", "description", "gender", "country", "occupation", "birth_year",
               "death_year", "cause_of_death", "age", "death_century", "death_decade", "is_test"]
HEADLINE_HEADER = ["headline", "word_count", "pub_date", "print_section", "print_page", "section",
                   "news_desk", "year", "is_trump", "is_biden", "is_coronavirus", "is_covid",
                   "is_obama", "is_clinton", "is_iraq", "is_afghanistan", "is_china", "is_iran",
                   "is_test"]


def world_row(name, lat, lon, test="False", country="France"):
    return [name, "City", country, lat, lon, "1", "1000.0", "populated_place", "", "", test]


# ----------------------------------------------------------------------------- normalisation
@pytest.mark.parametrize("raw, expected", [
    ("Under (restaurant)", "restaurant's Under"),
    ("Fort Amsterdam (Curaçao)", "Curaçao's Fort Amsterdam"),
    ("Landmark Theatre (Syracuse, New York)", "Syracuse, New York's Landmark Theatre"),
    ("The Verge, Singapore", "Singapore's The Verge"),
    ("A, B, C", "C's A, B"),
    ("Eiffel Tower", "Eiffel Tower"),
])
def test_normalise_world_name(raw, expected):
    assert normalise_world_name(raw) == expected


def test_normalise_nyc_name():
    assert normalise_nyc_name("PS 41 GREENWICH VILLAGE SCHOOL") == "PS 41 Greenwich Village School"
    assert normalise_nyc_name("CITY COLLEGE OF NEW YORK") == "City College of New York"
    assert normalise_nyc_name("FDNY ENGINE 54  AND LADDER 4") == "FDNY Engine 54 and Ladder 4"


def test_art_entity_and_fractional_year():
    assert art_entity("Stephen King", "It") == "Stephen King's It"
    assert art_entity("Charles Dickens", "Bleak House") == "Charles Dickens' Bleak House"
    ts = pd.to_datetime(pd.Series(["2020-07-02", "2021-01-01", "2019-12-31T12:00:00+0000"]),
                        format="ISO8601", utc=True)
    np.testing.assert_allclose(fractional_year(ts), [2020.5, 2021.0, 2019 + 364.5 / 365])


# ----------------------------------------------------------------------------- paper CSVs
@pytest.mark.slow
def test_world_place_real(paper_data):
    ds = load_dataset(str(paper_data / "world_place.csv"))
    assert (ds.kind, len(ds), int(ds.is_test.sum())) == ("world_place", 39585, 7917)
    assert ds.targets == ("latitude", "longitude") and ds.group_columns == ("country",)
    assert list(ds.table.columns) == ["name", "entity", "latitude", "longitude", "is_test",
                                      "entity_type", "country"]
    raw = pd.read_csv(paper_data / "world_place.csv")
    # targets by name, in order, exactly the published numbers
    np.testing.assert_array_equal(ds.target_array, raw[["latitude", "longitude"]].to_numpy())
    np.testing.assert_array_equal(ds.is_test, raw["is_test"].to_numpy(bool))
    by_name = dict(zip(ds.table["name"], ds.table["entity"]))
    assert by_name["Under (restaurant)"] == "restaurant's Under"
    assert by_name["The Verge, Singapore"] == "Singapore's The Verge"
    assert set(ds.table["entity_type"]) == {"populated_place", "structure", "natural_place"}
    assert ds.sha256 and ds.n_dropped == 0
    assert Path(ds.source) == (paper_data / "world_place.csv").resolve()


@pytest.mark.slow
def test_us_and_nyc_place_real(paper_data):
    us = load_dataset(str(paper_data / "us_place.csv"))
    assert (us.kind, len(us), int(us.is_test.sum())) == ("us_place", 29997, 5999)
    zips = us.table.loc[us.table["entity_type"] == "zip", "entity"]
    assert zips.str.fullmatch(r"\d{5}").all() and "01001" in set(zips)  # leading zeros kept
    assert us.table["state_name"].nunique() == 49
    nyc = load_dataset(str(paper_data / "nyc_place.csv"))
    assert (nyc.kind, len(nyc), int(nyc.is_test.sum())) == ("nyc_place", 19838, 3967)
    assert nyc.table["entity"].iloc[0] == "Whitestone" and nyc.table["name"].iloc[0] == "WHITESTONE"
    assert (nyc.table["borough_name"] == "unknown").sum() == 57  # published NaN boroughs
    assert "Manhattan" in set(nyc.table["borough_name"])


def test_detect_kind_from_columns():
    assert detect_kind(WORLD_HEADER) == "world_place"
    assert detect_kind(ART_HEADER) == "art"
    assert detect_kind(HIST_HEADER) == "historical_figure"
    assert detect_kind(HEADLINE_HEADER) == "headline"
    with pytest.raises(DatasetError, match=r"x\.csv: cannot tell.*--kind"):
        detect_kind(["name", "lat", "lon"], "x.csv")


# ----------------------------------------------------------------------------- synthetic schemas
def test_art_csv_published_schema(tmp_path):
    rng = np.random.default_rng(0)
    rows, years = [], []
    for i in range(60):
        y = int(rng.integers(1950, 2023))
        date = f"{y}-{int(rng.integers(1, 13)):02d}-{int(rng.integers(1, 29)):02d}"
        years.append(y)
        creator = ["Stephen King", "Charles Dickens", "Madonna"][i % 3]
        rows.append([f"Title, number {i}", creator, date, "300.0", f"Page_{i}", "5000.0",
                     ["book", "movie", "song"][i % 3], str(i % 5 == 0), str(y // 10 * 10)])
    path = write_csv(tmp_path / "art.csv", ART_HEADER, rows)
    ds = load_dataset(str(path))
    assert ds.kind == "art" and len(ds) == 60 and ds.targets == ("year",)
    year = ds.target_array[:, 0]
    assert year.min() >= 1950 and year.max() < 2023
    np.testing.assert_array_equal(np.floor(year), years)
    assert ds.entities[0] == "Stephen King's Title, number 0"
    assert ds.entities[1] == "Charles Dickens' Title, number 1"
    assert ds.is_test.sum() == 12 and set(ds.table["entity_type"]) == {"book", "movie", "song"}
    assert list(ds.table["decade"]) == [str(y // 10 * 10) for y in years]


def test_historical_figure_csv(tmp_path):
    rows = [["Q1", "Julius Caesar", "Roman general", "Male", "Rome", "politician", "-100", "-44",
             "homicide", "56", "-1.0", "-5.0", "False"],
            ["Q2", "Ada Lovelace", "mathematician", "Female", "UK", "mathematician", "1815",
             "1852", "natural", "36", "18.0", "185.0", "True"]]
    ds = load_dataset(str(write_csv(tmp_path / "hf.csv", HIST_HEADER, rows)))
    assert ds.kind == "historical_figure"
    np.testing.assert_array_equal(ds.target_array[:, 0], [-44.0, 1852.0])
    assert list(ds.table["death_century"]) == ["-1", "18"]
    assert ds.entities == ["Julius Caesar", "Ada Lovelace"] and list(ds.is_test) == [False, True]


def test_headline_csv_period_and_quoted_newline(tmp_path):
    flags = ["False"] * 10
    rows = [["Pilgrims Arrive in Mecca for Annual Hajj.", "900", "2020-07-29T05:00:00+0000", "A",
             "1", "World", "Foreign", "2020", *flags, "False"],
            ["A headline\nover two lines", "500", "2012-01-01", "A", "3", "U.S.", "National",
             "2012", *flags, "True"]]
    ds = load_dataset(str(write_csv(tmp_path / "headline.csv", HEADLINE_HEADER, rows)))
    assert ds.kind == "headline"
    assert ds.entities == ["Pilgrims Arrive in Mecca for Annual Hajj.",
                           "A headline\nover two lines."]  # period appended once
    np.testing.assert_allclose(ds.target_array[:, 0], [2020 + (210 + 5 / 24) / 366, 2012.0])
    assert list(ds.table["news_desk"]) == ["Foreign", "National"]
    assert list(ds.table["pub_year"]) == ["2020", "2012"]


def test_csv_without_is_test_gets_hash_split(tmp_path):
    rows = [world_row(f"Place {i}", 10.0, 20.0)[:-1] for i in range(200)]
    ds = load_dataset(str(write_csv(tmp_path / "w.csv", WORLD_HEADER[:-1], rows)))
    np.testing.assert_array_equal(ds.is_test, hash_split([f"Place {i}" for i in range(200)]))
    assert 0.1 < ds.is_test.mean() < 0.3


def test_entity_dataset_api(tmp_path):
    rows = [world_row(f"P{i}", i, -i, str(i % 2 == 0)) for i in range(5)]
    ds = load_dataset(str(write_csv(tmp_path / "w.csv", WORLD_HEADER, rows)))
    assert isinstance(ds, EntityDataset) and ds.name == "w"
    assert ds.target_array.dtype == np.float64 and ds.target_array.shape == (5, 2)
    np.testing.assert_array_equal(ds.target_array[:, 1], -np.arange(5))
    assert ds.is_test.dtype == bool and list(ds.is_test) == [True, False, True, False, True]
    h = ds.head(2)
    assert len(h) == 2 and h.entities == ["P0", "P1"] and len(ds) == 5
    assert isinstance(h.table.index, pd.RangeIndex)
    json.dumps(ds.summary())


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("lat, lon, column, message", [
    ("abc", "1", "latitude", "'abc' is not a finite number"),
    ("nan", "1", "latitude", "'nan' is not a finite number"),
    ("", "1", "latitude", "missing value"),
    ("95.5", "1", "latitude", r"95.5 is outside \[-90, 90\]"),
    ("-90.01", "1", "latitude", r"is outside \[-90, 90\]"),
    ("1", "180.5", "longitude", r"180.5 is outside \[-180, 180\]"),
    ("1", "inf", "longitude", "'inf' is not a finite number"),
])
def test_bad_coordinates_name_file_line_column(tmp_path, lat, lon, column, message):
    rows = [world_row("Good", 1, 2), world_row("Bad", lat, lon), world_row("Good 2", 3, 4)]
    path = write_csv(tmp_path / "bad.csv", WORLD_HEADER, rows)
    with pytest.raises(DatasetError) as err:
        load_dataset(str(path))
    text = str(err.value)
    assert str(path) in text
    assert f"line 3, column '{column}'" in text
    assert re.search(message, text)
    ds = load_dataset(str(path), drop_invalid=True)
    assert ds.n_dropped == 1 and ds.entities == ["Good", "Good 2"]


def test_boundary_coordinates_are_valid(tmp_path):
    rows = [world_row("N", 90, 180), world_row("S", -90, -180)]
    ds = load_dataset(str(write_csv(tmp_path / "edge.csv", WORLD_HEADER, rows)))
    np.testing.assert_array_equal(ds.target_array, [[90, 180], [-90, -180]])


def test_empty_name_and_bad_is_test(tmp_path):
    # (a third, valid row: dropping every row is an error of its own)
    rows = [world_row("  ", 1, 2), world_row("X", 1, 2, test="maybe"), world_row("Y", 1, 2)]
    path = write_csv(tmp_path / "names.csv", WORLD_HEADER, rows)
    with pytest.raises(DatasetError) as err:
        load_dataset(str(path))
    text = str(err.value)
    assert "line 2, column 'name': empty name" in text
    assert "line 3, column 'is_test': 'maybe' is not True/False" in text
    assert load_dataset(str(path), drop_invalid=True).n_dropped == 2


def test_bad_dates(tmp_path):
    rows = [["Good", "Someone", "1999-05-01", "", "", "", "book", "False", "1990"],
            ["Bad", "Someone", "1999-13-45", "", "", "", "book", "False", "1990"],
            ["Empty", "Someone", "", "", "", "", "book", "False", "1990"]]
    path = write_csv(tmp_path / "art.csv", ART_HEADER, rows)
    with pytest.raises(DatasetError) as err:
        load_dataset(str(path))
    text = str(err.value)
    assert "line 3, column 'release_date': cannot parse '1999-13-45' as a date" in text
    assert "line 4, column 'release_date'" in text
    ds = load_dataset(str(path), drop_invalid=True)
    assert ds.n_dropped == 2 and ds.entities == ["Someone's Good"]


def test_line_numbers_count_quoted_newlines_and_blank_lines(tmp_path):
    path = tmp_path / "ml.csv"
    header = ",".join(WORLD_HEADER)
    path.write_text(
        header + "\n"
        '"Two\nlines",City,France,1,2,1,1,populated_place,,,False\n'  # lines 2-3
        "\n"  # line 4, blank (pandas skips it)
        "Bad,City,France,100,2,1,1,populated_place,,,False\n",  # line 5
        encoding="utf-8")
    with pytest.raises(DatasetError, match=r"line 5, column 'latitude'"):
        load_dataset(str(path))


def test_many_bad_rows_are_summarised(tmp_path):
    rows = [world_row(f"B{i}", 200, 0) for i in range(9)] + [world_row("ok", 0, 0)]
    path = write_csv(tmp_path / "many.csv", WORLD_HEADER, rows)
    with pytest.raises(DatasetError, match=r"9 invalid row\(s\) of 10[\s\S]*and 4 more"):
        load_dataset(str(path))
    assert load_dataset(str(path), drop_invalid=True).n_dropped == 9


def test_drop_invalid_dropping_every_row_is_one_line_error(tmp_path, monkeypatch):
    """--drop-invalid on a CSV without one valid row: a one-line DatasetError saying how many
    rows, the first reasons and that nothing is left, before any model is loaded."""
    rows = [world_row("A", 95, 0), world_row("B", "x", 0), world_row("C", 0, 200),
            world_row("D", "", 0), world_row("E", 91, 0)]
    path = write_csv(tmp_path / "allbad.csv", WORLD_HEADER, rows)
    with pytest.raises(DatasetError) as err:
        load_dataset(str(path), drop_invalid=True)
    text = str(err.value)
    assert "\n" not in text and str(path) in text
    assert "all 5 rows are invalid as kind world_place" in text and "nothing is left" in text
    assert "(first 3 reasons): line 2, column 'latitude': 95 is outside [-90, 90]; line 3, " \
           "column 'latitude': 'x' is not a finite number; line 4, column 'longitude': 200 is " \
           "outside [-180, 180]. Fix the file" in text
    assert "line 5" not in text
    with pytest.raises(DatasetError, match="invalid row"):   # without the flag: the listing
        load_dataset(str(path))
    import actstore.extract as ex

    def no_model(*a, **k):
        raise AssertionError("the model must not be loaded")
    monkeypatch.setattr(ex, "load_model", no_model)
    with pytest.raises(DatasetError, match="all 5 rows are invalid .*nothing is left"):
        ex.extract("smollm2-135m", str(path), "coords", tmp_path / "s.zarr", drop_invalid=True,
                progress=False)
    assert not (tmp_path / "s.zarr").exists()


def test_missing_columns_and_wrong_kind(tmp_path):
    header = [c for c in WORLD_HEADER if c != "longitude"]
    path = write_csv(tmp_path / "nolon.csv", header, [["X", "City", "France", "1", "1", "1",
                                                       "populated_place", "", "", "False"]])
    with pytest.raises(DatasetError, match=r"nolon\.csv: missing column\(s\) 'longitude'"):
        load_dataset(str(path), kind="world_place")
    with pytest.raises(DatasetError, match=r"nolon\.csv: cannot tell .*longitude"):
        load_dataset(str(path))
    with pytest.raises(DatasetError, match="unknown dataset kind"):
        load_dataset(str(path), kind="planets")


def test_malformed_and_non_utf8(tmp_path):
    bad = tmp_path / "fields.csv"
    bad.write_text(",".join(WORLD_HEADER) + "\n" + ",".join(["x"] * 13) + "\n")
    with pytest.raises(DatasetError, match=r"fields\.csv: malformed CSV.*line 2"):
        load_dataset(str(bad))
    latin = tmp_path / "latin.csv"
    latin.write_bytes((",".join(WORLD_HEADER) + "\n").encode() +
                      "Fréjus,City,France,1,2,1,1,populated_place,,,False\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"latin\.csv: line 2: not valid UTF-8"):
        load_dataset(str(latin))
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DatasetError, match="empty file"):
        load_dataset(str(empty))


def test_unknown_names(tmp_path):
    with pytest.raises(DatasetError, match="not a built-in .* no such file"):
        load_dataset(str(tmp_path / "nope.csv"))
    with pytest.raises(DatasetError, match=r"not in the cache .*actstore datasets fetch art"):
        load_dataset("art")
    with pytest.raises(DatasetError, match="is of kind world_place"):
        load_dataset("world_cities", kind="us_place")


# ----------------------------------------------------------------------------- built-ins
@pytest.fixture(scope="module")
def _shared_cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("builtin-cache")


@pytest.fixture
def shared_cache(_shared_cache_dir, monkeypatch):
    # built-ins are built once per module and then read from this cache
    monkeypatch.setenv("ACTSTORE_CACHE", str(_shared_cache_dir))
    return _shared_cache_dir


@pytest.mark.parametrize("name, kind, types, groups", [
    ("world_cities", "world_place", {"city", "airport"}, ("country", "continent")),
    ("us_places", "us_place", {"city", "airport"}, ("state_name", "timezone")),
    ("nobel", "historical_figure",
     {"physics", "chemistry", "medicine", "literature", "peace", "economics"}, ("decade",)),
    ("films", "art", {"feature film", "documentary film", "animated film"},
     ("decade", "country")),
])
def test_builtins(name, kind, types, groups, shared_cache):
    ds = load_dataset(name)
    assert list(shared_cache.glob(f"builtin/{name}-*.csv"))
    assert ds.kind == kind and ds.source == f"builtin:{name}" and ds.group_columns == groups
    assert set(ds.table["entity_type"]) == types
    assert len(ds) > 500 and ds.table["entity"].is_unique
    assert 0.15 < ds.is_test.mean() < 0.25
    assert np.isfinite(ds.target_array).all()
    for g in groups:
        assert ds.table[g].map(type).eq(str).all() and (ds.table[g] != "").all()
    # the split is a function of the entity alone, and a prefix is a fair sample
    np.testing.assert_array_equal(ds.is_test, hash_split(ds.entities))
    head = ds.head(300)
    assert len(set(head.table["entity_type"])) == len(types) or name in ("nobel", "films")
    # deterministic: a fresh build equals the cached table, bit for bit
    again = build_builtin(name)
    pd.testing.assert_frame_equal(again, ds.table, check_dtype=False)
    assert load_dataset(name).sha256 == ds.sha256


def test_builtin_contents(shared_cache):
    us = load_dataset("us_places").table
    assert not us["state_name"].isin(["Alaska", "Hawaii"]).any()
    assert us["latitude"].between(24, 50).all() and us["longitude"].between(-125, -66).all()
    chicago = us.loc[us["entity"] == "Chicago"].iloc[0]
    assert chicago["state_name"] == "Illinois" and abs(chicago["latitude"] - 41.85) < 0.2
    ohare = us.loc[us["entity"].str.contains("O'Hare")].iloc[0]
    assert ohare["state_name"] == "Illinois" and ohare["entity_type"] == "airport"
    world = load_dataset("world_cities").table
    tokyo = world.loc[world["entity"] == "Tokyo"].iloc[0]
    assert tokyo["country"] == "Japan" and tokyo["continent"] == "Asia"
    assert world["continent"].nunique() == 6  # Antarctica has no large cities
    nobel = load_dataset("nobel").table
    assert nobel["year"].between(1901, 2010).all()
    curie = nobel.loc[nobel["entity"].str.contains("Marie Curie")]
    assert len(curie) == 1 and curie["year"].iloc[0] == 1903  # first prize only
    assert "Frédéric Passy" in set(nobel["entity"])  # Latin-1 source decoded


def test_builtin_films(shared_cache):
    films = load_dataset("films")
    t = films.table
    assert 15_000 < len(t) < 20_000 and t["entity"].is_unique
    assert films.targets == ("year",) and films.target_array.dtype == np.float64
    year = films.target_array[:, 0]
    assert year.min() >= 1940 and year.max() < 2015 and np.isfinite(year).all()
    assert (t["decade"] == [str(int(y // 10 * 10)) for y in year]).all()
    assert set(t["decade"]) == {str(d) for d in range(1940, 2020, 10)}
    assert 0.18 < films.is_test.mean() < 0.22
    # "{first director}'s {title}", as the paper's art entities; the release date's fraction
    row = t.loc[t["entity"] == "Steven Spielberg's Jaws"].iloc[0]
    assert row["name"] == "Jaws" and 1975.4 < row["year"] < 1975.5   # released 20 June 1975
    assert t.loc[t["entity"] == "Ridley Scott's Blade Runner", "year"].iloc[0] == 1982.0
    assert "Eric Darnell's Antz" in set(t["entity"])             # first of two directors
    assert t.loc[t["entity"] == "Eric Darnell's Antz", "entity_type"].iloc[0] == "animated film"
    assert t["entity"].str.contains(r"^[^']+'s? \S").mean() > 0.97
    assert t.loc[t["name"] == "The Intouchables", "country"].iloc[0] == "France"
    # disjoint from the other time built-in
    assert not set(t["entity"]) & set(load_dataset("nobel").entities)
    # the split is the entity's hash, whatever the row order
    shuffled = t.sample(frac=1.0, random_state=0)
    np.testing.assert_array_equal(hash_split(shuffled["entity"].tolist()),
                                  shuffled["is_test"].to_numpy())


def test_builtin_provenance(shared_cache):
    from actstore.datasets.builtin import BUILTINS, builtin_provenance

    for name, spec in BUILTINS.items():
        p = builtin_provenance(name)
        assert p["licence"] and p["provenance"], name
        assert set(p["packages"]) == set(spec.packages)
        assert all(v != "?" for v in p["packages"].values()), name   # all installed
    films = builtin_provenance("films")
    assert "CC0-1.0" in films["licence"] and "Wikidata" in films["provenance"]
    rows = {r["name"]: r for r in list_datasets()}
    assert rows["films"]["licence"] == films["licence"] and rows["films"]["kind"] == "art"


def test_films_refuses_a_non_cc0_movies_db(monkeypatch):
    from actstore.datasets import builtin

    monkeypatch.setattr(builtin, "_films_licence", lambda: "CC-BY-NC-4.0")
    with pytest.raises(DatasetError, match=r"licensed CC-BY-NC-4.0.*bokeh-sampledata>=2026\.1"):
        build_builtin("films")


def test_hash_split_properties():
    keys = [f"k{i}" for i in range(5000)]
    s = hash_split(keys)
    assert 0.18 < s.mean() < 0.22
    perm = np.random.default_rng(1).permutation(5000)
    np.testing.assert_array_equal(hash_split([keys[i] for i in perm]), s[perm])


def test_list_datasets():
    rows = {r["name"]: r for r in list_datasets()}
    assert set(rows) == {"world_cities", "us_places", "nobel", "films", *KINDS}
    assert rows["nobel"]["available"] and not rows["art"]["available"]
    assert rows["art"]["url"].endswith("/data/entity_datasets/art.csv")
    json.dumps(list(rows.values()))


@pytest.mark.slow
def test_world_place_loads_fast(paper_data):
    import time

    t = time.perf_counter()
    load_csv(paper_data / "world_place.csv")
    assert time.perf_counter() - t < 3.0
