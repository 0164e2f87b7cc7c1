"""Streaming extraction: last-entity-token hidden states of every layer into an ActivationStore.

For each entity the text is BOS + prompt + entity (``Prompt.encode``). The model runs on
batches padded to a common length; forward hooks on the decoder blocks pick, for every row, the
hidden state at its last real token (found from the attention mask, so right and left padding
both work; position ids are computed from the mask too). Only those (rows, d) vectors leave the
hook: the full (batch, tokens, d) states of every layer are never kept.

Rows are processed in windows of ``rows_per_chunk`` rows (one shard of the store). Inside a
window rows are sorted by token length before batching, which cuts padding; results go back to
dataset order in a window buffer. A finished window is handed to a writer thread (two buffers
in rotation, so memory is bounded and the next window's forward passes overlap the write), and
``rows_done`` advances only after the window's write returned. A resumed run re-creates the
same windows and batches, so it produces the same values as an uninterrupted run.

Under torchrun the windows are dealt to the ranks (actstore.distributed; docs/scale-out.md):
each rank computes and writes its own windows exactly as above, so the store is the same.
"""
from __future__ import annotations

import argparse
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from actstore.errors import ExtractError, PeerError, StoreError
from actstore.store.format import to_storage

HOOK_POINT = ("residual stream after each decoder block, before the final norm "
              "(HF output_hidden_states indexing: 0 = embeddings, i = output of block i-1); "
              "neurons: input of the MLP down projection")
TOKEN_RULE = "last token of the entity (last non-padding position of BOS + prompt + entity)"
# batch_size, padding_side and compute_dtype change values at rounding level: a resume must
# use the ones the store was made with to reproduce an uninterrupted run bit for bit.
IDENTITY_KEYS = ("model", "prompt", "dataset", "layers", "dtype", "neurons", "compute_dtype",
                 "batch_size", "padding_side")
DEFAULT_BATCH_SIZE = 32


class _PeerCopy(ExtractError, PeerError):
    """Another rank's error (rank 0's, or "rank K failed: ..."), raised so that every rank
    stops; the CLI prints it on rank 0 only (the failing rank prints its own)."""


class _Stop(Exception):
    """Raised by the last needed hook: blocks after it (and the LM head) need not run."""


# ----------------------------------------------------------------------------- helpers

def parse_layers(spec, n_blocks: int) -> list[int]:
    """'all' -> 1..N; 'all+emb' -> 0..N; '0,5,10-20' -> explicit hidden-state indices."""
    if spec is None or spec == "all":
        return list(range(1, n_blocks + 1))
    if spec in ("all+emb", "all+embeddings"):
        return list(range(0, n_blocks + 1))
    if isinstance(spec, (list, tuple)):
        out = [int(x) for x in spec]
    else:
        out = []
        for part in str(spec).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                if "-" in part[1:]:
                    a, b = part.split("-", 1)
                    a, b = int(a), int(b)
                    if b < a:
                        raise ValueError
                    out.extend(range(a, b + 1))
                else:
                    out.append(int(part))
            except ValueError:
                raise ExtractError(f"bad --layers item {part!r}: use 'all', 'all+emb' or a list "
                                   "like 0,5,10-20") from None
    if not out:
        raise ExtractError("--layers selects no layer")
    bad = [x for x in out if not 0 <= x <= n_blocks]
    if bad:
        raise ExtractError(f"layers {bad} out of range: this model has hidden states 0..{n_blocks}"
                           f" (0 = embeddings, {n_blocks} = last block)")
    if len(set(out)) != len(out):
        raise ExtractError(f"duplicate layers in {spec!r}")
    return sorted(out)


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
    }


def _differences(old: dict, new: dict) -> list[str]:
    a, b = _identity(old), _identity(new)
    out = []
    for k in IDENTITY_KEYS:
        if a[k] != b[k]:
            va, vb = a[k], b[k]
            if isinstance(va, dict) and isinstance(vb, dict):
                sub = [f"{k}.{s}: {va.get(s)!r} -> {vb.get(s)!r}"
                       for s in sorted(set(va) | set(vb)) if va.get(s) != vb.get(s)]
                out.extend(sub)
            else:
                out.append(f"{k}: {va!r} -> {vb!r}")
    return out


def _package_version() -> str:
    from actstore import __version__
    return __version__


@dataclass
class ExtractResult:
    """What :func:`extract` did. ``padding_fraction`` = padded / total token slots, over the
    batches this run computed."""
    store: object
    rows: int            # rows computed in this run
    rows_done: int
    seconds: float
    padding_fraction: float
    bytes: int
    resumed_from: int
    forward_seconds: float = 0.0   # inside the model's forward calls (CPU: compute; GPU: launch)
    write_seconds: float = 0.0     # writer thread busy writing (overlapped with the forwards)
    processes: int = 1             # ranks of a distributed run (rows: computed by all of them)
    rank: int = 0

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        s = self.store
        return (f"{self.rows_done}/{s.n_rows} rows x {s.n_layers} layers x {s.d_model} "
                f"({self.bytes / 2**20:.1f} MiB {s.dtype}) -> {s.path} in {self.seconds:.1f} s "
                f"({self.rows_per_s:.1f} rows/s, padding {100 * self.padding_fraction:.1f}%"
                + (f", {self.processes} processes" if self.processes > 1 else "")
                + (f", resumed at row {self.resumed_from}" if self.resumed_from else "") + ")")


# ----------------------------------------------------------------------------- capture

class _Capture:
    """Forward hooks that copy the last-token vector of each wanted layer into ``out``."""

    def __init__(self, model, layers: list[int], neurons: bool):
        import torch
        from actstore.models import decoder_layers, down_projection
        self.blocks = decoder_layers(model)
        self.layers = layers
        self.neurons = neurons
        self.idx = None          # (B,) long: last real token of each row
        self.resid = None        # (L, B, d) filled by hooks
        self.neu = None
        self.handles = []
        self.last_block = max(layers) - 1   # stop after this block (-1: embeddings only)
        self._torch = torch
        pos = {l: i for i, l in enumerate(layers)}
        if 0 in pos:
            # hidden state 0 = input of block 0 (embeddings, scaled as the model scales them)
            self.handles.append(self.blocks[0].register_forward_pre_hook(
                self._pre_hook(pos[0]), with_kwargs=True))
        for l, p in pos.items():
            if l >= 1:
                self.handles.append(self.blocks[l - 1].register_forward_hook(
                    self._post_hook(p, stop=(l - 1 == self.last_block))))
        if neurons:
            for l, p in pos.items():
                self.handles.append(down_projection(self.blocks[l - 1]).register_forward_pre_hook(
                    self._neuron_hook(p)))

    def _take(self, h):
        return h[self._torch.arange(h.shape[0], device=h.device), self.idx]

    def _pre_hook(self, p):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            self.resid[p] = self._take(h)
            if self.last_block < 0:
                raise _Stop
        return hook

    def _post_hook(self, p, stop):
        def hook(module, args, output):
            h = output[0] if isinstance(output, (tuple, list)) else output
            self.resid[p] = self._take(h)
            if stop:  # the neuron hook of this block has already run
                raise _Stop
        return hook

    def _neuron_hook(self, p):
        def hook(module, args):
            self.neu[p] = self._take(args[0])
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def _batch_tensors(seqs: list[list[int]], pad_id: int, side: str, device):
    """input_ids, attention_mask, position_ids (from the mask), last-token index."""
    import torch
    T = max(len(s) for s in seqs)
    B = len(seqs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "left":
            ids[i, T - len(s):] = torch.tensor(s)
            mask[i, T - len(s):] = 1
        else:
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    # last position whose mask is 1, whichever side the padding is on
    last = T - 1 - mask.flip(1).argmax(1)
    return ids.to(device), mask.to(device), pos.to(device), last.to(device)


def plan_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Batches of row positions for one window: longest first (stable, so equal lengths keep
    dataset order and the plan is deterministic), ``batch_size`` rows each."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[b:b + batch_size] for b in range(0, len(order), batch_size)]


def _forward_base(model):
    """The decoder without the LM head (its logits are never needed)."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return base if base is not None and base is not model else model


# ----------------------------------------------------------------------------- writer

class _Writer(threading.Thread):
    """Writes finished windows in order, then records them (``record``: rows_done, or this
    rank's range record). Errors are kept for the main thread, which re-raises them."""

    def __init__(self, store, free: queue.Queue, record, crash_after: int | None = None):
        super().__init__(daemon=True, name="actstore-writer")
        self.store = store
        self.record = record          # record(start, stop): the block is durable
        self.crash_after = crash_after
        self.windows = 0
        self.q: queue.Queue = queue.Queue()
        self.free = free
        self.error: BaseException | None = None
        self.write_seconds = 0.0

    def run(self):
        while True:
            item = self.q.get()
            if item is None:
                return
            start, r, bufs = item
            if self.error is None:
                t = time.perf_counter()
                try:
                    resid, neu = bufs
                    self.store.write_rows(start, resid[:, :r],
                                          None if neu is None else neu[:, :r])
                    self.windows += 1
                    if self.windows == self.crash_after:
                        # test hook: die like kill -9 with a block written but not recorded
                        os._exit(75)
                    self.record(start, start + r)
                except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                    self.error = exc
                self.write_seconds += time.perf_counter() - t
            self.free.put(bufs)


def _write_error(exc: BaseException, store, path, distributed: bool = False) -> ExtractError:
    import errno
    if distributed:
        # each rank records its own ranges; rows_done is folded only at the end of the job
        kept = "The finished row ranges are recorded"
    else:
        kept = f"Rows 0..{store.rows_done} are stored"
    if isinstance(exc, OSError):
        what = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EACCES: "permission denied", errno.EROFS: "the file system is read-only"
                }.get(exc.errno, exc.strerror or str(exc))
        return ExtractError(f"cannot write to {path}: {what}. {kept} and intact; fix this "
                            "and re-run the same command to resume")
    if distributed:
        return ExtractError(f"writing {path} failed: {exc!r}. {kept}; re-run the same "
                            "command to resume")
    return ExtractError(f"writing {path} failed after {store.rows_done} rows: {exc!r}")


# ----------------------------------------------------------------------------- the API

def extract(model, dataset, prompt, out, *, layers="all", neurons: bool = False,
            dtype: str = "float16", format: str | None = None, batch_size: int | None = None,
            device: str = "auto", compute_dtype: str = "auto", limit: int | None = None,
            kind: str | None = None, drop_invalid: bool = False, overwrite: bool = False,
            rows_per_chunk: int | None = None,
            compression: str | None = None, padding_side: str | None = None,
            progress: bool = True, stop_after_rows: int | None = None,
            device_map: str | None = None) -> ExtractResult:
    """Extract last-entity-token hidden states of ``dataset`` under ``prompt`` into ``out``.

    model: a name/path (see :func:`actstore.models.load_model`), a ``LoadedModel``, or a
    ``(model, tokenizer)`` pair. dataset: a name/path for ``load_dataset`` or an
    ``EntityDataset``; ``drop_invalid`` (with a name/path) drops invalid CSV rows instead of
    refusing the file. prompt: a prompt name or a ``Prompt``. layers: "all" (blocks 1..N),
    "all+emb", "0,5,10-20" or a list of hidden-state indices. dtype: stored dtype. An existing
    store at ``out`` is resumed if it was made with the same model, prompt, dataset, layers,
    dtype, neuron setting, compute dtype, batch size and padding side, refused otherwise
    (``overwrite=True`` replaces it). ``batch_size`` (default 32) and ``padding_side``
    ("right"/"left", default: the tokenizer's) left as None on a resume are taken from the
    store, so the resumed rows equal an uninterrupted run's. ``stop_after_rows``: stop
    (cleanly, resumable) once this many rows are stored (for tests and budgets).
    ``device_map`` ("auto"): let transformers/accelerate spread a Hugging Face model over the
    visible GPUs (models too big for one).

    Under torchrun (``WORLD_SIZE`` > 1) every rank runs this function: rank 0 creates or
    validates the store, the unfinished row windows are dealt to the ranks as contiguous runs,
    each rank writes its own windows (whole shards: no two ranks touch one file) and records
    its progress in its own per-range record; at the end rank 0 folds the records into
    ``rows_done``. Zarr stores only (HDF5 allows one writer). See docs/scale-out.md.
    Returns an :class:`ExtractResult` whose ``store`` is open read-only.
    """
    import torch

    from actstore import native
    from actstore.datasets import load_dataset
    from actstore.distributed import context, mark_all_ranks
    from actstore.models import LoadedModel, decoder_layers, load_model, mlp_width, wrap_model
    from actstore.prompts import get_prompt
    from actstore.store import create_store, default_rows_per_chunk, open_store
    from actstore.store.format import format_from_path, storage_dtype
    from actstore.store.progress import segments, split_windows, todo_windows

    if dtype not in ("float16", "bfloat16", "float32"):
        raise ExtractError(f"unknown --dtype {dtype!r}; choose float16, bfloat16 or float32")
    if batch_size is not None and batch_size < 1:
        raise ExtractError("--batch-size must be at least 1")
    if padding_side not in (None, "left", "right"):
        raise ExtractError("padding_side must be 'left' or 'right'")
    out = Path(out)
    ctx = context(use_cuda=False)   # control messages only (gloo); None: one process
    if ctx is not None and device_map is None and device in ("auto", "cuda") \
            and torch.cuda.is_available():
        gpu = ctx.local_rank % torch.cuda.device_count()   # one GPU per rank
        torch.cuda.set_device(gpu)
        device = f"cuda:{gpu}"
    rank = 0 if ctx is None else ctx.rank

    # -- dataset and prompt first: cheap, and their errors should not wait for a model load
    ds = (dataset if not isinstance(dataset, (str, Path))
          else load_dataset(str(dataset), kind=kind, drop_invalid=drop_invalid))
    if limit is not None:
        if limit < 1:
            raise ExtractError("--limit must be at least 1")
        ds = ds.head(limit)
    if len(ds) == 0:
        raise ExtractError(f"dataset {ds.name!r} has no rows to extract")
    pr = prompt if not isinstance(prompt, str) else get_prompt(prompt, kind=ds.kind)

    # -- model
    if isinstance(model, LoadedModel):
        lm = model
    elif isinstance(model, tuple):
        lm = wrap_model(*model)
    else:
        lm = load_model(model, device=device, compute_dtype=compute_dtype, store_dtype=dtype,
                        device_map=device_map)
    net, tok = lm.model, lm.tokenizer
    dev = next(net.parameters()).device
    n_blocks = lm.n_layers
    layer_list = parse_layers(layers, n_blocks)
    if neurons and 0 in layer_list:
        raise ExtractError("--neurons needs layers >= 1 (the embeddings have no MLP); "
                           "drop layer 0 from --layers")
    d_mlp = mlp_width(decoder_layers(net)[0]) if neurons else None
    side = padding_side or getattr(tok, "padding_side", "right") or "right"
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    n = len(ds)
    meta = {
        "model": lm.info,
        "prompt": pr.describe(),
        "dataset": {"name": ds.name, "kind": ds.kind, "source": ds.source, "sha256": ds.sha256,
                    "n_rows": n, "n_dropped": ds.n_dropped, "limit": limit},
        "layers": layer_list,
        "dtype": dtype,
        "neurons": bool(neurons),
        "hook_point": HOOK_POINT,
        "token_rule": TOKEN_RULE,
        "tokenizer": lm.info.get("tokenizer"),
        "padding_side": side,
        "batch_size": int(batch_size or DEFAULT_BATCH_SIZE),
        "package": {"name": "actstore", "version": _package_version(),
                    "torch": torch.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }

    # -- store: resume, refuse or create (rank 0 alone when distributed; the others wait)
    def prepare():
        store = None
        if ctx is not None and format_from_path(out, format) == "hdf5" and (
                overwrite or not out.exists()):
            raise ExtractError(f"{out}: distributed extraction writes Zarr stores only (an HDF5 "
                               "file allows one writer, and parallel HDF5 is not supported); "
                               "use a directory path / --format zarr, or run one process")
        if out.exists() and not overwrite:
            try:
                store = open_store(out, mode="a")   # exclusive: folds range records, if any
            except StoreError as exc:
                # --overwrite only for what it may delete (a store of ours of another version,
                # an interrupted creation, an empty directory): anything else is not ours
                if exc.replaceable:
                    hint = "" if "--overwrite" in str(exc) else "; use --overwrite to replace it"
                else:
                    hint = "; choose another --out"
                raise ExtractError(f"{exc}{hint}") from None
            if ctx is not None and store.format != "zarr":
                store.close()
                raise ExtractError(f"{out}: distributed extraction writes Zarr stores only "
                                   "(this store is HDF5, which allows one writer); resume it "
                                   "with one process")
            # not given: resume with the store's batching (same batches -> same values)
            if batch_size is None and store.meta.get("batch_size"):
                meta["batch_size"] = int(store.meta["batch_size"])
            if padding_side is None and store.meta.get("padding_side") in ("left", "right"):
                meta["padding_side"] = store.meta["padding_side"]
            diff = _differences(store.meta, meta)
            if store.d_model != lm.d_model:
                diff.append(f"d_model: {store.d_model} -> {lm.d_model}")
            if diff:
                store.close()
                hint = (" (leave --batch-size / padding_side unset to resume with the store's)"
                        if any(d.startswith(("batch_size", "padding_side")) for d in diff)
                        else "")
                raise ExtractError(f"{out} was made with different settings ("
                                   f"{'; '.join(diff)}){hint}; use --overwrite to replace it, "
                                   "or another --out")
        if store is None:
            try:
                store = create_store(
                    out, layers=layer_list, n_rows=n, d_model=lm.d_model, entities=ds.table,
                    targets=tuple(ds.targets), group_columns=tuple(ds.group_columns), meta=meta,
                    format=format, dtype=dtype, d_mlp=d_mlp,
                    rows_per_chunk=rows_per_chunk or default_rows_per_chunk(lm.d_model),
                    compression=compression, overwrite=overwrite)
            except StoreError as exc:
                raise ExtractError(str(exc)) from None
        todo = todo_windows(n, store.rows_per_chunk, store.done_intervals())
        if ctx is not None and todo:
            store.begin_ranges()
        return store, todo

    if ctx is None:
        store, todo = prepare()
    elif ctx.is_main:
        try:
            store, todo = prepare()
        except BaseException as exc:
            ctx.broadcast(("error", str(exc)))  # the other ranks stop with the same message
            mark_all_ranks(exc)
            raise
        ctx.broadcast(("ok", todo, meta["batch_size"], meta["padding_side"]))
    else:
        msg = ctx.broadcast(None)   # waits until rank 0 has the store ready
        if msg[0] == "error":
            raise mark_all_ranks(_PeerCopy(msg[1]))   # rank 0 reports it
        _, todo, meta["batch_size"], meta["padding_side"] = msg
        store = None
    # From here on an error on one rank must not leave the others waiting: every rank ends at
    # the same status exchange (_finish_ranks), failed or not.
    failure, owner, my_rows = None, {}, 0
    try:
        if store is None:
            try:
                store = open_store(out, mode="a", exclusive=False)
            except StoreError as exc:
                raise ExtractError(f"{exc} (rank {ctx.rank}: is {out} on a file system that "
                                   "every node sees?)") from None
        batch_size, side = meta["batch_size"], meta["padding_side"]
        R = store.rows_per_chunk
        L = len(layer_list)
        npdt = storage_dtype(dtype)
        itemsize = npdt.itemsize
        nbytes = L * n * (lm.d_model + (d_mlp or 0)) * itemsize
        start_row = n - sum(min(n, w + R) - w for w in todo)   # rows stored before this run
        if stop_after_rows is not None:
            todo = [w for w in todo if w < int(stop_after_rows)]
        mine = todo if ctx is None else split_windows(todo, ctx.world)[ctx.rank]
        my_rows = sum(min(n, w + R) - w for w in mine)
        if ctx is None:
            record = store.mark_rows   # single writer: rows_done (and ranges_done) attributes
        else:
            for a, b in segments(mine, R, n):
                rec = store.range_record(a, b)
                for w in range(a, b, R):
                    owner[w] = rec

            def record(start, stop):
                owner[start].update(stop)
        crash = os.environ.get("ACTSTORE_TEST_CRASH_AFTER_WINDOWS", "")  # "RANK:K" (tests)
        crash_after = (int(crash.split(":")[1]) if crash and int(crash.split(":")[0]) == rank
                       else None)

        # -- run
        free: queue.Queue = queue.Queue()
        for _ in range(2):  # two window buffers: one being filled, one being written
            free.put((np.empty((L, R, lm.d_model), dtype=npdt),
                      np.empty((L, R, d_mlp), dtype=npdt) if neurons else None))
        writer = _Writer(store, free, record, crash_after)
        writer.start()
        cap = _Capture(net, layer_list, neurons)
        base = _forward_base(net)
        comp_dtype = next(net.parameters()).dtype
        bar = None
        if progress and mine and rank == 0:
            from tqdm.auto import tqdm
            total = n if ctx is None else my_rows  # distributed: rank 0 shows its own share
            bar = tqdm(total=total, initial=total - my_rows, unit="row",
                       desc=f"extract {out.name}", dynamic_ncols=True, smoothing=0.1)
        real_tokens = total_slots = 0
        forward_s = 0.0
        t0 = time.perf_counter()
        entities = ds.table["entity"].tolist()
        on_gpu = dev.type == "cuda"
        staging = None
        if on_gpu:
            # two pinned host buffers per array: batch k copies out while batch k-1 is checked
            staging = [(torch.empty((L, batch_size, lm.d_model), dtype=comp_dtype,
                                    pin_memory=True),
                        torch.empty((L, batch_size, d_mlp), dtype=comp_dtype, pin_memory=True)
                        if neurons else None) for _ in range(2)]
        try:
            for w0 in mine:
                w1 = min(n, w0 + R)
                ents = entities[w0:w1]
                seqs = pr.encode_many(tok, ents)
                bufs = free.get()
                if writer.error is not None:
                    break  # reported below, after the writer has stopped
                resid_buf, neu_buf = bufs
                pending = None

                def finish(item):
                    x, nx, rows, ev = item
                    if ev is not None:
                        ev.synchronize()
                    _check_and_store(x, resid_buf, rows, dtype, layer_list, w0, entities,
                                     "hidden state", native, comp_dtype)
                    if nx is not None:
                        _check_and_store(nx, neu_buf, rows, dtype, layer_list, w0, entities,
                                         "MLP neuron activation", native, comp_dtype)
                    if bar is not None:
                        bar.update(len(rows))

                for k, rows in enumerate(plan_batches([len(q) for q in seqs], batch_size)):
                    ids, mask, pos, last = _batch_tensors([seqs[i] for i in rows], pad_id,
                                                          side, dev)
                    real_tokens += sum(len(seqs[i]) for i in rows)
                    total_slots += mask.numel()
                    B = len(rows)
                    cap.idx = last
                    cap.resid = torch.empty((L, B, lm.d_model), dtype=comp_dtype, device=dev)
                    cap.neu = (torch.empty((L, B, d_mlp), dtype=comp_dtype, device=dev)
                               if neurons else None)
                    tf = time.perf_counter()
                    with torch.inference_mode():
                        try:
                            base(input_ids=ids, attention_mask=mask, position_ids=pos,
                                 use_cache=False)
                        except _Stop:
                            pass
                    forward_s += time.perf_counter() - tf  # on GPU: launch time only (async)
                    if on_gpu:  # asynchronous copy out; checked one batch later
                        hx, hn = staging[k % 2]
                        hx = hx[:, :B]
                        hx.copy_(cap.resid, non_blocking=True)
                        if neurons:
                            hn = hn[:, :B]
                            hn.copy_(cap.neu, non_blocking=True)
                        ev = torch.cuda.Event()
                        ev.record(torch.cuda.current_stream(dev))  # dev's stream, not device 0's
                        item = (hx, hn if neurons else None, rows, ev)
                    else:
                        item = (cap.resid, cap.neu, rows, None)
                    if pending is not None:
                        finish(pending)
                    pending = item
                if pending is not None:
                    finish(pending)
                writer.q.put((w0, w1 - w0, bufs))
                if bar is not None:
                    bar.set_postfix(pad=f"{100 * (1 - real_tokens / max(1, total_slots)):.0f}%",
                                    refresh=False)
        except BaseException:
            writer.q.put(None)
            writer.join()
            cap.remove()
            if bar is not None:
                bar.close()
            store.close()
            raise
        writer.q.put(None)
        writer.join()
        cap.remove()
        if bar is not None:
            bar.close()
        if writer.error is not None:
            err = _write_error(writer.error, store, out, distributed=ctx is not None)
            store.close()
            raise err from None
    except BaseException as exc:
        if ctx is None:
            raise
        failure = exc
    rows = my_rows
    if ctx is not None:
        rows = _finish_ranks(ctx, store, failure, my_rows, owner)
    seconds = time.perf_counter() - t0
    store.close()
    final = open_store(out)
    result = ExtractResult(store=final, rows=rows, rows_done=final.rows_done,
                           seconds=seconds,
                           padding_fraction=1 - real_tokens / total_slots if total_slots else 0.0,
                           bytes=nbytes, resumed_from=start_row, forward_seconds=forward_s,
                           write_seconds=writer.write_seconds,
                           processes=1 if ctx is None else ctx.world, rank=rank)
    return result


def _finish_ranks(ctx, store, failure, my_rows: int, owner: dict) -> int:
    """The end of a distributed extraction, reached by every rank whether it failed or not
    (``failure``: its error, or None), so that no rank is left waiting for a failed one.

    One exchange gives every rank each rank's status, row count and finished row ranges;
    rank 0 folds the ranges into ``rows_done``/``ranges_done`` (it alone writes the group
    attributes; learning the ranges from the ranks, not from a directory listing, is safe on
    NFS) and removes the records. Then every rank raises if any failed: its own error, or a
    copy naming the failed rank. Returns the rows computed by all ranks."""
    from actstore.distributed import describe, mark_all_ranks
    finished = sorted({(rec.start, rec.done) for rec in owner.values() if rec.done > rec.start})
    mine = (None if failure is None else describe(failure), int(my_rows), finished)
    try:
        status = ctx.all_gather(mine)
    except Exception:
        if failure is not None:
            raise failure from None   # the exchange failed (a peer died): report our own
        raise
    failed = [(r, m) for r, (m, _, _) in enumerate(status) if m is not None]
    if ctx.is_main and store is not None:
        try:
            store.finalize_ranges([iv for _, _, f in status for iv in f])
        except Exception:
            if not failed:
                raise   # else the records stay; the next run's exclusive open folds them
    if failed:
        if failure is not None:
            raise mark_all_ranks(failure)
        r, m = failed[0]
        raise mark_all_ranks(_PeerCopy(f"rank {r} failed: {m}"))
    ctx.barrier()   # the others open the store after rank 0 has folded the records
    return sum(s[1] for s in status)


def _check_and_store(x, buf, rows, dtype, layer_list, w0, entities, what, native,
                     comp_dtype=None):
    """Refuse values the stored dtype cannot hold, then narrow x (L, B, d) into buf rows."""
    import torch
    x = x.detach()
    if x.device.type != "cpu":
        x = x.float().cpu()
    if dtype == "float16":
        flat = native.find_fp16_overflow(x.float().numpy() if x.dtype != torch.float32
                                         else x.numpy())
    else:
        bad = ~torch.isfinite(x.float())
        flat = int(bad.reshape(-1).nonzero()[0, 0]) if bool(bad.any()) else -1
    if flat >= 0:
        L, B, d = x.shape
        li, bi, di = flat // (B * d), (flat // d) % B, flat % d
        row = w0 + rows[bi]
        val = float(x.reshape(-1)[flat])
        fp16_compute = comp_dtype == torch.float16
        if dtype == "float16":
            # computing in float16 overflows as well: a wider stored dtype alone does not help
            hint = ("; extract with --dtype bfloat16 --compute-dtype bfloat16 (the model "
                    "computes in float16, which overflows too) or --dtype float32"
                    if fp16_compute else "; extract with --dtype bfloat16 or --dtype float32")
        else:
            hint = ("; the model produced non-finite values (try --compute-dtype "
                    + ("bfloat16 or float32)" if fp16_compute else "float32)"))
        raise ExtractError(
            f"{what} {val:g} at layer {layer_list[li]}, row {row} ({entities[row]!r}), dim {di} "
            f"does not fit {dtype}" + (" (|x| > 65504)" if dtype == "float16" else "") + hint)
    buf[:, list(rows)] = to_storage(x, dtype)


# ----------------------------------------------------------------------------- CLI

EXAMPLES = """\
examples:
  # the embedded SmolLM2-135M (offline), 512 world places, the paper's coordinates prompt
  actstore extract --dataset ../shared/datasets/paper/world_place.csv --prompt coords \\
      --limit 512 --out w.zarr
  # any Hugging Face causal LM, on a GPU, with MLP neurons, some layers only
  actstore extract --model meta-llama/Llama-2-7b-hf --device cuda --dataset world_place \\
      --prompt where_is --layers 0,8,16-24 --neurons --out llama-world.zarr
  # models whose activations overflow float16 (Gemma): store bfloat16
  actstore extract --model google/gemma-2b --dtype bfloat16 --dataset us_places --prompt empty --out g.zarr

Re-running the same command resumes an interrupted run (Ctrl-C, kill -9, full disk) where it
stopped, with the store's batch size; a store made with another model, prompt, dataset, layer
list, dtype or compute dtype is refused (--overwrite replaces it). Then:
  python -c "import actstore; s = actstore.open('w.zarr'); print(s, s.entities.head())"
"""


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "extract", help="extract last-entity-token activations of every layer into a store",
        description="Run a causal LM over an entity dataset (text = BOS + prompt + entity) and "
        "store the hidden state at the entity's last token after every decoder block (before "
        "the final norm), as float16, in a chunked Zarr v3 (or HDF5) store together with the "
        "entity table and all metadata. Streaming, bounded memory, resumable.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, metavar="MODEL",
                   help="'smollm2-135m' (embedded default, offline), a Hugging Face id "
                   "(e.g. meta-llama/Llama-2-7b-hf) or a local model directory")
    p.add_argument("--dataset", required=True, metavar="NAME_OR_CSV",
                   help="a built-in (world_cities, us_places, nobel), a paper kind "
                   "(world_place, ...) or a CSV path; see `actstore datasets list`")
    p.add_argument("--kind", default=None, help="dataset kind when a CSV's columns are ambiguous")
    p.add_argument("--drop-invalid", action="store_true",
                   help="drop CSV rows with invalid values (missing name, bad coordinates or "
                   "dates) instead of refusing the file; the count goes into the store's meta")
    p.add_argument("--prompt", required=True, help="prompt name (coords, where_is, empty, random, "
                   "all_caps, ...); unknown names list the valid ones")
    p.add_argument("--out", required=True, metavar="STORE",
                   help="store path: a directory (Zarr v3) or a .h5 file (HDF5)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="first N entities only")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help=f"rows per forward pass (default {DEFAULT_BATCH_SIZE}; a resume uses "
                   "the store's)")
    p.add_argument("--layers", default="all", help="'all' (blocks 1..N, default), 'all+emb' "
                   "(also the embeddings, 0) or a list like 0,5,10-20 (hidden-state indices)")
    p.add_argument("--neurons", action="store_true",
                   help="also store MLP neuron activations (input of the down projection)")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"),
                   help="stored dtype (default float16; overflow is detected, never stored)")
    p.add_argument("--compute-dtype", default="auto",
                   choices=("auto", "float32", "float16", "bfloat16"),
                   help="model dtype (auto: float32 on CPU; on GPU float16, or bfloat16 with "
                   "--dtype bfloat16/float32)")
    p.add_argument("--format", default=None, choices=("zarr", "hdf5"),
                   help="store format (default: zarr, or hdf5 for a .h5/.hdf5 path)")
    p.add_argument("--compression", default=None, choices=("none", "zstd", "blosc"),
                   help="zarr chunk compression (default none: fp16 activations barely "
                   "compress; see bench/RESULTS.md)")
    p.add_argument("--rows-per-chunk", type=int, default=None, metavar="R",
                   help="rows per chunk and per write (default: ~1 MiB chunks)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default); under "
                   "torchrun each rank takes GPU LOCAL_RANK")
    p.add_argument("--device-map", default=None, metavar="MAP",
                   help="'auto': transformers/accelerate spread a Hugging Face model over all "
                   "visible GPUs (models too big for one; see docs/scale-out.md)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    # under torchrun: each rank prints its own errors ("[rank k] ..."), copies of another
    # rank's error only on rank 0 (actstore.distributed.cli_call)
    from actstore.distributed import cli_call
    return cli_call(_cli_run, args, prog="actstore")


def _cli_run(args) -> int:
    res = extract(args.model, args.dataset, args.prompt, args.out, layers=args.layers,
                  neurons=args.neurons, dtype=args.dtype, format=args.format,
                  batch_size=args.batch_size, device=args.device,
                  compute_dtype=args.compute_dtype, limit=args.limit, kind=args.kind,
                  drop_invalid=args.drop_invalid,
                  overwrite=args.overwrite, rows_per_chunk=args.rows_per_chunk,
                  compression=args.compression, progress=not args.no_progress,
                  device_map=args.device_map)
    if res.rank == 0:   # under torchrun the other ranks stay quiet
        print(res.summary())
    return 0
