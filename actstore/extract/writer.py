"""From captured vectors to durable rows: the overflow check and narrowing into a window buffer
(:class:`Narrowing`), pinned GPU staging buffers (:class:`Staging`), the writer thread that
writes finished windows off the compute thread and records them (:class:`Writer`), and the
one-line messages of write failures (:func:`write_error`). torch is imported by the functions
that need it, so that ``actstore --help`` stays fast."""
from __future__ import annotations

import errno
import os
import queue
import threading
import time

import numpy as np

from actstore import native
from actstore.errors import ExtractError
from actstore.io import write_atomic
from actstore.store.format import storage_dtype, to_storage

__all__ = ["Narrowing", "Staging", "Writer", "window_buffers", "crash_after_windows",
           "pause_point", "write_error"]


def window_buffers(n_layers: int, rows: int, d_model: int, d_mlp: int | None, dtype: str,
                   count: int = 2) -> queue.Queue:
    """A queue of ``count`` (resid, neurons) window buffers in the stored dtype: one being
    filled, one being written, so memory stays bounded."""
    npdt = storage_dtype(dtype)
    free: queue.Queue = queue.Queue()
    for _ in range(count):
        free.put((np.empty((n_layers, rows, d_model), dtype=npdt),
                  np.empty((n_layers, rows, d_mlp), dtype=npdt) if d_mlp else None))
    return free


def _overflow_hint(dtype: str, fp16_compute: bool) -> str:
    if dtype == "float16":
        # computing in float16 overflows as well: a wider stored dtype alone does not help
        return ("; extract with --dtype bfloat16 --compute-dtype bfloat16 (the model "
                "computes in float16, which overflows too) or --dtype float32"
                if fp16_compute else "; extract with --dtype bfloat16 or --dtype float32")
    return ("; the model produced non-finite values (try --compute-dtype "
            + ("bfloat16 or float32)" if fp16_compute else "float32)"))


class Narrowing:
    """Checks captured (L, B, d) blocks against the stored dtype and narrows them into the rows
    of a window buffer. Values the dtype cannot hold (|x| > 65504 for float16, inf, NaN) are an
    :class:`ExtractError` naming the layer, row, entity and dim, never stored."""

    def __init__(self, dtype: str, layers: list[int], entities: list[str], compute_dtype):
        self.dtype, self.layers, self.entities = dtype, layers, entities
        self.compute_dtype = compute_dtype

    def __call__(self, item, bufs, w0: int) -> None:
        """Store one batch ``item`` = (resid, neurons or None, rows, CUDA event or None) into
        the window buffers ``bufs`` of the window starting at row ``w0``."""
        x, nx, rows, event = item
        if event is not None:
            event.synchronize()
        resid_buf, neu_buf = bufs
        self.store(x, resid_buf, rows, w0, "hidden state")
        if nx is not None:
            self.store(nx, neu_buf, rows, w0, "MLP neuron activation")

    def store(self, x, buf, rows, w0: int, what: str) -> None:
        """Refuse values the stored dtype cannot hold, then narrow x (L, B, d) into buf rows."""
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
            raise self._overflow(x, flat, rows, w0, what)
        buf[:, list(rows)] = to_storage(x, self.dtype)

    def _overflow(self, x, flat: int, rows, w0: int, what: str) -> ExtractError:
        import torch  # deferred, as above
        L, B, d = x.shape
        li, bi, di = flat // (B * d), (flat // d) % B, flat % d
        row = w0 + rows[bi]
        val = float(x.reshape(-1)[flat])
        hint = _overflow_hint(self.dtype, self.compute_dtype == torch.float16)
        return ExtractError(
            f"{what} {val:g} at layer {self.layers[li]}, row {row} ({self.entities[row]!r}), "
            f"dim {di} does not fit {self.dtype}"
            + (" (|x| > 65504)" if self.dtype == "float16" else "") + hint)


class Staging:
    """Two pinned host buffers per array on a GPU run: batch k copies out (asynchronously)
    while batch k-1 is checked."""

    def __init__(self, n_layers: int, batch_size: int, d_model: int, d_mlp: int | None,
                 compute_dtype):
        import torch  # deferred, as above
        self._torch = torch
        self.buffers = [(torch.empty((n_layers, batch_size, d_model), dtype=compute_dtype,
                                     pin_memory=True),
                         torch.empty((n_layers, batch_size, d_mlp), dtype=compute_dtype,
                                     pin_memory=True) if d_mlp else None) for _ in range(2)]

    def copy_out(self, k: int, resid, neu, rows, device) -> tuple:
        """Start copying batch ``k``'s captured tensors to the host; the item to check once
        its event has completed."""
        B = resid.shape[1]
        hx, hn = self.buffers[k % 2]
        hx = hx[:, :B]
        hx.copy_(resid, non_blocking=True)
        if neu is not None:
            hn = hn[:, :B]
            hn.copy_(neu, non_blocking=True)
        ev = self._torch.cuda.Event()
        ev.record(self._torch.cuda.current_stream(device))  # device's stream, not device 0's
        return (hx, hn if neu is not None else None, rows, ev)


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

    def _write(self, start: int, r: int, bufs) -> None:
        resid, neu = bufs
        self.store.write_rows(start, resid[:, :r], None if neu is None else neu[:, :r])
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
