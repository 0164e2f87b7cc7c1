"""The options of a fit: :class:`FitConfig`, also the ``fastprobe fit`` command line (each
field's docstring is its ``--help``). Light on purpose: ``fastprobe --help`` imports it."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from actstore.options import cli
from probes.errors import FitError
from probes.ridge.alphas import DEFAULT_ALPHAS, parse_alphas

__all__ = ["FitConfig", "BACKEND_CHOICES", "PRECISIONS", "TASKS", "ROW_NORMS", "classify_device"]

BACKEND_CHOICES = ("auto", "cpu", "torch", "cuda", "triton")
PRECISIONS = ("float64", "float32")
TASKS = ("auto", "regress", "classify")
ROW_NORMS = ("none", "unit", "clip")    # probes.fit.outliers (light: no torch here)


@dataclass(frozen=True)
class FitConfig:
    """How :func:`probes.fit.fit_all_layers` fits the ridge probes of a store.

    Each field is documented by the string under it, which is also its ``fastprobe fit --help``
    text. Values are checked and normalised on construction (lists become tuples, ``cv`` is
    ``"loo"`` or an int); a bad one raises FitError (RidgeError for the alpha grid).

    Parameters
    ----------
    layers : tuple of int, int or None
        Hidden-state indices to fit (None: every layer the store holds).
    targets : str, tuple of str or None
        Target columns ("a,b" or names; None: the store's own).
    alphas : str or tuple of float
        The alpha grid (:func:`probes.ridge.parse_alphas`).
    cv : "loo" or int
        Exact leave-one-out or K-fold alpha selection.
    alpha_per_target : bool
        One alpha per target instead of one per layer.
    task : str
        auto, regress or classify (:mod:`probes.fit.classify`).
    site : str
        The store's array to fit on (resid, attn_out, mlp_out, neurons).
    cs, class_weight, max_classes, drop_rest
        Classification: the C grid, class weights, and pooling or dropping the rarest classes.
    split : str
        The train/test split (:func:`probes.inputs.parse_split`).
    row_norm : str
        none (the paper's fit), unit or clip (:mod:`probes.fit.outliers`).
    backend : str
        Statistics kernel: auto, cpu, torch, cuda or triton.
    precision : str
        float64 or float32.
    device : str or None
        Where the solve runs (None: from the backend).
    memory_bytes : int
        Budget of one batch of layers.
    seed : int
        Seed of the k-fold shuffle.
    control, control_seed : bool, int
        Fit the shuffled-target control alongside (:mod:`probes.fit.controls`) and the seed of
        its permutation.
    chunk_rows : int or None
        Rows per chunk of the streaming passes.
    progress : bool
        Show a progress bar.
    """

    layers: tuple[int, ...] | None = field(default=None, metadata=cli(metavar="L,M,..."))
    """probe only these layers: hidden-state indices the store holds (0 = embeddings, l = output
    of block l, as results.json names them; negative ones count from the last); default every
    layer (on the command line: --all-layers)"""
    targets: str | tuple[str, ...] | None = field(
        default=None, metadata=cli(flag="--target", metavar="NAMES"))
    """comma-separated target columns, e.g. latitude,longitude or year (default: the store's own
    targets)"""
    alphas: str | tuple[float, ...] = field(default=DEFAULT_ALPHAS,
                                            metadata=cli(metavar="GRID", type=str))
    """alpha grid: LO:HI:N log-spaced, or a list a,b,c"""
    cv: str | int = field(default="loo", metadata=cli(metavar="loo|K", type=str))
    """alpha selection: exact leave-one-out (loo) or K-fold (an integer K >= 2; seeded shuffle)"""
    alpha_per_target: bool = False
    """choose one alpha per target instead of one per layer (the paper shares it)"""
    task: str = field(default="auto", metadata=cli(choices=TASKS))
    """auto: classification probes when the one --target is recorded as a class target by the
    store (text, boolean or integer-coded categories: format version 2) or is a text or boolean
    column of the entity table (country, state_name, entity_type, is_test...), ridge otherwise
    (without --target: the store's regression targets, or its one class target); regress;
    classify"""
    site: str = field(default="resid", metadata=cli(metavar="NAME"))
    """the store's array to fit on: resid (the residual stream, the paper's), attn_out, mlp_out
    or neurons, as the store holds them (actstore extract --sites); the ridge and the
    classification probes read it"""
    cs: str | tuple[float, ...] = field(default="1e-4:1e4:17",
                                        metadata=cli(flag="--Cs", metavar="GRID", type=str))
    """classification: the C grid of the logistic probe (inverse L2 strength; LO:HI:N
    log-spaced, or a list), chosen per layer by stratified k-fold (--cv K; loo means 5)"""
    class_weight: str | None = field(default=None, metadata=cli(choices=("balanced",)))
    """classification: balanced weighs each class by n / (classes x its count), as
    scikit-learn"""
    max_classes: int | None = field(default=None, metadata=cli(metavar="N"))
    """classification: keep the N-1 most frequent classes and pool the rest into "other" (with
    --drop-rest: keep N and drop the other rows); results.json lists them"""
    drop_rest: bool = False
    """classification: with --max-classes, drop the rows of the rarer classes instead of
    pooling them into 'other'"""
    split: str = field(default="is_test", metadata=cli(metavar="SPEC"))
    """is_test (the store's column) | random:FRAC:SEED | group:COLUMN[:FRAC[:SEED]] (hold out
    whole groups, e.g. group:country)"""
    row_norm: str = field(default="none", metadata=cli(choices=ROW_NORMS))
    """rows with a massive activation: none (the paper's fit), unit (each row of each layer
    scaled to unit L2 norm before centring, an RMS-norm-like view) or clip (each row's norm
    capped at the layer's median + 3.5 x 1.4826 x MAD of the training rows' norms); ridge fits
    on the cpu or torch backends. Every fit lists the rows above that threshold in results.json
    (norm_outliers)"""
    backend: str = field(default="auto", metadata=cli(choices=BACKEND_CHOICES))
    """statistics kernel: C++/OpenMP (cpu), torch float64 reference, CUDA, Triton; auto picks the
    fastest available"""
    precision: str = field(default="float64", metadata=cli(choices=PRECISIONS))
    """float64 (exact) or float32 statistics blocks, eigendecomposition and projections (about 2x
    faster; ~1e-6 relative, less exact for alphas far below the float32 noise floor)"""
    device: str | None = field(default=None, metadata=cli(choices=("cpu", "cuda")))
    """where the solve runs (default: cuda for --backend cuda/triton, and for auto when a GPU is
    present, else cpu; --backend torch --device cuda runs the float64 reference on the GPU;
    classification: cpu unless --device cuda)"""
    memory_bytes: int = field(default=2 << 30,
                              metadata=cli(flag="--memory-gb", type=float, metavar="GB"))
    """memory for one batch of layers' statistics + eigenvectors + per-alpha predictions (GB on
    the command line, bytes in Python); fewer layers per pass when it is small (at least one
    layer is always taken; an alpha grid whose per-alpha arrays of one layer exceed it is
    refused before the fit starts). Classification: the layers read and fitted at once"""
    seed: int = 0
    """seed of the k-fold shuffle"""
    control: bool = True
    """also fit the shuffled-target control (Hewitt & Liang 2019): the same probes on the train
    targets permuted among the train rows; its test R² is the chance level and results.json's
    "control" block gives selectivity = test R2 - control test R2 per layer (it shares the
    statistics pass: a few percent of the fit)"""
    control_seed: int = field(default=0, metadata=cli(metavar="N"))
    """seed of the shuffled-target control's permutation (recorded in results.json)"""
    chunk_rows: int | None = field(default=None, metadata=cli(hidden=True))
    """rows per chunk of the streaming passes (default: the backend's preferred size)"""
    progress: bool = field(default=False, metadata=cli(hidden=True))
    """a progress bar on stderr (the command line shows one unless -q or stderr is no terminal)"""

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise FitError(f"precision must be 'float64' or 'float32', got {self.precision!r}")
        parse_alphas(self.alphas)                   # RidgeError now rather than mid-fit
        parse_alphas(self.cs)
        if self.task not in TASKS:
            raise FitError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.class_weight not in (None, "balanced"):
            raise FitError(f"class_weight must be None or 'balanced', got {self.class_weight!r}")
        if self.row_norm not in ROW_NORMS:
            raise FitError(f"row_norm must be one of {', '.join(ROW_NORMS)}, got "
                           f"{self.row_norm!r}")
        if self.max_classes is not None and self.max_classes < 2:
            raise FitError(f"--max-classes must be at least 2, got {self.max_classes}")
        normal = {"cv": _cv(self.cv)}
        if self.targets is not None and not isinstance(self.targets, str):
            normal["targets"] = tuple(self.targets)
        if not isinstance(self.alphas, str):
            normal["alphas"] = tuple(np.asarray(self.alphas, np.float64).ravel().tolist())
        if self.layers is not None and not isinstance(self.layers, (int, np.integer)):
            normal["layers"] = tuple(self.layers)
        for name, value in normal.items():
            object.__setattr__(self, name, value)    # frozen: normalised once, here


def _cv(cv) -> str | int:
    """"loo" or an int K >= 2."""
    if cv in (None, "loo", "LOO"):
        return "loo"
    try:
        k = int(cv)
    except (TypeError, ValueError):
        raise FitError(f"cv must be 'loo' or an integer K >= 2, got {cv!r}") from None
    if k < 2:
        raise FitError(f"cv must be 'loo' or an integer K >= 2, got {k}")
    return k


def classify_device(config) -> str:
    """Where the logistic solves of a classification fit run: the GPU only when asked for
    (``--device cuda``), else the CPU; unlike ridge, auto does not pick a present GPU, because
    no GPU has run this path yet (bench/gpu_check.sh, step classify_cuda, measures it)."""
    return "cuda" if getattr(config, "device", None) == "cuda" else "cpu"
