"""Rows a ridge probe cannot be trusted on: per-row L2 norms of every fitted layer, the rows far
above the layer's median norm (median + k·1.4826·MAD of the training rows, the modified z-score
rule of Iglewicz & Hoaglin, k = :data:`MAD_K`), the ``--row-norm`` remedies applied to every
block the fit reads (``unit``: each row scaled to unit norm; ``clip``: its norm capped at that
threshold), and predictions outside a target's valid range. docs/paper-run.md, "Negative R² on
US places": one token with a massive activation is enough to drive test R² below zero."""
from __future__ import annotations

import numpy as np
import torch

from actstore.store.format import as_compute
from probes.errors import FitError
from probes.fit.config import ROW_NORMS
from probes.kernels import preferred_chunk_rows
from probes.stream import read_ahead

__all__ = ["ROW_NORMS", "MAD_K", "MAD_SCALE", "RowNorms", "robust_threshold", "check_backend",
           "norm_pass", "valid_ranges", "annotate", "summary_line"]

MAD_K = 3.5            # modified z-score cut-off (Iglewicz & Hoaglin 1993)
MAD_SCALE = 1.4826     # MAD -> standard deviation of a normal distribution
#: hard ranges of place targets, by name; every other target: its training range widened by
#: its width on each side (a year 3x the training span away is "far outside")
HARD_RANGES = {"latitude": (-90.0, 90.0), "longitude": (-180.0, 180.0)}
LISTED_ROWS = 50       # rows listed per layer in results.json (counts are always complete)
LISTED_FLAGGED = 200   # rows listed in the top-level norm_outliers, largest ratio first


def robust_threshold(norms: np.ndarray, k: float = MAD_K) -> tuple[np.ndarray, ...]:
    """(median, MAD, threshold) along the last axis: threshold = median + k·1.4826·MAD.

    Parameters
    ----------
    norms : numpy.ndarray
        (..., n) row norms.
    k : float
        Cut-off in robust standard deviations.

    Returns
    -------
    tuple of numpy.ndarray
        median, MAD (unscaled) and threshold, each of shape ``norms.shape[:-1]``.
    """
    med = np.median(norms, axis=-1)
    mad = np.median(np.abs(norms - med[..., None]), axis=-1)
    return med, mad, med + k * MAD_SCALE * mad


class RowNorms:
    """The row norms of a fit's layers and the ``--row-norm`` rule applied to its blocks.

    ``measure`` records a block's norms (from the stored values; float64 for ``unit`` and
    ``clip``, float32 for ``none``, where they only flag rows) in the statistics pass;
    ``apply`` returns a block as the fit reads it: unchanged for ``none`` (the paper's fit,
    bit for bit), else in ``dtype`` with each row multiplied in float64 by 1/‖x‖ (``unit``) or
    min(1, t/‖x‖) (``clip``; t: the layer's :func:`robust_threshold`, set by
    :func:`norm_pass`). A row of norm 0 is left as it is.
    """

    def __init__(self, mode: str, layers: list[int], n: int):
        if mode not in ROW_NORMS:
            raise FitError(f"row_norm must be one of {', '.join(ROW_NORMS)}, got {mode!r}")
        self.mode, self.layers = mode, list(layers)
        self.index = {layer: j for j, layer in enumerate(self.layers)}
        self.norms = np.zeros((len(self.layers), int(n)))     # rows of other ranks stay 0
        self.threshold: np.ndarray | None = None               # (L,) for clip

    def measure(self, X: torch.Tensor, start: int, layers: list[int]) -> None:
        """Record the norms of block X (B, r, d) of ``layers``, rows ``start``.."""
        r = X.shape[1]
        # none: the norms only flag rows, float32 is plenty (and 3-4x faster from fp16); unit
        # and clip scale rows by them, in float64
        dt = torch.float32 if self.mode == "none" else torch.float64
        got = torch.empty(len(layers), r, dtype=torch.float64, device=X.device)
        for b in range(len(layers)):            # one layer at a time: a converted copy of one
            got[b] = torch.linalg.vector_norm(X[b].to(dt), dim=-1)
        self.norms[[self.index[layer] for layer in layers], start:start + r] = got.cpu().numpy()

    def apply(self, X: torch.Tensor, start: int, layers: list[int],
              dtype: torch.dtype) -> torch.Tensor:
        """Block X (B, r, d) as the fit reads it (see the class docstring)."""
        if self.mode == "none":
            return X
        r = X.shape[1]
        idx = [self.index[layer] for layer in layers]
        norms = self.norms[idx, start:start + r]
        with np.errstate(divide="ignore"):
            scale = np.where(norms > 0, 1.0 / norms, 1.0)
        if self.mode == "clip":
            scale = np.minimum(1.0, self.threshold[idx][:, None] * scale)
        s = torch.as_tensor(scale, device=X.device)
        out = torch.empty(X.shape, dtype=dtype, device=X.device)
        for b in range(len(layers)):
            out[b] = (X[b].to(torch.float64) * s[b][:, None]).to(dtype)
        return out

    def set_threshold(self, train: np.ndarray) -> None:
        """The clip thresholds from the training rows' norms (all rows measured)."""
        self.threshold = robust_threshold(self.norms[:, train])[2]


def check_backend(row_norm: str, asked: str, backend: str) -> str:
    """The statistics backend of a fit with ``row_norm``: ``backend`` for ``none``; for unit
    and clip, the GPU kernels' float16 input would round the rescaled rows, so ``auto`` on a
    GPU takes the float64 torch kernels on that device and a named cuda or triton is refused.
    """
    if row_norm == "none" or backend in ("cpu", "torch"):
        return backend
    if asked == "auto":
        return "torch"
    raise FitError(f"--row-norm {row_norm} rescales each row in float64 and the {backend} "
                   "kernels read float16 activations: use --backend torch (the same device) "
                   "or cpu, or auto")


def norm_pass(job, chunk_rows: int | None = None) -> None:
    """Measure every row of every layer of ``job`` (this process's rows, then shared with the
    others) and, for clip, set the thresholds: the pass ``clip`` needs before the statistics."""
    p, store, rows = job.problem, job.store, job.rows
    lo, hi = job.shard.rows(p.n)
    chunk_rows = chunk_rows or preferred_chunk_rows(store.d_model, len(rows.layers), 1,
                                                    max_bytes=64 << 20)
    with job.meter.phase("stats"):
        for start, block in read_ahead(store.iter_chunks(rows=chunk_rows, layers=rows.layers,
                                                         start=lo, stop=hi)):
            rows.measure(as_compute(block, store.dtype), start, rows.layers)
        rows.norms = job.shard.share_rows(rows.norms, job.device)
    rows.set_threshold(p.train)


def valid_ranges(names: list[str], Y: np.ndarray, train: np.ndarray) -> dict[str, list[float]]:
    """{target: [lo, hi]}: latitude [-90, 90], longitude [-180, 180]; any other target its
    training range widened by its width on both sides."""
    out = {}
    for i, name in enumerate(names):
        if name.lower() in HARD_RANGES:
            out[name] = list(HARD_RANGES[name.lower()])
        else:
            lo, hi = float(Y[train, i].min()), float(Y[train, i].max())
            out[name] = [lo - (hi - lo), hi + (hi - lo)]
    return out


def _out_of_range(pred: np.ndarray, names: list[str], ranges: dict, is_test) -> dict:
    """results.json ``out_of_range`` of one layer's predictions (n, k)."""
    lo = np.array([ranges[t][0] for t in names])
    hi = np.array([ranges[t][1] for t in names])
    bad = (pred < lo) | (pred > hi)
    rows = np.nonzero(bad.any(1))[0]
    return {"n": int(len(rows)), "n_test": int(is_test[rows].sum()),
            "per_target": {t: int(bad[:, i].sum()) for i, t in enumerate(names)},
            "rows": rows[:LISTED_ROWS].tolist()}


def annotate(entries: list[dict], rows: RowNorms, problem, preds: np.ndarray,
             names_of_rows) -> dict:
    """Add ``row_norms`` and ``out_of_range`` to each layer entry of results.json; return the
    fit's top-level keys: ``row_norm``, ``norm_outliers`` and ``valid_ranges``.

    Parameters
    ----------
    entries : list of dict
        results.json ``layers`` (changed in place), in the order of ``rows.layers``.
    rows : RowNorms
        Every row's norm in every layer (all processes' rows).
    problem : probes.fit.problem.Problem
        The targets, split and names.
    preds : numpy.ndarray
        (L, n, k) predictions in target units.
    names_of_rows : sequence of str
        The entity name of each row.

    Returns
    -------
    dict
        ``row_norm`` (the mode), ``norm_outliers`` (the rule, k, the number of flagged rows
        and the first :data:`LISTED_FLAGGED` of them by largest norm / median ratio, with
        name, split and layers) and ``valid_ranges``.
    """
    med, mad, thr = robust_threshold(rows.norms[:, problem.train])
    ranges = valid_ranges(problem.names, problem.Y, problem.train)
    flagged: dict[int, list] = {}
    for j, e in enumerate(entries):
        hit = np.nonzero(rows.norms[j] > thr[j])[0]
        order = hit[np.argsort(-rows.norms[j][hit])]
        e["row_norms"] = {"median": float(med[j]), "mad": float(mad[j]),
                          "threshold": float(thr[j]), "n_outliers": int(len(hit)),
                          "outliers": order[:LISTED_ROWS].tolist(),
                          "outlier_norms": rows.norms[j][order[:LISTED_ROWS]].tolist()}
        e["out_of_range"] = _out_of_range(preds[j], problem.names, ranges, problem.is_test)
        for i in hit:
            flagged.setdefault(int(i), []).append(j)
    listed = []
    for i, js in flagged.items():
        ratio = rows.norms[js, i] / med[js]
        listed.append({"row": i, "name": str(names_of_rows[i]),
                       "split": "test" if problem.is_test[i] else "train",
                       "layers": [rows.layers[j] for j in js],
                       "max_ratio": float(ratio.max()),
                       "max_ratio_layer": rows.layers[js[int(ratio.argmax())]]})
    listed.sort(key=lambda x: -x["max_ratio"])
    return {"row_norm": rows.mode,
            "norm_outliers": {"rule": "norm > median + k * 1.4826 * MAD of the training rows' "
                                      "norms, per layer", "k": MAD_K, "n_rows": len(listed),
                              "rows": listed[:LISTED_FLAGGED]},
            "valid_ranges": ranges}


def summary_line(result) -> str:
    """One sentence on the flagged rows and out-of-range predictions of a fit ("" when there
    are none or the result predates them): what the report prints under its table."""
    flagged = (result.get("norm_outliers") or {}).get("rows") or []
    oor = [(e["layer"], e["out_of_range"]["n_test"]) for e in result["layers"]
           if (e.get("out_of_range") or {}).get("n_test")]
    parts = []
    if flagged:
        top = ", ".join(f"{r['name']} ({r['max_ratio']:.1f}x median at layer "
                        f"{r['max_ratio_layer']})" for r in flagged[:3])
        parts.append(f"{len(flagged)} rows have an outlying residual norm at some layer "
                     f"(largest: {top})")
    if oor:
        parts.append(f"{len(oor)} layers predict test rows outside the valid range (layer "
                     + ", ".join(f"{layer}: {n}" for layer, n in oor[:8])
                     + (", ..." if len(oor) > 8 else "") + ")")
    if not parts:
        return ""
    return "; ".join(parts) + f" (row norm: {result.get('row_norm') or 'none'})."
