"""probes.stream: read-ahead order and error propagation on CPU; GPU double buffering (marked
gpu)."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from probes.kernels import gram_update, reference
from probes.stats import GramStats, choose_shift
from probes.stream import read_ahead, stream_to_device


def make_chunks(n, seed=0, shape=(3, 5, 7)):
    g = np.random.default_rng(seed)
    return [(i * shape[1], g.standard_normal(shape).astype(np.float16)) for i in range(n)]


def test_cpu_pass_through_in_order():
    data = make_chunks(5)
    got = list(stream_to_device(iter(data), device="cpu"))
    assert [s for s, _ in got] == [s for s, _ in data]
    for (_, a), (_, t) in zip(data, got):
        assert isinstance(t, torch.Tensor) and np.array_equal(t.numpy(), a)
    conv = list(stream_to_device(data, device="cpu", dtype=torch.float32))
    assert conv[0][1].dtype == torch.float32


def test_callables_run_ahead_on_threads_in_order():
    data = make_chunks(7, seed=1)
    seen = []

    def task(i):
        def run():
            time.sleep(0.02 * ((7 - i) % 3))     # finish out of order
            seen.append(threading.current_thread().name)
            return data[i]
        return run

    got = list(read_ahead([task(i) for i in range(7)], prefetch=2, workers=3))
    assert [s for s, _ in got] == [s for s, _ in data]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(got, data))
    assert all(name.startswith("actstore-read") for name in seen)


def test_errors_propagate_and_early_stop_does_not_hang():
    def gen():
        yield from make_chunks(2)
        raise RuntimeError("disk on fire")

    it = read_ahead(gen())
    next(it), next(it)
    with pytest.raises(RuntimeError, match="disk on fire"):
        next(it)

    def endless():
        i = 0
        while True:
            yield i
            i += 1

    it = read_ahead(endless(), prefetch=2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()                                   # stops the producer thread

    def bad():
        raise ValueError("bad chunk")

    with pytest.raises(ValueError, match="bad chunk"):
        list(read_ahead([bad, bad]))


def test_cuda_requested_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="no CUDA device"):
        next(stream_to_device(make_chunks(1), device="cuda"))


@pytest.mark.gpu
def test_gpu_double_buffering_delivers_every_chunk_intact():
    # varying sizes (the last chunk short), fresh data, compute on each chunk before the next
    g = np.random.default_rng(3)
    data = [(i, g.standard_normal((4, 1000 + (i % 3) * 37, 257)).astype(np.float16))
            for i in range(9)]
    sums = []
    for start, t in stream_to_device(data, device="cuda"):
        assert t.is_cuda and t.dtype == torch.float16
        sums.append(t.to(torch.float64).sum(dim=(1, 2)).cpu())   # consumer work on its stream
    for (_, a), s in zip(data, sums):
        assert np.allclose(s.numpy(), a.astype(np.float64).sum(axis=(1, 2)), rtol=1e-12, atol=1e-9)
    # clones taken two steps later are still right (buffers are reused only after that)
    kept = [t.clone() for _, t in stream_to_device(data[:4], device="cuda", dtype=torch.float32)]
    for (_, a), t in zip(data[:4], kept):
        assert np.array_equal(t.cpu().numpy(), a.astype(np.float32))


@pytest.mark.gpu
def test_gpu_stream_into_statistics_pass():
    # store-like chunks (L, r, d) streamed to the GPU and accumulated: same as one float64 pass
    g = np.random.default_rng(4)
    L, d, k = 3, 520, 2
    chunks = [(s, (g.standard_normal((L, 700, d)) + 2).astype(np.float16))
              for s in range(0, 4200, 700)]
    Y = g.standard_normal((4200, k))
    shift = choose_shift(chunks[0][1])
    got = GramStats.zeros(L, d, k, shift=shift, device="cuda")
    want = GramStats.zeros(L, d, k, shift=shift)
    Yc = torch.from_numpy(Y).cuda()
    for start, X in stream_to_device(chunks, device="cuda"):
        gram_update(got, X, Yc[start:start + X.shape[1]])
    for start, X in chunks:
        reference.gram_update(want, X, Y[start:start + X.shape[1]])
    rel = float((got.xtx.cpu() - want.xtx).norm() / want.xtx.norm())
    assert rel < 2e-3 and float(got.n.sum()) == 4200
