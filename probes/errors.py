"""The errors fastprobe raises on purpose. Every one derives from :class:`ProbesError` (a
ValueError), carries a whole one-line message, and is printed by the CLIs without a traceback
(``ACTSTORE_DEBUG=1`` shows it). The bottom of the package: it imports nothing."""
from __future__ import annotations

__all__ = ["ProbesError", "InputError", "StatsError", "BackendUnavailable", "RidgeError",
           "ClassifyError", "MetricsError", "FitError", "NeuronReportError", "ExperimentError",
           "PipelineError"]


class ProbesError(ValueError):
    """Base class: a user-facing problem whose message says what is wrong and what to do."""


class InputError(ProbesError):
    """Targets, splits or layers a store cannot give (unknown, non-numeric, missing values)."""


class StatsError(ProbesError):
    """Bad input to the statistics engine (shapes, dtypes, fold ids, incompatible merges)."""


class BackendUnavailable(ProbesError):
    """A named backend cannot run here (not built, not installed, or no device)."""


class RidgeError(ProbesError):
    """Invalid ridge input (alpha grid, too few rows, non-finite statistics...)."""


class ClassifyError(ProbesError):
    """Classification probes: labels, folds, solvers (probes.classify)."""


class MetricsError(ProbesError):
    """Metric inputs of the wrong shape or content."""


class FitError(ProbesError):
    """A probing request that cannot run on this store (message says what is wrong)."""


class NeuronReportError(ProbesError):
    """A neuron report that cannot run on this store (message says what is wrong)."""


class ExperimentError(ProbesError):
    """An experiment request that cannot run (stores that disagree, a bad group column...)."""


class PipelineError(ProbesError):
    """A user-facing error of ``actstore run``."""
