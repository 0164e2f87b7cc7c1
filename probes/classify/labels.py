"""Class labels and stratified folds. :func:`encode_labels` turns a label column (strings, ints or
bools) into integer codes, refusing missing labels and optionally pooling or dropping the rarest
classes; :func:`stratified_folds` assigns k-fold ids exactly as scikit-learn
``StratifiedKFold(n_splits=k, shuffle=False)``, but refuses a class with fewer members than k
(scikit-learn only warns) and a single class."""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import numpy as np

from probes.errors import ClassifyError

__all__ = ["Labels", "encode_labels", "stratified_folds", "OTHER"]

OTHER = "other"


@dataclass
class Labels:
    """Encoded class labels.

    classes: class names (str), sorted as ``np.unique`` sorts the original values, with
    ``"other"`` last when classes were pooled; codes: (n,) int64 index into ``classes`` (-1 for a
    dropped row); kept: (n,) bool, False for dropped rows; pooled: the original class names pooled
    into ``"other"`` or dropped (empty when none), in the order of ``classes``' sort.
    """
    classes: list[str]
    codes: np.ndarray
    kept: np.ndarray
    pooled: list[str] = field(default_factory=list)


def _is_missing(v) -> bool:
    if v is None or type(v).__name__ in ("NAType", "NaTType"):       # pandas' missing values
        return True
    if isinstance(v, (float, np.floating)) and np.isnan(v):
        return True
    return isinstance(v, str) and v.strip() == ""


def _sorted_unique(values: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Class names and codes; numbers (and bools) sort numerically, anything else by str."""
    numeric = all(isinstance(v, (numbers.Number, np.bool_)) for v in values)
    if numeric:
        uniq, inv = np.unique(np.asarray(values.tolist()), return_inverse=True)
        names = [str(v.item() if hasattr(v, "item") else v) for v in uniq]
    else:
        uniq, inv = np.unique(np.asarray([str(v) for v in values], dtype=object),
                              return_inverse=True)
        names = [str(v) for v in uniq]
    if len(set(names)) != len(names):
        raise ClassifyError("two label values print as the same class name; "
                            "give the labels as one type (all strings or all integers)")
    return names, inv.astype(np.int64).ravel()


def encode_labels(values, max_classes: int | None = None, rest: str = "other") -> Labels:
    """Encode a label column as integer class codes.

    Parameters
    ----------
    values : sequence of str, int or bool, length n
        The labels. None, NaN and empty (or blank) strings are refused, never dropped.
    max_classes : int, optional
        Keep at most this many classes. The classes are ranked by frequency (ties broken by
        the class sort order, i.e. the smaller name first).
    rest : {"other", "drop"}
        ``"other"``: keep the ``max_classes - 1`` most frequent classes and pool the rest into a
        class ``"other"`` (placed last); ``"drop"``: keep the ``max_classes`` most frequent and
        mark the rows of the rest as not kept (code -1).

    Returns
    -------
    Labels
        classes, codes, kept mask and the pooled (or dropped) class names.
    """
    if rest not in ("other", "drop"):
        raise ClassifyError(f"rest must be 'other' or 'drop', got {rest!r}")
    arr = np.empty(len(values), dtype=object)
    arr[:] = list(values)
    missing = np.flatnonzero([_is_missing(v) for v in arr])
    if missing.size:
        raise ClassifyError(f"{missing.size} rows have no label (None, NaN or empty), e.g. rows "
                            f"{missing[:5].tolist()}: fill or remove them before fitting")
    if arr.size == 0:
        raise ClassifyError("no labels given: the label column is empty")
    names, codes = _sorted_unique(arr)
    n_all = len(names)
    if max_classes is None or n_all <= max_classes:
        return Labels(names, codes, np.ones(codes.size, bool), [])
    if max_classes < 2:
        raise ClassifyError(f"max_classes must be at least 2, got {max_classes}")
    counts = np.bincount(codes, minlength=n_all)
    order = sorted(range(n_all), key=lambda c: (-counts[c], c))     # frequency, then sort order
    n_keep = max_classes - 1 if rest == "other" else max_classes
    keep = sorted(order[:n_keep])
    pooled = [names[c] for c in sorted(order[n_keep:])]
    new = np.full(n_all, -1, np.int64)
    new[keep] = np.arange(len(keep))
    classes = [names[c] for c in keep]
    if rest == "other":
        if OTHER in classes:
            raise ClassifyError(f"a kept class is already named {OTHER!r}: rename it, or use "
                                "rest='drop', before pooling the rarest classes")
        new[new < 0] = len(keep)
        classes.append(OTHER)
    out = new[codes]
    return Labels(classes, out, out >= 0, pooled)


def stratified_folds(codes, k: int) -> np.ndarray:
    """Stratified k-fold ids, equal to scikit-learn ``StratifiedKFold(n_splits=k, shuffle=False)``.

    Classes are numbered in order of first appearance; the sorted labels are dealt round-robin
    to the k folds, which fixes how many rows of each class each fold holds; each class's rows
    then fill fold 0, 1, ... in their original order.

    Parameters
    ----------
    codes : (n,) int array
        Class codes (>= 0) of the rows to split (the train rows).
    k : int
        Number of folds, at least 2.

    Returns
    -------
    (n,) int64 array
        The fold (0..k-1) each row is held out in.
    """
    y = np.asarray(codes)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ClassifyError(f"codes must be a 1-D integer array, got {y.dtype} {y.shape}")
    if int(k) != k or k < 2:
        raise ClassifyError(f"the number of folds must be an integer >= 2, got {k}")
    k = int(k)
    uniq, first, inv = np.unique(y, return_index=True, return_inverse=True)
    if uniq.size < 2:
        raise ClassifyError(f"the train rows hold a single class ({uniq.tolist()}): a classifier "
                            "needs at least two classes")
    counts = np.bincount(inv.ravel(), minlength=uniq.size)
    if counts.min() < k:
        c = int(np.argmin(counts))
        raise ClassifyError(f"class {uniq[c]} has only {counts[c]} train rows, fewer than the "
                            f"{k} folds: lower --cv or use --max-classes to pool rare classes")
    rank = np.empty(uniq.size, np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(uniq.size)   # order of first appearance
    enc = rank[inv.ravel()]
    dealt = np.sort(enc)
    out = np.empty(y.size, np.int64)
    for c in range(uniq.size):
        per_fold = np.array([np.count_nonzero(dealt[f::k] == c) for f in range(k)])
        out[enc == c] = np.repeat(np.arange(k), per_fold)
    return out
