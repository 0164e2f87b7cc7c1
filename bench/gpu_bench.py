"""GPU benchmarks of the statistics pass, the neuron correlations and the whole fit.

    python -m bench.gpu_bench [--sections ceilings,gram,fit,neurons,wgram] [--json bench.json]

Run on a GPU machine (bench/gpu_check.sh calls it). Every section is independent: a failing
section records its error and the others still run. Results go to --json after each variant
(a run cut off by a time limit keeps what it measured) and a short table is printed at the end.
Each ``sec_*`` function's docstring says what it measures. The Triton tilings and mode the gram
section finds fastest go into ``probes.kernels.triton.TUNING``, so the fit section uses them.
``--device cpu`` with TRITON_INTERPRET=1 and tiny sizes dry-runs the logic.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from probes.kernels import cuda as ck
from probes.kernels.reference import neuron_update as reference_neuron_update
from probes.neurons import spearman
from probes.stats import GramStats, NeuronStats, choose_shift

try:  # the fit section records an error instead of failing the whole bench
    from probes.ridge import LooAccumulator, primal_factor
    _RIDGE_ERROR = ""
except ImportError as exc:
    LooAccumulator = primal_factor = None
    _RIDGE_ERROR = f"probes.ridge not importable: {exc}"

DEV = "cuda"   # --device cpu (with TRITON_INTERPRET=1, tiny sizes) dry-runs the script's logic
# main() points this at its JSON writer: sections call it after each variant, so a run cut off by
# a time limit keeps every number measured so far
CHECKPOINT = lambda: None  # noqa: E731


def triton_backend():
    """probes.kernels.triton, imported on first use: Triton is an optional dependency, and
    ``--table-only`` or a CUDA-only run need none."""
    from probes.kernels import triton as tk  # deferred: optional dependency (see docstring)

    return tk


def cuda_time(fn, reps=5, warmup=1):
    """Median milliseconds of fn() over reps runs (CUDA events), after warmup runs."""
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
    if DEV == "cuda":
        torch.cuda.synchronize()


def empty_cache():
    if DEV == "cuda":
        torch.cuda.empty_cache()


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _error(exc) -> dict:
    return {"error": f"{type(exc).__name__}: {exc}"}


# ------------------------------------------------------------------------------------ sections
def _matmul_ms(n: int) -> float:
    a = torch.randn(n, n, device=DEV, dtype=torch.float16)
    b = torch.randn(n, n, device=DEV, dtype=torch.float16)
    c = torch.empty(n, n, device=DEV, dtype=torch.float16)
    return cuda_time(lambda: torch.mm(a, b, out=c), reps=10, warmup=3)[0]


def _copy_ms(nbytes: int) -> float:
    src = torch.randn(nbytes // 4, device=DEV, dtype=torch.float32)
    dst = torch.empty_like(src)
    return cuda_time(lambda: dst.copy_(src), reps=10, warmup=3)[0]


def sec_ceilings(args, res):
    """The card's two ceilings, measured here: a large fp16 matrix product (TFLOP/s, random
    data, median of repeated runs timed with CUDA events) and a large device-to-device copy
    (GB/s, bytes read + bytes written)."""
    n, nbytes = 8192, 4 << 30
    ms = _matmul_ms(n)
    out = {"matmul_fp16_tflops": 2 * n ** 3 / (ms * 1e-3) / 1e12, "matmul_ms": ms}
    ms = _copy_ms(nbytes)
    out.update(copy_gbs=2 * nbytes / (ms * 1e-3) / 1e9, copy_ms=ms)
    empty_cache()
    return out


_DATA = {}


def gram_data(args):
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


def _cfg_name(cfg) -> str:
    bm, bn, br, warps, stages, tma = cfg
    return f"{bm}x{bn}x{br} w{warps} s{stages} {'tma' if tma else 'ptr'}"


class GramBench:
    """The gram section's data, float64 reference of layer 0, output dict and timers."""

    def __init__(self, args, res, tk):
        self.args, self.tk = args, tk
        self.X, self.Y = gram_data(args)
        self.B, self.n, self.d = self.X.shape
        self.k = self.Y.shape[1]
        self.dev = self.X.device
        self.shift = choose_shift(self.X[:, :2048])
        self.useful = self.B * self.n * self.d * (self.d + 1)
        self.ceiling = res.get("ceilings", {}).get("matmul_fp16_tflops")
        self.copy_ceiling = res.get("ceilings", {}).get("copy_gbs")
        self.out = {"shape": [self.B, self.n, self.d], "useful_tflop": self.useful / 1e12,
                    "variants": {}}
        # float64 reference of layer 0 (on the GPU), for the accuracy column
        Xd = self.X[0].double() - self.shift[0].to(DEV)
        self.ref0 = Xd.T @ Xd

    def stats(self, n_folds: int = 1) -> GramStats:
        return GramStats.zeros(self.B, self.d, self.k, n_folds, shift=self.shift, device=DEV)

    def update(self, **kw):
        """fn(stats, fold=None): the Triton gram_update of the whole set with these options."""
        return lambda st, f=None: self.tk.gram_update(st, self.X, self.Y, f, **kw)

    def timed(self, name, fn, check=True):
        """Time fn(stats) on fresh statistics (one untimed call first: compile + accuracy);
        record it under ``name``; return the milliseconds, or None when it failed."""
        try:
            st = self.stats()
            before = dict(self.tk.TUNING.paths)
            fn(st)
            sync()
            took = self.tk.TUNING.paths_since(before)
            err = rel_err(st.xtx[0, 0], self.ref0) if check else None
            ms, ts = cuda_time(lambda: fn(st), reps=self.args.reps, warmup=0)
        except Exception as exc:  # noqa: BLE001 - keep the other variants
            self.out["variants"][name] = _error(exc)
            traceback.print_exc()
            return None
        tf = self.useful / (ms * 1e-3) / 1e12
        self.out["variants"][name] = {
            "ms": ms, "all_ms": ts, "tflops": tf, "rel_err_xtx_layer0": err, "paths": took,
            "pct_of_matmul": (100 * tf / self.ceiling) if self.ceiling else None}
        print(f"  {name}: {ms:.2f} ms, {tf:.1f} TFLOP/s", flush=True)
        CHECKPOINT()
        empty_cache()
        return ms

    def time_pass(self, name, fn):
        """Milliseconds of a bandwidth pass fn() (one untimed call first), recorded with the
        GB/s of the chunk read once; None when it failed."""
        try:
            fn()
            ms, ts = cuda_time(fn, reps=self.args.reps, warmup=0)
        except Exception as exc:  # noqa: BLE001
            self.out["moments"][name] = _error(exc)
            traceback.print_exc()
            return None
        gbs = self.X.numel() * 2 / (ms * 1e-3) / 1e9
        self.out["moments"][name] = {
            "ms": ms, "all_ms": ts, "gbs": gbs,
            "pct_of_copy": (100 * gbs / self.copy_ceiling) if self.copy_ceiling else None}
        print(f"  {name}: {ms:.2f} ms, {gbs:.0f} GB/s", flush=True)
        CHECKPOINT()
        return ms

    def profile(self, fn) -> dict | None:
        """The GPU milliseconds per kernel of one fn(stats) call, or the error (None off a GPU)."""
        if DEV != "cuda":
            return None
        try:
            return _profile_kernels(fn, self.stats)
        except Exception as exc:  # noqa: BLE001
            return _error(exc)


def _gram_tune_older(g: GramBench) -> None:
    """--tune-configs N: tune the older shift-in / raw kernels over the first N tilings."""
    tk, t0, tuned = g.tk, time.time(), {}
    for sik in (True, False):
        cfg = tk.tune_gram(g.d, g.dev, B=2, rows=8192, shift_in_kernel=sik,
                           configs=tk.gram_configs()[:g.args.tune_configs], verbose=True)
        tuned[sik] = list(cfg)
    g.out["tuned"] = {"shift_in_kernel": tuned[True], "raw": tuned[False],
                      "seconds": time.time() - t0,
                      "timings_ms": {f"{key[2]} {c}": t for key, v in tk.TUNING.log.items()
                                     if key[2] in ("shift-in", "raw") for c, t in v.items()}}


def _gram_variants(g: GramBench, use_triton: bool, use_cuda: bool) -> list:
    """(name, fn(stats, fold=None)) of every whole-set variant: preshift at every tiling, the
    older modes, cuBLAS for context, the CUDA module."""
    tk, variants = g.tk, []
    if use_triton:
        variants += [(f"triton preshift {_cfg_name(cfg)}", g.update(mode="preshift", config=cfg))
                     for cfg in tk.preshift_configs()]
        if not g.args.no_old_modes:
            # the older modes with the tiling the H200 run of 27 Nov 2026 tuned for both
            h200 = None if tk.INTERPRET else tk.GramConfig(128, 128, 64, 8, 3, False)
            old = tk.TUNING.get(g.d, g.dev, "shift-in") or h200
            old_raw = tk.TUNING.get(g.d, g.dev, "raw") or h200
            variants += [("triton shift-in", g.update(mode="shift-in", config=old)),
                         ("triton raw+fix", g.update(mode="raw", config=old_raw))]
    if use_triton and DEV == "cuda":
        # context, not statistics: cuBLAS full square XᵀX per layer (fp16 out, 2x the useful work)
        Gtmp = torch.empty(g.d, g.d, device=DEV, dtype=torch.float16)

        def cublas_full(st, f=None):
            for b in range(g.B):
                torch.matmul(g.X[b].T, g.X[b], out=Gtmp)
        variants.append(("cublas full XtX (reference only)", cublas_full))
    if use_cuda:
        if ck.is_available():
            variants.append(("cuda wmma", lambda st, f=None: ck.gram_update(st, g.X, g.Y, f)))
        else:
            g.out["variants"]["cuda wmma"] = {"error": ck.unavailable_reason()}
    return variants


def _gram_moments(g: GramBench) -> None:
    """rawtma's column sums: the moments kernel's tilings on this data (GB/s of the chunk read
    once) and the CUDA module's moments kernel; the fastest becomes rawtma's source."""
    tk = g.tk
    Y32 = g.Y.to(torch.float32)
    sh32 = g.shift.to(device=g.dev, dtype=torch.float32)
    g.out["moments"] = {}
    mom = {}
    for t in tk.moments_tilings():
        ms = g.time_pass("triton moments {}x{} w{} stages{}".format(*t),
                         lambda t=t: tk.moments(g.X, Y32, sh32, squares=True, tiling=t))
        if ms is not None:
            mom[t] = ms
    if ck.is_available():
        z = dict(dtype=torch.float64, device=g.dev)
        ms = g.time_pass("cuda moments (for rawtma's sums)", lambda: ck.moments(
            g.X, Y32, sh32, torch.zeros(g.B, 1, g.d, **z), torch.zeros(g.B, 1, g.d, g.k, **z),
            torch.zeros(g.B, 1, g.d, **z)))
        if ms is not None and (not mom or ms < min(mom.values())):
            tk.TUNING.set(g.d, g.dev, "rawtma_sums", "cuda")
            g.out["rawtma_sums"] = "cuda"
    if mom:
        best = min(mom, key=mom.get)
        tk.TUNING.set(g.d, g.dev, "moments", best)
        g.out["best_moments"] = {"tiling": list(best), "ms": mom[best],
                                 "rawtma_sums": g.out.get("rawtma_sums", "triton")}


def _gram_rawtma(g: GramBench):
    """"rawtma" (no pre-shift pass: the raw chunk read in place through TMA and centred in
    float64 in the add pass) at every TMA tiling; the fastest is remembered; returns it."""
    tk, raw_ms = g.tk, {}
    for cfg in tk.rawtma_configs():
        name = f"triton rawtma {_cfg_name(cfg)}"
        ms = g.timed(name, g.update(mode="rawtma", config=cfg))
        # only a time of the rawtma path itself counts (its guard may hand data to preshift)
        if ms is not None and set(g.out["variants"][name]["paths"]) == {"rawtma"}:
            raw_ms[cfg] = ms
    if not raw_ms:
        return None
    best = min(raw_ms, key=raw_ms.get)
    tk.TUNING.set(g.d, g.dev, "rawtma", best)
    g.out["best_rawtma"] = {"config": list(best), "ms": raw_ms[best],
                            "kernels_ms": g.profile(g.update(mode="rawtma", config=best))}
    CHECKPOINT()
    return best


def _gram_best_preshift(g: GramBench, pre: dict, best_raw) -> None:
    """The fastest preshift tiling becomes gram_update's default for this d; then the pre-shift
    pass's tilings and layer groups with it; the faster of preshift and rawtma becomes the
    default mode (the fit section uses it); separate vs fused float64 add re-timed side by side
    (the card's clocks drift by several percent between minutes); kernels by time (profiler)."""
    tk = g.tk
    best_name = min(pre, key=pre.get)
    best_cfg = next(c for c in tk.preshift_configs() if best_name.endswith(_cfg_name(c)))
    tk.TUNING.set(g.d, g.dev, "preshift", best_cfg)
    best_groups, best_ms = 1, pre[best_name]
    prep_ms = {}
    for prep in tk.prep_tilings():
        ms = g.timed("triton preshift best, prep {}x{} w{} rows{} stages{}".format(*prep),
                     g.update(mode="preshift", config=best_cfg, prep=prep), check=False)
        if ms is not None:
            prep_ms[prep] = ms
    if prep_ms:
        best_prep = min(prep_ms, key=prep_ms.get)
        tk.TUNING.set(g.d, g.dev, "prep", best_prep)
        g.out["best_prep"] = list(best_prep)
        best_ms = min(best_ms, prep_ms[best_prep])
    for groups in [int(x) for x in g.args.groups.split(",") if x]:
        ms = g.timed(f"triton preshift best, {groups} layer groups",
                     g.update(mode="preshift", config=best_cfg, groups=groups))
        if ms is not None and ms < best_ms:
            best_groups, best_ms = groups, ms
    tk.TUNING.set(g.d, g.dev, "preshift groups", best_groups)
    g.out["best_preshift"] = {"name": best_name, "config": list(best_cfg), "groups": best_groups,
                              "prep": g.out.get("best_prep"), "ms": best_ms}
    if best_raw is not None and g.out["best_rawtma"]["ms"] < best_ms:
        tk.TUNING.set(g.d, g.dev, "mode", "rawtma")
    g.out["default_mode"] = tk.TUNING.get(g.d, g.dev, "mode", "preshift")
    CHECKPOINT()
    best = dict(mode="preshift", config=best_cfg, groups=best_groups)
    g.timed("triton preshift best (separate add), re-timed", g.update(**best), check=False)
    g.timed("triton preshift best, fused float64 add", g.update(**best, fused_add=True),
            check=False)
    g.out["best_preshift"]["kernels_ms"] = g.profile(g.update(**best))


def _gram_folds(g: GramBench) -> None:
    """4 folds with 20 % test rows: preshift (rows sorted by fold in the pre-shift pass),
    rawtma on rows sorted by fold (in place) and interleaved (one gather copy, the fit's case),
    and the older gathered shift-in kernel."""
    tk = g.tk
    gen = torch.Generator(device=DEV).manual_seed(2)
    fold = torch.randint(-1, 4, (g.n,), device=DEV, dtype=torch.int32, generator=gen)
    kept = int((fold >= 0).sum())
    sorted_fold = torch.sort(fold).values.to(torch.int32)
    modes = [("preshift", fold, "triton 4 folds + test rows")]
    if "best_rawtma" in g.out:
        modes += [("rawtma", sorted_fold,
                   "triton rawtma 4 folds (rows sorted by fold) + test rows"),
                  ("rawtma", fold, "triton rawtma 4 folds + test rows (one gather copy)")]
    if not g.args.no_old_modes:
        modes.append(("shift-in", fold, "triton 4 folds (shift-in)"))
    for mode, fm, name in modes:
        try:
            st = g.stats(n_folds=4)
            cfg = (None if mode in ("preshift", "rawtma") or tk.INTERPRET
                   else tk.GramConfig(128, 128, 64, 8, 3, False))
            fn = g.update(mode=mode, config=cfg)
            before = dict(tk.TUNING.paths)
            fn(st, fm)
            took = tk.TUNING.paths_since(before)
            ms, _ = cuda_time(lambda: fn(st, fm), reps=max(2, g.args.reps // 2), warmup=0)
            tf = g.B * kept * g.d * (g.d + 1) / (ms * 1e-3) / 1e12
            g.out["variants"][name] = {"ms": ms, "tflops": tf, "paths": took,
                                       "pct_of_matmul": (100 * tf / g.ceiling)
                                       if g.ceiling else None}
            st = None
            empty_cache()
        except Exception as exc:  # noqa: BLE001
            g.out["variants"][name] = _error(exc)
            traceback.print_exc()


def sec_gram(args, res):
    """The statistics pass on a Llama-2-7B-shaped synthetic set (--layers x --rows x --d fp16,
    generated on the device), every backend variant: achieved TFLOP/s count the useful work,
    B·n·d·(d+1) flops (the upper triangle of XᵀX incl. the diagonal, 2 flops per multiply-add);
    target >= 60% of the matmul ceiling; accuracy vs float64 on one layer. Variants: preshift
    (the default mode) at every tiling, then its pre-shift tilings and layer groups; rawtma at
    every TMA tiling with its column sums' source; the older shift-in and raw+fix modes (unless
    --no-old-modes); 4 folds with 20% test rows. The fastest become the defaults (TUNING)."""
    tk = triton_backend() if "triton" in args.backends else None
    g = GramBench(args, res, tk)
    if not args.merge:
        res["gram"] = g.out          # partial results reach the JSON at every checkpoint
        g.out["partial"] = True
    use_triton, use_cuda = tk is not None, "cuda" in args.backends
    if use_triton and args.tune_configs > 0:
        _gram_tune_older(g)
    for name, fn in _gram_variants(g, use_triton, use_cuda):
        g.timed(name, fn, check=not name.startswith("cublas"))
    pre = {n: v["ms"] for n, v in g.out["variants"].items()
           if n.startswith("triton preshift") and "ms" in v}
    best_raw = None
    if use_triton:
        # rawtma next (the likeliest to reach the target, so a cut-off run still has it)
        _gram_moments(g)
        best_raw = _gram_rawtma(g)
    if pre:
        _gram_best_preshift(g, pre, best_raw)
    if use_triton:
        _gram_folds(g)
    g.out.pop("partial", None)
    return g.out


def _profile_kernels(fn, make_stats, top: int = 6) -> dict:
    """GPU milliseconds per kernel (name -> ms) of one fn(stats) call, the largest first."""
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
    B, d = fac.lam.shape
    k = fac.G.shape[2]
    A = len(alphas)
    a = torch.as_tensor(alphas, device=fac.lam.device, dtype=torch.float64)
    inv = 1.0 / (fac.lam[:, None, :] + a[None, :, None])                     # (B, A, d)
    inv_t = inv.transpose(1, 2).contiguous().float()
    GA = (inv[:, :, :, None] * fac.G[:, None, :, :]).permute(0, 2, 1, 3)
    GA = GA.reshape(B, d, A * k).float()
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
    """The whole fit --all-layers (25 alphas, exact LOO, primal form) = statistics pass (all
    layers, best measured variant) + batched eigendecomposition + LOO pass (measured on
    --fit-layers layers, scaled linearly to all layers), next to a naive torch GPU fit (per
    layer float32 X.T @ X and torch.linalg.solve per alpha; measured on --fit-layers layers,
    scaled). Targets carry a planted linear signal. Combos: eigh float64|float32 (probes.ridge's
    guarded floor) x LOO projection float64|float32|TF32|fp16 (fp16: bench-local copy of the
    LOO maths with Z = (X - x̄)V on fp16 tensor cores); for each, whether the chosen alphas (per
    layer and per target) equal the float64 ones and the largest relative score difference.
    eigh is also timed with MAGMA."""
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
    if _RIDGE_ERROR:
        out["error"] = _RIDGE_ERROR
        return out
    tk = triton_backend()
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
    combos = [("float64", "float64", "float64"),
              ("float64 eigh + float32 LOO", "float64", "float32"),
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
    """Σx, Σx², Σxy over --layers x --rows x --neurons fp16 with 2 targets: achieved GB/s
    (activation bytes read once) vs the copy ceiling (target >= 60%), every Triton moments
    tiling and the CUDA module; Spearman for one layer."""
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
    variants = []
    if "triton" in args.backends:
        tk = triton_backend()
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
    X = None                                     # frees the activations before the cache
    empty_cache()
    return out

def _wgram_variants(args) -> list:
    """(name, fn(X, w, out)) of the weighted Gram variants --backends asks for, plus the peer a
    user would write in torch: M cuBLAS fp16 matmuls (x·w rounded to fp16: ~1e-3 accurate)."""
    variants = []
    if "triton" in args.backends:
        tk = triton_backend()
        variants += [("triton {}x{} r{} w{} s{}".format(*c),
                      functools.partial(tk.weighted_gram, config=c)) for c in tk.WEIGHTED_CONFIGS]
    if "cuda" in args.backends:
        variants.append(("cuda (float64 out)", ck.weighted_gram))

    def torch_fp16(X, w, out):
        for m in range(w.shape[0]):
            out[:, m] += (X * w[m, None, :, None].to(X.dtype)).transpose(1, 2) @ X
        return out
    variants.append(("torch fp16 bmm per weight set", torch_fp16))
    return variants


def _wgram_shape(args, shape, out: dict) -> None:
    """One shape B x n x d, M weight sets: every variant's ms, TFLOP/s (2·B·M·n·d², as a GEMM),
    GB/s (X read once + w + G written) and error vs float64 on layer 0; the unweighted Gram."""
    from probes.kernels import reference
    B, n, d, M = shape
    g = torch.Generator(device=DEV).manual_seed(5)
    X = (torch.randn(B, n, d, device=DEV, generator=g) * 1.5 + 0.3).to(torch.float16)
    p = torch.rand(M, n, device=DEV, generator=g)
    w = p * (1 - p)                                       # IRLS weights p(1 - p)
    ref = reference.weighted_gram(X[:1], w, out=torch.zeros(1, M, d, d, dtype=torch.float64,
                                                            device=DEV))
    flops, nbytes = 2.0 * B * M * n * d * d, X.numel() * 2 + w.numel() * 4 + B * M * d * d * 4
    rec = out.setdefault(f"{B}x{n}x{d} M={M}", {"shape": list(shape), "variants": {}})
    for name, fn in _wgram_variants(args):
        try:
            dt = torch.float64 if name.startswith("cuda") else torch.float32
            dt = torch.float16 if name.startswith("torch") else dt
            G = torch.zeros(B, M, d, d, dtype=dt, device=DEV)
            fn(X, w, G)
            sync()
            err = rel_err(G[:1], ref)
            ms, ts = cuda_time(lambda: fn(X, w, G), reps=args.reps, warmup=0)
            rec["variants"][name] = {"ms": ms, "all_ms": ts, "tflops": flops / ms / 1e9,
                                     "gbs": nbytes / ms / 1e6, "rel_err_layer0": err}
        except Exception as exc:  # noqa: BLE001
            rec["variants"][name] = _error(exc)
            traceback.print_exc()
        G = None
        empty_cache()
        CHECKPOINT()
    if "triton" in args.backends:          # the unweighted Gram of the same X (one target)
        try:
            st = GramStats.zeros(B, d, 1, shift=choose_shift(X[:, :64]), device=DEV)
            Y = torch.randn(n, 1, device=DEV, dtype=torch.float64)
            ms, _ = cuda_time(lambda: triton_backend().gram_update(st, X, Y), reps=args.reps)
            rec["unweighted_gram_triton"] = {"ms": ms, "tflops": 2.0 * B * n * d * d / ms / 1e9}
        except Exception as exc:  # noqa: BLE001
            rec["unweighted_gram_triton"] = _error(exc)
        st = None
        empty_cache()


def sec_wgram(args, res):
    """The weighted Gram XᵀWX (Newton/IRLS Hessians, probes.kernels.weighted_gram) on
    --wgram-shapes (BxNxDxM, default 32x4000x4096x5 and 30x20000x576x5), every variant of
    --backends next to the unweighted Triton Gram of the same X and a torch fp16 peer."""
    out = {"partial": True}
    res["wgram"] = out
    for spec in args.wgram_shapes.split(","):
        _wgram_shape(args, tuple(int(v) for v in spec.split("x")), out)
    out.pop("partial")
    return out


SECTIONS = {"ceilings": sec_ceilings, "gram": sec_gram, "fit": sec_fit, "neurons": sec_neurons,
            "wgram": sec_wgram}
#: what runs without --sections (the weighted Gram has its own gpu_check.sh step)
DEFAULT_SECTIONS = ("ceilings", "gram", "fit", "neurons")


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


def _s(x) -> str:
    """Seconds with two decimals, or '-'."""
    return _f(x, "{:.2f}")


def _gram_lines(g: dict) -> list[str]:
    lines = []
    if "shape" in g:
        lines.append(f"gram pass {'x'.join(map(str, g['shape']))} fp16  (target >= 60% of matmul)")
    lines += _rows(g.get("variants", {}), lambda v: (
        f"{v['ms']:9.1f} ms {v['tflops']:7.1f} TFLOP/s {_f(v.get('pct_of_matmul'))}%  "
        f"relerr {_f(v.get('rel_err_xtx_layer0'), '{:.1e}')}"
        + (f"  paths {v['paths']}" if len(v.get("paths") or {}) > 1 else "")))
    if "best_preshift" in g:
        bp = g["best_preshift"]
        lines.append(f"  best preshift (gram_update's default for this d in this process): "
                     f"{bp['name']}, {bp.get('groups', 1)} group(s), "
                     f"pre-shift tiling {bp.get('prep')}")
        lines += _kernels_line(bp.get("kernels_ms"))
    lines += _rows(g.get("moments", {}), lambda v: (
        f"{v['ms']:9.1f} ms {v['gbs']:7.0f} GB/s {_f(v.get('pct_of_copy'))}% of copy"))
    if "best_moments" in g:
        lines.append(f"  best Triton moments tiling: {g['best_moments']['tiling']} "
                     f"{g['best_moments']['ms']:.1f} ms; rawtma's sums from "
                     f"{g['best_moments'].get('rawtma_sums', 'triton')}")
    if "best_rawtma" in g:
        br = g["best_rawtma"]
        lines.append(f"  best rawtma: {_cfg_name(br['config'])} {br['ms']:.1f} ms; "
                     f"default mode now {g.get('default_mode')}")
        lines += _kernels_line(br.get("kernels_ms"))
    if "error" in g:
        lines.append(f"  gram ERROR {g['error'][:100]}")
    return lines


def _fit_lines(f: dict) -> list[str]:
    if not f:
        return []
    lines = [f"whole fit (25 alphas, LOO; eigh+LOO measured on {f.get('layers_measured')} "
             f"layers, scaled to {f.get('scaled_to')})",
             f"  ours: stats {_s(f.get('stats_pass_s'))} s + eigh {_s(f.get('eigh_s'))} s + LOO "
             f"{_s(f.get('loo_pass_s'))} s = {_s(f.get('ours_total_s'))} s;  naive torch GPU "
             f"{_s(f.get('naive_torch_s'))} s;  "
             f"speedup {_f(f.get('speedup_vs_naive'), '{:.1f}')}x",
             f"  eigh of {f.get('scaled_to')} layers: cuSOLVER float64 "
             f"{_s(f.get('eigh_float64_s'))} s, float32 {_s(f.get('eigh_float32_s'))} s; "
             f"MAGMA float64 {_s(f.get('eigh_float64_magma_s'))} s, "
             f"float32 {_s(f.get('eigh_float32_magma_s'))} s"]
    for name, c in f.get("combos", {}).items():
        if "error" in c:
            lines.append(f"  {name:28s} ERROR {c['error'][:90]}")
            continue
        lines.append(f"  {name:28s} eigh {c['eigh_s']:.2f} s + LOO {c['loo_s']:.2f} s = "
                     f"{_s(c.get('total_s'))} s "
                     f"({_f(c.get('speedup_vs_naive'), '{:.1f}')}x naive); alphas same: "
                     f"{c['alpha_choices_identical']}/{c['alpha_per_target_identical']}"
                     f" max|dscore| {c['max_rel_score_diff']:.1e}")
    if "error" in f:
        lines.append(f"  fit ERROR {f['error'][:100]}")
    return lines


def _neuron_lines(nr: dict) -> list[str]:
    lines = []
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
    return lines


def _wgram_lines(wg: dict) -> list[str]:
    lines = []
    for key, rec in wg.items():
        if not isinstance(rec, dict) or "variants" not in rec:
            continue
        lines.append(f"weighted gram {key} fp16 (TFLOP/s as 2·B·M·n·d²)")
        lines += _rows(rec["variants"], lambda v: (
            f"{v['ms']:9.1f} ms {v['tflops']:7.1f} TFLOP/s {v['gbs']:7.0f} GB/s  "
            f"rel err {v['rel_err_layer0']:.1e}"))
        u = rec.get("unweighted_gram_triton", {})
        if "ms" in u:
            lines.append(f"  {'unweighted gram (triton, M=1)':38s} {u['ms']:9.1f} ms "
                         f"{u['tflops']:7.1f} TFLOP/s")
    if "error" in wg:
        lines.append(f"  wgram ERROR {wg['error'][:100]}")
    return lines


def table(res) -> str:
    """The short summary of a result dict (or a --json file) printed at the end."""
    c = res.get("ceilings", {})
    lines = [f"device: {res.get('device')}  torch {res.get('torch')}  triton {res.get('triton')}",
             f"ceiling fp16 matmul      {_f(c.get('matmul_fp16_tflops'))} TFLOP/s",
             f"ceiling d2d copy         {_f(c.get('copy_gbs'), '{:.0f}')} GB/s"]
    lines += _gram_lines(res.get("gram", {}))
    lines += _fit_lines(res.get("fit", {}))
    lines += _neuron_lines(res.get("neurons", {}))
    lines += _wgram_lines(res.get("wgram", {}))
    for sec in SECTIONS:
        r = res.get(sec)
        if not isinstance(r, dict):
            continue
        if "traceback" in r:
            lines.append(f"{sec}: FAILED {r['error'][:100]}")
        lines += [f"{sec} (second process): FAILED {e[:100]}" for e in r.get("merge_errors", [])]
    return "\n".join(lines)


def _triton_version() -> str | None:
    try:
        import triton  # deferred: optional dependency
    except ImportError:
        return None
    return triton.__version__


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
    p.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                   help=f"comma-separated, of {', '.join(SECTIONS)}")
    p.add_argument("--wgram-shapes", default="32x4000x4096x5,30x20000x576x5",
                   help="weighted Gram section: BxNxDxM shapes (layers, rows, d, weight sets)")
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cuda",
                   help="cpu: dry run of the logic (TRITON_INTERPRET=1)")
    p.add_argument("--backends", default="triton,cuda", help="kernel variants to time")
    p.add_argument("--merge", action="store_true",
                   help="add to an existing --json (e.g. the CUDA variants from a second process, "
                        "so a crash there cannot take the Triton numbers with it)")
    p.add_argument("--table-only", action="store_true",
                   help="print the table of an existing --json")
    args = p.parse_args(argv)
    if args.table_only:
        print(table(json.loads(Path(args.json).read_text())))
        return 0
    res = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           "torch": torch.__version__, "triton": _triton_version(), "args": vars(args),
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
