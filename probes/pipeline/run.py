"""The orchestration of ``actstore run``: plan, extract, fit, classify, neurons, experiments,
report."""
from __future__ import annotations

import re
import time
from dataclasses import replace
from pathlib import Path

from actstore.io import write_atomic
from actstore.models import DEFAULT_MODEL, load_model
from actstore.models.loading import RANDOM_PREFIX, embedded_name
from actstore.prompts import get_prompt
from probes.errors import PipelineError
from probes.pipeline.config import CLASSIFY_COLUMNS, DEMO_DATASETS, RECIPES, PipelineConfig
from probes.pipeline.model_size import MODEL_SIZE_PNG, plot_model_size
from probes.pipeline.plan import Job, experiment_list, parse_list, plan_sections
from probes.pipeline.report_md import plot_all_layers, plot_controls, report_markdown
from probes.pipeline.steps import (
    ClassifyStep,
    FitStep,
    NeuronStep,
    experiment_steps,
    extract_job,
    run_step,
)

__all__ = ["run_pipeline", "run_paper", "run", "model_list", "model_slug"]


def run_pipeline(out, *, model=None, datasets=DEMO_DATASETS, prompt="empty", prompts=None,
                 limit=None, recipe="probes", experiments=None, batch_size=None, device="auto",
                 backend="auto", cv="loo", cs=PipelineConfig.cs,
                 classify_every=PipelineConfig.classify_every, drop_invalid=False, progress=True,
                 controls=None, models=None, log=print) -> Path:
    """Run ``recipe`` for every dataset and write ``out/report.md``; return its path.

    Parameters
    ----------
    out : str or Path
        Output directory (created; an existing one is resumed).
    model : str, optional
        Model name or path (default: the embedded SmolLM2).
    models : list or comma string, optional
        The model-size comparison instead of ``model``: the first model runs every step, the
        others are extracted and fitted per dataset under ``out/models/NAME/``; the report
        adds a "Model size" section.
    datasets : list of str
        Names or CSV paths understood by :func:`actstore.datasets.load_dataset`.
    prompts : list or comma string, optional
        Prompt names (default ``[prompt]``; "empty" = BOS + entity, the paper's main setting).
        The first is the main prompt and must apply to every dataset; the others are
        extracted for the datasets they apply to.
    limit : int, optional
        First N rows of each dataset (built-ins and paper CSVs are shuffled; the test split is
        kept within those rows).
    recipe : {"probes", "paper"}
        extract -> fit --all-layers -> report; "paper" adds the neuron step and experiments.
    experiments : str or list, optional
        Paper recipe: names from EXPERIMENTS, "all" (default) or "none"; each runs on the
        main prompt's store at its best LOO layer, prompts on all prompts' stores.
    batch_size, device, backend, cv, cs, classify_every, drop_invalid, progress, controls
        As :class:`PipelineConfig` (``cs``, ``classify_every``: the C grid and the layer stride
        of the paper recipe's classification step; ``controls``: "random" or "none", default
        random for the paper recipe).
    log : callable
        Where progress lines go (default print).

    Returns
    -------
    Path
        ``out/report.md``.
    """
    cfg = PipelineConfig(
        out=str(out), recipe=recipe, model=model, datasets=",".join(map(str, datasets)),
        prompts=prompts if isinstance(prompts, str) else ",".join(prompts or [prompt]),
        limit=limit, experiments=(experiments if experiments is None or isinstance(
            experiments, str) else ",".join(experiments)),
        batch_size=batch_size, drop_invalid=drop_invalid, device=device, backend=backend,
        cv=cv, cs=cs, classify_every=classify_every, progress=progress, controls=controls,
        models=models if models is None or isinstance(models, str) else ",".join(models))
    return run(cfg, log=log)


def model_list(cfg: PipelineConfig) -> list[str]:
    """The models of a run: ``--models`` (embedded abbreviations expanded) or ``--model``.

    Parameters
    ----------
    cfg : PipelineConfig

    Returns
    -------
    list of str
        The first runs every step.

    Raises
    ------
    PipelineError
        Both options given, a model listed twice, or two models whose output folders clash.
    """
    if cfg.models is None:
        return [cfg.model or DEFAULT_MODEL]
    if cfg.model is not None:
        raise PipelineError("give --model (one model) or --models (a comparison), not both")
    names = parse_list([embedded_name(m.strip()) for m in cfg.models.split(",")], "model")
    slugs = [model_slug(m) for m in names]
    clash = sorted({a for a, s in zip(names, slugs) if slugs.count(s) > 1})
    if clash:
        raise PipelineError(f"models {', '.join(clash)} would share the folder OUT/models/"
                            f"{model_slug(clash[0])}: give one of them by another path")
    return names


def model_slug(name: str) -> str:
    """The folder name of a compared model under OUT/models/: a local directory's last
    component, else the name with every character outside [A-Za-z0-9._-] made '_'."""
    local = Path(name).expanduser()
    base = local.name if local.exists() else name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("_") or "model"


def run(cfg: PipelineConfig, log=print) -> Path:
    """:func:`run_pipeline` for a :class:`PipelineConfig` (what ``actstore run`` calls)."""
    if cfg.recipe not in RECIPES:
        raise PipelineError(f"unknown recipe {cfg.recipe!r}; choose from {', '.join(RECIPES)}")
    steps = RECIPES[cfg.recipe]
    exps = experiment_list(cfg.experiments, cfg.recipe)
    prompts = parse_list(cfg.prompts, "prompt")
    for p in prompts:
        get_prompt(p)          # unknown names fail before any work, listing the valid ones
    datasets = parse_list(cfg.datasets, "dataset") if cfg.datasets else []
    if not datasets:
        raise PipelineError("no datasets given")
    if cfg.classify_every < 1:
        raise PipelineError(f"--classify-every must be at least 1, got {cfg.classify_every}")
    if cfg.limit is not None and cfg.limit < 3:
        raise PipelineError("--limit must be at least 3 rows")
    models = model_list(cfg)
    if cfg.models is not None:
        cfg = replace(cfg, model=models[0])
    out = Path(cfg.out)
    t0 = time.perf_counter()
    sections = plan_sections(out, datasets, prompts, cfg.limit, cfg.drop_invalid)
    out.mkdir(parents=True, exist_ok=True)
    model = _model_loader(cfg, log)
    jobs = [j for s in sections for j in s.jobs]
    log(f"actstore run {cfg.recipe}: {len(sections)} dataset(s), {len(jobs)} store(s), steps "
        f"{' -> '.join(steps)}" + (f"; experiments {', '.join(exps)}" if exps else ""))
    for n, job in enumerate(jobs, 1):
        extract_job(job, f"{n}/{len(jobs)}", model, cfg, log)
        run_step(FitStep(job, f"{n}/{len(jobs)}", cfg, log), log)
    random_init_controls(sections, out, cfg, log)
    compare_models(sections, out, cfg, models, log)
    places = [s for s in sections if s.ds.kind in CLASSIFY_COLUMNS] if "classify" in steps else []
    for n, sec in enumerate(places, 1):
        run_step(ClassifyStep(sec, out, f"{n}/{len(places)}", cfg, log), log)
    for n, sec in enumerate(sections, 1):
        counter = f"{n}/{len(sections)}"
        if "neurons" in steps:
            run_step(NeuronStep(sec, out, counter, model, cfg, log), log)
    for n, sec in enumerate(sections, 1):
        counter = f"{n}/{len(sections)}"
        if "experiments" in steps and exps:
            for step in experiment_steps(sec, out, exps, counter, cfg, log,
                                         all_experiments=cfg.experiments in (None, "all")):
                run_step(step, log)
    log("[report] writing " + str(out / "report.md"))
    plot_all_layers(sections, out / "r2_by_layer.png")
    for sec in sections:
        (out / "controls").mkdir(exist_ok=True)
        plot_controls(sec, out / "controls" / f"{sec.ds.name}.png")
    plot_model_size(sections, out / MODEL_SIZE_PNG)
    report = out / "report.md"
    write_atomic(report, report_markdown(sections, cfg.model, prompts, cfg.limit, cfg.recipe,
                                         time.perf_counter() - t0, out))
    return report


def _model_loader(cfg: PipelineConfig, log):
    """A function that loads the model on first use (a run whose steps are all current never
    loads it)."""
    loaded = []

    def get():
        if not loaded:
            log(f"loading model {cfg.model or 'smollm2-135m (embedded)'} ...")
            loaded.append(load_model(cfg.model, device=cfg.device))
        return loaded[0]
    return get


def _controls(cfg: PipelineConfig) -> str:
    return cfg.controls or ("random" if cfg.recipe == "paper" else "none")


def model_jobs(sections, where: Path, name: str, cfg: PipelineConfig, log, *,
               control: str | None = None, model: str | None = None) -> list[Job]:
    """Every dataset's main prompt extracted with the model ``name`` into ``where/stores/`` and
    probed the same way into ``where/probes/``; the jobs, one per section, in order.

    Parameters
    ----------
    sections : list of Section
    where : Path
        The folder of this model's stores and probes.
    name : str
        The model (as :func:`actstore.models.load_model` takes it), loaded on first use.
    cfg : PipelineConfig
    log : callable
    control, model : str, optional
        What the jobs are: "random-init" for a control; the compared model's name.

    Returns
    -------
    list of Job
    """
    cfg_m = replace(cfg, model=name, models=None)
    loader = _model_loader(cfg_m, log)
    tag = " ".join(t for t in (control, model) if t)
    jobs = []
    for n, sec in enumerate(sections, 1):
        main = sec.main
        job = Job(main.ds, main.prompt, True, where / "stores" / main.store_path.name,
                  where / "probes" / main.probe_dir.name, control=control, model=model)
        extract_job(job, f"{tag} {n}/{len(sections)}", loader, cfg_m, log)
        run_step(FitStep(job, f"{tag} {n}/{len(sections)}", cfg_m, log), log)
        jobs.append(job)
    return jobs


def random_init_controls(sections, out: Path, cfg: PipelineConfig, log) -> None:
    """The random-init control: every dataset's main prompt extracted with ``random:MODEL``
    (:func:`actstore.models.load_model`) into OUT/controls/random-init/stores/ and probed the
    same way into OUT/controls/random-init/probes/ (``--controls random``, the paper recipe's
    default: one more extraction and fit per dataset, docs/paper-run.md)."""
    for sec, job in zip(sections, _random_init_jobs(sections, out, cfg.model or DEFAULT_MODEL,
                                                    cfg, log)):
        sec.random_init = job


def _random_init_jobs(sections, where: Path, base: str, cfg: PipelineConfig, log,
                      model: str | None = None) -> list[Job]:
    """``random:BASE`` extracted and probed per dataset into WHERE/controls/random-init/, or
    nothing when the run has no random-init control or BASE is random-init itself."""
    if _controls(cfg) != "random" or base.startswith(RANDOM_PREFIX):
        return []
    return model_jobs(sections, where / "controls" / "random-init", RANDOM_PREFIX + base, cfg,
                      log, control="random-init", model=model)


def compare_models(sections, out: Path, cfg: PipelineConfig, models: list[str], log) -> None:
    """The model-size comparison (``--models``): the first model's main jobs and random-init
    controls are the run's own; every other model is extracted and probed per dataset (main
    prompt) into OUT/models/NAME/, with its random-init control in
    OUT/models/NAME/controls/random-init/ when the run has that control."""
    if len(models) < 2:
        return
    for sec in sections:
        sec.models[models[0]] = sec.main
        if sec.random_init is not None:
            sec.random_models[models[0]] = sec.random_init
    for name in models[1:]:
        where = out / "models" / model_slug(name)
        for sec, job in zip(sections, model_jobs(sections, where, name, cfg, log, model=name)):
            sec.models[name] = job
        for sec, job in zip(sections, _random_init_jobs(sections, where, name, cfg, log,
                                                        model=name)):
            sec.random_models[name] = job


def run_paper(out, **kw) -> Path:
    """:func:`run_pipeline` with the paper recipe (neurons and experiments included)."""
    return run_pipeline(out, recipe="paper", **kw)

