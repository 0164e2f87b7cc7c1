"""What the fastprobe commands share: the description of the method and the one-release notice
that layer flags changed meaning."""
from __future__ import annotations

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
      latitude+longitude (a place store's own targets), LOO over 41 alphas 1e-2..1e10,
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


def layers_note(flag: str) -> None:
    """One release of notice that layer flags changed meaning (CHANGELOG 0.2.0)."""
    print(f"fastprobe: note: {flag} takes hidden-state indices since 0.2.0 (the numbers "
          "results.json and the plots show); before, it took positions in the store's layer "
          "list", file=sys.stderr)


