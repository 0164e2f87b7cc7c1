"""Exact ridge solvers for many layers at once: every alpha of a grid from one eigendecomposition.

Model (per layer and target t): ŷ = (x - x̄)ᵀw_t + ȳ_t, minimising Σ(y - ŷ)² + α‖w_t‖², the
intercept unpenalised (scikit-learn ``Ridge(fit_intercept=True)``); X centred with the TRAIN
means, never scaled. Primal form (n ≥ d): C = Σ(x-x̄)(x-x̄)ᵀ = V diag(λ) Vᵀ from streamed
statistics; dual form (n < d): K = (X-x̄)(X-x̄)ᵀ from the rows in memory. Selection by exact
efficient leave-one-out (scikit-learn ``RidgeCV(cv=None)``) or K-fold R² from per-fold statistics;
the first best alpha in grid order wins ties. Arithmetic in float64 torch (float32 on request,
with a guarded eigenvalue floor). In memory only: :class:`WeightedFactor` adds sample weights and
any train/test splits (the estimator's). The estimator is in :mod:`probes.ridge.estimator`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from probes.errors import RidgeError
from probes.kernels.cpu import centred

__all__ = [
    "PrimalFactor", "primal_factor", "LooAccumulator", "select_alpha", "kfold_scores_primal",
    "kfold_assignment", "dual_loo", "dual_kfold_scores", "dual_coef", "WeightedFactor",
    "weighted_factor", "split_scores", "fit_arrays",
]


# ----------------------------------------------------------------------------- primal form

def _eigh(M, precision: str = "float64"):
    """Eigendecomposition of a batch of symmetric PSD matrices, returned in float64.

    ``precision="float32"`` decomposes in float32 (about 2x faster on CPU) and clamps eigenvalues
    below the float32 noise floor (8·eps32·λ_max, the guard) to 0. Scores and coefficients are
    then accurate to ~1e-6 for alphas well above eps32·λ_max, degrading (to ~1e-3) for alphas far
    below it, where the smallest eigenvalues are float32 noise. float64 is exact to rounding.
    """
    if precision == "float32":
        lam, V = _batched_eigh(M.to(torch.float32))
        lam, V = lam.to(torch.float64), V.to(torch.float64)
        floor = 8 * float(torch.finfo(torch.float32).eps) * lam[..., -1:].clamp_min(0)
        return torch.where(lam < floor, torch.zeros_like(lam), lam), V
    lam, V = _batched_eigh(M)
    return lam.clamp_min(0.0), V


_SPLIT_EIGH_D = 1024    # up to this size the batch is split over threads (below)


def _batched_eigh(M):
    """torch.linalg.eigh of a batch (B, d, d). On the CPU, for d ≤ 1024, the batch is split over
    the intra-op threads, each decomposing its share with one thread: LAPACK's tridiagonal
    reduction (memory-bound) barely gains from a second thread, a second matrix at once does
    (30 x 576 x 576 on 2 cores: float64 0.71 s against 1.11 s, float32 0.35 s against 0.45 s)."""
    nt = torch.get_num_threads()
    if M.device.type != "cpu" or M.dim() != 3 or M.shape[0] < 2 or nt < 2 \
            or M.shape[-1] > _SPLIT_EIGH_D:
        return torch.linalg.eigh(M)
    from concurrent.futures import ThreadPoolExecutor  # deferred: only this path needs it
    parts = torch.tensor_split(M, min(nt, M.shape[0]))
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(len(parts), thread_name_prefix="probes-eigh") as pool:
            out = list(pool.map(torch.linalg.eigh, parts))
    finally:
        torch.set_num_threads(nt)
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])


@dataclass
class PrimalFactor:
    """Centred, eigendecomposed train statistics of a batch of B layers (float64 tensors).

    mean: (B, d) train mean of x (true coordinates, shift added back); ybar: (k,) train mean of y;
    n: train rows; lam: (B, d) eigenvalues of C; V: (B, d, d) eigenvectors; G: (B, d, k) = Vᵀ Cxy.
    """
    n: float
    mean: torch.Tensor
    ybar: torch.Tensor
    lam: torch.Tensor
    V: torch.Tensor
    G: torch.Tensor

    def coef(self, alphas) -> torch.Tensor:
        """w for given alphas: ``alphas`` (B, k) per layer and target -> (B, d, k)."""
        a = torch.as_tensor(np.asarray(alphas, dtype=np.float64), device=self.lam.device)
        inv = 1.0 / (self.lam[:, :, None] + a[:, None, :])          # (B, d, k)
        return torch.einsum("bde,bek->bdk", self.V, inv * self.G)

    def intercept(self, coef) -> torch.Tensor:
        """b = ȳ - x̄ᵀw, (B, k)."""
        return self.ybar[None, :] - torch.einsum("bd,bdk->bk", self.mean, coef)


def _centre(n, sx, xtx, sy, xty):
    """Centred scatter matrices from raw sums (n scalar)."""
    xbar = sx / n                                                     # (B, d)
    ybar = sy / n                                                     # (k,)
    C = xtx - n * xbar[:, :, None] * xbar[:, None, :]
    C = 0.5 * (C + C.transpose(1, 2))
    Cxy = xty - n * xbar[:, :, None] * ybar[None, None, :]
    return xbar, ybar, C, Cxy


def primal_factor(n, sx, xtx, sy, xty, shift=None, precision="float64") -> PrimalFactor:
    """Eigendecompose the centred train statistics of B layers at once.

    n: number of train rows; sx (B, d) Σx; xtx (B, d, d) Σxxᵀ; sy (k,) Σy; xty (B, d, k) Σxyᵀ,
    all over the TRAIN rows, x measured from ``shift`` (B, d) (None = 0). C = V diag(λ) Vᵀ and
    G = Vᵀ Σ(x-x̄)(y-ȳ)ᵀ give w(α) = V diag(1/(λ+α)) G for every α at once; eigenvalues are
    clamped at 0 (tiny negative values are rounding in a positive semi-definite matrix).
    """
    n = float(n)
    if n < 3:
        raise RidgeError(f"need at least 3 training rows, got {int(n)}")
    sx, xtx, sy, xty = (torch.as_tensor(t, dtype=torch.float64) for t in (sx, xtx, sy, xty))
    for name, t in (("Σx", sx), ("XᵀX", xtx), ("Xᵀy", xty)):
        if not bool(torch.isfinite(t).all()):
            bad = (~torch.isfinite(t.reshape(t.shape[0], -1))).any(1).nonzero().ravel().tolist()
            raise RidgeError(f"non-finite statistics ({name}) for layer positions {bad}: "
                             "the activations contain NaN or inf")
    xbar, ybar, C, Cxy = _centre(n, sx, xtx, sy, xty)
    lam, V = _eigh(C, precision)
    G = V.transpose(1, 2) @ Cxy
    mean = xbar if shift is None else xbar + torch.as_tensor(shift, dtype=torch.float64)
    return PrimalFactor(n=n, mean=mean, ybar=ybar, lam=lam, V=V, G=G)


def _zeros(shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    """A zeroed tensor; on the CPU backed by numpy, whose large allocations are advised to use
    transparent huge pages: first touch of 480 MB took 0.05 s against torch's 0.2 s (a page
    fault per 4 KiB)."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    t = torch.from_numpy(np.empty(shape, dtype=torch.empty(0, dtype=dtype).numpy().dtype))
    return t.zero_()


class LooAccumulator:
    """Second streaming pass of the primal form: per chunk, Z = (X - x̄)V of the train rows, then
    for every alpha their hat diagonal, fitted value and LOO residual; the test rows' fitted
    values come straight from every alpha's coefficients (X - x̄)·V·GA, without Z. The fitted
    values of every row are kept, so that the chosen alpha's predictions need no third pass.

    Exact efficient LOO, identical to scikit-learn ``RidgeCV(cv=None)``: the hat diagonal is
    h_i(α) = 1/n + Σ_j Z_ij²/(λ_j+α) (the 1/n is the unpenalised intercept) and the LOO residual
    e_i = (y_i - ŷ_i(α)) / (1 - h_i(α)). ``precision="float32"`` computes Z, the fitted values
    and the residuals in float32 (kept predictions too; the residual sums in float64): about 2x
    faster, ~1e-6 relative error, which the float32 Z already sets.

    The per-alpha products are formed transposed, rows last: (GA)ᵀZᵀ and (1/(λ+α))ᵀ(Z²)ᵀ. Their
    output is only A·k or A columns wide, where the BLAS runs at 0.6-0.7x in the natural
    orientation: transposed, 61 -> 88 GF/s (A·k = 100) and 30 -> 52 GF/s (A = 25) in float64 on
    2 cores. So the fitted values and ``pred`` are (B, A, k, rows).
    """

    def __init__(self, factor: PrimalFactor, alphas, n_rows: int, keep_predictions=True,
                 precision: str = "float64"):
        self.f = factor
        self.alphas = np.asarray(alphas, dtype=np.float64)
        B, d = factor.lam.shape
        k = factor.G.shape[2]
        A = len(self.alphas)
        self.B, self.d, self.k, self.A = B, d, k, A
        dev = factor.lam.device
        a = torch.as_tensor(self.alphas, device=dev)
        inv = 1.0 / (factor.lam[:, None, :] + a[None, :, None])                # (B, A, d)
        # (B, A*k, d): row (a, t) = G[:, t] / (λ + α_a)
        GA_T = (inv[:, :, None, :] * factor.G.transpose(1, 2)[:, None, :, :]).reshape(B, A * k, d)
        self.sse = torch.zeros(B, A, k, dtype=torch.float64, device=dev)
        self.n_train = 0
        # the pass's operands in its compute dtype
        self.dtype = torch.float32 if precision == "float32" else torch.float64
        self.Vc = factor.V.to(self.dtype)
        self.meanc = factor.mean.to(self.dtype)
        self.ybar_c = factor.ybar.to(self.dtype)[:, None]                       # (k, 1)
        self.inv_T = inv.to(self.dtype).contiguous()                           # (B, A, d)
        self.GA_T = GA_T.to(self.dtype).contiguous()                           # (B, A*k, d)
        # every alpha's coefficients, transposed: (V·GA)ᵀ = GAᵀVᵀ
        self.WA_T = (GA_T @ factor.V.transpose(1, 2)).to(self.dtype).contiguous()
        self.pred = (_zeros((B, A, k, n_rows), self.dtype, dev) if keep_predictions else None)
        self._bufs: dict[str, torch.Tensor] = {}

    def _scratch(self, name: str, shape: tuple) -> torch.Tensor:
        """A contiguous buffer (compute dtype) kept across chunks and grown when a chunk needs
        more (chunks split into train and test rows differ in size): a fresh array costs a page
        fault per 4 KiB on first touch (about 5 µs each in a VM), as much as the arithmetic.
        torch's allocation, not numpy's: with the products written into numpy's (16-byte
        aligned) memory the float64 pass took 7.8-8.4 s against 6.6-7.0 s (30 x 20,000 x 576)."""
        need = int(np.prod(shape))
        t = self._bufs.get(name)
        if t is None or t.numel() < need:
            t = self._bufs[name] = torch.empty(need, dtype=self.dtype, device=self.f.lam.device)
        return t[:need].view(shape)

    def _keep(self, start: int, rows, values) -> None:
        """Store fitted values (B, A, k, r') of the chunk's rows ``rows`` (None: all r')."""
        if self.pred is None:
            return
        if rows is None:
            self.pred[..., start:start + values.shape[-1]] = values
        else:
            self.pred.index_copy_(3, rows + start, values)

    def update(self, start: int, X, Y, train) -> None:
        """X (B, r, d) any float dtype (numpy or torch), Y (r, k) targets, train (r,) bool."""
        X = torch.as_tensor(X)
        dev = self.f.lam.device
        if X.device != dev:
            X = X.to(dev)
        B, r, d, A, k, dt = self.B, X.shape[1], self.d, self.A, self.k, self.dtype
        train = torch.as_tensor(np.asarray(train, dtype=bool), device=dev)
        n_tr = int(train.sum())
        # centred first (a large mean cannot cancel digits away), into buffers, never into X
        # (the caller's); fp16 converted by the C++ kernel on CPU, which also takes the train
        # and the test rows apart (a gathered copy cost a tenth of the pass)
        tr = None if n_tr == r else train.nonzero().ravel()
        if n_tr < r:
            # test rows need only their predictions: every alpha's coefficients times
            # (X - x̄), not the d-wide Z (a fifth of the pass's products on a 20 % test split);
            # their targets never enter the sums (a NaN test target cannot leak)
            te = (~train).nonzero().ravel()
            X_te = centred(X, self.meanc, out=self._scratch("x_te", (B, r - n_tr, d)), dtype=dt,
                           rows=te)
            y_te = torch.matmul(self.WA_T, X_te.mT,
                                out=self._scratch("y_te", (B, A * k, r - n_tr)))
            self._keep(start, te, y_te.view(B, A, k, -1).add_(self.ybar_c))
            if n_tr == 0:
                return
        Xc = centred(X, self.meanc, out=self._scratch("x", (B, n_tr, d)), dtype=dt, rows=tr)
        Z = torch.matmul(Xc, self.Vc, out=self._scratch("z", (B, n_tr, d)))
        yhat = torch.matmul(self.GA_T, Z.mT, out=self._scratch("yhat", (B, A * k, n_tr)))
        yhat = yhat.view(B, A, k, n_tr).add_(self.ybar_c)
        self._keep(start, tr, yhat)
        Z.mul_(Z)
        # 1 - h, h = Σ Z²/(λ + α) + 1/n
        one_minus_h = torch.matmul(self.inv_T, Z.mT, out=self._scratch("h", (B, A, n_tr)))
        one_minus_h.add_(1.0 / self.f.n).neg_().add_(1.0)
        Yc = torch.as_tensor(np.asarray(Y), device=dev).to(dt)
        if tr is not None:
            Yc = Yc[tr]
        e = torch.sub(Yc.T, yhat, out=self._scratch("e", (B, A, k, n_tr)))
        e.div_(one_minus_h[:, :, None, :]).mul_(e)
        self.sse += e.sum(3, dtype=torch.float64)
        self.n_train += n_tr

    def scores(self):
        """(B, A, k) per-target LOO score: -mean squared LOO residual (a shared alpha is then
        chosen on the mean over targets, sklearn's ``alpha_per_target=False``)."""
        return -(self.sse / max(self.n_train, 1))

    def predictions(self, idx) -> np.ndarray:
        """(B, n, k) kept fitted values at alpha index ``idx`` (B, k) per layer and target."""
        if self.pred is None:
            raise ValueError("this LooAccumulator was made with keep_predictions=False")
        B, A, k, n = self.pred.shape
        sel = torch.as_tensor(np.asarray(idx), device=self.pred.device)[:, None, :, None]
        chosen = torch.gather(self.pred, 1, sel.expand(B, 1, k, n))[:, 0]          # (B, k, n)
        return chosen.transpose(1, 2).contiguous().cpu().numpy()


def select_alpha(scores, alpha_per_target: bool):
    """Pick alphas from per-target scores (B, A, k) (higher is better).

    Shared: argmax over the grid of the target-mean score; per target: argmax per column. The
    first maximum in grid order wins ties. Returns (index (B, k), best_score (B,) or (B, k)).
    """
    s = np.asarray(scores.cpu().numpy() if hasattr(scores, "cpu") else scores, dtype=np.float64)
    B, A, k = s.shape
    if alpha_per_target:
        idx = np.argmax(s, axis=1)                                            # (B, k)
        best = np.take_along_axis(s, idx[:, None, :], axis=1)[:, 0, :]
        return idx, best
    m = s.mean(axis=2)                                                        # (B, A)
    i = np.argmax(m, axis=1)
    return np.repeat(i[:, None], k, axis=1), m[np.arange(B), i]


# ----------------------------------------------------------------------------- k-fold, primal

def _check_fold_variance(f, sst, yty):
    """R² on a fold whose targets do not vary is undefined (0/0): say so instead of letting
    NaN/-inf scores pick the first alpha. sst is "zero" below rounding of Σy² - (Σy)²/n."""
    bad = (sst <= 1e-9 * yty).nonzero().ravel().tolist()
    if bad:
        raise RidgeError(f"fold {f}: target column(s) {bad} are constant on its validation rows; "
                         "R² is undefined there (use fewer folds or shuffle)")


def kfold_scores_primal(n, sx, xtx, sy, yty, xty, alphas, precision="float64"):
    """Per-target k-fold R² (B, A, k), averaged over folds, from per-fold statistics.

    n (F,), sx (B, F, d), xtx (B, F, d, d), sy (F, k), yty (F, k, k), xty (B, F, d, k): sums over
    the rows of each fold (x measured from any fixed shift). Fold f is scored with the model fitted
    on all other folds (train = total - fold), as R²_f,t = 1 - SSE/Σ(y - ȳ_fold)² (the fold's own
    mean, sklearn ``r2_score``): what ``RidgeCV(cv=KFold(K))`` computes, with no extra data pass.
    """
    n, sx, xtx, sy, yty, xty = (torch.as_tensor(t, dtype=torch.float64)
                                for t in (n, sx, xtx, sy, yty, xty))
    F = n.shape[0]
    a = torch.as_tensor(np.asarray(alphas, dtype=np.float64), device=sx.device)
    total = [t.sum(dim) for t, dim in ((n, 0), (sx, 1), (xtx, 1), (sy, 0), (xty, 1))]
    r2 = None
    for f in range(F):
        nv = float(n[f])
        if nv < 2:
            raise RidgeError(f"fold {f} has {int(nv)} validation row(s); its R² needs at least 2 "
                             "(use fewer folds)")
        nt = float(total[0] - n[f])
        if nt < 2:
            raise RidgeError(f"fold {f}: fewer than 2 training rows outside it")
        fac = primal_factor(nt, total[1] - sx[:, f], total[2] - xtx[:, f], total[3] - sy[f],
                            total[4] - xty[:, f], precision=precision)
        mu, yb = fac.mean, fac.ybar                                           # (B, d), (k,)
        sxv, xtxv, syv, xtyv = sx[:, f], xtx[:, f], sy[f], xty[:, f]
        # Validation scatter about the TRAIN means.
        Av = (xtxv - sxv[:, :, None] * mu[:, None, :] - mu[:, :, None] * sxv[:, None, :]
              + nv * mu[:, :, None] * mu[:, None, :])
        bv = (xtyv - sxv[:, :, None] * yb[None, None, :] - mu[:, :, None] * syv[None, None, :]
              + nv * mu[:, :, None] * yb[None, None, :])
        cv = torch.diagonal(yty[f]) - 2 * yb * syv + nv * yb * yb             # (k,)
        sst = torch.diagonal(yty[f]) - syv * syv / nv                         # (k,)
        _check_fold_variance(f, sst, torch.diagonal(yty[f]))
        Ap = fac.V.transpose(1, 2) @ Av @ fac.V                               # (B, d, d)
        bp = fac.V.transpose(1, 2) @ bv                                       # (B, d, k)
        inv = 1.0 / (fac.lam[:, None, :] + a[None, :, None])                  # (B, A, d)
        Q = inv[:, :, :, None] * fac.G[:, None, :, :]                          # (B, A, d, k)
        t2 = (Q * bp[:, None]).sum(2)                                         # (B, A, k)
        AQ = torch.einsum("bde,baek->badk", Ap, Q)
        t3 = (Q * AQ).sum(2)
        sse = cv[None, None, :] - 2 * t2 + t3
        fold_r2 = 1.0 - sse / sst[None, None, :]
        r2 = fold_r2 if r2 is None else r2 + fold_r2
    return r2 / F


def kfold_assignment(n: int, k: int, shuffle: bool = False, seed: int = 0) -> np.ndarray:
    """Fold index of each of n rows, exactly as sklearn ``KFold(k, shuffle, random_state=seed)``.

    Parameters
    ----------
    n, k : int
        Rows and folds (2 <= k <= n).
    shuffle : bool
        Permute the rows first with ``np.random.RandomState(seed).shuffle`` (KFold's shuffle).
    seed : int
        Seed of the permutation.

    Returns
    -------
    numpy.ndarray
        (n,) int32: k consecutive folds of the (permuted) rows, the first ``n % k`` one row
        larger.
    """
    if k < 2:
        raise RidgeError(f"k-fold needs k >= 2, got {k}")
    if n < k:
        raise RidgeError(f"{k}-fold cross-validation needs at least {k} training rows, got {n}")
    order = np.arange(n)
    if shuffle:
        np.random.RandomState(seed).shuffle(order)
    sizes = np.full(k, n // k)
    sizes[:n % k] += 1
    fold = np.empty(n, dtype=np.int32)
    fold[order] = np.repeat(np.arange(k, dtype=np.int32), sizes)
    return fold


# ----------------------------------------------------------------------------- dual form

def _zero_intercept_direction(lam, U):
    """The centred kernel has the constant vector in its null space (the intercept direction,
    unpenalised): set the eigenvalue of the eigenvector closest to it to exactly 0, as sklearn's
    GCV does, instead of trusting a rounding-level value (which matters in float32)."""
    i = int(torch.argmax(U.sum(0).abs()))
    lam = lam.clone()
    lam[i] = 0.0
    return lam


def _dual_eig(Xc, precision="float64"):
    Xk = Xc.to(torch.float32) if precision == "float32" else Xc
    K = Xk @ Xk.T
    K = 0.5 * (K + K.T)
    lam, U = _eigh(K.to(torch.float64), precision)
    return _zero_intercept_direction(lam, U), U


def dual_loo(X, Y, alphas, precision="float64"):
    """Exact LOO of ridge with intercept from the n×n kernel (for n < d), one layer.

    X (n, d) float64 train rows, Y (n, k). Returns (scores (A, k) = -mean LOO e², fitted (n, A, k),
    state) where state feeds :func:`dual_coef`.
    """
    X = torch.as_tensor(X, dtype=torch.float64)
    Y = torch.as_tensor(Y, dtype=torch.float64, device=X.device)
    n = X.shape[0]
    if n < 3:
        raise RidgeError(f"need at least 3 training rows, got {n}")
    a = torch.as_tensor(np.asarray(alphas, dtype=np.float64), device=X.device)
    mean = X.mean(0)
    ybar = Y.mean(0)
    Xc = X - mean
    lam, U = _dual_eig(Xc, precision)
    UTy = U.T @ (Y - ybar)                                                    # (n, k)
    s = lam[None, :] / (lam[None, :] + a[:, None])                            # (A, n)
    h = 1.0 / n + (U * U) @ s.T                                               # (n, A)
    k = Y.shape[1]
    # one (n x n)(n x A·k) GEMM; never an (n, A, n) intermediate
    fitted = (U @ (s.T[:, :, None] * UTy[:, None, :]).reshape(n, -1)).reshape(n, -1, k) + ybar
    e = (Y[:, None, :] - fitted) / (1.0 - h)[..., None]
    scores = -(e * e).mean(0)
    return scores, fitted, (mean, ybar, Xc, lam, U, UTy)


def dual_coef(state, alpha_per_t):
    """w (d, k) and intercept (k,) at the given alpha per target (k,), from :func:`dual_loo`'s
    state."""
    mean, ybar, Xc, lam, U, UTy = state
    a = torch.as_tensor(np.asarray(alpha_per_t, dtype=np.float64), device=lam.device)
    inv = 1.0 / (lam[:, None] + a[None, :])                                   # (n, k)
    # U columns with λ = 0 (the centring direction) are orthogonal to Xc's row space: no effect.
    w = Xc.T @ (U @ (inv * UTy))
    return w, ybar - mean @ w


def dual_kfold_scores(X, Y, fold, alphas, precision="float64"):
    """Per-target k-fold R² (A, k), averaged over folds, in dual form. X (n, d), Y (n, k),
    fold (n,)."""
    X = torch.as_tensor(X, dtype=torch.float64)
    Y = torch.as_tensor(Y, dtype=torch.float64, device=X.device)
    fold = np.asarray(fold)
    a = torch.as_tensor(np.asarray(alphas, dtype=np.float64), device=X.device)
    Xs = X - X.mean(0)                                                        # any fixed shift
    Kraw = Xs @ Xs.T
    F = int(fold.max()) + 1
    r2 = None
    for f in range(F):
        tr = torch.as_tensor(np.nonzero(fold != f)[0], device=X.device)
        va = torch.as_tensor(np.nonzero(fold == f)[0], device=X.device)
        if len(va) < 2:
            raise RidgeError(f"fold {f} has {len(va)} validation row(s); its R² needs at least 2 "
                             "(use fewer folds)")
        if len(tr) < 2:
            raise RidgeError(f"fold {f} leaves fewer than 2 training rows")
        m = Kraw[:, tr].mean(1)                                               # x_aᵀμ_f, (n,)
        mm = m[tr].mean()
        Kc = Kraw - m[:, None] - m[None, :] + mm                              # centred on μ_f
        Ktt = Kc[tr][:, tr]
        lam, U = _eigh(0.5 * (Ktt + Ktt.T), precision)
        lam = _zero_intercept_direction(lam, U)
        ybar = Y[tr].mean(0)
        UTy = U.T @ (Y[tr] - ybar)
        inv = 1.0 / (lam[None, :] + a[:, None])                               # (A, m)
        KvU = Kc[va][:, tr] @ U                                               # (v, m)
        m = UTy.shape[0]
        pred = (KvU @ (inv.T[:, :, None] * UTy[:, None, :]).reshape(m, -1)).reshape(
            KvU.shape[0], -1, UTy.shape[1]) + ybar
        Yv = Y[va]
        sse = ((Yv[:, None, :] - pred) ** 2).sum(0)                           # (A, k)
        sst = ((Yv - Yv.mean(0)) ** 2).sum(0)
        _check_fold_variance(f, sst, (Yv * Yv).sum(0))
        fr2 = 1.0 - sse / sst
        r2 = fr2 if r2 is None else r2 + fr2
    return r2 / F




# ----------------------------------------------------------------------------- in memory, weighted

@dataclass
class WeightedFactor:
    """Ridge with intercept and sample weights on one layer's rows in memory, every alpha at once.

    Minimises Σ w_i (y_i - b - x_iᵀβ)² + α‖β‖² (scikit-learn ``Ridge().fit(X, y, w)``): x̄, ȳ are
    the weighted means, C = Σ w (x-x̄)(x-x̄)ᵀ = V diag(λ) Vᵀ and G = Vᵀ Σ w (x-x̄)(y-ȳ)ᵀ, so that
    β(α) = V diag(1/(λ+α)) G. V (d, r) is orthonormal: all d eigenvectors of C (primal), or, when
    fewer rows than features carry weight, V = X̃ᵀU/√λ from the weighted kernel X̃X̃ᵀ = U diag(λ) Uᵀ
    with X̃ = √w (X - x̄) (dual; directions of rounding-level λ dropped: they carry no data).
    """
    wsum: float
    mean: torch.Tensor
    ybar: torch.Tensor
    lam: torch.Tensor
    V: torch.Tensor
    G: torch.Tensor

    def _apply(self, Z, alphas) -> torch.Tensor:
        """Z (m, r) projected rows -> fitted values (m, A, k) for every alpha, one GEMM."""
        a = torch.as_tensor(np.asarray(alphas, dtype=np.float64), device=self.lam.device)
        inv = 1.0 / (self.lam[None, :] + a[:, None])                          # (A, r)
        r, k = self.G.shape
        M = (inv.T[:, :, None] * self.G[:, None, :]).reshape(r, -1)           # (r, A*k)
        return (Z @ M).reshape(Z.shape[0], len(a), k) + self.ybar

    def coef(self, alpha_per_t) -> torch.Tensor:
        """β (d, k) at the given alpha per target (k,)."""
        a = torch.as_tensor(np.asarray(alpha_per_t, dtype=np.float64), device=self.lam.device)
        return self.V @ (self.G / (self.lam[:, None] + a[None, :]))

    def intercept(self, coef) -> torch.Tensor:
        """b = ȳ - x̄ᵀβ, (k,)."""
        return self.ybar - self.mean @ coef

    def predict(self, X, alphas) -> torch.Tensor:
        """Predictions (m, A, k) of rows X (m, d) for every alpha of the grid."""
        return self._apply((X - self.mean) @ self.V, alphas)

    def loo_sse(self, X, Y, w, alphas) -> torch.Tensor:
        """Σ_i w_i e_i² (A, k) over the fitted rows, e_i the exact leave-one-out residual.

        h_i(α) = w_i (1/Σw + Σ_j Z_ij²/(λ_j+α)) with Z = (X - x̄)V is the hat diagonal of the
        weighted problem (the 1/Σw term is the unpenalised intercept); e_i = (y_i - ŷ_i)/(1-h_i).
        With unit weights this is :class:`LooAccumulator`'s residual; w_i e_i² is the square of
        scikit-learn's rescaled ``looe`` (``RidgeCV(cv=None).fit(X, y, sample_weight=w)``).
        """
        a = torch.as_tensor(np.asarray(alphas, dtype=np.float64), device=self.lam.device)
        Z = (X - self.mean) @ self.V
        h = w[:, None] * ((Z * Z) @ (1.0 / (self.lam[None, :] + a[:, None])).T + 1.0 / self.wsum)
        e = (Y[:, None, :] - self._apply(Z, alphas)) / (1.0 - h)[..., None]
        return (w[:, None, None] * e * e).sum(0)


def weighted_factor(X, Y, w) -> WeightedFactor:
    """:class:`WeightedFactor` of rows X (n, d), targets Y (n, k), weights w (n,) (float64 tensors
    on one device; weights >= 0, rows of weight 0 ignored), primal or dual by shape."""
    pos = w > 0
    X, Y, w = X[pos], Y[pos], w[pos]
    wsum = float(w.sum())
    mean = (w @ X) / wsum
    ybar = (w @ Y) / wsum
    Xc = X - mean
    wYc = w[:, None] * (Y - ybar)
    n, d = X.shape
    if n >= d:
        C = Xc.T @ (w[:, None] * Xc)
        lam, V = _eigh(0.5 * (C + C.T))
    else:
        Xt = w.sqrt()[:, None] * Xc
        lam, U = _kernel_eig(Xt @ Xt.T, d)
        V = (Xt.T @ U) / lam.sqrt()
    return WeightedFactor(wsum=wsum, mean=mean, ybar=ybar, lam=lam, V=V, G=V.T @ (Xc.T @ wYc))


def _kernel_eig(K, d: int):
    """Eigenpairs of a weighted centred kernel (m, m) of d-dimensional rows, without those of
    rounding-level eigenvalue (the intercept direction √w, rows of weight 0, rank deficiency):
    their directions X̃ᵀu have norm √λ ≈ 0 and carry no data."""
    lam, U = _eigh(0.5 * (K + K.T))
    keep = lam > max(K.shape[0], d) * float(torch.finfo(torch.float64).eps) * float(lam.max())
    return lam[keep], U[:, keep]


def _kernel_fold_predictions(K, Y, w, tr, va, alphas, d: int) -> torch.Tensor:
    """Predictions (v, A, k) of rows ``va`` by the weighted fit on rows ``tr`` in kernel form,
    from K = XₛXₛᵀ of all rows (X about any fixed shift): O(n_tr³), nothing of size d.

    With p = w/Σw over the train rows, μ = Σ p x and m_a = x_aᵀμ, the kernel centred on μ is
    K_ab - m_a - m_b + pᵀm; X̃ = √w(X_tr - μ) gives β = X̃ᵀU diag(1/(λ+α)) Uᵀ√w(y - ȳ), hence
    the prediction ȳ + (K_c[va, tr] √w) U diag(1/(λ+α)) Uᵀ√w(y - ȳ)."""
    wt = w[tr]
    p = wt / wt.sum()
    m = K[:, tr] @ p                                                          # (n,)
    mm = p @ m[tr]
    s = wt.sqrt()
    Kc = K[tr][:, tr] - m[tr][:, None] - m[tr][None, :] + mm
    lam, U = _kernel_eig(s[:, None] * Kc * s[None, :], d)
    ybar = p @ Y[tr]
    UTy = U.T @ (s[:, None] * (Y[tr] - ybar))                                 # (r, k)
    P = ((K[va][:, tr] - m[va][:, None] - m[tr][None, :] + mm) * s[None, :]) @ U
    a = torch.as_tensor(np.asarray(alphas, dtype=np.float64), device=K.device)
    inv = 1.0 / (lam[None, :] + a[:, None])                                   # (A, r)
    r, k = UTy.shape
    return (P @ (inv.T[:, :, None] * UTy[:, None, :]).reshape(r, -1)).reshape(
        len(va), len(a), k) + ybar


def _r2_rule(Yv, wv, pred) -> torch.Tensor:
    """Per-target R² (A, k) of predictions (v, A, k) of Yv (v, k) with row weights wv (v,), as
    scikit-learn's ``r2_score(sample_weight=wv)`` (about the fold's own weighted mean): a target
    constant on the fold's rows of positive weight scores 1.0 if predicted exactly, else 0.0
    (``force_finite``; "constant" is tested exactly, so that z-scored targets, whose mean may
    round, are judged as the raw ones)."""
    sse = (wv[:, None, None] * (Yv[:, None, :] - pred) ** 2).sum(0)
    ybar = (wv @ Yv) / wv.sum()
    sst = (wv[:, None] * (Yv - ybar) ** 2).sum(0)
    pos = Yv[wv > 0]
    const = pos.max(0).values == pos.min(0).values                            # (k,)
    r2 = 1.0 - sse / torch.where(const, torch.ones_like(sst), sst)
    return torch.where(const[None, :], (sse == 0).to(torch.float64), r2)


def split_scores(X, Y, splits, alphas, w=None) -> torch.Tensor:
    """Per-target cross-validated R² (A, k), averaged over ``splits``, with sample weights.

    Parameters
    ----------
    X : torch.Tensor (n, d); Y : torch.Tensor (n, k)
        float64 rows and targets.
    splits : list of (train, test)
        Integer index arrays, as a scikit-learn CV splitter yields them (any train/test sets).
    alphas : numpy.ndarray
        The grid (A,).
    w : torch.Tensor or None
        (n,) row weights (None = 1): of the training fits and of the validation R², as
        ``RidgeCV(cv=K).fit(X, y, sample_weight=w)`` uses them (its grid search passes the
        weights to ``Ridge.fit`` and to the R² scorer).

    Returns
    -------
    torch.Tensor
        (A, k) mean over splits of each target's R² (:func:`_r2_rule`).
    """
    w = torch.ones(X.shape[0], dtype=torch.float64, device=X.device) if w is None else w
    d = X.shape[1]
    total = K = None
    for f, (tr, va) in enumerate(splits):
        tr = torch.as_tensor(tr, device=X.device)
        va = torch.as_tensor(va, device=X.device)
        if len(va) < 2:
            raise RidgeError(f"fold {f} has {len(va)} validation row(s); its R² needs at least 2 "
                             "(use fewer folds)")
        if not bool((w[va] > 0).any()):
            raise RidgeError(f"fold {f}: every validation row has sample_weight 0; its R² is "
                             "undefined (use other folds)")
        if int((w[tr] > 0).sum()) < 2:
            raise RidgeError(f"fold {f}: fewer than 2 training rows (of positive weight) "
                             "outside it")
        if int((w[tr] > 0).sum()) >= d:
            pred = weighted_factor(X[tr], Y[tr], w[tr]).predict(X[va], alphas)
        else:                                   # dual: one n×n kernel serves every fold
            if K is None:
                Xs = X - X.mean(0)
                K = Xs @ Xs.T
            pred = _kernel_fold_predictions(K, Y, w, tr, va, alphas, d)
        r2 = _r2_rule(Y[va], w[va], pred)
        total = r2 if total is None else total + r2
    return total / len(splits)


# ----------------------------------------------------------------------------- in memory

def fit_arrays(X, Y, alphas, cv, alpha_per_target: bool, device, fold=None, sample_weight=None):
    """Ridge-CV on in-memory train arrays (the estimator's solve), primal or dual by shape.

    Parameters
    ----------
    X : array (n, d); Y : array (n, k)
        Train rows and targets (converted to float64 on ``device``).
    alphas : numpy.ndarray
        The grid (A,).
    cv : "loo", int or list of (train, test)
        Exact leave-one-out; k-fold with the fold ids ``fold`` (n,); or explicit index splits.
        k-fold and splits score R² (:func:`split_scores`).
    alpha_per_target : bool
        One alpha per target instead of one shared.
    device : torch.device
    sample_weight : array (n,) or None
        Weights >= 0 of the ridge loss (None: unweighted, the streaming solvers' arithmetic).
        Leave-one-out then scores -Σ w e² / n, k-fold the weighted R² of the validation rows
        (as scikit-learn ``RidgeCV`` does).

    Returns
    -------
    tuple
        (alpha index (k,), best score (scalar or (k,)), per-target scores (A, k) tensor,
        coef (d, k) tensor, intercept (k,) tensor).
    """
    Xt, Yt = _read_only_tensor(X, device), _read_only_tensor(Y, device)
    alphas = np.asarray(alphas)
    n, d = Xt.shape
    if cv == "loo" and sample_weight is None:
        return _unweighted_loo(Xt, Yt, alphas, alpha_per_target)
    w = (torch.ones(n, dtype=torch.float64, device=device) if sample_weight is None
         else torch.as_tensor(sample_weight, dtype=torch.float64, device=device))
    if cv == "loo":
        if int((w > 0).sum()) < 3:
            raise RidgeError(f"leave-one-out needs at least 3 rows of positive sample_weight, got "
                             f"{int((w > 0).sum())}")
        fac = weighted_factor(Xt, Yt, w)
        scores = -fac.loo_sse(Xt, Yt, w, alphas) / n
    else:
        if not isinstance(cv, (list, tuple)):
            fold = np.asarray(fold)
            cv = [(np.nonzero(fold != f)[0], np.nonzero(fold == f)[0])
                  for f in range(int(fold.max()) + 1)]
        scores = split_scores(Xt, Yt, cv, alphas, w)
        fac = weighted_factor(Xt, Yt, w)
    idx, best = select_alpha(scores[None], alpha_per_target)
    coef = fac.coef(alphas[idx[0]])
    return idx[0], best[0], scores, coef, fac.intercept(coef)


def _read_only_tensor(a, device) -> torch.Tensor:
    """float64 tensor of ``a``, sharing its memory when it can: the solvers never write into
    their input, so torch's warning about a read-only array (a pandas frame's values, a memmap)
    does not apply."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.as_tensor(a, dtype=torch.float64, device=device)


def _unweighted_loo(X, Y, alphas, alpha_per_target):
    """fit_arrays' leave-one-out without weights: the streaming solvers' own arithmetic."""
    n, d = X.shape
    if n < d:
        scores, _, state = dual_loo(X, Y, alphas)
        idx, best = select_alpha(scores[None], alpha_per_target)
        w, b = dual_coef(state, alphas[idx[0]])
        return idx[0], best[0], scores, w, b
    fac, scores = _primal_loo(X, Y, alphas)
    idx, best = select_alpha(scores[None], alpha_per_target)
    w = fac.coef(alphas[idx])
    return idx[0], best[0], scores, w[0], fac.intercept(w)[0]


def _primal_loo(X, Y, alphas):
    """(factor, LOO scores (A, k)) of one layer's rows in memory."""
    n = X.shape[0]
    shift = X.mean(0, keepdim=True)                    # centring first keeps XᵀX exact
    Xs = X - shift
    fac = primal_factor(n, Xs.sum(0)[None], (Xs.T @ Xs)[None], Y.sum(0), (Xs.T @ Y)[None], shift)
    acc = LooAccumulator(fac, alphas, n, keep_predictions=False)
    acc.update(0, X[None], Y, np.ones(n, dtype=bool))
    return fac, acc.scores()[0]
