"""The entity table every loader produces, and the schemas of the paper's six datasets.

:class:`EntityDataset` holds one row per entity: ``name`` (as published), ``entity`` (the
normalised string fed to the model), the targets (float64, by name: ``latitude``/``longitude``
for places, ``year`` for time), ``is_test``, ``entity_type`` and the group columns used by
hold-out experiments. The bottom of actstore.datasets: the other modules build on it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from actstore.datasets.kinds import KINDS, PLACE_TARGETS, TIME_TARGETS
from actstore.errors import DatasetError

__all__ = ["KINDS", "PLACE_TARGETS", "TIME_TARGETS", "EntityDataset", "Schema", "SCHEMAS",
           "detect_kind", "hash_uniform", "hash_split", "TEST_FRACTION"]

TEST_FRACTION = 0.2


@dataclass
class EntityDataset:
    """One row per entity; see the module docstring for the columns of ``table`` (and
    :mod:`actstore.datasets.generic` for a table of kind "table")."""

    name: str
    kind: str
    table: pd.DataFrame
    targets: tuple[str, ...]
    group_columns: tuple[str, ...]
    source: str
    sha256: str  # of the source bytes; head() keeps it (a prefix of the same source)
    n_dropped: int = 0
    target_kinds: dict[str, str] = field(default_factory=dict)
    """"regression" or "class" per target, in the order of ``targets`` (a target not named
    here is "regression": the paper's and the built-ins' targets)."""
    has_entity: bool = True
    """False for a text-only table: no entity span (``entity`` is "", offsets -1)."""
    template: str | None = None
    """The ``{entity}`` template that built ``text`` (a table of entity + template), else None."""

    def __post_init__(self):
        self.target_kinds = {t: self.target_kinds.get(t, "regression") for t in self.targets}

    @property
    def entities(self) -> list[str]:
        return self.table["entity"].tolist()

    @property
    def target_array(self) -> np.ndarray:
        """(n, len(targets)) float64, columns in the order of ``targets`` (regression targets
        only: a string class target has no number)."""
        text = [t for t in self.targets
                if not pd.api.types.is_numeric_dtype(self.table[t])]
        if text:
            raise DatasetError(f"target(s) {', '.join(map(repr, text))} are class labels "
                               f"(strings), not numbers; read them from ds.table")
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
            if self.target_kinds[col] == "class":
                counts = t[col].value_counts()
                targets[col] = {"kind": "class", "classes": int(len(counts)),
                                "counts": {str(k): int(v) for k, v in counts.head(10).items()}}
                continue
            v = t[col].to_numpy(dtype=np.float64)
            targets[col] = (
                {"min": float(v.min()), "max": float(v.max()), "mean": float(v.mean())}
                if len(v) else {"min": None, "max": None, "mean": None}
            )
        types = t["entity_type"].value_counts()
        examples = t["text" if "text" in t.columns else "entity"].head(3).tolist()
        extra = {} if self.kind != "table" else {
            "target_kinds": dict(self.target_kinds), "has_entity": self.has_entity,
            "template": self.template}
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
            "examples": examples,
            **extra,
        }


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
        f"column(s) {', '.join(map(repr, missing))}. Pass --kind KIND (one of {', '.join(KINDS)}), "
        f"or, for your own table, --text-column COL (the full text) or --entity-column COL "
        f"--template '... {{entity}} ...' (table=TableSpec(...))."
    )


def hash_uniform(keys, salt: str = "") -> np.ndarray:
    """blake2b(salt + key) read as a uniform number in [0, 1), per key."""
    out = np.empty(len(keys), dtype=np.float64)
    for i, key in enumerate(keys):
        h = hashlib.blake2b((salt + str(key)).encode("utf-8"), digest_size=8).digest()
        out[i] = int.from_bytes(h, "little") / 2.0**64
    return out


def hash_split(keys, fraction: float = TEST_FRACTION) -> np.ndarray:
    """is_test per key: hash_uniform(key) < ``fraction`` (about that fraction of test rows,
    independent of row order; equal keys always land on the same side)."""
    return hash_uniform(keys) < fraction
