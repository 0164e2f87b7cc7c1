"""Exact ridge regression for many layers at once: ``alphas`` (the grid), ``solvers`` (primal and
dual forms, LOO and k-fold selection) and ``estimator`` (:class:`RidgeProbeCV`, scikit-learn's
API). Names resolve lazily: importing the grid loads neither torch nor scikit-learn."""
from __future__ import annotations

from actstore.lazy import lazy_exports
from probes.errors import RidgeError

__all__ = [
    "RidgeError", "parse_alphas", "DEFAULT_ALPHAS", "PrimalFactor", "primal_factor",
    "LooAccumulator", "select_alpha", "kfold_scores_primal", "dual_loo", "dual_kfold_scores",
    "dual_coef", "kfold_assignment", "WeightedFactor", "weighted_factor", "split_scores",
    "fit_arrays", "RidgeProbeCV",
]

_LAZY = {"parse_alphas": "alphas", "DEFAULT_ALPHAS": "alphas", "RidgeProbeCV": "estimator",
         **{name: "solvers" for name in ("PrimalFactor", "primal_factor", "LooAccumulator",
                                         "select_alpha", "kfold_scores_primal", "dual_loo",
                                         "dual_kfold_scores", "dual_coef", "kfold_assignment",
                                         "WeightedFactor", "weighted_factor", "split_scores",
                                         "fit_arrays")}}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
