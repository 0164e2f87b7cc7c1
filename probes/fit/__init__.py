"""Ridge probes on every layer of an activation store (``fastprobe fit``).

Modules: ``config`` (:class:`FitConfig`, also the command line), ``problem`` (targets, split,
folds; a fit in progress), ``primal`` and ``dual`` (the two forms' passes), ``results``
(:class:`FitResult` and its files), ``run`` (:func:`fit_all_layers`, the orchestrator), ``cli``.
"layer" is the hidden-state index (0 = embeddings, l = output of block l). Names resolve
lazily: ``fastprobe --help`` loads no torch.
"""
from __future__ import annotations

import importlib

from probes.errors import FitError

__all__ = ["fit_all_layers", "fit_all_layers_distributed", "FitConfig", "FitResult", "FitError",
           "write_results", "load_results", "store_identity", "RESULTS_FILE", "ARRAYS_FILE",
           "PREDICTIONS_FILE"]

_LAZY = {"fit_all_layers": "run", "fit_all_layers_distributed": "run", "FitConfig": "config",
         **{name: "results" for name in ("FitResult", "write_results", "load_results",
                                         "store_identity", "RESULTS_FILE", "ARRAYS_FILE",
                                         "PREDICTIONS_FILE")}}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'probes.fit' has no attribute {name!r}")
    return getattr(importlib.import_module(f"probes.fit.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
