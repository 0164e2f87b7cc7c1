"""probes.classify.labels: label encoding and stratified folds (against scikit-learn)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.model_selection import StratifiedKFold

from probes.classify.labels import encode_labels, stratified_folds
from probes.errors import ClassifyError


def sk_folds(y, k):
    out = np.full(len(y), -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f, (_, test) in enumerate(StratifiedKFold(k).split(np.zeros((len(y), 1)), y)):
            out[test] = f
    return out


@pytest.mark.parametrize("seed", range(12))
def test_stratified_folds_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 8))
    n_classes = int(rng.integers(2, 15))
    p = rng.dirichlet(np.full(n_classes, 0.5))                   # unbalanced
    n = int(rng.integers(n_classes * k * 3, 700))
    y = rng.choice(n_classes, size=n, p=p)
    y = np.concatenate([y, np.repeat(np.arange(n_classes), k)])   # every class has >= k rows
    y = rng.permutation(y) * 3 + 5                                 # codes need not be 0..K-1
    np.testing.assert_array_equal(stratified_folds(y, k), sk_folds(y, k))


def test_stratified_folds_sorted_and_blocks():
    y = np.array([2, 2, 2, 0, 0, 0, 1, 1, 1, 1, 2, 0])
    np.testing.assert_array_equal(stratified_folds(y, 3), sk_folds(y, 3))


def test_stratified_folds_refusals():
    with pytest.raises(ClassifyError, match="class 7 has only 2 train rows, fewer than the 3"):
        stratified_folds(np.array([1, 1, 1, 7, 7, 1]), 3)
    with pytest.raises(ClassifyError, match="single class"):
        stratified_folds(np.array([4, 4, 4, 4]), 2)
    with pytest.raises(ClassifyError, match="folds"):
        stratified_folds(np.array([0, 1, 0, 1]), 1)
    with pytest.raises(ClassifyError, match="integer"):
        stratified_folds(np.array([0.0, 1.0]), 2)


def test_encode_strings_ints_bools():
    lab = encode_labels(["b", "a", "c", "a"])
    assert lab.classes == ["a", "b", "c"]
    np.testing.assert_array_equal(lab.codes, [1, 0, 2, 0])
    assert lab.kept.all() and lab.pooled == []
    lab = encode_labels([10, 2, 2, 10, 3])
    assert lab.classes == ["2", "3", "10"]                          # numeric order, as np.unique
    np.testing.assert_array_equal(lab.codes, [2, 0, 0, 2, 1])
    lab = encode_labels(np.array([True, False, True]))
    assert lab.classes == ["False", "True"]
    np.testing.assert_array_equal(lab.codes, [1, 0, 1])
    assert lab.codes.dtype == np.int64


@pytest.mark.parametrize("bad", [None, float("nan"), "", "  "])
def test_missing_labels_refused(bad):
    values = ["a", "b", bad, "a", bad]
    with pytest.raises(ClassifyError, match=r"2 rows have no label .* rows \[2, 4\]"):
        encode_labels(values)


def test_pandas_missing_values_refused():
    import pandas as pd  # deferred: heavy optional dependency
    for col in (pd.Series(["a", pd.NA, "b"], dtype="string"),
                pd.Series([1, None, 2], dtype="Int64"), pd.Series(["x", None, "y"])):
        with pytest.raises(ClassifyError, match=r"1 rows have no label .* rows \[1\]"):
            encode_labels(col)
    lab = encode_labels(pd.Series([3, 1, 3], dtype="Int64"))
    assert lab.classes == ["1", "3"]


def test_max_classes_other_and_drop():
    values = ["d"] * 5 + ["a"] * 3 + ["c"] * 3 + ["b"] * 1 + ["e"] * 2
    lab = encode_labels(values, max_classes=3, rest="other")
    # d (5) first, then a and c tie at 3 -> a wins by name; c, e, b pooled
    assert lab.classes == ["a", "d", "other"]
    assert lab.pooled == ["b", "c", "e"]
    assert lab.kept.all()
    assert [lab.classes[c] for c in lab.codes[[0, 5, 8, 11, 12]]] == ["d", "a", "other", "other",
                                                                       "other"]
    lab = encode_labels(values, max_classes=3, rest="drop")
    assert lab.classes == ["a", "c", "d"] and lab.pooled == ["b", "e"]
    assert lab.kept.sum() == 11 and (lab.codes[~lab.kept] == -1).all()
    assert (lab.codes[lab.kept] >= 0).all()
    lab = encode_labels(values, max_classes=5)
    assert lab.classes == ["a", "b", "c", "d", "e"] and lab.pooled == []
    with pytest.raises(ClassifyError, match="at least 2"):
        encode_labels(values, max_classes=1)
    with pytest.raises(ClassifyError, match="rest"):
        encode_labels(values, max_classes=2, rest="pool")
    with pytest.raises(ClassifyError, match="already named"):
        encode_labels(["other"] * 3 + ["x", "y"], max_classes=2)


def test_real_countries():
    import pandas as pd  # deferred: heavy optional dependency
    df = pd.read_csv("/work/shared/datasets/paper/world_place.csv", usecols=["country"])
    lab = encode_labels(df["country"].dropna().to_numpy(), max_classes=10)
    assert len(lab.classes) == 10 and lab.classes[-1] == "other"
    folds = stratified_folds(lab.codes, 5)
    np.testing.assert_array_equal(folds, sk_folds(lab.codes, 5))
