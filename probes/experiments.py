"""The paper's probing experiments (Gurnee & Tegmark 2023) on activation stores.

Each experiment returns a JSON-able dict with ``"experiment"`` (its kind), ``"name"`` (the file
stem: NAME.json / NAME.png) and its tables; :func:`write_experiment` writes both files and
:func:`format_experiment` gives the printed table.

* :func:`prompt_experiment`   — probe quality per layer across prompt variants of one dataset
  (one store per prompt) and cross-prompt transfer at each prompt's best layer;
* :func:`holdout_experiment`  — block hold-out (country / state / borough / century ...): the
  paper's generalization table, held-out vs nominal proximity error per group;
* :func:`entity_type_experiment` — the same with the ``entity_type`` column;
* :func:`nonlinear_experiment` — a one-hidden-layer MLP probe (torch) against the ridge probe;
* :func:`pca_experiment`      — ridge probes on the top-k principal components vs full width.

Common conventions (those of ``fastprobe fit``):

* the linear probe is ridge with intercept, targets z-scored with the train mean and population
  std, one alpha per layer shared by the targets, chosen by exact leave-one-out on the TRAIN rows
  over the grid ``alphas`` (:class:`probes.ridge.RidgeProbeCV` / :func:`probes.fit.fit_all_layers`);
* ``split`` is a :func:`probes.fit.parse_split` spec (default: the store's ``is_test`` column);
* ``layer`` is a hidden-state index the store holds (0 = embeddings, l = output of block l; a
  negative number counts from the last stored layer).
  ``layer=None`` takes the best LOO layer: the layer whose chosen alpha has the best LOO score
  (-mean squared LOO residual in z units over train rows and targets), so the choice never sees
  the test rows. Results report both the hidden-state index (``layer``) and the ``position``.
  The hold-out chooses each held-out probe's layer by LOO on that probe's own rows (outside the
  held-out group; ``layer_selection`` in its result);
* metrics are those of :mod:`probes.metrics`: R² (mean over targets), Spearman (mean over
  targets), proximity error (haversine when the targets include latitude and longitude, else
  euclidean over the targets, |a - b| for one target).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np

from actstore.store import open_store
from actstore.store.format import as_compute
from probes.errors import ExperimentError, InputError
from probes.fit import fit_all_layers
from probes.inputs import parse_split, resolve_targets, target_matrix
from probes.kernels import resolve
from probes.metrics import _latlon, evaluate, haversine_km, proximity_error
from probes.report import md_num, md_table
from probes.report import text_table as _table
from probes.ridge import DEFAULT_ALPHAS, RidgeProbeCV

__all__ = [
    "ExperimentError", "DEFAULT_ALPHAS", "prompt_experiment", "holdout_experiment",
    "entity_type_experiment", "nonlinear_experiment", "pca_experiment", "write_experiment",
    "format_experiment", "experiment_markdown", "EXPERIMENT_TITLES", "group_labels", "DEFAULT_KS", "DEFAULT_WEIGHT_DECAYS",
]

DEFAULT_KS = (2, 5, 10, 20, 50, 100)
DEFAULT_WEIGHT_DECAYS = (0.01, 0.03, 0.1, 0.3)       # the paper's MLP grid
DERIVED_GROUPS = {"century": 100, "decade": 10}


# ----------------------------------------------------------------------------- shared helpers

def _open(store):
    if isinstance(store, (str, os.PathLike)):
        return open_store(store)
    return store


def _layer_x(store, layer: int) -> np.ndarray:
    """(rows_done, d) float64 activations of one layer (hidden-state index)."""
    x = as_compute(store.layer(layer), store.dtype).double().numpy()
    if not np.isfinite(x).all():
        r, c = np.argwhere(~np.isfinite(x))[0]
        raise ExperimentError(f"{store.path}: layer {layer} has NaN "
                              f"or inf activations, first at row {r}, dim {c}")
    return x


def _ridge(alphas, backend):
    return RidgeProbeCV(alphas=alphas, cv="loo", standardize_targets=True,
                        backend=backend)


def best_loo_index(per_layer: list[dict]) -> int:
    """Index of the layer with the best LOO score (ties: the lowest position)."""
    return max(range(len(per_layer)),
               key=lambda j: (per_layer[j]["cv_score"], -per_layer[j]["position"]))


def _fit_layers(store, names, alphas, split, backend, layers):
    """fit_all_layers on the given layers (None = all), quietly, nothing written."""
    return fit_all_layers(store, targets=names, alphas=alphas, split=split, backend=backend,
                          layers=layers)


def _probe_at(store, names, alphas, split, backend, layer):
    """The standard-split ridge probe at ``layer`` (None: the best LOO layer of all layers).

    Returns (fit result, index j of the layer in result["layers"])."""
    if layer is None:
        res = _fit_layers(store, names, alphas, split, backend, None)
        return res, best_loo_index(res["layers"])
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise ExperimentError(f"layer must be a hidden-state index (an int), got {layer!r}")
    res = _fit_layers(store, names, alphas, split, backend, [int(layer)])
    return res, 0


def proximity_rows(Y, P, names) -> np.ndarray:
    """Per-row proximity error over ALL rows given (:func:`probes.metrics.proximity_error`):
    haversine on (latitude, longitude) when both are targets, else euclidean over the targets."""
    ll = _latlon(names)
    if ll is not None:
        return proximity_error(Y[:, list(ll)], P[:, list(ll)], "haversine")
    return proximity_error(Y, P, "euclidean")


def _summary(Y, P, names) -> dict:
    """Test-style metrics of a set of rows: r2, spearman, proximity error (within those rows)."""
    e = evaluate(Y, P, names)
    out = {"n": e["n"], "r2": e["r2"], "r2_per_target": e["r2_per_target"],
           "spearman": e["spearman"], "pearson": e["pearson"],
           "proximity_error": e["proximity_error"]}
    if "km_error_median" in e:
        out["km_error_median"] = e["km_error_median"]
    return out


def _nan_to_none(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _layer_info(store, layer):
    return {"layer": int(layer), "position": list(store.layers).index(int(layer))}


# ----------------------------------------------------------------------------- prompts

def _store_label(store, used: set) -> str:
    meta = store.meta if isinstance(store.meta, dict) else {}
    pr = meta.get("prompt")
    name = pr.get("name") if isinstance(pr, dict) else (pr if isinstance(pr, str) else None)
    stem = Path(str(store.path)).name
    for suffix in (".zarr", ".h5", ".hdf5"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    label = name or stem
    if label in used:
        label = f"{label} ({stem})" if name else stem
    i = 2
    base = label
    while label in used:
        label, i = f"{base} #{i}", i + 1
    return label


def _dataset_meta(store) -> dict:
    meta = store.meta if isinstance(store.meta, dict) else {}
    ds = meta.get("dataset")
    return ds if isinstance(ds, dict) else {}


def _model_id(store):
    meta = store.meta if isinstance(store.meta, dict) else {}
    m = meta.get("model")
    if isinstance(m, dict):
        return m.get("id")
    return m if isinstance(m, str) else None


def _entity_keys(store) -> np.ndarray:
    ent = store.entities
    col = "entity" if "entity" in ent.columns else ("name" if "name" in ent.columns else None)
    if col is None:
        return np.arange(len(ent)).astype(str)
    return ent[col].astype(str).to_numpy()


def check_same_entities(stores: dict, names) -> None:
    """Raise ExperimentError naming the first difference between ``stores`` (label -> store)
    and the first one: dataset sha256, completed rows, model, entity order, is_test split,
    layer set, width, or a target missing from a store."""
    labels = list(stores)
    ref_label, ref = labels[0], stores[labels[0]]

    def where(lbl):
        return f"{lbl!r} ({stores[lbl].path})"

    for lbl in labels:
        try:
            resolve_targets(stores[lbl], names)
        except InputError as exc:
            raise ExperimentError(f"store {where(lbl)}: {exc}") from None
    ref_keys = _entity_keys(ref)[: ref.rows_done]
    for lbl in labels[1:]:
        s = stores[lbl]
        a, b = _dataset_meta(ref).get("sha256"), _dataset_meta(s).get("sha256")
        if a and b and a != b:
            raise ExperimentError(
                f"stores hold different datasets: {where(ref_label)} has dataset "
                f"{_dataset_meta(ref).get('name')!r} sha256 {a[:12]}..., {where(lbl)} has "
                f"{_dataset_meta(s).get('name')!r} sha256 {b[:12]}...; a prompt comparison needs "
                "one dataset extracted with several prompts")
        if s.rows_done != ref.rows_done:
            raise ExperimentError(
                f"stores differ in completed rows: {where(ref_label)} has {ref.rows_done}, "
                f"{where(lbl)} has {s.rows_done} (resume the shorter extraction, or extract both "
                "with the same --limit)")
        ma, mb = _model_id(ref), _model_id(s)
        if ma and mb and ma != mb:
            raise ExperimentError(f"stores come from different models: {where(ref_label)} from "
                                  f"{ma!r}, {where(lbl)} from {mb!r}")
        keys = _entity_keys(s)[: s.rows_done]
        if len(keys) != len(ref_keys) or not np.array_equal(keys, ref_keys):
            i = int(np.nonzero(keys != ref_keys)[0][0]) if len(keys) == len(ref_keys) else 0
            raise ExperimentError(
                f"stores hold different entities or orders: row {i} is {ref_keys[i]!r} in "
                f"{where(ref_label)} but {keys[i]!r} in {where(lbl)}")
        ta = np.asarray(ref.is_test[: ref.rows_done], dtype=bool)
        tb = np.asarray(s.is_test[: s.rows_done], dtype=bool)
        if not np.array_equal(ta, tb):
            i = int(np.nonzero(ta != tb)[0][0])
            raise ExperimentError(f"stores disagree on the is_test split, first at row {i} "
                                  f"({where(ref_label)}: {bool(ta[i])}, {where(lbl)}: {bool(tb[i])})")
        if list(s.layers) != list(ref.layers):
            raise ExperimentError(f"stores hold different layer sets: {where(ref_label)} has "
                                  f"{list(ref.layers)}, {where(lbl)} has {list(s.layers)}")
        if s.d_model != ref.d_model:
            raise ExperimentError(f"stores differ in width: {where(ref_label)} d_model="
                                  f"{ref.d_model}, {where(lbl)} d_model={s.d_model}")
        ya = ref.target_array(names)[: ref.rows_done]
        yb = s.target_array(names)[: s.rows_done]
        if not np.array_equal(ya, yb, equal_nan=True):
            r, c = np.argwhere(~((ya == yb) | (np.isnan(ya) & np.isnan(yb))))[0]
            raise ExperimentError(f"stores disagree on target {names[c]!r} at row {r}: "
                                  f"{ya[r, c]} in {where(ref_label)}, {yb[r, c]} in {where(lbl)}")


def prompt_experiment(stores, targets=None, layers=None, alphas=DEFAULT_ALPHAS, backend="auto",
                      split="is_test") -> dict:
    """Probe quality per layer for several prompts of ONE dataset, and cross-prompt transfer.

    stores: ``{label: store or path}`` (one store per prompt, same entities in the same order),
    or a list (labels: each store's prompt name from its metadata, else the file name).
    For each store, ``fit_all_layers`` fits a ridge probe (LOO alpha on the train rows of
    ``split``) on every layer in ``layers`` (hidden-state indices; default all) and scores the
    test rows:
    ``per_prompt[label]["layers"]`` holds, per layer, alpha, cv_score (LOO), and test r2,
    spearman, proximity_error (train r2 too). ``best_layer`` is the best LOO layer.

    Transfer: ``transfer["r2"][a][b]`` is the test R² when the probe fitted on prompt a's train
    rows at a's best layer is applied, unchanged (coefficients and intercept in target units),
    to prompt b's activations of the SAME layer on the test rows. The diagonal is each prompt's
    own test R² at its best layer. ``spearman`` and ``proximity_error`` matrices likewise.

    ExperimentError when the stores disagree (dataset sha256, completed rows, model, entity order,
    is_test, layer set, width, target values) or a target is missing from one of them.
    """

    t0 = time.perf_counter()
    if isinstance(stores, (str, os.PathLike)):
        stores = [stores]
    if isinstance(stores, dict):
        opened = {str(k): _open(v) for k, v in stores.items()}
    else:
        opened, used = {}, set()
        for s in stores:
            s = _open(s)
            lbl = _store_label(s, used)
            used.add(lbl)
            opened[lbl] = s
    if len(opened) < 2:
        raise ExperimentError(f"a prompt comparison needs at least 2 stores (one per prompt), got "
                              f"{len(opened)}")
    labels = list(opened)
    first = opened[labels[0]]
    names, Y = target_matrix(first, targets)
    check_same_entities(opened, names)
    n = Y.shape[0]
    is_test = parse_split(split, first, n)

    per_prompt, fits, best = {}, {}, {}
    for lbl in labels:
        res = _fit_layers(opened[lbl], names, alphas, split, backend, layers)
        fits[lbl] = res
        j = best[lbl] = best_loo_index(res["layers"])
        per_prompt[lbl] = {
            "store": str(opened[lbl].path),
            "best_layer": res["layers"][j]["layer"],
            "best_position": res["layers"][j]["position"],
            "best_test_r2": res["layers"][j]["test"]["r2"],
            "layers": [{"layer": e["layer"], "position": e["position"], "alpha": e["alpha"],
                        "cv_score": e["cv_score"], "train_r2": e["train"]["r2"],
                        "test": {k: e["test"][k] for k in
                                 ("r2", "r2_per_target", "spearman", "proximity_error")}}
                       for e in res["layers"]],
        }
    P = len(labels)
    mats = {m: [[None] * P for _ in range(P)] for m in ("r2", "spearman", "proximity_error")}
    # train prompts grouped by their best layer: each store's test rows of a layer read once
    layer_of = {la: per_prompt[la]["best_layer"] for la in labels}
    for layer in dict.fromkeys(layer_of.values()):
        xs = {lb: _layer_x(opened[lb], layer)[is_test] for lb in labels}
        for a, la in enumerate(labels):
            if layer_of[la] != layer:
                continue
            W = fits[la]["arrays"]["coef"][best[la]]           # (d, k), target units
            b = fits[la]["arrays"]["intercept"][best[la]]
            for c, lb in enumerate(labels):
                s = _summary(Y[is_test], xs[lb] @ W + b, names)
                for m in mats:
                    mats[m][a][c] = s[m]
        del xs
    return {
        "experiment": "prompts", "name": "prompts",
        "prompts": labels, "targets": names, "split": split, "n_rows": n,
        "n_train": int((~is_test).sum()), "n_test": int(is_test.sum()),
        "dataset": _dataset_meta(first).get("name"),
        "per_prompt": per_prompt,
        "transfer": {"train_prompts": labels, "test_prompts": labels,
                     "layer": {lbl: per_prompt[lbl]["best_layer"] for lbl in labels}, **mats},
        "seconds": time.perf_counter() - t0,
    }


# ----------------------------------------------------------------------------- hold-out

def group_labels(store, column: str):
    """(labels (rows_done,) str array, resolved column name, source description).

    ``column`` is a column of the entity table (any group column, ``entity_type``...), or a
    group derived from a numeric target: ``<target>_century`` (str of floor(v/100)*100, e.g.
    "1900" for 1900-1999; "-100" for -100..-1) and ``<target>_decade`` (floor(v/10)*10). Plain
    ``century`` / ``decade`` mean ``year_century`` / ``year_decade`` when the table has no such
    column and the store has a ``year`` column.
    """
    ent = store.entities
    n = int(store.rows_done)
    cols = list(ent.columns)
    if column in cols and column not in ("is_test",):
        return ent[column].astype(str).to_numpy()[:n], column, "column"
    base, unit = None, None
    if column in DERIVED_GROUPS and "year" in cols:
        base, unit = "year", DERIVED_GROUPS[column]
    else:
        for suffix, u in DERIVED_GROUPS.items():
            if column.endswith("_" + suffix) and column[: -len(suffix) - 1] in cols:
                base, unit = column[: -len(suffix) - 1], u
    import pandas as pd
    if base is not None and (not pd.api.types.is_numeric_dtype(ent[base])
                             or pd.api.types.is_bool_dtype(ent[base])):
        base = None
    if base is None:
        numeric = [c for c in cols if c in (store.targets or ())]
        derivable = [f"{t}_{s}" for t in numeric for s in DERIVED_GROUPS]
        raise ExperimentError(
            f"{store.path}: unknown group column {column!r}; group columns: "
            f"{list(store.group_columns)}, other entity columns: "
            f"{[c for c in cols if c not in store.group_columns]}"
            + (f", derived from a target: {derivable}" if derivable else ""))
    v = ent[base].to_numpy(dtype=np.float64)[:n]
    lab = np.array([str(int(math.floor(x / unit) * unit)) if np.isfinite(x) else "unknown"
                    for x in v])
    name = f"{base}_{'century' if unit == 100 else 'decade'}"
    return lab, name, f"floor({base} / {unit}) * {unit}"


LAYER_GIVEN = ("given: the nominal and every held-out probe use the layer the caller chose "
               "(the caller is responsible for choosing it without the held-out groups)")
LAYER_PER_FIT = ("per fit, by LOO on that fit's own rows: the nominal probe at the best LOO layer "
                 "over the split's train rows (`layer`); each held-out probe at the best LOO "
                 "layer over the rows outside its group (`heldout_layer`), so a held-out group "
                 "never influences the layer of the probe it is tested with")


def _heldout_fits(store, Y, masks, grid, backend, layers) -> dict:
    """For each group g (masks: g -> (n,) bool rows of g): the ridge probe fitted on the rows
    outside g (alpha by LOO over ``grid`` on those rows) at the layer of ``layers`` whose
    chosen alpha has the best LOO score on those same rows (ties: the first layer), with
    its predictions for every row. Each layer is read once; one fit per group and layer.
    Returns g -> {"layer", "alpha", "cv_score", "P" (n, k)}."""
    n = Y.shape[0]
    best = {}
    for layer in layers:
        X = _layer_x(store, layer)
        for g, m in masks.items():
            probe = _ridge(grid, backend).fit(X[~m], Y[~m])
            sc = float(probe.best_score_)
            if g not in best or sc > best[g]["cv_score"]:
                best[g] = {"layer": int(layer), "alpha": float(probe.alpha_), "cv_score": sc,
                           "P": probe.predict(X).reshape(n, -1)}
        del X
    return best


def holdout_experiment(store, group_column, layer=None, targets=None, min_group_size=10,
                       max_groups=None, alphas=DEFAULT_ALPHAS, backend="auto", split="is_test",
                       alpha=None, groups=None) -> dict:
    """Block hold-out (the paper's generalization table): does the probe generalize to a whole
    group (country, state, borough, century, decade, year, entity type) it never saw?

    Groups: the values of ``group_column`` (see :func:`group_labels`) with at least
    ``min_group_size`` rows (and leaving >= 3 rows outside), largest first, at most
    ``max_groups`` (None = all); or exactly the values in ``groups``.

    Layer (``layer_selection`` in the result): ``layer`` given: every probe at that layer.
    ``layer=None``: each probe's layer is chosen by LOO on that probe's own fitting rows, as its
    alpha: the nominal probe at the best LOO layer over the train rows of ``split`` (``layer``,
    ``position``), each held-out probe at the best LOO layer over the rows outside its group
    (per group ``heldout_layer``, ``heldout_position``, ``heldout_cv_score``), so no held-out
    row influences the layer of the probe that predicts it (costs one ridge fit per group and
    layer).

    Exact definitions:

    * nominal probe: ridge fitted on the train rows of ``split`` (the standard split: a random
      split of the dataset that contains every group), alpha by LOO on those rows
      (``alpha`` given: that fixed alpha, as the paper's fixed per-model alpha);
    * held-out probe for group g: ridge fitted on ALL rows outside g (alpha by LOO on those
      rows, or the fixed ``alpha``), predicting every row;
    * per-row proximity error of a probe (the paper's code, "combined"): over all n rows,
      prox_i = #{j : dist(true_i, pred_j) < dist(true_i, pred_i)} / n, with haversine distance
      for (latitude, longitude) targets, |a - b| for one target, euclidean otherwise;
    * ``heldout_proximity_error`` of g: mean of the held-out probe's prox_i over the rows of g;
    * ``nominal_proximity_error`` of g: mean of the nominal probe's prox_i over the rows of g
      that are TEST rows of ``split`` (None when g has no test row; ``n_nominal`` counts them).

    Also per group: the held-out alpha, mean absolute error per target of both probes on the same
    rows, and for places the median great-circle error in km. ``summary``: means over the groups
    that have nominal rows of the held-out and nominal errors (the table's last line), plus the
    held-out mean over all groups.
    """

    t0 = time.perf_counter()
    store = _open(store)
    names, Y = target_matrix(store, targets)
    n = Y.shape[0]
    lab, col, source = group_labels(store, str(group_column))
    values, counts = np.unique(lab, return_counts=True)
    if len(values) < 2:
        raise ExperimentError(f"{store.path}: group column {col!r} has only one group "
                              f"({values[0]!r}, all {n} rows); a hold-out needs at least 2")
    count = dict(zip(values.tolist(), counts.tolist()))
    if groups is not None:
        chosen = [str(g) for g in groups]
        missing = [g for g in chosen if g not in count]
        if missing:
            raise ExperimentError(f"group(s) {missing} not found in column {col!r}; its values "
                                  f"include {sorted(count, key=lambda g: -count[g])[:10]}")
        tiny = [g for g in chosen if n - count[g] < 3]
        if tiny:
            raise ExperimentError(f"group(s) {tiny} leave fewer than 3 rows to train on")
    else:
        if isinstance(min_group_size, bool) or int(min_group_size) < 1:
            raise ExperimentError(f"min_group_size must be >= 1, got {min_group_size!r}")
        chosen = sorted((g for g in count if count[g] >= min_group_size and n - count[g] >= 3),
                        key=lambda g: (-count[g], g))
        if not chosen:
            raise ExperimentError(
                f"no group of {col!r} has at least {min_group_size} rows (largest: "
                f"{max(count.values())} rows); lower min_group_size")
        if max_groups is not None:
            if int(max_groups) < 1:
                raise ExperimentError(f"max_groups must be >= 1, got {max_groups!r}")
            chosen = chosen[: int(max_groups)]

    fixed = alpha is not None
    grid = [float(alpha)] if fixed else alphas
    if fixed and not (math.isfinite(float(alpha)) and float(alpha) > 0):
        raise ExperimentError(f"alpha must be finite and > 0, got {alpha!r}")
    res, j = _probe_at(store, names, grid, split, backend, layer)
    chosen_layer = res["layers"][j]["layer"]
    P_nom = res["arrays"]["predictions"][j]
    is_test = parse_split(split, store, n)
    prox_nom = proximity_rows(Y, P_nom, names)
    ll = _latlon(names)
    masks = {g: lab == g for g in chosen}
    layers = [chosen_layer] if layer is not None else list(store.layers)
    heldout = _heldout_fits(store, Y, masks, grid, backend, layers)

    rows = []
    for g in chosen:
        m = masks[g]
        h = heldout[g]
        P = h["P"]
        prox = proximity_rows(Y, P, names)
        nm = m & is_test
        entry = {
            "group": g, "n": int(m.sum()), "n_nominal": int(nm.sum()),
            "alpha": h["alpha"],
            "heldout_layer": h["layer"],
            "heldout_position": list(store.layers).index(h["layer"]),
            "heldout_cv_score": h["cv_score"],
            "heldout_proximity_error": float(prox[m].mean()),
            "nominal_proximity_error": float(prox_nom[nm].mean()) if nm.any() else None,
            "heldout_mae_per_target": {t: float(v) for t, v in
                                       zip(names, np.abs(Y[m] - P[m]).mean(0))},
            "nominal_mae_per_target": ({t: float(v) for t, v in
                                        zip(names, np.abs(Y[nm] - P_nom[nm]).mean(0))}
                                       if nm.any() else None),
        }
        if ll is not None:
            a, o = ll
            entry["heldout_km_error_median"] = float(np.median(
                haversine_km(Y[m, a], Y[m, o], P[m, a], P[m, o])))
            entry["nominal_km_error_median"] = (float(np.median(haversine_km(
                Y[nm, a], Y[nm, o], P_nom[nm, a], P_nom[nm, o]))) if nm.any() else None)
        rows.append(entry)

    both = [r for r in rows if r["nominal_proximity_error"] is not None]
    summary = {
        "n_groups": len(rows), "n_groups_with_nominal": len(both),
        "heldout_proximity_error": (float(np.mean([r["heldout_proximity_error"] for r in both]))
                                    if both else None),
        "nominal_proximity_error": (float(np.mean([r["nominal_proximity_error"] for r in both]))
                                    if both else None),
        "heldout_proximity_error_all_groups": float(np.mean(
            [r["heldout_proximity_error"] for r in rows])),
    }
    kind = "entity_type" if col == "entity_type" else "holdout"
    return {
        "experiment": kind, "name": "entity_type" if kind == "entity_type" else f"holdout_{col}",
        "store": str(store.path), "group_column": col, "group_source": source,
        "targets": names, "split": split, "n_rows": n,
        "n_train": int((~is_test).sum()), "n_test": int(is_test.sum()),
        **_layer_info(store, chosen_layer), "layer_choice": "given" if layer is not None else "best LOO",
        "layer_selection": (LAYER_GIVEN if layer is not None else LAYER_PER_FIT),
        "alpha_mode": "fixed" if fixed else "LOO",
        "nominal_alpha": res["layers"][j]["alpha"],
        "min_group_size": int(min_group_size) if groups is None else None,
        "max_groups": None if max_groups is None else int(max_groups),
        "n_distinct_groups": len(values),
        "groups": rows, "summary": summary,
        "seconds": time.perf_counter() - t0,
    }


def entity_type_experiment(store, layer=None, targets=None, min_group_size=10, max_groups=None,
                           alphas=DEFAULT_ALPHAS, backend="auto", split="is_test", alpha=None,
                           groups=None) -> dict:
    """Entity-type hold-out: :func:`holdout_experiment` with ``group_column="entity_type"``
    (fit on every other type, test on the held-out type, e.g. cities vs structures)."""
    return holdout_experiment(store, "entity_type", layer=layer, targets=targets,
                              min_group_size=min_group_size, max_groups=max_groups, alphas=alphas,
                              backend=backend, split=split, alpha=alpha, groups=groups)


# ----------------------------------------------------------------------------- nonlinear (MLP)

def _train_mlp(Xf, Yf, Xv, Yv, hidden, wd, lr, batch_size, max_epochs, patience, seed, device):
    """One MLP (d -> hidden ReLU -> k), AdamW, minibatches, early stopping on validation MSE.

    A non-finite validation loss (divergence) counts as +inf: never the best epoch.
    Returns (model at its best validation epoch, best val loss, epochs run, val loss curve);
    when no epoch had a finite validation loss (diverged): (None, inf, epochs, curve)."""
    import torch
    torch.manual_seed(seed)
    d, k = Xf.shape[1], Yf.shape[1]
    net = torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.ReLU(),
                              torch.nn.Linear(hidden, k)).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=wd)
    gen = torch.Generator().manual_seed(seed)
    best, best_state, bad, curve = math.inf, None, 0, []
    nf = Xf.shape[0]
    for _ in range(max_epochs):
        net.train()
        order = torch.randperm(nf, generator=gen).to(device)
        for s in range(0, nf, batch_size):
            idx = order[s:s + batch_size]
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(net(Xf[idx]), Yf[idx])
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            v = float(torch.nn.functional.mse_loss(net(Xv), Yv))
        curve.append(v)
        if not math.isfinite(v):
            v = math.inf                  # diverged (NaN / inf): never the best epoch
        if v < best - 1e-12:
            best, bad = v, 0
            best_state = {k_: t.detach().clone() for k_, t in net.state_dict().items()}
        else:
            bad += 1
            if bad >= patience:
                break
    if best_state is None:
        return None, math.inf, len(curve), curve
    net.load_state_dict(best_state)
    return net, best, len(curve), curve


def nonlinear_experiment(store, layer=None, targets=None, hidden=256, seed=0,
                         weight_decays=DEFAULT_WEIGHT_DECAYS, lr=1e-3, batch_size=128,
                         max_epochs=100, patience=3, val_frac=0.2, alphas=DEFAULT_ALPHAS,
                         backend="auto", split="is_test", device=None) -> dict:
    """A one-hidden-layer MLP probe against the linear (ridge) probe at one layer.

    Linear: ridge on the train rows of ``split``, alpha by LOO (as ``fastprobe fit``).
    MLP (the paper's protocol): a seeded random ``val_frac`` of the train rows is the
    validation split, the rest the fitting rows. Inputs are standardised with the fitting rows'
    mean and std (std 0 -> 1), targets z-scored likewise. For each weight decay in
    ``weight_decays``: Linear(d, hidden) -> ReLU -> Linear(hidden, k), PyTorch default init
    seeded with ``seed``, AdamW(lr, weight_decay), shuffled minibatches of ``batch_size``, MSE
    loss; after each epoch the validation MSE; training stops after ``patience`` epochs without
    improvement or ``max_epochs``, and the best-validation-epoch weights are kept. The weight
    decay with the lowest best validation MSE wins (no refit on the validation rows). A run
    whose validation loss is NaN or inf in every epoch (divergence; non-finite losses count as
    +inf) is recorded with ``"diverged": true`` and ``best_val_mse`` None and is skipped;
    ExperimentError when every weight decay diverges.
    Both probes are scored on the same test rows (and train rows): r2, spearman, proximity error.
    Deterministic for a given seed on one machine (float32, CPU or the GPU when ``device`` /
    backend says so).
    """
    import torch


    t0 = time.perf_counter()
    store = _open(store)
    names, Y = target_matrix(store, targets)
    n = Y.shape[0]
    if int(hidden) < 1 or int(max_epochs) < 1 or int(patience) < 1 or int(batch_size) < 1:
        raise ExperimentError("hidden, max_epochs, patience and batch_size must be >= 1")
    if not 0 < float(val_frac) < 1:
        raise ExperimentError(f"val_frac must be in (0, 1), got {val_frac!r}")
    wds = [float(w) for w in weight_decays]
    if not wds or any(not math.isfinite(w) or w < 0 for w in wds):
        raise ExperimentError(f"weight_decays must be a non-empty list of numbers >= 0, got {wds}")
    res, j = _probe_at(store, names, alphas, split, backend, layer)
    chosen_layer = res["layers"][j]["layer"]
    is_test = parse_split(split, store, n)
    P_lin = res["arrays"]["predictions"][j]

    tr = np.nonzero(~is_test)[0]
    rng = np.random.default_rng(seed)
    perm = rng.permutation(tr)
    n_val = max(1, int(round(float(val_frac) * len(tr))))
    val, fit_rows = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    if len(fit_rows) < 2:
        raise ExperimentError(f"{len(tr)} train rows leave {len(fit_rows)} to fit the MLP on")
    X = _layer_x(store, chosen_layer)
    mx, sx = X[fit_rows].mean(0), X[fit_rows].std(0)
    sx = np.where(sx > 0, sx, 1.0)
    my, sy = Y[fit_rows].mean(0), Y[fit_rows].std(0)
    if np.any(sy == 0):
        raise ExperimentError("a target is constant on the MLP's fitting rows")
    _, dev = resolve(backend, device)
    Xs = torch.as_tensor((X - mx) / sx, dtype=torch.float32, device=dev)
    Ys = torch.as_tensor((Y - my) / sy, dtype=torch.float32, device=dev)
    fi = torch.as_tensor(fit_rows, device=dev)
    vi = torch.as_tensor(val, device=dev)
    runs, best = [], None
    # Tiny minibatch GEMMs are dominated by thread start-up/spinning (20x slower with 2 busy
    # threads than with 1 on a shared 2-core box): train them single-threaded.
    threads = torch.get_num_threads()
    small = dev.type == "cpu" and int(batch_size) * (X.shape[1] + len(names)) * int(hidden) < 4e6
    if small:
        torch.set_num_threads(1)
    try:
        for wd in wds:
            net, v, ep, curve = _train_mlp(Xs[fi], Ys[fi], Xs[vi], Ys[vi], int(hidden), wd,
                                           float(lr), int(batch_size), int(max_epochs),
                                           int(patience), seed, dev)
            diverged = net is None
            runs.append({"weight_decay": wd, "best_val_mse": None if diverged else v,
                         "epochs": ep, "val_curve": curve, "diverged": diverged})
            if not diverged and (best is None or v < best[1]):
                best = (net, v, wd)
    finally:
        if small:
            torch.set_num_threads(threads)
    if best is None:
        raise ExperimentError(
            f"the MLP probe diverged (validation loss NaN or inf in every epoch) for every weight "
            f"decay {wds} at lr {float(lr):g}; lower the learning rate (--lr)")
    with torch.no_grad():
        P_mlp = best[0](Xs).double().cpu().numpy() * sy + my
    trm = ~is_test
    return {
        "experiment": "nonlinear", "name": "nonlinear",
        "store": str(store.path), "targets": names, "split": split, "n_rows": n,
        "n_train": int(trm.sum()), "n_test": int(is_test.sum()),
        **_layer_info(store, chosen_layer), "layer_choice": "given" if layer is not None else "best LOO",
        "linear": {"alpha": res["layers"][j]["alpha"],
                   "train": _summary(Y[trm], P_lin[trm], names),
                   "test": _summary(Y[is_test], P_lin[is_test], names)},
        "mlp": {"hidden": int(hidden), "weight_decay": best[2], "lr": float(lr),
                "batch_size": int(batch_size), "max_epochs": int(max_epochs),
                "patience": int(patience), "n_fit": len(fit_rows), "n_val": len(val),
                "seed": int(seed), "device": str(dev), "runs": runs,
                "train": _summary(Y[trm], P_mlp[trm], names),
                "test": _summary(Y[is_test], P_mlp[is_test], names)},
        "seconds": time.perf_counter() - t0,
    }


# ----------------------------------------------------------------------------- PCA

def pca_experiment(store, layer=None, ks=DEFAULT_KS, targets=None, alphas=DEFAULT_ALPHAS,
                   backend="auto", split="is_test") -> dict:
    """Ridge probes on the top-k principal components of one layer vs the full-width probe.

    PCA on the TRAIN rows of ``split`` only: x̄ = train mean, (X_train - x̄) = U S Vᵀ (SVD,
    float64), components = the first k columns of V (largest singular values first). For each k
    in ``ks`` with k <= min(d, n_train - 1) (larger ones are listed in ``skipped_ks``): features
    Z = (X - x̄) V[:, :k] for every row, ridge with LOO alpha on the train rows (as fit), scored
    on the test rows (r2, spearman, proximity error) and train R². ``explained_variance`` is
    Σ_{i<=k} s_i² / Σ s_i². ``full``: the ridge probe on all d dimensions (``fastprobe fit``'s).
    """

    t0 = time.perf_counter()
    store = _open(store)
    names, Y = target_matrix(store, targets)
    n = Y.shape[0]
    try:
        ks = sorted({int(k) for k in ks})
    except (TypeError, ValueError):
        raise ExperimentError(f"ks must be integers, got {ks!r}") from None
    if not ks or ks[0] < 1:
        raise ExperimentError(f"ks must be a non-empty list of integers >= 1, got {ks}")
    res, j = _probe_at(store, names, alphas, split, backend, layer)
    chosen_layer = res["layers"][j]["layer"]
    is_test = parse_split(split, store, n)
    tr = ~is_test
    X = _layer_x(store, chosen_layer)
    d, n_train = X.shape[1], int(tr.sum())
    cap = min(d, n_train - 1)
    use = [k for k in ks if k <= cap]
    skipped = [k for k in ks if k > cap]
    if not use:
        raise ExperimentError(f"every k in {ks} exceeds min(d={d}, n_train-1={n_train - 1})")
    mean = X[tr].mean(0)
    _, S, Vt = np.linalg.svd(X[tr] - mean, full_matrices=False)
    var = S ** 2
    rows = []
    for k in use:
        Z = (X - mean) @ Vt[:k].T
        probe = _ridge(alphas, backend).fit(Z[tr], Y[tr])
        P = probe.predict(Z).reshape(n, -1)
        rows.append({"k": k, "alpha": float(probe.alpha_),
                     "explained_variance": float(var[:k].sum() / var.sum()) if var.sum() > 0 else 0.0,
                     "train_r2": _summary(Y[tr], P[tr], names)["r2"],
                     "test": _summary(Y[is_test], P[is_test], names)})
    e = res["layers"][j]
    return {
        "experiment": "pca", "name": "pca",
        "store": str(store.path), "targets": names, "split": split, "n_rows": n,
        "n_train": n_train, "n_test": int(is_test.sum()), "d_model": d,
        **_layer_info(store, chosen_layer), "layer_choice": "given" if layer is not None else "best LOO",
        "ks": use, "skipped_ks": skipped, "pca": rows,
        "full": {"k": d, "alpha": e["alpha"], "train_r2": e["train"]["r2"],
                 "test": {m: e["test"][m] for m in ("n", "r2", "r2_per_target", "spearman",
                                                     "pearson", "proximity_error")}},
        "seconds": time.perf_counter() - t0,
    }


# ----------------------------------------------------------------------------- output

def _clean(obj):
    """JSON-safe: numpy scalars to Python, non-finite floats to None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return _nan_to_none(obj)
    return obj


def write_experiment(result: dict, out_dir) -> list[Path]:
    """Write NAME.json (the result, non-finite numbers as null) and NAME.png; return both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = result.get("name") or result["experiment"]
    pj = out / f"{name}.json"
    pj.write_text(json.dumps(_clean(result), indent=1))
    pp = out / f"{name}.png"
    _plot(result, pp)
    return [pj, pp]


def _plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kind = result["experiment"]
    if kind == "prompts":
        labels = result["prompts"]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.8),
                                     gridspec_kw={"width_ratios": [1.3, 1]})
        for lbl in labels:
            ls = result["per_prompt"][lbl]["layers"]
            a1.plot([e["layer"] for e in ls], [e["test"]["r2"] for e in ls], "o-", ms=3, label=lbl)
        a1.set_xlabel("layer")
        a1.set_ylabel(f"test R² ({', '.join(result['targets'])})")
        a1.set_title("ridge probe test R² by layer, per prompt")
        a1.grid(alpha=0.3)
        a1.legend(fontsize=8)
        M = np.array([[np.nan if v is None else v for v in row] for row in result["transfer"]["r2"]],
                     dtype=float)
        # transfer across prompts can be far below 0; clip the colour scale at -1
        lo = max(-1.0, min(0.0, float(np.nanmin(M)))) if np.isfinite(M).any() else 0.0
        im = a2.imshow(M, cmap="viridis", vmin=lo, vmax=1)
        fig.colorbar(im, ax=a2, label="test R²")
        a2.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
        a2.set_yticks(range(len(labels)),
                      [f"{l} (L{result['transfer']['layer'][l]})" for l in labels], fontsize=8)
        for i in range(len(labels)):
            for c in range(len(labels)):
                if np.isfinite(M[i, c]):
                    a2.text(c, i, f"{M[i, c]:.2f}", ha="center", va="center", fontsize=7,
                            color="w" if M[i, c] < 0.6 else "k")
        a2.set_xlabel("test prompt")
        a2.set_ylabel("train prompt (its best layer)")
        a2.set_title("cross-prompt transfer")
    elif kind in ("holdout", "entity_type"):
        rows = result["groups"]
        fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(rows) + 2), 4.5))
        x = np.arange(len(rows))
        nom = [np.nan if r["nominal_proximity_error"] is None else r["nominal_proximity_error"]
               for r in rows]
        ax.bar(x - 0.2, nom, 0.4, label="nominal (random split)")
        ax.bar(x + 0.2, [r["heldout_proximity_error"] for r in rows], 0.4, label="held out")
        ax.set_xticks(x, [str(r["group"])[:18] for r in rows], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("mean proximity error (lower is better)")
        ax.set_title(f"block hold-out by {result['group_column']}, layer {result['layer']}"
                     + (" (held out: per-group LOO layer)"
                        if result.get("layer_choice") == "best LOO" else ""))
        ax.grid(alpha=0.3, axis="y")
        ax.legend()
    elif kind == "nonlinear":
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
        ms = ["r2", "spearman", "proximity_error"]
        x = np.arange(len(ms))
        a1.bar(x - 0.2, [result["linear"]["test"][m] for m in ms], 0.4, label="linear (ridge)")
        a1.bar(x + 0.2, [result["mlp"]["test"][m] for m in ms], 0.4,
               label=f"MLP ({result['mlp']['hidden']} ReLU)")
        a1.set_xticks(x, ["test R²", "test spearman", "test prox. error"])
        a1.set_title(f"layer {result['layer']}")
        a1.grid(alpha=0.3, axis="y")
        a1.legend()
        for r in result["mlp"]["runs"]:
            a2.plot(range(1, len(r["val_curve"]) + 1), r["val_curve"], "o-", ms=3,
                    label=f"wd {r['weight_decay']:g}")
        a2.set_xlabel("epoch")
        a2.set_ylabel("validation MSE (z units)")
        a2.set_title(f"MLP training (chosen wd {result['mlp']['weight_decay']:g})")
        a2.grid(alpha=0.3)
        a2.legend(fontsize=8)
    elif kind == "pca":
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        rows = result["pca"]
        ax.plot([r["k"] for r in rows], [r["test"]["r2"] for r in rows], "o-", label="top-k PCs")
        ax.axhline(result["full"]["test"]["r2"], color="k", ls="--",
                   label=f"full width (d={result['d_model']})")
        ax.set_xscale("log")
        ax.set_xlabel("principal components k")
        ax.set_ylabel(f"test R² ({', '.join(result['targets'])})")
        ax.set_title(f"probes on top-k principal components, layer {result['layer']}")
        ax.grid(alpha=0.3)
        ax.legend()
    else:
        raise ExperimentError(f"unknown experiment kind {kind!r}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def experiment_markdown(key: str, res: dict) -> list[str]:
    """Markdown lines of one experiment's section in the `actstore run` report."""
    if key == "prompts":
        labels = res["prompts"]
        t = res["transfer"]
        lines = ["Each prompt's probe at its best LOO layer (test rows):", ""]
        lines += md_table(["prompt", "layer", "test R²", "Spearman", "proximity error"],
                     [[lbl, res["per_prompt"][lbl]["best_layer"], md_num(t["r2"][i][i]),
                       md_num(t["spearman"][i][i]), md_num(t["proximity_error"][i][i])]
                      for i, lbl in enumerate(labels)])
        lines += ["Transfer: test R² of the probe trained on the row's prompt (at its best "
                  "layer) applied to the column's prompt:", ""]
        lines += md_table(["train \\ test"] + labels,
                     [[lbl] + [md_num(v) for v in t["r2"][i]] for i, lbl in enumerate(labels)])
        return lines
    if key in ("holdout", "entity-type"):
        s = res["summary"]
        places = any("heldout_km_error_median" in r for r in res["groups"])
        lines = [f"Block hold-out by `{res['group_column']}` ({res['group_source']}), layer "
                 f"{res['layer']}: mean proximity error over the {s['n_groups_with_nominal']} "
                 f"groups with test rows: nominal **{md_num(s['nominal_proximity_error'])}**, held "
                 f"out **{md_num(s['heldout_proximity_error'])}** ({len(res['groups'])} groups of "
                 f"{res['n_distinct_groups']}; 0 is perfect).", ""]
        head = ["group", "rows", "prox. nominal", "prox. held out"]
        if places:
            head += ["km nominal", "km held out"]
        rows = []
        for r in res["groups"]:
            row = [str(r["group"])[:30], r["n"], md_num(r["nominal_proximity_error"]),
                   md_num(r["heldout_proximity_error"])]
            if places:
                row += [md_num(r.get("nominal_km_error_median"), ".0f"),
                        md_num(r.get("heldout_km_error_median"), ".0f")]
            rows.append(row)
        return lines + md_table(head, rows)
    if key == "nonlinear":
        m = res["mlp"]
        return [f"Layer {res['layer']}:", ""] + md_table(
            ["probe", "train R²", "test R²", "Spearman", "proximity error"],
            [[f"linear (ridge, alpha {res['linear']['alpha']:.3g})",
              md_num(res["linear"]["train"]["r2"]), md_num(res["linear"]["test"]["r2"]),
              md_num(res["linear"]["test"]["spearman"]), md_num(res["linear"]["test"]["proximity_error"])],
             [f"MLP {m['hidden']} ReLU (weight decay {m['weight_decay']:g})",
              md_num(m["train"]["r2"]), md_num(m["test"]["r2"]), md_num(m["test"]["spearman"]),
              md_num(m["test"]["proximity_error"])]])
    if key == "pca":
        f = res["full"]
        rows = [[r["k"], md_num(r["explained_variance"]), md_num(r["test"]["r2"]),
                 md_num(r["test"]["spearman"]), md_num(r["test"]["proximity_error"])]
                for r in res["pca"]]
        rows.append([f"full ({f['k']})", "1.000", md_num(f["test"]["r2"]), md_num(f["test"]["spearman"]),
                     md_num(f["test"]["proximity_error"])])
        return [f"Layer {res['layer']}, PCA on the train rows:", ""] + md_table(
            ["k", "explained variance", "test R²", "Spearman", "proximity error"], rows)
    return []


EXPERIMENT_TITLES = {"prompts": "Prompt variants", "holdout": "Block hold-out",
                     "entity-type": "Entity-type hold-out",
                     "nonlinear": "Nonlinear (MLP) probe vs linear", "pca": "PCA-k probes"}




EXPERIMENT_TITLES = {"prompts": "Prompt variants", "holdout": "Block hold-out",
                     "entity-type": "Entity-type hold-out",
                     "nonlinear": "Nonlinear (MLP) probe vs linear", "pca": "PCA-k probes"}


def _f(v, spec=".3f"):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


def format_experiment(result: dict) -> str:
    """The short table ``fastprobe experiment`` prints."""
    kind = result["experiment"]
    tg = ",".join(result["targets"])
    out = []
    if kind == "prompts":
        labels = result["prompts"]
        out.append(f"prompts experiment  targets {tg}  train {result['n_train']} / test "
                   f"{result['n_test']} ({result['split']})")
        layers = [e["layer"] for e in result["per_prompt"][labels[0]]["layers"]]
        rows = []
        for i, L in enumerate(layers):
            row = [str(L)]
            for lbl in labels:
                pp = result["per_prompt"][lbl]
                row.append(_f(pp["layers"][i]["test"]["r2"]) + ("*" if pp["best_layer"] == L else ""))
            rows.append(row)
        out += ["test R2 by layer (* = best LOO layer):"] + _table(["layer"] + labels, rows)
        out.append("")
        out.append("best layer per prompt: test R2 / spearman / proximity error")
        out += _table(["prompt", "layer", "R2", "spearman", "prox err"], [
            [lbl, str(result["per_prompt"][lbl]["best_layer"]),
             _f(result["transfer"]["r2"][i][i]), _f(result["transfer"]["spearman"][i][i]),
             _f(result["transfer"]["proximity_error"][i][i])] for i, lbl in enumerate(labels)])
        out.append("")
        out.append("transfer: test R2, probe trained on ROW prompt (at its best layer), applied to "
                   "COLUMN prompt's test rows")
        out += _table(["train \\ test"] + labels, [
            [lbl] + [_f(v) for v in result["transfer"]["r2"][i]] for i, lbl in enumerate(labels)])
    elif kind in ("holdout", "entity_type"):
        places = any("heldout_km_error_median" in r for r in result["groups"])
        out.append(f"block hold-out by {result['group_column']} ({result['group_source']})  "
                   f"targets {tg}  layer {result['layer']} ({result['layer_choice']})  "
                   f"{len(result['groups'])} groups of {result['n_distinct_groups']}  "
                   f"alpha {result['alpha_mode']}  nominal split {result['split']}")
        per_fit = result.get("layer_choice") == "best LOO" and all(
            "heldout_layer" in r for r in result["groups"])
        head = ["group", "rows", "nominal rows", "prox nominal", "prox held-out"]
        if per_fit:
            head.append("held-out layer")
        if places:
            head += ["km nominal", "km held-out"]
        rows = []
        for r in result["groups"]:
            row = [str(r["group"])[:28], str(r["n"]), str(r["n_nominal"]),
                   _f(r["nominal_proximity_error"]), _f(r["heldout_proximity_error"])]
            if per_fit:
                row.append(str(r["heldout_layer"]))
            if places:
                row += [_f(r["nominal_km_error_median"], ".0f"),
                        _f(r["heldout_km_error_median"], ".0f")]
            rows.append(row)
        s = result["summary"]
        mean = [f"mean of {s['n_groups_with_nominal']}", "", "", _f(s["nominal_proximity_error"]),
                _f(s["heldout_proximity_error"])] + ([""] if per_fit else []) \
            + (["", ""] if places else [])
        out += _table(head, rows + [mean])
        out.append("proximity error: fraction of all entities whose prediction is closer to an "
                   "entity's true value than its own prediction (0 is perfect); nominal = the "
                   "group's test rows under the standard split, held-out = the whole group, "
                   "probe fitted without it; mean over groups with nominal rows"
                   + ("; each held-out probe's layer is chosen by LOO without its group"
                      if per_fit else ""))
    elif kind == "nonlinear":
        m = result["mlp"]
        out.append(f"nonlinear probe  targets {tg}  layer {result['layer']} "
                   f"({result['layer_choice']})  train {result['n_train']} / test "
                   f"{result['n_test']} ({result['split']})")
        out += _table(["probe", "train R2", "test R2", "spearman", "prox err"], [
            [name, _f(result[key]["train"]["r2"]), _f(result[key]["test"]["r2"]),
             _f(result[key]["test"]["spearman"]), _f(result[key]["test"]["proximity_error"])]
            for name, key in ((f"linear (alpha {result['linear']['alpha']:.3g})", "linear"),
                              (f"MLP {m['hidden']} (wd {m['weight_decay']:g})", "mlp"))])
        out.append("MLP weight decays: " + ", ".join(
            f"{r['weight_decay']:g}: " + ("diverged" if r.get("diverged") else
                                          f"val MSE {_f(r['best_val_mse'], '.4f')}")
            + f" ({r['epochs']} epochs)" for r in m["runs"]))
    elif kind == "pca":
        out.append(f"PCA probes  targets {tg}  layer {result['layer']} ({result['layer_choice']})  "
                   f"d={result['d_model']}  train {result['n_train']} / test {result['n_test']}")
        rows = [[str(r["k"]), _f(r["explained_variance"]), _f(r["alpha"], ".3g"), _f(r["train_r2"]),
                 _f(r["test"]["r2"]), _f(r["test"]["spearman"]), _f(r["test"]["proximity_error"])]
                for r in result["pca"]]
        f = result["full"]
        rows.append([f"full {f['k']}", "1.000",
                     _f(f["alpha"], ".3g") if not isinstance(f["alpha"], dict) else "-",
                     _f(f["train_r2"]), _f(f["test"]["r2"]), _f(f["test"]["spearman"]),
                     _f(f["test"]["proximity_error"])])
        out += _table(["k", "expl var", "alpha", "train R2", "test R2", "spearman", "prox err"],
                      rows)
        if result["skipped_ks"]:
            out.append(f"skipped k > min(d, n_train - 1): {result['skipped_ks']}")
    else:
        raise ExperimentError(f"unknown experiment kind {kind!r}")
    if "seconds" in result:
        out.append(f"({result['seconds']:.1f} s)")
    return "\n".join(out)
