"""Neuron–target correlations for every neuron of every layer, from one streaming pass.

:class:`NeuronStats` holds, for B layers of m neurons and k targets, over the rows seen so far
(rows with fold id -1 are skipped)::

    n          number of rows
    sx[b, j]   = Σ x            x = activation - shift[b, j]   (shift: float32-representable)
    sxx[b, j]  = Σ x²
    sxy[b, j]  = Σ x y          y = target - yshift            (yshift: per target)
    sy, syy    = Σ y, Σ y²      (k,)

Pearson r[b, j, t] = Sxy / sqrt(Sxx Syy) with the centred sums Sxy = sxy - sx sy / n,
Sxx = sxx - sx² / n, Syy = syy - sy² / n; a constant neuron (Sxx = 0) gets r = 0.

Spearman ρ is the Pearson r of the average ranks (ties share the mean of their ranks): it needs
each neuron's whole column, so :func:`spearman` works per layer (one layer in memory, on the
GPU when the data is there) rather than streaming.

``neuron_update(stats, X, Y, fold=None, backend="auto")`` adds one chunk X (B, r, m) float16;
backends as for the Gram statistics: "torch" (float64 reference, here), "cpu" (C++/OpenMP in
``actstore._native``), "triton", "cuda".

:func:`neuron_report` (``fastprobe neurons``) takes the neurons either from the store
(method "stored", ``actstore extract --neurons``) or computes them the paper's way from the stored
residual stream and the model's MLP input weights (method "projection"), feeds both through the
same moments and ranks, and can add each top neuron's output-weight cosine with a fitted probe.
Layer naming for both: a neuron's "layer" is the hidden-state index its MLP writes into (block b
-> layer b+1), which is where the stored method keeps it and which probe it is compared with.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from probes.metrics import _latlon

__all__ = ["NeuronStats", "NeuronStatsError", "neuron_update", "reference_neuron_update",
           "rank_transform", "spearman", "pearson_from_moments", "prepare_neuron_chunk",
           "neuron_correlations", "NeuronReportError", "neuron_report", "METHODS",
           "projection_correlations", "projected_neuron", "resolve_model", "load_probe",
           "add_probe_cosines", "write_neuron_report", "PRE_MLP_NORM", "pre_mlp_norm_name",
           "output_weights"]


class NeuronStatsError(ValueError):
    """Bad input to the neuron statistics (shapes, dtypes, fold ids)."""


@dataclass
class NeuronStats:
    """Streaming per-neuron moments (float64 torch tensors on one device); see module docstring."""

    shift: Tensor    # (B, m)
    yshift: Tensor   # (k,)
    n: Tensor        # () rows
    sx: Tensor       # (B, m)
    sxx: Tensor      # (B, m)
    sxy: Tensor      # (B, m, k)
    sy: Tensor       # (k,)
    syy: Tensor      # (k,)

    @classmethod
    def zeros(cls, B: int, m: int, k: int, shift=None, yshift=None, device="cpu") -> "NeuronStats":
        if min(B, m, k) < 1:
            raise NeuronStatsError(f"NeuronStats.zeros needs B, m, k >= 1, got {(B, m, k)}")
        z = dict(dtype=torch.float64, device=device)
        sh = torch.zeros(B, m, **z) if shift is None else _f32_exact(shift, (B, m), "shift", device)
        ysh = torch.zeros(k, **z) if yshift is None else _f32_exact(yshift, (k,), "yshift", device)
        return cls(shift=sh, yshift=ysh, n=torch.zeros((), **z), sx=torch.zeros(B, m, **z),
                   sxx=torch.zeros(B, m, **z), sxy=torch.zeros(B, m, k, **z),
                   sy=torch.zeros(k, **z), syy=torch.zeros(k, **z))

    @classmethod
    def for_chunk(cls, X, Y, fold=None, device=None) -> "NeuronStats":
        """Empty statistics shaped for chunks like (X, Y), shifted by this chunk's means."""
        Xt = _as_tensor(X)
        Yt = _as_tensor(Y).reshape(Xt.shape[1], -1)
        keep = _keep_mask(fold, Xt.shape[1], Xt.device)
        if keep.any():
            Xt, Yt = Xt[:, keep], Yt[keep.to(Yt.device)]
        dev = device if device is not None else Xt.device
        shift = Xt.to(torch.float64).mean(1) if Xt.shape[1] else None
        yshift = Yt.to(torch.float64).mean(0) if Yt.shape[0] else None
        return cls.zeros(Xt.shape[0], Xt.shape[2], Yt.shape[1], shift=shift, yshift=yshift,
                         device=dev)

    @property
    def B(self) -> int:
        return int(self.shift.shape[0])

    @property
    def m(self) -> int:
        return int(self.shift.shape[1])

    @property
    def k(self) -> int:
        return int(self.yshift.shape[0])

    @property
    def device(self) -> torch.device:
        return self.sx.device

    def clone(self) -> "NeuronStats":
        return NeuronStats(**{f.name: getattr(self, f.name).clone() for f in fields(self)})

    def add_moments(self, keep: Tensor, sx, sxx, sxy, Yc: Tensor) -> None:
        """Add moments of a chunk computed elsewhere; Yc (r, k) float64 targets minus yshift,
        keep (r,) bool of the rows that the moments cover."""
        yk = Yc[keep]
        self.n += float(keep.sum())
        self.sx += sx.to(self.sx)
        self.sxx += sxx.to(self.sxx)
        self.sxy += sxy.to(self.sxy)
        self.sy += yk.sum(0)
        self.syy += (yk * yk).sum(0)

    def __iadd__(self, other: "NeuronStats") -> "NeuronStats":
        if (other.B, other.m, other.k) != (self.B, self.m, self.k):
            raise NeuronStatsError("cannot add NeuronStats of different shapes")
        if not (torch.equal(other.shift.to(self.device), self.shift)
                and torch.equal(other.yshift.to(self.device), self.yshift)):
            raise NeuronStatsError("cannot add NeuronStats with different shifts")
        for name in ("n", "sx", "sxx", "sxy", "sy", "syy"):
            getattr(self, name).add_(getattr(other, name).to(self.device))
        return self

    def pearson(self) -> Tensor:
        """(B, m, k) float64 Pearson correlation of every neuron with every target."""
        return pearson_from_moments(self.n, self.sx, self.sxx, self.sxy, self.sy, self.syy)

    def means(self) -> Tensor:
        """(B, m) mean activation of every neuron."""
        return self.sx / self.n + self.shift


def pearson_from_moments(n, sx, sxx, sxy, sy, syy) -> Tensor:
    n = float(n)
    if n < 2:
        raise NeuronStatsError(f"Pearson correlation needs at least 2 rows, got {int(n)}")
    Sxx = (sxx - sx * sx / n).clamp_min(0)
    Syy = (syy - sy * sy / n).clamp_min(0)
    Sxy = sxy - sx.unsqueeze(-1) * sy / n
    den = torch.sqrt(Sxx.unsqueeze(-1) * Syy)
    r = torch.where(den > 0, Sxy / torch.where(den > 0, den, 1.0), torch.zeros_like(Sxy))
    return r.clamp(-1.0, 1.0)


# ------------------------------------------------------------------------------------ helpers
def _as_tensor(a) -> Tensor:
    if isinstance(a, Tensor):
        return a
    if hasattr(a, "__cuda_array_interface__") or hasattr(a, "__dlpack__") and not isinstance(a, np.ndarray):
        return torch.from_dlpack(a)
    return torch.from_numpy(np.ascontiguousarray(a))


def _f32_exact(a, shape, name, device) -> Tensor:
    t = _as_tensor(a).to(device=device, dtype=torch.float64)
    if tuple(t.shape) != tuple(shape):
        raise NeuronStatsError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise NeuronStatsError(f"{name} contains NaN or inf")
    # kernels subtract a float32 shift: keep exactly that value so every backend agrees
    return t.to(torch.float32).to(torch.float64).contiguous()


def _keep_mask(fold, r, device) -> Tensor:
    if fold is None:
        return torch.ones(r, dtype=torch.bool, device=device)
    f = _as_tensor(fold).to(device).reshape(-1)
    if f.dtype.is_floating_point or f.dtype == torch.bool:
        raise NeuronStatsError(f"fold ids must be integers, got {f.dtype}")
    if f.numel() != r:
        raise NeuronStatsError(f"fold must have shape ({r},), got {tuple(f.shape)}")
    if r and int(f.min()) < -1:
        raise NeuronStatsError(f"fold ids must be >= -1 (-1 = skip the row), got {int(f.min())}")
    return f >= 0


def prepare_neuron_chunk(stats: NeuronStats, X, Y, fold):
    """Validate a chunk; returns (X tensor, Yc (r, k) float64 = Y - yshift on stats.device,
    keep (r,) bool on stats.device, fold01 (r,) int32 numpy: 0 kept / -1 skipped, or None)."""
    Xt = _as_tensor(X)
    if Xt.ndim != 3 or Xt.shape[0] != stats.B or Xt.shape[2] != stats.m:
        raise NeuronStatsError(f"X must have shape (B, r, m) = ({stats.B}, r, {stats.m}), "
                               f"got {tuple(Xt.shape)}")
    r = int(Xt.shape[1])
    Yt = _as_tensor(Y)
    if Yt.ndim == 1 and stats.k == 1:
        Yt = Yt.reshape(-1, 1)
    if tuple(Yt.shape) != (r, stats.k):
        raise NeuronStatsError(f"Y must have shape (r, k) = ({r}, {stats.k}), got {tuple(Yt.shape)}")
    dev = stats.device
    Yc = Yt.to(device=dev, dtype=torch.float64) - stats.yshift
    if not torch.isfinite(Yc).all():
        raise NeuronStatsError("Y contains NaN or inf")
    keep = _keep_mask(fold, r, dev)
    fold01 = None
    if fold is not None and not bool(keep.all()):
        fold01 = np.where(keep.cpu().numpy(), 0, -1).astype(np.int32)
    return Xt, Yc, keep, fold01


def reference_neuron_update(stats: NeuronStats, X, Y, fold=None) -> NeuronStats:
    """The torch float64 reference: every activation converted to float64 before any product."""
    Xt, Yc, keep, _ = prepare_neuron_chunk(stats, X, Y, fold)
    dev = stats.device
    Xd = Xt.to(device=dev, dtype=torch.float64)[:, keep] - stats.shift.unsqueeze(1)   # (B, rk, m)
    Yk = Yc[keep]
    stats.n += float(keep.sum())
    stats.sx += Xd.sum(1)
    stats.sxx += (Xd * Xd).sum(1)
    stats.sxy += torch.einsum("brm,rk->bmk", Xd, Yk)
    stats.sy += Yk.sum(0)
    stats.syy += (Yk * Yk).sum(0)
    return stats


def _cpu_neuron_update(stats: NeuronStats, X, Y, fold=None) -> NeuronStats:
    from actstore import native

    Xt, Yc, keep, fold01 = prepare_neuron_chunk(stats, X, Y, fold)
    Xn = Xt.detach().cpu().numpy() if isinstance(Xt, Tensor) else np.asarray(Xt)
    if Xn.dtype != np.float16:
        raise NeuronStatsError(f"the cpu backend needs float16 activations, got {Xn.dtype}")
    Xn = np.ascontiguousarray(Xn)
    f = (np.zeros(Xn.shape[1], np.int32) if fold01 is None else fold01)
    sx, sxx, sxy = native.cpu.neuron_moments(
        Xn.view(np.uint16), np.ascontiguousarray(Yc.cpu().numpy(), dtype=np.float64),
        f, np.ascontiguousarray(stats.shift.cpu().numpy(), dtype=np.float32))
    dev = stats.device
    stats.add_moments(keep, torch.from_numpy(sx).to(dev), torch.from_numpy(sxx).to(dev),
                      torch.from_numpy(sxy).to(dev), Yc)
    return stats


def _cpu_available() -> bool:
    try:
        from actstore import native
    except ImportError:
        return False
    return hasattr(native.cpu, "neuron_moments")


def _on_cuda(X) -> bool:
    if isinstance(X, Tensor):
        return X.device.type == "cuda"
    return hasattr(X, "__cuda_array_interface__")


#: auto's order for the moments on a GPU: the CUDA kernel read 11008-column activations at 67 %
#: of the H200's copy ceiling, the Triton one at 19 % (bench/RESULTS.md, 27 Nov 2026)
NEURON_GPU_ORDER = ("cuda", "triton")


def neuron_update(stats: NeuronStats, X, Y, fold=None, backend: str = "auto") -> NeuronStats:
    """Add one chunk X (B, r, m) float16 with targets Y (r, k) into ``stats``.

    backend: auto (for CUDA data the first of NEURON_GPU_ORDER that runs; else cpu, else
    torch) | torch | cpu | triton | cuda.
    """
    from probes.kernels import BackendUnavailable, get_backend

    name = (backend or "auto").lower()
    if name == "auto":
        if _on_cuda(X):
            for cand in NEURON_GPU_ORDER:
                try:
                    return get_backend(cand).neuron_update(stats, X, Y, fold)
                except (BackendUnavailable, ImportError):
                    continue
        name = "cpu" if _cpu_available() else "torch"
    if name == "torch":
        return reference_neuron_update(stats, X, Y, fold)
    if name == "cpu":
        if not _cpu_available():
            raise BackendUnavailable("the compiled module lacks neuron_moments; rebuild with `make native`")
        return _cpu_neuron_update(stats, X, Y, fold)
    if name in ("triton", "cuda"):
        return get_backend(name).neuron_update(stats, X, Y, fold)
    raise NeuronStatsError(f"unknown backend {backend!r}; choose auto, torch, cpu, triton or cuda")


# ------------------------------------------------------------------------------------ Spearman
def rank_transform(x: Tensor, dim: int = 0) -> Tensor:
    """Average ranks (1-based, ties get the mean of their ranks) along ``dim``, float64.

    Works along the last, contiguous dimension (``dim`` is moved there first): sorting and the
    tie-group scans along a strided dimension took 3.5x as long on CPU (40k x 1536 float32:
    30.4 s against 8.7 s, same ranks bit for bit). Within a tie group the order is irrelevant,
    so the sort need not be stable."""
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
    Xt = _as_tensor(X)
    dev = Xt.device
    Yt = _as_tensor(Y).to(dev)
    if Yt.ndim == 1:
        Yt = Yt.reshape(-1, 1)
    if Xt.ndim != 2 or Yt.shape[0] != Xt.shape[0]:
        raise NeuronStatsError(f"X must be (r, m) and Y (r, k) with the same r, got "
                               f"{tuple(Xt.shape)} and {tuple(Yt.shape)}")
    if mask is not None:
        mk = _as_tensor(mask).to(dev).bool()
        Xt, Yt = Xt[mk], Yt[mk]
    n = Xt.shape[0]
    if n < 2:
        raise NeuronStatsError(f"Spearman correlation needs at least 2 rows, got {n}")
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
def neuron_correlations(store, Y, rows_mask=None, layers=None, backend: str = "auto",
                        device=None, method=("pearson", "spearman"), chunk_rows: int | None = None,
                        array: str = "neurons", prefetch: int = 2) -> dict:
    """Correlations of every neuron of every (selected) layer of ``store`` with each target.

    Y (n_rows, k) targets aligned with the store's rows; ``rows_mask`` (n_rows,) bool selects
    rows (None = all); ``layers``: layer POSITIONS (None = all). Pearson comes from one streaming
    pass (chunks read ahead on threads and sent to ``device`` double-buffered, moments by
    ``backend``); Spearman reads one whole layer at a time (ranks need every row) and ranks on
    ``device``. Returns {"pearson": (L, m, k), "spearman": (L, m, k)} float64 CPU tensors (for
    the requested methods), "n_rows", "layers" (hidden-state indices).
    """
    from probes.stream import stream_to_device

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    n = int(store.rows_done)
    Yn = np.array(Y, dtype=np.float64)      # a private, writable copy
    if Yn.ndim == 1:
        Yn = Yn.reshape(-1, 1)
    if Yn.shape[0] < n:
        raise NeuronStatsError(f"Y has {Yn.shape[0]} rows but the store has {n} rows done")
    Yn = Yn[:n]
    if not np.isfinite(Yn).all():
        raise NeuronStatsError("Y contains NaN or inf")
    mask = np.ones(n, dtype=bool) if rows_mask is None else np.asarray(rows_mask, dtype=bool)[:n]
    fold = np.where(mask, 0, -1).astype(np.int32)
    pos = list(range(store.n_layers)) if layers is None else [int(p) for p in layers]
    out = {"n_rows": int(mask.sum()), "layers": [store.layers[p] for p in pos]}
    methods = (method,) if isinstance(method, str) else tuple(method)
    if "pearson" in methods:
        Yd = torch.from_numpy(Yn).to(dev)
        st = None
        chunks = store.iter_chunks(rows=chunk_rows, layers=pos, array=array)
        for start, X in stream_to_device(chunks, device=dev, prefetch=prefetch):
            r = X.shape[1]
            f = fold[start:start + r]
            if st is None:
                st = NeuronStats.for_chunk(X, Yd[start:start + r], f, device=dev)
            neuron_update(st, X, Yd[start:start + r], f, backend=backend)
        if st is None:
            raise NeuronStatsError("the store has no rows written")
        out["pearson"] = st.pearson().cpu()
    if "spearman" in methods:
        Yd = torch.from_numpy(Yn).to(dev)
        md = torch.from_numpy(mask).to(dev)
        out["spearman"] = torch.stack([
            spearman(store.layer(p, array=array, as_="torch").to(dev), Yd, mask=md).cpu()
            for p in pos])
    return out


# ------------------------------------------------------------------------------------ projection
METHODS = ("stored", "projection")
NEURON_LAYER_RULE = ("layer = hidden-state index the neuron's MLP writes into: the neurons of "
                     "decoder block b are listed as layer b+1 (stored: input of block b's "
                     "down_proj, kept with hidden state b+1; projection: computed from hidden "
                     "state b, the input of block b)")


# Which norm module feeds each architecture's MLP, by decoder-block class (read from the
# installed transformers' modeling_*.py): "post_attention_layernorm" in the pre-norm blocks
# (Llama, SmolLM2 = Llama, Mistral, Qwen2/3, Gemma 1, OLMo 1), "pre_feedforward_layernorm" in
# Gemma 2/3 (whose post_attention_layernorm normalises the attention OUTPUT), None in OLMo 2/3
# (post-norm: post_attention_layernorm normalises the attention output and the MLP reads the
# raw residual). Unknown blocks are refused: guessing a norm gives silently wrong neurons.
PRE_MLP_NORM = {
    "LlamaDecoderLayer": "post_attention_layernorm",
    "MistralDecoderLayer": "post_attention_layernorm",
    "Qwen2DecoderLayer": "post_attention_layernorm",
    "Qwen3DecoderLayer": "post_attention_layernorm",
    "SmolLM3DecoderLayer": "post_attention_layernorm",
    "GemmaDecoderLayer": "post_attention_layernorm",
    "OlmoDecoderLayer": "post_attention_layernorm",
    "Gemma2DecoderLayer": "pre_feedforward_layernorm",
    "Gemma3DecoderLayer": "pre_feedforward_layernorm",
    "Olmo2DecoderLayer": None,
    "Olmo3DecoderLayer": None,
}


def pre_mlp_norm_name(block):
    """Attribute name of the norm in front of ``block``'s MLP (None: the MLP reads the raw
    residual), from :data:`PRE_MLP_NORM` by the block's class (or a base class); unknown layouts
    raise NeuronReportError."""
    for cls in type(block).__mro__:
        if cls.__name__ in PRE_MLP_NORM:
            return PRE_MLP_NORM[cls.__name__]
    raise NeuronReportError(
        f"--method projection does not know which norm feeds the MLP of {type(block).__name__} "
        f"blocks (known: {', '.join(sorted(PRE_MLP_NORM))}); refusing to guess. Extract the "
        "neurons instead (`actstore extract --neurons`, method stored)")


def _mlp_parts(block):
    """(norm or None, gate_proj, up_proj, act_fn) of a gated-MLP decoder block of a known
    architecture (:data:`PRE_MLP_NORM`): the norm is the module in front of the MLP, None where
    the MLP reads the raw residual (OLMo 2)."""
    norm_name = pre_mlp_norm_name(block)
    mlp = getattr(block, "mlp", None)
    parts = {"mlp.gate_proj": getattr(mlp, "gate_proj", None),
             "mlp.up_proj": getattr(mlp, "up_proj", None),
             "mlp.act_fn": getattr(mlp, "act_fn", None)}
    if norm_name is not None:
        parts[norm_name] = getattr(block, norm_name, None)
    missing = [k for k, v in parts.items() if v is None]
    if missing:
        raise NeuronReportError(
            f"--method projection needs a gated MLP (Llama, Mistral, Qwen2, Gemma, OLMo 2...); "
            f"{type(block).__name__} has no {', '.join(missing)}")
    norm = None if norm_name is None else parts[norm_name]
    return norm, parts["mlp.gate_proj"], parts["mlp.up_proj"], parts["mlp.act_fn"]


class _BlockProjector:
    """Neuron activations of one block's MLP from residual vectors, in float32 on ``device``:
    act(gate(norm(x))) * up(norm(x)), with float32 copies of the block's own pre-MLP norm module
    (none where the MLP reads the raw residual, OLMo 2) and projection weights (only this
    block's MLP input side is on the device)."""

    def __init__(self, block, device, index=None):
        import copy

        norm, gate, up, act = _mlp_parts(block)
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
        import torch.nn.functional as F

        h = self.norm(x.to(torch.float32))
        return self.act(F.linear(h, self.wg, self.bg)) * F.linear(h, self.wu, self.bu)


def _chunks_as_tensors(store, positions, chunk_rows):
    """store.iter_chunks for these positions as CPU tensors (bfloat16 arrives as float32)."""
    from probes.fit import _to_float

    for s, X in store.iter_chunks(rows=chunk_rows, layers=positions):
        yield s, _to_float(X, store.dtype)


def projection_sources(store, n_blocks: int, layers=None) -> list[int]:
    """Store positions usable by the projection method: hidden state l feeds block l, so the
    last hidden state (l = n_blocks, after the last block) has no MLP to project through."""
    pos = list(range(store.n_layers)) if layers is None else [int(p) for p in layers]
    return [p for p in pos if int(store.layers[p]) < n_blocks]


def projection_correlations(store, model, Y, rows_mask=None, layers=None, device="cpu",
                            chunk_rows: int | None = None, prefetch: int = 2) -> dict:
    """Pearson and Spearman of the paper's projected MLP neurons with each target.

    For each selected store position p with hidden-state index l = store.layers[p] < number of
    blocks: the stored residual h_l (the input of block l) is normalised by block l's own
    pre-MLP norm module, the one the model applies in front of the MLP (:data:`PRE_MLP_NORM`:
    ``post_attention_layernorm`` in Llama-style blocks, x / sqrt(mean(x²) + eps) * w;
    ``pre_feedforward_layernorm`` in Gemma 2/3; none in OLMo 2, whose MLP reads the raw
    residual; other architectures are refused) and projected through block l's
    ``mlp.gate_proj`` and ``mlp.up_proj``: a = act(gate) * up (float32). This equals block
    l's true neuron activations when the attention of block l adds nothing (h_mid = h_l);
    otherwise it approximates them by skipping block l's
    attention, as the paper projects the residual stream onto the neurons' input weights.
    (The paper's code RMS-normalises without the norm weight and correlates the up_proj and
    gate_proj reads separately; here the block's own norm, weight and eps included, and the
    whole neuron act(gate) * up: the quantity the stored method holds, so the two methods are
    comparable and agree exactly in the case above. On SmolLM2-135M the per-neuron
    correlations of the two methods agree to r ~ 0.95 at layer 7, see the slow test.)

    The rows stream in chunks of one layer at a time; each chunk's activations go through the
    same :class:`NeuronStats` moments (:func:`neuron_update`, float64 reference) as stored
    neurons, and into a (rows, d_mlp) float32 buffer of that layer for the Spearman ranks
    (memory: one layer's neurons, as the stored method's Spearman). Y, rows_mask: as
    :func:`neuron_correlations`. Returns {"pearson", "spearman": (L, m, k) float64 CPU tensors,
    "layers": neuron layer labels (l + 1, see NEURON_LAYER_RULE), "source_layers": l,
    "positions": store positions, "n_rows", "d_mlp"}.
    """
    from actstore.models import decoder_layers
    from probes.stream import stream_to_device

    dev = torch.device(device)
    net = model.model if hasattr(model, "tokenizer") and hasattr(model, "model") else model
    blocks = decoder_layers(net)
    n = int(store.rows_done)
    Yn = np.array(Y, dtype=np.float64)
    Yn = (Yn.reshape(-1, 1) if Yn.ndim == 1 else Yn)[:n]
    mask = np.ones(n, dtype=bool) if rows_mask is None else np.asarray(rows_mask, dtype=bool)[:n]
    fold = np.where(mask, 0, -1).astype(np.int32)
    pos = projection_sources(store, len(blocks), layers)
    if not pos:
        raise NeuronReportError(
            f"{store.path}: no stored layer feeds a decoder block (layers {store.layers}, "
            f"{len(blocks)} blocks): the projection method needs hidden states < {len(blocks)}")
    Yd = torch.from_numpy(Yn).to(dev)
    md = torch.from_numpy(mask).to(dev)
    pear, spear = [], []
    for p in pos:
        l = int(store.layers[p])
        proj = _BlockProjector(blocks[l], dev)
        buf = torch.empty(n, proj.m, dtype=torch.float32, device=dev)
        st = None
        for start, X in stream_to_device(_chunks_as_tensors(store, [p], chunk_rows), device=dev,
                                         prefetch=prefetch):
            r = X.shape[1]
            a = proj(X[0])
            if not torch.isfinite(a).all():
                raise NeuronReportError(f"{store.path}: projected neurons of layer {l + 1} are "
                                        f"not finite in rows {start}..{start + r - 1}")
            buf[start:start + r] = a
            f = fold[start:start + r]
            if st is None:
                st = NeuronStats.for_chunk(a[None], Yd[start:start + r], f, device=dev)
            neuron_update(st, a[None], Yd[start:start + r], f, backend="torch")
        pear.append(st.pearson()[0].cpu())
        spear.append(spearman(buf, Yd, mask=md).cpu())
        del buf
    return {"pearson": torch.stack(pear), "spearman": torch.stack(spear),
            "layers": [int(store.layers[p]) + 1 for p in pos],
            "source_layers": [int(store.layers[p]) for p in pos], "positions": pos,
            "n_rows": int(mask.sum()), "d_mlp": int(pear[0].shape[0])}


def projected_neuron(store, model, position: int, index, device="cpu",
                     chunk_rows: int | None = None) -> np.ndarray:
    """(rows_done,) float32 projected activation of neuron ``index`` of the block fed by the
    store's layer position ``position`` (see :func:`projection_correlations`); a list of
    indices gives (rows_done, len(index)) from one pass over the layer."""
    from actstore.models import decoder_layers

    net = model.model if hasattr(model, "tokenizer") and hasattr(model, "model") else model
    block = decoder_layers(net)[int(store.layers[position])]
    one = isinstance(index, (int, np.integer))
    idx = [int(index)] if one else [int(i) for i in index]
    proj = _BlockProjector(block, torch.device(device), index=idx)
    out = np.empty((int(store.rows_done), len(idx)), dtype=np.float32)
    for s, X in _chunks_as_tensors(store, [position], chunk_rows):
        out[s:s + X.shape[1]] = proj(X[0].to(device)).cpu().numpy()
    return out[:, 0] if one else out


def _best_activations(top_neurons: dict, read) -> dict:
    """{target: activation of its best neuron}, reading each layer position once:
    read(position, indices) -> (rows, len(indices))."""
    by_pos: dict = {}
    for t, entries in top_neurons.items():
        by_pos.setdefault(entries[0]["position"], []).append(t)
    acts = {}
    for pos, ts in by_pos.items():
        cols = read(pos, [top_neurons[t][0]["index"] for t in ts])
        acts.update({t: cols[:, i] for i, t in enumerate(ts)})
    return acts


# ------------------------------------------------------------------------------------ models
_MODEL_KEYS = ("architecture", "n_layers", "d_model")
_WEIGHT_KEYS = ("file_sha256", "files_sha256")


def _store_model_meta(store) -> dict:
    meta = store.meta if isinstance(store.meta, dict) else {}
    m = meta.get("model")
    return m if isinstance(m, dict) else {}


def resolve_model(store, model=None):
    """(HF model, info dict) for the projection method and probe cosines.

    model: None (the model named in the store's metadata), a name/path for
    :func:`actstore.models.load_model` (loaded on CPU in float32), a ``LoadedModel``, or a
    loaded HF model. The model must agree with the store (d_model, blocks, architecture, MLP
    width, weight file hashes where both sides record them), else NeuronReportError."""
    from actstore.models import LoadedModel, ModelError, load_model

    meta = _store_model_meta(store)
    if model is None:
        if not meta.get("id"):
            raise NeuronReportError(f"{store.path}: the store records no model; pass the model it "
                                    "was extracted with (--model NAME_OR_PATH)")
        if meta.get("source") == "in-memory":
            raise NeuronReportError(
                f"{store.path}: the store was extracted from an in-memory model "
                f"({meta.get('id')!r}) that cannot be reloaded by name; pass --model NAME_OR_PATH "
                "(or model=<the HF model> in Python)")
        model = meta.get("path") if meta.get("source") == "local" and meta.get("path") else meta["id"]
    if isinstance(model, (str, os.PathLike)):
        try:
            lm = load_model(str(model), device="cpu", compute_dtype="float32")
        except ModelError as exc:
            raise NeuronReportError(f"cannot load model {str(model)!r} for the neuron weights: "
                                    f"{exc}") from None
        net, info = lm.model, lm.info
    elif isinstance(model, LoadedModel):
        net, info = model.model, dict(model.info)
    elif hasattr(model, "config") and hasattr(model, "modules"):
        net, info = model, {"id": getattr(model.config, "_name_or_path", None) or
                            type(model).__name__, "source": "in-memory"}
    else:
        raise NeuronReportError(f"model must be a name/path or a loaded model, got "
                                f"{type(model).__name__}")
    _check_model(store, net, info, meta)
    return net, info


def _check_model(store, net, info, meta) -> None:
    from actstore.models import decoder_layers, mlp_width

    blocks = decoder_layers(net)
    have = {"architecture": type(net).__name__, "n_layers": len(blocks),
            "d_model": int(net.config.hidden_size)}
    diffs = []
    if have["d_model"] != store.d_model:
        diffs.append(f"d_model {have['d_model']} vs the store's {store.d_model}")
    for k in ("architecture", "n_layers"):
        if meta.get(k) is not None and meta[k] != have[k]:
            diffs.append(f"{k} {have[k]} vs the store's {meta[k]}")
    if max(store.layers) > len(blocks):
        diffs.append(f"{len(blocks)} blocks but the store has hidden state {max(store.layers)}")
    if store.d_mlp is not None and not diffs:
        try:
            m = mlp_width(blocks[0])
        except ValueError:
            m = None
        if m is not None and m != store.d_mlp:
            diffs.append(f"d_mlp {m} vs the store's {store.d_mlp}")
    for k in _WEIGHT_KEYS:
        if info.get(k) and meta.get(k) and info[k] != meta[k]:
            diffs.append("different weight files (sha256)")
    if diffs:
        raise NeuronReportError(
            f"model mismatch: {info.get('id')!r} is not the model {store.path} was extracted with "
            f"({meta.get('id')!r}): {'; '.join(diffs)}")


# ------------------------------------------------------------------------------------ probes
def _same_path(a, b) -> bool:
    from pathlib import Path
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, TypeError):
        return False


def load_probe(probe_dir, store) -> dict:
    """Probe directions from a ``fastprobe fit --out`` directory made on ``store``.

    Returns {"dir", "store", "targets", "layers" (hidden-state indices), "coef": (L, d, k)
    float64}; coef[:, :, t] is the probe's weight vector of target t in target units
    (prediction = x · coef + intercept), i.e. its direction in residual space.

    The fit must come from this store: results.json's ``store_identity`` (written by
    ``fastprobe fit``: the store's creation time, dataset sha256, prompt name, model id and
    completed rows) must equal this store's, whatever the paths, so a copy or a moved store is
    accepted and a store re-extracted at the same path with another prompt or dataset is not.
    Older results.json without it: when the path differs, the store there, if any, must have the
    same dataset sha256 and creation time, and the row count must agree. In any case the same
    model and d_model. Otherwise NeuronReportError says what differs."""
    from pathlib import Path

    from probes.fit import ARRAYS_FILE, FitError, load_results

    pdir = Path(probe_dir)
    try:
        res = load_results(pdir)
    except FitError as exc:
        raise NeuronReportError(f"--probe {pdir}: {exc}") from None
    npz = (pdir if pdir.is_dir() else pdir.parent) / ARRAYS_FILE
    if not npz.exists():
        raise NeuronReportError(f"--probe {pdir}: no {ARRAYS_FILE} beside results.json (the "
                                "probe coefficients)")
    with np.load(npz) as z:
        coef = np.asarray(z["coef"], dtype=np.float64)
        lay = [int(x) for x in z["layers"]]
    what = f"--probe {pdir} was fit on {res.get('store')!r}, not on {store.path}"
    if coef.ndim != 3 or coef.shape[1] != store.d_model:
        raise NeuronReportError(f"{what}: its probes have width {coef.shape[1:2]}, the store's "
                                f"d_model is {store.d_model}")
    meta = store.meta if isinstance(store.meta, dict) else {}
    smodel = _store_model_meta(store)
    pmodel = res.get("model") if isinstance(res.get("model"), dict) else {}
    diffs = [f"model {pmodel.get(k)!r} vs {smodel.get(k)!r}" for k in ("id",) + _WEIGHT_KEYS
             if pmodel.get(k) and smodel.get(k) and pmodel[k] != smodel[k]]
    ident = res.get("store_identity")
    if isinstance(ident, dict):
        from probes.fit import store_identity
        have = store_identity(store)
        for k, label in (("created", "created"), ("dataset_sha256", "dataset sha256"),
                         ("prompt", "prompt"), ("model_id", "model id"), ("n_rows", "rows")):
            if k == "model_id" and any(x.startswith("model ") for x in diffs):
                continue   # already said
            if k in ident and ident[k] != have[k]:
                diffs.append(f"{label} {ident[k]!r} vs {have[k]!r}")
    elif not _same_path(res.get("store", ""), store.path):   # results.json without identity
        if res.get("n_rows") is not None and int(res["n_rows"]) != int(store.rows_done):
            diffs.append(f"{res['n_rows']} rows vs {store.rows_done}")
        other = Path(str(res.get("store", "")))
        if str(res.get("store", "")) and other.exists():
            from actstore.store import StoreError, open_store
            try:
                ometa = open_store(other).meta or {}
            except (StoreError, OSError):
                ometa = {}
            for k, get in (("dataset sha256", lambda m: (m.get("dataset") or {}).get("sha256")),
                           ("created", lambda m: m.get("created"))):
                if get(ometa) != get(meta):
                    diffs.append(f"{k} {get(ometa)!r} vs {get(meta)!r}")
    if diffs:
        if _same_path(res.get("store", ""), store.path):
            what = (f"--probe {pdir} was fit on another store at the same path {store.path} "
                    "(re-extracted since)")
        raise NeuronReportError(f"{what}: {'; '.join(diffs)}")
    return {"dir": str(pdir), "store": res.get("store"), "targets": list(res["targets"]),
            "layers": lay, "coef": coef}


def output_weights(block, d_model: int) -> np.ndarray:
    """(d_model, d_mlp) float64 output weights of ``block``'s MLP: column j is neuron j's
    direction in residual space. The orientation comes from the module type, never from the
    shape (which is ambiguous when d_model == d_mlp): ``nn.Linear`` stores (out, in), GPT-2's
    ``Conv1D`` (in, out); other module types are refused."""
    from actstore.models import down_projection

    mod = down_projection(block)
    w = mod.weight.detach().to(torch.float64).cpu().numpy()
    if isinstance(mod, torch.nn.Linear):
        out = w
    elif any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers")
             for c in type(mod).__mro__):
        out = w.T
    else:
        raise NeuronReportError(f"unknown MLP output projection type {type(mod).__name__} in "
                                f"{type(block).__name__}: cannot tell its weight orientation")
    if out.shape[0] != d_model:
        raise NeuronReportError(f"the MLP output projection of {type(block).__name__} maps to "
                                f"width {out.shape[0]}, the probes have width {d_model}")
    return out


def add_probe_cosines(top_neurons: dict, model, probe: dict) -> None:
    """Add to every listed neuron "probe_layer" and "probe_cosine" = {target: cos} for each
    target of the probe: cos(w_j, c) = w_j · c / (|w_j| |c|), w_j = column j of the down_proj
    weight of the neuron's block (its output direction in residual space) and c the probe's
    coefficient vector at hidden state ``layer`` (the state that block writes into). None where
    the probe has no such layer or either vector is zero."""
    from actstore.models import decoder_layers

    net = model.model if hasattr(model, "tokenizer") and hasattr(model, "model") else model
    blocks = decoder_layers(net)
    d = probe["coef"].shape[1]
    cache = {}

    def out_weights(b):
        if b not in cache:
            cache[b] = output_weights(blocks[b], d)
        return cache[b]

    where = {l: i for i, l in enumerate(probe["layers"])}
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


# ------------------------------------------------------------------------------------ report
NEURONS_JSON = "neurons.json"
NEURONS_NPZ = "neurons.npz"
SPLITS = ("all", "is_test", "train")


class NeuronReportError(ValueError):
    """A neuron report that cannot run on this store (message says what is wrong)."""


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
    :func:`add_probe_cosines`). layers: store positions (default all; projection skips the
    last block's output, which feeds no MLP). out: directory for neurons.json, neurons.npz and
    one PNG per target of its best neuron's activation.

    Returns the neurons.json dict plus ``result["arrays"]`` = {"pearson", "spearman"}: (L, d_mlp,
    k) float64 numpy arrays (saved to neurons.npz).
    """
    import time

    from actstore.store import open_store
    from probes.fit import FitError, _default_device, resolve_targets
    from probes.kernels import resolve_backend

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
    try:
        names = resolve_targets(store, targets)
    except FitError as exc:
        raise NeuronReportError(str(exc)) from None
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

    dev = torch.device(device if device is not None else _default_device(backend))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NeuronReportError(f"backend {backend!r} / device {dev} needs a CUDA GPU and none "
                                "is available")
    probe = load_probe(probe_dir, store) if probe_dir is not None else None
    net = info = None
    if method == "projection" or probe is not None:
        net, info = resolve_model(store, model)
    kw = dict(rows_mask=mask, layers=layers, device=dev, chunk_rows=chunk_rows)
    t1 = time.perf_counter()
    if method == "stored":
        be = resolve_backend(backend, dev, gpu_order=NEURON_GPU_ORDER)
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
        positions = list(range(store.n_layers)) if layers is None else [int(p) for p in layers]
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
            acts = _best_activations(result["top_neurons"], lambda pos, idx: projected_neuron(
                store, net, pos, idx, dev, chunk_rows))
        write_neuron_report(result, out, store, mask, Y, activations=acts)
    t4 = time.perf_counter()
    result["seconds"] = {"pearson" if method == "stored" else "correlations": t2 - t1,
                         "spearman" if method == "stored" else "ranking": t3 - t2,
                         "outputs": t4 - t3, "total": t4 - t0}
    if out is not None:   # rewrite the JSON with the timings
        _write_json(result, out)
    return result


def _write_json(result: dict, out):
    import json
    from pathlib import Path

    doc = {k: v for k, v in result.items() if k != "arrays"}
    (Path(out) / NEURONS_JSON).write_text(json.dumps(doc, indent=1))


def write_neuron_report(result: dict, out, store, mask, Y, activations=None) -> list:
    """neurons.json, neurons.npz and the best-neuron PNGs (see :func:`neuron_report`).

    activations: {target: (rows_done,) activation of that target's best neuron}; None reads
    them from the store's stored neurons (method "stored")."""
    from pathlib import Path

    from probes.report import plot_best_neuron

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(result, out)
    extra = ({"source_layers": np.asarray(result["source_layers"])}
             if "source_layers" in result else {})
    np.savez_compressed(out / NEURONS_NPZ, layers=np.asarray(result["layers"]),
                        targets=np.asarray(result["targets"]), **extra, **result["arrays"])
    written = [out / NEURONS_JSON, out / NEURONS_NPZ]
    names = result["targets"]
    ll = _latlon(names)
    coords = None if ll is None else (Y[mask, ll[1]], Y[mask, ll[0]])
    if activations is None:                  # stored neurons: each layer read once
        activations = _best_activations(result["top_neurons"], lambda pos, idx: store.layer(
            pos, array="neurons", as_="torch")[:, idx].to(torch.float32).numpy())
    for i, t in enumerate(names):
        best = result["top_neurons"][t][0]
        act = np.asarray(activations[t], dtype=np.float32)[:len(mask)][mask]
        written.append(plot_best_neuron(out / f"neuron_{t}.png", t, Y[mask, i], act, best,
                                        lonlat=coords))
    return written
