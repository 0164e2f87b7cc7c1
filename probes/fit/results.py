"""What a fit gives back, :class:`FitResult`, and the files it writes (:func:`write_results`):
probes.npz, the best layer's predictions and the plots, then results.json, strict JSON with the
sha256 of the arrays it describes (checked by :func:`load_results`); written as one set, each
file through ``actstore.io``'s atomic writer."""
from __future__ import annotations

import dataclasses
import json
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from actstore.io import write_atomic
from actstore.store.format import store_identity
from probes import metrics, report
from probes.errors import FitError

__all__ = ["FitResult", "write_results", "load_results", "layer_entries", "store_identity",
           "RESULTS_FILE", "ARRAYS_FILE", "PREDICTIONS_FILE", "DIGEST_KEY"]

RESULTS_FILE = "results.json"
ARRAYS_FILE = "probes.npz"
PREDICTIONS_FILE = "predictions_best_layer.csv"
DIGEST_KEY = "arrays_sha256"   # results.json: {file name: sha256} of the arrays it describes


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
        Rows fitted (the store's completed rows), width (of ``site``), train and test rows.
    site : str
        The store's array the probes were fitted on (None in a results.json older than
        sites: resid).
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
        Per layer: layer, position, alpha, cv_score, alpha_at_grid_edge, train and test
        metrics, row_norms (median, MAD, threshold and the rows above it) and out_of_range
        (predictions outside ``valid_ranges``), :mod:`probes.fit.outliers`.
    row_norm, norm_outliers, valid_ranges : str, dict, dict
        The ``--row-norm`` the probes were fitted with; the rows whose norm is above the
        threshold at some layer (names, split, layers, largest ratio to the median); each
        target's valid range (None in a results.json older than them).
    control : dict or None
        The shuffled-target control (:func:`probes.fit.controls.control_block`): method, seed,
        per layer its test R² and the selectivity; None when fitted with ``control=False``
        (or read from a results.json older than controls).
    arrays : dict of numpy.ndarray, optional
        coef (L, d, k) and intercept (L, k) in target units, alpha (L, k), cv_scores (L, A, k),
        predictions (L, n, k), is_test (n,), layers (L,) (probes.npz holds the same); None
        for a result read back from results.json, unless ``load_results(..., arrays=True)``.
    """

    store: str
    model: Any
    store_identity: dict | None
    n_rows: int
    d_model: int
    site: str | None
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
    row_norm: str | None = None
    norm_outliers: dict | None = None
    valid_ranges: dict | None = None
    control: dict | None = None
    arrays: dict[str, np.ndarray] | None = None

    def to_json(self) -> dict:
        """results.json's fields (every field but ``arrays``, in order), as computed: the file
        adds ``arrays_sha256`` and writes a number that is not finite as null, with its reason
        in ``nulls`` (:func:`write_results`)."""
        return {name: getattr(self, name) for name in _JSON_FIELDS}

    @classmethod
    def from_json(cls, doc: Mapping) -> FitResult:
        """The result a results.json holds (keys it lacks, from older versions, are None; the
        file-only keys ``arrays_sha256`` and ``nulls`` are left out)."""
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
    """Write a fit's files into the directory ``out`` (created), as one set.

    Every file is written to a staging folder first and renamed into ``out`` only when all
    were written, results.json last (:class:`probes.report.OutputSet`): a full disk or a killed
    fit leaves the previous outputs as they were. results.json is strict JSON (a NaN metric is
    null, its reason in ``"nulls"``) and carries ``"arrays_sha256"``: the sha256 of each file
    of arrays it goes with (probes.npz, the predictions CSV), which :func:`load_results`
    checks.

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

    Raises
    ------
    actstore.io.WriteError
        A file could not be written (the message names it); ``out`` is unchanged.
    """
    out = Path(out)
    doc = {key: result[key] for key in result.keys() if key != "arrays"}
    if store is not None and doc.get("store_identity") is None:
        doc["store_identity"] = store_identity(store)
    arr = result.get("arrays")
    with report.OutputSet(out, last=(RESULTS_FILE,)) as stage:
        digests = {}
        if arr is not None:
            # stored, not deflated: the float64 predictions do not compress (a 33-layer,
            # 40,000-row fit: 22.3 MB in 0.14 s stored vs 21.3 MB in 2.6 s deflated)
            digests[ARRAYS_FILE] = _write_hashed(stage / ARRAYS_FILE, lambda f: np.savez(
                f, **_npz_arrays(arr)))
            if store is not None:
                df = _predictions_table(doc, arr, store)
                digests[PREDICTIONS_FILE] = _write_hashed(stage / PREDICTIONS_FILE,
                                                          df.to_csv(index=False))
                report.make_plots(doc, df, stage, group_columns=list(store.group_columns or ()))
        doc[DIGEST_KEY] = digests
        report.write_strict_json(stage / RESULTS_FILE, doc)
    return out


def _npz_arrays(arr: Mapping) -> dict[str, np.ndarray]:
    """probes.npz's arrays: coef (float32), intercept, alpha, cv_scores, layers, and, when the
    fit has them, predictions (L, n, k) and is_test (n,)."""
    out = {"coef": np.asarray(arr["coef"]).astype(np.float32), "intercept": arr["intercept"],
           "alpha": arr["alpha"], "layers": arr["layers"], "cv_scores": arr["cv_scores"]}
    for key, dtype in (("predictions", np.float64), ("is_test", bool)):
        if arr.get(key) is not None:
            out[key] = np.asarray(arr[key], dtype=dtype)
    return out


def _write_hashed(path: Path, content) -> str:
    """Write ``path`` atomically; return the sha256 of exactly the bytes renamed into place."""
    got = []
    write_atomic(path, content, check=lambda tmp: got.append(report.sha256_of(tmp)))
    return got[0]


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


def load_results(path, arrays: bool = False) -> FitResult:
    """The :class:`FitResult` of a fit output directory (or of its results.json).

    Parameters
    ----------
    path : str or Path
        The directory ``fastprobe fit --out`` wrote, or its results.json.
    arrays : bool
        Also read probes.npz into ``arrays``, after checking that it is the file results.json
        describes (its ``arrays_sha256``; for a results.json older than that field, that the
        layers and alphas agree).

    Returns
    -------
    FitResult
        With ``arrays`` None unless asked for. A null in results.json (a metric that was NaN)
        reads as None.

    Raises
    ------
    FitError
        No results.json, one that does not parse, or (``arrays``) no probes.npz or one that
        comes from another fit than results.json (the message names both files).
    """
    p = Path(path)
    if p.is_dir():
        p = p / RESULTS_FILE
    if not p.exists():
        raise FitError(f"{p}: no such results file (run `fastprobe fit ... --out DIR` first)")
    try:
        doc = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FitError(f"{p}: not a valid results.json ({exc})") from None
    if not isinstance(doc, dict):
        raise FitError(f"{p}: not a valid results.json (not a JSON object)")
    result = FitResult.from_json(doc)
    if not arrays:
        return result
    return dataclasses.replace(result, arrays=_read_arrays(p, doc))


def _read_arrays(p: Path, doc: dict) -> dict[str, np.ndarray]:
    """probes.npz beside results.json ``p``, once its digest (or, for an older results.json,
    its layers and alphas) show it is the fit ``doc`` describes."""
    npz = p.parent / ARRAYS_FILE
    redo = f"re-run `fastprobe fit STORE --all-layers --out {p.parent}`"
    if not npz.exists():
        raise FitError(f"{npz}: no such file; {p} describes the probe arrays written beside it "
                       f"({redo})")
    listed = doc.get(DIGEST_KEY)
    if listed is not None:
        for name, want in listed.items():
            f = p.parent / name
            if f.exists() and report.sha256_of(f) != want:
                raise FitError(f"{f} is not the file {p} describes (sha256 differs): they come "
                               f"from different fits (a fit interrupted between writing them, "
                               f"or a file copied in); {redo}")
        if ARRAYS_FILE not in listed:
            raise FitError(f"{p} was written without arrays, so {npz} beside it comes from "
                           f"another fit; {redo}")
    try:
        with np.load(npz) as z:
            got = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise FitError(f"{npz}: not a readable probes.npz ({exc}); {redo}") from None
    if listed is None:
        why = _legacy_mismatch(doc, got)
        if why:
            raise FitError(f"{p} and {npz} come from different fits ({why}); {redo}")
    return got


def _legacy_mismatch(doc: dict, z: dict) -> str | None:
    """How probes.npz disagrees with a results.json written before ``arrays_sha256``."""
    if "predictions" in z:
        return "the arrays were written after that results.json, which records no digest"
    layers = [e.get("layer") for e in doc.get("layers") or []]
    if "layers" not in z or [int(x) for x in z["layers"]] != layers:
        return f"layers {layers} vs {z.get('layers', np.array([])).tolist()}"
    want = np.array([list(e["alpha"].values()) if isinstance(e["alpha"], dict)
                     else [e["alpha"]] for e in doc["layers"]], dtype=np.float64)
    have = np.asarray(z.get("alpha", np.empty(0)), dtype=np.float64)
    if have.shape[0] != want.shape[0] or not np.allclose(
            np.broadcast_to(want, have.shape) if want.shape[1] == 1 else want, have):
        return "their alphas differ"
    return None
