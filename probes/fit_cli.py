"""``fastprobe fit`` and ``fastprobe show``: ridge probes on every layer of a store."""
from __future__ import annotations

import sys

from probes.cli_common import DESCRIPTION, layers_note

FIT_EPILOG = """\
output (DIR):
  results.json          per layer: layer, alpha, cv_score, and for train and test: r2 (mean
                        over targets), r2_per_target, pearson, spearman, proximity_error and,
                        for places, km_error_median; plus best_layer (by test R2), targets,
                        split sizes, backend, seconds
  probes.npz            coef (L, d, k) in target units, intercept, alpha, cv_scores
  predictions_best_layer.csv   true and predicted targets of every row at the best layer
  r2_by_layer.png, map_best_layer.png (places) or year_best_layer.png (time)

metrics: R2 = 1 - SSE/SST per target; proximity error = fraction of entities whose
PREDICTION is closer to an entity's true position than its own prediction (0 is perfect);
km error = great-circle distance between true and predicted (latitude, longitude).
"""



def _cmd_fit(args) -> int:
    # fit_all_layers itself in one process; under torchrun the ranks share the rows (rank 0
    # prints and writes, the others return None)
    from probes.distributed import cli_fit as fit_all_layers
    from probes.report import format_table

    if not args.all_layers and args.layers is None:
        raise ValueError("say which layers: --all-layers, or --layers 3,5,7 (hidden-state "
                         "indices the store holds)")
    layers = None
    if args.layers is not None:
        try:
            layers = [int(x) for x in args.layers.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--layers {args.layers!r}: expected comma-separated integers") from None
        layers_note("--layers")
    result = fit_all_layers(
        args.store, targets=args.target, alphas=args.alphas, cv=args.cv,
        alpha_per_target=args.alpha_per_target, split=args.split, backend=args.backend,
        out=args.out, layers=layers, precision=args.precision, device=args.device,
        memory_bytes=int(args.memory_gb * (1 << 30)),
        progress=not args.quiet and sys.stderr.isatty(), seed=args.seed)
    if result is None:
        return 0
    print(format_table(result))
    if args.out:
        print(f"wrote {args.out}/results.json and plots")
    return 0



def _cmd_show(args) -> int:
    from probes.fit import load_results
    from probes.report import format_table

    result = load_results(args.dir)
    if args.json:
        import json
        print(json.dumps(result, indent=1))
    else:
        print(format_table(result))
    return 0


def add_cli(sub, fmt) -> None:
    """Add ``fit`` and ``show`` to the fastprobe command line."""
    p = sub.add_parser("fit", help="fit ridge probes on every layer of a store",
                       description=DESCRIPTION, epilog=FIT_EPILOG, formatter_class=fmt)
    p.add_argument("store", metavar="STORE", help="activation store (Zarr directory or .h5 file)")
    p.add_argument("--all-layers", action="store_true",
                   help="probe every layer of the store (the usual run)")
    p.add_argument("--layers", metavar="L,M,...", default=None,
                   help="probe only these layers: hidden-state indices the store holds (0 = "
                        "embeddings, l = output of block l, as results.json names them)")
    p.add_argument("--target", metavar="NAMES", default=None,
                   help="comma-separated target columns, e.g. latitude,longitude or year "
                        "(default: the store's own targets)")
    p.add_argument("--alphas", default="1e-2:1e5:25", metavar="GRID",
                   help="alpha grid: LO:HI:N log-spaced, or a list a,b,c (default: %(default)s)")
    p.add_argument("--cv", default="loo", metavar="loo|K",
                   help="alpha selection: exact leave-one-out (default) or K-fold (seeded shuffle)")
    p.add_argument("--alpha-per-target", action="store_true",
                   help="choose one alpha per target instead of one per layer (the paper shares it)")
    p.add_argument("--split", default="is_test", metavar="SPEC",
                   help="is_test (the store's column, default) | random:FRAC:SEED | "
                        "group:COLUMN[:FRAC[:SEED]] (hold out whole groups, e.g. group:country)")
    p.add_argument("--backend", default="auto", choices=["auto", "cpu", "torch", "cuda", "triton"],
                   help="statistics kernel: C++/OpenMP (cpu), torch float64 reference, CUDA, "
                        "Triton; auto picks the fastest available (default)")
    p.add_argument("--precision", default="float64", choices=["float64", "float32"],
                   help="float64 (exact, default) or float32 statistics blocks, eigendecomposition "
                        "and projections (about 2x faster; ~1e-6 relative, less exact for alphas far "
                        "below the float32 noise floor)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="where the solve runs (default: cuda for --backend cuda/triton, and for auto "
                        "when a GPU is present, else cpu; "
                        "--backend torch --device cuda runs the float64 reference on the GPU)")
    p.add_argument("--memory-gb", type=float, default=2.0, metavar="GB",
                   help="memory for one batch of layers' statistics + eigenvectors + per-alpha "
                        "predictions; fewer layers per pass when it is small (default 2; at least "
                        "one layer is always taken)")
    p.add_argument("--seed", type=int, default=0, help="seed of the k-fold shuffle (default 0)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="output directory for results.json, probes.npz and PNG plots")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_fit)

    s = sub.add_parser("show", help="reprint the table of a finished fit",
                       description="Reprint the per-layer table from DIR/results.json.",
                       formatter_class=fmt, epilog="example:\n  fastprobe show probe-out\n")
    s.add_argument("dir", metavar="DIR", help="output directory of `fastprobe fit` (or its results.json)")
    s.add_argument("--json", action="store_true", help="print the raw results.json instead")
    s.set_defaults(func=_cmd_show)
