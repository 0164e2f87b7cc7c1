"""The front door of actstore.datasets: every dataset by name or path, and the list of them."""
from __future__ import annotations

from pathlib import Path

from actstore.datasets.builtin import (
    BUILTINS,
    builtin_cache_path,
    builtin_provenance,
    load_builtin,
)
from actstore.datasets.fetch import dataset_url
from actstore.datasets.generic import FILE_SUFFIXES, TableSpec, load_table
from actstore.datasets.paper import load_csv, paper_path
from actstore.datasets.table import KINDS, SCHEMAS, EntityDataset
from actstore.errors import DatasetError

__all__ = ["load_dataset", "list_datasets"]


def load_dataset(name_or_path: str, kind: str | None = None, drop_invalid: bool = False,
                 table: TableSpec | None = None) -> EntityDataset:
    """A built-in name, a paper kind (fetched into the cache), a paper CSV path, or your own
    table (with ``table``).

    Parameters
    ----------
    name_or_path : str or Path
        A built-in name, a paper kind, a path, or (with ``table``) any source
        :func:`~actstore.datasets.generic.load_table` reads (files, saved HF datasets, hf:...).
    kind : str, optional
        The paper schema of a CSV (default: recognised from its columns); not with ``table``.
    drop_invalid : bool
        Drop invalid rows (counted in ``n_dropped``) instead of raising.
    table : TableSpec, optional
        The columns of your own table; then the generic loader reads it (kind "table").

    Returns
    -------
    EntityDataset

    Raises
    ------
    DatasetError
        An unknown name, a missing file, or an invalid table (see the loaders).
    """
    key = str(name_or_path)
    if table is not None:
        if kind not in (None, "table"):
            raise DatasetError(f"--kind {kind} names a paper schema; a table read with "
                               f"--text-column/--entity-column takes no --kind")
        return load_table(key, table, drop_invalid=drop_invalid)
    own = ("pass --text-column COL (the full text), or --entity-column COL --template "
           "'... {entity} ...' (table=TableSpec(...))")
    if kind == "table":
        raise DatasetError(f"kind 'table' is your own table: {own}")
    if key.startswith("hf:"):
        raise DatasetError(f"{key} is your own table: {own}")
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
        base = Path(key.rpartition("@")[0]).expanduser()
        if "@" in key and base.is_dir():
            raise DatasetError(f"{key} is your own table: {own}")
        raise DatasetError(
            f"no dataset {key!r}: not a built-in ({', '.join(BUILTINS)}), not a paper dataset "
            f"({', '.join(KINDS)}), and no such file"
        )
    if path.is_dir() or FILE_SUFFIXES.get(path.suffix.lower(), "csv") != "csv":
        raise DatasetError(f"{path} is not a paper CSV; to read your own table {own}")
    return load_csv(path, kind=kind, drop_invalid=drop_invalid)


def list_datasets() -> list[dict]:
    """Every dataset load_dataset knows by name, with where it comes from and availability."""
    out = []
    for name, spec in BUILTINS.items():
        out.append({
            "name": name, "kind": spec.kind, "source": "builtin", "available": True,
            "cached": builtin_cache_path(name).exists(), "description": spec.description,
            "targets": list(SCHEMAS[spec.kind].targets), "group_columns": list(spec.group_columns),
            **builtin_provenance(name),
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
