"""The report of ``actstore run``: report.md (headline table, experiments at a glance, one
section per dataset: its controls sentence and headline, its figures, then the tables, with the
classification probe of the place datasets) and the R²-by-layer figure of every store."""
from __future__ import annotations

from pathlib import Path

from probes.experiments.registry import EXPERIMENT_TITLES, experiment_markdown
from probes.fit.outliers import summary_line
from probes.pipeline.model_size import PAPER_LLAMA2, model_size_markdown
from probes.pipeline.plan import Section
from probes.pipeline.steps import REPORT_NEURONS
from probes.report import (
    best_entry,
    control_at,
    controls_cells,
    draw_controls,
    floor_r2_axis,
    layer0_r2,
    md_num,
    md_table,
    save_figure,
)

__all__ = ["report_markdown", "plot_all_layers", "plot_controls", "headline", "controls_sentence",
           "controls_table", "classify_markdown", "majority_baseline"]

# the paper's world-place numbers, as a phrase (from PAPER_LLAMA2, their one place)
PAPER_WORLD_R2 = ", ".join(f"{size} ≈ {r2:.2f}" for size, r2 in
                           zip(("7B", "13B", "70B"), PAPER_LLAMA2["world_place"][1]))


def _curve(ax, result: dict, style: str, label: str, color=None):
    ls = result["layers"]
    return ax.plot([e["layer"] for e in ls], [e["test"]["r2"] for e in ls], style, ms=3,
                   label=label, color=color)[0].get_color()


def plot_all_layers(sections, path: Path) -> None:
    """Test R² by layer of every store in one figure, with each dataset's controls in its
    colour (:func:`probes.report.draw_controls`: layer 0 dashed, shuffled targets dotted; the
    random-init model dash-dotted)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: matplotlib is slow to import

    fig, ax = plt.subplots(figsize=(8, 5))
    for sec in sections:
        for job in sec.jobs:
            color = _curve(ax, job.result, "o-" if job.main else "--",
                           sec.ds.name if job.main else f"{sec.ds.name} ({job.prompt})")
            if job.main:
                draw_controls(ax, job.result, color=color, prefix=f"{sec.ds.name}: ")
                if sec.random_init is not None:
                    _curve(ax, sec.random_init.result, "-.", f"{sec.ds.name}: random-init",
                           color)
    floor_r2_axis(ax)
    ax.set_xlabel("layer (hidden state index)")
    ax.set_ylabel("test R² (mean over targets)")
    ax.set_title("ridge probe test R² by layer, with controls")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)


def plot_controls(sec: Section, path: Path) -> Path:
    """One dataset's test R² by layer against its three controls: layer 0 (embeddings), the
    random-init model, the shuffled-target control."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: matplotlib is slow to import

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    _curve(ax, sec.main.result, "o-", "probe (trained model)")
    if sec.random_init is not None:
        _curve(ax, sec.random_init.result, "^-.", "random-init model", "tab:purple")
    draw_controls(ax, sec.main.result)
    floor_r2_axis(ax)
    ax.set_xlabel("layer (hidden state index)")
    ax.set_ylabel("test R² (mean over targets)")
    ax.set_title(f"{sec.ds.name}: test R² by layer against the controls")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def _beats(what: str, probe: float, other: float | None, missing: str) -> str:
    """A verb phrase: whether ``probe`` beats the control ``what`` scoring ``other``."""
    if other is None:
        return f"cannot be compared with {what} ({missing})"
    if probe > other:
        gap = probe - other
        return f"beats {what} ({md_num(other)}) by " + (md_num(gap) if gap >= 5e-4
                                                          else "less than 0.001")
    return f"does not beat {what} ({md_num(other)} ≥ {md_num(probe)})"


def controls_sentence(sec: Section) -> str:
    """One sentence: whether the main probe's best test R² beats layer 0 (the embeddings),
    the random-init model's best layer and the shuffled-target control at the same layer, with
    the numbers."""
    res = sec.main.result
    best = best_entry(res)["test"]["r2"]
    floor = layer0_r2(res) if res["best_layer"] != 0 else None
    rnd = sec.random_init.result if sec.random_init is not None else None
    ctrl = control_at(res, res["best_layer"])
    parts = [
        "does not beat layer 0 (embeddings): it is layer 0" if res["best_layer"] == 0 else
        _beats("layer 0 (embeddings)", best, floor, "not in the store: extract with "
               "--layers all+emb"),
        _beats(f"the random-init model (best layer {rnd['best_layer']})" if rnd else
               "the random-init model", best, best_entry(rnd)["test"]["r2"] if rnd else None,
               "not run: --controls random"),
        _beats("shuffled targets", best, ctrl["test_r2"] if ctrl else None,
               "not fitted: fastprobe fit without --no-control")]
    return (f"Controls: the probe's best test R² {md_num(best)} (layer {res['best_layer']}) "
            f"{parts[0]}, {parts[1]}, and {parts[2]} (the selectivity).")


def controls_table(sections) -> list[str]:
    """The headline's controls table: per dataset the best test R², layer 0's, the random-init
    model's best, the shuffled-target control's at the best layer, and the selectivity."""
    rows = [[sec.ds.name] + controls_cells(
        sec.main.result, sec.random_init.result if sec.random_init is not None else None)
        for sec in sections]
    return md_table(["dataset", "probe: best test R² (layer)", "layer 0 (embeddings)",
                     "random-init: best test R² (layer)", "shuffled targets (same layer)",
                     "selectivity"], rows)


def _img(out: Path, path: Path, alt: str) -> list[str]:
    return [f"![{alt}]({path.relative_to(out)})", ""] if path.exists() else []


def _glance(sec: Section, with_prompts: bool) -> list:
    """One row of the experiments-at-a-glance table."""
    def get(key):
        return sec.experiments.get(key, (None, "not run", []))

    cells = [sec.ds.name]
    ho, note, _ = get("holdout")
    cells.append(f"{ho['group_column']}: {md_num(ho['summary']['nominal_proximity_error'])} → "
                 f"{md_num(ho['summary']['heldout_proximity_error'])}" if ho else "–")
    et, _, _ = get("entity-type")
    cells.append(f"{md_num(et['summary']['nominal_proximity_error'])} → "
                 f"{md_num(et['summary']['heldout_proximity_error'])}" if et else "–")
    nl, _, _ = get("nonlinear")
    cells.append(f"{md_num(nl['linear']['test']['r2'])} / {md_num(nl['mlp']['test']['r2'])}"
                 if nl else "–")
    pc, _, _ = get("pca")
    if pc:
        ks = {r["k"]: r["test"]["r2"] for r in pc["pca"]}
        cells.append(", ".join(f"k={k}: {md_num(ks[k])}" for k in (2, 10) if k in ks)
                     + f", full: {md_num(pc['full']['test']['r2'])}")
    else:
        cells.append("–")
    pr, _, _ = get("prompts")
    if with_prompts:
        cells.append(", ".join(f"{lbl} {md_num(pr['transfer']['r2'][i][i])}"
                               for i, lbl in enumerate(pr["prompts"])) if pr else "–")
    layer = (nl or pc or ho or {}).get("layer")
    cells.insert(1, "–" if layer is None else str(layer))
    return cells


def report_markdown(sections, model, prompts, limit, recipe, seconds, out: Path) -> str:
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
        "| dataset | kind | prompt | rows (train/test) | layers | best layer | test R² "
        "| Spearman | proximity error | median km error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for sec in sections:
        for job in sec.jobs:
            res, store = job.result, job.store
            b = best_entry(res)["test"]
            km = b.get("km_error_median")
            lines.append(
                f"| {sec.ds.name} | {sec.ds.kind} | {job.prompt} "
                f"| {res['n_train']}/{res['n_test']} | {store.n_layers} | {res['best_layer']} "
                f"| {md_num(b['r2'])} | {md_num(b['spearman'])} "
                f"| {md_num(b['proximity_error'])} "
                f"| {'' if km is None else f'{km:.0f}'} |")
    lines += ["", "For scale, the paper's world places with Llama-2 (best-layer test R²): "
              f"{PAPER_WORLD_R2}.", ""]
    lines += ["Controls: layer 0 is the token embeddings (what word identity alone gives); the "
              "random-init model has the same architecture and tokenizer with re-initialised "
              "weights; shuffled targets is the same fit on permuted train targets (chance "
              "level; selectivity = test R² − its test R², Hewitt & Liang 2019).", ""]
    lines += controls_table(sections)
    lines += _img(out, out / "r2_by_layer.png", "test R² by layer, every dataset")
    if any(sec.experiments for sec in sections):
        lines += ["Experiments at a glance (layer = best leave-one-out layer of the main "
                  "prompt's fit; proximity error: nominal → held out, 0 is perfect):", ""]
        with_prompts = any(sec.experiments.get("prompts", (None,))[0] for sec in sections)
        lines += md_table(["dataset", "layer", "block hold-out", "entity-type hold-out",
                      "linear / MLP test R²", "PCA test R²"]
                     + (["prompts (test R² at each best layer)"] if with_prompts else []),
                     [_glance(sec, with_prompts) for sec in sections])
    lines += model_size_markdown(sections, out)
    for sec in sections:
        lines += _dataset_section(sec, out)
    return "\n".join(lines) + "\n"


def headline(sec: Section) -> str:
    """The dataset's result in one line, as a researcher asks for it first: best layer, test
    R², Spearman, the error in the target's units (median km for places, median absolute
    error per target otherwise), proximity error, and the paper's Llama-2 numbers for a
    dataset of the same kind."""
    res = sec.main.result
    b = best_entry(res)["test"]
    parts = [f"best layer **{res['best_layer']}**", f"test R² **{md_num(b['r2'])}**",
             f"Spearman {md_num(b.get('spearman'))}"]
    if b.get("km_error_median") is not None:
        parts.append(f"median error {b['km_error_median']:.0f} km")
    else:
        parts += [f"median |error| of {t} {v:.3g}"
                  for t, v in (b.get("medae_per_target") or {}).items()]
    parts.append(f"proximity error {md_num(b.get('proximity_error'))} (0 is perfect)")
    text = "Headline: " + ", ".join(parts) + "."
    paper = PAPER_LLAMA2.get(getattr(sec.ds, "kind", None))
    if paper:
        text += (f" The paper's best-layer test R² on its {paper[0]} dataset, Llama-2 "
                 f"7B / 13B / 70B: {' / '.join(f'{v:.2f}' for v in paper[1])} (its own "
                 "entities and all its rows: a scale, not the same task).")
    return text


def _figures(sec: Section, out: Path) -> list[str]:
    """The dataset's figures first: R² by layer against the controls, the main prompt's
    prediction plots (map of test predictions coloured by region, or the time scatter), the
    best neuron of each target."""
    lines = _img(out, out / "controls" / f"{sec.ds.name}.png",
                 f"{sec.ds.name} test R² by layer against the controls")
    for png in sorted(sec.main.probe_dir.glob("*.png")):
        if png.name != "r2_by_layer.png":      # the controls figure shows the same curve
            lines += _img(out, png, f"{sec.main.label} {png.stem}")
    if sec.neurons is not None:
        for t in sec.neurons["targets"]:
            lines += _img(out, out / "neurons" / sec.ds.name / f"neuron_{t}.png",
                          f"{sec.ds.name} best {t} neuron")
    return lines


def _dataset_section(sec: Section, out: Path) -> list[str]:
    lines = [f"## {sec.ds.name}", "", controls_sentence(sec), "", headline(sec), ""]
    lines += _figures(sec, out)
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
            lines.append(f"| {e['layer']}{mark} | {alpha} | {md_num(e['train']['r2'])} | "
                         f"{md_num(e['test']['r2'])} | {md_num(e['test'].get('spearman'))} | "
                         f"{md_num(e['test'].get('proximity_error'))} |")
        lines.append("")
        flags = summary_line(res)           # rows with outlying norms, out-of-range predictions
        lines += [flags, ""] if flags else []
        if not job.main:                       # the main prompt's plots are at the top
            for png in sorted(job.probe_dir.glob("*.png")):
                lines += _img(out, png, f"{job.label} {png.stem}")
    lines += classify_markdown(sec, out)
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
                rows = [[e["rank"], e["layer"], e["index"], md_num(e["spearman"]),
                         md_num(e["pearson"])]
                        + ([md_num((e.get("probe_cosine") or {}).get(t))] if probe else [])
                        for e in nr["top_neurons"][t][:REPORT_NEURONS]]
                lines += [f"**{t}**", ""]
                lines += md_table(["rank", "layer", "neuron", "Spearman", "Pearson"]
                             + (["cos(probe)"] if probe else []), rows)
    for key, (res, note, files) in sec.experiments.items():
        lines += [f"### {EXPERIMENT_TITLES[key]}", ""]
        if res is None:
            lines += [f"Skipped: {note}", ""]
            continue
        lines += experiment_markdown(key, res)
        for f in files:
            if f.suffix == ".png":
                lines += _img(out, f, f"{sec.ds.name} {key}")
        lines += [f"Data: `{files[0].relative_to(out)}`.", ""]
    return lines




def majority_baseline(doc: dict) -> dict:
    """Scores of always predicting the most frequent train class, on the split the best layer
    was chosen on: accuracy, balanced accuracy and macro-F1 (averaged as
    :mod:`probes.classify.metrics` does: over the classes present in the split, and for F1 the
    predicted one too) and AUROC (0.5: constant scores)."""
    split = "test" if doc["n_test"] else "train"
    train, counts = doc["class_counts"]["train"], doc["class_counts"][split]
    top = max(range(len(train)), key=lambda c: (train[c], -c))
    p = counts[top] / max(1, sum(counts))
    present = sum(1 for c in counts if c)
    return {"class": doc["classes"][top], "accuracy": p,
            "balanced_accuracy": (1 / present) if counts[top] else 0.0,
            "macro_f1": 2 * p / (1 + p) / (present + (counts[top] == 0)), "auroc": 0.5}


def _classes_line(doc: dict) -> str:
    k, rest = len(doc["classes"]), doc["pooled"]
    text = f"K = {k} classes"
    if rest:
        shown = ", ".join(rest[:5]) + (", …" if len(rest) > 5 else "")
        text += (f" (the {k} most frequent; {doc['n_dropped']} rows of the {len(rest)} rarer "
                 f"classes dropped: {shown})" if doc["rest"] == "drop" else
                 f" (the {k - 1} most frequent + other, pooling {len(rest)} classes: {shown})")
    return text


def _layer_list(doc: dict) -> str:
    """The layers probed, e.g. "0, 3, 6, …, 30" (first three, the last)."""
    layers = [e["layer"] for e in doc["layers"]]
    shown = layers if len(layers) <= 4 else layers[:3] + ["…", layers[-1]]
    return ", ".join(str(x) for x in shown)


def classify_markdown(sec: Section, out: Path) -> list[str]:
    """The classification block of a place dataset's section (none for other kinds)."""
    doc = sec.classify
    if doc is None and not sec.classify_note:
        return []
    if doc is None:
        return ["### Classification probe", "", f"Skipped: {sec.classify_note}", ""]
    split = "test" if doc["n_test"] else "train"
    best = next(e for e in doc["layers"] if e["layer"] == doc["best_layer"])
    base = majority_baseline(doc)
    cs = doc["Cs"]
    lines = [f"### Classification probe: `{doc['target']}`", "",
             f"{_classes_line(doc)}; {doc['n_train']} train / {doc['n_test']} test rows. "
             f"Logistic regression (L2, C per layer by {doc['cv']}-fold stratified CV over "
             f"{len(cs)} Cs, {cs[0]:.3g}..{cs[-1]:.3g}), mass-mean (difference of class means) "
             f"and shrinkage LDA, on layers {_layer_list(doc)}. Best layer by {doc['best_by']}: "
             f"**{doc['best_layer']}**; majority class `{base['class']}`.", ""]
    rows = [[f"logistic (C = {best['logistic']['C']:.3g})", *_cells(best["logistic"][split])],
            ["mass-mean", *_cells(best["mass_mean"][split])],
            [f"LDA (shrinkage {best['lda']['shrinkage']:.3g})", *_cells(best["lda"][split])],
            ["majority class", *_cells(base)]]
    ctrl = next((r for r in (doc.get("control") or {}).get("layers", [])
                 if r["layer"] == doc["best_layer"]), None)
    if ctrl is not None and split == "test":
        rows.append(["shuffled labels (logistic, same C)", md_num(ctrl["test_accuracy"]),
                     "–", "–", "–"])
    lines += md_table([f"layer {doc['best_layer']} ({split})", "accuracy", "balanced accuracy",
                       "macro-F1", "AUROC"], rows)
    cdir = out / "classify" / sec.ds.name
    lines += _img(out, cdir / "accuracy_by_layer.png", f"{sec.ds.name} {doc['target']} accuracy "
                  "by layer")
    lines += _img(out, cdir / "confusion_best_layer.png", f"{sec.ds.name} {doc['target']} "
                  "confusion matrix")
    return lines + [f"Data: `{(cdir / 'results.json').relative_to(out)}`.", ""]


def _cells(m: dict) -> list[str]:
    return [md_num(m.get(k)) for k in ("accuracy", "balanced_accuracy", "macro_f1", "auroc")]
