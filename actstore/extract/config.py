"""The options of an extraction: :class:`ExtractConfig` (also the ``actstore extract`` command
line, one docstring per field) and :func:`parse_layers`. Light on purpose: ``actstore --help``
imports it (no torch)."""
from __future__ import annotations

from dataclasses import dataclass, field

from actstore.errors import ExtractError
from actstore.options import cli
from actstore.store.format import POSITIONS, SITES

__all__ = ["ExtractConfig", "DEFAULT_BATCH_SIZE", "BATCH_TOKENS_PER_ROW", "DTYPES", "DTYPE_CHOICES",
           "COMPUTE_DTYPES", "POSITIONS", "SITES", "parse_layers", "parse_sites", "names"]

DEFAULT_BATCH_SIZE = 32
# A forward pass holds at most batch_size x BATCH_TOKENS_PER_ROW token slots (rows x longest
# row): a batch over it is split, its longest rows in smaller batches, so one long row cannot
# blow up a batch's memory. Entity rows are far shorter (tens of tokens), so their batches,
# and hence their values, are those of batch_size alone.
BATCH_TOKENS_PER_ROW = 256
DTYPES = ("float16", "bfloat16", "float32")
# --dtype: "auto" = float16, or the wider dtype an embedded model is known to need
# (actstore.models.default_store_dtype); resolved before the store is opened
DTYPE_CHOICES = ("auto",) + DTYPES
COMPUTE_DTYPES = ("auto", "float32", "float16", "bfloat16")
# options that only a table of your own takes (actstore.datasets.generic.TableSpec)
TABLE_OPTIONS = ("template", "targets", "group_columns", "split_column", "id_column")


@dataclass(frozen=True)
class ExtractConfig:
    """Everything :func:`actstore.extract.extract` is asked to do (``actstore extract``'s
    options, one field each). From Python, ``model``, ``dataset`` and ``prompt`` may also be
    objects (a ``LoadedModel`` or ``(model, tokenizer)`` pair, an ``EntityDataset``, a
    ``Prompt``)."""

    model: str | None = field(default=None, metadata=cli(metavar="MODEL"))
    """'smollm2-135m' (embedded default, offline), a Hugging Face id (e.g.
    meta-llama/Llama-2-7b-hf) or a local model directory"""
    dataset: str | None = field(default=None, metadata=cli(metavar="NAME_OR_PATH", required=True))
    """a built-in (world_cities, us_places, nobel), a paper kind (world_place, ...) or a paper
    CSV (see `actstore datasets list`); or your own table with --text-column / --entity-column:
    a .csv, .tsv, .parquet or .jsonl file, a directory saved by datasets' save_to_disk, or
    hf:NAME[:CONFIG][@SPLIT]"""
    kind: str | None = None
    """dataset kind when a CSV's columns are ambiguous"""
    drop_invalid: bool = False
    """drop rows with invalid values (missing name, bad coordinates or dates, an entity not in
    its text, an empty text...) instead of refusing the file; the count goes into the store's
    meta"""
    text_column: str | None = field(default=None, metadata=cli(metavar="COLUMN"))
    """your own table: the column holding each row's full text (no --prompt); with
    --entity-column the entity is found in it (its first occurrence)"""
    entity_column: str | None = field(default=None, metadata=cli(metavar="COLUMN"))
    """your own table: the column holding each row's entity; with --template the text is the
    template with {entity} replaced by it"""
    template: str | None = field(default=None, metadata=cli(metavar="TEXT"))
    """with --entity-column: the text around the entity, holding {entity} once, e.g. 'The
    capital of {entity} is'"""
    targets: str | tuple[str, ...] | None = field(default=None, metadata=cli(metavar="A,B"))
    """your own table: target columns (comma-separated), each optionally suffixed :class or
    :regression (default: numbers are regression targets; bool, strings and integer codes
    with at most 20 values are class targets)"""
    group_columns: str | tuple[str, ...] | None = field(default=None,
                                                        metadata=cli(metavar="A,B"))
    """your own table: columns kept in the store for hold-out experiments (comma-separated)"""
    split_column: str | None = field(default=None, metadata=cli(metavar="COLUMN"))
    """your own table: a bool column (True = test) or train/test strings (default: a hash
    split on the row names)"""
    id_column: str | None = field(default=None, metadata=cli(metavar="COLUMN"))
    """your own table: the column naming each row (default: the row number)"""
    prompt: str | None = None
    """prompt name for a paper dataset or built-in (coords, where_is, empty, random, all_caps,
    ...; required for them, refused for your own table, whose text comes from --text-column or
    --template); unknown names list the valid ones"""
    out: str | None = field(default=None, metadata=cli(metavar="STORE", required=True))
    """store path: a directory (Zarr v3) or a .h5 file (HDF5)"""
    limit: int | None = field(default=None, metadata=cli(metavar="N"))
    """first N entities only"""
    batch_size: int | None = field(default=None, metadata=cli(metavar="B"))
    """rows per forward pass (default 32; a resume uses the store's); a batch also holds at
    most 256 x B token slots (rows x its longest row): longer rows go in smaller batches"""
    max_tokens: int | None = field(default=None, metadata=cli(metavar="T"))
    """longest row allowed, in tokens (BOS + prompt + entity); a longer row is an error naming
    it, before any forward pass (default: the model's context length, at most 8192)"""
    layers: str | tuple[int, ...] = "all"
    """'all' (blocks 1..N), 'all+emb' (also the embeddings, 0) or a list like 0,5,10-20
    (hidden-state indices)"""
    position: str | None = field(default=None, metadata=cli(choices=POSITIONS))
    """the token(s) of each text to store: last-entity (the entity's last token, the paper's
    rule), first-entity, mean (over the entity's tokens; over the text's tokens, BOS excluded,
    when there is no entity), last (the text's last token), or all (every token, BOS
    included: one row per token, a ragged store with the token ids); default: last-entity, or
    last for a table without entities"""
    sites: str | tuple[str, ...] = "resid"
    """where to read activations, comma-separated, all in one forward pass, each its own
    array: resid (residual stream after each block), attn_out and mlp_out (each block's
    attention and MLP output, before it is added to the residual), neurons (MLP neurons,
    input of the down projection)"""
    neurons: bool = False
    """also store MLP neuron activations (input of the down projection): the same as adding
    neurons to --sites"""
    dtype: str = field(default="auto", metadata=cli(choices=DTYPE_CHOICES))
    """stored dtype (overflow is detected, never stored); auto: float16, or float32 for a model
    known to exceed its range (gemma3-270m); the store's meta records the choice and why"""
    compute_dtype: str = field(default="auto", metadata=cli(choices=COMPUTE_DTYPES))
    """model dtype (auto: float32 on CPU; on GPU float16, or bfloat16 with --dtype
    bfloat16/float32)"""
    format: str | None = field(default=None, metadata=cli(choices=("zarr", "hdf5")))
    """store format (default: zarr, or hdf5 for a .h5/.hdf5 path)"""
    compression: str | None = field(default=None, metadata=cli(choices=("none", "zstd", "blosc")))
    """zarr chunk compression (default none: fp16 activations barely compress; see
    bench/RESULTS.md)"""
    rows_per_chunk: int | None = field(default=None, metadata=cli(metavar="R"))
    """rows per chunk and per write (default: ~1 MiB chunks)"""
    device: str = "auto"
    """cpu, cuda or auto; under torchrun each rank takes GPU LOCAL_RANK"""
    device_map: str | None = field(default=None, metadata=cli(metavar="MAP"))
    """'auto': transformers/accelerate spread a Hugging Face model over all visible GPUs
    (models too big for one; see docs/scale-out.md)"""
    overwrite: bool = False
    """replace an existing store"""
    repair: bool = False
    """first check the existing store (as `actstore verify` does) and re-extract the row blocks
    found damaged (a shard missing, truncated or failing its checksum), then resume; give the
    options the store was made with"""
    padding_side: str | None = field(default=None, metadata=cli(hidden=True))
    """'right' or 'left' (default: the tokenizer's; a resume uses the store's)"""
    stop_after_rows: int | None = field(default=None, metadata=cli(hidden=True))
    """stop cleanly (resumable) once this many rows are stored, rounded up to whole windows
    (for tests and budgets)"""
    progress: bool = field(default=True, metadata=cli(hidden=True))
    """a progress bar on rank 0 (--no-progress: none)"""

    def __post_init__(self):
        if self.dtype not in DTYPE_CHOICES:
            raise ExtractError(f"unknown --dtype {self.dtype!r}; choose auto, float16, "
                               "bfloat16 or float32")
        if self.batch_size is not None and self.batch_size < 1:
            raise ExtractError("--batch-size must be at least 1")
        if self.padding_side not in (None, "left", "right"):
            raise ExtractError("padding_side must be 'left' or 'right'")
        if self.limit is not None and self.limit < 1:
            raise ExtractError("--limit must be at least 1")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ExtractError("--max-tokens must be at least 1")
        if self.rows_per_chunk is not None and self.rows_per_chunk < 1:
            raise ExtractError("--rows-per-chunk must be at least 1")
        if self.position is not None and self.position not in POSITIONS:
            raise ExtractError(f"unknown --position {self.position!r}; choose one of "
                               f"{', '.join(POSITIONS)}")
        parse_sites(self.sites)
        if not (self.text_column or self.entity_column):
            given = [k for k in TABLE_OPTIONS if getattr(self, k)]
            if given:
                flags = ", ".join("--" + k.replace("_", "-") for k in given)
                raise ExtractError(f"{flags} describe your own table: give --text-column or "
                                   "--entity-column (and --template) as well")
        if self.template is not None and not self.entity_column:
            raise ExtractError("--template needs --entity-column (the column whose values "
                               "replace {entity})")
        if self.repair and self.overwrite:
            raise ExtractError("--repair keeps the store and rewrites its damaged blocks; "
                               "--overwrite replaces it: give one of them")


    @property
    def site_names(self) -> tuple[str, ...]:
        """The sites to store, in store order (``--neurons`` adds ``neurons``)."""
        wanted = set(parse_sites(self.sites)) | ({"neurons"} if self.neurons else set())
        return tuple(s for s in SITES if s in wanted)

    @property
    def own_table(self) -> bool:
        """True when the options describe a table of the user's own (a TableSpec)."""
        return bool(self.text_column or self.entity_column)


def names(value) -> tuple[str, ...]:
    """Column names from 'a,b' (the command line) or a sequence (Python); () for None."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(str(x).strip() for x in items if str(x).strip())


def parse_sites(spec) -> tuple[str, ...]:
    """The sites a ``--sites`` value names ('resid,mlp_out' or a sequence), in store order.

    Raises
    ------
    ExtractError
        An unknown site or none at all.
    """
    given = names(spec)
    bad = [s for s in given if s not in SITES]
    if bad:
        raise ExtractError(f"unknown --sites {', '.join(map(repr, bad))}; choose from "
                           f"{', '.join(SITES)} (comma-separated)")
    if not given:
        raise ExtractError(f"--sites names no site; choose from {', '.join(SITES)}")
    return tuple(s for s in SITES if s in given)


def _layer_items(spec: str) -> list[int]:
    """The hidden-state indices of a list like '0,5,10-20' (not yet range-checked)."""
    out = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                a, b = (int(x) for x in part.split("-", 1))
                if b < a:
                    raise ValueError
                out.extend(range(a, b + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ExtractError(f"bad --layers item {part!r}: use 'all', 'all+emb' or a list "
                               "like 0,5,10-20") from None
    return out


def parse_layers(spec, n_blocks: int) -> list[int]:
    """The hidden-state indices a ``--layers`` value selects, sorted.

    Parameters
    ----------
    spec : str, list of int or None
        'all' or None (blocks 1..N), 'all+emb' (0..N), a list like '0,5,10-20', or the indices.
    n_blocks : int
        The model's number of decoder blocks N (hidden states 0..N).

    Returns
    -------
    list of int

    Raises
    ------
    ExtractError
        A bad item, an index out of range, a duplicate, or no layer at all.
    """
    if spec is None or spec == "all":
        return list(range(1, n_blocks + 1))
    if spec in ("all+emb", "all+embeddings"):
        return list(range(0, n_blocks + 1))
    out = [int(x) for x in spec] if isinstance(spec, (list, tuple)) else _layer_items(spec)
    if not out:
        raise ExtractError("--layers selects no layer")
    bad = [x for x in out if not 0 <= x <= n_blocks]
    if bad:
        raise ExtractError(f"layers {bad} out of range: this model has hidden states 0..{n_blocks}"
                           f" (0 = embeddings, {n_blocks} = last block)")
    if len(set(out)) != len(out):
        raise ExtractError(f"duplicate layers in {spec!r}")
    return sorted(out)
