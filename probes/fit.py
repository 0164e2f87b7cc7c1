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

from probes.ridge import (DEFAULT_ALPHAS, LooAccumulator, dual_coef, dual_kfold_scores,
                          dual_loo, kfold_assignment, kfold_scores_primal, parse_alphas,
                          primal_factor, select_alpha)

__all__ = ["fit_all_layers", "FitError", "parse_split", "resolve_targets", "write_results",
           "load_results"]

RESULTS_FILE = "results.json"
ARRAYS_FILE = "probes.npz"
PREDICTIONS_FILE = "predictions_best_layer.csv"


class FitError(ValueError):
    """A probing request that cannot run on this store (message says what is wrong)."""


# ----------------------------------------------------------------------------- inputs

def resolve_targets(store, targets=None) -> list[str]:
    """Target names: ``targets`` (list or "a,b" string) or the store's own; validated by name."""
    have = list(store.targets or ())
    if targets is None or (isinstance(targets, str) and not targets.strip()):
        if not have:
            raise FitError(f"{store.path}: the store records no target columns; pass targets=... "
                           "naming numeric columns of its entity table")
        return have
    names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
    names = [n for n in names if n]
    if not names:
        raise FitError("no target names given")
    if len(set(names)) != len(names):
        raise FitError(f"duplicate target names in {names}")
    import pandas as pd
    ent = store.entities
    cols = list(ent.columns)
    for n in names:
        if n not in cols:
            raise FitError(f"unknown target {n!r}: the store's targets are {have}"
                           f" (entity columns: {cols})")
        if not pd.api.types.is_numeric_dtype(ent[n]) or pd.api.types.is_bool_dtype(ent[n]):
            raise FitError(f"target column {n!r} is not numeric (dtype {ent[n].dtype}); a probe "
                           f"target must be a number per entity (the store's targets: {have})")
    return names


def target_matrix(store, targets=None) -> tuple[list[str], np.ndarray]:
    """Validated target names and the (rows_done, k) float64 target matrix; FitError for a
    store without completed rows or a missing / non-finite target value."""
    n = int(store.rows_done)
    if n == 0:
        raise FitError(f"{store.path}: the store has no completed rows")
    names = resolve_targets(store, targets)
    Y = store.target_array(names)[:n]
    bad = ~np.isfinite(Y)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise FitError(f"{store.path}: target {names[c]!r} is missing or not finite at row {r} "
                       f"({int(bad.any(1).sum())} rows affected)")
    return names, Y


def parse_split(spec: str, store, n: int) -> np.ndarray:
    """Boolean test mask (n,) from a split spec.

    ``is_test``: the store's own column. ``random:FRAC:SEED``: a seeded random FRAC of the rows.
    ``group:COLUMN[:FRAC[:SEED]]``: whole groups of COLUMN held out: a seeded random FRAC (default
    0.2) of its distinct values goes to test (block hold-out, e.g. by country).
    """
    spec = (spec or "is_test").strip()
    if spec == "is_test":
        mask = np.asarray(store.is_test[:n], dtype=bool)
        return mask
    kind, _, rest = spec.partition(":")
    parts = rest.split(":") if rest else []
    try:
        if kind == "random":
            frac = float(parts[0]) if parts else 0.2
            seed = int(parts[1]) if len(parts) > 1 else 0
            if not 0 < frac < 1 or len(parts) > 2:
                raise ValueError
            rng = np.random.default_rng(seed)
            n_test = int(round(frac * n))
            mask = np.zeros(n, dtype=bool)
            mask[rng.permutation(n)[:n_test]] = True
            return mask
        if kind == "group":
            if not parts or not parts[0]:
                raise ValueError
            col = parts[0]
            frac = float(parts[1]) if len(parts) > 1 else 0.2
            seed = int(parts[2]) if len(parts) > 2 else 0
            if not 0 < frac < 1 or len(parts) > 3:
                raise ValueError
        else:
            raise ValueError
    except ValueError:
        raise FitError(f"bad split {spec!r}: use is_test, random:FRAC:SEED (e.g. random:0.2:0) "
                       "or group:COLUMN[:FRAC[:SEED]] (e.g. group:country)") from None
    ent = store.entities
    if col not in ent.columns:
        raise FitError(f"split {spec!r}: the entity table has no column {col!r} "
                       f"(group columns: {list(store.group_columns)})")
    values = ent[col].astype(str).to_numpy()[:n]
    groups = np.unique(values)
    if len(groups) < 2:
        raise FitError(f"split {spec!r}: column {col!r} has only {len(groups)} distinct value(s)")
    rng = np.random.default_rng(seed)
    n_test = min(len(groups) - 1, max(1, int(round(frac * len(groups)))))
    held = set(rng.permutation(groups)[:n_test].tolist())
    return np.array([v in held for v in values], dtype=bool)


def _to_float(block: np.ndarray, dtype: str):
    """A stored block as a torch tensor (float16/float32 as stored; bfloat16 from its raw bits)."""
    import torch
    if isinstance(block, torch.Tensor):
        return block
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(block).view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.ascontiguousarray(block))


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


def _check_positions(store, layers) -> list[int]:
    """Layer positions (indices into ``store.layers``; negative counts from the end), each in
    range and named once."""
    L = store.n_layers
    pos = [int(p) for p in ([layers] if isinstance(layers, (int, np.integer)) else layers)]
    bad = [p for p in pos if not -L <= p < L]
    if bad:
        raise FitError(f"layer position(s) {bad} out of range: the store has {L} layers, "
                       f"positions 0..{L - 1} (or -{L}..-1) for hidden-state indices "
                       f"{list(store.layers)}")
    pos = [p % L for p in pos]
    dup = sorted({p for p in pos if pos.count(p) > 1})
    if dup:
        raise FitError(f"layer position(s) {dup} given more than once in layers={list(layers)}")
    if not pos:
        raise FitError("layers=[] selects no layer")
    return pos


def _default_device(backend) -> str:
    """Where the solve runs when no device is given: cuda for the cuda/triton backends and for
    auto when a GPU is present (so auto picks a GPU kernel), else cpu."""
    import torch
    name = "auto" if backend is None else str(backend).lower()
    if name in ("cuda", "triton"):
        return "cuda"
    if name == "auto" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def _check_finite_layer(store, pos: int, n: int, shard=None):
    """Find the first non-finite activation of one layer (only called once one was detected;
    distributed: on every rank at once, see RowShard.alike)."""
    x = np.asarray(store.layer(pos)[:n], dtype=np.float32)
    bad = np.argwhere(~np.isfinite(x))
    row, col = (int(bad[0][0]), int(bad[0][1])) if len(bad) else (-1, -1)
    err = FitError(f"{store.path}: layer {store.layers[pos]} (position {pos}) has NaN or inf "
                   f"activations, first at row {row}, dim {col}")
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
    layers: layer positions to fit (default all). out: directory for results.json, probes.npz,
    the best layer's predictions and PNG plots.

    shard: a :class:`probes.distributed.RowShard` (torchrun; use
    :func:`probes.distributed.fit_all_layers_distributed`): this rank's statistics and
    projections cover its own rows, merged across ranks; ranks other than 0 return None.

    Returns the results dict (also written to out/results.json); ``result["arrays"]`` holds numpy
    arrays (coef (L, d, k), intercept (L, k), alpha (L, k), predictions (L, n, k)) that are saved to
    probes.npz instead of the JSON.
    """
    import torch
    from actstore.store import open_store
    from probes import metrics
    from probes.kernels import resolve_backend

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

    positions = list(range(store.n_layers)) if layers is None else _check_positions(store, layers)
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
    if device is None:
        device = _default_device(backend)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FitError(f"backend {backend!r} / device {device} needs a CUDA GPU and none is available")
    be = resolve_backend(backend, device)

    L = len(positions)
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
            bpos = positions[b0:b0 + batch]
            sl = slice(b0, b0 + len(bpos))
            res = _primal_batch(store, bpos, n, Yz, fold_all, train, alphas, cv, alpha_per_target,
                                be, precision, device, chunk_rows, timings, tick, shard)
            coef[sl], intercept[sl], alpha_idx[sl], cv_scores[sl], preds[sl], bs = res
            best_scores.extend(bs)
    else:
        for j, p in enumerate(positions):
            ts = time.perf_counter()
            X = _to_float(store.layer(p)[:n], store.dtype).to(
                torch.float32 if precision == "float32" else torch.float64)
            if not bool(torch.isfinite(X).all()):
                _check_finite_layer(store, p, n)
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
    for j, p in enumerate(positions):
        a = alphas[alpha_idx[j]]
        entry = {
            "layer": int(store.layers[p]),
            "position": int(p),
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
                   "layers": np.array([store.layers[p] for p in positions])},
    }
    if out is not None:
        write_results(result, out, store=store)
    return result


def _primal_batch(store, bpos, n, Yz, fold_all, train, alphas, cv, alpha_per_target, be,
                  precision, device, chunk_rows, timings, tick, shard=None):
    """Statistics pass + solve + projection pass for one batch of layer positions."""
    import torch
    from probes.kernels import gram_update
    from probes.stats import GramStats, choose_shift

    B, d, k = len(bpos), store.d_model, Yz.shape[1]
    F = 1 if cv == "loo" else cv
    if chunk_rows is None:
        from probes.kernels import preferred_chunk_rows
        chunk_rows = preferred_chunk_rows(d, B, F, max_bytes=64 << 20)
    # GPU kernels sum each chunk in float32 (into float64 totals) and refuse "float64".
    stats_precision = precision if be in ("cpu", "torch") else None
    ts = time.perf_counter()
    stats = None
    lo, hi = (0, n) if shard is None else shard.rows(n)   # distributed: this rank's rows
    for start, block in _chunks(store, chunk_rows, bpos, hi, device, lo):
        r = block.shape[1]
        X = _to_float(block, store.dtype)          # bfloat16 arrives as float32
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
        _check_finite_layer(store, bpos[int((~finite).nonzero()[0])], n, shard)
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
        for start, block in _chunks(store, chunk_rows, bpos, hi, device, lo):
            r = block.shape[1]
            acc.update(start, _to_float(block, store.dtype), Yz[start:start + r],
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
        for start, block in _chunks(store, chunk_rows, bpos, hi, device, lo):
            r = block.shape[1]
            X = _to_float(block, store.dtype).to(device=device, dtype=Wd.dtype)
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
        _check_finite_layer(store, bpos[int(np.nonzero(bad)[0][0])], n, shard)
    return (W.cpu().numpy(), b.cpu().numpy(), idx, scores.cpu().numpy(), preds,
            [best[i] for i in range(B)])


# ----------------------------------------------------------------------------- output

def _jsonable(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "arrays"}


def store_identity(store) -> dict:
    """What identifies the store a fit was made on (results.json ``store_identity``): its
    metadata's creation time, dataset sha256, prompt name and model id, and its completed rows.
    ``fastprobe neurons --probe`` compares these with the store it is given (same path or not),
    so a store re-extracted at the same path with another prompt or dataset is caught."""
    meta = store.meta if isinstance(getattr(store, "meta", None), dict) else {}
    ds, pr, mo = meta.get("dataset"), meta.get("prompt"), meta.get("model")
    return {
        "created": meta.get("created"),
        "dataset_sha256": ds.get("sha256") if isinstance(ds, dict) else None,
        "prompt": pr.get("name") if isinstance(pr, dict) else (pr if isinstance(pr, str) else None),
        "model_id": mo.get("id") if isinstance(mo, dict) else (mo if isinstance(mo, str) else None),
        "n_rows": int(store.rows_done),
    }


def write_results(result: dict, out, store=None) -> Path:
    """Write results.json, probes.npz, the best layer's predictions CSV and the PNG plots.

    results.json records ``store_identity`` (:func:`store_identity`; taken from ``store`` when
    the result lacks it)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if store is not None and "store_identity" not in result:
        result = {**result, "store_identity": store_identity(store)}
    (out / RESULTS_FILE).write_text(json.dumps(_jsonable(result), indent=1, allow_nan=True))
    arr = result.get("arrays")
    if arr is not None:
        np.savez_compressed(out / ARRAYS_FILE, coef=arr["coef"].astype(np.float32),
                            intercept=arr["intercept"], alpha=arr["alpha"], layers=arr["layers"],
                            cv_scores=arr["cv_scores"])
        if store is not None:
            import pandas as pd
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
            df.to_csv(out / PREDICTIONS_FILE, index=False)
            from probes import report
            report.make_plots(result, df, out, group_columns=list(store.group_columns or ()))
    return out


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
