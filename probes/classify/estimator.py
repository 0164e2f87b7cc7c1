""":class:`LogisticProbeCV` and :class:`MassMeanProbe`, the scikit-learn face of the batched
classification probes (:func:`probes.classify.select.select_c`,
:func:`probes.classify.closed_form.mass_mean`) for one layer's (n, d) array or DataFrame. An
estimator module: it imports scikit-learn at module level (as probes/ridge/estimator.py); both
classes pass every check of ``check_estimator`` (tests/probes/test_classify_estimator.py)."""
from __future__ import annotations

import numbers
import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import check_cv
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted

from probes.classify.closed_form import class_stats, mass_mean
from probes.classify.labels import stratified_folds
from probes.classify.select import select_c
from probes.errors import ClassifyError
from probes.ridge.estimator import sample_weights, validated

__all__ = ["LogisticProbeCV", "MassMeanProbe"]


class _LinearClassifier(ClassifierMixin, BaseEstimator):
    """Prediction from coef_ ((1, d) or (K, d)), intercept_ and classes_, as scikit-learn's
    linear classifiers: binary scores are (n,), class ``classes_[1]`` where the score is > 0."""

    def decision_function(self, X) -> np.ndarray:
        """Scores x·coefᵀ + intercept.

        Parameters
        ----------
        X : array-like or DataFrame of shape (n, d)

        Returns
        -------
        ndarray of shape (n,) for two classes (the score of ``classes_[1]``), else (n, K)
        """
        check_is_fitted(self, "coef_")
        X = validated(self, X, reset=False, dtype=np.float64, error=ClassifyError)
        s = X @ self.coef_.T + self.intercept_
        return s[:, 0] if s.shape[1] == 1 else s

    def predict(self, X) -> np.ndarray:
        """Class labels (elements of ``classes_``) of the rows of X.

        Parameters
        ----------
        X : array-like or DataFrame of shape (n, d)

        Returns
        -------
        ndarray of shape (n,)
        """
        s = self.decision_function(X)
        idx = (s > 0).astype(np.int64) if s.ndim == 1 else s.argmax(1)
        return self.classes_[idx]

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities: the sigmoid of the binary score as [1-p, p], else the softmax.

        Parameters
        ----------
        X : array-like or DataFrame of shape (n, d)

        Returns
        -------
        ndarray of shape (n, K), columns in the order of ``classes_``
        """
        return np.exp(self.predict_log_proba(X))

    def predict_log_proba(self, X) -> np.ndarray:
        """Logarithm of :meth:`predict_proba`, computed without overflow.

        Parameters
        ----------
        X : array-like or DataFrame of shape (n, d)

        Returns
        -------
        ndarray of shape (n, K)
        """
        s = self.decision_function(X)
        if s.ndim == 1:
            s = np.stack([-s / 2, s / 2], axis=1)     # softmax of (-s/2, s/2) is the sigmoid
        m = s.max(1, keepdims=True)
        return s - m - np.log(np.exp(s - m).sum(1, keepdims=True))

    def _encode(self, y, sample_weight=None) -> np.ndarray:
        """classes_ (sorted as np.unique) and the codes of y; a ValueError naming the class
        when fewer than two classes have rows of positive weight."""
        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        codes = codes.astype(np.int64).ravel()
        present = codes if sample_weight is None else codes[sample_weight > 0]
        if np.unique(present).size < 2:
            raise ClassifyError(f"only one class is present in y ({self.classes_[present[0]]!r}"
                                "): a classifier needs rows of at least 2 classes")
        return codes


class LogisticProbeCV(_LinearClassifier):
    """L2 logistic regression, C chosen by stratified k-fold (scikit-learn API).

    The same batched Newton solver as ``fastprobe fit`` (:func:`probes.classify.select_c`)
    on one layer: equal to ``LogisticRegressionCV(Cs, cv=StratifiedKFold(cv))`` with a small
    ``tol``. Two classes: one coefficient vector (sigmoid); more: multinomial (softmax).

    Parameters
    ----------
    Cs : int or sequence of float
        An int N: N values log-spaced in [1e-4, 1e4] (as scikit-learn); or the grid itself
        (ties are broken by the first best in the order given).
    cv : int, CV splitter or iterable of (train, test)
        An int k: stratified k folds, equal to ``StratifiedKFold(k)`` (reduced to the size of
        the smallest class, with a warning, when a class has fewer rows; at least 2 are
        needed); a splitter or explicit splits: their test sets must partition the rows.
    scoring : {"accuracy", "neg_log_loss"}
        Held-out score (unweighted), higher is better. (:meth:`score` is always accuracy.)
    class_weight : None, "balanced" or dict {label: weight}
        ``"balanced"``: n / (K·count(class)) per row (scikit-learn's rule); a dict: the weight
        of each label's rows (1 for labels not in it). Multiplied into ``sample_weight``.
    dtype : {"float64", "float32"}
        The solver's precision.
    tol : float, optional
        Stop when the largest gradient entry of objective / (C·Σw) is below it (default 1e-8,
        float32 1e-4).
    max_iter : int
        Newton iterations at most.

    Attributes
    ----------
    classes_ : ndarray of shape (K,)
    coef_ : ndarray of shape (1, d) for two classes, else (K, d)
    intercept_ : ndarray of shape (1,) or (K,)
    C_ : float
        The chosen C (scikit-learn's ``use_legacy_attributes=False`` form).
    Cs_ : ndarray of shape (n_Cs,)
    scores_ : ndarray of shape (n_folds, n_Cs)
        Held-out score of every fold and C.
    n_iter_ : int
        Newton iterations of the final refit.
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Column names, when X was a DataFrame with string column names.
    """

    def __init__(self, Cs=17, *, cv=5, scoring="accuracy", class_weight=None, dtype="float64",
                 tol=None, max_iter=100):
        self.Cs = Cs
        self.cv = cv
        self.scoring = scoring
        self.class_weight = class_weight
        self.dtype = dtype
        self.tol = tol
        self.max_iter = max_iter

    def fit(self, X, y, sample_weight=None) -> "LogisticProbeCV":
        """Choose C by cross-validation on (X, y) and refit on all rows.

        Parameters
        ----------
        X : array-like or DataFrame of shape (n, d)
        y : array-like of shape (n,)
            Class labels (ints, strings, bools...).
        sample_weight : float or array-like of shape (n,), optional
            Row weights >= 0 in the loss (multiplied by the class weights).

        Returns
        -------
        LogisticProbeCV
            self, fitted.
        """
        X, y = validated(self, X, y, reset=True, dtype=np.float64, error=ClassifyError)
        X = X if X.flags.writeable else X.copy()         # torch refuses read-only memory
        w = sample_weights(sample_weight, X.shape[0], ClassifyError)
        codes = self._encode(y, w)
        Cs = _grid(self.Cs)
        folds = self._folds(X, codes)
        if self.dtype not in ("float64", "float32"):
            raise ClassifyError(f"dtype must be 'float64' or 'float32', got {self.dtype!r}")
        class_weight = self.class_weight
        if isinstance(class_weight, dict):         # per-label weights, folded into the rows'
            per_class = compute_class_weight(class_weight, classes=self.classes_, y=y)
            w = (np.ones(codes.size) if w is None else w) * per_class[codes]
            class_weight = None
        res = select_c(X[None], codes, Cs, folds=folds, scoring=self.scoring,
                       n_classes=self.classes_.size, sample_weight=w,
                       class_weight=class_weight, dtype=self.dtype, tol=self.tol,
                       max_iter=self.max_iter)
        self.Cs_, self.C_ = res.Cs, float(res.C[0])
        self.scores_ = res.fold_scores[0]
        self.coef_ = np.atleast_2d(res.coef[0]).copy()
        self.intercept_ = np.atleast_1d(res.intercept[0]).copy()
        self.n_iter_ = int(res.n_iter[0])
        return self

    def _folds(self, X, codes) -> np.ndarray:
        """(n,) fold ids: stratified for an int cv (as StratifiedKFold), else from the splits."""
        cv, n = self.cv, X.shape[0]
        if isinstance(cv, numbers.Integral) and not isinstance(cv, bool):
            if cv < 2:
                raise ClassifyError(f"cv must be an int >= 2, a CV splitter or splits, got {cv}")
            smallest = int(np.bincount(codes, minlength=self.classes_.size).min())
            k = min(int(cv), smallest)
            if k < 2:
                raise ClassifyError(f"a class has {smallest} row(s), fewer than 2: stratified "
                                    "cross-validation needs at least 2 rows of every class")
            if k < cv:
                warnings.warn(f"the smallest class has {smallest} rows, fewer than cv={cv}: "
                              f"using {k} stratified folds", UserWarning, stacklevel=3)
            return stratified_folds(codes, k)
        try:
            splits = list(check_cv(cv, classifier=True).split(X, codes))
        except (TypeError, ValueError) as e:
            raise ClassifyError(f"cv={cv!r}: {' '.join(str(e).split())}") from None
        folds = np.full(n, -1, np.int64)
        for f, (_, test) in enumerate(splits):
            test = np.asarray(test)
            if test.dtype == bool:
                test = np.flatnonzero(test)
            if (folds[test] >= 0).any():
                raise ClassifyError("the test sets of cv overlap: give splits whose test sets "
                                    "partition the rows (KFold-like)")
            folds[test] = f
        if (folds < 0).any() or len(splits) < 2:
            raise ClassifyError("the test sets of cv must cover every row, in at least 2 splits")
        return folds


class MassMeanProbe(_LinearClassifier):
    """Difference-of-means ("mass-mean") probe (scikit-learn API), from the class means alone.

    Two classes: coef = μ₁ - μ₀, the boundary halfway between the means; K ≥ 3: nearest class
    mean, score_k(x) = μ_k·x - ½‖μ_k‖² (:func:`probes.classify.closed_form.mass_mean`). No
    parameters, no sample weights. ``predict_proba`` is the sigmoid / softmax of the scores:
    monotone in them, not calibrated probabilities.

    Attributes
    ----------
    classes_ : ndarray of shape (K,)
    coef_ : ndarray of shape (1, d) for two classes, else (K, d)
    intercept_ : ndarray of shape (1,) or (K,)
    means_ : ndarray of shape (K, d)
        The class means.
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Column names, when X was a DataFrame with string column names.
    """

    def fit(self, X, y) -> "MassMeanProbe":
        """Class means of (X, y) and the probe between them.

        Parameters
        ----------
        X : array-like or DataFrame of shape (n, d)
        y : array-like of shape (n,)
            Class labels (ints, strings, bools...).

        Returns
        -------
        MassMeanProbe
            self, fitted.
        """
        X, y = validated(self, X, y, reset=True, dtype=np.float64, error=ClassifyError)
        codes = self._encode(y)
        X = X if X.flags.writeable else X.copy()         # torch refuses read-only memory
        stats = class_stats(X[None], codes, self.classes_.size)
        probe = mass_mean(stats)
        self.means_ = stats.means()[0].cpu().numpy()
        self.coef_, self.intercept_ = probe.coef[0].copy(), probe.intercept[0].copy()
        return self


def _grid(Cs) -> np.ndarray:
    """The C grid: an int N -> N values log-spaced in [1e-4, 1e4]; else the values given."""
    if isinstance(Cs, numbers.Integral) and not isinstance(Cs, bool):
        if Cs < 1:
            raise ClassifyError(f"Cs must be a positive int or a list of C values, got {Cs}")
        return np.logspace(-4, 4, int(Cs))
    try:
        grid = np.atleast_1d(np.asarray(Cs, dtype=np.float64))
    except (TypeError, ValueError):
        grid = np.array([np.nan])
    if grid.ndim != 1 or grid.size == 0 or not (np.isfinite(grid).all() and (grid > 0).all()):
        raise ClassifyError(f"Cs must be a positive int or a list of positive finite C values, "
                            f"got {Cs!r}")
    return grid


