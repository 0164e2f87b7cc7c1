"""``actstore run``: extract every dataset's activations, probe every layer, write one report.

    dataset x prompt --extract--> OUT/stores/NAME[__PROMPT].zarr --fit--> OUT/probes/NAME[..]/
        (paper recipe) --neurons--> OUT/neurons/NAME/ --experiments--> OUT/experiments/NAME/
        (paper recipe, place datasets) --classify--> OUT/classify/NAME/
        --> OUT/report.md (+ OUT/r2_by_layer.png)

The first prompt is the main one (its store is OUT/stores/NAME.zarr; neurons and the
single-store experiments use it). Every step resumes: an extraction from its store's rows_done,
every later step from the record of its inputs beside its outputs (steps.py); changing the
model, prompt, dataset or limit under the same OUT is refused with the differences.
"""
from __future__ import annotations

from actstore.lazy import lazy_exports

__all__ = ["run_pipeline", "run_paper", "run", "PipelineConfig", "RECIPES", "EXPERIMENTS",
           "DEMO_DATASETS"]

# Modules (bottom to top): config (options, recipes), plan (jobs), steps (the resumable steps
# and their records), report_md, run (the orchestration), cli (actstore run, an entry point).
# Names resolve lazily: ``actstore --help`` imports the CLI without torch.
_LAZY = {"run_pipeline": "run", "run_paper": "run", "run": "run", "PipelineConfig": "config",
         "RECIPES": "config", "EXPERIMENTS": "config", "DEMO_DATASETS": "config"}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
