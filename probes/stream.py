"""Stream store chunks to a GPU with the reads, the host-to-device copies and the compute
overlapped (:func:`stream_to_device`), or read them ahead on CPU threads (:func:`read_ahead`).

Three stages work on different chunks at once: reads run ahead on CPU threads (a bounded
queue); each chunk goes through one of two pinned host buffers to the device on a side CUDA
stream (double buffering); the consumer's stream waits on the copy's event, so its kernels are
ordered after the data arrived without blocking the host. A yielded device tensor lives in one
of two reused buffers: valid until the iteration after next (``.clone()`` to keep it).
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

import numpy as np

__all__ = ["stream_to_device", "read_ahead"]

_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def read_ahead(chunks, prefetch: int = 2, workers: int = 2) -> Iterator:
    """Yield the items of ``chunks`` in order while later ones are produced on CPU threads.

    ``chunks``: an iterable (drained by one background thread) or a list of callables (run on
    ``workers`` threads, at most ``prefetch`` + ``workers`` in flight). Exceptions re-raise here.
    """
    prefetch = max(1, int(prefetch))
    if isinstance(chunks, (list, tuple)) and chunks and all(callable(c) for c in chunks):
        with ThreadPoolExecutor(max_workers=max(1, int(workers)),
                                thread_name_prefix="actstore-read") as pool:
            pending = []
            it = iter(chunks)
            for fn in it:
                pending.append(pool.submit(fn))
                if len(pending) > prefetch + workers - 1:
                    break
            while pending:
                fut = pending.pop(0)
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(pool.submit(nxt))
                yield fut.result()
        return

    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def produce():
        try:
            for item in chunks:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put(_Failure(exc))

    t = threading.Thread(target=produce, name="actstore-read-ahead", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        # unblock the producer if it waits on a full queue
        while t.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(timeout=0.05)


def stream_to_device(chunks: Iterable | list[Callable], device=None, prefetch: int = 2,
                     workers: int = 2, dtype=None) -> Iterator:
    """Yield ``(row_start, tensor)`` with each chunk on ``device`` (see the module docstring).

    ``device``: None = the current CUDA device if there is one, else CPU (pass-through).
    ``dtype``: torch dtype to convert to on the device (None keeps the stored dtype).
    """
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but no CUDA device is available")
    source = read_ahead(chunks, prefetch=prefetch, workers=workers)
    if dev.type != "cuda":
        for start, arr in source:
            t = (arr if isinstance(arr, torch.Tensor)
                 else torch.from_numpy(np.ascontiguousarray(arr)))
            yield start, (t.to(dtype) if dtype is not None else t)
        return

    side = torch.cuda.Stream(device=dev)
    host = [None, None]           # pinned staging buffers (flat, uint8)
    devbuf = [None, None]         # device buffers (flat, uint8)
    copied = [None, None]         # event: H2D copy of slot i done
    released = [None, None]       # event: consumer's work on slot i queued before this point
    slot = 0
    for start, arr in source:
        a = arr.detach().cpu().numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
        a = np.ascontiguousarray(a)
        nbytes = a.nbytes
        # the pinned buffer is free once its previous H2D copy finished
        if copied[slot] is not None:
            copied[slot].synchronize()
        if host[slot] is None or host[slot].numel() < nbytes:
            host[slot] = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)
        hview = host[slot][:nbytes].numpy()
        np.copyto(hview, a.reshape(-1).view(np.uint8))
        with torch.cuda.stream(side):
            if released[slot] is not None:
                side.wait_event(released[slot])       # consumer done with this device slot
            if devbuf[slot] is None or devbuf[slot].numel() < nbytes:
                devbuf[slot] = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=dev)
            devbuf[slot][:nbytes].copy_(host[slot][:nbytes], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(side)
            copied[slot] = ev
        cur = torch.cuda.current_stream(dev)
        cur.wait_event(copied[slot])
        tdtype = _torch_dtype(a.dtype)
        t = devbuf[slot][:nbytes].view(tdtype).view(a.shape)
        # the consumer uses t on its current stream; keep the allocator from recycling it early
        devbuf[slot].record_stream(cur)
        if dtype is not None and dtype != tdtype:
            t = t.to(dtype)
        yield start, t
        rel = torch.cuda.Event()
        rel.record(cur)
        released[slot] = rel
        slot ^= 1
    torch.cuda.current_stream(dev).synchronize()


def _torch_dtype(np_dtype):
    import torch

    return {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
            np.dtype(np.float64): torch.float64, np.dtype(np.int32): torch.int32,
            np.dtype(np.int64): torch.int64, np.dtype(np.uint8): torch.uint8,
            np.dtype(np.int16): torch.int16, np.dtype(np.uint16): torch.uint16}[np.dtype(np_dtype)]
