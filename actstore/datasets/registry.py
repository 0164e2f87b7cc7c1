"""The front door of actstore.datasets: every dataset by name or path, and the list of them."""
from __future__ import annotations

from pathlib import Path

from actstore.datasets.builtin import BUILTINS, builtin_cache_path, load_builtin
from actstore.datasets.fetch import dataset_url
from actstore.datasets.paper import load_csv, paper_path
from actstore.datasets.table import KINDS, SCHEMAS, EntityDataset
from actstore.errors import DatasetError

__all__ = ["load_dataset", "list_datasets"]


def load_dataset(name_or_path: str, kind: str | None = None,
                 drop_invalid: bool = False) -> EntityDataset:
    """A built-in name, a paper kind (fetched into the cache), or a CSV path."""
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
