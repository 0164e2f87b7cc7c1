"""Pearson and Spearman correlation of every neuron of every layer with each target.

Pearson comes from one streaming pass of :class:`~probes.stats.NeuronStats` moments (any
backend of :func:`probes.kernels.neuron_update`); Spearman is the Pearson r of average ranks and
needs each neuron's whole column, so it works one layer at a time (on the GPU when the data is
there).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from actstore.store import ActivationStore
from probes.errors import StatsError
from probes.inputs import select_layers
from probes.kernels import neuron_update, resolve
from probes.stats import NeuronStats, as_tensor
from probes.stream import stream_to_device

__all__ = ["rank_transform", "spearman", "neuron_correlations", "prepare_rows"]


# ------------------------------------------------------------------------------------ Spearman
def rank_transform(x: Tensor, dim: int = 0) -> Tensor:
    """Average ranks (1-based, ties get the mean of their ranks) along ``dim``, float64.

    Works along the last, contiguous dimension (``dim`` is moved there first): sorting and the
    tie-group scans along a strided dimension are several times slower on CPU for the same
    ranks (bench/RESULTS.md, "Spearman ranks on CPU"). Within a tie group the order is
    irrelevant, so the sort need not be stable."""
    x = x.movedim(dim, -1).contiguous()
    n = x.shape[-1]
    if n == 0:
        return torch.zeros(x.shape, dtype=torch.float64, device=x.device).movedim(-1, dim)
    s, order = torch.sort(x, dim=-1)
    pos = torch.arange(n, device=x.device, dtype=torch.int32 if n < 2**30 else torch.long)
    pos = pos.expand_as(s)
    new = torch.ones_like(s, dtype=torch.bool)            # first of its tie group
    new[..., 1:] = s[..., 1:] != s[..., :-1]
    del s
    start = torch.where(new, pos, 0).cummax(-1).values
    last = torch.ones_like(new)                           # last of its tie group
    last[..., :-1] = new[..., 1:]
    end = torch.where(last, pos, n).flip(-1).cummin(-1).values.flip(-1)
    avg = (start + end).to(torch.float64) * 0.5 + 1.0
    ranks = torch.empty_like(avg)
    ranks.scatter_(-1, order, avg)
    return ranks.movedim(-1, dim)


def spearman(X, Y, mask=None, column_block: int = 4096) -> Tensor:
    """Spearman ρ (m, k) float64 of every column of X (r, m) with every column of Y (r, k).

    ``mask`` (r,) bool selects rows. Works on the device of X, ``column_block`` columns at a time.
    """
    Xt = as_tensor(X)
    dev = Xt.device
    Yt = as_tensor(Y).to(dev)
    if Yt.ndim == 1:
        Yt = Yt.reshape(-1, 1)
    if Xt.ndim != 2 or Yt.shape[0] != Xt.shape[0]:
        raise StatsError(f"X must be (r, m) and Y (r, k) with the same r, got "
                         f"{tuple(Xt.shape)} and {tuple(Yt.shape)}")
    if mask is not None:
        mk = as_tensor(mask).to(dev).bool()
        Xt, Yt = Xt[mk], Yt[mk]
    n = Xt.shape[0]
    if n < 2:
        raise StatsError(f"Spearman correlation needs at least 2 rows, got {n}")
    ry = rank_transform(Yt.to(torch.float64), 0)
    ry = ry - ry.mean(0)
    ny = torch.linalg.vector_norm(ry, dim=0)
    out = torch.empty(Xt.shape[1], Yt.shape[1], dtype=torch.float64, device=dev)
    for j0 in range(0, Xt.shape[1], column_block):
        rx = rank_transform(Xt[:, j0:j0 + column_block], 0)
        rx = rx - rx.mean(0)
        nx = torch.linalg.vector_norm(rx, dim=0)
        den = nx.unsqueeze(-1) * ny
        num = rx.T @ ry
        out[j0:j0 + column_block] = torch.where(den > 0, num / torch.where(den > 0, den, 1.0),
                                                torch.zeros_like(num))
    return out.clamp(-1.0, 1.0)


# ------------------------------------------------------------------------------------ stores
def prepare_rows(store: ActivationStore, Y,
                 rows_mask=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The targets and rows of a pass over ``store``: (Y (rows_done, k) float64, a private
    writable copy; mask (rows_done,) bool; fold (rows_done,) int32, 0 = used, -1 = skipped).
    StatsError when Y is shorter than the store or not finite."""
    n = int(store.rows_done)
    Yn = np.array(Y, dtype=np.float64)      # a private, writable copy
    if Yn.ndim == 1:
        Yn = Yn.reshape(-1, 1)
    if Yn.shape[0] < n:
        raise StatsError(f"Y has {Yn.shape[0]} rows but the store has {n} rows done")
    Yn = Yn[:n]
    if not np.isfinite(Yn).all():
        raise StatsError("Y contains NaN or inf")
    mask = np.ones(n, dtype=bool) if rows_mask is None else np.array(rows_mask, dtype=bool)[:n]
    return Yn, mask, np.where(mask, 0, -1).astype(np.int32)


def _streamed_pearson(store, Yd: Tensor, fold: np.ndarray, ids, dev, backend, chunk_rows,
                      array, prefetch) -> Tensor:
    """(L, m, k) float64 CPU Pearson from one streaming pass of NeuronStats moments: chunks read
    ahead on threads and sent to ``dev`` double-buffered."""
    st = None
    chunks = store.iter_chunks(rows=chunk_rows, layers=ids, array=array)
    for start, X in stream_to_device(chunks, device=dev, prefetch=prefetch):
        r = X.shape[1]
        f = fold[start:start + r]
        if st is None:
            st = NeuronStats.for_chunk(X, Yd[start:start + r], f, device=dev)
        neuron_update(st, X, Yd[start:start + r], f, backend=backend)
    if st is None:
        raise StatsError("the store has no rows written")
    return st.pearson().cpu()


def neuron_correlations(store: ActivationStore, Y, rows_mask=None, layers=None,
                        backend: str = "auto", device=None, method=("pearson", "spearman"),
                        chunk_rows: int | None = None, array: str = "neurons",
                        prefetch: int = 2) -> dict:
    """Correlations of every neuron of every (selected) layer of ``store`` with each target.

    Parameters
    ----------
    store : ActivationStore
        The store; ``array`` names what is correlated ("neurons": the stored MLP neurons).
    Y : array-like, (rows_done, k) or (rows_done,)
        Targets aligned with the store's rows (finite).
    rows_mask : array-like of bool, (rows_done,), optional
        The rows used (None: all).
    layers : int or list of int, optional
        Hidden-state indices (None: every layer the store holds).
    backend : str
        Moments kernel of the Pearson pass (auto|cpu|torch|triton|cuda).
    device : str or torch.device, optional
        Where moments and ranks are computed (None: a GPU when present, else CPU).
    method : str or tuple of str
        "pearson" (one streaming pass) and/or "spearman" (ranks need every row: one whole
        layer at a time, ranked on ``device``).
    chunk_rows, prefetch : int, optional
        Rows per chunk of the Pearson pass and chunks read ahead.

    Returns
    -------
    dict
        "pearson" / "spearman" (for the requested methods): (L, m, k) float64 CPU tensors;
        "n_rows": rows used; "layers": the hidden-state indices.
    """
    dev = resolve("torch", device)[1] if device is not None else resolve("auto")[1]
    Yn, mask, fold = prepare_rows(store, Y, rows_mask)
    ids = select_layers(store, layers)
    out = {"n_rows": int(mask.sum()), "layers": ids}
    methods = (method,) if isinstance(method, str) else tuple(method)
    if "pearson" in methods:
        out["pearson"] = _streamed_pearson(store, torch.from_numpy(Yn).to(dev), fold, ids, dev,
                                           backend, chunk_rows, array, prefetch)
    if "spearman" in methods:
        Yd = torch.from_numpy(Yn).to(dev)
        md = torch.from_numpy(mask).to(dev)
        out["spearman"] = torch.stack([
            spearman(store.layer(layer, array=array, as_="torch").to(dev), Yd, mask=md).cpu()
            for layer in ids])
    return out
