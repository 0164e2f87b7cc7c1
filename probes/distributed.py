"""How the processes of a fit combine their rows: a :class:`Reducer`. One process uses
:class:`LocalReducer` (every reduction a no-op); under torchrun :class:`RowShard` deals each rank
its own chunk-aligned rows and sums with torch.distributed what the fit adds up: the statistics
(every rank then solves the same small eigenproblems), the LOO residual sums, and the per-row
predictions (to rank 0, which scores and writes). :func:`run_on_ranks` starts a fit on every
rank. Results equal the one-process fit up to the order of float64 summation (~1e-12 relative);
docs/scale-out.md."""
from __future__ import annotations

import os
from typing import Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist

from actstore.distributed import Context, agree, context, mark_all_ranks
from actstore.errors import PeerError
from actstore.store import open_store
from actstore.store.progress import split_windows
from probes.errors import BackendUnavailable, FitError
from probes.kernels import resolve
from probes.ridge.solvers import LooAccumulator
from probes.stats import GramStats

__all__ = ["Reducer", "LocalReducer", "RowShard", "run_on_ranks", "uses_cuda"]


class _PeerCopy(FitError, PeerError):
    """Another rank's error (the same one, or "rank K failed: ..."), raised so that every rank
    stops together; the CLI prints it on rank 0 only."""


class Reducer(Protocol):
    """What the fit asks of the processes it runs on; it calls every method unconditionally."""

    is_main: bool
    """True on the process that scores and writes (rank 0; the only one locally)."""

    def rows(self, n: int) -> tuple[int, int]:
        """[lo, hi) of the rows [0, n) this process streams."""

    def agree(self, error: BaseException | None = None) -> None:
        """Meet the other processes once every check is done: raise when any met an error."""

    def alike(self, err: BaseException) -> BaseException:
        """``err``, met by every process at the same point, made ready to raise here."""

    def any_bad(self, bad: np.ndarray) -> np.ndarray:
        """Per-layer flags judged on the main process's (complete) predictions, everywhere."""

    def reduce_stats(self, stats: GramStats) -> GramStats:
        """The statistics summed over the processes (every process gets the sum)."""

    def reduce_loo(self, acc: LooAccumulator) -> None:
        """LOO residual sums and train counts summed everywhere; predictions to the main one."""

    def reduce_predictions(self, preds: np.ndarray, device) -> np.ndarray:
        """(B, n, k) predictions, each process filling its rows -> every row on the main one."""

    def share_rows(self, values: np.ndarray, device) -> np.ndarray:
        """(..., n) per-row values, each process filling its rows (0 elsewhere) -> every row on
        every process (the row norms that --row-norm clip needs everywhere)."""


class LocalReducer:
    """One process: every row is this process's, every reduction is the identity."""

    is_main = True

    def rows(self, n: int) -> tuple[int, int]:
        return 0, int(n)

    def agree(self, error: BaseException | None = None) -> None:
        if error is not None:
            raise error

    def alike(self, err: BaseException) -> BaseException:
        return err

    def any_bad(self, bad: np.ndarray) -> np.ndarray:
        return np.asarray(bad, dtype=bool)

    def reduce_stats(self, stats: GramStats) -> GramStats:
        return stats

    def reduce_loo(self, acc: LooAccumulator) -> None:
        return None

    def reduce_predictions(self, preds: np.ndarray, device) -> np.ndarray:
        return preds

    def share_rows(self, values: np.ndarray, device) -> np.ndarray:
        return values


class RowShard:
    """This rank's rows of a distributed fit (contiguous, chunk-aligned) and the reductions
    (torch.distributed). Rows are dealt in blocks of ``rows_per_chunk`` (the store's chunk) so
    every rank reads whole chunks."""

    def __init__(self, rank: int, world: int, rows_per_chunk: int, group=None):
        self.rank, self.world, self.R = int(rank), int(world), int(rows_per_chunk)
        self.group = group
        self.agreed = False   # the first status exchange (agree) is behind this rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, n: int) -> tuple[int, int]:
        """[lo, hi) of this rank among rows [0, n) (empty when there are more ranks than chunks)."""
        mine = split_windows(list(range(0, int(n), self.R)), self.world)[self.rank]
        if not mine:
            return int(n), int(n)
        return mine[0], min(int(n), mine[-1] + self.R)

    def agree(self, error: BaseException | None = None) -> None:
        """The status exchange every rank reaches once its checks are done, before the first
        reduction: returns when no rank met an error, else every rank raises (its own error, or
        a copy of the failed rank's). Errors raised before it are sent here by
        :func:`run_on_ranks`, so no rank waits in a collective for a failed one."""
        self.agreed = True
        agree(Context(self.rank, self.world, self.rank), error, _PeerCopy)

    def alike(self, err: BaseException) -> BaseException:
        """``err``, which every rank meets at the same point (it comes from reduced data): to
        raise on this rank, a silent copy on ranks other than 0 (rank 0 reports it)."""
        if not self.is_main:
            copy = _PeerCopy(str(err))
            copy.__cause__ = err
            err = copy
        return mark_all_ranks(err)

    def any_bad(self, bad: np.ndarray) -> np.ndarray:
        """Per-layer flags (B,) checked on rank 0's reduced predictions (all rows; the other
        ranks' buffers are partial) -> the same flags on every rank."""
        local = np.asarray(bad, dtype=bool)
        t = torch.from_numpy((local if self.is_main else np.zeros_like(local)).astype(np.int64))
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t.numpy().astype(bool)

    def reduce_stats(self, stats: GramStats) -> GramStats:
        """All-reduce ``stats`` (a rank without rows contributes zeros)."""
        return stats.all_reduce_(group=self.group)

    def reduce_loo(self, acc: LooAccumulator) -> None:
        """Sum the LOO residual sums and train counts on every rank; predictions to rank 0."""
        dist.all_reduce(acc.sse, op=dist.ReduceOp.SUM, group=self.group)
        cnt = torch.tensor([float(acc.n_train)], dtype=torch.float64, device=acc.sse.device)
        dist.all_reduce(cnt, op=dist.ReduceOp.SUM, group=self.group)
        acc.n_train = int(round(float(cnt[0])))
        if acc.pred is not None:
            # rows outside a rank's range are zero there, so the sum is every rank's own rows
            dist.reduce(acc.pred, dst=0, op=dist.ReduceOp.SUM, group=self.group)

    def reduce_predictions(self, preds: np.ndarray, device) -> np.ndarray:
        """(B, n, k) numpy predictions, each rank filling its rows -> all rows on rank 0."""
        t = torch.from_numpy(preds).to(device)
        dist.reduce(t, dst=0, op=dist.ReduceOp.SUM, group=self.group)
        return t.cpu().numpy()

    def share_rows(self, values: np.ndarray, device) -> np.ndarray:
        """(..., n) values, each rank filling its rows (0 elsewhere) -> all rows everywhere."""
        t = torch.from_numpy(np.ascontiguousarray(values)).to(device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t.cpu().numpy()


def uses_cuda(backend, device) -> bool:
    """Whether a fit with this backend and device runs on a GPU (an impossible request is
    reported by the fit itself, after the ranks have met, so that every rank stops with it)."""
    try:
        return resolve(backend, device)[1].type == "cuda"
    except BackendUnavailable:
        return False


def run_on_ranks(fit: Callable, store, *, use_cuda: bool, **kwargs):
    """``fit(store, **kwargs)`` in one process; under torchrun ``fit(store, shard=RowShard,
    **kwargs)`` on every rank (``out`` and ``progress`` on rank 0 only), each rank bound to GPU
    ``LOCAL_RANK`` when ``use_cuda``. An error before the ranks' first exchange (a bad argument,
    a store this node cannot open) is exchanged there, so that every rank stops with a message.
    """
    ctx = context(use_cuda=use_cuda)
    if ctx is None:
        return fit(store, **kwargs)
    shard = None
    try:
        # context() bound this rank to GPU LOCAL_RANK: device "cuda" now means that one
        if isinstance(store, (str, bytes, os.PathLike)):
            store = open_store(store)
        shard = RowShard(ctx.rank, ctx.world, store.rows_per_chunk)
        if not ctx.is_main:
            kwargs.update(out=None, progress=False)
        return fit(store, shard=shard, **kwargs)
    except BaseException as exc:
        if shard is None or not shard.agreed:
            agree(ctx, exc, _PeerCopy)
        raise
