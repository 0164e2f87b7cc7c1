"""L2-regularised logistic regression for a stack of layers and a grid of C values at once.

Per layer and C (scikit-learn ``LogisticRegression(C=C, solver="lbfgs")``): minimise C·Σ_i
w_i·loss_i + ½‖W‖², the intercept not penalised. Two classes: one coefficient vector and the
sigmoid (the positive class is code 1); K ≥ 3: multinomial softmax, K vectors, all penalised,
intercepts centred to sum 0. Solver: truncated Newton with Levenberg–Marquardt damping, the CG
preconditioned by each problem's IRLS-weighted Gram (:class:`_Precond`), batched in torch over
layers × row-weight sets (the folds of :mod:`probes.classify.select`), the Cs in increasing order,
each warm-started from the previous (moved on along the log-C secant of the last two); features are
centred internally (mapped back exactly). It stops per problem when the largest gradient entry of
the objective divided by C·Σw is below ``tol`` (float64 1e-8, float32 1e-5). Fewer rows than
features: exact Newton in the kernel space (:mod:`probes.classify.dual`), or CG on the row space
(:class:`_RowSpace`) when rows are under a fifth of the features.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from probes.classify.dual import MAX_SYSTEM, kernel_eig, solve_dual
from probes.errors import ClassifyError

__all__ = ["LogisticPath", "fit_logistic_path", "balanced_weights", "class_weights",
           "decision_function",
           "predict_proba"]

_DTYPES = {"float64": torch.float64, "float32": torch.float32}
_TOL = {"float64": 1e-8, "float32": 1e-5}
_EXACT_D = 1024               # larger d: the preconditioner is exact on a top-r subspace only
_RANK = 256
_BATCH_ENTRIES = 1 << 24      # layers solved together: at most this many rows x features (CG
                              # runs until a batch's slowest problem converges, so a batch of 32
                              # 4,000 x 4,096 layers paid every layer for its slowest; at least
                              # one layer, and small layers still go together)
_SKETCH = 16                  # the preconditioner's Gram sums a random sample of 16 rows a
                              # feature when there are over twice as many: it sets only how fast
                              # CG converges (20,000 x 576, 2 layers: 18.5 s against 23.0 s
                              # with every row; 8 rows a feature took 46 % more CG passes)
_ROW_SPACE = 0.2              # the row space only below this many rows per feature (it costs an
                              # n x n float64 eigh and saves (d - n)/d of each pass: 4,096 features,
                              # float32, one layer: 1.3x faster at 700 rows, 1.8x slower at 1,024,
                              # 2.9x slower at 4,000)
_MAX_REJECTED = 30            # damped steps rejected in a row before a problem is given up


@dataclass
class LogisticPath:
    """Fitted coefficients per layer position and C.

    Cs: (n_C,); coef: (L, n_C, d) for two classes, else (L, n_C, K, d); intercept: (L, n_C) or
    (L, n_C, K); n_iter: (L, n_C) Newton iterations; converged: (L, n_C) gradient below tol;
    work: the work done (:func:`add_work`).
    """
    Cs: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    n_iter: np.ndarray
    converged: np.ndarray
    n_classes: int
    work: dict = field(default_factory=dict)


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


class _RowSpace:
    """Fewer rows than features: the problem on the row space of centred X, exactly. The
    penalised optimum W lies there (its gradient is Xᵀ(...) + W/(C·Σw)), the loss sees X W only
    and the intercept, unpenalised, is untouched; so with XXᵀ = UΛUᵀ, the n features Q = U√Λ
    and W = Xᵀ A β (A = UΛ^-½) give the same objective in β as in W, with n ≪ d columns. The
    eigendecomposition is float64 (from the given values); directions with λ below n·eps·λ_max
    are dropped (Q and A zero there: β stays 0). bench/RESULTS.md, "Logistic regression with
    fewer rows than features"."""

    def __init__(self, Xc, dtype):
        self.X = Xc.to(torch.float64)                                 # (L, n, d)
        lam, U, keep = kernel_eig(self.X @ self.X.transpose(1, 2))    # (L, n), (L, n, n)
        root = torch.where(keep, lam, 0.0).sqrt()
        self.Q = (U * root[:, None]).to(dtype)                        # (L, n, n)
        self.A = U * torch.where(keep, 1 / torch.where(keep, root, 1.0), 0.0)[:, None]

    def reduce(self, W):
        """β = Aᵀ X W of full coefficients W (L, d, ...) (their part in the row space)."""
        L, d = W.shape[:2]
        XW = self.X @ W.to(torch.float64).reshape(L, d, -1)
        return (self.A.transpose(1, 2) @ XW).reshape((L, -1) + W.shape[2:])

    def expand(self, B):
        """W = Xᵀ A β of reduced coefficients β (L, n, ...), float64."""
        L, n = B.shape[:2]
        AB = self.A @ B.to(torch.float64).reshape(L, n, -1)
        return (self.X.transpose(1, 2) @ AB).reshape((L, -1) + B.shape[2:])


class _Basis:
    """Where the preconditioner works, per layer: all of feature space for d ≤ 1024 (V None,
    Z = X); above, the top-r eigenvectors V (L, d, r) of XᵀX, Z = X V (L, n, r) and the squared
    row norms (L, n) for the mean curvature on the complement. Fixed for a whole solve."""

    def __init__(self, X):
        L, n, d = X.shape
        self.d = d
        self.V = None if d <= _EXACT_D else _top_eigenvectors(X, min(_RANK, n, d))
        self.Z = X if self.V is None else X @ self.V
        self.norm2 = None if self.V is None else X.square().sum(-1)
        # the rows the preconditioner's Gram sums (all of them up to _SKETCH rows a feature),
        # gathered once for every build
        m = _SKETCH * self.Z.shape[-1]
        gen = torch.Generator().manual_seed(0)
        self.rows = None if n <= 2 * m else \
            torch.randperm(n, generator=gen)[:m].sort().values.to(X.device)
        self.Z_gram = self.Z if self.rows is None else self.Z[:, self.rows].contiguous()


def _top_eigenvectors(X, r: int):
    """An orthonormal (L, d, r) basis of the top-r eigenvectors of XᵀX by randomised subspace
    iteration (three power steps); its accuracy changes only how fast CG converges."""
    L, n, d = X.shape
    gen = torch.Generator(device=X.device).manual_seed(0)
    Q = torch.randn(L, d, min(r + 16, d), generator=gen, device=X.device, dtype=X.dtype)
    for _ in range(3):
        Q, _ = torch.linalg.qr(X.transpose(1, 2) @ (X @ Q))
    B = X @ Q
    _, U = torch.linalg.eigh(B.transpose(1, 2) @ B)
    return (Q @ U[..., -r:]).contiguous()


class _Precond:
    """(a_k·XᵀΩX + pen·I)⁻¹ per (layer, problem, class k), Ω_i = w_i·mean_k p_ik(1−p_ik) (the
    Hessian itself for two classes), a_k = Σ w·p_k(1−p_k) / ΣΩ; the weighted Gram comes from
    :func:`probes.kernels.weighted_gram` and one eigendecomposition serves every class. Above
    d = 1024 it is exact on the basis's top-r subspace and the mean curvature elsewhere. Built
    once per C (lagged over its Newton steps): rebuilding each step costs more than it saves."""

    def __init__(self, prob: _Problem, P):
        from probes.kernels import weighted_gram  # deferred: loads the kernel backends
        h = (P * (1 - P)).mul_(prob.wts[..., None])                   # (L, n, M, K)
        L, n, M, K = h.shape
        om = h.mean(-1)                                               # (L, n, M)
        tiny = torch.finfo(h.dtype).tiny
        a = h.sum(1) / om.sum(1)[..., None].clamp_min(tiny)           # (L, M, K)
        Zb, pen, rows = prob.basis.Z_gram, prob.pen[None, :, None], prob.basis.rows
        # a row sample, reweighted: the same Gram expected
        om_g = om if rows is None else om[:, rows] * (n / rows.numel())
        G = torch.stack([weighted_gram(Zb[l:l + 1], om_g[l].T.contiguous())[0]
                         for l in range(L)]).to(h.dtype)              # (L, M, r, r)
        prob.grams += L * M
        s, self.U = torch.linalg.eigh(G)
        self.D0 = s.clamp_min(0)[..., None] * a[:, :, None, :] + pen[..., None]  # (L, M, r, K)
        self.V = prob.basis.V
        if self.V is not None:                                        # mean curvature elsewhere
            rest = torch.einsum("ln,lnm->lm", prob.basis.norm2, om) - s.clamp_min(0).sum(-1)
            c = rest.clamp_min(0) / max(prob.basis.d - self.V.shape[-1], 1)
            self.c0 = (c[..., None] * a + pen)[:, :, None, :]         # (L, M, 1, K)
        self.Db0 = h.sum(1).clamp_min(tiny)
        self.scale = self.D0.mean((-2, -1))                           # (L, M) typical curvature
        self.damp(torch.zeros_like(self.scale))

    def damp(self, mu):
        """Precondition H + mu·I instead (mu (L, M), the Levenberg–Marquardt damping)."""
        self.D = self.D0 + mu[..., None, None]
        if self.V is not None:
            self.c = self.c0 + mu[..., None, None]
        self.Db = self.Db0 + mu[..., None]

    def __call__(self, rW, rb):
        if self.V is None:
            R = rW.permute(0, 2, 1, 3)                                # (L, M, d, K)
            Z = self.U @ ((self.U.transpose(-1, -2) @ R) / self.D)
            return Z.permute(0, 2, 1, 3), rb / self.Db
        # V·S + (R − V·T)/c = R/c + V·(S − T/c), T = VᵀR: two (d, r) x (r, M·K) products on
        # the contiguous (L, d, M·K) residual (as batched (r, d) x (d, K) products per problem,
        # on a permuted view, they took 40 % of a 4,096-feature solve)
        L, d, M, K = rW.shape
        r = self.V.shape[-1]
        T = (self.V.transpose(1, 2) @ rW.reshape(L, d, M * K)).reshape(L, r, M, K)
        T = T.permute(0, 2, 1, 3)                                     # (L, M, r, K)
        S = self.U @ ((self.U.transpose(-1, -2) @ T) / self.D) - T / self.c
        VS = self.V @ S.permute(0, 2, 1, 3).reshape(L, r, M * K)
        return rW / self.c.permute(0, 2, 1, 3) + VS.reshape(L, d, M, K), rb / self.Db


class _Problem:
    """Objective pieces of a batch: X (L, n, d) centred; Y (n, K'); weights (n, M) normalised to
    sum 1 per column; pen (M,) = 1/(C·Σw); basis: the preconditioner's :class:`_Basis`.
    Parameters W (L, d, M, K'), b (L, M, K')."""

    def __init__(self, X, Y, wts, pen, binary: bool, basis: _Basis):
        self.X, self.Y, self.wts, self.pen, self.binary = X, Y, wts, pen, binary
        self.L, self.n, self.d = X.shape
        self.M, self.K = wts.shape[1], Y.shape[1]
        self.idx = Y.argmax(1)[None, :, None, None].expand(self.L, self.n, self.M, 1)
        self.basis = basis
        self.passes = self.grams = 0            # work done: X products, preconditioner Grams
        self._bufs: dict[str, torch.Tensor] = {}

    def _scratch(self, name: str, shape) -> torch.Tensor:
        """A buffer reused across iterations: these are (L, n, M, K) large, and a fresh one
        each time costs page faults."""
        t = self._bufs.get(name)
        if t is None or t.shape != shape:
            t = self._bufs[name] = torch.empty(shape, dtype=self.X.dtype, device=self.X.device)
        return t

    def xw(self, W, b):
        self.passes += 1
        L, d, M, K = W.shape
        Z = torch.baddbmm(b.reshape(L, 1, M * K), self.X, W.reshape(L, d, M * K))
        return Z.reshape(L, self.n, M, K)

    def xtr(self, R):
        """Xᵀ R as (Rᵀ X)ᵀ: X is read in its row-major layout (1.6-1.9x faster than a
        transposed X on CPU BLAS, measured at 4000 x 4096 and 20000 x 576)."""
        self.passes += 1
        RtX = R.reshape(self.L, self.n, -1).transpose(1, 2) @ self.X
        return RtX.transpose(1, 2).reshape(self.L, self.d, self.M, self.K)

    def loss(self, W, b, Z=None):
        """Objective (L, M), probabilities (L, n, M, K') and the linear predictor Z = XW + b
        (L, n, M, K'), from a pass over X unless Z is given (left unchanged)."""
        if Z is None:
            Z = self.xw(W, b)
        if self.binary:
            ell = (torch.nn.functional.softplus(Z) - self.Y[:, None] * Z)[..., 0]
            P = torch.sigmoid(Z)
        else:
            zy = Z.gather(-1, self.idx)[..., 0]
            m = Z.amax(-1, keepdim=True)
            P = torch.sub(Z, m).exp_()          # in place after: (L, n, M, K) large
            s = P.sum(-1, keepdim=True)
            ell = (m + s.log())[..., 0] - zy
            P.div_(s)
        f = torch.einsum("lnm,nm->lm", ell, self.wts) + 0.5 * self.pen * _dot(W, None, W, None)
        return f, P, Z

    def grad(self, W, P):
        E = (P - self.Y[:, None]).mul_(self.wts[..., None])
        return self.xtr(E) + self.pen[:, None] * W, E.sum(1)

    def hvp(self, P, V, v, mu):
        """(H + mu·I)(V, v), mu (L, M) the damping; and X V + v, the direction's change of the
        linear predictor (CG sums it into the step's, which spares the trial point a pass)."""
        XV = self.xw(V, v)
        if self.binary:
            R = XV * (P * (1 - P))
        else:
            R = torch.mul(XV, P, out=self._scratch("r", XV.shape))
            R.addcmul_(P, R.sum(-1, keepdim=True), value=-1)
        R.mul_(self.wts[..., None])
        return (self.xtr(R) + (self.pen[:, None] + mu[:, None, :, None]) * V,
                R.sum(1) + mu[..., None] * v, XV)


def _dot(A, a, B, b):
    out = torch.einsum("ldmk,ldmk->lm", A, B)
    return out if a is None else out + (a * b).sum(-1)


def _sum_zero(z, binary: bool):
    """Multinomial: remove the class mean of a preconditioned residual. The loss does not change
    when every class gains the same vector, so the Hessian keeps class-sum-zero directions among
    themselves; a preconditioner that weighs classes unequally would leak into that flat
    direction, where only the penalty curves (and CG would crawl)."""
    if binary:
        return z
    zW, zb = z
    return zW - zW.mean(-1, keepdim=True), zb - zb.mean(-1, keepdim=True)


def _cg(prob: _Problem, P, gW, gb, active, max_cg: int, precond, mu):
    """Preconditioned truncated conjugate gradient for H p = -g per problem (forcing term
    min(0.5, ‖g‖^¼) on the residual). Returns the step p, X p_W + p_b (summed from the
    products the Hessian-vector products already made) and the iterations."""
    pW, pb = torch.zeros_like(gW), torch.zeros_like(gb)
    Xp = None
    rW, rb = -gW, -gb
    zW, zb = _sum_zero(precond(rW, rb), prob.binary)
    dW, db = zW.clone(), zb.clone()
    rz = _dot(rW, rb, zW, zb)
    gn = _dot(rW, rb, rW, rb).sqrt()
    target = torch.minimum(torch.full_like(gn, 0.5), gn.pow(0.25)) * gn
    run = active.clone()
    n_cg = 0
    for n_cg in range(max_cg):
        run = run & (_dot(rW, rb, rW, rb).sqrt() > target)
        if not bool(run.any()):
            break
        HW, Hb, Xd = prob.hvp(P, dW, db, mu)
        dHd = _dot(dW, db, HW, Hb)
        run = run & (dHd > 0)
        alpha = torch.where(run, rz / torch.where(run, dHd, torch.ones_like(dHd)), 0.0)
        pW, pb = pW + alpha[:, None, :, None] * dW, pb + alpha[..., None] * db
        Xp = Xd.mul_(alpha[:, None, :, None]) if Xp is None else \
            Xp.addcmul_(Xd, alpha[:, None, :, None])
        rW, rb = rW - alpha[:, None, :, None] * HW, rb - alpha[..., None] * Hb
        zW, zb = _sum_zero(precond(rW, rb), prob.binary)
        rz_new = _dot(rW, rb, zW, zb)
        beta = torch.where(run, rz_new / torch.where(rz > 0, rz, torch.ones_like(rz)), 0.0)
        dW, db = zW + beta[:, None, :, None] * dW, zb + beta[..., None] * db
        rz = torch.where(run, rz_new, rz)
    empty = (_dot(pW, pb, pW, pb) == 0) & active                    # no step: steepest descent
    if Xp is None or bool(empty.any()):
        pW = torch.where(empty[:, None, :, None], -gW, pW)
        pb = torch.where(empty[..., None], -gb, pb)
        Xp = prob.xw(pW, pb)
    return pW, pb, Xp, n_cg


def _rebuild_after(prob: _Problem) -> float:
    """CG iterations worth one preconditioner build (flops of its weighted Grams and
    eigendecompositions over those of a Hessian-vector product): the preconditioner is rebuilt
    at the next Newton step when the last CG took more, i.e. when it has gone stale."""
    r = prob.basis.Z.shape[-1]
    build = prob.M * (2 * prob.n * r * r + 9 * r ** 3)
    return build / (4 * prob.n * prob.d * prob.M * prob.K)


def _newton(prob: _Problem, W, b, tol: float, max_iter: int, max_cg: int):
    """Truncated Newton with Levenberg–Marquardt damping on all problems of the batch: a step
    is taken where the objective fell by more than a tenth of what the quadratic model promised
    (ρ > 0.1); the damping grows ×4 where ρ < 0.25 and shrinks ÷4 where ρ > 0.75 (far from
    the optimum, after a warm start at the next C, an undamped step along a flat direction
    can lower the objective yet land where the gradient is 100× larger). The linear predictor
    Z = XW + b of a trial point is the last one plus the step's X p, which CG summed from its
    own products: no pass over X per step. That sum's rounding drifts over the steps, so
    convergence is confirmed on an exact pass (the gradient that stops a problem is always
    that of XW + b). Returns W, b, iterations, converged."""
    L, M = prob.L, prob.M
    n_iter = torch.zeros(L, M, dtype=torch.int64, device=W.device)
    converged = torch.zeros(L, M, dtype=torch.bool, device=W.device)
    rejected = torch.zeros_like(n_iter)
    mu = torch.zeros(L, M, dtype=W.dtype, device=W.device)
    f, P, Z = prob.loss(W, b)
    exact = True                                # Z from a pass, not summed steps
    precond, n_cg = None, 0
    # ends: every round either steps (n_iter grows for the active problems, each capped at
    # max_iter) or, after a step, makes the exact pass; the loop leaves only on an exact Z
    while True:
        gW, gb = prob.grad(W, P)
        converged = torch.maximum(gW.abs().amax((1, 3)), gb.abs().amax(-1)) <= tol
        active = ~converged & (rejected < _MAX_REJECTED) & (n_iter < max_iter)
        if not bool(active.any()):
            if exact:
                break
            f, P, Z = prob.loss(W, b)
            exact = True
            continue
        if precond is None or n_cg > _rebuild_after(prob):
            precond = _Precond(prob, P)
        precond.damp(mu)
        pW, pb, Xp, n_cg = _cg(prob, P, gW, gb, active, max_cg, precond, mu)
        ok, rho, f, P, Z = _try_step(prob, W, b, pW, pb, Xp, f, P, Z, _dot(gW, gb, pW, pb),
                                     active)
        W = torch.where(ok[:, None, :, None], W + pW, W)
        b = torch.where(ok[..., None], b + pb, b)
        exact = exact and not bool(ok.any())
        floor = 1e-3 * precond.scale
        mu = torch.where(active & (rho < 0.25), torch.maximum(4 * mu, floor), mu)
        mu = torch.where(active & (rho > 0.75), torch.where(mu > 4 * floor, mu / 4, 0.0), mu)
        rejected = torch.where(ok, 0, rejected + active.to(torch.int64))
        n_iter = n_iter + active.to(torch.int64)
    return W, b, n_iter, converged


def _try_step(prob: _Problem, W, b, pW, pb, Xp, f0, P0, Z0, slope, active):
    """Objective at W + p per problem (its linear predictor Z0 + X p, no pass over X): taken
    (ok) where it fell by over a tenth of the model's promise ½·gᵀp (CG's iterates satisfy
    pᵀHp = −gᵀp), or, where that promise is below rounding, where it did not rise. Returns ok,
    ρ, and f, P, Z at the taken points."""
    f, P, Z = prob.loss(W + pW, b + pb, Z=Xp.add_(Z0))
    slack = 16 * torch.finfo(f0.dtype).eps * f0.abs()
    promise = -0.5 * slope
    rho = (f0 - f) / torch.where(promise > 0, promise, torch.ones_like(promise))
    ok = active & torch.isfinite(f) & torch.where(promise > slack, rho > 0.1, f <= f0 + slack)
    rho = torch.where(torch.isfinite(rho), rho, torch.full_like(rho, -1.0))
    # a step taken where the promise is below rounding: ρ measures rounding and must not move
    # the damping (a rejected one still raises it, or the same step would be tried again)
    rho = torch.where(ok & (promise <= slack), torch.full_like(rho, 0.5), rho)
    taken = ok[:, None, :, None]
    return (ok, rho, torch.where(ok, f, f0), torch.where(taken, P, P0, out=P),
            torch.where(taken, Z, Z0, out=Z))


WORK_COUNTS = ("passes", "layer_passes", "grams", "newton", "factorizations")


def add_work(work: dict | None, prob: _Problem | None = None, newton: int = 0) -> dict:
    """Tally the work of a solve into ``work`` (a new dict if None): ``passes``, batched
    products of the rows X (L, n, d) of a batch's layers with a (d, problems × classes) block or
    its transpose; ``layer_passes``, the same counted per layer; ``grams``, weighted Grams (of
    d or r features, one per layer and problem) built for the preconditioner; ``newton``, steps
    over all problems; ``rows``, ``features``, ``columns``: the shape one layer's pass
    multiplies; ``gram_features``, ``gram_rows``: the shape of a preconditioner Gram. The
    counts (:data:`WORK_COUNTS`) add up across solves."""
    work = {"passes": 0, "layer_passes": 0, "grams": 0, "newton": 0} if work is None else work
    if prob is not None:
        work["passes"] += prob.passes
        work["layer_passes"] += prob.passes * prob.L
        work["grams"] += prob.grams
        work["newton"] += newton
        rows = prob.basis.rows
        work.update(rows=prob.n, features=prob.d, columns=prob.M * prob.K,
                    gram_features=prob.basis.Z.shape[-1],
                    gram_rows=prob.n if rows is None else rows.numel())
    return work


def _initial(init, mean, L, F, nC, K, d, tdt, device):
    """Starting point (L, d, F, n_C, K), (L, F, n_C, K) in centred coordinates (zeros if None)."""
    if init is None:
        return (torch.zeros(L, d, F, nC, K, dtype=tdt, device=device),
                torch.zeros(L, F, nC, K, dtype=tdt, device=device))
    W = torch.as_tensor(np.asarray(init[0]), device=device).to(tdt).reshape(L, F, nC, K, d)
    W = W.permute(0, 4, 1, 2, 3).contiguous()
    b = torch.as_tensor(np.asarray(init[1]), device=device).to(tdt).reshape(L, F, nC, K)
    return W, b + torch.einsum("ld,ldfck->lfck", mean, W)


def _solve(*args, **kwargs):
    """:func:`_solve_all` with denormal floats flushed to zero: probabilities of confidently
    wrong classes fall below 1e-38 in float32 at large C, and arithmetic on denormals is ~50x
    slower on x86 (it made one C of a real fit 3x slower than its neighbours)."""
    torch.set_flush_denormal(True)
    try:
        return _solve_all(*args, **kwargs)
    finally:
        torch.set_flush_denormal(False)


def _solve_all(X, codes, n_classes: int, Cs, weights, dtype: str, tol: float, max_iter: int,
               device=None, init=None, warm_start: bool = True, work: dict | None = None,
               dual: bool = True):
    """Fit every (layer, weight set, C) problem. weights (F, n) -> arrays shaped (L, F, n_C,
    ...) with K' = 1 for two classes; ``init`` = (coef, intercept) in the same shapes, or
    None. ``warm_start``: one batched solve per C in increasing order, each started from the
    previous C's solution moved on along the log-C secant of the last two (unless ``init``);
    else all Cs in one batch from ``init`` (or zero). ``work``: a dict the work done is
    added to (see :func:`add_work`). ``dual``: with fewer rows than features, exact Newton
    in the kernel space (:func:`probes.classify.dual.solve_dual`) while its system of rows ×
    max(K − 1, 1) is at most ``MAX_SYSTEM``, else CG on the row space (:class:`_RowSpace`)
    below ``_ROW_SPACE`` rows per feature, else on all features; False: CG on all features."""
    tdt = _DTYPES[dtype]
    Xt = torch.as_tensor(X, device=device).to(tdt)
    if Xt.ndim != 3:
        raise ClassifyError(f"X must be (layers, rows, features), got shape {tuple(Xt.shape)}")
    L, n, d = Xt.shape
    mean = Xt.mean(1)
    Xt = Xt - mean[:, None]
    binary = n_classes == 2
    K = 1 if binary else n_classes
    codes_t = torch.as_tensor(np.asarray(codes), device=Xt.device)
    Cs = np.asarray(Cs, dtype=np.float64)
    wf = np.asarray(weights, dtype=np.float64)                      # (F, n)
    F, nC = wf.shape[0], Cs.size
    if dual and n < d and int((wf > 0).sum(1).max()) * max(K - 1, 1) <= MAX_SYSTEM:
        start = None if init is None else _initial(init, mean, L, F, nC, K, d, tdt, Xt.device)
        W, b, n_iter, conv = solve_dual(Xt, codes_t, n_classes, Cs, wf, tol, max_iter,
                                        init=start, warm_start=warm_start, work=work)
    else:
        W, b, n_iter, conv = _solve_primal(Xt, mean, codes_t, n_classes, Cs, wf, tdt, tol,
                                           max_iter, init, warm_start, work,
                                           _RowSpace(Xt, tdt) if dual and n <= _ROW_SPACE * d
                                           else None)
    b = b - torch.einsum("ld,ldfck->lfck", mean.to(W.dtype), W)
    if not binary:
        b = b - b.mean(-1, keepdim=True)
    coef = W.permute(0, 2, 3, 4, 1).to(torch.float64).cpu().numpy()
    icpt = b.to(torch.float64).cpu().numpy()
    if binary:
        coef, icpt = coef[..., 0, :], icpt[..., 0]
    return coef, icpt, n_iter.numpy(), conv.numpy()


def _solve_primal(Xt, mean, codes_t, n_classes: int, Cs, wf, tdt, tol: float, max_iter: int,
                  init, warm_start: bool, work, rows: _RowSpace | None):
    """Truncated Newton-CG of every problem on the centred features Xt, or on their row space
    (``rows``), the C path run for a few layers at a time (:data:`_BATCH_ENTRIES`). Returns W
    (L, d, F, n_C, K'), b (L, F, n_C, K') centred, n_iter, converged."""
    L, n, d = Xt.shape
    Xs = Xt if rows is None else rows.Q                             # the features solved on
    ds = Xs.shape[-1]
    binary = n_classes == 2
    Y = (codes_t == 1).to(tdt)[:, None] if binary else \
        torch.nn.functional.one_hot(codes_t, n_classes).to(tdt)
    K = Y.shape[1]
    F, nC = wf.shape[0], Cs.size
    S = wf.sum(1)                                                   # (F,)
    W, b = _initial(init, mean, L, F, nC, K, ds if init is None else d, tdt, Xt.device)
    if rows is not None and init is not None:
        W = rows.reduce(W).to(tdt)
    n_iter = torch.zeros(L, F, nC, dtype=torch.int64)
    conv = torch.zeros(L, F, nC, dtype=torch.bool)
    groups = [[j] for j in np.argsort(Cs, kind="stable")] if warm_start else [list(range(nC))]
    size = max(1, _BATCH_ENTRIES // (n * ds))
    for lo in range(0, L, size):
        ls = slice(lo, min(L, lo + size))
        X, B = Xs[ls], min(L, lo + size) - lo
        basis = _Basis(X)
        prev = prev2 = g_prev = g_prev2 = None
        for g in groups:
            wts = torch.as_tensor(np.repeat(wf / S[:, None], len(g), axis=0).T,
                                  device=Xt.device)
            pen = torch.as_tensor((1.0 / (S[:, None] * Cs[None, g])).ravel(), device=Xt.device)
            prob = _Problem(X, Y, wts.to(tdt), pen.to(tdt), binary, basis)
            if prev is not None and init is None:
                W0, b0 = prev                       # the last C's solution
                step = 0.0 if prev2 is None else np.log(Cs[g_prev[0]] / Cs[g_prev2[0]])
                if step > 0:                        # ... moved on along the log-C secant
                    # at most one secant length: on an uneven grid a long extrapolation of a
                    # short difference would mostly carry its noise
                    t = min(1.0, float(np.log(Cs[g[0]] / Cs[g_prev[0]]) / step))
                    W0, b0 = W0 + t * (W0 - prev2[0]), b0 + t * (b0 - prev2[1])
            else:
                W0 = W[ls][:, :, :, g].reshape(B, ds, -1, K)
                b0 = b[ls][:, :, g].reshape(B, -1, K)
            Wg, bg, it, cv = _newton(prob, W0, b0, tol, max_iter,
                                     max_cg=max(50, min(2 * ds * K, 250)))
            W[ls, :, :, g] = Wg.reshape(B, ds, F, len(g), K)
            b[ls, :, g] = bg.reshape(B, F, len(g), K)
            n_iter[ls, :, g] = it.reshape(B, F, -1).cpu()
            conv[ls, :, g] = cv.reshape(B, F, -1).cpu()
            prev, prev2 = (Wg, bg), prev
            g_prev, g_prev2 = g, g_prev
            add_work(work, prob, int(it.sum()))
    return (W if rows is None else rows.expand(W)), b, n_iter, conv


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
        float64 is the reference; float32 is faster (gradient tolerance 1e-5).
    tol : float, optional
        Stop when max |∇| of (objective / (C·Σw)) is below it (default 1e-8, float32 1e-5).
    max_iter : int
        Newton iterations at most.
    device : torch device, optional
        Where to compute (default: X's device, or CPU for numpy).
    warm_start : bool
        Solve the Cs one at a time in increasing order (batched over layers), each started from
        the previous C's solution moved on along the log-C secant of the last two (default;
        less memory, fewer Newton steps); False: all Cs in one batch from zero.

    Returns
    -------
    LogisticPath
    """
    if dtype not in _DTYPES:
        raise ClassifyError(f"dtype must be 'float64' or 'float32', got {dtype!r}")
    codes, K, Cs, w = _check(X, codes, Cs, n_classes, sample_weight)
    w = class_weights(codes, K, w, class_weight)
    work = add_work(None)
    coef, icpt, n_iter, conv = _solve(X, codes, K, Cs, w[None, :], dtype,
                                      _TOL[dtype] if tol is None else tol, max_iter, device,
                                      warm_start=warm_start, work=work)
    return LogisticPath(Cs, coef[:, 0], icpt[:, 0], n_iter[:, 0], conv[:, 0], K, work)


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
