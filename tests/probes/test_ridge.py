"""probes.ridge: the exact ridge-CV solver and RidgeProbeCV against scikit-learn and brute force."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.linear_model import Ridge, RidgeCV
from sklearn.model_selection import KFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from probes import RidgeProbeCV
from probes.ridge import (
    LooAccumulator,
    RidgeError,
    dual_kfold_scores,
    dual_loo,
    kfold_assignment,
    kfold_scores_primal,
    parse_alphas,
    primal_factor,
)

ALPHAS = np.logspace(-2, 4, 13)


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def make_data(n, d, k=2, seed=0, scales=(1.0, 40.0)):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) * rng.uniform(0.5, 2, d) + rng.normal(size=d) * 3
    W = rng.normal(size=(d, k)) / np.sqrt(d)
    noise = rng.normal(size=(n, k)) * rng.uniform(0.3, 1.5, k)
    Y = (X @ W + noise) * np.asarray(scales[:k]) + 7.0
    return X, Y


@pytest.mark.parametrize("n,d", [(120, 17), (61, 60), (30, 75), (23, 200)])
@pytest.mark.parametrize("apt", [False, True])
def test_loo_equals_sklearn_ridgecv(n, d, apt):
    X, Y = make_data(n, d, seed=n + d)
    Xt, _ = make_data(40, d, seed=n + d + 1)
    ref = RidgeCV(alphas=ALPHAS, alpha_per_target=apt).fit(X, Y)
    me = RidgeProbeCV(ALPHAS, alpha_per_target=apt, standardize_targets=False).fit(X, Y)
    np.testing.assert_array_equal(np.atleast_1d(me.alpha_), np.atleast_1d(ref.alpha_))
    assert rel(me.coef_, ref.coef_) <= 1e-5
    assert rel(me.intercept_, ref.intercept_) <= 1e-5
    assert rel(me.predict(Xt), ref.predict(Xt)) <= 1e-5
    assert rel(me.best_score_, ref.best_score_) <= 1e-5


def test_loo_alpha_varies_and_matches_over_many_seeds():
    """Different noise levels make different alphas win; the choice must track sklearn's."""
    chosen = set()
    for seed in range(12):
        rng = np.random.default_rng(seed)
        n, d = 50, 12
        X = rng.normal(size=(n, d))
        y = X @ rng.normal(size=d) * rng.uniform(0.05, 3) + rng.normal(size=n)
        ref = RidgeCV(alphas=ALPHAS).fit(X, y)
        me = RidgeProbeCV(ALPHAS).fit(X, y)     # 1 target: standardising cannot change alpha
        assert me.alpha_ == ref.alpha_
        assert np.ndim(me.coef_) == 1 and isinstance(me.intercept_, float)
        assert rel(me.coef_, ref.coef_) <= 1e-5
        chosen.add(me.alpha_)
    assert len(chosen) >= 3


def test_standardized_targets_equal_ridgecv_on_zscored_y():
    X, Y = make_data(90, 14, seed=3, scales=(1.0, 1000.0))
    mu, sd = Y.mean(0), Y.std(0)
    ref = RidgeCV(alphas=ALPHAS).fit(X, (Y - mu) / sd)
    me = RidgeProbeCV(ALPHAS).fit(X, Y)
    assert me.alpha_ == ref.alpha_
    assert rel(me.coef_, ref.coef_ * sd[:, None]) <= 1e-5
    assert rel(me.intercept_, ref.intercept_ * sd + mu) <= 1e-5
    raw = RidgeProbeCV(ALPHAS, standardize_targets=False).fit(X, Y)
    # the shared alpha on raw y is driven by the large-scale target alone; it may differ
    assert raw.alpha_ == RidgeCV(alphas=ALPHAS).fit(X, Y).alpha_


def brute_force_loo(X, Y, alpha):
    """LOO residuals by refitting sklearn Ridge n times."""
    n = len(X)
    err = np.zeros_like(Y)
    for i in range(n):
        m = np.arange(n) != i
        r = Ridge(alpha=alpha).fit(X[m], Y[m])
        err[i] = Y[i] - r.predict(X[i:i + 1])[0]
    return err


@pytest.mark.parametrize("n,d", [(15, 4), (9, 20)])
def test_loo_scores_equal_brute_force_refits(n, d):
    X, Y = make_data(n, d, seed=11)
    alphas = np.array([0.3, 3.0, 30.0])
    import torch
    if n >= d:
        Xs = X - X.mean(0)
        fac = primal_factor(n, torch.tensor(Xs.sum(0))[None], torch.tensor(Xs.T @ Xs)[None],
                            torch.tensor(Y.sum(0)), torch.tensor(Xs.T @ Y)[None],
                            torch.tensor(X.mean(0))[None])
        acc = LooAccumulator(fac, alphas, n)
        # stream in uneven chunks
        for s, e in ((0, 4), (4, 5), (5, n)):
            acc.update(s, torch.tensor(X[s:e])[None], Y[s:e], np.ones(e - s, bool))
        scores = acc.scores()[0].numpy()
    else:
        scores = dual_loo(X, Y, alphas)[0].numpy()
    for a, alpha in enumerate(alphas):
        e = brute_force_loo(X, Y, alpha)
        np.testing.assert_allclose(scores[a], -(e ** 2).mean(0), rtol=1e-9)


def brute_force_kfold(X, Y, alphas, fold, apt):
    F = fold.max() + 1
    r2 = np.zeros((len(alphas), Y.shape[1]))
    for a, alpha in enumerate(alphas):
        for f in range(F):
            tr, va = fold != f, fold == f
            p = Ridge(alpha=alpha).fit(X[tr], Y[tr]).predict(X[va])
            r2[a] += 1 - ((Y[va] - p) ** 2).sum(0) / ((Y[va] - Y[va].mean(0)) ** 2).sum(0)
    r2 /= F
    return np.argmax(r2, 0) if apt else np.repeat(np.argmax(r2.mean(1)), Y.shape[1]), r2


@pytest.mark.parametrize("n,d", [(80, 9), (26, 40)])
@pytest.mark.parametrize("K", [3, 5])
def test_kfold_equals_sklearn_and_brute_force(n, d, K):
    X, Y = make_data(n, d, seed=K + d)
    ref = RidgeCV(alphas=ALPHAS, cv=KFold(K)).fit(X, Y)
    me = RidgeProbeCV(ALPHAS, cv=K, standardize_targets=False).fit(X, Y)
    assert me.alpha_ == ref.alpha_
    assert rel(me.best_score_, ref.best_score_) <= 1e-8
    assert rel(me.coef_, ref.coef_) <= 1e-5
    for apt in (False, True):
        fold = kfold_assignment(n, K)
        idx, r2 = brute_force_kfold(X, Y, ALPHAS, fold, apt)
        np.testing.assert_allclose(me.cv_scores_, r2, rtol=1e-7, atol=1e-9)
        m = RidgeProbeCV(ALPHAS, cv=K, alpha_per_target=apt).fit(X, Y)
        np.testing.assert_array_equal(np.atleast_1d(m.alpha_) * np.ones(2), ALPHAS[idx])


@pytest.mark.parametrize("d", [4, 20])                  # primal and dual
@pytest.mark.parametrize("standardize", [False, True])
def test_kfold_constant_target_on_a_fold_scored_as_ridgecv(d, standardize):
    """A target constant on a validation fold: R² is 0/0 there; RidgeCV (r2_score) scores it 0
    (1 if predicted exactly) instead of failing, and so do we, also after z-scoring (whose
    rounding must not turn "constant" into a near-zero variance)."""
    rng = np.random.default_rng(d)
    X = rng.normal(size=(30, d))
    y = np.repeat([1.0, 2.0, 3.0], 10)                  # every 3-fold validation set constant
    y[12] = 2.5                                         # ... but one
    ref = RidgeCV(alphas=ALPHAS, cv=3).fit(X, y)
    me = RidgeProbeCV(ALPHAS, cv=3, standardize_targets=standardize).fit(X, y)
    assert me.alpha_ == ref.alpha_
    assert abs(me.best_score_ - ref.best_score_) <= 1e-12
    assert rel(me.coef_, ref.coef_) <= 1e-8
    Y2 = np.column_stack([y, X[:, 0] + rng.normal(size=30)])
    m2 = RidgeProbeCV(ALPHAS, cv=3, alpha_per_target=True, standardize_targets=standardize)
    m2.fit(X, Y2)
    assert np.all(np.isfinite(m2.cv_scores_)) and np.all(m2.cv_scores_[:, 0] <= 1)


def test_kfold_fold_with_one_validation_row_raises():
    X, Y = make_data(16, 4, seed=4)
    # 5 rows in 4 folds: sizes 2, 1, 1, 1
    with pytest.raises(RidgeError, match=r"fold 1 has 1 validation row"):
        RidgeProbeCV(ALPHAS, cv=4).fit(X[:5], Y[:5])


def test_streaming_kfold_solver_still_refuses_a_constant_fold():
    """fastprobe fit's fold-statistics solvers (not the estimator) keep their loud error."""
    X, Y = make_data(16, 4, seed=4)
    Y[:4, 1] = 2.5                                      # rows 0..3 are fold 0 of 5
    with pytest.raises(RidgeError, match=r"fold 0: target column\(s\) \[1\] are constant"):
        dual_kfold_scores(X, Y, kfold_assignment(16, 5), ALPHAS)


@pytest.mark.parametrize("n,k", [(2, 2), (10, 3), (17, 5), (45, 4), (100, 7), (31, 31)])
@pytest.mark.parametrize("seed", [0, 3, 12345])
@pytest.mark.parametrize("shuffle", [False, True])
def test_kfold_assignment_equals_sklearn_kfold(n, k, seed, shuffle):
    """The numpy re-implementation deals rows into folds exactly as KFold does."""
    want = np.full(n, -1)
    kf = KFold(k, shuffle=shuffle, random_state=seed if shuffle else None)
    for f, (_, val) in enumerate(kf.split(np.zeros((n, 1)))):
        want[val] = f
    got = kfold_assignment(n, k, shuffle=shuffle, seed=seed)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want)


def test_kfold_assignment_rejects_bad_k():
    with pytest.raises(RidgeError, match="k >= 2"):
        kfold_assignment(10, 1)
    with pytest.raises(RidgeError, match="needs at least 5 training rows, got 4"):
        kfold_assignment(4, 5)


def test_the_estimator_is_the_only_sklearn_import():
    """probes.ridge's grid and solvers load without scikit-learn; only the estimator needs it."""
    import subprocess
    import sys
    code = ("import sys; from probes.ridge import DEFAULT_ALPHAS, fit_arrays; "
            "print('sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_kfold_primal_and_dual_agree_with_shuffled_folds():
    import torch
    X, Y = make_data(45, 30, seed=5)
    fold = kfold_assignment(45, 4, shuffle=True, seed=3)
    assert sorted(np.bincount(fold).tolist()) == [11, 11, 11, 12]
    Xs = X - X.mean(0)
    per = [fold == f for f in range(4)]
    st = dict(
        n=torch.tensor([float(m.sum()) for m in per]),
        sx=torch.tensor(np.stack([Xs[m].sum(0) for m in per]))[None],
        xtx=torch.tensor(np.stack([Xs[m].T @ Xs[m] for m in per]))[None],
        sy=torch.tensor(np.stack([Y[m].sum(0) for m in per])),
        yty=torch.tensor(np.stack([Y[m].T @ Y[m] for m in per])),
        xty=torch.tensor(np.stack([Xs[m].T @ Y[m] for m in per]))[None])
    p = kfold_scores_primal(st["n"], st["sx"], st["xtx"], st["sy"], st["yty"], st["xty"], ALPHAS)[0]
    dd = dual_kfold_scores(X, Y, fold, ALPHAS)
    _, r2 = brute_force_kfold(X, Y, ALPHAS, fold, False)
    np.testing.assert_allclose(p.numpy(), r2, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(dd.numpy(), r2, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("precision,tol", [("float64", 1e-10), ("float32", 1e-4)])
def test_loo_pass_with_test_rows_in_its_chunks(precision, tol):
    """Chunks that mix train and test rows (all-test and all-train chunks too): the LOO sums
    cover the train rows only, a test row's NaN target is ignored, and every row's fitted
    values for every alpha equal the float64 ridge refit on the train rows."""
    import torch
    n, d = 61, 7
    X, Y = make_data(n, d, seed=5)
    train = np.random.default_rng(5).random(n) > 0.3
    train[16:24], train[24:32] = False, True
    Y[np.flatnonzero(~train)[0]] = np.nan
    Xt, Yt = X[train], Y[train]
    xbar, ybar = Xt.mean(0), Yt.mean(0)
    Xs = Xt - xbar
    fac = primal_factor(train.sum(), torch.tensor(Xs.sum(0))[None],
                        torch.tensor(Xs.T @ Xs)[None], torch.tensor(Yt.sum(0)),
                        torch.tensor(Xs.T @ (Yt - ybar))[None], torch.tensor(xbar)[None])
    acc = LooAccumulator(fac, ALPHAS, n, precision=precision)
    for s in range(0, n, 8):
        acc.update(s, torch.tensor(X[s:s + 8])[None], Y[s:s + 8], train[s:s + 8])
    assert acc.n_train == train.sum()
    for a, alpha in enumerate(ALPHAS):
        inv = np.linalg.inv(Xs.T @ Xs + alpha * np.eye(d))
        w = inv @ Xs.T @ (Yt - ybar)
        fitted = (X - xbar) @ w + ybar
        np.testing.assert_allclose(acc.pred[0, a].T.numpy(), fitted, rtol=tol, atol=tol)
        h = 1 / train.sum() + np.einsum("nd,de,ne->n", Xs, inv, Xs)
        e = (Yt - fitted[train]) / (1 - h)[:, None]
        np.testing.assert_allclose(acc.scores()[0, a].numpy(), -(e ** 2).mean(0), rtol=tol)


def test_float32_projection_close_to_float64():
    import torch
    X, Y = make_data(200, 20, seed=8)
    Xs = X - X.mean(0)
    fac = primal_factor(200, torch.tensor(Xs.sum(0))[None], torch.tensor(Xs.T @ Xs)[None],
                        torch.tensor(Y.sum(0)), torch.tensor(Xs.T @ Y)[None],
                        torch.tensor(X.mean(0))[None])
    out = {}
    for prec in ("float64", "float32"):
        acc = LooAccumulator(fac, ALPHAS, 200, precision=prec)
        acc.update(0, torch.tensor(X)[None], Y, np.ones(200, bool))
        out[prec] = acc.scores().numpy()
    assert rel(out["float32"], out["float64"]) < 1e-4
    assert not np.array_equal(out["float32"], out["float64"])
    # the caller's chunk is not modified (a float32 input used to be centred in place)
    for prec in ("float64", "float32"):
        for x in (torch.tensor(X, dtype=torch.float32)[None], X.astype(np.float32)[None]):
            before = x.clone() if isinstance(x, torch.Tensor) else x.copy()
            LooAccumulator(fac, ALPHAS, 200, precision=prec).update(0, x, Y, np.ones(200, bool))
            np.testing.assert_array_equal(np.asarray(x), np.asarray(before))


def test_estimator_in_pipeline_and_cross_val_score():
    X, Y = make_data(100, 12, seed=2)
    pipe = make_pipeline(StandardScaler(), RidgeProbeCV(ALPHAS))
    scores = cross_val_score(pipe, X, Y[:, 0], cv=4)
    ref = cross_val_score(make_pipeline(StandardScaler(), RidgeCV(alphas=ALPHAS)), X, Y[:, 0], cv=4)
    np.testing.assert_allclose(scores, ref, rtol=1e-6)
    est = RidgeProbeCV(ALPHAS, cv=3)
    assert est.get_params()["cv"] == 3
    est.set_params(cv="loo", alpha_per_target=True)
    c = clone(est)
    assert c.get_params()["alpha_per_target"] is True and c.cv == "loo"
    pipe.fit(X, Y)
    assert pipe.predict(X).shape == (100, 2)
    assert -1 <= pipe.score(X, Y) <= 1
    with pytest.raises(Exception):
        RidgeProbeCV(ALPHAS).predict(X)        # not fitted


def test_parse_alphas():
    a = parse_alphas("1e-2:1e5:25")
    assert len(a) == 25 and np.isclose(a[0], 1e-2) and np.isclose(a[-1], 1e5)
    np.testing.assert_allclose(np.diff(np.log10(a)), 7 / 24)
    np.testing.assert_array_equal(parse_alphas("0.5,2, 8"), [0.5, 2, 8])
    np.testing.assert_array_equal(parse_alphas([3, 1]), [3, 1])
    for bad in ("", "1:2", "a,b", "0:10:3", "1,-1", [np.inf], "1:10:0"):
        with pytest.raises(RidgeError):
            parse_alphas(bad)


def test_bad_inputs():
    X, Y = make_data(30, 5, seed=1)
    with pytest.raises(RidgeError, match="at least 3 rows .*got n_samples=2"):
        RidgeProbeCV(ALPHAS).fit(X[:2], Y[:2])
    Yc = Y.copy()
    Yc[:, 1] = 4.0
    with pytest.raises(RidgeError, match="constant"):
        RidgeProbeCV(ALPHAS).fit(X, Yc)
    with pytest.raises(RidgeError, match="cv"):
        RidgeProbeCV(ALPHAS, cv="five").fit(X, Y)
    with pytest.raises(ValueError):
        RidgeProbeCV(ALPHAS).fit(np.where(X > 1, np.nan, X), Y)
    with pytest.raises(ValueError, match="unknown backend .fpga."):
        RidgeProbeCV(ALPHAS, backend="fpga").fit(X, Y)
    with pytest.raises(RidgeError):
        RidgeProbeCV(ALPHAS, cv=40).fit(X, Y)   # more folds than rows
    m = RidgeProbeCV(ALPHAS).fit(X, Y)
    with pytest.raises(RidgeError, match="X has 3 features, but RidgeProbeCV is expecting 5 "
                       "features as input"):
        m.predict(X[:, :3])


def test_float32_eigh_dual_and_primal_close_to_float64():
    """precision='float32' (float32 eigendecomposition with the guarded floor) stays ~1e-5."""
    import torch
    X, Y = make_data(40, 90, seed=12)
    s64, f64, _ = dual_loo(X, Y, ALPHAS)
    s32, f32, _ = dual_loo(X, Y, ALPHAS, precision="float32")
    # float32 eigenvalues carry ~eps32·λ_max absolute noise: tiny alphas (far below it) see it
    err = np.abs(s32.numpy() - s64.numpy()).max(1) / np.abs(s64.numpy()).max(1)
    assert err.max() < 3e-3 and err[ALPHAS >= 1].max() < 1e-4
    assert rel(f32.numpy()[:, ALPHAS >= 1], f64.numpy()[:, ALPHAS >= 1]) < 1e-4
    assert not np.array_equal(s32.numpy(), s64.numpy())
    X, Y = make_data(150, 30, seed=13)
    Xs = X - X.mean(0)
    args = (150, torch.tensor(Xs.sum(0))[None], torch.tensor(Xs.T @ Xs)[None],
            torch.tensor(Y.sum(0)), torch.tensor(Xs.T @ Y)[None])
    a, b = primal_factor(*args), primal_factor(*args, precision="float32")
    assert rel(b.coef(np.full((1, 2), 1.0)).numpy(), a.coef(np.full((1, 2), 1.0)).numpy()) < 1e-4


# ----------------------------------------------------------------------------- sample weights

def make_weights(n, seed, zeros=0):
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.1, 5.0, n)
    w[rng.choice(n, zeros, replace=False)] = 0.0
    return w


@pytest.mark.parametrize("n,d", [(120, 17), (61, 60), (30, 75), (23, 200)])   # primal and dual
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("apt", [False, True])
@pytest.mark.parametrize("zeros", [0, 5])
def test_weighted_loo_equals_sklearn_ridgecv(n, d, k, apt, zeros):
    """RidgeCV(alphas).fit(X, y, sample_weight=w): the same alpha(s), coefficients, intercept
    and best_score_ (-mean of w·e² over the rows, e the weighted problem's exact LOO residual)."""
    X, Y = make_data(n, d, k=k, seed=n + d + k, scales=(1.0, 40.0, 0.05))
    y = Y[:, 0] if k == 1 else Y
    w = make_weights(n, n + k, zeros)
    ref = RidgeCV(alphas=ALPHAS, alpha_per_target=apt).fit(X, y, sample_weight=w)
    me = RidgeProbeCV(ALPHAS, alpha_per_target=apt, standardize_targets=False)
    me.fit(X, y, sample_weight=w)
    np.testing.assert_array_equal(np.atleast_1d(me.alpha_), np.atleast_1d(ref.alpha_))
    assert rel(me.coef_, ref.coef_) <= 1e-8
    assert rel(me.intercept_, ref.intercept_) <= 1e-8
    assert rel(me.best_score_, ref.best_score_) <= 1e-8
    assert np.shape(me.best_score_) == np.shape(ref.best_score_)


def test_weighted_loo_scores_equal_brute_force_weighted_refits():
    """Independent of scikit-learn's GCV: refit the weighted Ridge without each row."""
    X, Y = make_data(14, 4, seed=21)
    w = make_weights(14, 3, zeros=2)
    alphas = np.array([0.3, 3.0, 30.0])
    me = RidgeProbeCV(alphas, alpha_per_target=True, standardize_targets=False)
    me.fit(X, Y, sample_weight=w)
    for a, alpha in enumerate(alphas):
        sse = np.zeros(Y.shape[1])
        for i in range(len(X)):
            m = np.arange(len(X)) != i
            r = Ridge(alpha=alpha).fit(X[m], Y[m], sample_weight=w[m])
            sse += w[i] * (Y[i] - r.predict(X[i:i + 1])[0]) ** 2
        np.testing.assert_allclose(me.cv_scores_[a], -sse / len(X), rtol=1e-9)


def test_sample_weight_scalar_ones_and_standardized():
    X, Y = make_data(50, 8, seed=6, scales=(1.0, 300.0))
    plain = RidgeProbeCV(ALPHAS).fit(X, Y)
    ones = RidgeProbeCV(ALPHAS).fit(X, Y, sample_weight=np.ones(50))
    assert ones.alpha_ == plain.alpha_
    assert rel(ones.coef_, plain.coef_) <= 1e-10
    assert rel(ones.best_score_, plain.best_score_) <= 1e-10
    # a scalar weight c scales the loss: RidgeCV's answer with the same scalar
    for c in (0.25, 7.0):
        ref = RidgeCV(alphas=ALPHAS).fit(X, Y[:, 0], sample_weight=c)
        me = RidgeProbeCV(ALPHAS).fit(X, Y[:, 0], sample_weight=c)
        assert me.alpha_ == ref.alpha_ and rel(me.coef_, ref.coef_) <= 1e-8
    # standardize_targets z-scores y with the weighted mean and population std
    w = make_weights(50, 9, zeros=4)
    mu = np.average(Y, axis=0, weights=w)
    sd = np.sqrt(np.average((Y - mu) ** 2, axis=0, weights=w))
    ref = RidgeCV(alphas=ALPHAS).fit(X, (Y - mu) / sd, sample_weight=w)
    me = RidgeProbeCV(ALPHAS).fit(X, Y, sample_weight=w)
    assert me.alpha_ == ref.alpha_
    assert rel(me.coef_, ref.coef_ * sd[:, None]) <= 1e-8
    assert rel(me.intercept_, ref.intercept_ * sd + mu) <= 1e-8


@pytest.mark.parametrize("n,d", [(80, 9), (26, 40)])
@pytest.mark.parametrize("cv", ["int", "shuffled", "groups", "shufflesplit"])
def test_weighted_kfold_equals_sklearn_ridgecv(n, d, cv):
    """RidgeCV(cv=...).fit(X, y, sample_weight=w) (its grid search fits each fold with the
    weights and scores the validation rows by weighted R²), for folds, shuffled folds, explicit
    group splits and splits that are no partition."""
    from sklearn.model_selection import LeaveOneGroupOut, ShuffleSplit
    X, Y = make_data(n, d, seed=n * d)
    grid = ALPHAS[::2]                                  # 7 alphas: GridSearchCV refits each
    w = make_weights(n, d, zeros=3)
    splitter = {"int": 4, "shuffled": KFold(3, shuffle=True, random_state=2),
                "groups": list(LeaveOneGroupOut().split(X, groups=np.arange(n) % 3)),
                "shufflesplit": ShuffleSplit(4, test_size=0.3, random_state=0)}[cv]
    for y in (Y[:, 0], Y):
        ref = RidgeCV(alphas=grid, cv=splitter).fit(X, y, sample_weight=w)
        me = RidgeProbeCV(grid, cv=splitter, standardize_targets=False)
        me.fit(X, y, sample_weight=w)
        assert me.alpha_ == ref.alpha_
        assert abs(me.best_score_ - ref.best_score_) <= 1e-9
        assert rel(me.coef_, ref.coef_) <= 1e-8
        assert rel(me.intercept_, ref.intercept_) <= 1e-8
    # per-target alphas with k-fold (RidgeCV refuses the combination): each target's own choice
    apt = RidgeProbeCV(grid, cv=splitter, alpha_per_target=True, standardize_targets=False)
    apt.fit(X, Y, sample_weight=w)
    for t in range(2):
        one = RidgeCV(alphas=grid, cv=splitter).fit(X, Y[:, t], sample_weight=w)
        assert apt.alpha_[t] == one.alpha_


def test_sample_weight_errors_and_the_callers_array_untouched():
    X, Y = make_data(20, 3, seed=2)
    for bad, msg in ((np.ones(21), r"shape \(21,\), expected \(20,\)"),
                     (np.ones((20, 2)), r"shape \(20, 2\)"),
                     (np.r_[np.ones(19), -1.0], "finite and >= 0"),
                     (np.r_[np.ones(19), np.nan], "finite and >= 0"),
                     (np.zeros(20), "zero for every row")):
        with pytest.raises(RidgeError, match=msg):
            RidgeProbeCV(ALPHAS).fit(X, Y, sample_weight=bad)
    w = np.r_[np.zeros(18), 1.0, 1.0]
    with pytest.raises(RidgeError, match="at least 3 rows of positive sample_weight, got 2"):
        RidgeProbeCV(ALPHAS).fit(X, Y, sample_weight=w)
    w = make_weights(20, 1)
    before = w.copy()
    RidgeProbeCV(ALPHAS, cv=4).fit(X, Y, sample_weight=w)
    np.testing.assert_array_equal(w, before)


# ----------------------------------------------------------------------------- sklearn's API

def test_feature_names_from_a_dataframe_and_the_warnings_on_mismatch():
    import warnings

    import pandas as pd
    X, Y = make_data(40, 4, seed=3)
    df = pd.DataFrame(X, columns=["a", "b", "c", "d"])
    m = RidgeProbeCV(ALPHAS).fit(df, Y)
    assert m.feature_names_in_.tolist() == ["a", "b", "c", "d"] and m.n_features_in_ == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(m.predict(df), RidgeProbeCV(ALPHAS).fit(X, Y).predict(X),
                                   rtol=1e-12)
    with pytest.warns(UserWarning, match="X does not have valid feature names, but "
                      "RidgeProbeCV was fitted with feature names"):
        m.predict(X)
    with pytest.raises(RidgeError, match="Feature names must be in the same order"):
        m.predict(df[["b", "a", "c", "d"]])
    with pytest.raises(RidgeError, match="Feature names unseen at fit time:\n- e"):
        m.predict(df.rename(columns={"d": "e"}))
    plain = RidgeProbeCV(ALPHAS).fit(X, Y)
    assert not hasattr(plain, "feature_names_in_")
    with pytest.warns(UserWarning, match="X has feature names, but RidgeProbeCV was fitted "
                      "without feature names"):
        plain.predict(df)
    m.fit(X, Y)                                           # refit on an array forgets the names
    assert not hasattr(m, "feature_names_in_")


def test_messages_scikit_learn_expects():
    X, Y = make_data(20, 5, seed=8)
    with pytest.raises(RidgeError, match="n_samples=1"):
        RidgeProbeCV(ALPHAS).fit(X[:1], Y[:1])
    with pytest.raises(RidgeError, match="n_samples=1"):
        RidgeProbeCV(ALPHAS, cv=3).fit(X[:1], Y[:1])
    m = RidgeProbeCV(ALPHAS, cv=3).fit(X, Y)
    with pytest.raises(RidgeError, match="X has 1 features, but RidgeProbeCV is expecting 5 "
                       "features as input"):
        m.score(X[:, :1], Y)
    for bad in ("five", 1, True, 2.5):
        with pytest.raises(RidgeError, match="cv"):
            RidgeProbeCV(ALPHAS, cv=bad).fit(X, Y)
    with pytest.raises(RidgeError, match="outside"):
        RidgeProbeCV(ALPHAS, cv=[(np.arange(10), np.arange(10, 25))]).fit(X, Y)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_eigh_split_over_threads_equals_one_call(dtype):
    """The primal eigendecomposition split over two one-thread workers (CPU, d <= 1024) gives
    the batch's eigenpairs in order, as one torch.linalg.eigh call; the thread count is restored."""
    import torch

    from probes.ridge import solvers
    rng = np.random.default_rng(9)
    A = rng.normal(size=(5, 40, 60))
    M = torch.tensor(A @ A.transpose(0, 2, 1), dtype=getattr(torch, dtype))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        lam, V = solvers._batched_eigh(M)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    ref_lam, _ = torch.linalg.eigh(M)
    tol = 1e-10 if dtype == "float64" else 1e-4
    assert lam.shape == (5, 40) and V.shape == (5, 40, 40)
    assert rel(lam, ref_lam) < tol
    rebuilt = V @ torch.diag_embed(lam) @ V.transpose(1, 2)
    assert rel(rebuilt, M) < tol
