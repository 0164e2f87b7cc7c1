"""Classification probes on every layer of a store (issue 15): ``fastprobe fit`` with a class
target (the store's ``target_kinds``, or a text or boolean column: ``--target country``) or
``--task classify``. The labels are encoded (``--max-classes`` pools or drops the rarest),
the rows split as for ridge, and three probes are fitted on the train rows of every layer
(read from the ``--site`` array): L2 logistic regression with C chosen per layer by
stratified k-fold (:func:`probes.classify.select.select_c`), the difference-of-means probe, and
shrinkage LDA with the shrinkage chosen on the same folds. Each is scored on the train and the
test rows (accuracy, balanced accuracy, macro-F1, AUROC, log loss). The layers are read and
fitted in chunks that fit ``--memory-gb`` (each layer's problems are solved to the same
tolerance whatever shares their batch, so the chunks change the memory, not the fit).
:func:`write_classify` writes the files."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from actstore.io import write_atomic
from actstore.store import store_identity
from probes import report
from probes.classify.closed_form import LinearProbe, class_stats, lda_grid, mass_mean
from probes.classify.labels import Labels, encode_labels, stratified_folds
from probes.classify.logistic import predict_proba
from probes.classify.metrics import evaluate_classification
from probes.classify.select import LogisticCV, select_c
from probes.errors import FitError
from probes.fit import controls
from probes.fit.config import classify_device
from probes.inputs import class_targets, fit_view, parse_split, select_layers
from probes.ridge.alphas import parse_alphas

__all__ = ["CLASS_KINDS", "DEFAULT_CS", "SHRINKAGES", "classify_target", "fit_classifier",
           "ClassifyResult", "write_classify", "RESULTS_FILE", "ARRAYS_FILE"]

CLASS_KINDS = ("str", "bool")       # entity column kinds fitted as classes
DEFAULT_CS = "1e-4:1e4:17"          # the C grid (LO:HI:N log-spaced)
SHRINKAGES = (0.001, 0.01, 0.03, 0.1, 0.3, 0.6, 0.9)   # LDA shrinkage grid
DEFAULT_FOLDS = 5                   # stratified folds when --cv is left at loo
RESULTS_FILE, ARRAYS_FILE = "results.json", "classify.npz"


@dataclass
class ClassifyResult:
    """A classification fit: ``doc`` (what results.json holds) and ``arrays`` (classify.npz)."""
    doc: dict
    arrays: dict

    @property
    def best_layer(self) -> int:
        return int(self.doc["best_layer"])


def classify_target(store, config) -> str | None:
    """The target column to classify, or None for a ridge fit: ``task="classify"``, or
    ``task="auto"`` and one target that the store records as a class target (format version 2
    ``target_kinds``: text, boolean or integer-coded categories) or that is a text or boolean
    entity column. Without ``--target``, a store whose only target is a class target
    classifies it."""
    if config.task == "regress":
        return None
    names = config.targets
    names = [t.strip() for t in names.split(",") if t.strip()] if isinstance(names, str) \
        else list(names or ())
    kinds = store.entity_kinds
    classes = class_targets(store)
    if not names and len(classes) == 1 and len(store.targets) == 1:
        names = classes                # the store's one target, recorded as a class target
    if config.task == "auto":
        if len(names) != 1 or (names[0] not in classes and kinds.get(names[0]) not in CLASS_KINDS):
            return None
    if len(names) != 1:
        raise FitError("--task classify fits one target: name it with --target COLUMN (e.g. "
                       f"--target country; class columns: {_class_columns(kinds, classes)})")
    name = names[0]
    if name not in kinds:
        raise FitError(f"{store.path}: no entity column {name!r} to classify (class columns: "
                       f"{_class_columns(kinds, classes)})")
    return name


def _class_columns(kinds: dict, classes: list[str]) -> list[str]:
    """The class targets, then the other text and boolean columns."""
    return classes + [c for c, k in kinds.items() if k in CLASS_KINDS and c not in classes]


def _labels(store, target: str, config, n: int) -> Labels:
    values = store.entities[target].to_numpy()[:n]
    return encode_labels(values, config.max_classes, "drop" if config.drop_rest else "other")


def _rows(store, config, labels: Labels, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test row indices (kept rows only)."""
    is_test = parse_split(config.split, store, n)
    train = np.flatnonzero(labels.kept & ~is_test)
    test = np.flatnonzero(labels.kept & is_test)
    if train.size == 0:
        raise FitError(f"split {config.split!r} leaves no train rows")
    return train, test


def _read_layers(store, layers: list[int], train: np.ndarray, test: np.ndarray):
    """(L, rows, d) float32 activations of the train and of the test rows (each layer read
    once)."""
    x_tr = np.empty((len(layers), train.size, store.d_model), dtype=np.float32)
    x_te = np.empty((len(layers), test.size, store.d_model), dtype=np.float32)
    for i, layer in enumerate(layers):
        x = store.layer(layer)
        x_tr[i], x_te[i] = x[train], x[test]
    return x_tr, x_te


def _lda_by_folds(x: np.ndarray, codes: np.ndarray, k: int, folds: np.ndarray, stats):
    """Shrinkage per layer by stratified k-fold (held-out accuracy summed over folds, the first
    best in grid order), then LDA refitted on all train rows (``stats``) at each layer's
    shrinkage."""
    L = x.shape[0]
    score = np.zeros((L, len(SHRINKAGES)))
    for f in range(int(folds.max()) + 1):
        fit, held = folds != f, folds == f
        probes = lda_grid(class_stats(x[:, fit], codes[fit], k), SHRINKAGES)
        for j, probe in enumerate(probes):
            score[:, j] += (probe.predict(x[:, held]) == codes[held]).sum(-1)
    best = score.argmax(-1)
    every = lda_grid(stats, SHRINKAGES)
    coef = np.stack([every[b].coef[i] for i, b in enumerate(best)])
    intercept = np.stack([every[b].intercept[i] for i, b in enumerate(best)])
    probe = every[0]
    probe.coef, probe.intercept = coef, intercept
    return probe, np.asarray(SHRINKAGES)[best], score / codes.size


def _scores(labels: Labels, codes, probas: dict, kinds: dict) -> dict:
    """method -> metrics dict of one split (lists over layers)."""
    return {m: evaluate_classification(codes, p, labels.classes, kind=kinds[m])
            for m, p in probas.items()}


def _fit_probes(x_tr, y_tr, K: int, folds: np.ndarray, config) -> dict:
    """The three probes on the train rows: logistic (C by k-fold), mass-mean, LDA."""
    cs = parse_alphas(config.cs)
    logit = select_c(x_tr, y_tr, cs, folds=folds, n_classes=K,
                     class_weight=config.class_weight, dtype=config.precision,
                     device=classify_device(config))
    stats = class_stats(x_tr, y_tr, K)          # all train rows: mass-mean and the LDA refit
    lda, shrink, lda_cv = _lda_by_folds(x_tr, y_tr, K, folds, stats)
    return {"k": int(folds.max()) + 1, "Cs": cs, "logistic": logit,
            "mass_mean": mass_mean(stats), "lda": lda, "shrinkage": shrink, "lda_cv": lda_cv}


def _layer_chunks(layers: list[int], n_train: int, n_test: int, d: int, config) -> list:
    """Consecutive chunks of layers fitted at once within ``config.memory_bytes``
    (``--memory-gb``): per layer its float32 rows, the solver's two centred copies of the
    train rows, and about four d x d float64 blocks (the class statistics' Gram, LDA's
    eigendecomposition); at least one layer a chunk."""
    word = 8 if config.precision == "float64" else 4
    per_layer = (n_train + n_test) * d * 4 + 2 * n_train * d * word + 4 * d * d * 8
    size = max(1, int(config.memory_bytes // per_layer))
    return [layers[i:i + size] for i in range(0, len(layers), size)]


def _join(parts: list[dict]) -> dict:
    """The fits, control and outputs of consecutive chunks of layers as one."""
    if len(parts) == 1:
        return parts[0]
    fits = dict(parts[0]["fits"])
    fits["logistic"] = LogisticCV.concat([p["fits"]["logistic"] for p in parts])
    for name in ("mass_mean", "lda"):
        fits[name] = LinearProbe.concat([p["fits"][name] for p in parts])
    for name in ("shrinkage", "lda_cv"):
        fits[name] = np.concatenate([p["fits"][name] for p in parts])
    control = (None if parts[0]["control"] is None else
               np.concatenate([p["control"] for p in parts]))
    outputs = {split: {m: np.concatenate([p[split][m] for p in parts]) for m in parts[0][split]}
               for split in ("p_tr", "p_te")}
    return {"fits": fits, "control": control, **outputs}


def _outputs(fits: dict, x) -> tuple[dict, dict]:
    """(method -> (L, n, K) probabilities or scores, method -> "proba" | "scores")."""
    logit = fits["logistic"]
    out = {"logistic": predict_proba(x, logit.coef, logit.intercept),
           "mass_mean": fits["mass_mean"].decision_function(x),
           "lda": fits["lda"].predict_proba(x)}
    return out, {"logistic": "proba", "mass_mean": "scores", "lda": "proba"}


def fit_classifier(store, config, target: str, out=None) -> ClassifyResult:
    """Fit the classification probes of ``target`` on every selected layer of ``store``.

    Parameters
    ----------
    store : ActivationStore
    config : FitConfig
        Uses layers, site (the array read), split, cv (an int K: stratified K-fold; "loo": 5
        folds), cs (the C grid), class_weight, max_classes, drop_rest and precision (of the
        logistic solver).
    target : str
        A class target, or a text or boolean entity column (:func:`classify_target`).
    out : path, optional
        Write results.json, classify.npz and the plots there
        (:func:`probes.fit.classify_files.write_classify`).

    Returns
    -------
    ClassifyResult

    Raises
    ------
    probes.errors.ProbesError
        Missing labels, a class with fewer train rows than folds, one class only, no train
        rows, a site the store lacks, a token-level store: one-line messages saying what to
        do (--max-classes, --cv, --site, store.iter_batches).
    """
    t0 = time.perf_counter()
    if getattr(config, "row_norm", "none") != "none":
        raise FitError(f"--row-norm {config.row_norm} applies to ridge probes; the "
                       "classification probes read the stored rows as they are (leave it out, "
                       "or fit a regression target)")
    store = fit_view(store, config.site)        # the site's array; refuses a token-level store
    n = store.rows_done
    labels = _labels(store, target, config, n)
    train, test = _rows(store, config, labels, n)
    layers = select_layers(store, config.layers)
    K = len(labels.classes)
    y_tr, y_te = labels.codes[train], labels.codes[test]
    folds = stratified_folds(y_tr, config.cv if isinstance(config.cv, int) else DEFAULT_FOLDS)
    parts = []
    chunks = _layer_chunks(layers, train.size, test.size, store.d_model, config)
    with tqdm(total=len(layers), unit="layer", desc="fastprobe classify", leave=False,
              disable=not getattr(config, "progress", False), dynamic_ncols=True) as bar:
        for chunk in chunks:                    # each chunk's rows freed before the next read
            x_tr, x_te = _read_layers(store, chunk, train, test)
            fits = _fit_probes(x_tr, y_tr, K, folds, config)
            control = controls.classify_control(fits["logistic"], x_tr, y_tr, x_te, y_te, K,
                                                config)
            p_tr, kinds = _outputs(fits, x_tr)
            p_te, _ = _outputs(fits, x_te) if test.size else ({}, kinds)
            parts.append({"fits": fits, "control": control, "p_tr": p_tr, "p_te": p_te})
            del x_tr, x_te
            bar.update(len(chunk))
    joined = _join(parts)
    fits, control, p_tr, p_te = (joined[k] for k in ("fits", "control", "p_tr", "p_te"))
    scores = {"train": _scores(labels, y_tr, p_tr, kinds),
              "test": _scores(labels, y_te, p_te, kinds) if test.size else {}}
    doc = _doc(store, config, target, labels, layers, fits, scores, train, test)
    doc["control"] = controls.classify_block(control, doc, config.control_seed)
    doc["seconds"] = round(time.perf_counter() - t0, 3)
    arrays = _arrays(fits, labels, layers, train, test, p_te, n)
    result = ClassifyResult(doc, arrays)
    if out is not None:
        write_classify(result, out)
    return result


def _per_layer(scores: dict, method: str, j: int) -> dict:
    """One layer's metrics of one method (confusion matrices stay at the top level)."""
    s = scores.get(method)
    if not s:
        return {}
    keep = ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "log_loss")
    return {k: (s[k][j] if isinstance(s[k], list) else s[k]) for k in keep}


def _doc(store, config, target, labels, layers, fits, scores, train, test) -> dict:
    logit = fits["logistic"]
    rows = []
    for j, layer in enumerate(layers):
        rows.append({
            "layer": int(layer), "position": store.layers.index(layer),
            "logistic": {"C": float(logit.C[j]), "cv_score": float(logit.scores[j].max()),
                         "converged": bool(logit.converged[j]),
                         "train": _per_layer(scores["train"], "logistic", j),
                         "test": _per_layer(scores["test"], "logistic", j)},
            "mass_mean": {"train": _per_layer(scores["train"], "mass_mean", j),
                          "test": _per_layer(scores["test"], "mass_mean", j)},
            "lda": {"shrinkage": float(fits["shrinkage"][j]),
                    "cv_score": float(fits["lda_cv"][j].max()),
                    "train": _per_layer(scores["train"], "lda", j),
                    "test": _per_layer(scores["test"], "lda", j)}})
    split = "test" if test.size else "train"
    acc = [r["logistic"][split]["accuracy"] for r in rows]
    best = int(np.argmax(acc))
    cm = scores[split]["logistic"]["confusion_matrix"]
    counts = [np.bincount(labels.codes[r], minlength=len(labels.classes)).tolist()
              for r in (train, test)]
    return {
        "task": "classify", "target": target, "classes": labels.classes,
        "pooled": labels.pooled, "rest": "drop" if config.drop_rest else "other",
        "max_classes": config.max_classes, "n_rows": int(labels.kept.size),
        "n_dropped": int((~labels.kept).sum()), "n_train": int(train.size),
        "n_test": int(test.size), "class_counts": {"train": counts[0], "test": counts[1]},
        "split": config.split, "cv": fits["k"], "scoring": "accuracy",
        "Cs": [float(c) for c in fits["Cs"]], "shrinkages": list(SHRINKAGES),
        "class_weight": config.class_weight, "precision": config.precision,
        "site": store.site, "d_model": store.d_model,
        "layers": rows, "best_layer": int(layers[best]), "best_by": f"{split} accuracy "
        "(logistic)", "confusion_matrix": {"layer": int(layers[best]), "method": "logistic",
                                           "split": split, "rows": "true class",
                                           "columns": "predicted class", "matrix": cm[best]},
        "store": str(store.path), "store_identity": store_identity(store)}


def _arrays(fits, labels, layers, train, test, p_te, n) -> dict:
    """classify.npz: the probes' coefficients, the chosen C / shrinkage, the CV scores, and the
    predicted class of every test row per layer and method (-1 elsewhere)."""
    logit, lda, mm = fits["logistic"], fits["lda"], fits["mass_mean"]
    is_test = np.zeros(n, dtype=bool)
    is_test[test] = True
    out = {"layers": np.asarray(layers, np.int64), "codes": labels.codes, "is_test": is_test,
           "is_train": labels.kept & ~is_test, "Cs": np.asarray(fits["Cs"]),
           "logistic_coef": np.asarray(logit.coef, np.float32),
           "logistic_intercept": np.asarray(logit.intercept), "C": np.asarray(logit.C),
           "logistic_cv_scores": np.asarray(logit.scores),
           "lda_coef": lda.coef.astype(np.float32), "lda_intercept": lda.intercept,
           "shrinkage": np.asarray(fits["shrinkage"]), "lda_cv_scores": fits["lda_cv"],
           "mass_mean_coef": mm.coef.astype(np.float32), "mass_mean_intercept": mm.intercept}
    for method, p in p_te.items():
        pred = np.full((len(layers), n), -1, dtype=np.int64)
        pred[:, test] = (np.stack([np.zeros_like(p), p], -1) if p.ndim == 2 else p).argmax(-1)
        out[f"{method}_predicted"] = pred
    return out


def write_classify(result: ClassifyResult, out) -> None:
    """results.json (last, with the sha256 of classify.npz; strict JSON), classify.npz and the
    plots (:func:`probes.report.plot_classify`), written as one set into ``out``."""
    doc = dict(result.doc)
    with report.OutputSet(out, last=(RESULTS_FILE,)) as stage:
        got = []
        write_atomic(stage / ARRAYS_FILE, lambda f: np.savez(f, **result.arrays),
                     check=lambda tmp: got.append(report.sha256_of(tmp)))
        doc["arrays_sha256"] = {ARRAYS_FILE: got[0]}
        report.plot_classify(doc, stage)
        report.write_strict_json(stage / RESULTS_FILE, doc)
