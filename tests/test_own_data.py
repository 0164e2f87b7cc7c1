"""Anyone's data end to end (issue 14): a generic CSV, a Parquet file and a saved Hugging Face
dataset, each extracted, fitted and reported through the command lines on the tiny model, and
the README's own-data commands on the embedded SmolLM2 (slow)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import actstore

REPO = Path(__file__).resolve().parents[1]
WORDS = ["Paris", "Lake", "Mount", "River", "Saint", "Castle", "New", "Port", "Fort", "Bay"]


def _table(n=120, seed=0):
    """Texts whose label is learnable: 'Castle' in the entity or not (class), and a number
    that grows with the entity's word count (regression)."""
    rng = np.random.default_rng(seed)
    ents = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 5)))) + f" {i}"
            for i in range(n)]
    return pd.DataFrame({
        "uid": [f"u{i:03d}" for i in range(n)],
        "entity": ents,
        "text": [f"Where is {e} today" for e in ents],
        "label": ["castle" if "Castle" in e else "other" for e in ents],
        "size": [float(len(e.split())) + rng.normal(scale=0.1) for e in ents],
        "group": rng.choice(["a", "b", "c"], size=n),
        "split": np.where(rng.random(n) < 0.25, "test", "train"),
    })


def _run(main, *args):
    rc = main([str(a) for a in args])
    assert rc == 0, args


def _fit_and_show(tmp_path, store, out, capsys):
    from probes.cli import main as fastprobe
    _run(fastprobe, "fit", "--all-layers", store, "--out", out)
    doc = json.loads((out / "results.json").read_text())
    _run(fastprobe, "show", out)
    shown = capsys.readouterr().out
    assert str(doc["best_layer"]) in shown
    return doc


def test_csv_text_column_class_target(tmp_path, tiny_model_dir, capsys):
    from actstore.cli import main
    t = _table()
    csv = tmp_path / "t.csv"
    t[["uid", "text", "label", "split"]].to_csv(csv, index=False)
    store = tmp_path / "t.zarr"
    _run(main, "extract", "--model", tiny_model_dir, "--dataset", csv, "--text-column", "text",
         "--targets", "label", "--split-column", "split", "--id-column", "uid",
         "--out", store, "--no-progress", "--device", "cpu")
    s = actstore.open(store)
    assert s.position == "last" and s.target_kinds == {"label": "class"}
    assert list(s.entities["name"][:2]) == ["u000", "u001"]
    assert s.is_test.tolist() == (t.split == "test").tolist()
    doc = _fit_and_show(tmp_path, store, tmp_path / "t-probe", capsys)
    assert doc["task"] == "classify" and doc["target"] == "label"


def test_parquet_entity_template_regression(tmp_path, tiny_model_dir, capsys):
    from actstore.cli import main
    t = _table(seed=1)
    pq = tmp_path / "t.parquet"
    t[["entity", "size", "group"]].to_parquet(pq, index=False)
    store = tmp_path / "p.zarr"
    _run(main, "extract", "--model", tiny_model_dir, "--dataset", pq, "--entity-column",
         "entity", "--template", "Where is {entity} today", "--targets", "size",
         "--group-columns", "group", "--position", "mean", "--sites", "resid,mlp_out",
         "--out", store, "--no-progress", "--device", "cpu")
    s = actstore.open(store)
    assert s.position == "mean" and list(s.sites) == ["resid", "mlp_out"]
    assert s.target_kinds == {"size": "regression"} and "group" in s.group_columns
    doc = _fit_and_show(tmp_path, store, tmp_path / "p-probe", capsys)
    assert doc["targets"] == ["size"] and len(doc["layers"]) == len(s.layers)


def test_saved_hf_dataset_int_coded_classes(tmp_path, tiny_model_dir, capsys):
    import datasets

    from actstore.cli import main
    t = _table(seed=2)
    t["code"] = (t.label == "castle").astype(int)
    path = tmp_path / "hf"
    datasets.Dataset.from_pandas(t[["entity", "code"]]).save_to_disk(str(path))
    store = tmp_path / "h.zarr"
    _run(main, "extract", "--model", tiny_model_dir, "--dataset", path, "--entity-column",
         "entity", "--template", "In {entity} there is", "--targets", "code", "--out", store,
         "--no-progress", "--device", "cpu")
    s = actstore.open(store)
    assert s.position == "last-entity" and s.target_kinds == {"code": "class"}
    doc = _fit_and_show(tmp_path, store, tmp_path / "h-probe", capsys)
    assert doc["task"] == "classify"


@pytest.mark.slow
def test_readme_own_data_commands(tmp_path):
    """The README's "Your own data" commands, as written, on the embedded SmolLM2 (fewer rows)."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Your own data", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    cmds = [c.split("#")[0].strip() for c in block.replace("\\\n", " ").splitlines()]
    cmds = [c for c in cmds if c]
    assert len(cmds) >= 4
    env = dict(os.environ, PATH=f"{sys.prefix}/bin:{os.environ.get('PATH', '/usr/bin:/bin')}",
               PYTHONPATH=str(REPO))
    for c in cmds:
        if c.startswith("actstore extract"):
            c += " --limit 120 --no-progress"
        c = c.replace("python examples/", f"{sys.executable} {REPO}/examples/", 1)
        if c.startswith("fastprobe fit"):
            c += " --quiet"
        r = subprocess.run(c, shell=True, cwd=tmp_path, capture_output=True, text=True, env=env)
        assert r.returncode == 0, (c, r.stderr[-2000:])
    for out in ("statements-probe", "cities-probe", "capitals-probe"):
        doc = json.loads((tmp_path / out / "results.json").read_text())
        assert doc["best_layer"] is not None, out
    cities = json.loads((tmp_path / "cities-probe" / "results.json").read_text())
    assert cities["site"] == "mlp_out" and cities["targets"] == ["log_population"]
