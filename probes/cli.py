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
  fastprobe experiment holdout w.zarr --group country --out exp-out   # the paper's block hold-out

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
    # fit_all_layers itself in one process; under torchrun the ranks share the rows (rank 0
    # prints and writes, the others return None)
    from probes.distributed import cli_fit as fit_all_layers
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
    if result is None:
        return 0
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


EXPERIMENT_DESCRIPTION = """\
The paper's probing experiments (Gurnee & Tegmark 2023) on activation stores; each prints a
short table and, with --out DIR, writes DIR/NAME.json (the full result) and DIR/NAME.png.
Linear probes are ridge with the alpha chosen by exact leave-one-out on the train rows, as
`fastprobe fit`. --layer P is a layer POSITION in the store (default: the best LOO layer)."""

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

_EXP_EPILOGS = {
    "prompts": """\
example:
  fastprobe experiment prompts w-empty.zarr w-coords.zarr --target latitude,longitude --out exp
  fastprobe experiment prompts a.zarr b.zarr --names empty,coords --layers 4,8,12 --out exp
The stores must hold the same dataset (sha256), rows, entity order, split, layers and width.
""",
    "holdout": """\
examples:
  fastprobe experiment holdout w.zarr --group country --out exp
  fastprobe experiment holdout us.zarr --group state_name --min-group-size 20 --layer 10 --out exp
  fastprobe experiment holdout art.zarr --group decade --out exp
  fastprobe experiment holdout figures.zarr --group year_century --alpha 3000 --out exp
Groups: a column of the entity table, or <target>_century / <target>_decade derived from a
numeric target (century/decade alone mean year_century/year_decade when no such column exists).
""",
    "entity-type": """\
examples:
  fastprobe experiment entity-type us.zarr --out exp
  fastprobe experiment entity-type w.zarr --groups structure,natural_place --out exp
""",
    "nonlinear": """\
examples:
  fastprobe experiment nonlinear w.zarr --out exp
  fastprobe experiment nonlinear w.zarr --layer 12 --weight-decays 0.01,0.1 --max-epochs 50 --out exp
""",
    "pca": """\
examples:
  fastprobe experiment pca w.zarr --out exp
  fastprobe experiment pca w.zarr --layer -1 --ks 1,2,4,8,16,32 --out exp
""",
}


def _csv_list(text, conv, what):
    if text is None:
        return None
    try:
        vals = [conv(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} {text!r}: expected a comma-separated list") from None
    if not vals:
        raise ValueError(f"{what} {text!r} is empty")
    return vals


def _cmd_experiment(args) -> int:
    from probes import experiments as ex

    common = dict(targets=args.target, alphas=args.alphas, backend=args.backend, split=args.split)
    kind = args.experiment
    if kind == "prompts":
        stores = args.stores
        names = _csv_list(args.names, str, "--names")
        if names is not None:
            if len(names) != len(stores):
                raise ValueError(f"--names gives {len(names)} names for {len(stores)} stores")
            stores = dict(zip(names, stores))
        result = ex.prompt_experiment(stores, layers=_csv_list(args.layers, int, "--layers"),
                                      **common)
    elif kind in ("holdout", "entity-type"):
        kw = dict(layer=args.layer, min_group_size=args.min_group_size,
                  max_groups=args.max_groups or None, alpha=args.alpha,
                  groups=_csv_list(args.groups, str, "--groups"), **common)
        if kind == "holdout":
            result = ex.holdout_experiment(args.store, args.group, **kw)
        else:
            result = ex.entity_type_experiment(args.store, **kw)
    elif kind == "nonlinear":
        result = ex.nonlinear_experiment(
            args.store, layer=args.layer, hidden=args.hidden, seed=args.seed,
            weight_decays=_csv_list(args.weight_decays, float, "--weight-decays"), lr=args.lr,
            batch_size=args.batch_size, max_epochs=args.max_epochs, patience=args.patience,
            val_frac=args.val_frac, device=args.device, **common)
    else:
        result = ex.pca_experiment(args.store, layer=args.layer,
                                   ks=_csv_list(args.ks, int, "--ks"), **common)
    print(ex.format_experiment(result))
    if args.out:
        paths = ex.write_experiment(result, args.out)
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _add_experiment(sub, fmt) -> None:
    """The `experiment` command and its subcommands (probes.experiments)."""
    e = sub.add_parser("experiment", help="the paper's experiments: prompts, holdout, "
                       "entity-type, nonlinear, pca", description=EXPERIMENT_DESCRIPTION,
                       epilog=EXPERIMENT_EPILOG, formatter_class=fmt)
    esub = e.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    helps = {"prompts": "probe quality by layer across prompt variants, cross-prompt transfer",
             "holdout": "block hold-out by a group column (country, state, century...)",
             "entity-type": "hold out each entity type in turn",
             "nonlinear": "MLP probe (256 ReLU units) vs the linear probe at one layer",
             "pca": "probes on the top-k principal components vs the full width"}
    for kind, text in helps.items():
        p = esub.add_parser(kind, help=text, description=text + ". " + EXPERIMENT_DESCRIPTION,
                            epilog=_EXP_EPILOGS[kind], formatter_class=fmt)
        if kind == "prompts":
            p.add_argument("stores", metavar="STORE", nargs="+",
                           help="one store per prompt, same dataset and entities")
            p.add_argument("--names", metavar="A,B,...", default=None,
                           help="labels for the stores (default: each store's prompt name)")
            p.add_argument("--layers", metavar="P,Q,...", default=None,
                           help="layer positions to probe (default all)")
        else:
            p.add_argument("store", metavar="STORE", help="activation store (Zarr or .h5)")
            p.add_argument("--layer", type=int, default=None, metavar="P",
                           help="layer position (default: the best LOO layer of all layers)")
        if kind == "holdout":
            p.add_argument("--group", required=True, metavar="COLUMN",
                           help="group column: country, state_name, borough_name, decade, "
                                "death_century, year_century, entity_type...")
        if kind in ("holdout", "entity-type"):
            p.add_argument("--min-group-size", type=int, default=10, metavar="N",
                           help="groups with fewer rows are skipped (default %(default)s)")
            p.add_argument("--max-groups", type=int, default=20, metavar="N",
                           help="at most N groups, largest first; 0 = all (default %(default)s)")
            p.add_argument("--groups", metavar="G1,G2,...", default=None,
                           help="exactly these groups instead (overrides the two above)")
            p.add_argument("--alpha", type=float, default=None,
                           help="fixed alpha for every probe instead of LOO (the paper used one "
                                "alpha per model)")
        if kind == "nonlinear":
            p.add_argument("--hidden", type=int, default=256, help="hidden ReLU units (default 256)")
            p.add_argument("--weight-decays", default="0.01,0.03,0.1,0.3", metavar="W,...",
                           help="AdamW weight decays tried; best validation loss wins "
                                "(default %(default)s)")
            p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (1e-3)")
            p.add_argument("--batch-size", type=int, default=128, help="minibatch rows (128)")
            p.add_argument("--max-epochs", type=int, default=100, help="epoch cap (100)")
            p.add_argument("--patience", type=int, default=3,
                           help="epochs without validation improvement before stopping (3)")
            p.add_argument("--val-frac", type=float, default=0.2,
                           help="fraction of the train rows used for validation (0.2)")
            p.add_argument("--seed", type=int, default=0, help="seed (split, init, order)")
            p.add_argument("--device", default=None, choices=["cpu", "cuda"],
                           help="where the MLP trains (default: cuda if the backend or a present "
                                "GPU says so)")
        if kind == "pca":
            p.add_argument("--ks", default="2,5,10,20,50,100", metavar="K,...",
                           help="numbers of components (capped at d and n_train-1; default "
                                "%(default)s)")
        p.add_argument("--target", metavar="NAMES", default=None,
                       help="comma-separated target columns (default: the store's own)")
        p.add_argument("--alphas", default="1e-2:1e5:25", metavar="GRID",
                       help="ridge alpha grid, LO:HI:N or a,b,c (default %(default)s)")
        p.add_argument("--split", default="is_test", metavar="SPEC",
                       help="train/test split: is_test (default) | random:FRAC:SEED | "
                            "group:COLUMN[:FRAC[:SEED]]")
        p.add_argument("--backend", default="auto",
                       choices=["auto", "cpu", "torch", "cuda", "triton"],
                       help="statistics backend for the layer fits (default auto)")
        p.add_argument("--out", metavar="DIR", default=None,
                       help="write DIR/NAME.json and DIR/NAME.png")
        p.set_defaults(func=_cmd_experiment)
    e.set_defaults(func=lambda args: (e.print_help(), 2)[1])


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
    _add_experiment(sub, fmt)
    return parser


def main(argv: list[str] | None = None) -> int:
    from actstore.cli import run

    return run(build_parser(), argv, "fastprobe")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
