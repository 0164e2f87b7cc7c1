"""Classification metrics, each defined exactly in its docstring, batched over layers.

Conventions: ``y_true`` (n,) integer class codes 0..K-1; predictions ``y_pred`` (n,) or (L, n)
codes; probabilities or scores (n, K) or (L, n, K), column k for class k (two classes: two
columns, column 1 the positive class). A leading L axis gives one value per layer, (L,); without
it a float. Predicted codes from probabilities or scores are the argmax, the first maximum
winning ties (scikit-learn's ``classes_[argmax]``). Definitions follow ``sklearn.metrics``.
"""
from __future__ import annotations

import numpy as np

from probes.errors import ClassifyError

__all__ = ["confusion_matrix", "accuracy", "balanced_accuracy", "macro_f1", "auroc",
           "log_loss", "evaluate_classification"]


def _codes(y_true, n_classes: int) -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1 or y.size == 0:
        raise ClassifyError(f"y_true must be (n,) class codes with n > 0, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ClassifyError(f"y_true must be integer class codes, got {y.dtype}; encode labels")
    if y.min() < 0 or y.max() >= n_classes:
        raise ClassifyError(f"class codes must lie in 0..{n_classes - 1}, got "
                            f"{y.min()}..{y.max()}")
    return y.astype(np.int64)


def _batched(a, n: int, name: str, trailing: int) -> tuple[np.ndarray, bool]:
    """a with a leading layer axis added if absent; (array, was_batched)."""
    a = np.asarray(a)
    if a.ndim == trailing + 1:
        a, batched = a[None], False
    elif a.ndim == trailing + 2:
        batched = True
    else:
        raise ClassifyError(f"{name} must have {trailing + 1} or {trailing + 2} axes, got "
                            f"shape {a.shape}")
    if a.shape[1] != n:
        raise ClassifyError(f"{name} has {a.shape[1]} rows but y_true has {n}")
    return a, batched


def _out(v: np.ndarray, batched: bool):
    return v if batched else float(v[0])


def confusion_matrix(y_true, y_pred, n_classes: int) -> np.ndarray:
    """C[i, j] = #{rows with true class i predicted as j}, (K, K) int64 (rows true, columns
    predicted; sklearn ``confusion_matrix(labels=range(K))``); (L, K, K) for y_pred (L, n)."""
    y = _codes(y_true, n_classes)
    p, batched = _batched(y_pred, y.size, "y_pred", 0)
    p = _codes(p.reshape(-1), n_classes).reshape(p.shape)
    L, K = p.shape[0], n_classes
    flat = (np.arange(L)[:, None] * K * K + y[None, :] * K + p).ravel()
    C = np.bincount(flat, minlength=L * K * K).reshape(L, K, K)
    return C if batched else C[0]


def _confusion3(y_true, y_pred, n_classes: int):
    C = confusion_matrix(y_true, y_pred, n_classes)
    return (C, True) if C.ndim == 3 else (C[None], False)


def accuracy(y_true, y_pred, n_classes: int):
    """Fraction of rows whose predicted code equals the true code, trace(C) / n."""
    C, b = _confusion3(y_true, y_pred, n_classes)
    return _out(np.trace(C, axis1=1, axis2=2) / C[0].sum(), b)


def balanced_accuracy(y_true, y_pred, n_classes: int):
    """Mean over the classes present in y_true of the recall C[k, k] / Σ_j C[k, j] (sklearn
    ``balanced_accuracy_score``, adjusted=False; classes only predicted do not count)."""
    C, b = _confusion3(y_true, y_pred, n_classes)
    support = C.sum(2)[0]
    present = support > 0
    recall = np.diagonal(C, axis1=1, axis2=2)[:, present] / support[present]
    return _out(recall.mean(1), b)


def macro_f1(y_true, y_pred, n_classes: int):
    """Mean over the classes occurring in y_true or y_pred of F1_k = 2·TP_k / (2·TP_k + FP_k +
    FN_k) (sklearn ``f1_score(average="macro")`` with its default labels; a class never
    predicted has F1 0). For y_pred (L, n) the classes counted are those of each layer."""
    C, b = _confusion3(y_true, y_pred, n_classes)
    tp = np.diagonal(C, axis1=1, axis2=2).astype(np.float64)
    fp, fn = C.sum(1) - tp, C.sum(2) - tp
    den = 2 * tp + fp + fn
    f1 = np.where(den > 0, 2 * tp / np.where(den > 0, den, 1), 0.0)
    return _out(f1.sum(1) / (den > 0).sum(1), b)


def _binary_auc(pos: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUC of scores (L, n) for the boolean labels pos (n,): the Mann-Whitney statistic with
    mid-ranks, (Σ rank of positives - P(P+1)/2) / (P·N); nan without positives or negatives."""
    P = int(pos.sum())
    N = pos.size - P
    if P == 0 or N == 0:
        return np.full(scores.shape[0], np.nan)
    from scipy.stats import rankdata  # deferred: scipy is heavy to import
    r = rankdata(scores, axis=1, method="average")
    return (r[:, pos].sum(1) - P * (P + 1) / 2.0) / (P * N)


def auroc(y_true, proba):
    """Area under the ROC curve, ties counted half (sklearn ``roc_auc_score``).

    Two columns: the binary AUC of column 1 for class 1. K ≥ 3: one-vs-rest macro average,
    the mean over classes k of the AUC of column k for (y == k) (sklearn ``multi_class="ovr",
    average="macro"``); a class absent from y_true is left out of the mean (sklearn raises
    instead), nan when no class can be scored (e.g. one class only). The AUC is the
    Mann-Whitney U / (P·N) with mid-ranks, equal to the trapezoidal area over tied groups.
    """
    p, b = _batched(proba, np.asarray(y_true).size, "proba", 1)
    K = p.shape[2]
    y = _codes(y_true, K)
    if K == 2:
        return _out(_binary_auc(y == 1, p[:, :, 1].astype(np.float64)), b)
    per = np.stack([_binary_auc(y == k, p[:, :, k].astype(np.float64)) for k in range(K)], 1)
    ok = ~np.isnan(per[0])
    val = per[:, ok].mean(1) if ok.any() else np.full(p.shape[0], np.nan)
    return _out(val, b)


def log_loss(y_true, proba):
    """Mean negative log-likelihood -1/n Σ_i log p_i,y_i, probabilities first clipped to
    [eps, 1-eps], eps the machine epsilon of proba's float dtype (sklearn ``log_loss`` with
    ``labels=range(K)``; rows are not renormalised)."""
    p = np.asarray(proba)
    if not np.issubdtype(p.dtype, np.floating):
        p = p.astype(np.float64)
    p, b = _batched(p, np.asarray(y_true).size, "proba", 1)
    y = _codes(y_true, p.shape[2])
    eps = np.finfo(p.dtype).eps
    picked = np.clip(p, eps, 1 - eps)[:, np.arange(y.size), y].astype(np.float64)
    return _out(-np.log(picked).mean(1), b)


def evaluate_classification(y_true, output, classes, *, kind: str = "proba") -> dict:
    """All metrics of one split (per layer for a leading L axis) as a JSON-ready dict.

    Parameters
    ----------
    y_true : (n,) integer codes into ``classes``.
    output : probabilities (kind="proba") or scores (kind="scores"), (n, K) or (L, n, K);
        with two classes, scores may also be the binary decision (n,) or (L, n) (class 1 where
        > 0), as scikit-learn's ``decision_function``.
    classes : the K class names, in code order.
    kind : "proba" or "scores"; scores give no log loss (None) and AUROC of the score columns.

    Returns
    -------
    dict: n, classes, accuracy, balanced_accuracy, macro_f1, auroc, log_loss, confusion_matrix
    (rows true, columns predicted); floats, or lists over layers when batched.
    """
    classes = [c.item() if hasattr(c, "item") else c for c in classes]
    K, y = len(classes), np.asarray(y_true)
    if kind not in ("proba", "scores"):
        raise ClassifyError(f"kind must be 'proba' or 'scores', got {kind!r}")
    out = np.asarray(output, dtype=np.float64)
    if kind == "scores" and K == 2 and out.shape[-1] == y.size and not (
            out.ndim >= 2 and out.shape[-2] == y.size and out.shape[-1] == 2):
        out = np.stack([np.zeros_like(out), out], axis=-1)
    if out.ndim not in (2, 3) or out.shape[-1] != K:
        raise ClassifyError(f"output must be (n, {K}) or (layers, n, {K}) for {K} classes, "
                            f"got shape {out.shape}")
    y = _codes(y, K)
    pred = out.argmax(-1)

    def j(v):
        return v.tolist() if isinstance(v, np.ndarray) else v

    return {
        "n": int(y.size), "classes": list(classes),
        "accuracy": j(accuracy(y, pred, K)),
        "balanced_accuracy": j(balanced_accuracy(y, pred, K)),
        "macro_f1": j(macro_f1(y, pred, K)),
        "auroc": j(auroc(y, out)),
        "log_loss": j(log_loss(y, out)) if kind == "proba" else None,
        "confusion_matrix": confusion_matrix(y, pred, K).tolist(),
    }
