"""What ``actstore run`` will do: one job per (dataset, prompt) store, grouped in one section
per dataset. Planning loads the datasets and
checks every name, so that bad input fails before any model is loaded."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from actstore.datasets import load_dataset
from actstore.errors import PromptError
from actstore.prompts import get_prompt
from probes.errors import PipelineError
from probes.pipeline.config import EXPERIMENTS, RECIPES

__all__ = ["Job", "Section", "parse_list", "experiment_list", "plan_sections"]

NEURON_TOP = 50              # kept in neurons.json; the report shows the first REPORT_NEURONS



@dataclass
class Job:
    """One (dataset, prompt) store and its probes."""
    ds: object
    prompt: str
    main: bool
    store_path: Path
    probe_dir: Path
    store: object = None
    result: dict | None = None
    control: str | None = None     # "random-init": the control model's store of the dataset
    model: str | None = None       # a compared model (--models) other than the first

    @property
    def label(self) -> str:
        name = self.ds.name if self.main else f"{self.ds.name}__{self.prompt}"
        name = name if self.model is None else f"{name} [{self.model}]"
        return name if self.control is None else f"{name} ({self.control})"


@dataclass
class Section:
    """Everything the report says about one dataset."""
    ds: object
    jobs: list = field(default_factory=list)
    skipped_prompts: list = field(default_factory=list)
    neurons: dict | None = None        # neurons.json
    neurons_note: str | None = None
    experiments: dict = field(default_factory=dict)   # key -> (json | None, note | None, files)
    classify: dict | None = None       # classify/NAME/results.json (place datasets)
    classify_note: str | None = None
    random_init: Job | None = None     # the random-init control's store and fit (paper recipe)
    # the model-size comparison (--models): model -> its main-prompt job (the first model's is
    # ``main``), and model -> its random-init control's job
    models: dict = field(default_factory=dict)
    random_models: dict = field(default_factory=dict)

    @property
    def main(self) -> Job:
        return self.jobs[0]


def parse_list(value, what: str, valid=None) -> list[str]:
    """Comma-separated (or list) option -> list, checked against ``valid``."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    items = [str(v).strip() for v in items if str(v).strip()]
    if not items:
        raise PipelineError(f"no {what} given")
    twice = sorted({i for i in items if items.count(i) > 1})
    if twice:
        raise PipelineError(f"{what} listed twice: {', '.join(twice)}")
    if valid is not None:
        bad = [i for i in items if i not in valid]
        if bad:
            raise PipelineError(f"unknown {what} {', '.join(map(repr, bad))}; choose from "
                                f"{', '.join(valid)}")
    return items


def experiment_list(experiments, recipe) -> list[str]:
    """The experiments a recipe runs: all by default, none for recipes without the step."""
    if "experiments" not in RECIPES[recipe]:
        if experiments is not None:
            raise PipelineError(f"--experiments needs the paper recipe (`actstore run paper "
                                f"...`); the {recipe!r} recipe runs no experiments")
        return []
    if experiments is None or experiments == "all":
        return list(EXPERIMENTS)
    if experiments == "none" or experiments == []:
        return []
    return parse_list(experiments, "experiment", EXPERIMENTS)


def plan_sections(out: Path, datasets, prompts: list[str], limit, drop_invalid) -> list[Section]:
    """One section per dataset with a job per prompt that applies to it (the first prompt,
    the main one, must apply to every dataset); stores and probes go under ``out``."""
    sections = []
    for spec in datasets:
        ds = load_dataset(spec, drop_invalid=drop_invalid)
        if limit is not None:
            ds = ds.head(limit)
        if any(s.ds.name == ds.name for s in sections):
            raise PipelineError(f"two datasets are named {ds.name!r} ({spec}); their stores would "
                                "share OUT/stores/NAME.zarr: rename one CSV")
        sec = Section(ds)
        for i, p in enumerate(prompts):
            try:
                get_prompt(p, kind=ds.kind)
            except PromptError as exc:
                if i == 0:
                    raise PipelineError(f"the main prompt {p!r} does not apply to dataset "
                                        f"{ds.name!r}: {exc}") from None
                sec.skipped_prompts.append(p)
                continue
            name = ds.name if i == 0 else f"{ds.name}__{p}"
            sec.jobs.append(Job(ds, p, i == 0, out / "stores" / f"{name}.zarr",
                                out / "probes" / name))
        sections.append(sec)
    return sections
