"""RidgeProbeCV against scikit-learn's own estimator checks: every check of ``check_estimator``
passes, for leave-one-out and k-fold, shared and per-target alphas; no check is expected to fail.

The array-API check skips itself unless SCIPY_ARRAY_API=1 was set before scipy was imported: it
then runs in a fresh process that sets it, so that nothing is skipped."""
from __future__ import annotations

import functools
import os
import warnings

import pytest
from sklearn.utils.estimator_checks import (
    check_dataframe_column_names_consistency,
    check_estimator,
    parametrize_with_checks,
)
from sklearn_checks import array_api_results_in_fresh_process, check_name

from probes import RidgeProbeCV

ESTIMATORS = [RidgeProbeCV(), RidgeProbeCV(cv=3), RidgeProbeCV(alpha_per_target=True),
              RidgeProbeCV(cv=3, alpha_per_target=True)]


@functools.lru_cache(maxsize=1)
def _array_api_results_in_fresh_process() -> dict:
    return array_api_results_in_fresh_process("from probes import RidgeProbeCV", ESTIMATORS)


@parametrize_with_checks(ESTIMATORS)
def test_sklearn_estimator_check(estimator, check):
    if check_name(check).startswith("check_array_api") and not os.environ.get("SCIPY_ARRAY_API"):
        results = _array_api_results_in_fresh_process()[repr(estimator)]
        assert results, "check_estimator ran no array-API check"
        bad = [r for r in results if r[1] != "passed"]
        assert not bad, bad
        return
    check(estimator)


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=repr)
def test_dataframe_column_names_consistency(estimator):
    """Not in check_estimator's list: feature_names_in_ from a DataFrame, the warnings and the
    errors on renamed, reordered or missing columns."""
    check_dataframe_column_names_consistency("RidgeProbeCV", estimator)


def test_check_estimator_reports_every_check_passed():
    """The whole suite as one call, as a user runs it: nothing failed, and the only skip is the
    array-API check's own environment condition (run above in a fresh process)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(RidgeProbeCV(cv=3, alpha_per_target=True), on_fail=None)
    assert len(results) >= 60
    assert [r["check_name"] for r in results if r["status"] == "failed"] == []
    skipped = [r for r in results if r["status"] == "skipped"]
    assert all(r["check_name"] == "check_array_api_input" and "SCIPY_ARRAY_API" in
               str(r["exception"]) for r in skipped), skipped
