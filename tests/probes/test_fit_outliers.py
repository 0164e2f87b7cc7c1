"""probes.fit.outliers: rows with outlying norms flagged, predictions outside the valid range,
and ``--row-norm unit|clip`` (exact against scikit-learn on the rescaled rows), on a tiny store
with one planted massive activation (docs/paper-run.md, "Negative R² on US places")."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import Ridge, RidgeCV

from actstore.store import create_store
from probes.cli import main as fastprobe
from probes.errors import FitError
from probes.fit import FitConfig, fit_all_layers, load_results
from probes.fit.classify import fit_classifier
from probes.fit.outliers import (
    MAD_K,
    check_backend,
    robust_threshold,
    summary_line,
    valid_ranges,
)
from probes.kernels import available_backends
from probes.metrics import evaluate

ALPHAS = np.logspace(-2, 4, 13)
PLANTED, MASSIVE_DIM = 7, 3       # the test row given a massive activation in layer 2
BACKENDS = [b for b in ("cpu", "torch") if b in available_backends()]


def planted_store(path, n=160, d=16, seed=0, massive=400.0):
    """US-like places; layer 1 clean, layer 2 the same code plus one massive activation on
    row PLANTED (a test row), dim MASSIVE_DIM. Activations have a large mean, as a residual
    stream does. Returns the stored activations (L, n, d) float64 and the entity table."""
    rng = np.random.default_rng(seed)
    lat, lon = rng.uniform(26, 48, n), rng.uniform(-123, -70, n)
    is_test = rng.random(n) < 0.25
    is_test[PLANTED] = True
    ent = pd.DataFrame({"name": [f"place {i}" for i in range(n)],
                        "entity": [f"place {i}" for i in range(n)], "latitude": lat,
                        "longitude": lon, "is_test": is_test, "country": "US"})
    T = np.stack([(lat - lat.mean()) / lat.std(), (lon - lon.mean()) / lon.std()], 1)
    base = T @ rng.normal(size=(2, d)) + 0.5 * rng.normal(size=(n, d)) + 6 * rng.normal(size=d)
    X = np.stack([base, base]).astype(np.float32)
    X[1, PLANTED, MASSIVE_DIM] += massive
    s = create_store(path, layers=[1, 2], n_rows=n, d_model=d, entities=ent,
                     targets=("latitude", "longitude"), group_columns=("country",),
                     meta={"model": "toy"}, rows_per_chunk=32)
    Xs = X.astype(np.float16)
    for st in range(0, n, 32):
        s.write_rows(st, Xs[:, st:st + 32])
    s.mark_done(n)
    s.close()
    return Xs.astype(np.float64), ent


def rescaled(X, train, mode):
    """The rows as --row-norm reads them, in float64 (the reference)."""
    norms = np.linalg.norm(X, axis=-1)
    if mode == "unit":
        return X / norms[..., None]
    thr = robust_threshold(norms[:, train])[2]
    return X * np.minimum(1.0, thr[:, None] / norms)[..., None]


@pytest.fixture
def planted(tmp_path):
    X, ent = planted_store(tmp_path / "s.zarr")
    return tmp_path / "s.zarr", X, ent


def test_planted_row_is_flagged_and_predicted_out_of_range(planted):
    path, X, ent = planted
    res = fit_all_layers(path, alphas=ALPHAS)
    one, two = res.layers
    # layer 2 is layer 1 plus the planted row (a test row: the threshold is the same)
    clean = one["row_norms"]["outliers"]
    assert PLANTED not in clean and one["out_of_range"]["n"] == 0
    assert two["row_norms"]["threshold"] == one["row_norms"]["threshold"]
    assert two["row_norms"]["outliers"] == [PLANTED] + clean
    norm = np.linalg.norm(X[1, PLANTED])
    assert two["row_norms"]["outlier_norms"][0] == pytest.approx(norm)
    assert two["row_norms"]["threshold"] < norm / 10
    # the one row drags test R² of layer 2 below zero, far below the clean layer 1
    assert one["test"]["r2"] > 0.5 and two["test"]["r2"] < 0
    assert PLANTED in two["out_of_range"]["rows"] and two["out_of_range"]["n_test"] >= 1
    assert res.row_norm == "none"
    flagged = res.norm_outliers["rows"]
    assert res.norm_outliers["k"] == MAD_K and res.norm_outliers["n_rows"] == len(clean) + 1
    assert flagged[0]["row"] == PLANTED and flagged[0]["name"] == f"place {PLANTED}"
    assert flagged[0]["split"] == "test" and flagged[0]["layers"] == [2]
    assert flagged[0]["max_ratio"] > 10
    assert res.valid_ranges == {"latitude": [-90, 90], "longitude": [-180, 180]}
    line = summary_line(res)
    assert f"place {PLANTED}" in line and "outside the valid range" in line


@pytest.mark.parametrize("backend", BACKENDS)
def test_none_is_the_paper_fit(planted, backend):
    """The default reads the stored rows as they are: RidgeCV on the raw activations, and the
    same arrays as a fit that names row_norm="none"."""
    path, X, ent = planted
    res = fit_all_layers(path, alphas=ALPHAS, backend=backend)
    again = fit_all_layers(path, alphas=ALPHAS, backend=backend, row_norm="none")
    for k in ("coef", "predictions", "alpha"):
        np.testing.assert_array_equal(res.arrays[k], again.arrays[k])
    _check_ridge(res, X, ent)


@pytest.mark.parametrize("mode", ["unit", "clip"])
@pytest.mark.parametrize("backend,precision", [(b, "float64") for b in BACKENDS]
                         + [("cpu", "float32")] * ("cpu" in BACKENDS))
def test_row_norm_is_ridge_on_the_rescaled_rows(planted, mode, backend, precision):
    path, X, ent = planted
    res = fit_all_layers(path, alphas=ALPHAS, backend=backend, precision=precision,
                         row_norm=mode)
    assert res.row_norm == mode
    Xr = rescaled(X, ~ent.is_test.to_numpy(), mode)
    _check_ridge(res, Xr, ent, tol=1e-9 if precision == "float64" else 1e-4)
    # the remedy: layer 2 scores like the clean layer 1, and the row is still flagged
    one, two = res.layers
    assert two["test"]["r2"] > 0.5 and abs(two["test"]["r2"] - one["test"]["r2"]) < 0.1
    assert two["out_of_range"]["n"] == 0 and two["row_norms"]["outliers"][0] == PLANTED


@pytest.mark.parametrize("mode", ["unit", "clip"])
@pytest.mark.parametrize("cv", ["loo", 3])
def test_row_norm_dual_and_kfold(tmp_path, mode, cv):
    """n < d: the dual form rescales the rows it reads; k-fold predicts the rescaled rows."""
    X, ent = planted_store(tmp_path / "s.zarr", n=48, d=64)
    res = fit_all_layers(tmp_path / "s.zarr", alphas=ALPHAS, row_norm=mode, cv=cv)
    assert res.form == "dual" and res.layers[1]["row_norms"]["outliers"][0] == PLANTED
    Xr = rescaled(X, ~ent.is_test.to_numpy(), mode)
    Y, tr = ent[["latitude", "longitude"]].to_numpy(), ~ent.is_test.to_numpy()
    mu, sd = Y[tr].mean(0), Y[tr].std(0)
    for j in range(2):
        a = res.arrays["alpha"][j][0]
        pt = Ridge(alpha=a).fit(Xr[j][tr], (Y[tr] - mu) / sd).predict(Xr[j]) * sd + mu
        np.testing.assert_allclose(res.arrays["predictions"][j], pt, rtol=1e-8, atol=1e-6)


def _check_ridge(res, X, ent, tol=1e-9):
    """alpha, coefficients and predictions equal RidgeCV's on z-scored targets."""
    Y, tr = ent[["latitude", "longitude"]].to_numpy(), ~ent.is_test.to_numpy()
    mu, sd = Y[tr].mean(0), Y[tr].std(0)
    for j in range(X.shape[0]):
        ref = RidgeCV(alphas=ALPHAS).fit(X[j][tr], (Y[tr] - mu) / sd)
        assert res.arrays["alpha"][j][0] == ref.alpha_
        coef = ref.coef_.T * sd
        assert np.abs(res.arrays["coef"][j] - coef).max() <= tol * 10 * np.abs(coef).max() + tol
        pt = ref.predict(X[j]) * sd + mu
        np.testing.assert_allclose(res.arrays["predictions"][j], pt, rtol=tol, atol=tol * 100)


def test_row_norm_backends_and_config():
    assert check_backend("none", "triton", "triton") == "triton"
    assert check_backend("unit", "auto", "triton") == "torch"    # auto on a GPU: float64 torch
    assert check_backend("clip", "cpu", "cpu") == "cpu"
    with pytest.raises(FitError, match="--backend torch"):
        check_backend("unit", "cuda", "cuda")
    with pytest.raises(FitError, match="row_norm must be one of none, unit, clip"):
        FitConfig(row_norm="rms")


def test_classification_refuses_row_norm(planted):
    path, _, _ = planted
    from actstore.store import open_store
    config = FitConfig(task="classify", targets=("country",), row_norm="unit")
    with open_store(path) as store, pytest.raises(FitError, match="applies to ridge probes"):
        fit_classifier(store, config, "country")


def test_cli_records_row_norm_and_prints_flags(planted, tmp_path, capsys):
    path, _, _ = planted
    out = tmp_path / "out"
    assert fastprobe(["fit", str(path), "--all-layers", "--row-norm", "clip", "--out", str(out),
                      "-q"]) == 0
    text = capsys.readouterr().out
    assert "hi-norm" in text and "rows fitted with --row-norm clip" in text
    doc = json.loads((out / "results.json").read_text())
    assert doc["row_norm"] == "clip" and doc["norm_outliers"]["rows"][0]["row"] == PLANTED
    assert "medae_per_target" in doc["layers"][0]["test"]
    assert load_results(out).row_norm == "clip"


def test_robust_threshold_and_valid_ranges():
    med, mad, thr = robust_threshold(np.array([[1.0, 2.0, 3.0, 4.0, 100.0]]))
    assert med[0] == 3.0 and mad[0] == 1.0 and thr[0] == pytest.approx(3 + MAD_K * 1.4826)
    Y = np.array([[40.0, -100.0, 1900.0], [30.0, -80.0, 2000.0], [35.0, -90.0, 1950.0]])
    got = valid_ranges(["Latitude", "longitude", "year"], Y, np.array([True, True, False]))
    assert got == {"Latitude": [-90.0, 90.0], "longitude": [-180.0, 180.0],
                   "year": [1800.0, 2100.0]}     # the training range widened by its width


def test_median_absolute_error_beside_r2():
    """One prediction far off moves R² and the mean error, not the median error."""
    t = np.arange(10.0)
    p = t + 0.5
    p[0] = 1000.0
    m = evaluate(t, p, ["year"])
    assert m["medae_per_target"]["year"] == 0.5 and m["r2"] < 0
    assert m["mae_per_target"]["year"] > 90


def test_table_prints_median_error_for_other_targets(planted):
    """Not a place (one coordinate): the table shows its median absolute error beside R²."""
    from probes.report import format_table
    path, _, _ = planted
    res = fit_all_layers(path, alphas=ALPHAS, targets="latitude")
    text = format_table(res)
    assert "medAE latitude" in text and "km med" not in text
    assert res.valid_ranges == {"latitude": [-90.0, 90.0]}
