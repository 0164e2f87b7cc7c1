"""Benchmark: all-layer ridge probing, fastprobe vs a per-layer scikit-learn RidgeCV loop vs the
float32 matmul floor, on the same synthetic fp16 activations.

(a) sklearn: for each layer, ``RidgeCV(alphas).fit(X_train, z-scored y)`` on float64 copies of the
    fp16 activations + predict the test rows (the paper's method).
(b) ours: ``probes.fit_all_layers`` (statistics pass, batched eigendecomposition, projection
    pass, metrics) on an in-memory store (the same reading API as ActivationStore).
(c) floor: the float32 matrix products the method needs, timed with torch on this machine:
    primal (n_train >= d): Gram XᵀX over the train rows + projection X·V over all rows
    (2 n d² multiply-adds per layer); dual: the kernel X Xᵀ (n_train² d).

Also checks that (a) and (b) choose identical alphas. Appends a section to bench/RESULTS.md.
``--task classify``: the logistic-probe section instead (bench/probe_classify.py).

    python -m bench.probe                     # both shapes (slow parts measured on a few layers)
    python -m bench.probe --shape smollm2 --sk-layers 30
    python -m bench.probe --task classify --shape smollm2 --sk-layers 2 --our-layers 6
"""
from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench.common import RESULTS, append_results
from bench.common import machine as _machine

SHAPES = {"smollm2": (30, 20_000, 576), "llama7b": (32, 4_000, 4_096)}
ALPHAS = np.logspace(-2, 5, 25)


class MemoryStore:
    """The part of ActivationStore that fit_all_layers reads, over an in-memory (L, n, d)
    array."""

    def __init__(self, X: np.ndarray, ent: pd.DataFrame, targets, group_columns=()):
        self._X = X
        self.path = "<memory>"
        self.n_layers, self.n_rows, self.d_model = X.shape
        self.rows_done = self.n_rows
        self.layers = list(range(1, self.n_layers + 1))   # hidden states 1..L, as a real store
        self.dtype = str(X.dtype)
        self.rows_per_chunk = 1024
        self.targets = tuple(targets)
        self.group_columns = tuple(group_columns)
        self.meta = {"model": "synthetic"}
        self._ent = ent
        # format version 2's reading API: one row per text, the residual stream only
        self.ragged = False
        self.n_texts = self.n_rows
        self.sites = ("resid",)
        self.d_sites = {"resid": self.d_model}
        self.target_kinds = {t: "regression" for t in self.targets}

    @property
    def entities(self):
        return self._ent.copy()

    def target_array(self, names=None):
        return self._ent[list(names or self.targets)].to_numpy(dtype=np.float64)

    @property
    def is_test(self):
        return self._ent["is_test"].to_numpy(dtype=bool)

    def layer(self, layer, site="resid", as_="numpy"):
        """Hidden-state index ``layer`` (as ActivationStore.layer)."""
        return self._site(site)[self.layers.index(layer)]

    def _site(self, site):
        if site != "resid":
            raise KeyError(f"a MemoryStore holds only 'resid', not {site!r}")
        return self._X

    def iter_chunks(self, rows=None, layers=None, site="resid", start=0, stop=None):
        self._site(site)
        pos = (list(range(self.n_layers)) if layers is None
               else [self.layers.index(x) for x in layers])
        step = rows or self.rows_per_chunk
        end = self.rows_done if stop is None else min(stop, self.rows_done)
        contiguous = pos == list(range(pos[0], pos[-1] + 1))
        for s in range(start, end, step):
            e = min(end, s + step)
            yield s, (self._X[pos[0]:pos[-1] + 1, s:e] if contiguous else self._X[pos, s:e])


def make_data(L, n, d, seed=0, test_frac=0.2):
    """fp16 activations: a few directions carry (latitude, longitude) more clearly with depth,
    plus a heavy-tailed spectrum of nuisance directions and isotropic noise."""
    rng = np.random.default_rng(seed)
    lat, lon = rng.uniform(-60, 70, n), rng.uniform(-180, 180, n)
    T = np.c_[(lat - 5) / 38, lon / 104, np.sin(np.radians(lon)), np.cos(np.radians(lat))]
    ent = pd.DataFrame({"name": [f"e{i}" for i in range(n)], "latitude": lat, "longitude": lon,
                        "is_test": rng.random(n) < test_frac, "entity_type": "place",
                        "region": rng.choice(list("ABCDEF"), n)})
    X = np.empty((L, n, d), dtype=np.float16)
    r = 32
    for l in range(L):
        M = rng.standard_normal((4, d), dtype=np.float32) * (0.2 + 1.5 * l / L)
        H = rng.standard_normal((n, r), dtype=np.float32) @ (
            rng.standard_normal((r, d), dtype=np.float32) * (3.0 / np.arange(1, r + 1)[:, None]))
        X[l] = (T.astype(np.float32) @ M + H + rng.standard_normal((n, d), dtype=np.float32)
                + rng.standard_normal(d, dtype=np.float32) * 2)
    return X, ent


def run_sklearn(X, ent, layers):
    from sklearn.linear_model import RidgeCV
    Y = ent[["latitude", "longitude"]].to_numpy()
    te = ent.is_test.to_numpy()
    tr = ~te
    mu, sd = Y[tr].mean(0), Y[tr].std(0)
    alphas, t = [], []
    for l in layers:
        t0 = time.perf_counter()
        Xl = X[l].astype(np.float64)
        m = RidgeCV(alphas=ALPHAS).fit(Xl[tr], (Y[tr] - mu) / sd)
        m.predict(Xl[te])
        t.append(time.perf_counter() - t0)
        alphas.append(float(m.alpha_))
    return alphas, t


def floor_seconds(X, ent, layers, repeat=2, device="cpu"):
    """Per layer, best of `repeat`, torch on `device`: (float32 matmuls the method needs, the
    float64 eigendecomposition of the n_train x n_train kernel (dual form only, else 0)).

    The dual form's cost is that eigendecomposition, which a scikit-learn RidgeCV loop pays too
    (its LOO takes the same n x n eigh in float64): the floor of a dual fit is both."""
    import torch
    tr = ~ent.is_test.to_numpy()
    n_tr = int(tr.sum())
    d = X.shape[2]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out, eig = [], []
    for l in layers:
        Xa = torch.from_numpy(X[l]).to(device).float()
        Xt = Xa[torch.from_numpy(tr).to(device)]
        best, best_eig = np.inf, 0.0
        for _ in range(repeat):
            sync()
            t0 = time.perf_counter()
            if n_tr >= d:
                G = Xt.T @ Xt
                _ = Xa @ G                     # stands in for X·V (same shape and flops)
            else:
                K = Xt @ Xt.T
            sync()
            best = min(best, time.perf_counter() - t0)
        if n_tr < d:
            K64 = K.double()
            best_eig = np.inf
            for _ in range(repeat):
                sync()
                t0 = time.perf_counter()
                torch.linalg.eigh(K64)
                sync()
                best_eig = min(best_eig, time.perf_counter() - t0)
        out.append(best)
        eig.append(best_eig)
    return out, eig


def bench_shape(name, L, n, d, sk_layers, our_layers, precisions, backend, seed=0, device="cpu",
                repeat=1):
    from probes.fit import fit_all_layers
    print(f"== {name}: {L} layers x {n} rows x {d}", flush=True)
    t0 = time.perf_counter()
    X, ent = make_data(max(min(L, our_layers), min(L, sk_layers)), n, d, seed)   # only layers timed
    print(f"   data {time.perf_counter() - t0:.1f}s", flush=True)
    store = MemoryStore(X, ent, ("latitude", "longitude"), ("region",))
    ours_layers = list(range(min(L, our_layers)))      # positions in X (hidden state p + 1)
    res = {}
    for prec in precisions:
        t0 = time.perf_counter()
        if device == "cuda":       # warm-up: CUDA context, cuBLAS/cuSOLVER handles
            fit_all_layers(store, alphas=ALPHAS, backend=backend, precision=prec,
                           layers=[store.layers[0]], device=device)
        r = None
        for _ in range(repeat):            # best of `repeat`, as the floor (a shared box)
            got = fit_all_layers(store, alphas=ALPHAS, backend=backend, precision=prec,
                                 layers=[store.layers[p] for p in ours_layers], device=device,
                                 progress=False)
            if r is None or got["seconds"]["total"] < r["seconds"]["total"]:
                r = got
        el = r["seconds"]["total"]          # inside the call: excludes first-import costs
        res[prec] = (el, r)
        print(f"   ours ({prec}, {len(ours_layers)} layers): {el:.2f}s  {r['seconds']}", flush=True)
    sk_l = list(range(min(L, sk_layers)))
    sk_alphas, sk_t = run_sklearn(X, ent, sk_l)
    print(f"   sklearn ({len(sk_l)} layers): {sum(sk_t):.2f}s", flush=True)
    fl, fl_eig = floor_seconds(X, ent, ours_layers, device=device)
    print(f"   floor ({len(ours_layers)} layers): {sum(fl):.2f}s"
          + (f" + float64 eigh {sum(fl_eig):.2f}s" if any(fl_eig) else ""), flush=True)
    scale_ours = L / len(ours_layers)
    rows = []
    for prec, (el, r) in res.items():
        ours_alpha = r["arrays"]["alpha"][:, 0]
        common = min(len(sk_l), len(ours_layers))
        same = int(np.sum(np.asarray(sk_alphas[:common]) == ours_alpha[:common]))
        ours_full = el * scale_ours
        sk_full = sum(sk_t) * L / len(sk_l)
        fl_full = sum(fl) * scale_ours
        fl_eig_full = sum(fl_eig) * scale_ours
        fit_s = (el - r["seconds"]["metrics"]) * scale_ours
        rows.append(dict(shape=name, L=L, n=n, d=d, n_train=r["n_train"], form=r["form"],
                         precision=prec,
                         backend=r["backend"] + ("@cuda" if device == "cuda" else ""),
                         ours_s=ours_full, fit_s=fit_s, sklearn_s=sk_full,
                         floor_s=fl_full, speedup=sk_full / ours_full, vs_floor=fit_s / fl_full,
                         floor_eigh_s=fl_eig_full,
                         vs_floor_eigh=fit_s / (fl_full + fl_eig_full) if fl_eig_full else None,
                         speedup_fit=sk_full / fit_s,
                         alphas_same=f"{same}/{common}", sk_layers=len(sk_l),
                         our_layers=len(ours_layers),
                         stages=r["seconds"]))
    return rows


def write_results_md(rows, path, note):
    now = dt.datetime.now(dt.timezone.utc)
    lines = [f"\n## Ridge probes on every layer (bench/probe.py) — {now:%Y-%m-%d %H:%M} UTC\n",
             f"Machine: {_machine(load=True)}. {note}\n",
             "| shape (L x n x d) | form | precision (stats backend) | ours: fit (s) "
             "| ours: + metrics (s) "
             "| sklearn RidgeCV loop (s) | float32 floor (s) | fit speed-up vs sklearn "
             "| fit / floor | + float64 eigh of the dual kernel (s) | fit / (floor + eigh) "
             "| same alphas |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ext = []
        if r["sk_layers"] < r["L"]:
            ext.append(f"sklearn measured on {r['sk_layers']} layers")
        if r["our_layers"] < r["L"]:
            ext.append(f"ours+floor measured on {r['our_layers']} layers")
        tag = f" ({'; '.join(ext)}, scaled to {r['L']})" if ext else ""
        lines.append(f"| {r['L']} x {r['n']} x {r['d']}{tag} "
                     f"| {r['form']} (n_train={r['n_train']}) | "
                     f"{r['precision']} ({r['backend']}) | {r['fit_s']:.1f} | {r['ours_s']:.1f} | "
                     f"{r['sklearn_s']:.1f} | {r['floor_s']:.2f} | {r['speedup_fit']:.1f}x | "
                     f"{r['vs_floor']:.2f}x | "
                     + (f"{r['floor_eigh_s']:.2f} | {r['vs_floor_eigh']:.2f}x"
                        if r["vs_floor_eigh"] else "— | —")
                     + f" | {r['alphas_same']} |")
    lines.append("")
    lines.append("Stage seconds of our fit (measured layers): " + "; ".join(
        f"{r['shape']}/{r['precision']}: "
        + ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items())
        for r in rows))
    lines.append("")
    append_results(path, "\n".join(lines))
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["ridge", "classify"], default="ridge",
                    help="ridge probes (default) or logistic probes with C by 5-fold CV")
    ap.add_argument("--shape", choices=["smollm2", "llama7b", "both"], default="both")
    ap.add_argument("--sk-layers", type=int, default=None,
                    help="layers for the sklearn loop (default 6 / 2), extrapolated to all")
    ap.add_argument("--our-layers", type=int, default=None,
                    help="layers for our fit and the floor (default all / 4), extrapolated")
    ap.add_argument("--precision", default=None,
                    help="comma list (default: float32,float64; classify: float32)")
    ap.add_argument("--store", help="classify: a real store instead of synthetic data")
    ap.add_argument("--target", default="country", help="classify: the store's class column")
    ap.add_argument("--layers", help="classify with --store: hidden-state indices, e.g. 5,10")
    ap.add_argument("--sk-max-iter", type=int, default=1000,
                    help="classify: max_iter of sklearn's lbfgs (its default 100 stops early)")
    ap.add_argument("--repeat", type=int, default=2,
                    help="our fit: best of N runs (the floor is best of 2; sklearn runs once)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where our fit and the floor run (sklearn always runs on the CPU)")
    ap.add_argument("--results", default=str(RESULTS),
                    help="markdown file the section is appended to")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    if args.task == "classify":
        return main_classify(args)
    rows = []
    shapes = ["smollm2", "llama7b"] if args.shape == "both" else [args.shape]
    for s in shapes:
        L, n, d = SHAPES[s]
        sk = args.sk_layers or (6 if s == "smollm2" else 2)
        ol = args.our_layers or (L if s == "smollm2" else 4)
        rows += bench_shape(s, L, n, d, sk, ol, (args.precision or "float32,float64").split(","),
                            args.backend, device=args.device, repeat=args.repeat)
    if not args.no_write:
        write_results_md(rows, args.results, args.note)


def main_classify(args):
    from bench import probe_classify as pc
    precision = args.precision or "float32"
    sk = 1 if args.sk_layers is None else args.sk_layers
    rows = []
    if args.store:
        layers = [int(x) for x in (args.layers or "5,10,15").split(",")]
        X, y = pc.real_data(args.store, args.target, layers)
        rows.append(pc.bench_classify(f"store {args.target}", X, y, sk,
                                      precision, args.sk_max_iter, device=args.device))
    else:
        for s in (["smollm2", "llama7b"] if args.shape == "both" else [args.shape]):
            L, n, d = SHAPES[s]
            ol = min(L, args.our_layers or (6 if s == "smollm2" else 2))
            X, y = pc.make_class_data(ol, n, d)
            rows.append(pc.bench_classify(s, X, y, sk, precision,
                                          args.sk_max_iter, L_full=L, device=args.device))
    pc.write_results_md(rows, None if args.no_write else Path(args.results), args.note)


if __name__ == "__main__":
    main()
