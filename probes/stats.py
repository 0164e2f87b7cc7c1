"""Sufficient statistics of a streaming pass over an activation store.

:class:`GramStats` (per layer and fold: counts, column sums, ``XᵀX``, ``XᵀY``, target moments)
is what the ridge solve needs; :class:`NeuronStats` (per neuron: Σx, Σx², Σxy) is what the
neuron correlations need. Both sit on :class:`AdditiveStats`: a dataclass of tensors on one
device that is additive (``a += b``), so shards of rows (threads, ranks, GPUs) merge by summing.
Every backend of :mod:`probes.kernels` fills the same objects.

Stability: activations are accumulated relative to a per-layer constant ``shift`` c close to
the column means (x := x_raw - c), so float32 pieces do not lose the centred part to
cancellation. The shift never changes a centred quantity (:meth:`GramStats.centered`,
:meth:`GramStats.reshift` and :func:`pearson_from_moments` undo it in float64).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar, NamedTuple, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from probes.errors import StatsError

__all__ = ["AdditiveStats", "GramStats", "CenteredStats", "StatsError", "choose_shift",
           "validate_chunk", "fold_groups", "NeuronStats", "pearson_from_moments",
           "prepare_neuron_chunk", "as_tensor"]


# ------------------------------------------------------------------------------------ inputs
def as_tensor(a) -> Tensor:
    """``a`` as a torch tensor without a copy where possible: tensors pass through, CUDA /
    DLPack arrays (CuPy) go through DLPack, anything else through a contiguous numpy array."""
    if isinstance(a, Tensor):
        return a
    if hasattr(a, "__cuda_array_interface__") or (hasattr(a, "__dlpack__")
                                                  and not isinstance(a, np.ndarray)):
        return torch.from_dlpack(a)
    return torch.from_numpy(np.ascontiguousarray(a))


_as_tensor = as_tensor   # the old private name, kept while other modules move to as_tensor


def _f32_exact(a, shape, name, device) -> Tensor:
    t = as_tensor(a).to(device=device, dtype=torch.float64)
    if tuple(t.shape) != tuple(shape):
        raise StatsError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise StatsError(f"{name} contains NaN or inf")
    # kernels subtract a float32 shift: keep exactly that value so every backend agrees
    return t.to(torch.float32).to(torch.float64).contiguous()


def _keep_mask(fold, r, device) -> Tensor:
    if fold is None:
        return torch.ones(r, dtype=torch.bool, device=device)
    f = as_tensor(fold).to(device).reshape(-1)
    if f.dtype.is_floating_point or f.dtype == torch.bool:
        raise StatsError(f"fold ids must be integers, got {f.dtype}")
    if f.numel() != r:
        raise StatsError(f"fold must have shape ({r},), got {tuple(f.shape)}")
    if r and int(f.min()) < -1:
        raise StatsError(f"fold ids must be >= -1 (-1 = skip the row), got {int(f.min())}")
    return f >= 0


# ------------------------------------------------------------------------------------ base
_S = TypeVar("_S", bound="AdditiveStats")


@dataclass
class AdditiveStats:
    """The shared base of the streaming statistics: a dataclass whose fields are tensors on one
    device, some of them sums over rows (``_ADDITIVE``), so two objects describing disjoint
    rows merge by adding those fields.

    A subclass declares its fields, ``_ADDITIVE``, ``_ANCHOR`` (the field that reports the
    device and dtype), ``_DIM_NAMES`` and implements :meth:`_dims`, :meth:`_shapes` and, when
    its shift can differ between shards, :meth:`_aligned`.
    """

    _ADDITIVE: ClassVar[tuple[str, ...]] = ()
    _ANCHOR: ClassVar[str] = "shift"
    _DIM_NAMES: ClassVar[str] = ""

    def _dims(self) -> tuple[int, ...]:
        raise NotImplementedError

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        """{field: the shape its dimensions imply}."""
        raise NotImplementedError

    def _aligned(self: _S, other: _S) -> _S:
        """``other`` (same device and dtype) expressed so its sums add to this object's."""
        return other

    # ----------------------------------------------------------------------------- fields
    def tensors(self) -> dict[str, Tensor]:
        """{field name: tensor}, in field order."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def _map(self: _S, fn) -> _S:
        return type(self)(**{name: fn(t) for name, t in self.tensors().items()})

    def clone(self: _S) -> _S:
        """A deep copy (every tensor cloned)."""
        return self._map(lambda t: t.clone())

    def to(self: _S, device=None, dtype=None) -> _S:
        """A copy with every tensor on ``device`` / in ``dtype`` (None: unchanged)."""
        return self._map(lambda t: t.to(device=device, dtype=dtype))

    def nbytes(self) -> int:
        """Bytes held by the tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def device(self) -> torch.device:
        return getattr(self, self._ANCHOR).device

    @property
    def dtype(self) -> torch.dtype:
        return getattr(self, self._ANCHOR).dtype

    def check(self: _S) -> _S:
        """Raise StatsError unless every tensor has the shape its dimensions imply."""
        for name, shape in self._shapes().items():
            got = tuple(getattr(self, name).shape)
            if got != tuple(shape):
                raise StatsError(f"{type(self).__name__}.{name} has shape {got}, "
                                 f"expected {tuple(shape)}")
        return self

    # ----------------------------------------------------------------------------- merging
    def __iadd__(self: _S, other: _S) -> _S:
        if not isinstance(other, type(self)):
            return NotImplemented
        if self._dims() != other._dims():
            raise StatsError(f"cannot add {type(self).__name__} of dims {self._DIM_NAMES} = "
                             f"{other._dims()} into {self._dims()}")
        if other.device != self.device or other.dtype != self.dtype:
            other = other.to(device=self.device, dtype=self.dtype)
        other = self._aligned(other)
        for name in self._ADDITIVE:
            getattr(self, name).add_(getattr(other, name))
        return self

    def __add__(self: _S, other: _S) -> _S:
        if not isinstance(other, type(self)):
            return NotImplemented
        out = self.clone()
        out += other
        return out


# ------------------------------------------------------------------------------------ Gram
class CenteredStats(NamedTuple):
    """Centred statistics of a set of rows (see :meth:`GramStats.centered`).

    n: number of rows; mean_x (B, d): column means of the raw activations (shift added back);
    Sxx (B, d, d) = Σ (x - x̄)(x - x̄)ᵀ; Sxy (B, d, k) = Σ (x - x̄)(y - ȳ)ᵀ;
    mean_y (k,); Syy (k, k) = Σ (y - ȳ)(y - ȳ)ᵀ. All float64 on the statistics' device.
    """

    n: int
    mean_x: Tensor
    Sxx: Tensor
    Sxy: Tensor
    mean_y: Tensor
    Syy: Tensor


@dataclass
class GramStats(AdditiveStats):
    """Per-layer, per-fold sufficient statistics of the ridge solve (torch tensors, float64,
    CPU or one device), for ``B`` layers, ``F`` folds, width ``d`` and ``k`` targets.

    Sums run over the rows of one fold; x is shifted (x_raw - shift), y is raw::

        shift (B, d)
        n[f]        = #rows         (F,)
        sx[b, f]    = Σ x           (B, F, d)
        xtx[b, f]   = Σ x xᵀ        (B, F, d, d), full symmetric
        sy[f]       = Σ y           (F, k)
        yty[f]      = Σ y yᵀ        (F, k, k)
        xty[b, f]   = Σ x yᵀ        (B, F, d, k)
    """

    shift: Tensor
    n: Tensor
    sx: Tensor
    xtx: Tensor
    sy: Tensor
    yty: Tensor
    xty: Tensor

    _ADDITIVE = ("n", "sx", "xtx", "sy", "yty", "xty")
    _ANCHOR = "xtx"
    _DIM_NAMES = "(B, d, k, F)"

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def zeros(cls, B: int, d: int, k: int, n_folds: int = 1, shift=None, device="cpu",
              dtype=torch.float64) -> "GramStats":
        """Empty statistics; ``shift`` (B, d) array-like or None (= 0). Tensors are contiguous."""
        if min(B, d, k, n_folds) < 1:
            raise StatsError(f"GramStats.zeros needs B, d, k, n_folds >= 1, got "
                             f"{(B, d, k, n_folds)}")
        if shift is None:
            shift_t = torch.zeros(B, d, dtype=dtype, device=device)
        else:
            shift_t = torch.as_tensor(np.asarray(shift) if not isinstance(shift, Tensor) else shift)
            shift_t = shift_t.to(device=device, dtype=dtype).contiguous().clone()
            if tuple(shift_t.shape) != (B, d):
                raise StatsError(f"shift must have shape (B, d) = {(B, d)}, got "
                                 f"{tuple(shift_t.shape)}")
            if not torch.isfinite(shift_t).all():
                raise StatsError("shift contains NaN or inf")
        z = dict(dtype=dtype, device=device)
        return cls(
            shift=shift_t,
            n=torch.zeros(n_folds, **z),
            sx=torch.zeros(B, n_folds, d, **z),
            xtx=torch.zeros(B, n_folds, d, d, **z),
            sy=torch.zeros(n_folds, k, **z),
            yty=torch.zeros(n_folds, k, k, **z),
            xty=torch.zeros(B, n_folds, d, k, **z),
        )

    # ----------------------------------------------------------------------------- shape
    @property
    def B(self) -> int:
        return int(self.shift.shape[0])

    @property
    def d(self) -> int:
        return int(self.shift.shape[1])

    @property
    def k(self) -> int:
        return int(self.sy.shape[1])

    @property
    def n_folds(self) -> int:
        return int(self.n.shape[0])

    @property
    def n_rows(self) -> int:
        """Rows accumulated over all folds."""
        return int(round(float(self.n.sum())))

    def _dims(self) -> tuple[int, int, int, int]:
        return self.B, self.d, self.k, self.n_folds

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        B, d, k, F = self._dims()
        return dict(shift=(B, d), n=(F,), sx=(B, F, d), xtx=(B, F, d, d), sy=(F, k),
                    yty=(F, k, k), xty=(B, F, d, k))

    # ----------------------------------------------------------------------------- algebra
    def reshift(self, new_shift) -> "GramStats":
        """The same statistics expressed about another shift c' (exact float64 algebra).

        With δ = c - c': Σ(x+δ) = sx + nδ; Σ(x+δ)(x+δ)ᵀ = xtx + sx δᵀ + δ sxᵀ + n δδᵀ;
        Σ(x+δ)yᵀ = xty + δ syᵀ.
        """
        new = torch.as_tensor(new_shift).to(device=self.device, dtype=self.dtype)
        if tuple(new.shape) != (self.B, self.d):
            raise StatsError(f"new shift must have shape {(self.B, self.d)}, got "
                             f"{tuple(new.shape)}")
        out = self.clone()
        delta = self.shift - new                                     # (B, d)
        if not torch.any(delta != 0):
            out.shift = new.clone()
            return out
        n = self.n.view(1, -1, 1)                                    # (1, F, 1)
        dl = delta.unsqueeze(1)                                      # (B, 1, d)
        out.sx = self.sx + n * dl
        cross = self.sx.unsqueeze(-1) * dl.unsqueeze(-2)             # sx δᵀ  (B, F, d, d)
        # grouped so every term is exactly symmetric: the result stays exactly symmetric
        out.xtx = self.xtx + ((cross + cross.transpose(-1, -2))
                              + n.unsqueeze(-1) * (dl.unsqueeze(-1) * dl.unsqueeze(-2)))
        out.xty = self.xty + dl.unsqueeze(-1) * self.sy.unsqueeze(0).unsqueeze(-2)
        out.shift = new.clone()
        return out

    def _aligned(self, other: "GramStats") -> "GramStats":
        return other if torch.equal(other.shift, self.shift) else other.reshift(self.shift)

    def all_reduce_(self, group=None) -> "GramStats":
        """Sum the statistics over the ranks of a torch.distributed group, in place.

        Rank 0's shift is broadcast first and every rank re-expresses its statistics about it,
        so ranks may have chosen different shifts.
        """
        shift0 = self.shift.clone()
        dist.broadcast(shift0, src=0, group=group)
        if not torch.equal(shift0, self.shift):
            for name, t in self.reshift(shift0).tensors().items():
                setattr(self, name, t)
        for name in self._ADDITIVE:
            dist.all_reduce(getattr(self, name), op=dist.ReduceOp.SUM, group=group)
        return self

    # ----------------------------------------------------------------------------- views
    def _fold_index(self, fold_mask) -> Tensor:
        F = self.n_folds
        if fold_mask is None:
            return torch.arange(F, device=self.device)
        m = fold_mask if isinstance(fold_mask, Tensor) else torch.as_tensor(np.asarray(fold_mask))
        if m.dtype == torch.bool:
            if tuple(m.shape) != (F,):
                raise StatsError(f"boolean fold mask must have shape ({F},), got {tuple(m.shape)}")
            idx = torch.nonzero(m.cpu()).flatten()
        else:
            idx = m.reshape(-1).long().cpu()
            if idx.numel() and (idx.min() < 0 or idx.max() >= F):
                raise StatsError(f"fold index out of range [0, {F}): {idx.tolist()}")
            if idx.unique().numel() != idx.numel():
                raise StatsError(f"fold indices repeat: {idx.tolist()}")
        if idx.numel() == 0:
            raise StatsError("fold selection is empty")
        return idx.to(self.device)

    def select(self, fold_mask) -> "GramStats":
        """Statistics of the selected folds summed into one fold (F = 1)."""
        idx = self._fold_index(fold_mask)
        return GramStats(
            shift=self.shift.clone(),
            n=self.n[idx].sum(0, keepdim=True),
            sx=self.sx[:, idx].sum(1, keepdim=True),
            xtx=self.xtx[:, idx].sum(1, keepdim=True),
            sy=self.sy[idx].sum(0, keepdim=True),
            yty=self.yty[idx].sum(0, keepdim=True),
            xty=self.xty[:, idx].sum(1, keepdim=True),
        )

    def totals(self) -> "GramStats":
        """All folds summed into one (F = 1)."""
        return self.select(None)

    def centered(self, fold_mask=None) -> CenteredStats:
        """Centred statistics of the rows in the selected folds (None = all folds).

        ``fold_mask``: bool mask of length F, or fold indices. The shift cancels exactly:
        Sxx = xtx - sx sxᵀ/n, Sxy = xty - sx syᵀ/n, Syy = yty - sy syᵀ/n, mean_x = sx/n + shift.
        """
        t = self.select(fold_mask)
        n = float(t.n[0])
        if n < 1:
            raise StatsError("no rows in the selected folds")
        sx, sy = t.sx[:, 0], t.sy[0]                                 # (B, d), (k,)
        mean_x = sx / n + self.shift
        Sxx = t.xtx[:, 0] - sx.unsqueeze(-1) * sx.unsqueeze(-2) / n
        Sxx = 0.5 * (Sxx + Sxx.transpose(-1, -2))                    # exact symmetry for eigh
        Sxy = t.xty[:, 0] - sx.unsqueeze(-1) * sy.view(1, 1, -1) / n
        mean_y = sy / n
        Syy = t.yty[0] - torch.outer(sy, sy) / n
        return CenteredStats(int(round(n)), mean_x, Sxx, Sxy, mean_y, Syy)

    def add_targets(self, Y: Tensor, fold, counts) -> None:
        """Add a chunk's target moments (Σy, ΣyyT per fold, in float64) and the per-fold row
        ``counts`` that a kernel reported; the GPU backends share this small part.
        Y: (r, k) on this device; fold: (r,) ids with -1 = skip, or None (all fold 0)."""
        dev = self.device
        if fold is None:
            f = torch.zeros(Y.shape[0], dtype=torch.long, device=dev)
        else:
            f = fold if isinstance(fold, torch.Tensor) else torch.from_numpy(np.asarray(fold))
            f = f.to(device=dev, dtype=torch.long).reshape(-1)
        keep = f >= 0
        fk, Yk = f[keep], Y[keep].to(self.dtype)
        self.n += torch.as_tensor(counts, dtype=self.dtype).to(dev)
        self.sy.index_add_(0, fk, Yk)
        self.yty.index_add_(0, fk, Yk.unsqueeze(-1) * Yk.unsqueeze(-2))


# --------------------------------------------------------------------------------- helpers
def choose_shift(X, fold=None) -> Tensor:
    """A per-layer shift (B, d) float64 for X (B, r, d): the mean of the chunk's rows.

    Rows with fold id -1 are left out when ``fold`` is given (if none remain, all rows are used).
    The values are rounded to float32 so that a float32 kernel subtracts exactly this shift.
    """
    Xt = X if isinstance(X, Tensor) else torch.from_numpy(np.ascontiguousarray(X))
    if Xt.ndim != 3:
        raise StatsError(f"X must be (B, r, d), got shape {tuple(Xt.shape)}")
    if fold is not None:
        f = fold if isinstance(fold, Tensor) else torch.from_numpy(np.asarray(fold))
        keep = (f.to(Xt.device).reshape(-1) >= 0)
        if keep.any():
            Xt = Xt[:, keep]
    if Xt.shape[1] == 0:
        return torch.zeros(Xt.shape[0], Xt.shape[2], dtype=torch.float64)
    mean = Xt.to(torch.float64).mean(dim=1)
    if not torch.isfinite(mean).all():
        raise StatsError("X contains NaN or inf")
    return mean.to(torch.float32).to(torch.float64).cpu()


def _shape(a) -> tuple[int, ...]:
    return tuple(int(s) for s in a.shape)


def validate_chunk(stats: GramStats, X, Y, fold) -> tuple[int, int]:
    """Check one chunk against ``stats``; returns (r, k). Works on numpy arrays and tensors.

    X (B, r, d); Y (r, k) or (r,) when k == 1; fold (r,) integers in [-1, F) or None (needs F == 1).
    """
    B, d, k, F = stats._dims()
    xs = _shape(X)
    if len(xs) != 3 or xs[0] != B or xs[2] != d:
        raise StatsError(f"X must have shape (B, r, d) = ({B}, r, {d}), got {xs}")
    r = xs[1]
    ys = _shape(Y)
    if len(ys) == 1 and k == 1:
        ys = (ys[0], 1)
    if ys != (r, k):
        raise StatsError(f"Y must have shape (r, k) = ({r}, {k}), got {_shape(Y)}")
    if fold is None:
        if F != 1:
            raise StatsError(f"fold ids are required when the statistics have {F} folds")
        return r, k
    fs = _shape(fold)
    if fs != (r,):
        raise StatsError(f"fold must have shape (r,) = ({r},), got {fs}")
    if r:
        f = fold if isinstance(fold, Tensor) else torch.from_numpy(np.asarray(fold))
        if f.dtype.is_floating_point or f.dtype == torch.bool:
            raise StatsError(f"fold ids must be integers, got {f.dtype}")
        lo, hi = int(f.min()), int(f.max())
        if lo < -1 or hi >= F:
            raise StatsError(f"fold ids must lie in [-1, {F}) (-1 = skip the row), got min {lo}, "
                             f"max {hi}")
    return r, k


def fold_groups(f, n_folds: int):
    """Rows grouped by fold, on the host: ``f`` (r,) integer fold ids (-1 = skip) as numpy.
    Returns (order, counts, off): ``order`` int32 row indices sorted by fold with skipped rows
    dropped, or None when every row is in fold 0 (no gather needed); ``counts`` (F,) int64;
    ``off`` (F+1,) int64 offsets of each fold in ``order``. The GPU backends move ``order``
    to the device their own way (torch or CuPy)."""
    f = np.asarray(f).astype(np.int64).reshape(-1)
    counts = np.bincount(f[f >= 0], minlength=n_folds)[:n_folds]
    off = np.zeros(n_folds + 1, dtype=np.int64)
    off[1:] = np.cumsum(counts)
    if n_folds == 1 and counts[0] == len(f):
        return None, counts, off
    order = np.argsort(f, kind="stable")
    return order[f[order] >= 0].astype(np.int32), counts, off



# ------------------------------------------------------------------------------------ neurons
@dataclass
class NeuronStats(AdditiveStats):
    """Streaming per-neuron moments (float64 torch tensors on one device) of ``B`` layers of
    ``m`` neurons against ``k`` targets: the Pearson correlation of every neuron with every
    target (:meth:`pearson`) without keeping the rows.

    Sums run over the kept rows; x is shifted (x_raw - shift), y too (y_raw - yshift)::

        shift (B, m), yshift (k,): float32-exact constants (the chunk means of the first chunk)
        n = #rows ()      sx = Σ x (B, m)     sxx = Σ x² (B, m)     sxy = Σ x y (B, m, k)
        sy = Σ y (k,)     syy = Σ y² (k,)

    Shards merge by ``+=`` only when their shifts are equal (StatsError otherwise).
    """

    shift: Tensor    # (B, m)
    yshift: Tensor   # (k,)
    n: Tensor        # () rows
    sx: Tensor       # (B, m)
    sxx: Tensor      # (B, m)
    sxy: Tensor      # (B, m, k)
    sy: Tensor       # (k,)
    syy: Tensor      # (k,)

    _ADDITIVE = ("n", "sx", "sxx", "sxy", "sy", "syy")
    _ANCHOR = "sx"
    _DIM_NAMES = "(B, m, k)"

    @classmethod
    def zeros(cls, B: int, m: int, k: int, shift=None, yshift=None, device="cpu") -> "NeuronStats":
        """Empty moments; ``shift`` (B, m) and ``yshift`` (k,) array-like or None (= 0), both
        rounded to float32 (the value a float32 kernel subtracts)."""
        if min(B, m, k) < 1:
            raise StatsError(f"NeuronStats.zeros needs B, m, k >= 1, got {(B, m, k)}")
        z = dict(dtype=torch.float64, device=device)
        sh = torch.zeros(B, m, **z) if shift is None else _f32_exact(shift, (B, m), "shift", device)
        ysh = torch.zeros(k, **z) if yshift is None else _f32_exact(yshift, (k,), "yshift", device)
        return cls(shift=sh, yshift=ysh, n=torch.zeros((), **z), sx=torch.zeros(B, m, **z),
                   sxx=torch.zeros(B, m, **z), sxy=torch.zeros(B, m, k, **z),
                   sy=torch.zeros(k, **z), syy=torch.zeros(k, **z))

    @classmethod
    def for_chunk(cls, X, Y, fold=None, device=None) -> "NeuronStats":
        """Empty statistics shaped for chunks like (X, Y), shifted by this chunk's means."""
        Xt = as_tensor(X)
        Yt = as_tensor(Y).reshape(Xt.shape[1], -1)
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

    def _dims(self) -> tuple[int, int, int]:
        return self.B, self.m, self.k

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        B, m, k = self._dims()
        return dict(shift=(B, m), yshift=(k,), n=(), sx=(B, m), sxx=(B, m), sxy=(B, m, k),
                    sy=(k,), syy=(k,))

    def _aligned(self, other: "NeuronStats") -> "NeuronStats":
        if not (torch.equal(other.shift, self.shift) and torch.equal(other.yshift, self.yshift)):
            raise StatsError("cannot add NeuronStats with different shifts")
        return other

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

    def pearson(self) -> Tensor:
        """(B, m, k) float64 Pearson correlation of every neuron with every target."""
        return pearson_from_moments(self.n, self.sx, self.sxx, self.sxy, self.sy, self.syy)

    def means(self) -> Tensor:
        """(B, m) mean activation of every neuron."""
        return self.sx / self.n + self.shift


def pearson_from_moments(n, sx, sxx, sxy, sy, syy) -> Tensor:
    """Pearson r (B, m, k) from the moments of :class:`NeuronStats` (shifted sums: the shift
    cancels); 0 where a neuron or a target is constant, clamped to [-1, 1]."""
    n = float(n)
    if n < 2:
        raise StatsError(f"Pearson correlation needs at least 2 rows, got {int(n)}")
    Sxx = (sxx - sx * sx / n).clamp_min(0)
    Syy = (syy - sy * sy / n).clamp_min(0)
    Sxy = sxy - sx.unsqueeze(-1) * sy / n
    den = torch.sqrt(Sxx.unsqueeze(-1) * Syy)
    r = torch.where(den > 0, Sxy / torch.where(den > 0, den, 1.0), torch.zeros_like(Sxy))
    return r.clamp(-1.0, 1.0)


def prepare_neuron_chunk(stats: NeuronStats, X, Y, fold):
    """Validate a chunk; returns (X tensor, Yc (r, k) float64 = Y - yshift on stats.device,
    keep (r,) bool on stats.device, fold01 (r,) int32 numpy: 0 kept / -1 skipped, or None)."""
    Xt = as_tensor(X)
    if Xt.ndim != 3 or Xt.shape[0] != stats.B or Xt.shape[2] != stats.m:
        raise StatsError(f"X must have shape (B, r, m) = ({stats.B}, r, {stats.m}), "
                         f"got {tuple(Xt.shape)}")
    r = int(Xt.shape[1])
    Yt = as_tensor(Y)
    if Yt.ndim == 1 and stats.k == 1:
        Yt = Yt.reshape(-1, 1)
    if tuple(Yt.shape) != (r, stats.k):
        raise StatsError(f"Y must have shape (r, k) = ({r}, {stats.k}), got {tuple(Yt.shape)}")
    dev = stats.device
    Yc = Yt.to(device=dev, dtype=torch.float64) - stats.yshift
    if not torch.isfinite(Yc).all():
        raise StatsError("Y contains NaN or inf")
    keep = _keep_mask(fold, r, dev)
    fold01 = None
    if fold is not None and not bool(keep.all()):
        fold01 = np.where(keep.cpu().numpy(), 0, -1).astype(np.int32)
    return Xt, Yc, keep, fold01
