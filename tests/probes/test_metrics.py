"""probes.metrics against brute-force and library references."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import r2_score

from probes import metrics
from probes.metrics import (
    MetricsError,
    evaluate,
    haversine_km,
    proximity_error,
    proximity_error_paper,
)


def brute_haversine(a, b):
    """Textbook atan2 form, one pair at a time."""
    R = 6371.0
    la1, lo1, la2, lo2 = map(np.radians, (a[0], a[1], b[0], b[1]))
    h = np.sin((la2 - la1) / 2) ** 2 + np.cos(la1) * np.cos(la2) * np.sin((lo2 - lo1) / 2) ** 2
    return 2 * R * np.arctan2(np.sqrt(h), np.sqrt(1 - h))


def brute_proximity(true, pred, dist):
    n = len(true)
    out = np.zeros(n)
    for i in range(n):
        own = dist(true[i], pred[i])
        out[i] = sum(dist(true[i], pred[j]) < own for j in range(n)) / n
    return out


def test_r2_pearson_spearman_match_references():
    rng = np.random.default_rng(0)
    t = rng.normal(size=(50, 3))
    p = t + rng.normal(size=(50, 3)) * [0.1, 1, 3]
    p[::7, 2] = p[1, 2]                                         # ties for spearman
    np.testing.assert_allclose(metrics.r2_per_target(t, p),
                               r2_score(t, p, multioutput="raw_values"))
    assert np.isclose(metrics.r2(t, p), r2_score(t, p))
    for j in range(3):
        assert np.isclose(metrics.pearson_per_target(t, p)[j], stats.pearsonr(t[:, j], p[:, j])[0])
        assert np.isclose(metrics.spearman_per_target(t, p)[j],
                          stats.spearmanr(t[:, j], p[:, j])[0])
    assert np.isnan(metrics.pearson_per_target(t[:, 0], np.ones(50))[0])


def test_haversine_known_distances():
    # London - Paris ~ 343.6 km; antipodes = pi R; same point = 0
    assert abs(haversine_km(51.5074, -0.1278, 48.8566, 2.3522) - 343.6) < 1.0
    assert np.isclose(haversine_km(10, 20, -10, -160), np.pi * 6371.0)
    assert haversine_km(33.3, 44.4, 33.3, 44.4) == 0
    rng = np.random.default_rng(1)
    a = np.c_[rng.uniform(-90, 90, 30), rng.uniform(-180, 180, 30)]
    b = np.c_[rng.uniform(-90, 90, 30), rng.uniform(-180, 180, 30)]
    got = haversine_km(a[:, 0], a[:, 1], b[:, 0], b[:, 1])
    np.testing.assert_allclose(got, [brute_haversine(x, y) for x, y in zip(a, b)], rtol=1e-9)


@pytest.mark.parametrize("seed", [1, 7])
def test_proximity_error_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 37
    true = np.c_[rng.uniform(-60, 70, n), rng.uniform(-180, 180, n)]
    pred = true + rng.normal(size=(n, 2)) * 25
    pred[5] = pred[9]                                    # duplicate predictions: ties
    got = proximity_error(true, pred, "haversine")
    np.testing.assert_array_equal(got, brute_proximity(true, pred, brute_haversine))
    got = proximity_error(true, pred, "euclidean")
    np.testing.assert_array_equal(
        got, brute_proximity(true, pred, lambda a, b: np.linalg.norm(a - b)))
    t1, p1 = true[:, 0], pred[:, 0]
    np.testing.assert_array_equal(proximity_error(t1, p1),
                                  brute_proximity(t1, p1, lambda a, b: abs(a - b)))
    # near the date line and the poles the great circle, not the flat map, decides
    t3 = np.array([[0.0, 179.0], [0.0, -179.0], [89.0, 0.0], [89.0, 180.0], [10.0, 10.0]])
    p3 = np.array([[0.0, -178.0], [0.0, 170.0], [89.0, 90.0], [80.0, 180.0], [11.0, 9.0]])
    np.testing.assert_array_equal(proximity_error(t3, p3, "haversine"),
                                  brute_proximity(t3, p3, brute_haversine))


def test_proximity_error_paper_is_the_papers_swapped_haversine():
    # the paper's code: haversine((lon, lat) of a, (lon, lat) of b) with column 0 read as the
    # latitude; a brute-force count with exactly that call is the reference
    rng = np.random.default_rng(3)
    n = 41
    true = np.c_[rng.uniform(-60, 70, n), rng.uniform(-180, 180, n)]
    pred = true + rng.normal(size=(n, 2)) * 30

    def as_run(a, b):
        return brute_haversine(a[::-1], b[::-1])
    got = proximity_error_paper(true, pred)
    np.testing.assert_array_equal(got, brute_proximity(true, pred, as_run))
    assert not np.array_equal(got, proximity_error(true, pred, "haversine"))
    e = evaluate(true, pred, ["latitude", "longitude"])
    assert e["proximity_error_paper"] == pytest.approx(got.mean())
    assert "proximity_error_paper" not in evaluate(true[:, :1], pred[:, :1], ["year"])
    with pytest.raises(MetricsError, match="latitude, longitude"):
        proximity_error_paper(true[:, :1], pred[:, :1])


def test_proximity_error_hand_example():
    # 1-D: true 0, 10, 20; predictions 1, 30, 12.
    # i=0: own |0-1|=1; others |0-30|=30, |0-12|=12 -> 0 closer -> 0
    # i=1: own |10-30|=20; |10-1|=9 and |10-12|=2 are closer -> 2/3
    # i=2: own |20-12|=8; |20-1|=19, |20-30|=10 -> 0
    got = proximity_error([0, 10, 20], [1, 30, 12])
    np.testing.assert_allclose(got, [0, 2 / 3, 0])
    # perfect predictions score 0 everywhere; a strict inequality means ties do not count
    assert proximity_error([1, 2, 3], [1, 2, 3]).tolist() == [0, 0, 0]
    assert proximity_error([0, 0], [5, 5]).tolist() == [0, 0]


def test_proximity_error_perfect_predictions_in_two_dimensions():
    # the k-d tree path (2-D euclidean, haversine): a perfect prediction has nothing strictly
    # closer, not even itself
    rng = np.random.default_rng(3)
    true = np.c_[rng.uniform(-60, 70, 25), rng.uniform(-180, 180, 25)]
    for metric in ("euclidean", "haversine"):
        assert proximity_error(true, true.copy(), metric).tolist() == [0.0] * 25
    # mixed: some perfect, some not; a duplicate true position predicted exactly by another row
    pred = true + rng.normal(size=true.shape) * 20
    pred[::3] = true[::3]
    pred[4] = true[6]
    bh = brute_proximity(true, pred, brute_haversine)
    be = brute_proximity(true, pred, lambda a, b: np.linalg.norm(a - b))
    assert bh[::3].tolist() == [0.0] * 9 and be[::3].tolist() == [0.0] * 9
    np.testing.assert_array_equal(proximity_error(true, pred, "haversine"), bh)
    np.testing.assert_array_equal(proximity_error(true, pred, "euclidean"), be)


def test_proximity_error_memory_is_linear():
    """n = 6000 as an n x n float64 matrix would take 288 MB; the traced peak must stay small."""
    import tracemalloc
    rng = np.random.default_rng(0)
    n = 6000
    for t, p, m in ((rng.normal(size=(n, 2)), rng.normal(size=(n, 2)), "euclidean"),
                    (rng.uniform(-60, 60, (n, 2)), rng.uniform(-60, 60, (n, 2)), "haversine"),
                    (rng.normal(size=n), rng.normal(size=n), "euclidean")):
        tracemalloc.start()
        proximity_error(t, p, m)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 10e6, (m, peak)


def test_evaluate_addresses_lat_lon_by_name():
    rng = np.random.default_rng(3)
    n = 40
    lat, lon = rng.uniform(-50, 60, n), rng.uniform(-170, 170, n)
    plat, plon = lat + rng.normal(size=n) * 5, lon + rng.normal(size=n) * 5
    a = evaluate(np.c_[lat, lon], np.c_[plat, plon], ["latitude", "longitude"])
    b = evaluate(np.c_[lon, lat], np.c_[plon, plat], ["longitude", "latitude"])
    assert a["km_error_median"] == pytest.approx(b["km_error_median"])
    assert a["proximity_error"] == pytest.approx(b["proximity_error"])
    km = [brute_haversine((x, y), (u, v)) for x, y, u, v in zip(lat, lon, plat, plon)]
    assert a["km_error_median"] == pytest.approx(np.median(km))
    assert a["r2_per_target"]["latitude"] == pytest.approx(r2_score(lat, plat))
    assert a["r2"] == pytest.approx((r2_score(lat, plat) + r2_score(lon, plon)) / 2)
    t = evaluate(lat, plat, ["year"])
    assert "km_error_median" not in t
    want = brute_proximity(lat, plat, lambda x, y: abs(x - y)).mean()
    assert t["proximity_error"] == pytest.approx(want)


def test_metric_input_errors():
    with pytest.raises(MetricsError, match="shape"):
        metrics.r2(np.zeros((5, 2)), np.zeros((5, 3)))
    with pytest.raises(MetricsError, match="haversine"):
        proximity_error(np.zeros((5, 3)), np.zeros((5, 3)), "haversine")
    with pytest.raises(MetricsError, match="unknown distance"):
        proximity_error(np.zeros(5), np.zeros(5), "manhattan")
    with pytest.raises(MetricsError, match="names"):
        evaluate(np.zeros((5, 2)), np.zeros((5, 2)), ["latitude"])
