"""Streaming extraction: activations of every layer at chosen token positions and sites
(residual stream, attention / MLP outputs, MLP neurons) into an ActivationStore.

Modules, bottom to top: ``config`` (:class:`ExtractConfig`, also the command line), ``writer``
(overflow check, window buffers, the writer thread), ``tokens`` (every text's ids and entity
span, the rows a window keeps, the --max-tokens rule), ``capture`` (hooks, batches, the batch
loop), ``resume`` (writer lock, resume /
refuse / create, the ranks' plan and final exchange), ``cli``.
Rows (texts, or tokens for ``--position all``) go in windows of ``rows_per_chunk`` rows (one
shard of the store; a window of tokens runs the texts overlapping it); a finished window is
written off the compute thread and ``rows_done`` advances only after its write returned, so a
resumed run re-creates the same windows and batches and stores the same bytes. Under torchrun
the windows are dealt to the ranks (docs/scale-out.md).
"""
from __future__ import annotations

import dataclasses
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from actstore import datasets
from actstore.datasets.generic import TableSpec
from actstore.distributed import context
from actstore.errors import ExtractError
from actstore.extract.capture import (
    HOOK_POINT,
    SITE_HOOKS,
    TOKEN_RULE,
    TOKEN_RULES,
    BatchLoop,
    plan_batches,
)
from actstore.extract.capture import _batch_tensors as _batch_tensors  # for bench/ and tests
from actstore.extract.capture import _forward_base as _forward_base
from actstore.extract.config import (
    BATCH_TOKENS_PER_ROW,
    DEFAULT_BATCH_SIZE,
    POSITIONS,
    SITES,
    ExtractConfig,
    names,
    parse_layers,
)
from actstore.extract.resume import (
    IDENTITY_KEYS,
    Inputs,
    Share,
    assign,
    finish_ranks,
    open_peer,
    prepare,
    store_meta,
)
from actstore.extract.tokens import MAX_TOKENS_CAP, encode_rows, encode_texts, needs_span
from actstore.extract.writer import Writer, crash_after_windows, window_buffers, write_error
from actstore.models import (
    LoadedModel,
    attention_module,
    decoder_layers,
    default_store_dtype,
    load_model,
    mlp_module,
    mlp_width,
    wrap_model,
)
from actstore.prompts import get_prompt
from actstore.store import open_store
from actstore.store.format import storage_dtype

__all__ = ["extract", "ExtractConfig", "ExtractResult", "ExtractError", "parse_layers",
           "plan_batches", "DEFAULT_BATCH_SIZE", "BATCH_TOKENS_PER_ROW", "MAX_TOKENS_CAP",
           "HOOK_POINT", "SITE_HOOKS", "TOKEN_RULE", "TOKEN_RULES", "IDENTITY_KEYS", "POSITIONS",
           "SITES"]


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
    repaired: list = field(default_factory=list)   # [start, stop) row ranges --repair rewrote

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        s = self.store
        sites = tuple(s.sites)
        what = "token rows" if s.ragged else "rows"
        return (f"{self.rows_done}/{s.n_rows} {what} x {s.n_layers} layers x {s.d_model} "
                + (f"[{', '.join(sites)}] " if sites != ("resid",) else "")
                + f"({self.bytes / 2**20:.1f} MiB {s.dtype}) -> {s.path} in {self.seconds:.1f} s "
                f"({self.rows_per_s:.1f} rows/s, padding {100 * self.padding_fraction:.1f}%"
                + (f", {self.processes} processes" if self.processes > 1 else "")
                + (f", resumed at row {self.resumed_from}"
                   if self.resumed_from and not self.repaired else "") + ")"
                + ("; repaired rows " + ", ".join(f"{a}-{b - 1}" for a, b in self.repaired)
                   if self.repaired else ""))


def extract(model=None, dataset=None, prompt=None, out=None, config: ExtractConfig | None = None,
            **options) -> ExtractResult:
    """Extract the activations of ``dataset``'s texts into the store ``out``: at the token
    ``config.position`` (default: the entity's last token) of every row, at every site of
    ``config.sites`` (default: the residual stream), every layer of ``config.layers``.

    A paper dataset or built-in needs a ``prompt`` (its text is BOS + prompt + entity); a table of
    your own (``text_column`` / ``entity_column`` + ``template``, or an ``EntityDataset`` with a
    ``text`` column) brings its texts and takes no prompt (BOS + text). An existing store at
    ``out`` is resumed if it was made with the same model, prompt, dataset, table options,
    layers, sites, position, dtype, compute dtype, batch size and padding side, and refused
    otherwise (``overwrite=True`` replaces it). The run holds the store's writer lock
    (``<out>.actstore-lock``, :mod:`actstore.store.lock`) from before the store is opened,
    created or deleted until it ends: a second writer is refused. Every row is tokenised first
    and one longer than ``max_tokens`` is an error. Under torchrun (``WORLD_SIZE`` > 1) every
    rank runs this function: rank 0 creates or validates the store, the unfinished row windows
    are dealt to the ranks, each writes its own windows (whole shards) and records them in its
    own range record, and rank 0 folds the records into ``rows_done`` at the end. Zarr stores
    only (HDF5 allows one writer). See docs/scale-out.md.

    Parameters
    ----------
    model : str, LoadedModel or (model, tokenizer), optional
        A name/path for :func:`actstore.models.load_model` (default: the embedded
        SmolLM2-135M), a loaded model, or a Hugging Face pair.
    dataset : str, Path or EntityDataset
        A name/path for :func:`actstore.datasets.load_dataset` (with ``config``'s table
        options when given), or a loaded dataset.
    prompt : str or Prompt, optional
        A prompt name (:func:`actstore.prompts.get_prompt`) or a prompt; required for a paper
        dataset or built-in, refused for a table of your own.
    out : str or Path
        The store: a directory (Zarr v3) or a ``.h5`` file (HDF5).
    config : ExtractConfig, optional
        Every other option (the arguments above, when given, replace its fields).
    **options
        Fields of :class:`ExtractConfig` (``layers``, ``sites``, ``position``, ``dtype``,
        ``batch_size``, ``padding_side``, ``text_column``, ``stop_after_rows``...),
        replacing the config's.

    Returns
    -------
    ExtractResult
        Its ``store`` is open read-only.

    Raises
    ------
    ExtractError
        A bad option (a prompt missing or not allowed, a position the texts cannot give, a
        site at layer 0), a row over ``max_tokens``, a store another run is writing, a store made
        with other settings, a value the stored dtype cannot hold, a failed write (the
        message says what is kept and how to resume).
    """
    cfg = _config(config, options, model=model, dataset=dataset, prompt=prompt, out=out)
    cfg, dtype_reason = _store_dtype(cfg)
    out = Path(cfg.out)
    ctx = context(use_cuda=False)   # control messages only (gloo); None: one process
    inp = _inputs(cfg, _device(ctx, cfg))
    meta = store_meta(cfg, inp, dtype_reason)
    with _sigterm_exits():
        # rank 0 alone, holding the store's writer lock from here to the end; the others wait
        store, todo, lock, repaired = prepare(ctx, cfg, out, meta, inp)
        try:
            result = _extract(cfg, inp, meta, store, todo, out, ctx)
            result.repaired = repaired
            return result
        finally:
            if lock is not None:
                lock.release()


@contextmanager
def _sigterm_exits():
    """SIGTERM (torchrun stopping a failed job, a batch scheduler, ``kill``) raises SystemExit
    (status 143) here, as Ctrl-C raises KeyboardInterrupt: queued windows are written and the
    writer lock is released. Only where SIGTERM has its default action (main thread; a
    program's own handler is left alone); restored afterwards."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _extract(cfg: ExtractConfig, inp: Inputs, meta: dict, store, todo: list[int], out: Path,
             ctx) -> ExtractResult:
    """The windows ``todo`` of the prepared ``store`` (``None``: another rank's), computed,
    written and recorded; the result (the store reopened read-only)."""
    # From here on an error on one rank must not leave the others waiting: every rank ends at
    # the same status exchange (finish_ranks), failed or not.
    failure, share = None, None
    try:
        store = store if store is not None else open_peer(ctx, out)
        share = assign(ctx, store, todo, cfg.stop_after_rows)
        loop, writer, t0 = _run(cfg, inp, meta, store, share, out, ctx)
    except BaseException as exc:
        if ctx is None:
            raise
        failure = exc
    # (finish_ranks raises on every rank if any failed: below, loop, writer and t0 are set)
    rows = share.rows if ctx is None else finish_ranks(ctx, store, failure, share)
    seconds = time.perf_counter() - t0
    store.close()
    final = open_store(out)
    L, n, d = len(inp.layers), inp.n_rows, sum(inp.sites.values())
    return ExtractResult(store=final, rows=rows, rows_done=final.rows_done, seconds=seconds,
                         padding_fraction=loop.padding_fraction,
                         bytes=L * n * d * storage_dtype(cfg.dtype).itemsize,
                         resumed_from=share.start_row, forward_seconds=loop.forward_seconds,
                         write_seconds=writer.write_seconds,
                         processes=1 if ctx is None else ctx.world,
                         rank=0 if ctx is None else ctx.rank)


def _config(config: ExtractConfig | None, options: dict, **inputs) -> ExtractConfig:
    """``config`` (default: the defaults) with the given inputs and ``options`` in place."""
    fields = {f.name for f in dataclasses.fields(ExtractConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(f"extract() got unexpected keyword arguments {unknown}")
    given = {k: v for k, v in inputs.items() if v is not None}
    cfg = dataclasses.replace(config or ExtractConfig(), **given, **options)
    own = cfg.own_table or (cfg.dataset is not None and not isinstance(cfg.dataset, (str, Path))
                            and _own_texts(cfg.dataset))
    needed = ("dataset", "out") if own else ("dataset", "prompt", "out")
    missing = [k for k in needed if getattr(cfg, k) is None]
    if missing:
        hint = ("; --prompt for a paper dataset or built-in (coords, where_is, ...), or "
                "--text-column / --entity-column with --template for a table of your own"
                if "prompt" in missing else "")
        raise ExtractError(f"extract() needs {', '.join(missing)}{hint}")
    return cfg


def _store_dtype(cfg: ExtractConfig) -> tuple[ExtractConfig, str]:
    """The config with ``dtype`` "auto" resolved for its model, and the reason the store's meta
    records (``dtype_reason``): before the model loads, as the compute dtype "auto" on a GPU
    follows the stored one."""
    if cfg.dtype != "auto":
        return cfg, f"given: {cfg.dtype}"
    model = cfg.model
    if isinstance(model, LoadedModel):
        name = model.info.get("id")
    elif isinstance(model, tuple):
        name = getattr(model[0].config, "_name_or_path", None) or type(model[0]).__name__
    else:
        name = None if model is None else str(model)
    dtype, why = default_store_dtype(name)
    return dataclasses.replace(cfg, dtype=dtype), f"auto: {why}"


def _own_texts(ds) -> bool:
    """True for a table of the user's own (its texts in a ``text`` column), False for a paper
    dataset or built-in (texts made from a prompt)."""
    return ds.template is not None or "text" in ds.table.columns


def _table_spec(cfg: ExtractConfig):
    """The TableSpec of the config's table options, or None (a paper dataset or built-in)."""
    if not cfg.own_table:
        return None
    return TableSpec(text_column=cfg.text_column, entity_column=cfg.entity_column,
                     template=cfg.template, targets=names(cfg.targets),
                     group_columns=names(cfg.group_columns), split_column=cfg.split_column,
                     id_column=cfg.id_column)


def _table_meta(cfg: ExtractConfig, ds) -> dict | None:
    """The store meta "table": how a table of your own became texts (None: a paper dataset)."""
    if not _own_texts(ds):
        return None
    return {"text_column": cfg.text_column, "entity_column": cfg.entity_column,
            "template": ds.template,
            "targets": list(names(cfg.targets)), "group_columns": list(names(cfg.group_columns)),
            "split_column": cfg.split_column, "id_column": cfg.id_column}


def _device(ctx, cfg: ExtractConfig) -> str:
    """The device to load the model on: under torchrun each rank takes GPU LOCAL_RANK."""
    import torch  # deferred: `actstore --help` imports this package
    if ctx is not None and cfg.device_map is None and cfg.device in ("auto", "cuda") \
            and torch.cuda.is_available():
        gpu = ctx.local_rank % torch.cuda.device_count()   # one GPU per rank
        torch.cuda.set_device(gpu)
        return f"cuda:{gpu}"
    return cfg.device


def _inputs(cfg: ExtractConfig, device: str) -> Inputs:
    """The dataset, prompt and model (loaded if named), the layers, sites and position to keep,
    and every text's ids."""
    # dataset, prompt and position first: cheap, and their errors should not wait for a model
    if isinstance(cfg.dataset, (str, Path)):
        ds = datasets.load_dataset(str(cfg.dataset), kind=cfg.kind,
                                   drop_invalid=cfg.drop_invalid, table=_table_spec(cfg))
    else:
        ds = cfg.dataset
    if cfg.limit is not None:
        ds = ds.head(cfg.limit)
    if len(ds) == 0:
        raise ExtractError(f"dataset {ds.name!r} has no rows to extract")
    own, has_entity = _own_texts(ds), ds.has_entity
    if own and cfg.prompt is not None:
        raise ExtractError("--prompt is for the paper datasets and built-ins: a table of your "
                           "own brings its texts (--text-column) or its template (--entity-"
                           "column with --template); drop --prompt")
    pr = None if own else (cfg.prompt if not isinstance(cfg.prompt, str)
                           else get_prompt(cfg.prompt, kind=ds.kind))
    position = cfg.position or ("last-entity" if has_entity else "last")
    if position in ("last-entity", "first-entity") and not has_entity:
        raise ExtractError(f"--position {position} needs an entity in every text: this table "
                           "has none (give --entity-column), or use --position last, mean or all")
    sites = cfg.site_names
    if isinstance(cfg.model, LoadedModel):
        lm = cfg.model
    elif isinstance(cfg.model, tuple):
        lm = wrap_model(*cfg.model)
    else:
        lm = load_model(cfg.model, device=device, compute_dtype=cfg.compute_dtype,
                        store_dtype=cfg.dtype, device_map=cfg.device_map)
    layers = parse_layers(cfg.layers, lm.n_layers)
    if 0 in layers and "neurons" in sites:
        raise ExtractError("--neurons needs layers >= 1 (the embeddings have no MLP); "
                           "drop layer 0 from --layers")
    block_sites = [s for s in sites if s in ("attn_out", "mlp_out")]
    if 0 in layers and block_sites:
        raise ExtractError(f"--sites {','.join(block_sites)} needs layers >= 1 (the "
                           "embeddings have no attention or MLP output); drop layer 0 from "
                           "--layers")
    widths = _site_widths(lm, sites)
    # every text's ids once, here: the length check (rank 0) sees them all before any forward
    span = needs_span(position, own) and has_entity
    if own:
        t = ds.table
        rows = encode_texts(lm.tokenizer, t["text"].tolist(), t["entity_start"].to_numpy(),
                            t["entity_end"].to_numpy(), spans=span)
    else:
        rows = encode_rows(pr, lm.tokenizer, ds.table["entity"].tolist(), spans=span)
    return Inputs(ds, pr, lm, layers, widths.get("neurons"), rows, widths, position,
                  _table_meta(cfg, ds))


def _site_widths(lm: LoadedModel, sites: tuple[str, ...]) -> dict[str, int]:
    """{site: width} in store order; finding each site's module now (a model without one is
    refused before any forward pass)."""
    block = decoder_layers(lm.model)[0]
    widths = {}
    for site in sites:
        if site == "neurons":
            widths[site] = mlp_width(block)
        else:
            if site == "attn_out":
                attention_module(block)
            elif site == "mlp_out":
                mlp_module(block)
            widths[site] = lm.d_model   # the attention and MLP outputs add to the residual
    return widths


def _run(cfg: ExtractConfig, inp: Inputs, meta: dict, store, share: Share, out: Path, ctx):
    """Compute this process's windows and write them (off this thread); returns the batch loop
    and the writer (their counters) and the start time."""
    rank = 0 if ctx is None else ctx.rank
    free = window_buffers(len(inp.layers), store.rows_per_chunk, inp.sites, cfg.dtype)
    writer = Writer(store, free, share.record, crash_after_windows(rank))
    writer.start()
    loop = bar = None
    t0 = time.perf_counter()
    try:
        bar = _progress_bar(cfg, share, out, inp, ctx)
        loop = BatchLoop(inp.lm, inp.layers, inp.sites, dtype=cfg.dtype,
                         batch_size=meta["batch_size"], side=meta["padding_side"],
                         labels=inp.labels, ragged=inp.position == "all",
                         on_rows=None if bar is None else bar.update)
        _stream(loop, writer, free, share.windows, inp, store.rows_per_chunk, bar)
    except BaseException:
        _stop(writer, loop, bar)
        store.close()
        raise
    _stop(writer, loop, bar)
    if writer.error is not None:
        err = write_error(writer.error, store, out, distributed=ctx is not None)
        store.close()
        raise err from None
    return loop, writer, t0


def _stream(loop: BatchLoop, writer: Writer, free, windows: list[int], inp: Inputs, R: int,
            bar) -> None:
    """Each window: its texts and kept tokens, its batches run into a free buffer, queued for
    the writer."""
    n = inp.n_rows
    for w0 in windows:
        w1 = min(n, w0 + R)
        sel = inp.rows.select(inp.position, w0, w1)
        bufs = free.get()
        if writer.error is not None:
            break  # reported by the caller, after the writer has stopped
        loop.window(sel, w0, bufs)
        writer.put(w0, w1 - w0, bufs)
        if bar is not None:
            bar.set_postfix(pad=f"{100 * loop.padding_fraction:.0f}%", refresh=False)


def _progress_bar(cfg: ExtractConfig, share: Share, out: Path, inp: Inputs, ctx):
    """A tqdm bar on rank 0 (distributed: over its own share), or None."""
    if not (cfg.progress and share.windows and (ctx is None or ctx.is_main)):
        return None
    from tqdm.auto import tqdm  # deferred: `actstore --help` imports this package
    total = inp.n_rows if ctx is None else share.rows
    unit = "token" if inp.position == "all" else "row"
    return tqdm(total=total, initial=total - share.rows, unit=unit, desc=f"extract {out.name}",
                dynamic_ncols=True, smoothing=0.1)


def _stop(writer: Writer, loop: BatchLoop | None, bar) -> None:
    """Let the writer finish what is queued, remove the hooks, close the bar."""
    writer.stop()
    if loop is not None:
        loop.close()
    if bar is not None:
        bar.close()


class _CallablePackage(ModuleType):
    """This package, callable: ``actstore.extract(model, dataset, config)`` is the Python API's
    entry point (:func:`extract` with the config as third argument) while ``actstore.extract``
    stays the package its modules live in (``actstore.extract.ExtractConfig``)."""

    def __call__(self, model=None, dataset=None, config: ExtractConfig | None = None,
                 **options) -> ExtractResult:
        return extract(model=model, dataset=dataset, config=config, **options)


sys.modules[__name__].__class__ = _CallablePackage
