"""Prompt variants: probe quality per layer for one dataset extracted with several prompts (one
store per prompt), and cross-prompt transfer at each prompt's best LOO layer."""
from __future__ import annotations

import os
import time
from functools import partial
from pathlib import Path

import numpy as np

from probes.errors import ExperimentError, InputError
from probes.experiments.base import Experiment, RunContext, StepPlan
from probes.experiments.common import (
    as_store,
    best_loo_index,
    csv_list,
    fit_layers,
    layer_x,
    num,
    pyplot,
    summary,
)
from probes.inputs import parse_split, resolve_targets, target_matrix
from probes.report import md_num, md_table, text_table

__all__ = ["prompt_experiment", "check_same_entities", "EXPERIMENT"]

MATRICES = ("r2", "spearman", "proximity_error")


# ----------------------------------------------------------------------------- the stores

def _meta(store) -> dict:
    return store.meta if isinstance(store.meta, dict) else {}


def _store_label(store, used: set) -> str:
    pr = _meta(store).get("prompt")
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


def _label_stores(stores) -> dict:
    """``{label: open store}`` from a dict, a list or one path (labels: see prompt_experiment)."""
    if isinstance(stores, (str, os.PathLike)):
        stores = [stores]
    if isinstance(stores, dict):
        return {str(k): as_store(v) for k, v in stores.items()}
    opened, used = {}, set()
    for s in stores:
        s = as_store(s)
        lbl = _store_label(s, used)
        used.add(lbl)
        opened[lbl] = s
    return opened


def _dataset_meta(store) -> dict:
    ds = _meta(store).get("dataset")
    return ds if isinstance(ds, dict) else {}


def _model_id(store):
    m = _meta(store).get("model")
    if isinstance(m, dict):
        return m.get("id")
    return m if isinstance(m, str) else None


def _entity_keys(store) -> np.ndarray:
    ent = store.entities
    col = "entity" if "entity" in ent.columns else ("name" if "name" in ent.columns else None)
    if col is None:
        return np.arange(len(ent)).astype(str)
    return ent[col].astype(str).to_numpy()


def _check_provenance(ref, s, where_ref, where_s) -> None:
    """Same dataset, completed rows and model."""
    a, b = _dataset_meta(ref).get("sha256"), _dataset_meta(s).get("sha256")
    if a and b and a != b:
        raise ExperimentError(
            f"stores hold different datasets: {where_ref} has dataset "
            f"{_dataset_meta(ref).get('name')!r} sha256 {a[:12]}..., {where_s} has "
            f"{_dataset_meta(s).get('name')!r} sha256 {b[:12]}...; a prompt comparison needs "
            "one dataset extracted with several prompts")
    if s.rows_done != ref.rows_done:
        raise ExperimentError(
            f"stores differ in completed rows: {where_ref} has {ref.rows_done}, "
            f"{where_s} has {s.rows_done} (resume the shorter extraction, or extract both "
            "with the same --limit)")
    ma, mb = _model_id(ref), _model_id(s)
    if ma and mb and ma != mb:
        raise ExperimentError(f"stores come from different models: {where_ref} from "
                              f"{ma!r}, {where_s} from {mb!r}")


def _check_rows(ref, s, names, ref_keys, where_ref, where_s) -> None:
    """Same entities in the same order, split, layers, width and target values."""
    keys = _entity_keys(s)[: s.rows_done]
    if len(keys) != len(ref_keys) or not np.array_equal(keys, ref_keys):
        i = int(np.nonzero(keys != ref_keys)[0][0]) if len(keys) == len(ref_keys) else 0
        raise ExperimentError(
            f"stores hold different entities or orders: row {i} is {ref_keys[i]!r} in "
            f"{where_ref} but {keys[i]!r} in {where_s}")
    ta = np.asarray(ref.is_test[: ref.rows_done], dtype=bool)
    tb = np.asarray(s.is_test[: s.rows_done], dtype=bool)
    if not np.array_equal(ta, tb):
        i = int(np.nonzero(ta != tb)[0][0])
        raise ExperimentError(f"stores disagree on the is_test split, first at row {i} "
                              f"({where_ref}: {bool(ta[i])}, {where_s}: {bool(tb[i])})")
    if list(s.layers) != list(ref.layers):
        raise ExperimentError(f"stores hold different layer sets: {where_ref} has "
                              f"{list(ref.layers)}, {where_s} has {list(s.layers)}")
    if s.d_model != ref.d_model:
        raise ExperimentError(f"stores differ in width: {where_ref} d_model="
                              f"{ref.d_model}, {where_s} d_model={s.d_model}")
    ya = ref.target_array(names)[: ref.rows_done]
    yb = s.target_array(names)[: s.rows_done]
    if not np.array_equal(ya, yb, equal_nan=True):
        r, c = np.argwhere(~((ya == yb) | (np.isnan(ya) & np.isnan(yb))))[0]
        raise ExperimentError(f"stores disagree on target {names[c]!r} at row {r}: "
                              f"{ya[r, c]} in {where_ref}, {yb[r, c]} in {where_s}")


def check_same_entities(stores: dict, names) -> None:
    """Raise ExperimentError naming the first difference between ``stores`` (label -> store)
    and the first one: dataset sha256, completed rows, model, entity order, is_test split,
    layer set, width, or a target missing from a store."""
    labels = list(stores)
    where = {lbl: f"{lbl!r} ({stores[lbl].path})" for lbl in labels}
    for lbl in labels:
        try:
            resolve_targets(stores[lbl], names)
        except InputError as exc:
            raise ExperimentError(f"store {where[lbl]}: {exc}") from None
    ref_label, ref = labels[0], stores[labels[0]]
    ref_keys = _entity_keys(ref)[: ref.rows_done]
    for lbl in labels[1:]:
        _check_provenance(ref, stores[lbl], where[ref_label], where[lbl])
        _check_rows(ref, stores[lbl], names, ref_keys, where[ref_label], where[lbl])


# ----------------------------------------------------------------------------- compute

def _prompt_entry(store, res, j) -> dict:
    """One prompt's per-layer table and its best LOO layer (index j)."""
    best = res["layers"][j]
    return {
        "store": str(store.path),
        "best_layer": best["layer"], "best_position": best["position"],
        "best_test_r2": best["test"]["r2"],
        "layers": [{"layer": e["layer"], "position": e["position"], "alpha": e["alpha"],
                    "cv_score": e["cv_score"], "train_r2": e["train"]["r2"],
                    "test": {k: e["test"][k] for k in
                             ("r2", "r2_per_target", "spearman", "proximity_error")}}
                   for e in res["layers"]],
    }


def _transfer(opened, fits, best, layer_of, Y, is_test, names) -> dict:
    """The transfer matrices: rows = train prompt (at its best layer), columns = test prompt.
    Train prompts are grouped by their best layer: each store's test rows of a layer are read
    once."""
    labels = list(opened)
    mats = {m: [[None] * len(labels) for _ in labels] for m in MATRICES}
    for layer in dict.fromkeys(layer_of.values()):
        xs = {lb: layer_x(opened[lb], layer)[is_test] for lb in labels}
        for a, la in enumerate(labels):
            if layer_of[la] != layer:
                continue
            W = fits[la]["arrays"]["coef"][best[la]]           # (d, k), target units
            b = fits[la]["arrays"]["intercept"][best[la]]
            for c, lb in enumerate(labels):
                s = summary(Y[is_test], xs[lb] @ W + b, names)
                for m in mats:
                    mats[m][a][c] = s[m]
        del xs
    return mats


def prompt_experiment(stores, targets=None, layers=None, alphas=None, backend="auto",
                      split="is_test") -> dict:
    """Probe quality per layer for several prompts of ONE dataset, and cross-prompt transfer.

    For each store, ``fit_all_layers`` fits a ridge probe (LOO alpha on the train rows of
    ``split``) on every layer of ``layers`` and scores the test rows (alpha, cv_score, train
    r2, test r2, spearman, proximity error per layer); ``best_layer`` is the best LOO layer.
    Transfer: ``transfer["r2"][a][b]`` is the test R² when the probe fitted on prompt a's train
    rows at a's best layer is applied, unchanged (coefficients and intercept in target units),
    to prompt b's activations of the SAME layer on the test rows. The diagonal is each prompt's
    own test R² at its best layer; ``spearman`` and ``proximity_error`` likewise.

    Parameters
    ----------
    stores : dict or list
        ``{label: store or path}``, one store per prompt with the same entities in the same
        order; or a list (labels: each store's prompt name from its metadata, else its file
        name).
    targets : str or list of str, optional
        Target columns (default: the first store's own).
    layers : list of int, optional
        Hidden-state indices to probe (default: every layer the stores hold).
    alphas : str or sequence of float, optional
        Ridge alpha grid (default: :data:`probes.ridge.DEFAULT_ALPHAS`).
    backend : str
        Statistics backend of the layer fits.
    split : str
        Train/test split spec (:func:`probes.inputs.parse_split`).

    Returns
    -------
    dict
        ``experiment`` "prompts", ``prompts`` (the labels), ``per_prompt`` (label -> per-layer
        table and best layer), ``transfer`` (matrices); every field in docs/experiments.md.

    Raises
    ------
    ExperimentError
        Fewer than 2 stores, or stores that disagree (dataset sha256, completed rows, model,
        entity order, is_test, layer set, width, target values) or lack a target.
    """
    t0 = time.perf_counter()
    opened = _label_stores(stores)
    if len(opened) < 2:
        raise ExperimentError(f"a prompt comparison needs at least 2 stores (one per prompt), got "
                              f"{len(opened)}")
    labels = list(opened)
    first = opened[labels[0]]
    names, Y = target_matrix(first, targets)
    check_same_entities(opened, names)
    n = Y.shape[0]
    is_test = parse_split(split, first, n)
    fits = {lbl: fit_layers(opened[lbl], names, alphas, split, backend, layers) for lbl in labels}
    best = {lbl: best_loo_index(fits[lbl]["layers"]) for lbl in labels}
    per_prompt = {lbl: _prompt_entry(opened[lbl], fits[lbl], best[lbl]) for lbl in labels}
    layer_of = {lbl: per_prompt[lbl]["best_layer"] for lbl in labels}
    mats = _transfer(opened, fits, best, layer_of, Y, is_test, names)
    return {
        "experiment": "prompts", "name": "prompts",
        "prompts": labels, "targets": names, "split": split, "n_rows": n,
        "n_train": int((~is_test).sum()), "n_test": int(is_test.sum()),
        "dataset": _dataset_meta(first).get("name"),
        "per_prompt": per_prompt,
        "transfer": {"train_prompts": labels, "test_prompts": labels, "layer": layer_of, **mats},
        "seconds": time.perf_counter() - t0,
    }


# ----------------------------------------------------------------------------- outputs

def text(result: dict) -> list[str]:
    """Test R² by layer per prompt, each prompt at its best layer, and the transfer matrix."""
    labels, t = result["prompts"], result["transfer"]
    out = [f"prompts experiment  targets {','.join(result['targets'])}  train "
           f"{result['n_train']} / test {result['n_test']} ({result['split']})"]
    rows = []
    for i, L in enumerate(e["layer"] for e in result["per_prompt"][labels[0]]["layers"]):
        row = [str(L)]
        for lbl in labels:
            pp = result["per_prompt"][lbl]
            row.append(num(pp["layers"][i]["test"]["r2"]) + ("*" if pp["best_layer"] == L else ""))
        rows.append(row)
    out += ["test R2 by layer (* = best LOO layer):"] + text_table(["layer"] + labels, rows)
    out += ["", "best layer per prompt: test R2 / spearman / proximity error"]
    out += text_table(["prompt", "layer", "R2", "spearman", "prox err"], [
        [lbl, str(result["per_prompt"][lbl]["best_layer"]), num(t["r2"][i][i]),
         num(t["spearman"][i][i]), num(t["proximity_error"][i][i])]
        for i, lbl in enumerate(labels)])
    out += ["", "transfer: test R2, probe trained on ROW prompt (at its best layer), applied to "
                "COLUMN prompt's test rows"]
    out += text_table(["train \\ test"] + labels,
                      [[lbl] + [num(v) for v in t["r2"][i]] for i, lbl in enumerate(labels)])
    return out


def _plot_transfer(fig, ax, result: dict) -> None:
    labels = result["prompts"]
    M = np.array([[np.nan if v is None else v for v in row] for row in result["transfer"]["r2"]],
                 dtype=float)
    # transfer across prompts can be far below 0; clip the colour scale at -1
    lo = max(-1.0, min(0.0, float(np.nanmin(M)))) if np.isfinite(M).any() else 0.0
    im = ax.imshow(M, cmap="viridis", vmin=lo, vmax=1)
    fig.colorbar(im, ax=ax, label="test R²")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)),
                  [f"{lbl} (L{result['transfer']['layer'][lbl]})" for lbl in labels], fontsize=8)
    for i in range(len(labels)):
        for c in range(len(labels)):
            if np.isfinite(M[i, c]):
                ax.text(c, i, f"{M[i, c]:.2f}", ha="center", va="center", fontsize=7,
                        color="w" if M[i, c] < 0.6 else "k")
    ax.set_xlabel("test prompt")
    ax.set_ylabel("train prompt (its best layer)")
    ax.set_title("cross-prompt transfer")


def plot(result: dict):
    """Test R² by layer per prompt, and the transfer R² matrix."""
    fig, (a1, a2) = pyplot().subplots(1, 2, figsize=(12, 4.8),
                                      gridspec_kw={"width_ratios": [1.3, 1]})
    for lbl in result["prompts"]:
        ls = result["per_prompt"][lbl]["layers"]
        a1.plot([e["layer"] for e in ls], [e["test"]["r2"] for e in ls], "o-", ms=3, label=lbl)
    a1.set_xlabel("layer")
    a1.set_ylabel(f"test R² ({', '.join(result['targets'])})")
    a1.set_title("ridge probe test R² by layer, per prompt")
    a1.grid(alpha=0.3)
    a1.legend(fontsize=8)
    _plot_transfer(fig, a2, result)
    return fig


def markdown(res: dict) -> list[str]:
    """Each prompt at its best layer, and the transfer R² matrix."""
    labels, t = res["prompts"], res["transfer"]
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


# ----------------------------------------------------------------------------- CLI and pipeline

EPILOG = """\
example:
  fastprobe experiment prompts w-empty.zarr w-coords.zarr --target latitude,longitude --out exp
  fastprobe experiment prompts a.zarr b.zarr --names empty,coords --layers 4,8,12 --out exp
The stores must hold the same dataset (sha256), rows, entity order, split, layers and width.
"""


def add_arguments(p) -> None:
    p.add_argument("stores", metavar="STORE", nargs="+",
                   help="one store per prompt, same dataset and entities")
    p.add_argument("--names", metavar="A,B,...", default=None,
                   help="labels for the stores (default: each store's prompt name)")
    p.add_argument("--layers", metavar="L,M,...", default=None,
                   help="hidden-state indices to probe (default all the store holds)")


def from_args(args, common: dict) -> dict:
    stores = args.stores
    names = csv_list(args.names, str, "--names")
    if names is not None:
        if len(names) != len(stores):
            raise ValueError(f"--names gives {len(names)} names for {len(stores)} stores")
        stores = dict(zip(names, stores))
    return prompt_experiment(stores, layers=csv_list(args.layers, int, "--layers"), **common)


def plan(ctx: RunContext) -> StepPlan | None:
    """Every prompt's store of the dataset; a note when it has one prompt only (nothing at all
    when the user did not name the experiment and no prompt was skipped)."""
    stores = tuple(ctx.prompt_stores.values())
    if len(ctx.prompt_stores) >= 2:
        return StepPlan({}, partial(prompt_experiment, dict(ctx.prompt_stores),
                                    backend=ctx.backend), stores=stores)
    if ctx.all_experiments and not ctx.skipped_prompts:
        return None
    return StepPlan({}, note="one prompt only" + (
        f" ({', '.join(ctx.skipped_prompts)} do not apply to {ctx.dataset_kind})"
        if ctx.skipped_prompts else "; add variants with --prompts empty,coords,..."),
        stores=stores)


EXPERIMENT = Experiment(
    key="prompts", kind="prompts", title="Prompt variants",
    help="probe quality by layer across prompt variants, cross-prompt transfer", epilog=EPILOG,
    compute=prompt_experiment, add_arguments=add_arguments, from_args=from_args, plan=plan,
    text=text, plot=plot, markdown=markdown)
