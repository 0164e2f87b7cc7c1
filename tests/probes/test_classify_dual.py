"""probes.classify.dual (exact Newton in the kernel space, rows < features) against
scikit-learn, a dense primal Newton step, and the primal CG solver."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from probes.classify import dual, logistic
from probes.classify.logistic import fit_logistic_path
from probes.classify.select import select_c

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_data(L, n, d, K, seed, sep=1.5):
    """d > n; ``sep`` large: (nearly) separable classes."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, size=n)
    y[:2 * K] = np.tile(np.arange(K), 2)
    means = rng.normal(size=(K, d)) * sep / np.sqrt(d) * 4
    X = rng.normal(size=(L, n, d)) + means[y] + rng.normal(size=(L, 1, d)) * 0.5
    return X, y


def sk_fit(X, y, C, sample_weight=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = LogisticRegression(C=C, tol=1e-12, max_iter=100000)
        return m.fit(X, y, sample_weight=sample_weight)


def grad(X, y, K, C, w, coef, icpt):
    """max |gradient| of the objective / (C·Σw) (plain numpy float64)."""
    if K == 2:
        p = 1 / (1 + np.exp(-(X @ coef + icpt)))
        e = w * (p - (y == 1))
        g = np.concatenate([C * X.T @ e + coef, [C * e.sum()]])
    else:
        z = X @ coef.T + icpt
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        e = w[:, None] * (p - np.eye(K)[y])
        g = np.concatenate([(C * X.T @ e + coef.T).ravel(), C * e.sum(0)])
    return np.abs(g).max() / (C * w.sum())


def rel(a, b):
    return np.linalg.norm(np.ravel(a) - np.ravel(b)) / np.linalg.norm(np.ravel(b))


@pytest.mark.parametrize("K,n,d,seed", [(2, 30, 57, 0), (3, 37, 80, 1), (6, 45, 96, 2)])
def test_equals_sklearn_small_n_wide(K, n, d, seed):
    X, y = make_data(2, n, d, K, seed)
    Cs = [1e-3, 1e-1, 10.0]
    path = fit_logistic_path(X, y, Cs, tol=1e-10)
    work = path.work
    assert work.get("form") == "dual" and path.converged.all()
    for l in range(2):
        for j, C in enumerate(Cs):
            m = sk_fit(X[l], y, C)
            sk_coef = m.coef_[0] if K == 2 else m.coef_
            sk_icpt = m.intercept_[0] if K == 2 else m.intercept_
            assert grad(X[l], y, K, C, np.ones(n), path.coef[l, j], path.intercept[l, j]) < 1e-9
            assert rel(path.coef[l, j], sk_coef) < 1e-4, (l, C)
            assert rel(np.append(path.coef[l, j], path.intercept[l, j]),
                       np.append(sk_coef, sk_icpt)) < 1e-4


@pytest.mark.parametrize("K", [2, 4])
def test_near_separable_large_c_converges(K):
    """Separable classes up to C = 1e4: every problem reaches the float64 tolerance (the
    primal CG crawled here), and the solution is optimal by a plain numpy gradient."""
    X, y = make_data(2, 40, 120, K, 3, sep=6.0)
    Cs = np.logspace(-4, 4, 9)
    path = fit_logistic_path(X, y, Cs)
    assert path.converged.all(), path.n_iter
    assert path.n_iter.max() <= 30
    for l in range(2):
        for j, C in enumerate(Cs):
            assert grad(X[l], y, K, C, np.ones(40), path.coef[l, j], path.intercept[l, j]) < 1e-7


@pytest.mark.parametrize("K", [2, 3])
def test_dual_equals_primal_cg(K):
    """The kernel-space Newton, CG on the row space, and CG on all features agree."""
    X, y = make_data(2, 33, 70, K, 4)
    w = np.random.default_rng(4).uniform(0.2, 2.0, size=(3, 33))
    w[1, :5] = 0                                                     # rows left out of a set
    Cs = [1e-2, 1.0, 30.0]
    out = [logistic._solve(X, y, K, Cs, w, "float64", 1e-10, 200, dual=True)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(logistic, "MAX_SYSTEM", 0)                       # row-space CG
        mp.setattr(logistic, "_ROW_SPACE", 1.0)
        out.append(logistic._solve(X, y, K, Cs, w, "float64", 1e-10, 200, dual=True))
    out.append(logistic._solve(X, y, K, Cs, w, "float64", 1e-10, 200, dual=False))
    for coef, icpt, _, conv in out:
        assert conv.all()
    for coef, icpt, _, _ in out[1:]:
        assert rel(coef, out[0][0]) < 1e-6 and rel(icpt, out[0][1]) < 1e-6


def test_sample_weight_cold_and_float32():
    X, y = make_data(1, 35, 64, 3, 5)
    sw = np.random.default_rng(5).uniform(0.1, 3, size=35)
    Cs = [10.0, 0.01, 1.0]                                           # not sorted on purpose
    warm = fit_logistic_path(X, y, Cs, sample_weight=sw, tol=1e-10)
    cold = fit_logistic_path(X, y, Cs, sample_weight=sw, tol=1e-10, warm_start=False)
    np.testing.assert_allclose(warm.coef, cold.coef, rtol=1e-5, atol=1e-8)
    for j, C in enumerate(Cs):
        m = sk_fit(X[0], y, C, sample_weight=sw)
        assert rel(warm.coef[0, j], m.coef_) < 1e-4
    f32 = fit_logistic_path(X.astype(np.float32), y, Cs, sample_weight=sw, dtype="float32")
    assert f32.converged.all() and rel(f32.coef, warm.coef) < 1e-3


def test_kernel_step_equals_dense_newton_step():
    """One step of :class:`probes.classify.dual._Factor` equals −H⁻¹g of the primal Hessian
    (features and intercepts) built densely."""
    rng = np.random.default_rng(6)
    m, d, K = 9, 14, 3
    X = torch.as_tensor(rng.normal(size=(1, m, d)))
    y = torch.as_tensor(np.r_[0, 1, 2, rng.integers(0, 3, size=m - 3)])
    w = torch.as_tensor(rng.uniform(0.5, 1.5, size=(1, m)))
    w = w / w.sum()
    Y = torch.nn.functional.one_hot(y, K).double()[None]
    bt = dual._Batch(X, X @ X.transpose(1, 2), w, Y, torch.ones(1), False)
    A = torch.as_tensor(rng.normal(size=(1, m, K))) * 0.1
    b = torch.as_tensor(rng.normal(size=(1, K))) * 0.1
    pen = torch.tensor([0.3])
    _, P, R, gb, _, _ = dual._state(bt, A, b, pen)
    dA, db = dual._Factor(bt, P, pen).step(bt, R, gb)
    # dense primal: θ = (W (d, K), b (K)), H = Σ_i w_i (diag p − ppᵀ) ⊗ [x;1][x;1]ᵀ + pen on W
    x1 = torch.cat([X[0], torch.ones(m, 1, dtype=X.dtype)], 1)       # (m, d+1)
    p = P[0]
    Hw = torch.einsum("i,ikl,ia,ib->akbl", w[0], torch.diag_embed(p) - p[:, :, None] * p[:, None],
                      x1, x1).reshape((d + 1) * K, (d + 1) * K)
    Hw[:d * K, :d * K] += pen * torch.eye(d * K, dtype=X.dtype)
    Hw[d * K:, d * K:] += torch.ones(K, K, dtype=X.dtype)          # the flat common shift of b
    g = torch.cat([(X[0].T @ R[0]).reshape(-1), gb[0]])
    step = -torch.linalg.solve(Hw, g)
    dW = X[0].T @ dA[0]
    np.testing.assert_allclose(dW.reshape(-1).numpy(), step[:d * K].numpy(), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(db[0].numpy(), step[d * K:].numpy(), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("K", [2, 3])
def test_select_c_wide_equals_logisticregressioncv(K):
    """C by 5 folds on d > n with the kernel path: the held-out scores and the C equal
    LogisticRegressionCV's, the refit (warm-started from the folds' kernel mean) sklearn's."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    X, y = make_data(2, 60, 90, K, 7, sep=0.8)
    grid = np.logspace(-3, 2, 6)
    res = select_c(X, y, grid, cv=5, tol=1e-10)
    assert res.work["folds"].get("form") == "dual" and res.converged.all()
    for l in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = LogisticRegressionCV(Cs=grid, cv=StratifiedKFold(5), tol=1e-10,
                                     max_iter=100000).fit(X[l], y)
        np.testing.assert_allclose(res.fold_scores[l], next(iter(m.scores_.values())), atol=1e-9)
        assert res.C[l] == m.C_[0]
        ref = sk_fit(X[l], y, res.C[l])
        assert rel(res.coef[l], ref.coef_[0] if K == 2 else ref.coef_) < 1e-4


@pytest.mark.parametrize("K", [2, 5])
def test_random_labels_huge_c_from_zero(K):
    """Shuffled labels (the control's case) are separable when d > n: one C of 1e4 from zero
    still converges, to the optimum by a numpy gradient."""
    X, _ = make_data(2, 50, 90, K, 8)
    y = np.random.default_rng(8).permutation(np.arange(50) % K)
    path = fit_logistic_path(X, y, [1e4])
    assert path.converged.all() and path.n_iter.max() <= 40, path.n_iter
    for l in range(2):
        assert grad(X[l], y, K, 1e4, np.ones(50), path.coef[l, 0], path.intercept[l, 0]) < 1e-7
