"""The `fastprobe` command line, end to end on a tiny store."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from actstore.store import create_store
from probes.cli import main


@pytest.fixture()
def store(tmp_path):
    rng = np.random.default_rng(0)
    n, d, L = 80, 8, 3
    lat, lon = rng.uniform(-50, 60, n), rng.uniform(-150, 150, n)
    ent = pd.DataFrame({"name": [f"c{i}" for i in range(n)], "entity": [f"c{i}" for i in range(n)],
                        "latitude": lat, "longitude": lon, "year": rng.uniform(1500, 2000, n),
                        "is_test": np.arange(n) % 4 == 0, "entity_type": "city",
                        "country": rng.choice(["P", "Q", "R"], n)})
    T = np.c_[lat / 50, lon / 100]
    X = np.stack([T @ rng.normal(size=(2, d)) * depth + rng.normal(size=(n, d))
                  for depth in range(L)])
    p = tmp_path / "tiny.zarr"
    s = create_store(p, layers=[1, 2, 3], n_rows=n, d_model=d, entities=ent,
                     targets=("latitude", "longitude"), group_columns=("country",), meta={})
    s.write_rows(0, X.astype(np.float16))
    s.mark_done(n)
    return p


def test_fit_and_show_end_to_end(store, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["fit", "--all-layers", str(store), "--alphas", "1e-2:1e4:7", "--out", str(out),
               "-q"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "layer" in table and "R2 test" in table and "km med" in table and "best layer" in table
    lines = [line for line in table.splitlines() if line.strip()[:1].isdigit()]
    assert len(lines) == 3
    doc = json.loads((out / "results.json").read_text())
    assert len(doc["alphas"]) == 7 and doc["cv"] == "loo"
    assert (out / "r2_by_layer.png").exists() and (out / "map_best_layer.png").exists()
    assert main(["show", str(out)]) == 0
    shown = capsys.readouterr().out
    # the table (without the timing line) is reprinted identically
    assert shown.splitlines()[:-1] == table.splitlines()[:len(shown.splitlines()) - 1]
    assert main(["show", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["best_layer"] == doc["best_layer"]


def test_fit_options(store, tmp_path, capsys):
    rc = main(["fit", "--all-layers", str(store), "--target", "year", "--cv", "3",
               "--alphas", "0.1,1,10", "--alpha-per-target", "--split", "random:0.3:1",
               "--backend", "torch", "--memory-gb", "1e-9", "--out", str(tmp_path / "o"), "-q"])
    assert rc == 0
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    assert doc["targets"] == ["year"] and doc["cv"] == 3 and doc["alpha_per_target"]
    assert doc["backend"] == "torch" and doc["n_test"] == 24
    assert (tmp_path / "o" / "year_best_layer.png").exists()
    assert "3-fold" in capsys.readouterr().out


@pytest.mark.parametrize("argv,msg", [
    (["--target", "altitude"], "unknown target 'altitude'"),
    (["--target", "country", "--task", "regress"], "target column 'country' is not numeric"),
    (["--target", "country,latitude"], "target column 'country' is not numeric"),
    (["--layers", "0,7"], "layer 0 is not in this store"),
    (["--split", "random:0.0001:0"], "empty test split"),
    (["--cv", "x"], "cv must be"),
    (["--alphas", "1:2"], "alpha grid"),
])
def test_errors_are_one_line(store, tmp_path, capsys, argv, msg):
    rc = main(["fit", "--all-layers", str(store), "-q", *argv])
    assert rc == 2
    err = capsys.readouterr().err
    if "--layers" in argv:   # one release of notice that --layers now takes hidden-state indices
        note, err = err.split("\n", 1)
        assert note.startswith("fastprobe: note: --layers takes hidden-state indices")
    assert msg in err and "Traceback" not in err and err.startswith("fastprobe: error:")
    assert err.count("\n") == 1


def test_missing_inputs(tmp_path, capsys):
    assert main(["fit", "--all-layers", str(tmp_path / "nope.zarr")]) == 2
    assert "no such store" in capsys.readouterr().err
    assert main(["show", str(tmp_path)]) == 2
    assert "no such results file" in capsys.readouterr().err


def test_needs_layer_choice(store, capsys):
    assert main(["fit", str(store)]) == 2
    assert "--all-layers" in capsys.readouterr().err


def test_help_is_fast_and_teaches():
    heavy = "('torch', 'sklearn', 'zarr', 'matplotlib')"
    code = ("import sys; from probes.cli import build_parser; build_parser(); "
            f"print(sorted(m for m in {heavy} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"
    r = subprocess.run([sys.executable, "-m", "probes", "fit", "--help"], capture_output=True,
                       text=True)
    assert r.returncode == 0
    for s in ("--all-layers", "--alpha-per-target", "group:COLUMN", "results.json", "proximity"):
        assert s in r.stdout
    # every option's help is its FitConfig field's docstring
    from actstore.options import field_docs
    from probes.fit import FitConfig
    shown = "".join(r.stdout.split())                       # wrapped anywhere, even at "-"
    for name, doc in field_docs(FitConfig).items():
        if name not in ("chunk_rows", "progress"):          # not on the command line
            assert "".join(doc.split()) in shown, name
    r = subprocess.run([sys.executable, "-m", "probes", "--help"], capture_output=True, text=True)
    assert "fastprobe fit --all-layers" in r.stdout and "fastprobe show" in r.stdout
