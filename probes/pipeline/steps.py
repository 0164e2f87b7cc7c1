"""The resumable steps of ``actstore run`` after extraction: fit, classify, neurons, experiments.

Every step is a :class:`Step`: it names its inputs (the options that shape its outputs plus
the identity of the stores it reads), writes its outputs, and leaves ONE record beside them,
written atomically: ``{"inputs", "outputs", "finished", "status", ["note"]}``. A later run
skips a step whose record has the same inputs and whose outputs still exist; a step that
cannot run on a dataset records ``status: "skipped"`` with the reason, which the report shows.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import numpy as np

from actstore.extract import extract
from actstore.store import store_identity
from probes import experiments as ex
from probes.classify.labels import encode_labels
from probes.errors import ExperimentError, NeuronReportError, ProbesError
from probes.experiments.base import RunContext
from probes.experiments.common import best_loo_index
from probes.experiments.registry import EXPERIMENTS
from probes.fit import ARRAYS_FILE, RESULTS_FILE, FitConfig, fit_all_layers
from probes.fit import classify as fc
from probes.inputs import parse_split
from probes.neurons import NEURONS_JSON, neuron_report
from probes.pipeline.config import CLASSIFY_COLUMNS, RECIPE_LAYERS
from probes.pipeline.plan import NEURON_TOP, Job, Section
from probes.report import (
    format_classify_table,
    format_neuron_table,
    format_table,
    write_strict_json,
)
from probes.ridge.alphas import DEFAULT_ALPHAS

__all__ = ["Step", "run_step", "extract_job", "FitStep", "ClassifyStep", "NeuronStep",
           "ExperimentStep", "experiment_steps", "SOURCE_FILE", "REPORT_NEURONS",
           "CLASSIFY_MAX_CLASSES", "CLASSIFY_FILES"]

SOURCE_FILE = "source.json"   # the record of the fit, classify and neuron steps (EXP.source.json)
REPORT_NEURONS = 5            # top neurons per target the log and the report show
CLASSIFY_MAX_CLASSES = 10     # the classify step keeps the most frequent classes, drops the rest
CLASSIFY_FILES = (fc.RESULTS_FILE, fc.ARRAYS_FILE, "accuracy_by_layer.png",
                  "confusion_best_layer.png")


class Skip(Exception):
    """Raised by a step that cannot run on this dataset; the message is recorded and shown."""


class Step(Protocol):
    """One resumable step: a label for the log, its record path, its inputs, how to run it
    (returning the output file names, relative to the record's folder) and how to read the
    finished outputs back for the report."""

    label: str
    record: Path

    def inputs(self) -> dict: ...

    def run(self) -> list[str]: ...

    def load(self, record: dict) -> None: ...


def _jsonable(obj):
    return json.loads(json.dumps(obj))


def _current(step: Step) -> dict | None:
    """The step's saved record when it was made from the same inputs and its outputs exist."""
    try:
        rec = json.loads(step.record.read_text())
    except (OSError, ValueError):
        return None
    if rec.get("inputs") != _jsonable(step.inputs()):
        return None
    if not all((step.record.parent / f).exists() for f in rec.get("outputs", [])):
        return None
    return rec


def run_step(step: Step, log) -> dict:
    """Run ``step`` unless its record says it is current; record it; load its outputs."""
    rec = _current(step)
    if rec is not None:
        log(f"{step.label}: up to date ({step.record.parent})")
    else:
        rec = {"inputs": _jsonable(step.inputs()), "outputs": [], "status": "done"}
        try:
            rec["outputs"] = [Path(p).name for p in step.run()]
        except Skip as exc:
            rec.update(status="skipped", note=str(exc))
            log(f"{step.label}: skipped: {exc}")
        rec["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_strict_json(step.record, rec, mkdir=True)   # a record is whole or absent
    step.load(rec)
    return rec


def store_record(store) -> dict:
    """How a step's record names a store: its path and its identity."""
    return {"path": str(store.path), **store_identity(store)}


def extract_job(job: Job, counter: str, model, cfg, log) -> None:
    """Extract (or resume) one job's store. A finished store made the same way is reused; one
    made with another model, prompt, dataset or limit is refused by extract() with the
    differences."""
    ds = job.ds
    job.store_path.parent.mkdir(parents=True, exist_ok=True)
    log(f"[extract {counter}] {job.label}: {len(ds)} rows ({ds.kind}, prompt {job.prompt!r}) "
        f"-> {job.store_path}")
    res = extract(model(), ds, job.prompt, job.store_path, batch_size=cfg.batch_size,
                  device=cfg.device, progress=cfg.progress, layers=RECIPE_LAYERS[cfg.recipe])
    log(f"[extract {counter}] {job.label}: " + ("store complete, nothing to extract"
                                               if res.rows == 0 else res.summary()))
    job.store = res.store


class FitStep:
    """``fastprobe fit --all-layers`` of one job's store into its probe directory."""

    def __init__(self, job: Job, counter: str, cfg, log):
        self.job, self.cfg, self.log = job, cfg, log
        self.label = f"[fit {counter}] {job.label}"
        self.record = job.probe_dir / SOURCE_FILE

    def inputs(self) -> dict:
        # the grid is recorded so that a release with another default refits, not reuses
        return {"store": store_record(self.job.store), "cv": self.cfg.cv,
                "alphas": DEFAULT_ALPHAS, "backend": self.cfg.backend,
                "control": "shuffled targets, seed 0"}

    def run(self) -> list[str]:
        self.log(f"{self.label}: fitting ridge probes on {self.job.store.n_layers} layers")
        fit_all_layers(self.job.store, cv=self.cfg.cv, alphas=DEFAULT_ALPHAS,
                       backend=self.cfg.backend, out=self.job.probe_dir,
                       progress=self.cfg.progress)
        return [RESULTS_FILE, ARRAYS_FILE]

    def load(self, record: dict) -> None:
        self.job.result = json.loads((self.job.probe_dir / RESULTS_FILE).read_text())
        self.log(format_table(self.job.result))


class ClassifyStep:
    """``fastprobe fit --task classify`` of a place dataset's class column (country, state_name,
    borough_name) on its main store, every ``classify_every``-th layer and the last: the
    :data:`CLASSIFY_MAX_CLASSES` most frequent classes (fewer when one of them has under two rows
    per fold on the train rows), the rows of the rarer classes dropped (``--max-classes N
    --drop-rest``); the logistic solver in float32 (gradient tolerance 1e-5)."""

    def __init__(self, sec: Section, out: Path, counter: str, cfg, log):
        self.sec, self.cfg, self.log = sec, cfg, log
        self.target = CLASSIFY_COLUMNS[sec.ds.kind]
        self.dir = out / "classify" / sec.ds.name
        self.label = f"[classify {counter}] {sec.ds.name} {self.target}"
        self.record = self.dir / SOURCE_FILE

    def inputs(self) -> dict:
        return {"store": store_record(self.sec.main.store), "target": self.target,
                "max_classes": CLASSIFY_MAX_CLASSES, "rest": "drop", "Cs": self.cfg.cs,
                "cv": self.cfg.cv, "layers": self.layers(), "precision": "float32",
                "control": "shuffled labels, seed 0"}

    def layers(self) -> list[int]:
        every = self.sec.main.store.layers
        return sorted(set(every[::self.cfg.classify_every]) | {every[-1]})

    def run(self) -> list[str]:
        store = self.sec.main.store
        if self.target not in store.entity_kinds:
            raise Skip(f"the store has no column {self.target!r}")
        config = FitConfig(task="classify", targets=(self.target,), cs=self.cfg.cs,
                           cv=self.cfg.cv, drop_rest=True, layers=tuple(self.layers()),
                           precision="float32")
        folds = config.cv if isinstance(config.cv, int) else fc.DEFAULT_FOLDS
        k = top_classes(store, self.target, 2 * folds, CLASSIFY_MAX_CLASSES)
        self.log(f"{self.label}: logistic, mass-mean and LDA probes of the {k} most frequent "
                 f"classes on {len(self.layers())} layers")
        try:
            res = fc.fit_classifier(store, replace(config, max_classes=k), self.target,
                                    out=self.dir)
        except ProbesError as exc:
            raise Skip(str(exc)) from None
        self.log(format_classify_table(res.doc))
        return list(CLASSIFY_FILES)

    def load(self, record: dict) -> None:
        if record.get("status") == "done":
            self.sec.classify = json.loads((self.dir / fc.RESULTS_FILE).read_text())
        else:
            self.sec.classify_note = record.get("note")


def top_classes(store, target: str, min_train: int, most: int) -> int:
    """How many of the most frequent classes of ``target`` to keep: at most ``most``, and as
    many as have each at least ``min_train`` rows in the store's train split (ranked as
    :func:`probes.classify.labels.encode_labels` ranks them); Skip when fewer than two."""
    n = int(store.rows_done)
    values = store.entities[target].to_numpy()[:n]
    train = ~parse_split("is_test", store, n)
    for k in range(min(most, len(set(values))), 1, -1):
        labels = encode_labels(values, k, "drop")
        counts = np.bincount(labels.codes[train & labels.kept], minlength=len(labels.classes))
        if counts.min() >= min_train:
            return k
    raise Skip(f"fewer than two {target} classes with at least {min_train} train rows "
               "(two per fold): more rows (--limit) or fewer folds")


class NeuronStep:
    """``fastprobe neurons`` on a dataset's main store, with the probe cosines of its fit."""

    def __init__(self, sec: Section, out: Path, counter: str, model, cfg, log):
        self.sec, self.model, self.cfg, self.log = sec, model, cfg, log
        self.dir = out / "neurons" / sec.ds.name
        self.label = f"[neurons {counter}] {sec.ds.name}"
        self.record = self.dir / SOURCE_FILE
        store = sec.main.store
        self.method = "stored" if store.d_mlp is not None else "projection"

    def inputs(self) -> dict:
        fit = json.loads((self.sec.main.probe_dir / SOURCE_FILE).read_text())["inputs"]
        return {"store": store_record(self.sec.main.store), "method": self.method,
                "top": NEURON_TOP, "probe": fit}

    def run(self) -> list[str]:
        store, cfg = self.sec.main.store, self.cfg
        self.log(f"{self.label}: correlating every MLP neuron of every layer with "
                 f"{', '.join(store.targets)} ({self.method}"
                 + (", the residual projected through each block's gate/up weights"
                    if self.method == "projection" else "") + ")")
        try:
            res = neuron_report(store, top=NEURON_TOP, method=self.method, model=self.model(),
                                probe_dir=self.sec.main.probe_dir, out=self.dir,
                                backend=cfg.backend if self.method == "stored" else "auto",
                                device=None if cfg.device == "auto" else cfg.device)
        except NeuronReportError as exc:
            raise Skip(str(exc)) from None
        self.log(format_neuron_table({**res, "top_neurons": {
            t: v[:REPORT_NEURONS] for t, v in res["top_neurons"].items()}}))
        return [NEURONS_JSON] + [f"neuron_{t}.png" for t in res["targets"]]

    def load(self, record: dict) -> None:
        if record.get("status") == "done":
            self.sec.neurons = json.loads((self.dir / NEURONS_JSON).read_text())
        else:
            self.sec.neurons_note = record.get("note")


class ExperimentStep:
    """One of the paper's experiments on a dataset's stores."""

    def __init__(self, sec: Section, key: str, plan, edir: Path, counter: str, cfg, log):
        self.sec, self.key, self.plan = sec, key, plan
        self.cfg, self.log, self.edir = cfg, log, edir
        self.label = f"[experiments {counter}] {sec.ds.name} {key}"
        self.record = edir / f"{key}.source.json"

    def inputs(self) -> dict:
        stores = self.plan.stores or (self.sec.main.store,)
        return {"experiment": self.key, "stores": [store_record(s) for s in stores],
                "alphas": DEFAULT_ALPHAS, "backend": self.cfg.backend, **self.plan.options}

    def run(self) -> list[str]:
        if self.plan.run is None:
            raise Skip(self.plan.note)
        self.log(f"{self.label} ...")
        try:
            result = self.plan.run()
        except ExperimentError as exc:
            raise Skip(str(exc)) from None
        files = ex.write_experiment(result, self.edir)
        self.log(ex.format_experiment(result))
        return files

    def load(self, record: dict) -> None:
        if record.get("status") == "done":
            files = [self.edir / f for f in record["outputs"]]
            js = next(f for f in files if f.suffix == ".json")
            self.sec.experiments[self.key] = (json.loads(js.read_text()), None, files)
        else:
            self.sec.experiments[self.key] = (None, record.get("note"), [])


def experiment_steps(sec: Section, out: Path, exps, counter: str, cfg, log,
                     all_experiments=False) -> list[ExperimentStep]:
    """The experiment steps of one dataset, each planned by its registry record; the
    single-store ones run at the main fit's best LOO layer. With ``all_experiments`` (the
    default list, not named by the user), a dataset with one prompt plans no prompts
    comparison rather than a skip note."""
    res = sec.main.result
    ctx = RunContext(store=sec.main.store, prompt_stores={j.prompt: j.store for j in sec.jobs},
                     skipped_prompts=tuple(sec.skipped_prompts), dataset_kind=sec.ds.kind,
                     layer=int(res["layers"][best_loo_index(res["layers"])]["layer"]),
                     backend=cfg.backend, device=None if cfg.device == "auto" else cfg.device,
                     all_experiments=all_experiments)
    edir = out / "experiments" / sec.ds.name
    steps = []
    for key in exps:
        plan = EXPERIMENTS[key].plan(ctx)
        if plan is not None:
            steps.append(ExperimentStep(sec, key, plan, edir, counter, cfg, log))
    return steps
