"""What every layer of a fit shares: the z-scored targets, the split, the folds and the layers
(:class:`Problem`, checked by :func:`prepare`), and a fit in progress (:class:`Job`: the store,
the resolved backend and device, the reducer, the timings and the progress bar)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from actstore.store.format import as_compute
from probes.distributed import Reducer
from probes.errors import FitError
from probes.fit.config import FitConfig
from probes.fit.outliers import RowNorms
from probes.inputs import parse_split, select_layers, target_matrix
from probes.kernels import preferred_chunk_rows
from probes.ridge.alphas import parse_alphas
from probes.ridge.solvers import kfold_assignment

__all__ = ["Problem", "prepare", "Meter", "Job", "BatchFit", "non_finite_error", "alpha_memory",
           "check_alpha_memory", "ALPHA_BUDGET_FLOOR"]

ALPHA_BUDGET_FLOOR = 256 << 20   # bytes the per-alpha arrays may take whatever --memory-gb says


@dataclass
class Problem:
    """The rows, targets and layers of a fit. Targets are z-scored with the train mean and
    population std (the paper); probes are fitted in z units and mapped back afterwards."""

    names: list[str]
    Y: np.ndarray            # (n, k) targets in their own units
    mu: np.ndarray           # (k,) train mean
    sd: np.ndarray           # (k,) train std (ddof 0)
    Yz: np.ndarray           # (n, k) z-scored targets
    is_test: np.ndarray      # (n,) bool
    fold: np.ndarray         # (n,) int32 fold of each train row (LOO: 0), -1 for test rows
    alphas: np.ndarray       # (A,) the grid
    cv: str | int
    layers: list[int]        # hidden-state indices
    form: str                # "primal" (n_train >= d) or "dual"
    # the shuffled-target control's seed when Yz carries its k permuted columns after the
    # real ones (probes.fit.controls), else None
    control_seed: int | None = None

    @property
    def n(self) -> int:
        return len(self.Y)

    @property
    def train(self) -> np.ndarray:
        return ~self.is_test

    @property
    def n_folds(self) -> int:
        return 1 if self.cv == "loo" else int(self.cv)


def prepare(store, config: FitConfig) -> Problem:
    """The :class:`Problem` of ``config`` on ``store``; FitError (InputError for targets, split
    and layers) when the store cannot give it."""
    names, Y = target_matrix(store, config.targets, allow_class=config.task == "regress")
    n = len(Y)
    is_test = parse_split(config.split, store, n)
    train = ~is_test
    _check_split(config.split, n, int(train.sum()), int(is_test.sum()))
    mu, sd = Y[train].mean(0), Y[train].std(0)
    const = [names[i] for i in np.nonzero(sd == 0)[0]]
    if const:
        raise FitError(f"target(s) {const} are constant on the training rows")
    layers = select_layers(store, config.layers)
    fold = np.where(train, 0, -1).astype(np.int32)
    if config.cv != "loo":
        fold[train] = kfold_assignment(int(train.sum()), config.cv, shuffle=True,
                                       seed=config.seed)
    form = "dual" if int(train.sum()) < store.d_model else "primal"
    problem = Problem(names=names, Y=Y, mu=mu, sd=sd, Yz=(Y - mu) / sd, is_test=is_test,
                      fold=fold, alphas=parse_alphas(config.alphas), cv=config.cv,
                      layers=layers, form=form)
    check_alpha_memory(problem, store.d_model, config)
    return problem


def alpha_memory(problem: Problem, d: int, chunk_rows: int | None = None) -> int:
    """Bytes of the per-alpha arrays of ONE layer (float64), what a long alpha grid multiplies:
    primal LOO, every row's prediction at every alpha (n·k), the eigenbasis scaled per alpha
    (d·(2k+2)) and one chunk's fitted values, hat diagonals and residuals (r·(4k+3)); primal
    k-fold, the per-fold solutions (d·(4k+1)); dual LOO, the fitted values and residuals of
    every row (n·(6k+2)); dual k-fold, a fold's (n·(5k+1)). Each times A alphas."""
    n, k, A = problem.n, problem.Yz.shape[1], len(problem.alphas)
    if problem.form == "dual":
        per_alpha = n * (6 * k + 2) if problem.cv == "loo" else n * (5 * k + 1)
    elif problem.cv == "loo":
        r = min(n, chunk_rows or preferred_chunk_rows(d, 1, 1, max_bytes=64 << 20))
        per_alpha = n * k + d * (2 * k + 2) + r * (4 * k + 3)
    else:
        per_alpha = d * (4 * k + 1)
    return 8 * A * per_alpha


def check_alpha_memory(problem: Problem, d: int, config: FitConfig) -> None:
    """FitError, before anything is allocated, when the per-alpha arrays of one layer
    (:func:`alpha_memory`) exceed the budget ``config.memory_bytes`` (``--memory-gb``), or
    :data:`ALPHA_BUDGET_FLOOR` when the budget is smaller (a tiny budget only narrows the
    batches: one layer is always taken)."""
    need = alpha_memory(problem, d, config.chunk_rows)
    limit = max(int(config.memory_bytes), ALPHA_BUDGET_FLOOR)
    if need > limit:
        A = len(problem.alphas)
        fit = max(1, int(A * limit // need))
        cv = "LOO" if problem.cv == "loo" else f"{problem.cv}-fold"
        raise FitError(f"{A} alphas need {_gb(need)} for the per-alpha arrays of one layer "
                       f"({problem.n} rows, d {d}, {problem.form} form, {cv}), more than the "
                       f"memory budget of {_gb(limit)} (--memory-gb): use fewer alphas (about "
                       f"{fit} fit) or raise --memory-gb if the machine has the memory")


def _gb(nbytes: int) -> str:
    return f"{nbytes / (1 << 30):.3g} GB"


def _check_split(split, n: int, n_train: int, n_test: int) -> None:
    if n_train < 3:
        raise FitError(f"split {split!r} leaves {n_train} training rows; need at least 3")
    if n_test == 0:
        raise FitError(f"split {split!r} gives an empty test split (no test rows among {n}); "
                       "use --split random:0.2:0 or a group split")
    if n_test < 2:
        raise FitError(f"split {split!r} gives {n_test} test row among {n}; the test metrics "
                       "need at least 2 (use a larger test fraction)")


class Meter:
    """Seconds per phase (results.json ``seconds``) and the progress bar (``rows`` to stream in
    all; None: no bar)."""

    def __init__(self, rows: int | None = None):
        self.seconds = {"stats": 0.0, "solve": 0.0, "projection": 0.0, "metrics": 0.0}
        self.bar = (None if rows is None else
                    tqdm(total=rows, unit="row", unit_scale=True, desc="fastprobe",
                         dynamic_ncols=True, leave=False))

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the time spent inside the ``with`` block to ``seconds[name]``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0

    def tick(self, rows: int) -> None:
        if self.bar is not None:
            self.bar.update(rows)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class Job:
    """A fit in progress: what the statistics, solve and projection passes read and report to."""

    store: object
    problem: Problem
    config: FitConfig
    backend: str             # the resolved statistics backend
    device: torch.device     # where the solve runs
    shard: Reducer           # how this process's rows combine with the others'
    meter: Meter = field(default_factory=Meter)
    rows: RowNorms | None = None   # row norms and the --row-norm rule (probes.fit.outliers)

    def __post_init__(self) -> None:
        if self.rows is None:
            self.rows = RowNorms(self.config.row_norm, self.problem.layers, self.problem.n)

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float32 if self.config.precision == "float32" else torch.float64


@dataclass
class BatchFit:
    """The probes of a batch of B layers, in z units."""

    coef: np.ndarray         # (B, d, k)
    intercept: np.ndarray    # (B, k)
    alpha_idx: np.ndarray    # (B, k) index of the chosen alpha in the grid
    cv_scores: np.ndarray    # (B, A, k) per-target CV score of every alpha
    best: np.ndarray         # (B,) or (B, k) CV score of the chosen alpha(s)
    predictions: np.ndarray  # (B, n, k) every row, the chosen alpha

    @classmethod
    def concat(cls, parts: list[BatchFit]) -> BatchFit:
        return cls(**{f: np.concatenate([getattr(p, f) for p in parts])
                      for f in cls.__dataclass_fields__})


def non_finite_error(store, layer: int, n: int, shard: Reducer) -> BaseException:
    """The FitError naming the first NaN or inf activation of ``layer`` (read only once one was
    detected; every rank of a distributed fit meets it at the same point)."""
    x = as_compute(store.layer(layer)[:n], store.dtype).float().numpy()
    bad = np.argwhere(~np.isfinite(x))
    row, col = (int(bad[0][0]), int(bad[0][1])) if len(bad) else (-1, -1)
    return shard.alike(FitError(f"{store.path}: layer {layer} has NaN or inf activations, first "
                                f"at row {row}, dim {col}"))
