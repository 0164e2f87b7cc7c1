"""``fastprobe experiment``: one subcommand per registered experiment, built from its record
(its own arguments first, then the ones every experiment shares)."""
from __future__ import annotations

from probes.cli_common import layers_note
from probes.experiments.registry import EXPERIMENTS, format_experiment, write_experiment
from probes.ridge.alphas import DEFAULT_ALPHAS

__all__ = ["add_cli", "EXPERIMENT_DESCRIPTION", "EXPERIMENT_EPILOG"]

EXPERIMENT_DESCRIPTION = """\
The paper's probing experiments (Gurnee & Tegmark 2023) on activation stores; each prints a
short table and, with --out DIR, writes DIR/NAME.json (the full result) and DIR/NAME.png.
Linear probes are ridge with the alpha chosen by exact leave-one-out on the train rows, as
`fastprobe fit`. --layer L is a hidden-state index the store holds (0 = embeddings, l = output
of block l; negative: counted from the last stored layer; default: the best LOO layer)."""

EXPERIMENT_EPILOG = """\
examples:
  fastprobe experiment prompts w-empty.zarr w-coords.zarr w-random.zarr --out exp
      one dataset extracted with 3 prompts: test R2 by layer per prompt, and transfer (probe
      fitted on one prompt's train rows, tested on another prompt's test rows) -> exp/prompts.*
  fastprobe experiment holdout w.zarr --group country --max-groups 20 --out exp
      block hold-out: per country, fit on all other rows, test on the country; held-out vs
      nominal proximity error -> exp/holdout_country.json/.png
  fastprobe experiment holdout figures.zarr --group century --out exp   (year_century derived)
  fastprobe experiment entity-type us.zarr --out exp          -> exp/entity_type.*
  fastprobe experiment nonlinear w.zarr --layer 12 --out exp  -> exp/nonlinear.*
  fastprobe experiment pca w.zarr --ks 2,5,10,20,50,100 --out exp   -> exp/pca.*

Python: probes.experiments.{prompt,holdout,entity_type,nonlinear,pca}_experiment(...) and
write_experiment(result, out_dir). Definitions and JSON fields: docs/experiments.md.
"""


def _add_common_arguments(p) -> None:
    p.add_argument("--target", metavar="NAMES", default=None,
                   help="comma-separated target columns (default: the store's own)")
    p.add_argument("--alphas", default=DEFAULT_ALPHAS, metavar="GRID",
                   help="ridge alpha grid, LO:HI:N or a,b,c (default %(default)s)")
    p.add_argument("--split", default="is_test", metavar="SPEC",
                   help="train/test split: is_test (default) | random:FRAC:SEED | "
                        "group:COLUMN[:FRAC[:SEED]]")
    p.add_argument("--backend", default="auto",
                   choices=["auto", "cpu", "torch", "cuda", "triton"],
                   help="statistics backend for the layer fits (default auto)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="write DIR/NAME.json and DIR/NAME.png")


def _cmd_experiment(args) -> int:
    for flag, dest in (("--layers", "layers"), ("--layer", "layer")):
        if getattr(args, dest, None) is not None:
            layers_note(flag)
            break
    common = dict(targets=args.target, alphas=args.alphas, backend=args.backend,
                  split=args.split)
    result = EXPERIMENTS[args.experiment].from_args(args, common)
    print(format_experiment(result))
    if args.out:
        paths = write_experiment(result, args.out)
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def add_cli(sub, fmt) -> None:
    """The ``experiment`` command and one subcommand per registered experiment."""
    e = sub.add_parser("experiment", help="the paper's experiments: " + ", ".join(EXPERIMENTS),
                       description=EXPERIMENT_DESCRIPTION, epilog=EXPERIMENT_EPILOG,
                       formatter_class=fmt)
    esub = e.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    for key, exp in EXPERIMENTS.items():
        p = esub.add_parser(key, help=exp.help, description=exp.help + ". " +
                            EXPERIMENT_DESCRIPTION, epilog=exp.epilog, formatter_class=fmt)
        exp.add_arguments(p)
        _add_common_arguments(p)
        p.set_defaults(func=_cmd_experiment)
    e.set_defaults(func=lambda args: (e.print_help(), 2)[1])
