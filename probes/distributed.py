"""Distributed probe fitting under torchrun: each rank streams its own rows, the additive
statistics are all-reduced, every rank solves the same small eigenproblems, rank 0 scores and
writes the results (docs/scale-out.md).

``torchrun --nproc-per-node N -m probes fit --all-layers STORE --out DIR`` runs
:func:`fit_all_layers_distributed` on every rank. What is combined, per batch of layers:

* statistics pass: ``GramStats`` (n, Σx, XᵀX, Xᵀy, Σy, yyᵀ per fold) summed over the ranks
  (:meth:`probes.stats.GramStats.all_reduce_`, which first moves every rank's statistics to
  rank 0's shift). Every rank then holds the same totals and computes the same eigendecomposition.
* LOO pass (cv="loo"): each rank projects its own rows; the per-alpha sums of squared LOO
  residuals and the train-row count are all-reduced (so every rank picks the same alpha), and
  the per-row predictions are reduced to rank 0 (each row is non-zero on exactly one rank).
* k-fold: the fold scores come from the reduced per-fold statistics alone; the prediction pass
  is split by rows like the LOO pass.

The dual form (fewer train rows than dimensions, n < d) needs the rows themselves, and they fit
in memory by definition (n·d < d² numbers): rank 0 reads them all from the shared store and fits
alone, the other ranks return at once. Results equal the one-process fit up to the order of
float64 summation (~1e-12 relative).
"""
from __future__ import annotations

from actstore.distributed import Context, agree, cli_call, context, mark_all_ranks
from actstore.errors import PeerError
from actstore.store import open_store
from actstore.store.progress import split_windows
from probes.errors import BackendUnavailable, FitError
from probes.kernels import resolve

__all__ = ["RowShard", "fit_all_layers_distributed", "cli_fit"]


class _PeerCopy(FitError, PeerError):
    """Another rank's error (the same one, or "rank K failed: ..."), raised so that every rank
    stops together; the CLI prints it on rank 0 only."""


class RowShard:
    """This rank's rows of a distributed fit (contiguous, chunk-aligned) and the reductions.

    ``rank``/``world`` from the process group; rows are dealt in blocks of ``rows_per_chunk``
    (the store's chunk) so every rank reads whole chunks.
    """

    def __init__(self, rank: int, world: int, rows_per_chunk: int, group=None):
        self.rank, self.world, self.R, self.group = int(rank), int(world), int(rows_per_chunk), group
        self.agreed = False   # the first status exchange (agree) is behind this rank

    def agree(self, error: BaseException | None = None) -> None:
        """The status exchange every rank reaches once its checks are done, before the first
        reduction: returns when no rank met an error, else every rank raises (its own error, or
        a copy of the failed rank's). Errors raised before it are sent here by
        :func:`fit_all_layers_distributed`, so no rank waits in a collective for a failed one."""
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

    def any_bad(self, bad):
        """Per-layer flags (B,) checked on rank 0's reduced predictions (all rows; the other
        ranks' buffers are partial) -> the same flags on every rank."""
        import numpy as np
        import torch
        import torch.distributed as dist
        local = np.asarray(bad, dtype=bool)
        t = torch.from_numpy((local if self.is_main else np.zeros_like(local)).astype(np.int64))
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t.numpy().astype(bool)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, n: int) -> tuple[int, int]:
        """[lo, hi) of this rank among rows [0, n) (empty when there are more ranks than chunks)."""
        mine = split_windows(list(range(0, int(n), self.R)), self.world)[self.rank]
        if not mine:
            return int(n), int(n)
        return mine[0], min(int(n), mine[-1] + self.R)

    def reduce_stats(self, stats, B, d, k, F, device):
        """All-reduce ``stats`` (None: this rank had no rows, contributes zeros)."""
        from probes.stats import GramStats
        if stats is None:
            stats = GramStats.zeros(B, d, k, F, device=device)
        return stats.all_reduce_(group=self.group)

    def reduce_loo(self, acc) -> None:
        """Sum the LOO residual sums and train counts on every rank; predictions to rank 0."""
        import torch
        import torch.distributed as dist
        dist.all_reduce(acc.sse, op=dist.ReduceOp.SUM, group=self.group)
        cnt = torch.tensor([float(acc.n_train)], dtype=torch.float64, device=acc.sse.device)
        dist.all_reduce(cnt, op=dist.ReduceOp.SUM, group=self.group)
        acc.n_train = int(round(float(cnt[0])))
        if acc.pred is not None:
            # rows outside a rank's range are zero there, so the sum is every rank's own rows
            dist.reduce(acc.pred, dst=0, op=dist.ReduceOp.SUM, group=self.group)

    def reduce_predictions(self, preds, device):
        """(B, n, k) numpy predictions, each rank filling its rows -> all rows on rank 0."""
        import torch
        import torch.distributed as dist
        t = torch.from_numpy(preds).to(device)
        dist.reduce(t, dst=0, op=dist.ReduceOp.SUM, group=self.group)
        return t.cpu().numpy()


def _device_is_cuda(backend, device) -> bool:
    """Whether the fit will run on a GPU (an impossible request is reported by the fit itself,
    after the ranks have met, so that every rank stops with the message)."""
    try:
        return resolve(backend, device)[1].type == "cuda"
    except BackendUnavailable:
        return False


def fit_all_layers_distributed(store, **kwargs):
    """:func:`probes.fit.fit_all_layers` over the ranks of a torchrun job (same arguments).

    One process (no torchrun): exactly ``fit_all_layers``. Distributed: returns the results
    dict on rank 0 (which alone writes ``out``) and None on the other ranks. On GPUs each rank
    uses GPU ``LOCAL_RANK`` and the tensors are reduced with NCCL; on CPU with gloo.
    """
    from probes.fit import fit_all_layers

    cuda = _device_is_cuda(kwargs.get("backend", "auto"), kwargs.get("device"))
    ctx = context(use_cuda=cuda)
    if ctx is None:
        return fit_all_layers(store, **kwargs)
    shard = None
    try:
        # context() bound this rank to GPU LOCAL_RANK: device "cuda" now means that one
        if isinstance(store, (str, bytes)) or hasattr(store, "__fspath__"):
            store = open_store(store)
        shard = RowShard(ctx.rank, ctx.world, store.rows_per_chunk)
        if not ctx.is_main:
            kwargs["out"] = None
            kwargs["progress"] = False
        return fit_all_layers(store, shard=shard, **kwargs)
    except BaseException as exc:
        if shard is None or not shard.agreed:
            # failed before the first exchange (a bad argument, a store this node cannot
            # open): meet the other ranks there, so that every rank stops with a message
            agree(ctx, exc, _PeerCopy)
        raise


def cli_fit(store, **kwargs):
    """``fastprobe fit`` under torchrun: rank 0 returns the result; other ranks return None.
    An error every rank meets (unknown target, NaN activations) is printed once, by rank 0;
    a rank's own error is printed by that rank, prefixed ``[rank k]``; exit status 2
    (:func:`actstore.distributed.cli_call`)."""
    return cli_call(fit_all_layers_distributed, store, prog="fastprobe", **kwargs)
