"""What the experiments share: reading a layer, the ridge probe and the layer fits, the best
LOO layer, test-style summaries, JSON cleaning and the files, the CLI's small parsers.

``fastprobe --help`` builds its parser from the experiment modules, so they must import
without torch, sklearn or matplotlib: :func:`fit_layers` (probes.fit: torch), :func:`ridge`
and :func:`alpha_grid` (probes.ridge: sklearn) and :func:`pyplot` import them when called.
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np

from actstore.store import open_store
from actstore.store.format import as_compute
from probes.errors import ExperimentError
from probes.metrics import evaluate, latlon_columns, proximity_error
from probes.report import OutputSet, save_figure, write_strict_json

__all__ = ["as_store", "layer_x", "alpha_grid", "ridge", "best_loo_index", "fit_layers",
           "probe_at", "proximity_rows", "summary", "layer_fields", "clean", "write_result",
           "num", "csv_list", "add_store_arguments", "pyplot"]


# ----------------------------------------------------------------------------- data and probes

def as_store(store):
    """An open store: ``store`` itself, or the store at a path."""
    if isinstance(store, (str, os.PathLike)):
        return open_store(store)
    return store


def layer_x(store, layer: int) -> np.ndarray:
    """(rows_done, d) float64 activations of one layer (hidden-state index)."""
    x = as_compute(store.layer(layer), store.dtype).double().numpy()
    if not np.isfinite(x).all():
        r, c = np.argwhere(~np.isfinite(x))[0]
        raise ExperimentError(f"{store.path}: layer {layer} has NaN "
                              f"or inf activations, first at row {r}, dim {c}")
    return x


def alpha_grid(alphas):
    """``alphas``, or the ridge default grid (:data:`probes.ridge.DEFAULT_ALPHAS`) for None."""
    # deferred: probes.ridge imports sklearn (see the module docstring)
    from probes.ridge import DEFAULT_ALPHAS

    return DEFAULT_ALPHAS if alphas is None else alphas


def ridge(alphas, backend):
    """An unfitted ridge probe as ``fastprobe fit``'s: LOO alpha, z-scored targets."""
    # deferred: probes.ridge imports sklearn (see the module docstring)
    from probes.ridge import RidgeProbeCV

    return RidgeProbeCV(alphas=alpha_grid(alphas), cv="loo", standardize_targets=True,
                        backend=backend)


def best_loo_index(per_layer: list[dict]) -> int:
    """Index of the layer with the best LOO score (ties: the lowest position)."""
    return max(range(len(per_layer)),
               key=lambda j: (per_layer[j]["cv_score"], -per_layer[j]["position"]))


def fit_layers(store, names, alphas, split, backend, layers):
    """``fit_all_layers`` on the given layers (None = all), quietly, nothing written."""
    # deferred: probes.fit imports torch (see the module docstring)
    from probes.fit import fit_all_layers

    return fit_all_layers(store, targets=names, alphas=alpha_grid(alphas), split=split,
                          backend=backend, layers=layers)


def probe_at(store, names, alphas, split, backend, layer):
    """The standard-split ridge probe at ``layer`` (None: the best LOO layer of all layers).

    Returns (fit result, index j of the layer in result["layers"])."""
    if layer is None:
        res = fit_layers(store, names, alphas, split, backend, None)
        return res, best_loo_index(res["layers"])
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise ExperimentError(f"layer must be a hidden-state index (an int), got {layer!r}")
    res = fit_layers(store, names, alphas, split, backend, [int(layer)])
    return res, 0


# ----------------------------------------------------------------------------- results

def proximity_rows(Y, P, names) -> np.ndarray:
    """Per-row proximity error over ALL rows given (:func:`probes.metrics.proximity_error`):
    haversine on (latitude, longitude) when both are targets, else euclidean over the targets."""
    ll = latlon_columns(names)
    if ll is not None:
        return proximity_error(Y[:, list(ll)], P[:, list(ll)], "haversine")
    return proximity_error(Y, P, "euclidean")


def summary(Y, P, names) -> dict:
    """Test-style metrics of a set of rows: r2, spearman, proximity error (within those rows)."""
    e = evaluate(Y, P, names)
    out = {"n": e["n"], "r2": e["r2"], "r2_per_target": e["r2_per_target"],
           "spearman": e["spearman"], "pearson": e["pearson"],
           "proximity_error": e["proximity_error"]}
    if "km_error_median" in e:
        out["km_error_median"] = e["km_error_median"]
    return out


def layer_fields(store, layer: int, given) -> dict:
    """The result fields of the layer used: ``layer``, ``position``, ``layer_choice``
    (``given`` when the caller passed one, else ``best LOO``)."""
    return {"layer": int(layer), "position": list(store.layers).index(int(layer)),
            "layer_choice": "given" if given is not None else "best LOO"}


def clean(obj):
    """JSON-safe: numpy scalars to Python, non-finite floats to None."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend."""
    # deferred: matplotlib is slow to import and only the plots need it
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_result(result: dict, out_dir, plot: Callable[[dict], object]) -> list[Path]:
    """Write NAME.png (the figure ``plot(result)``), then NAME.json (``result`` as strict JSON:
    a non-finite number is null, its reason in ``"nulls"``), as one set
    (:class:`probes.report.OutputSet`: a failed write changes neither file); return the paths
    of NAME.json and NAME.png."""
    out = Path(out_dir)
    name = result.get("name") or result["experiment"]
    with OutputSet(out, last=(f"{name}.json",)) as stage:
        fig = plot(result)
        fig.tight_layout()
        save_figure(fig, stage / f"{name}.png")
        write_strict_json(stage / f"{name}.json", result)
    return [out / f"{name}.json", out / f"{name}.png"]


# ----------------------------------------------------------------------------- text and CLI

def num(v, spec=".3f") -> str:
    """A number for a text table: formatted, or "-" when missing or not finite."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


def csv_list(text, conv, what):
    """A comma-separated CLI value as a list of ``conv(item)`` (None stays None)."""
    if text is None:
        return None
    try:
        vals = [conv(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} {text!r}: expected a comma-separated list") from None
    if not vals:
        raise ValueError(f"{what} {text!r} is empty")
    return vals


def add_store_arguments(p: argparse.ArgumentParser) -> None:
    """STORE and --layer: the arguments of every single-store experiment."""
    p.add_argument("store", metavar="STORE", help="activation store (Zarr or .h5)")
    p.add_argument("--layer", type=int, default=None, metavar="L",
                   help="hidden-state index (default: the best LOO layer of all layers)")
