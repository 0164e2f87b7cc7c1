"""The statistics kernel against its hardware floor, one chunk at a time: our gram_update next
to the platform's float32 BLAS doing the same product (used by the kernel tests and benches)."""
from __future__ import annotations

import time

import numpy as np
import torch

from probes.kernels import gram_update, resolve_backend
from probes.stats import GramStats, choose_shift

__all__ = ["benchmark_gram_update"]


def benchmark_gram_update(B: int, r: int, d: int, k: int = 2, n_folds: int = 1,
                          backend: str = "cpu", precision: str | None = None, repeat: int = 3,
                          seed: int = 0) -> dict:
    """Time one ``gram_update`` of a random fp16 chunk (B, r, d) against its float32 floor.

    The floor is the same matrix product done by the platform's float32 BLAS, per layer:
    ``A.T @ A`` (numpy on CPU, which calls SYRK, i.e. r·d·(d+1) flops) and a general product
    ``Aᵀ @ A'`` of two distinct buffers (GEMM, 2·r·d² flops); torch.matmul on CUDA for GPU
    backends. Returns seconds (best of ``repeat``) and GFLOP/s counted as 2·B·r·d² for all three,
    so the numbers compare time for the same product; ``ratio_gemm`` = ours / GEMM seconds.
    """

    rng = np.random.default_rng(seed)
    Xn = rng.standard_normal((B, r, d), dtype=np.float32).astype(np.float16)
    Yn = rng.standard_normal((r, k))
    fold = (np.arange(r) % n_folds).astype(np.int32)
    name = resolve_backend(backend, "cuda" if backend in ("cuda", "triton") else None)
    on_gpu = name in ("cuda", "triton")
    dev = torch.device("cuda" if on_gpu else "cpu")
    X = torch.from_numpy(Xn).to(dev) if on_gpu else Xn
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    shift = choose_shift(Xn[:, : min(r, 1024)])

    def best(fn):
        ts = []
        for _ in range(max(1, repeat)):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    stats = GramStats.zeros(B, d, k, n_folds, shift=shift, device=dev)
    t_ours = best(lambda: gram_update(stats, X, Yn, fold, backend=name, precision=precision))
    if on_gpu:
        A = torch.from_numpy(Xn).to(dev).float()
        A2 = A.clone()
        t_syrk = best(lambda: [A[b].T @ A[b] for b in range(B)])
        t_gemm = best(lambda: [A[b].T @ A2[b] for b in range(B)])
    else:
        A = Xn.astype(np.float32)
        A2 = A.copy()
        t_syrk = best(lambda: [A[b].T @ A[b] for b in range(B)])
        t_gemm = best(lambda: [A[b].T @ A2[b] for b in range(B)])
    flops = 2.0 * B * r * d * d
    return {
        "backend": name, "precision": precision or ("float64" if name == "torch" else "float32"),
        "B": B, "r": r, "d": d, "k": k, "n_folds": n_folds,
        "seconds": t_ours, "gflops": flops / t_ours / 1e9,
        "floor_syrk_seconds": t_syrk, "floor_syrk_gflops": flops / t_syrk / 1e9,
        "floor_gemm_seconds": t_gemm, "floor_gemm_gflops": flops / t_gemm / 1e9,
        "ratio_gemm": t_ours / t_gemm, "ratio_syrk": t_ours / t_syrk,
    }
