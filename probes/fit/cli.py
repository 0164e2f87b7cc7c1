"""``fastprobe fit`` (options from :class:`FitConfig`) and ``fastprobe show``. Light on purpose:
the handlers import the fit (torch) and the results (pandas) when they run."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from actstore.distributed import cli_call
from actstore.options import add_arguments, from_args
from probes.cli_common import DESCRIPTION, layers_note
from probes.errors import FitError
from probes.fit.config import FitConfig
from probes.report import format_classify_table, format_table

__all__ = ["add_cli", "cli_fit"]

FIT_EPILOG = """\
output (DIR):
  results.json          per layer: layer, alpha, cv_score, and for train and test: r2 (mean
                        over targets), r2_per_target, pearson, spearman, proximity_error and,
                        medae_per_target, for places, km_error_median; row_norms (rows
                        whose norm is far above the layer's median) and out_of_range
                        (predictions outside the valid range); plus norm_outliers (the
                        flagged rows, named), row_norm, best_layer (by test R2), targets,
                        split sizes, backend, seconds, the sha256 of the files below (written
                        last; a NaN is null, its reason under "nulls"); control: the
                        shuffled-target control's test R2 and the selectivity per layer
  probes.npz            coef (L, d, k) in target units, intercept, alpha, cv_scores,
                        predictions (L, n, k), is_test (n,), layers
  predictions_best_layer.csv   true and predicted targets of every row at the best layer
  r2_by_layer.png, map_best_layer.png (places) or year_best_layer.png (time)

metrics: R2 = 1 - SSE/SST per target; proximity error = fraction of entities whose
PREDICTION is closer to an entity's true position than its own prediction (0 is perfect);
km error = great-circle distance between true and predicted (latitude, longitude).
"""


def cli_fit(store, config: FitConfig | None = None, **options):
    """``fastprobe fit`` in one process or under torchrun: the result on rank 0, None on the
    other ranks. An error every rank meets (unknown target, NaN activations) is printed once,
    by rank 0; a rank's own error by that rank, prefixed ``[rank k]``; exit status 2
    (:func:`actstore.distributed.cli_call`)."""
    from probes.fit.run import fit_all_layers_distributed  # deferred: torch

    return cli_call(fit_all_layers_distributed, store, prog="fastprobe", config=config,
                    **options)


def _layers(spec: str | None) -> tuple[int, ...] | None:
    """--layers L,M,... as integers (with the one-release notice of their meaning)."""
    if spec is None:
        return None
    try:
        layers = tuple(int(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise FitError(f"--layers {spec!r}: expected comma-separated integers") from None
    layers_note("--layers")
    return layers


def _cmd_fit(args) -> int:
    if not args.all_layers and args.layers is None:
        raise FitError("say which layers: --all-layers, or --layers 3,5,7 (hidden-state indices "
                       "the store holds)")
    config = from_args(FitConfig, args, layers=_layers(args.layers),
                       memory_bytes=int(args.memory_bytes * (1 << 30)),
                       progress=not args.quiet and sys.stderr.isatty())
    if config.task != "regress" and _classify(args, config):
        return 0
    # under torchrun the ranks share the rows; rank 0 prints and writes, the others get None
    result = cli_fit(args.store, config, out=args.out)
    if result is None:
        return 0
    print(format_table(result))
    if args.out:
        print(f"wrote {args.out}/results.json and plots")
    return 0


def _classify(args, config) -> bool:
    """A classification fit when the target is a class column (or --task classify): fitted,
    printed and written here; False for a ridge fit."""
    from actstore.store import open_store
    from probes.fit.classify import classify_target, fit_classifier  # deferred: torch

    store = open_store(args.store)
    target = classify_target(store, config)
    if target is None:
        store.close()
        return False
    try:
        result = fit_classifier(store, config, target, out=args.out)
    finally:
        store.close()
    print(format_classify_table(result.doc))
    if args.out:
        print(f"wrote {args.out}/results.json, classify.npz and plots")
    return True


def _cmd_show(args) -> int:
    from probes.fit.results import load_results  # deferred: pandas

    try:
        doc = json.loads((Path(args.dir) / "results.json").read_text())
    except (OSError, ValueError):
        doc = {}                  # load_results says what is wrong
    if doc.get("task") == "classify":
        print(json.dumps(doc, indent=1) if args.json else format_classify_table(doc))
        return 0
    result = load_results(args.dir)
    print(json.dumps(result.to_json(), indent=1) if args.json else format_table(result))
    return 0


def add_cli(sub, fmt) -> None:
    """Add ``fit`` and ``show`` to the fastprobe command line."""
    p = sub.add_parser("fit", help="fit ridge probes on every layer of a store",
                       description=DESCRIPTION, epilog=FIT_EPILOG, formatter_class=fmt)
    p.add_argument("store", metavar="STORE", help="activation store (Zarr directory or .h5 file)")
    p.add_argument("--all-layers", action="store_true",
                   help="probe every layer of the store (the usual run)")
    add_arguments(p, FitConfig, defaults={"memory_bytes": 2.0})
    p.add_argument("--out", metavar="DIR", default=None,
                   help="output directory for results.json, probes.npz and PNG plots")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_fit)

    s = sub.add_parser("show", help="reprint the table of a finished fit",
                       description="Reprint the per-layer table from DIR/results.json.",
                       formatter_class=fmt, epilog="example:\n  fastprobe show probe-out\n")
    s.add_argument("dir", metavar="DIR",
                   help="output directory of `fastprobe fit` (or its results.json)")
    s.add_argument("--json", action="store_true", help="print the raw results.json instead")
    s.set_defaults(func=_cmd_show)
