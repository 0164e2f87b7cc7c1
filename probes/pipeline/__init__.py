"""The main job: extract every dataset's activations, probe every layer, write one report.

``actstore run [RECIPE]`` chains the steps of the paper for a list of datasets:

    dataset x prompt --extract--> OUT/stores/NAME[__PROMPT].zarr
        --fit--> OUT/probes/NAME[__PROMPT]/                       (recipes probes and paper)
        --neurons--> OUT/neurons/NAME/                            (paper)
        --experiments--> OUT/experiments/NAME/                    (paper)
        --> OUT/report.md (+ OUT/r2_by_layer.png)

Recipes: ``probes`` (the default: extract -> fit --all-layers -> report) and ``paper`` (adds the
neuron step and the experiments). The first prompt of ``prompts`` is the main one: its store
keeps the plain name OUT/stores/NAME.zarr (so OUTs made before prompt variants resume), the
others are OUT/stores/NAME__PROMPT.zarr; neurons and the single-store experiments use the main
prompt's store.

Each step is resumable: an interrupted extraction resumes from its store's ``rows_done``; every
later step writes a record of its inputs beside its outputs (``source.json`` for fits and
neurons, ``EXPERIMENT.source.json`` for experiments) and is not redone while the record matches
(the same finished store, the same options) and its outputs exist. Changing the model, prompt,
dataset or limit under the same OUT is refused with the list of differences: choose another OUT.
"""
from __future__ import annotations

__all__ = ["run_pipeline", "run_paper", "run", "PipelineConfig", "RECIPES", "EXPERIMENTS",
           "DEMO_DATASETS"]

# Modules (bottom to top): config (options, recipes), plan (jobs), steps (the resumable steps and their
# records), report_md, run (the orchestration), cli (``actstore run``, via an entry point).
# Names resolve lazily: ``actstore --help`` imports the CLI without torch.
_LAZY = {"run_pipeline": "run", "run_paper": "run", "run": "run", "PipelineConfig": "config",
         "RECIPES": "config", "EXPERIMENTS": "config", "DEMO_DATASETS": "config"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'probes.pipeline' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"probes.pipeline.{module}"), name)
