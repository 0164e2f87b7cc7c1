"""fastprobe: batched ridge probes and neuron correlations over every layer of an activation
store (docs/fastprobe.md). The names below resolve lazily: ``fastprobe --help`` loads no torch."""

__all__ = ["RidgeProbeCV", "LogisticProbeCV", "MassMeanProbe", "fit_all_layers", "FitConfig",
           "FitResult", "neuron_report", "NeuronConfig", "experiments", "__version__"]

from actstore import __version__
from actstore.lazy import lazy_exports

_LAZY = {"RidgeProbeCV": "probes.ridge", "LogisticProbeCV": "probes.classify",
         "MassMeanProbe": "probes.classify", "fit_all_layers": "probes.fit",
         "FitConfig": "probes.fit", "FitResult": "probes.fit", "neuron_report": "probes.neurons",
         "NeuronConfig": "probes.neurons.config", "experiments": ""}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
