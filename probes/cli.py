"""`fastprobe` command line: ridge probes and neuron correlations on every layer of a store.

Thin wrapper over :func:`probes.fit.fit_all_layers`; errors are reported by ``actstore.cli.run``
(one line, exit status 2). Heavy imports happen inside the handlers so ``--help`` is fast.
"""
from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Fit a linear (ridge) probe from every layer's activations to the entity targets of an
activation store (as in Gurnee & Tegmark 2023, "Language Models Represent Space and Time"),
with the regularisation strength chosen per layer by exact cross-validation.

One streaming pass over the store accumulates each layer's statistics (Σx, XᵀX, Xᵀy); one
float64 eigendecomposition per layer then gives every alpha of the grid at once, with exact
efficient leave-one-out (identical to scikit-learn RidgeCV) or k-fold selection."""

EPILOG = """\
examples:
  fastprobe fit --all-layers w.zarr --out probe-out
      latitude+longitude (a place store's own targets), LOO over 25 alphas 1e-2..1e5,
      the store's is_test split; prints a table, writes probe-out/results.json + PNGs
  fastprobe fit --all-layers figures.zarr --target year --cv 5 --out time-out
  fastprobe fit --all-layers w.zarr --alphas 1,10,100,1000 --alpha-per-target --out o2
  fastprobe fit --all-layers w.zarr --split group:country --out heldout-countries
  fastprobe fit --all-layers w.zarr --split random:0.2:0 --backend torch --out o3
  fastprobe show probe-out          # reprint the table of an earlier fit
  fastprobe neurons w.zarr --top 20 --out neurons-out   # neurons most correlated with lat/lon

Python: probes.fit_all_layers(store, ...) (same options) and probes.RidgeProbeCV, a
scikit-learn estimator (fit/predict/score) with the same solver, for plain arrays.
Make a store first with `actstore extract ... --out w.zarr`.
"""

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
    from probes.fit import fit_all_layers
    from probes.report import format_table

    if not args.all_layers and args.layers is None:
        raise ValueError("say which layers: --all-layers, or --layers 3,5,7 (positions in the store)")
    layers = None
    if args.layers is not None:
        try:
            layers = [int(x) for x in args.layers.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--layers {args.layers!r}: expected comma-separated integers") from None
    result = fit_all_layers(
        args.store, targets=args.target, alphas=args.alphas, cv=args.cv,
        alpha_per_target=args.alpha_per_target, split=args.split, backend=args.backend,
        out=args.out, layers=layers, precision=args.precision, device=args.device,
        memory_bytes=int(args.memory_gb * (1 << 30)),
        progress=not args.quiet and sys.stderr.isatty(), seed=args.seed)
    print(format_table(result))
    if args.out:
        print(f"wrote {args.out}/results.json and plots")
    return 0


NEURONS_DESCRIPTION = """\
Correlate every MLP neuron of every layer with each target: Pearson from one streaming pass,
Spearman (Pearson of average ranks) one layer at a time; neurons are ranked by |Spearman|.
--method stored (default) reads the neurons a store holds (`actstore extract --neurons`);
--method projection computes them the paper's way from the stored residual stream: hidden state
l, RMS-normalised by block l's post-attention norm, through block l's MLP gate and up weights
(act(gate) * up; exact when block l's attention adds nothing). Either way a neuron's layer is the
hidden state its MLP writes into (block b -> layer b+1). --probe DIR adds the cosine of each top
neuron's output weights (down_proj column) with the probe direction fitted at that layer."""

NEURONS_EPILOG = """\
examples:
  fastprobe neurons w.zarr --out neurons-out
      latitude and longitude (a place store's own targets), all rows, top 50 per target
  fastprobe neurons figures.zarr --target year --top 20 --out year-neurons
  fastprobe neurons w.zarr --split train --backend torch --device cpu --out n2
  fastprobe neurons w.zarr --method projection --out proj-out
      a store without neurons: projects the residual stream through the model's MLP weights
      (the model named in the store; --model NAME_OR_PATH to point at a local copy)
  fastprobe fit --all-layers w.zarr --out probe-out
  fastprobe neurons w.zarr --method projection --probe probe-out --top 20 --out n3
      adds cos(probe): each neuron's output weights vs the probe of the layer it writes into

output (DIR):
  neurons.json          per target: the top neurons (rank, layer, index, pearson, spearman,
                        and source_layer for projection, probe_cosine per probe target with
                        --probe); method, model, store, targets, n_rows, split, backend, seconds
  neurons.npz           pearson and spearman, (layers, d_mlp, targets) float64; layers, targets
                        (and source_layers for projection)
  neuron_<target>.png   the best neuron's activation against the target (for places: a
                        longitude/latitude map coloured by the activation)

Python: probes.neuron_report(store, targets=..., top=..., split=..., method=..., model=...,
probe_dir=..., out=...).
"""


def _cmd_neurons(args) -> int:
    from probes.neurons import neuron_report
    from probes.report import format_neuron_table

    result = neuron_report(args.store, targets=args.target, top=args.top, split=args.split,
                           backend=args.backend, device=args.device, out=args.out,
                           method=args.method, model=args.model, probe_dir=args.probe)
    print(format_neuron_table(result))
    if args.out:
        print(f"wrote {args.out}/neurons.json, neurons.npz and plots")
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


def build_parser() -> argparse.ArgumentParser:
    from actstore import __version__

    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="fastprobe", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"fastprobe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("fit", help="fit ridge probes on every layer of a store",
                       description=DESCRIPTION, epilog=FIT_EPILOG, formatter_class=fmt)
    p.add_argument("store", metavar="STORE", help="activation store (Zarr directory or .h5 file)")
    p.add_argument("--all-layers", action="store_true",
                   help="probe every layer of the store (the usual run)")
    p.add_argument("--layers", metavar="P,Q,...", default=None,
                   help="probe only these layer positions (0-based indices into the store's layers)")
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

    n = sub.add_parser("neurons", help="correlate every MLP neuron with the targets",
                       description=NEURONS_DESCRIPTION, epilog=NEURONS_EPILOG, formatter_class=fmt)
    n.add_argument("store", metavar="STORE", help="activation store (Zarr or .h5)")
    n.add_argument("--method", default="stored", choices=["stored", "projection"],
                   help="stored: the store's neurons (extract --neurons; default); projection: "
                        "computed from the residual stream with the model's MLP weights")
    n.add_argument("--model", default=None, metavar="NAME_OR_PATH",
                   help="model for --method projection / --probe (default: the store's model)")
    n.add_argument("--probe", default=None, metavar="DIR",
                   help="a `fastprobe fit --out` directory of this store: adds each top "
                        "neuron's output-weight cosine with the probe direction")
    n.add_argument("--target", metavar="NAMES", default=None,
                   help="comma-separated target columns, e.g. latitude,longitude or year "
                        "(default: the store's own targets)")
    n.add_argument("--top", type=int, default=50, metavar="K",
                   help="neurons listed per target, by |spearman| (default %(default)s)")
    n.add_argument("--split", default="all", choices=["all", "is_test", "train"],
                   help="rows to correlate over: all (default), the is_test rows, or the others")
    n.add_argument("--backend", default="auto", choices=["auto", "cpu", "torch", "cuda", "triton"],
                   help="moments kernel; auto picks the fastest available (default)")
    n.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="where moments and ranks are computed (default: cuda when the backend "
                        "or a present GPU calls for it, else cpu)")
    n.add_argument("--out", metavar="DIR", default=None,
                   help="output directory for neurons.json, neurons.npz and PNG plots")
    n.set_defaults(func=_cmd_neurons)

    s = sub.add_parser("show", help="reprint the table of a finished fit",
                       description="Reprint the per-layer table from DIR/results.json.",
                       formatter_class=fmt, epilog="example:\n  fastprobe show probe-out\n")
    s.add_argument("dir", metavar="DIR", help="output directory of `fastprobe fit` (or its results.json)")
    s.add_argument("--json", action="store_true", help="print the raw results.json instead")
    s.set_defaults(func=_cmd_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    from actstore.cli import run

    return run(build_parser(), argv, "fastprobe")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
