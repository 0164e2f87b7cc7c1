"""Closed-form classification probes for many layers at once, from streamed statistics alone.

:class:`ClassStats` accumulates, in float64 and chunk by chunk, per-class counts and sums and the
total Gram Σ(x-c)(x-c)ᵀ (c = a per-layer shift, the first chunk's mean, against cancellation).
From it: the difference-of-means ("mass-mean") probe (:func:`mass_mean`) and shrinkage LDA equal
to scikit-learn ``LinearDiscriminantAnalysis(solver="lsqr", shrinkage=s)`` (:func:`lda`,
:func:`lda_grid`: every shrinkage from one eigendecomposition of the pooled within-class
covariance per layer). ``shrinkage="auto"`` needs per-class Grams (``class_gram=True``) and a
second pass (:class:`FourthMoments`), because scikit-learn shrinks each class's covariance by its
own Ledoit-Wolf coefficient, which depends on fourth moments of the standardised class rows.
Results are :class:`LinearProbe` objects (scikit-learn's coef_/intercept_ layout, per layer).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from probes.errors import ClassifyError

__all__ = ["ClassStats", "FourthMoments", "LinearProbe", "mass_mean", "lda", "lda_grid",
           "class_stats"]

_F64 = torch.float64


def _as_chunk(x_chunk, codes, n_layers: int, dim: int, n_classes: int):
    """Validate one chunk: x (L, r, d) any float dtype -> float64 tensor; codes (r,) -> int64."""
    x = torch.as_tensor(np.asarray(x_chunk) if not torch.is_tensor(x_chunk) else x_chunk)
    if x.ndim != 3 or x.shape[0] != n_layers or x.shape[2] != dim:
        raise ClassifyError(f"chunk must be (layers={n_layers}, rows, dim={dim}), got "
                            f"{tuple(x.shape)}; pass activations stacked by layer")
    if not x.is_floating_point():
        raise ClassifyError(f"activations must be floating point, got {x.dtype}")
    x = x.to(_F64)
    c = torch.as_tensor(np.asarray(codes)).reshape(-1)
    if c.is_floating_point() or c.shape[0] != x.shape[1]:
        raise ClassifyError(f"codes must be {x.shape[1]} integer class codes, one per row; got "
                            f"{tuple(c.shape)} {c.dtype}")
    c = c.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= n_classes):
        raise ClassifyError(f"class codes must lie in 0..{n_classes - 1}; encode the labels "
                            "first (probes.classify labels)")
    if not bool(torch.isfinite(x).all()):
        raise ClassifyError("activations contain NaN or inf; check the store (actstore verify)")
    return x, c


class ClassStats:
    """Per-class first moments and the total Gram of L layers, streamed in float64.

    Attributes (float64 tensors on ``device``, shift c (L, d) subtracted from every row):
    ``count`` (K,) rows per class; ``sums`` (L, K, d) Σ(x-c) per class; ``gram`` (L, d, d)
    Σ(x-c)(x-c)ᵀ over all rows; ``class_gram`` (L, K, d, d) per class, only with
    ``class_gram=True`` (needed by ``lda(..., shrinkage="auto")``; K times the memory).
    The same numbers come from the ridge statistics pass with one-hot targets
    (:meth:`from_gram_stats`), which runs on every kernel backend and keeps folds.
    """

    def __init__(self, n_classes: int, n_layers: int, dim: int, *, class_gram: bool = False,
                 device=None):
        if n_classes < 2:
            raise ClassifyError(f"a classifier needs at least 2 classes, got {n_classes}")
        self.n_classes, self.n_layers, self.dim = int(n_classes), int(n_layers), int(dim)
        K, L, d = self.n_classes, self.n_layers, self.dim
        z = dict(dtype=_F64, device=device)
        self.shift: torch.Tensor | None = None
        self.count = torch.zeros(K, **z)
        self.sums = torch.zeros(L, K, d, **z)
        self.gram = torch.zeros(L, d, d, **z)
        self.class_gram = torch.zeros(L, K, d, d, **z) if class_gram else None

    @classmethod
    def from_gram_stats(cls, stats, fold_mask=None) -> ClassStats:
        """The class statistics inside a :class:`probes.stats.GramStats` whose targets Y were
        the one-hot class indicators (n, K) (any backend's ``gram_update``): count = Σy,
        sums = (Σ x yᵀ)ᵀ, gram = Σ x xᵀ, same shift. ``fold_mask`` selects folds as
        :meth:`GramStats.select` (None = all), e.g. the training folds of a k-fold split.
        """
        t = stats.select(fold_mask)
        sy, yty = t.sy[0], t.yty[0]
        if t.k < 2 or not torch.equal(yty, torch.diag(sy)) \
                or not torch.equal(sy, sy.round()):
            raise ClassifyError("the GramStats targets are not one-hot class indicators; "
                                "accumulate with Y = one-hot(codes, K)")
        out = cls(t.k, t.B, t.d, device=t.xtx.device)
        out.shift = stats.shift.to(_F64).clone()
        out.count = sy.to(_F64).clone()
        out.sums = t.xty[:, 0].transpose(1, 2).to(_F64).contiguous()
        out.gram = t.xtx[:, 0].to(_F64).clone()
        return out

    def update(self, x_chunk, codes) -> ClassStats:
        """Add a chunk: ``x_chunk`` (L, r, d) float16/32/64, ``codes`` (r,) ints in 0..K-1."""
        x, c = _as_chunk(x_chunk, codes, self.n_layers, self.dim, self.n_classes)
        x, c = x.to(self.gram.device), c.to(self.gram.device)
        if x.shape[1] == 0:
            return self
        if self.shift is None:
            self.shift = x.mean(dim=1)
        xs = x - self.shift[:, None, :]
        onehot = torch.nn.functional.one_hot(c, self.n_classes).to(_F64)     # (r, K)
        self.count += onehot.sum(0)
        self.sums += torch.einsum("rk,lrd->lkd", onehot, xs)
        self.gram += torch.einsum("lri,lrj->lij", xs, xs)
        if self.class_gram is not None:
            for k in torch.unique(c).tolist():
                xk = xs[:, c == k, :]
                self.class_gram[:, k] += torch.einsum("lri,lrj->lij", xk, xk)
        return self

    def _reshifted(self, shift: torch.Tensor):
        """(sums, gram, class_gram) of this object about another shift."""
        delta = self.shift - shift                                          # (L, d)
        n = self.count[None, :, None]
        sums = self.sums + n * delta[:, None, :]
        tot = self.sums.sum(1)                                              # (L, d)
        outer = torch.einsum("li,lj->lij", tot, delta)
        gram = self.gram + outer + outer.transpose(1, 2) \
            + self.count.sum() * torch.einsum("li,lj->lij", delta, delta)
        cg = None
        if self.class_gram is not None:
            o = torch.einsum("lki,lj->lkij", self.sums, delta)
            cg = self.class_gram + o + o.transpose(2, 3) \
                + n[..., None] * torch.einsum("li,lj->lij", delta, delta)[:, None]
        return sums, gram, cg

    def merge(self, other: ClassStats) -> ClassStats:
        """Add another ClassStats of the same classes, layers and dim (any shift); returns self."""
        if (other.n_classes, other.n_layers, other.dim) != (self.n_classes, self.n_layers,
                                                            self.dim):
            raise ClassifyError("cannot merge ClassStats of different classes, layers or dim")
        if (self.class_gram is None) != (other.class_gram is None):
            raise ClassifyError("cannot merge ClassStats with and without class_gram")
        if other.shift is None:
            return self
        if self.shift is None:
            self.shift = other.shift.clone()
        sums, gram, cg = other._reshifted(self.shift)
        self.count += other.count
        self.sums += sums
        self.gram += gram
        if cg is not None:
            self.class_gram += cg
        return self

    # ------------------------------------------------------------------ derived quantities

    def _check_ready(self):
        if self.shift is None or bool((self.count == 0).any()):
            missing = [] if self.shift is None else torch.nonzero(self.count == 0).flatten()
            raise ClassifyError(f"every class needs at least one row; classes without rows: "
                                f"{list(map(int, missing)) or 'all'} (drop or pool them)")

    @property
    def n(self) -> float:
        """Total rows."""
        return float(self.count.sum())

    def priors(self) -> torch.Tensor:
        """Class frequencies n_k / n, (K,)."""
        return self.count / self.count.sum()

    def means(self) -> torch.Tensor:
        """Class means μ_k in true coordinates, (L, K, d)."""
        self._check_ready()
        return self.shift[:, None, :] + self.sums / self.count[None, :, None]

    def within(self) -> torch.Tensor:
        """Pooled within-class covariance (L, d, d): W = Σ_k (n_k/n) S_k = (G - Σ_k n_k m_k m_kᵀ)/n,
        S_k the biased covariance of class k, m_k the shifted class mean, G the shifted Gram."""
        self._check_ready()
        m = self.sums / self.count[None, :, None]
        W = self.gram - torch.einsum("k,lki,lkj->lij", self.count, m, m)
        W = W / self.n
        return 0.5 * (W + W.transpose(1, 2))

    def class_cov(self) -> torch.Tensor:
        """Biased per-class covariances S_k, (L, K, d, d); needs ``class_gram=True``."""
        self._check_ready()
        if self.class_gram is None:
            raise ClassifyError("per-class covariances need ClassStats(..., class_gram=True)")
        m = self.sums / self.count[None, :, None]
        S = self.class_gram / self.count[None, :, None, None] \
            - torch.einsum("lki,lkj->lkij", m, m)
        return 0.5 * (S + S.transpose(2, 3))

    def class_var(self) -> torch.Tensor:
        """Biased per-class feature variances, (L, K, d); needs ``class_gram=True``."""
        return torch.diagonal(self.class_cov(), dim1=2, dim2=3).clamp_min(0.0)


def class_stats(x, codes, n_classes: int, *, class_gram: bool = False) -> ClassStats:
    """ClassStats of in-memory arrays ``x`` (L, n, d) and ``codes`` (n,), in one update.

    Parameters
    ----------
    x : array (L, n, d), any float dtype.
    codes : int array (n,), class codes 0..n_classes-1.
    n_classes : number of classes K.
    class_gram : also keep per-class Grams (for ``shrinkage="auto"``).
    """
    x = np.asarray(x)
    return ClassStats(n_classes, x.shape[0], x.shape[2], class_gram=class_gram).update(x, codes)


class FourthMoments:
    """Second pass for ``shrinkage="auto"``: Σ_r ‖z_r‖⁴ per layer and class, z_r the row
    standardised within its class as scikit-learn's ``StandardScaler`` does (class mean, biased
    class std; near-constant features, var ≤ n·eps·var + (n·mean·eps)², keep scale 1).

    Feed it the same rows as the ClassStats it was built from (any chunking, any order).
    """

    def __init__(self, stats: ClassStats):
        if stats.class_gram is None:
            raise ClassifyError("shrinkage='auto' needs ClassStats(..., class_gram=True)")
        self.mean = stats.means()                                          # (L, K, d)
        var = stats.class_var()
        n = stats.count[None, :, None]
        eps = float(torch.finfo(_F64).eps)
        constant = var <= n * eps * var + (n * self.mean * eps) ** 2
        self.scale = torch.where(constant, torch.ones_like(var), var.sqrt())
        self.n_classes, self.n_layers, self.dim = stats.n_classes, stats.n_layers, stats.dim
        self.total = torch.zeros(stats.n_layers, stats.n_classes, dtype=_F64,
                                 device=self.mean.device)

    def update(self, x_chunk, codes) -> FourthMoments:
        """Add a chunk: ``x_chunk`` (L, r, d), ``codes`` (r,)."""
        x, c = _as_chunk(x_chunk, codes, self.n_layers, self.dim, self.n_classes)
        x, c = x.to(self.mean.device), c.to(self.mean.device)
        z = (x - self.mean[:, c, :]) / self.scale[:, c, :]
        q = (z * z).sum(-1)                                                 # (L, r)
        onehot = torch.nn.functional.one_hot(c, self.n_classes).to(_F64)
        self.total += (q * q) @ onehot
        return self


@dataclass
class LinearProbe:
    """Linear probes of L layers in scikit-learn's layout.

    coef: (L, K', d) and intercept: (L, K') float64, K' = 1 for two classes (the score of class
    1 against class 0) and K' = K otherwise; ``kind``: "mass_mean" or "lda"; ``shrinkage``: the
    LDA shrinkage (None for mass-mean; per layer and class (L, K) for "auto").
    """
    coef: np.ndarray
    intercept: np.ndarray
    n_classes: int
    kind: str
    shrinkage: object = None

    @classmethod
    def concat(cls, parts: list[LinearProbe]) -> LinearProbe:
        """One probe from the probes of consecutive chunks of layers (a per-layer shrinkage
        array is joined too)."""
        sh = parts[0].shrinkage
        if isinstance(sh, np.ndarray) and sh.ndim:
            sh = np.concatenate([p.shrinkage for p in parts])
        return replace(parts[0], coef=np.concatenate([p.coef for p in parts]),
                       intercept=np.concatenate([p.intercept for p in parts]), shrinkage=sh)

    def decision_function(self, x) -> np.ndarray:
        """Scores x·coefᵀ + intercept for x (L, n, d): (L, n) for two classes, else (L, n, K)."""
        x = np.asarray(x, dtype=np.float64)
        s = np.einsum("lnd,lkd->lnk", x, self.coef) + self.intercept[:, None, :]
        return s[..., 0] if self.n_classes == 2 else s

    def predict(self, x) -> np.ndarray:
        """Class codes (L, n): class 1 where the binary score is > 0, else the argmax score."""
        s = self.decision_function(x)
        return (s > 0).astype(np.int64) if self.n_classes == 2 else s.argmax(-1)

    def predict_proba(self, x) -> np.ndarray:
        """(L, n, K): expit of the binary score as [1-p, p], else the softmax of the scores (as
        scikit-learn's LDA). For mass-mean these are not calibrated probabilities."""
        s = self.decision_function(x)
        if self.n_classes == 2:
            e = np.exp(-np.abs(s))                       # stable expit, no overflow
            p = np.where(s >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
            return np.stack([1.0 - p, p], axis=-1)
        s = s - s.max(-1, keepdims=True)
        e = np.exp(s)
        return e / e.sum(-1, keepdims=True)


def _probe(full_coef: torch.Tensor, full_icpt: torch.Tensor, kind: str, shrinkage=None):
    """LinearProbe from per-class coef (L, K, d) and intercept (L, K); binary -> class 1 - 0."""
    K = full_coef.shape[1]
    if K == 2:
        full_coef = (full_coef[:, 1] - full_coef[:, 0])[:, None, :]
        full_icpt = (full_icpt[:, 1] - full_icpt[:, 0])[:, None]
    return LinearProbe(full_coef.cpu().numpy(), full_icpt.cpu().numpy(), K, kind, shrinkage)


def mass_mean(stats: ClassStats) -> LinearProbe:
    """Difference-of-means ("mass-mean") probe per layer, from the class means μ_k alone.

    Two classes: θ = μ_1 - μ_0, s(x) = θ·x - θ·(μ_0 + μ_1)/2, class 1 where s > 0 (the point
    halfway between the means is on the boundary). K ≥ 3: nearest class mean, score_k(x) =
    μ_k·x - ½‖μ_k‖², argmax (the binary rule is score_1 - score_0 of this). No covariance is
    used (LDA with shrinkage 1 differs by the scalar variance and the log priors).

    Parameters
    ----------
    stats : ClassStats with every class present.

    Returns
    -------
    LinearProbe with ``kind="mass_mean"``.
    """
    mu = stats.means()
    if stats.n_classes == 2:
        theta = mu[:, 1] - mu[:, 0]
        b = -0.5 * (theta * (mu[:, 0] + mu[:, 1])).sum(-1)
        return LinearProbe(theta[:, None, :].cpu().numpy(), b[:, None].cpu().numpy(), 2,
                           "mass_mean")
    return _probe(mu, -0.5 * (mu * mu).sum(-1), "mass_mean")


def _lda_from_coef(stats: ClassStats, coef: torch.Tensor, shrinkage) -> LinearProbe:
    """coef_k = Σ⁻¹μ_k (L, K, d) -> LinearProbe with intercept_k = -½ μ_k·coef_k + log p_k."""
    mu = stats.means()
    icpt = -0.5 * (mu * coef).sum(-1) + torch.log(stats.priors())[None, :]
    return _probe(coef, icpt, "lda", shrinkage)


def lda_grid(stats: ClassStats, shrinkages) -> list[LinearProbe]:
    """Shrinkage LDA per layer for several shrinkages from one eigendecomposition per layer.

    Σ_s = (1-s)·W + s·(tr W / d)·I with W the pooled within-class covariance
    (:meth:`ClassStats.within`), which is scikit-learn's ``_class_cov`` for a float shrinkage
    (Σ_k p_k shrunk(S_k) is linear in S_k). With W = V diag(λ) Vᵀ: coef_k = V diag(1/((1-s)λ +
    s·tr W/d)) Vᵀ μ_k, eigenvalues below d·eps·max treated as 0 (the minimum-norm solution, as
    ``lstsq``; only s = 0 with a singular W reaches it); intercept_k = -½ μ_k·coef_k + log p_k,
    two classes -> class 1 minus class 0. For s = 0 and a singular W (d > n - K) scikit-learn's
    ``lstsq`` (cutoff eps·max) keeps directions of rounding noise and its coefficients are not
    reproducible; ours are the minimum-norm solution. Use s > 0 there.

    Parameters
    ----------
    stats : ClassStats with every class present.
    shrinkages : floats in [0, 1].

    Returns
    -------
    One LinearProbe per shrinkage, in the order given.
    """
    s_all = [float(s) for s in np.atleast_1d(np.asarray(shrinkages, dtype=np.float64))]
    if not s_all or any(not 0.0 <= s <= 1.0 for s in s_all):
        raise ClassifyError(f"shrinkage values must lie in [0, 1], got {s_all}")
    W = stats.within()
    mu = stats.means()
    d = W.shape[-1]
    trace_mean = torch.diagonal(W, dim1=1, dim2=2).sum(-1) / d                # (L,)
    lam, V = torch.linalg.eigh(W)
    lam = lam.clamp_min(0.0)
    VtM = torch.einsum("lde,lkd->lek", V, mu)                                  # (L, d, K)
    eps = float(torch.finfo(_F64).eps)
    out = []
    for s in s_all:
        den = (1.0 - s) * lam + s * trace_mean[:, None]                      # (L, d)
        keep = den > d * eps * den.amax(-1, keepdim=True).clamp_min(np.finfo(float).tiny)
        inv = torch.where(keep, 1.0 / torch.where(keep, den, torch.ones_like(den)),
                          torch.zeros_like(den))
        coef = torch.einsum("lde,lek->lkd", V, inv[:, :, None] * VtM)
        out.append(_lda_from_coef(stats, coef, s))
    return out


def _ledoit_wolf(stats: ClassStats, fourth: FourthMoments) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's per-class covariance for shrinkage="auto" (Ledoit-Wolf on the standardised
    class rows, scaled back): ((L, d, d) Σ_k p_k cov_k, (L, K) the coefficients λ_k)."""
    S = stats.class_cov()                                                   # (L, K, d, d)
    sc = fourth.scale
    R = S / (sc[..., :, None] * sc[..., None, :])
    n = stats.count[None, :]
    p = stats.dim
    trace = torch.diagonal(R, dim1=2, dim2=3).sum(-1)                       # (L, K)
    mu = trace / p
    delta_ = (R * R).sum((-1, -2))
    beta = (fourth.total / n - delta_) / (p * n)
    delta = (delta_ - 2.0 * mu * trace + p * mu * mu) / p
    beta = torch.minimum(beta, delta)
    lam = torch.where(beta == 0, torch.zeros_like(beta), beta / torch.where(delta == 0,
                                                                            1.0, delta))
    if p == 1:
        lam = torch.zeros_like(lam)
    diag = torch.diag_embed(sc * sc) * (lam * mu)[..., None, None]
    cov = (1.0 - lam)[..., None, None] * S + diag
    return torch.einsum("k,lkij->lij", stats.priors(), cov), lam


def lda(stats: ClassStats, shrinkage=0.0, fourth: FourthMoments | None = None) -> LinearProbe:
    """Shrinkage LDA per layer, equal to scikit-learn ``LinearDiscriminantAnalysis(
    solver="lsqr", shrinkage=shrinkage)`` with priors = class frequencies.

    Parameters
    ----------
    stats : ClassStats with every class present (``class_gram=True`` for "auto").
    shrinkage : float in [0, 1] (None = 0): see :func:`lda_grid`. "auto": each class covariance
        S_k is replaced by (1-λ_k)·S_k + λ_k·m_k·diag(scale_k²), λ_k the Ledoit-Wolf coefficient
        of the class rows standardised by scale_k (biased std, 1 for constant features), m_k the
        mean standardised variance; Σ = Σ_k p_k·that; coef_k solves Σ coef_k = μ_k.
    fourth : for "auto", a :class:`FourthMoments` fed the same rows (the second pass).

    Returns
    -------
    LinearProbe with ``kind="lda"``; for "auto" ``shrinkage`` holds λ (L, K) as numpy.
    """
    if shrinkage is None:
        shrinkage = 0.0
    if isinstance(shrinkage, str):
        if shrinkage != "auto":
            raise ClassifyError(f"shrinkage must be a float in [0, 1] or 'auto', got "
                                f"{shrinkage!r}")
        if fourth is None or stats.class_gram is None:
            raise ClassifyError("shrinkage='auto' needs ClassStats(..., class_gram=True) and a "
                                "FourthMoments pass over the same rows")
        cov, lam = _ledoit_wolf(stats, fourth)
        mu = stats.means()
        coef = torch.linalg.solve(cov, mu.transpose(1, 2)).transpose(1, 2)
        return _lda_from_coef(stats, coef, lam.cpu().numpy())
    return lda_grid(stats, [shrinkage])[0]
