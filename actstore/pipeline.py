"""The main job: extract every dataset's activations, probe every layer, write one report.

``actstore run [RECIPE]`` chains the steps of the paper for a list of datasets:

    dataset x prompt --extract--> OUT/stores/NAME[__PROMPT].zarr
        --fit--> OUT/probes/NAME[__PROMPT]/                       (recipes probes and paper)
        --neurons--> OUT/neurons/NAME/                            (paper)
        --experiments--> OUT/experiments/NAME/                    (paper)
        --> OUT/report.md (+ OUT/r2_by_layer.png)

Recipes: ``probes`` (the default: extract -> fit --all-layers -> report) and ``paper`` (adds the
neuron step and the experiments). The first prompt of ``prompts`` is the main one: its store
keeps the plain name OUT/stores/NAME.zarr (so OUTs made before prompt variants resume), the
others are OUT/stores/NAME__PROMPT.zarr; neurons and the single-store experiments use the main
prompt's store.

Each step is resumable: an interrupted extraction resumes from its store's ``rows_done``; every
later step writes a record of its inputs beside its outputs (``source.json`` for fits and
neurons, ``EXPERIMENT.source.json`` for experiments) and is not redone while the record matches
(the same finished store, the same options) and its outputs exist. Changing the model, prompt,
dataset or limit under the same OUT is refused with the list of differences: choose another OUT.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

DEMO_DATASETS = ("world_cities", "us_places", "nobel")
RECIPES = {
    "probes": ("extract", "fit", "report"),
    "paper": ("extract", "fit", "neurons", "experiments", "report"),
}
EXPERIMENTS = ("prompts", "holdout", "entity-type", "nonlinear", "pca")
# the block hold-out's natural group column per dataset kind, first one present wins
# ("century" = floor(year / 100) * 100, derived by probes.experiments.group_labels)
HOLDOUT_COLUMNS = {
    "world_place": ("country",),
    "us_place": ("state_name", "state"),
    "nyc_place": ("borough_name", "borough"),
    "historical_figure": ("death_century", "century"),
    "art": ("century",),
    "headline": ("pub_year", "century"),   # the headlines span one century: years are the blocks
}
HOLDOUT_MAX_GROUPS = 20      # largest groups first, as `fastprobe experiment holdout`'s default
HOLDOUT_MIN_GROUP = 10
NEURON_TOP = 50              # kept in neurons.json; the report shows the first REPORT_NEURONS
REPORT_NEURONS = 5
PAPER_WORLD_R2 = "7B ≈ 0.88, 13B ≈ 0.90, 70B ≈ 0.92"


class PipelineError(ValueError):
    """A user-facing error of ``actstore run``."""


SOURCE_FILE = "source.json"  # beside results.json: which store state the probes were fitted on


def _store_ident(store) -> dict:
    meta = store.meta
    return {"store": str(store.path), "created": meta.get("created"),
            "dataset_sha256": (meta.get("dataset") or {}).get("sha256"),
            "rows_done": store.rows_done}


def _store_state(store, cv, backend) -> dict:
    """What makes a fit current: the store's identity and progress, and the fit's options."""
    return {**_store_ident(store), "cv": cv, "backend": backend}


def _probe_is_current(probe_dir: Path, state: dict) -> bool:
    try:
        saved = json.loads((probe_dir / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return saved == state and (probe_dir / "results.json").exists()


def _jsonable(obj):
    return json.loads(json.dumps(obj))


def _load_record(path: Path, inputs: dict) -> dict | None:
    """The saved record of a finished step when it was made from ``inputs`` and its outputs
    (file names relative to the record's folder) still exist; else None."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if rec.get("inputs") != _jsonable(inputs):
        return None
    if not all((path.parent / f).exists() for f in rec.get("outputs", [])):
        return None
    return rec


def _save_record(path: Path, inputs: dict, outputs=(), **extra) -> dict:
    rec = {"inputs": _jsonable(inputs), "outputs": [Path(p).name for p in outputs],
           "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}
    from actstore.store import _write_json_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(path, rec, indent=1)   # a record is whole or absent
    return rec


@dataclass
class _Job:
    """One (dataset, prompt) store and its probes."""
    ds: object
    prompt: str
    main: bool
    store_path: Path
    probe_dir: Path
    store: object = None
    result: dict | None = None

    @property
    def label(self) -> str:
        return self.ds.name if self.main else f"{self.ds.name}__{self.prompt}"


@dataclass
class _Section:
    """Everything the report says about one dataset."""
    ds: object
    jobs: list = field(default_factory=list)
    skipped_prompts: list = field(default_factory=list)
    neurons: dict | None = None        # neurons.json
    neurons_note: str | None = None
    experiments: dict = field(default_factory=dict)   # key -> (json dict | None, note | None, files)

    @property
    def main(self) -> _Job:
        return self.jobs[0]


def parse_list(value, what: str, valid=None) -> list[str]:
    """Comma-separated (or list) option -> list, checked against ``valid``."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    items = [str(v).strip() for v in items if str(v).strip()]
    if not items:
        raise PipelineError(f"no {what} given")
    if len(set(items)) != len(items):
        raise PipelineError(f"{what} listed twice: {', '.join(sorted({i for i in items if items.count(i) > 1}))}")
    if valid is not None:
        bad = [i for i in items if i not in valid]
        if bad:
            raise PipelineError(f"unknown {what} {', '.join(map(repr, bad))}; choose from "
                                f"{', '.join(valid)}")
    return items


def _experiment_list(experiments, recipe) -> list[str]:
    if "experiments" not in RECIPES[recipe]:
        if experiments is not None:
            raise PipelineError(f"--experiments needs the paper recipe (`actstore run paper "
                                f"...`); the {recipe!r} recipe runs no experiments")
        return []
    if experiments is None or experiments == "all":
        return list(EXPERIMENTS)
    if experiments == "none" or experiments == []:
        return []
    return parse_list(experiments, "experiment", EXPERIMENTS)


def _holdout_column(store) -> tuple[str | None, str]:
    kind = (store.meta.get("dataset") or {}).get("kind")
    cols = set(store.entities.columns)
    cands = HOLDOUT_COLUMNS.get(kind, ("century",))
    for c in cands:
        if c in cols or (c == "century" and "year" in cols):
            return c, ""
    return None, (f"no natural group column for kind {kind!r} (looked for "
                  f"{', '.join(cands)})")


def run_pipeline(out, *, model=None, datasets=DEMO_DATASETS, prompt="empty", prompts=None,
                 limit=None, recipe="probes", experiments=None, batch_size=None, device="auto",
                 backend="auto", cv="loo", drop_invalid=False, progress=True, log=print) -> Path:
    """Run ``recipe`` for every dataset and write ``out/report.md``; return its path.

    recipe: "probes" (extract -> fit --all-layers -> report) or "paper" (also the neurons step
    and the experiments). model: name or path (default: the embedded SmolLM2). datasets: names
    or CSV paths understood by :func:`actstore.datasets.load_dataset` (``drop_invalid`` drops
    and counts bad rows). prompts: prompt names (list or comma string; default ``[prompt]``,
    "empty" = BOS + entity, the paper's main setting); the first is the main prompt and must
    apply to every dataset; the others are extracted for the datasets they apply to. limit:
    first N rows of each dataset (the built-ins and the paper CSVs are shuffled; the test split
    is kept within those rows). experiments (paper recipe): names from EXPERIMENTS, "all"
    (default) or "none"; each runs on the main prompt's store at its best LOO layer, except
    prompts (all prompts' stores of a dataset, when there are several).
    """
    from actstore.datasets import load_dataset
    from actstore.prompts import get_prompt

    if recipe not in RECIPES:
        raise PipelineError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    steps = RECIPES[recipe]
    exps = _experiment_list(experiments, recipe)
    prompts = parse_list(prompts if prompts is not None else [prompt], "prompt")
    for p in prompts:
        get_prompt(p)          # unknown names fail before any work, listing the valid ones
    if not datasets:
        raise PipelineError("no datasets given")
    if limit is not None and limit < 3:
        raise PipelineError("--limit must be at least 3 rows")
    out = Path(out)
    t0 = time.perf_counter()

    sections = []
    for spec in datasets:
        ds = load_dataset(spec, drop_invalid=drop_invalid)
        if limit is not None:
            ds = ds.head(limit)
        if any(s.ds.name == ds.name for s in sections):
            raise PipelineError(f"two datasets are named {ds.name!r} ({spec}); their stores would "
                                "share OUT/stores/NAME.zarr: rename one CSV")
        sec = _Section(ds)
        for i, p in enumerate(prompts):
            try:
                get_prompt(p, kind=ds.kind)
            except ValueError as exc:
                if i == 0:
                    raise PipelineError(f"the main prompt {p!r} does not apply to dataset "
                                        f"{ds.name!r}: {exc}") from None
                sec.skipped_prompts.append(p)
                continue
            name = ds.name if i == 0 else f"{ds.name}__{p}"
            sec.jobs.append(_Job(ds, p, i == 0, out / "stores" / f"{name}.zarr",
                                 out / "probes" / name))
        sections.append(sec)
    out.mkdir(parents=True, exist_ok=True)

    loaded = None

    def get_model():
        nonlocal loaded
        if loaded is None:
            from actstore.models import load_model
            log(f"loading model {model or 'smollm2-135m (embedded)'} ...")
            loaded = load_model(model, device=device)
        return loaded

    jobs = [j for s in sections for j in s.jobs]
    log(f"actstore run {recipe}: {len(sections)} dataset(s), {len(jobs)} store(s), steps "
        f"{' -> '.join(steps)}" + (f"; experiments {', '.join(exps)}" if exps else ""))
    for n, job in enumerate(jobs, 1):
        _extract_and_fit(job, f"{n}/{len(jobs)}", get_model, batch_size, device, backend, cv,
                         progress, log)
    if "neurons" in steps:
        for n, sec in enumerate(sections, 1):
            _neurons_step(sec, out, f"{n}/{len(sections)}", get_model, device, backend, log)
    if "experiments" in steps and exps:
        for n, sec in enumerate(sections, 1):
            _experiments_step(sec, out, exps, f"{n}/{len(sections)}", device, backend, log,
                              all_experiments=experiments in (None, "all"))
    log("[report] writing " + str(out / "report.md"))
    _plot_all_layers(sections, out / "r2_by_layer.png")
    report = out / "report.md"
    report.write_text(_report(sections, model, prompts, limit, recipe,
                              time.perf_counter() - t0, out))
    return report


def run_paper(out, **kw) -> Path:
    """:func:`run_pipeline` with the paper recipe (neurons and experiments included)."""
    return run_pipeline(out, recipe="paper", **kw)


def _extract_and_fit(job: _Job, counter, get_model, batch_size, device, backend, cv, progress,
                     log) -> None:
    from actstore.extract import extract
    from probes.fit import fit_all_layers
    from probes.report import format_table

    ds = job.ds
    job.store_path.parent.mkdir(parents=True, exist_ok=True)
    # A finished store made the same way is reused as it is; one made with another model,
    # prompt, dataset or limit is refused by extract() with the list of differences.
    log(f"[extract {counter}] {job.label}: {len(ds)} rows ({ds.kind}, prompt {job.prompt!r}) "
        f"-> {job.store_path}")
    res = extract(get_model(), ds, job.prompt, job.store_path, batch_size=batch_size,
                  device=device, progress=progress)
    log(f"[extract {counter}] {job.label}: " + ("store complete, nothing to extract"
                                               if res.rows == 0 else res.summary()))
    store = job.store = res.store
    state = _store_state(store, cv, backend)
    if _probe_is_current(job.probe_dir, state):
        log(f"[fit {counter}] {job.label}: probes up to date: {job.probe_dir}")
        job.result = json.loads((job.probe_dir / "results.json").read_text())
    else:
        log(f"[fit {counter}] {job.label}: fitting ridge probes on {store.n_layers} layers")
        job.result = fit_all_layers(store, cv=cv, backend=backend, out=job.probe_dir,
                                    progress=progress)
        (job.probe_dir / SOURCE_FILE).write_text(json.dumps(state, indent=1))
    log(format_table(job.result))


def _neurons_step(sec: _Section, out: Path, counter, get_model, device, backend, log) -> None:
    from probes.neurons import NEURONS_JSON, NeuronReportError, neuron_report
    from probes.report import format_neuron_table

    job = sec.main
    store = job.store
    ndir = out / "neurons" / sec.ds.name
    method = "stored" if store.d_mlp is not None else "projection"
    inputs = {"store": _store_ident(store), "method": method, "top": NEURON_TOP,
              "probe": json.loads((job.probe_dir / SOURCE_FILE).read_text())}
    rec_path = ndir / SOURCE_FILE
    rec = _load_record(rec_path, inputs)
    if rec is not None:
        log(f"[neurons {counter}] {sec.ds.name}: up to date: {ndir}")
    else:
        log(f"[neurons {counter}] {sec.ds.name}: correlating every MLP neuron of every layer "
            f"with {', '.join(store.targets)} ({method}"
            + (", the residual projected through each block's gate/up weights" if method ==
               "projection" else "") + ")")
        try:
            res = neuron_report(store, top=NEURON_TOP, method=method, model=get_model(),
                                probe_dir=job.probe_dir, out=ndir,
                                backend=backend if method == "stored" else "auto",
                                device=None if device == "auto" else device)
        except NeuronReportError as exc:
            rec = _save_record(rec_path, inputs, status="skipped", note=str(exc))
            log(f"[neurons {counter}] {sec.ds.name}: skipped: {exc}")
        else:
            outputs = [NEURONS_JSON] + [f"neuron_{t}.png" for t in res["targets"]]
            rec = _save_record(rec_path, inputs, outputs, status="done")
            log(format_neuron_table({**res, "top_neurons": {
                t: v[:REPORT_NEURONS] for t, v in res["top_neurons"].items()}}))
    if rec.get("status") == "done":
        sec.neurons = json.loads((ndir / NEURONS_JSON).read_text())
    else:
        sec.neurons_note = rec.get("note")


def _experiment_plan(sec: _Section, exps, device, backend, all_experiments=False):
    """[(key, options, callable or None, note)] for one dataset. With ``all_experiments``
    (the default list, not named by the user), a dataset with one prompt plans no prompts
    comparison rather than a skip note."""
    from probes import experiments as ex

    job = sec.main
    store = job.store
    from probes.experiments import best_loo_index   # the experiments' default layer
    pos = int(job.result["layers"][best_loo_index(job.result["layers"])]["position"])
    dev = None if device == "auto" else device
    plan = []
    for key in exps:
        opts, fn, note = {"layer_position": pos}, None, None
        if key == "prompts":
            opts = {}
            if len(sec.jobs) < 2 and all_experiments and not sec.skipped_prompts:
                continue
            if len(sec.jobs) < 2:
                note = ("one prompt only" + (f" ({', '.join(sec.skipped_prompts)} do not apply "
                        f"to {sec.ds.kind})" if sec.skipped_prompts else
                        "; add variants with --prompts empty,coords,..."))
            else:
                stores = {j.prompt: j.store for j in sec.jobs}
                fn = lambda stores=stores: ex.prompt_experiment(stores, backend=backend)  # noqa: E731
        elif key == "holdout":
            col, note = _holdout_column(store)
            if col is not None:
                opts.update(group_column=col, max_groups=HOLDOUT_MAX_GROUPS,
                            min_group_size=HOLDOUT_MIN_GROUP)
                fn = lambda col=col: ex.holdout_experiment(  # noqa: E731
                    store, col, layer=pos, min_group_size=HOLDOUT_MIN_GROUP,
                    max_groups=HOLDOUT_MAX_GROUPS, backend=backend)
        elif key == "entity-type":
            types = store.entities["entity_type"].astype(str)[: store.rows_done].unique()
            if len(types) < 2:
                note = f"one entity type ({types[0] if len(types) else 'none'})"
            else:
                opts.update(min_group_size=HOLDOUT_MIN_GROUP)
                fn = lambda: ex.entity_type_experiment(  # noqa: E731
                    store, layer=pos, min_group_size=HOLDOUT_MIN_GROUP, backend=backend)
        elif key == "nonlinear":
            fn = lambda: ex.nonlinear_experiment(store, layer=pos, backend=backend,  # noqa: E731
                                                 device=dev)
        elif key == "pca":
            fn = lambda: ex.pca_experiment(store, layer=pos, backend=backend)  # noqa: E731
        plan.append((key, opts, fn, note))
    return plan


def _experiments_step(sec: _Section, out: Path, exps, counter, device, backend, log,
                      all_experiments=False) -> None:
    from probes import experiments as ex

    edir = out / "experiments" / sec.ds.name
    stores = [_store_ident(j.store) for j in sec.jobs]
    for key, opts, fn, note in _experiment_plan(sec, exps, device, backend, all_experiments):
        inputs = {"experiment": key, "stores": stores if key == "prompts" else stores[:1],
                  "backend": backend, **opts}
        rec_path = edir / f"{key}.source.json"
        rec = _load_record(rec_path, inputs)
        if rec is not None:
            log(f"[experiments {counter}] {sec.ds.name} {key}: up to date")
        elif fn is None:
            rec = _save_record(rec_path, inputs, status="skipped", note=note)
            log(f"[experiments {counter}] {sec.ds.name} {key}: skipped: {note}")
        else:
            log(f"[experiments {counter}] {sec.ds.name} {key} ...")
            try:
                result = fn()
            except ex.ExperimentError as exc:
                rec = _save_record(rec_path, inputs, status="skipped", note=str(exc))
                log(f"[experiments {counter}] {sec.ds.name} {key}: skipped: {exc}")
            else:
                files = ex.write_experiment(result, edir)
                rec = _save_record(rec_path, inputs, files, status="done")
                log(ex.format_experiment(result))
        if rec.get("status") == "done":
            js = next(f for f in rec["outputs"] if f.endswith(".json"))
            sec.experiments[key] = (json.loads((edir / js).read_text()), None,
                                    [edir / f for f in rec["outputs"]])
        else:
            sec.experiments[key] = (None, rec.get("note"), [])


# ----------------------------------------------------------------------------- report

def _best(result: dict) -> dict:
    return next(e for e in result["layers"] if e["layer"] == result["best_layer"])


def _f(v, spec=".3f") -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    return format(v, spec)


def _md(head, rows) -> list[str]:
    return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows] + [""])


def _plot_all_layers(sections, path: Path) -> None:
    """Test R² by layer of every store in one figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for sec in sections:
        for job in sec.jobs:
            ls = job.result["layers"]
            ax.plot([e["layer"] for e in ls], [e["test"]["r2"] for e in ls],
                    "o-" if job.main else "--", ms=3,
                    label=sec.ds.name if job.main else f"{sec.ds.name} ({job.prompt})")
    ax.set_xlabel("layer (hidden state index)")
    ax.set_ylabel("test R² (mean over targets)")
    ax.set_title("ridge probe test R² by layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _img(out: Path, path: Path, alt: str) -> list[str]:
    return [f"![{alt}]({path.relative_to(out)})", ""] if path.exists() else []


def _glance(sec: _Section, with_prompts: bool) -> list:
    """One row of the experiments-at-a-glance table."""
    def get(key):
        return sec.experiments.get(key, (None, "not run", []))

    cells = [sec.ds.name]
    ho, note, _ = get("holdout")
    cells.append(f"{ho['group_column']}: {_f(ho['summary']['nominal_proximity_error'])} → "
                 f"{_f(ho['summary']['heldout_proximity_error'])}" if ho else "–")
    et, _, _ = get("entity-type")
    cells.append(f"{_f(et['summary']['nominal_proximity_error'])} → "
                 f"{_f(et['summary']['heldout_proximity_error'])}" if et else "–")
    nl, _, _ = get("nonlinear")
    cells.append(f"{_f(nl['linear']['test']['r2'])} / {_f(nl['mlp']['test']['r2'])}"
                 if nl else "–")
    pc, _, _ = get("pca")
    if pc:
        ks = {r["k"]: r["test"]["r2"] for r in pc["pca"]}
        cells.append(", ".join(f"k={k}: {_f(ks[k])}" for k in (2, 10) if k in ks)
                     + f", full: {_f(pc['full']['test']['r2'])}")
    else:
        cells.append("–")
    pr, _, _ = get("prompts")
    if with_prompts:
        cells.append(", ".join(f"{lbl} {_f(pr['transfer']['r2'][i][i])}"
                               for i, lbl in enumerate(pr["prompts"])) if pr else "–")
    layer = (nl or pc or ho or {}).get("layer")
    cells.insert(1, "–" if layer is None else str(layer))
    return cells


def _experiment_md(key: str, res: dict) -> list[str]:
    if key == "prompts":
        labels = res["prompts"]
        t = res["transfer"]
        lines = ["Each prompt's probe at its best LOO layer (test rows):", ""]
        lines += _md(["prompt", "layer", "test R²", "Spearman", "proximity error"],
                     [[lbl, res["per_prompt"][lbl]["best_layer"], _f(t["r2"][i][i]),
                       _f(t["spearman"][i][i]), _f(t["proximity_error"][i][i])]
                      for i, lbl in enumerate(labels)])
        lines += ["Transfer: test R² of the probe trained on the row's prompt (at its best "
                  "layer) applied to the column's prompt:", ""]
        lines += _md(["train \\ test"] + labels,
                     [[lbl] + [_f(v) for v in t["r2"][i]] for i, lbl in enumerate(labels)])
        return lines
    if key in ("holdout", "entity-type"):
        s = res["summary"]
        places = any("heldout_km_error_median" in r for r in res["groups"])
        lines = [f"Block hold-out by `{res['group_column']}` ({res['group_source']}), layer "
                 f"{res['layer']}: mean proximity error over the {s['n_groups_with_nominal']} "
                 f"groups with test rows: nominal **{_f(s['nominal_proximity_error'])}**, held "
                 f"out **{_f(s['heldout_proximity_error'])}** ({len(res['groups'])} groups of "
                 f"{res['n_distinct_groups']}; 0 is perfect).", ""]
        head = ["group", "rows", "prox. nominal", "prox. held out"]
        if places:
            head += ["km nominal", "km held out"]
        rows = []
        for r in res["groups"]:
            row = [str(r["group"])[:30], r["n"], _f(r["nominal_proximity_error"]),
                   _f(r["heldout_proximity_error"])]
            if places:
                row += [_f(r.get("nominal_km_error_median"), ".0f"),
                        _f(r.get("heldout_km_error_median"), ".0f")]
            rows.append(row)
        return lines + _md(head, rows)
    if key == "nonlinear":
        m = res["mlp"]
        return [f"Layer {res['layer']}:", ""] + _md(
            ["probe", "train R²", "test R²", "Spearman", "proximity error"],
            [[f"linear (ridge, alpha {res['linear']['alpha']:.3g})",
              _f(res["linear"]["train"]["r2"]), _f(res["linear"]["test"]["r2"]),
              _f(res["linear"]["test"]["spearman"]), _f(res["linear"]["test"]["proximity_error"])],
             [f"MLP {m['hidden']} ReLU (weight decay {m['weight_decay']:g})",
              _f(m["train"]["r2"]), _f(m["test"]["r2"]), _f(m["test"]["spearman"]),
              _f(m["test"]["proximity_error"])]])
    if key == "pca":
        f = res["full"]
        rows = [[r["k"], _f(r["explained_variance"]), _f(r["test"]["r2"]),
                 _f(r["test"]["spearman"]), _f(r["test"]["proximity_error"])]
                for r in res["pca"]]
        rows.append([f"full ({f['k']})", "1.000", _f(f["test"]["r2"]), _f(f["test"]["spearman"]),
                     _f(f["test"]["proximity_error"])])
        return [f"Layer {res['layer']}, PCA on the train rows:", ""] + _md(
            ["k", "explained variance", "test R²", "Spearman", "proximity error"], rows)
    return []


EXPERIMENT_TITLES = {"prompts": "Prompt variants", "holdout": "Block hold-out",
                     "entity-type": "Entity-type hold-out",
                     "nonlinear": "Nonlinear (MLP) probe vs linear", "pca": "PCA-k probes"}


def _report(sections, model, prompts, limit, recipe, seconds, out: Path) -> str:
    first = sections[0].main.store
    model_meta = (first.meta.get("model") or {}) if first is not None else {}
    lines = [
        "# actstore run: linear probes for space and time",
        "",
        f"Recipe `{recipe}`; model: `{model_meta.get('id', model)}`"
        f"{' (' + model_meta['upstream_id'] + ')' if model_meta.get('upstream_id') else ''}; "
        f"prompt{'s' if len(prompts) > 1 else ''} {', '.join(f'`{p}`' for p in prompts)}; "
        f"rows per dataset: {'all' if limit is None else f'first {limit}'}; "
        f"wall time of this run {seconds:.0f} s.",
        "",
        "Best layer by test R² (ridge, alpha by exact leave-one-out on the train split):",
        "",
        "| dataset | kind | prompt | rows (train/test) | layers | best layer | test R² | Spearman | "
        "proximity error | median km error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for sec in sections:
        for job in sec.jobs:
            res, store = job.result, job.store
            b = _best(res)["test"]
            km = b.get("km_error_median")
            lines.append(
                f"| {sec.ds.name} | {sec.ds.kind} | {job.prompt} | {res['n_train']}/{res['n_test']} "
                f"| {store.n_layers} | {res['best_layer']} | {b['r2']:.3f} | {b['spearman']:.3f} | "
                f"{b['proximity_error']:.3f} | {'' if km is None else f'{km:.0f}'} |")
    lines += ["", "For scale, the paper's world places with Llama-2 (best-layer test R²): "
              f"{PAPER_WORLD_R2}.", ""]
    lines += _img(out, out / "r2_by_layer.png", "test R² by layer, every dataset")
    if any(sec.experiments for sec in sections):
        lines += ["Experiments at a glance (layer = best leave-one-out layer of the main "
                  "prompt's fit; proximity error: nominal → held out, 0 is perfect):", ""]
        with_prompts = any(sec.experiments.get("prompts", (None,))[0] for sec in sections)
        lines += _md(["dataset", "layer", "block hold-out", "entity-type hold-out",
                      "linear / MLP test R²", "PCA test R²"]
                     + (["prompts (test R² at each best layer)"] if with_prompts else []),
                     [_glance(sec, with_prompts) for sec in sections])
    for sec in sections:
        lines += _dataset_section(sec, out)
    return "\n".join(lines) + "\n"


def _dataset_section(sec: _Section, out: Path) -> list[str]:
    lines = [f"## {sec.ds.name}", ""]
    if sec.skipped_prompts:
        lines += [f"Prompts not applicable to {sec.ds.kind}: {', '.join(sec.skipped_prompts)}.",
                  ""]
    for job in sec.jobs:
        res, store = job.result, job.store
        lines += [(f"### Probes by layer, prompt `{job.prompt}`" if len(sec.jobs) > 1
                   else f"### Probes by layer (prompt `{job.prompt}`)"), "",
                  f"Store `{store.path}` ({store.n_rows} rows x {store.n_layers} layers x "
                  f"{store.d_model}, {store.dtype}); probes in `{job.probe_dir}`.", "",
                  "| layer | alpha | R² train | R² test | Spearman | proximity error |",
                  "|---|---|---|---|---|---|"]
        for e in res["layers"]:
            alpha = e["alpha"]  # one per layer, or {target: alpha} with alpha_per_target
            alpha = (", ".join(f"{t} {a:.3g}" for t, a in alpha.items())
                     if isinstance(alpha, dict) else f"{alpha:.3g}")
            mark = " **(best)**" if e["layer"] == res["best_layer"] else ""
            lines.append(f"| {e['layer']}{mark} | {alpha} | {e['train']['r2']:.3f} | "
                         f"{e['test']['r2']:.3f} | {_f(e['test'].get('spearman'))} | "
                         f"{_f(e['test'].get('proximity_error'))} |")
        lines.append("")
        for png in sorted(job.probe_dir.glob("*.png")):
            lines += _img(out, png, f"{job.label} {png.stem}")
    if sec.neurons is not None or sec.neurons_note:
        lines += ["### Neurons", ""]
        if sec.neurons is None:
            lines += [f"Skipped: {sec.neurons_note}", ""]
        else:
            nr = sec.neurons
            probe = "probe" in nr
            lines += [f"Method `{nr['method']}`, {nr['n_rows']} rows, {len(nr['layers'])} layers "
                      f"x {nr['d_mlp']} neurons; top {REPORT_NEURONS} per target by |Spearman| "
                      f"(layer = hidden state the neuron's MLP writes into"
                      + ("; cos = cosine of its output weights with that layer's probe direction"
                         if probe else "") + "). Full list: "
                      f"`neurons/{sec.ds.name}/neurons.json`.", ""]
            for t in nr["targets"]:
                rows = [[e["rank"], e["layer"], e["index"], _f(e["spearman"]), _f(e["pearson"])]
                        + ([_f((e.get("probe_cosine") or {}).get(t))] if probe else [])
                        for e in nr["top_neurons"][t][:REPORT_NEURONS]]
                lines += [f"**{t}**", ""]
                lines += _md(["rank", "layer", "neuron", "Spearman", "Pearson"]
                             + (["cos(probe)"] if probe else []), rows)
                lines += _img(out, out / "neurons" / sec.ds.name / f"neuron_{t}.png",
                              f"{sec.ds.name} best {t} neuron")
    for key, (res, note, files) in sec.experiments.items():
        lines += [f"### {EXPERIMENT_TITLES[key]}", ""]
        if res is None:
            lines += [f"Skipped: {note}", ""]
            continue
        lines += _experiment_md(key, res)
        for f in files:
            if f.suffix == ".png":
                lines += _img(out, f, f"{sec.ds.name} {key}")
        lines += [f"Data: `{files[0].relative_to(out)}`.", ""]
    return lines


# ----------------------------------------------------------------------------- CLI

def add_cli(subparsers) -> None:
    import argparse

    p = subparsers.add_parser(
        "run",
        help="the main job: extract -> probe every layer (-> neurons -> experiments) -> report",
        description="Run the paper's pipeline end to end and write OUT/report.md.\n\n"
        "RECIPE probes (the default, `actstore run --out ...`): for every dataset and prompt, "
        "extract the last-entity-token hidden state at every layer into "
        "OUT/stores/NAME[__PROMPT].zarr and fit ridge probes on every layer (fastprobe fit "
        "--all-layers) into OUT/probes/NAME[__PROMPT]/.\n"
        "RECIPE paper (`actstore run paper --out ...`): the same, then per dataset the MLP "
        "neurons most correlated with each target (fastprobe neurons, with probe cosines) into "
        "OUT/neurons/NAME/ and the paper's experiments (fastprobe experiment: prompts, block "
        "hold-out by the dataset's natural group column, entity-type hold-out, MLP vs linear, "
        "PCA-k) into OUT/experiments/NAME/.\n\n"
        "Re-running resumes: unfinished stores continue, finished steps whose recorded inputs "
        "still match are not redone.",
        epilog="examples:\n"
        "  actstore run paper --out demo-out --limit 1000      # offline built-ins, embedded SmolLM2\n"
        "  actstore run --out probes-only --limit 600           # extract + fit + report only\n"
        "  actstore run paper --datasets world_cities --prompts empty,coords,random --out p\n"
        "  actstore run paper --datasets ../shared/datasets/paper/world_place.csv "
        "--experiments holdout,pca --out wp\n"
        "  actstore run paper --model meta-llama/Llama-2-7b-hf --device cuda "
        "--datasets world_place,us_place --out l7b\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", nargs="?", default="probes", choices=tuple(RECIPES), metavar="RECIPE",
                   help="probes (default: extract, fit, report) or paper (adds neurons and "
                   "experiments)")
    p.add_argument("--out", required=True, help="output directory (created; reused to resume)")
    p.add_argument("--model", default=None,
                   help="HF causal LM id or path (default: the embedded SmolLM2-135M)")
    p.add_argument("--datasets", default=",".join(DEMO_DATASETS),
                   help="comma-separated dataset names or CSV paths (default: %(default)s)")
    p.add_argument("--prompts", "--prompt", dest="prompts", default="empty",
                   help="comma-separated prompt names; the first (default: empty = the entity "
                   "alone, the paper's main prompt) must suit every dataset, the others are "
                   "extracted where they apply (see `actstore extract --help`)")
    p.add_argument("--limit", type=int, default=None, help="use the first N rows of each dataset")
    p.add_argument("--experiments", default=None,
                   help=f"paper recipe: comma-separated subset of {','.join(EXPERIMENTS)}, "
                   "or all (default) or none")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows per forward pass (default 32; a resumed store keeps its own)")
    p.add_argument("--drop-invalid", action="store_true",
                   help="drop (and count) dataset rows that fail validation instead of stopping")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")
    p.add_argument("--backend", default="auto", help="statistics backend: auto|cpu|torch|cuda|triton")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    report = run_pipeline(args.out, model=args.model, datasets=datasets, prompts=args.prompts,
                          limit=args.limit, recipe=args.recipe, experiments=args.experiments,
                          batch_size=args.batch_size, device=args.device,
                          drop_invalid=args.drop_invalid,
                          backend=args.backend, progress=not args.no_progress)
    print(f"report: {report}")
    return 0
