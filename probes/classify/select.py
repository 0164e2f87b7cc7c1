"""C chosen per layer by stratified k-fold, as scikit-learn ``LogisticRegressionCV(Cs=grid,
cv=StratifiedKFold(k), refit=True)``: every (layer, fold) problem is fitted for each C in batched
solves along the increasing C path (a fold's held-out rows get weight 0), each fold's held-out rows
are scored (accuracy, or mean log-probability = negative log loss), the fold scores are summed and
the first best C in grid order wins (with an increasing grid: the smallest C among ties), then
each layer is refitted on all rows at its C, warm-started from the mean of its fold solutions.
``class_weight="balanced"`` weights come from all the rows given, once (as scikit-learn); held-out
rows are scored unweighted (as ``scoring="accuracy"``)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from probes.classify.labels import stratified_folds
from probes.classify.logistic import (
    _TOL,
    WORK_COUNTS,
    _check,
    _solve,
    add_work,
    class_weights,
)
from probes.errors import ClassifyError

__all__ = ["LogisticCV", "select_c", "SCORINGS"]

SCORINGS = ("accuracy", "neg_log_loss")


@dataclass
class LogisticCV:
    """Result of :func:`select_c` per layer position.

    Cs: (n_C,) grid; fold_scores: (L, k, n_C); scores: (L, n_C) mean over folds; best_index:
    (L,); C: (L,) chosen C; coef: (L, d) or (L, K, d) and intercept: (L,) or (L, K) refitted on
    all rows; n_iter, converged: (L,) of the refit; folds: (n,) fold ids; scoring: its name;
    work: the work of the fold fits and the refit (:func:`probes.classify.logistic.add_work`).
    """
    Cs: np.ndarray
    fold_scores: np.ndarray
    scores: np.ndarray
    best_index: np.ndarray
    C: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    n_iter: np.ndarray
    converged: np.ndarray
    folds: np.ndarray
    n_classes: int
    scoring: str
    work: dict = field(default_factory=dict)

    _PER_LAYER = ("fold_scores", "scores", "best_index", "C", "coef", "intercept", "n_iter",
                  "converged")

    @classmethod
    def concat(cls, parts: list[LogisticCV]) -> LogisticCV:
        """One result from the results of consecutive chunks of layers (the same rows, grid and
        folds): the per-layer arrays joined, the work counts added up."""
        per_layer = {f: np.concatenate([getattr(p, f) for p in parts]) for f in cls._PER_LAYER}
        work = {}
        for p in parts:
            for stage, counts in p.work.items():
                into = work.setdefault(stage, {k: v for k, v in counts.items()
                                               if k not in WORK_COUNTS})
                for key in WORK_COUNTS:
                    if key in counts:
                        into[key] = into.get(key, 0) + counts[key]
        return replace(parts[0], **per_layer, work=work)


def _fold_scores(X, codes, folds, coef, icpt, scoring: str) -> np.ndarray:
    """Held-out scores (L, k, n_C) from fold fits coef (L, k, n_C, [K,] d), in float64."""
    import torch  # deferred: heavy optional dependency

    L, k, nC = coef.shape[:3]
    d = coef.shape[-1]
    out = np.empty((L, k, nC))
    for f in range(k):
        test = folds == f
        y = torch.as_tensor(codes[test])
        Xt = torch.as_tensor(np.asarray(X[:, test], dtype=np.float64))
        W = torch.as_tensor(coef[:, f]).reshape(L, nC, -1, d)          # (L, n_C, K', d)
        b = torch.as_tensor(icpt[:, f]).reshape(L, 1, nC, -1)
        Z = (Xt @ W.permute(0, 3, 1, 2).reshape(L, d, -1)).reshape(L, -1, nC, W.shape[2]) + b
        if W.shape[2] == 1:                                             # binary: class 1 if z > 0
            z = Z[..., 0]
            pred = (z > 0).long()
            logp = -torch.nn.functional.softplus(torch.where(y[None, :, None] == 1, -z, z))
        else:
            pred = Z.argmax(-1)
            idx = y[None, :, None, None].expand(L, -1, nC, 1)
            logp = (Z.gather(-1, idx) - torch.logsumexp(Z, -1, keepdim=True))[..., 0]
        if scoring == "accuracy":
            out[:, f] = (pred == y[None, :, None]).double().mean(1).numpy()
        else:
            out[:, f] = logp.clamp_min(float(np.log(np.finfo(np.float64).eps))).mean(1).numpy()
    return out


def _refit(X, codes, K, Cs, best, w, fold_coef, fold_icpt, dtype, tol, max_iter, device, work):
    """Refit each layer on all rows at its chosen C, one batched solve per distinct C."""
    L = X.shape[0]
    coef = np.empty((L,) + fold_coef.shape[3:])
    icpt = np.empty((L,) + fold_icpt.shape[3:])
    n_iter, conv = np.empty(L, np.int64), np.empty(L, bool)
    for j in np.unique(best):
        ls = np.flatnonzero(best == j)
        init = (fold_coef[ls, :, j].mean(1)[:, None, None],
                fold_icpt[ls, :, j].mean(1)[:, None, None])
        c, b, it, cv = _solve(X[ls], codes, K, Cs[j:j + 1], w[None], dtype, tol, max_iter,
                              device, init, work=work)
        coef[ls], icpt[ls], n_iter[ls], conv[ls] = c[:, 0, 0], b[:, 0, 0], it[:, 0, 0], cv[:, 0, 0]
    return coef, icpt, n_iter, conv


def select_c(X, codes, Cs, *, cv: int = 5, folds=None, scoring: str = "accuracy",
             n_classes: int | None = None, sample_weight=None, class_weight: str | None = None,
             dtype: str = "float64", tol: float | None = None, max_iter: int = 100,
             device=None) -> LogisticCV:
    """Choose C per layer by stratified k-fold on the given (train) rows, then refit.

    Parameters
    ----------
    X : (L, n, d) array
        Features of L layers (train rows only).
    codes : (n,) int array
        Class codes 0..K-1.
    Cs : sequence of float
        The grid, in the order ties are broken (first best wins).
    cv : int
        Number of stratified folds (ignored when ``folds`` is given).
    folds : (n,) int array, optional
        Fold ids 0..k-1 to use instead of :func:`stratified_folds`.
    scoring : {"accuracy", "neg_log_loss"}
        Held-out score, higher is better.
    n_classes, sample_weight, class_weight, dtype, tol, max_iter, device
        As :func:`probes.classify.logistic.fit_logistic_path`.

    Returns
    -------
    LogisticCV
    """
    if scoring not in SCORINGS:
        raise ClassifyError(f"scoring must be one of {', '.join(SCORINGS)}, got {scoring!r}")
    codes, K, Cs, w = _check(X, codes, Cs, n_classes, sample_weight)
    w = class_weights(codes, K, w, class_weight)
    folds = stratified_folds(codes, cv) if folds is None else np.asarray(folds, np.int64)
    k = int(folds.max()) + 1
    if folds.shape != codes.shape or folds.min() < 0 or k < 2:
        raise ClassifyError("folds must be (n,) ids 0..k-1 with k >= 2")
    for f in range(k):
        present = np.bincount(codes[(folds != f) & (w > 0)], minlength=K) > 0
        if not present.all():
            raise ClassifyError(f"the train part of fold {f} has no rows of class "
                                f"{int(np.argmin(present))}: use stratified folds or fewer folds")
    tol = _TOL[dtype] if tol is None else tol
    weights = np.stack([w * (folds != f) for f in range(k)])
    work = add_work(None)
    fc, fi, _, _ = _solve(X, codes, K, Cs, weights, dtype, tol, max_iter, device, work=work)
    Xs = X.detach().cpu().numpy() if hasattr(X, "detach") else X    # torch tensor or array
    fold_scores = _fold_scores(Xs, codes, folds, fc, fi, scoring)
    best = fold_scores.sum(axis=1).argmax(-1)                         # first best in grid order
    refit_work = add_work(None)
    coef, icpt, n_iter, conv = _refit(X, codes, K, Cs, best, w, fc, fi, dtype, tol, max_iter,
                                      device, refit_work)
    return LogisticCV(Cs, fold_scores, fold_scores.mean(1), best, Cs[best], coef, icpt, n_iter,
                      conv, folds, K, scoring, {"folds": work, "refit": refit_work})
