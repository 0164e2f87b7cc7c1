"""actstore: a streaming activation store for probing language models.

Pipeline (see docs/ and DESIGN): datasets -> prompts -> extract -> ActivationStore -> probes.
"""
__version__ = "0.1.0"
