"""fastprobe: batched ridge probes and neuron correlations over every layer of an activation store."""

__all__ = ["RidgeProbeCV", "fit_all_layers", "neuron_report", "experiments"]

# Lazy exports: `fastprobe --help` must not pay for sklearn/torch imports.
_LAZY = {"RidgeProbeCV": "probes.ridge", "fit_all_layers": "probes.fit",
         "neuron_report": "probes.neurons"}


def __getattr__(name):
    if name == "experiments":              # the module: probes.experiments.holdout_experiment ...
        import importlib
        return importlib.import_module("probes.experiments")
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'probes' has no attribute {name!r}")
