"""probes.classify.metrics against sklearn.metrics on random inputs (ties, absent classes)."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from probes.classify import metrics as cm
from probes.errors import ClassifyError


def random_case(seed, n, K, ties=False, drop_pred=None):
    """codes (n,) covering all K classes, probabilities (n, K), predictions = argmax."""
    rng = np.random.default_rng(seed)
    y = np.r_[np.arange(K), rng.choice(K, size=n - K, p=rng.dirichlet(np.ones(K)))]
    rng.shuffle(y)
    if ties:                                    # rows from a small palette: tied scores
        palette = rng.dirichlet(np.ones(K), size=4)
        palette = np.round(palette, 1)
        palette[:, -1] = 1.0 - palette[:, :-1].sum(1)
        palette = np.abs(palette)
        palette /= palette.sum(1, keepdims=True)
        proba = palette[rng.integers(0, 4, size=n)]
    else:
        proba = rng.dirichlet(np.ones(K), size=n)
    if drop_pred is not None:                   # a class never predicted
        proba[:, drop_pred] *= 1e-3
        proba /= proba.sum(1, keepdims=True)
    return y, proba


def sk_all(y, proba, K):
    pred = proba.argmax(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auc = (skm.roc_auc_score(y, proba[:, 1]) if K == 2 else
               skm.roc_auc_score(y, proba, multi_class="ovr", average="macro"))
        return dict(accuracy=skm.accuracy_score(y, pred),
                    balanced_accuracy=skm.balanced_accuracy_score(y, pred),
                    macro_f1=skm.f1_score(y, pred, average="macro"),
                    auroc=auc,
                    log_loss=skm.log_loss(y, proba, labels=list(range(K))),
                    confusion_matrix=skm.confusion_matrix(y, pred, labels=list(range(K))))


@pytest.mark.parametrize("K,n,ties,drop", [(2, 31, False, None), (2, 60, True, None),
                                           (2, 40, False, 1), (5, 97, False, None),
                                           (5, 83, True, None), (5, 120, False, 3),
                                           (3, 7, True, 2)])
def test_each_metric_equals_sklearn(K, n, ties, drop):
    y, proba = random_case(K * 100 + n, n, K, ties, drop)
    ref = sk_all(y, proba, K)
    got = cm.evaluate_classification(y, proba, [f"c{k}" for k in range(K)])
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "log_loss"):
        assert np.isclose(got[key], ref[key], rtol=1e-12, atol=1e-15), key
    np.testing.assert_array_equal(got["confusion_matrix"], ref["confusion_matrix"])
    json.dumps(got)


def test_batched_over_layers_equals_per_layer():
    K, n, L = 4, 50, 3
    cases = [random_case(s, n, K, ties=s == 1) for s in range(L)]
    y = cases[0][0]
    proba = np.stack([c[1] for c in cases])
    pred = proba.argmax(-1)
    got = cm.evaluate_classification(y, proba, list("abcd"))
    for layer in range(L):
        one = cm.evaluate_classification(y, proba[layer], list("abcd"))
        for key in ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "log_loss"):
            assert np.isclose(got[key][layer], one[key], rtol=1e-13), key
        np.testing.assert_array_equal(got["confusion_matrix"][layer], one["confusion_matrix"])
    np.testing.assert_array_equal(cm.confusion_matrix(y, pred, K)[2],
                                  cm.confusion_matrix(y, pred[2], K))


def test_class_only_predicted_and_absent_from_truth():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, size=40)                  # class 3 never true, but predicted
    pred = np.where(rng.random(40) < 0.3, 3, y)
    pred[:5] = (y[:5] + 1) % 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.isclose(cm.balanced_accuracy(y, pred, 4), skm.balanced_accuracy_score(y, pred))
        assert np.isclose(cm.macro_f1(y, pred, 4), skm.f1_score(y, pred, average="macro"))
    proba = rng.dirichlet(np.ones(4), size=40)       # sklearn refuses; we average over 0..2
    ref = np.mean([skm.roc_auc_score(y == k, proba[:, k]) for k in range(3)])
    assert np.isclose(cm.auroc(y, proba), ref, rtol=1e-12)


def test_binary_scores_and_clipping():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, size=33)
    s = np.round(rng.normal(size=33) + y, 1)                        # ties
    s[0] = 0.0
    got = cm.evaluate_classification(y, s, ["no", "yes"], kind="scores")
    assert got["log_loss"] is None
    assert np.isclose(got["auroc"], skm.roc_auc_score(y, s), rtol=1e-12)
    assert np.isclose(got["accuracy"], np.mean((s > 0).astype(int) == y))
    p = np.c_[1 - (y == 1), (y == 1)].astype(np.float64)            # perfect, hits the clip
    p[0] = [1.0, 0.0] if y[0] == 1 else [0.0, 1.0]                  # one certain mistake
    assert np.isclose(cm.log_loss(y, p), skm.log_loss(y, p), rtol=1e-12)
    p32 = np.clip(rng.dirichlet(np.ones(2), size=33), 0, 1).astype(np.float32)
    p32[1] = [0.0, 1.0]
    assert np.isclose(cm.log_loss(y, p32), skm.log_loss(y, p32), rtol=1e-6)


def test_bad_inputs():
    y = np.array([0, 1, 1, 0])
    with pytest.raises(ClassifyError, match="integer"):
        cm.accuracy(y.astype(float), y, 2)
    with pytest.raises(ClassifyError, match="0..1"):
        cm.accuracy(y + 1, y, 2)
    with pytest.raises(ClassifyError, match="rows"):
        cm.accuracy(y, y[:3], 2)
    with pytest.raises(ClassifyError, match=r"\(n, 3\)"):
        cm.evaluate_classification(y, np.ones((4, 2)) / 2, ["a", "b", "c"])
    with pytest.raises(ClassifyError, match="kind"):
        cm.evaluate_classification(y, np.ones((4, 2)) / 2, ["a", "b"], kind="logits")
    assert np.isnan(cm.auroc(np.zeros(4, dtype=int), np.ones((4, 2)) / 2))


def test_batched_binary_scores_and_lda_output():
    """(L, n) binary decisions; an LDA probe's output scored like sklearn scores its LDA."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    from probes.classify.closed_form import class_stats, lda
    rng = np.random.default_rng(9)
    L, n, d = 3, 45, 6
    y = rng.integers(0, 2, size=n)
    x = rng.normal(size=(L, n, d)) + y[None, :, None] * 0.5
    probe = lda(class_stats(x, y, 2), 0.1)
    got_s = cm.evaluate_classification(y, probe.decision_function(x), [0, 1], kind="scores")
    got_p = cm.evaluate_classification(y, probe.predict_proba(x), np.array([0, 1]))
    json.dumps(got_p)
    for layer in range(L):
        sk = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=0.1).fit(x[layer], y)
        ref = sk_all(y, sk.predict_proba(x[layer]), 2)
        for key in ("accuracy", "balanced_accuracy", "macro_f1", "auroc"):
            assert np.isclose(got_s[key][layer], ref[key], rtol=1e-12), key
            assert np.isclose(got_p[key][layer], ref[key], rtol=1e-12), key
        assert np.isclose(got_p["log_loss"][layer], ref["log_loss"], rtol=1e-8)
        assert np.isclose(got_s["accuracy"][layer], sk.score(x[layer], y))
