"""Shared test configuration: paths to the real paper CSVs, GPU skipping, and the tiny
in-process model (a random Llama + a byte-level BPE tokenizer, no downloads) with a small
synthetic world_place CSV."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# Without a GPU, Triton kernels run under its interpreter. triton.jit (its standard library
# included) reads TRITON_INTERPRET when triton is first imported, so it is set here, before any
# test module can import triton; a later switch cannot undo already-compiled helpers.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
# ../shared beside the checkout (CI lays a copy there too); never copied into the repo.
PAPER_DATA = REPO.parent / "shared" / "datasets" / "paper"


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; run bench/gpu_check.sh on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def paper_data() -> Path:
    if not (PAPER_DATA / "world_place.csv").exists():
        pytest.fail(f"the paper's CSVs are expected in {PAPER_DATA} (../shared/datasets/paper)")
    return PAPER_DATA


# ----------------------------------------------------------------------------- tiny model

WORDS = ["Paris", "Lake", "Mount", "River", "Saint", "Zürich", "New", "Port", "Fort", "Isla",
         "Tower", "Bridge", "of", "the", "North", "São", "Ōsaka", "Abbey", "Castle", "Bay"]
CORPUS = ["What are the lat/lon coordinates of ", "Where is ", "Where in the United States is "]


def _names(n, seed=0):
    rng = np.random.default_rng(seed)
    # varied lengths (1..7 words) so batches need padding
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 8)))) + f" {i}" for i in range(n)]


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(CORPUS * 5 + WORDS * 3, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def make_tiny_llama(vocab_size, layers=3, hidden=32, seed=0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the 0.02 init: states that differ visibly
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10.0)
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    return make_tiny_llama(len(tiny_tokenizer))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_model, tiny_tokenizer):
    """The tiny model + tokenizer saved as a local HF directory (for CLI/subprocess tests)."""
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_model.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


def write_world_csv(path, n=40, seed=0):
    import pandas as pd
    rng = np.random.default_rng(seed)
    pd.DataFrame({
        "name": _names(n, seed),
        "entity_subtype": "City",
        "country": rng.choice(["France", "Japan", "Brazil"], size=n),
        "latitude": rng.uniform(-80, 80, n).round(4),
        "longitude": rng.uniform(-170, 170, n).round(4),
        "has_thumbnail": 1,
        "page_views": 100.0,
        "entity_type": "populated_place",
        "total_area": "",
        "population": "",
        "is_test": rng.random(n) < 0.25,
    }).to_csv(path, index=False)
    return path


@pytest.fixture()
def world_csv(tmp_path):
    return write_world_csv(tmp_path / "tiny_world.csv")


@pytest.fixture(scope="session")
def make_world_csv():
    """write_world_csv(path, n=40, seed=0) -> path (a synthetic world_place CSV)."""
    return write_world_csv


@pytest.fixture(scope="session")
def make_llama():
    """make_tiny_llama(vocab_size, layers=3, hidden=32, seed=0) -> a fresh random Llama."""
    return make_tiny_llama
