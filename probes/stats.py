"""Sufficient statistics of a streaming pass over an activation store.

One :class:`GramStats` holds, for a batch of ``B`` layers and ``F`` folds, everything the ridge
solve needs: row counts, column sums, the Gram matrix ``XᵀX``, the cross products ``XᵀY`` and the
target moments. Every backend of :func:`probes.kernels.gram_update` fills the same object, and the
object is additive (``a += b``), so shards of rows (threads, ranks, GPUs) are merged by summing.

Stability: every activation is stored relative to a per-layer constant ``shift`` c (B, d), i.e.
``x := x_raw - c``. With c close to the column means, ``XᵀX`` in float32 pieces does not lose the
centred part to cancellation. The shift never changes any centred quantity: :meth:`centered`
undoes it exactly, and :meth:`reshift` moves statistics to another shift exactly (float64 algebra).

Definitions (sums run over the rows of one fold; x is shifted, y is raw)::

    n[f]        = #rows
    sx[b, f]    = Σ x           (d,)
    xtx[b, f]   = Σ x xᵀ        (d, d), full symmetric
    xty[b, f]   = Σ x yᵀ        (d, k)
    sy[f]       = Σ y           (k,)
    yty[f]      = Σ y yᵀ        (k, k)
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["GramStats", "CenteredStats", "StatsError", "choose_shift", "validate_chunk"]


class StatsError(ValueError):
    """Bad input to the statistics engine (shapes, dtypes, fold ids, incompatible merges)."""


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


_SUM_FIELDS = ("n", "sx", "xtx", "sy", "yty", "xty")


@dataclass
class GramStats:
    """Per-layer, per-fold sufficient statistics (torch tensors, float64, CPU or one device).

    shift (B, d); n (F,); sx (B, F, d); xtx (B, F, d, d); sy (F, k); yty (F, k, k); xty (B, F, d, k).
    See the module docstring for the exact definitions.
    """

    shift: Tensor
    n: Tensor
    sx: Tensor
    xtx: Tensor
    sy: Tensor
    yty: Tensor
    xty: Tensor

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def zeros(cls, B: int, d: int, k: int, n_folds: int = 1, shift=None, device="cpu",
              dtype=torch.float64) -> "GramStats":
        """Empty statistics; ``shift`` (B, d) array-like or None (= 0). Tensors are contiguous."""
        if min(B, d, k, n_folds) < 1:
            raise StatsError(f"GramStats.zeros needs B, d, k, n_folds >= 1, got {(B, d, k, n_folds)}")
        if shift is None:
            shift_t = torch.zeros(B, d, dtype=dtype, device=device)
        else:
            shift_t = torch.as_tensor(np.asarray(shift) if not isinstance(shift, Tensor) else shift)
            shift_t = shift_t.to(device=device, dtype=dtype).contiguous().clone()
            if tuple(shift_t.shape) != (B, d):
                raise StatsError(f"shift must have shape (B, d) = {(B, d)}, got {tuple(shift_t.shape)}")
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
    def device(self) -> torch.device:
        return self.xtx.device

    @property
    def dtype(self) -> torch.dtype:
        return self.xtx.dtype

    @property
    def n_rows(self) -> int:
        """Rows accumulated over all folds."""
        return int(round(float(self.n.sum())))

    def _dims(self) -> tuple[int, int, int, int]:
        return self.B, self.d, self.k, self.n_folds

    def check(self) -> "GramStats":
        """Raise StatsError unless every tensor has the shape implied by shift, n and sy."""
        B, d, k, F = self._dims()
        want = dict(shift=(B, d), n=(F,), sx=(B, F, d), xtx=(B, F, d, d), sy=(F, k),
                    yty=(F, k, k), xty=(B, F, d, k))
        for name, shape in want.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise StatsError(f"GramStats.{name} has shape {got}, expected {shape}")
        return self

    # ----------------------------------------------------------------------------- algebra
    def clone(self) -> "GramStats":
        return GramStats(**{f.name: getattr(self, f.name).clone() for f in fields(self)})

    def to(self, device=None, dtype=None) -> "GramStats":
        return GramStats(**{f.name: getattr(self, f.name).to(device=device, dtype=dtype)
                            for f in fields(self)})

    def reshift(self, new_shift) -> "GramStats":
        """The same statistics expressed about another shift c' (exact float64 algebra).

        With δ = c - c': Σ(x+δ) = sx + nδ; Σ(x+δ)(x+δ)ᵀ = xtx + sx δᵀ + δ sxᵀ + n δδᵀ;
        Σ(x+δ)yᵀ = xty + δ syᵀ.
        """
        new = torch.as_tensor(new_shift).to(device=self.device, dtype=self.dtype)
        if tuple(new.shape) != (self.B, self.d):
            raise StatsError(f"new shift must have shape {(self.B, self.d)}, got {tuple(new.shape)}")
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

    def __iadd__(self, other: "GramStats") -> "GramStats":
        if not isinstance(other, GramStats):
            return NotImplemented
        if self._dims() != other._dims():
            raise StatsError(f"cannot add GramStats of dims (B, d, k, F) = {other._dims()} "
                             f"into {self._dims()}")
        if other.device != self.device or other.dtype != self.dtype:
            other = other.to(device=self.device, dtype=self.dtype)
        if not torch.equal(other.shift, self.shift):
            other = other.reshift(self.shift)
        for name in _SUM_FIELDS:
            getattr(self, name).add_(getattr(other, name))
        return self

    def __add__(self, other: "GramStats") -> "GramStats":
        if not isinstance(other, GramStats):
            return NotImplemented
        out = self.clone()
        out += other
        return out

    def all_reduce_(self, group=None) -> "GramStats":
        """Sum the statistics over the ranks of a torch.distributed group, in place.

        Rank 0's shift is broadcast first and every rank re-expresses its statistics about it,
        so ranks may have chosen different shifts.
        """
        import torch.distributed as dist

        shift0 = self.shift.clone()
        dist.broadcast(shift0, src=0, group=group)
        if not torch.equal(shift0, self.shift):
            moved = self.reshift(shift0)
            for f in fields(self):
                setattr(self, f.name, getattr(moved, f.name))
        for name in _SUM_FIELDS:
            dist.all_reduce(getattr(self, name), op=dist.ReduceOp.SUM, group=group)
        return self

    # ----------------------------------------------------------------------------- views
    def _fold_index(self, fold_mask) -> Tensor:
        F = self.n_folds
        if fold_mask is None:
            return torch.arange(F, device=self.device)
        m = torch.as_tensor(np.asarray(fold_mask) if not isinstance(fold_mask, Tensor) else fold_mask)
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

    def nbytes(self) -> int:
        return sum(getattr(self, f.name).numel() * getattr(self, f.name).element_size()
                   for f in fields(self))


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
            raise StatsError(f"fold ids must lie in [-1, {F}) (-1 = skip the row), got min {lo}, max {hi}")
    return r, k
