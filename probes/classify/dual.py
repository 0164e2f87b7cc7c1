"""Exact Newton for L2 logistic regression in the kernel (dual) space: fewer rows than features.

The penalised optimum is W = Xᵀ A over the rows with weight (representer theorem), so each
(layer, weight set) problem is solved on its m×m Gram G = X Xᵀ: scores Z = G A + b, penalty
½·tr(AᵀGA), the intercept unpenalised as in :mod:`probes.classify.logistic`. The Newton system
of the primal (d·K unknowns) reduces by Woodbury to one Cholesky of M = pen·I + Fᵀ(G⊗I)F
(m·K rows; D_i = F_i F_iᵀ the IRLS weights of row i) plus a K×K system for the intercept, so
each step is exact: a few quadratically convergent steps per C instead of hundreds of
ill-conditioned CG products at large C. Backtracking on the objective, problems leave the batch
as they converge; float64 throughout. bench/RESULTS.md, "Logistic regression with fewer rows
than features (issue 15)".
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["MAX_SYSTEM", "kernel_eig", "solve_dual"]

MAX_SYSTEM = 1536          # rows · (K − 1) of the Newton system; above, the primal CG solver
_CHUNK_BYTES = 1 << 28     # the (problems, mK, mK) systems of one chunk of problems
_MAX_HALVINGS = 40


class _Batch:
    """The problems of one chunk, each on its own rows (padded with weight-0 rows): X (P, m, d)
    float64 rows, G (P, m, m), w (P, m) weights summing to 1, Y (P, m, K') targets, S (P,) the
    weight totals. K' = 1 for two classes."""

    def __init__(self, X, G, w, Y, S, binary: bool):
        self.X, self.G, self.w, self.Y, self.S, self.binary = X, G, w, Y, S, binary

    def take(self, idx):
        return _Batch(self.X[idx], self.G[idx], self.w[idx], self.Y[idx], self.S[idx],
                      self.binary)


def _data_loss(Z, bt: _Batch):
    """Σ_i w_i·loss_i (P,) and probabilities (P, m, K') of scores Z."""
    if bt.binary:
        ell = (torch.nn.functional.softplus(Z) - bt.Y * Z)[..., 0]
        return (bt.w * ell).sum(1), torch.sigmoid(Z)
    lse = torch.logsumexp(Z, -1)
    ell = lse - (Z * bt.Y).sum(-1)
    return (bt.w * ell).sum(1), torch.exp(Z - lse[..., None])


def _factor(Pr, bt: _Batch):
    """Φ (P, m, K', c) with Φ_i Φ_iᵀ = w_i·(diag p_i − p_i p_iᵀ): √(w_i p_i(1−p_i)) for two
    classes (c = 1); for K ≥ 3, F_i = √w_i·(diag √p_i − p_i √p_iᵀ) (F_i F_iᵀ is the block,
    as Σ_k p_ik = 1) times V_i, an orthonormal basis of √p_i⊥ (F_i √p_i = 0): c = K − 1
    columns, so the system has m·(K − 1) rows, not m·K. V_i: the first K − 1 columns of the
    Householder reflection taking √p_i to −e_K (v = √p_i + e_K, never short)."""
    if bt.binary:
        return (bt.w[..., None] * Pr * (1 - Pr)).sqrt()[..., None]
    K = Pr.shape[-1]
    sp = Pr.sqrt()
    eye = torch.eye(K, dtype=Pr.dtype, device=Pr.device)
    F = (eye - Pr[..., :, None]) * sp[..., None, :]                 # [k', k] = (δ − p_k')·√p_k
    v = sp.clone()
    v[..., -1] += 1
    V = eye[:, :-1] - (2 / (v * v).sum(-1))[..., None, None] * v[..., :, None] * v[..., None, :-1]
    return (F @ V) * bt.w.sqrt()[..., None, None]


def _chol_solve(chol, B):
    """M⁻¹ B from M's lower Cholesky factor by two triangular solves (5x faster than
    torch.cholesky_solve on (30, 605, 605) factors here)."""
    y = torch.linalg.solve_triangular(chol, B, upper=False)
    return torch.linalg.solve_triangular(chol.transpose(-2, -1), y, upper=True)


class _Factor:
    """The Newton system of a batch of problems at one point: Φ (P, m, K', c), the Cholesky
    factor of M = pen·I + Φᵀ(G⊗I)Φ, T = Φᵀ(1⊗I), M⁻¹T and the inverse of the K'×K' intercept
    system N = pen·TᵀM⁻¹T. :meth:`step` applies it to any gradient: the exact Newton step at
    the point it was built, a chord step (the same factor) close to it, the path's tangent."""

    _FIELDS = ("F", "chol", "T", "yT", "pen", "Ninv")

    def __init__(self, bt: _Batch, Pr, pen):
        F = _factor(Pr, bt)                                          # (P, m, K, c)
        P, m, K, c = F.shape
        Fcat = F.permute(0, 2, 1, 3).reshape(P, K, m * c)            # [k', (i, j)] = Φ_i[k', j]
        M = Fcat.transpose(1, 2) @ Fcat                              # blocks Φ_iᵀ Φ_j
        M.view(P, m, c, m, c).mul_(bt.G[:, :, None, :, None])
        M.diagonal(dim1=-2, dim2=-1).add_(pen[:, None])
        chol, info = torch.linalg.cholesky_ex(M)
        if bool((info != 0).any()):                                  # rounding at huge C: jitter
            M.diagonal(dim1=-2, dim2=-1).add_(1e-12 * M.diagonal(dim1=-2, dim2=-1).amax(-1, True))
            chol = torch.linalg.cholesky(M)
        del M
        T = Fcat.transpose(1, 2)                                     # (P, mc, K)
        yT = _chol_solve(chol, T)
        N = pen[:, None, None] * (T.transpose(1, 2) @ yT)             # (P, K, K)
        if K > 1:                             # N·1 = 0: the intercepts' common shift is flat
            N = N + N.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] / K
        N.diagonal(dim1=-2, dim2=-1).add_(torch.finfo(N.dtype).tiny)
        self.F, self.chol, self.T, self.yT, self.pen = F, chol, T, yT, pen
        self.Ninv = torch.linalg.inv(N)

    def step(self, bt: _Batch, R, gb):
        """−H⁻¹(Xᵀ R, gb) as (ΔA, Δb). With r = −G R + pen·1Δb the score change u solves
        (pen·I + G D) u = r, so Φᵀu = M⁻¹ Φᵀ r (Woodbury); the intercept equation
        1ᵀ D u = −gb gives Δb; then ΔA = −(R + D u)/pen."""
        P, m, K, c = self.F.shape
        rhs = torch.einsum("pikj,pik->pij", self.F, bt.G @ R).reshape(P, m * c, 1)
        y0 = _chol_solve(self.chol, rhs)[..., 0]
        rb = (self.T.transpose(1, 2) @ y0[..., None])[..., 0] - gb
        db = (self.Ninv @ rb[..., None])[..., 0]
        if K > 1:
            db = db - db.mean(-1, keepdim=True)
        Fu = (self.pen[:, None, None] * (self.yT @ db[..., None]))[..., 0] - y0   # Φᵀ u
        Du = torch.einsum("pikj,pij->pik", self.F, Fu.reshape(P, m, c))
        return -(R + Du) / self.pen[:, None, None], db

    @classmethod
    def empty_like(cls, other: _Factor, n: int) -> _Factor:
        """Room for the factors of n problems, shaped as other's."""
        out = object.__new__(cls)
        for k in cls._FIELDS:
            v = getattr(other, k)
            setattr(out, k, v.new_zeros((n,) + v.shape[1:]))
        out.pen = out.pen + 1                                         # never divide by 0
        out.chol = out.chol + torch.eye(out.chol.shape[-1], dtype=out.chol.dtype,
                                        device=out.chol.device)
        return out

    def take(self, idx) -> _Factor:
        out = object.__new__(_Factor)
        for k in self._FIELDS:
            setattr(out, k, getattr(self, k)[idx])
        return out

    def put(self, idx, other: _Factor) -> None:
        for k in self._FIELDS:
            getattr(self, k)[idx] = getattr(other, k)


def _state(bt: _Batch, A, b, pen):
    """Objective (P,), probabilities, residual R, gradients' max |entry| (P,), GA."""
    GA = bt.G @ A
    data, Pr = _data_loss(GA + b[:, None], bt)
    f = data + 0.5 * pen * (A * GA).sum((1, 2))
    E = (Pr - bt.Y) * bt.w[..., None]
    R = E + pen[:, None, None] * A
    gb = E.sum(1)
    gmax = torch.maximum((bt.X.transpose(1, 2) @ R).abs().amax((1, 2)), gb.abs().amax(-1))
    return f, Pr, R, gb, gmax, GA


def _line_search(bt: _Batch, A, b, dA, db, GA, f0, R, gb, pen):
    """Step length per problem: Armijo (a 1e-4 fraction of the slope) by halving from 1; where
    the promised decrease is below rounding, a step that does not raise the objective. Returns
    t (P,), 0 where no length up to 2⁻⁴⁰ was accepted."""
    GdA = bt.G @ dA
    slope = (R * GdA).sum((1, 2)) + (gb * db).sum(-1)
    pa, cross, dd = (A * GA).sum((1, 2)), (A * GdA).sum((1, 2)), (dA * GdA).sum((1, 2))
    slack = 16 * torch.finfo(f0.dtype).eps * f0.abs()
    t = torch.ones_like(f0)
    todo = torch.ones_like(f0, dtype=torch.bool)
    for _ in range(_MAX_HALVINGS):
        Z = GA + t[:, None, None] * GdA + (b + t[:, None] * db)[:, None]
        f = _data_loss(Z, bt)[0] + 0.5 * pen * (pa + 2 * t * cross + t * t * dd)
        ok = torch.isfinite(f) & torch.where(-slope * t > slack, f <= f0 + 1e-4 * t * slope,
                                             f <= f0 + slack)
        todo = todo & ~ok
        if not bool(todo.any()):
            break
        t = torch.where(todo, t / 2, t)
    return torch.where(todo, 0.0, t)


def _newton(bt: _Batch, A, b, pen, tol: float, max_iter: int, fac: _Factor | None):
    """Newton with backtracking on every problem of the batch; converged or stalled problems
    leave it. A step reuses the problem's factor from an earlier step at this C (a chord
    step, ~1/50 of a factorisation) where the last step cut the gradient tenfold, else
    factorises. Returns A, b, iterations (P,), converged (P,), factorisations, and the factors
    (``fac`` updated: the last one of each problem, for the next C's tangent)."""
    P, dev = A.shape[0], A.device
    n_iter = torch.zeros(P, dtype=torch.int64, device=dev)
    conv = torch.zeros(P, dtype=torch.bool, device=dev)
    fresh = torch.zeros(P, dtype=torch.bool, device=dev)            # a factor from this C
    g_last = torch.full((P,), torch.inf, dtype=A.dtype, device=dev)
    live = torch.arange(P, device=dev)
    factors = 0
    while live.numel():
        sub = bt.take(live)
        f, Pr, R, gb, gmax, GA = _state(sub, A[live], b[live], pen[live])
        conv[live] = gmax <= tol
        keep = ~conv[live] & (n_iter[live] < max_iter)
        live, sub, f, Pr, R, gb, gmax, GA = (v[keep] if torch.is_tensor(v) else v.take(keep)
                                             for v in (live, sub, f, Pr, R, gb, gmax, GA))
        if not live.numel():
            break
        new = ~(fresh[live] & (gmax <= 0.1 * g_last[live]))
        if bool(new.any()):
            built = _Factor(sub.take(new), Pr[new], pen[live[new]])
            factors += int(new.sum())
            if fac is None:
                whole = bool(new.all()) and live.numel() == P
                fac = built if whole else _Factor.empty_like(built, P)
            if fac is not built:
                fac.put(live[new], built)
            fresh[live[new]] = True
        if 2 * live.numel() < P:
            dA, db = fac.take(live).step(sub, R, gb)
        else:                                 # most live: copying their factors costs more
            Rf, gbf = R.new_zeros(A.shape), gb.new_zeros(b.shape)
            Rf[live], gbf[live] = R, gb
            dA, db = fac.step(bt, Rf, gbf)
            dA, db = dA[live], db[live]
        t = _line_search(sub, A[live], b[live], dA, db, GA, f, R, gb, pen[live])
        A[live] += t[:, None, None] * dA
        b[live] += t[:, None] * db
        n_iter[live] += 1
        g_last[live] = torch.where(t == 1, gmax, torch.inf)          # partial step: refactor
        stalled = (t == 0) & ~new                                    # a chord step may not help:
        fresh[live[stalled]] = False                                 # refactor before giving up
        gone = (t == 0) & new
        live = live[~gone]
    return A, b, n_iter, conv, factors, fac


def _extrapolate(bt: _Batch, hist: list, log_c: float, pen, fac: _Factor | None):
    """Start at the next C from the last solutions hist = [..., (A, b, log C)]: per problem the
    candidate of lowest objective at this C among the last solution, the tangent of the path
    there (dθ/dlog C = H⁻¹(pen·W, 0), with the problem's last factor) continued to this C, and
    the line through the last two solutions continued to this log C (on separable data the
    solution grows like log C)."""
    A1, b1, l1 = hist[-1]
    cands = [(A1, b1)]
    if fac is not None:
        dA, db = fac.step(bt, fac.pen[:, None, None] * A1, torch.zeros_like(b1))
        cands.append((A1 - (log_c - l1) * dA, b1 - (log_c - l1) * db))
    if len(hist) > 1:
        A0, b0, l0 = hist[-2]
        s = (log_c - l1) / (l1 - l0)
        cands.append((A1 + s * (A1 - A0), b1 + s * (b1 - b0)))
    f = torch.stack([_objective(bt, A, b, pen) for A, b in cands])          # (n_cands, P)
    best = torch.where(torch.isfinite(f), f, torch.inf).argmin(0)
    at = torch.arange(best.numel(), device=best.device)
    return (torch.stack([a for a, _ in cands])[best, at],
            torch.stack([b for _, b in cands])[best, at])


def _objective(bt: _Batch, A, b, pen):
    GA = bt.G @ A
    return _data_loss(GA + b[:, None], bt)[0] + 0.5 * pen * (A * GA).sum((1, 2))


def _chunks(n_problems: int, m: int, c: int, d: int) -> list[range]:
    """Problems per chunk: a chunk's systems (the one being factorised, its factor, the kept
    factors) and its float64 rows and Grams within _CHUNK_BYTES."""
    per = max(1, _CHUNK_BYTES // (8 * (3 * (m * c) ** 2 + m * d + m * m)))
    return [range(s, min(s + per, n_problems)) for s in range(0, n_problems, per)]


def _batch(Xc, Y, wf, layers, sets, rows, binary: bool) -> _Batch:
    """The float64 batch of problems (layer layers[p], weight set sets[p]) on rows (P, m)
    (index -1: padding)."""
    pad = rows < 0
    idx = rows.clamp_min(0)
    X = Xc[layers[:, None], idx].to(torch.float64)                   # (P, m, d)
    X[pad] = 0
    w = wf[sets[:, None], idx].masked_fill(pad, 0.0)
    S = w.sum(1)
    return _Batch(X, X @ X.transpose(1, 2), w / S[:, None], Y[idx].masked_fill(pad[..., None], 0),
                  S, binary)


def kernel_eig(G):
    """(λ, U, keep) of a batch of Gram matrices G = XXᵀ (..., m, m) with XXᵀ = UΛUᵀ; ``keep``
    marks the eigenvalues above the noise floor m·eps·λ_max (the rest count as 0)."""
    lam, U = torch.linalg.eigh(G)
    keep = lam > lam[..., -1:].clamp_min(0) * lam.shape[-1] * torch.finfo(lam.dtype).eps
    return lam, U, keep


def _pseudo_inverse(bt: _Batch):
    """(U, 1/λ with dropped eigenvalues 0) of the batch's G: its pseudo-inverse, for
    :func:`_start`, the same for every C."""
    lam, U, keep = kernel_eig(bt.G)
    return U, torch.where(keep, 1 / torch.where(keep, lam, 1.0), 0.0)


def _start(bt: _Batch, pinv, W0, b0):
    """Kernel coefficients A with Xᵀ A nearest to W0 (P, d, K) (``pinv``: the pseudo-inverse of
    G from :func:`_pseudo_inverse`): W0 is a starting point only."""
    U, inv = pinv
    XW = bt.X @ W0
    return U @ (inv[..., None] * (U.transpose(1, 2) @ XW)), b0.clone()


def solve_dual(Xc, codes, n_classes: int, Cs, weights, tol: float, max_iter: int, *,
               init=None, warm_start: bool = True, work: dict | None = None):
    """Fit every (layer, weight set, C) problem by exact Newton in the kernel space.

    Parameters
    ----------
    Xc : (L, n, d) tensor
        Features, centred (any dtype; the solve is float64).
    codes : (n,) int tensor
        Class codes 0..K-1 (two classes: code 1 positive).
    n_classes : int
        K.
    Cs : (n_C,) float array
        The C grid.
    weights : (F, n) float array
        Row weights per weight set (0 drops a row from that set's problems).
    tol : float
        Stop where max |gradient entry| of objective / (C·Σw) is at most ``tol``.
    max_iter : int
        Newton steps at most per problem and C.
    init : tuple, optional
        (W (L, d, F, n_C, K'), b (L, F, n_C, K')) starting points in centred coordinates.
    warm_start : bool
        Cs in increasing order, each from the previous C's solution (unless ``init``).
    work : dict, optional
        Tally: ``newton`` steps and ``factorizations`` (Cholesky of one m·K' system).

    Returns
    -------
    W : (L, d, F, n_C, K') float64 tensor, b : (L, F, n_C, K'), n_iter, converged : (L, F, n_C)
    """
    L, n, d = Xc.shape
    binary = n_classes == 2
    K = 1 if binary else n_classes
    Y = (codes == 1).to(torch.float64)[:, None] if binary else \
        torch.nn.functional.one_hot(codes, n_classes).to(torch.float64)
    wf = torch.as_tensor(np.asarray(weights, dtype=np.float64), device=Xc.device)
    Fn, nC = wf.shape[0], len(Cs)
    m = int((wf > 0).sum(1).max())
    rows = torch.full((Fn, m), -1, dtype=torch.int64, device=Xc.device)
    for s in range(Fn):
        r = torch.nonzero(wf[s] > 0)[:, 0]
        rows[s, :r.numel()] = r
    W = torch.zeros(L, d, Fn, nC, K, dtype=torch.float64, device=Xc.device)
    b = torch.zeros(L, Fn, nC, K, dtype=torch.float64, device=Xc.device)
    n_iter = torch.zeros(L, Fn, nC, dtype=torch.int64)
    conv = torch.zeros(L, Fn, nC, dtype=torch.bool)
    order = list(np.argsort(Cs, kind="stable")) if warm_start else list(range(nC))
    work = {} if work is None else work
    for ch in _chunks(L * Fn, m, max(K - 1, 1), d):
        pl = torch.as_tensor([p // Fn for p in ch], device=Xc.device)
        ps = torch.as_tensor([p % Fn for p in ch], device=Xc.device)
        bt = _batch(Xc, Y, wf, pl, ps, rows[ps], binary)
        A = torch.zeros(len(ch), m, K, dtype=torch.float64, device=Xc.device)
        bb = torch.zeros(len(ch), K, dtype=torch.float64, device=Xc.device)
        hist, fac = [], None
        pinv = None if init is None else _pseudo_inverse(bt)
        for j in order:
            pen = 1.0 / (bt.S * float(Cs[j]))
            if init is not None:
                A, bb = _start(bt, pinv, init[0][pl, :, ps, j].to(torch.float64),
                               init[1][pl, ps, j].to(torch.float64))
            elif not warm_start:
                A, bb = torch.zeros_like(A), torch.zeros_like(bb)
            elif hist:
                A, bb = _extrapolate(bt, hist, float(np.log(Cs[j])), pen, fac)
            A, bb, it, cv, nf, fac = _newton(bt, A.clone(), bb.clone(), pen, tol, max_iter,
                                             fac if warm_start and init is None else None)
            hist = (hist + [(A, bb, float(np.log(Cs[j])))])[-2:]
            W[pl, :, ps, j] = bt.X.transpose(1, 2) @ A
            b[pl, ps, j] = bb
            n_iter[pl.cpu(), ps.cpu(), j], conv[pl.cpu(), ps.cpu(), j] = it.cpu(), cv.cpu()
            work["newton"] = work.get("newton", 0) + int(it.sum())
            work["factorizations"] = work.get("factorizations", 0) + nf
    work.update(form="dual", system=m * max(K - 1, 1))
    return W, b, n_iter, conv
