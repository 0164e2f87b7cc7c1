"""The dual form, for a layer with fewer train rows than dimensions (n < d): its rows are read
into memory (n·d ≤ d² numbers) and K = (X - x̄)(X - x̄)ᵀ is eigendecomposed (probes.ridge).
One process fits it (rank 0 of a distributed fit)."""
from __future__ import annotations

import torch

from actstore.store.format import as_compute
from probes.fit import controls
from probes.fit.problem import BatchFit, Job, non_finite_error
from probes.ridge.solvers import dual_coef, dual_kfold_scores, dual_loo

__all__ = ["fit_layer"]


def fit_layer(job: Job, layer: int) -> BatchFit:
    """The probe of one layer (a batch of one), read whole from the store."""
    p, store, precision = job.problem, job.store, job.config.precision
    with job.meter.phase("stats"):
        X = as_compute(store.layer(layer)[:p.n], store.dtype).to(job.compute_dtype)
        if not bool(torch.isfinite(X).all()):
            raise non_finite_error(store, layer, p.n, job.shard)
        job.rows.measure(X[None], 0, [layer])
        X = job.rows.apply(X[None], 0, [layer], job.compute_dtype)[0]
        job.meter.tick(p.n)
    with job.meter.phase("solve"):
        X = X.to(job.device)
        Xtr, Ytr = X[torch.as_tensor(p.train, device=job.device)], p.Yz[p.train]
        if p.cv == "loo":
            scores, _, state = dual_loo(Xtr, Ytr, p.alphas, precision)
        else:
            scores = dual_kfold_scores(Xtr, Ytr, p.fold[p.train], p.alphas, precision)
            _, _, state = dual_loo(Xtr, Ytr, p.alphas[:1], precision)
        idx, best = controls.select_alpha(p, scores[None], job.config.alpha_per_target)
        w, b = dual_coef(state, p.alphas[idx[0]])
        preds = X.to(torch.float64) @ w + b
        return BatchFit(coef=w.cpu().numpy()[None], intercept=b.cpu().numpy()[None],
                        alpha_idx=idx, cv_scores=scores.cpu().numpy()[None], best=best,
                        predictions=preds.cpu().numpy()[None])
