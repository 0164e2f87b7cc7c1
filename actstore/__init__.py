"""actstore: a streaming activation store for probing language models.

Pipeline (see docs/ and DESIGN): datasets -> prompts -> extract -> ActivationStore -> probes.
The Python API (docs/python-api.md): ``actstore.extract(model, dataset, config)`` with an
``actstore.ExtractConfig``, then ``actstore.open(path)``; the extraction modules load on first
use, so ``import actstore`` stays light.
"""
__version__ = "0.3.0"
from actstore.lazy import lazy_exports  # noqa: E402
from actstore.store import open_store as open  # noqa: E402,F401  (actstore.open)

_LAZY = {
    "extract": "",                              # the package, callable (actstore/extract)
    "ExtractConfig": "actstore.extract.config",
    "ExtractResult": "actstore.extract",
    "load_dataset": "actstore.datasets",
}
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
