"""What a probe is fitted on: the store's array (:func:`fit_view`: one site, one row per text),
target columns (THE target validator) and the train/test split, read from a store's entity
table."""
from __future__ import annotations

import numpy as np

from probes.errors import InputError

__all__ = ["fit_view", "SiteView", "class_targets", "resolve_targets", "target_matrix",
           "parse_split", "select_layers"]

RAGGED_ERROR = ("{path}: a token-level store (position 'all': one row per token, {n} tokens of "
                "{t} texts); fastprobe fit takes one row per text: train token-level probes "
                "with store.iter_batches(...) (docs/python-api.md), or extract with --position "
                "last-entity, last or mean")


class SiteView:
    """A store seen through one of its sites: ``layer``, ``read`` and ``iter_chunks`` read that
    array and ``d_model`` is its width; everything else is the store's. The fits read this, so
    their passes need not know which array they stream."""

    def __init__(self, store, site: str):
        self.store, self.site = store, site
        self.d_model = int(store.d_sites[site])

    def layer(self, layer: int, as_: str = "numpy"):
        return self.store.layer(layer, site=self.site, as_=as_)

    def read(self, rows: slice, layers=None):
        return self.store.read(rows, layers=layers, site=self.site)

    def iter_chunks(self, rows: int | None = None, layers=None, start: int = 0,
                    stop: int | None = None):
        return self.store.iter_chunks(rows=rows, layers=layers, site=self.site, start=start,
                                      stop=stop)

    def __getattr__(self, name: str):
        if name == "store":          # not set yet (copy, unpickling): no endless recursion
            raise AttributeError(name)
        return getattr(self.store, name)


def fit_view(store, site: str = "resid") -> SiteView:
    """``store`` seen through ``site`` for a fit (ridge or classification).

    Parameters
    ----------
    store : ActivationStore
    site : str
        The array to fit on ("resid", "attn_out", "mlp_out", "neurons").

    Returns
    -------
    SiteView

    Raises
    ------
    InputError
        The store has no such site (the message lists its sites), or it is a token-level
        store (position "all"), which has many rows per text: the fits take one.
    """
    if isinstance(store, SiteView):
        store = store.store
    if store.ragged:
        raise InputError(RAGGED_ERROR.format(path=store.path, n=store.n_rows, t=store.n_texts))
    if site not in store.sites:
        raise InputError(f"{store.path}: no site {site!r} in this store; it holds "
                         f"{list(store.sites)} (--site NAME; extract with --sites {site} to "
                         "add it)")
    return SiteView(store, site)


def class_targets(store) -> list[str]:
    """The store's targets recorded as class targets (format version 2 ``target_kinds``;
    a version 1 store records every target as regression)."""
    kinds = store.target_kinds
    return [t for t in store.targets if kinds.get(t) == "class"]


def resolve_targets(store, targets=None, allow_class: bool = False) -> list[str]:
    """Ridge target names: ``targets`` (list or "a,b" string) or the store's own regression
    targets; validated by name. A target the store records as a class target is refused
    (classification fits it) unless ``allow_class`` (``--task regress``: regress on its
    codes)."""
    have = list(store.targets or ())
    classes = class_targets(store) if have else []
    if targets is None or (isinstance(targets, str) and not targets.strip()):
        regress = [t for t in have if t not in classes]
        if not regress:
            if classes:
                raise InputError(f"{store.path}: the store's targets {classes} are class "
                                 "targets: classification fits one at a time, name it with "
                                 f"--target {classes[0]} (targets={classes[0]!r})")
            raise InputError(f"{store.path}: the store records no target columns; pass targets=... "
                             "naming numeric columns of its entity table")
        return regress
    names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
    names = [n for n in names if n]
    if not names:
        raise InputError("no target names given")
    if len(set(names)) != len(names):
        raise InputError(f"duplicate target names in {names}")
    from pandas.api.types import is_bool_dtype, is_numeric_dtype  # deferred: `--help` paths

    ent = store.entities
    cols = list(ent.columns)
    for n in names:
        if n not in cols:
            raise InputError(f"unknown target {n!r}: the store's targets are {have}"
                             f" (entity columns: {cols})")
        if n in classes and not allow_class:
            raise InputError(f"target {n!r} is a class target (the store records it so): fit "
                             f"it alone (--target {n}) for classification probes, or add --task "
                             "regress to regress on its values")
        if not is_numeric_dtype(ent[n]) or is_bool_dtype(ent[n]):
            raise InputError(f"target column {n!r} is not numeric (dtype {ent[n].dtype}); a "
                             "ridge target must be a number per entity (the store's targets: "
                             f"{have}); a class column is fitted alone, by classification "
                             f"probes (--target {n} --task classify)")
    return names


def target_matrix(store, targets=None,
                  allow_class: bool = False) -> tuple[list[str], np.ndarray]:
    """Validated target names (:func:`resolve_targets`) and the (rows_done, k) float64 target
    matrix; InputError for a store without completed rows or a missing / non-finite target
    value."""
    n = int(store.rows_done)
    if n == 0:
        raise InputError(f"{store.path}: the store has no completed rows")
    names = resolve_targets(store, targets, allow_class)
    Y = store.target_array(names)[:n]
    bad = ~np.isfinite(Y)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise InputError(f"{store.path}: target {names[c]!r} is missing or not finite at row {r} "
                         f"({int(bad.any(1).sum())} rows affected)")
    return names, Y


def parse_split(spec: str, store, n: int) -> np.ndarray:
    """Boolean test mask (n,) from a split spec.

    ``is_test``: the store's own column. ``random:FRAC:SEED``: a seeded random FRAC of the rows.
    ``group:COLUMN[:FRAC[:SEED]]``: whole groups of COLUMN held out: a seeded random FRAC (default
    0.2) of its distinct values goes to test (block hold-out, e.g. by country).
    """
    spec = (spec or "is_test").strip()
    if spec == "is_test":
        mask = np.asarray(store.is_test[:n], dtype=bool)
        return mask
    kind, _, rest = spec.partition(":")
    parts = rest.split(":") if rest else []
    try:
        if kind == "random":
            frac = float(parts[0]) if parts else 0.2
            seed = int(parts[1]) if len(parts) > 1 else 0
            if not 0 < frac < 1 or len(parts) > 2:
                raise ValueError
            rng = np.random.default_rng(seed)
            n_test = int(round(frac * n))
            mask = np.zeros(n, dtype=bool)
            mask[rng.permutation(n)[:n_test]] = True
            return mask
        if kind == "group":
            if not parts or not parts[0]:
                raise ValueError
            col = parts[0]
            frac = float(parts[1]) if len(parts) > 1 else 0.2
            seed = int(parts[2]) if len(parts) > 2 else 0
            if not 0 < frac < 1 or len(parts) > 3:
                raise ValueError
        else:
            raise ValueError
    except ValueError:
        raise InputError(f"bad split {spec!r}: use is_test, random:FRAC:SEED (e.g. random:0.2:0) "
                         "or group:COLUMN[:FRAC[:SEED]] (e.g. group:country)") from None
    ent = store.entities
    if col not in ent.columns:
        raise InputError(f"split {spec!r}: the entity table has no column {col!r} "
                         f"(group columns: {list(store.group_columns)})")
    values = ent[col].astype(str).to_numpy()[:n]
    groups = np.unique(values)
    if len(groups) < 2:
        raise InputError(f"split {spec!r}: column {col!r} has only {len(groups)} distinct value(s)")
    rng = np.random.default_rng(seed)
    n_test = min(len(groups) - 1, max(1, int(round(frac * len(groups)))))
    held = set(rng.permutation(groups)[:n_test].tolist())
    return np.array([v in held for v in values], dtype=bool)


def select_layers(store, layers=None) -> list[int]:
    """Hidden-state indices to work on: ``layers`` (an int or a list; a negative number counts
    from the last stored layer) or every layer the store holds (None).

    "layer" is always the hidden-state index (0 = embeddings, l = output of block l), never a
    position in the store's arrays. InputError for a layer the store does not hold (the message
    lists those it holds), a layer named twice, or an empty selection.
    """
    held = [int(x) for x in store.layers]
    if layers is None:
        return held
    items = [layers] if isinstance(layers, (int, np.integer)) else list(layers)
    out = []
    for x in items:
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
            raise InputError(f"a layer is a hidden-state index (an int), got {x!r}")
        x = int(x)
        if x < 0 and -len(held) <= x:
            x = held[x]
        if x not in held:
            contiguous = held == list(range(held[0], held[-1] + 1))
            span = f"{held[0]}..{held[-1]}" if contiguous and len(held) > 2 else str(held)
            raise InputError(f"{store.path}: layer {x} is not in this store; it holds "
                             f"hidden-state layers {span} (0 = embeddings, l = output of block l)")
        out.append(x)
    dup = sorted({x for x in out if out.count(x) > 1})
    if dup:
        raise InputError(f"layer(s) {dup} given more than once in layers={items}")
    if not out:
        raise InputError("layers=[] selects no layer")
    return out
