"""``fastprobe fit`` on a class target (issue 15): the three probes of every layer of a store
equal scikit-learn fitted on the same rows (the C and shrinkage chosen, the test predictions),
the files are written as a set, and the command line and ``fastprobe show`` print the table."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from actstore.store import create_store, open_store
from probes.errors import ProbesError
from probes.fit.classify import classify_target, fit_classifier
from probes.fit.config import FitConfig

N, D, LAYERS = 150, 9, [0, 4, 8]
CS = "1e-2:1e2:5"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _store(path, n_classes=3, seed=0):
    """Layer 0 carries no class signal, layer 4 some, layer 8 a strong one; every 5th row is a
    test row; an unbalanced class column `country`, a boolean `coastal`."""
    rng = np.random.default_rng(seed)
    codes = rng.choice(n_classes, size=N, p=np.linspace(2, 1, n_classes) / np.linspace(
        2, 1, n_classes).sum())
    names = np.array([f"C{k}" for k in range(n_classes)])[codes]
    ent = pd.DataFrame({"name": [f"e{i}" for i in range(N)], "entity": [f"e{i}" for i in range(N)],
                        "latitude": rng.uniform(-60, 60, N), "longitude": rng.uniform(-100, 100, N),
                        "is_test": np.arange(N) % 5 == 0, "country": names,
                        "coastal": codes == 0})
    st = create_store(path, layers=LAYERS, n_rows=N, d_model=D, entities=ent,
                      targets=("latitude", "longitude"), group_columns=("country",),
                      meta={"model": {"id": "synthetic"}}, rows_per_chunk=32)
    means = rng.normal(size=(n_classes, D))
    x = np.stack([s * means[codes] + rng.normal(size=(N, D)) for s in (0.0, 0.6, 2.0)])
    st.write_rows(0, x.astype(np.float16))
    st.mark_done(N)
    st.close()
    return open_store(path), codes


@pytest.mark.filterwarnings("ignore::FutureWarning")     # LogisticRegressionCV's 1.10 changes
def test_probes_equal_scikit_learn_on_every_layer(tmp_path):
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    store, codes = _store(tmp_path / "s.zarr")
    cfg = FitConfig(targets="country", cv=3, cs=CS)
    res = fit_classifier(store, cfg, "country", out=tmp_path / "fit")
    doc = res.doc
    assert doc["task"] == "classify" and doc["classes"] == ["C0", "C1", "C2"]
    test = store.is_test.astype(bool)
    train = ~test
    cs = np.logspace(-2, 2, 5)
    for j, layer in enumerate(LAYERS):
        x = store.layer(layer).astype(np.float64)
        ref = LogisticRegressionCV(Cs=cs, cv=StratifiedKFold(3), scoring="accuracy", tol=1e-10,
                                   max_iter=10000)
        ref.fit(x[train], codes[train])
        e = doc["layers"][j]
        assert e["layer"] == layer and e["logistic"]["C"] == pytest.approx(ref.C_[0])
        lr = LogisticRegression(C=ref.C_[0], tol=1e-10, max_iter=10000).fit(x[train],
                                                                          codes[train])
        np.testing.assert_array_equal(res.arrays["logistic_predicted"][j, test],
                                      lr.predict(x[test]))
        assert e["logistic"]["test"]["accuracy"] == pytest.approx(lr.score(x[test], codes[test]))
        lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=e["lda"]["shrinkage"])
        lda.fit(x[train], codes[train])
        np.testing.assert_array_equal(res.arrays["lda_predicted"][j, test], lda.predict(x[test]))
    assert doc["best_layer"] == 8
    assert doc["layers"][0]["logistic"]["test"]["accuracy"] < 0.7 < \
        doc["layers"][2]["logistic"]["test"]["accuracy"]


def test_files_are_a_checked_set(tmp_path):
    from probes.report import sha256_of

    store, _ = _store(tmp_path / "s.zarr")
    fit_classifier(store, FitConfig(targets="country", cv=3, cs=CS), "country",
                   out=tmp_path / "fit")
    out = tmp_path / "fit"
    doc = json.loads((out / "results.json").read_text())       # strict JSON (no NaN)
    assert doc["arrays_sha256"]["classify.npz"] == sha256_of(out / "classify.npz")
    for png in ("accuracy_by_layer.png", "confusion_best_layer.png"):
        assert (out / png).stat().st_size > 1000
    cm = np.asarray(doc["confusion_matrix"]["matrix"])
    assert cm.shape == (3, 3) and cm.sum() == doc["n_test"]
    with np.load(out / "classify.npz") as z:
        assert z["logistic_coef"].shape == (3, 3, D) and z["is_test"].sum() == doc["n_test"]


@pytest.mark.parametrize("target", ["country", "coastal"])
def test_layers_streamed_in_chunks_fit_the_same(tmp_path, target):
    """A memory budget below one layer's working set fits one layer at a time (the rows of the
    next read only after the last is freed): the same results, arrays and control as all
    layers at once."""
    from probes.fit import classify as fc

    store, _ = _store(tmp_path / "s.zarr")
    cfg = FitConfig(targets=target, cv=3, cs=CS)
    small = FitConfig(targets=target, cv=3, cs=CS, memory_bytes=1)
    assert fc._layer_chunks(LAYERS, 120, 30, D, small) == [[0], [4], [8]]
    assert fc._layer_chunks(LAYERS, 120, 30, D, cfg) == [LAYERS]
    whole = fit_classifier(store, cfg, target)
    chunked = fit_classifier(store, small, target)
    assert whole.doc["control"] is not None
    _assert_close({k: v for k, v in whole.doc.items() if k != "seconds"},
                  {k: v for k, v in chunked.doc.items() if k != "seconds"})
    assert whole.arrays.keys() == chunked.arrays.keys()
    for key in whole.arrays:
        np.testing.assert_allclose(whole.arrays[key], chunked.arrays[key], rtol=1e-6,
                                   atol=1e-9, err_msg=key)


def _assert_close(a, b, where="doc"):
    """Equal JSON-like trees, floats to 1e-6 relative."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-6, abs=1e-9), where
    else:
        assert a == b, where


def test_which_targets_are_classified(tmp_path):
    store, _ = _store(tmp_path / "s.zarr")
    assert classify_target(store, FitConfig(targets="country")) == "country"
    assert classify_target(store, FitConfig(targets="coastal")) == "coastal"
    assert classify_target(store, FitConfig(targets="latitude")) is None
    assert classify_target(store, FitConfig(targets="country", task="regress")) is None
    assert classify_target(store, FitConfig()) is None
    with pytest.raises(ProbesError, match="fits one target"):
        classify_target(store, FitConfig(task="classify"))
    with pytest.raises(ProbesError, match="no entity column 'nope'.*country"):
        classify_target(store, FitConfig(targets="nope", task="classify"))


def test_binary_and_pooled_classes(tmp_path):
    store, codes = _store(tmp_path / "s.zarr", n_classes=5, seed=3)
    res = fit_classifier(store, FitConfig(targets="coastal", cv=3, cs=CS), "coastal")
    assert res.doc["classes"] == ["False", "True"]
    assert res.arrays["logistic_coef"].shape == (3, D)         # one vector, as scikit-learn
    assert res.arrays["lda_coef"].shape == (3, 1, D)
    pooled = fit_classifier(store, FitConfig(targets="country", cv=3, cs=CS, max_classes=3),
                            "country")
    assert pooled.doc["classes"][-1] == "other" and len(pooled.doc["pooled"]) == 3
    assert pooled.doc["n_dropped"] == 0
    dropped = fit_classifier(store, FitConfig(targets="country", cv=3, cs=CS, max_classes=3,
                                              drop_rest=True), "country")
    keep = np.isin(codes, np.argsort(-np.bincount(codes), kind="stable")[:3])
    assert dropped.doc["n_dropped"] == int((~keep).sum()) > 0
    assert dropped.doc["n_train"] + dropped.doc["n_test"] == int(keep.sum())


def test_command_line_fit_and_show(tmp_path, capsys):
    from probes.cli import main

    _store(tmp_path / "s.zarr")[0].close()
    out = tmp_path / "fit"
    assert main(["fit", str(tmp_path / "s.zarr"), "--all-layers", "--target", "country",
                 "--cv", "3", "--Cs", CS, "--class-weight", "balanced", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "target country: 3 classes" in text and "bal acc" in text and "8*" in text
    assert main(["show", str(out)]) == 0
    assert "target country: 3 classes" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["class_weight"] == "balanced"
    # too few members of a class for the folds: one line, exit 2
    assert main(["fit", str(tmp_path / "s.zarr"), "--all-layers", "--target", "country",
                 "--cv", "80"]) == 2
    assert "class" in capsys.readouterr().err
