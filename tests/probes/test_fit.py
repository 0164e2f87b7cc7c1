"""probes.fit.fit_all_layers on small stores built through the store API."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import Ridge, RidgeCV

from actstore.store import create_store
from probes.errors import InputError
from probes.fit import FitConfig, FitError, FitResult, fit_all_layers, load_results
from probes.kernels import available_backends
from probes.ridge import kfold_assignment

ALPHAS = np.logspace(-2, 4, 13)
PAPER = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "paper"


def entity_table(n, seed=0, lat=None, lon=None):
    rng = np.random.default_rng(seed)
    lat = rng.uniform(-55, 70, n) if lat is None else lat
    lon = rng.uniform(-170, 175, n) if lon is None else lon
    return pd.DataFrame({
        "name": [f"place {i}" for i in range(n)], "entity": [f"place {i}" for i in range(n)],
        "latitude": lat, "longitude": lon, "is_test": rng.random(n) < 0.25,
        "entity_type": "city", "country": rng.choice(["A", "B", "C", "D", "E"], n)})


def make_store(path, ent, d=16, L=3, seed=0, targets=("latitude", "longitude"), rows=None,
               R=32, dtype="float16", corrupt=None, offset=0.0):
    """Activations: a noisy linear code of the targets, clearer in deeper layers (+ offset)."""
    rng = np.random.default_rng(seed)
    n = len(ent)
    T = ent[list(targets)].to_numpy(dtype=np.float64) if targets else rng.normal(size=(n, 1))
    T = (T - T.mean(0)) / (T.std(0) + 1e-12)
    M = rng.normal(size=(T.shape[1], d))
    X = np.stack([T @ M * (layer + 1) / L + rng.normal(size=(n, d)) + rng.normal(size=d) * 4
                  for layer in range(L)]).astype(np.float32) + np.float32(offset)
    if corrupt is not None:
        X[corrupt] = np.nan
    s = create_store(path, layers=list(range(1, L + 1)), n_rows=n, d_model=d, entities=ent,
                     targets=tuple(targets), group_columns=("country",), meta={"model": "toy"},
                     rows_per_chunk=R, dtype=dtype)
    done = n if rows is None else rows
    if dtype == "bfloat16":                        # stored as its raw 16 bits
        import torch
        xb = torch.from_numpy(X).to(torch.bfloat16)
        Xs, X = xb.view(torch.int16).numpy().view(np.uint16), xb.to(torch.float32).numpy()
    else:
        Xs = X.astype(np.float16 if dtype == "float16" else np.float32)
    for st in range(0, done, R):
        s.write_rows(st, Xs[:, st:st + R])
    s.mark_done(done)
    s.close()
    return X.astype(np.float16).astype(np.float64) if dtype == "float16" else X.astype(np.float64)


def check_vs_sklearn(res, X, Y, is_test, apt):
    """Per layer: alpha, coefficients and test predictions equal RidgeCV on z-scored targets."""
    tr = ~is_test
    mu, sd = Y[tr].mean(0), Y[tr].std(0)
    arr = res.arrays
    for j in range(X.shape[0]):
        ref = RidgeCV(alphas=ALPHAS, alpha_per_target=apt).fit(X[j][tr], (Y[tr] - mu) / sd)
        np.testing.assert_array_equal(arr["alpha"][j], np.broadcast_to(ref.alpha_, (Y.shape[1],)))
        coef = ref.coef_.T * sd
        assert np.abs(arr["coef"][j] - coef).max() <= 1e-5 * np.abs(coef).max()
        pt = ref.predict(X[j][~tr]) * sd + mu
        assert np.abs(arr["predictions"][j][~tr] - pt).max() <= 1e-5 * np.abs(pt).max()


BACKENDS = [b for b in ("torch", "cpu") if b in available_backends()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("apt", [False, True])
def test_loo_primal_matches_sklearn(tmp_path, backend, apt):
    ent = entity_table(150, seed=1)
    X = make_store(tmp_path / "s.zarr", ent, d=16)
    res = fit_all_layers(tmp_path / "s.zarr", alphas=ALPHAS, alpha_per_target=apt, backend=backend)
    assert res.form == "primal" and res.backend == backend
    check_vs_sklearn(res, X, ent[["latitude", "longitude"]].to_numpy(), ent.is_test.to_numpy(), apt)


@pytest.mark.parametrize("cv", ["loo", 3])
def test_bfloat16_store_matches_sklearn(tmp_path, cv):
    ent = entity_table(90, seed=12)
    X = make_store(tmp_path / "s.zarr", ent, d=8, L=2, dtype="bfloat16")
    res = fit_all_layers(tmp_path / "s.zarr", alphas=ALPHAS, cv=cv)
    if cv == "loo":
        check_vs_sklearn(res, X, ent[["latitude", "longitude"]].to_numpy(),
                         ent.is_test.to_numpy(), False)
    else:                                          # predictions of the chosen alpha's full fit
        Y, tr = ent[["latitude", "longitude"]].to_numpy(), ~ent.is_test.to_numpy()
        mu, sd = Y[tr].mean(0), Y[tr].std(0)
        for j in range(2):
            a = res.arrays["alpha"][j][0]
            pt = Ridge(alpha=a).fit(X[j][tr], (Y[tr] - mu) / sd).predict(X[j]) * sd + mu
            assert np.abs(res.arrays["predictions"][j] - pt).max() <= 1e-6 * np.abs(pt).max()


@pytest.mark.parametrize("apt", [False, True])
def test_loo_dual_matches_sklearn_when_d_exceeds_n(tmp_path, apt):
    ent = entity_table(40, seed=2)
    X = make_store(tmp_path / "s.h5", ent, d=64, R=16)
    res = fit_all_layers(tmp_path / "s.h5", alphas=ALPHAS, alpha_per_target=apt)
    assert res.form == "dual"
    check_vs_sklearn(res, X, ent[["latitude", "longitude"]].to_numpy(), ent.is_test.to_numpy(), apt)


@pytest.mark.parametrize("d", [12, 70])
def test_kfold_matches_brute_force(tmp_path, d):
    ent = entity_table(60, seed=3)
    X = make_store(tmp_path / "s.zarr", ent, d=d, L=2, R=16)
    res = fit_all_layers(tmp_path / "s.zarr", alphas=ALPHAS, cv=4, seed=7)
    Y = ent[["latitude", "longitude"]].to_numpy()
    tr = ~ent.is_test.to_numpy()
    fold = kfold_assignment(int(tr.sum()), 4, shuffle=True, seed=7)
    mu, sd = Y[tr].mean(0), Y[tr].std(0)
    for j in range(2):
        Xt, Yt = X[j][tr], Y[tr]
        r2 = np.zeros(len(ALPHAS))
        for a, alpha in enumerate(ALPHAS):
            for f in range(4):
                p = Ridge(alpha=alpha).fit(Xt[fold != f], Yt[fold != f]).predict(Xt[fold == f])
                v = Yt[fold == f]
                r2[a] += np.mean(1 - ((v - p) ** 2).sum(0) / ((v - v.mean(0)) ** 2).sum(0)) / 4
        best = int(np.argmax(r2))
        assert res.arrays["alpha"][j][0] == ALPHAS[best]
        assert res.layers[j]["cv_score"] == pytest.approx(r2[best], rel=1e-8)
        ref = Ridge(alpha=ALPHAS[best]).fit(Xt, (Yt - mu) / sd)
        pt = ref.predict(X[j][~tr]) * sd + mu
        assert np.abs(res.arrays["predictions"][j][~tr] - pt).max() <= 1e-5 * np.abs(pt).max()


def test_layer_batches_and_float32_give_same_fit(tmp_path):
    ent = entity_table(120, seed=4)
    make_store(tmp_path / "s.zarr", ent, d=20, L=4)
    a = fit_all_layers(tmp_path / "s.zarr", alphas=ALPHAS, backend="torch")
    b = fit_all_layers(tmp_path / "s.zarr", alphas=ALPHAS, backend="torch",
                       memory_bytes=1)                   # one layer per batch
    np.testing.assert_array_equal(a.arrays["alpha"], b.arrays["alpha"])
    np.testing.assert_allclose(a.arrays["coef"], b.arrays["coef"], rtol=1e-9, atol=1e-12)
    c = fit_all_layers(tmp_path / "s.zarr", alphas=ALPHAS, precision="float32", layers=[2, 4])
    assert [e["layer"] for e in c.layers] == [2, 4]
    np.testing.assert_allclose(c.arrays["predictions"], a.arrays["predictions"][[1, 3]],
                               rtol=1e-3, atol=1e-3 * np.abs(a.arrays["predictions"]).max())


@pytest.mark.parametrize("cv", ["loo", 3])
def test_float32_predictions_with_large_activation_mean(tmp_path, cv):
    """float32 predictions are computed from centred activations: a mean of 3e4 (small signal
    on top) must not cancel them away."""
    ent = entity_table(120, seed=11)
    make_store(tmp_path / "s.zarr", ent, d=12, L=2, dtype="float32", offset=3e4)
    ref = fit_all_layers(tmp_path / "s.zarr", alphas=ALPHAS, cv=cv)
    got = fit_all_layers(tmp_path / "s.zarr", alphas=ALPHAS, cv=cv, precision="float32")
    np.testing.assert_array_equal(got.arrays["alpha"], ref.arrays["alpha"])
    p, q = got.arrays["predictions"], ref.arrays["predictions"]
    assert np.abs(p - q).max() <= 3e-4 * np.abs(q - q.mean(1, keepdims=True)).max()


def test_results_json_and_plots(tmp_path):
    ent = entity_table(100, seed=5)
    make_store(tmp_path / "s.zarr", ent, d=10, L=3)
    res = fit_all_layers(tmp_path / "s.zarr", alphas="1e-2:1e4:9", out=tmp_path / "out")
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["targets"] == ["latitude", "longitude"]
    assert doc["n_train"] + doc["n_test"] == 100 and doc["n_test"] == int(ent.is_test.sum())
    assert doc["best_layer"] in (1, 2, 3) and doc["backend"] in ("cpu", "torch")
    assert doc["seconds"]["total"] > 0
    for e in doc["layers"]:
        assert set(e) >= {"layer", "alpha", "train", "test"}
        for part in ("train", "test"):
            assert set(e[part]) >= {"r2", "r2_per_target", "pearson", "spearman",
                                    "proximity_error", "km_error_median"}
    best = max(doc["layers"], key=lambda e: e["test"]["r2"])
    assert doc["best_layer"] == best["layer"]
    # deeper layers encode the targets more clearly: R² must rise with depth
    r2 = [e["test"]["r2"] for e in doc["layers"]]
    assert r2[0] < r2[-1] and r2[-1] > 0.5
    for f in ("r2_by_layer.png", "map_best_layer.png", "probes.npz", "predictions_best_layer.csv"):
        assert (tmp_path / "out" / f).stat().st_size > 0
    pred = pd.read_csv(tmp_path / "out" / "predictions_best_layer.csv")
    assert len(pred) == 100 and {"pred_latitude", "pred_longitude", "country"} <= set(pred.columns)
    npz = np.load(tmp_path / "out" / "probes.npz")
    assert npz["coef"].shape == (3, 10, 2)
    assert res.arrays["predictions"].shape == (3, 100, 2)


def test_results_json_records_store_identity(tmp_path):
    """results.json names the store it was fit on by identity, not only by path (so
    `fastprobe neurons --probe` catches a store re-extracted at the same path)."""
    from actstore.store import store_identity
    from probes.fit import write_results

    ent = entity_table(40, seed=6)
    s = create_store(tmp_path / "s.zarr", layers=[1], n_rows=40, d_model=4, entities=ent,
                     targets=("latitude", "longitude"), group_columns=("country",),
                     meta={"model": {"id": "toy-model"}, "prompt": {"name": "coords"},
                           "dataset": {"name": "w", "sha256": "cd" * 32},
                           "created": "2026-11-27T14:00:00Z"}, rows_per_chunk=32)
    s.write_rows(0, np.random.default_rng(0).normal(size=(1, 40, 4)).astype(np.float16))
    s.mark_done(30)
    want = {"created": "2026-11-27T14:00:00Z", "dataset_sha256": "cd" * 32,
            "prompt": "coords", "model_id": "toy-model", "n_rows": 30}
    assert store_identity(s) == want
    res = fit_all_layers(s, alphas="1e-2:1e2:3", backend="torch", device="cpu",
                         out=tmp_path / "out")
    assert res.store_identity == want
    assert json.loads((tmp_path / "out" / "results.json").read_text())["store_identity"] == want
    # a result without it (an older fit) gets it from the store passed to write_results
    old = {k: v for k, v in res.items() if k != "store_identity"}
    write_results(old, tmp_path / "out2", store=s)
    assert json.loads((tmp_path / "out2" / "results.json").read_text())["store_identity"] == want


def test_fit_result_is_results_json_and_a_read_only_mapping(tmp_path):
    """to_json() is results.json byte for byte but for the digest of the arrays the file ends
    with; from_json() reads it back; the mapping view (the pre-0.2 dict) gives the same values,
    "arrays" included, and nothing can be changed."""
    import dataclasses
    import hashlib

    ent = entity_table(60, seed=13)
    make_store(tmp_path / "s.zarr", ent, d=6, L=2)
    res = fit_all_layers(tmp_path / "s.zarr", alphas="1e-1:1e3:5", cv=3, alpha_per_target=True,
                         out=tmp_path / "out")
    text = (tmp_path / "out" / "results.json").read_text()
    digests = {f: hashlib.sha256((tmp_path / "out" / f).read_bytes()).hexdigest()
               for f in ("probes.npz", "predictions_best_layer.csv")}
    assert text == json.dumps({**res.to_json(), "arrays_sha256": digests}, indent=1)
    assert list(res.to_json())[:3] == ["store", "model", "store_identity"]
    back = load_results(tmp_path / "out")
    assert isinstance(back, FitResult) and back.arrays is None and "arrays" not in back
    doc = json.loads(text)
    assert doc.pop("arrays_sha256") == digests and back.to_json() == doc
    assert FitResult.from_json(json.loads(text)).to_json() == back.to_json()
    # the compatibility path: res["..."] as the old dict
    assert list(res) == [*res.to_json(), "arrays"] and len(res) == len(res.to_json()) + 1
    assert res["layers"] is res.layers and res["arrays"] is res.arrays
    assert res["cv"] == res.cv == 3 and res.get("nothing", 7) == 7 and "best_layer" in res
    assert {k: v for k, v in res.items() if k != "arrays"} == res.to_json()
    with pytest.raises(KeyError):
        res["nothing"]
    with pytest.raises(TypeError):
        res["cv"] = 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.cv = 4
    assert res == res and res != back              # identity: arrays have no truth value


def test_config_and_keywords_are_one_api(tmp_path):
    """fit_all_layers(store, FitConfig(...)) == fit_all_layers(store, **same options); keywords
    override a config's fields; the config normalises what it is given."""
    ent = entity_table(70, seed=14)
    make_store(tmp_path / "s.zarr", ent, d=8, L=2)
    cfg = FitConfig(alphas=list(ALPHAS), cv="3", layers=[2], backend="torch")
    assert cfg.alphas == tuple(ALPHAS.tolist()) and cfg.cv == 3 and cfg.layers == (2,)
    assert FitConfig(cv="LOO").cv == "loo" and FitConfig(targets=["a", "b"]).targets == ("a", "b")
    a = fit_all_layers(tmp_path / "s.zarr", cfg)
    b = fit_all_layers(tmp_path / "s.zarr", alphas=ALPHAS, cv=3, layers=[2], backend="torch")
    assert a.to_json()["layers"] == b.to_json()["layers"]
    np.testing.assert_array_equal(a.arrays["coef"], b.arrays["coef"])
    c = fit_all_layers(tmp_path / "s.zarr", cfg, layers=None, cv="loo")
    assert [e["layer"] for e in c.layers] == [1, 2] and c.cv == "loo"
    with pytest.raises(FitError, match="precision must be"):
        FitConfig(precision="float16")
    with pytest.raises(FitError, match="cv must be"):
        FitConfig(cv=1)
    with pytest.raises(ValueError, match="alpha"):
        FitConfig(alphas="0:1:3")
    with pytest.raises(TypeError, match="FitConfig"):
        fit_all_layers(tmp_path / "s.zarr", ["latitude"])
    with pytest.raises(TypeError):
        fit_all_layers(tmp_path / "s.zarr", alpha=1.0)     # a misspelt option


def test_fit_loads_neither_sklearn_nor_matplotlib_until_it_writes():
    import subprocess
    import sys
    code = ("import sys; import probes.fit.run, probes.fit.cli; "
            "print(sorted(m for m in ('sklearn', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_time_target_and_year_plot(tmp_path):
    rng = np.random.default_rng(6)
    n = 80
    ent = pd.DataFrame({"name": [f"p{i}" for i in range(n)], "entity": [f"p{i}" for i in range(n)],
                        "year": rng.uniform(1000, 2000, n).round(), "is_test": rng.random(n) < 0.3,
                        "entity_type": "person", "country": rng.choice(["x", "y"], n)})
    make_store(tmp_path / "t.zarr", ent, d=8, L=2, targets=("year",))
    res = fit_all_layers(tmp_path / "t.zarr", alphas=ALPHAS, split="random:0.25:1",
                         out=tmp_path / "o")
    assert res.targets == ["year"] and res.n_test == 20
    assert "km_error_median" not in res.layers[0]["test"]
    assert (tmp_path / "o" / "year_best_layer.png").exists()


def test_group_split_holds_out_whole_groups(tmp_path):
    ent = entity_table(90, seed=7)
    make_store(tmp_path / "s.zarr", ent, d=6, L=1)
    res = fit_all_layers(tmp_path / "s.zarr", alphas=ALPHAS, split="group:country:0.4:3")
    test = res.arrays["is_test"]
    held = set(ent.country[test])
    assert held and not held & set(ent.country[~test])
    assert len(held) == 2


def test_partial_store_uses_done_rows(tmp_path):
    ent = entity_table(100, seed=8)
    make_store(tmp_path / "s.zarr", ent, d=6, L=1, rows=64)
    res = fit_all_layers(tmp_path / "s.zarr", alphas=ALPHAS)
    assert res.n_rows == 64 and res.n_train + res.n_test == 64


@pytest.mark.slow
def test_real_us_places_store(tmp_path):
    """The paper's us_place.csv (first 600 rows) with activations that encode position."""
    df = pd.read_csv(PAPER / "us_place.csv").head(600)
    ent = pd.DataFrame({"name": df["name"].astype(str), "entity": df["name"].astype(str),
                        "latitude": df.latitude.astype(float),
                        "longitude": df.longitude.astype(float),
                        "is_test": df.is_test.astype(bool),
                        "entity_type": df.entity_type.astype(str),
                        "state_id": df.state_id.astype(str)})
    rng = np.random.default_rng(0)
    n, d = len(ent), 48
    T = np.c_[ent.latitude, ent.longitude, np.sin(np.radians(ent.longitude))]
    T = (T - T.mean(0)) / T.std(0)
    X = np.stack([T @ rng.normal(size=(3, d)) * s + rng.normal(size=(n, d)) for s in (0.1, 1, 3)])
    X = X.astype(np.float16)
    s = create_store(tmp_path / "us.zarr", layers=[2, 4, 6], n_rows=n, d_model=d, entities=ent,
                     targets=("latitude", "longitude"), group_columns=("state_id",), meta={})
    s.write_rows(0, X)
    s.mark_done(n)
    for apt in (False, True):
        res = fit_all_layers(tmp_path / "us.zarr", alphas=ALPHAS, alpha_per_target=apt,
                             out=tmp_path / f"o{apt}")
        check_vs_sklearn(res, X.astype(np.float64), ent[["latitude", "longitude"]].to_numpy(),
                         ent.is_test.to_numpy(), apt)
    assert res.best_layer == 6
    km = [e["test"]["km_error_median"] for e in res.layers]
    assert km[-1] < km[0]


# ----------------------------------------------------------------------------- bad input

def test_bad_inputs(tmp_path):
    ent = entity_table(40, seed=9)
    make_store(tmp_path / "s.zarr", ent, d=6, L=2)
    p = tmp_path / "s.zarr"
    with pytest.raises(InputError, match="unknown target 'altitude'"):
        fit_all_layers(p, targets="altitude", alphas=ALPHAS)
    with pytest.raises(FitError, match="empty test split"):
        fit_all_layers(p, alphas=ALPHAS, split="random:0.001:0")
    with pytest.raises(FitError, match=r"split 'random:0.025:0' gives 1 test row .*at least 2"):
        fit_all_layers(p, alphas=ALPHAS, split="random:0.025:0")
    with pytest.raises(InputError, match="target column 'country' is not numeric"):
        fit_all_layers(p, targets="latitude,country", alphas=ALPHAS)
    with pytest.raises(InputError, match="bad split"):
        fit_all_layers(p, alphas=ALPHAS, split="sometimes")
    with pytest.raises(InputError, match="no column 'planet'"):
        fit_all_layers(p, alphas=ALPHAS, split="group:planet")
    with pytest.raises(FitError, match="cv must be"):
        fit_all_layers(p, alphas=ALPHAS, cv="many")
    with pytest.raises(ValueError, match="alpha"):
        fit_all_layers(p, alphas="1:2")
    # layers are hidden-state indices (the store holds 1 and 2); negatives count from the last
    with pytest.raises(InputError, match=r"layer 0 is not in this store; it holds hidden-state "
                                         r"layers \[1, 2\] \(0 = embeddings"):
        fit_all_layers(p, alphas=ALPHAS, layers=[0, 2])
    with pytest.raises(InputError, match=r"layer -3 is not in this store"):
        fit_all_layers(p, alphas=ALPHAS, layers=[-3])
    with pytest.raises(InputError, match=r"layer\(s\) \[2\] given more than once"):
        fit_all_layers(p, alphas=ALPHAS, layers=[2, -1])
    e, = fit_all_layers(p, alphas=ALPHAS, layers=[-1]).layers
    assert e["layer"] == 2 and e["position"] == 1

    few = entity_table(40, seed=9)
    few["is_test"] = True
    few.loc[:1, "is_test"] = False
    make_store(tmp_path / "few.zarr", few, d=6, L=1)
    with pytest.raises(FitError, match="2 training rows; need at least 3"):
        fit_all_layers(tmp_path / "few.zarr", alphas=ALPHAS)

    const = entity_table(40, seed=9)
    const["latitude"] = 12.5
    make_store(tmp_path / "c.zarr", const, d=6, L=1, targets=("longitude",))
    with pytest.raises(FitError, match=r"\['latitude'\] are constant"):
        fit_all_layers(tmp_path / "c.zarr", targets=["latitude", "longitude"], alphas=ALPHAS)

    make_store(tmp_path / "none.zarr", entity_table(40), d=6, L=1, targets=())
    with pytest.raises(InputError, match="no target columns"):
        fit_all_layers(tmp_path / "none.zarr", alphas=ALPHAS)

    for form_d in (6, 80):                         # primal and dual paths
        make_store(tmp_path / f"nan{form_d}.zarr", entity_table(40), d=form_d, L=2,
                   corrupt=(1, 33, 2))
        with pytest.raises(FitError, match=r"layer 2 .*NaN or inf.*row 33, dim 2"):
            fit_all_layers(tmp_path / f"nan{form_d}.zarr", alphas=ALPHAS)


def test_auto_backend_solves_on_the_gpu_when_present(monkeypatch):
    import torch

    from probes.kernels import BackendUnavailable, backend, resolve
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backend, "resolve_backend", lambda name, dev, order=(): name)
    assert [resolve(b)[1].type for b in (None, "auto", "AUTO", "cuda", "triton", "cpu", "torch")] \
        == ["cuda"] * 5 + ["cpu"] * 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert [resolve(b)[1].type for b in (None, "auto", "cpu", "torch")] == ["cpu"] * 4
    with pytest.raises(BackendUnavailable, match="needs a CUDA GPU and none is available"):
        resolve("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("d", [24, 96])            # primal and dual
def test_gpu_fit_matches_cpu(tmp_path, d):
    import torch
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    ent = entity_table(80, seed=10)
    make_store(tmp_path / "s.h5", ent, d=d, L=2)
    ref = fit_all_layers(tmp_path / "s.h5", alphas=ALPHAS, backend="torch")
    gpu = fit_all_layers(tmp_path / "s.h5", alphas=ALPHAS, backend="torch", device="cuda")
    np.testing.assert_array_equal(gpu.arrays["alpha"], ref.arrays["alpha"])
    np.testing.assert_allclose(gpu.arrays["coef"], ref.arrays["coef"], rtol=1e-7,
                               atol=1e-9 * np.abs(ref.arrays["coef"]).max())
    auto = fit_all_layers(tmp_path / "s.h5", alphas=ALPHAS, backend="auto")   # no device=
    assert auto.backend in ("triton", "cuda")
    np.testing.assert_allclose(auto.arrays["predictions"], ref.arrays["predictions"],
                               rtol=1e-3, atol=1e-3 * np.abs(ref.arrays["predictions"]).max())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("cv", ["loo", 3])
def test_gpu_fit_streams_many_chunks(tmp_path, backend, cv):
    # a zarr store read in many small chunks: reads run ahead on a thread, chunks go through the
    # pinned double buffers (probes.stream) to the GPU kernels; results as the CPU float64 fit
    import torch
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from probes.kernels import available_backends
    if backend not in available_backends():
        pytest.skip(f"{backend} backend not built here")
    ent = entity_table(300, seed=11)
    make_store(tmp_path / "s.zarr", ent, d=40, L=3, R=32)
    ref = fit_all_layers(tmp_path / "s.zarr", alphas=ALPHAS, backend="torch", cv=cv, chunk_rows=37)
    gpu = fit_all_layers(tmp_path / "s.zarr", alphas=ALPHAS, backend=backend, device="cuda",
                         cv=cv, chunk_rows=37)
    np.testing.assert_array_equal(gpu.arrays["alpha"], ref.arrays["alpha"])
    np.testing.assert_allclose(gpu.arrays["predictions"], ref.arrays["predictions"],
                               rtol=1e-3, atol=1e-3 * np.abs(ref.arrays["predictions"]).max())
