"""The shuffled-target control of fastprobe fit (probes.fit.controls)."""
from __future__ import annotations

import numpy as np
import pytest
from test_fit import ALPHAS, entity_table, make_store

from probes.fit import fit_all_layers, load_results
from probes.fit.controls import permutation


def test_permutation_is_seeded_and_keeps_test_rows():
    train = np.array([True, False, True, True, False, True, True, True])
    a, b, c = permutation(train, 0), permutation(train, 0), permutation(train, 1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(a[~train], np.flatnonzero(~train))      # test rows stay
    assert sorted(a[train]) == list(np.flatnonzero(train))                  # train among train


@pytest.mark.parametrize("d,cv,apt", [(16, "loo", False), (16, 3, True), (120, "loo", False)])
def test_control_is_near_chance_and_leaves_the_probe_unchanged(tmp_path, d, cv, apt):
    ent = entity_table(200, seed=2)
    make_store(tmp_path / "s.zarr", ent, d=d)
    kw = dict(alphas=ALPHAS, cv=cv, alpha_per_target=apt, backend="torch")
    with_c = fit_all_layers(tmp_path / "s.zarr", **kw)
    without = fit_all_layers(tmp_path / "s.zarr", control=False, **kw)
    assert without.control is None
    for a, b in zip(with_c.layers, without.layers):     # the control does not touch the probe
        assert a["alpha"] == b["alpha"]
        assert a["test"]["r2"] == pytest.approx(b["test"]["r2"], abs=1e-9)
    np.testing.assert_allclose(with_c.arrays["predictions"], without.arrays["predictions"],
                               atol=1e-9)
    block = with_c.control
    assert block["seed"] == 0 and "Hewitt" in block["method"]
    assert [r["layer"] for r in block["layers"]] == [e["layer"] for e in with_c.layers]
    for row, entry in zip(block["layers"], with_c.layers):
        assert entry["test"]["r2"] > 0.5                  # the targets carry signal
        assert row["test_r2"] < 0.1                       # the control is at chance
        assert row["selectivity"] == pytest.approx(entry["test"]["r2"] - row["test_r2"])
        assert set(row["test_r2_per_target"]) == {"latitude", "longitude"}


def test_control_seed_is_recorded_and_changes_the_control(tmp_path):
    ent = entity_table(150, seed=3)
    make_store(tmp_path / "s.zarr", ent)
    a = fit_all_layers(tmp_path / "s.zarr", alphas=ALPHAS, control_seed=5, out=tmp_path / "o")
    b = fit_all_layers(tmp_path / "s.zarr", alphas=ALPHAS, control_seed=6)
    assert a.control["seed"] == 5 and b.control["seed"] == 6
    assert a.control["layers"][0]["test_r2"] != b.control["layers"][0]["test_r2"]
    back = load_results(tmp_path / "o")
    assert back.control["seed"] == 5
    assert back.control["layers"][0]["selectivity"] == pytest.approx(
        a.control["layers"][0]["selectivity"])


def test_fastprobe_fit_no_control(tmp_path):
    from probes.cli import main

    ent = entity_table(120, seed=4)
    make_store(tmp_path / "s.zarr", ent)
    assert main(["fit", str(tmp_path / "s.zarr"), "--all-layers", "--no-control", "-q",
                 "--out", str(tmp_path / "o")]) == 0
    assert load_results(tmp_path / "o").control is None
    assert main(["fit", str(tmp_path / "s.zarr"), "--all-layers", "--control-seed", "3", "-q",
                 "--out", str(tmp_path / "p")]) == 0
    assert load_results(tmp_path / "p").control["seed"] == 3


def _result(r2s, control=None, first=0):
    layers = [{"layer": first + i, "test": {"r2": r}} for i, r in enumerate(r2s)]
    doc = {"layers": layers, "best_layer": max(layers, key=lambda e: e["test"]["r2"])["layer"]}
    if control is not None:
        doc["control"] = {"layers": [{"layer": e["layer"], "test_r2": c,
                                      "selectivity": e["test"]["r2"] - c}
                                     for e, c in zip(layers, control)]}
    return doc


def test_plots_draw_layer0_and_the_control():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from probes.report import LAYER0_LABEL, draw_controls, layer0_r2

    fig, ax = plt.subplots()
    draw_controls(ax, _result([0.1, 0.4, 0.5], control=[-0.01, -0.02, 0.0]))
    labels = {ln.get_label(): ln for ln in ax.get_lines()}
    assert labels[LAYER0_LABEL].get_linestyle() == "--"
    assert list(labels[LAYER0_LABEL].get_ydata()) == [0.1, 0.1]
    assert list(labels["shuffled-target control"].get_ydata()) == [-0.01, -0.02, 0.0]
    plt.close(fig)
    fig, ax = plt.subplots()                    # no layer 0, no control: nothing drawn
    draw_controls(ax, _result([0.4, 0.5], first=1))
    assert ax.get_lines() == [] and layer0_r2(_result([0.4], first=1)) is None
    plt.close(fig)


def test_r2_axis_stops_at_its_floor_and_marks_the_lowest_value():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from probes.report import R2_AXIS_FLOOR, floor_r2_axis

    fig, ax = plt.subplots()
    ax.plot([0, 1, 2, 3], [0.1, -3.24, 0.3, float("nan")], color="tab:green")
    ax.plot([0, 1, 2, 3], [0.0, -0.7, 0.2, 0.1])
    floor_r2_axis(ax)
    lo, hi = ax.get_ylim()
    assert lo == R2_AXIS_FLOOR and 0.3 < hi < 0.4
    (note,) = ax.texts                          # the lowest value, where its curve leaves
    assert note.get_text() == "-3.24\u2193" and note.get_position() == (1.0, R2_AXIS_FLOOR)
    assert note.get_color() == "tab:green"
    plt.close(fig)
    fig, ax = plt.subplots()                    # every value on the scale: the axis is left be
    ax.plot([0, 1], [-0.2, 0.5])
    before = ax.get_ylim()
    floor_r2_axis(ax)
    assert ax.get_ylim() == before and len(ax.texts) == 0
    plt.close(fig)


def test_fit_plot_has_the_controls(tmp_path):
    ent = entity_table(120, seed=5)
    make_store(tmp_path / "s.zarr", ent)
    res = fit_all_layers(tmp_path / "s.zarr", alphas=ALPHAS, out=tmp_path / "o")
    assert (tmp_path / "o" / "r2_by_layer.png").exists()
    assert load_results(tmp_path / "o").control["layers"][0]["layer"] == res.layers[0]["layer"]


def test_classification_control_is_chance_accuracy(tmp_path):
    """Permuted train labels, the logistic probe at each layer's C: accuracy near the
    majority rate where the real probe is far above it; seeded; off with control=False."""
    from test_classify_fit import CS, _store

    from probes.fit.classify import fit_classifier
    from probes.fit.config import FitConfig

    store, codes = _store(tmp_path / "s.zarr")
    test = store.is_test.astype(bool)
    majority = np.bincount(codes[test]).max() / test.sum()
    doc = fit_classifier(store, FitConfig(targets="country", cv=3, cs=CS), "country").doc
    again = fit_classifier(store, FitConfig(targets="country", cv=3, cs=CS), "country").doc
    block = doc["control"]
    assert block["seed"] == 0 and block == again["control"]
    for row, entry in zip(block["layers"], doc["layers"]):
        acc = entry["logistic"]["test"]["accuracy"]
        assert row["selectivity"] == pytest.approx(acc - row["test_accuracy"])
        assert row["test_accuracy"] < majority + 0.2
    assert doc["layers"][-1]["logistic"]["test"]["accuracy"] > 0.9      # the strong layer
    assert block["layers"][-1]["selectivity"] > 0.4
    off = fit_classifier(store, FitConfig(targets="country", cv=3, cs=CS, control=False),
                         "country").doc
    assert off["control"] is None


def test_the_printed_table_names_the_controls():
    from probes.report import _controls_lines

    res = _result([0.1, 0.4, 0.5], control=[-0.01, -0.02, 0.0])
    res["control"]["seed"] = 0
    assert _controls_lines(res) == [
        "layer 0 (embeddings): test R2 0.100",
        "shuffled-target control (seed 0): test R2 0.000 at layer 2, selectivity 0.500"]
    assert _controls_lines(_result([0.4, 0.5], first=1)) == []
