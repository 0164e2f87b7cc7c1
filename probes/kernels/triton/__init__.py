"""Triton backend: the statistics pass and the neuron moments as fused GPU kernels.

:func:`gram_update` adds one chunk X (B, r, d) float16 CUDA, Y (r, k), fold (r,) (-1 = skip)
into a :class:`probes.stats.GramStats` held in float64 on the same device, in one of
:data:`MODES`, one module per kernel family: ``preshift`` (the default), ``rawtma``, and the
older ``shiftin`` ("shift-in" and "raw"); ``column_moments`` sums the per-column moments (the
neurons, and the raw modes' column sums); ``weighted`` the weighted Gram (Newton Hessians);
``configs`` the tilings, the autotune helper and :data:`TUNING`; ``common`` the shared pieces.
Modes, precision and measurements: docs/fastprobe.md and bench/RESULTS.md.

Under ``TRITON_INTERPRET=1`` (read when this package is imported) the kernels run on CPU
tensors; the tests use that on tiny shapes.
"""
from __future__ import annotations

import warnings

import torch

from probes.kernels.triton import preshift, rawtma, shiftin
from probes.kernels.triton.column_moments import moments
from probes.kernels.triton.common import INTERPRET, Chunk, check_x, prepare_chunk
from probes.kernels.triton.configs import (
    PTR_FALLBACK,
    TUNING,
    GramConfig,
    MomentsTiling,
    PreConfig,
    PrepTiling,
    TuningState,
    autotune,
    default_pre_config,
    gram_configs,
    moments_tilings,
    prep_tilings,
    preshift_configs,
    rawtma_configs,
)
from probes.kernels.triton.preshift import tune_preshift
from probes.kernels.triton.rawtma import RAW_MAX_RATIO
from probes.kernels.triton.shiftin import tune_gram
from probes.kernels.triton.weighted import WEIGHTED_CONFIGS, weighted_gram
from probes.stats import prepare_neuron_chunk

__all__ = ["gram_update", "neuron_update", "weighted_gram", "WEIGHTED_CONFIGS", "moments",
           "is_available", "unavailable_reason", "missing_ops", "MODES", "RAW_MAX_RATIO",
           "INTERPRET", "TUNING", "TuningState",
           "autotune", "tune_gram", "tune_preshift", "GramConfig", "PreConfig", "PrepTiling",
           "MomentsTiling", "gram_configs", "preshift_configs", "rawtma_configs", "prep_tilings",
           "moments_tilings"]

MODES = ("preshift", "rawtma", "shift-in", "raw")


def is_available() -> bool:
    return INTERPRET or torch.cuda.is_available()


def unavailable_reason() -> str:
    return "the Triton backend needs a CUDA GPU (or TRITON_INTERPRET=1 for CPU tests)"


def missing_ops() -> tuple[str, ...]:
    """None: the backend implements every op (or is unavailable as a whole)."""
    return ()


def _pick_mode(c: Chunk, mode, shift_in_kernel, config) -> str:
    """The mode asked for, else the one ``shift_in_kernel`` or a GramConfig implies, else the
    tuned default for this d, else "preshift"."""
    if mode is None:
        if shift_in_kernel is not None:
            mode = "shift-in" if shift_in_kernel else "raw"
        elif isinstance(config, GramConfig):
            mode = "shift-in"
        else:
            mode = TUNING.get(c.d, c.device, "mode", "preshift")
    if mode not in MODES:
        raise ValueError(f"unknown triton Gram mode {mode!r}; one of {MODES}")
    return mode


def _try_rawtma(stats, c: Chunk, config, tuned: bool) -> bool:
    """"rawtma" for one chunk; False (nothing added) when preshift must do it: the accuracy
    guard refused the chunk, d does not suit TMA or, for a tuned (not named) rawtma, it failed
    here, which makes preshift the default for this d from now on."""
    d, dev = c.d, c.device
    if d % 8:
        if not tuned:
            raise ValueError("mode='rawtma' needs d a multiple of 8 (TMA reads 16-byte aligned "
                             "rows); use mode='preshift'")
        TUNING.took("rawtma unusable (d % 8): preshift")
        return False
    cfg = PreConfig(*(config or TUNING.get(d, dev, "rawtma") or default_pre_config(d)))
    try:
        if rawtma.update(stats, c, cfg):
            TUNING.took("rawtma")
            return True
        TUNING.took("rawtma refused by the accuracy guard: preshift")
    except Exception as exc:  # noqa: BLE001 - e.g. no TMA on this card: use preshift
        if not tuned or INTERPRET or isinstance(exc, torch.cuda.OutOfMemoryError):
            raise
        TUNING.took("rawtma failed: preshift")
        warnings.warn(f"triton rawtma Gram failed ({type(exc).__name__}: {exc}); "
                      f"using preshift for d={d} from now on", RuntimeWarning)
        TUNING.set(d, dev, "mode", "preshift")
    return False


def _preshift(stats, c: Chunk, config, groups, fused_add, prep, defaulted: bool) -> None:
    """"preshift" for one chunk. When TMA descriptors fail at the tuned/default tiling, the
    pointer-load tiling (remembered for this d); when preshift fails and no mode was asked for,
    the shift-in kernel (remembered as this d's mode)."""
    d, dev = c.d, c.device
    cfg = PreConfig(*(config or TUNING.get(d, dev, "preshift") or default_pre_config(d)))
    try:
        try:
            preshift.update(stats, c, cfg, groups, fused_add, prep)
        except Exception:  # noqa: BLE001 - TMA descriptors unsupported here: pointer loads
            if config is not None or not cfg[5] or INTERPRET:
                raise
            TUNING.set(d, dev, "preshift", PTR_FALLBACK)
            preshift.update(stats, c, PTR_FALLBACK, groups, fused_add, prep)
    except Exception as exc:  # noqa: BLE001 - last resort for the default: the older mode
        if not defaulted or INTERPRET or isinstance(exc, torch.cuda.OutOfMemoryError):
            raise
        warnings.warn(f"triton preshift Gram failed ({type(exc).__name__}: {exc}); "
                      f"using the shift-in kernel for d={d} from now on", RuntimeWarning)
        TUNING.set(d, dev, "mode", "shift-in")
        shiftin.update(stats, c, True)
        return
    TUNING.took("preshift")


def gram_update(stats, X, Y, fold=None, precision=None, shift_in_kernel: bool | None = None,
                config=None, mode: str | None = None, groups: int | None = None,
                fused_add: bool = False, prep=None):
    """Add X (B, r, d) fp16, Y (r, k), fold (r,) (-1 = skip) into ``stats`` (float64, same device).

    ``mode``: "preshift" (default) writes a shifted, fold-ordered, padded fp16 copy of the chunk
    and runs a plain Gram on it; "rawtma" reads the raw chunk in place through TMA and centres in
    float64 (in place when each fold's rows are contiguous, else after one gather copy; d a
    multiple of 8; chunks that fail its accuracy guard go through preshift); "shift-in"
    subtracts the shift inside the Gram kernel; "raw" multiplies raw values and moves the chunk
    to the shift in float64 afterwards. Default: the mode TUNING holds for this d (the GPU
    bench sets it), else "preshift". ``shift_in_kernel`` (older spelling): True = "shift-in",
    False = "raw". ``groups`` (preshift): pipeline the pre-shift pass of the next group of layers
    with the Gram of this one on two streams (default: the tuned value for this d, else 1).
    ``fused_add`` (preshift): the Gram kernel adds its float32 tiles straight into the float64
    totals instead of writing a float32 chunk Gram that a second pass adds; off by default, the
    separate add measured faster on an H200 (bench/RESULTS.md, "GPU statistics kernels and
    extraction — NVIDIA H200, 2026-11-27 14:08–14:31 UTC (session 3)"). ``prep`` (preshift): a
    PrepTiling for the pre-shift pass (default: the tuned one for this d, else
    ``prep_tilings()[0]``). ``config``: a PreConfig (preshift, rawtma) or GramConfig (the other
    modes; a GramConfig alone selects "shift-in"); default: the tuned one for this d if a
    tuner ran, else a fixed sensible tiling.
    """
    if precision not in (None, "float32"):
        raise ValueError(f"the triton backend sums each chunk in float32 (into float64 totals); "
                         f"precision={precision!r} needs backend='torch' or 'cpu'")
    c = prepare_chunk(stats, X, Y, fold)
    if c is None:
        return stats
    defaulted = mode is None and shift_in_kernel is None and config is None
    mode = _pick_mode(c, mode, shift_in_kernel, config)
    if mode == "rawtma":
        if _try_rawtma(stats, c, config, tuned=defaulted):
            return stats
        mode, config = "preshift", None
    if mode == "preshift":
        _preshift(stats, c, config, groups, fused_add, prep, defaulted)
    else:
        shiftin.update(stats, c, mode == "shift-in", config)
    return stats


def neuron_update(stats, X, Y, fold=None, **tiling):
    """Add X (B, r, m) fp16 neuron activations into a probes.stats.NeuronStats (rows with
    fold -1 skipped). ``tiling``: block_n, block_r, splits, stages, tiling of :func:`moments`."""
    X, Yc, keep, fold01 = prepare_neuron_chunk(stats, X, Y, fold)
    if not bool(keep.any()):
        return stats
    X = check_x(X)
    if X.device != stats.device:
        raise ValueError(f"X is on {X.device} but the statistics are on {stats.device}")
    sx, sxx, sxy = moments(X, Yc, stats.shift, fold=fold01, n_folds=1, **tiling)
    stats.add_moments(keep, sx[:, 0], sxx[:, 0], sxy[:, 0], Yc)
    return stats
