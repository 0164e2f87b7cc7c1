"""From captured vectors to durable rows: the overflow check and narrowing into the window
buffers of every site (:class:`Narrowing`), pinned GPU staging buffers (:class:`Staging`), the
writer thread that writes finished windows off the compute thread and records them
(:class:`Writer`), and the one-line messages of write failures (:func:`write_error`). torch is
imported by the functions that need it, so that ``actstore --help`` stays fast."""
from __future__ import annotations

import errno
import os
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np

from actstore import native
from actstore.errors import ExtractError
from actstore.io import write_atomic
from actstore.store.format import storage_dtype, to_storage

__all__ = ["SITE_VALUES", "Batch", "Narrowing", "Staging", "Writer", "window_buffers",
           "crash_after_windows", "pause_point", "write_error"]


# what each site's values are, for the overflow message
SITE_VALUES = {"resid": "hidden state", "attn_out": "attention output", "mlp_out": "MLP output",
               "neurons": "MLP neuron activation"}


def window_buffers(n_layers: int, rows: int, sites: dict[str, int], dtype: str,
                   count: int = 2) -> queue.Queue:
    """A queue of ``count`` window buffers, each ``{site: (n_layers, rows, d_site)}`` in the
    stored dtype: one being filled, one being written, so memory stays bounded."""
    npdt = storage_dtype(dtype)
    free: queue.Queue = queue.Queue()
    for _ in range(count):
        free.put({site: np.empty((n_layers, rows, d), dtype=npdt) for site, d in sites.items()})
    return free


def _overflow_hint(dtype: str, fp16_compute: bool) -> str:
    if dtype == "float16":
        # computing in float16 overflows as well: a wider stored dtype alone does not help
        return ("; extract with --dtype bfloat16 --compute-dtype bfloat16 (the model "
                "computes in float16, which overflows too) or --dtype float32"
                if fp16_compute else "; extract with --dtype bfloat16 or --dtype float32")
    return ("; the model produced non-finite values (try --compute-dtype "
            + ("bfloat16 or float32)" if fp16_compute else "float32)"))


@dataclass
class Batch:
    """One forward pass's captured vectors: ``blocks`` {site: (L, K, d)} (on the device, or
    pinned host copies once ``event`` has completed), the window row of each of the K vectors
    (``dest``) and the text it comes from (``texts``)."""
    blocks: dict
    dest: np.ndarray
    texts: np.ndarray
    event: object = None


class Narrowing:
    """Checks captured (L, K, d) blocks against the stored dtype and narrows them into the rows
    of a window buffer. Values the dtype cannot hold (|x| > 65504 for float16, inf, NaN) are an
    :class:`ExtractError` naming the site, layer, row, entity (or text) and dim, never stored.
    ``labels``: each text's entity (or text), for that message; ``ragged``: rows are tokens."""

    def __init__(self, dtype: str, layers: list[int], labels: list[str], compute_dtype,
                 ragged: bool = False):
        self.dtype, self.layers, self.labels = dtype, layers, labels
        self.compute_dtype, self.ragged = compute_dtype, ragged

    def __call__(self, item: Batch, bufs: dict, w0: int) -> None:
        """Store one batch ``item`` into the window buffers ``bufs`` ({site: array}) of the
        window starting at row ``w0``."""
        if item.event is not None:
            item.event.synchronize()
        for site, x in item.blocks.items():
            self.store(x, bufs[site], item, w0, site)

    def store(self, x, buf, item: Batch, w0: int, site: str) -> None:
        """Refuse values the stored dtype cannot hold, then narrow x (L, K, d) into buf rows."""
        import torch  # deferred: `actstore --help` imports this package
        x = x.detach()
        if x.device.type != "cpu":
            x = x.float().cpu()
        if self.dtype == "float16":
            flat = native.find_fp16_overflow(
                x.float().numpy() if x.dtype != torch.float32 else x.numpy())
        else:
            bad = ~torch.isfinite(x.float())
            flat = int(bad.reshape(-1).nonzero()[0, 0]) if bool(bad.any()) else -1
        if flat >= 0:
            raise self._overflow(x, flat, item, w0, site)
        buf[:, item.dest] = to_storage(x, self.dtype)

    def _overflow(self, x, flat: int, item: Batch, w0: int, site: str) -> ExtractError:
        import torch  # deferred, as above
        L, B, d = x.shape
        li, bi, di = flat // (B * d), (flat // d) % B, flat % d
        row, text = w0 + int(item.dest[bi]), int(item.texts[bi])
        val = float(x.reshape(-1)[flat])
        hint = _overflow_hint(self.dtype, self.compute_dtype == torch.float16)
        where = (f"row {row} (a token of text {text}, {self.labels[text]!r})" if self.ragged
                 else f"row {row} ({self.labels[text]!r})")
        return ExtractError(
            f"{SITE_VALUES[site]} ({site}) {val:g} at layer {self.layers[li]}, {where}, "
            f"dim {di} does not fit {self.dtype}"
            + (" (|x| > 65504)" if self.dtype == "float16" else "") + hint)


class Staging:
    """Two pinned host buffers per site on a GPU run: batch k copies out (asynchronously)
    while batch k-1 is checked. A buffer grows when a batch keeps more vectors than it holds
    (``--position all``: one per token)."""

    def __init__(self, n_layers: int, batch_size: int, sites: dict[str, int], compute_dtype):
        import torch  # deferred, as above
        self._torch = torch
        self.n_layers, self.sites, self.compute_dtype = n_layers, sites, compute_dtype
        self.buffers = [self._alloc(batch_size) for _ in range(2)]

    def _alloc(self, rows: int) -> dict:
        return {site: self._torch.empty((self.n_layers, rows, d), dtype=self.compute_dtype,
                                        pin_memory=True) for site, d in self.sites.items()}

    def copy_out(self, k: int, item: Batch, device) -> Batch:
        """Start copying batch ``k``'s captured tensors to the host; the item to check once
        its event has completed."""
        K = len(item.dest)
        host = self.buffers[k % 2]
        if next(iter(host.values())).shape[1] < K:
            host = self.buffers[k % 2] = self._alloc(K)
        out = {}
        for site, x in item.blocks.items():
            h = host[site][:, :K]
            h.copy_(x, non_blocking=True)
            out[site] = h
        ev = self._torch.cuda.Event()
        ev.record(self._torch.cuda.current_stream(device))  # device's stream, not device 0's
        return Batch(out, item.dest, item.texts, ev)


class Writer(threading.Thread):
    """Writes finished windows in order, then records them (``record(start, stop)``: rows_done,
    or this rank's range record), and hands the buffers back to ``free``. Errors are kept for
    the main thread, which re-raises them. ``crash_after`` (tests): exit like kill -9 after
    that many windows, written but not recorded."""

    def __init__(self, store, free: queue.Queue, record, crash_after: int | None = None):
        super().__init__(daemon=True, name="actstore-writer")
        self.store = store
        self.record = record
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
                    self._write(start, r, bufs)
                except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                    self.error = exc
                self.write_seconds += time.perf_counter() - t
            self.free.put(bufs)

    def _write(self, start: int, r: int, bufs: dict) -> None:
        self.store.write_rows(start, {site: b[:, :r] for site, b in bufs.items()})
        self.windows += 1
        if self.windows == self.crash_after:
            os._exit(75)   # test hook: die like kill -9 with a block written but not recorded
        self.record(start, start + r)
        if self.windows == 1:
            pause_point("window")

    def put(self, start: int, rows: int, bufs) -> None:
        """Queue a finished window: rows ``start..start + rows`` are in ``bufs``."""
        self.q.put((start, rows, bufs))

    def stop(self) -> None:
        """Write what is queued, then end the thread."""
        self.q.put(None)
        self.join()


def pause_point(stage: str) -> None:
    """The test hook ``ACTSTORE_TEST_PAUSE=STAGE:FILE``: at ``stage`` ("locked": the writer
    lock taken, the store not yet touched; "window": the first window recorded) write this
    process's pid into FILE and wait until FILE is deleted (at most 10 minutes)."""
    hook = os.environ.get("ACTSTORE_TEST_PAUSE", "")
    if not hook.startswith(stage + ":"):
        return
    path = hook[len(stage) + 1:]
    write_atomic(path, str(os.getpid()))
    t0 = time.monotonic()
    while os.path.exists(path) and time.monotonic() - t0 < 600:
        time.sleep(0.01)


def crash_after_windows(rank: int) -> int | None:
    """The test hook ``ACTSTORE_TEST_CRASH_AFTER_WINDOWS=RANK:K``: K for this rank, else None."""
    crash = os.environ.get("ACTSTORE_TEST_CRASH_AFTER_WINDOWS", "")
    return int(crash.split(":")[1]) if crash and int(crash.split(":")[0]) == rank else None


def write_error(exc: BaseException, store, path, distributed: bool = False) -> ExtractError:
    """The one-line message of a failed window write: what failed and what is kept."""
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
