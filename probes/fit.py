"""fit_all_layers: exact ridge-CV probes for every layer of an activation store.

Per batch of layers (all layers at once when their statistics fit ``memory_bytes``):

1. statistics pass: every chunk of rows goes through ``probes.kernels.gram_update`` (C++/OpenMP,
   CUDA, Triton or the torch reference), which accumulates Σx, XᵀX, Xᵀy per fold;
2. one batched float64 eigendecomposition of the centred train XᵀX of every layer;
3. projection pass: Z = (X - x̄)V per chunk gives every alpha's LOO residuals and every row's
   predictions (k-fold needs no residual pass: fold scores come from the per-fold statistics, the
   pass only predicts with the chosen alpha).

When a layer has fewer train rows than dimensions (n < d), the dual n×n form is used instead: the
layer's rows are read into memory (n·d ≤ d·d numbers) and K = (X-x̄)(X-x̄)ᵀ is eigendecomposed.
Peak memory: one layer batch's statistics (+ eigenvectors) plus one chunk plus (n, alphas, k)
predictions per layer.

Targets are z-scored with the train mean and population std (the paper), the probe is fitted in
z units, and predictions/coefficients are mapped back before scoring.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from actstore.io import write_atomic, write_json
from actstore.store import open_store
from actstore.store.format import as_compute, store_identity
from probes import metrics, report
from probes.errors import FitError
from probes.inputs import parse_split, select_layers, target_matrix
from probes.kernels import gram_update, preferred_chunk_rows, resolve
from probes.stats import GramStats, choose_shift
from probes.ridge import (DEFAULT_ALPHAS, LooAccumulator, dual_coef, dual_kfold_scores,
                          dual_loo, kfold_assignment, kfold_scores_primal, parse_alphas,
                          primal_factor, select_alpha)

__all__ = ["fit_all_layers", "FitError", "write_results", "load_results", "store_identity"]

RESULTS_FILE = "results.json"
ARRAYS_FILE = "probes.npz"
PREDICTIONS_FILE = "predictions_best_layer.csv"


# ----------------------------------------------------------------------------- reading

def _chunks(store, rows, layers, n, device, start=0):
    """(row_start, block) of the store's rows [0, n) for these layers: read ahead on CPU threads
    (decompression and disk overlap the compute) and, for a CUDA device, sent through pinned
    double buffers on a side stream (probes.stream), so the copy of chunk i+1 overlaps the
    kernels of chunk i. Blocks arrive as numpy (CPU) or device tensors (CUDA); a block is valid
    until the iteration after next."""
    from probes.stream import read_ahead, stream_to_device

    source = store.iter_chunks(rows=rows, layers=layers, start=start, stop=n)
    if device.type == "cuda" and store.dtype != "bfloat16":
        return stream_to_device(source, device)
    return read_ahead(source)


def _check_finite_layer(store, layer: int, n: int, shard=None):
    """Find the first non-finite activation of one layer (only called once one was detected;
    distributed: on every rank at once, see RowShard.alike)."""
    x = as_compute(store.layer(layer)[:n], store.dtype).float().numpy()
    bad = np.argwhere(~np.isfinite(x))
    row, col = (int(bad[0][0]), int(bad[0][1])) if len(bad) else (-1, -1)
    err = FitError(f"{store.path}: layer {layer} has NaN or inf activations, first at row {row}, "
                   f"dim {col}")
    raise err if shard is None else shard.alike(err)


# ----------------------------------------------------------------------------- main entry

def fit_all_layers(store, targets=None, alphas=DEFAULT_ALPHAS, cv="loo", alpha_per_target=False,
                   split="is_test", backend="auto", out=None, layers=None,
                   precision="float64", memory_bytes=2 << 30, chunk_rows=None,
                   progress=False, seed=0, device=None, shard=None) -> dict:
    """Fit a ridge probe with CV-chosen alpha on every layer of ``store``; score and report it.

    store: path or ActivationStore. targets: names (default: the store's). alphas: grid (see
    :func:`probes.ridge.parse_alphas`). cv: "loo" (exact efficient leave-one-out, sklearn RidgeCV)
    or int K (K seeded shuffled folds of the train rows, R² scoring). alpha_per_target: one alpha
    per target instead of one per layer. split: see :func:`parse_split`. backend: statistics
    backend (auto|cpu|torch|cuda|triton). precision: "float64" (exact; statistics and projections
    in float64) or "float32" (float32 statistics blocks and projections, ~1e-6 relative).
    device: where the solve runs (default: cuda for the cuda/triton backends and for auto when a
    GPU is present, else cpu; the torch backend runs on either). store may also be any object with the ActivationStore reading API.
    memory_bytes: budget for one batch of layers (statistics, eigenvectors, per-alpha
    predictions); layers are processed in as many batches as needed, at least one layer each.
    layers: hidden-state indices to fit (default all the store holds). out: directory for results.json, probes.npz,
    the best layer's predictions and PNG plots.

    shard: a :class:`probes.distributed.RowShard` (torchrun; use
    :func:`probes.distributed.fit_all_layers_distributed`): this rank's statistics and
    projections cover its own rows, merged across ranks; ranks other than 0 return None.

    Returns the results dict (also written to out/results.json); ``result["arrays"]`` holds numpy
    arrays (coef (L, d, k), intercept (L, k), alpha (L, k), predictions (L, n, k)) that are saved to
    probes.npz instead of the JSON.
    """
    import torch

    t0 = time.perf_counter()
    if isinstance(store, (str, os.PathLike)):
        store = open_store(store)
    if precision not in ("float64", "float32"):
        raise FitError(f"precision must be 'float64' or 'float32', got {precision!r}")
    alphas = parse_alphas(alphas)
    if cv in (None, "loo", "LOO"):
        cv = "loo"
    else:
        try:
            cv = int(cv)
        except (TypeError, ValueError):
            raise FitError(f"cv must be 'loo' or an integer K >= 2, got {cv!r}") from None
        if cv < 2:
            raise FitError(f"cv must be 'loo' or an integer K >= 2, got {cv}")

    names, Y = target_matrix(store, targets)
    n = len(Y)
    is_test = parse_split(split, store, n)
    train = ~is_test
    n_train, n_test = int(train.sum()), int(is_test.sum())
    if n_train < 3:
        raise FitError(f"split {split!r} leaves {n_train} training rows; need at least 3")
    if n_test == 0:
        raise FitError(f"split {split!r} gives an empty test split (no test rows among {n}); "
                       "use --split random:0.2:0 or a group split")
    if n_test < 2:
        raise FitError(f"split {split!r} gives {n_test} test row among {n}; the test metrics "
                       "need at least 2 (use a larger test fraction)")
    mu = Y[train].mean(0)
    sd = Y[train].std(0)
    const = [names[i] for i in np.nonzero(sd == 0)[0]]
    if const:
        raise FitError(f"target(s) {const} are constant on the training rows")
    Yz = (Y - mu) / sd

    layer_ids = select_layers(store, layers)
    d, k, A = store.d_model, len(names), len(alphas)
    if cv == "loo":
        fold_all = np.where(train, 0, -1).astype(np.int32)
        F = 1
    else:
        F = cv
        fold_all = np.full(n, -1, dtype=np.int32)
        fold_all[train] = kfold_assignment(n_train, cv, shuffle=True, seed=seed)
    form = "dual" if n_train < d else "primal"
    if shard is not None:
        shard.agree()            # every rank got here without an error (else all raise)
    if shard is not None and form == "dual":
        if not shard.is_main:
            return None          # n < d rows fit in memory: rank 0 reads them all (dual form)
        shard = None
    be, device = resolve(backend, device)

    L = len(layer_ids)
    coef = np.zeros((L, d, k))
    intercept = np.zeros((L, k))
    alpha_idx = np.zeros((L, k), dtype=np.int64)
    cv_scores = np.zeros((L, A, k))
    best_scores = []
    preds = np.zeros((L, n, k))
    timings = {"stats": 0.0, "solve": 0.0, "projection": 0.0, "metrics": 0.0}

    bar = None
    if progress:
        from tqdm import tqdm
        passes = 1 if form == "dual" else 2
        bar = tqdm(total=L * passes * n, unit="row", unit_scale=True, desc="fastprobe",
                   dynamic_ncols=True, leave=False)

    def tick(rows):
        if bar is not None:
            bar.update(rows)

    if form == "primal":
        per_layer = 8 * (F * d * d + 3 * d * d + n * A * k + F * d * k)
        batch = max(1, int(memory_bytes // max(per_layer, 1)))
        for b0 in range(0, L, batch):
            bl = layer_ids[b0:b0 + batch]
            sl = slice(b0, b0 + len(bl))
            res = _primal_batch(store, bl, n, Yz, fold_all, train, alphas, cv, alpha_per_target,
                                be, precision, device, chunk_rows, timings, tick, shard)
            coef[sl], intercept[sl], alpha_idx[sl], cv_scores[sl], preds[sl], bs = res
            best_scores.extend(bs)
    else:
        for j, layer in enumerate(layer_ids):
            ts = time.perf_counter()
            X = as_compute(store.layer(layer)[:n], store.dtype).to(
                torch.float32 if precision == "float32" else torch.float64)
            if not bool(torch.isfinite(X).all()):
                _check_finite_layer(store, layer, n)
            tick(n)
            timings["stats"] += time.perf_counter() - ts
            ts = time.perf_counter()
            X = X.to(device)
            Xtr, Ytr = X[torch.as_tensor(train, device=device)], Yz[train]
            if cv == "loo":
                scores, _, state = dual_loo(Xtr, Ytr, alphas, precision)
            else:
                scores = dual_kfold_scores(Xtr, Ytr, fold_all[train], alphas, precision)
                _, _, state = dual_loo(Xtr, Ytr, alphas[:1], precision)
            idx, best = select_alpha(scores[None], alpha_per_target)
            w, b = dual_coef(state, alphas[idx[0]])
            X = X.to(torch.float64)
            coef[j] = w.cpu().numpy()
            intercept[j] = b.cpu().numpy()
            preds[j] = (X @ w + b).cpu().numpy()
            alpha_idx[j] = idx[0]
            cv_scores[j] = scores.cpu().numpy()
            best_scores.append(best[0])
            timings["solve"] += time.perf_counter() - ts
    if bar is not None:
        bar.close()
    if shard is not None and not shard.is_main:
        return None              # rank 0 scores and writes the merged results

    # back to target units
    coef *= sd[None, None, :]
    intercept = intercept * sd[None, :] + mu[None, :]
    preds = preds * sd[None, None, :] + mu[None, None, :]

    ts = time.perf_counter()
    per_layer = []
    for j, layer in enumerate(layer_ids):
        a = alphas[alpha_idx[j]]
        entry = {
            "layer": int(layer),
            "position": list(store.layers).index(layer),
            "alpha": float(a[0]) if not alpha_per_target else {nm: float(v) for nm, v in zip(names, a)},
            "cv_score": (float(np.ravel(best_scores[j])[0]) if not alpha_per_target
                         else {nm: float(v) for nm, v in zip(names, np.ravel(best_scores[j]))}),
            "alpha_at_grid_edge": bool(np.any((alpha_idx[j] == 0) | (alpha_idx[j] == A - 1))),
            "train": metrics.evaluate(Y[train], preds[j][train], names),
            "test": metrics.evaluate(Y[is_test], preds[j][is_test], names),
        }
        per_layer.append(entry)
    timings["metrics"] = time.perf_counter() - ts
    best = max(per_layer, key=lambda e: (e["test"]["r2"], -e["position"]))

    result = {
        "store": str(store.path),
        "model": (store.meta or {}).get("model") if isinstance(store.meta, dict) else None,
        "store_identity": store_identity(store),
        "n_rows": n,
        "d_model": d,
        "targets": names,
        "split": split,
        "n_train": n_train,
        "n_test": n_test,
        "cv": cv,
        "alpha_per_target": bool(alpha_per_target),
        "alphas": alphas.tolist(),
        "target_mean": mu.tolist(),
        "target_std": sd.tolist(),
        "backend": be,
        "precision": precision,
        "stats_precision": precision if be in ("cpu", "torch") else "float32",
        "form": form,
        "best_layer": best["layer"],
        "best_position": best["position"],
        "seconds": {"total": time.perf_counter() - t0, **timings},
        "layers": per_layer,
        "arrays": {"coef": coef, "intercept": intercept, "alpha": alphas[alpha_idx],
                   "cv_scores": cv_scores, "predictions": preds, "is_test": is_test,
                   "layers": np.array(layer_ids)},
    }
    if out is not None:
        write_results(result, out, store=store)
    return result


def _primal_batch(store, layers, n, Yz, fold_all, train, alphas, cv, alpha_per_target, be,
                  precision, device, chunk_rows, timings, tick, shard=None):
    """Statistics pass + solve + projection pass for one batch of layers."""
    import torch

    B, d, k = len(layers), store.d_model, Yz.shape[1]
    F = 1 if cv == "loo" else cv
    if chunk_rows is None:
        chunk_rows = preferred_chunk_rows(d, B, F, max_bytes=64 << 20)
    # GPU kernels sum each chunk in float32 (into float64 totals) and refuse "float64".
    stats_precision = precision if be in ("cpu", "torch") else None
    ts = time.perf_counter()
    stats = None
    lo, hi = (0, n) if shard is None else shard.rows(n)   # distributed: this rank's rows
    for start, block in _chunks(store, chunk_rows, layers, hi, device, lo):
        r = block.shape[1]
        X = as_compute(block, store.dtype)          # bfloat16 arrives as float32
        if device.type == "cuda":
            X = X.to(device)
        fold = fold_all[start:start + r]
        if stats is None:
            try:
                shift = choose_shift(X, fold)
            except ValueError:
                shift = None               # non-finite first chunk: found below, per layer
            stats = GramStats.zeros(B, d, k, F, shift=shift, device=device)
        gram_update(stats, X, Yz[start:start + r], fold, backend=be, precision=stats_precision)
        tick(r)
    if shard is not None:
        stats = shard.reduce_stats(stats, B, d, k, F, device)   # all-reduce over the ranks
    timings["stats"] += time.perf_counter() - ts

    ts = time.perf_counter()
    finite = torch.isfinite(stats.xtx.reshape(B, -1)).all(1) & torch.isfinite(stats.sx.reshape(B, -1)).all(1)
    if not bool(finite.all()):
        _check_finite_layer(store, layers[int((~finite).nonzero()[0])], n, shard)
    tot = stats.totals()
    fac = primal_factor(float(tot.n[0]), tot.sx[:, 0], tot.xtx[:, 0], tot.sy[0], tot.xty[:, 0],
                        stats.shift, precision=precision)
    if cv != "loo":
        scores = kfold_scores_primal(stats.n, stats.sx, stats.xtx, stats.sy, stats.yty, stats.xty,
                                     alphas, precision=precision)
        idx, best = select_alpha(scores, alpha_per_target)
        W = fac.coef(alphas[idx])
        b = fac.intercept(W)
    del stats, tot
    timings["solve"] += time.perf_counter() - ts

    ts = time.perf_counter()
    preds = np.zeros((B, n, k))
    if cv == "loo":
        acc = LooAccumulator(fac, alphas, n, keep_predictions=True, precision=precision)
        for start, block in _chunks(store, chunk_rows, layers, hi, device, lo):
            r = block.shape[1]
            acc.update(start, as_compute(block, store.dtype), Yz[start:start + r],
                       train[start:start + r])
            tick(r)
        if shard is not None:
            shard.reduce_loo(acc)    # LOO residual sums everywhere, predictions on rank 0
        scores = acc.scores()
        idx, best = select_alpha(scores, alpha_per_target)
        sel = torch.as_tensor(idx, device=acc.pred.device)                        # (B, k)
        P = acc.pred                                                                # (B, n, A, k)
        preds = torch.gather(P, 2, sel[:, None, None, :].expand(B, n, 1, k))[:, :, 0, :].cpu().numpy()
        del acc, P
        W = fac.coef(alphas[idx])
        b = fac.intercept(W)
    else:
        # centre first, (X - x̄)W + ȳ, as the LOO pass does: X W + b cancels away float32 digits
        # when the activations have a large mean
        Wd = W.to(torch.float32 if precision == "float32" else torch.float64)
        md = fac.mean.to(Wd.dtype)[:, None, :]
        for start, block in _chunks(store, chunk_rows, layers, hi, device, lo):
            r = block.shape[1]
            X = as_compute(block, store.dtype).to(device=device, dtype=Wd.dtype)
            preds[:, start:start + r] = (torch.matmul(X - md, Wd).to(torch.float64)
                                         + fac.ybar).cpu().numpy()
            tick(r)
        if shard is not None:
            preds = shard.reduce_predictions(preds, device)   # rank 0 gets every row
    timings["projection"] += time.perf_counter() - ts
    # Test rows never enter the statistics; a non-finite one shows up in its prediction.
    bad = ~np.isfinite(preds).reshape(B, -1).all(1)
    if shard is not None:
        bad = shard.any_bad(bad)   # rank 0 holds every row: every rank raises, none waits
    if bad.any():
        _check_finite_layer(store, layers[int(np.nonzero(bad)[0][0])], n, shard)
    return (W.cpu().numpy(), b.cpu().numpy(), idx, scores.cpu().numpy(), preds,
            [best[i] for i in range(B)])


# ----------------------------------------------------------------------------- output

def _jsonable(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "arrays"}


def write_results(result: dict, out, store=None) -> Path:
    """Write results.json, probes.npz, the best layer's predictions CSV and the PNG plots.

    results.json records ``store_identity`` (:func:`store_identity`; taken from ``store`` when
    the result lacks it)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if store is not None and "store_identity" not in result:
        result = {**result, "store_identity": store_identity(store)}
    arr = result.get("arrays")
    if arr is not None:
        write_atomic(out / ARRAYS_FILE, lambda f: np.savez_compressed(
            f, coef=arr["coef"].astype(np.float32), intercept=arr["intercept"],
            alpha=arr["alpha"], layers=arr["layers"], cv_scores=arr["cv_scores"]))
        if store is not None:
            df = _predictions_table(result, store)
            write_atomic(out / PREDICTIONS_FILE, df.to_csv(index=False))
            report.make_plots(result, df, out, group_columns=list(store.group_columns or ()))
    # last, so that a results.json always sits beside the arrays and plots it describes
    write_json(out / RESULTS_FILE, _jsonable(result), indent=1)
    return out


def _predictions_table(result: dict, store) -> pd.DataFrame:
    """True and predicted targets of every row at the best layer, with the group columns."""
    arr = result["arrays"]
    j = [e["position"] for e in result["layers"]].index(result["best_position"])
    ent = store.entities.iloc[:result["n_rows"]].reset_index(drop=True)
    df = pd.DataFrame({"name": ent["name"] if "name" in ent.columns else ent.index})
    for c in store.group_columns or ():
        if c in ent.columns:
            df[c] = ent[c]
    df["is_test"] = arr["is_test"]
    for i, t in enumerate(result["targets"]):
        df[t] = ent[t].to_numpy()
        df[f"pred_{t}"] = arr["predictions"][j][:, i]
    return df


def load_results(path) -> dict:
    """results.json from a fit output directory (or the file itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / RESULTS_FILE
    if not p.exists():
        raise FitError(f"{p}: no such results file (run `fastprobe fit ... --out DIR` first)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise FitError(f"{p}: not a valid results.json ({exc})") from None
