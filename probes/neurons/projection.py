"""The paper's neurons from a store without them: the stored residual of hidden state l through
block l's own pre-MLP norm and MLP input weights (act(gate) * up), streamed one layer at a time
into the same moments and ranks as stored neurons.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from actstore.models import decoder_layers, mlp_parts
from actstore.store import ActivationStore
from actstore.store.format import as_compute
from probes.errors import NeuronReportError
from probes.inputs import select_layers
from probes.kernels import neuron_update
from probes.neurons.correlations import prepare_rows, spearman
from probes.neurons.model import hf_model
from probes.stats import NeuronStats
from probes.stream import stream_to_device

__all__ = ["NEURON_LAYER_RULE", "projection_sources", "projection_correlations",
           "projected_neuron"]

NEURON_LAYER_RULE = ("layer = hidden-state index the neuron's MLP writes into: the neurons of "
                     "decoder block b are listed as layer b+1 (stored: input of block b's "
                     "down_proj, kept with hidden state b+1; projection: computed from hidden "
                     "state b, the input of block b)")


class _BlockProjector:
    """Neuron activations of one block's MLP from residual vectors, in float32 on ``device``:
    act(gate(norm(x))) * up(norm(x)), with float32 copies of the block's own pre-MLP norm module
    (none where the MLP reads the raw residual, OLMo 2) and projection weights (only this
    block's MLP input side is on the device)."""

    def __init__(self, block, device, index=None):
        norm, gate, up, act = mlp_parts(block)
        f32 = dict(device=device, dtype=torch.float32)
        self.norm = (lambda x: x) if norm is None else copy.deepcopy(norm).to(**f32)
        sel = (lambda t: t) if index is None else (lambda t: t[index])
        self.wg = sel(gate.weight.detach()).to(**f32)
        self.wu = sel(up.weight.detach()).to(**f32)
        self.bg = None if gate.bias is None else sel(gate.bias.detach()).to(**f32)
        self.bu = None if up.bias is None else sel(up.bias.detach()).to(**f32)
        self.act = act
        self.m = int(self.wg.shape[0])

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        h = self.norm(x.to(torch.float32))
        return self.act(F.linear(h, self.wg, self.bg)) * F.linear(h, self.wu, self.bu)


def _chunks_as_tensors(store, layer: int, chunk_rows):
    """store.iter_chunks of one layer as CPU tensors (bfloat16 arrives as float32)."""
    for s, X in store.iter_chunks(rows=chunk_rows, layers=[layer]):
        yield s, as_compute(X, store.dtype)


def projection_sources(store: ActivationStore, n_blocks: int, layers=None) -> list[int]:
    """Stored hidden-state indices usable by the projection method: hidden state l feeds block
    l, so the last one (l = n_blocks, after the last block) has no MLP to project through."""
    return [layer for layer in select_layers(store, layers) if layer < n_blocks]


def _project_layer(store, block, source: int, Yd: Tensor, md: Tensor, fold: np.ndarray, dev,
                   chunk_rows, prefetch) -> tuple[Tensor, Tensor]:
    """(pearson, spearman), each (m, k) float64 CPU, of block ``source``'s projected neurons:
    the chunks go through NeuronStats moments (float64 reference) and into a (rows, m) float32
    buffer of the layer for the ranks (memory: one layer's neurons, as the stored method)."""
    proj = _BlockProjector(block, dev)
    buf = torch.empty(int(store.rows_done), proj.m, dtype=torch.float32, device=dev)
    st = None
    for start, X in stream_to_device(_chunks_as_tensors(store, source, chunk_rows), device=dev,
                                     prefetch=prefetch):
        r = X.shape[1]
        a = proj(X[0])
        if not torch.isfinite(a).all():
            raise NeuronReportError(f"{store.path}: projected neurons of layer {source + 1} are "
                                    f"not finite in rows {start}..{start + r - 1}")
        buf[start:start + r] = a
        f = fold[start:start + r]
        if st is None:
            st = NeuronStats.for_chunk(a[None], Yd[start:start + r], f, device=dev)
        neuron_update(st, a[None], Yd[start:start + r], f, backend="torch")
    return st.pearson()[0].cpu(), spearman(buf, Yd, mask=md).cpu()


def projection_correlations(store: ActivationStore, model, Y, rows_mask=None, layers=None,
                            device="cpu", chunk_rows: int | None = None,
                            prefetch: int = 2) -> dict:
    """Pearson and Spearman of the paper's projected MLP neurons with each target.

    Parameters
    ----------
    store : ActivationStore
        A store of the residual stream (no neurons needed).
    model : HF model or LoadedModel
        The model the store was extracted with (see :func:`~probes.neurons.resolve_model`).
    Y, rows_mask, layers, chunk_rows, prefetch
        As :func:`~probes.neurons.neuron_correlations`; ``layers`` are hidden-state indices of
        the source residuals (the last block's output feeds no MLP and is skipped).
    device : str or torch.device
        Where the projections, moments and ranks are computed.

    Returns
    -------
    dict
        "pearson", "spearman": (L, m, k) float64 CPU tensors; "layers": the neurons' layer
        labels l + 1 (see NEURON_LAYER_RULE); "source_layers": l; "positions": the sources'
        positions in the store; "n_rows"; "d_mlp".

    Notes
    -----
    For each selected hidden state l, the stored residual h_l (the input of block l) goes
    through block l's own pre-MLP norm (``post_attention_layernorm`` in Llama-style blocks,
    ``pre_feedforward_layernorm`` in Gemma 2/3, none in OLMo 2; others are refused, see
    :data:`actstore.models.PRE_MLP_NORM`) and ``mlp.gate_proj`` / ``mlp.up_proj``:
    a = act(gate) * up in float32. That equals block l's true neurons when its attention adds
    nothing (h_mid = h_l) and otherwise approximates them by skipping that attention, as the
    paper projects the residual stream onto the neurons' input weights. (The paper's code
    RMS-normalises without the norm weight and correlates the up_proj and gate_proj reads
    separately; here the whole neuron act(gate) * up, the quantity the stored method holds, so
    the two methods agree exactly in the case above. On SmolLM2-135M their per-neuron
    correlations agree to r ~ 0.95 at layer 7, see the slow test.)
    """
    dev = torch.device(device)
    blocks = decoder_layers(hf_model(model))
    Yn, mask, fold = prepare_rows(store, Y, rows_mask)
    ids = projection_sources(store, len(blocks), layers)
    if not ids:
        raise NeuronReportError(
            f"{store.path}: no stored layer feeds a decoder block (layers {store.layers}, "
            f"{len(blocks)} blocks): the projection method needs hidden states < {len(blocks)}")
    Yd = torch.from_numpy(Yn).to(dev)
    md = torch.from_numpy(mask).to(dev)
    pear, spear = zip(*[_project_layer(store, blocks[src], src, Yd, md, fold, dev, chunk_rows,
                                       prefetch) for src in ids])
    return {"pearson": torch.stack(pear), "spearman": torch.stack(spear),
            "layers": [src + 1 for src in ids], "source_layers": ids,
            "positions": [list(store.layers).index(src) for src in ids],
            "n_rows": int(mask.sum()), "d_mlp": int(pear[0].shape[0])}


def projected_neuron(store: ActivationStore, model, source_layer: int, index, device="cpu",
                     chunk_rows: int | None = None) -> np.ndarray:
    """(rows_done,) float32 projected activation of neuron ``index`` of block ``source_layer``,
    computed from the stored hidden state ``source_layer`` (the entry's "source_layer"; the
    neuron is listed as layer source_layer + 1, see :func:`projection_correlations`); a list of
    indices gives (rows_done, len(index)) from one pass over the layer."""
    block = decoder_layers(hf_model(model))[int(source_layer)]
    one = isinstance(index, (int, np.integer))
    idx = [int(index)] if one else [int(i) for i in index]
    proj = _BlockProjector(block, torch.device(device), index=idx)
    out = np.empty((int(store.rows_done), len(idx)), dtype=np.float32)
    for s, X in _chunks_as_tensors(store, int(source_layer), chunk_rows):
        out[s:s + X.shape[1]] = proj(X[0].to(device)).cpu().numpy()
    return out[:, 0] if one else out
