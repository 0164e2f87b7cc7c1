"""``actstore verify STORE``: every open-time check, then every row block of every site array
and every entity column, code array and token array read and compared with its checksum; each
bad file is named with its array, layers and rows, and whether ``actstore extract ...
--repair`` can fix it. Exit 0: clean; 1: problems; 2: usage."""
from __future__ import annotations

import argparse
import json

from actstore.store.integrity import IntegrityReport, check_store

__all__ = ["add_cli", "report_text"]

DESCRIPTION = (
    "Check an activation store: the header, the arrays' metadata and rows_done agree; every "
    "shard and checksum file below rows_done exists with its size; every entity column (and "
    "code array, and a ragged store's token index) is complete; and (unless --quick) every "
    "row block of every site (resid, attn_out, mlp_out, neurons) and every entity column, "
    "code array and token array reads back with the crc32c written with it. Each problem "
    "names the file, the array, layers and rows, and whether re-extracting those rows "
    "(actstore extract ... --repair) repairs it.")

EXAMPLES = """\
examples:
  actstore verify w.zarr
  actstore verify w.zarr --json > verify.json
  actstore verify llama.h5 --quick          # the open-time checks only (no data read)

exit status: 0 no problems, 1 problems found, 2 usage error (e.g. not a store)
"""


def add_cli(subparsers) -> None:
    """Add ``actstore verify`` to the actstore command line."""
    p = subparsers.add_parser(
        "verify", help="check a store's structure and checksums; name every bad file",
        description=DESCRIPTION, epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store", help="the store: a Zarr directory or an HDF5 file")
    p.add_argument("--json", action="store_true",
                   help="print the report as JSON (problems with file, array, layers, rows, "
                        "repairable; bad_rows)")
    p.add_argument("--quick", action="store_true",
                   help="only the open-time checks (metadata and file sizes), no data read")
    p.set_defaults(func=_cli)


def report_text(rep: IntegrityReport) -> str:
    """The report as text: one line per problem, then a summary line."""
    lines = [p.line() for p in rep.problems]
    what = (f"{rep.blocks_checked} row block(s) read and compared with their checksums"
            if rep.checksums else
            f"no checksums (a store made before them, or integrity/ deleted): content not "
            f"verifiable, {rep.blocks_checked} row block(s) read")
    if rep.ok:
        lines.append(f"{rep.path}: OK ({rep.format}, rows_done {rep.rows_done}; {what})")
        return "\n".join(lines)
    n = len(rep.problems)
    head = f"{rep.path}: {n} problem{'s' if n > 1 else ''} ({what})"
    if rep.repairable:
        rows = ", ".join(f"{a}-{b - 1}" for a, b in rep.bad_rows)
        lines.append(f"{head}; all repairable: re-extract rows {rows} with the command that made "
                     "the store plus --repair")
    else:
        lines.append(f"{head}; not repairable by --repair: re-create the store "
                     "(actstore extract ... --overwrite)")
    return "\n".join(lines)


def _cli(args) -> int:
    rep = check_store(args.store, content=not args.quick)
    print(json.dumps(rep.to_dict(), indent=1) if args.json else report_text(rep))
    return 0 if rep.ok else 1
