"""The paper's prompt templates (Gurnee & Tegmark 2023, github.com/wesg52/world-models).

A prompt turns an entity into token ids: BOS (when the tokenizer has one) + [10 random ids,
"random" only] + tokens of (template + transformed entity), tokenised together with
add_special_tokens=False as in the paper, so the last id is always the entity's last token.
Templates are the paper's, verbatim. Transforms: ``upper`` (ALL CAPS) and ``strip_period``
(the headline prompts "without period"). "random": 10 ids drawn uniformly from [100, vocab)
minus special tokens, seeded by (seed, entity) so a row's prompt is the same in every run,
batch and process (the paper used torch's global RNG over [100, the batch's largest id)).
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

from actstore.datasets.kinds import KINDS
from actstore.errors import PromptError

ALL = ()  # kinds=() means the prompt applies to every kind
TRANSFORMS = ("none", "upper", "strip_period")


@dataclass(frozen=True)
class Prompt:
    name: str
    template: str
    kinds: tuple[str, ...] = ALL
    transform: str = "none"
    n_random: int = 0
    seed: int = 0
    description: str = ""

    def applies_to(self, kind: str | None) -> bool:
        return kind is None or not self.kinds or kind in self.kinds

    def entity_text(self, entity: str) -> str:
        if self.transform == "upper":
            return entity.upper()
        if self.transform == "strip_period":
            return entity[:-1] if entity.endswith(".") else entity
        return entity

    def text(self, entity: str) -> str:
        """The prompted text without BOS and random tokens: template + transformed entity."""
        return self.template + self.entity_text(entity)

    def encode(self, tokenizer, entity: str) -> list[int]:
        """BOS (if any) + random ids ("random") + ids of template + entity; last = entity's last."""
        return self.encode_many(tokenizer, [entity])[0]

    def encode_many(self, tokenizer, entities) -> list[list[int]]:
        """encode() for many entities with one batched tokenizer call."""
        return self._encode(tokenizer, entities, spans=False)[0]

    def encode_spans(self, tokenizer, entities) -> tuple[list[list[int]], list[tuple[int, int]]]:
        """:meth:`encode_many`'s ids (the same tokenizer call, with offsets) and each entity's
        token span ``[a, b)`` in them: the tokens whose characters overlap the transformed
        entity (``len(template)..len(text)``); (-1, -1) when none does. Needs a fast tokenizer
        (offsets)."""
        return self._encode(tokenizer, entities, spans=True)

    def _encode(self, tokenizer, entities, spans: bool):
        entities = list(entities)
        for e in entities:
            if not isinstance(e, str) or not e.strip():
                raise PromptError(f"prompt {self.name!r}: cannot encode an empty entity {e!r}")
        texts = [self.text(e) for e in entities]
        if spans and not getattr(tokenizer, "is_fast", False):
            raise PromptError(f"prompt {self.name!r}: the entity's token span needs token "
                              f"offsets, which {type(tokenizer).__name__} (a slow tokenizer) "
                              "does not give; use a fast tokenizer")
        enc = (tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True) if spans
               else tokenizer(texts, add_special_tokens=False))
        body = enc["input_ids"]
        bos = getattr(tokenizer, "bos_token_id", None)
        head = [int(bos)] if bos is not None else []
        out, found = [], []
        start = len(self.template)
        for k, (entity, ids) in enumerate(zip(entities, body)):
            rand = self.random_ids(tokenizer, entity) if self.n_random else []
            out.append(head + rand + [int(i) for i in ids])
            if spans:
                found.append(token_span(enc["offset_mapping"][k], start, len(texts[k]),
                                        len(head) + len(rand)))
        return out, found

    def random_ids(self, tokenizer, entity: str) -> list[int]:
        """The ``n_random`` ids of the "random" prompt for this entity (seeded by seed, entity)."""
        import numpy as np

        vocab = int(getattr(tokenizer, "vocab_size", 0) or len(tokenizer))
        special = set(int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []))
        low = 100 if vocab > 200 else 0  # the paper skips the first 100 ids (bytes, specials)
        allowed = np.setdiff1d(np.arange(low, vocab), np.fromiter(special, dtype=np.int64))
        if len(allowed) == 0:
            raise PromptError(f"prompt {self.name!r}: tokenizer has no non-special ids to draw")
        key = int.from_bytes(hashlib.blake2b(entity.encode("utf-8"), digest_size=8).digest(),
                             "little")
        rng = np.random.default_rng([self.seed, key])
        return [int(i) for i in rng.choice(allowed, size=self.n_random, replace=True)]

    def describe(self) -> dict:
        """JSON-able record for store metadata (the exact template and rules)."""
        d = asdict(self)
        d["kinds"] = list(self.kinds)
        d["format"] = ("BOS (if the tokenizer has one)"
                       + (f" + {self.n_random} random token ids" if self.n_random else "")
                       + " + tokens(template + entity), add_special_tokens=False")
        d["position"] = "last token of the entity"
        return d


def token_span(offsets, start: int, end: int, shift: int = 0) -> tuple[int, int]:
    """The tokens ``[a, b)`` whose character offsets (a tokenizer's ``offset_mapping``)
    overlap the characters ``start..end`` (empty tokens left out), shifted by ``shift`` (the
    ids in front of the text); (-1, -1) when none does."""
    import numpy as np  # deferred: the prompt table is read by `actstore --help`

    o = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    hit = np.flatnonzero((o[:, 1] > o[:, 0]) & (o[:, 0] < end) & (o[:, 1] > start))
    if hit.size == 0:
        return -1, -1
    return int(hit[0]) + shift, int(hit[-1]) + 1 + shift


_PLACE = ("world_place", "us_place")
PROMPTS: dict[str, Prompt] = {p.name: p for p in (
    Prompt("empty", "", ALL, description="the entity alone"),
    Prompt("all_caps", "", ALL, transform="upper", description="the entity in capitals"),
    Prompt("random", "", ALL, n_random=10, description="10 random tokens before the entity"),
    Prompt("coords", "What are the lat/lon coordinates of ", _PLACE),
    Prompt("where_us", "Where in the United States is ", ("us_place",)),
    Prompt("where_is", "Where is ", ("nyc_place", "world_place")),
    Prompt("where_nyc", "Where in New York City is ", ("nyc_place",)),
    Prompt("when", "When did ", ("historical_figure",)),
    Prompt("when_all_caps", "When did ", ("historical_figure",), transform="upper"),
    Prompt("release", "When was the release date of ", ("art",)),
    Prompt("empty_wo_period", "", ("headline",), transform="strip_period",
           description="the headline without its final period"),
    Prompt("when_w_period", "Publication date of: ", ("headline",)),
    Prompt("when_wo_period", "Publication date of: ", ("headline",), transform="strip_period"),
)}


def list_prompts(kind: str | None = None) -> list[Prompt]:
    """Every prompt, or those that apply to ``kind``."""
    if kind is not None and kind not in KINDS:
        raise PromptError(f"unknown dataset kind {kind!r}; choose one of {', '.join(KINDS)}")
    return [p for p in PROMPTS.values() if p.applies_to(kind)]


def get_prompt(name: str, kind: str | None = None) -> Prompt:
    """The prompt called ``name``; with ``kind``, it must apply to that dataset kind."""
    valid = [p.name for p in list_prompts(kind)]
    p = PROMPTS.get(name)
    if p is None:
        for_kind = f" for {kind}" if kind else ""
        raise PromptError(f"unknown prompt {name!r}; valid prompts{for_kind}: {', '.join(valid)}")
    if not p.applies_to(kind):
        raise PromptError(f"prompt {name!r} is for {', '.join(p.kinds)}, not {kind}; valid "
                          f"prompts for {kind}: {', '.join(valid)}")
    return p
