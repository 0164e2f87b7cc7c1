"""Block hold-out (the paper's generalization table): per group of a column (country, state,
borough, century, entity type ...), a probe fitted without the group against the standard-split
probe, both scored by proximity error on the group's rows. Two experiments: ``holdout`` (any
group column) and ``entity-type`` (the ``entity_type`` column)."""
from __future__ import annotations

import math
import time
from functools import partial

import numpy as np
import pandas as pd

from probes.errors import ExperimentError
from probes.experiments.base import Experiment, RunContext, StepPlan
from probes.experiments.common import (
    add_store_arguments,
    as_store,
    csv_list,
    layer_fields,
    layer_x,
    num,
    probe_at,
    proximity_rows,
    pyplot,
    ridge,
)
from probes.inputs import parse_split, target_matrix
from probes.metrics import haversine_km, latlon_columns
from probes.report import md_num, md_table, text_table

__all__ = ["holdout_experiment", "entity_type_experiment", "group_labels", "holdout_column",
           "HOLDOUT", "ENTITY_TYPE"]

DERIVED_GROUPS = {"century": 100, "decade": 10}
HOLDOUT_MIN_GROUP = 10       # groups with fewer rows are skipped (the CLI's and actstore run's)
HOLDOUT_MAX_GROUPS = 20      # largest groups first (the CLI's default and actstore run's)
# actstore run: the block hold-out's natural group column per dataset kind, first one present
# wins ("century" = floor(year / 100) * 100, derived by group_labels)
HOLDOUT_COLUMNS = {
    "world_place": ("country",),
    "us_place": ("state_name", "state"),
    "nyc_place": ("borough_name", "borough"),
    "historical_figure": ("death_century", "century"),
    "art": ("century",),
    "headline": ("pub_year", "century"),   # the headlines span one century: years are the blocks
}
LAYER_GIVEN = ("given: the nominal and every held-out probe use the layer the caller chose "
               "(the caller is responsible for choosing it without the held-out groups)")
LAYER_PER_FIT = ("per fit, by LOO on that fit's own rows: the nominal probe at the best LOO layer "
                 "over the split's train rows (`layer`); each held-out probe at the best LOO "
                 "layer over the rows outside its group (`heldout_layer`), so a held-out group "
                 "never influences the layer of the probe it is tested with")


# ----------------------------------------------------------------------------- groups

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


def _choose_groups(count: dict, col: str, n: int, min_group_size, max_groups, groups) -> list:
    """The groups held out: exactly ``groups``, else those with >= ``min_group_size`` rows
    that leave >= 3 rows outside, largest first, at most ``max_groups``."""
    if groups is not None:
        chosen = [str(g) for g in groups]
        missing = [g for g in chosen if g not in count]
        if missing:
            raise ExperimentError(f"group(s) {missing} not found in column {col!r}; its values "
                                  f"include {sorted(count, key=lambda g: -count[g])[:10]}")
        tiny = [g for g in chosen if n - count[g] < 3]
        if tiny:
            raise ExperimentError(f"group(s) {tiny} leave fewer than 3 rows to train on")
        return chosen
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
    return chosen


def _groups(store, group_column, n, min_group_size, max_groups, groups):
    """(row labels, column, source, number of distinct groups, the groups held out)."""
    lab, col, source = group_labels(store, str(group_column))
    values, counts = np.unique(lab, return_counts=True)
    if len(values) < 2:
        raise ExperimentError(f"{store.path}: group column {col!r} has only one group "
                              f"({values[0]!r}, all {n} rows); a hold-out needs at least 2")
    chosen = _choose_groups(dict(zip(values.tolist(), counts.tolist())), col, n,
                            min_group_size, max_groups, groups)
    return lab, col, source, len(values), chosen


def _alpha_grid(alpha, alphas):
    """(fixed?, the grid): ``[alpha]`` when one is given, else the LOO grid ``alphas``."""
    if alpha is None:
        return False, alphas
    if not (math.isfinite(float(alpha)) and float(alpha) > 0):
        raise ExperimentError(f"alpha must be finite and > 0, got {alpha!r}")
    return True, [float(alpha)]


# ----------------------------------------------------------------------------- compute

def _heldout_fits(store, Y, masks, grid, backend, layers) -> dict:
    """For each group g (masks: g -> (n,) bool rows of g): the ridge probe fitted on the rows
    outside g (alpha by LOO over ``grid`` on those rows) at the layer of ``layers`` whose
    chosen alpha has the best LOO score on those same rows (ties: the first layer), with
    its predictions for every row. Each layer is read once; one fit per group and layer.
    Returns g -> {"layer", "alpha", "cv_score", "P" (n, k)}."""
    n = Y.shape[0]
    best = {}
    for layer in layers:
        X = layer_x(store, layer)
        for g, m in masks.items():
            probe = ridge(grid, backend).fit(X[~m], Y[~m])
            sc = float(probe.best_score_)
            if g not in best or sc > best[g]["cv_score"]:
                best[g] = {"layer": int(layer), "alpha": float(probe.alpha_), "cv_score": sc,
                           "P": probe.predict(X).reshape(n, -1)}
        del X
    return best


def _mae(Y, P, names) -> dict:
    return {t: float(v) for t, v in zip(names, np.abs(Y - P).mean(0))}


def _median_km(Y, P, ll) -> float:
    a, o = ll
    return float(np.median(haversine_km(Y[:, a], Y[:, o], P[:, a], P[:, o])))


def _group_entry(g, m, h, nominal, Y, names, store) -> dict:
    """One group's row: held-out probe ``h`` (see _heldout_fits) on the group's rows ``m``
    against the nominal probe (``nominal``: predictions "P", per-row proximity "prox",
    "is_test") on the group's test rows."""
    P, P_nom = h["P"], nominal["P"]
    prox = proximity_rows(Y, P, names)
    nm = m & nominal["is_test"]
    entry = {
        "group": g, "n": int(m.sum()), "n_nominal": int(nm.sum()),
        "alpha": h["alpha"],
        "heldout_layer": h["layer"],
        "heldout_position": list(store.layers).index(h["layer"]),
        "heldout_cv_score": h["cv_score"],
        "heldout_proximity_error": float(prox[m].mean()),
        "nominal_proximity_error": float(nominal["prox"][nm].mean()) if nm.any() else None,
        "heldout_mae_per_target": _mae(Y[m], P[m], names),
        "nominal_mae_per_target": _mae(Y[nm], P_nom[nm], names) if nm.any() else None,
    }
    ll = latlon_columns(names)
    if ll is not None:
        entry["heldout_km_error_median"] = _median_km(Y[m], P[m], ll)
        entry["nominal_km_error_median"] = _median_km(Y[nm], P_nom[nm], ll) if nm.any() else None
    return entry


def _groups_summary(rows: list[dict]) -> dict:
    """Means over the groups that have nominal rows (the table's last line), and the held-out
    mean over all groups."""
    both = [r for r in rows if r["nominal_proximity_error"] is not None]
    return {
        "n_groups": len(rows), "n_groups_with_nominal": len(both),
        "heldout_proximity_error": (float(np.mean([r["heldout_proximity_error"] for r in both]))
                                    if both else None),
        "nominal_proximity_error": (float(np.mean([r["nominal_proximity_error"] for r in both]))
                                    if both else None),
        "heldout_proximity_error_all_groups": float(np.mean(
            [r["heldout_proximity_error"] for r in rows])),
    }


def holdout_experiment(store, group_column, layer=None, targets=None,
                       min_group_size=HOLDOUT_MIN_GROUP, max_groups=None, alphas=None,
                       backend="auto", split="is_test", alpha=None, groups=None) -> dict:
    """Block hold-out: does the probe generalize to a whole group it never saw?

    Nominal probe: ridge on the train rows of ``split``; held-out probe of group g: ridge on ALL
    rows outside g; alpha by LOO on each probe's rows, or the fixed ``alpha``. Per group: mean
    per-row proximity error (over all n rows, the paper's "combined" error) of the held-out
    probe on g's rows and of the nominal probe on g's TEST rows; ``summary``: their means.
    ``layer=None``: each probe's layer chosen by LOO on its own fitting rows, so a held-out
    group never picks the layer it is tested with. Definitions: docs/experiments.md.

    Parameters
    ----------
    store : ActivationStore or path
        The store.
    group_column : str
        A column of the entity table, or a group derived from a numeric target
        (``<target>_century``, ``<target>_decade``; see :func:`group_labels`).
    layer : int, optional
        Hidden-state index of every probe (default: chosen per probe by LOO, see above).
    targets : str or list of str, optional
        Target columns (default: the store's own).
    min_group_size : int
        Groups with fewer rows (or leaving fewer than 3 outside) are skipped.
    max_groups : int, optional
        At most this many groups, largest first (None: all).
    alphas : str or sequence of float, optional
        Ridge alpha grid for LOO (default: :data:`probes.ridge.DEFAULT_ALPHAS`).
    backend : str
        Statistics backend of the layer fits.
    split : str
        The nominal train/test split (:func:`probes.inputs.parse_split`).
    alpha : float, optional
        One fixed alpha for every probe instead of LOO.
    groups : list of str, optional
        Exactly these groups (overrides ``min_group_size`` and ``max_groups``).

    Returns
    -------
    dict
        ``experiment`` "holdout" ("entity_type" for that column), ``name`` ``holdout_<column>``,
        ``groups`` (one row per group), ``summary``, ``layer_selection`` (the layer rule) ...

    Raises
    ------
    ExperimentError
        Unknown column, one group only, no group large enough, unknown ``groups``, bad options.
    """
    t0 = time.perf_counter()
    store = as_store(store)
    names, Y = target_matrix(store, targets)
    n = Y.shape[0]
    lab, col, source, n_values, chosen = _groups(store, group_column, n, min_group_size,
                                                 max_groups, groups)
    fixed, grid = _alpha_grid(alpha, alphas)
    res, j = probe_at(store, names, grid, split, backend, layer)
    chosen_layer = res["layers"][j]["layer"]
    is_test = parse_split(split, store, n)
    P_nom = res["arrays"]["predictions"][j]
    nominal = {"P": P_nom, "prox": proximity_rows(Y, P_nom, names), "is_test": is_test}
    masks = {g: lab == g for g in chosen}
    heldout = _heldout_fits(store, Y, masks, grid, backend,
                            [chosen_layer] if layer is not None else list(store.layers))
    rows = [_group_entry(g, masks[g], heldout[g], nominal, Y, names, store) for g in chosen]
    kind = "entity_type" if col == "entity_type" else "holdout"
    return {
        "experiment": kind, "name": "entity_type" if kind == "entity_type" else f"holdout_{col}",
        "store": str(store.path), "group_column": col, "group_source": source,
        "targets": names, "split": split, "n_rows": n,
        "n_train": int((~is_test).sum()), "n_test": int(is_test.sum()),
        **layer_fields(store, chosen_layer, layer),
        "layer_selection": (LAYER_GIVEN if layer is not None else LAYER_PER_FIT),
        "alpha_mode": "fixed" if fixed else "LOO",
        "nominal_alpha": res["layers"][j]["alpha"],
        "min_group_size": int(min_group_size) if groups is None else None,
        "max_groups": None if max_groups is None else int(max_groups),
        "n_distinct_groups": n_values,
        "groups": rows, "summary": _groups_summary(rows),
        "seconds": time.perf_counter() - t0,
    }


def entity_type_experiment(store, layer=None, targets=None, min_group_size=HOLDOUT_MIN_GROUP,
                           max_groups=None, alphas=None, backend="auto", split="is_test",
                           alpha=None, groups=None) -> dict:
    """Entity-type hold-out: fit on every other entity type, test on the held-out one (e.g.
    cities vs structures).

    Parameters
    ----------
    store, layer, targets, min_group_size, max_groups, alphas, backend, split, alpha, groups
        As :func:`holdout_experiment`.

    Returns
    -------
    dict
        :func:`holdout_experiment` with ``group_column="entity_type"``: ``experiment`` and
        ``name`` are "entity_type".

    Raises
    ------
    ExperimentError
        As :func:`holdout_experiment` (e.g. a store with one entity type).
    """
    return holdout_experiment(store, "entity_type", layer=layer, targets=targets,
                              min_group_size=min_group_size, max_groups=max_groups, alphas=alphas,
                              backend=backend, split=split, alpha=alpha, groups=groups)


# ----------------------------------------------------------------------------- outputs

def _per_fit(result: dict) -> bool:
    """Whether each held-out probe chose its own layer (the table then shows it)."""
    return result.get("layer_choice") == "best LOO" and all(
        "heldout_layer" in r for r in result["groups"])


def _text_rows(result: dict, per_fit: bool, places: bool) -> list[list[str]]:
    rows = []
    for r in result["groups"]:
        row = [str(r["group"])[:28], str(r["n"]), str(r["n_nominal"]),
               num(r["nominal_proximity_error"]), num(r["heldout_proximity_error"])]
        if per_fit:
            row.append(str(r["heldout_layer"]))
        if places:
            row += [num(r["nominal_km_error_median"], ".0f"),
                    num(r["heldout_km_error_median"], ".0f")]
        rows.append(row)
    s = result["summary"]
    rows.append([f"mean of {s['n_groups_with_nominal']}", "", "",
                 num(s["nominal_proximity_error"]), num(s["heldout_proximity_error"])]
                + ([""] if per_fit else []) + (["", ""] if places else []))
    return rows


def text(result: dict) -> list[str]:
    """Nominal and held-out proximity error per group, their means, and what they mean."""
    places = any("heldout_km_error_median" in r for r in result["groups"])
    per_fit = _per_fit(result)
    head = ["group", "rows", "nominal rows", "prox nominal", "prox held-out"]
    head += (["held-out layer"] if per_fit else []) + (["km nominal", "km held-out"]
                                                       if places else [])
    return ([f"block hold-out by {result['group_column']} ({result['group_source']})  "
             f"targets {','.join(result['targets'])}  layer {result['layer']} "
             f"({result['layer_choice']})  {len(result['groups'])} groups of "
             f"{result['n_distinct_groups']}  alpha {result['alpha_mode']}  nominal split "
             f"{result['split']}"]
            + text_table(head, _text_rows(result, per_fit, places))
            + ["proximity error: fraction of all entities whose prediction is closer to an "
               "entity's true value than its own prediction (0 is perfect); nominal = the "
               "group's test rows under the standard split, held-out = the whole group, "
               "probe fitted without it; mean over groups with nominal rows"
               + ("; each held-out probe's layer is chosen by LOO without its group"
                  if per_fit else "")])


def plot(result: dict):
    """Nominal and held-out proximity error per group (bars)."""
    rows = result["groups"]
    fig, ax = pyplot().subplots(figsize=(max(6, 0.45 * len(rows) + 2), 4.5))
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
    return fig


def markdown(res: dict) -> list[str]:
    """The mean errors in a sentence, then one row per group."""
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


# ----------------------------------------------------------------------------- CLI

HOLDOUT_EPILOG = """\
examples:
  fastprobe experiment holdout w.zarr --group country --out exp
  fastprobe experiment holdout us.zarr --group state_name --min-group-size 20 --layer 10 --out exp
  fastprobe experiment holdout art.zarr --group decade --out exp
  fastprobe experiment holdout figures.zarr --group year_century --alpha 3000 --out exp
Groups: a column of the entity table, or <target>_century / <target>_decade derived from a
numeric target (century/decade alone mean year_century/year_decade when no such column exists).
"""
ENTITY_TYPE_EPILOG = """\
examples:
  fastprobe experiment entity-type us.zarr --out exp
  fastprobe experiment entity-type w.zarr --groups structure,natural_place --out exp
"""


def _add_group_arguments(p) -> None:
    p.add_argument("--min-group-size", type=int, default=HOLDOUT_MIN_GROUP, metavar="N",
                   help="groups with fewer rows are skipped (default %(default)s)")
    p.add_argument("--max-groups", type=int, default=HOLDOUT_MAX_GROUPS, metavar="N",
                   help="at most N groups, largest first; 0 = all (default %(default)s)")
    p.add_argument("--groups", metavar="G1,G2,...", default=None,
                   help="exactly these groups instead (overrides the two above)")
    p.add_argument("--alpha", type=float, default=None,
                   help="fixed alpha for every probe instead of LOO (the paper used one "
                        "alpha per model)")


def add_holdout_arguments(p) -> None:
    add_store_arguments(p)
    p.add_argument("--group", required=True, metavar="COLUMN",
                   help="group column: country, state_name, borough_name, decade, "
                        "death_century, year_century, entity_type...")
    _add_group_arguments(p)


def add_entity_type_arguments(p) -> None:
    add_store_arguments(p)
    _add_group_arguments(p)


def _group_kwargs(args, common: dict) -> dict:
    return dict(layer=args.layer, min_group_size=args.min_group_size,
                max_groups=args.max_groups or None, alpha=args.alpha,
                groups=csv_list(args.groups, str, "--groups"), **common)


def holdout_from_args(args, common: dict) -> dict:
    return holdout_experiment(args.store, args.group, **_group_kwargs(args, common))


def entity_type_from_args(args, common: dict) -> dict:
    return entity_type_experiment(args.store, **_group_kwargs(args, common))


# ----------------------------------------------------------------------------- actstore run

def holdout_column(store) -> tuple[str | None, str]:
    """(the block hold-out's group column for this store's kind, or None and why not)."""
    kind = (store.meta.get("dataset") or {}).get("kind")
    cols = set(store.entities.columns)
    cands = HOLDOUT_COLUMNS.get(kind, ("century",))
    for c in cands:
        if c in cols or (c == "century" and "year" in cols):
            return c, ""
    return None, (f"no natural group column for kind {kind!r} (looked for "
                  f"{', '.join(cands)})")


def plan_holdout(ctx: RunContext) -> StepPlan:
    """At the main fit's best layer, on the dataset kind's natural group column."""
    col, note = holdout_column(ctx.store)
    if col is None:
        return StepPlan({"layer": ctx.layer}, note=note)
    return StepPlan({"layer": ctx.layer, "group_column": col, "max_groups": HOLDOUT_MAX_GROUPS,
                     "min_group_size": HOLDOUT_MIN_GROUP},
                    partial(holdout_experiment, ctx.store, col, layer=ctx.layer,
                            min_group_size=HOLDOUT_MIN_GROUP, max_groups=HOLDOUT_MAX_GROUPS,
                            backend=ctx.backend))


def plan_entity_type(ctx: RunContext) -> StepPlan:
    """At the main fit's best layer, when the dataset has two entity types or more."""
    store = ctx.store
    types = store.entities["entity_type"].astype(str)[: store.rows_done].unique()
    if len(types) < 2:
        return StepPlan({"layer": ctx.layer},
                        note=f"one entity type ({types[0] if len(types) else 'none'})")
    return StepPlan({"layer": ctx.layer, "min_group_size": HOLDOUT_MIN_GROUP},
                    partial(entity_type_experiment, store, layer=ctx.layer,
                            min_group_size=HOLDOUT_MIN_GROUP, backend=ctx.backend))


HOLDOUT = Experiment(
    key="holdout", kind="holdout", title="Block hold-out",
    help="block hold-out by a group column (country, state, century...)", epilog=HOLDOUT_EPILOG,
    compute=holdout_experiment, add_arguments=add_holdout_arguments, from_args=holdout_from_args,
    plan=plan_holdout, text=text, plot=plot, markdown=markdown)

ENTITY_TYPE = Experiment(
    key="entity-type", kind="entity_type", title="Entity-type hold-out",
    help="hold out each entity type in turn", epilog=ENTITY_TYPE_EPILOG,
    compute=entity_type_experiment, add_arguments=add_entity_type_arguments,
    from_args=entity_type_from_args, plan=plan_entity_type, text=text, plot=plot,
    markdown=markdown)
