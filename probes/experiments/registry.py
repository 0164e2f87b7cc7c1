"""The registry: every experiment by its key, and what goes through it for any result (the
printed table, NAME.json + NAME.png, the report section)."""
from __future__ import annotations

from pathlib import Path

from probes.errors import ExperimentError
from probes.experiments import holdout, nonlinear, pca, prompts
from probes.experiments.base import Experiment
from probes.experiments.common import write_result

__all__ = ["EXPERIMENTS", "EXPERIMENT_TITLES", "experiment_of", "format_experiment",
           "write_experiment", "experiment_markdown"]

EXPERIMENTS: dict[str, Experiment] = {e.key: e for e in (
    prompts.EXPERIMENT, holdout.HOLDOUT, holdout.ENTITY_TYPE, nonlinear.EXPERIMENT,
    pca.EXPERIMENT)}
EXPERIMENT_TITLES = {key: e.title for key, e in EXPERIMENTS.items()}
_BY_KIND = {e.kind: e for e in EXPERIMENTS.values()}


def experiment_of(result: dict) -> Experiment:
    """The experiment that made ``result`` (by its ``"experiment"`` field)."""
    kind = result["experiment"]
    if kind not in _BY_KIND:
        raise ExperimentError(f"unknown experiment kind {kind!r}")
    return _BY_KIND[kind]


def format_experiment(result: dict) -> str:
    """The short table ``fastprobe experiment`` prints.

    Parameters
    ----------
    result : dict
        A result of one of the experiments (or its JSON file, read back).

    Returns
    -------
    str
        The table, with the run time last when the result has one.
    """
    out = experiment_of(result).text(result)
    if "seconds" in result:
        out.append(f"({result['seconds']:.1f} s)")
    return "\n".join(out)


def write_experiment(result: dict, out_dir) -> list[Path]:
    """Write NAME.json (the result, non-finite numbers as null) and NAME.png, atomically.

    Parameters
    ----------
    result : dict
        A result of one of the experiments; NAME is its ``"name"``.
    out_dir : str or Path
        The folder (created when missing).

    Returns
    -------
    list of Path
        The JSON and PNG paths.
    """
    return write_result(result, out_dir, experiment_of(result).plot)


def experiment_markdown(key: str, res: dict) -> list[str]:
    """Markdown lines of one experiment's section in the ``actstore run`` report (none for an
    unknown key)."""
    exp = EXPERIMENTS.get(key)
    return exp.markdown(res) if exp is not None else []
