"""``fastprobe neurons``: every MLP neuron of every layer against the targets; the command
line is built from :class:`~probes.neurons.config.NeuronConfig`."""
from __future__ import annotations

from actstore.options import add_arguments, from_args
from probes.neurons.config import NeuronConfig
from probes.report import format_neuron_table

__all__ = ["add_cli", "NEURONS_DESCRIPTION", "NEURONS_EPILOG"]

NEURONS_DESCRIPTION = """\
Correlate every MLP neuron of every layer with each target: Pearson from one streaming pass,
Spearman (Pearson of average ranks) one layer at a time; neurons are ranked by |Spearman|.
--method stored (default) reads the neurons a store holds (`actstore extract --neurons`);
--method projection computes them the paper's way from the stored residual stream: hidden state
l, RMS-normalised by block l's post-attention norm, through block l's MLP gate and up weights
(act(gate) * up; exact when block l's attention adds nothing). Either way a neuron's layer is the
hidden state its MLP writes into (block b -> layer b+1). --probe DIR adds the cosine of each top
neuron's output weights (down_proj column) with the probe direction fitted at that layer."""

NEURONS_EPILOG = """\
examples:
  fastprobe neurons w.zarr --out neurons-out
      latitude and longitude (a place store's own targets), all rows, top 50 per target
  fastprobe neurons figures.zarr --target year --top 20 --out year-neurons
  fastprobe neurons w.zarr --split train --backend torch --device cpu --out n2
  fastprobe neurons w.zarr --method projection --model store --out proj-out
      a store without neurons: projects the residual stream through the model's MLP weights
      (--model store: the model the store records; --model NAME_OR_PATH: another copy of it.
      --model is required: a model named in a store is never loaded unasked)
  fastprobe fit --all-layers w.zarr --out probe-out
  fastprobe neurons w.zarr --method projection --model store --probe probe-out --top 20 --out n3
      adds cos(probe): each neuron's output weights vs the probe of the layer it writes into

output (DIR):
  neurons.json          per target: the top neurons (rank, layer, index, pearson, spearman,
                        and source_layer for projection, probe_cosine per probe target with
                        --probe); method, model, store, targets, n_rows, split, backend, seconds
  neurons.npz           pearson and spearman, (layers, d_mlp, targets) float64; layers, targets
                        (and source_layers for projection)
  neuron_<target>.png   the best neuron's activation against the target (for places: a
                        longitude/latitude map coloured by the activation)

Python: probes.neuron_report(store, targets=..., top=..., split=..., method=..., model=...,
probe_dir=..., out=...); model="store" or a name, path or loaded model.
"""


def _cmd_neurons(args) -> int:
    from probes.neurons.report import neuron_report  # deferred: torch; --help must not load it

    config = from_args(NeuronConfig, args)
    result = neuron_report(args.store, config)
    print(format_neuron_table(result))
    if config.out:
        print(f"wrote {config.out}/neurons.json, neurons.npz and plots")
    return 0


def add_cli(sub, fmt) -> None:
    """Add ``neurons`` to the fastprobe command line (its options: :class:`NeuronConfig`)."""
    n = sub.add_parser("neurons", help="correlate every MLP neuron with the targets",
                       description=NEURONS_DESCRIPTION, epilog=NEURONS_EPILOG, formatter_class=fmt)
    n.add_argument("store", metavar="STORE", help="activation store (Zarr or .h5)")
    add_arguments(n, NeuronConfig)
    n.set_defaults(func=_cmd_neurons)
