"""The main job: extract every dataset's activations, probe every layer, write one report.

``actstore run`` chains the steps of the paper for a list of datasets:

    dataset --extract--> OUT/stores/NAME.zarr --fastprobe fit--> OUT/probes/NAME/ --> OUT/report.md

Each step is resumable: an interrupted extraction resumes from its store's ``rows_done``; a
probe whose ``results.json`` already covers the finished store is not fitted again.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

DEMO_DATASETS = ("world_cities", "us_places", "nobel")


class PipelineError(ValueError):
    """A user-facing error of ``actstore run``."""


def _probe_is_current(probe_dir: Path, store) -> bool:
    """True when probe_dir/results.json was fitted on this store in its finished state."""
    results = probe_dir / "results.json"
    if not results.exists() or store.rows_done < store.n_rows:
        return False
    try:
        saved = json.loads(results.read_text())
    except (OSError, ValueError):
        return False
    return saved.get("n_rows") == store.rows_done and saved.get("store") == str(store.path)


def run_pipeline(out, *, model=None, datasets=DEMO_DATASETS, prompt="empty", limit=None,
                 batch_size=32, device="auto", backend="auto", cv="loo", progress=True,
                 log=print) -> Path:
    """Run extract -> fit --all-layers for every dataset and write ``out/report.md``.

    model: name or path (default: the embedded SmolLM2). datasets: names or CSV paths understood
    by :func:`actstore.datasets.load_dataset`. prompt: a prompt name applied to every dataset
    ("empty" = BOS + entity, the paper's main setting). limit: first N rows of each dataset
    (the built-ins and the paper CSVs are shuffled; the test split is kept within those rows).
    Returns the report's path.
    """
    from actstore.datasets import load_dataset
    from actstore.extract import extract
    from actstore.models import load_model
    from actstore.store import open_store
    from probes.fit import fit_all_layers
    from probes.report import format_table

    if not datasets:
        raise PipelineError("no datasets given")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    loaded = None  # load the model once, only if some store is unfinished
    sections = []
    for spec in datasets:
        ds = load_dataset(spec)
        if limit is not None:
            ds = ds.head(limit)
        store_path = out / "stores" / f"{ds.name}.zarr"
        store_path.parent.mkdir(parents=True, exist_ok=True)
        probe_dir = out / "probes" / ds.name
        store = open_store(store_path) if store_path.exists() else None
        if store is None or store.rows_done < store.n_rows:
            if loaded is None:
                log(f"loading model {model or 'smollm2-135m (embedded)'} ...")
                loaded = load_model(model, device=device)
            log(f"[{ds.name}] extracting {len(ds)} rows ({ds.kind}, prompt {prompt!r})")
            res = extract(loaded, ds, prompt, store_path, batch_size=batch_size, device=device,
                          progress=progress)
            log(f"[{ds.name}] {res.summary()}")
            store = res.store
        else:
            log(f"[{ds.name}] store complete: {store_path}")
        if _probe_is_current(probe_dir, store):
            log(f"[{ds.name}] probes up to date: {probe_dir}")
            result = json.loads((probe_dir / "results.json").read_text())
        else:
            log(f"[{ds.name}] fitting ridge probes on {store.n_layers} layers")
            result = fit_all_layers(store, cv=cv, backend=backend, out=probe_dir, progress=progress)
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
        f"wall time {seconds:.0f} s (steps already done were reused).",
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
    p.add_argument("--batch-size", type=int, default=32)
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
                          backend=args.backend, progress=not args.no_progress)
    print(f"report: {report}")
    return 0
