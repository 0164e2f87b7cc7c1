"""Plots and the per-layer table of a fit (results.json + the best layer's predictions).

PNG files written by :func:`make_plots`:

* ``r2_by_layer.png``   : mean R² over targets, train and test, against the layer index;
* ``map_best_layer.png``: places (latitude + longitude targets) — predicted positions at the best
  layer, coloured by a group column (region, country...), true positions in light grey;
* ``year_best_layer.png``: time targets (``year``) — predicted vs true year, with the y = x line;
* ``pred_vs_true_best_layer.png``: any other targets — predicted vs true, one panel per target.

For ``fastprobe neurons``: :func:`format_neuron_table` (ranked top neurons per target, with the
probe cosine column when a probe was given) and
:func:`plot_best_neuron` (``neuron_<target>.png``: the best neuron's activation against the target;
for places a longitude/latitude map coloured by the activation).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from actstore.io import write_atomic

__all__ = ["format_table", "make_plots", "format_neuron_table", "plot_best_neuron", "text_table",
           "save_figure", "md_table", "md_num"]

MAX_GROUPS = 10


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


def format_table(result: dict) -> str:
    """The per-layer table printed by ``fastprobe fit`` and ``fastprobe show``."""
    places = any(("km_error_median" in e["test"]) for e in result["layers"])
    head = ["layer", "alpha", "R2 train", "R2 test", "pearson", "spearman", "prox err"]
    if places:
        head.append("km med")
    rows = []
    for e in result["layers"]:
        te, tr = e["test"], e["train"]
        row = [str(e["layer"]) + ("*" if e["layer"] == result["best_layer"] else ""),
               _alpha_str(e["alpha"]) + ("!" if e.get("alpha_at_grid_edge") else ""),
               _fmt(tr["r2"]), _fmt(te["r2"]), _fmt(te["pearson"]), _fmt(te["spearman"]),
               _fmt(te["proximity_error"])]
        if places:
            row.append(_fmt(te.get("km_error_median"), ".0f"))
        rows.append(row)
    cvname = "LOO" if result["cv"] == "loo" else f"{result['cv']}-fold"
    out = [f"store {result['store']}  targets {','.join(result['targets'])}  "
           f"train {result['n_train']} / test {result['n_test']} ({result['split']})  "
           f"d={result['d_model']}  {cvname}"
           f"{' per-target alpha' if result['alpha_per_target'] else ''}  "
           f"backend {result['backend']}  {result['form']} form"]
    out += text_table(head, rows)
    best = next(e for e in result["layers"] if e["layer"] == result["best_layer"])
    out.append(f"best layer {result['best_layer']}: test R2 {_fmt(best['test']['r2'])}"
               + (f", median error {_fmt(best['test'].get('km_error_median'), '.0f')} km"
                  if places else "")
               + f"   ({result['seconds']['total']:.1f} s; * = best by test R2, "
               "test columns are on the test split, ! = alpha at the edge of the grid)")
    return "\n".join(out)


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
