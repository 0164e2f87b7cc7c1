"""What a fit gives back, :class:`FitResult`, and the files it writes (:func:`write_results`):
results.json (written last, so that it always describes the files beside it), probes.npz, the
best layer's predictions and the plots, every one through ``actstore.io``'s atomic writer."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from actstore.io import write_atomic, write_json
from actstore.store.format import store_identity
from probes import metrics, report
from probes.errors import FitError

__all__ = ["FitResult", "write_results", "load_results", "layer_entries", "store_identity",
           "RESULTS_FILE", "ARRAYS_FILE", "PREDICTIONS_FILE"]

RESULTS_FILE = "results.json"
ARRAYS_FILE = "probes.npz"
PREDICTIONS_FILE = "predictions_best_layer.csv"


@dataclasses.dataclass(frozen=True, eq=False)
class FitResult(Mapping):
    """The ridge probes of every layer of a store, scored: results.json plus the arrays.

    Every field but ``arrays`` is a key of results.json, in its order (:meth:`to_json`).
    Compatibility path: a FitResult is also a read-only mapping over those keys and
    ``"arrays"`` (``res["layers"]``, ``res["arrays"]["coef"]``, ``res.get("best_layer")``),
    as the dict that ``fit_all_layers`` returned before 0.2.

    Parameters
    ----------
    store, model, store_identity : str, object, dict
        The store's path, its metadata's model entry, and its identity
        (:func:`actstore.store.format.store_identity`).
    n_rows, d_model, n_train, n_test : int
        Rows fitted (the store's completed rows), width, train and test rows.
    targets, split, cv, alpha_per_target, alphas : list, str, "loo" or int, bool, list
        What was fitted, as :class:`probes.fit.FitConfig` said (the grid as parsed).
    target_mean, target_std : list of float
        The train statistics the targets were z-scored with.
    backend, precision, stats_precision, form : str
        How: the statistics backend, the solve's precision, the statistics' precision
        (float32 on the GPU kernels) and "primal" or "dual".
    best_layer, best_position : int
        The layer with the best test R² (ties: the lowest) and its position in the store.
    seconds : dict
        total, stats, solve, projection, metrics.
    layers : list of dict
        Per layer: layer, position, alpha, cv_score, alpha_at_grid_edge, train and test metrics.
    arrays : dict of numpy.ndarray, optional
        coef (L, d, k) and intercept (L, k) in target units, alpha (L, k), cv_scores (L, A, k),
        predictions (L, n, k), is_test (n,), layers (L,); None for a result read back from
        results.json.
    """

    store: str
    model: Any
    store_identity: dict | None
    n_rows: int
    d_model: int
    targets: list[str]
    split: str
    n_train: int
    n_test: int
    cv: str | int
    alpha_per_target: bool
    alphas: list[float]
    target_mean: list[float]
    target_std: list[float]
    backend: str
    precision: str
    stats_precision: str
    form: str
    best_layer: int
    best_position: int
    seconds: dict
    layers: list[dict]
    arrays: dict[str, np.ndarray] | None = None

    def to_json(self) -> dict:
        """results.json's content (every field but ``arrays``, in order)."""
        return {name: getattr(self, name) for name in _JSON_FIELDS}

    @classmethod
    def from_json(cls, doc: Mapping) -> FitResult:
        """The result a results.json holds (keys it lacks, from older versions, are None)."""
        return cls(**{name: doc.get(name) for name in _JSON_FIELDS})

    def __getitem__(self, key: str):
        if key in _JSON_FIELDS or (key == "arrays" and self.arrays is not None):
            return getattr(self, key)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        yield from _JSON_FIELDS
        if self.arrays is not None:
            yield "arrays"

    def __len__(self) -> int:
        return len(_JSON_FIELDS) + (self.arrays is not None)

    __eq__ = object.__eq__           # not Mapping's: the arrays have no single truth value
    __hash__ = object.__hash__


_JSON_FIELDS = tuple(f.name for f in dataclasses.fields(FitResult) if f.name != "arrays")


def layer_entries(problem, layer_ids: list[int], positions: list[int], alpha_idx: np.ndarray,
                  best: np.ndarray, preds: np.ndarray, alpha_per_target: bool) -> list[dict]:
    """results.json ``layers``: per layer its alpha(s), CV score(s), whether an alpha sits at
    the edge of the grid, and the train and test metrics of ``preds`` (L, n, k), target units."""
    names, A = problem.names, len(problem.alphas)
    Y, test, train = problem.Y, problem.is_test, problem.train
    out = []
    for j, layer in enumerate(layer_ids):
        a, score = problem.alphas[alpha_idx[j]], np.ravel(best[j])
        out.append({
            "layer": int(layer),
            "position": positions[j],
            "alpha": ({nm: float(v) for nm, v in zip(names, a)} if alpha_per_target
                      else float(a[0])),
            "cv_score": ({nm: float(v) for nm, v in zip(names, score)} if alpha_per_target
                         else float(score[0])),
            "alpha_at_grid_edge": bool(np.any((alpha_idx[j] == 0) | (alpha_idx[j] == A - 1))),
            "train": metrics.evaluate(Y[train], preds[j][train], names),
            "test": metrics.evaluate(Y[test], preds[j][test], names),
        })
    return out


def write_results(result: Mapping, out, store=None) -> Path:
    """Write a fit's files into the directory ``out`` (created).

    Parameters
    ----------
    result : FitResult or mapping
        The fit (a results.json dict, with "arrays" for probes.npz).
    out : str or Path
        The output directory.
    store : ActivationStore, optional
        The store fitted: with it, the best layer's predictions CSV and the PNG plots are
        written too, and ``store_identity`` is taken from it when the result lacks it.

    Returns
    -------
    Path
        ``out``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {key: result[key] for key in result.keys() if key != "arrays"}
    if store is not None and doc.get("store_identity") is None:
        doc["store_identity"] = store_identity(store)
    arr = result.get("arrays")
    if arr is not None:
        write_atomic(out / ARRAYS_FILE, lambda f: np.savez_compressed(
            f, coef=arr["coef"].astype(np.float32), intercept=arr["intercept"],
            alpha=arr["alpha"], layers=arr["layers"], cv_scores=arr["cv_scores"]))
        if store is not None:
            df = _predictions_table(doc, arr, store)
            write_atomic(out / PREDICTIONS_FILE, df.to_csv(index=False))
            report.make_plots(doc, df, out, group_columns=list(store.group_columns or ()))
    # last, so that a results.json always sits beside the arrays and plots it describes
    write_json(out / RESULTS_FILE, doc, indent=1)
    return out


def _predictions_table(doc: dict, arr: dict, store) -> pd.DataFrame:
    """True and predicted targets of every row at the best layer, with the group columns."""
    j = [e["position"] for e in doc["layers"]].index(doc["best_position"])
    ent = store.entities.iloc[:doc["n_rows"]].reset_index(drop=True)
    df = pd.DataFrame({"name": ent["name"] if "name" in ent.columns else ent.index})
    for c in store.group_columns or ():
        if c in ent.columns:
            df[c] = ent[c]
    df["is_test"] = arr["is_test"]
    for i, t in enumerate(doc["targets"]):
        df[t] = ent[t].to_numpy()
        df[f"pred_{t}"] = arr["predictions"][j][:, i]
    return df


def load_results(path) -> FitResult:
    """The :class:`FitResult` of a fit output directory (or of its results.json), without
    arrays; FitError when there is none or it does not parse."""
    p = Path(path)
    if p.is_dir():
        p = p / RESULTS_FILE
    if not p.exists():
        raise FitError(f"{p}: no such results file (run `fastprobe fit ... --out DIR` first)")
    try:
        return FitResult.from_json(json.loads(p.read_text()))
    except json.JSONDecodeError as exc:
        raise FitError(f"{p}: not a valid results.json ({exc})") from None
