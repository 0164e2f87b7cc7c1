"""`fastprobe` command line: ridge probes and neuron correlations on every layer of a store.

Thin wrapper over :func:`probes.fit.fit_all_layers`; errors are reported by ``actstore.cli.run``
(one line, exit status 2). Heavy imports happen inside the handlers so ``--help`` is fast.
"""
from __future__ import annotations

import argparse
import sys

from probes.cli_common import DESCRIPTION, EPILOG

# each command's parser lives beside the code it drives; they import their heavy modules
# (torch, sklearn) inside the handlers, so `fastprobe --help` stays fast
COMMANDS = ("probes.fit.cli", "probes.neurons.cli", "probes.experiments.cli")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    from actstore import __version__

    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="fastprobe", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"fastprobe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).add_cli(sub, fmt)
    return parser


def main(argv: list[str] | None = None) -> int:
    from actstore.cli import run

    return run(build_parser(), argv, "fastprobe")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
