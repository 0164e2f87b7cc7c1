"""The resumable steps of ``actstore run`` after extraction: fit, neurons, experiments.

Every step is a :class:`Step`: it names its inputs (the options that shape its outputs plus
the identity of the stores it reads), writes its outputs, and leaves ONE record beside them,
written atomically: ``{"inputs", "outputs", "finished", "status", ["note"]}``. A later run
skips a step whose record has the same inputs and whose outputs still exist; a step that
cannot run on a dataset records ``status: "skipped"`` with the reason, which the report shows.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Protocol

from actstore.extract import extract
from actstore.store import store_identity
from probes import experiments as ex
from probes.errors import ExperimentError, NeuronReportError
from probes.experiments.base import RunContext
from probes.experiments.common import best_loo_index
from probes.experiments.registry import EXPERIMENTS
from probes.fit import ARRAYS_FILE, RESULTS_FILE, fit_all_layers
from probes.neurons import NEURONS_JSON, neuron_report
from probes.pipeline.plan import NEURON_TOP, Job, Section
from probes.report import format_neuron_table, format_table, write_strict_json

__all__ = ["Step", "run_step", "extract_job", "FitStep", "NeuronStep", "ExperimentStep",
           "experiment_steps", "SOURCE_FILE", "REPORT_NEURONS"]

SOURCE_FILE = "source.json"   # the record of the fit and neuron steps (EXP.source.json for EXP)
REPORT_NEURONS = 5            # top neurons per target the log and the report show


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
                  device=cfg.device, progress=cfg.progress)
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
        return {"store": store_record(self.job.store), "cv": self.cfg.cv,
                "backend": self.cfg.backend}

    def run(self) -> list[str]:
        self.log(f"{self.label}: fitting ridge probes on {self.job.store.n_layers} layers")
        fit_all_layers(self.job.store, cv=self.cfg.cv, backend=self.cfg.backend,
                       out=self.job.probe_dir, progress=self.cfg.progress)
        return [RESULTS_FILE, ARRAYS_FILE]

    def load(self, record: dict) -> None:
        self.job.result = json.loads((self.job.probe_dir / RESULTS_FILE).read_text())
        self.log(format_table(self.job.result))


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
                "backend": self.cfg.backend, **self.plan.options}

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
