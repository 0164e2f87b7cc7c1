"""PCA-k probes: ridge probes on the top-k principal components of one layer (PCA on the train
rows) against the full-width probe."""
from __future__ import annotations

import time
from functools import partial

import numpy as np

from probes.errors import ExperimentError
from probes.experiments.base import Experiment, RunContext, StepPlan
from probes.experiments.common import (
    add_store_arguments,
    as_store,
    csv_list,
    layer_fields,
    layer_x,
    num,
    probe_at,
    pyplot,
    ridge,
    summary,
)
from probes.inputs import parse_split, target_matrix
from probes.report import md_num, md_table, text_table

__all__ = ["pca_experiment", "DEFAULT_KS", "EXPERIMENT"]

DEFAULT_KS = (2, 5, 10, 20, 50, 100)


def _check_ks(ks) -> list[int]:
    try:
        ks = sorted({int(k) for k in ks})
    except (TypeError, ValueError):
        raise ExperimentError(f"ks must be integers, got {ks!r}") from None
    if not ks or ks[0] < 1:
        raise ExperimentError(f"ks must be a non-empty list of integers >= 1, got {ks}")
    return ks


def _pca_rows(X, Y, tr, is_test, use, names, alphas, backend) -> list[dict]:
    """One ridge probe per k in ``use`` on the top-k components of the train rows ``tr``."""
    n = Y.shape[0]
    mean = X[tr].mean(0)
    _, S, Vt = np.linalg.svd(X[tr] - mean, full_matrices=False)
    var = S ** 2
    rows = []
    for k in use:
        Z = (X - mean) @ Vt[:k].T
        probe = ridge(alphas, backend).fit(Z[tr], Y[tr])
        P = probe.predict(Z).reshape(n, -1)
        rows.append({"k": k, "alpha": float(probe.alpha_),
                     "explained_variance": (float(var[:k].sum() / var.sum())
                                            if var.sum() > 0 else 0.0),
                     "train_r2": summary(Y[tr], P[tr], names)["r2"],
                     "test": summary(Y[is_test], P[is_test], names)})
    return rows


def pca_experiment(store, layer=None, ks=DEFAULT_KS, targets=None, alphas=None,
                   backend="auto", split="is_test") -> dict:
    """Ridge probes on the top-k principal components of one layer vs the full-width probe.

    PCA on the TRAIN rows of ``split`` only: x̄ = train mean, (X_train - x̄) = U S Vᵀ (SVD,
    float64), components = the first k columns of V (largest singular values first). For each k
    with k <= min(d, n_train - 1) (larger ones are listed in ``skipped_ks``): features
    Z = (X - x̄) V[:, :k] for every row, ridge with LOO alpha on the train rows (as fit), scored
    on the test rows (r2, spearman, proximity error) and train R². ``explained_variance`` is
    Σ_{i<=k} s_i² / Σ s_i². ``full``: the ridge probe on all d dimensions (``fastprobe fit``'s).

    Parameters
    ----------
    store : ActivationStore or path
        The store.
    layer : int, optional
        Hidden-state index (default: the best LOO layer of all layers).
    ks : sequence of int
        Numbers of components.
    targets : str or list of str, optional
        Target columns (default: the store's own).
    alphas : str or sequence of float, optional
        Ridge alpha grid (default: :data:`probes.ridge.DEFAULT_ALPHAS`).
    backend : str
        Statistics backend of the fits.
    split : str
        Train/test split spec (:func:`probes.inputs.parse_split`).

    Returns
    -------
    dict
        ``experiment`` "pca", ``pca`` (one row per k used), ``full``, ``ks``, ``skipped_ks``;
        every field in docs/experiments.md.

    Raises
    ------
    ExperimentError
        ``ks`` not integers >= 1, or every k above min(d, n_train - 1).
    """
    t0 = time.perf_counter()
    store = as_store(store)
    names, Y = target_matrix(store, targets)
    n = Y.shape[0]
    ks = _check_ks(ks)
    res, j = probe_at(store, names, alphas, split, backend, layer)
    chosen_layer = res["layers"][j]["layer"]
    is_test = parse_split(split, store, n)
    tr = ~is_test
    X = layer_x(store, chosen_layer)
    d, n_train = X.shape[1], int(tr.sum())
    cap = min(d, n_train - 1)
    use = [k for k in ks if k <= cap]
    if not use:
        raise ExperimentError(f"every k in {ks} exceeds min(d={d}, n_train-1={n_train - 1})")
    e = res["layers"][j]
    return {
        "experiment": "pca", "name": "pca",
        "store": str(store.path), "targets": names, "split": split, "n_rows": n,
        "n_train": n_train, "n_test": int(is_test.sum()), "d_model": d,
        **layer_fields(store, chosen_layer, layer),
        "ks": use, "skipped_ks": [k for k in ks if k > cap],
        "pca": _pca_rows(X, Y, tr, is_test, use, names, alphas, backend),
        "full": {"k": d, "alpha": e["alpha"], "train_r2": e["train"]["r2"],
                 "test": {m: e["test"][m] for m in ("n", "r2", "r2_per_target", "spearman",
                                                     "pearson", "proximity_error")}},
        "seconds": time.perf_counter() - t0,
    }


# ----------------------------------------------------------------------------- outputs

def text(result: dict) -> list[str]:
    """Per k: explained variance, alpha, train and test metrics; then the full width."""
    rows = [[str(r["k"]), num(r["explained_variance"]), num(r["alpha"], ".3g"),
             num(r["train_r2"]), num(r["test"]["r2"]), num(r["test"]["spearman"]),
             num(r["test"]["proximity_error"])] for r in result["pca"]]
    f = result["full"]
    rows.append([f"full {f['k']}", "1.000",
                 num(f["alpha"], ".3g") if not isinstance(f["alpha"], dict) else "-",
                 num(f["train_r2"]), num(f["test"]["r2"]), num(f["test"]["spearman"]),
                 num(f["test"]["proximity_error"])])
    out = [f"PCA probes  targets {','.join(result['targets'])}  layer {result['layer']} "
           f"({result['layer_choice']})  d={result['d_model']}  train {result['n_train']} / "
           f"test {result['n_test']}"]
    out += text_table(["k", "expl var", "alpha", "train R2", "test R2", "spearman", "prox err"],
                      rows)
    if result["skipped_ks"]:
        out.append(f"skipped k > min(d, n_train - 1): {result['skipped_ks']}")
    return out


def plot(result: dict):
    """Test R² against k (log axis), the full-width probe as a line."""
    fig, ax = pyplot().subplots(figsize=(6.5, 4.5))
    rows = result["pca"]
    ax.plot([r["k"] for r in rows], [r["test"]["r2"] for r in rows], "o-", label="top-k PCs")
    ax.axhline(result["full"]["test"]["r2"], color="k", ls="--",
               label=f"full width (d={result['d_model']})")
    ax.set_xscale("log")
    ax.set_xlabel("principal components k")
    ax.set_ylabel(f"test R² ({', '.join(result['targets'])})")
    ax.set_title(f"probes on top-k principal components, layer {result['layer']}")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def markdown(res: dict) -> list[str]:
    """Per k and at full width: explained variance and test metrics."""
    f = res["full"]
    rows = [[r["k"], md_num(r["explained_variance"]), md_num(r["test"]["r2"]),
             md_num(r["test"]["spearman"]), md_num(r["test"]["proximity_error"])]
            for r in res["pca"]]
    rows.append([f"full ({f['k']})", "1.000", md_num(f["test"]["r2"]),
                 md_num(f["test"]["spearman"]), md_num(f["test"]["proximity_error"])])
    return [f"Layer {res['layer']}, PCA on the train rows:", ""] + md_table(
        ["k", "explained variance", "test R²", "Spearman", "proximity error"], rows)


# ----------------------------------------------------------------------------- CLI and pipeline

EPILOG = """\
examples:
  fastprobe experiment pca w.zarr --out exp
  fastprobe experiment pca w.zarr --layer -1 --ks 1,2,4,8,16,32 --out exp
"""


def add_arguments(p) -> None:
    add_store_arguments(p)
    p.add_argument("--ks", default=",".join(map(str, DEFAULT_KS)), metavar="K,...",
                   help="numbers of components (capped at d and n_train-1; default "
                        "%(default)s)")


def from_args(args, common: dict) -> dict:
    return pca_experiment(args.store, layer=args.layer, ks=csv_list(args.ks, int, "--ks"),
                          **common)


def plan(ctx: RunContext) -> StepPlan:
    """At the main fit's best layer."""
    return StepPlan({"layer": ctx.layer},
                    partial(pca_experiment, ctx.store, layer=ctx.layer, backend=ctx.backend))


EXPERIMENT = Experiment(
    key="pca", kind="pca", title="PCA-k probes",
    help="probes on the top-k principal components vs the full width", epilog=EPILOG,
    compute=pca_experiment, add_arguments=add_arguments, from_args=from_args, plan=plan,
    text=text, plot=plot, markdown=markdown)
