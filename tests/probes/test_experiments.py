"""probes.experiments against plain references (sklearn Ridge/RidgeCV, numpy SVD, brute-force
proximity error) on small synthetic stores with planted signals; `fastprobe experiment`; the
registry and the plans it gives `actstore run`."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import Ridge, RidgeCV

from actstore.store import create_store
from probes import experiments as ex
from probes.cli import main
from probes.experiments import ExperimentError
from probes.metrics import haversine_km

ALPHAS = np.logspace(-2, 4, 9)


def places(n, seed=0, countries=("A", "B", "C", "D"), p=None, types=("city",)):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "name": [f"p{i}" for i in range(n)], "entity": [f"p{i}" for i in range(n)],
        "latitude": rng.uniform(-50, 60, n), "longitude": rng.uniform(-150, 150, n),
        "year": rng.uniform(1000, 2000, n), "is_test": rng.random(n) < 0.3,
        "entity_type": rng.choice(list(types), n),
        "country": rng.choice(list(countries), n, p=p)})


def save(path, X, ent, targets=("latitude", "longitude"), meta=None, layers=None):
    L, n, d = X.shape
    s = create_store(path, layers=layers or list(range(1, L + 1)), n_rows=n, d_model=d,
                     entities=ent, targets=tuple(targets), group_columns=("country",),
                     meta=meta or {"model": "toy"}, dtype="float32", rows_per_chunk=64)
    s.write_rows(0, X.astype(np.float32))
    s.mark_done(n)
    s.close()
    return path


def linear_code(ent, d, scales, seed=0, noise=1.0, cols=("latitude", "longitude")):
    """Layer l: targets (standardised) times a random map times scales[l], plus unit noise."""
    rng = np.random.default_rng(seed)
    T = ent[list(cols)].to_numpy(float)
    T = (T - T.mean(0)) / T.std(0)
    M = rng.normal(size=(T.shape[1], d))
    return np.stack([T @ M * s + noise * rng.normal(size=(len(ent), d)) for s in scales])


def z_ridge(X_tr, Y_tr, X_all, alpha=None, alphas=ALPHAS):
    """sklearn reference of the probe: Ridge / RidgeCV on z-scored targets, mapped back."""
    mu, sd = Y_tr.mean(0), Y_tr.std(0)
    m = Ridge(alpha=alpha) if alpha is not None else RidgeCV(alphas=alphas)
    m.fit(X_tr, (Y_tr - mu) / sd)
    return m.predict(X_all).reshape(len(X_all), -1) * sd + mu, m


def brute_prox(Y, P, haversine=True):
    """n x n proximity error: #{j: dist(true_i, pred_j) < dist(true_i, pred_i)} / n."""
    if haversine:
        D = haversine_km(Y[:, None, 0], Y[:, None, 1], P[None, :, 0], P[None, :, 1])
    else:
        D = np.sqrt(((Y[:, None, :] - P[None, :, :]) ** 2).sum(-1))
    return (D < np.diag(D)[:, None]).mean(1)


def test_default_alphas_match_ridge():
    from probes.experiments.common import alpha_grid
    from probes.ridge import DEFAULT_ALPHAS
    assert ex.DEFAULT_ALPHAS == DEFAULT_ALPHAS
    assert alpha_grid(None) == DEFAULT_ALPHAS and alpha_grid([1.0]) == [1.0]
    # the experiment CLI writes the grid out (importing probes.ridge there would load sklearn)
    import argparse

    from probes.experiments.cli import _add_common_arguments
    p = argparse.ArgumentParser()
    _add_common_arguments(p)
    assert p.parse_args([]).alphas == DEFAULT_ALPHAS


# ----------------------------------------------------------------------------- hold-out

@pytest.fixture()
def place_store(tmp_path):
    ent = places(240, seed=3, countries=("A", "B", "C", "D", "E"), p=[.35, .3, .2, .1, .05],
                 types=("city", "structure"))
    X = linear_code(ent, 10, [0.2, 3.0])
    return save(tmp_path / "w.zarr", X, ent), ent, X


def test_holdout_fixed_alpha_matches_sklearn_and_brute_force(place_store):
    path, ent, X = place_store
    Y = ent[["latitude", "longitude"]].to_numpy(float)
    test = ent["is_test"].to_numpy()
    r = ex.holdout_experiment(path, "country", layer=2, alpha=10.0, min_group_size=15,
                              max_groups=3)
    counts = ent["country"].value_counts()
    want = [g for g in counts.index if counts[g] >= 15][:3]
    assert [g["group"] for g in r["groups"]] == want          # largest first, capped
    assert r["layer"] == 2 and r["position"] == 1 and r["alpha_mode"] == "fixed"
    Xl = X[1].astype(np.float32).astype(np.float64)
    P_nom, _ = z_ridge(Xl[~test], Y[~test], Xl, alpha=10.0)
    prox_nom = brute_prox(Y, P_nom)
    for g in r["groups"]:
        m = ent["country"].to_numpy() == g["group"]
        P, _ = z_ridge(Xl[~m], Y[~m], Xl, alpha=10.0)
        assert g["n"] == m.sum() and g["n_nominal"] == (m & test).sum()
        assert g["heldout_proximity_error"] == pytest.approx(brute_prox(Y, P)[m].mean(), abs=1e-12)
        assert g["nominal_proximity_error"] == pytest.approx(prox_nom[m & test].mean(), abs=1e-12)
        km = np.median(haversine_km(Y[m, 0], Y[m, 1], P[m, 0], P[m, 1]))
        assert g["heldout_km_error_median"] == pytest.approx(km, rel=1e-8)
    s = r["summary"]
    assert s["heldout_proximity_error"] == pytest.approx(
        np.mean([g["heldout_proximity_error"] for g in r["groups"]]))
    # a strong linear code generalises: held-out errors stay small
    assert s["heldout_proximity_error"] < 0.1 and s["nominal_proximity_error"] < 0.1


def test_holdout_loo_alpha_and_best_layer(place_store):
    path, ent, X = place_store
    Y = ent[["latitude", "longitude"]].to_numpy(float)
    r = ex.holdout_experiment(path, "country", alphas=ALPHAS, max_groups=2)
    assert r["layer"] == 2 and r["layer_choice"] == "best LOO"       # the planted layer
    Xl = X[1].astype(np.float32).astype(np.float64)
    for g in r["groups"]:
        m = ent["country"].to_numpy() == g["group"]
        _, ref = z_ridge(Xl[~m], Y[~m], Xl)
        assert g["alpha"] == ref.alpha_


def test_holdout_layer_chosen_without_the_held_out_group(tmp_path):
    """layer=None: the held-out probe's layer comes from LOO on the rows outside its group.
    Planted: position 0 encodes the targets of group A only (B rows: pure noise), position 1
    weakly encodes every row. The nominal fit (60% A rows) picks position 0; holding out A
    leaves only B rows, on which position 0 is noise, so A's probe must use position 1."""
    ent = places(240, seed=5, countries=("A", "B"), p=[.6, .4])
    rng = np.random.default_rng(0)
    T = ent[["latitude", "longitude"]].to_numpy(float)
    T = (T - T.mean(0)) / T.std(0)
    M = rng.normal(size=(2, 10))
    inA = (ent["country"] == "A").to_numpy()[:, None]
    X0 = np.where(inA, T @ M * 3, 0) + rng.normal(size=(240, 10))
    X1 = T @ M * 0.3 + rng.normal(size=(240, 10))
    X = np.stack([X0, X1])
    path = save(tmp_path / "h.zarr", X, ent)
    Y = ent[["latitude", "longitude"]].to_numpy(float)
    r = ex.holdout_experiment(path, "country", alphas=ALPHAS, min_group_size=5)
    assert r["layer"] == 1 and r["position"] == 0 and r["layer_choice"] == "best LOO"
    assert "outside its group" in r["layer_selection"]
    got = {g["group"]: g for g in r["groups"]}
    assert got["A"]["heldout_position"] == 1 and got["A"]["heldout_layer"] == 2
    assert got["B"]["heldout_position"] == 0
    for g, e in got.items():
        m = ent["country"].to_numpy() == g
        Xs = X.astype(np.float32).astype(np.float64)
        refs = [z_ridge(Xs[p][~m], Y[~m], Xs[p]) for p in range(2)]
        scores = [ref.best_score_ for _, ref in refs]      # sklearn LOO: -MSE (z units)
        assert e["heldout_position"] == int(np.argmax(scores))
        assert e["heldout_cv_score"] == pytest.approx(max(scores), rel=1e-6)
        P = refs[e["heldout_position"]][0]
        prox = brute_prox(Y, P)
        assert e["heldout_proximity_error"] == pytest.approx(prox[m].mean(), abs=1e-9)
    assert "held-out layer" in ex.format_experiment(r)
    # a given layer: every probe there, and the result says so
    r1 = ex.holdout_experiment(path, "country", layer=1, alphas=ALPHAS, min_group_size=5)
    assert {g["heldout_position"] for g in r1["groups"]} == {0}
    assert r1["layer_selection"].startswith("given")


def test_holdout_time_target_derived_century(tmp_path):
    ent = places(200, seed=5)
    X = linear_code(ent, 6, [2.0], cols=("year",))
    path = save(tmp_path / "t.zarr", X, ent, targets=("year",))
    r = ex.holdout_experiment(path, "century", alpha=1.0, min_group_size=5)
    assert r["group_column"] == "year_century" and "floor(year / 100)" in r["group_source"]
    lab = (np.floor(ent["year"] / 100) * 100).astype(int).astype(str).to_numpy()
    assert sorted(g["group"] for g in r["groups"]) == sorted(set(lab))
    Y = ent[["year"]].to_numpy(float)
    test = ent["is_test"].to_numpy()
    g = r["groups"][0]
    m = lab == g["group"]
    Xl = X[0].astype(np.float32).astype(np.float64)
    P, _ = z_ridge(Xl[~m], Y[~m], Xl, alpha=1.0)
    assert g["heldout_proximity_error"] == pytest.approx(
        brute_prox(Y, P, haversine=False)[m].mean(), abs=1e-12)
    P0, _ = z_ridge(Xl[~test], Y[~test], Xl, alpha=1.0)
    assert g["nominal_proximity_error"] == pytest.approx(
        brute_prox(Y, P0, haversine=False)[m & test].mean(), abs=1e-12)
    assert ex.holdout_experiment(path, "year_decade", alpha=1.0, min_group_size=1,
                                 max_groups=2)["group_column"] == "year_decade"


def test_holdout_errors(place_store, tmp_path):
    path, ent, X = place_store
    with pytest.raises(ExperimentError, match="unknown group column 'province'.*country"):
        ex.holdout_experiment(path, "province")
    with pytest.raises(ExperimentError, match="no group of 'country' has at least 1000 rows"):
        ex.holdout_experiment(path, "country", min_group_size=1000)
    with pytest.raises(ExperimentError, match=r"group\(s\) \['Z'\] not found"):
        ex.holdout_experiment(path, "country", groups=["Z"])
    with pytest.raises(ValueError, match="unknown target 'altitude'"):
        ex.holdout_experiment(path, "country", targets=["altitude"])
    one = save(tmp_path / "one.zarr", X, ent.assign(country="A"))
    with pytest.raises(ExperimentError, match="'country' has only one group"):
        ex.holdout_experiment(one, "country")
    with pytest.raises(ExperimentError, match="'entity_type' has only one group"):
        ex.entity_type_experiment(save(tmp_path / "e.zarr", X, ent.assign(entity_type="city")))


def test_entity_type_experiment(place_store):
    path, ent, _ = place_store
    r = ex.entity_type_experiment(path, layer=-1, alpha=10.0)
    assert r["experiment"] == "entity_type" and r["name"] == "entity_type"
    assert sorted(g["group"] for g in r["groups"]) == ["city", "structure"]
    assert sum(g["n"] for g in r["groups"]) == len(ent)


# ----------------------------------------------------------------------------- PCA

def test_pca_matches_numpy_and_rises(tmp_path):
    rng = np.random.default_rng(7)
    n, d = 300, 16
    ent = places(n, seed=7)
    Zl = rng.normal(size=(n, 3)) * [8.0, 4.0, 2.0]                     # 3 high-variance factors
    X = Zl @ np.linalg.qr(rng.normal(size=(d, 3)))[0].T + 0.3 * rng.normal(size=(n, d))
    ent["latitude"] = Zl @ [0.3, 0.6, 1.2] + rng.normal(size=n) * 0.2
    ent["longitude"] = Zl @ [-0.3, 0.6, -1.2] + rng.normal(size=n) * 0.2
    path = save(tmp_path / "p.zarr", X[None], ent)
    r = ex.pca_experiment(path, ks=(1, 2, 3, 5, 16, 50), alphas=ALPHAS,
                          targets="latitude,longitude")
    assert r["ks"] == [1, 2, 3, 5, 16] and r["skipped_ks"] == [50]
    test = ent["is_test"].to_numpy()
    Y = ent[["latitude", "longitude"]].to_numpy(float)
    Xf = X.astype(np.float32).astype(np.float64)
    mean = Xf[~test].mean(0)
    _, S, Vt = np.linalg.svd(Xf[~test] - mean)
    for row in r["pca"]:
        Z = (Xf - mean) @ Vt[:row["k"]].T
        P, ref = z_ridge(Z[~test], Y[~test], Z)
        yt, pt = Y[test], P[test]
        r2 = np.mean(1 - ((yt - pt) ** 2).sum(0) / ((yt - yt.mean(0)) ** 2).sum(0))
        assert row["test"]["r2"] == pytest.approx(r2, abs=1e-9)
        assert row["alpha"] == ref.alpha_
        assert row["explained_variance"] == pytest.approx(
            (S[:row["k"]] ** 2).sum() / (S ** 2).sum())
    r2s = [row["test"]["r2"] for row in r["pca"]]
    assert r2s[0] < r2s[1] < r2s[2] and r2s[2] > 0.95                 # rises, saturates at 3
    # all d components: the same probe as the full width (ridge is rotation invariant)
    assert r2s[-1] == pytest.approx(r["full"]["test"]["r2"], abs=1e-9)
    with pytest.raises(ExperimentError, match="exceeds"):
        ex.pca_experiment(path, ks=(500,))


# ----------------------------------------------------------------------------- nonlinear

def test_nonlinear_planted_signals(tmp_path):
    rng = np.random.default_rng(11)
    n, d = 360, 6
    ent = places(n, seed=11)
    X = rng.normal(size=(n, d))
    ent["year"] = 3 * X[:, 0] + 0.1 * rng.normal(size=n)               # linear
    ent["latitude"] = 2 * X[:, 1] ** 2 + 0.1 * rng.normal(size=n)      # not linear at all
    path = save(tmp_path / "n.zarr", X[None], ent, targets=("year", "latitude"))
    kw = dict(hidden=64, weight_decays=(0.01, 0.1), max_epochs=60, patience=5, batch_size=64,
              lr=1e-2, alphas=ALPHAS)
    lin = ex.nonlinear_experiment(path, targets=["year"], **kw)
    assert lin["linear"]["test"]["r2"] > 0.99 and lin["mlp"]["test"]["r2"] > 0.9
    quad = ex.nonlinear_experiment(path, targets=["latitude"], seed=1, **kw)
    assert quad["linear"]["test"]["r2"] < 0.1 < 0.6 < quad["mlp"]["test"]["r2"]
    assert quad["mlp"]["test"]["proximity_error"] < quad["linear"]["test"]["proximity_error"]
    assert quad["mlp"]["n_fit"] + quad["mlp"]["n_val"] == quad["n_train"]
    for run in quad["mlp"]["runs"]:
        assert run["epochs"] <= 60 and min(run["val_curve"]) == run["best_val_mse"]
    chosen = min(quad["mlp"]["runs"], key=lambda r: r["best_val_mse"])["weight_decay"]
    assert quad["mlp"]["weight_decay"] == chosen
    again = ex.nonlinear_experiment(path, targets=["latitude"], seed=1, **kw)
    assert again["mlp"]["test"] == quad["mlp"]["test"]                 # deterministic
    # the linear side is the fit's probe: equal to sklearn RidgeCV on z-scored targets
    test = ent["is_test"].to_numpy()
    Y = ent[["latitude"]].to_numpy(float)
    _, ref = z_ridge(X[~test], Y[~test], X)
    assert quad["linear"]["alpha"] == ref.alpha_


def test_nonlinear_divergence_is_recorded_not_a_crash(tmp_path):
    """An absurd learning rate makes every validation loss NaN/inf: that weight decay is
    recorded as diverged and skipped; when every one diverges, a clear ExperimentError."""
    rng = np.random.default_rng(4)
    n, d = 120, 4
    ent = places(n, seed=4)
    X = rng.normal(size=(n, d))
    ent["year"] = 3 * X[:, 0] + 0.1 * rng.normal(size=n)
    path = save(tmp_path / "d.zarr", X[None], ent, targets=("year",))
    kw = dict(hidden=8, max_epochs=4, patience=2, batch_size=32, alphas=ALPHAS)
    with pytest.raises(ExperimentError, match="diverged .* every weight decay"):
        ex.nonlinear_experiment(path, weight_decays=(0.01, 0.1), lr=1e30, **kw)
    # a weight decay of 1e30 makes AdamW's decoupled decay blow the weights up: only it diverges
    r = ex.nonlinear_experiment(path, weight_decays=(0.01, 1e30), lr=1e-2, **kw)
    runs = {run["weight_decay"]: run for run in r["mlp"]["runs"]}
    assert runs[1e30]["diverged"] is True and runs[1e30]["best_val_mse"] is None
    assert runs[0.01]["diverged"] is False and runs[0.01]["best_val_mse"] > 0
    assert r["mlp"]["weight_decay"] == 0.01 and r["mlp"]["test"]["r2"] > 0
    assert "1e+30: diverged" in ex.format_experiment(r)
    out = ex.write_experiment(r, tmp_path / "o")
    doc = json.loads(out[0].read_text(), parse_constant=_bare)     # strict JSON
    assert doc["mlp"]["runs"][1]["diverged"] is True
    assert all(v.startswith(("NaN: ", "Infinity: ", "-Infinity: "))
               for v in doc.get("nulls", {}).values())


def _bare(text):
    raise ValueError(f"bare {text} in an experiment's JSON")


# ----------------------------------------------------------------------------- prompts

META = {"dataset": {"name": "toy", "sha256": "ab" * 32}, "model": {"id": "toy"}}


def prompt_stores(tmp_path, n=160, d=8):
    ent = places(n, seed=2)
    A = linear_code(ent, d, [0.1, 3.0, 1.0], seed=1)
    B = linear_code(ent, d, [0.1, 0.5, 2.0], seed=2)
    paths = {}
    for name, X in (("empty", A), ("coords", B), ("copy", A)):
        paths[name] = save(tmp_path / f"{name}.zarr", X, ent,
                           meta={**META, "prompt": {"name": name}})
    return paths, ent, {"empty": A, "coords": B, "copy": A}


def test_prompt_experiment_matches_sklearn(tmp_path):
    paths, ent, Xs = prompt_stores(tmp_path)
    r = ex.prompt_experiment(list(paths.values()), alphas=ALPHAS)
    assert r["prompts"] == ["empty", "coords", "copy"]                 # labels from the metadata
    Y = ent[["latitude", "longitude"]].to_numpy(float)
    test = ent["is_test"].to_numpy()
    X32 = {k: v.astype(np.float32).astype(np.float64) for k, v in Xs.items()}
    best = {}
    for name in r["prompts"]:
        scores = [z_ridge(X32[name][p][~test], Y[~test], X32[name][p])[1].best_score_
                  for p in range(3)]
        assert r["per_prompt"][name]["best_position"] == int(np.argmax(scores))
        best[name] = int(np.argmax(scores))
    assert best == {"empty": 1, "coords": 2, "copy": 1}
    for a, na in enumerate(r["prompts"]):
        pos = best[na]
        _, ref = z_ridge(X32[na][pos][~test], Y[~test], X32[na][pos])
        mu, sd = Y[~test].mean(0), Y[~test].std(0)
        for b, nb in enumerate(r["prompts"]):
            P = ref.predict(X32[nb][pos][test]).reshape(int(test.sum()), -1) * sd + mu
            yt = Y[test]
            r2 = np.mean(1 - ((yt - P) ** 2).sum(0) / ((yt - yt.mean(0)) ** 2).sum(0))
            assert r["transfer"]["r2"][a][b] == pytest.approx(r2, abs=1e-6)
        assert r["transfer"]["r2"][a][a] == pytest.approx(
            r["per_prompt"][na]["layers"][pos]["test"]["r2"], abs=1e-9)
    i, j = r["prompts"].index("empty"), r["prompts"].index("copy")
    assert r["transfer"]["r2"][i][j] == pytest.approx(r["transfer"]["r2"][i][i], abs=1e-12)
    assert r["transfer"]["r2"][i][i] > 0.9


def test_prompt_experiment_disagreeing_stores(tmp_path):
    paths, ent, Xs = prompt_stores(tmp_path, n=60, d=4)
    A = Xs["empty"]

    def bad(name, **kw):
        e = kw.pop("ent", ent)
        return save(tmp_path / f"{name}.zarr", kw.pop("X", A), e, meta=kw.pop("meta", META), **kw)

    cases = [
        (bad("sha", meta={**META, "dataset": {"name": "other", "sha256": "cd" * 32}}),
         "different datasets"),
        (bad("rows", X=A[:, :50], ent=ent.iloc[:50].reset_index(drop=True)),
         "differ in completed rows: .* has 60, .* has 50"),
        (bad("order", X=A[:, ::-1], ent=ent.iloc[::-1].reset_index(drop=True)),
         "different entities or orders: row 0 is 'p0'"),
        (bad("layers", layers=[2, 3, 4]), r"different layer sets.*\[1, 2, 3\].*\[2, 3, 4\]"),
        (bad("target", targets=("year",), ent=ent.drop(columns=["latitude"])),
         "unknown target 'latitude'"),
        (bad("model", meta={**META, "model": {"id": "other"}}), "different models"),
    ]
    for p, msg in cases:
        with pytest.raises(ExperimentError, match=msg):
            ex.prompt_experiment([paths["empty"], p], alphas=ALPHAS)
    with pytest.raises(ExperimentError, match="at least 2 stores"):
        ex.prompt_experiment([paths["empty"]])


# ----------------------------------------------------------------------------- CLI and files

def test_cli_experiments_end_to_end(tmp_path, place_store, capsys):
    path, ent, _ = place_store
    (tmp_path / "pr").mkdir()
    paths, _, _ = prompt_stores(tmp_path / "pr", n=60, d=4)
    out = tmp_path / "exp"
    a = ["--alphas", "0.1,1,10,100", "--out", str(out)]
    runs = [
        (["prompts", str(paths["empty"]), str(paths["coords"]), "--names", "e,c"], "prompts"),
        (["holdout", str(path), "--group", "country", "--max-groups", "2"], "holdout_country"),
        (["entity-type", str(path), "--layer", "1"], "entity_type"),
        (["nonlinear", str(path), "--hidden", "16", "--max-epochs", "5",
          "--weight-decays", "0.1"], "nonlinear"),
        (["pca", str(path), "--ks", "2,5"], "pca"),
    ]
    for argv, name in runs:
        assert main(["experiment"] + argv + a) == 0, argv
        text = capsys.readouterr().out
        doc = json.loads((out / f"{name}.json").read_text(), parse_constant=_bare)
        assert doc["name"] == name and (out / f"{name}.png").stat().st_size > 1000
        assert f"{name}.json" in text
    assert json.loads((out / "prompts.json").read_text())["prompts"] == ["e", "c"]
    assert "held-out" in ex.format_experiment(
        json.loads((out / "holdout_country.json").read_text()))
    rc = main(["experiment", "holdout", str(path), "--group", "nope"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown group column 'nope'" in err and "Traceback" not in err
    assert main(["experiment", "prompts", str(paths["empty"]), str(paths["coords"]),
                 "--names", "x"]) == 2
    assert "--names gives 1 names for 2 stores" in capsys.readouterr().err


def test_cli_help_has_examples_for_every_experiment(capsys):
    from probes.cli import build_parser
    parser = build_parser()
    for kind in ("prompts", "holdout", "entity-type", "nonlinear", "pca"):
        with pytest.raises(SystemExit):
            parser.parse_args(["experiment", kind, "--help"])
        text = capsys.readouterr().out
        assert "example" in text and f"fastprobe experiment {kind}" in text, kind
    with pytest.raises(SystemExit):
        parser.parse_args(["experiment", "--help"])
    text = capsys.readouterr().out
    assert all(f"fastprobe experiment {k}" in text
               for k in ("prompts", "holdout", "entity-type", "nonlinear", "pca"))


def test_prompt_labels_disambiguated(tmp_path):
    paths, ent, Xs = prompt_stores(tmp_path, n=40, d=4)
    twin = save(tmp_path / "twin.zarr", Xs["empty"], ent,
                meta={**META, "prompt": {"name": "empty"}})
    r = ex.prompt_experiment([paths["empty"], twin], alphas=ALPHAS)
    assert r["prompts"] == ["empty", "empty (twin)"]
    assert r["transfer"]["r2"][0][1] == pytest.approx(r["transfer"]["r2"][0][0], abs=1e-12)


# ----------------------------------------------------------------------------- registry

def test_registry_is_what_the_cli_and_actstore_run_name(tmp_path):
    from probes.experiments.base import Experiment
    from probes.pipeline.config import EXPERIMENTS as RUN_EXPERIMENTS
    assert tuple(ex.EXPERIMENTS) == RUN_EXPERIMENTS
    assert {k: e.kind for k, e in ex.EXPERIMENTS.items()} == {
        "prompts": "prompts", "holdout": "holdout", "entity-type": "entity_type",
        "nonlinear": "nonlinear", "pca": "pca"}
    assert ex.EXPERIMENT_TITLES == {k: e.title for k, e in ex.EXPERIMENTS.items()}
    assert all(isinstance(e, Experiment) and e.key == k for k, e in ex.EXPERIMENTS.items())
    assert ex.EXPERIMENTS["pca"].compute is ex.pca_experiment
    with pytest.raises(ExperimentError, match="unknown experiment kind 'nope'"):
        ex.format_experiment({"experiment": "nope"})
    with pytest.raises(ExperimentError, match="unknown experiment kind 'nope'"):
        ex.write_experiment({"experiment": "nope", "name": "x"}, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    assert ex.experiment_markdown("nope", {}) == []


def test_package_imports_without_torch_sklearn_or_matplotlib():
    """`fastprobe --help` builds its parser from the experiment modules."""
    import subprocess
    import sys
    code = ("import sys; import probes.experiments.cli, probes.experiments.registry; "
            "print(sorted(m for m in ('torch', 'sklearn', 'zarr', 'matplotlib') "
            "if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def run_context(store, prompts=("empty",), skipped=(), all_experiments=True):
    from probes.experiments.base import RunContext
    return RunContext(store=store, prompt_stores={p: store for p in prompts},
                      skipped_prompts=tuple(skipped), dataset_kind="world_place", layer=3,
                      backend="cpu", device=None, all_experiments=all_experiments)


def test_actstore_run_plans():
    """What each experiment tells `actstore run` to record and run, or why it cannot run."""
    from types import SimpleNamespace

    from probes.experiments.holdout import HOLDOUT_MAX_GROUPS, HOLDOUT_MIN_GROUP, holdout_column
    ent = places(30, types=("city", "structure"))
    store = SimpleNamespace(meta={"dataset": {"kind": "world_place"}}, entities=ent,
                            rows_done=30)
    plan = {k: e.plan for k, e in ex.EXPERIMENTS.items()}
    assert plan["prompts"](run_context(store)) is None          # default list, one prompt
    one = plan["prompts"](run_context(store, all_experiments=False))
    assert one.run is None and one.note.startswith("one prompt only; add variants")
    skipped = plan["prompts"](run_context(store, skipped=("coords",)))
    assert skipped.note == "one prompt only (coords do not apply to world_place)"
    two = plan["prompts"](run_context(store, prompts=("empty", "coords")))
    assert two.options == {} and two.run.keywords == {"backend": "cpu"}
    assert holdout_column(store) == ("country", "")
    h = plan["holdout"](run_context(store))
    assert h.options == {"layer": 3, "group_column": "country",
                         "max_groups": HOLDOUT_MAX_GROUPS, "min_group_size": HOLDOUT_MIN_GROUP}
    assert h.run.args == (store, "country")
    assert plan["entity-type"](run_context(store)).options == {"layer": 3, "min_group_size": 10}
    assert plan["nonlinear"](run_context(store)).run.keywords == {"layer": 3, "backend": "cpu",
                                                                  "device": None}
    assert plan["pca"](run_context(store)).options == {"layer": 3}
    store.entities = ent.drop(columns=["country"]).assign(entity_type="city")
    h = plan["holdout"](run_context(store))
    assert h.run is None and h.options == {"layer": 3} and "no natural group column" in h.note
    e = plan["entity-type"](run_context(store))
    assert e.run is None and e.note == "one entity type (city)"
