"""probes.classify.shrinkage_cv against scikit-learn GridSearchCV over lsqr LDA, same folds."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.model_selection import GridSearchCV, PredefinedSplit

from probes.classify.shrinkage_cv import ShrinkageCV
from probes.errors import ClassifyError
from probes.kernels import gram_update
from probes.stats import GramStats, choose_shift


def make(seed, L, n, d, K):
    rng = np.random.default_rng(seed)
    codes = np.r_[np.repeat(np.arange(K), 4), rng.choice(K, size=n - 4 * K,
                                                         p=rng.dirichlet(np.ones(K) * 2))]
    rng.shuffle(codes)
    scale = np.logspace(-.6, .6, d)                     # anisotropic noise: shrinkage matters
    mix = np.linalg.qr(rng.normal(size=(L, d, d)))[0] * scale[:, None]
    x = rng.normal(size=(L, n, d)) @ mix + rng.normal(size=(L, K, d))[:, codes] * 0.4 + 2.0
    fold = np.empty(n, dtype=np.int64)                 # stratified: round robin within class
    for k in range(K):
        idx = np.flatnonzero(codes == k)
        fold[idx] = np.arange(idx.size) % 3
    return x, codes, fold


def gram(x, codes, fold, K, F, chunk=29):
    g = GramStats.zeros(x.shape[0], x.shape[2], K, n_folds=F, shift=choose_shift(x))
    for lo in range(0, x.shape[1], chunk):
        gram_update(g, x[:, lo:lo + chunk], np.eye(K)[codes[lo:lo + chunk]],
                    fold[lo:lo + chunk], backend="torch")
    return g


@pytest.mark.parametrize("K,n,d,scoring", [(2, 70, 30, "accuracy"), (3, 64, 9, "neg_log_loss"),
                                           (4, 90, 40, "accuracy")])
def test_equals_gridsearchcv(K, n, d, scoring):
    L, grid = 3, [0.0, 0.001, 0.03, 0.2, 0.6, 1.0]
    if d > n // 2:
        grid = grid[1:]                                # sklearn's s=0 is not reproducible there
    x, codes, fold = make(K * 7 + d, L, n, d, K)
    cv = ShrinkageCV(gram(x, codes, fold, K, 3), grid, scoring=scoring)
    for lo in range(0, n, 41):
        cv.update(x[:, lo:lo + 41], codes[lo:lo + 41], fold[lo:lo + 41])
    scores, best, final = cv.scores(), cv.best_shrinkage(), cv.refit()
    for layer in range(L):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = GridSearchCV(LinearDiscriminantAnalysis(solver="lsqr"), {"shrinkage": grid},
                               cv=PredefinedSplit(fold), scoring=scoring).fit(x[layer], codes)
        np.testing.assert_allclose(scores[:, layer], ref.cv_results_["mean_test_score"],
                                   rtol=1e-10)
        assert best[layer] == ref.best_params_["shrinkage"]
        c = ref.best_estimator_.coef_
        assert np.abs(final.coef[layer] - c).max() <= 1e-8 * np.abs(c).max()
        assert final.shrinkage[layer] == best[layer]


def test_bad_use():
    x, codes, fold = make(1, 2, 40, 5, 2)
    g = gram(x, codes, fold, 2, 3)
    with pytest.raises(ClassifyError, match="scoring"):
        ShrinkageCV(g, [0.1], scoring="f1")
    cv = ShrinkageCV(g, [0.1, 0.5])
    cv.update(x[:, :20], codes[:20], fold[:20])
    with pytest.raises(ClassifyError, match="same rows"):
        cv.scores()
    with pytest.raises(ClassifyError, match="fold id 5"):
        cv.update(x[:, :3], codes[:3], np.array([0, 5, 1]))
    with pytest.raises(ClassifyError, match="at least 2 folds"):
        ShrinkageCV(gram(x, codes, np.zeros(40, dtype=np.int64), 2, 1), [0.1])
