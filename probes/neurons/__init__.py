"""Neuron-target correlations for every MLP neuron of every layer (``fastprobe neurons``).

Modules, bottom up: ``config`` (:class:`NeuronConfig`, also the command line), ``model`` (the
model whose MLP weights are read, checked against the store), ``correlations`` (streaming
Pearson from :class:`~probes.stats.NeuronStats` moments, Spearman one layer at a time),
``projection`` (the paper's neurons from the residual stream), ``probe_link`` (a fit's probe
directions and their cosines with the neurons' output weights), ``report``
(:func:`neuron_report`, the outputs), ``cli``. A neuron's "layer" is the hidden-state index its
MLP writes into (block b -> layer b + 1). Names resolve lazily: ``fastprobe --help`` loads no
torch.
"""
from __future__ import annotations

from actstore.lazy import lazy_exports
from probes.errors import NeuronReportError

__all__ = ["NeuronReportError", "NeuronConfig", "METHODS", "SPLITS", "neuron_correlations",
           "rank_transform", "spearman", "add_probe_cosines", "load_probe", "NEURON_LAYER_RULE",
           "projected_neuron", "projection_correlations", "resolve_model", "NEURONS_JSON",
           "NEURONS_NPZ", "neuron_report", "write_neuron_report"]

_LAZY = {"NeuronConfig": "config", "METHODS": "config", "SPLITS": "config",
         "neuron_correlations": "correlations", "rank_transform": "correlations",
         "spearman": "correlations", "add_probe_cosines": "probe_link", "load_probe": "probe_link",
         "NEURON_LAYER_RULE": "projection", "projected_neuron": "projection",
         "projection_correlations": "projection", "resolve_model": "model",
         "NEURONS_JSON": "report", "NEURONS_NPZ": "report", "neuron_report": "report",
         "write_neuron_report": "report"}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
