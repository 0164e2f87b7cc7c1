"""Resume plan and progress of a store: which rows are written and durable, and which row
windows still need a writer (docs/store-format.md, "rows_done and durability" and "Row ranges").

A store records ``rows_done`` (the finished prefix), ``ranges_done`` (finished intervals past
it) and, while a distributed extraction runs, one progress record per writer. Work is divided
in windows of ``rows_per_chunk`` rows, the store's shards, so no file ever has two writers.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from actstore.errors import StoreError
from actstore.io import write_atomic, write_json
from actstore.store.format import PROGRESS_GROUP, RANGE_KEY

__all__ = ["merge_intervals", "subtract_intervals", "todo_windows", "split_windows", "segments",
           "RangeRecord", "Progress"]


def merge_intervals(intervals) -> list[tuple[int, int]]:
    """Sorted, merged half-open row intervals (touching ones join; empty ones dropped)."""
    out: list[list[int]] = []
    for a, b in sorted((int(a), int(b)) for a, b in intervals if int(b) > int(a)):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def subtract_intervals(intervals, minus) -> list[tuple[int, int]]:
    """The rows of ``intervals`` outside every interval of ``minus``, merged and sorted (e.g.
    the finished rows less those a repair must re-extract)."""
    out = []
    cut = merge_intervals(minus)
    for a, b in merge_intervals(intervals):
        for c, d in cut:
            if d <= a or c >= b:
                continue
            if c > a:
                out.append((a, c))
            a = max(a, d)
            if a >= b:
                break
        if a < b:
            out.append((a, b))
    return out


def todo_windows(n_rows: int, rows_per_chunk: int, done) -> list[int]:
    """Start rows of the windows ``[w, min(w + R, n))`` not inside a ``done`` interval."""
    R = int(rows_per_chunk)
    out = []
    iv = sorted((int(a), int(b)) for a, b in done)
    j = 0
    for w in range(0, int(n_rows), R):
        e = min(int(n_rows), w + R)
        while j < len(iv) and iv[j][1] < e:
            j += 1
        if not (j < len(iv) and iv[j][0] <= w and e <= iv[j][1]):
            out.append(w)
    return out


def split_windows(windows: list[int], world: int) -> list[list[int]]:
    """Deal ``windows`` (sorted) to ``world`` ranks: contiguous runs whose sizes differ by at
    most one window, rank 0 first (so a fresh store gives rank r one contiguous row range)."""
    n, world = len(windows), max(1, int(world))
    base, extra = divmod(n, world)
    out, i = [], 0
    for r in range(world):
        k = base + (1 if r < extra else 0)
        out.append(list(windows[i:i + k]))
        i += k
    return out


def segments(windows: list[int], rows_per_chunk: int, n_rows: int) -> list[tuple[int, int]]:
    """Maximal contiguous row ranges ``[start, stop)`` covered by ``windows`` (sorted)."""
    R = int(rows_per_chunk)
    out: list[list[int]] = []
    for w in windows:
        e = min(int(n_rows), w + R)
        if out and out[-1][1] == w:
            out[-1][1] = e
        else:
            out.append([w, e])
    return [(a, b) for a, b in out]


class RangeRecord:
    """Progress of one writer over the window-aligned row range ``[start, stop)``: rows
    ``[start, done)`` are written and durable. Each record has one writer process, so no two
    processes ever rewrite the same file (zarr attribute updates are read-modify-write)."""

    def __init__(self, store_path: Path, start: int, stop: int, fsync: bool = True):
        self.start, self.stop = int(start), int(stop)
        self.dir = Path(store_path) / PROGRESS_GROUP / f"{self.start}-{self.stop}"
        self.done = self.start
        self.fsync = fsync

    def update(self, done: int) -> None:
        done = int(done)
        if not self.start <= done <= self.stop:
            raise StoreError(f"range record [{self.start}, {self.stop}): done={done} outside it")
        write_json(self.dir / "zarr.json", {
            "zarr_format": 3, "node_type": "group",
            "attributes": {RANGE_KEY: {"start": self.start, "stop": self.stop, "done": done}}},
            indent=None, mkdir=True, fsync=self.fsync)
        self.done = done


class Progress:
    """Mixin of :class:`~actstore.store.reader.ActivationStore`: its rows_done, ranges and
    progress records (reading and recording them)."""

    @property
    def rows_done(self) -> int:
        if self.format == "zarr":
            return int(self._h.attrs["rows_done"])
        return int(self._h["rows_done"][0])

    @property
    def complete(self) -> bool:
        return self.rows_done >= self.n_rows

    def _check_writable(self):
        if self.mode == "r":
            raise StoreError(f"{self.path}: store is open read-only (open_store(path, mode='a'))")

    def mark_done(self, rows_done: int) -> None:
        """Record that rows ``[0, rows_done)`` are written (call only after their write)."""
        self._check_writable()
        rows_done = int(rows_done)
        if not 0 <= rows_done <= self.n_rows:
            raise StoreError(f"rows_done={rows_done} outside [0, {self.n_rows}]")
        if self.format == "zarr":
            self._put_attrs({**dict(self._h.attrs), "rows_done": rows_done})
        else:
            self._h["rows_done"][0] = rows_done      # in-place raw write, pre-allocated
            self._h.flush()
            if self.durable:
                os.fsync(self._h.id.get_vfd_handle())

    def _put_attrs(self, attrs: dict) -> None:
        """Rewrite the group's ``zarr.json`` with ``attrs`` (the bytes zarr writes) through a
        temporary file, durable before the rename when ``durable`` (zarr's own write has no
        fsync: a power loss could leave a torn zarr.json, and the header lives there)."""
        import zarr  # deferred, as everywhere in the store (a light `import actstore`)
        from zarr.core.buffer import default_buffer_prototype

        meta = dataclasses.replace(self._h.metadata, attributes=attrs)
        raw = meta.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()
        write_atomic(self.path / "zarr.json", raw, fsync=self.durable)
        self._h = zarr.open_group(str(self.path), mode="r+")

    # -- row ranges (distributed extraction; docs/store-format.md "Row ranges")
    @property
    def ranges_done(self) -> list[tuple[int, int]]:
        """Finished row intervals ``[start, stop)`` past ``rows_done`` (left by a distributed
        extraction that stopped early; empty for a complete or prefix-written store). Readers
        of this API still see only ``[0, rows_done)``."""
        if self.format != "zarr":
            return []
        return [(int(a), int(b)) for a, b in self._h.attrs.get("ranges_done", [])]

    def range_records(self) -> list[tuple[int, int, int]]:
        """(start, stop, done) of every per-range progress record (writers running or killed)."""
        if self.format != "zarr":
            return []
        out = []
        for f in sorted((self.path / PROGRESS_GROUP).glob("*/zarr.json")):
            try:
                r = json.loads(f.read_text())["attributes"][RANGE_KEY]
                out.append((int(r["start"]), int(r["stop"]), int(r["done"])))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # a record is only a hint that rows are done: ignoring one is safe
        return out

    def done_intervals(self) -> list[tuple[int, int]]:
        """Every written, durable row interval: ``[0, rows_done)``, ``ranges_done`` and the
        per-range records, merged and sorted."""
        iv = [(0, self.rows_done)] + self.ranges_done
        iv += [(a, d) for a, _, d in self.range_records()]
        return merge_intervals(iv)

    def _set_done(self, intervals) -> None:
        iv = merge_intervals(intervals)
        prefix = iv[0][1] if iv and iv[0][0] == 0 else 0
        rest = [[a, b] for a, b in iv if a > 0]
        if self.format != "zarr":
            if rest:
                raise StoreError(f"{self.path}: HDF5 stores record only a rows_done prefix; "
                                 f"rows {rest} are not adjacent to it")
            self.mark_done(prefix)
            return
        attrs = dict(self._h.attrs)
        new = {k: v for k, v in attrs.items() if k != "ranges_done"}
        new["rows_done"] = int(min(prefix, self.n_rows))
        if rest:
            new["ranges_done"] = rest
        if new != attrs:
            self._put_attrs(new)  # one atomic rewrite of zarr.json

    def mark_rows(self, start: int, stop: int) -> None:
        """Record that rows ``[start, stop)`` are written (the single-writer form of
        :meth:`mark_done` for blocks that need not extend the prefix). Only one process may
        call it on a store: it rewrites the group attributes."""
        self._check_writable()
        if not 0 <= int(start) <= int(stop) <= self.n_rows:
            raise StoreError(f"rows [{start}, {stop}) outside [0, {self.n_rows}]")
        self._set_done([(0, self.rows_done), (start, stop)] + self.ranges_done)

    def range_record(self, start: int, stop: int) -> RangeRecord:
        """A progress record for one writer's range (distributed extraction). Call
        :meth:`begin_ranges` once (one process) before writers create records."""
        if self.format != "zarr":
            raise StoreError(f"{self.path}: only Zarr stores take parallel writers "
                             "(HDF5 files allow one writer)")
        return RangeRecord(self.path, start, stop, fsync=self.durable)

    def begin_ranges(self) -> None:
        """Create the (zarr group) directory that holds per-range records (one process)."""
        self._check_writable()
        g = self.path / PROGRESS_GROUP
        g.mkdir(exist_ok=True)
        if not (g / "zarr.json").exists():
            write_json(g / "zarr.json", {"zarr_format": 3, "node_type": "group",
                                         "attributes": {}}, indent=None, fsync=self.durable)

    def finalize_ranges(self, finished=None) -> int:
        """Fold the per-range records into ``rows_done`` / ``ranges_done`` and delete them;
        returns ``rows_done`` (``n_rows`` once every range is complete). One process only, with
        no writer running: rank 0 after the others finished, or an exclusive ``open_store``.

        ``finished``: the durable ``(start, stop)`` row ranges the writers of this run report
        (rank 0 gathers them over the process group). They are folded instead of listing the
        records: on a network file system (NFS attribute caching) a directory listing may miss
        a record another node has just written. None: list the records (an exclusive open,
        e.g. after a crash, when every record is long written)."""
        self._check_writable()
        if self.format != "zarr":
            return self.rows_done
        if finished is None:
            self._set_done(self.done_intervals())
        else:
            self._set_done([(0, self.rows_done)] + self.ranges_done
                           + [(int(a), int(b)) for a, b in finished])
        g = self.path / PROGRESS_GROUP
        if g.exists():
            # the records are folded: a leftover (an NFS silly-rename file) is only a hint
            # that the next exclusive open folds again, so failing to delete one is harmless
            shutil.rmtree(g, ignore_errors=finished is not None)
        return self.rows_done
