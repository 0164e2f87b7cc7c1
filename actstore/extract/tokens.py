"""Token ids of every row, encoded once before any forward pass (:func:`encode_rows`, held
compactly in :class:`EncodedRows`), and the length rule (:func:`token_limit`,
:func:`check_lengths`): a row longer than ``--max-tokens`` (default: the model's context
length, at most :data:`MAX_TOKENS_CAP`) is an error naming it, never truncated, so a stored
vector always belongs to the whole text BOS + prompt + entity that the metadata describes."""
from __future__ import annotations

import itertools

import numpy as np

from actstore.errors import ExtractError

__all__ = ["MAX_TOKENS_CAP", "EncodedRows", "encode_rows", "token_limit", "check_lengths"]

# The default --max-tokens when the model's context is longer (or unknown): entity rows are
# tens of tokens (the paper's datasets: at most 31 with SmolLM2's tokenizer and the coords
# prompt), so a row of thousands is a broken name, not an entity (issue 13: 12,712 tokens).
MAX_TOKENS_CAP = 8192
_ENCODE_ROWS = 4096   # rows per tokenizer call


class EncodedRows:
    """The token ids of ``n`` rows: one flat int32 array and ``n + 1`` offsets (4 bytes a
    token, not a Python list per row)."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray):
        self.ids, self.offsets = ids, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per row, (n,) int64."""
        return np.diff(self.offsets)

    def window(self, start: int, stop: int) -> list[list[int]]:
        """The id lists of rows ``start..stop``."""
        o = self.offsets
        return [self.ids[o[i]:o[i + 1]].tolist() for i in range(start, stop)]


def encode_rows(prompt, tokenizer, entities: list[str]) -> EncodedRows:
    """Every row's ids (BOS + prompt + entity, ``prompt.encode_many``), in batched calls."""
    parts, lengths = [], []
    for a in range(0, len(entities), _ENCODE_ROWS):
        seqs = prompt.encode_many(tokenizer, entities[a:a + _ENCODE_ROWS])
        n = [len(q) for q in seqs]
        parts.append(np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int32,
                                 count=sum(n)))
        lengths.extend(n)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    return EncodedRows(ids, offsets)


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
                  context: int | None) -> None:
    """Raise :class:`ExtractError` naming the first row longer than ``limit`` tokens (its
    index, entity and length, the limit and ``why``), with how many more there are."""
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
                       f"(BOS + prompt + entity), over the limit of {limit} ({why}){more}; "
                       f"{todo}")
