"""What an experiment is: the :class:`Experiment` record each experiment module fills in, and
the two small types through which ``actstore run`` plans one (:class:`RunContext` in,
:class:`StepPlan` out). Imports nothing heavy: ``fastprobe --help`` builds its parser from it."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["Experiment", "RunContext", "StepPlan"]


@dataclass(frozen=True)
class RunContext:
    """What ``actstore run`` knows about one dataset when it plans its experiments."""

    store: Any
    """the main prompt's store"""
    prompt_stores: dict
    """prompt name -> store, one per prompt extracted for this dataset, the main one first"""
    skipped_prompts: tuple
    """prompts asked for that do not apply to this dataset's kind"""
    dataset_kind: str
    """the dataset's kind (world_place, historical_figure ...)"""
    layer: int
    """the main fit's best LOO layer (hidden-state index): where single-store experiments run"""
    backend: str
    """statistics backend of the fits"""
    device: str | None
    """cpu, cuda, or None (auto)"""
    all_experiments: bool
    """True when the experiment list is the default one, not named by the user"""


@dataclass(frozen=True)
class StepPlan:
    """One experiment step of ``actstore run``: what it records, and what it runs or why not."""

    options: dict
    """recorded in the step's inputs (with the stores and the backend): what shapes its outputs"""
    run: Callable[[], dict] | None = None
    """computes the result; None when the experiment cannot run on this dataset"""
    note: str | None = None
    """why it cannot run (shown in the report) when ``run`` is None"""
    stores: tuple = ()
    """the stores it reads, whose identities the step records (empty: the main store)"""


@dataclass(frozen=True)
class Experiment:
    """One of the paper's experiments: its computation and everything around it.

    The registry (:data:`probes.experiments.registry.EXPERIMENTS`) maps each ``key`` to one
    record; the CLI, the output files and ``actstore run`` only go through these members.
    """

    key: str
    """the name in ``fastprobe experiment KEY`` and ``actstore run --experiments``"""
    kind: str
    """the ``"experiment"`` field of its result dicts"""
    title: str
    """the heading of its section in the ``actstore run`` report"""
    help: str
    """one line for ``fastprobe experiment --help``"""
    epilog: str
    """the examples of ``fastprobe experiment KEY --help``"""
    compute: Callable[..., dict]
    """the Python entry point (``holdout_experiment`` ...): returns the JSON-able result"""
    add_arguments: Callable[[argparse.ArgumentParser], None]
    """adds its own CLI arguments (the common ones are added by the CLI)"""
    from_args: Callable[[argparse.Namespace, dict], dict]
    """calls ``compute`` from parsed arguments and the common keyword arguments"""
    plan: Callable[[RunContext], StepPlan | None]
    """its ``actstore run`` step for one dataset (None: plan nothing)"""
    text: Callable[[dict], list[str]]
    """the lines of the table ``fastprobe experiment`` prints"""
    plot: Callable[[dict], Any]
    """the matplotlib figure of NAME.png"""
    markdown: Callable[[dict], list[str]]
    """the markdown lines of its section in the ``actstore run`` report"""
