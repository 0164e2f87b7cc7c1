"""Plots and the per-layer table of a fit (results.json + the best layer's predictions), and the
output files' common rules.

PNG files written by :func:`make_plots`: ``r2_by_layer.png`` (mean R² over targets, train and
test, by layer, with the controls of :func:`draw_controls`); ``map_best_layer.png`` (places:
predicted positions at the best layer, coloured by a group column, true positions in light
grey); ``year_best_layer.png`` (time: predicted vs true year, with the y = x line);
``pred_vs_true_best_layer.png`` (any other targets).

For ``fastprobe neurons``: :func:`format_neuron_table` (top neurons per target, with the probe
cosine column when a probe was given) and :func:`plot_best_neuron` (``neuron_<target>.png``).
Output files: :func:`strict_json` / :func:`write_strict_json` (no bare NaN: a null and its
reason) and :class:`OutputSet` (the files of one output written as a set, its JSON last).
"""
from __future__ import annotations

import hashlib
import math
import os
import shutil
import socket
import tempfile
from pathlib import Path

import numpy as np

from actstore.io import WriteError, write_atomic, write_json

__all__ = ["format_table", "make_plots", "draw_controls", "floor_r2_axis", "layer0_r2",
           "best_entry", "control_at", "controls_cells", "LAYER0_LABEL", "R2_AXIS_FLOOR",
           "format_classify_table", "plot_classify", "format_neuron_table", "plot_best_neuron",
           "text_table", "save_figure", "md_table", "md_num", "strict_json", "write_strict_json",
           "OutputSet", "NULL_REASONS", "STAGING_PREFIX", "sha256_of"]

MAX_GROUPS = 10
LAYER0_LABEL = "layer 0 (embeddings)"
#: an R²-by-layer axis goes down to here at most: a few far-off test rows can put a layer at
#: -3 and flatten every other curve into a line (docs/paper-run.md, "Negative R² on US places")
R2_AXIS_FLOOR = -0.5


def save_figure(fig, path, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG through :func:`actstore.io.write_atomic` and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    plt.close(fig)
    return path


def _fmt(v, spec=".3f"):
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return format(v, spec)


def _alpha_str(a) -> str:
    if isinstance(a, dict):
        return ",".join(f"{v:.3g}" for v in a.values())
    return f"{a:.3g}"


def md_num(v, spec=".3f") -> str:
    """A number for a markdown report: formatted, or an en dash when missing or NaN."""
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    return format(v, spec)


def md_table(head, rows) -> list[str]:
    """Lines of a markdown table (a blank line after it)."""
    return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows] + [""])


def text_table(head, rows) -> list[str]:
    """Header, rule and rows of a right-aligned text table (cells are strings)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]


def _site_note(result) -> str:
    """"  site attn_out" for a fit of another array than the residual stream, else ""."""
    site = result.get("site")
    return f"  site {site}" if site not in (None, "resid") else ""


def format_table(result: dict) -> str:
    """The per-layer table printed by ``fastprobe fit`` and ``fastprobe show``."""
    places = any(("km_error_median" in e["test"]) for e in result["layers"])
    head = ["layer", "alpha", "R2 train", "R2 test", "pearson", "spearman", "prox err"]
    robust = [] if places else _medae_targets(result)
    flags = all("row_norms" in e for e in result["layers"])
    head += (["km med"] if places else [f"medAE {t}" for t in robust])
    head += ["hi-norm", "out"] if flags else []
    rows = []
    for e in result["layers"]:
        te, tr = e["test"], e["train"]
        row = [str(e["layer"]) + ("*" if e["layer"] == result["best_layer"] else ""),
               _alpha_str(e["alpha"]) + ("!" if e.get("alpha_at_grid_edge") else ""),
               _fmt(tr["r2"]), _fmt(te["r2"]), _fmt(te["pearson"]), _fmt(te["spearman"]),
               _fmt(te["proximity_error"])]
        if places:
            row.append(_fmt(te.get("km_error_median"), ".0f"))
        row += [_fmt(te["medae_per_target"][t], ".4g") for t in robust]
        if flags:
            row += [str(e["row_norms"]["n_outliers"]), str(e["out_of_range"]["n_test"])]
        rows.append(row)
    cvname = "LOO" if result["cv"] == "loo" else f"{result['cv']}-fold"
    out = [f"store {result['store']}  targets {','.join(result['targets'])}  "
           f"train {result['n_train']} / test {result['n_test']} ({result['split']})  "
           f"d={result['d_model']}{_site_note(result)}  {cvname}"
           f"{' per-target alpha' if result['alpha_per_target'] else ''}  "
           f"backend {result['backend']}  {result['form']} form"]
    out += text_table(head, rows)
    best = best_entry(result)
    out.append(f"best layer {result['best_layer']}: test R2 {_fmt(best['test']['r2'])}"
               + (f", median error {_fmt(best['test'].get('km_error_median'), '.0f')} km"
                  if places else "")
               + f"   ({result['seconds']['total']:.1f} s; * = best by test R2, "
               "test columns are on the test split, ! = alpha at the edge of the grid"
               + ("; hi-norm = rows whose norm is far above the layer's median, out = test "
                  "predictions outside the valid range" if flags else "") + ")")
    if result.get("row_norm") not in (None, "none"):
        out.append(f"rows fitted with --row-norm {result['row_norm']}")
    out += _controls_lines(result)
    return "\n".join(out)


def _medae_targets(result: dict) -> list[str]:
    """Targets whose median absolute error the table shows (a results.json older than it:
    none)."""
    first = result["layers"][0]["test"] if result["layers"] else {}
    return [t for t in result["targets"] if t in (first.get("medae_per_target") or {})]


def _controls_lines(result: dict) -> list[str]:
    """The controls under the table: layer 0's test R² and the shuffled-target control at the
    best layer, with the selectivity (none when the fit has neither)."""
    lines = []
    floor = layer0_r2(result)
    if floor is not None and result["best_layer"] != 0:
        lines.append(f"layer 0 (embeddings): test R2 {_fmt(floor)}")
    row = control_at(result, result["best_layer"])
    if row is not None:
        lines.append(f"shuffled-target control (seed {result['control']['seed']}): test R2 "
                     f"{_fmt(row['test_r2'])} at layer {row['layer']}, selectivity "
                     f"{_fmt(row['selectivity'])}")
    return lines


def format_classify_table(doc: dict) -> str:
    """The per-layer table of a classification fit (``fastprobe fit`` / ``show``): logistic
    C, CV and test accuracy, balanced accuracy, macro-F1, AUROC, and the test accuracy of the
    difference-of-means and LDA probes."""
    split = "test" if doc["n_test"] else "train"
    head = ["layer", "C", "cv acc", f"{split} acc", "bal acc", "macro F1", "AUROC", "mass-mean",
            "LDA"]
    rows = []
    for e in doc["layers"]:
        lg = e["logistic"][split]
        rows.append([str(e["layer"]) + ("*" if e["layer"] == doc["best_layer"] else ""),
                     _alpha_str(e["logistic"]["C"]), _fmt(e["logistic"]["cv_score"]),
                     _fmt(lg["accuracy"]), _fmt(lg["balanced_accuracy"]), _fmt(lg["macro_f1"]),
                     _fmt(lg["auroc"]), _fmt(e["mass_mean"][split]["accuracy"]),
                     _fmt(e["lda"][split]["accuracy"])])
    pooled = (f", {len(doc['pooled'])} rarest {'dropped' if doc['rest'] == 'drop' else 'pooled'}"
              if doc["pooled"] else "")
    out = [f"store {doc['store']}  target {doc['target']}: {len(doc['classes'])} classes"
           f"{pooled}  train {doc['n_train']} / test {doc['n_test']} ({doc['split']})  "
           f"{doc['cv']}-fold stratified{_site_note(doc)}"]
    out += text_table(head, rows)
    chance = max(doc["class_counts"][split]) / max(1, sum(doc["class_counts"][split]))
    out.append(f"best layer {doc['best_layer']} by {doc['best_by']}   (majority class "
               f"{_fmt(chance)}; {doc['seconds']:.1f} s; * = best)")
    return "\n".join(out)


def plot_classify(doc: dict, out) -> list[Path]:
    """accuracy_by_layer.png (the three probes, balanced accuracy of logistic, the majority
    rate) and confusion_best_layer.png (rows: true class, normalised per row)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    split = "test" if doc["n_test"] else "train"
    layers = [e["layer"] for e in doc["layers"]]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method, style in (("logistic", "o-"), ("lda", "s-"), ("mass_mean", "^-")):
        ax.plot(layers, [e[method][split]["accuracy"] for e in doc["layers"]], style,
                label=f"{method} accuracy")
    ax.plot(layers, [e["logistic"][split]["balanced_accuracy"] for e in doc["layers"]], "o:",
            label="logistic balanced accuracy")
    counts = doc["class_counts"][split]
    ax.axhline(max(counts) / max(1, sum(counts)), color="grey", lw=0.8, label="majority class")
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{split} accuracy")
    ax.set_title(f"{doc['target']}: {len(doc['classes'])} classes")
    ax.legend(fontsize=7)
    written = [save_figure(fig, Path(out) / "accuracy_by_layer.png")]
    cm = np.asarray(doc["confusion_matrix"]["matrix"], dtype=float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    k = len(doc["classes"])
    fig, ax = plt.subplots(figsize=(2.5 + 0.35 * k, 2 + 0.35 * k))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), doc["classes"], rotation=90, fontsize=7)
    ax.set_yticks(range(k), doc["classes"], fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"layer {doc['confusion_matrix']['layer']} ({split})", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    written.append(save_figure(fig, Path(out) / "confusion_best_layer.png"))
    return written


REGION_COLUMNS = ("continent", "region", "borough_name", "borough", "state_name", "state_id",
                  "state", "country")


def _pick_group(df, group_columns):
    """The column to colour a map by: the first regional column present (continent, region,
    borough, state, country), else the group column with the fewest distinct values (>= 2)."""
    cols = [c for c in group_columns if c in df.columns and df[c].nunique() > 1]
    for c in REGION_COLUMNS:
        if c in cols:
            return c
    cands = [(df[c].nunique(), c) for c in cols]
    return min(cands)[1] if cands else None


def best_entry(result: dict) -> dict:
    """The per-layer entry of a fit's best layer."""
    return next(e for e in result["layers"] if e["layer"] == result["best_layer"])


def control_at(result: dict, layer: int) -> dict | None:
    """The shuffled-target control's entry at ``layer`` (None without a control)."""
    rows = (result.get("control") or {}).get("layers") or []
    return next((r for r in rows if r["layer"] == layer), None)


def controls_cells(result: dict, random_init: dict | None) -> list[str]:
    """A controls-table row's cells for a fit and its random-init model's fit (or None): best
    test R² (layer), layer 0's test R², the random-init best (layer), the shuffled-target
    control's test R² at the best layer, the selectivity."""
    ctrl = control_at(result, result["best_layer"]) or {}
    rnd = (f"{md_num(best_entry(random_init)['test']['r2'])} ({random_init['best_layer']})"
           if random_init is not None else "–")
    return [f"{md_num(best_entry(result)['test']['r2'])} ({result['best_layer']})",
            md_num(layer0_r2(result)), rnd, md_num(ctrl.get("test_r2")),
            md_num(ctrl.get("selectivity"))]


def layer0_r2(result: dict) -> float | None:
    """Test R² of layer 0, the token embeddings (the lexical floor), when the fit has it."""
    row = next((e for e in result.get("layers") or () if e["layer"] == 0), None)
    r2 = None if row is None else row["test"].get("r2")
    return None if r2 is None or not math.isfinite(r2) else float(r2)


def draw_controls(ax, result: dict, color=None, prefix: str = "") -> None:
    """Draw a fit's controls on an R²-by-layer axis: layer 0's test R² as a horizontal dashed
    line labelled "layer 0 (embeddings)" (when the store holds layer 0), and the
    shuffled-target control's test R² by layer as a dotted line (when the fit has one).

    Parameters
    ----------
    ax : matplotlib Axes
    result : dict
        results.json of a fit.
    color : str, optional
        Line colour (default: grey for layer 0, red for the control).
    prefix : str
        Put before each label (a dataset name, when several fits share the axis).
    """
    floor = layer0_r2(result)
    if floor is not None:
        ax.axhline(floor, ls="--", lw=1, color=color or "0.4", label=prefix + LAYER0_LABEL)
    rows = (result.get("control") or {}).get("layers") or []
    if rows:
        ax.plot([r["layer"] for r in rows],
                [np.nan if r["test_r2"] is None else r["test_r2"] for r in rows], ":",
                color=color or "tab:red", lw=1.2, label=prefix + "shuffled-target control")


def floor_r2_axis(ax) -> None:
    """Stop an R² axis at :data:`R2_AXIS_FLOOR` when some plotted R² is lower: the curve leaves
    the axis there, and the lowest value is written where its curve leaves, in its colour."""
    low = None                                   # (value, x, colour) of the lowest point
    top = 0.0
    for line in ax.get_lines():
        xs = np.asarray(line.get_xdata(), dtype=float)
        ys = np.asarray(line.get_ydata(), dtype=float)
        ok = np.isfinite(ys) & np.isfinite(xs)
        if not ok.any():
            continue
        i = int(np.argmin(np.where(ok, ys, np.inf)))
        top = max(top, float(ys[ok].max()))
        if low is None or ys[i] < low[0]:
            low = (float(ys[i]), float(xs[i]), line.get_color())
    if low is None or low[0] >= R2_AXIS_FLOOR:
        return
    ax.set_ylim(R2_AXIS_FLOOR, top + 0.05 * (top - R2_AXIS_FLOOR))
    ax.text(low[1], R2_AXIS_FLOOR, f"{low[0]:.2f}\u2193", fontsize=7, color=low[2],
            ha="center", va="bottom")


def make_plots(result: dict, df, out, group_columns=()) -> list[Path]:
    """Write the PNGs for ``result`` (results dict) and ``df`` (best layer's predictions table
    with the true target columns, ``pred_<target>`` columns, ``is_test`` and group columns)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    written = []
    layers = [e["layer"] for e in result["layers"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(layers, [e["train"]["r2"] for e in result["layers"]], "o-", label="train")
    ax.plot(layers, [e["test"]["r2"] for e in result["layers"]], "s-", label="test")
    draw_controls(ax, result)
    floor_r2_axis(ax)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"R² (mean over {', '.join(result['targets'])})")
    cv = "LOO" if result["cv"] == "loo" else f"{result['cv']}-fold"
    ax.set_title(f"ridge probe R² by layer ({cv} alpha)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    p = out / "r2_by_layer.png"
    save_figure(fig, p)
    written.append(p)

    targets = [t.lower() for t in result["targets"]]
    best = result["best_layer"]
    if "latitude" in targets and "longitude" in targets:
        lat = result["targets"][targets.index("latitude")]
        lon = result["targets"][targets.index("longitude")]
        fig, ax = plt.subplots(figsize=(10, 5.5))
        ax.scatter(df[lon], df[lat], s=3, c="0.8", label="true", rasterized=True)
        g = _pick_group(df, group_columns)
        if g is None:
            ax.scatter(df[f"pred_{lon}"], df[f"pred_{lat}"], s=4, c="tab:blue", label="predicted")
        else:
            top = df[g].value_counts().index[:MAX_GROUPS]
            cmap = plt.get_cmap("tab10")
            for i, v in enumerate(top):
                m = df[g] == v
                ax.scatter(df.loc[m, f"pred_{lon}"], df.loc[m, f"pred_{lat}"], s=4,
                           color=cmap(i % 10), label=str(v), rasterized=True)
            rest = ~df[g].isin(top)
            if rest.any():
                ax.scatter(df.loc[rest, f"pred_{lon}"], df.loc[rest, f"pred_{lat}"], s=3,
                           color="0.4", label="other", rasterized=True)
        ax.set_xlim(-180, 180)
        ax.set_ylim(-90, 90)
        ax.set_xlabel("longitude")
        ax.set_ylabel("latitude")
        ax.set_title(f"predicted positions, layer {best} (grey: true)")
        ax.legend(markerscale=3, fontsize=7, loc="lower left", ncol=2)
        fig.tight_layout()
        p = out / "map_best_layer.png"
        save_figure(fig, p)
        written.append(p)
        others = [t for t in result["targets"] if t not in (lat, lon)]
    else:
        others = list(result["targets"])
    if others:
        fig, axes = plt.subplots(1, len(others), figsize=(5 * len(others), 4.5), squeeze=False)
        for ax, t in zip(axes[0], others):
            tr = ~df["is_test"].astype(bool)
            ax.scatter(df.loc[tr, t], df.loc[tr, f"pred_{t}"], s=4, alpha=0.5, label="train")
            ax.scatter(df.loc[~tr, t], df.loc[~tr, f"pred_{t}"], s=4, alpha=0.7, label="test")
            lo, hi = float(np.nanmin(df[t])), float(np.nanmax(df[t]))
            ax.plot([lo, hi], [lo, hi], "k--", lw=1)
            ax.set_xlabel(f"true {t}")
            ax.set_ylabel(f"predicted {t}")
            ax.set_title(f"layer {best}")
            ax.legend()
        fig.tight_layout()
        p = out / ("year_best_layer.png" if others == ["year"] else "pred_vs_true_best_layer.png")
        save_figure(fig, p)
        written.append(p)
    return written


def format_neuron_table(result: dict) -> str:
    """The ranked table of top neurons per target printed by ``fastprobe neurons``; with a
    probe (``--probe``) a ``cos(probe)`` column: the cosine of the neuron's output weights with
    the probe direction of the same target at the layer the neuron writes into."""
    probe = "probe" in result
    head = ["rank", "layer", "neuron", "spearman", "pearson"] + (["cos(probe)"] if probe else [])
    method = result.get("method", "stored")
    out = [f"store {result['store']}  method {method}  targets {','.join(result['targets'])}  "
           f"{result['n_rows']} rows ({result['split']})  {len(result['layers'])} layers x "
           f"{result['d_mlp']} neurons  backend {result['backend']}"]
    for t in result["targets"]:
        rows = []
        for e in result["top_neurons"][t]:
            row = [str(e["rank"]), str(e["layer"]), str(e["index"]), _fmt(e["spearman"]),
                   _fmt(e["pearson"])]
            if probe:
                row.append(_fmt((e.get("probe_cosine") or {}).get(t)))
            rows.append(row)
        out += ["", f"{t}: top {len(rows)} neurons by |spearman|"] + text_table(head, rows)
    notes = ["layer = hidden state the neuron's MLP writes into (block layer-1)"]
    if method == "projection":
        notes.append("projected from the residual of hidden state layer-1")
    if probe:
        notes.append(f"cos(probe): output weights vs the probe of {result['probe']['dir']}, "
                     "same target and layer ('-': no probe there)")
    if "seconds" in result:
        notes.append(f"{result['seconds']['total']:.1f} s")
    out.append("(" + "; ".join(notes) + ")")
    return "\n".join(out)


def plot_best_neuron(path, target: str, y, act, best: dict, lonlat=None) -> Path:
    """PNG of one neuron's activation ``act`` against ``target`` values ``y`` (same rows);
    with ``lonlat`` = (longitude, latitude) arrays: a map coloured by the activation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    how = (f" (projected from hidden state {best['source_layer']})"
           if "source_layer" in best else "")
    title = (f"layer {best['layer']} neuron {best['index']}{how}: spearman "
             f"{best['spearman']:.3f}, pearson {best['pearson']:.3f} with {target}")
    if lonlat is not None:
        fig, ax = plt.subplots(figsize=(10, 5.5))
        sc = ax.scatter(lonlat[0], lonlat[1], c=act, s=5, cmap="coolwarm", rasterized=True)
        fig.colorbar(sc, ax=ax, label="activation")
        ax.set_xlim(-180, 180)
        ax.set_ylim(-90, 90)
        ax.set_xlabel("longitude")
        ax.set_ylabel("latitude")
    else:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        ax.scatter(y, act, s=5, alpha=0.6, rasterized=True)
        ax.set_xlabel(target)
        ax.set_ylabel("activation")
        ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    save_figure(fig, path)
    return path


# ------------------------------------------------------------------------ strict JSON files
_UNDEFINED_R2 = "R² is undefined: the target is constant on these rows"
_UNDEFINED_CORR = "the correlation is undefined: one of its two variables is constant on these rows"
NULL_REASONS = {
    "r2": _UNDEFINED_R2, "r2_per_target": _UNDEFINED_R2,
    **{k: _UNDEFINED_CORR for k in ("pearson", "pearson_per_target", "spearman",
                                    "spearman_per_target", "probe_cosine")},
    "cv_score": "the CV score is undefined: a target is constant on a validation fold",
}
"""Why a number can be missing, by the name of the key that holds it or of the nearest
enclosing key that has an entry (``r2_per_target`` for ``r2_per_target.latitude``)."""


def strict_json(doc: dict, reasons: dict | None = None) -> dict:
    """``doc`` as strict JSON: numpy scalars and arrays made plain, and every NaN or infinity
    written as null with its reason in the top-level ``"nulls"``.

    Parameters
    ----------
    doc : dict
        The document (a JSON object).
    reasons : dict, optional
        Key name -> why a number under that key can be missing, added to (and overriding)
        :data:`NULL_REASONS`; other numbers get "not a finite number".

    Returns
    -------
    dict
        A copy; when any number was not finite, ``"nulls"`` maps the path of each null
        (``layers[3].test.r2_per_target.latitude``) to ``"NaN: <why>"`` (or ``Infinity``,
        ``-Infinity``). ``json.dumps(..., allow_nan=False)`` accepts it.
    """
    why = {**NULL_REASONS, **(reasons or {})}
    nulls: dict[str, str] = {}
    out = _strict(doc, "", (), nulls, why)
    if nulls:
        out["nulls"] = {**(out.get("nulls") or {}), **nulls}
    return out


def _strict(obj, path: str, keys: tuple, nulls: dict, why: dict):
    if isinstance(obj, dict):
        return {str(k): _strict(v, f"{path}.{k}" if path else str(k), keys + (str(k),), nulls,
                                why) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    if isinstance(obj, (list, tuple)):
        return [_strict(v, f"{path}[{i}]", keys, nulls, why) for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        token = "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
        reason = next((why[k] for k in reversed(keys) if k in why), "not a finite number")
        nulls[path] = f"{token}: {reason}"
        return None
    return obj


def write_strict_json(path, doc: dict, reasons: dict | None = None, *,
                      mkdir: bool = False) -> Path:
    """:func:`actstore.io.write_json` of :func:`strict_json` ``(doc, reasons)`` with
    ``allow_nan=False`` (indent 1; atomic; a failed write names the file)."""
    return write_json(path, strict_json(doc, reasons), indent=1, mkdir=mkdir, allow_nan=False)


# ------------------------------------------------------------------------ output sets
STAGING_PREFIX = ".staging-"


def sha256_of(path) -> str:
    """sha256 of a file's bytes, read now (never cached, unlike ``actstore.io.file_sha256``: a
    file replaced in place must not pass a check of the digest recorded beside it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class OutputSet:
    """The files of one output (a fit, a neuron report, an experiment) written as a set.

    ``with OutputSet(out, last=("results.json",)) as stage:`` gives a staging folder inside
    ``out``; write every file there (each through ``actstore.io``). When the block ends without
    an error, the files are renamed into ``out``, those named in ``last`` after all the others
    (the JSON that describes them); on any error nothing in ``out`` changes, the staging folder
    is removed, and a :class:`~actstore.io.WriteError` names the file in ``out`` that could not
    be written. The staging folder of a killed process of this host is removed next time.
    """

    def __init__(self, out, last: tuple[str, ...] = ()):
        self.out, self.last, self.stage = Path(out), tuple(last), None

    def __enter__(self) -> Path:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            _remove_stale_stages(self.out)
            self.stage = Path(tempfile.mkdtemp(dir=self.out, prefix=_stage_prefix()))
        except OSError as exc:
            raise WriteError(self.out, exc.errno, exc.strerror or str(exc),
                             "nothing was written") from exc
        return self.stage

    def __exit__(self, kind, exc, tb) -> bool:
        if kind is None:
            try:
                self._commit()
            finally:
                shutil.rmtree(self.stage, ignore_errors=True)
            return False
        shutil.rmtree(self.stage, ignore_errors=True)
        if isinstance(exc, WriteError) and _same(Path(exc.filename).parent, self.stage):
            raise WriteError(self.out / Path(exc.filename).name, exc.errno, exc.strerror,
                             f"the previous files in {self.out} are unchanged") from exc
        return False

    def _commit(self) -> None:
        names = sorted(p.name for p in self.stage.iterdir())
        order = [n for n in names if n not in self.last] + [n for n in self.last if n in names]
        for i, name in enumerate(order):
            try:
                os.replace(self.stage / name, self.out / name)
            except OSError as exc:
                done = ", ".join(order[:i]) or "none"
                raise WriteError(self.out / name, exc.errno, exc.strerror or str(exc),
                                 f"already replaced: {done}; run it again") from exc


def _same(a: Path, b: Path) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


def _stage_prefix() -> str:
    return f"{STAGING_PREFIX}{socket.gethostname()}-{os.getpid()}-"


def _remove_stale_stages(out: Path) -> None:
    """Remove the staging folders that dead processes of this host left in ``out``."""
    mine = f"{STAGING_PREFIX}{socket.gethostname()}-"
    for p in out.glob(mine + "*"):
        pid = p.name[len(mine):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    if os.name == "nt":            # os.kill(pid, 0) would end the process there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True                # another user's process
    return True
