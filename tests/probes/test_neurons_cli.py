"""`fastprobe neurons` / probes.neuron_report on a tiny store with a planted latitude neuron."""
from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from actstore.options import field_docs
from actstore.store import create_store
from probes.cli import main
from probes.neurons import NeuronConfig, NeuronReportError, neuron_report
from probes.neurons.cli import add_cli

scipy_stats = pytest.importorskip("scipy.stats")

N, D, M, LAYERS = 60, 6, 23, [2, 4, 6]
PLANT = (1, 17)   # (layer position, neuron index): exp(latitude / 40), monotone in latitude


def _table(rng):
    return pd.DataFrame({
        "name": [f"c{i}" for i in range(N)], "entity": [f"c{i}" for i in range(N)],
        "latitude": rng.uniform(-50, 60, N), "longitude": rng.uniform(-150, 150, N),
        "year": rng.uniform(1500, 2000, N), "flat": np.full(N, 3.0),
        "is_test": np.arange(N) % 4 == 0, "entity_type": "city",
        "country": rng.choice(["P", "Q"], N)})


def _store(path, neurons=True):
    rng = np.random.default_rng(7)
    ent = _table(rng)
    s = create_store(path, layers=LAYERS, n_rows=N, d_model=D, entities=ent,
                     targets=("latitude", "longitude"), group_columns=("country",), meta={},
                     d_mlp=M if neurons else None, rows_per_chunk=16)
    resid = rng.standard_normal((len(LAYERS), N, D)).astype(np.float16)
    neur = None
    if neurons:
        neur = rng.standard_normal((len(LAYERS), N, M))
        neur[PLANT[0], :, PLANT[1]] = np.exp(ent["latitude"].to_numpy() / 40)
        neur = neur.astype(np.float16)
    s.write_rows(0, resid, neurons=neur)
    s.mark_done(N)
    return path, ent, neur


@pytest.fixture()
def store(tmp_path):
    return _store(tmp_path / "n.zarr")


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_planted_neuron_first_and_values_match_scipy(store, tmp_path, backend):
    path, ent, neur = store
    res = neuron_report(path, top=5, backend=backend, device="cpu", out=tmp_path / "o")
    assert res["targets"] == ["latitude", "longitude"] and res["n_rows"] == N
    best = res["top_neurons"]["latitude"][0]
    assert ((best["position"], best["layer"], best["index"])
            == (PLANT[0], LAYERS[PLANT[0]], PLANT[1]))
    assert best["spearman"] == pytest.approx(1.0, abs=1e-12) and best["pearson"] < 0.999
    P, S = res["arrays"]["pearson"], res["arrays"]["spearman"]
    assert P.shape == S.shape == (len(LAYERS), M, 2)
    Y = ent[["latitude", "longitude"]].to_numpy()
    for b, j in [PLANT, (0, 0), (2, M - 1), (1, 3)]:
        x = neur[b, :, j].astype(np.float64)
        for t in range(2):
            assert abs(P[b, j, t] - np.corrcoef(x, Y[:, t])[0, 1]) < 1e-9
            assert abs(S[b, j, t] - scipy_stats.spearmanr(x, Y[:, t]).statistic) < 1e-9
    # ranking: |spearman| non-increasing, and it is the global top over every neuron
    sp = [abs(e["spearman"]) for e in res["top_neurons"]["longitude"]]
    assert sp == sorted(sp, reverse=True) and sp[0] == pytest.approx(np.abs(S[..., 1]).max())


def test_split_uses_only_selected_rows(store):
    path, ent, neur = store
    res = neuron_report(path, targets="year", split="train", backend="torch", device="cpu", top=3)
    train = ~ent["is_test"].to_numpy()
    assert res["n_rows"] == int(train.sum()) and res["targets"] == ["year"]
    x = neur[2, train, 5].astype(np.float64)
    y = ent["year"].to_numpy()[train]
    assert abs(res["arrays"]["pearson"][2, 5, 0] - np.corrcoef(x, y)[0, 1]) < 1e-9
    assert abs(res["arrays"]["spearman"][2, 5, 0] - scipy_stats.spearmanr(x, y).statistic) < 1e-9


def test_cli_writes_outputs(store, tmp_path, capsys):
    path, _, _ = store
    out = tmp_path / "cli"
    assert main(["neurons", str(path), "--top", "4", "--backend", "torch", "--device", "cpu",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "latitude: top 4 neurons" in text and "longitude: top 4 neurons" in text
    first = text.split("latitude: top 4 neurons")[1].splitlines()[3].split()
    assert first[:3] == ["1", str(LAYERS[PLANT[0]]), str(PLANT[1])]
    doc = json.loads((out / "neurons.json").read_text())
    assert doc["targets"] == ["latitude", "longitude"] and doc["n_rows"] == N
    assert doc["backend"] == "torch" and doc["seconds"]["total"] > 0
    assert len(doc["top_neurons"]["latitude"]) == 4
    z = np.load(out / "neurons.npz")
    assert z["pearson"].shape == z["spearman"].shape == (len(LAYERS), M, 2)
    assert list(z["layers"]) == LAYERS
    for t in ("latitude", "longitude"):
        png = out / f"neuron_{t}.png"
        assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    assert main(["neurons", str(path), "--target", "year", "--top", "2", "--backend", "torch",
                 "--device", "cpu", "--out", str(out / "y")]) == 0
    assert (out / "y" / "neuron_year.png").exists()


def test_no_neurons_is_one_line_error(tmp_path, capsys):
    path, _, _ = _store(tmp_path / "plain.zarr", neurons=False)
    assert main(["neurons", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastprobe: error:")
    assert "re-extract with `actstore extract --neurons`" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kw,msg", [
    (dict(targets="altitude"), "unknown target 'altitude'"),
    (dict(targets="flat"), "constant on the 'all' rows"),
    (dict(split="test"), "unknown split 'test'"),
    (dict(top=0), "top must be >= 1"),
])
def test_bad_requests(store, kw, msg):
    with pytest.raises(ValueError, match=msg):
        neuron_report(store[0], backend="torch", device="cpu", **kw)


def test_constant_target_cli(store, capsys):
    assert main(["neurons", str(store[0]), "--target", "flat", "--device", "cpu"]) == 2
    assert "target(s) ['flat'] are constant" in capsys.readouterr().err


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["neurons", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "fastprobe neurons w.zarr" in text and "neurons.npz" in text


def test_report_error_type():
    assert issubclass(NeuronReportError, ValueError)


# ------------------------------------------------------------------------------------ NeuronConfig
def test_config_validates_and_normalises():
    c = NeuronConfig(method="Projection", targets=["latitude"], layers=[2, 4], top="7")
    assert (c.method, c.targets, c.layers, c.top) == ("projection", ("latitude",), (2, 4), 7)
    assert NeuronConfig(method=None).method == "stored"
    for kw, msg in [(dict(method="both"), "unknown method 'both'"), (dict(top=0), "top must be"),
                    (dict(split="test"), "unknown split 'test'")]:
        with pytest.raises(NeuronReportError, match=msg):
            NeuronConfig(**kw)
    with pytest.raises(Exception):        # frozen
        c.top = 3
    doc = NeuronConfig.__doc__
    assert "Parameters" in doc and "probe_dir : str | None, default None" in doc


def test_config_and_keyword_api_agree(store):
    path, _, _ = store
    kw = dict(targets="latitude,year", top=3, split="train", backend="torch", device="cpu",
              layers=[4, 6], chunk_rows=16)
    a = neuron_report(path, **kw)
    b = neuron_report(path, NeuronConfig(**kw))
    c = neuron_report(path, NeuronConfig(top=9, split="all"), **{**kw, "top": 3})
    for r in (b, c):
        assert r["top_neurons"] == a["top_neurons"] and r["layers"] == a["layers"] == [4, 6]
        assert np.array_equal(r["arrays"]["spearman"], a["arrays"]["spearman"])
    with pytest.raises(TypeError, match="NeuronConfig"):
        neuron_report(path, "latitude")
    with pytest.raises(TypeError):
        neuron_report(path, no_such_option=1)


def test_cli_is_built_from_the_config(capsys):
    """Every visible NeuronConfig field is a flag whose help is the field's docstring; the flags
    and defaults are the ones `fastprobe neurons` always had."""
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(), argparse.RawDescriptionHelpFormatter)
    args = parser.parse_args(["neurons", "s.zarr"])
    assert vars(args)["store"] == "s.zarr"
    defaults = {k: v for k, v in vars(args).items() if k not in ("store", "func")}
    assert defaults == dict(method="stored", model=None, probe_dir=None, targets=None, top=50,
                            split="all", backend="auto", device=None, out=None)
    with pytest.raises(SystemExit):
        main(["neurons", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--method {stored,projection}", "--model NAME_OR_PATH", "--probe DIR",
                 "--target NAMES", "--top K", "--split {all,is_test,train}",
                 "--backend {auto,cpu,torch,cuda,triton}", "--device {cpu,cuda}", "--out DIR"):
        assert flag in text
    docs = field_docs(NeuronConfig)
    for f in dataclasses.fields(NeuronConfig):
        if f.metadata["cli"]["hidden"]:
            assert "--" + f.name.replace("_", "-") not in text
        else:
            assert docs[f.name] in text, f.name
