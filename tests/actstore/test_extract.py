"""Extraction: values vs a one-entity-at-a-time unpadded forward pass, padding sides, resume
(also after kill -9), refusals, overflow, bad inputs, write failures, CLI."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import actstore
from actstore.extract import ExtractError, extract, parse_layers
from actstore.models import ModelError, load_model
from actstore.prompts import get_prompt

REPO = Path(__file__).resolve().parents[2]
FP16_TOL = dict(rtol=2e-3, atol=2e-3)  # fp16 rounding of O(1..10) values


def reference(model, tok, entities, prompt="coords", layers=None, neurons=False):
    """One entity at a time, no padding, no hooks on blocks: HF output_hidden_states, with the
    final norm switched off so the last entry is the last block's raw output."""
    pr = get_prompt(prompt)
    base = model.model
    norm = base.norm
    base.norm = torch.nn.Identity()
    n_blocks = len(base.layers)
    layers = list(range(1, n_blocks + 1)) if layers is None else layers
    out, neu = [], []
    try:
        for e in entities:
            ids = torch.tensor([pr.encode(tok, e)])
            acts = {}
            hs = []
            if neurons:
                hs = [base.layers[k - 1].mlp.down_proj.register_forward_pre_hook(
                    lambda mod, a, k=k: acts.__setitem__(k, a[0][0, -1].clone())) for k in layers]
            with torch.no_grad():
                o = base(input_ids=ids, output_hidden_states=True)
            for h in hs:
                h.remove()
            out.append(torch.stack([o.hidden_states[k][0, -1] for k in layers]))
            if neurons:
                neu.append(torch.stack([acts[k] for k in layers]))
    finally:
        base.norm = norm
    res = torch.stack(out, 1).float().numpy()
    return (res, torch.stack(neu, 1).float().numpy()) if neurons else res


def test_matches_unpadded_single_entity_forward(tmp_path, tiny_model, tiny_tokenizer, world_csv):
    r = extract((tiny_model, tiny_tokenizer), world_csv, "coords", tmp_path / "s.zarr",
                batch_size=7, rows_per_chunk=16, progress=False, neurons=True)
    s = r.store
    assert s.rows_done == 40 and s.layers == [1, 2, 3] and s.d_mlp == 64
    assert r.padding_fraction > 0  # varied lengths: padding happened and was counted
    want, want_neu = reference(tiny_model, tiny_tokenizer, s.entities["entity"], neurons=True)
    got = s.read(slice(0, 40)).astype(np.float32)
    assert np.abs(want).max() > 1  # not a trivially small comparison
    np.testing.assert_allclose(got, want, **FP16_TOL)
    np.testing.assert_allclose(s.read(slice(0, 40), array="neurons").astype(np.float32),
                               want_neu, rtol=2e-3, atol=5e-3)
    assert s.meta["hook_point"].startswith("residual stream")
    assert s.meta["prompt"]["template"] == "What are the lat/lon coordinates of "
    assert s.meta["dataset"]["sha256"] and s.meta["model"]["architecture"] == "LlamaForCausalLM"


def test_left_and_right_padding_give_the_same_store(tmp_path, tiny_model, tiny_tokenizer,
                                                    world_csv):
    kw = dict(batch_size=8, rows_per_chunk=16, progress=False, layers="all+emb")
    a = extract((tiny_model, tiny_tokenizer), world_csv, "where_is", tmp_path / "r.zarr",
                padding_side="right", **kw).store
    b = extract((tiny_model, tiny_tokenizer), world_csv, "where_is", tmp_path / "l.zarr",
                padding_side="left", **kw).store
    assert a.layers == [0, 1, 2, 3]
    x, y = a.read(slice(0, 40)).astype(np.float32), b.read(slice(0, 40)).astype(np.float32)
    np.testing.assert_allclose(x, y, **FP16_TOL)
    want = reference(tiny_model, tiny_tokenizer, a.entities["entity"], "where_is", [0, 1, 2, 3])
    np.testing.assert_allclose(y, want, **FP16_TOL)


def test_tokenizer_padding_side_is_the_default(tmp_path, tiny_model, tiny_tokenizer, world_csv):
    """padding_side not given: the tokenizer's own side (left here) is used and recorded."""
    import copy
    left_tok = copy.deepcopy(tiny_tokenizer)
    left_tok.padding_side = "left"
    kw = dict(batch_size=8, rows_per_chunk=16, progress=False, dtype="float32")
    a = extract((tiny_model, left_tok), world_csv, "coords", tmp_path / "a.zarr", **kw).store
    b = extract((tiny_model, tiny_tokenizer), world_csv, "coords", tmp_path / "b.zarr",
                padding_side="left", **kw).store
    c = extract((tiny_model, tiny_tokenizer), world_csv, "coords", tmp_path / "c.zarr",
                padding_side="right", **kw).store
    assert a.meta["padding_side"] == "left" and c.meta["padding_side"] == "right"
    np.testing.assert_array_equal(a.read(slice(0, 40)), b.read(slice(0, 40)))
    assert (a.read(slice(0, 40)) != c.read(slice(0, 40))).any()  # the side is visible in float32


def test_layer_subset_and_early_stop(tmp_path, tiny_model, tiny_tokenizer, world_csv):
    s = extract((tiny_model, tiny_tokenizer), world_csv, "coords", tmp_path / "s.zarr",
                layers="0,2", progress=False, limit=9).store
    assert s.layers == [0, 2] and s.n_rows == 9
    want = reference(tiny_model, tiny_tokenizer, s.entities["entity"], layers=[0, 2])
    np.testing.assert_allclose(s.read(slice(0, 9)).astype(np.float32), want, **FP16_TOL)


def test_parse_layers():
    assert parse_layers("all", 4) == [1, 2, 3, 4]
    assert parse_layers("all+emb", 2) == [0, 1, 2]
    assert parse_layers("0, 3-4,2", 4) == [0, 2, 3, 4]
    for bad, msg in (("5", "out of range"), ("1,1", "duplicate"), ("a-b", "bad --layers"),
                     ("3-1", "bad --layers"), ("", "no layer")):
        with pytest.raises(ExtractError, match=msg):
            parse_layers(bad, 4)


def test_resume_equals_uninterrupted(tmp_path, tiny_model, tiny_tokenizer, world_csv):
    kw = dict(batch_size=5, rows_per_chunk=8, progress=False)
    full = extract((tiny_model, tiny_tokenizer), world_csv, "coords", tmp_path / "a.zarr", **kw)
    part = extract((tiny_model, tiny_tokenizer), world_csv, "coords", tmp_path / "b.zarr",
                   stop_after_rows=17, **kw)
    assert part.rows_done == 24  # whole windows of 8 rows
    assert not part.store.complete
    res = extract((tiny_model, tiny_tokenizer), world_csv, "coords", tmp_path / "b.zarr", **kw)
    assert res.resumed_from == 24 and res.rows == 16 and res.store.complete
    np.testing.assert_array_equal(res.store.read(slice(0, 40)), full.store.read(slice(0, 40)))


def test_resume_takes_batching_from_the_store(tmp_path, tiny_model, tiny_tokenizer, world_csv,
                                              make_llama):
    """batch_size and padding_side change values at rounding level (visible in float32): a
    resume that does not pass them uses the store's, one that passes others is refused."""
    lm = (tiny_model, tiny_tokenizer)
    kw = dict(rows_per_chunk=8, progress=False, dtype="float32")
    full = extract(lm, world_csv, "coords", tmp_path / "a.zarr", batch_size=5,
                   padding_side="left", **kw).store
    part = extract(lm, world_csv, "coords", tmp_path / "b.zarr", batch_size=5,
                   padding_side="left", stop_after_rows=16, **kw)
    assert part.rows_done == 16
    res = extract(lm, world_csv, "coords", tmp_path / "b.zarr", **kw)  # defaults: the store's
    assert res.resumed_from == 16 and res.store.complete
    np.testing.assert_array_equal(res.store.read(slice(0, 40)), full.read(slice(0, 40)))
    for change, msg in ((dict(batch_size=7), "batch_size: 5 -> 7"),
                        (dict(padding_side="right"), "padding_side: 'left' -> 'right'")):
        with pytest.raises(ExtractError, match="different settings") as ei:
            extract(lm, world_csv, "coords", tmp_path / "a.zarr", **kw, **change)
        assert msg in str(ei.value) and "leave --batch-size" in str(ei.value)
    # the same values passed explicitly are fine
    assert extract(lm, world_csv, "coords", tmp_path / "a.zarr", batch_size=5,
                   padding_side="left", **kw).rows == 0
    # another compute dtype: refused
    m64 = make_llama(len(tiny_tokenizer)).double()
    with pytest.raises(ExtractError, match="compute_dtype: 'float32' -> 'float64'"):
        extract((m64, tiny_tokenizer), world_csv, "coords", tmp_path / "a.zarr", **kw)


def test_mismatched_store_refused_and_overwrite(tmp_path, tiny_model, tiny_tokenizer, world_csv,
                                                make_world_csv):
    lm = (tiny_model, tiny_tokenizer)
    out = tmp_path / "s.zarr"
    extract(lm, world_csv, "coords", out, progress=False, limit=8)
    cases = [(dict(prompt="where_is"), "prompt.name: 'coords' -> 'where_is'"),
             (dict(layers="1,2"), "layers: [1, 2, 3] -> [1, 2]"),
             (dict(dtype="float32"), "dtype: 'float16' -> 'float32'"),
             (dict(limit=9), "dataset.n_rows: 8 -> 9"),
             (dict(neurons=True), "neurons: False -> True")]
    for change, msg in cases:
        kw = dict(prompt="coords", limit=8, progress=False)
        kw.update(change)
        p = kw.pop("prompt")
        with pytest.raises(ExtractError, match="different settings") as ei:
            extract(lm, world_csv, p, out, **kw)
        assert msg in str(ei.value) and "--overwrite" in str(ei.value)
    other = make_world_csv(tmp_path / "other.csv", n=8, seed=5)
    with pytest.raises(ExtractError, match=r"dataset\.(name|sha256)"):
        extract(lm, other, "coords", out, progress=False, limit=8)
    r = extract(lm, world_csv, "where_is", out, progress=False, limit=8, overwrite=True)
    assert r.store.meta["prompt"]["name"] == "where_is" and r.store.complete
    # the same settings again: nothing to do, store untouched
    again = extract(lm, world_csv, "where_is", out, progress=False, limit=8)
    assert again.rows == 0 and again.resumed_from == 8


@pytest.mark.parametrize("name", ["o.zarr", "o.h5"])
def test_resume_refuses_other_layout_options(tmp_path, tiny_model, tiny_tokenizer, world_csv,
                                             name):
    """--rows-per-chunk, --compression and --format were silently ignored on a resume: given
    and different from the store's they are refused with the difference, like the other
    settings; left unset (or given equal) the store's are used."""
    lm = (tiny_model, tiny_tokenizer)
    out = tmp_path / name
    kw = dict(batch_size=5, progress=False)
    part = extract(lm, world_csv, "coords", out, rows_per_chunk=8, stop_after_rows=8, **kw)
    assert part.rows_done == 8
    part.store.close()
    fmt = part.store.format
    other = "hdf5" if fmt == "zarr" else "zarr"
    cases = [(dict(rows_per_chunk=16), "rows_per_chunk: 8 -> 16", "--rows-per-chunk"),
             (dict(compression="zstd"), "compression: 'none' -> 'zstd'", "--compression"),
             (dict(format=other), f"format: '{fmt}' -> '{other}'", "--format"),
             (dict(rows_per_chunk=4, compression="blosc"), "rows_per_chunk: 8 -> 4; "
              "compression: 'none' -> 'blosc'", "--rows-per-chunk / --compression")]
    for change, diff, flags in cases:
        with pytest.raises(ExtractError, match="different settings") as ei:
            extract(lm, world_csv, "coords", out, **kw, **change)
        msg = str(ei.value)
        assert diff in msg and f"(leave {flags} unset to resume with the store's)" in msg
        assert "--overwrite" in msg
    assert actstore.open(out).rows_done == 8   # untouched
    # given equal to the store's: resumed; unset: the store's
    res = extract(lm, world_csv, "coords", out, rows_per_chunk=8, compression="none",
                  format=fmt, stop_after_rows=16, **kw)
    assert res.resumed_from == 8 and res.rows_done == 16
    res.store.close()
    res = extract(lm, world_csv, "coords", out, **kw)
    assert res.resumed_from == 16 and res.store.complete and res.store.rows_per_chunk == 8
    full = extract(lm, world_csv, "coords", tmp_path / "full.zarr", rows_per_chunk=8, **kw)
    np.testing.assert_array_equal(res.store.read(slice(0, 40)), full.store.read(slice(0, 40)))
    # a --rows-per-chunk above the row count is the row count (what the store records)
    assert extract(lm, world_csv, "coords", tmp_path / "full.zarr", rows_per_chunk=8, **kw
                   ).rows == 0
    small = extract(lm, world_csv, "coords", tmp_path / "small.zarr", limit=6,
                    rows_per_chunk=64, **kw)
    assert small.store.rows_per_chunk == 6
    assert extract(lm, world_csv, "coords", tmp_path / "small.zarr", limit=6,
                   rows_per_chunk=100, **kw).rows == 0


def test_overwrite_never_deletes_a_non_store(tmp_path, tiny_model, tiny_tokenizer, world_csv):
    lm = (tiny_model, tiny_tokenizer)
    user = tmp_path / "mydir"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(ExtractError, match="refusing to delete .*mydir: not an activation store"):
        extract(lm, world_csv, "coords", user, progress=False, limit=4, overwrite=True)
    assert (user / "notes.txt").read_text() == "keep me"
    # without --overwrite: not a store, so suggest another --out, never --overwrite
    with pytest.raises(ExtractError, match="not a Zarr v3 store") as ei:
        extract(lm, world_csv, "coords", user, progress=False, limit=4)
    assert "choose another --out" in str(ei.value) and "--overwrite" not in str(ei.value)
    f = tmp_path / "data.h5"
    f.write_bytes(b"plain bytes")
    with pytest.raises(ExtractError, match="refusing to delete"):
        extract(lm, world_csv, "coords", f, progress=False, limit=4, overwrite=True)
    assert f.read_bytes() == b"plain bytes"


def test_fp16_overflow_is_an_error_naming_layer_and_row(tmp_path, tiny_tokenizer, world_csv,
                                                       make_llama):
    m = make_llama(len(tiny_tokenizer), seed=1)
    with torch.no_grad():  # blow up block 2's MLP output: hidden states 2 and 3 exceed 65504
        m.model.layers[1].mlp.down_proj.weight.mul_(1e5)
    with pytest.raises(ExtractError) as ei:
        extract((m, tiny_tokenizer), world_csv, "coords", tmp_path / "o.zarr", progress=False)
    msg = str(ei.value)
    assert "layer 2, row " in msg and "65504" in msg and "--dtype bfloat16" in msg
    row = int(msg.split("row ")[1].split(" ")[0])
    assert 0 <= row < 40
    assert actstore.open(tmp_path / "o.zarr").rows_done == 0  # nothing bad stored
    s = extract((m, tiny_tokenizer), world_csv, "coords", tmp_path / "f.zarr", dtype="float32",
                progress=False).store
    assert np.abs(s.layer(2)).max() > 65504 and np.isfinite(s.layer(3)).all()


def test_fp16_compute_overflow_suggests_bfloat16_compute(tmp_path, tiny_tokenizer, world_csv,
                                                         make_llama):
    """A model computing in float16 (CUDA auto) overflows inside the forward pass: a wider
    stored dtype alone does not help, so the message names --compute-dtype bfloat16."""
    m = make_llama(len(tiny_tokenizer), seed=1)
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.weight.mul_(1e5)
    m16 = m.half()
    with pytest.raises(ExtractError) as ei:
        extract((m16, tiny_tokenizer), world_csv, "coords", tmp_path / "o.zarr", progress=False,
                limit=8)
    assert "--compute-dtype bfloat16" in str(ei.value) and "layer 2" in str(ei.value)
    with pytest.raises(ExtractError) as ei:
        extract((m16, tiny_tokenizer), world_csv, "coords", tmp_path / "p.zarr", progress=False,
                limit=8, dtype="float32")
    assert "--compute-dtype bfloat16 or float32" in str(ei.value)


def test_bad_inputs(tmp_path, tiny_model, tiny_tokenizer, world_csv):
    lm = (tiny_model, tiny_tokenizer)
    from actstore.datasets import DatasetError
    from actstore.prompts import PromptError
    with pytest.raises(ExtractError, match="at least 1"):
        extract(lm, world_csv, "coords", tmp_path / "a.zarr", limit=0, progress=False)
    empty = tmp_path / "empty.csv"
    empty.write_text(world_csv.read_text().splitlines()[0] + "\n")
    with pytest.raises((ExtractError, DatasetError)):
        extract(lm, empty, "coords", tmp_path / "a.zarr", progress=False)
    with pytest.raises(PromptError, match="unknown prompt"):
        extract(lm, world_csv, "nope", tmp_path / "a.zarr", progress=False)
    with pytest.raises(ExtractError, match="out of range"):
        extract(lm, world_csv, "coords", tmp_path / "a.zarr", layers="9", progress=False)
    with pytest.raises(ExtractError, match="embeddings have no MLP"):
        extract(lm, world_csv, "coords", tmp_path / "a.zarr", layers="0,1", neurons=True,
                progress=False)
    with pytest.raises(ExtractError, match="does not exist"):
        extract(lm, world_csv, "coords", tmp_path / "no" / "dir" / "a.zarr", progress=False)
    (tmp_path / "junk").mkdir()
    with pytest.raises(ExtractError, match="not a Zarr v3 store.*--overwrite"):
        extract(lm, world_csv, "coords", tmp_path / "junk", progress=False)
    with pytest.raises(ModelError, match="does not exist"):
        load_model("./no/such/model")


def _with_name(csv, tmp_path, row: int, name: str):
    """A copy of ``csv`` whose row ``row`` is named ``name``."""
    import pandas as pd
    t = pd.read_csv(csv)
    t.loc[row, "name"] = name
    out = tmp_path / f"named{row}.csv"
    t.to_csv(out, index=False)
    return out


def test_a_row_over_the_context_is_refused_before_any_forward(tmp_path, tiny_model,
                                                              tiny_tokenizer, world_csv):
    """The issue: a 10,000-character name became 12,712 tokens, past the model's 8,192
    positions, without a word. With the tiny model (256 positions): an error naming the row,
    its length and the limit, before any forward pass and before the store is touched."""
    from actstore.datasets import load_dataset
    from actstore.store.lock import lock_path
    lm = (tiny_model, tiny_tokenizer)
    long = ("Saint Abbey Castle " * 600)[:9999] + "X"
    bad = _with_name(world_csv, tmp_path, 13, long)
    entity = load_dataset(str(bad)).table["entity"][13]
    n = len(get_prompt("coords").encode(tiny_tokenizer, entity))
    assert len(entity) == 10_000 and n > 256
    calls = []
    hook = tiny_model.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    out = tmp_path / "s.zarr"
    try:
        with pytest.raises(ExtractError) as ei:
            extract(lm, bad, "coords", out, progress=False)
        # an explicit --max-tokens names itself and the model's context
        with pytest.raises(ExtractError, match=r"row 0 .* over the limit of 20 \(--max-tokens\)"
                           r" \(and \d+ more rows\); fix or drop the row in the dataset, or "
                           r"raise --max-tokens \(up to the model's context, 256\)"):
            extract(lm, world_csv, "coords", out, progress=False, max_tokens=20)
        with pytest.raises(ExtractError, match="--max-tokens 300 exceeds the model's context "
                                               "length of 256 tokens"):
            extract(lm, world_csv, "coords", out, progress=False, max_tokens=300)
    finally:
        hook.remove()
    assert str(ei.value) == (
        f"row 13 ('{long[:40]}'... (10000 characters)) is {n} tokens long (BOS + prompt + "
        "entity), over the limit of 256 (the model's context length); the model cannot read "
        "it whole: fix or drop the row in the dataset")
    assert not calls and not out.exists() and not lock_path(out).exists()
    # within the limit: fine (the longest row of world_csv is 26 tokens)
    assert extract(lm, world_csv, "coords", out, progress=False, max_tokens=26).store.complete


def test_max_tokens_default_and_context_length(tiny_model, make_llama):
    from actstore.extract.tokens import MAX_TOKENS_CAP, token_limit
    from actstore.models import context_length
    assert MAX_TOKENS_CAP == 8192
    assert context_length(tiny_model) == 256
    assert token_limit(None, 256) == (256, "the model's context length")
    assert token_limit(None, 131072) == (8192, "the default cap; the model's context is 131072")
    assert token_limit(None, None)[0] == 8192
    assert token_limit(100, 256) == (100, "--max-tokens")
    assert token_limit(100, None) == (100, "--max-tokens")
    with pytest.raises(ExtractError, match="exceeds the model's context length of 256"):
        token_limit(257, 256)
    with pytest.raises(ExtractError, match="--max-tokens must be at least 1"):
        from actstore.extract import ExtractConfig
        ExtractConfig(max_tokens=0)

    class Cfg:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    class M:
        def __init__(self, cfg):
            self.config = cfg
    assert context_length(M(Cfg(n_positions=1024))) == 1024                      # GPT-2
    assert context_length(M(Cfg(text_config=Cfg(max_position_embeddings=9)))) == 9  # multimodal
    assert context_length(M(Cfg(hidden_size=8))) is None


def test_batches_over_the_token_budget_are_split_only_they():
    from actstore.extract import plan_batches
    lengths = [5, 3, 200, 4, 4, 6, 2, 7, 3, 3]
    assert plan_batches(lengths, 4) == [[2, 7, 5, 0], [3, 4, 1, 8], [9, 6]]
    # 4 x 200 slots > 64: the long row alone, the rest of its batch together; others unchanged
    assert plan_batches(lengths, 4, 64) == [[2], [7, 5, 0], [3, 4, 1, 8], [9, 6]]
    assert plan_batches([50, 40, 30, 20, 10], 5, 100) == [[0, 1], [2, 3, 4]]
    rng = np.random.default_rng(0)
    for _ in range(50):   # within the budget: exactly the plan of batch_size alone
        ls = rng.integers(1, 17, size=int(rng.integers(1, 70))).tolist()
        b = int(rng.integers(1, 9))
        assert plan_batches(ls, b, b * 16) == plan_batches(ls, b)
        for batch in plan_batches(ls, b, 24):
            assert len(batch) == 1 or len(batch) * ls[batch[0]] <= 24


def test_one_long_row_cannot_blow_up_its_batch(tmp_path, tiny_model, tiny_tokenizer, world_csv,
                                               monkeypatch):
    """A long row goes in a batch of its own (the budget: batch_size x BATCH_TOKENS_PER_ROW
    token slots, shrunk here so that the tiny model's rows can reach it); every other batch
    keeps its rows, and the values match the unpadded one-entity forward."""
    from actstore.extract import capture
    lm = (tiny_model, tiny_tokenizer)
    data = _with_name(world_csv, tmp_path, 13, "Saint Abbey Castle " * 30 + "Bay")
    shapes = []
    real = capture._batch_tensors

    def spy(seqs, *a):
        shapes.append((len(seqs), max(len(q) for q in seqs)))
        return real(seqs, *a)
    monkeypatch.setattr(capture, "_batch_tensors", spy)
    kw = dict(batch_size=8, rows_per_chunk=16, progress=False)
    plain = extract(lm, data, "coords", tmp_path / "plain.zarr", **kw).store
    before, shapes[:] = list(shapes), []
    monkeypatch.setattr(capture, "BATCH_TOKENS_PER_ROW", 27)   # 8 x 27: rows of <= 26 fit
    s = extract(lm, data, "coords", tmp_path / "split.zarr", **kw).store
    longest = before[0][1]
    assert longest > 180 and before[0] == (8, longest)          # was: 8 x 191 token slots
    assert shapes[0] == (1, longest) and shapes[1][0] == 7      # now: 1 x 191, then 7 rows
    assert shapes[2:] == before[1:]                              # the other batches unchanged
    assert all(b * t <= 8 * 27 for b, t in shapes[1:])
    want = reference(tiny_model, tiny_tokenizer, s.entities["entity"])
    np.testing.assert_allclose(s.read(slice(0, 40)).astype(np.float32), want, **FP16_TOL)
    np.testing.assert_array_equal(s.read(slice(16, 40)), plain.read(slice(16, 40)))


def test_unwritable_path(tmp_path, tiny_model, tiny_tokenizer, world_csv):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ExtractError, match="cannot create store"):
        extract((tiny_model, tiny_tokenizer), world_csv, "coords", tmp_path / "afile" / "s.zarr",
                progress=False)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores modes")
def test_unwritable_directory(tmp_path, tiny_model, tiny_tokenizer, world_csv):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ExtractError, match="not writable"):
            extract((tiny_model, tiny_tokenizer), world_csv, "coords", ro / "s.zarr",
                    progress=False)
    finally:
        ro.chmod(0o700)


def test_disk_full_keeps_done_rows_and_resumes(tmp_path, tiny_model, tiny_tokenizer, world_csv,
                                               monkeypatch):
    from actstore.store import ActivationStore
    lm = (tiny_model, tiny_tokenizer)
    kw = dict(batch_size=5, rows_per_chunk=8, progress=False)
    real = ActivationStore.write_rows
    calls = {"n": 0}

    def flaky(self, start, resid, neurons=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, start, resid, neurons)

    monkeypatch.setattr(ActivationStore, "write_rows", flaky)
    with pytest.raises(ExtractError, match="disk is full.*0..16 are stored.*resume"):
        extract(lm, world_csv, "coords", tmp_path / "s.zarr", **kw)
    monkeypatch.setattr(ActivationStore, "write_rows", real)
    assert actstore.open(tmp_path / "s.zarr").rows_done == 16
    res = extract(lm, world_csv, "coords", tmp_path / "s.zarr", **kw)
    assert res.resumed_from == 16 and res.store.complete
    full = extract(lm, world_csv, "coords", tmp_path / "full.zarr", **kw).store
    np.testing.assert_array_equal(res.store.read(slice(0, 40)), full.read(slice(0, 40)))


def test_hdf5_store_same_values(tmp_path, tiny_model, tiny_tokenizer, world_csv):
    lm = (tiny_model, tiny_tokenizer)
    kw = dict(batch_size=6, rows_per_chunk=8, progress=False)
    z = extract(lm, world_csv, "coords", tmp_path / "s.zarr", **kw).store
    part = extract(lm, world_csv, "coords", tmp_path / "s.h5", stop_after_rows=9, **kw)
    assert part.store.format == "hdf5" and part.rows_done == 16
    part.store.close()  # HDF5: no writer while a reader holds the file
    h = extract(lm, world_csv, "coords", tmp_path / "s.h5", **kw).store
    np.testing.assert_array_equal(h.read(slice(0, 40)), z.read(slice(0, 40)))
    assert h.entities.equals(z.entities)


def _cli(*args, **kw):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "actstore", *args], cwd=str(REPO), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _rows_done(path: Path) -> int:
    try:
        if path.suffix == ".h5":
            import h5py
            # the writer holds the file open: read without HDF5's lock (a rows_done poll only)
            with h5py.File(path, "r", locking=False) as f:
                return int(f["rows_done"][0])
        return int(json.loads((path / "zarr.json").read_text())["attributes"]["rows_done"])
    except Exception:  # noqa: BLE001 - not there yet / being created
        return -1


@pytest.mark.parametrize("name", ["k.zarr", "k.h5"])
def test_kill_9_then_resume_gives_identical_store(tmp_path, tiny_model_dir, make_world_csv, name):
    """SIGKILL the CLI at random points while it writes; resuming must give the same bytes as
    an uninterrupted run of the same command."""
    n = 160
    csv = make_world_csv(tmp_path / "w.csv", n=n, seed=3)
    args = ["extract", "--model", str(tiny_model_dir), "--dataset", str(csv), "--prompt",
            "coords", "--batch-size", "3", "--rows-per-chunk", "8", "--no-progress",
            "--device", "cpu"]
    out = tmp_path / name
    rng = np.random.default_rng()
    kills = 0
    for _ in range(2 if out.suffix == ".zarr" else 1):  # fewer model loads for the second
        p = _cli(*args, "--out", str(out))
        start = max(0, _rows_done(out))
        target = start + 8 * int(rng.integers(1, 6))
        t0 = time.time()
        while p.poll() is None and _rows_done(out) < target and time.time() - t0 < 120:
            time.sleep(0.002)
        time.sleep(float(rng.uniform(0, 0.05)))  # land anywhere inside a window / a write
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.communicate()
    assert kills >= 1, "the run finished before it could be killed"
    p = _cli(*args, "--out", str(out))
    so, se = p.communicate(timeout=300)
    assert p.returncode == 0, se
    assert "resumed at row" in so
    ref = _cli(*args, "--out", str(tmp_path / ("ref" + out.suffix)))
    so2, se2 = ref.communicate(timeout=300)
    assert ref.returncode == 0, se2
    a, b = actstore.open(out), actstore.open(tmp_path / ("ref" + out.suffix))
    assert a.format == b.format == ("hdf5" if name.endswith(".h5") else "zarr")
    assert a.rows_done == b.rows_done == n
    np.testing.assert_array_equal(a.read(slice(0, n)), b.read(slice(0, n)))
    if out.is_dir():
        assert not list(out.rglob("*.partial"))


def test_cli_end_to_end(tmp_path, tiny_model_dir, world_csv, capsys):
    from actstore.cli import main
    out = tmp_path / "c.zarr"
    rc = main(["extract", "--model", str(tiny_model_dir), "--dataset", str(world_csv),
               "--prompt", "coords", "--out", str(out), "--limit", "12", "--no-progress",
               "--layers", "1,3", "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 0 and "12/12 rows x 2 layers x 32" in captured.out
    s = actstore.open(out)
    assert s.layers == [1, 3] and s.meta["model"]["source"] == "local"
    assert s.meta["model"]["files_sha256"]["model.safetensors"]
    # errors: one line, exit 2, no traceback
    rc = main(["extract", "--model", str(tiny_model_dir), "--dataset", str(world_csv),
               "--prompt", "where_is", "--out", str(out), "--limit", "12", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "different settings" in err and "Traceback" not in err
    rc = main(["extract", "--model", "no-such-org/no-such-model-xyz", "--dataset",
               str(world_csv), "--prompt", "coords", "--out", str(tmp_path / "m.zarr")])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot load model 'no-such-org/no-such-model-xyz'" in err


def test_cli_drop_invalid(tmp_path, tiny_model_dir, world_csv, capsys):
    """The dataset error tells users to pass --drop-invalid: extract accepts it."""
    import pandas as pd

    from actstore.cli import main
    bad = tmp_path / "bad.csv"
    t = pd.read_csv(world_csv)
    t.loc[3, "latitude"] = 123.0  # not a latitude
    t.to_csv(bad, index=False)
    args = ["extract", "--model", str(tiny_model_dir), "--dataset", str(bad), "--prompt",
            "coords", "--out", str(tmp_path / "d.zarr"), "--no-progress", "--device", "cpu"]
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2 and "--drop-invalid" in err and "latitude" in err
    assert main(args + ["--drop-invalid"]) == 0
    s = actstore.open(tmp_path / "d.zarr")
    assert s.n_rows == 39 and s.meta["dataset"]["n_dropped"] == 1
    assert t.loc[3, "name"] not in set(s.entities["name"])


def test_cli_help_teaches():
    import dataclasses

    from actstore.extract import ExtractConfig
    from actstore.options import field_docs
    p = _cli("extract", "--help")
    so, se = p.communicate(timeout=120)
    assert p.returncode == 0
    for word in ("examples:", "--neurons", "--dtype", "resumes", "--overwrite", "smollm2-135m",
                 "--repair", "actstore verify"):
        assert word in so
    # every option's help is its ExtractConfig field's docstring (compared without whitespace:
    # argparse wraps lines, also after a hyphen)
    flat, docs = "".join(so.split()), field_docs(ExtractConfig)
    for f in dataclasses.fields(ExtractConfig):
        hidden = f.metadata.get("cli", {}).get("hidden")
        if not hidden or f.name == "progress":   # progress: the --no-progress flag
            assert "".join(docs[f.name].split()) in flat, f.name
    assert "--no-progress" in so and "--padding-side" not in so and "--stop-after" not in so


def test_config_is_the_keyword_api_and_the_command_line(tmp_path, tiny_model, tiny_tokenizer,
                                                        world_csv):
    from actstore.cli import build_parser
    from actstore.extract import ExtractConfig
    from actstore.options import from_args
    lm = (tiny_model, tiny_tokenizer)
    kw = dict(limit=8, batch_size=5, rows_per_chunk=8, progress=False)
    cfg = ExtractConfig(dataset=str(world_csv), prompt="coords", out=str(tmp_path / "c.zarr"),
                        **kw)
    a = extract(lm, config=cfg).store
    b = extract(lm, world_csv, "coords", tmp_path / "k.zarr", **kw).store
    np.testing.assert_array_equal(a.read(slice(0, 8)), b.read(slice(0, 8)))
    # arguments and keywords replace the config's fields
    c = extract(lm, out=tmp_path / "l.zarr", config=cfg, layers="1,3").store
    assert c.layers == [1, 3] and a.layers == [1, 2, 3]
    with pytest.raises(TypeError, match="batch_sz"):
        extract(lm, config=cfg, batch_sz=3)
    with pytest.raises(ExtractError, match="needs dataset, prompt"):
        extract(lm, out=tmp_path / "m.zarr")
    with pytest.raises(ExtractError, match="--batch-size must be at least 1"):
        ExtractConfig(batch_size=0)
    # the command line's defaults are the dataclass's
    args = build_parser().parse_args(["extract", "--dataset", "d", "--prompt", "p", "--out", "o"])
    assert from_args(ExtractConfig, args) == ExtractConfig(dataset="d", prompt="p", out="o")
    args = build_parser().parse_args(["extract", "--dataset", "d", "--prompt", "p", "--out", "o",
                                      "--no-progress", "--batch-size", "4", "--neurons",
                                      "--max-tokens", "64"])
    assert from_args(ExtractConfig, args) == ExtractConfig(
        dataset="d", prompt="p", out="o", progress=False, batch_size=4, neurons=True,
        max_tokens=64)


@pytest.mark.slow
def test_embedded_smollm2_matches_unpadded(tmp_path, make_world_csv):
    lm = load_model("smollm2-135m", device="cpu")
    assert lm.n_layers == 30 and lm.d_model == 576
    assert lm.info["file_sha256"] and lm.info["file"].endswith(".gguf")
    csv = make_world_csv(tmp_path / "w.csv", n=6, seed=7)
    s = extract(lm, csv, "coords", tmp_path / "s.zarr", batch_size=6, progress=False).store
    want = reference(lm.model, lm.tokenizer, s.entities["entity"])
    got = s.read(slice(0, 6)).astype(np.float32)
    # fp16 keeps ~3 significant digits; SmolLM2's residual has a few large outlier dims
    np.testing.assert_allclose(got, want, rtol=3e-3, atol=3e-3 * np.abs(want).max())
    assert s.n_layers == 30 and s.d_model == 576


def test_store_records_the_dtype_and_why(tmp_path, tiny_model, tiny_tokenizer, world_csv):
    """--dtype auto (the default) resolves per model before the store is made, and the meta
    records the choice and why: float16 by default, float32 for a model known to exceed float16
    (a model recorded as gemma3-270m), the given dtype as given. A resume with auto finds the
    store's dtype again."""
    from actstore.models import wrap_model
    kw = dict(progress=False, limit=8)
    a = extract((tiny_model, tiny_tokenizer), world_csv, "coords", tmp_path / "a.zarr", **kw)
    assert a.store.dtype == "float16" and a.store.meta["dtype"] == "float16"
    assert a.store.meta["dtype_reason"].startswith("auto: default: float16")
    lm = wrap_model(tiny_model, tiny_tokenizer, "gemma3-270m")
    g = extract(lm, world_csv, "coords", tmp_path / "g.zarr", **kw)
    assert g.store.dtype == "float32" and g.store.read(slice(0, 8)).dtype == np.float32
    assert g.store.meta["dtype_reason"].startswith("auto: gemma3-270m's residual stream exceeds")
    assert extract(lm, world_csv, "coords", tmp_path / "g.zarr", **kw).rows == 0   # resumed
    b = extract((tiny_model, tiny_tokenizer), world_csv, "coords", tmp_path / "b.zarr",
                dtype="bfloat16", **kw)
    assert b.store.dtype == "bfloat16" and b.store.meta["dtype_reason"] == "given: bfloat16"
    with pytest.raises(ExtractError, match="choose auto, float16, bfloat16 or float32"):
        extract((tiny_model, tiny_tokenizer), world_csv, "coords", tmp_path / "c.zarr",
                dtype="int8", **kw)


@pytest.mark.slow
def test_embedded_gemma_stores_float32_by_default(tmp_path):
    """Gemma-3-270M's residual stream exceeds float16: at BOS it reaches ~1e5 (> 65504; its
    entity tokens stay near 3-5e4 on the built-ins, bench/RESULTS.md). A default extraction of
    every token picks float32, never hits the overflow guard, stores those values as an
    unpadded one-text forward computes them and records why; float16, asked for, is refused.
    24 world cities: ~1 min with the load from the float32 cache (first use: + ~1 min to
    assemble and convert the GGUF)."""
    from actstore.datasets import load_dataset
    lm = load_model("gemma3-270m", device="cpu")
    assert (lm.n_layers, lm.d_model) == (18, 640)
    ds = load_dataset("world_cities").head(24)
    s = extract(lm, ds, "empty", tmp_path / "g.zarr", layers="all+emb", position="all",
                batch_size=1, progress=False).store
    assert s.dtype == "float32" and s.meta["dtype"] == "float32"
    assert "exceeds the float16 range" in s.meta["dtype_reason"]
    got = s.read(slice(0, s.n_rows))
    assert got.dtype == np.float32 and np.isfinite(got).all()
    assert np.abs(got).max() > 65504
    base = lm.model.model
    norm, base.norm = base.norm, torch.nn.Identity()   # the last block's raw output
    try:
        for i in range(s.n_texts):
            rows = slice(int(s.text_offsets[i]), int(s.text_offsets[i + 1]))
            ids = torch.as_tensor(s.token_ids[rows], dtype=torch.long)[None]
            with torch.no_grad():
                hs = base(input_ids=ids, output_hidden_states=True).hidden_states
            want = torch.stack([h[0] for h in hs]).numpy()
            np.testing.assert_allclose(got[:, rows], want, rtol=1e-5, atol=1e-3)
    finally:
        base.norm = norm
    with pytest.raises(ExtractError, match="65504"):
        extract(lm, ds.head(2), "empty", tmp_path / "h.zarr", position="all", dtype="float16",
                progress=False)


@pytest.mark.gpu
def test_cuda_extraction_matches_cpu(tmp_path, tiny_model, tiny_tokenizer, world_csv):
    """GPU path (pinned staging, copy-out one batch late) stores what the CPU path stores."""
    import copy
    kw = dict(batch_size=7, rows_per_chunk=16, progress=False, neurons=True)
    cpu = extract((tiny_model, tiny_tokenizer), world_csv, "coords", tmp_path / "c.zarr", **kw)
    gpu_model = copy.deepcopy(tiny_model).to("cuda")
    gpu = extract((gpu_model, tiny_tokenizer), world_csv, "coords", tmp_path / "g.zarr", **kw)
    for arr in ("resid", "neurons"):
        np.testing.assert_allclose(gpu.store.read(slice(0, 40), array=arr).astype(np.float32),
                                   cpu.store.read(slice(0, 40), array=arr).astype(np.float32),
                                   rtol=5e-3, atol=1e-2)
    half = extract((gpu_model.half(), tiny_tokenizer), world_csv, "coords", tmp_path / "h.zarr",
                   **kw)
    # fp16 compute: per-element rounding grows through the layers (one value of 3840 was off by
    # 0.054 on an H200); bound the error relative to the activations' scale instead
    h = half.store.read(slice(0, 40)).astype(np.float32)
    c = cpu.store.read(slice(0, 40)).astype(np.float32)
    assert np.abs(h - c).max() <= 0.05 * np.abs(c).max()
    assert np.linalg.norm(h - c) <= 0.01 * np.linalg.norm(c)
