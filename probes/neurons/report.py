"""``fastprobe neurons``: every neuron of every layer against the targets, the top neurons per
target, and neurons.json / neurons.npz / one PNG per target."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from actstore.io import write_atomic, write_json
from actstore.store import open_store
from probes.errors import NeuronReportError
from probes.inputs import resolve_targets
from probes.kernels import NEURON_GPU_ORDER, resolve
from probes.metrics import _latlon
from probes.report import plot_best_neuron
from probes.neurons.correlations import neuron_correlations
from probes.neurons.probe_link import add_probe_cosines, load_probe
from probes.neurons.config import METHODS
from probes.neurons.model import resolve_model
from probes.neurons.projection import (NEURON_LAYER_RULE, projected_neuron,
                                       projection_correlations)

__all__ = ["neuron_report", "write_neuron_report", "NEURONS_JSON", "NEURONS_NPZ", "SPLITS"]

NEURONS_JSON = "neurons.json"
NEURONS_NPZ = "neurons.npz"
SPLITS = ("all", "is_test", "train")


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


def neuron_report(store, targets=None, top: int = 50, split: str = "all", backend: str = "auto",
                  device=None, out=None, method: str = "stored", model=None, probe_dir=None,
                  layers=None, chunk_rows: int | None = None) -> dict:
    """Pearson and Spearman correlation of every MLP neuron of every layer with each target,
    and the ``top`` neurons per target ranked by |Spearman|.

    method: "stored" = the neuron activations the store holds (``actstore extract --neurons``:
    the input of each block's down_proj); "projection" = the paper's way, computed from the
    stored residual stream and the model's MLP input weights (see
    :func:`projection_correlations`; needs ``model``). Either way a neuron's "layer" is the
    hidden-state index its MLP writes into (block b's neurons are layer b+1; projection entries
    also give "source_layer" = b, the residual they were computed from; "position" is the store
    position of the stored neurons, resp. of the source residual).

    store: path or ActivationStore. targets: names (default: the store's own). split: rows
    used: "all", "is_test" (the test rows) or "train" (the others). backend: moments kernel
    (auto|cpu|torch|triton|cuda; projection: its float32 activations use the float64 torch
    reference, the projection matmuls dominate the cost); device: where moments, ranks and
    projections are computed (default: cuda for cuda/triton, and for auto with a GPU; else
    cpu). model: name/path, LoadedModel or HF model (default: the model in the store's
    metadata); needed by projection and probe_dir. probe_dir: a ``fastprobe fit --out``
    directory of this store: every listed neuron gets "probe_cosine" (see
    :func:`add_probe_cosines`). layers: hidden-state indices (default all the store holds;
    projection skips the last block's output, which feeds no MLP). out: directory for neurons.json, neurons.npz and
    one PNG per target of its best neuron's activation.

    Returns the neurons.json dict plus ``result["arrays"]`` = {"pearson", "spearman"}: (L, d_mlp,
    k) float64 numpy arrays (saved to neurons.npz).
    """
    t0 = time.perf_counter()
    if isinstance(store, (str, os.PathLike)):
        store = open_store(store)
    method = "stored" if method is None else str(method).lower()
    if method not in METHODS:
        raise NeuronReportError(f"unknown method {method!r}; choose stored or projection")
    if method == "stored" and store.d_mlp is None:
        raise NeuronReportError(
            f"{store.path}: this store has no neuron activations; use --method projection "
            "(computes them from the stored residual stream with the model's MLP weights) or "
            "re-extract with `actstore extract --neurons`")
    n = int(store.rows_done)
    if n == 0:
        raise NeuronReportError(f"{store.path}: the store has no completed rows")
    if int(top) < 1:
        raise NeuronReportError(f"top must be >= 1, got {top}")
    names = resolve_targets(store, targets)
    Y = store.target_array(names)[:n]
    if split not in SPLITS:
        raise NeuronReportError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
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
    Y = np.where(mask[:, None], Y, 0.0)   # skipped rows: any finite value

    be, dev = resolve(backend, device, gpu_order=NEURON_GPU_ORDER)
    probe = load_probe(probe_dir, store) if probe_dir is not None else None
    net = info = None
    if method == "projection" or probe is not None:
        net, info = resolve_model(store, model)
    kw = dict(rows_mask=mask, layers=layers, device=dev, chunk_rows=chunk_rows)
    t1 = time.perf_counter()
    if method == "stored":
        if be != "torch" and store.dtype != "float16":
            if (backend or "auto") != "auto":
                raise NeuronReportError(f"backend {be!r} needs float16 activations; this store "
                                        f"is {store.dtype}: use --backend torch")
            be = "torch"   # the compiled kernels read float16 only
        got = neuron_correlations(store, Y, method="pearson", backend=be, **kw)
        t2 = time.perf_counter()
        sp = neuron_correlations(store, Y, method="spearman", backend=be, **kw)["spearman"]
        pear, spear = got["pearson"].numpy(), sp.numpy()
        lay, sources = got["layers"], None
        positions = [list(store.layers).index(layer) for layer in lay]
        d_mlp = int(store.d_mlp)
    else:
        if (backend or "auto") not in ("auto", "torch"):
            raise NeuronReportError(f"--method projection computes float32 activations; their "
                                    f"moments use the torch reference, not {backend!r} (use "
                                    "--backend auto or torch)")
        be = "torch"
        got = projection_correlations(store, net, Y, **kw)
        t2 = time.perf_counter()
        pear, spear = got["pearson"].numpy(), got["spearman"].numpy()
        lay, sources, positions = got["layers"], got["source_layers"], got["positions"]
        d_mlp = got["d_mlp"]
    t3 = time.perf_counter()
    top = min(int(top), pear.shape[0] * pear.shape[1])
    result = {
        "store": str(store.path), "method": method, "targets": names,
        "n_rows": int(mask.sum()), "split": split, "layers": lay, "d_mlp": d_mlp,
        "layer_rule": NEURON_LAYER_RULE, "backend": be, "device": str(dev), "top": top,
        "model": None if info is None else info.get("id"),
        "top_neurons": {t: _top_neurons(pear[..., i], spear[..., i], lay, top, positions, sources)
                        for i, t in enumerate(names)},
        "arrays": {"pearson": pear, "spearman": spear},
    }
    if sources is not None:
        result["source_layers"] = sources
    if probe is not None:
        add_probe_cosines(result["top_neurons"], net, probe)
        result["probe"] = {"dir": probe["dir"], "store": probe["store"],
                           "targets": probe["targets"], "layers": probe["layers"]}
    if out is not None:
        acts = None
        if method == "projection":
            acts = _best_activations(result["top_neurons"], lambda e, idx: projected_neuron(
                store, net, e["source_layer"], idx, dev, chunk_rows))
        write_neuron_report(result, out, store, mask, Y, activations=acts)
    t4 = time.perf_counter()
    result["seconds"] = {"pearson" if method == "stored" else "correlations": t2 - t1,
                         "spearman" if method == "stored" else "ranking": t3 - t2,
                         "outputs": t4 - t3, "total": t4 - t0}
    if out is not None:   # rewrite the JSON with the timings
        _write_json(result, out)
    return result


def _write_json(result: dict, out):
    write_json(Path(out) / NEURONS_JSON, {k: v for k, v in result.items() if k != "arrays"})


def write_neuron_report(result: dict, out, store, mask, Y, activations=None) -> list:
    """neurons.json, neurons.npz and the best-neuron PNGs (see :func:`neuron_report`).

    activations: {target: (rows_done,) activation of that target's best neuron}; None reads
    them from the store's stored neurons (method "stored")."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(result, out)
    extra = ({"source_layers": np.asarray(result["source_layers"])}
             if "source_layers" in result else {})
    write_atomic(out / NEURONS_NPZ, lambda f: np.savez_compressed(
        f, layers=np.asarray(result["layers"]), targets=np.asarray(result["targets"]), **extra,
        **result["arrays"]))
    written = [out / NEURONS_JSON, out / NEURONS_NPZ]
    names = result["targets"]
    ll = _latlon(names)
    coords = None if ll is None else (Y[mask, ll[1]], Y[mask, ll[0]])
    if activations is None:                  # stored neurons: each layer read once
        activations = _best_activations(result["top_neurons"], lambda e, idx: store.layer(
            e["layer"], array="neurons", as_="torch")[:, idx].to(torch.float32).numpy())
    for i, t in enumerate(names):
        best = result["top_neurons"][t][0]
        act = np.asarray(activations[t], dtype=np.float32)[:len(mask)][mask]
        written.append(plot_best_neuron(out / f"neuron_{t}.png", t, Y[mask, i], act, best,
                                        lonlat=coords))
    return written
