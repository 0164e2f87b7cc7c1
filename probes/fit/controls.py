"""The shuffled-target control of a ridge fit (Hewitt & Liang 2019, "Designing and Interpreting
Probes with Control Tasks"): the same all-layer fit, alpha chosen the same way, on the train
targets permuted among the train rows by a seeded permutation (one permutation for all targets,
so a place keeps its latitude/longitude pair). Its test R² against the true test targets is the
chance level of the procedure; selectivity = test R² − control test R², per layer.

It rides along with the real fit: the permuted targets are appended as k more target columns
(:func:`with_control`), so the statistics pass, the eigendecomposition and the projections are
shared and only the Xᵀy-sized parts grow (bench/RESULTS.md, "Shuffled-target control");
:func:`select_alpha` chooses the two groups' alphas apart, :func:`split` takes them apart again
and :func:`control_block` scores the control for results.json."""
from __future__ import annotations

import dataclasses

import numpy as np

from probes import metrics
from probes.errors import FitError
from probes.fit.config import classify_device
from probes.fit.problem import BatchFit, Problem, check_alpha_memory
from probes.ridge.solvers import select_alpha as _select_alpha

__all__ = ["METHOD", "permutation", "with_control", "select_alpha", "split", "control_block",
           "classify_control", "classify_block"]

METHOD = "shuffled targets (Hewitt & Liang 2019)"


def permutation(train: np.ndarray, seed: int) -> np.ndarray:
    """Row order (n,) that permutes the train rows among themselves and leaves the test rows in
    place: ``Y[perm]`` is the control's target matrix.

    Parameters
    ----------
    train : numpy.ndarray
        (n,) bool, the train rows.
    seed : int
        Seed of ``numpy.random.default_rng``.

    Returns
    -------
    numpy.ndarray
        (n,) int64 row indices.
    """
    rows = np.flatnonzero(train)
    perm = np.arange(len(train))
    perm[rows] = rows[np.random.default_rng(seed).permutation(len(rows))]
    return perm


def with_control(problem: Problem, config, d: int) -> Problem:
    """``problem`` with the control's permuted targets appended as k more z-scored columns
    (``config.control`` off: ``problem`` unchanged). The permutation keeps the train mean and
    std, so the z-scores of the real targets serve both.

    Parameters
    ----------
    problem : Problem
        The fit's problem (:func:`probes.fit.problem.prepare`).
    config : FitConfig
        Uses ``control``, ``control_seed`` and the memory budget.
    d : int
        The width of the array fitted (for the memory check).

    Returns
    -------
    Problem

    Raises
    ------
    FitError
        The per-alpha arrays with the control columns exceed the memory budget.
    """
    if not config.control:
        return problem
    perm = permutation(problem.train, config.control_seed)
    aug = dataclasses.replace(problem, Yz=np.hstack([problem.Yz, problem.Yz[perm]]),
                              control_seed=int(config.control_seed))
    try:
        check_alpha_memory(aug, d, config)
    except FitError as exc:
        raise FitError(f"{exc}; or fit without the shuffled-target control (--no-control), "
                       "which doubles the per-target arrays") from None
    return aug


def select_alpha(problem: Problem, scores, alpha_per_target: bool):
    """:func:`probes.ridge.solvers.select_alpha` with the control's columns chosen apart from
    the real targets' (a shared alpha is the argmax of each group's own mean score).

    Returns (index (B, k'), best): best is (B,) without a control, (B, 2) with one (real,
    control) for a shared alpha, (B, k') per target; k' counts the control columns.
    """
    k = len(problem.names)
    if problem.Yz.shape[1] == k:
        return _select_alpha(scores, alpha_per_target)
    i_real, b_real = _select_alpha(scores[..., :k], alpha_per_target)
    i_ctrl, b_ctrl = _select_alpha(scores[..., k:], alpha_per_target)
    best = (np.concatenate([b_real, b_ctrl], 1) if alpha_per_target
            else np.stack([b_real, b_ctrl], 1))
    return np.concatenate([i_real, i_ctrl], 1), best


def split(problem: Problem, fits: BatchFit, alpha_per_target: bool
          ) -> tuple[BatchFit, BatchFit | None]:
    """(the real targets' fits, the control's or None) of a fit of ``problem``."""
    k = len(problem.names)
    if problem.Yz.shape[1] == k:
        return fits, None

    def part(cols: slice, which: int) -> BatchFit:
        best = fits.best[:, cols] if alpha_per_target else fits.best[:, which]
        return BatchFit(coef=fits.coef[..., cols], intercept=fits.intercept[:, cols],
                        alpha_idx=fits.alpha_idx[:, cols], cv_scores=fits.cv_scores[..., cols],
                        best=best, predictions=fits.predictions[..., cols])

    return part(slice(0, k), 0), part(slice(k, None), 1)


def control_block(problem: Problem, control: BatchFit | None, entries: list[dict]) -> dict | None:
    """results.json ``control``: the method, the seed, and per layer the control's alpha, CV
    score, test R² (mean and per target, against the true test targets) and the selectivity
    (the probe's test R² minus the control's); None without a control.

    Parameters
    ----------
    problem : Problem
        The fit's problem (with its ``control_seed``).
    control : BatchFit or None
        The control's fits (:func:`split`), in z units.
    entries : list of dict
        The real probes' results.json ``layers``, in the same order.

    Returns
    -------
    dict or None
    """
    if control is None:
        return None
    names, test = problem.names, problem.is_test
    preds = control.predictions * problem.sd[None, None, :] + problem.mu[None, None, :]
    rows = []
    for j, entry in enumerate(entries):
        per = metrics.r2_per_target(problem.Y[test], preds[j][test])
        r2 = float(np.mean(per))
        a = problem.alphas[control.alpha_idx[j]]
        rows.append({"layer": entry["layer"], "alpha": float(a[0]) if np.all(a == a[0])
                     else {nm: float(v) for nm, v in zip(names, a)},
                     "test_r2": r2, "test_r2_per_target": dict(zip(names, map(float, per))),
                     "selectivity": _minus(entry["test"]["r2"], r2)})
    best = max(rows, key=lambda r: -np.inf if r["selectivity"] is None else r["selectivity"])
    return {"method": METHOD, "permuted": "train targets (one permutation for all targets; "
            "test targets true)", "seed": problem.control_seed,
            "best_selectivity_layer": best["layer"], "layers": rows}


def _minus(a, b) -> float | None:
    """a - b, None when either is missing or not finite (a constant test target)."""
    if a is None or b is None or not (np.isfinite(a) and np.isfinite(b)):
        return None
    return float(a - b)


def classify_control(logistic, x_tr, y_tr, x_te, y_te, n_classes: int,
                     config) -> np.ndarray | None:
    """The control of a classification fit: the logistic probe refitted at each layer's chosen
    C on the train labels permuted by a seeded permutation, scored on the true test labels
    (chance accuracy); :func:`classify_block` puts it in results.json.

    One batched solve per distinct C, no C search (the search on the real labels is the
    expensive part: the control costs about one refit, 1/(folds·Cs + 1) of the logistic fit).

    Parameters
    ----------
    logistic : probes.classify.select.LogisticCV
        The logistic probes of the real labels (their C per layer).
    x_tr, y_tr, x_te, y_te : numpy.ndarray
        (L, n, d) train and test activations, (n,) their class codes.
    n_classes : int
        K.
    config : FitConfig
        Uses ``control``, ``control_seed``, ``class_weight`` and ``precision``.

    Returns
    -------
    numpy.ndarray or None
        (L,) control test accuracy per layer; None with ``control`` off or no test rows.
    """
    from probes.classify.logistic import fit_logistic_path, predict_proba

    if not config.control or len(y_te) == 0:
        return None
    y_perm = y_tr[np.random.default_rng(config.control_seed).permutation(len(y_tr))]
    acc = np.empty(len(logistic.C))
    for c in np.unique(logistic.C):
        ls = np.flatnonzero(logistic.C == c)
        path = fit_logistic_path(x_tr[ls], y_perm, [float(c)], n_classes=n_classes,
                                 class_weight=config.class_weight, dtype=config.precision,
                                 device=classify_device(config))
        pred = predict_proba(x_te[ls], path.coef[:, 0], path.intercept[:, 0]).argmax(-1)
        acc[ls] = (pred == np.asarray(y_te)[None, :]).mean(1)
    return acc


def classify_block(acc: np.ndarray | None, doc: dict, seed: int) -> dict | None:
    """results.json ``control`` of a classification fit: per layer the control's test accuracy
    (:func:`classify_control`) and the selectivity, the logistic probe's test accuracy minus
    it; None without a control."""
    if acc is None:
        return None
    rows = [{"layer": e["layer"], "test_accuracy": float(a),
             "selectivity": _minus(e["logistic"]["test"].get("accuracy"), float(a))}
            for e, a in zip(doc["layers"], acc)]
    return {"method": METHOD, "permuted": "train labels (test labels true)",
            "probe": "logistic regression at each layer's chosen C", "seed": int(seed),
            "layers": rows}
