"""What every Triton kernel family shares: the interpreter switch, the upper-triangle tile walk
and tile store of the Gram kernels, the fold index of a chunk and the chunk itself as the
kernels take it (:class:`Chunk`, made once per ``gram_update`` by :func:`prepare_chunk`).

``INTERPRET`` is read when this module is imported, as ``triton.jit`` reads TRITON_INTERPRET
when a kernel is defined: under the interpreter the kernels run on CPU tensors (tests).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from probes.stats import GramStats, fold_groups, validate_chunk

try:  # Hopper TMA descriptors (Triton >= 3.4); without them the TMA paths fail and fall back
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def tile_of(pid, n_tm, n_tn, BM: tl.constexpr, BN: tl.constexpr):
    """(I, J) of the pid-th tile, row-major over I, among the BM x BN tiles of a d x d matrix
    that hold at least one entry with i <= j: row block I keeps J >= (BM * I) // BN."""
    ti = pid * 0
    rem = pid
    while rem >= n_tn - (BM * ti) // BN:
        rem -= n_tn - (BM * ti) // BN
        ti += 1
    return ti, (BM * ti) // BN + rem


@triton.jit
def store_gram_tile(G, acc, bf, ti, tj, d, BM: tl.constexpr, BN: tl.constexpr,
                     ACC: tl.constexpr = False):
    """Write the i <= j part of a float32 tile to (i, j) and the i < j part to (j, i) of the
    bf-th d x d matrix of G: every entry is written once and G is exactly symmetric.
    ACC: G holds the float64 totals and the tile is added into them (no float32 chunk Gram, no
    separate add pass; each entry belongs to exactly one tile, so there is no race)."""
    ci = ti * BM + tl.arange(0, BM)
    cj = tj * BN + tl.arange(0, BN)
    mi = ci < d
    mj = cj < d
    base = G + bf.to(tl.int64) * d * d
    upper = ci[:, None] <= cj[None, :]
    m = mi[:, None] & mj[None, :] & upper
    p = base + ci[:, None].to(tl.int64) * d + cj[None, :]
    if ACC:
        tl.store(p, tl.load(p, mask=m, other=0.0) + acc.to(tl.float64), mask=m)
    else:
        tl.store(p, acc, mask=m)
    if tj * BN + BN - 1 > ti * BM:      # the tile has entries strictly above the diagonal
        mt = mj[:, None] & mi[None, :] & (cj[:, None] > ci[None, :])
        pt = base + cj[:, None].to(tl.int64) * d + ci[None, :]
        if ACC:
            tl.store(pt, tl.load(pt, mask=mt, other=0.0) + tl.trans(acc).to(tl.float64), mask=mt)
        else:
            tl.store(pt, tl.trans(acc), mask=mt)


def tile_grid(d: int, bm: int, bn: int) -> tuple[int, int, int]:
    """(n_tm, n_tn, n_prog): tile rows and columns of a d x d matrix in BM x BN tiles, and how
    many of them hold an entry with i <= j (one program each, see ``tile_of``)."""
    n_tm, n_tn = triton.cdiv(d, bm), triton.cdiv(d, bn)
    return n_tm, n_tn, sum(n_tn - (bm * i) // bn for i in range(n_tm))


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the device (2 under the interpreter), to size grids."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def counts_tensor(counts, device) -> torch.Tensor:
    """Per-fold row counts (F,) as a float64 tensor on the device."""
    return torch.as_tensor(np.asarray(counts, dtype=np.float64), device=device)


def fold_index(fold, r: int, F: int, device):
    """Rows grouped by fold: (idx int32 (n_kept,), off int32 (F+1,), counts (F,), ranges) or
    (None, None, counts, ranges) when every row is in fold 0 (contiguous, no gather). ``ranges``:
    [(first_row, n_rows)] per fold when each fold's rows are one contiguous range of the chunk
    (what "rawtma" reads in place), else None."""
    if fold is None:
        return None, None, np.array([r], dtype=np.int64), [(0, r)]
    f = fold.detach().cpu().numpy() if isinstance(fold, torch.Tensor) else np.asarray(fold)
    order, counts, off = fold_groups(f, F)
    if order is None:
        return None, None, counts, [(0, r)]
    # order lists each fold's rows ascending: a fold is contiguous iff first + count - 1 == last
    ranges = [(int(order[a]) if c else 0, int(c)) for a, c in zip(off[:-1], counts)]
    if any(c and order[a + c - 1] - order[a] + 1 != c for a, c in zip(off[:-1], counts)):
        ranges = None
    return (torch.from_numpy(order).to(device),
            torch.from_numpy(off.astype(np.int32)).to(device), counts, ranges)


def row_args(idx, off, r: int, device):
    """(IDX, OFF, GATHER) kernel arguments: the fold-ordered rows of :func:`fold_index`, or,
    when every row is in fold 0 (idx None), OFF = [0, r] and an unused IDX."""
    if idx is not None:
        return idx, off, True
    off = torch.tensor([0, r], dtype=torch.int32, device=device)
    return off, off, False


def check_x(X) -> torch.Tensor:
    """X as a float16 torch tensor on CUDA (any device under the interpreter), unit stride
    along its last dimension."""
    if not isinstance(X, torch.Tensor):
        X = torch.as_tensor(np.asarray(X))
    if X.dtype != torch.float16:
        raise ValueError(f"the triton backend needs float16 activations, got {X.dtype}")
    if not INTERPRET and X.device.type != "cuda":
        raise ValueError(f"the triton backend needs CUDA tensors, got X on {X.device}")
    if X.stride(-1) != 1:
        X = X.contiguous()
    return X


def tma_descriptor(t: torch.Tensor, block):
    """A TMA tensor descriptor over ``t`` (its shape and strides) with the given block shape."""
    if TensorDescriptor is None:
        raise RuntimeError("this Triton has no triton.tools.tensor_descriptor (TMA loads)")
    return TensorDescriptor(t, list(t.shape), list(t.stride()), list(block))


@dataclass
class Chunk:
    """One chunk as the kernels take it, on the statistics' device: X (B, r, d) float16 with
    unit stride along d; targets Yd (r, k) float64 and Y32 float32 contiguous; ``fold`` as
    given; the kept rows grouped by fold (:func:`fold_index`: idx, off, counts, ranges); the
    shift rounded to float32 (B, d), contiguous."""

    X: torch.Tensor
    Yd: torch.Tensor
    Y32: torch.Tensor
    fold: object
    idx: torch.Tensor | None
    off: torch.Tensor | None
    counts: np.ndarray
    ranges: list | None
    shift32: torch.Tensor

    @property
    def B(self) -> int:
        return self.X.shape[0]

    @property
    def r(self) -> int:
        return self.X.shape[1]

    @property
    def d(self) -> int:
        return self.X.shape[2]

    @property
    def k(self) -> int:
        return self.Yd.shape[1]

    @property
    def F(self) -> int:
        return len(self.counts)

    @property
    def device(self) -> torch.device:
        return self.X.device


def prepare_chunk(stats: GramStats, X, Y, fold) -> Chunk | None:
    """Validate one chunk against ``stats`` and put it in the kernels' form; None when it
    keeps no row. Makes the statistics the kernels write (sx, xtx, xty) contiguous."""
    r, k = validate_chunk(stats, X, Y, fold)
    X = check_x(X)
    dev = stats.device
    if X.device != dev:
        raise ValueError(f"X is on {X.device} but the statistics are on {dev}")
    Yd = Y if isinstance(Y, torch.Tensor) else torch.from_numpy(np.asarray(Y))
    Yd = Yd.to(device=dev, dtype=torch.float64).reshape(r, k)
    idx, off, counts, ranges = fold_index(fold, r, stats.n_folds, dev)
    if r == 0 or counts.sum() == 0:
        return None
    for name in ("sx", "xtx", "xty"):
        if not getattr(stats, name).is_contiguous():
            setattr(stats, name, getattr(stats, name).contiguous())
    return Chunk(X, Yd, Yd.to(torch.float32).contiguous(), fold, idx, off, counts, ranges,
                 stats.shift.to(torch.float32).contiguous())
