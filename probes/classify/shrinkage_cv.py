"""Shrinkage LDA with the shrinkage chosen per layer by k-fold cross-validation, streamed.

The statistics pass fills a :class:`probes.stats.GramStats` with one-hot class targets and fold
ids (any kernel backend). Per fold f, :func:`~probes.classify.closed_form.lda_grid` on the other
folds' statistics gives every shrinkage's model; a second pass (:meth:`ShrinkageCV.update`)
scores each held-out row with its fold's models, keeping per fold, shrinkage and layer the
correct count and the log-loss sum. The choice per layer is the first best, in grid order, of
the mean over folds of the fold scores (scikit-learn ``GridSearchCV`` over
``LinearDiscriminantAnalysis(solver="lsqr")`` with the same folds, scoring "accuracy" or
"neg_log_loss"); :meth:`ShrinkageCV.refit` solves on all folds with each layer's choice.
"""
from __future__ import annotations

import numpy as np

from probes.classify.closed_form import ClassStats, LinearProbe, lda_grid
from probes.errors import ClassifyError

__all__ = ["ShrinkageCV", "SCORINGS"]

SCORINGS = ("accuracy", "neg_log_loss")


class ShrinkageCV:
    """Cross-validated choice of the LDA shrinkage per layer.

    Parameters
    ----------
    stats : GramStats with F ≥ 2 folds whose targets were the one-hot class indicators.
    shrinkages : the grid, floats in [0, 1].
    scoring : "accuracy" (fraction right) or "neg_log_loss" (minus the mean log loss, the
        probabilities clipped to [eps, 1-eps] as scikit-learn).
    """

    def __init__(self, stats, shrinkages, *, scoring: str = "accuracy"):
        if scoring not in SCORINGS:
            raise ClassifyError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
        F = stats.n_folds
        if F < 2:
            raise ClassifyError(f"cross-validation needs at least 2 folds, got {F}")
        self.stats, self.scoring = stats, scoring
        self.shrinkages = [float(s) for s in np.atleast_1d(np.asarray(shrinkages, float))]
        self.models = [lda_grid(ClassStats.from_gram_stats(stats, [i != f for i in range(F)]),
                                self.shrinkages) for f in range(F)]
        S, L = len(self.shrinkages), stats.B
        self.tally = np.zeros((F, S, L))         # rows right, or the log-loss sum, per fold
        self.rows = np.zeros(F)

    def update(self, x_chunk, codes, fold) -> ShrinkageCV:
        """Score a chunk's rows with the models of their folds: ``x_chunk`` (L, r, d), ``codes``
        (r,), ``fold`` (r,) the fold id of each row as in the statistics pass (-1 = skipped)."""
        x = np.asarray(x_chunk)
        codes, fold = np.asarray(codes).reshape(-1), np.asarray(fold).reshape(-1)
        if x.ndim != 3 or x.shape[1] != codes.size or fold.size != codes.size:
            raise ClassifyError(f"chunk (L, r, d), codes (r,) and fold (r,) disagree: "
                                f"{x.shape}, {codes.shape}, {fold.shape}")
        eps = np.finfo(np.float64).eps
        for f in np.unique(fold[fold >= 0]).tolist():
            if f >= len(self.models):
                raise ClassifyError(f"fold id {f} >= the statistics' {len(self.models)} folds")
            rows = fold == f
            xf, yf = x[:, rows], codes[rows]
            for si, probe in enumerate(self.models[f]):
                if self.scoring == "accuracy":
                    self.tally[f, si] += (probe.predict(xf) == yf).sum(1)
                else:
                    p = probe.predict_proba(xf)[:, np.arange(yf.size), yf]
                    self.tally[f, si] -= np.log(np.clip(p, eps, 1 - eps)).sum(1)
            self.rows[f] += rows.sum()
        return self

    def scores(self) -> np.ndarray:
        """(S, L): mean over folds of the fold's accuracy or minus its mean log loss."""
        n = self.stats.n.cpu().numpy()
        if not np.array_equal(self.rows, n):
            raise ClassifyError(f"scored rows per fold {self.rows.tolist()} differ from the "
                                f"statistics' {n.tolist()}; feed update() the same rows")
        per_fold = self.tally / self.rows[:, None, None]
        return (per_fold if self.scoring == "accuracy" else -per_fold).mean(0)

    def best_index(self) -> np.ndarray:
        """(L,) index into the grid of the first best score per layer."""
        return np.argmax(self.scores(), axis=0)

    def best_shrinkage(self) -> np.ndarray:
        """(L,) the chosen shrinkage per layer."""
        return np.asarray(self.shrinkages)[self.best_index()]

    def refit(self) -> LinearProbe:
        """LDA on all folds with each layer's chosen shrinkage; ``shrinkage`` holds them (L,)."""
        best = self.best_index()
        probes = lda_grid(ClassStats.from_gram_stats(self.stats), self.shrinkages)
        pick = np.arange(best.size)
        coef = np.stack([p.coef for p in probes])[best, pick]
        icpt = np.stack([p.intercept for p in probes])[best, pick]
        return LinearProbe(coef, icpt, probes[0].n_classes, "lda",
                           np.asarray(self.shrinkages)[best])
