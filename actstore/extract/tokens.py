"""Token ids of every row, encoded once before any forward pass (:func:`encode_rows` for the
paper's prompts, :func:`encode_texts` for a table's texts; held compactly in
:class:`EncodedRows`, with each entity's token span from the tokenizer's offsets), the tokens a
window keeps for each ``--position`` (:meth:`EncodedRows.select`), and the length rule
(:func:`token_limit`, :func:`check_lengths`): a row longer than ``--max-tokens`` (default: the
model's context length, at most :data:`MAX_TOKENS_CAP`) is an error naming it, never truncated,
so a stored vector always belongs to the whole text (BOS + prompt + entity, or BOS + text) that
the metadata describes."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from actstore.errors import ExtractError
from actstore.prompts import token_span

__all__ = ["MAX_TOKENS_CAP", "EncodedRows", "Selection", "encode_rows", "encode_texts",
           "token_span", "needs_span", "token_limit", "check_lengths"]

# The default --max-tokens when the model's context is longer (or unknown): entity rows are
# tens of tokens (the paper's datasets: at most 31 with SmolLM2's tokenizer and the coords
# prompt), so a row of thousands is a broken name, not an entity (issue 13: 12,712 tokens).
MAX_TOKENS_CAP = 8192
_ENCODE_ROWS = 4096   # rows per tokenizer call
_NEED_SPAN = ("first-entity", "mean")   # positions that read the entity's token span


@dataclass
class Selection:
    """What one window computes: the texts whose forward passes it runs (``texts``, their ids
    ``seqs``) and, per text, the token positions to keep (``tokens``, indices into its ids)
    and the window rows they go to (``dest``). ``mean``: each text's ``tokens`` are averaged
    into its one ``dest`` row; else ``tokens[i][k]`` goes to row ``dest[i][k]``."""
    texts: np.ndarray
    seqs: list[list[int]]
    tokens: list[np.ndarray]
    dest: list[np.ndarray]
    mean: bool


class EncodedRows:
    """The token ids of ``n`` texts: one flat int32 array and ``n + 1`` offsets (4 bytes a
    token, not a Python list per text), and each text's entity token span ``spans[i] = [a, b)``
    (indices into its ids; -1, -1 without an entity; None when not computed). ``head``: the
    ids in front of every text (1 for a BOS, else 0); ``entity_last``: the entity ends every
    text (the paper's prompts), so its last token is the text's last."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, spans: np.ndarray | None = None,
                 head: int = 0, entity_last: bool = True):
        self.ids, self.offsets, self.spans = ids, offsets, spans
        self.head, self.entity_last = head, entity_last

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per text, (n,) int64."""
        return np.diff(self.offsets)

    @property
    def n_tokens(self) -> int:
        """Tokens of all texts (the rows of a ``--position all`` store)."""
        return int(self.offsets[-1])

    def window(self, start: int, stop: int) -> list[list[int]]:
        """The id lists of texts ``start..stop``."""
        o = self.offsets
        return [self.ids[o[i]:o[i + 1]].tolist() for i in range(start, stop)]

    def n_rows(self, position: str) -> int:
        """Rows of the store: one per text, or one per token for ``all``."""
        return self.n_tokens if position == "all" else len(self)

    def picks(self, position: str) -> np.ndarray:
        """(n,) int64: the token each text keeps for ``last``, ``last-entity`` or
        ``first-entity``."""
        last = self.lengths - 1
        if position == "last" or (position == "last-entity" and self.entity_last):
            return last   # the paper's rule: last-entity is the last token (BOS + prompt + entity)
        return self.spans[:, 0].copy() if position == "first-entity" else self.spans[:, 1] - 1

    def select(self, position: str, w0: int, w1: int) -> Selection:
        """The work of the window of store rows ``w0..w1`` (texts, or tokens for ``all``: the
        texts overlapping the window are computed whole and only its rows kept)."""
        o = self.offsets
        if position == "all":
            t0 = int(np.searchsorted(o, w0, side="right")) - 1
            t1 = int(np.searchsorted(o, w1, side="left"))
            texts = np.arange(t0, t1)
            tokens = [np.arange(max(0, w0 - o[t]), min(o[t + 1], w1) - o[t]) for t in texts]
            dest = [o[t] + k - w0 for t, k in zip(texts, tokens)]
            return Selection(texts, self.window(t0, t1), tokens, dest, False)
        texts = np.arange(w0, w1)
        dest = [np.array([t - w0]) for t in texts]
        if position == "mean":
            if self.spans is None:   # texts without entities: their spans were never needed
                a = b = np.full(w1 - w0, -1, dtype=np.int64)
            else:
                a, b = self.spans[w0:w1, 0], self.spans[w0:w1, 1]
            lo = np.where(a < 0, self.head, a)              # no entity: the whole text, no BOS
            hi = np.where(a < 0, self.lengths[w0:w1], b)
            tokens = [np.arange(x, y) for x, y in zip(lo, hi)]
        else:
            tokens = [np.array([k]) for k in self.picks(position)[w0:w1]]
        return Selection(texts, self.window(w0, w1), tokens, dest, position == "mean")

    def check_position(self, position: str, has_entity: bool) -> None:
        """ExtractError if ``position`` needs an entity the texts do not have."""
        if position in ("last-entity", "first-entity") and not has_entity:
            raise ExtractError(f"--position {position} needs an entity in every text: this "
                               "table has none (give --entity-column), or use --position "
                               "last, mean or all")


def _check_fast(tokenizer) -> None:
    """ExtractError unless ``tokenizer`` gives character offsets (a fast tokenizer)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ExtractError(f"this --position needs the entity's token span, found from token "
                           f"offsets, which {type(tokenizer).__name__} (a slow tokenizer) does "
                           "not give; use a fast tokenizer, or --position last, last-entity "
                           "(paper prompts) or all")


def _pack(seqs_parts: list[list[list[int]]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = [len(q) for part in seqs_parts for q in part]
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = [np.fromiter(itertools.chain.from_iterable(part), dtype=np.int32,
                        count=sum(len(q) for q in part)) for part in seqs_parts]
    ids = np.concatenate(flat) if flat else np.zeros(0, dtype=np.int32)
    return ids, offsets


def _no_span(what: str, i: int) -> ExtractError:
    return ExtractError(f"row {i}: no token of the text covers its entity ({what}); check "
                        "the row, or use --position last or all")


def encode_rows(prompt, tokenizer, entities: list[str], spans: bool = False) -> EncodedRows:
    """Every row's ids (BOS + prompt + entity, ``prompt.encode_many``), in batched calls; with
    ``spans``, each entity's token span from the offsets of the same tokenizer call (the
    characters of the transformed entity, after the template)."""
    if spans:
        _check_fast(tokenizer)
    parts, span_rows = [], []
    for a in range(0, len(entities), _ENCODE_ROWS):
        chunk = entities[a:a + _ENCODE_ROWS]
        if not spans:
            parts.append(prompt.encode_many(tokenizer, chunk))
            continue
        seqs, sp = prompt.encode_spans(tokenizer, chunk)
        for k, s in enumerate(sp):
            if s[0] < 0:
                raise _no_span(repr(chunk[k]), a + k)
        parts.append(seqs)
        span_rows.extend(sp)
    ids, offsets = _pack(parts)
    head = 1 if getattr(tokenizer, "bos_token_id", None) is not None else 0
    return EncodedRows(ids, offsets, np.asarray(span_rows, dtype=np.int64).reshape(-1, 2)
                       if spans else None, head=head, entity_last=True)


def encode_texts(tokenizer, texts: list[str], starts=None, ends=None,
                 spans: bool = False) -> EncodedRows:
    """Every text's ids for a table of your own: BOS (if the tokenizer has one) + the text's
    tokens (``add_special_tokens=False``); with ``spans``, the token span of the characters
    ``starts[i]..ends[i]`` (-1: no entity) from the tokenizer's offsets."""
    bos = getattr(tokenizer, "bos_token_id", None)
    head = [int(bos)] if bos is not None else []
    if spans:
        _check_fast(tokenizer)
    parts, span_rows = [], []
    for a in range(0, len(texts), _ENCODE_ROWS):
        chunk = [str(t) for t in texts[a:a + _ENCODE_ROWS]]
        enc = (tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True) if spans
               else tokenizer(chunk, add_special_tokens=False))
        parts.append([head + [int(i) for i in ids] for ids in enc["input_ids"]])
        if spans:
            for k, offs in enumerate(enc["offset_mapping"]):
                i = a + k
                cs, ce = int(starts[i]), int(ends[i])
                if cs < 0:
                    span_rows.append((-1, -1))
                    continue
                s = token_span(offs, cs, ce, len(head))
                if s[0] < 0:
                    raise _no_span(f"characters {cs}..{ce}", i)
                span_rows.append(s)
    ids, offsets = _pack(parts)
    return EncodedRows(ids, offsets, np.asarray(span_rows, dtype=np.int64).reshape(-1, 2)
                       if spans else None, head=len(head), entity_last=False)


def needs_span(position: str, generic: bool) -> bool:
    """Whether ``position`` reads the entity's token span (the paper's last-entity does not:
    the entity ends its text)."""
    return position in _NEED_SPAN or (generic and position == "last-entity")


def token_limit(max_tokens: int | None, context: int | None) -> tuple[int, str]:
    """The longest row allowed and where that number comes from, for ``--max-tokens``
    ``max_tokens`` (None: the default) and the model's ``context`` length (None: unknown).

    Raises
    ------
    ExtractError
        ``max_tokens`` beyond the model's context (positions it was never trained on).
    """
    if max_tokens is not None:
        if context is not None and max_tokens > context:
            raise ExtractError(f"--max-tokens {max_tokens} exceeds the model's context length "
                               f"of {context} tokens; use at most {context}")
        return int(max_tokens), "--max-tokens"
    if context is None:
        return MAX_TOKENS_CAP, "the default; the model does not say its context length"
    if context > MAX_TOKENS_CAP:
        return MAX_TOKENS_CAP, f"the default cap; the model's context is {context}"
    return int(context), "the model's context length"


def _show(entity: str) -> str:
    text = str(entity)
    return repr(text) if len(text) <= 60 else f"{text[:40]!r}... ({len(text)} characters)"


def check_lengths(rows: EncodedRows, limit: int, why: str, entities: list[str],
                  context: int | None, what: str = "BOS + prompt + entity") -> None:
    """Raise :class:`ExtractError` naming the first row longer than ``limit`` tokens (its
    index, entity (or text) and length, the limit and ``why``), with how many more there are;
    ``what``: what a row is made of."""
    over = np.flatnonzero(rows.lengths > limit)
    if over.size == 0:
        return
    i = int(over[0])
    more = f" (and {over.size - 1} more row{'s' if over.size > 2 else ''})" if over.size > 1 \
        else ""
    if context is not None and limit >= context:
        todo = "the model cannot read it whole: fix or drop the row in the dataset"
    else:
        todo = ("fix or drop the row in the dataset, or raise --max-tokens"
                + (f" (up to the model's context, {context})" if context else ""))
    raise ExtractError(f"row {i} ({_show(entities[i])}) is {int(rows.lengths[i])} tokens long "
                       f"({what}), over the limit of {limit} ({why}){more}; "
                       f"{todo}")
