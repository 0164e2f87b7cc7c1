"""The files fit, neurons, experiments and run write (issue 13, "Outputs"): results.json last and
carrying the sha256 of the arrays it describes, checked on load (a fit killed between the files
is never accepted by `--probe`); a failed write (a full disk) names the file and leaves the
previous outputs as they were; strict JSON (null and its reason, never a bare NaN); probes.npz
holds what docs/fastprobe.md lists; a huge alpha grid is refused before any allocation."""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from actstore import io
from actstore.store import create_store
from probes.cli import main
from probes.errors import FitError, NeuronReportError
from probes.fit import fit_all_layers, load_results, write_results
from probes.neurons import load_probe, neuron_report

DOCS = Path(__file__).resolve().parents[2] / "docs" / "fastprobe.md"
N, D, LAYERS = 80, 8, [1, 2, 3]


def _bare(text: str):
    raise ValueError(f"bare {text} in a JSON file")


def strict_load(path: Path):
    """The file as strict JSON: a bare NaN / Infinity raises."""
    return json.loads(Path(path).read_text(), parse_constant=_bare)


def _files(d: Path) -> dict[str, bytes]:
    """Every entry of ``d`` by name: a file's bytes (a folder, e.g. a staging one: None)."""
    return {p.name: p.read_bytes() if p.is_file() else None for p in sorted(Path(d).iterdir())}


def make_store(path, seed=0, constant_test_latitude=False, neurons=False):
    rng = np.random.default_rng(seed)
    lat, lon = rng.uniform(-50, 60, N), rng.uniform(-150, 150, N)
    is_test = np.arange(N) % 4 == 0
    if constant_test_latitude:
        lat[is_test] = 12.5
    ent = pd.DataFrame({"name": [f"c{i}" for i in range(N)], "entity": [f"c{i}" for i in range(N)],
                        "latitude": lat, "longitude": lon, "is_test": is_test,
                        "entity_type": "city", "country": rng.choice(["P", "Q", "R"], N)})
    T = np.c_[lat / 50, lon / 100]
    X = np.stack([T @ rng.normal(size=(2, D)) * (j + 1) + rng.normal(size=(N, D))
                  for j in range(len(LAYERS))])
    s = create_store(path, layers=LAYERS, n_rows=N, d_model=D, entities=ent,
                     targets=("latitude", "longitude"), group_columns=("country",),
                     meta={"created": f"2026-01-0{seed + 1}T00:00:00Z"},
                     d_mlp=5 if neurons else None)
    s.write_rows(0, X.astype(np.float16),
                 neurons=rng.normal(size=(len(LAYERS), N, 5)).astype(np.float16)
                 if neurons else None)
    s.mark_done(N)
    return s


@pytest.fixture()
def store(tmp_path):
    return make_store(tmp_path / "s.zarr")


def fit(store, out, alphas="1e-2:1e4:7", **kw):
    return fit_all_layers(store, alphas=alphas, backend="torch", device="cpu", out=out, **kw)


# ------------------------------------------------------------------ results.json and its arrays
def test_results_json_carries_the_digest_of_the_arrays_and_probes_npz_matches_the_docs(
        store, tmp_path):
    res = fit(store, tmp_path / "out")
    out = tmp_path / "out"
    doc = strict_load(out / "results.json")
    assert doc["arrays_sha256"] == {
        f: hashlib.sha256((out / f).read_bytes()).hexdigest()
        for f in ("probes.npz", "predictions_best_layer.csv")}
    with np.load(out / "probes.npz") as z:
        arrays = {k: z[k] for k in z.files}
    # the docs' list of arrays and the file agree; predictions are what users plot
    row = next(line for line in DOCS.read_text().splitlines()
               if line.startswith("| `probes.npz` |"))
    assert sorted(re.findall(r"`(\w+)`", row)) == sorted(arrays)
    for name in arrays:                                      # and each is described
        assert f"| `{name}` |" in DOCS.read_text()
    assert arrays["predictions"].shape == (3, N, 2) and arrays["is_test"].dtype == bool
    np.testing.assert_array_equal(arrays["predictions"], res.arrays["predictions"])
    np.testing.assert_array_equal(arrays["is_test"], res.arrays["is_test"])
    back = load_results(out, arrays=True)
    assert back.arrays["predictions"].shape == (3, N, 2) and back.best_layer == res.best_layer
    # the CSV holds the best layer's predictions, the same numbers
    csv = pd.read_csv(out / "predictions_best_layer.csv")
    j = [e["layer"] for e in doc["layers"]].index(doc["best_layer"])
    np.testing.assert_allclose(csv["pred_latitude"], arrays["predictions"][j][:, 0], rtol=1e-12)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]   # no staging left


@pytest.mark.parametrize("killed", ["new arrays, old results.json",
                                    "new results.json, old arrays"])
def test_a_fit_killed_between_its_files_is_never_accepted(store, tmp_path, killed, capsys):
    """The issue's case: results.json and probes.npz of two fits of the SAME store (so the
    store identity agrees) side by side, as a fit killed between the two files leaves them."""
    old, new = tmp_path / "old", tmp_path / "new"
    fit(store, old, alphas="1e-2:1e4:7")
    fit(store, new, alphas="1e-3:1e-1:3")
    load_probe(old, store)                        # each whole fit is accepted
    name = "probes.npz" if killed.startswith("new arrays") else "results.json"
    shutil.copyfile(new / name, old / name)
    with pytest.raises(FitError, match=f"{old / 'probes.npz'} is not the file "
                                       f"{old / 'results.json'} describes"):
        load_results(old, arrays=True)
    with pytest.raises(NeuronReportError, match="come from different fits"):
        load_probe(old, store)
    assert main(["neurons", str(store.path), "--method", "projection", "--probe", str(old),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "results.json" in err and "probes.npz" in err
    assert "come from different fits" in err
    # results.json alone (fastprobe show) still reads
    assert main(["show", str(old)]) == 0


def test_results_written_without_arrays_disown_an_old_probes_npz(store, tmp_path):
    res = fit(store, tmp_path / "out")
    write_results(res.to_json(), tmp_path / "out")            # no arrays this time
    assert strict_load(tmp_path / "out" / "results.json")["arrays_sha256"] == {}
    with pytest.raises(FitError, match="written without arrays, so .*probes.npz beside it"):
        load_results(tmp_path / "out", arrays=True)


def test_a_results_json_from_before_the_digest_still_loads_and_is_checked(store, tmp_path):
    """Older fits: no arrays_sha256, no predictions in probes.npz. Accepted when the layers and
    alphas agree; new arrays beside an old results.json, or other layers, are refused."""
    out = tmp_path / "out"
    fit(store, out)
    doc = json.loads((out / "results.json").read_text())
    del doc["arrays_sha256"]
    (out / "results.json").write_text(json.dumps(doc))
    with pytest.raises(FitError, match="written after that results.json"):
        load_results(out, arrays=True)
    with np.load(out / "probes.npz") as z:
        legacy = {k: z[k] for k in z.files if k not in ("predictions", "is_test")}
    np.savez_compressed(out / "probes.npz", **legacy)
    assert load_results(out, arrays=True).arrays["coef"].shape == (3, D, 2)
    assert load_probe(out, store)["layers"] == LAYERS
    np.savez_compressed(out / "probes.npz", **{**legacy, "layers": np.array([1, 2, 4])})
    with pytest.raises(FitError, match=r"layers \[1, 2, 3\] vs \[1, 2, 4\]"):
        load_results(out, arrays=True)
    np.savez_compressed(out / "probes.npz", **{**legacy, "alpha": legacy["alpha"] * 10})
    with pytest.raises(FitError, match="alphas differ"):
        load_results(out, arrays=True)


# ------------------------------------------------------------------ a full disk
def _fail_writes_of(monkeypatch, name: str):
    """Writes into any temporary file of ``name`` fail with ENOSPC (as a full disk does)."""
    real = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, attr):
            return getattr(self.f, attr)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fdopen(fd, *args, **kw):
        f = real(fd, *args, **kw)
        target = os.readlink(f"/proc/self/fd/{fd}")
        return Full(f) if os.path.basename(target).startswith(f".{name}.") else f
    monkeypatch.setattr(io.os, "fdopen", fdopen)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
@pytest.mark.parametrize("name", ["results.json", "probes.npz", "predictions_best_layer.csv",
                                  "r2_by_layer.png"])
def test_a_full_disk_names_the_file_and_keeps_the_previous_outputs(store, tmp_path,
                                                                   monkeypatch, name, capsys):
    out = tmp_path / "out"
    fit(store, out)
    before = _files(out)
    _fail_writes_of(monkeypatch, name)
    with pytest.raises(OSError) as info:
        fit(store, out, alphas="1e-3:1e-1:3")              # other numbers: every file differs
    msg = str(info.value)
    assert msg.startswith(f"cannot write {out / name}: [Errno 28] No space left on device; ")
    assert "previous files in" in msg and "\n" not in msg
    assert _files(out) == before                             # byte for byte, nothing left over
    load_results(out, arrays=True)
    # the command line: one line, exit status 2
    assert main(["fit", "--all-layers", str(store.path), "--alphas", "1e-3:1e-1:3", "--out",
                 str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot write {out / name}" in err
    assert _files(out) == before


def test_an_interrupted_write_leaves_the_previous_set_and_a_killed_ones_stage_is_removed(
        store, tmp_path, monkeypatch):
    import socket
    import sys

    from probes import report

    out = tmp_path / "out"
    fit(store, out)
    before = _files(out)

    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(report, "make_plots", interrupted)   # after probes.npz and the CSV
    with pytest.raises(KeyboardInterrupt):
        fit(store, out, alphas="1e-3:1e-1:3")
    assert _files(out) == before and not list(out.glob(".staging-*"))
    monkeypatch.undo()
    # a process killed outright leaves its staging folder; the next write into DIR removes it
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = out / f".staging-{socket.gethostname()}-{dead}-abc"
    stale.mkdir()
    (stale / "probes.npz").write_bytes(b"half")
    alive = out / f".staging-{socket.gethostname()}-{os.getpid()}-xyz"  # a live writer's
    alive.mkdir()
    fit(store, out, alphas="1e-3:1e-1:3")
    assert not stale.exists() and alive.exists()
    after = _files(out)
    assert after.keys() == before.keys() | {alive.name} and after != before
    load_results(out, arrays=True)


def test_every_output_names_the_file_it_cannot_write(store, tmp_path, monkeypatch):
    """neurons, experiments, the pipeline records: the same WriteError through actstore.io."""
    from probes.experiments.common import write_result
    from probes.pipeline.steps import run_step

    _fail_writes_of(monkeypatch, "neurons.json")
    s = make_store(tmp_path / "n.zarr", neurons=True)
    with pytest.raises(io.WriteError, match=f"cannot write {tmp_path / 'n' / 'neurons.json'}"):
        neuron_report(s, top=3, backend="torch", device="cpu", out=tmp_path / "n")
    assert not (tmp_path / "n" / "neurons.npz").exists()     # the set: nothing written
    _fail_writes_of(monkeypatch, "x.png")
    with pytest.raises(io.WriteError, match=f"cannot write {tmp_path / 'e' / 'x.png'}"):
        write_result({"experiment": "x", "name": "x"}, tmp_path / "e", _figure)
    assert list((tmp_path / "e").iterdir()) == []

    class Step:
        label, record = "step", tmp_path / "p" / "source.json"

        def inputs(self):
            return {}

        def run(self):
            return []

        def load(self, record):
            pass
    _fail_writes_of(monkeypatch, "source.json")
    with pytest.raises(io.WriteError, match=f"cannot write {Step.record}: .*no source.json "
                                            "was written"):
        run_step(Step(), lambda line: None)


def test_write_error_is_one_line_and_survives_pickling(tmp_path):
    import pickle

    target = tmp_path / "r.json"
    target.write_text("old")

    def full(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(io.WriteError) as info:
        io.write_atomic(target, full)
    assert str(info.value) == (f"cannot write {target}: [Errno 28] No space left on device; the "
                               "previous r.json is unchanged (free some space or write "
                               "elsewhere)")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.json"]
    again = pickle.loads(pickle.dumps(info.value))
    assert str(again) == str(info.value) and isinstance(again, OSError)

    def offline(f):            # an error of the content itself is not a write error
        raise ConnectionResetError(errno.ECONNRESET, "reset")
    with pytest.raises(ConnectionResetError):
        io.write_atomic(target, offline)


def _root_can_mount() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.mark.skipif(not _root_can_mount(), reason="mounting a small tmpfs needs root")
def test_a_real_full_disk(store, tmp_path, capsys):
    """A 400 kB tmpfs: the first fit fits, the second (its files staged beside the first's)
    does not; the first fit's files stay whole."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = disk / "out"
        fit(store, out)
        before = _files(out)
        filler = disk / "filler"
        free = shutil.disk_usage(disk).free
        filler.write_bytes(b"\0" * max(0, free - sum(map(len, before.values())) // 2))
        assert main(["fit", "--all-layers", str(store.path), "--alphas", "1e-3:1e-1:3",
                     "--out", str(out), "-q"]) == 2
        err = capsys.readouterr().err
        assert f"cannot write {out}/" in err and "No space left on device" in err
        assert err.count("\n") == 1 and "previous files in" in err
        assert _files(out) == before
        load_results(out, arrays=True)
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def _figure(result):
    from probes.experiments.common import pyplot

    fig, ax = pyplot().subplots()
    ax.plot([0, 1], [0, 1])
    return fig


# ------------------------------------------------------------------ strict JSON
def test_a_nan_metric_is_written_as_null_with_its_reason(tmp_path, capsys):
    s = make_store(tmp_path / "c.zarr", constant_test_latitude=True)
    res = fit(s, tmp_path / "out")
    assert math.isnan(res.layers[0]["test"]["r2_per_target"]["latitude"])   # in memory
    doc = strict_load(tmp_path / "out" / "results.json")
    e = doc["layers"][0]["test"]
    assert e["r2_per_target"]["latitude"] is None and e["r2"] is None
    assert e["r2_per_target"]["longitude"] == pytest.approx(
        res.layers[0]["test"]["r2_per_target"]["longitude"])
    assert doc["nulls"]["layers[0].test.r2_per_target.latitude"] == (
        "NaN: R² is undefined: the target is constant on these rows")
    assert doc["nulls"]["layers[0].test.pearson_per_target.latitude"].startswith(
        "NaN: the correlation is undefined")
    assert all(v.startswith("NaN: ") for v in doc["nulls"].values())
    back = load_results(tmp_path / "out", arrays=True)
    assert back.layers[0]["test"]["r2"] is None
    assert main(["show", str(tmp_path / "out")]) == 0
    assert "-" in capsys.readouterr().out


def test_old_results_with_bare_nan_still_read(store, tmp_path, capsys):
    out = tmp_path / "out"
    res = fit(store, out)
    doc = json.loads((out / "results.json").read_text())
    doc["layers"][0]["test"]["r2"] = float("nan")
    (out / "results.json").write_text(json.dumps(doc))          # bare NaN, as before
    assert "NaN" in (out / "results.json").read_text()
    back = load_results(out, arrays=True)
    assert math.isnan(back.layers[0]["test"]["r2"]) and back.best_layer == res.best_layer
    assert main(["show", str(out)]) == 0


def test_every_file_the_tools_write_is_strict_json(tmp_path):
    from probes import experiments as ex
    from probes.report import strict_json

    s = make_store(tmp_path / "n.zarr", neurons=True)
    res = neuron_report(s, top=15, backend="torch", device="cpu", out=tmp_path / "n")
    doc = strict_load(tmp_path / "n" / "neurons.json")
    assert doc["arrays_sha256"] == {"neurons.npz": hashlib.sha256(
        (tmp_path / "n" / "neurons.npz").read_bytes()).hexdigest()}
    assert doc["top_neurons"] == json.loads(json.dumps(res["top_neurons"]))
    assert "total" in doc["seconds"]                # written last, with the timings
    r = ex.pca_experiment(s, ks=(2,), layer=2)
    r["summary_nan"] = float("nan")                 # a number that could not be computed
    files = ex.write_experiment(r, tmp_path / "e")
    got = strict_load(files[0])
    assert got["summary_nan"] is None and got["nulls"] == {
        "summary_nan": "NaN: not a finite number"}
    # the general rule: every non-finite number, nested anywhere, with numpy types
    doc = strict_json({"a": [1.0, np.float32("inf")], "b": {"spearman": np.nan},
                       "c": np.array([-np.inf, 2.0]), 3: np.int64(4)})
    assert doc == {"a": [1.0, None], "b": {"spearman": None}, "c": [None, 2.0], "3": 4,
                   "nulls": {"a[1]": "Infinity: not a finite number",
                             "b.spearman": "NaN: the correlation is undefined: one of its two "
                                           "variables is constant on these rows",
                             "c[0]": "-Infinity: not a finite number"}}
    json.dumps(doc, allow_nan=False)


# ------------------------------------------------------------------ a huge alpha grid
def test_a_huge_alpha_grid_is_refused_before_anything_is_allocated(store, tmp_path,
                                                                   monkeypatch, capsys):
    from probes.ridge import solvers

    def allocated(*a, **kw):
        raise AssertionError("the per-alpha arrays were allocated")
    monkeypatch.setattr(solvers.LooAccumulator, "__init__", allocated)
    monkeypatch.setattr(solvers, "kfold_scores_primal", allocated)
    with pytest.raises(FitError, match=r"1000000 alphas need [\d.]+ GB for the per-alpha "
                                       r"arrays of one layer \(80 rows, d 8, primal form, LOO\), "
                                       r"more than the memory budget of 2 GB \(--memory-gb\): "
                                       r"use fewer alphas \(about \d+ fit\) or raise "
                                       r"--memory-gb"):
        fit_all_layers(store, alphas="1e-3:1e3:1000000", backend="torch", device="cpu")
    with pytest.raises(FitError, match=r"3-fold\), more than the memory budget of 0.25 GB"):
        fit_all_layers(store, alphas="1e-3:1e3:1000000", cv=3, backend="torch", device="cpu",
                       memory_bytes=1)              # the floor: 256 MB whatever the budget
    with pytest.raises(FitError, match=r"dual form"):       # fewer train rows than d
        fit_all_layers(store, alphas="1e-3:1e3:1000000", split="random:0.95:0",
                       backend="torch", device="cpu")
    rc = main(["fit", "--all-layers", str(store.path), "--alphas", "1e-3:1e3:100000",
               "--memory-gb", "0.5", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "100000 alphas need" in err
    assert "budget of 0.5 GB (--memory-gb)" in err
    # a tiny budget still only narrows the batches (one layer at a time), as before
    monkeypatch.undo()
    assert fit_all_layers(store, alphas="1e-2:1e2:5", backend="torch", device="cpu",
                          memory_bytes=1).best_layer in LAYERS
