"""probes.classify.select (C per layer by stratified k-fold) against scikit-learn
LogisticRegressionCV and LogisticRegression."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold

from probes.classify.select import select_c
from probes.errors import ClassifyError

GRID = np.logspace(-3, 3, 7)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_data(L, n, d, K, seed, noise=2.0):
    """Layers with increasing signal, so that different Cs win on different layers."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, size=n)
    y[:2 * K] = np.tile(np.arange(K), 2)
    means = rng.normal(size=(K, d))
    X = np.stack([rng.normal(size=(n, d)) * noise + (0.2 + 0.4 * l) * means[y]
                  for l in range(L)])
    X *= rng.uniform(0.5, 2.0, size=d)
    return X, y


def rel(a, b):
    return np.linalg.norm(np.ravel(a) - np.ravel(b)) / np.linalg.norm(np.ravel(b))


def sk(cls, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(tol=1e-10, max_iter=10000, **kw)


def fitted(model, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.fit(X, y)


@pytest.mark.parametrize("K,n,d,scoring,cw,seed", [
    (2, 83, 6, "accuracy", None, 0),
    (3, 97, 5, "accuracy", None, 1),
    (4, 101, 7, "neg_log_loss", None, 2),
    (3, 89, 5, "accuracy", "balanced", 3),
])
def test_chosen_c_and_refit_equal_logisticregressioncv(K, n, d, scoring, cw, seed):
    X, y = make_data(4, n, d, K, seed)
    res = select_c(X, y, GRID, cv=5, scoring=scoring, class_weight=cw, tol=1e-10)
    assert res.converged.all()
    for l in range(X.shape[0]):
        m = fitted(sk(LogisticRegressionCV, Cs=GRID, cv=StratifiedKFold(5), scoring=scoring,
                      class_weight=cw), X[l], y)
        key = next(iter(m.scores_))
        # accuracy: the same predictions; log loss: sklearn's lbfgs stops ~1e-7 short at large C
        np.testing.assert_allclose(res.fold_scores[l], m.scores_[key], atol=1e-9,
                                   rtol=1e-9 if scoring == "accuracy" else 1e-5)
        assert res.C[l] == m.C_[0], (l, res.scores[l], m.scores_[key].mean(0))
        ref = fitted(sk(LogisticRegression, C=res.C[l], class_weight=cw), X[l], y)
        coef = ref.coef_[0] if K == 2 else ref.coef_
        icpt = ref.intercept_[0] if K == 2 else ref.intercept_
        assert rel(res.coef[l], coef) < 1e-4
        assert rel(np.append(res.coef[l], res.intercept[l]), np.append(coef, icpt)) < 1e-4


def test_ties_take_the_first_c_in_grid_order():
    X, y = make_data(1, 60, 3, 2, 4, noise=0.01)                # separable: accuracy 1 everywhere
    res = select_c(X, y, [0.1, 1.0, 10.0], cv=3)
    assert res.scores[0].tolist() == [1.0, 1.0, 1.0] and res.C[0] == 0.1
    res = select_c(X, y, [10.0, 1.0, 0.1], cv=3)
    assert res.C[0] == 10.0


def test_given_folds_and_bad_inputs():
    X, y = make_data(2, 40, 3, 3, 5)
    folds = np.arange(40) % 4
    res = select_c(X, y, [0.1, 1.0], folds=folds)
    assert res.fold_scores.shape == (2, 4, 2) and (res.folds == folds).all()
    with pytest.raises(ClassifyError, match="scoring"):
        select_c(X, y, [1.0], scoring="f1")
    with pytest.raises(ClassifyError, match="fewer than the 5 folds"):
        select_c(X, np.r_[np.zeros(37, int), 1, 1, 1], [1.0])
    with pytest.raises(ClassifyError, match="fold 0 has no rows of class 0"):
        select_c(X, np.r_[np.zeros(20, int), np.ones(17, int), 2, 2, 2], [1.0],
                 folds=np.r_[np.zeros(37, int), 1, 1, 1])
    with pytest.raises(ClassifyError, match="folds must be"):
        select_c(X, y, [1.0], folds=np.zeros(40, int))


def test_real_countries_of_world_places():
    """Country (top 5 + "other") of 700 world places, from noisy random projections of
    latitude, longitude and entity type: the C chosen per layer equals LogisticRegressionCV's."""
    import pandas as pd  # deferred: heavy optional dependency

    from probes.classify.labels import encode_labels
    df = pd.read_csv("/work/shared/datasets/paper/world_place.csv",
                     usecols=["country", "latitude", "longitude", "entity_type"]).dropna()
    df = df.sample(700, random_state=0)
    lab = encode_labels(df["country"].to_numpy(), max_classes=6)
    rng = np.random.default_rng(0)
    raw = np.column_stack([df[["latitude", "longitude"]].to_numpy() / 30.0,
                           pd.get_dummies(df["entity_type"]).to_numpy(float)])
    X = np.stack([raw @ rng.normal(size=(raw.shape[1], 9)) + rng.normal(size=(700, 9)) * s
                  for s in (0.5, 1.0, 3.0)])
    grid = np.logspace(-3, 1, 5)              # sklearn's lbfgs crawls at larger C on this data
    res = select_c(X, lab.codes, grid, cv=5, tol=1e-10)
    assert len(set(res.C.tolist())) > 1
    for l in range(3):
        m = fitted(sk(LogisticRegressionCV, Cs=grid, cv=StratifiedKFold(5), scoring="accuracy"),
                   X[l], lab.codes)
        assert res.C[l] == m.C_[0]
        ref = fitted(sk(LogisticRegression, C=res.C[l]), X[l], lab.codes)
        assert rel(res.coef[l], ref.coef_) < 1e-4


@pytest.mark.parametrize("K", [2, 3])
def test_d_greater_than_n(K):
    X, y = make_data(2, 45, 61, K, 6, noise=1.0)
    grid = [1e-4, 1e-3, 1e-2, 1e-1]
    res = select_c(X, y, grid, cv=3, tol=1e-10)
    for l in range(2):
        m = fitted(sk(LogisticRegressionCV, Cs=grid, cv=StratifiedKFold(3), scoring="accuracy"),
                   X[l], y)
        np.testing.assert_allclose(res.fold_scores[l], next(iter(m.scores_.values())), atol=1e-9)
        assert res.C[l] == m.C_[0]
        ref = fitted(sk(LogisticRegression, C=res.C[l]), X[l], y)
        assert rel(res.coef[l], ref.coef_[0] if K == 2 else ref.coef_) < 1e-4


def test_float32_chooses_the_float64_c():
    X, y = make_data(5, 300, 20, 4, 7)
    ref = select_c(X, y, GRID, tol=1e-10)
    fast = select_c(X.astype(np.float32), y, GRID, dtype="float32")
    np.testing.assert_array_equal(fast.C, ref.C)
    assert np.abs(fast.scores - ref.scores).max() <= 1 / 60           # one held-out row at most


@pytest.mark.gpu
def test_select_c_on_cuda_equals_cpu():
    """The batched solvers on a GPU (``--device cuda``): the same C per layer and coefficients
    as on the CPU, in the primal CG path (n > d) and the kernel-space path (n < d)."""
    for n, d in ((120, 9), (40, 70)):
        rng = np.random.default_rng(n)
        y = rng.integers(0, 3, n)
        X = rng.standard_normal((2, n, d)) + 0.8 * y[None, :, None] * rng.standard_normal(d)
        cpu = select_c(X, y, np.logspace(-2, 2, 5), cv=3, tol=1e-10)
        gpu = select_c(X, y, np.logspace(-2, 2, 5), cv=3, tol=1e-10, device="cuda")
        np.testing.assert_array_equal(gpu.C, cpu.C)
        np.testing.assert_allclose(gpu.coef, cpu.coef, rtol=1e-6, atol=1e-8)
