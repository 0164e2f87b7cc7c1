"""Tilings of the Triton kernels, the candidates the tuners and the GPU bench time, the ONE
autotune helper every ``tune_*`` uses, and :data:`TUNING`, the one tuning state that
``gram_update`` and ``moments`` read and the tuners, the GPU bench and the tests write.

Candidate lists put the best guess first (sm_90 compile reports: no spills, HGMMA/TMA where
expected, bench/RESULTS.md "Kernels prepared for the next GPU run"); under the interpreter each
list is one or two tiny tilings. "session 3" below: the bench/RESULTS.md section
"GPU statistics kernels and extraction — NVIDIA H200, 2026-11-27 14:08–14:31 UTC (session 3)".
"""
from __future__ import annotations

import collections
import contextlib

import torch
from triton.testing import do_bench

from probes.kernels.triton.common import INTERPRET

__all__ = ["GramConfig", "PreConfig", "PrepTiling", "MomentsTiling", "gram_configs",
           "preshift_configs", "rawtma_configs", "prep_tilings", "moments_tilings",
           "default_gram_config", "default_pre_config", "PTR_FALLBACK", "TuningState", "TUNING",
           "autotune"]


class GramConfig(tuple):
    """Tiling of the "shift-in" / "raw" Gram kernel: (BM, BN, BLOCK_R, num_warps, num_stages,
    fused): output tile BM x BN, rows per step BLOCK_R; fused: Σx and XᵀY in the Gram kernel
    (else in the moments kernel, one more read of X but fewer registers in the Gram kernel)."""

    def __new__(cls, bm, bn, block_r, warps, stages, fused=True):
        return super().__new__(cls, (bm, bn, block_r, warps, stages, bool(fused)))


class PreConfig(tuple):
    """Tiling of the "preshift" / "rawtma" Gram: (BM, BN, BLOCK_R, num_warps, num_stages, tma):
    output tile BM x BN, rows per step BLOCK_R (= the padding unit of each fold's rows), TMA
    descriptor loads (Hopper) or plain pointer loads ("rawtma" always uses TMA)."""

    def __new__(cls, bm, bn, block_r, warps, stages, tma=False):
        return super().__new__(cls, (bm, bn, block_r, warps, stages, bool(tma)))


class PrepTiling(tuple):
    """Tiling of the pre-shift pass: BLOCK_N columns x BLOCK_R rows per step (BLOCK_R for up to
    four targets, fewer rows for more targets so BLOCK_R x targets stays bounded), warps, at
    most ``rows`` rows per program (more programs, shorter ones), and ``stages`` of the row loop
    (> 1: row blocks loaded ahead through cp.async)."""

    def __new__(cls, bn, br, warps, rows, stages=1):
        return super().__new__(cls, (int(bn), int(br), int(warps), int(rows), int(stages)))


class MomentsTiling(tuple):
    """Tiling of the moments kernel: BLOCK_N columns x BLOCK_R rows per step, warps, and
    ``stages`` of the row loop (> 1: row blocks loaded ahead through cp.async)."""

    def __new__(cls, bn, br, warps, stages=1):
        return super().__new__(cls, (int(bn), int(br), int(warps), int(stages)))


def gram_configs() -> list[GramConfig]:
    """Candidates of the shift-in / raw Gram for H100/H200 tensor cores (chosen from the sm_90
    register report: no spills in the main loop), then a small tiling for small d."""
    if INTERPRET:
        return [GramConfig(16, 32, 16, 1, 1, True)]
    return [GramConfig(128, 128, 32, 8, 4, True), GramConfig(128, 128, 64, 8, 3, False),
            GramConfig(128, 128, 32, 8, 4, False), GramConfig(128, 256, 32, 8, 3, False),
            GramConfig(64, 64, 64, 4, 3, False)]


def preshift_configs() -> list[PreConfig]:
    """Candidates of the preshift Gram for H100/H200; the first is the H200's fastest
    (session 3)."""
    if INTERPRET:
        return [PreConfig(16, 32, 16, 1, 1, False)]
    return [PreConfig(128, 256, 64, 8, 3, True), PreConfig(128, 256, 64, 8, 4, True),
            PreConfig(128, 128, 64, 8, 4, True), PreConfig(128, 128, 128, 8, 3, True),
            PreConfig(256, 128, 64, 8, 3, True), PreConfig(128, 128, 64, 8, 3, False)]


def rawtma_configs() -> list[PreConfig]:
    """Tilings the GPU bench tries for "rawtma": the TMA tilings of preshift_configs() (the
    interpreter's tiny one on CPU)."""
    return [c for c in preshift_configs() if c[5]] or preshift_configs()[:1]


def prep_tilings() -> list[PrepTiling]:
    """Candidates of the pre-shift pass; the first (the default) is the H200's fastest measured,
    a 64-row, 8-warp step was slower (session 3). The pipelined ones compile for sm_90 without
    spills (bench/gpu_compile_check.py)."""
    if INTERPRET:
        return [PrepTiling(16, 8, 1, 2048), PrepTiling(32, 4, 1, 16, 2)]
    return [PrepTiling(128, 16, 4, 2048), PrepTiling(256, 16, 8, 2048),
            PrepTiling(128, 32, 8, 2048), PrepTiling(64, 32, 4, 2048),
            PrepTiling(128, 16, 4, 512), PrepTiling(128, 8, 4, 2048),
            PrepTiling(128, 16, 4, 2048, 3), PrepTiling(256, 16, 8, 2048, 3),
            PrepTiling(128, 8, 4, 2048, 4)]


def moments_tilings() -> list[MomentsTiling]:
    """Candidates of the moments kernel (the first is the default). The first three read wide
    neuron activations far below the CUDA module's moments kernel (one 16-byte load per thread
    and row, 4 rows in flight; session 3); the pipelined ones keep more bytes in flight (no
    spills on sm_90, bench/gpu_compile_check.py)."""
    if INTERPRET:
        return [MomentsTiling(16, 8, 1), MomentsTiling(32, 4, 1, 2)]
    return [MomentsTiling(256, 16, 8), MomentsTiling(128, 32, 8), MomentsTiling(512, 8, 4),
            MomentsTiling(256, 16, 8, 3), MomentsTiling(256, 16, 8, 4),
            MomentsTiling(1024, 4, 4), MomentsTiling(256, 8, 4, 4)]


def default_gram_config(d: int) -> GramConfig:
    """The shift-in / raw tiling when none was tuned for this d."""
    if INTERPRET:
        return gram_configs()[0]
    if d <= 256:
        return GramConfig(64, 64, 64, 4, 3, False)
    return GramConfig(128, 128, 32, 8, 4, True)


def default_pre_config(d: int) -> PreConfig:
    """The preshift / rawtma tiling when none was tuned for this d."""
    if INTERPRET:
        return preshift_configs()[0]
    if d <= 256:
        return PreConfig(64, 64, 64, 4, 3, False)
    return preshift_configs()[0]


#: pointer-load tiling used when TMA descriptors fail on this Triton/driver (no spills on sm_90)
PTR_FALLBACK = PreConfig(128, 128, 64, 8, 3, False)


def _device_key(device) -> str:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return str(dev)


class TuningState:
    """What the tuners and the GPU bench chose, per (width, device), and which path each
    ``gram_update`` chunk took, in this process.

    ``choices[(width, device, what)]``, what: "mode" (gram_update's default mode), "preshift",
    "rawtma" (PreConfig), "preshift groups" (int), "prep" (PrepTiling), "moments"
    (MomentsTiling), "rawtma_sums" ("cuda": rawtma's sums from the CUDA module), "shift-in" /
    "raw" (GramConfig). ``log``: the same keys -> {tiling: median ms} of the last autotune.
    ``paths``: chunks per gram_update path ("preshift", "rawtma", "rawtma refused by the accuracy
    guard: preshift", "rawtma failed: preshift", "rawtma unusable (d % 8): preshift").
    """

    WHATS = ("mode", "preshift", "rawtma", "preshift groups", "prep", "moments", "rawtma_sums",
             "shift-in", "raw")

    def __init__(self):
        self.choices: dict[tuple[int, str, str], object] = {}
        self.log: dict[tuple[int, str, str], dict[tuple, float]] = {}
        self.paths: collections.Counter = collections.Counter()

    def key(self, width: int, device, what: str) -> tuple[int, str, str]:
        if what not in self.WHATS:
            raise KeyError(f"unknown tuning choice {what!r}; one of {self.WHATS}")
        return int(width), _device_key(device), what

    def get(self, width: int, device, what: str, default=None):
        return self.choices.get(self.key(width, device, what), default)

    def set(self, width: int, device, what: str, value) -> None:
        self.choices[self.key(width, device, what)] = value

    def forget(self, width: int, device, what: str) -> None:
        self.choices.pop(self.key(width, device, what), None)

    @contextlib.contextmanager
    def override(self, width: int, device, what: str, value):
        """Set a choice for the duration of a ``with`` block, then restore the previous one."""
        key = self.key(width, device, what)
        missing = object()
        before = self.choices.get(key, missing)
        self.choices[key] = value
        try:
            yield self
        finally:
            if before is missing:
                self.choices.pop(key, None)
            else:
                self.choices[key] = before

    def took(self, path: str) -> None:
        """Count one chunk through ``path``."""
        self.paths[path] += 1

    def paths_since(self, before: dict) -> dict:
        """Chunks per path since ``before`` (a ``dict(TUNING.paths)`` taken earlier)."""
        return {p: n - before.get(p, 0) for p, n in self.paths.items() if n != before.get(p, 0)}


#: the process's tuning state (see TuningState)
TUNING = TuningState()


def autotune(what: str, width: int, device, candidates, make_run, default, verbose=False):
    """Time ``make_run(c)()`` for each candidate c (median of triton's do_bench: 5 warm-up
    calls, 30 ms of runs), remember the fastest as ``TUNING`` choice ``what`` for this (width,
    device) and every time in ``TUNING.log``, and return it. ``make_run`` builds the timed call
    on scratch outputs (never real statistics). A candidate that fails (e.g. more shared memory
    than this card has) is skipped; when none ran: ``default``. Interpreter: ``default``, untimed.
    """
    if INTERPRET:
        return default
    timings, best, best_t = {}, None, float("inf")
    for cfg in candidates:
        try:
            t = do_bench(make_run(cfg), warmup=5, rep=30, return_mode="median")
        except Exception as exc:  # noqa: BLE001 - a candidate may not fit this card
            if verbose:
                print(f"  {what} {tuple(cfg)} failed: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        timings[tuple(cfg)] = t
        if verbose:
            print(f"  {what} {tuple(cfg)}: {t:.3f} ms")
        if t < best_t:
            best, best_t = cfg, t
    best = default if best is None else best
    TUNING.set(width, device, what, best)
    TUNING.log[TUNING.key(width, device, what)] = timings
    return best
