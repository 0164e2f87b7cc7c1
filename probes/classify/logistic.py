"""L2-regularised logistic regression for a stack of layers and a grid of C values at once.

Per layer and C (scikit-learn ``LogisticRegression(C=C, solver="lbfgs")``): minimise
C·Σ_i w_i·loss_i + ½‖W‖², the intercept not penalised. Two classes: one coefficient vector and
the sigmoid (the positive class is code 1); K ≥ 3: multinomial softmax, K vectors, all penalised,
intercepts centred to sum 0. Solver: truncated Newton (Hessian-vector products, conjugate gradient,
Armijo backtracking), batched in torch over layers × row-weight sets (the folds of
:mod:`probes.classify.select`), the Cs in increasing order, each warm-started from the previous;
features are centred internally (mapped back exactly). It stops per problem when the largest
gradient entry of the objective divided by C·Σw is below ``tol`` (float64 1e-8, float32 1e-4).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from probes.errors import ClassifyError

__all__ = ["LogisticPath", "fit_logistic_path", "balanced_weights", "class_weights",
           "decision_function",
           "predict_proba"]

_DTYPES = {"float64": torch.float64, "float32": torch.float32}
_TOL = {"float64": 1e-8, "float32": 1e-4}


@dataclass
class LogisticPath:
    """Fitted coefficients per layer position and C.

    Cs: (n_C,); coef: (L, n_C, d) for two classes, else (L, n_C, K, d); intercept: (L, n_C) or
    (L, n_C, K); n_iter: (L, n_C) Newton iterations; converged: (L, n_C) gradient below tol.
    """
    Cs: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    n_iter: np.ndarray
    converged: np.ndarray
    n_classes: int


def balanced_weights(codes, n_classes: int | None = None, sample_weight=None) -> np.ndarray:
    """Class weights of ``class_weight="balanced"`` per row: Σw / (K · Σ_{j in class} w_j) for the
    class of each row (scikit-learn's rule, counts weighted by ``sample_weight``; n / (K·count)
    without weights). Multiply them into the sample weights.

    Parameters
    ----------
    codes : (n,) int array
        Class codes 0..K-1.
    n_classes : int, optional
        K (default: the number of distinct codes).
    sample_weight : (n,) array, optional
        Row weights the class totals are counted with.

    Returns
    -------
    (n,) float64 array
    """
    codes = np.asarray(codes)
    w = np.ones(codes.size) if sample_weight is None else np.asarray(sample_weight, np.float64)
    counts = np.bincount(codes, weights=w, minlength=n_classes or 0)
    k = np.count_nonzero(counts) if n_classes is None else n_classes
    return w.sum() / (k * counts[codes])


class _Problem:
    """Objective pieces of a batch: X (L, n, d) centred; Y (n, K'); weights (n, M) normalised to
    sum 1 per column; pen (M,) = 1/(C·Σw). Parameters W (L, d, M, K'), b (L, M, K')."""

    def __init__(self, X, Y, wts, pen, binary: bool):
        self.X, self.Y, self.wts, self.pen, self.binary = X, Y, wts, pen, binary
        self.L, self.n, self.d = X.shape
        self.M, self.K = wts.shape[1], Y.shape[1]
        self.idx = Y.argmax(1)[None, :, None, None].expand(self.L, self.n, self.M, 1)

    def xw(self, W, b):
        L, d, M, K = W.shape
        Z = torch.baddbmm(b.reshape(L, 1, M * K), self.X, W.reshape(L, d, M * K))
        return Z.reshape(L, self.n, M, K)

    def xtr(self, R):
        return (self.X.transpose(1, 2) @ R.reshape(self.L, self.n, -1)).reshape(
            self.L, self.d, self.M, self.K)

    def loss(self, W, b):
        """Objective (L, M) and probabilities (L, n, M, K')."""
        Z = self.xw(W, b)
        if self.binary:
            ell = (torch.nn.functional.softplus(Z) - self.Y[:, None] * Z)[..., 0]
            P = torch.sigmoid(Z)
        else:                                   # in place: the tensors are (L, n, M, K) large
            zy = Z.gather(-1, self.idx)[..., 0]
            m = Z.amax(-1, keepdim=True)
            P = Z.sub_(m).exp_()
            s = P.sum(-1, keepdim=True)
            ell = (m + s.log())[..., 0] - zy
            P.div_(s)
        f = torch.einsum("lnm,nm->lm", ell, self.wts) + 0.5 * self.pen * _dot(W, None, W, None)
        return f, P

    def grad(self, W, P):
        E = (P - self.Y[:, None]).mul_(self.wts[..., None])
        return self.xtr(E) + self.pen[:, None] * W, E.sum(1)

    def hvp(self, P, V, v):
        R = self.xw(V, v)
        if self.binary:
            R.mul_(P * (1 - P))
        else:
            R.mul_(P)
            R.addcmul_(P, R.sum(-1, keepdim=True), value=-1)
        R.mul_(self.wts[..., None])
        return self.xtr(R) + self.pen[:, None] * V, R.sum(1)


def _dot(A, a, B, b):
    out = torch.einsum("ldmk,ldmk->lm", A, B)
    return out if a is None else out + (a * b).sum(-1)


def _cg(prob: _Problem, P, gW, gb, active, max_cg: int):
    """Truncated conjugate gradient for H p = -g per problem (forcing term min(0.5, √‖g‖))."""
    pW, pb = torch.zeros_like(gW), torch.zeros_like(gb)
    rW, rb = -gW, -gb
    dW, db = rW.clone(), rb.clone()
    rr = _dot(rW, rb, rW, rb)
    gn = rr.sqrt()
    target = torch.minimum(torch.full_like(gn, 0.5), gn.sqrt()) * gn
    run = active.clone()
    for _ in range(max_cg):
        run = run & (rr.sqrt() > target)
        if not bool(run.any()):
            break
        HW, Hb = prob.hvp(P, dW, db)
        dHd = _dot(dW, db, HW, Hb)
        run = run & (dHd > 0)
        alpha = torch.where(run, rr / torch.where(run, dHd, torch.ones_like(dHd)), 0.0)
        pW, pb = pW + alpha[:, None, :, None] * dW, pb + alpha[..., None] * db
        rW, rb = rW - alpha[:, None, :, None] * HW, rb - alpha[..., None] * Hb
        rr_new = _dot(rW, rb, rW, rb)
        beta = torch.where(run, rr_new / torch.where(rr > 0, rr, torch.ones_like(rr)), 0.0)
        dW, db = rW + beta[:, None, :, None] * dW, rb + beta[..., None] * db
        rr = torch.where(run, rr_new, rr)
    empty = (_dot(pW, pb, pW, pb) == 0) & active                    # no step: steepest descent
    pW = torch.where(empty[:, None, :, None], -gW, pW)
    pb = torch.where(empty[..., None], -gb, pb)
    return pW, pb


def _line_search(prob: _Problem, W, b, pW, pb, f0, P0, slope, active):
    """Armijo backtracking per problem; returns the step (0 where none decreased the objective)
    and the objective and probabilities at the new point (reused by the next Newton step)."""
    step = torch.zeros_like(f0)
    f_new, P_new = f0.clone(), P0
    todo = active.clone()
    slack = 16 * torch.finfo(f0.dtype).eps * f0.abs()              # decreases below rounding
    t = 1.0
    for _ in range(40):
        f, P = prob.loss(W + t * pW, b + t * pb)
        ok = todo & (f <= f0 + 1e-4 * t * slope + slack)
        step = torch.where(ok, torch.full_like(step, t), step)
        f_new = torch.where(ok, f, f_new)
        P_new = torch.where(ok[:, None, :, None], P, P_new)
        todo = todo & ~ok
        if not bool(todo.any()):
            break
        t *= 0.5
    return step, f_new, P_new


def _newton(prob: _Problem, W, b, tol: float, max_iter: int, max_cg: int):
    """Truncated Newton on all problems of the batch; returns W, b, iterations, converged."""
    n_iter = torch.zeros(prob.L, prob.M, dtype=torch.int64, device=W.device)
    converged = torch.zeros(prob.L, prob.M, dtype=torch.bool, device=W.device)
    stalled = torch.zeros_like(converged)
    f, P = prob.loss(W, b)
    for _ in range(max_iter + 1):
        gW, gb = prob.grad(W, P)
        gmax = torch.maximum(gW.abs().amax((1, 3)), gb.abs().amax(-1))
        converged = gmax <= tol
        active = ~converged & ~stalled & (n_iter < max_iter)
        if not bool(active.any()):
            break
        pW, pb = _cg(prob, P, gW, gb, active, max_cg)
        slope = _dot(gW, gb, pW, pb)
        step, f, P = _line_search(prob, W, b, pW, pb, f, P, slope, active)
        stalled = stalled | (active & (step == 0))
        W = W + step[:, None, :, None] * pW
        b = b + step[..., None] * pb
        n_iter = n_iter + active.to(torch.int64)
    return W, b, n_iter, converged


def _initial(init, mean, L, F, nC, K, d, tdt, device):
    """Starting point (L, d, F, n_C, K), (L, F, n_C, K) in centred coordinates (zeros if None)."""
    if init is None:
        return (torch.zeros(L, d, F, nC, K, dtype=tdt, device=device),
                torch.zeros(L, F, nC, K, dtype=tdt, device=device))
    W = torch.as_tensor(np.asarray(init[0]), device=device).to(tdt).reshape(L, F, nC, K, d)
    W = W.permute(0, 4, 1, 2, 3).contiguous()
    b = torch.as_tensor(np.asarray(init[1]), device=device).to(tdt).reshape(L, F, nC, K)
    return W, b + torch.einsum("ld,ldfck->lfck", mean, W)


def _solve(X, codes, n_classes: int, Cs, weights, dtype: str, tol: float, max_iter: int,
           device=None, init=None, warm_start: bool = True):
    """Fit every (layer, weight set, C) problem. weights (F, n) -> arrays shaped (L, F, n_C, ...)
    with K' = 1 for two classes; ``init`` = (coef, intercept) in the same shapes, or None.
    ``warm_start``: one batched solve per C in increasing order, each started from the previous
    C's solution (unless ``init``); else all Cs in one batch from ``init`` (or zero)."""
    tdt = _DTYPES[dtype]
    Xt = torch.as_tensor(X, device=device).to(tdt)
    if Xt.ndim != 3:
        raise ClassifyError(f"X must be (layers, rows, features), got shape {tuple(Xt.shape)}")
    L, n, d = Xt.shape
    mean = Xt.mean(1)
    Xt = Xt - mean[:, None]
    binary = n_classes == 2
    codes_t = torch.as_tensor(np.asarray(codes), device=Xt.device)
    Y = (codes_t == 1).to(tdt)[:, None] if binary else \
        torch.nn.functional.one_hot(codes_t, n_classes).to(tdt)
    K = Y.shape[1]
    Cs = np.asarray(Cs, dtype=np.float64)
    wf = np.asarray(weights, dtype=np.float64)                      # (F, n)
    F, nC = wf.shape[0], Cs.size
    S = wf.sum(1)                                                   # (F,)
    W, b = _initial(init, mean, L, F, nC, K, d, tdt, Xt.device)
    n_iter = torch.zeros(L, F, nC, dtype=torch.int64)
    conv = torch.zeros(L, F, nC, dtype=torch.bool)
    groups = [[j] for j in np.argsort(Cs, kind="stable")] if warm_start else [list(range(nC))]
    prev = None
    for g in groups:
        wts = torch.as_tensor(np.repeat(wf / S[:, None], len(g), axis=0).T, device=Xt.device)
        pen = torch.as_tensor((1.0 / (S[:, None] * Cs[None, g])).ravel(), device=Xt.device)
        prob = _Problem(Xt, Y, wts.to(tdt), pen.to(tdt), binary)
        W0, b0 = W[:, :, :, g], b[:, :, g]
        if prev is not None and init is None:
            W0, b0 = prev
        Wg, bg, it, cv = _newton(prob, W0.reshape(L, d, -1, K), b0.reshape(L, -1, K), tol,
                                 max_iter, max_cg=max(50, min(2 * d * K, 250)))
        W[:, :, :, g] = Wg.reshape(L, d, F, len(g), K)
        b[:, :, g] = bg.reshape(L, F, len(g), K)
        n_iter[:, :, g], conv[:, :, g] = it.reshape(L, F, -1).cpu(), cv.reshape(L, F, -1).cpu()
        prev = W[:, :, :, g], b[:, :, g]
    b = b - torch.einsum("ld,ldfck->lfck", mean, W)
    if not binary:
        b = b - b.mean(-1, keepdim=True)
    coef = W.permute(0, 2, 3, 4, 1).to(torch.float64).cpu().numpy()
    icpt = b.to(torch.float64).cpu().numpy()
    if binary:
        coef, icpt = coef[..., 0, :], icpt[..., 0]
    return coef, icpt, n_iter.numpy(), conv.numpy()


def _check(X, codes, Cs, n_classes, sample_weight):
    codes = np.asarray(codes)
    if codes.ndim != 1 or not np.issubdtype(codes.dtype, np.integer) or codes.min() < 0:
        raise ClassifyError("codes must be a 1-D array of class codes 0..K-1 "
                            "(encode labels with probes.classify.encode_labels)")
    if np.shape(X)[1] != codes.size:
        raise ClassifyError(f"X has {np.shape(X)[1]} rows but there are {codes.size} labels")
    K = int(codes.max()) + 1 if n_classes is None else int(n_classes)
    counts = np.bincount(codes, minlength=K)
    if K < 2 or counts.size > K or (counts == 0).any():
        raise ClassifyError(f"every class 0..{K - 1} needs rows, got counts {counts.tolist()}: "
                            "a classifier needs at least two classes, each present")
    Cs = np.atleast_1d(np.asarray(Cs, dtype=np.float64))
    if Cs.ndim != 1 or not (np.isfinite(Cs).all() and (Cs > 0).all()):
        raise ClassifyError(f"C values must be positive and finite, got {Cs.tolist()}")
    w = np.ones(codes.size) if sample_weight is None else np.asarray(sample_weight, np.float64)
    if w.shape != codes.shape or not (np.isfinite(w).all() and (w >= 0).all()) or w.sum() <= 0:
        raise ClassifyError("sample_weight must be (n,), finite, non-negative, not all zero")
    return codes, K, Cs, w


def class_weights(codes, n_classes: int, w: np.ndarray, class_weight: str | None) -> np.ndarray:
    """Row weights ``w`` times the class weights: None (unchanged) or "balanced"."""
    if class_weight == "balanced":
        return w * balanced_weights(codes, n_classes, w)
    if class_weight is not None:
        raise ClassifyError(f"class_weight must be None or 'balanced', got {class_weight!r}")
    return w


def fit_logistic_path(X, codes, Cs, *, n_classes: int | None = None, sample_weight=None,
                      class_weight: str | None = None, dtype: str = "float64",
                      tol: float | None = None, max_iter: int = 100, device=None,
                      warm_start: bool = True) -> LogisticPath:
    """Fit L2 logistic regression on every layer for every C of a grid, batched.

    Parameters
    ----------
    X : (L, n, d) array or tensor
        Features of L layers.
    codes : (n,) int array
        Class codes 0..K-1 (two classes: binary, code 1 positive; more: multinomial).
    Cs : sequence of float
        Inverse regularisation strengths.
    n_classes : int, optional
        K (default: max code + 1); every class must have rows.
    sample_weight : (n,) array, optional
        Row weights w_i (multiplied by the class weights).
    class_weight : {None, "balanced"}
        ``"balanced"``: multiply by n / (K · count(class_i)) (scikit-learn's rule).
    dtype : {"float64", "float32"}
        float64 is the reference; float32 is faster (gradient tolerance ~1e-4).
    tol : float, optional
        Stop when max |∇| of (objective / (C·Σw)) is below it (default 1e-8, float32 1e-4).
    max_iter : int
        Newton iterations at most.
    device : torch device, optional
        Where to compute (default: X's device, or CPU for numpy).
    warm_start : bool
        Solve the Cs one at a time in increasing order (batched over layers), each started from
        the previous C's solution (default; less memory, fewer Newton steps); False: all Cs in
        one batch from zero.

    Returns
    -------
    LogisticPath
    """
    if dtype not in _DTYPES:
        raise ClassifyError(f"dtype must be 'float64' or 'float32', got {dtype!r}")
    codes, K, Cs, w = _check(X, codes, Cs, n_classes, sample_weight)
    w = class_weights(codes, K, w, class_weight)
    coef, icpt, n_iter, conv = _solve(X, codes, K, Cs, w[None, :], dtype,
                                      _TOL[dtype] if tol is None else tol, max_iter, device,
                                      warm_start=warm_start)
    return LogisticPath(Cs, coef[:, 0], icpt[:, 0], n_iter[:, 0], conv[:, 0], K)


def decision_function(X, coef, intercept) -> np.ndarray:
    """Scores x·w + b: X (L, n, d), coef (L, d) or (L, K, d) -> (L, n) or (L, n, K).

    Parameters
    ----------
    X : (L, n, d) array
    coef : (L, d) or (L, K, d) array
    intercept : (L,) or (L, K) array

    Returns
    -------
    array (L, n) for two classes, (L, n, K) for more
    """
    X, coef, intercept = (np.asarray(a, dtype=np.float64) for a in (X, coef, intercept))
    if coef.ndim == 2:
        return np.einsum("lnd,ld->ln", X, coef) + intercept[:, None]
    return np.einsum("lnd,lkd->lnk", X, coef) + intercept[:, None, :]


def predict_proba(X, coef, intercept) -> np.ndarray:
    """Class probabilities (L, n, K) (sigmoid for two classes, softmax for more).

    Parameters
    ----------
    X : (L, n, d) array
    coef : (L, d) or (L, K, d) array
    intercept : (L,) or (L, K) array

    Returns
    -------
    (L, n, K) float64 array
    """
    z = decision_function(X, coef, intercept)
    if z.ndim == 2:
        p1 = 1.0 / (1.0 + np.exp(-z))
        return np.stack([1.0 - p1, p1], axis=-1)
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)
