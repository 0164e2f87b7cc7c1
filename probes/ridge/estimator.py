""":class:`RidgeProbeCV`, the scikit-learn face of the ridge solvers, for plain arrays and
DataFrames. With probes.classify.estimator, one of the two modules that import scikit-learn; it
passes every check of ``sklearn.utils.estimator_checks.check_estimator``
(tests/probes/test_estimator_conformance.py)."""
from __future__ import annotations

import numbers

import numpy as np
from sklearn.base import BaseEstimator, MultiOutputMixin, RegressorMixin
from sklearn.model_selection import check_cv
from sklearn.utils.validation import check_is_fitted

from probes.errors import ProbesError, RidgeError
from probes.kernels import resolve
from probes.ridge.alphas import parse_alphas
from probes.ridge.solvers import fit_arrays, kfold_assignment

try:                                    # scikit-learn >= 1.6: the public validator
    from sklearn.utils.validation import validate_data
except ImportError:                     # 1.3 - 1.5 (pyproject's floor): the same, as a method
    def validate_data(estimator, /, X="no_validation", y="no_validation", **kwargs):
        return estimator._validate_data(X, y, **kwargs)

__all__ = ["RidgeProbeCV"]


class RidgeProbeCV(MultiOutputMixin, RegressorMixin, BaseEstimator):
    """Ridge regression, alpha chosen by exact efficient LOO or k-fold CV (scikit-learn API).

    The same solver as ``fastprobe fit``: one float64 eigendecomposition (primal d×d when
    n >= d, dual n×n otherwise) gives every alpha of the grid at once.

    Parameters
    ----------
    alphas : sequence of float or str
        The grid, as numbers or a string ``"LO:HI:N"`` (log-spaced) / ``"a,b,c"``.
    cv : "loo", None, int, CV splitter or iterable of (train, test)
        ``"loo"`` (or None): exact leave-one-out, identical to
        ``sklearn.linear_model.RidgeCV()``; int K: K contiguous folds (sklearn ``KFold(K)``);
        a splitter (``KFold(5, shuffle=True)``) or explicit index splits: those. k-fold is scored
        by R² as ``RidgeCV(cv=...)`` scores it (a target constant on a validation fold scores
        0, or 1 if predicted exactly, as ``r2_score``).
    alpha_per_target : bool
        Choose one alpha per target column instead of one shared alpha (with any ``cv``).
    standardize_targets : bool
        z-score y with its (weighted) mean and population std before fitting (the paper's
        convention; changes the shared-alpha choice when targets have different scales).
        Coefficients and predictions are always in y's original units. With False the fit
        equals ``RidgeCV(alphas, alpha_per_target=...)`` on the raw y.
    backend : str
        ``"auto"`` (CUDA if available, else CPU), ``"cpu"``/``"torch"``, ``"cuda"``.

    Attributes
    ----------
    alpha_ : float or ndarray of shape (k,)
        The chosen alpha (per target with ``alpha_per_target`` and a 2-D y).
    coef_ : ndarray of shape (d,) or (k, d)
    intercept_ : float or ndarray of shape (k,)
    best_score_ : float or ndarray
        CV score of the chosen alpha (LOO: -mean of w·e² over the rows, e the LOO residual in
        the fitted units, w the sample weight or 1; k-fold: mean R²).
    cv_scores_ : ndarray of shape (n_alphas, k)
        Per-target scores of every alpha.
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Column names, when X was a DataFrame with string column names.
    """

    def __init__(self, alphas=(0.1, 1.0, 10.0), *, cv="loo", alpha_per_target=False,
                 standardize_targets=True, backend="auto"):
        self.alphas = alphas
        self.cv = cv
        self.alpha_per_target = alpha_per_target
        self.standardize_targets = standardize_targets
        self.backend = backend

    def fit(self, X, y, sample_weight=None) -> "RidgeProbeCV":
        """Choose alpha by CV on (X, y) and fit on all rows.

        Parameters
        ----------
        X : array-like or DataFrame of shape (n, d)
        y : array-like of shape (n,) or (n, k)
        sample_weight : float or array-like of shape (n,), optional
            Weights >= 0 of the rows in the ridge loss Σ w (y - ŷ)² + α‖β‖², as
            ``RidgeCV.fit(X, y, sample_weight)``: leave-one-out is then exact for the weighted
            problem and scored by -mean(w·e²); k-fold fits each fold with the weights and scores
            its validation rows by weighted R² (as RidgeCV's grid search does).

        Returns
        -------
        RidgeProbeCV
            self, fitted.
        """
        X, y = validated(self, X, y, reset=True, multi_output=True, y_numeric=True,
                          dtype=np.float64)
        alphas = parse_alphas(self.alphas)
        Y = y[:, None] if y.ndim == 1 else y
        n = X.shape[0]
        if n < 3:
            raise RidgeError(f"RidgeProbeCV needs at least 3 rows to choose alpha by "
                             f"cross-validation, got n_samples={n}")
        w = sample_weights(sample_weight, n)
        cv = self._splits(X, Y)
        mu, sd = self._target_scale(Y, w)
        idx, best, scores, coef, b = fit_arrays(X, (Y - mu) / sd, alphas, cv,
                                                self.alpha_per_target, resolve(self.backend)[1],
                                                sample_weight=w)
        self._set_fitted(coef.cpu().numpy() * sd[None, :], b.cpu().numpy() * sd + mu,
                         alphas[idx], best, y.ndim == 1)
        self.cv_scores_ = scores.cpu().numpy()
        return self

    def _target_scale(self, Y, w):
        """(mean, std) of the targets (weighted when w is given); a column whose rows of positive
        weight are all equal cannot be standardised."""
        if not self.standardize_targets:
            return np.zeros(Y.shape[1]), np.ones(Y.shape[1])
        rows = Y if w is None else Y[w > 0]
        const = np.nonzero(rows.max(0) == rows.min(0))[0]
        if const.size:
            raise RidgeError(f"target column(s) {const.tolist()} are constant: they cannot be "
                             "standardised (drop them, or pass standardize_targets=False)")
        if w is None:
            return Y.mean(0), Y.std(0)
        p = w / w.sum()
        mu = p @ Y
        return mu, np.sqrt(p @ (Y - mu) ** 2)

    def _splits(self, X, Y):
        """"loo", or the list of (train, test) index arrays (an int K: ``KFold(K)``'s folds)."""
        cv, n = self.cv, X.shape[0]
        if cv is None or (isinstance(cv, str) and cv == "loo"):
            return "loo"
        if isinstance(cv, (str, bool)) or (isinstance(cv, numbers.Integral) and cv < 2):
            raise RidgeError(f"cv must be 'loo', None, an int >= 2, a CV splitter or an iterable "
                             f"of (train, test) index arrays, got {cv!r}")
        if isinstance(cv, numbers.Integral):
            fold = kfold_assignment(n, int(cv))
            return [(np.flatnonzero(fold != f), np.flatnonzero(fold == f)) for f in range(cv)]
        try:
            splits = [(_indices(tr, n), _indices(te, n))
                      for tr, te in check_cv(cv).split(X, Y[:, 0] if Y.shape[1] == 1 else Y)]
        except (TypeError, ValueError) as e:
            if isinstance(e, ProbesError):
                raise
            raise RidgeError(f"cv={cv!r}: {' '.join(str(e).split())}") from None
        if not splits:
            raise RidgeError(f"cv={cv!r} gave no (train, test) split")
        return splits

    def _set_fitted(self, W, B, a, best, y1d: bool) -> None:
        """coef_, intercept_, alpha_, best_score_ from W (d, k), B (k,), alphas (k,)."""
        if y1d:
            self.coef_, self.intercept_ = W[:, 0], float(B[0])
            self.alpha_, self.best_score_ = float(a[0]), float(np.ravel(best)[0])
        else:
            self.coef_, self.intercept_ = W.T.copy(), B
            if self.alpha_per_target:
                self.alpha_, self.best_score_ = a, np.asarray(best)
            else:
                self.alpha_, self.best_score_ = float(a[0]), float(best)

    def predict(self, X) -> np.ndarray:
        """Predictions of the fitted probe.

        Parameters
        ----------
        X : array-like or DataFrame of shape (n, d)
            The features of the fit (the same columns, by name, for a DataFrame).

        Returns
        -------
        ndarray of shape (n,) or (n, k)
        """
        check_is_fitted(self, "coef_")
        X = validated(self, X, reset=False, dtype=np.float64)
        return X @ self.coef_.T + self.intercept_


def validated(estimator, X, y="no_validation", error=RidgeError, **kwargs):
    """scikit-learn's input validation (dtypes, finiteness, n_features_in_, feature_names_in_
    and its warnings), its errors re-raised as ``error`` (a :class:`ProbesError`) with
    scikit-learn's own message (which its estimator checks match; a feature-name mismatch lists
    the names one per line). Shared with the classification estimators."""
    try:
        return validate_data(estimator, X, y, **kwargs)
    except ValueError as e:
        if isinstance(e, ProbesError):
            raise
        raise error(str(e)) from None


def sample_weights(sample_weight, n: int, error=RidgeError):
    """(n,) float64 weights, or None; ``error`` unless finite, >= 0 and not all zero."""
    if sample_weight is None:
        return None
    w = np.array(sample_weight, dtype=np.float64)          # a copy: the caller's stays as is
    if w.ndim == 0:
        w = np.full(n, float(w))
    if w.shape != (n,):
        raise error(f"sample_weight has shape {w.shape}, expected ({n},): one weight per "
                    "row of X")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise error("sample_weight must be finite and >= 0")
    if not np.any(w > 0):
        raise error("sample_weight is zero for every row: at least one weight must be positive")
    return w


def _indices(idx, n: int) -> np.ndarray:
    """A split's rows as int64 indices (from indices or a boolean mask), checked against n."""
    a = np.asarray(idx)
    if a.dtype == bool:
        if a.shape != (n,):
            raise RidgeError(f"a cv split's boolean mask has shape {a.shape}, expected ({n},)")
        return np.flatnonzero(a)
    a = a.astype(np.int64, casting="same_kind").ravel()
    if a.size and (a.min() < -n or a.max() >= n):
        raise RidgeError(f"a cv split holds row indices outside [0, {n})")
    return np.where(a < 0, a + n, a)
