"""The paper's probing experiments (Gurnee & Tegmark 2023) on activation stores.

One module per experiment, each owning its computation, printed table, plot, report section,
CLI arguments and ``actstore run`` step: ``prompts`` (prompt variants and cross-prompt
transfer), ``holdout`` (block hold-out and the entity-type hold-out), ``nonlinear`` (MLP vs
ridge probe), ``pca`` (probes on the top-k principal components). ``registry`` maps each key
(``fastprobe experiment KEY``) to its :class:`~probes.experiments.base.Experiment` record;
``common`` holds what they share, ``cli`` the command. Every result is a JSON-able dict with
``"experiment"`` (its kind) and ``"name"`` (the file stem of NAME.json / NAME.png). A "layer"
is a hidden-state index (0 = embeddings, l = output of block l). Definitions:
docs/experiments.md. Names resolve lazily: ``fastprobe --help`` loads no torch.
"""
from __future__ import annotations

from actstore.lazy import lazy_exports

__all__ = ["ExperimentError", "DEFAULT_ALPHAS", "prompt_experiment", "holdout_experiment",
           "entity_type_experiment", "nonlinear_experiment", "pca_experiment", "write_experiment",
           "format_experiment", "experiment_markdown", "EXPERIMENT_TITLES", "EXPERIMENTS",
           "group_labels", "best_loo_index", "check_same_entities", "DEFAULT_KS",
           "DEFAULT_WEIGHT_DECAYS"]

_LAZY = {"prompt_experiment": "prompts", "check_same_entities": "prompts",
         "holdout_experiment": "holdout", "entity_type_experiment": "holdout",
         "group_labels": "holdout", "nonlinear_experiment": "nonlinear",
         "DEFAULT_WEIGHT_DECAYS": "nonlinear", "pca_experiment": "pca", "DEFAULT_KS": "pca",
         "best_loo_index": "common", "EXPERIMENTS": "registry", "EXPERIMENT_TITLES": "registry",
         "format_experiment": "registry", "write_experiment": "registry",
         "experiment_markdown": "registry", "ExperimentError": "probes.errors",
         "DEFAULT_ALPHAS": "probes.ridge.alphas"}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
