"""Neuron-target correlations for every MLP neuron of every layer (``fastprobe neurons``).

Modules: ``correlations`` (streaming Pearson from :class:`~probes.stats.NeuronStats` moments,
Spearman one layer at a time), ``projection`` (the paper's neurons computed from the stored
residual stream and the model's MLP input weights), ``probe_link`` (probe directions of a fit
and their cosines with the neurons' output weights), ``report`` (:func:`neuron_report`, the
outputs), ``cli``. A neuron's "layer" is the hidden-state index its MLP writes into (block b ->
layer b + 1), for both methods. Names resolve lazily: ``fastprobe --help`` loads no torch.
"""
from __future__ import annotations

__all__ = ["NeuronReportError", "neuron_correlations", "rank_transform", "spearman",
           "add_probe_cosines", "load_probe", "METHODS", "NEURON_LAYER_RULE", "projected_neuron",
           "projection_correlations", "resolve_model", "NEURONS_JSON", "NEURONS_NPZ",
           "neuron_report", "write_neuron_report"]

_LAZY = {"neuron_correlations": "correlations", "rank_transform": "correlations",
         "spearman": "correlations", "add_probe_cosines": "probe_link", "load_probe": "probe_link",
         "METHODS": "config", "NEURON_LAYER_RULE": "projection",
         "projected_neuron": "projection", "projection_correlations": "projection",
         "resolve_model": "model", "NEURONS_JSON": "report", "NEURONS_NPZ": "report",
         "neuron_report": "report", "write_neuron_report": "report"}


def __getattr__(name: str):
    if name == "NeuronReportError":
        from probes.errors import NeuronReportError
        return NeuronReportError
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'probes.neurons' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"probes.neurons.{module}"), name)
