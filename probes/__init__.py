"""fastprobe: batched ridge probes and neuron correlations over every layer of an activation
store (docs/fastprobe.md). The names below resolve lazily: ``fastprobe --help`` loads no torch."""

__all__ = ["RidgeProbeCV", "fit_all_layers", "FitConfig", "FitResult", "neuron_report",
           "NeuronConfig", "experiments", "__version__"]

_LAZY = {"RidgeProbeCV": "probes.ridge", "fit_all_layers": "probes.fit",
         "FitConfig": "probes.fit", "FitResult": "probes.fit", "neuron_report": "probes.neurons",
         "NeuronConfig": "probes.neurons.config", "__version__": "actstore"}


def __getattr__(name):
    import importlib

    if name == "experiments":              # the module: probes.experiments.holdout_experiment ...
        return importlib.import_module("probes.experiments")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'probes' has no attribute {name!r}")
