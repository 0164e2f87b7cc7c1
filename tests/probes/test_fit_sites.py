"""``fastprobe fit`` on format-version-2 stores (issue 14): ``--site`` picks the array (ridge and
classification), the stored ``target_kinds`` pick regression or classification (an
integer-coded class target is classified), and a token-level store is refused with a pointer to
``store.iter_batches``."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from actstore.store import create_store, open_store
from probes.cli import main
from probes.errors import InputError
from probes.fit import fit_all_layers
from probes.fit.classify import classify_target, fit_classifier
from probes.fit.config import FitConfig

N, D, D_MLP, LAYERS, R = 120, 8, 12, [1, 2, 3], 32

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _entities(rng) -> pd.DataFrame:
    codes = np.arange(N) % 3
    return pd.DataFrame({
        "name": [f"e{i}" for i in range(N)], "entity": [f"e{i}" for i in range(N)],
        "score": rng.normal(size=N),
        "label": (codes * 10).astype(np.int64),               # integer-coded categories
        "kind": np.array(["x", "y", "z"])[codes],
        "is_test": np.arange(N) % 4 == 0,
    })


def _arrays(ent, rng) -> dict[str, np.ndarray]:
    """resid: noise; attn_out: carries score; neurons (wider): carry the class."""
    codes = ent["label"].to_numpy() // 10
    score = ent["score"].to_numpy()
    w = rng.normal(size=D)
    means = 3 * rng.normal(size=(3, D_MLP))
    return {
        "resid": rng.normal(size=(3, N, D)),
        "attn_out": np.stack([k * np.outer(score, w) + rng.normal(size=(N, D))
                              for k in (0.5, 1, 2)]),
        "neurons": np.stack([k * means[codes] + rng.normal(size=(N, D_MLP))
                             for k in (0.2, 1, 2)]),
    }


def _store(path, targets=("score", "label"), kinds=None, arrays=None, sites=None, seed=0):
    rng = np.random.default_rng(seed)
    ent = _entities(rng)
    arrays = _arrays(ent, rng) if arrays is None else arrays
    sites = sites or {k: v.shape[2] for k, v in arrays.items()}
    kinds = kinds or {"score": "regression", "label": "class", "kind": "class"}
    st = create_store(path, layers=LAYERS, n_rows=N, d_model=D, entities=ent, targets=targets,
                      group_columns=(), meta={"model": {"id": "synthetic"}}, rows_per_chunk=R,
                      sites=sites, target_kinds={t: kinds[t] for t in targets})
    st.write_rows(0, {k: arrays[k].astype(np.float16) for k in sites})
    st.mark_done(N)
    st.close()
    return path, arrays


def test_site_is_the_array_fitted(tmp_path):
    path, arrays = _store(tmp_path / "v2.zarr")
    # the same numbers as the resid of another store: the fits must agree exactly
    ref, _ = _store(tmp_path / "ref.zarr", targets=("score",), sites={"resid": D},
                    arrays={"resid": arrays["attn_out"]})
    got = fit_all_layers(path, site="attn_out", targets="score", alphas="1e-2:1e3:6")
    want = fit_all_layers(ref, targets="score", alphas="1e-2:1e3:6")
    assert got.site == "attn_out" and want.site == "resid" and got.d_model == D
    for key in ("coef", "intercept", "predictions", "cv_scores"):
        np.testing.assert_array_equal(got.arrays[key], want.arrays[key], err_msg=key)
    assert got.layers[-1]["test"]["r2"] > 0.5
    noise = fit_all_layers(path, targets="score", alphas="1e-2:1e3:6")        # default: resid
    assert noise.site == "resid" and noise.layers[-1]["test"]["r2"] < 0.2


def test_site_of_other_width_and_missing_site(tmp_path):
    path, _ = _store(tmp_path / "v2.h5")
    res = fit_all_layers(path, site="neurons", targets="score", alphas="1e-2:1e3:6", cv=3)
    assert res.d_model == D_MLP and res.arrays["coef"].shape == (3, D_MLP, 1)
    with pytest.raises(InputError, match=r"no site 'mlp_out'.*'resid', 'attn_out', 'neurons'"):
        fit_all_layers(path, site="mlp_out", targets="score")


def test_target_kinds_choose_the_fit(tmp_path):
    path, _ = _store(tmp_path / "v2.zarr")
    with open_store(path) as s:
        assert s.target_kinds == {"score": "regression", "label": "class"}

        def target(**kw):
            return classify_target(s, FitConfig(**kw))

        assert target(targets="label") == "label"              # int64, recorded as class
        assert target(targets="kind") == "kind"                # a text column, as before
        assert target(targets="score") is None
        assert target() is None                                # both kinds: ridge on score
        assert target(targets="label", task="regress") is None
    res = fit_all_layers(path, alphas="1e-2:1e3:6")
    assert res.targets == ["score"]                            # the regression targets only
    with pytest.raises(InputError, match="'label' is a class target.*--target label"):
        fit_all_layers(path, targets="score,label")
    res = fit_all_layers(path, targets="label", task="regress", alphas="1e-2:1e3:6")
    assert res.targets == ["label"]                            # asked for: regress its codes


def test_only_class_target_is_classified_by_default(tmp_path):
    path, _ = _store(tmp_path / "v2.zarr", targets=("label",))
    with open_store(path) as s:
        assert classify_target(s, FitConfig()) == "label"
        res = fit_classifier(s, FitConfig(site="neurons", cv=3, cs="1e-2:1e2:3"), "label")
    doc = res.doc
    assert doc["classes"] == ["0", "10", "20"] and doc["site"] == "neurons"
    assert doc["d_model"] == D_MLP and doc["layers"][-1]["logistic"]["test"]["accuracy"] > 0.9
    path2, _ = _store(tmp_path / "two.zarr", targets=("label", "kind"))
    with pytest.raises(InputError, match=r"\['label', 'kind'\] are class targets.*--target label"):
        fit_all_layers(path2)


def test_cli_site_and_class_target(tmp_path, capsys):
    path, _ = _store(tmp_path / "v2.zarr")
    out = tmp_path / "cls"
    rc = main(["fit", "--all-layers", str(path), "--target", "label", "--site", "neurons",
               "--cv", "3", "--Cs", "1e-2:1e2:3", "--out", str(out), "-q"])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads((out / "results.json").read_text())
    assert doc["task"] == "classify" and doc["site"] == "neurons"
    out = tmp_path / "ridge"
    assert main(["fit", "--all-layers", str(path), "--site", "attn_out", "--out", str(out),
                 "-q"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["site"] == "attn_out" and doc["targets"] == ["score"]
    assert "site attn_out" in capsys.readouterr().out
    capsys.readouterr()
    assert main(["fit", "--all-layers", str(path), "--site", "mlp_out", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no site 'mlp_out'" in err and "'attn_out'" in err and len(err.splitlines()) == 1


def _ragged(path):
    lengths = np.arange(N) % 5 + 1
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n_tok = int(offsets[-1])
    ids = np.arange(n_tok, dtype=np.int32)
    ent = _entities(np.random.default_rng(0))
    st = create_store(path, layers=LAYERS, n_rows=n_tok, d_model=D, entities=ent,
                      targets=("score", "label"), group_columns=(), meta={},
                      rows_per_chunk=R, position="all", tokens=(offsets, ids),
                      target_kinds={"score": "regression", "label": "class"})
    st.write_rows(0, np.random.default_rng(1).normal(size=(3, n_tok, D)).astype(np.float16))
    st.mark_done(n_tok)
    st.close()
    return path


def test_token_level_store_is_refused(tmp_path, capsys):
    path = _ragged(tmp_path / "tok.zarr")
    with pytest.raises(InputError, match="token-level store.*store.iter_batches"):
        fit_all_layers(path, targets="score")
    with open_store(path) as s, pytest.raises(InputError, match="one row per text"):
        fit_classifier(s, FitConfig(), "label")
    for target in ("score", "label"):
        assert main(["fit", "--all-layers", str(path), "--target", target, "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert "store.iter_batches" in err and len(err.splitlines()) == 1


def test_own_table_end_to_end(tmp_path, tiny_model, tiny_tokenizer):
    """A CSV of sentences with an integer-coded label and a score: extracted at two sites
    through the Python API, fitted with --site, classified from the stored kind; the same
    table at every token is refused by the fit and read by iter_batches."""
    import actstore

    rng = np.random.default_rng(0)
    n = 48
    words = ["red", "green", "blue"]
    csv = tmp_path / "own.csv"
    pd.DataFrame({"sentence": [f"The {words[i % 3]} house number {i}" for i in range(n)],
                  "label": np.arange(n) % 3, "score": rng.normal(size=n)}).to_csv(csv,
                                                                                   index=False)
    lm = (tiny_model, tiny_tokenizer)
    config = actstore.ExtractConfig(out=str(tmp_path / "own.zarr"), text_column="sentence",
                                    targets="score,label", sites="resid,attn_out",
                                    dtype="float32", rows_per_chunk=16, progress=False)
    store = actstore.extract(lm, csv, config).store
    assert store.target_kinds == {"score": "regression", "label": "class"}
    assert classify_target(store, FitConfig(targets="label")) == "label"
    res = fit_classifier(store, FitConfig(targets="label", site="attn_out", cv=2,
                                          cs="1e-2:1e2:3"), "label")
    assert res.doc["site"] == "attn_out" and res.doc["classes"] == ["0", "1", "2"]
    store.close()
    res = fit_all_layers(tmp_path / "own.zarr", site="attn_out", alphas="1e-2:1e3:4")
    assert res.targets == ["score"] and res.site == "attn_out"

    tokens = actstore.extract(lm, csv, config, out=str(tmp_path / "tok.zarr"),
                              position="all").store
    assert tokens.ragged and tokens.n_texts == n
    with pytest.raises(InputError, match="iter_batches"):
        fit_all_layers(tokens, targets="score")
    batches = list(tokens.iter_batches(64, targets="label", site="attn_out", as_="numpy"))
    text = np.concatenate([b["text"] for b in batches])
    np.testing.assert_array_equal(np.bincount(text, minlength=n), np.diff(tokens.text_offsets))
    np.testing.assert_array_equal(np.concatenate([b["y"][:, 0] for b in batches]),
                                  tokens.entities["label"].to_numpy()[text])
    tokens.close()
