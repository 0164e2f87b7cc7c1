"""Benchmark: logistic probes on every layer with C chosen by stratified 5-fold CV, ours vs a
per-layer scikit-learn ``LogisticRegressionCV`` loop vs the float32 matmul floor.

(a) sklearn: for each layer, ``LogisticRegressionCV(Cs=grid, cv=the same folds, tol=1e-4,
    max_iter=--sk-max-iter)`` (lbfgs, multinomial) on float64 copies of the train rows.
(b) ours: ``probes.classify.select_c`` on all layers at once (fold fits along the C path,
    held-out scoring, refit), float32 (or --precision).
(c) floor: the float32 products our solver actually did, timed with torch on this machine: one
    Gram pass (XᵀX), every pass of X against the coefficient block (losses, gradients,
    Hessian-vector products) and the weighted Grams of the preconditioner.

Data: synthetic fp16 activations with 10 Zipf-sized classes whose means separate with depth,
a heavy-tailed nuisance spectrum and two "massive" dimensions; or a real store (--store,
--target). Also checks that (a) and (b) choose the same C per layer. Appends to RESULTS.md.

    python -m bench.probe --task classify --shape smollm2 --sk-layers 2 --our-layers 6
    python -m bench.probe --task classify --store STORE --target country --layers 5,10,15
"""
from __future__ import annotations

import datetime as dt
import time
import warnings

import numpy as np

from bench.common import append_results
from bench.common import machine as _machine

CS = np.logspace(-4, 4, 17)
N_CLASSES = 10


def make_class_data(L, n, d, K=N_CLASSES, seed=0):
    """fp16 activations (L, n, d) and class codes (n,): class means in a 24-dim subspace, more
    apart with depth; nuisance directions with a 1/k spectrum; two large-offset dimensions."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, K + 1) ** 0.8
    y = rng.choice(K, size=n, p=p / p.sum())
    X = np.empty((L, n, d), dtype=np.float16)
    r = 24
    for l in range(L):
        means = rng.standard_normal((K, r)).astype(np.float32) * (0.3 + 1.2 * l / L)
        lift = rng.standard_normal((r, d)).astype(np.float32) / np.sqrt(r)
        H = rng.standard_normal((n, 32), dtype=np.float32) @ (
            rng.standard_normal((32, d), dtype=np.float32) * (3.0 / np.arange(1, 33)[:, None]))
        Xl = means[y] @ lift + H + rng.standard_normal((n, d), dtype=np.float32)
        Xl[:, :2] += 40 + 4 * rng.standard_normal((n, 2), dtype=np.float32)
        X[l] = Xl
    return X, y


def real_data(path, target, layers, max_classes=N_CLASSES):
    """(L, n, d) activations and codes of a store's ``target`` column: the top classes kept,
    the other rows dropped."""
    import actstore
    from probes.classify.labels import encode_labels
    s = actstore.open(path)
    lab = encode_labels(np.asarray(s.entities[target], dtype=object), max_classes=max_classes,
                        rest="drop")
    keep = lab.kept
    X = np.stack([s.layer(layer)[keep] for layer in layers])
    return X, lab.codes[keep]


def run_ours(X, y, folds, precision, device="cpu"):
    from probes.classify.select import select_c
    t0 = time.perf_counter()
    r = select_c(X, y, CS, folds=folds, dtype=precision, device=device)
    return r, time.perf_counter() - t0


def run_sklearn(X, y, folds, layers, max_iter):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import PredefinedSplit
    Cs, secs, unconverged = [], [], 0
    for l in layers:
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            m = LogisticRegressionCV(Cs=CS, cv=PredefinedSplit(folds), tol=1e-4,
                                     max_iter=max_iter).fit(X[l].astype(np.float64), y)
        secs.append(time.perf_counter() - t0)
        unconverged += sum(issubclass(w.category, ConvergenceWarning) for w in caught)
        Cs.append(float(np.ravel(m.C_)[0]))
    return Cs, secs, unconverged


def _best_of(fn, repeat=3, sync=lambda: None):
    best = np.inf
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def floor_seconds(X, work: dict, device="cpu") -> float:
    """Seconds of the float32 products our solve did (one Gram pass, the passes of X against
    the coefficient block, the preconditioner's weighted Grams), best of 3 per product, on
    ``device``."""
    import functools

    import torch
    Xt = torch.from_numpy(np.asarray(X[:1], dtype=np.float32)).to(device)   # one layer
    best = functools.partial(_best_of, sync=torch.cuda.synchronize if device == "cuda"
                             else (lambda: None))
    L, n, d = X.shape
    total = L * best(lambda: Xt[0].T @ Xt[0])                         # the Gram pass
    for part in work.values():
        if not part.get("passes"):
            continue
        W = torch.randn(d, part["columns"], device=device)
        t_pass = best(lambda: Xt[0] @ W)
        Z = Xt[0, :part.get("gram_rows", n), :part["gram_features"]]
        w = torch.rand(Z.shape[0], 1, device=device)
        t_gram = best(lambda: (Z * w).T @ Z)
        total += part["layer_passes"] * t_pass + part["grams"] * t_gram
    return total


def bench_classify(name, X, y, sk_layers, precision, sk_max_iter, L_full=None, device="cpu"):
    """One row: ours on all of X's layers, sklearn on ``sk_layers`` of them spread over depth,
    the floor."""
    from probes.classify.labels import stratified_folds
    L, n, d = X.shape
    L_full = L_full or L
    folds = stratified_folds(y, 5)
    print(f"== classify {name}: {L} layers x {n} rows x {d}, {y.max() + 1} classes", flush=True)
    r, t_ours = run_ours(X, y, folds, precision, device)
    print(f"   ours ({precision}, {device}): {t_ours:.1f}s  C={r.C.tolist()}", flush=True)
    # sklearn's layers spread over depth (the first and the last included): the same-C check
    # then covers weakly and strongly separated layers; 0: ours and the floor only
    sk_l = sorted({int(i) for i in np.linspace(0, L - 1, min(L, sk_layers)).round()}) \
        if sk_layers else []
    sk_C, sk_t, unconv = run_sklearn(X, y, folds, sk_l, sk_max_iter) if sk_l else ([], [], 0)
    if sk_l:
        print(f"   sklearn (layers {sk_l}): {sum(sk_t):.1f}s  C={sk_C}  "
              f"unconverged fits: {unconv}", flush=True)
    fl = floor_seconds(X, r.work, device)
    print(f"   floor: {fl:.1f}s  work {r.work}", flush=True)
    same = int(np.sum(np.isclose(np.asarray(sk_C), r.C[sk_l])))
    scale = L_full / L
    return dict(shape=name, device=device, L=L_full, n=n, d=d, K=int(y.max()) + 1,
                precision=precision, ours_s=t_ours * scale,
                sklearn_s=sum(sk_t) * L_full / len(sk_l) if sk_l else float("nan"),
                floor_s=fl * scale, sk_layers=len(sk_l),
                same=f"{same}/{len(sk_l)} (layers {', '.join(map(str, sk_l))})",
                our_layers=L, unconverged=unconv, sk_max_iter=sk_max_iter,
                newton=r.work["folds"]["newton"] + r.work["refit"]["newton"],
                passes=r.work["folds"]["layer_passes"] + r.work["refit"]["layer_passes"],
                converged=f"{int(r.converged.sum())}/{L}")


def write_results_md(rows, path, note):
    now = dt.datetime.now(dt.timezone.utc)
    lines = [f"\n## Logistic probes on every layer, C by 5-fold CV (bench/probe_classify.py) — "
             f"{now:%Y-%m-%d %H:%M} UTC\n",
             f"Machine: {_machine(load=True)}. 17 Cs (1e-4..1e4), 5 stratified folds, "
             f"sklearn `LogisticRegressionCV(tol=1e-4)` per layer on float64 copies. {note}\n",
             "| data (L x n x d, K) | ours (s) | sklearn loop (s) | float32 floor (s) "
             "| speed-up | ours / floor | same C | sklearn fits not converged "
             "| our Newton steps / passes of one layer's X |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tag = f"; sklearn on {r['sk_layers']}" if r["sk_layers"] < r["L"] else ""
        if r["our_layers"] < r["L"]:
            tag += f"; ours on {r['our_layers']}"
        lines.append(
            f"| {r['shape']} {r['L']} x {r['n']} x {r['d']}, K={r['K']} ({r['precision']}, "
            f"{r['device']}"
            f"{tag}{', scaled to ' + str(r['L']) if tag else ''}) | {r['ours_s']:.1f} "
            f"| {r['sklearn_s']:.1f} | {r['floor_s']:.1f} | {r['sklearn_s'] / r['ours_s']:.1f}x "
            f"| {r['ours_s'] / r['floor_s']:.1f}x | {r['same']} "
            f"| {r['unconverged']} (max_iter={r['sk_max_iter']}) "
            f"| {r['newton']} / {r['passes']} |")
    if path is not None:                                  # None: print only (--no-write)
        append_results(path, "\n".join(lines) + "\n")
    print("\n".join(lines))
