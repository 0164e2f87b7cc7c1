"""The options of ``actstore run`` (:class:`PipelineConfig`, also its command line) and the
recipes. Light on purpose: ``actstore --help`` imports it."""
from __future__ import annotations

from dataclasses import dataclass, field

from actstore.options import cli

__all__ = ["PipelineConfig", "RECIPES", "RECIPE_LAYERS", "CONTROLS", "EXPERIMENTS",
           "DEMO_DATASETS", "CLASSIFY_COLUMNS"]

# the offline built-ins; films (a second time set, kind art) adds ~35 s to `make demo` on a quiet
# 2-core box (docs/paper-run.md, "make demo")
DEMO_DATASETS = ("world_cities", "us_places", "nobel", "films")
RECIPES = {
    "probes": ("extract", "fit", "report"),
    "paper": ("extract", "fit", "classify", "neurons", "experiments", "report"),
}
# the layers each recipe extracts: the paper recipe adds layer 0, the token embeddings, as the
# lexical floor its report and plots compare every layer with
RECIPE_LAYERS = {"probes": "all", "paper": "all+emb"}
CONTROLS = ("random", "none")
# the classification step of the paper recipe: the class column of each place dataset kind
CLASSIFY_COLUMNS = {"world_place": "country", "us_place": "state_name",
                    "nyc_place": "borough_name"}
EXPERIMENTS = ("prompts", "holdout", "entity-type", "nonlinear", "pca")
@dataclass(frozen=True)
class PipelineConfig:
    """Everything ``actstore run`` is asked to do (the CLI's options, one field each)."""

    out: str = field(default="", metadata=cli(metavar="DIR", required=True))
    """output directory (created; reused to resume)"""
    recipe: str = field(default="probes", metadata=cli(positional=True, metavar="RECIPE",
                                                        choices=tuple(RECIPES), nargs="?"))
    """probes (default: extract, fit, report) or paper (adds neurons and experiments)"""
    model: str | None = None
    """an embedded model (smollm2-135m, the default; gemma3-270m), an HF causal LM id or path"""
    models: str | None = field(default=None, metadata=cli(metavar="A,B"))
    """the model-size comparison, instead of --model: comma-separated models, e.g.
    smollm2,gemma3-270m (embedded names, HF ids, paths, random:NAME); the first runs every step
    as --model would, each other one is extracted and fitted per dataset (main prompt, with its
    own random-init control) under OUT/models/NAME/; the report adds a "Model size" section"""
    datasets: str = ",".join(DEMO_DATASETS)
    """comma-separated dataset names or CSV paths"""
    prompts: str = field(default="empty", metadata=cli(aliases=("--prompt",)))
    """comma-separated prompt names; the first (empty = the entity alone, the paper's main
    prompt) must suit every dataset, the others are extracted where they apply (see `actstore
    extract --help`)"""
    limit: int | None = None
    """use the first N rows of each dataset"""
    experiments: str | None = None
    """paper recipe: comma-separated subset of prompts,holdout,entity-type,nonlinear,pca, or all
    (default) or none"""
    batch_size: int | None = None
    """rows per forward pass (default 32; a resumed store keeps its own)"""
    drop_invalid: bool = False
    """drop (and count) dataset rows that fail validation instead of stopping"""
    device: str = "auto"
    """cpu | cuda | auto"""
    backend: str = "auto"
    """statistics backend: auto|cpu|torch|cuda|triton"""
    cv: str = field(default="loo", metadata=cli(hidden=True))
    """alpha selection of the fits: loo or K folds (the classification step: K stratified
    folds; loo means 5)"""
    cs: str = field(default="1e-2:1e2:5", metadata=cli(flag="--Cs", metavar="GRID"))
    """paper recipe: the C grid of the logistic probe of each place dataset's class column
    (country / state_name / borough_name): LO:HI:N log-spaced or a list (fastprobe fit's full
    grid: 1e-4:1e4:17)"""
    classify_every: int = field(default=3, metadata=cli(metavar="K"))
    """paper recipe: the classification probes on every K-th layer the store holds, and the last
    (1: every layer, as the ridge fit)"""
    controls: str | None = field(default=None, metadata=cli(choices=CONTROLS))
    """random: also extract and probe the same architecture and tokenizer with re-initialised
    weights (--model random:MODEL) on every dataset, the report's random-init control; none.
    Default: random for the paper recipe (one more extraction and fit per dataset), none for
    probes"""
    progress: bool = field(default=True, metadata=cli(hidden=True))
    """progress bars (the CLI's --no-progress)"""
