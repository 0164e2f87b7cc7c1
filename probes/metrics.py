"""Probe metrics, each defined exactly in its docstring. Inputs are plain numpy arrays.

Conventions: ``y_true`` and ``y_pred`` are (n,) or (n, k) in the targets' original units
(predictions already mapped back from z-scores). Place targets are addressed by NAME
(``latitude``, ``longitude`` in degrees), never by column position.
"""
from __future__ import annotations

import numpy as np

from probes.errors import MetricsError

__all__ = [
    "MetricsError", "r2_per_target", "r2", "pearson_per_target", "spearman_per_target",
    "haversine_km", "proximity_error", "proximity_error_paper", "evaluate", "EARTH_RADIUS_KM",
    "latlon_columns",
]

EARTH_RADIUS_KM = 6371.0


def _2d(a, name: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise MetricsError(f"{name} must be (n,) or (n, k), got shape {a.shape}")
    return a


def _pair(y_true, y_pred):
    t, p = _2d(y_true, "y_true"), _2d(y_pred, "y_pred")
    if t.shape != p.shape:
        raise MetricsError(f"y_true {t.shape} and y_pred {p.shape} differ in shape")
    if t.shape[0] < 2:
        raise MetricsError(f"metrics need at least 2 rows, got {t.shape[0]}")
    return t, p


def r2_per_target(y_true, y_pred) -> np.ndarray:
    """R²_t = 1 - Σ_i (y_it - ŷ_it)² / Σ_i (y_it - ȳ_t)², per target column t (sklearn
    ``r2_score(..., multioutput='raw_values')``; ȳ_t is the mean of the rows scored). A constant
    column gives nan."""
    t, p = _pair(y_true, y_pred)
    sse = ((t - p) ** 2).sum(0)
    sst = ((t - t.mean(0)) ** 2).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sst > 0, 1.0 - sse / np.where(sst > 0, sst, 1.0), np.nan)


def r2(y_true, y_pred) -> float:
    """Mean over targets of :func:`r2_per_target` (sklearn ``multioutput='uniform_average'``)."""
    return float(np.mean(r2_per_target(y_true, y_pred)))


def pearson_per_target(y_true, y_pred) -> np.ndarray:
    """Pearson r per target: Σ (y-ȳ)(ŷ-ŷ̄) / sqrt(Σ (y-ȳ)² Σ (ŷ-ŷ̄)²); nan if either is constant."""
    t, p = _pair(y_true, y_pred)
    tc, pc = t - t.mean(0), p - p.mean(0)
    den = np.sqrt((tc ** 2).sum(0) * (pc ** 2).sum(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, (tc * pc).sum(0) / np.where(den > 0, den, 1.0), np.nan)


def _ranks(a: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata
    return rankdata(a, axis=0, method="average")


def spearman_per_target(y_true, y_pred) -> np.ndarray:
    """Spearman ρ per target: the Pearson r of the ranks (ties get their average rank)."""
    t, p = _pair(y_true, y_pred)
    return pearson_per_target(_ranks(t), _ranks(p))


def haversine_km(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Great-circle distance in km on a sphere of radius 6371 km (degrees in, broadcasting):
    2R·asin(sqrt(sin²(Δφ/2) + cos φ1 cos φ2 sin²(Δλ/2))), the argument clipped to [0, 1]."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dp = p2 - p1
    dl = np.radians(lon2) - np.radians(lon1)
    a = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def _unit_vectors(latlon: np.ndarray) -> np.ndarray:
    la, lo = np.radians(latlon[:, 0]), np.radians(latlon[:, 1])
    return np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], axis=1)


def proximity_error(y_true, y_pred, metric: str = "euclidean") -> np.ndarray:
    """Per-entity proximity error (Gurnee & Tegmark 2023, as in their code):

        prox_i = #{j : dist(true_i, pred_j) < dist(true_i, pred_i)} / n

    the fraction of the n entities (i itself included in the count n; it never satisfies the
    strict inequality) whose PREDICTION lies closer to entity i's true position than i's own
    prediction does. 0 is perfect; a prediction no better than the others' scores ~0.5+.
    ``metric``: "euclidean" in target units (for one target, |a - b|), or "haversine"
    (great-circle distance) with columns (latitude, longitude) in degrees. The reported split
    score is the mean over that split's entities, both i and j ranging over the split only.

    Computation, O(n) memory, never an n×n matrix: one target -> sort the predictions and count
    those strictly inside (true_i - r_i, true_i + r_i), O(n log n); several targets -> a k-d tree
    over the predictions, counting for each i the predictions within r_i (1 - 1e-12) of true_i
    (the shrink makes the ball open, so exact ties never count; r_i = 0 counts nothing). The
    great-circle distance is monotone in the chord between unit vectors, so haversine uses a 3-D
    tree on the sphere.
    """
    t, p = _pair(y_true, y_pred)
    n, k = t.shape
    if metric not in ("euclidean", "haversine"):
        raise MetricsError(f"unknown distance {metric!r}; choose 'euclidean' or 'haversine'")
    if metric == "haversine" and k != 2:
        raise MetricsError("haversine proximity needs exactly (latitude, longitude) columns")
    if not (np.isfinite(t).all() and np.isfinite(p).all()):
        raise MetricsError("proximity error needs finite true and predicted values")
    if metric == "euclidean" and k == 1:
        tt, pp = t[:, 0], p[:, 0]
        r = np.abs(tt - pp)
        ps = np.sort(pp)
        # Slightly widened interval, then drop boundary elements that fail the exact test
        # |t_i - p_j| < r_i (t ± r rounds, so the interval alone can misplace a tie).
        pad = 4 * np.finfo(np.float64).eps * (np.abs(tt) + r + 1e-300)
        lo = np.searchsorted(ps, tt - r - pad, side="left")
        hi = np.searchsorted(ps, tt + r + pad, side="right")
        while True:
            m = (lo < hi) & (np.abs(tt - ps[np.minimum(lo, n - 1)]) >= r)
            lo = lo + m
            m2 = (lo < hi) & (np.abs(tt - ps[np.maximum(hi - 1, 0)]) >= r)
            hi = hi - m2
            if not (m.any() or m2.any()):
                break
        return (hi - lo) / n
    from scipy.spatial import cKDTree
    if metric == "haversine":
        t, p = _unit_vectors(t), _unit_vectors(p)
    r = np.sqrt(((t - p) ** 2).sum(1))
    counts = cKDTree(p).query_ball_point(t, r * (1 - 1e-12), return_length=True, workers=-1)
    # the tree's ball is closed: at r_i = 0 it still holds pred_i (and any pred equal to true_i),
    # but nothing is strictly closer than a perfect prediction
    counts = np.where(r > 0, counts, 0)
    return np.asarray(counts, dtype=np.float64) / n


def proximity_error_paper(y_true, y_pred) -> np.ndarray:
    """:func:`proximity_error` as the paper's code ran it, for comparison with its published
    numbers: it passes (longitude, latitude) to a haversine that reads column 0 as the
    latitude, so distances are great-circle distances with the axes swapped (longitude taken
    as latitude). ``y_true``/``y_pred`` are (n, 2) (latitude, longitude) in degrees; the true
    great-circle version is :func:`proximity_error` with ``metric="haversine"``."""
    t, p = _pair(y_true, y_pred)
    if t.shape[1] != 2:
        raise MetricsError("proximity_error_paper needs exactly (latitude, longitude) columns")
    return proximity_error(t[:, ::-1], p[:, ::-1], "haversine")


def latlon_columns(names) -> tuple[int, int] | None:
    """(index of latitude, index of longitude) among target ``names`` (case-insensitive), or
    None unless both are there: place targets are found by name, never by position."""
    names = [str(x).lower() for x in names]
    if "latitude" in names and "longitude" in names:
        return names.index("latitude"), names.index("longitude")
    return None


def evaluate(y_true, y_pred, target_names) -> dict:
    """All metrics of one split, JSON-ready.

    ``r2`` (mean over targets), ``r2_per_target``, ``pearson``/``spearman`` (means over targets)
    with ``*_per_target`` lists, ``mae_per_target`` and ``medae_per_target`` (mean and median
    absolute error; the median is robust to a few rows predicted far off),
    ``proximity_error`` (mean of :func:`proximity_error` over the split; haversine when the
    targets include latitude and longitude, else euclidean over all targets), and with
    latitude/longitude ``proximity_error_paper`` (the paper's code's swapped axes,
    :func:`proximity_error_paper`), ``km_error_median`` and ``km_error_mean``: the
    great-circle distance between true and predicted positions.
    """
    t, p = _pair(y_true, y_pred)
    names = list(target_names)
    if len(names) != t.shape[1]:
        raise MetricsError(f"{len(names)} target names for {t.shape[1]} columns")
    r2t = r2_per_target(t, p)
    pe = pearson_per_target(t, p)
    sp = spearman_per_target(t, p)
    ll = latlon_columns(names)
    out = {
        "n": int(t.shape[0]),
        "r2": float(np.mean(r2t)),
        "r2_per_target": {n: float(v) for n, v in zip(names, r2t)},
        "pearson": float(np.mean(pe)),
        "pearson_per_target": {n: float(v) for n, v in zip(names, pe)},
        "spearman": float(np.mean(sp)),
        "spearman_per_target": {n: float(v) for n, v in zip(names, sp)},
        "mae_per_target": {n: float(v) for n, v in zip(names, np.abs(t - p).mean(0))},
        "medae_per_target": {n: float(v) for n, v in zip(names, np.median(np.abs(t - p), 0))},
    }
    if ll is not None:
        tl, pl = t[:, list(ll)], p[:, list(ll)]
        km = haversine_km(tl[:, 0], tl[:, 1], pl[:, 0], pl[:, 1])
        out["proximity_error"] = float(proximity_error(tl, pl, "haversine").mean())
        out["proximity_error_paper"] = float(proximity_error_paper(tl, pl).mean())
        out["km_error_median"] = float(np.median(km))
        out["km_error_mean"] = float(np.mean(km))
    else:
        out["proximity_error"] = float(proximity_error(t, p, "euclidean").mean())
    return out
