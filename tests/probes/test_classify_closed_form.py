"""probes.classify.closed_form against scikit-learn LDA and plain numpy float64 references."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from probes.classify.closed_form import (
    ClassStats,
    FourthMoments,
    class_stats,
    lda,
    lda_grid,
    mass_mean,
)
from probes.errors import ClassifyError

WORLD = Path("/work/shared/datasets/paper/world_place.csv")


def make_data(seed, L, n, d, K, unbalanced=True, offset=0.0):
    """(L, n, d) activations with class structure, codes (n,) covering every class."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(K) * (0.7 if unbalanced else 50.0))
    codes = np.r_[np.arange(K), rng.choice(K, size=n - K, p=p)]
    rng.shuffle(codes)
    centres = rng.normal(size=(L, K, d)) * 0.8
    mix = rng.normal(size=(L, d, d)) / np.sqrt(d)
    x = rng.normal(size=(L, n, d)) @ (np.eye(d) + mix) + centres[:, codes, :] + offset
    return x, codes


def rel(a, b):
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)


def sk_lda(x, codes, shrinkage):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LinearDiscriminantAnalysis(solver="lsqr", shrinkage=shrinkage).fit(x, codes)


def test_stats_streamed_equal_one_pass_and_merge():
    x, codes = make_data(0, 3, 53, 7, 3, offset=40.0)
    whole = class_stats(x, codes, 3, class_gram=True)
    a = ClassStats(3, 3, 7, class_gram=True)
    for lo, hi in [(0, 10), (10, 11), (11, 30)]:
        a.update(x[:, lo:hi], codes[lo:hi])
    b = ClassStats(3, 3, 7, class_gram=True).update(x[:, 30:] + 0.0, codes[30:])
    a.merge(b)
    for got, ref in [(a.means(), whole.means()), (a.within(), whole.within()),
                     (a.class_cov(), whole.class_cov())]:
        assert rel(got.numpy(), ref.numpy()) < 1e-12
    # against numpy on the rows
    for layer in range(3):
        ref = sum((codes == k).sum() / 53 * np.cov(x[layer, codes == k].T, bias=True)
                  for k in range(3))
        assert rel(whole.within()[layer].numpy(), ref) < 1e-10


@pytest.mark.parametrize("backend,tol", [("torch", 1e-12), ("cpu", 1e-5)])
def test_from_gram_stats_equals_streamed_per_fold(backend, tol):
    """The ridge statistics pass with one-hot targets gives the class statistics, per fold."""
    from probes.kernels import available_backends, gram_update
    from probes.stats import GramStats, choose_shift
    if backend not in available_backends():
        pytest.skip(f"backend {backend} not built here")
    L, n, d, K, F = 3, 90, 11, 4, 3
    x, codes = make_data(8, L, n, d, K, offset=25.0)
    x = x.astype(np.float32).astype(np.float64)
    fold = np.arange(n) % F
    g = GramStats.zeros(L, d, K, n_folds=F, shift=choose_shift(x))
    for lo in range(0, n, 32):
        gram_update(g, x[:, lo:lo + 32].astype(np.float32),
                    np.eye(K)[codes[lo:lo + 32]].astype(np.float32), fold[lo:lo + 32],
                    backend=backend)
    for f in range(F):
        train = fold != f
        got = ClassStats.from_gram_stats(g, [i != f for i in range(F)])
        ref = class_stats(x[:, train], codes[train], K)
        assert rel(got.means().numpy(), ref.means().numpy()) < tol
        assert rel(got.within().numpy(), ref.within().numpy()) < tol
        assert rel(lda(got, 0.2).coef, lda(ref, 0.2).coef) < 100 * tol
    bad = GramStats.zeros(L, d, 2, shift=choose_shift(x))
    gram_update(bad, x, np.c_[codes, codes], backend="torch")
    with pytest.raises(ClassifyError, match="one-hot"):
        ClassStats.from_gram_stats(bad)


def test_float16_chunks_accepted():
    x, codes = make_data(1, 2, 40, 5, 2)
    s = ClassStats(2, 2, 5).update(x.astype(np.float16), codes)
    ref = class_stats(x.astype(np.float16).astype(np.float64), codes, 2)
    assert rel(s.within().numpy(), ref.within().numpy()) < 1e-12


@pytest.mark.parametrize("K", [2, 4])
def test_mass_mean_equals_numpy(K):
    x, codes = make_data(2 + K, 3, 61, 9, K)
    probe = mass_mean(class_stats(x, codes, K))
    for layer in range(3):
        mu = np.stack([x[layer, codes == k].mean(0) for k in range(K)])
        if K == 2:
            theta = mu[1] - mu[0]
            s = x[layer] @ theta - theta @ (mu[0] + mu[1]) / 2
            assert rel(probe.decision_function(x)[layer], s) < 1e-10
            np.testing.assert_array_equal(probe.predict(x)[layer], (s > 0).astype(int))
        else:
            s = x[layer] @ mu.T - 0.5 * (mu ** 2).sum(1)
            assert rel(probe.decision_function(x)[layer], s) < 1e-10
            np.testing.assert_array_equal(probe.predict(x)[layer], s.argmax(1))
    assert np.allclose(probe.predict_proba(x).sum(-1), 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                         # no overflow in exp
        proba = probe.predict_proba(x * 1e4)
    assert np.isfinite(proba).all() and np.allclose(proba.sum(-1), 1.0)


@pytest.mark.parametrize("K,n,d,shrink", [(2, 80, 6, 0.0), (2, 37, 50, 0.3), (3, 101, 13, 0.05),
                                          (5, 45, 60, 0.7), (3, 29, 11, 1.0)])
def test_lda_float_shrinkage_equals_sklearn(K, n, d, shrink):
    L = 2
    x, codes = make_data(10 + K + d, L, n, d, K, offset=3.0)
    probe = lda(class_stats(x, codes, K), shrink)
    dec, proba = probe.decision_function(x), probe.predict_proba(x)
    for layer in range(L):
        ref = sk_lda(x[layer], codes, shrink)
        assert rel(probe.coef[layer], ref.coef_) < 1e-8
        assert rel(probe.intercept[layer], ref.intercept_) < 1e-8
        assert rel(dec[layer], ref.decision_function(x[layer])) < 1e-8
        assert rel(proba[layer], ref.predict_proba(x[layer])) < 1e-8
        np.testing.assert_array_equal(probe.predict(x)[layer], ref.predict(x[layer]))


@pytest.mark.parametrize("K,n,d", [(2, 90, 7), (3, 40, 25), (4, 150, 10)])
def test_lda_auto_equals_sklearn(K, n, d):
    L = 2
    x, codes = make_data(20 + K, L, n, d, K, offset=-2.0)
    x[1, :, 3] = 4.25                               # a constant feature (scale 1 in sklearn)
    stats = ClassStats(K, L, d, class_gram=True)
    for lo in range(0, n, 17):
        stats.update(x[:, lo:lo + 17], codes[lo:lo + 17])
    fourth = FourthMoments(stats)
    for lo in range(0, n, 23):
        fourth.update(x[:, lo:lo + 23], codes[lo:lo + 23])
    probe = lda(stats, "auto", fourth)
    for layer in range(L):
        ref = sk_lda(x[layer], codes, "auto")
        assert rel(probe.coef[layer], ref.coef_) < 1e-8
        assert rel(probe.intercept[layer], ref.intercept_) < 1e-8
        assert rel(probe.predict_proba(x)[layer], ref.predict_proba(x[layer])) < 1e-8


@pytest.mark.parametrize("K,n,d", [(2, 30, 50), (3, 40, 70), (4, 20, 33)])
def test_lda_singular_no_shrinkage_is_min_norm(K, n, d):
    """d > n - K and shrinkage 0: the minimum-norm solution (lstsq, cutoff d·eps), which
    sklearn's lstsq (cutoff eps, keeps rounding-noise directions) does not give reproducibly."""
    x, codes = make_data(1 + K, 1, n, d, K)
    probe = lda(class_stats(x, codes, K), 0.0)
    mu = np.stack([x[0, codes == k].mean(0) for k in range(K)])
    W = sum((codes == k).mean() * np.cov(x[0, codes == k].T, bias=True) for k in range(K))
    coef = np.linalg.lstsq(W, mu.T, rcond=d * np.finfo(float).eps)[0].T
    coef = coef[1:] - coef[:1] if K == 2 else coef
    assert rel(probe.coef[0], coef) < 1e-9


def test_lda_large_offset_streamed():
    """Activations far from 0 (offset 300, spread ~1), streamed in chunks: the shift keeps
    the pooled covariance exact enough for 1e-8 agreement."""
    x, codes = make_data(31, 2, 120, 15, 3, offset=300.0)
    stats = ClassStats(3, 2, 15)
    for lo in range(0, 120, 25):
        stats.update(x[:, lo:lo + 25], codes[lo:lo + 25])
    probe = lda(stats, 0.01)
    for layer in range(2):
        ref = sk_lda(x[layer], codes, 0.01)
        assert rel(probe.coef[layer], ref.coef_) < 1e-8
        assert rel(probe.predict_proba(x)[layer], ref.predict_proba(x[layer])) < 1e-8


def test_lda_grid_equals_per_shrinkage():
    x, codes = make_data(5, 3, 70, 30, 3)
    stats = class_stats(x, codes, 3)
    grid = [0.0, 0.01, 0.2, 0.9, 1.0]
    for s, probe in zip(grid, lda_grid(stats, grid)):
        one = lda(stats, s)
        assert probe.shrinkage == s
        assert rel(probe.coef, one.coef) < 1e-12
        assert rel(probe.intercept, one.intercept) < 1e-12


def test_bad_input_errors():
    x, codes = make_data(6, 2, 20, 4, 3)
    with pytest.raises(ClassifyError, match="0..2"):
        ClassStats(3, 2, 4).update(x, codes + 1)
    with pytest.raises(ClassifyError, match="layers=2"):
        ClassStats(3, 2, 4).update(x[0], codes)
    bad = x.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ClassifyError, match="NaN"):
        ClassStats(3, 2, 4).update(bad, codes)
    with pytest.raises(ClassifyError, match="at least one row"):
        mass_mean(ClassStats(4, 2, 4).update(x, codes))
    stats = class_stats(x, codes, 3)
    with pytest.raises(ClassifyError, match=r"\[0, 1\]"):
        lda(stats, 1.5)
    with pytest.raises(ClassifyError, match="class_gram=True"):
        lda(stats, "auto")
    with pytest.raises(ClassifyError, match="at least 2 classes"):
        ClassStats(1, 2, 4)


@pytest.mark.skipif(not WORLD.exists(), reason="paper dataset not present")
def test_world_place_entity_type_lda():
    """Features: a random projection of (lat, lon, one-hot country) plus noise; 3+ entity types."""
    import pandas as pd
    df = pd.read_csv(WORLD, usecols=["latitude", "longitude", "country", "entity_type"]).dropna()
    df = df.sample(n=min(len(df), 1500), random_state=0)
    top = df["entity_type"].value_counts().index[:4]
    df = df[df["entity_type"].isin(top)]
    codes = np.unique(df["entity_type"].to_numpy(), return_inverse=True)[1]
    K = codes.max() + 1
    feats = np.c_[df[["latitude", "longitude"]].to_numpy() / 90.0,
                  pd.get_dummies(df["country"]).to_numpy(float)[:, :40],
                  np.eye(K)[codes] * 0.5]
    rng = np.random.default_rng(0)
    x = np.stack([feats @ rng.normal(size=(feats.shape[1], 24)) + rng.normal(size=(len(df), 24))
                  for _ in range(2)])
    probe = lda(class_stats(x, codes, K), 0.1)
    for layer in range(2):
        ref = sk_lda(x[layer], codes, 0.1)
        assert rel(probe.predict_proba(x)[layer], ref.predict_proba(x[layer])) < 1e-8
