"""The main job: extract every dataset's activations, probe every layer, write one report.

``actstore run`` chains the steps of the paper for a list of datasets:

    dataset --extract--> OUT/stores/NAME.zarr --fastprobe fit--> OUT/probes/NAME/ --> OUT/report.md

Each step is resumable: an interrupted extraction resumes from its store's ``rows_done``; a
probe fitted on the same finished store with the same options (``source.json``) is not fitted
again. Changing the model, prompt, dataset or limit under the same OUT is refused with the list
of differences: choose another OUT.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

DEMO_DATASETS = ("world_cities", "us_places", "nobel")


class PipelineError(ValueError):
    """A user-facing error of ``actstore run``."""


SOURCE_FILE = "source.json"  # beside results.json: which store state the probes were fitted on


def _store_state(store, cv, backend) -> dict:
    """What makes a fit current: the store's identity and progress, and the fit's options."""
    meta = store.meta
    return {"store": str(store.path), "created": meta.get("created"),
            "dataset_sha256": (meta.get("dataset") or {}).get("sha256"),
            "rows_done": store.rows_done, "cv": cv, "backend": backend}


def _probe_is_current(probe_dir: Path, state: dict) -> bool:
    try:
        saved = json.loads((probe_dir / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return saved == state and (probe_dir / "results.json").exists()


def run_pipeline(out, *, model=None, datasets=DEMO_DATASETS, prompt="empty", limit=None,
                 batch_size=None, device="auto", backend="auto", cv="loo", drop_invalid=False,
                 progress=True, log=print) -> Path:
    """Run extract -> fit --all-layers for every dataset and write ``out/report.md``.

    model: name or path (default: the embedded SmolLM2). datasets: names or CSV paths understood
    by :func:`actstore.datasets.load_dataset` (``drop_invalid`` drops and counts bad rows).
    prompt: a prompt name applied to every dataset
    ("empty" = BOS + entity, the paper's main setting). limit: first N rows of each dataset
    (the built-ins and the paper CSVs are shuffled; the test split is kept within those rows).
    Returns the report's path.
    """
    from actstore.datasets import load_dataset
    from actstore.extract import extract
    from actstore.models import load_model
    from probes.fit import fit_all_layers
    from probes.report import format_table

    if not datasets:
        raise PipelineError("no datasets given")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    loaded = None  # loaded once; extract() also checks that an existing store matches
    sections = []
    for spec in datasets:
        ds = load_dataset(spec, drop_invalid=drop_invalid)
        if limit is not None:
            ds = ds.head(limit)
        store_path = out / "stores" / f"{ds.name}.zarr"
        store_path.parent.mkdir(parents=True, exist_ok=True)
        probe_dir = out / "probes" / ds.name
        if loaded is None:
            log(f"loading model {model or 'smollm2-135m (embedded)'} ...")
            loaded = load_model(model, device=device)
        # A finished store made the same way is reused as it is; one made with another model,
        # prompt, dataset or limit is refused by extract() with the list of differences.
        log(f"[{ds.name}] {len(ds)} rows ({ds.kind}, prompt {prompt!r}) -> {store_path}")
        res = extract(loaded, ds, prompt, store_path, batch_size=batch_size, device=device,
                      progress=progress)
        log(f"[{ds.name}] " + ("store complete, nothing to extract" if res.rows == 0
                               else res.summary()))
        store = res.store
        state = _store_state(store, cv, backend)
        if _probe_is_current(probe_dir, state):
            log(f"[{ds.name}] probes up to date: {probe_dir}")
            result = json.loads((probe_dir / "results.json").read_text())
        else:
            log(f"[{ds.name}] fitting ridge probes on {store.n_layers} layers")
            result = fit_all_layers(store, cv=cv, backend=backend, out=probe_dir, progress=progress)
            (probe_dir / SOURCE_FILE).write_text(json.dumps(state, indent=1))
        log(format_table(result))
        sections.append((ds, store, probe_dir, result))
    report = out / "report.md"
    report.write_text(_report(sections, model, prompt, limit, time.perf_counter() - t0, out))
    return report


def _best(result: dict) -> dict:
    return next(e for e in result["layers"] if e["layer"] == result["best_layer"])


def _report(sections, model, prompt, limit, seconds, out: Path) -> str:
    model_meta = (sections[0][1].meta.get("model") or {}) if sections else {}
    lines = [
        "# actstore run: linear probes for space and time",
        "",
        f"Model: `{model_meta.get('id', model)}`"
        f"{' (' + model_meta['upstream_id'] + ')' if model_meta.get('upstream_id') else ''}; prompt `{prompt}`; "
        f"rows per dataset: {'all' if limit is None else f'first {limit}'}; "
        f"wall time {seconds:.0f} s.",
        "",
        "Best layer by test R² (ridge, alpha by exact leave-one-out on the train split):",
        "",
        "| dataset | kind | rows (train/test) | layers | best layer | test R² | Spearman | "
        "proximity error | median km error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for ds, store, _, res in sections:
        b = _best(res)["test"]
        km = b.get("km_error_median")
        lines.append(
            f"| {ds.name} | {ds.kind} | {res['n_train']}/{res['n_test']} | {store.n_layers} | "
            f"{res['best_layer']} | {b['r2']:.3f} | {b['spearman']:.3f} | "
            f"{b['proximity_error']:.3f} | {'' if km is None else f'{km:.0f}'} |")
    lines += ["", "For scale, the paper's world places with Llama-2 (best-layer test R²): "
              "7B ≈ 0.88, 13B ≈ 0.90, 70B ≈ 0.92.", ""]
    for ds, store, probe_dir, res in sections:
        lines += [f"## {ds.name}", "",
                  f"Store `{store.path}` ({store.n_rows} rows x {store.n_layers} layers x "
                  f"{store.d_model}, {store.dtype}); probes in `{probe_dir}`.", "",
                  "| layer | alpha | R² train | R² test |", "|---|---|---|---|"]
        for e in res["layers"]:
            alpha = e["alpha"]  # one per layer, or {target: alpha} with alpha_per_target
            alpha = (", ".join(f"{t} {a:.3g}" for t, a in alpha.items())
                     if isinstance(alpha, dict) else f"{alpha:.3g}")
            lines.append(f"| {e['layer']} | {alpha} | {e['train']['r2']:.3f} | "
                         f"{e['test']['r2']:.3f} |")
        lines.append("")
        for png in sorted(probe_dir.glob("*.png")):
            lines += [f"![{ds.name} {png.stem}]({png.relative_to(out)})", ""]
    return "\n".join(lines) + "\n"


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "run",
        help="the main job: extract -> probe every layer -> report, for several datasets",
        description="Run the paper's pipeline end to end: for every dataset, extract the "
        "last-entity-token hidden state at every layer into OUT/stores/NAME.zarr, fit ridge "
        "probes on every layer (fastprobe fit --all-layers) into OUT/probes/NAME/, and write "
        "OUT/report.md with the tables and figures. Re-running resumes unfinished work.",
        epilog="examples:\n"
        "  actstore run --out demo-out --limit 600              # offline built-ins, embedded SmolLM2\n"
        "  actstore run --datasets ../shared/datasets/paper/world_place.csv --out wp\n"
        "  actstore run --model meta-llama/Llama-2-7b-hf --device cuda --datasets world_place,us_place --out l7b\n",
        formatter_class=__import__("argparse").RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output directory (created; reused to resume)")
    p.add_argument("--model", default=None,
                   help="HF causal LM id or path (default: the embedded SmolLM2-135M)")
    p.add_argument("--datasets", default=",".join(DEMO_DATASETS),
                   help="comma-separated dataset names or CSV paths (default: %(default)s)")
    p.add_argument("--prompt", default="empty", help="prompt name for every dataset (default: empty)")
    p.add_argument("--limit", type=int, default=None, help="use the first N rows of each dataset")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows per forward pass (default 32; a resumed store keeps its own)")
    p.add_argument("--drop-invalid", action="store_true",
                   help="drop (and count) dataset rows that fail validation instead of stopping")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")
    p.add_argument("--backend", default="auto", help="statistics backend: auto|cpu|torch|cuda|triton")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    if args.limit is not None and args.limit < 3:
        raise PipelineError("--limit must be at least 3 rows")
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    report = run_pipeline(args.out, model=args.model, datasets=datasets, prompt=args.prompt,
                          limit=args.limit, batch_size=args.batch_size, device=args.device,
                          drop_invalid=args.drop_invalid,
                          backend=args.backend, progress=not args.no_progress)
    print(f"report: {report}")
    return 0
