""":class:`RidgeProbeCV`, the scikit-learn face of the ridge solvers, for plain arrays. The only
module of the project that imports scikit-learn."""
from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, MultiOutputMixin, RegressorMixin
from sklearn.utils.validation import check_array, check_is_fitted, check_X_y

from probes.errors import RidgeError
from probes.kernels import resolve
from probes.ridge.alphas import parse_alphas
from probes.ridge.solvers import fit_arrays, kfold_assignment

__all__ = ["RidgeProbeCV"]


class RidgeProbeCV(MultiOutputMixin, RegressorMixin, BaseEstimator):
    """Ridge regression, alpha chosen by exact efficient LOO or k-fold CV (scikit-learn API).

    The same solver as ``fastprobe fit``: one float64 eigendecomposition (primal d×d when
    n >= d, dual n×n otherwise) gives every alpha of the grid at once.

    Parameters
    ----------
    alphas : sequence of float or str
        The grid, as numbers or a string ``"LO:HI:N"`` (log-spaced) / ``"a,b,c"``.
    cv : "loo", None or int
        ``"loo"`` (or None): exact leave-one-out, identical to
        ``sklearn.linear_model.RidgeCV()``; int K: K contiguous folds (sklearn ``KFold(K)``),
        scored by R² as ``RidgeCV(cv=K)``.
    alpha_per_target : bool
        Choose one alpha per target column instead of one shared alpha.
    standardize_targets : bool
        z-score y with its mean and population std before fitting (the paper's convention;
        changes the shared-alpha choice when targets have different scales). Coefficients and
        predictions are always in y's original units. With False the fit equals
        ``RidgeCV(alphas, alpha_per_target=...)`` on the raw y.
    backend : str
        ``"auto"`` (CUDA if available, else CPU), ``"cpu"``/``"torch"``, ``"cuda"``.

    Attributes
    ----------
    alpha_ : float or ndarray of shape (k,)
        The chosen alpha (per target with ``alpha_per_target`` and a 2-D y).
    coef_ : ndarray of shape (d,) or (k, d)
    intercept_ : float or ndarray of shape (k,)
    best_score_ : float or ndarray
        CV score of the chosen alpha (LOO: -mean squared error in the fitted units; k-fold:
        mean R²).
    cv_scores_ : ndarray of shape (n_alphas, k)
        Per-target scores of every alpha.
    n_features_in_ : int
    """

    def __init__(self, alphas=(0.1, 1.0, 10.0), *, cv="loo", alpha_per_target=False,
                 standardize_targets=True, backend="auto"):
        self.alphas = alphas
        self.cv = cv
        self.alpha_per_target = alpha_per_target
        self.standardize_targets = standardize_targets
        self.backend = backend

    def fit(self, X, y) -> "RidgeProbeCV":
        """Choose alpha by CV on (X, y) and fit on all rows.

        Parameters
        ----------
        X : array-like of shape (n, d)
        y : array-like of shape (n,) or (n, k)

        Returns
        -------
        RidgeProbeCV
            self, fitted.
        """
        X, y = check_X_y(X, y, multi_output=True, y_numeric=True, dtype=np.float64)
        alphas = parse_alphas(self.alphas)
        cv = self._cv()
        Y = y[:, None] if y.ndim == 1 else y
        n = X.shape[0]
        if n < 3:
            raise RidgeError(f"need at least 3 training rows, got {n}")
        mu = Y.mean(0)
        sd = Y.std(0) if self.standardize_targets else np.ones(Y.shape[1])
        if np.any(sd == 0):
            raise RidgeError(f"constant target column(s) {np.nonzero(sd == 0)[0].tolist()}")
        fold = None if cv == "loo" else kfold_assignment(n, cv)
        idx, best, scores, w, b = fit_arrays(X, (Y - mu) / sd, alphas, cv, self.alpha_per_target,
                                             resolve(self.backend)[1], fold)
        self._set_fitted(w.cpu().numpy() * sd[None, :], b.cpu().numpy() * sd + mu,
                         alphas[idx], best, y.ndim == 1)
        self.cv_scores_ = scores.cpu().numpy()
        self.n_features_in_ = X.shape[1]
        return self

    def _cv(self):
        if self.cv in (None, "loo"):
            return "loo"
        if isinstance(self.cv, bool) or not isinstance(self.cv, (int, np.integer)):
            raise RidgeError(f"cv must be 'loo' or an int >= 2, got {self.cv!r}")
        return int(self.cv)

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
        X : array-like of shape (n, d)

        Returns
        -------
        ndarray of shape (n,) or (n, k)
        """
        check_is_fitted(self, "coef_")
        X = check_array(X, dtype=np.float64)
        if X.shape[1] != self.n_features_in_:
            raise RidgeError(f"X has {X.shape[1]} features, the probe was fitted on "
                             f"{self.n_features_in_}")
        return X @ self.coef_.T + self.intercept_
