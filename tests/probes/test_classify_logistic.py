"""probes.classify.logistic (batched L2 logistic regression) against scikit-learn LogisticRegression
and a plain numpy float64 gradient of the objective."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from probes.classify import logistic
from probes.classify.logistic import (
    balanced_weights,
    decision_function,
    fit_logistic_path,
    predict_proba,
)
from probes.errors import ClassifyError

GRID = np.logspace(-3, 3, 7)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_data(L, n, d, K, seed, unbalanced=False):
    rng = np.random.default_rng(seed)
    p = np.array([0.6] + [0.4 / (K - 1)] * (K - 1)) if unbalanced else np.full(K, 1.0 / K)
    y = rng.choice(K, size=n, p=p)
    y[:2 * K] = np.tile(np.arange(K), 2)
    X = rng.normal(size=(L, n, d)) * rng.uniform(0.5, 3, size=d) + rng.normal(size=(L, 1, d))
    X[:, :, :min(d, K)] += 1.5 * np.eye(K)[y][:, :min(d, K)]     # some signal
    return X, y


def sk_fit(X, y, C, sample_weight=None, class_weight=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = LogisticRegression(C=C, tol=1e-10, max_iter=10000, class_weight=class_weight)
        return m.fit(X, y, sample_weight=sample_weight)


def numpy_grad(X, y, K, C, w, coef, icpt):
    """Gradient of C·Σ w_i loss_i + ½‖W‖² (plain numpy float64)."""
    if K == 2:
        p = 1 / (1 + np.exp(-(X @ coef + icpt)))
        e = w * (p - (y == 1))
        return np.concatenate([C * X.T @ e + coef, [C * e.sum()]])
    z = X @ coef.T + icpt
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    e = w[:, None] * (p - np.eye(K)[y])
    return np.concatenate([(C * X.T @ e + coef.T).ravel(), C * e.sum(0)])


def rel(a, b):
    return np.linalg.norm(np.ravel(a) - np.ravel(b)) / max(np.linalg.norm(np.ravel(b)), 1e-300)


def check_against_sklearn(X, y, K, Cs, path, sample_weight=None, class_weight=None):
    w = np.ones(len(y)) if sample_weight is None else sample_weight
    if class_weight == "balanced":
        w = w * balanced_weights(y, K, w)
    assert path.converged.all(), path.n_iter
    for l in range(X.shape[0]):
        for j, C in enumerate(Cs):
            coef, icpt = path.coef[l, j], path.intercept[l, j]
            g = numpy_grad(X[l], y, K, C, w, coef, icpt)
            assert np.abs(g).max() <= 1e-6 * C * w.sum(), (l, C, np.abs(g).max())
            m = sk_fit(X[l], y, C, sample_weight, class_weight)
            sk_coef = m.coef_[0] if K == 2 else m.coef_
            sk_icpt = m.intercept_[0] if K == 2 else m.intercept_
            assert rel(coef, sk_coef) < 1e-4, (l, C, rel(coef, sk_coef))
            both = np.concatenate([np.ravel(coef), np.ravel(icpt)])
            sk_both = np.concatenate([np.ravel(sk_coef), np.ravel(sk_icpt)])
            assert rel(both, sk_both) < 1e-4, (l, C, rel(both, sk_both))


@pytest.mark.parametrize("K,n,d,seed", [(2, 57, 7, 0), (3, 61, 9, 1), (4, 83, 13, 2)])
def test_equals_sklearn_over_the_c_grid(K, n, d, seed):
    X, y = make_data(2, n, d, K, seed)
    path = fit_logistic_path(X, y, GRID, tol=1e-10)
    assert path.coef.shape == ((2, 7, d) if K == 2 else (2, 7, K, d))
    check_against_sklearn(X, y, K, GRID, path)


@pytest.mark.parametrize("K,n,d,seed", [(2, 31, 47, 3), (3, 37, 53, 4)])
def test_d_greater_than_n_small_c(K, n, d, seed):
    X, y = make_data(2, n, d, K, seed)
    Cs = [1e-3, 1e-2, 1e-1]
    path = fit_logistic_path(X, y, Cs, tol=1e-10)
    check_against_sklearn(X, y, K, Cs, path)


@pytest.mark.parametrize("K,seed", [(2, 5), (3, 6)])
def test_class_weight_balanced_and_sample_weight(K, seed):
    X, y = make_data(2, 71, 6, K, seed, unbalanced=True)
    Cs = [1e-2, 1.0, 100.0]
    path = fit_logistic_path(X, y, Cs, class_weight="balanced", tol=1e-10)
    check_against_sklearn(X, y, K, Cs, path, class_weight="balanced")
    sw = np.random.default_rng(seed).uniform(0.1, 3, size=y.size)
    path = fit_logistic_path(X, y, Cs, sample_weight=sw, class_weight="balanced", tol=1e-10)
    check_against_sklearn(X, y, K, Cs, path, sample_weight=sw, class_weight="balanced")


def test_balanced_weights_rule():
    y = np.array([0, 0, 0, 1, 2, 2])
    np.testing.assert_allclose(balanced_weights(y), 6 / (3 * np.array([3, 3, 3, 1, 2, 2])))
    sw = np.array([1.0, 2, 1, 4, 1, 1])
    np.testing.assert_allclose(balanced_weights(y, 3, sw), 10 / (3 * np.array([4, 4, 4, 4, 2, 2])))


@pytest.mark.parametrize("K", [2, 3])
def test_predictions_equal_sklearn(K):
    X, y = make_data(1, 45, 5, K, 7)
    path = fit_logistic_path(X, y, [0.5], tol=1e-10)
    m = sk_fit(X[0], y, 0.5)
    P = predict_proba(X, path.coef[:, 0], path.intercept[:, 0])[0]
    np.testing.assert_allclose(P, m.predict_proba(X[0]), atol=1e-7)
    z = decision_function(X, path.coef[:, 0], path.intercept[:, 0])[0]
    np.testing.assert_allclose(z, m.decision_function(X[0]), atol=1e-6 * np.abs(z).max())


@pytest.mark.parametrize("K", [2, 4])
def test_float32_close_to_float64(K):
    X, y = make_data(3, 101, 11, K, 8)
    ref = fit_logistic_path(X, y, GRID[:5], tol=1e-10)
    fast = fit_logistic_path(X, y, GRID[:5], dtype="float32")
    for j in range(5):
        assert rel(fast.coef[:, j], ref.coef[:, j]) < 2e-3


@pytest.mark.parametrize("K", [2, 3])
def test_warm_path_equals_cold_batch(K):
    X, y = make_data(2, 64, 5, K, 11)
    Cs = [10.0, 0.01, 1.0, 1000.0]                                  # not sorted on purpose
    warm = fit_logistic_path(X, y, Cs, tol=1e-10)
    cold = fit_logistic_path(X, y, Cs, tol=1e-10, warm_start=False)
    assert warm.converged.all() and cold.converged.all()
    np.testing.assert_allclose(warm.coef, cold.coef, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(warm.intercept, cold.intercept, rtol=1e-7, atol=1e-9)
    assert warm.n_iter[:, 3].sum() < cold.n_iter[:, 3].sum()       # the largest C starts close


def test_not_converged_is_reported():
    X, y = make_data(2, 40, 4, 3, 12)
    path = fit_logistic_path(X, y, [100.0], tol=1e-12, max_iter=1)
    assert not path.converged.any() and (path.n_iter == 1).all()


def test_layers_independent_and_odd_codes_order():
    X, y = make_data(3, 50, 4, 3, 9)
    full = fit_logistic_path(X, y, [1.0], tol=1e-10)
    one = fit_logistic_path(X[1:2], y, [1.0], tol=1e-10)
    np.testing.assert_allclose(one.coef[0], full.coef[1], rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("K", [2, 4])
def test_layers_solved_in_batches_of_one(K, monkeypatch):
    """Above _BATCH_ENTRIES rows x features a batch takes fewer layers (one at least): the
    same path (warm starts, every C) and a work tally that counts each layer's passes."""
    X, y = make_data(3, 60, 5, K, 13)
    Cs = GRID[1:6]
    whole = fit_logistic_path(X, y, Cs, tol=1e-10)
    monkeypatch.setattr(logistic, "_BATCH_ENTRIES", 1)
    single = fit_logistic_path(X, y, Cs, tol=1e-10)
    np.testing.assert_allclose(single.coef, whole.coef, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(single.intercept, whole.intercept, rtol=1e-7, atol=1e-10)
    assert single.converged.all() and single.work["layer_passes"] == single.work["passes"]
    assert whole.work["layer_passes"] == 3 * whole.work["passes"]


def test_bad_inputs():
    X, y = make_data(1, 20, 3, 3, 10)
    with pytest.raises(ClassifyError, match="rows"):
        fit_logistic_path(X[:, :10], y, [1.0])
    with pytest.raises(ClassifyError, match="positive"):
        fit_logistic_path(X, y, [0.0])
    with pytest.raises(ClassifyError, match="at least two classes"):
        fit_logistic_path(X, np.zeros(20, int), [1.0])
    with pytest.raises(ClassifyError, match="each present"):
        fit_logistic_path(X, y, [1.0], n_classes=4)
    with pytest.raises(ClassifyError, match="codes"):
        fit_logistic_path(X, y.astype(float), [1.0])
    with pytest.raises(ClassifyError, match="class_weight"):
        fit_logistic_path(X, y, [1.0], class_weight="auto")
    with pytest.raises(ClassifyError, match="sample_weight"):
        fit_logistic_path(X, y, [1.0], sample_weight=-np.ones(20))
    with pytest.raises(ClassifyError, match="dtype"):
        fit_logistic_path(X, y, [1.0], dtype="float16")


@pytest.mark.parametrize("K,n,d", [(2, 71, 17), (3, 71, 17), (3, 30, 41)])
def test_subspace_preconditioner_of_wide_features(K, n, d, monkeypatch):
    """Above _EXACT_D features the preconditioner is exact on a randomised top-r subspace only
    (and the mean curvature elsewhere): it may slow CG, never change the answer."""
    monkeypatch.setattr(logistic, "_EXACT_D", 8)
    monkeypatch.setattr(logistic, "_RANK", 5)
    monkeypatch.setattr(logistic, "MAX_SYSTEM", 0)     # d > n: CG on the row space, not dual
    monkeypatch.setattr(logistic, "_ROW_SPACE", 1.0)
    X, y = make_data(2, n, d, K, 21)
    Cs = GRID[:5] if n > d else GRID[:3]
    path = fit_logistic_path(X, y, Cs)
    check_against_sklearn(X, y, K, Cs, path)


@pytest.mark.parametrize("K,exact_d", [(2, 1024), (3, 1024), (3, 8)])
def test_preconditioner_from_a_row_sample(K, exact_d, monkeypatch):
    """Over _SKETCH rows a feature (twice over) the preconditioner's Gram sums a random row
    sample, reweighted: CG may need more products, the answer stays scikit-learn's (also on
    the top-r subspace, exact_d 8)."""
    monkeypatch.setattr(logistic, "_SKETCH", 1)
    monkeypatch.setattr(logistic, "_EXACT_D", exact_d)
    monkeypatch.setattr(logistic, "_RANK", 5)
    import torch
    X, y = make_data(2, 71, 17, K, 23)
    assert logistic._Basis(torch.as_tensor(X)).rows.numel() == (17 if exact_d > 17 else 5)
    path = fit_logistic_path(X, y, GRID[:5])
    check_against_sklearn(X, y, K, GRID[:5], path)


@pytest.mark.parametrize("L,n,d,M,K,r", [(2, 37, 13, 3, 4, 5), (1, 20, 9, 2, 1, 3)])
def test_subspace_preconditioner_equals_its_matrix(L, n, d, M, K, r, monkeypatch):
    """The top-r preconditioner applied as products equals the dense float64 matrix
    V·U·diag(1/D)·Uᵀ·Vᵀ + (I − VVᵀ)/c per (layer, problem, class) on a random residual."""
    import torch
    monkeypatch.setattr(logistic, "_EXACT_D", 4)
    monkeypatch.setattr(logistic, "_RANK", r)
    rng = np.random.default_rng(3)
    X = torch.as_tensor(rng.standard_normal((L, n, d)))
    Y = torch.nn.functional.one_hot(torch.as_tensor(rng.integers(0, max(K, 2), n)),
                                    max(K, 2)).double()[:, :K]
    wts = torch.as_tensor(rng.uniform(0.1, 1, (n, M)))
    prob = logistic._Problem(X, Y, wts / wts.sum(0), torch.as_tensor(rng.uniform(0.1, 1, M)),
                             K == 1, logistic._Basis(X))
    P = torch.as_tensor(rng.uniform(0.05, 0.95, (L, n, M, K)))
    pre = logistic._Precond(prob, P)
    pre.damp(torch.as_tensor(rng.uniform(0, 0.1, (L, M))))
    rW, rb = torch.as_tensor(rng.standard_normal((L, d, M, K))), torch.randn(L, M, K).double()
    zW, zb = pre(rW, rb)
    for l in range(L):
        V = pre.V[l].numpy()
        for m in range(M):
            for k in range(K):
                U = pre.U[l, m].numpy()
                inv = V @ U @ np.diag(1 / pre.D[l, m, :, k].numpy()) @ U.T @ V.T \
                    + (np.eye(d) - V @ V.T) / float(pre.c[l, m, 0, k])
                np.testing.assert_allclose(zW[l, :, m, k].numpy(), inv @ rW[l, :, m, k].numpy(),
                                           rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(zb.numpy(), (rb / pre.Db).numpy())
