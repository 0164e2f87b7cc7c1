"""``actstore extract``: the command line of :func:`actstore.extract.extract`, built from
:class:`ExtractConfig` (one option per field, its ``--help`` from the field's docstring).
Light on purpose: ``actstore --help`` imports it (no torch)."""
from __future__ import annotations

import argparse

from actstore.distributed import cli_call
from actstore.extract import extract
from actstore.extract.config import ExtractConfig
from actstore.options import add_arguments, field_docs, from_args

__all__ = ["add_cli", "EXAMPLES"]

DESCRIPTION = (
    "Run a causal LM over an entity dataset (text = BOS + prompt + entity) or a table of your "
    "own (text = BOS + its text column, or its entity in --template) and store, after every "
    "decoder block, the hidden state at the entity's last token (or --position first-entity, "
    "mean, last, all tokens) of the residual stream (and/or --sites attn_out, mlp_out, "
    "neurons, one forward pass), as float16, in a chunked Zarr v3 (or HDF5) store together "
    "with the entity table and all metadata. Streaming, bounded memory, resumable.")

EXAMPLES = """\
examples:
  # the embedded SmolLM2-135M (offline), 512 world places, the paper's coordinates prompt
  actstore extract --dataset ../shared/datasets/paper/world_place.csv --prompt coords \\
      --limit 512 --out w.zarr
  # any Hugging Face causal LM, on a GPU, with MLP neurons, some layers only
  actstore extract --model meta-llama/Llama-2-7b-hf --device cuda --dataset world_place \\
      --prompt where_is --layers 0,8,16-24 --neurons --out llama-world.zarr
  # your own table: an entity in a template, a class target, every site, the entity's mean
  actstore extract --dataset cities.parquet --entity-column city --template \
      "The capital of {entity} is" --targets country:class --sites resid,attn_out,mlp_out \
      --position mean --out cities.zarr
  # a text column, every token (a ragged store: rows are tokens; SAE training data)
  actstore extract --dataset reviews.csv --text-column review --targets label \
      --position all --out tokens.zarr
  # models whose activations overflow float16 (Gemma): store bfloat16
  actstore extract --model google/gemma-2b --dtype bfloat16 --dataset us_places \\
      --prompt empty --out g.zarr

Re-running the same command resumes an interrupted run (Ctrl-C, kill -9, full disk) where it
stopped, with the store's batch size, rows per chunk, compression and format; a store made with
another model, prompt, dataset, table options, layer list, sites, position, dtype or compute
dtype (or those options given with other values) is refused (--overwrite replaces it). One run
writes a store at a time: a second is refused, naming the first (lock file STORE.actstore-lock).
Reads check every block against the checksum written with it; `actstore verify STORE` checks a
whole store, and the command that made it plus --repair re-extracts the damaged blocks (a shard
deleted, truncated or changed).
Then:
  python -c "import actstore; s = actstore.open('w.zarr'); print(s, s.entities.head())"
"""


def add_cli(subparsers) -> None:
    """Add ``actstore extract`` to the actstore command line."""
    p = subparsers.add_parser(
        "extract", help="extract activations of every layer (positions, sites) into a store",
        description=DESCRIPTION, epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, ExtractConfig)
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help=field_docs(ExtractConfig)["progress"])
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    # under torchrun: each rank prints its own errors ("[rank k] ..."), copies of another
    # rank's error only on rank 0 (actstore.distributed.cli_call)
    return cli_call(_cli_run, args, prog="actstore")


def _cli_run(args) -> int:
    res = extract(config=from_args(ExtractConfig, args))
    if res.rank == 0:   # under torchrun the other ranks stay quiet
        print(res.summary())
    return 0
