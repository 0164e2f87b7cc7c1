"""Which store a run writes into, and which rows it computes: check every row's length, take
the store's writer lock (actstore.store.lock), then resume a store made the same way
(:data:`IDENTITY_KEYS` and the layout options given must match), refuse one made otherwise,
or create one; under torchrun rank 0 does this (holding the lock for the job) and broadcasts
the plan (:func:`prepare`), the windows are dealt to the ranks (:func:`assign`), and at the end
the ranks exchange their finished ranges, which rank 0 folds into ``rows_done``
(:func:`finish_ranks`). The progress records themselves live in actstore.store.progress;
docs/scale-out.md tells the whole story."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import actstore
from actstore.distributed import Context, exchange, mark_all_ranks, raise_failures
from actstore.errors import ExtractError, PeerError, StoreError
from actstore.extract.capture import HOOK_POINT, SITE_HOOKS, TOKEN_RULES
from actstore.extract.config import DEFAULT_BATCH_SIZE, ExtractConfig
from actstore.extract.tokens import EncodedRows, check_lengths, token_limit
from actstore.extract.writer import pause_point
from actstore.store import create_store, default_rows_per_chunk, open_store
from actstore.store.format import format_from_path
from actstore.store.lock import StoreLock
from actstore.store.progress import segments, split_windows, todo_windows

__all__ = ["IDENTITY_KEYS", "Inputs", "Share", "store_meta", "prepare", "take_lock", "assign",
           "finish_ranks"]

# batch_size, padding_side and compute_dtype change values at rounding level: a resume must
# use the ones the store was made with to reproduce an uninterrupted run bit for bit.
# position, sites and table (a table's columns and template) change what a row is.
IDENTITY_KEYS = ("model", "prompt", "dataset", "layers", "dtype", "neurons", "compute_dtype",
                 "batch_size", "padding_side", "position", "sites", "table")


class _PeerCopy(ExtractError, PeerError):
    """Another rank's error (rank 0's, or "rank K failed: ..."), raised so that every rank
    stops; the CLI prints it on rank 0 only (the failing rank prints its own)."""


@dataclass
class Inputs:
    """What a run extracts: the dataset, prompt (None for a table of your own) and model,
    resolved, the layers, sites and position, and every text's token ids."""
    ds: object                 # EntityDataset
    prompt: object             # Prompt, or None (a table's own texts)
    lm: object                 # LoadedModel
    layers: list[int]
    d_mlp: int | None          # MLP width when neurons are stored, else None
    rows: EncodedRows          # token ids of every text (BOS + prompt + entity, or BOS + text)
    sites: dict = field(default_factory=dict)   # {site: width}, in store order
    position: str = "last-entity"
    table: dict | None = None  # a table of your own: its TableSpec fields (meta "table")

    @property
    def n_rows(self) -> int:
        """The store's rows: texts, or tokens for ``--position all``."""
        return self.rows.n_rows(self.position)

    @cached_property
    def labels(self) -> list[str]:
        """Each text's entity, or its text when it has none (error messages)."""
        t = self.ds.table
        if "text" in t.columns and "entity_start" in t.columns:
            return [e if s >= 0 else x for e, s, x in
                    zip(t["entity"].tolist(), t["entity_start"].tolist(), t["text"].tolist())]
        return t["entity"].tolist()


def _identity(meta: dict) -> dict:
    """The parts of the metadata that must match for a store to be resumed."""
    m = meta["model"]
    return {
        "model": {k: m.get(k) for k in ("id", "file_sha256", "revision", "files_sha256")},
        "prompt": meta["prompt"],
        "dataset": {k: meta["dataset"].get(k) for k in ("name", "sha256", "n_rows", "kind")},
        "layers": meta["layers"],
        "dtype": meta["dtype"],
        "neurons": meta["neurons"],
        "compute_dtype": m.get("compute_dtype"),
        "batch_size": meta.get("batch_size"),
        "padding_side": meta.get("padding_side"),
        # a store made before positions and sites existed: last-entity, resid (+ neurons)
        "position": meta.get("position", "last-entity"),
        "sites": meta.get("sites", ["resid"] + (["neurons"] if meta.get("neurons") else [])),
        "table": meta.get("table"),
    }


def _differences(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for every identity item that differs (dict items key by key)."""
    a, b = _identity(old), _identity(new)
    out = []
    for k in IDENTITY_KEYS:
        va, vb = a[k], b[k]
        if va == vb:
            continue
        if isinstance(va, dict) and isinstance(vb, dict):
            out.extend(f"{k}.{s}: {va.get(s)!r} -> {vb.get(s)!r}"
                       for s in sorted(set(va) | set(vb)) if va.get(s) != vb.get(s))
        else:
            out.append(f"{k}: {va!r} -> {vb!r}")
    return out


def store_meta(cfg: ExtractConfig, inp: Inputs, dtype_reason: str | None = None) -> dict:
    """The store's ``meta`` for this run (docs/store-format.md); versions and the creation
    time are read now. ``cfg.dtype`` is resolved (not "auto"); ``dtype_reason`` says why."""
    import torch  # deferred: `actstore --help` imports this package
    ds, lm, tok = inp.ds, inp.lm, inp.lm.tokenizer
    side = cfg.padding_side or getattr(tok, "padding_side", "right") or "right"
    return {
        "model": lm.info,
        "prompt": inp.prompt.describe() if inp.prompt is not None else None,
        "dataset": {"name": ds.name, "kind": ds.kind, "source": ds.source, "sha256": ds.sha256,
                    "n_rows": len(ds), "n_dropped": ds.n_dropped, "limit": cfg.limit},
        "layers": inp.layers,
        "dtype": cfg.dtype,
        "dtype_reason": dtype_reason,
        "neurons": "neurons" in inp.sites,
        "position": inp.position,
        "sites": list(inp.sites),
        "table": inp.table,
        "template": ds.template,
        "text_column": (inp.table or {}).get("text_column"),
        "hook_point": HOOK_POINT,
        "hook_points": {site: SITE_HOOKS[site] for site in inp.sites},
        "token_rule": TOKEN_RULES[inp.position],
        "tokenizer": lm.info.get("tokenizer"),
        "padding_side": side,
        "batch_size": int(cfg.batch_size or DEFAULT_BATCH_SIZE),
        "package": {"name": "actstore", "version": actstore.__version__,
                    "torch": torch.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _open_existing(cfg: ExtractConfig, out: Path, meta: dict, d_model: int,
                   distributed: bool):
    """The store at ``out`` opened for a resume (exclusive: folds range records, if any), or
    an ExtractError saying why not. Fills ``meta``'s batching from the store where the
    config leaves it unset (same batches -> same values). A repair opens it without the
    open-time checks (they would refuse the damage it is about to repair)."""
    try:
        store = open_store(out, mode="a", check=not cfg.repair)
    except StoreError as exc:
        # --overwrite only for what it may delete (a store of ours of another version, an
        # interrupted creation, an empty directory): anything else is not ours
        if exc.replaceable:
            hint = "" if "--overwrite" in str(exc) else "; use --overwrite to replace it"
        else:
            hint = "; choose another --out"
        raise ExtractError(f"{exc}{hint}") from None
    if distributed and store.format != "zarr":
        store.close()
        raise ExtractError(f"{out}: distributed extraction writes Zarr stores only (this store "
                           "is HDF5, which allows one writer); resume it with one process")
    if cfg.batch_size is None and store.meta.get("batch_size"):
        meta["batch_size"] = int(store.meta["batch_size"])
    if cfg.padding_side is None and store.meta.get("padding_side") in ("left", "right"):
        meta["padding_side"] = store.meta["padding_side"]
    diff = _differences(store.meta, meta)
    if store.d_model != d_model:
        diff.append(f"d_model: {store.d_model} -> {d_model}")
    layout = _layout_differences(cfg, store)
    if diff or layout:
        store.close()
        hint = (" (leave --batch-size / padding_side unset to resume with the store's)"
                if any(d.startswith(("batch_size", "padding_side")) for d in diff) else "")
        if layout:
            flags = " / ".join("--" + d.split(":")[0].replace("_", "-") for d in layout)
            hint += f" (leave {flags} unset to resume with the store's)"
        raise ExtractError(f"{out} was made with different settings "
                           f"({'; '.join(diff + layout)}){hint}; "
                           "use --overwrite to replace it, or another --out")
    return store


def _layout_differences(cfg: ExtractConfig, store) -> list[str]:
    """'key: store's -> asked' for the layout options given explicitly (``--format``,
    ``--rows-per-chunk``, ``--compression``) that differ from the store's; options left unset
    take the store's."""
    out = []
    if cfg.format is not None and cfg.format != store.format:
        out.append(f"format: {store.format!r} -> {cfg.format!r}")
    if cfg.rows_per_chunk is not None and \
            min(int(cfg.rows_per_chunk), store.n_rows) != store.rows_per_chunk:
        out.append(f"rows_per_chunk: {store.rows_per_chunk} -> {int(cfg.rows_per_chunk)}")
    if cfg.compression is not None and cfg.compression != store.compression:
        out.append(f"compression: {store.compression!r} -> {cfg.compression!r}")
    return out


def _create(cfg: ExtractConfig, out: Path, meta: dict, inp: Inputs):
    ds, d_model, rows = inp.ds, inp.lm.d_model, inp.rows
    try:
        return create_store(
            out, layers=inp.layers, n_rows=inp.n_rows, d_model=d_model, entities=ds.table,
            targets=tuple(ds.targets), group_columns=tuple(ds.group_columns), meta=meta,
            format=cfg.format, dtype=cfg.dtype, d_mlp=inp.d_mlp,
            rows_per_chunk=cfg.rows_per_chunk or default_rows_per_chunk(d_model),
            compression=cfg.compression, overwrite=cfg.overwrite, sites=dict(inp.sites),
            position=inp.position, target_kinds=dict(ds.target_kinds),
            tokens=(rows.offsets, rows.ids) if inp.position == "all" else None)
    except StoreError as exc:
        raise ExtractError(str(exc)) from None


def _repair_windows(store) -> list[tuple[int, int]]:
    """The row ranges whose blocks a repair re-extracts: every problem
    :func:`~actstore.store.integrity.check_store` finds, if all of them are repairable (else
    an ExtractError listing those that are not)."""
    from actstore.store.integrity import check_store

    report = check_store(store)
    if report.ok:
        return []
    if not report.repairable:
        bad = [p for p in report.problems if not p.repairable]
        more = f" (and {len(bad) - 3} more: actstore verify {store.path})" if len(bad) > 3 else ""
        store.close()
        raise ExtractError(f"{store.path}: --repair re-extracts damaged row blocks only, and "
                           f"this store has other damage: "
                           + "; ".join(str(p) for p in bad[:3]) + more)
    return report.bad_rows


def _check_rows(cfg: ExtractConfig, inp: Inputs) -> None:
    """Every row within --max-tokens (default: the model's context), before any forward pass."""
    context = inp.lm.context_length
    limit, why = token_limit(cfg.max_tokens, context)
    what = "BOS + prompt + entity" if inp.prompt is not None else "BOS + text"
    check_lengths(inp.rows, limit, why, inp.labels, context, what)


def take_lock(out: Path) -> StoreLock:
    """The writer lock of the store at ``out`` (actstore.store.lock), or an ExtractError naming
    its holder."""
    try:
        return StoreLock(out).acquire()
    except StoreError as exc:
        raise ExtractError(str(exc)) from None


def _prepare_store(cfg: ExtractConfig, out: Path, meta: dict, inp: Inputs, distributed: bool):
    """Check the rows' lengths, take the writer lock, then resume (or repair), refuse or create
    the store: (store, start rows of the windows still to do, the lock, the row ranges a
    repair re-extracts)."""
    if cfg.repair and (distributed or not out.exists()):
        raise ExtractError(f"{out}: --repair needs an existing store" if not out.exists() else
                           "--repair runs in one process (not under torchrun): it rewrites "
                           "a few blocks")
    if distributed and format_from_path(out, cfg.format) == "hdf5" and (
            cfg.overwrite or not out.exists()):
        raise ExtractError(f"{out}: distributed extraction writes Zarr stores only (an HDF5 "
                           "file allows one writer, and parallel HDF5 is not supported); "
                           "use a directory path / --format zarr, or run one process")
    _check_rows(cfg, inp)
    # the lock before anything is opened, created or deleted (--overwrite): a second writer,
    # also one racing to create the same store, is refused here, never told to overwrite
    lock = take_lock(out)
    try:
        pause_point("locked")
        store = None
        if out.exists() and not cfg.overwrite:
            store = _open_existing(cfg, out, meta, inp.lm.d_model, distributed)
        if store is None:
            store = _create(cfg, out, meta, inp)
        repair = _repair_windows(store) if cfg.repair else []
        R = store.rows_per_chunk
        todo = sorted(set(todo_windows(inp.n_rows, R, store.done_intervals()))
                      | {w for a, b in repair for w in range(a - a % R, b, R)})
        if distributed and todo:
            store.begin_ranges()
    except BaseException:
        lock.release()
        raise
    return store, todo, lock, repair


def prepare(ctx: Context | None, cfg: ExtractConfig, out: Path, meta: dict, inp: Inputs):
    """Check the rows' lengths, take the store's writer lock, and resume (``--repair``: repair
    and resume), refuse or create the store at ``out``: ``(store, todo, lock, repair)``,
    ``todo`` the start rows of the windows still to compute, ``lock`` the held
    :class:`~actstore.store.lock.StoreLock` (the caller releases it), ``repair`` the damaged
    row ranges among them (one process only); ``meta``'s batch size and padding side become
    the store's on a resume. Distributed: rank 0 alone does it (and holds the lock for the
    job) while the others wait, then tells them the plan (or its error, which every rank
    raises); the others get ``store`` and ``lock`` None and open the store with
    :func:`open_peer`."""
    if ctx is None:
        return _prepare_store(cfg, out, meta, inp, False)
    if ctx.is_main:
        try:
            store, todo, lock, _ = _prepare_store(cfg, out, meta, inp, True)
        except BaseException as exc:
            ctx.broadcast(("error", str(exc)))  # the other ranks stop with the same message
            raise mark_all_ranks(exc)
        try:
            ctx.broadcast(("ok", todo, meta["batch_size"], meta["padding_side"]))
        except BaseException:
            lock.release()
            raise
        return store, todo, lock, []
    msg = ctx.broadcast(None)   # waits until rank 0 has the store ready
    if msg[0] == "error":
        raise mark_all_ranks(_PeerCopy(msg[1]))   # rank 0 reports it
    _, todo, meta["batch_size"], meta["padding_side"] = msg
    return None, todo, None, []


def open_peer(ctx: Context, out: Path):
    """The store rank 0 prepared, opened by another rank (shared: no folding, no cleaning)."""
    try:
        return open_store(out, mode="a", exclusive=False)
    except StoreError as exc:
        raise ExtractError(f"{exc} (rank {ctx.rank}: is {out} on a file system that every "
                           "node sees?)") from None


@dataclass
class Share:
    """This process's part of the work: its ``windows`` (start rows) and their row count,
    the rows stored before this run (``start_row``), and ``record(start, stop)``, which
    marks a written window durable (rows_done, or this rank's range record, ``owner``)."""
    windows: list[int]
    rows: int
    start_row: int
    record: Callable[[int, int], None]
    owner: dict = field(default_factory=dict)   # window start -> its RangeRecord (distributed)


def assign(ctx: Context | None, store, todo: list[int], stop_after_rows: int | None) -> Share:
    """Deal the windows still to do (``todo``) to the ranks; one process takes them all."""
    n, R = store.n_rows, store.rows_per_chunk
    start_row = n - sum(min(n, w + R) - w for w in todo)   # rows stored before this run
    if stop_after_rows is not None:
        todo = [w for w in todo if w < int(stop_after_rows)]
    mine = todo if ctx is None else split_windows(todo, ctx.world)[ctx.rank]
    rows = sum(min(n, w + R) - w for w in mine)
    if ctx is None:   # single writer: rows_done (and ranges_done) attributes
        return Share(mine, rows, start_row, store.mark_rows)
    owner = {}
    for a, b in segments(mine, R, n):
        rec = store.range_record(a, b)
        for w in range(a, b, R):
            owner[w] = rec
    return Share(mine, rows, start_row, lambda start, stop: owner[start].update(stop), owner)


def finish_ranks(ctx: Context, store, failure: BaseException | None, share: Share | None) -> int:
    """The end of a distributed extraction, reached by every rank whether it failed or not
    (``failure``: its error, or None), so that no rank is left waiting for a failed one.

    One exchange (:func:`actstore.distributed.exchange`) gives every rank each rank's status,
    row count and finished row ranges; rank 0 folds the ranges into ``rows_done`` /
    ``ranges_done`` (it alone writes the group attributes; learning the ranges from the ranks,
    not from a directory listing, is safe on NFS) and removes the records. Then every rank
    raises if any failed. Returns the rows computed by all ranks."""
    owner = share.owner if share is not None else {}
    finished = sorted({(rec.start, rec.done) for rec in owner.values() if rec.done > rec.start})
    messages, status = exchange(ctx, failure, (0 if share is None else share.rows, finished))
    failed = any(m is not None for m in messages)
    if ctx.is_main and store is not None:
        try:
            store.finalize_ranges([iv for _, f in status for iv in f])
        except Exception:
            if not failed:
                raise   # else the records stay; the next run's exclusive open folds them
    raise_failures(ctx, failure, messages, _PeerCopy)
    ctx.barrier()   # the others open the store after rank 0 has folded the records
    return sum(rows for rows, _ in status)
