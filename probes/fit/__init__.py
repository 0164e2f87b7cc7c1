"""Ridge probes on every layer of an activation store (``fastprobe fit``).

Modules: ``config`` (:class:`FitConfig`, also the command line), ``problem`` (targets, split,
folds; a fit in progress), ``primal`` and ``dual`` (the two forms' passes), ``results``
(:class:`FitResult` and its files), ``run`` (:func:`fit_all_layers`, the orchestrator), ``cli``.
"layer" is the hidden-state index (0 = embeddings, l = output of block l). Names resolve
lazily: ``fastprobe --help`` loads no torch.
"""
from __future__ import annotations

from actstore.lazy import lazy_exports
from probes.errors import FitError

__all__ = ["fit_all_layers", "fit_all_layers_distributed", "FitConfig", "FitResult", "FitError",
           "write_results", "load_results", "store_identity", "RESULTS_FILE", "ARRAYS_FILE",
           "PREDICTIONS_FILE"]

_LAZY = {"fit_all_layers": "run", "fit_all_layers_distributed": "run", "FitConfig": "config",
         **{name: "results" for name in ("FitResult", "write_results", "load_results",
                                         "store_identity", "RESULTS_FILE", "ARRAYS_FILE",
                                         "PREDICTIONS_FILE")}}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
