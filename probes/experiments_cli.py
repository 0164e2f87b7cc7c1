"""``fastprobe experiment``: the paper's experiments on activation stores."""
from __future__ import annotations


from probes.cli_common import layers_note

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
    if getattr(args, "layer", None) is not None or getattr(args, "layers", None) is not None:
        layers_note("--layers" if kind == "prompts" else "--layer")
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


def add_cli(sub, fmt) -> None:
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
            p.add_argument("--layers", metavar="L,M,...", default=None,
                           help="hidden-state indices to probe (default all the store holds)")
        else:
            p.add_argument("store", metavar="STORE", help="activation store (Zarr or .h5)")
            p.add_argument("--layer", type=int, default=None, metavar="L",
                           help="hidden-state index (default: the best LOO layer of all layers)")
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


