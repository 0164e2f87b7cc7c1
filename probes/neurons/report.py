"""``fastprobe neurons``: every neuron of every layer against the targets, the top neurons per
target, and neurons.json / neurons.npz / one PNG per target."""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from actstore.io import write_atomic
from actstore.store import ActivationStore, open_store
from probes.errors import NeuronReportError
from probes.inputs import resolve_targets
from probes.kernels import NEURON_GPU_ORDER, resolve
from probes.metrics import latlon_columns
from probes.neurons.config import SPLITS, NeuronConfig
from probes.neurons.correlations import neuron_correlations
from probes.neurons.model import resolve_model
from probes.neurons.probe_link import add_probe_cosines, load_probe
from probes.neurons.projection import NEURON_LAYER_RULE, projected_neuron, projection_correlations
from probes.report import OutputSet, plot_best_neuron, sha256_of, write_strict_json

__all__ = ["neuron_report", "write_neuron_report", "NEURONS_JSON", "NEURONS_NPZ", "SPLITS",
           "NEURON_NULLS"]

NEURONS_JSON = "neurons.json"
NEURONS_NPZ = "neurons.npz"


class _Rows(NamedTuple):
    """The validated rows of a report: target names, Y (rows_done, k) float64 with the rows
    outside the split set to 0 (any finite value), mask (rows_done,) bool of the split."""

    names: list
    Y: np.ndarray
    mask: np.ndarray


class _Correlations(NamedTuple):
    """What either method computed: (L, m, k) float64 pearson / spearman, the neurons' layer
    labels, store positions, source layers (projection) or None, d_mlp, the backend used, and
    the seconds of its two phases."""

    pearson: np.ndarray
    spearman: np.ndarray
    layers: list
    positions: list
    sources: list | None
    d_mlp: int
    backend: str
    seconds: dict


# ------------------------------------------------------------------------------------ validation
def _config(config, options: dict) -> NeuronConfig:
    if config is None:
        return NeuronConfig(**options)
    if not isinstance(config, NeuronConfig):
        raise TypeError(f"config must be a NeuronConfig, got {type(config).__name__}; pass the "
                        "options by keyword (targets=..., top=...)")
    return dataclasses.replace(config, **options) if options else config


def _open(store, cfg: NeuronConfig):
    """The store, opened, once it holds what ``cfg.method`` reads and some completed rows."""
    if isinstance(store, (str, os.PathLike)):
        store = open_store(store)
    if cfg.method == "stored" and store.d_mlp is None:
        raise NeuronReportError(
            f"{store.path}: this store has no neuron activations; use --method projection "
            "(computes them from the stored residual stream with the model's MLP weights) or "
            "re-extract with `actstore extract --neurons`")
    if int(store.rows_done) == 0:
        raise NeuronReportError(f"{store.path}: the store has no completed rows")
    return store


def _select_rows(store, cfg: NeuronConfig) -> _Rows:
    """Targets and split rows: at least 3 rows, finite and not constant on them."""
    n = int(store.rows_done)
    names = resolve_targets(store, cfg.targets)
    Y = store.target_array(names)[:n]
    split = cfg.split
    mask = np.ones(n, dtype=bool) if split == "all" else np.asarray(store.is_test[:n], dtype=bool)
    if split == "train":
        mask = ~mask
    if mask.sum() < 3:
        raise NeuronReportError(f"split {split!r} selects {int(mask.sum())} of {n} rows; "
                                "correlations need at least 3")
    bad = ~np.isfinite(Y[mask])
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise NeuronReportError(f"target {names[c]!r} is missing or not finite at row "
                                f"{int(np.nonzero(mask)[0][r])}")
    const = [names[i] for i in np.nonzero(Y[mask].std(0) == 0)[0]]
    if const:
        raise NeuronReportError(f"target(s) {const} are constant on the {split!r} rows; a "
                                "correlation with a constant is undefined")
    return _Rows(names, np.where(mask[:, None], Y, 0.0), mask)


# ------------------------------------------------------------------------------------ compute
def _stored(store, rows: _Rows, cfg: NeuronConfig, be: str, dev) -> _Correlations:
    """The store's own neurons: Pearson from one streaming pass, Spearman layer by layer."""
    if be != "torch" and store.dtype != "float16":
        if (cfg.backend or "auto") != "auto":
            raise NeuronReportError(f"backend {be!r} needs float16 activations; this store "
                                    f"is {store.dtype}: use --backend torch")
        be = "torch"   # the compiled kernels read float16 only
    kw = dict(rows_mask=rows.mask, layers=cfg.layers, device=dev, chunk_rows=cfg.chunk_rows,
              backend=be)
    t1 = time.perf_counter()
    got = neuron_correlations(store, rows.Y, method="pearson", **kw)
    t2 = time.perf_counter()
    sp = neuron_correlations(store, rows.Y, method="spearman", **kw)["spearman"]
    t3 = time.perf_counter()
    lay = got["layers"]
    return _Correlations(got["pearson"].numpy(), sp.numpy(), lay,
                         [list(store.layers).index(layer) for layer in lay], None,
                         int(store.d_mlp), be, {"pearson": t2 - t1, "spearman": t3 - t2})


def _projected(store, rows: _Rows, cfg: NeuronConfig, net, dev) -> _Correlations:
    """The paper's neurons from the residual stream (:func:`projection_correlations`)."""
    if (cfg.backend or "auto") not in ("auto", "torch"):
        raise NeuronReportError(f"--method projection computes float32 activations; their "
                                f"moments use the torch reference, not {cfg.backend!r} (use "
                                "--backend auto or torch)")
    t1 = time.perf_counter()
    got = projection_correlations(store, net, rows.Y, rows_mask=rows.mask, layers=cfg.layers,
                                  device=dev, chunk_rows=cfg.chunk_rows)
    t2 = time.perf_counter()
    pear, spear = got["pearson"].numpy(), got["spearman"].numpy()
    t3 = time.perf_counter()
    return _Correlations(pear, spear, got["layers"], got["positions"], got["source_layers"],
                         got["d_mlp"], "torch", {"correlations": t2 - t1, "ranking": t3 - t2})


# ------------------------------------------------------------------------------------ top table
def _top_neurons(pear: np.ndarray, spear: np.ndarray, layers: list[int], top: int,
                 positions=None, sources=None) -> list[dict]:
    """The ``top`` neurons of one target by |Spearman| (ties: lower layer, then lower index)."""
    L, m = spear.shape
    flat = np.abs(spear).reshape(-1)
    order = np.argsort(-flat, kind="stable")[:top]
    out = []
    for i, f in enumerate(order):
        b = int(f // m)
        e = {"rank": i + 1, "layer": int(layers[b]),
             "position": int(b if positions is None else positions[b]),
             "index": int(f % m), "pearson": float(pear.reshape(-1)[f]),
             "spearman": float(spear.reshape(-1)[f])}
        if sources is not None:
            e["source_layer"] = int(sources[b])
        out.append(e)
    return out


def _result(store, cfg: NeuronConfig, rows: _Rows, c: _Correlations, dev, info) -> dict:
    """The neurons.json dict (with the top-neuron table) plus ``arrays``."""
    top = min(cfg.top, c.pearson.shape[0] * c.pearson.shape[1])
    result = {
        "store": str(store.path), "method": cfg.method, "targets": rows.names,
        "n_rows": int(rows.mask.sum()), "split": cfg.split, "layers": c.layers,
        "d_mlp": c.d_mlp, "layer_rule": NEURON_LAYER_RULE, "backend": c.backend,
        "device": str(dev), "top": top, "model": None if info is None else info.get("id"),
        "top_neurons": {t: _top_neurons(c.pearson[..., i], c.spearman[..., i], c.layers, top,
                                        c.positions, c.sources)
                        for i, t in enumerate(rows.names)},
        "arrays": {"pearson": c.pearson, "spearman": c.spearman},
    }
    if c.sources is not None:
        result["source_layers"] = c.sources
    return result


# ------------------------------------------------------------------------------------ entry point
def neuron_report(store: str | os.PathLike | ActivationStore,
                  config: NeuronConfig | None = None, **options) -> dict:
    """Pearson and Spearman correlation of every MLP neuron of every layer with each target,
    and the ``top`` neurons per target ranked by |Spearman|.

    Parameters
    ----------
    store : str, os.PathLike or ActivationStore
        The store (a path is opened).
    config : NeuronConfig, optional
        The options (see :class:`NeuronConfig`: method, model, probe_dir, targets, top, split,
        backend, device, out, layers, chunk_rows); None: the defaults.
    **options
        Fields of :class:`NeuronConfig` that override ``config`` (the keyword API:
        ``neuron_report(store, targets="year", top=20, out="dir")``). ``model`` (needed by
        method "projection" and ``probe_dir``) is "store" (the model the store records, loaded
        only when asked), a name or path, a ``LoadedModel`` or a loaded HF model.

    Returns
    -------
    dict
        The neurons.json content ("top_neurons" per target: rank, layer, position, index,
        pearson, spearman, and "source_layer" for projection, "probe_layer" / "probe_cosine"
        with a probe; method, model, targets, n_rows, split, layers, d_mlp, backend, device,
        seconds) plus ``result["arrays"]`` = {"pearson", "spearman"}: (L, d_mlp, k) float64
        numpy arrays (saved to neurons.npz). With ``out``, also writes neurons.json,
        neurons.npz and one PNG per target of its best neuron's activation.

    Raises
    ------
    NeuronReportError
        An option, the store, the targets, the split rows, the model or the probe cannot give
        the report (the message says what to change).

    Notes
    -----
    method "stored" reads the neurons the store holds (``actstore extract --neurons``: the input
    of each block's down_proj); "projection" computes them from the stored residual stream and
    the model's MLP input weights (:func:`projection_correlations`). Either way a neuron's
    "layer" is the hidden-state index its MLP writes into (block b's neurons are layer b+1;
    projection entries also give "source_layer" = b; "position" is the store position of the
    stored neurons, resp. of the source residual). Projection moments use the float64 torch
    reference (the projection matmuls dominate the cost).
    """
    t0 = time.perf_counter()
    cfg = _config(config, options)
    store = _open(store, cfg)
    rows = _select_rows(store, cfg)
    be, dev = resolve(cfg.backend, cfg.device, gpu_order=NEURON_GPU_ORDER)
    probe = load_probe(cfg.probe_dir, store) if cfg.probe_dir is not None else None
    net = info = None
    if cfg.method == "projection" or probe is not None:
        net, info = resolve_model(store, cfg.model)
    corr = (_stored(store, rows, cfg, be, dev) if cfg.method == "stored"
            else _projected(store, rows, cfg, net, dev))
    t3 = time.perf_counter()
    result = _result(store, cfg, rows, corr, dev, info)
    if probe is not None:
        add_probe_cosines(result["top_neurons"], net, probe)
        result["probe"] = {k: probe[k] for k in ("dir", "store", "targets", "layers")}

    def timed():
        t4 = time.perf_counter()
        result["seconds"] = {**corr.seconds, "outputs": t4 - t3, "total": t4 - t0}
    if cfg.out is not None:        # neurons.json, last, holds the timings
        _write_outputs(result, cfg, store, rows, net, dev, before_json=timed)
    else:
        timed()
    return result


# ------------------------------------------------------------------------------------ outputs
def _best_activations(top_neurons: dict, read) -> dict:
    """{target: activation of its best neuron}, reading each layer once:
    read(best entry, neuron indices) -> (rows, len(indices))."""
    by_layer: dict = {}
    for t, entries in top_neurons.items():
        by_layer.setdefault(entries[0]["layer"], []).append(t)
    acts = {}
    for ts in by_layer.values():
        cols = read(top_neurons[ts[0]][0], [top_neurons[t][0]["index"] for t in ts])
        acts.update({t: cols[:, i] for i, t in enumerate(ts)})
    return acts


def _write_outputs(result: dict, cfg: NeuronConfig, store, rows: _Rows, net, dev,
                   before_json=None) -> list:
    acts = None
    if cfg.method == "projection":   # recomputed from the residual: the store has no neurons
        acts = _best_activations(result["top_neurons"], lambda e, idx: projected_neuron(
            store, net, e["source_layer"], idx, dev, cfg.chunk_rows))
    return _write_set(result, cfg.out, store, rows.mask, rows.Y, acts, before_json)


# a NaN correlation in neurons.json: the targets were checked non-constant, so the neuron is
NEURON_NULLS = {k: "the correlation is undefined: the neuron is constant on these rows"
                for k in ("pearson", "spearman")}


def write_neuron_report(result: dict, out: str | os.PathLike, store: ActivationStore,
                        mask: np.ndarray, Y: np.ndarray,
                        activations: dict | None = None) -> list[Path]:
    """neurons.npz, the best-neuron PNGs, then neurons.json (see :func:`neuron_report`), as
    one set (:class:`probes.report.OutputSet`: a failed write changes nothing in ``out``).

    neurons.json is strict JSON (a NaN correlation is null, its reason in ``"nulls"``) and
    records ``"arrays_sha256"``: {"neurons.npz": its sha256}. activations: {target:
    (rows_done,) activation of that target's best neuron}; None reads them from the store's
    stored neurons (method "stored"). Returns the paths written (neurons.json first)."""
    return _write_set(result, out, store, mask, Y, activations)


def _write_set(result: dict, out, store, mask: np.ndarray, Y: np.ndarray, activations,
               before_json=None) -> list[Path]:
    out = Path(out)
    names = result["targets"]
    ll = latlon_columns(names)
    coords = None if ll is None else (Y[mask, ll[1]], Y[mask, ll[0]])
    if activations is None:                  # stored neurons: each layer read once
        activations = _best_activations(result["top_neurons"], lambda e, idx: store.layer(
            e["layer"], array="neurons", as_="torch")[:, idx].to(torch.float32).numpy())
    extra = ({"source_layers": np.asarray(result["source_layers"])}
             if "source_layers" in result else {})
    digest = []
    with OutputSet(out, last=(NEURONS_JSON,)) as stage:
        write_atomic(stage / NEURONS_NPZ, lambda f: np.savez_compressed(
            f, layers=np.asarray(result["layers"]), targets=np.asarray(result["targets"]),
            **extra, **result["arrays"]), check=lambda tmp: digest.append(sha256_of(tmp)))
        pngs = []
        for i, t in enumerate(names):
            best = result["top_neurons"][t][0]
            act = np.asarray(activations[t], dtype=np.float32)[:len(mask)][mask]
            pngs.append(plot_best_neuron(stage / f"neuron_{t}.png", t, Y[mask, i], act, best,
                                         lonlat=coords).name)
        if before_json is not None:
            before_json()
        doc = {k: v for k, v in result.items() if k != "arrays"}
        write_strict_json(stage / NEURONS_JSON, {**doc, "arrays_sha256": {
            NEURONS_NPZ: digest[0]}}, NEURON_NULLS)
    return [out / NEURONS_JSON, out / NEURONS_NPZ] + [out / n for n in pngs]
