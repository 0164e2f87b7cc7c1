"""Neurons and probes together: load a fit's probe directions for the store it was made on, and
the cosine of each neuron's output weights with the probe direction of the layer it writes into.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from actstore.errors import StoreError
from actstore.models import decoder_layers, output_weights
from actstore.store import ActivationStore, open_store, store_identity
from probes.errors import FitError, NeuronReportError
from probes.fit import ARRAYS_FILE, load_results
from probes.neurons.model import WEIGHT_KEYS, hf_model, store_model_meta

__all__ = ["load_probe", "add_probe_cosines"]


def _same_path(a, b) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, TypeError):
        return False


def _read_fit(pdir: Path) -> tuple[dict, np.ndarray, list[int]]:
    """(results.json dict, coef (L, d, k) float64, layers) of a ``fastprobe fit --out`` dir,
    once its probes.npz is shown to be the one its results.json describes (the sha256 that
    results.json records: a fit killed between the two files, or another fit's arrays copied
    in, is refused)."""
    try:
        res = load_results(pdir, arrays=True)
    except FitError as exc:
        raise NeuronReportError(f"--probe {pdir}: {exc}") from None
    if res.site not in (None, "resid"):          # None: a results.json from before sites
        raise NeuronReportError(f"--probe {pdir}: the probes were fitted on the {res.site!r} "
                                "array; the neuron projection takes residual-stream probes "
                                "(fastprobe fit without --site)")
    z = res.arrays
    if "coef" not in z or "layers" not in z:
        raise NeuronReportError(f"--probe {pdir}: {ARRAYS_FILE} holds no probe coefficients "
                                "(coef, layers)")
    return res, np.asarray(z["coef"], dtype=np.float64), [int(x) for x in z["layers"]]


def _model_diffs(res: dict, store) -> list[str]:
    """The fit's model against the store's: id and weight hashes, where both record them."""
    smodel = store_model_meta(store)
    pmodel = res.get("model") if isinstance(res.get("model"), dict) else {}
    return [f"model {pmodel.get(k)!r} vs {smodel.get(k)!r}" for k in ("id",) + WEIGHT_KEYS
            if pmodel.get(k) and smodel.get(k) and pmodel[k] != smodel[k]]


def _identity_diffs(ident: dict, store, model_differs: bool) -> list[str]:
    """results.json's ``store_identity`` against this store's (whatever the paths)."""
    have = store_identity(store)
    diffs = []
    for k, label in (("created", "created"), ("dataset_sha256", "dataset sha256"),
                     ("prompt", "prompt"), ("model_id", "model id"), ("n_rows", "rows")):
        if k == "model_id" and model_differs:
            continue   # already said
        if k in ident and ident[k] != have[k]:
            diffs.append(f"{label} {ident[k]!r} vs {have[k]!r}")
    return diffs


def _legacy_diffs(res: dict, store) -> list[str]:
    """An older results.json without ``store_identity``, made on another path: its row count,
    and the dataset sha256 and creation time of the store still at that path, if any."""
    if _same_path(res.get("store", ""), store.path):
        return []
    diffs = []
    if res.get("n_rows") is not None and int(res["n_rows"]) != int(store.rows_done):
        diffs.append(f"{res['n_rows']} rows vs {store.rows_done}")
    other = Path(str(res.get("store", "")))
    if str(res.get("store", "")) and other.exists():
        try:
            ometa = open_store(other).meta or {}
        except (StoreError, OSError):
            ometa = {}
        meta = store.meta if isinstance(store.meta, dict) else {}
        for k, get in (("dataset sha256", lambda m: (m.get("dataset") or {}).get("sha256")),
                       ("created", lambda m: m.get("created"))):
            if get(ometa) != get(meta):
                diffs.append(f"{k} {get(ometa)!r} vs {get(meta)!r}")
    return diffs


def load_probe(probe_dir: str | os.PathLike, store: ActivationStore) -> dict:
    """Probe directions from a ``fastprobe fit --out`` directory made on ``store``.

    Parameters
    ----------
    probe_dir : str or os.PathLike
        The fit's output directory (or its results.json), with the arrays file beside it.
    store : ActivationStore
        The store the fit must come from: results.json's ``store_identity`` (the store's
        creation time, dataset sha256, prompt name, model id and completed rows) must equal
        this store's, whatever the paths, so a copy or a moved store is accepted and a store
        re-extracted at the same path with another prompt or dataset is not. An older
        results.json without it: when the path differs, the store there, if any, must have the
        same dataset sha256 and creation time, and the row count must agree. In any case the
        same model and d_model.

    Returns
    -------
    dict
        "dir", "store", "targets", "layers" (hidden-state indices), "coef": (L, d, k) float64;
        coef[:, :, t] is the probe's weight vector of target t in target units (prediction =
        x · coef + intercept), i.e. its direction in residual space.

    Raises
    ------
    NeuronReportError
        The fit cannot be read, its probes.npz is not the file its results.json describes
        (``arrays_sha256``: another fit's arrays, or a fit killed between the two), or it does
        not belong to ``store`` (the message says what differs).
    """
    pdir = Path(probe_dir)
    res, coef, lay = _read_fit(pdir)
    what = f"--probe {pdir} was fit on {res.get('store')!r}, not on {store.path}"
    if coef.ndim != 3 or coef.shape[1] != store.d_model:
        raise NeuronReportError(f"{what}: its probes have width {coef.shape[1:2]}, the store's "
                                f"d_model is {store.d_model}")
    diffs = _model_diffs(res, store)
    ident = res.get("store_identity")
    diffs += (_identity_diffs(ident, store, bool(diffs)) if isinstance(ident, dict)
              else _legacy_diffs(res, store))
    if diffs:
        if _same_path(res.get("store", ""), store.path):
            what = (f"--probe {pdir} was fit on another store at the same path {store.path} "
                    "(re-extracted since)")
        raise NeuronReportError(f"{what}: {'; '.join(diffs)}")
    return {"dir": str(pdir), "store": res.get("store"), "targets": list(res["targets"]),
            "layers": lay, "coef": coef}


def add_probe_cosines(top_neurons: dict, model, probe: dict) -> None:
    """Add to every listed neuron "probe_layer" and "probe_cosine" = {target: cos} for each
    target of the probe: cos(w_j, c) = w_j · c / (|w_j| |c|), w_j = column j of the down_proj
    weight of the neuron's block (its output direction in residual space) and c the probe's
    coefficient vector at hidden state ``layer`` (the state that block writes into). None where
    the probe has no such layer or either vector is zero."""
    blocks = decoder_layers(hf_model(model))
    d = probe["coef"].shape[1]
    cache = {}

    def out_weights(b):
        if b not in cache:
            cache[b] = output_weights(blocks[b], d)
        return cache[b]

    where = {layer: i for i, layer in enumerate(probe["layers"])}
    for entries in top_neurons.values():
        for e in entries:
            L = int(e["layer"])
            e["probe_layer"] = L
            if L not in where:
                e["probe_cosine"] = {t: None for t in probe["targets"]}
                continue
            w = out_weights(L - 1)[:, int(e["index"])]
            nw = float(np.linalg.norm(w))
            cos = {}
            for ti, t in enumerate(probe["targets"]):
                c = probe["coef"][where[L], :, ti]
                den = nw * float(np.linalg.norm(c))
                cos[t] = float(np.dot(w, c) / den) if den > 0 else None
            e["probe_cosine"] = cos
