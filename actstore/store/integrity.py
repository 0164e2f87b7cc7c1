"""Checking a whole store (``actstore verify``; the API a repair uses): the open-time checks, then
every row block below ``rows_done`` read and compared with its checksum, and every entity column
with its own. :func:`check_store` lists every problem instead of stopping at the first, and
:attr:`IntegrityReport.bad_rows` gives the row ranges a repair must re-extract.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from actstore.errors import StoreError
from actstore.store.checks import Problem, settle, structure_problems
from actstore.store.checksums import crc32c
from actstore.store.format import CODES_GROUP, TOKENS_GROUP, detect_format
from actstore.store.layout import block_rows, blocks_of, checksum_key, shard_key
from actstore.store.progress import merge_intervals
from actstore.store.reader import ActivationStore, open_store

__all__ = ["Problem", "IntegrityReport", "check_store"]


@dataclass
class IntegrityReport:
    """What :func:`check_store` found.

    Attributes
    ----------
    path : Path
    format : {"zarr", "hdf5"}
    problems : list of Problem
        Each names the file, array, layers (first, last), rows [start, stop), what is wrong and
        whether re-extracting the rows repairs it.
    checksums : bool
        The store has checksums (a store made before them can only be checked for structure
        and readability).
    blocks_checked : int
        (array, row block) pairs read whole (and compared with their checksums).
    rows_done : int or None
    """

    path: Path
    format: str
    problems: list = field(default_factory=list)
    checksums: bool = False
    blocks_checked: int = 0
    rows_done: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def repairable(self) -> bool:
        """Every problem is repaired by re-extracting :attr:`bad_rows` (``--repair``)."""
        return bool(self.problems) and all(p.repairable for p in self.problems)

    @property
    def bad_rows(self) -> list[tuple[int, int]]:
        """Sorted, merged ``[start, stop)`` row ranges whose blocks must be re-extracted (the
        rows of every repairable problem)."""
        return merge_intervals(p.rows for p in self.problems if p.repairable and p.rows)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "format": self.format, "ok": self.ok,
                "checksums": self.checksums, "blocks_checked": self.blocks_checked,
                "rows_done": self.rows_done, "repairable": self.repairable,
                "bad_rows": [list(r) for r in self.bad_rows],
                "problems": [p.to_dict() for p in self.problems]}


def check_store(path_or_store, content: bool = True) -> IntegrityReport:
    """Check a store and list every problem.

    Parameters
    ----------
    path_or_store : str, Path or ActivationStore
        A store path (opened read-only here, without the open-time checks, so that a damaged
        store can be examined), or an open store.
    content : bool
        Also read every finished row block (and entity column) and compare it with its
        checksum; a store without checksums is read whole to find undecodable data.

    Returns
    -------
    IntegrityReport

    Raises
    ------
    StoreError
        ``path`` is not an activation store at all (nothing to check).
    """
    if isinstance(path_or_store, ActivationStore):
        return _check(path_or_store, content)
    path = Path(path_or_store)
    fmt = detect_format(path)     # StoreError for what is not a store at all
    try:
        store = open_store(path, verify=False, check=False)
    except StoreError as exc:
        if not exc.replaceable:
            raise
        # ours but unreadable: header damaged, another version, creation interrupted
        where = path / "zarr.json" if fmt == "zarr" else path
        return IntegrityReport(path, fmt, [Problem(str(where), str(exc).replace(
            f"{path}: ", "", 1))])
    try:
        return _check(store, content)
    finally:
        store.close()


def _check(store: ActivationStore, content: bool) -> IntegrityReport:
    problems = structure_problems(store)
    rep = IntegrityReport(store.path, store.format, checksums=store.checksums.present)
    if any(p.array == "rows_done" for p in problems):
        rep.problems = problems
        return rep
    rep.rows_done = store.rows_done
    if content:
        problems += _entity_content(store, problems)
        problems += _block_content(store, problems, rep)
    rep.problems = settle(problems)
    return rep


def _entity_content(store: ActivationStore, known: list[Problem]) -> list[Problem]:
    """Every entity column, code array and token array read (and compared with its crc32c),
    but those found damaged."""
    kinds = store._header["entity_kinds"]
    cols = [("entities", c, kinds[c]) for c in store._header["entity_columns"]]
    if store._header.get("format_version") != 1:
        cols += [(CODES_GROUP, c, "int32") for c in store._header["entity_columns"]
                 if kinds[c] == "str"]
    if store.ragged:
        cols += [(TOKENS_GROUP, "offsets", "int64"), (TOKENS_GROUP, "ids", "int32")]
    out = []
    for group, c, kind in cols:
        if any(p.array == group and _about(store, p.file, f"{group}/{c}") for p in known):
            continue
        try:
            v = store._entity_column(c, kind, store.checksums.table(group) or {}, group)
        except StoreError as exc:
            out.append(exc.problem)
            continue
        if group == TOKENS_GROUP and c == "offsets":
            bad = _offsets_problem(v, store.n_rows)
            if bad:
                out.append(Problem(_where(store, f"{group}/{c}"), f"token offsets: {bad}",
                                   group))
    return out


def _offsets_problem(offsets, n_rows: int) -> str | None:
    """What is wrong with a ragged store's offsets (a store without checksums may hold any)."""
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != n_rows:
        return f"they must run from 0 to n_rows={n_rows}"
    if (offsets[1:] < offsets[:-1]).any():
        return "they decrease somewhere (they must be non-decreasing)"
    return None


def _about(store: ActivationStore, file: str, key: str) -> bool:
    """``file`` (a problem's) is the node ``key`` or a file inside it."""
    where = _where(store, key)
    return file == where or file.startswith(where + "/")


def _where(store: ActivationStore, key: str) -> str:
    return str(store.path / key) if store.format == "zarr" else f"{store.path} (dataset {key})"


def _block_content(store: ActivationStore, known: list[Problem], rep: IntegrityReport
                   ) -> list[Problem]:
    """Every finished row block of every array read whole and compared with its crcs (blocks
    with a problem already found are skipped)."""
    R, N = store.rows_per_chunk, store.n_rows
    done = merge_intervals([(0, store.rows_done)] + store.ranges_done)
    seen = {(p.array, p.rows) for p in known if p.rows is not None}
    broken = {p.array for p in known if p.rows is None}
    out = []
    for name in store.arrays:
        if name in broken:
            continue         # its metadata is damaged: its blocks cannot be read
        reader = store._reader(name)
        pos = list(range(store.n_layers))
        for b in blocks_of(done, R):
            rows = block_rows(b, R, N)
            if (name, rows) in seen:
                continue
            try:
                x = reader.read(pos, rows[0], rows[1], verify=False)
            except StoreError as exc:
                out.append(exc.problem)
                continue
            rep.blocks_checked += 1
            want = store.checksums.get(name, b) if rep.checksums else None
            if want is None:
                if rep.checksums:
                    out.append(Problem(str(store.path / checksum_key(name, b)), "checksum "
                               "file missing or damaged", name, (store.layers[0],
                                                                 store.layers[-1]), rows, True))
                continue
            bad = [store.layers[i] for i in range(store.n_layers)
                   if crc32c(x[i]) != int(want[i])]
            if bad:
                out.append(Problem(
                    _where(store, shard_key(name, b) if store.format == "zarr" else name),
                    f"checksum mismatch in {len(bad)} of {store.n_layers} layers (the data is "
                    "not what was written: bit flips, or another block's data)", name,
                    (bad[0], bad[-1]), rows, True))
    return out
