"""actstore: a streaming activation store for probing language models.

Pipeline (see docs/ and DESIGN): datasets -> prompts -> extract -> ActivationStore -> probes.
"""
__version__ = "0.3.0"
from actstore.store import open_store as open  # noqa: E402,F401  (actstore.open)
