"""`actstore` command line: thin wrappers over the Python API.

Each subcommand lives beside the code it drives: a module in COMMANDS defines
``add_cli(subparsers)``, which adds its parser and sets ``func`` (called with the parsed
args, returns an exit code). Modules keep heavy imports (torch, transformers) inside the
handlers so that ``--help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from importlib.metadata import entry_points

COMMANDS = ("actstore.datasets", "actstore.extract.cli", "actstore.store.cli")
# Commands other packages add (``actstore run`` comes from probes.pipeline.cli): entry points of
# this group name a function add_cli(subparsers), so actstore never imports them by name.
PLUGIN_GROUP = "actstore.commands"

EPILOG = """\
examples:
  actstore datasets list
  actstore datasets show ../shared/datasets/paper/world_place.csv --json
  actstore extract --dataset world_cities --prompt coords --limit 512 --out w.zarr
  python -c "import actstore; s = actstore.open('w.zarr'); print(s.n_layers, s.entities.head())"

Then probe every layer:  fastprobe fit --all-layers w.zarr --out probe-out
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="actstore",
        description="Extract a language model's hidden states for entity datasets into a "
        "chunked fp16 activation store (Zarr v3 or HDF5), as in Gurnee & Tegmark (2023), "
        "'Language Models Represent Space and Time'.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from actstore import __version__

    parser.add_argument("--version", action="version", version=f"actstore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).add_cli(sub)
    for ep in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        ep.load()(sub)
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str] | None, prog: str) -> int:
    """Parse, dispatch, and turn expected errors into one line on stderr.

    Our validation errors subclass ValueError (DatasetError, StoreError, FitError, ...) and
    carry the whole message; set ACTSTORE_DEBUG=1 to get the traceback instead.
    """
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    debug = os.environ.get("ACTSTORE_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; work already stored is kept: re-run the same command to "
              "resume", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:
        if debug:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if debug or "out of memory" not in str(exc).lower():
            raise
        print(f"{prog}: error: out of memory ({str(exc).splitlines()[0]}); lower --batch-size "
              "(or --memory-gb), or use a larger device", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv, "actstore")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
