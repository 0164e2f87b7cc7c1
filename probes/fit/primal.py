"""The primal form (train rows >= d), per batch of layers: the statistics pass (Σx, XᵀX, Xᵀy per
fold through ``probes.kernels.gram_update``), one batched float64 eigendecomposition, and the
projection pass Z = (X - x̄)V that gives every alpha's LOO residuals and every row's prediction
(k-fold scores come from the per-fold statistics; its pass only predicts)."""
from __future__ import annotations

import numpy as np
import torch

from actstore.store.format import as_compute
from probes.fit import controls
from probes.fit.problem import BatchFit, Job, non_finite_error
from probes.kernels import gram_update, preferred_chunk_rows
from probes.ridge.solvers import (
    LooAccumulator,
    PrimalFactor,
    kfold_scores_primal,
    primal_factor,
)
from probes.stats import GramStats, choose_shift
from probes.stream import read_ahead, stream_to_device

__all__ = ["layers_per_batch", "fit_batch", "statistics_pass", "solve", "loo_pass",
           "prediction_pass"]


def layers_per_batch(job: Job) -> int:
    """How many layers' statistics, eigenvectors and per-alpha predictions fit the memory
    budget (at least one)."""
    p, d = job.problem, job.store.d_model
    F, A, k = p.n_folds, len(p.alphas), p.Yz.shape[1]
    per_layer = 8 * (F * d * d + 3 * d * d + p.n * A * k + F * d * k)
    return max(1, int(job.config.memory_bytes // max(per_layer, 1)))


def fit_batch(job: Job, layers: list[int]) -> BatchFit:
    """Statistics pass, solve and projection pass for one batch of layers."""
    p = job.problem
    chunk_rows = job.config.chunk_rows or preferred_chunk_rows(
        job.store.d_model, len(layers), p.n_folds, max_bytes=64 << 20)
    with job.meter.phase("stats"):
        stats = statistics_pass(job, layers, chunk_rows)
    with job.meter.phase("solve"):
        factor, kfold = solve(job, layers, stats)
        del stats                  # the statistics are the batch's largest buffers
    with job.meter.phase("projection"):
        if p.cv == "loo":
            scores, preds = loo_pass(job, layers, factor, chunk_rows)
            idx, best, W, b = _choose(job, factor, scores)
        else:
            scores = kfold
            idx, best, W, b = _choose(job, factor, scores)
            preds = prediction_pass(job, layers, factor, W, chunk_rows)
    # Test rows never enter the statistics; a non-finite one shows up in its prediction.
    bad = job.shard.any_bad(~np.isfinite(preds).reshape(len(layers), -1).all(1))
    if bad.any():
        raise non_finite_error(job.store, layers[int(np.nonzero(bad)[0][0])], p.n, job.shard)
    return BatchFit(coef=W.cpu().numpy(), intercept=b.cpu().numpy(), alpha_idx=idx,
                    cv_scores=scores.cpu().numpy(), best=best, predictions=preds)


def _chunks(job: Job, layers: list[int], chunk_rows: int):
    """(row_start, block) of this process's rows for these layers: read ahead on CPU threads
    and, for a CUDA device, sent through pinned double buffers on a side stream
    (probes.stream). A block is valid until the iteration after next."""
    lo, hi = job.shard.rows(job.problem.n)
    store = job.store
    source = store.iter_chunks(rows=chunk_rows, layers=layers, start=lo, stop=hi)
    if job.device.type == "cuda" and store.dtype != "bfloat16":
        return stream_to_device(source, job.device)
    return read_ahead(source)


def statistics_pass(job: Job, layers: list[int], chunk_rows: int) -> GramStats:
    """Per-fold Σx, XᵀX, Xᵀy, Σy, YᵀY of the batch about a per-layer shift, summed over the
    processes (``job.shard``)."""
    p, store, d = job.problem, job.store, job.store.d_model
    # GPU kernels sum each chunk in float32 (into float64 totals) and refuse "float64".
    precision = job.config.precision if job.backend in ("cpu", "torch") else None
    stats = None
    for start, block in _chunks(job, layers, chunk_rows):
        r = block.shape[1]
        X = as_compute(block, store.dtype)          # bfloat16 arrives as float32
        if job.device.type == "cuda":
            X = X.to(job.device)
        job.rows.measure(X, start, layers)
        X = job.rows.apply(X, start, layers, job.compute_dtype)
        fold = p.fold[start:start + r]
        if stats is None:
            try:
                shift = choose_shift(X, fold)
            except ValueError:
                shift = None               # non-finite first chunk: found below, per layer
            stats = GramStats.zeros(len(layers), d, p.Yz.shape[1], p.n_folds, shift=shift,
                                    device=job.device)
        gram_update(stats, X, p.Yz[start:start + r], fold, backend=job.backend,
                    precision=precision)
        job.meter.tick(r)
    if stats is None:                      # no rows here (more processes than chunks)
        stats = GramStats.zeros(len(layers), d, p.Yz.shape[1], p.n_folds, device=job.device)
    return job.shard.reduce_stats(stats)


def solve(job: Job, layers: list[int], stats: GramStats):
    """(the eigendecomposed train statistics, k-fold scores (B, A, k) or None for LOO)."""
    p, B = job.problem, len(layers)
    finite = (torch.isfinite(stats.xtx.reshape(B, -1)).all(1)
              & torch.isfinite(stats.sx.reshape(B, -1)).all(1))
    if not bool(finite.all()):
        raise non_finite_error(job.store, layers[int((~finite).nonzero()[0])], p.n, job.shard)
    precision = job.config.precision
    tot = stats.totals()
    factor = primal_factor(float(tot.n[0]), tot.sx[:, 0], tot.xtx[:, 0], tot.sy[0],
                           tot.xty[:, 0], stats.shift, precision=precision)
    if p.cv == "loo":
        return factor, None
    return factor, kfold_scores_primal(stats.n, stats.sx, stats.xtx, stats.sy, stats.yty,
                                       stats.xty, p.alphas, precision=precision)


def _choose(job: Job, factor: PrimalFactor, scores):
    """(alpha index (B, k), best score, W (B, d, k), b (B, k)) of the best alphas."""
    idx, best = controls.select_alpha(job.problem, scores, job.config.alpha_per_target)
    W = factor.coef(job.problem.alphas[idx])
    return idx, best, W, factor.intercept(W)


def loo_pass(job: Job, layers: list[int], factor: PrimalFactor, chunk_rows: int):
    """(LOO scores (B, A, k), predictions (B, n, k) at the chosen alphas): the LOO residual sums
    and the predictions of every alpha, summed over the processes, then the chosen ones."""
    p = job.problem
    acc = LooAccumulator(factor, p.alphas, p.n, keep_predictions=True,
                         precision=job.config.precision)
    for start, block in _chunks(job, layers, chunk_rows):
        r = block.shape[1]
        # strided as read (a layer-major block's rows): the centring reads them in place
        X = job.rows.apply(as_compute(block, job.store.dtype, contiguous=False), start, layers,
                           job.compute_dtype)
        acc.update(start, X, p.Yz[start:start + r], p.train[start:start + r])
        job.meter.tick(r)
    job.shard.reduce_loo(acc)      # LOO residual sums everywhere, predictions on rank 0
    scores = acc.scores()
    idx, _ = controls.select_alpha(p, scores, job.config.alpha_per_target)
    return scores, acc.predictions(idx)


def prediction_pass(job: Job, layers: list[int], factor: PrimalFactor, W,
                    chunk_rows: int) -> np.ndarray:
    """(B, n, k) predictions (X - x̄)W + ȳ of every row, gathered on rank 0."""
    p = job.problem
    # centre first, (X - x̄)W + ȳ, as the LOO pass does: X W + b cancels away float32 digits
    # when the activations have a large mean
    Wd = W.to(job.compute_dtype)
    md = factor.mean.to(Wd.dtype)[:, None, :]
    preds = np.zeros((len(layers), p.n, p.Yz.shape[1]))
    for start, block in _chunks(job, layers, chunk_rows):
        r = block.shape[1]
        X = as_compute(block, job.store.dtype).to(device=job.device)
        X = job.rows.apply(X, start, layers, Wd.dtype).to(Wd.dtype)
        preds[:, start:start + r] = (torch.matmul(X - md, Wd).to(torch.float64)
                                     + factor.ybar).cpu().numpy()
        job.meter.tick(r)
    return job.shard.reduce_predictions(preds, job.device)
