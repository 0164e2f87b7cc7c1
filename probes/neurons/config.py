"""The options of ``fastprobe neurons`` and :func:`probes.neurons.neuron_report`
(:class:`NeuronConfig`, also its command line). Light on purpose: ``fastprobe --help`` imports
it, so no torch here."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from actstore.options import cli, field_docs
from probes.errors import NeuronReportError

__all__ = ["NeuronConfig", "METHODS", "SPLITS", "BACKEND_CHOICES"]

METHODS = ("stored", "projection")
SPLITS = ("all", "is_test", "train")
BACKEND_CHOICES = ("auto", "cpu", "torch", "cuda", "triton")


@dataclass(frozen=True)
class NeuronConfig:
    """What a neuron report computes: one field per option of ``fastprobe neurons`` (the
    fields' docstrings are its ``--help``). Invalid values raise NeuronReportError here.
    """

    method: str = field(default="stored", metadata=cli(choices=METHODS))
    """stored: the store's neurons (extract --neurons); projection: computed from the residual
    stream with the model's MLP weights"""
    model: str | None = field(default=None, metadata=cli(metavar="NAME_OR_PATH"))
    """model for --method projection / --probe, required by them: `store` loads the model the
    store's metadata records (never loaded unasked), else a name or path"""
    probe_dir: str | None = field(default=None, metadata=cli("--probe", metavar="DIR"))
    """a `fastprobe fit --out` directory of this store: adds each top neuron's output-weight
    cosine with the probe direction"""
    targets: str | tuple[str, ...] | None = field(default=None,
                                                  metadata=cli("--target", metavar="NAMES"))
    """comma-separated target columns, e.g. latitude,longitude or year (default: the store's
    own targets)"""
    top: int = field(default=50, metadata=cli(metavar="K"))
    """neurons listed per target, by |spearman|"""
    split: str = field(default="all", metadata=cli(choices=SPLITS))
    """rows to correlate over: all, the is_test rows, or the others"""
    backend: str = field(default="auto", metadata=cli(choices=BACKEND_CHOICES))
    """moments kernel; auto picks the fastest available"""
    device: str | None = field(default=None, metadata=cli(choices=("cpu", "cuda")))
    """where moments and ranks are computed (default: cuda when the backend or a present GPU
    calls for it, else cpu)"""
    out: str | None = field(default=None, metadata=cli(metavar="DIR"))
    """output directory for neurons.json, neurons.npz and PNG plots"""
    layers: tuple[int, ...] | None = field(default=None, metadata=cli(hidden=True))
    """hidden-state indices to correlate (default: every layer the store holds; projection
    skips the last block's output, which feeds no MLP)"""
    chunk_rows: int | None = field(default=None, metadata=cli(hidden=True))
    """rows per chunk of the streaming pass (default: the store's chunking)"""

    def __post_init__(self):
        method = "stored" if self.method is None else str(self.method).lower()
        if method not in METHODS:
            raise NeuronReportError(f"unknown method {self.method!r}; choose stored or projection")
        top = int(self.top)
        if top < 1:
            raise NeuronReportError(f"top must be >= 1, got {self.top}")
        if self.split not in SPLITS:
            raise NeuronReportError(f"unknown split {self.split!r}; choose one of "
                                    f"{', '.join(SPLITS)}")
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "top", top)
        for name in ("targets", "layers"):   # lists -> tuples: a frozen config holds no lists
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))


def _numpydoc_parameters(cls) -> str:
    """A numpydoc "Parameters" section built from the dataclass fields' own docstrings, so
    the class documents every option once (its fields) and Sphinx / help() still see them."""
    docs = field_docs(cls)
    lines = ["", "    Parameters", "    ----------"]
    for f in dataclasses.fields(cls):
        lines.append(f"    {f.name} : {f.type}, default {f.default!r}")
        lines.append(f"        {docs.get(f.name, '')}")
    return "\n".join(lines) + "\n"


NeuronConfig.__doc__ += _numpydoc_parameters(NeuronConfig)
