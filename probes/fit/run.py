""":func:`fit_all_layers`: exact ridge-CV probes for every layer of an activation store, scored
and written; :func:`fit_all_layers_distributed`, the same over the ranks of a torchrun job.
The passes are in ``primal`` (train rows >= d, streamed in batches of layers) and ``dual``
(n < d, one layer in memory at a time)."""
from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from actstore.store import open_store
from actstore.store.format import store_identity
from probes.distributed import LocalReducer, Reducer, run_on_ranks, uses_cuda
from probes.fit import controls, dual, primal
from probes.fit.config import FitConfig
from probes.fit.outliers import annotate, check_backend, norm_pass
from probes.fit.problem import BatchFit, Job, Meter, prepare
from probes.fit.results import FitResult, layer_entries, write_results
from probes.inputs import fit_view
from probes.kernels import resolve

__all__ = ["fit_all_layers", "fit_all_layers_distributed"]


def fit_all_layers(store, config: FitConfig | None = None, *, out=None,
                   shard: Reducer | None = None, **options) -> FitResult | None:
    """Fit a ridge probe with a CV-chosen alpha on every layer of ``store``; score it.

    Parameters
    ----------
    store : str, Path or ActivationStore
        The store, or any object with the ActivationStore reading API.
    config : FitConfig, optional
        The options (default ``FitConfig()``).
    out : str or Path, optional
        Directory for results.json, probes.npz, the best layer's predictions and the plots.
    shard : Reducer, optional
        How this process's rows combine with other processes' (a
        :class:`probes.distributed.RowShard` under torchrun, see
        :func:`fit_all_layers_distributed`); default one process.
    **options
        :class:`FitConfig` fields, overriding ``config``'s (the keyword API:
        ``fit_all_layers(store, targets=..., alphas=..., cv=..., layers=...)``).

    Returns
    -------
    FitResult or None
        The scored probes of every layer, also written to ``out``; None on ranks other than 0
        of a distributed fit (rank 0 scores and writes).
    """
    t0 = time.perf_counter()
    config = _config(config, options)
    if isinstance(store, (str, os.PathLike)):
        store = open_store(store)
    store = fit_view(store, config.site)       # the site's array; refuses a token-level store
    problem = controls.with_control(prepare(store, config), config, store.d_model)
    shard = LocalReducer() if shard is None else shard
    shard.agree()                  # every rank got here without an error (else all raise)
    if problem.form == "dual":
        if not shard.is_main:
            return None            # n < d rows fit in memory: rank 0 reads them all
        shard = LocalReducer()
    backend, device = resolve(config.backend, config.device)
    backend = check_backend(config.row_norm, config.backend, backend)
    passes = (1 if problem.form == "dual" else 2) + (config.row_norm == "clip")
    meter = Meter(len(problem.layers) * passes * problem.n if config.progress else None)
    job = Job(store, problem, config, backend, device, shard, meter)
    if config.row_norm == "clip":
        norm_pass(job)             # the thresholds come before the statistics
    fits = _fit(job)
    if config.row_norm != "clip":  # measured in the statistics pass, each rank its own rows
        job.rows.norms = shard.share_rows(job.rows.norms, device)
    meter.close()
    if not shard.is_main:
        return None                # rank 0 scores and writes the merged results
    result = _score(job, fits, t0)
    if out is not None:
        write_results(result, out, store=store)
    return result


def _config(config: FitConfig | None, options: dict) -> FitConfig:
    if config is None:
        return FitConfig(**options)
    if not isinstance(config, FitConfig):
        raise TypeError(f"config must be a FitConfig, got {type(config).__name__} (pass the "
                        "options by keyword)")
    return dataclasses.replace(config, **options) if options else config


def _fit(job: Job) -> BatchFit:
    """The probes of every layer: one layer at a time (dual) or batches of layers (primal)."""
    layers = job.problem.layers
    if job.problem.form == "dual":
        return BatchFit.concat([dual.fit_layer(job, layer) for layer in layers])
    step = primal.layers_per_batch(job)
    return BatchFit.concat([primal.fit_batch(job, layers[i:i + step])
                            for i in range(0, len(layers), step)])


def _score(job: Job, fits: BatchFit, t0: float) -> FitResult:
    """The FitResult: probes mapped back to target units, every layer scored."""
    p, store, config = job.problem, job.store, job.config
    fits, control = controls.split(p, fits, config.alpha_per_target)
    coef = fits.coef * p.sd[None, None, :]
    intercept = fits.intercept * p.sd[None, :] + p.mu[None, :]
    preds = fits.predictions * p.sd[None, None, :] + p.mu[None, None, :]
    positions = [list(store.layers).index(layer) for layer in p.layers]
    with job.meter.phase("metrics"):
        entries = layer_entries(p, p.layers, positions, fits.alpha_idx, fits.best, preds,
                                config.alpha_per_target)
        flags = annotate(entries, job.rows, p, preds, _row_names(store, p.n))
        control = controls.control_block(p, control, entries)
    best = max(entries, key=lambda e: (e["test"]["r2"], -e["position"]))
    meta = store.meta
    return FitResult(
        store=str(store.path), model=meta.get("model") if isinstance(meta, dict) else None,
        store_identity=store_identity(store), n_rows=p.n, d_model=store.d_model, site=store.site,
        targets=p.names, split=config.split, n_train=int(p.train.sum()),
        n_test=int(p.is_test.sum()), cv=config.cv, alpha_per_target=bool(config.alpha_per_target),
        alphas=p.alphas.tolist(), target_mean=p.mu.tolist(), target_std=p.sd.tolist(),
        backend=job.backend, precision=config.precision,
        stats_precision=config.precision if job.backend in ("cpu", "torch") else "float32",
        form=p.form, best_layer=best["layer"], best_position=best["position"],
        seconds={"total": time.perf_counter() - t0, **job.meter.seconds}, layers=entries,
        **flags,
        control=control,
        arrays={"coef": coef, "intercept": intercept, "alpha": p.alphas[fits.alpha_idx],
                "cv_scores": fits.cv_scores, "predictions": preds, "is_test": p.is_test,
                "layers": np.array(p.layers)})


def _row_names(store, n: int) -> list:
    """The entity name of each row (its row number when the table has no name column)."""
    ent = store.entities
    if ent is None or "name" not in getattr(ent, "columns", ()):
        return [str(i) for i in range(n)]
    return ent["name"].iloc[:n].astype(str).tolist()


def fit_all_layers_distributed(store, config: FitConfig | None = None,
                               **options) -> FitResult | None:
    """:func:`fit_all_layers` over the ranks of a torchrun job (same arguments).

    Parameters
    ----------
    store, config, **options
        As :func:`fit_all_layers`.

    Returns
    -------
    FitResult or None
        One process (no torchrun): exactly ``fit_all_layers``. Distributed: the result on rank
        0 (which alone writes ``out``), None on the other ranks. Each rank streams its own
        rows; on GPUs rank r uses GPU ``LOCAL_RANK`` and NCCL, on CPU gloo (docs/scale-out.md).
    """
    backend = options.get("backend", getattr(config, "backend", "auto"))
    device = options.get("device", getattr(config, "device", None))
    return run_on_ranks(fit_all_layers, store, use_cuda=uses_cuda(backend, device),
                        config=config, **options)
