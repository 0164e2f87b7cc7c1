"""The "Model size" section of ``actstore run --models A,B,...``: test R² by relative depth
(layer / blocks) per model, one panel per dataset (``model_size.png``); best-layer test R² per
dataset per model beside the paper's Llama-2 7B / 13B / 70B numbers (matched by dataset kind:
the datasets themselves differ); the controls of every model."""
from __future__ import annotations

from pathlib import Path

from probes.pipeline.plan import Section
from probes.report import (
    best_entry,
    controls_cells,
    floor_r2_axis,
    md_num,
    md_table,
    save_figure,
)

__all__ = ["PAPER_LLAMA2", "compared_models", "plot_model_size", "model_size_markdown",
           "model_size_rows"]

# Gurnee & Tegmark (2023), best-layer test R² of the Llama-2 7B / 13B / 70B linear probes, by
# the kind of the paper's dataset: its row name and the three numbers
PAPER_LLAMA2 = {
    "world_place": ("world", (0.88, 0.90, 0.92)),
    "us_place": ("USA", (0.79, 0.81, 0.85)),
    "nyc_place": ("NYC", (0.26, 0.27, 0.39)),
    "historical_figure": ("historical figures", (0.78, 0.80, 0.83)),
    "art": ("art", (0.79, 0.81, 0.88)),
    "headline": ("headlines", (0.59, 0.66, 0.75)),
}
MODEL_SIZE_PNG = "model_size.png"


def compared_models(sections) -> list[str]:
    """The models of the comparison in order (empty unless ``--models`` named two or more)."""
    names = list(sections[0].models) if sections else []
    return names if len(names) > 1 else []


def _blocks(job) -> int:
    """The model's decoder blocks (the last hidden-state index), from the store's meta."""
    n = (job.store.meta.get("model") or {}).get("n_layers")
    return int(n) if n else max(job.store.layers)


def plot_model_size(sections, path: Path) -> Path | None:
    """Test R² by relative depth (hidden-state index / blocks: 0 = embeddings, 1 = last block),
    one line per model (its random-init control dotted, same colour), a panel per dataset."""
    models = compared_models(sections)
    if not models:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: matplotlib is slow to import

    n = len(sections)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for ax, sec in zip(axes.flat, sections):
        for i, m in enumerate(models):
            color = f"C{i}"
            for job, style, label in ((sec.models.get(m), "o-", m),
                                      (sec.random_models.get(m), ":", f"{m} random-init")):
                if job is None:
                    continue
                ls, blocks = job.result["layers"], _blocks(job)
                ax.plot([e["layer"] / blocks for e in ls], [e["test"]["r2"] for e in ls],
                        style, ms=3, color=color, label=label)
        floor_r2_axis(ax)
        ax.set_title(f"{sec.ds.name} ({sec.ds.kind})", fontsize=9)
        ax.set_xlabel("relative depth (layer / blocks)")
        ax.set_ylabel("test R² (mean over targets)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("test R² by relative depth, per model")
    fig.tight_layout()
    return save_figure(fig, path)


def model_size_rows(sections) -> list[list[str]]:
    """Rows of the model-size table: dataset, the paper's row it is compared with, each model's
    best test R² (layer / blocks), the paper's Llama-2 7B, 13B, 70B."""
    models = compared_models(sections)
    rows = []
    for sec in sections:
        paper, nums = PAPER_LLAMA2.get(sec.ds.kind, ("–", (None, None, None)))
        cells = [sec.ds.name, paper]
        for m in models:
            job = sec.models.get(m)
            cells.append("–" if job is None else
                         f"{md_num(best_entry(job.result)['test']['r2'])} "
                         f"({job.result['best_layer']}/{_blocks(job)})")
        rows.append(cells + [md_num(v, ".2f") for v in nums])
    return rows


def _controls_rows(sections, models) -> list[list[str]]:
    """Per dataset and model: best test R² (layer), layer 0, the random-init model's best, the
    shuffled-target control at the best layer, the selectivity."""
    rows = []
    for sec in sections:
        for m in models:
            job = sec.models.get(m)
            if job is None:
                continue
            rnd = sec.random_models.get(m)
            rows.append([sec.ds.name, m] + controls_cells(
                job.result, rnd.result if rnd is not None else None))
    return rows


def _verdict(sec: Section, models: list[str]) -> str:
    """One sentence: which model's probe is best on this dataset, with the numbers."""
    scores = {m: best_entry(sec.models[m].result)["test"]["r2"] for m in models if m in sec.models}
    order = sorted(scores, key=lambda m: -scores[m])
    top = order[0]
    rest = ", ".join(f"{m} {md_num(scores[m])}" for m in order[1:])
    return f"- {sec.ds.name}: best {top} ({md_num(scores[top])})" + (
        f", then {rest}." if rest else ".")


def _model_line(sections, m: str) -> str:
    job = next((s.models[m] for s in sections if m in s.models), None)
    if job is None or job.store is None:
        return f"`{m}`"
    info = job.store.meta.get("model") or {}
    return (f"`{m}` ({info.get('n_layers', '?')} blocks, d_model {info.get('d_model', '?')}, "
            f"stored {job.store.dtype})")


def model_size_markdown(sections, out: Path) -> list[str]:
    """The report's "Model size" section (nothing unless two or more models were compared)."""
    models = compared_models(sections)
    if not models:
        return []
    lines = ["## Model size", "",
             "Models compared: " + "; ".join(_model_line(sections, m) for m in models) + ". "
             "Each is extracted and probed the same way on the main prompt of every dataset "
             "(the first also runs the other steps). Layer = hidden-state index; relative depth "
             "= layer / blocks.", ""]
    head = (["dataset", "paper row"] + [f"{m}: best test R² (layer/blocks)" for m in models]
            + ["Llama-2 7B", "Llama-2 13B", "Llama-2 70B"])
    lines += md_table(head, model_size_rows(sections))
    lines += ["The Llama-2 columns are the paper's best-layer test R² (Gurnee & Tegmark 2023) "
              "on the paper's own dataset of the same kind (world places, USA places, NYC places, "
              "historical figures, art, headlines). The datasets differ unless a row is the "
              "paper's own CSV in full: the built-ins (world_cities, us_places, nobel, films) "
              "hold other entities and --limit keeps fewer rows; compare trends, not equal "
              "tasks.", ""]
    lines += [_verdict(sec, models) for sec in sections] + [""]
    lines += ["Controls of every model (layer 0 = its token embeddings; random-init = its "
              "architecture with re-initialised weights; shuffled targets at its best layer):",
              ""]
    lines += md_table(["dataset", "model", "best test R² (layer)", "layer 0", "random-init: "
                       "best (layer)", "shuffled targets", "selectivity"],
                      _controls_rows(sections, models))
    png = out / MODEL_SIZE_PNG
    if png.exists():
        lines += [f"![test R² by relative depth per model]({MODEL_SIZE_PNG})", ""]
    return lines
