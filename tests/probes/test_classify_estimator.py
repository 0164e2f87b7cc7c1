"""LogisticProbeCV and MassMeanProbe: every check of scikit-learn's ``check_estimator`` passes
(no xfail); LogisticProbeCV equals ``LogisticRegressionCV`` (chosen C, coef, intercept, fold
scores, probabilities) with the same stratified folds; MassMeanProbe equals a numpy reference.

One check runs with per-check parameters, as scikit-learn's own test suite does for its
estimators: ``check_sample_weight_equivalence_on_dense_data`` compares predictions at rtol 1e-7,
tighter than the solver's default gradient tolerance (1e-8) guarantees, so it runs at tol=1e-12,
and on Cs up to 10: its data (45 rows, 30 features) at C = 1e4 fixes the optimum only to about
1e-6 at any tolerance reachable in float64 (the penalty, its only curvature in some directions,
is about 1e-6; scikit-learn's own newton-cg and lbfgs differ by 1e-4 there), so whether the
check passed there depended on the path a solver took.
The array-API check skips itself unless SCIPY_ARRAY_API=1 was set before scipy was imported: it
then runs in a fresh process that sets it."""
from __future__ import annotations

import functools
import os
import warnings

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import NearestCentroid
from sklearn.utils.estimator_checks import (
    check_dataframe_column_names_consistency,
    check_estimator,
    parametrize_with_checks,
)
from sklearn_checks import array_api_results_in_fresh_process, check_name

from probes import LogisticProbeCV, MassMeanProbe
from probes.errors import ClassifyError

ESTIMATORS = [MassMeanProbe(), LogisticProbeCV(Cs=5, cv=3),
              LogisticProbeCV(Cs=4, cv=3, scoring="neg_log_loss", class_weight="balanced"),
              LogisticProbeCV()]
PER_CHECK_PARAMS = {"check_sample_weight_equivalence_on_dense_data": {"tol": 1e-12,
                                                                   "Cs": [0.01, 0.1, 1.0, 10.0]}}


@functools.lru_cache(maxsize=1)
def _array_api_results_in_fresh_process() -> dict:
    return array_api_results_in_fresh_process(
        "from probes import LogisticProbeCV, MassMeanProbe", ESTIMATORS)


@parametrize_with_checks(ESTIMATORS)
def test_sklearn_estimator_check(estimator, check):
    name = check_name(check)
    if name.startswith("check_array_api") and not os.environ.get("SCIPY_ARRAY_API"):
        results = _array_api_results_in_fresh_process()[repr(estimator)]
        assert results, "check_estimator ran no array-API check"
        bad = [r for r in results if r[1] != "passed"]
        assert not bad, bad
        return
    if isinstance(estimator, LogisticProbeCV) and name in PER_CHECK_PARAMS:
        estimator = clone(estimator).set_params(**PER_CHECK_PARAMS[name])
    check(estimator)


@pytest.mark.parametrize("estimator", ESTIMATORS[:2], ids=repr)
def test_dataframe_column_names_consistency(estimator):
    """Not in check_estimator's list: feature_names_in_ and the errors on renamed columns."""
    check_dataframe_column_names_consistency(type(estimator).__name__, estimator)


def test_check_estimator_reports_every_check_passed():
    """The whole suite as one call, as a user runs it (MassMeanProbe: nothing per-check)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(MassMeanProbe(), on_fail=None)
    assert len(results) >= 50
    assert [r["check_name"] for r in results if r["status"] == "failed"] == []
    skipped = [r for r in results if r["status"] == "skipped"]
    assert all(r["check_name"] == "check_array_api_input" for r in skipped), skipped


# ------------------------------------------------------------------ equality with scikit-learn

def _problem(seed: int, n: int, d: int, k: int, unbalanced: bool = False):
    """Overlapping classes (not separable): Gaussian rows around k random centres."""
    rng = np.random.default_rng(seed)
    p = np.linspace(3.0, 1.0, k) if unbalanced else np.ones(k)
    y = rng.choice(k, size=n, p=p / p.sum())
    X = rng.standard_normal((k, d))[y] * 0.8 + rng.standard_normal((n, d)) + 0.3
    return X, y


def _sklearn_cv(Cs, folds, **kw) -> LogisticRegressionCV:
    kw.setdefault("scoring", "accuracy")
    ref = LogisticRegressionCV(Cs=Cs, cv=StratifiedKFold(folds), tol=1e-10, max_iter=10_000,
                               solver="newton-cholesky", **kw)
    if "use_legacy_attributes" in ref.get_params():          # scikit-learn >= 1.8
        ref.set_params(use_legacy_attributes=False, l1_ratios=(0.0,))
    return ref


@pytest.mark.parametrize("seed,n,d,k,kw", [
    (0, 83, 7, 2, {}),
    (1, 97, 11, 3, {}),
    (2, 131, 9, 4, {"unbalanced": True, "class_weight": "balanced", "scoring": "neg_log_loss"}),
], ids=["binary", "three-class", "four-class-unbalanced-balanced-logloss"])
def test_logistic_probe_cv_equals_sklearn(seed, n, d, k, kw):
    kw = dict(kw)
    X, y = _problem(seed, n, d, k, kw.pop("unbalanced", False))
    labels = np.array(["cat", "dog", "emu", "fox"])[y]                  # string labels
    Cs = np.logspace(-3, 3, 7)
    ours = LogisticProbeCV(Cs=Cs, cv=5, **kw).fit(X, labels)
    ref = _sklearn_cv(Cs, 5, **kw).fit(X, labels)
    np.testing.assert_array_equal(ours.classes_, ref.classes_)
    assert ours.C_ == np.ravel(ref.C_)[0]
    np.testing.assert_array_equal(ours.Cs_, ref.Cs_)
    ref_scores = np.asarray(ref.scores_ if not isinstance(ref.scores_, dict)
                            else next(iter(ref.scores_.values()))).reshape(5, -1)
    np.testing.assert_allclose(ours.scores_, ref_scores, rtol=1e-5, atol=1e-9)
    assert ours.coef_.shape == ref.coef_.shape == ((1, d) if k == 2 else (k, d))
    assert ours.intercept_.shape == ref.intercept_.shape
    scale = np.abs(ref.coef_).max()
    np.testing.assert_allclose(ours.coef_, ref.coef_, rtol=1e-4, atol=1e-4 * scale)
    np.testing.assert_allclose(ours.intercept_, ref.intercept_, rtol=1e-4, atol=1e-4 * scale)
    Xt = _problem(seed + 10, 40, d, k)[0]
    np.testing.assert_allclose(ours.predict_proba(Xt), ref.predict_proba(Xt), atol=1e-6)
    np.testing.assert_allclose(ours.decision_function(Xt), ref.decision_function(Xt),
                               rtol=1e-4, atol=1e-4 * scale)
    np.testing.assert_array_equal(ours.predict(Xt), ref.predict(Xt))
    np.testing.assert_allclose(ours.predict_log_proba(Xt), np.log(ref.predict_proba(Xt)),
                               atol=1e-5)
    assert ours.score(X, labels) == np.mean(ref.predict(X) == labels)      # always accuracy


def test_cv_splitter_and_sample_weight_as_sklearn():
    """A splitter object gives the same folds as an int; sample weights as scikit-learn's."""
    X, y = _problem(3, 70, 5, 3)
    w = np.random.default_rng(3).uniform(0.2, 2.0, size=y.size)
    Cs = [0.01, 0.1, 1.0, 10.0]
    a = LogisticProbeCV(Cs=Cs, cv=4).fit(X, y, sample_weight=w)
    b = LogisticProbeCV(Cs=Cs, cv=StratifiedKFold(4)).fit(X, y, sample_weight=w)
    np.testing.assert_array_equal(a.coef_, b.coef_)
    ref = _sklearn_cv(Cs, 4).fit(X, y, sample_weight=w)
    if a.C_ == np.ravel(ref.C_)[0]:          # held-out scoring may differ: ours is unweighted
        np.testing.assert_allclose(a.coef_, ref.coef_, rtol=1e-4,
                                   atol=1e-4 * np.abs(ref.coef_).max())


def test_float32_close_to_float64():
    X, y = _problem(4, 90, 6, 2)
    a = LogisticProbeCV(Cs=[0.1, 1.0]).fit(X, y)
    b = LogisticProbeCV(Cs=[0.1, 1.0], dtype="float32").fit(X, y)
    assert a.C_ == b.C_
    np.testing.assert_allclose(b.coef_, a.coef_, rtol=1e-3, atol=1e-3)


def test_bad_input_says_what_to_do():
    X, y = _problem(5, 30, 3, 2)
    with pytest.raises(ClassifyError, match="one class"):
        LogisticProbeCV().fit(X, np.zeros(30))
    y_small = y.copy()
    y_small[:3] = 2                                      # a class of 3 rows: 3 folds, warned
    with pytest.warns(UserWarning, match="using 3 stratified folds"):
        est = LogisticProbeCV(Cs=3, cv=5).fit(X, y_small)
    assert est.scores_.shape == (3, 3)
    y_small[:1] = 3                                      # a class of 1 row: refused
    with pytest.raises(ClassifyError, match="fewer than 2"):
        LogisticProbeCV(Cs=3).fit(X, y_small)
    for params, match in [({"Cs": 0}, "Cs must"), ({"Cs": [1.0, -1.0]}, "Cs must"),
                          ({"dtype": "float16"}, "dtype"), ({"cv": 1}, "cv must"),
                          ({"cv": [(np.arange(20), np.arange(10))] * 2}, "overlap")]:
        with pytest.raises(ClassifyError, match=match):
            LogisticProbeCV(**params).fit(X, y)


# ------------------------------------------------------------------ mass-mean

@pytest.mark.parametrize("k", [2, 3, 5])
def test_mass_mean_equals_numpy_reference(k):
    X, y = _problem(10 + k, 61, 13, k, unbalanced=True)
    labels = np.arange(k)[::-1][y] * 10                  # classes 0, 10, ...: sorted ascending
    est = MassMeanProbe().fit(X, labels)
    classes = np.unique(labels)
    mu = np.stack([X[labels == c].mean(0) for c in classes])
    np.testing.assert_array_equal(est.classes_, classes)
    np.testing.assert_allclose(est.means_, mu, rtol=1e-12, atol=1e-12)
    if k == 2:
        theta = mu[1] - mu[0]
        coef, icpt = theta[None], np.array([-theta @ (mu[0] + mu[1]) / 2])
    else:
        coef, icpt = mu, -0.5 * (mu * mu).sum(1)
    np.testing.assert_allclose(est.coef_, coef, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(est.intercept_, icpt, rtol=1e-12, atol=1e-12)
    Xt = _problem(20 + k, 50, 13, k)[0]
    np.testing.assert_array_equal(est.predict(Xt), NearestCentroid().fit(X, labels).predict(Xt))
    p = est.predict_proba(Xt)
    np.testing.assert_allclose(p.sum(1), 1.0)
    np.testing.assert_array_equal(classes[p.argmax(1)], est.predict(Xt))
