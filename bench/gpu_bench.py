"""GPU benchmarks of the statistics pass, the neuron correlations and the whole fit.

Run on a GPU machine (bench/gpu_check.sh calls it); every section is independent: a failing
section records its error and the others still run. Results go to --json after each section and
a short table is printed at the end.

Sections
- ceilings: the card's two ceilings, measured here: a large fp16 matrix product (TFLOP/s, random
  data, median of repeated runs timed with CUDA events) and a large device-to-device copy (GB/s,
  bytes read + bytes written).
- gram: the statistics pass on a Llama-2-7B-shaped synthetic set (--layers x --rows x --d fp16,
  generated on the device in memory), every backend variant: achieved TFLOP/s counts the useful
  work, B·n·d·(d+1) flops (the upper triangle of XᵀX incl. the diagonal, 2 flops per
  multiply-add); target >= 60% of the matmul ceiling. Accuracy vs float64 on one layer.
  Variants: the preshift mode (default of the triton backend) at every candidate tiling, timed
  on the full shape (the fastest becomes gram_update's default in this process), then that
  tiling with the pre-shift pass overlapped by layer groups (--groups); the rawtma mode (no
  pre-shift pass) at every TMA tiling, made the default when faster; the older shift-in and
  raw+fix modes (unless --no-old-modes); 4 folds with 20% test rows (preshift, rawtma on rows
  sorted by fold, shift-in).
- fit: the whole fit --all-layers (25 alphas, exact LOO, primal form) = statistics pass (all
  layers, best measured variant) + batched eigendecomposition + LOO pass (measured on
  --fit-layers layers, scaled linearly to all layers), next to a naive torch GPU fit (per layer
  float32 X.T @ X and torch.linalg.solve per alpha; measured on --fit-layers layers, scaled).
  Targets carry a planted linear signal. Combos: eigh float64|float32 (probes.ridge's guarded
  floor) x LOO projection float64|float32|TF32|fp16 (fp16: bench-local copy of the LOO maths
  with Z = (X - x̄)V on fp16 tensor cores); for each, whether the chosen alphas (per layer and
  per target) equal the float64 ones and the largest relative score difference. eigh is also
  timed with MAGMA.
- neurons: Σx, Σx², Σxy over --layers x --rows x --neurons fp16 with 2 targets: achieved GB/s
  (activation bytes read once) vs the copy ceiling (target >= 60%); Spearman for one layer.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


DEV = "cuda"   # --device cpu (with TRITON_INTERPRET=1, tiny sizes) dry-runs the script's logic
# main() points this at its JSON writer: sections call it after each variant, so a run cut off by
# a time limit keeps every number measured so far
CHECKPOINT = lambda: None  # noqa: E731


class _Skip(Exception):
    pass


def cuda_time(fn, reps=5, warmup=1):
    """Median milliseconds of fn() over reps runs (CUDA events), after warmup runs."""
    import torch

    for _ in range(warmup):
        fn()
    if DEV != "cuda":
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        ts.sort()
        return ts[len(ts) // 2], ts
    sync()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2], ts


def sync():
    import torch

    if DEV == "cuda":
        torch.cuda.synchronize()


def empty_cache():
    import torch

    if DEV == "cuda":
        torch.cuda.empty_cache()


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


# ------------------------------------------------------------------------------------ sections
def sec_ceilings(args, res):
    import torch

    out = {}
    n = 8192
    a = torch.randn(n, n, device=DEV, dtype=torch.float16)
    b = torch.randn(n, n, device=DEV, dtype=torch.float16)
    c = torch.empty(n, n, device=DEV, dtype=torch.float16)
    ms, ts = cuda_time(lambda: torch.mm(a, b, out=c), reps=10, warmup=3)
    out["matmul_fp16_tflops"] = 2 * n ** 3 / (ms * 1e-3) / 1e12
    out["matmul_ms"] = ms
    del a, b, c
    nbytes = 4 << 30
    src = torch.randn(nbytes // 4, device=DEV, dtype=torch.float32)
    dst = torch.empty_like(src)
    ms, ts = cuda_time(lambda: dst.copy_(src), reps=10, warmup=3)
    out["copy_gbs"] = 2 * nbytes / (ms * 1e-3) / 1e9
    out["copy_ms"] = ms
    del src, dst
    empty_cache()
    return out


_DATA = {}


def gram_data(args):
    import torch

    if "X" not in _DATA:
        g = torch.Generator(device=DEV).manual_seed(1)
        B, n, d = args.layers, args.rows, args.d
        X = torch.randn(B, n, d, device=DEV, dtype=torch.float16, generator=g)
        # per-column means and scales, like a residual stream (a few large-mean columns)
        mu = torch.randn(B, 1, d, device=DEV, generator=g) * 0.5
        mu[:, :, :4] += 20
        X.mul_(1.5).add_(mu.to(torch.float16))
        Y = torch.randn(n, 2, device=DEV, dtype=torch.float64, generator=g) * 30
        _DATA["X"], _DATA["Y"] = X, Y
    return _DATA["X"], _DATA["Y"]


def _paths_since(before: dict) -> dict:
    """How many chunks took each gram_update path since ``before`` (a copy of the Triton
    backend's PATHS): rawtma hands chunks its accuracy guard refuses to preshift."""
    from probes.kernels import triton_kernels as tk

    return {p: n - before.get(p, 0) for p, n in tk.PATHS.items() if n != before.get(p, 0)}


def _cfg_name(cfg) -> str:
    bm, bn, br, warps, stages, tma = cfg
    return f"{bm}x{bn}x{br} w{warps} s{stages} {'tma' if tma else 'ptr'}"


def sec_gram(args, res):
    import torch

    from probes.kernels import cuda as ck
    from probes.kernels import triton_kernels as tk
    from probes.stats import GramStats, choose_shift

    X, Y = gram_data(args)
    B, n, d = X.shape
    k = Y.shape[1]
    shift = choose_shift(X[:, :2048])
    useful = B * n * d * (d + 1)
    ceiling = res.get("ceilings", {}).get("matmul_fp16_tflops")
    out = {"shape": [B, n, d], "useful_tflop": useful / 1e12, "variants": {}}
    if not args.merge:
        res["gram"] = out          # partial results reach the JSON at every checkpoint
        out["partial"] = True

    use_triton, use_cuda = "triton" in args.backends, "cuda" in args.backends
    if use_triton and args.tune_configs > 0:
        t0 = time.time()
        tuned = {}
        for sik in (True, False):
            cfg = tk.tune_gram(d, X.device, B=2, rows=8192, shift_in_kernel=sik,
                               configs=tk.gram_configs()[:args.tune_configs], verbose=True)
            tuned[sik] = list(cfg)
        out["tuned"] = {"shift_in_kernel": tuned[True], "raw": tuned[False],
                        "seconds": time.time() - t0,
                        "timings_ms": {("shift-in " if key[2] else "raw ") + str(c): t
                                       for key, v in tk.TUNE_LOG.items() for c, t in v.items()}}

    # float64 reference of layer 0 (on the GPU), for the accuracy column
    Xd = X[0].double() - shift[0].to(DEV)
    ref0 = Xd.T @ Xd
    del Xd

    variants = []
    if use_triton:
        # the default mode: pre-shift pass + plain Gram, every tiling timed on the full shape
        for cfg in tk.preshift_configs():
            variants.append((f"triton preshift {_cfg_name(cfg)}",
                             lambda st, f=None, cfg=cfg: tk.gram_update(st, X, Y, f, mode="preshift",
                                                                        config=cfg)))
        if not args.no_old_modes:
            # the older modes with the tiling the H200 run of 27 Nov 2026 tuned for both
            h200 = None if tk.INTERPRET else tk.GramConfig(128, 128, 64, 8, 3, False)
            old = tk._TUNED.get((d, str(X.device), True)) or h200
            old_raw = tk._TUNED.get((d, str(X.device), False)) or h200
            variants += [("triton shift-in", lambda st, f=None: tk.gram_update(
                              st, X, Y, f, mode="shift-in", config=old)),
                         ("triton raw+fix", lambda st, f=None: tk.gram_update(
                             st, X, Y, f, mode="raw", config=old_raw))]
    if use_triton and DEV == "cuda":
        # context, not statistics: cuBLAS full square XᵀX per layer (fp16 out, 2x the useful work)
        Gtmp = torch.empty(d, d, device=DEV, dtype=torch.float16)

        def cublas_full(st, f=None):
            for b in range(B):
                torch.matmul(X[b].T, X[b], out=Gtmp)
        variants.append(("cublas full XtX (reference only)", cublas_full))
    if use_cuda:
        if ck.is_available():
            variants.append(("cuda wmma", lambda st, f=None: ck.gram_update(st, X, Y, f)))
        else:
            out["variants"]["cuda wmma"] = {"error": ck.unavailable_reason()}
    def timed(name, fn, check=True):
        """Time fn(stats) on fresh statistics (one untimed call first: compile + accuracy);
        record it under ``name``; return the milliseconds, or None when it failed."""
        try:
            st = GramStats.zeros(B, d, k, shift=shift, device=DEV)
            paths = dict(tk.PATHS)
            fn(st)
            sync()
            took = _paths_since(paths)
            err = rel_err(st.xtx[0, 0], ref0) if check else None
            ms, ts = cuda_time(lambda: fn(st), reps=args.reps, warmup=0)
            tf = useful / (ms * 1e-3) / 1e12
            out["variants"][name] = {"ms": ms, "all_ms": ts, "tflops": tf,
                                     "pct_of_matmul": (100 * tf / ceiling) if ceiling else None,
                                     "rel_err_xtx_layer0": err, "paths": took}
            print(f"  {name}: {ms:.2f} ms, {tf:.1f} TFLOP/s", flush=True)
            CHECKPOINT()
            st = None
            empty_cache()
            return ms
        except Exception as exc:  # noqa: BLE001 - keep the other variants
            out["variants"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()
            return None

    def preshift(cfg, **kw):
        return lambda st: tk.gram_update(st, X, Y, mode="preshift", config=cfg, **kw)

    for name, fn in variants:
        timed(name, fn, check=not name.startswith("cublas"))
    # the fastest preshift tiling becomes the default of gram_update for this d (fit section)
    pre = {n: v["ms"] for n, v in out["variants"].items()
           if n.startswith("triton preshift") and "ms" in v}
    best_raw = None
    if use_triton:
        # "rawtma" next (the likeliest to reach the target, so a cut-off run still has it): no
        # pre-shift pass at all, the raw chunk read in place through TMA and centred in float64
        # in the add pass. Its column sums come from the moments kernel: that kernel's tilings
        # on this data first (GB/s of the chunk read once), the fastest becomes its default.
        Y32 = Y.to(torch.float32)
        sh32 = shift.to(device=X.device, dtype=torch.float32)
        copy_ceiling = res.get("ceilings", {}).get("copy_gbs")
        out["moments"] = {}

        def time_pass(name, fn):
            """Milliseconds of fn() (one untimed call first), recorded with the GB/s of the
            chunk read once; None when it failed."""
            try:
                fn()
                ms, ts = cuda_time(fn, reps=args.reps, warmup=0)
            except Exception as exc:  # noqa: BLE001
                out["moments"][name] = {"error": f"{type(exc).__name__}: {exc}"}
                traceback.print_exc()
                return None
            gbs = X.numel() * 2 / (ms * 1e-3) / 1e9
            out["moments"][name] = {"ms": ms, "all_ms": ts, "gbs": gbs,
                                    "pct_of_copy": (100 * gbs / copy_ceiling)
                                    if copy_ceiling else None}
            print(f"  {name}: {ms:.2f} ms, {gbs:.0f} GB/s", flush=True)
            CHECKPOINT()
            return ms

        mom = {}
        for t in tk.moments_tilings():
            ms = time_pass("triton moments {}x{} w{} stages{}".format(*t),
                           lambda t=t: tk.moments(X, Y32, sh32, squares=True, tiling=t))
            if ms is not None:
                mom[t] = ms
        if ck.is_available():
            # the CUDA module's moments kernel (67 % of copy on the H200) as rawtma's sums
            z = dict(dtype=torch.float64, device=X.device)
            ms = time_pass("cuda moments (for rawtma's sums)", lambda: ck.moments(
                X, Y32, sh32, torch.zeros(B, 1, d, **z), torch.zeros(B, 1, d, k, **z),
                torch.zeros(B, 1, d, **z)))
            if ms is not None and (not mom or ms < min(mom.values())):
                tk._TUNED[(d, str(X.device), "rawtma_sums")] = "cuda"
                out["rawtma_sums"] = "cuda"
        if mom:
            best_mom = min(mom, key=mom.get)
            tk._TUNED[(d, str(X.device), "moments")] = best_mom
            out["best_moments"] = {"tiling": list(best_mom), "ms": mom[best_mom],
                                   "rawtma_sums": out.get("rawtma_sums", "triton")}
        raw_ms = {}
        for cfg in tk.rawtma_configs():
            name = f"triton rawtma {_cfg_name(cfg)}"
            ms = timed(name, lambda st, cfg=cfg: tk.gram_update(st, X, Y, mode="rawtma", config=cfg))
            # only a time of the rawtma path itself counts (its guard may hand data to preshift)
            if ms is not None and set(out["variants"][name]["paths"]) == {"rawtma"}:
                raw_ms[cfg] = ms
        if raw_ms:
            best_raw = min(raw_ms, key=raw_ms.get)
            tk._TUNED[(d, str(X.device), "rawtma")] = best_raw
            out["best_rawtma"] = {"config": list(best_raw), "ms": raw_ms[best_raw]}
            if DEV == "cuda":
                try:
                    out["best_rawtma"]["kernels_ms"] = _profile_kernels(
                        lambda st: tk.gram_update(st, X, Y, mode="rawtma", config=best_raw),
                        lambda: GramStats.zeros(B, d, k, shift=shift, device=DEV))
                except Exception as exc:  # noqa: BLE001
                    out["best_rawtma"]["kernels_ms"] = {"error": f"{type(exc).__name__}: {exc}"}
            CHECKPOINT()
    if pre:
        best_name = min(pre, key=pre.get)
        best_cfg = next(c for c in tk.preshift_configs() if best_name.endswith(_cfg_name(c)))
        key = (d, str(X.device), "preshift")
        tk._TUNED[key] = best_cfg
        best_groups, best_ms = 1, pre[best_name]
        # the pre-shift pass's tilings with that Gram tiling (the pass took 12.5 ms of 53.7 on
        # an H200, at 40 % of the copy ceiling); the fastest becomes the default here
        prep_ms = {}
        for prep in tk.prep_tilings():
            ms = timed("triton preshift best, prep {}x{} w{} rows{} stages{}".format(*prep),
                       preshift(best_cfg, prep=prep), check=False)
            if ms is not None:
                prep_ms[prep] = ms
        if prep_ms:
            best_prep = min(prep_ms, key=prep_ms.get)
            tk._TUNED[(d, str(X.device), "prep")] = best_prep
            out["best_prep"] = list(best_prep)
            best_ms = min(best_ms, prep_ms[best_prep])
        # the same tiling with the pre-shift pass of the next layer group overlapping the Gram
        for groups in [int(x) for x in args.groups.split(",") if x]:
            ms = timed(f"triton preshift best, {groups} layer groups",
                       preshift(best_cfg, groups=groups))
            if ms is not None and ms < best_ms:
                best_groups, best_ms = groups, ms
        tk._TUNED[key + ("groups",)] = best_groups
        out["best_preshift"] = {"name": best_name, "config": list(best_cfg), "groups": best_groups,
                                "prep": out.get("best_prep"), "ms": best_ms}
        # the faster mode becomes gram_update's default for this d (the fit section uses it)
        if best_raw is not None and out["best_rawtma"]["ms"] < best_ms:
            tk._TUNED[(d, str(X.device), "mode")] = "rawtma"
        out["default_mode"] = tk._TUNED.get((d, str(X.device), "mode"), "preshift")
        CHECKPOINT()
        # the best variant re-timed right here next to the Gram kernel adding its tiles into the
        # float64 totals (fused epilogue), so the two epilogues compare under the same card state
        # (clocks drift by several percent between minutes); then where the best variant's time
        # goes, kernel by kernel (torch profiler)
        timed("triton preshift best (separate add), re-timed", preshift(best_cfg, groups=best_groups),
              check=False)
        timed("triton preshift best, fused float64 add",
              preshift(best_cfg, groups=best_groups, fused_add=True), check=False)
        if DEV == "cuda":
            try:
                out["best_preshift"]["kernels_ms"] = _profile_kernels(
                    preshift(best_cfg, groups=best_groups),
                    lambda: GramStats.zeros(B, d, k, shift=shift, device=DEV))
            except Exception as exc:  # noqa: BLE001
                out["best_preshift"]["kernels_ms"] = {"error": f"{type(exc).__name__}: {exc}"}
    # 4 folds with 20% test rows: preshift (rows sorted by fold in the pre-shift pass, one
    # plain Gram per fold's contiguous row range) and the older gathered shift-in kernel
    g = torch.Generator(device=DEV).manual_seed(2)
    fold = torch.randint(-1, 4, (n,), device=DEV, dtype=torch.int32, generator=g)
    kept = int((fold >= 0).sum())
    fold_modes = [("preshift", "triton 4 folds + test rows")]
    if "best_rawtma" in out:
        # rawtma reads each fold's rows in place when they are contiguous (rows sorted by
        # fold), else after one gather copy (the fit's case: test rows among train rows)
        fold_sorted = torch.sort(fold).values.to(torch.int32)
        fold_modes += [("rawtma-sorted", "triton rawtma 4 folds (rows sorted by fold) + test rows"),
                       ("rawtma", "triton rawtma 4 folds + test rows (one gather copy)")]
    if not args.no_old_modes:
        fold_modes.append(("shift-in", "triton 4 folds (shift-in)"))
    for mode, name in (fold_modes if use_triton else []):
        try:
            st = GramStats.zeros(B, d, k, n_folds=4, shift=shift, device=DEV)
            cfg = (None if mode.startswith(("preshift", "rawtma")) or tk.INTERPRET
                   else tk.GramConfig(128, 128, 64, 8, 3, False))
            fm = fold_sorted if mode == "rawtma-sorted" else fold
            mode = mode.replace("-sorted", "")
            paths = dict(tk.PATHS)
            tk.gram_update(st, X, Y, fm, mode=mode, config=cfg)
            took = _paths_since(paths)
            ms, ts = cuda_time(lambda: tk.gram_update(st, X, Y, fm, mode=mode, config=cfg),
                               reps=max(2, args.reps // 2), warmup=0)
            tf = B * kept * d * (d + 1) / (ms * 1e-3) / 1e12
            out["variants"][name] = {"ms": ms, "tflops": tf, "paths": took,
                                     "pct_of_matmul": (100 * tf / ceiling) if ceiling else None}
            del st
            empty_cache()
        except Exception as exc:  # noqa: BLE001
            out["variants"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()
    del ref0
    out.pop("partial", None)
    return out


def _profile_kernels(fn, make_stats, top: int = 6) -> dict:
    """GPU milliseconds per kernel (name -> ms) of one fn(stats) call, the largest first."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    st = make_stats()
    fn(st)                                                   # compiled and warm
    sync()
    st = make_stats()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(st)
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None)
        if t is None:
            t = getattr(ev, "cuda_time_total", 0.0)
        if t and ev.key and not ev.key.startswith(("cudaDeviceSynchronize", "cudaStream")):
            rows.append((ev.key[:60], t / 1e3))
    rows.sort(key=lambda kv: -kv[1])
    out = dict(rows[:top])
    out["(sum of all kernels)"] = sum(t for _, t in rows)
    return out


def _loo_fp16(fac, alphas, X, Y, step=8192):
    """LOO scores like probes.ridge.LooAccumulator, but Z = (X - x̄)V on fp16 tensor cores
    (X - x̄ and V rounded to fp16, float32 accumulation); the rest in float32/float64. For the
    accuracy/speed comparison only (not in probes.ridge)."""
    import torch

    B, d = fac.lam.shape
    k = fac.G.shape[2]
    A = len(alphas)
    a = torch.as_tensor(alphas, device=fac.lam.device, dtype=torch.float64)
    inv = 1.0 / (fac.lam[:, None, :] + a[None, :, None])                     # (B, A, d)
    inv_t = inv.transpose(1, 2).contiguous().float()
    GA = (inv[:, :, :, None] * fac.G[:, None, :, :]).permute(0, 2, 1, 3).reshape(B, d, A * k).float()
    V16 = fac.V.to(torch.float16)
    mean16 = fac.mean.to(torch.float16)[:, None, :]
    sse = torch.zeros(B, A, k, dtype=torch.float64, device=fac.lam.device)
    n = X.shape[1]
    for s in range(0, n, step):
        Xc = X[:, s:s + step] - mean16
        Z = torch.matmul(Xc, V16).float()
        yhat = torch.matmul(Z, GA).double().reshape(B, -1, A, k).add_(fac.ybar)
        h = torch.matmul(Z * Z, inv_t).double().add_(1.0 / fac.n)
        e = (Y[None, s:s + step, None, :] - yhat) / (1.0 - h)[..., None]
        sse += (e * e).sum(1)
    return -(sse / n)


def sec_fit(args, res):
    import numpy as np
    import torch

    from probes.stats import GramStats, choose_shift

    X, _ = gram_data(args)
    B, n, d = X.shape
    L = min(args.fit_layers, B)
    alphas = np.logspace(-2, 5, 25)
    out = {"layers_measured": L, "alphas": len(alphas), "scaled_to": B}
    # targets with a planted linear signal in the first layers (noise level differs by target),
    # so the chosen alphas are not all the largest one and the accuracy comparison means something
    g = torch.Generator(device=DEV).manual_seed(4)
    w = torch.randn(d, 2, device=DEV, generator=g) / d ** 0.5
    Y = (X[0].float() @ w + X[min(1, B - 1)].float() @ w.flip(1)).double()
    Y += torch.randn(n, 2, device=DEV, dtype=torch.float64, generator=g) * Y.std(0) * torch.tensor(
        [0.5, 2.0], device=DEV, dtype=torch.float64)
    k = Y.shape[1]

    # naive torch GPU: per layer float32 X.T @ X and one solve per alpha
    def naive(layers):
        for b in range(layers):
            Xf = X[b].float()
            mu = Xf.mean(0)
            Xf -= mu
            G = Xf.T @ Xf
            R = Xf.T @ (Y.float() - Y.float().mean(0))
            eye = torch.eye(d, device=DEV)
            for a in alphas:
                torch.linalg.solve(G + float(a) * eye, R)
            del Xf, G

    ms, _ = cuda_time(lambda: naive(L), reps=1, warmup=1)
    out["naive_torch_s"] = ms / 1e3 * B / L

    # ours: statistics pass for every layer (best measured Triton variant), then eigh + LOO
    gram = res.get("gram", {}).get("variants", {})
    best = min((v["ms"] for name, v in gram.items()
                if "ms" in v and "folds" not in name and not name.startswith("cublas")),
               default=None)
    out["stats_pass_s"] = best / 1e3 if best is not None else None
    try:
        from probes.ridge import LooAccumulator, primal_factor
    except ImportError as exc:
        out["error"] = f"probes.ridge not importable: {exc}"
        return out
    from probes.kernels import triton_kernels as tk

    shift = choose_shift(X[:L, :2048])
    st = GramStats.zeros(L, d, k, shift=shift, device=DEV)
    tk.gram_update(st, X[:L], Y)
    sync()
    torch.linalg.eigh(torch.eye(64, device=DEV, dtype=torch.float64))      # cusolver start-up
    torch.linalg.eigh(torch.eye(64, device=DEV, dtype=torch.float32))

    facs = {}
    for prec in ("float64", "float32"):
        t0 = time.time()
        facs[prec] = primal_factor(st.n[0], st.sx[:, 0], st.xtx[:, 0], st.sy[0], st.xty[:, 0],
                                   shift=st.shift, precision=prec)
        sync()
        out[f"eigh_{prec}_s"] = (time.time() - t0) * B / L

    # the same factorisation with MAGMA instead of cuSOLVER (timing only)
    if DEV == "cuda":
        lib = torch.backends.cuda.preferred_linalg_library()
        try:
            torch.backends.cuda.preferred_linalg_library("magma")
            for prec in ("float64", "float32"):
                primal_factor(st.n[0], st.sx[:1, 0], st.xtx[:1, 0], st.sy[0], st.xty[:1, 0],
                              shift=st.shift[:1], precision=prec)          # start-up
                sync()
                t0 = time.time()
                primal_factor(st.n[0], st.sx[:, 0], st.xtx[:, 0], st.sy[0], st.xty[:, 0],
                              shift=st.shift, precision=prec)
                sync()
                out[f"eigh_{prec}_magma_s"] = (time.time() - t0) * B / L
        except Exception as exc:  # noqa: BLE001
            out["magma_error"] = f"{type(exc).__name__}: {exc}"
        finally:
            torch.backends.cuda.preferred_linalg_library(lib)

    Yh = Y.cpu().numpy()
    train = np.ones(n, dtype=bool)

    def loo(fac, precision):
        acc = LooAccumulator(fac, alphas, n, keep_predictions=False, precision=precision)
        step = 8192
        for s in range(0, n, step):
            e = min(n, s + step)
            acc.update(s, X[:L, s:e], Yh[s:e], train[s:e])
        return acc.scores()

    # (name, factor precision, LOO flavour): flavours float64 / float32 (TF32 off) / tf32 /
    # fp16 (bench-local, tensor cores for Z)
    combos = [("float64", "float64", "float64"), ("float64 eigh + float32 LOO", "float64", "float32"),
              ("float32", "float32", "float32"), ("float32 + TF32", "float32", "tf32"),
              ("float32 + fp16 Z", "float32", "fp16")]
    out["combos"] = {}
    ref_scores = None
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    for name, fprec, lflav in combos:
        try:
            torch.backends.cuda.matmul.allow_tf32 = lflav == "tf32"
            fac = facs[fprec]
            run = (lambda: _loo_fp16(fac, alphas, X[:L], Y)) if lflav == "fp16" else \
                (lambda: loo(fac, "float64" if lflav == "float64" else "float32"))
            sc = run()                                   # warm-up (and the scores)
            sync()
            t0 = time.time()
            sc = run()
            sync()
            loo_s = (time.time() - t0) * B / L
            sc = sc.double()
            c = {"eigh_s": out[f"eigh_{fprec}_s"], "loo_s": loo_s,
                 "finite": bool(torch.isfinite(sc).all())}
            if ref_scores is None:
                ref_scores = sc
            # chosen alpha per layer (shared by the targets, as the paper) and per target
            pick = sc.mean(2).argmax(1)
            pick_ref = ref_scores.mean(2).argmax(1)
            c["alpha_choices_identical"] = bool(torch.equal(pick, pick_ref))
            c["alpha_per_target_identical"] = bool(torch.equal(sc.argmax(1), ref_scores.argmax(1)))
            c["max_rel_score_diff"] = float(((sc - ref_scores).abs() / ref_scores.abs()).max())
            c["chosen_alpha_index"] = pick.tolist()
            if out["stats_pass_s"] is not None:
                c["total_s"] = out["stats_pass_s"] + c["eigh_s"] + loo_s
                c["speedup_vs_naive"] = out["naive_torch_s"] / c["total_s"]
            out["combos"][name] = c
        except Exception as exc:  # noqa: BLE001
            out["combos"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old_tf32
    # the older summary fields: float64 factor + float32 LOO (the fit's default on GPU)
    c = out["combos"].get("float64 eigh + float32 LOO", {})
    out["eigh_s"], out["loo_pass_s"] = c.get("eigh_s"), c.get("loo_s")
    if "total_s" in c:
        out["ours_total_s"], out["speedup_vs_naive"] = c["total_s"], c["speedup_vs_naive"]
        out["loo_finite"] = c["finite"]
    return out


def sec_neurons(args, res):
    import torch

    from probes.kernels import cuda as ck
    from probes.kernels import triton_kernels as tk
    from probes.neurons import NeuronStats, reference_neuron_update, spearman

    _DATA.clear()
    empty_cache()
    B, n, m = args.layers, args.rows, args.neurons
    free = torch.cuda.mem_get_info()[0] if DEV == "cuda" else 8 << 30
    need = B * n * m * 2
    rows = n
    if need > 0.8 * free:                       # keep within memory: fewer rows, said so
        rows = int(n * 0.8 * free / need)
    g = torch.Generator(device=DEV).manual_seed(3)
    X = torch.randn(B, rows, m, device=DEV, dtype=torch.float16, generator=g)
    X.mul_(0.5).add_(0.1)
    Y = torch.randn(rows, 2, device=DEV, dtype=torch.float64, generator=g) * 40
    nbytes = X.numel() * 2
    ceiling = res.get("ceilings", {}).get("copy_gbs")
    out = {"shape": [B, rows, m], "rows_scaled_down": rows != n, "gbytes": nbytes / 1e9,
           "variants": {}}
    st_ref = NeuronStats.for_chunk(X[:1, :1024], Y[:1024], device=DEV)
    reference_neuron_update(st_ref, X[:1], Y)
    r_ref = st_ref.pearson()
    import functools

    variants = []
    if "triton" in args.backends:
        variants += [("triton {}x{} w{} stages{}".format(*t),
                      functools.partial(tk.neuron_update, tiling=t))
                     for t in tk.moments_tilings()]
    if "cuda" in args.backends:
        if ck.is_available():
            variants.append(("cuda", ck.neuron_update))
        else:
            out["variants"]["cuda"] = {"error": ck.unavailable_reason()}
    for name, fn in variants:
        try:
            st = NeuronStats.for_chunk(X[:, :1024], Y[:1024], device=DEV)
            fn(st, X, Y)
            sync()
            err = float((st.pearson()[0] - r_ref[0]).abs().max())
            ms, ts = cuda_time(lambda: fn(st, X, Y), reps=args.reps, warmup=0)
            gbs = nbytes / (ms * 1e-3) / 1e9
            out["variants"][name] = {"ms": ms, "all_ms": ts, "gbs": gbs,
                                     "pct_of_copy": (100 * gbs / ceiling) if ceiling else None,
                                     "max_abs_err_pearson_layer0": err}
        except Exception as exc:  # noqa: BLE001
            out["variants"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()
    try:
        t0 = time.time()
        rho = spearman(X[0], Y)
        sync()
        out["spearman_one_layer_s"] = time.time() - t0
        out["spearman_finite"] = bool(torch.isfinite(rho).all())
    except Exception as exc:  # noqa: BLE001
        out["spearman_error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    del X
    empty_cache()
    return out


SECTIONS = {"ceilings": sec_ceilings, "gram": sec_gram, "fit": sec_fit, "neurons": sec_neurons}


# ------------------------------------------------------------------------------------ table
def _f(x, fmt="{:.1f}"):
    return "-" if x is None else fmt.format(x)


def _rows(variants: dict, fmt) -> list[str]:
    """One table line per variant: fmt(v) for a measured one, its error otherwise."""
    return [f"  {name:38s} ERROR {v['error'][:90]}" if "error" in v else f"  {name:38s} {fmt(v)}"
            for name, v in variants.items()]


def _kernels_line(km) -> list[str]:
    """The profiler's per-kernel milliseconds of one call, as one line (nothing if absent)."""
    if not isinstance(km, dict):
        return []
    return ["  its GPU time by kernel (profiler, one call): " + "; ".join(
        f"{name} {ms:.2f} ms" if isinstance(ms, float) else f"{name} {ms}"
        for name, ms in km.items())]


def table(res) -> str:
    lines = [f"device: {res.get('device')}  torch {res.get('torch')}  triton {res.get('triton')}"]
    c = res.get("ceilings", {})
    lines.append(f"ceiling fp16 matmul      {_f(c.get('matmul_fp16_tflops'))} TFLOP/s")
    lines.append(f"ceiling d2d copy         {_f(c.get('copy_gbs'), '{:.0f}')} GB/s")
    g = res.get("gram", {})
    if "shape" in g:
        lines.append(f"gram pass {'x'.join(map(str, g['shape']))} fp16  (target >= 60% of matmul)")
    lines += _rows(g.get("variants", {}), lambda v: (
        f"{v['ms']:9.1f} ms {v['tflops']:7.1f} TFLOP/s {_f(v.get('pct_of_matmul'))}%  "
        f"relerr {_f(v.get('rel_err_xtx_layer0'), '{:.1e}')}"
        + (f"  paths {v['paths']}" if len(v.get("paths") or {}) > 1 else "")))
    if "best_preshift" in g:
        lines.append(f"  best preshift (gram_update's default for this d in this process): "
                     f"{g['best_preshift']['name']}, {g['best_preshift'].get('groups', 1)} group(s), "
                     f"pre-shift tiling {g['best_preshift'].get('prep')}")
        lines += _kernels_line(g["best_preshift"].get("kernels_ms"))
    lines += _rows(g.get("moments", {}), lambda v: (
        f"{v['ms']:9.1f} ms {v['gbs']:7.0f} GB/s {_f(v.get('pct_of_copy'))}% of copy"))
    if "best_moments" in g:
        lines.append(f"  best Triton moments tiling: {g['best_moments']['tiling']} "
                     f"{g['best_moments']['ms']:.1f} ms; rawtma's sums from "
                     f"{g['best_moments'].get('rawtma_sums', 'triton')}")
    if "best_rawtma" in g:
        br = g["best_rawtma"]
        lines.append(f"  best rawtma: {_cfg_name(br['config'])} {br['ms']:.1f} ms; default mode now "
                     f"{g.get('default_mode')}")
        lines += _kernels_line(br.get("kernels_ms"))
    if "error" in g:
        lines.append(f"  gram ERROR {g['error'][:100]}")
    f = res.get("fit", {})
    if f:
        lines.append(f"whole fit (25 alphas, LOO; eigh+LOO measured on {f.get('layers_measured')} "
                     f"layers, scaled to {f.get('scaled_to')})")
        lines.append(f"  ours: stats {_f(f.get('stats_pass_s'), '{:.2f}')} s + eigh "
                     f"{_f(f.get('eigh_s'), '{:.2f}')} s + LOO {_f(f.get('loo_pass_s'), '{:.2f}')} s = "
                     f"{_f(f.get('ours_total_s'), '{:.2f}')} s;  naive torch GPU "
                     f"{_f(f.get('naive_torch_s'), '{:.2f}')} s;  speedup {_f(f.get('speedup_vs_naive'), '{:.1f}')}x")
        lines.append(f"  eigh of {f.get('scaled_to')} layers: cuSOLVER float64 {_f(f.get('eigh_float64_s'), '{:.2f}')} s, "
                     f"float32 {_f(f.get('eigh_float32_s'), '{:.2f}')} s; MAGMA float64 "
                     f"{_f(f.get('eigh_float64_magma_s'), '{:.2f}')} s, float32 "
                     f"{_f(f.get('eigh_float32_magma_s'), '{:.2f}')} s")
        for name, c in f.get("combos", {}).items():
            if "error" in c:
                lines.append(f"  {name:28s} ERROR {c['error'][:90]}")
                continue
            lines.append(f"  {name:28s} eigh {c['eigh_s']:.2f} s + LOO {c['loo_s']:.2f} s = "
                         f"{_f(c.get('total_s'), '{:.2f}')} s ({_f(c.get('speedup_vs_naive'), '{:.1f}')}x naive); "
                         f"alphas same: {c['alpha_choices_identical']}/{c['alpha_per_target_identical']}"
                         f" max|dscore| {c['max_rel_score_diff']:.1e}")
        if "error" in f:
            lines.append(f"  fit ERROR {f['error'][:100]}")
    nr = res.get("neurons", {})
    if "shape" in nr:
        lines.append(f"neurons {'x'.join(map(str, nr['shape']))} fp16, 2 targets "
                     f"({nr['gbytes']:.1f} GB; target >= 60% of copy)"
                     + ("  [rows scaled down to fit memory]" if nr.get("rows_scaled_down") else ""))
    lines += _rows(nr.get("variants", {}), lambda v: (
        f"{v['ms']:9.1f} ms {v['gbs']:7.0f} GB/s {_f(v.get('pct_of_copy'))}%  "
        f"max|dr| {_f(v.get('max_abs_err_pearson_layer0'), '{:.1e}')}"))
    if "spearman_one_layer_s" in nr:
        lines.append(f"  spearman, one layer        {nr['spearman_one_layer_s']:.2f} s")
    if "error" in nr:
        lines.append(f"  neurons ERROR {nr['error'][:100]}")
    for sec in SECTIONS:
        if isinstance(res.get(sec), dict) and "traceback" in res[sec]:
            lines.append(f"{sec}: FAILED {res[sec]['error'][:100]}")
        for e in (res.get(sec) or {}).get("merge_errors", []) if isinstance(res.get(sec), dict) else []:
            lines.append(f"{sec} (second process): FAILED {e[:100]}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--rows", type=int, default=40000)
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--neurons", type=int, default=11008)
    p.add_argument("--fit-layers", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--tune-configs", type=int, default=0,
                   help="tune the older shift-in/raw kernels over this many configs first")
    p.add_argument("--groups", default="4,8",
                   help="layer-group counts for the overlapped pre-shift pass ('' = none)")
    p.add_argument("--no-old-modes", action="store_true",
                   help="time only the preshift mode (not shift-in / raw+fix)")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cuda", help="cpu: dry run of the logic (TRITON_INTERPRET=1)")
    p.add_argument("--backends", default="triton,cuda", help="kernel variants to time")
    p.add_argument("--merge", action="store_true",
                   help="add to an existing --json (e.g. the CUDA variants from a second process, "
                        "so a crash there cannot take the Triton numbers with it)")
    p.add_argument("--table-only", action="store_true", help="print the table of an existing --json")
    args = p.parse_args(argv)
    if args.table_only:
        print(table(json.loads(Path(args.json).read_text())))
        return 0
    import torch
    import triton

    res = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           "torch": torch.__version__, "triton": triton.__version__, "args": vars(args),
           "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    if args.merge and args.json and Path(args.json).exists():
        old = json.loads(Path(args.json).read_text())
        old.setdefault("merged_args", []).append(vars(args))
        res = old
    global DEV
    DEV = args.device
    if DEV == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark")
        return 1

    def save():
        # temporary file + rename: a run killed by its time limit mid-save keeps the last JSON
        if args.json:
            tmp = Path(args.json + ".partial")
            tmp.write_text(json.dumps(res, indent=1, default=str))
            tmp.replace(args.json)

    global CHECKPOINT
    CHECKPOINT = save

    for sec in [s for s in args.sections.split(",") if s]:
        t0 = time.time()
        print(f"=== {sec}", flush=True)
        try:
            new = SECTIONS[sec](args, res)
            if args.merge and isinstance(res.get(sec), dict) and "variants" in res[sec]:
                res[sec]["variants"].update(new.get("variants", {}))
            else:
                res[sec] = new
        except Exception as exc:  # noqa: BLE001 - record and go on
            traceback.print_exc()
            err = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            if args.merge and isinstance(res.get(sec), dict):
                res[sec].setdefault("merge_errors", []).append(err["error"])
            elif isinstance(res.get(sec), dict) and res[sec].get("partial"):
                res[sec].update(err)          # keep what the section measured before it failed
            else:
                res[sec] = err
        res.setdefault("seconds", {})[sec] = time.time() - t0
        print(f"=== {sec} done in {time.time() - t0:.1f} s", flush=True)
        save()
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
