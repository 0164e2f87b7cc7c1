"""``actstore run``: the command line of the pipeline, built from :class:`PipelineConfig`.
It reaches the ``actstore`` command through the entry point ``actstore.commands`` (see
pyproject.toml), so no actstore module imports probes."""
from __future__ import annotations

import argparse

from actstore.options import add_arguments, from_args
from probes.pipeline.config import PipelineConfig

__all__ = ["add_cli"]


def add_cli(subparsers) -> None:
    """Add ``actstore run`` to the actstore command line."""
    p = subparsers.add_parser(
        "run",
        help="the main job: extract -> probe every layer (-> neurons -> experiments) -> report",
        description="Run the paper's pipeline end to end and write OUT/report.md.\n\n"
        "RECIPE probes (the default, `actstore run --out ...`): for every dataset and prompt, "
        "extract the last-entity-token hidden state at every layer into "
        "OUT/stores/NAME[__PROMPT].zarr and fit ridge probes on every layer (fastprobe fit "
        "--all-layers) into OUT/probes/NAME[__PROMPT]/.\n"
        "RECIPE paper (`actstore run paper --out ...`): the same, then per place dataset a "
        "classification probe of its country / state_name / borough_name (10 most frequent "
        "classes, rarer rows dropped) into OUT/classify/NAME/, and per dataset the MLP "
        "neurons most correlated with each target (fastprobe neurons, with probe cosines) into "
        "OUT/neurons/NAME/ and the paper's experiments (fastprobe experiment: prompts, block "
        "hold-out by the dataset's natural group column, entity-type hold-out, MLP vs linear, "
        "PCA-k) into OUT/experiments/NAME/. It extracts layer 0 (the token embeddings) too, "
        "and the random-init control (--controls): the same architecture with re-initialised "
        "weights, extracted and probed the same way into OUT/controls/random-init/.\n\n"
        "Re-running resumes: unfinished stores continue, finished steps whose recorded inputs "
        "still match are not redone.",
        epilog="examples:\n"
        "  actstore run paper --out demo-out --limit 1000   # offline built-ins, embedded SmolLM2\n"
        "  actstore run --out probes-only --limit 600           # extract + fit + report only\n"
        "  actstore run paper --datasets world_cities --prompts empty,coords,random --out p\n"
        "  actstore run paper --datasets ../shared/datasets/paper/world_place.csv "
        "--experiments holdout,pca --out wp\n"
        "  actstore run paper --models smollm2,gemma3-270m --limit 300 --out sizes"
        "   # model size\n"
        "  actstore run paper --model meta-llama/Llama-2-7b-hf --device cuda "
        "--datasets world_place,us_place --out l7b\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p, PipelineConfig)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    from probes.pipeline.run import run  # deferred: `actstore --help` must not load torch

    report = run(from_args(PipelineConfig, args, progress=not args.no_progress))
    print(f"report: {report}")
    return 0
