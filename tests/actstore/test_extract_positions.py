"""Positions (last-entity, last, first-entity, mean, all) and sites (resid, attn_out, mlp_out,
neurons) against plain transformers: one text at a time, no padding, HF output_hidden_states
(final norm off) and forward hooks on the modules; left and right padding, BOS and no-BOS
tokenizers, an entity in the middle of a template, a table without entities; ragged stores
(--position all) resumed after a stop and after kill -9; identity and option refusals."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import actstore
from actstore.extract import ExtractConfig, ExtractError, extract
from actstore.prompts import get_prompt

REPO = Path(__file__).resolve().parents[2]
SITES = ("resid", "attn_out", "mlp_out", "neurons")
TEMPLATE = "The capital of {entity} is a city"
ENTITIES = ["Paris", "Lake Mount River", "Saint Zürich", "New Port of the North", "Ōsaka Bay",
            "Fort Isla", "Tower Bridge Abbey", "São Castle", "Mount", "Bay of Paris 7"]


# ----------------------------------------------------------------------------- reference

def states(model, ids: list[int], layers: list[int]) -> dict[str, np.ndarray]:
    """{site: (L, T, d) float64} of one unpadded text: hidden_states for resid (the final
    norm switched off), forward hooks on self_attn / mlp and a pre-hook on down_proj."""
    base = model.model
    norm, base.norm = base.norm, torch.nn.Identity()
    acts = {s: {} for s in SITES[1:]}
    hooks = []
    for k in (x for x in layers if x >= 1):
        blk = base.layers[k - 1]
        hooks += [
            blk.self_attn.register_forward_hook(
                lambda m, a, o, k=k: acts["attn_out"].__setitem__(k, o[0][0].clone())),
            blk.mlp.register_forward_hook(
                lambda m, a, o, k=k: acts["mlp_out"].__setitem__(k, o[0].clone())),
            blk.mlp.down_proj.register_forward_pre_hook(
                lambda m, a, k=k: acts["neurons"].__setitem__(k, a[0][0].clone()))]
    try:
        with torch.no_grad():
            o = base(input_ids=torch.tensor([ids]), output_hidden_states=True)
    finally:
        base.norm = norm
        for h in hooks:
            h.remove()
    out = {"resid": np.stack([o.hidden_states[k][0].double().numpy() for k in layers])}
    if all(k >= 1 for k in layers):
        for s in SITES[1:]:
            out[s] = np.stack([acts[s][k].double().numpy() for k in layers])
    return out


def span_by_offsets(tok, text: str, start: int, end: int, head: int) -> tuple[int, int]:
    """The entity's tokens, found with a plain loop over the offsets (the test's own code)."""
    offs = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    hit = [j for j, (s, e) in enumerate(offs) if e > s and s < end and e > start]
    return hit[0] + head, hit[-1] + 1 + head


def expected(st: dict, position: str, span, n: int, head: int) -> dict:
    """{site: (L, rows, d)} one text gives at ``position``."""
    a, b = span if span is not None else (None, None)
    pick = {"last": [n - 1], "last-entity": [b - 1] if b else [n - 1],
            "first-entity": [a] if a is not None else None, "all": list(range(n))}
    out = {}
    for site, x in st.items():
        if position == "mean":
            lo, hi = (a, b) if span is not None else (head, n)
            out[site] = x[:, lo:hi].mean(1, keepdims=True)
        else:
            out[site] = x[:, pick[position]]
    return out


def close(got, want, rel=2e-5):
    """float32 batched vs unbatched: equal up to rounding, relative to the values' scale."""
    got = np.asarray(got, dtype=np.float64)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=rel * scale * 50)


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture()
def table_csv(tmp_path):
    """A table of your own: an entity column (the template puts it mid-sentence), a text
    column with the entity somewhere inside, a class and a regression target."""
    rng = np.random.default_rng(0)
    n = len(ENTITIES)
    texts = [f"Where is {e} of the North" if i % 2 else f"{e} Bridge" for i, e in
             enumerate(ENTITIES)]
    path = tmp_path / "own.csv"
    pd.DataFrame({"city": ENTITIES, "sentence": texts,
                  "label": ["a", "b"] * (n // 2), "score": rng.normal(size=n)}
                 ).to_csv(path, index=False)
    return path


def _texts(ds):
    t = ds.table
    return t["text"].tolist(), t["entity_start"].tolist(), t["entity_end"].tolist()


def no_bos(tok):
    t = copy.deepcopy(tok)
    t.bos_token = None
    assert t.bos_token_id is None
    return t


# ----------------------------------------------------------------------------- paper prompts

@pytest.mark.parametrize("side", ["left", "right"])
def test_every_site_in_one_pass_matches_module_hooks(tmp_path, tiny_model, tiny_tokenizer,
                                                     world_csv, side):
    calls = []
    hook = tiny_model.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    try:
        r = extract((tiny_model, tiny_tokenizer), world_csv, "coords", tmp_path / "s.zarr",
                    sites="resid,attn_out,mlp_out", neurons=True, batch_size=7,
                    rows_per_chunk=16, dtype="float32", padding_side=side, progress=False)
    finally:
        hook.remove()
    s = r.store
    assert tuple(s.sites) == SITES and s.position == "last-entity"
    assert s.d_sites == {"resid": 32, "attn_out": 32, "mlp_out": 32, "neurons": 64}
    assert len(calls) == 8   # windows of 16, 16, 8 rows in batches of 7: one forward each
    assert s.meta["sites"] == list(SITES) and set(s.meta["hook_points"]) == set(SITES)
    assert "post-attention norm" in s.meta["hook_points"]["attn_out"]
    pr = get_prompt("coords")
    for i, e in enumerate(s.entities["entity"]):
        ids = pr.encode(tiny_tokenizer, e)
        st = states(tiny_model, ids, [1, 2, 3])
        for site in SITES:
            close(s.read(slice(i, i + 1), site=site)[:, 0], st[site][:, -1])
    # attn_out + mlp_out is the residual update of a pre-norm block: resid_l = resid_{l-1} +
    # attn_out_l + mlp_out_l (Llama)
    r1, r2 = s.read(slice(0, 40), layers=[1, 2], site="resid").astype(np.float64)
    a2 = s.read(slice(0, 40), layers=[2], site="attn_out")[0].astype(np.float64)
    m2 = s.read(slice(0, 40), layers=[2], site="mlp_out")[0].astype(np.float64)
    close(r2, r1 + a2 + m2, rel=1e-5)


@pytest.mark.parametrize("position", ["first-entity", "mean", "last"])
def test_paper_prompt_positions(tmp_path, tiny_model, tiny_tokenizer, world_csv, position):
    s = extract((tiny_model, tiny_tokenizer), world_csv, "where_is", tmp_path / "p.zarr",
                position=position, sites="resid" if position == "last" else "resid,mlp_out",
                layers="all+emb" if position == "last" else "all", batch_size=5,
                rows_per_chunk=8, dtype="float32", padding_side="left", limit=12,
                progress=False).store
    assert s.position == position and s.meta["position"] == position
    layers = s.layers
    pr = get_prompt("where_is")
    for i, e in enumerate(s.entities["entity"]):
        ids = pr.encode(tiny_tokenizer, e)
        span = span_by_offsets(tiny_tokenizer, pr.text(e), len(pr.template), len(pr.text(e)), 1)
        assert span[1] == len(ids)   # the entity ends the text
        want = expected(states(tiny_model, ids, layers), position, span, len(ids), 1)
        close(s.read(slice(i, i + 1), site="resid")[:, 0], want["resid"][:, 0])
        if "mlp_out" in s.sites:
            close(s.read(slice(i, i + 1), site="mlp_out")[:, 0], want["mlp_out"][:, 0])


def test_paper_last_entity_default_unchanged(tmp_path, tiny_model, tiny_tokenizer, world_csv):
    """position last-entity given explicitly is the default: the same bytes; last is the same
    token for the paper's prompts."""
    kw = dict(batch_size=5, rows_per_chunk=8, progress=False, limit=16)
    lm = (tiny_model, tiny_tokenizer)
    a = extract(lm, world_csv, "coords", tmp_path / "a.zarr", **kw).store
    b = extract(lm, world_csv, "coords", tmp_path / "b.zarr", position="last-entity", **kw).store
    c = extract(lm, world_csv, "coords", tmp_path / "c.zarr", position="last", **kw).store
    assert a.position == "last-entity" and tuple(a.sites) == ("resid",)
    np.testing.assert_array_equal(a.read(slice(0, 16)), b.read(slice(0, 16)))
    np.testing.assert_array_equal(a.read(slice(0, 16)), c.read(slice(0, 16)))


def test_prompt_spans_with_random_ids_and_transforms(tiny_tokenizer):
    """The span shifts past BOS and the random ids, and covers the transformed entity."""
    from actstore.extract.tokens import encode_rows
    for name in ("random", "all_caps", "coords", "empty"):
        pr = get_prompt(name)
        rows = encode_rows(pr, tiny_tokenizer, ENTITIES, spans=True)
        plain = encode_rows(pr, tiny_tokenizer, ENTITIES)
        np.testing.assert_array_equal(rows.ids, plain.ids)   # offsets change no id
        for i, e in enumerate(ENTITIES):
            ids = rows.window(i, i + 1)[0]
            a, b = rows.spans[i]
            assert b == len(ids) and a >= 1 + pr.n_random
            shown = tiny_tokenizer.decode(ids[a:b])
            assert pr.entity_text(e) in shown and pr.entity_text(e) not in \
                tiny_tokenizer.decode(ids[a + 1:b])


# ----------------------------------------------------------------------------- own tables

@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("bos", [True, False])
def test_entity_in_the_middle_of_a_template(tmp_path, tiny_model, tiny_tokenizer, table_csv,
                                            side, bos):
    tok = tiny_tokenizer if bos else no_bos(tiny_tokenizer)
    head = 1 if bos else 0
    lm = (tiny_model, tok)
    stores = {}
    for position in ("last-entity", "first-entity", "mean", "last"):
        stores[position] = extract(
            lm, table_csv, out=tmp_path / f"{position}.zarr", entity_column="city",
            template=TEMPLATE, targets="label,score", position=position,
            sites="resid,attn_out,mlp_out,neurons", batch_size=3, rows_per_chunk=4,
            dtype="float32", padding_side=side, progress=False).store
    s = stores["last-entity"]
    assert s.meta["prompt"] is None and s.meta["template"] == TEMPLATE
    assert s.meta["table"]["entity_column"] == "city" and s.target_kinds == {
        "label": "class", "score": "regression"}
    texts, starts, ends = _texts(actstore.datasets.load_dataset(
        str(table_csv), table=actstore.datasets.TableSpec(entity_column="city",
                                                          template=TEMPLATE)))
    for i, (text, a, b) in enumerate(zip(texts, starts, ends)):
        ids = ([0] if bos else []) + tok(text, add_special_tokens=False)["input_ids"]
        span = span_by_offsets(tok, text, a, b, head)
        assert span[1] < len(ids) - 2   # the entity sits mid-text: last-entity != last
        assert ENTITIES[i] in tok.decode(ids[span[0]:span[1]])
        st = states(tiny_model, ids, [1, 2, 3])
        for position, store in stores.items():
            want = expected(st, position, span, len(ids), head)
            for site in SITES:
                close(store.read(slice(i, i + 1), site=site)[:, 0], want[site][:, 0])


def test_text_column_with_entity_and_text_only(tmp_path, tiny_model, tiny_tokenizer,
                                               table_csv):
    lm = (tiny_model, tiny_tokenizer)
    kw = dict(batch_size=4, rows_per_chunk=4, dtype="float32", progress=False)
    located = extract(lm, table_csv, out=tmp_path / "l.zarr", text_column="sentence",
                      entity_column="city", position="first-entity", **kw).store
    plain = extract(lm, table_csv, out=tmp_path / "t.zarr", text_column="sentence",
                    position="mean", **kw).store
    default = extract(lm, table_csv, out=tmp_path / "d.zarr", text_column="sentence",
                      **kw).store
    assert default.position == "last" and located.position == "first-entity"
    t = located.entities
    for i, text in enumerate(t["text"]):
        ids = [0] + tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        st = states(tiny_model, ids, [1, 2, 3])
        a = text.index(ENTITIES[i])
        span = span_by_offsets(tiny_tokenizer, text, a, a + len(ENTITIES[i]), 1)
        close(located.read(slice(i, i + 1))[:, 0],
              expected(st, "first-entity", span, len(ids), 1)["resid"][:, 0])
        # no entity: the mean over the text's tokens, BOS excluded
        close(plain.read(slice(i, i + 1))[:, 0], st["resid"][:, 1:].mean(1))
        close(default.read(slice(i, i + 1))[:, 0], st["resid"][:, -1])
    for position in ("last-entity", "first-entity"):
        with pytest.raises(ExtractError, match=f"--position {position} needs an entity"):
            extract(lm, table_csv, out=tmp_path / "x.zarr", text_column="sentence",
                    position=position, **kw)


def test_prompt_required_for_paper_refused_for_own_table(tmp_path, tiny_model, tiny_tokenizer,
                                                         world_csv, table_csv):
    lm = (tiny_model, tiny_tokenizer)
    with pytest.raises(ExtractError, match="--prompt is for the paper datasets"):
        extract(lm, table_csv, "coords", tmp_path / "a.zarr", text_column="sentence",
                progress=False)
    with pytest.raises(ExtractError, match="needs dataset, prompt, out"):
        extract(lm)
    with pytest.raises(ExtractError, match="needs prompt; --prompt for a paper dataset"):
        extract(lm, config=ExtractConfig(dataset=str(world_csv), out=str(tmp_path / "b")),
                progress=False)
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b").exists()


def test_option_errors():
    with pytest.raises(ExtractError, match="unknown --sites 'resids'; choose from resid, "
                                           "attn_out, mlp_out, neurons"):
        ExtractConfig(sites="resids")
    with pytest.raises(ExtractError, match="names no site"):
        ExtractConfig(sites=",")
    with pytest.raises(ExtractError, match="unknown --position 'middle'"):
        ExtractConfig(position="middle")
    with pytest.raises(ExtractError, match="--targets, --id-column describe your own table"):
        ExtractConfig(targets="a", id_column="b")
    with pytest.raises(ExtractError, match="--template needs --entity-column"):
        ExtractConfig(text_column="t", template="x {entity}")
    assert ExtractConfig(sites="mlp_out, resid", neurons=True).site_names == (
        "resid", "mlp_out", "neurons")
    assert ExtractConfig(sites=("neurons",)).site_names == ("neurons",)


def test_layer_zero_and_site_errors(tmp_path, tiny_model, tiny_tokenizer, world_csv):
    lm = (tiny_model, tiny_tokenizer)
    with pytest.raises(ExtractError, match="--sites attn_out,mlp_out needs layers >= 1"):
        extract(lm, world_csv, "coords", tmp_path / "a.zarr", sites="resid,attn_out,mlp_out",
                layers="0,1", progress=False)
    with pytest.raises(ExtractError, match="embeddings have no MLP"):
        extract(lm, world_csv, "coords", tmp_path / "a.zarr", sites="neurons", layers="0,1",
                progress=False)
    # the forward still stops after the deepest block asked for
    seen = []
    hooks = [b.register_forward_hook(lambda m, a, o, k=k: seen.append(k))
             for k, b in enumerate(tiny_model.model.layers)]
    try:
        s = extract(lm, world_csv, "coords", tmp_path / "b.zarr", sites="attn_out,mlp_out",
                    layers="2", limit=4, progress=False).store
    finally:
        for h in hooks:
            h.remove()
    assert tuple(s.sites) == ("attn_out", "mlp_out") and set(seen) == {0, 1}


def test_overflow_names_the_site(tmp_path, tiny_tokenizer, world_csv, make_llama):
    m = make_llama(len(tiny_tokenizer), seed=1)
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.weight.mul_(1e5)
    with pytest.raises(ExtractError) as ei:
        extract((m, tiny_tokenizer), world_csv, "coords", tmp_path / "o.zarr", sites="mlp_out",
                layers="2", progress=False, limit=8)
    msg = str(ei.value)
    assert msg.startswith("MLP output (mlp_out) ") and "at layer 2, row " in msg
    with pytest.raises(ExtractError, match=r"^hidden state \(resid\) .* at layer 2, row \d+ "
                                           r"\(a token of text \d+, "):
        extract((m, tiny_tokenizer), world_csv, "coords", tmp_path / "p.zarr", position="all",
                progress=False, limit=8)


# ----------------------------------------------------------------------------- position all

@pytest.mark.parametrize("side", ["left", "right"])
def test_position_all_is_every_token(tmp_path, tiny_model, tiny_tokenizer, table_csv, side):
    lm = (tiny_model, tiny_tokenizer)
    s = extract(lm, table_csv, out=tmp_path / "a.zarr", entity_column="city",
                template=TEMPLATE, position="all", sites="resid,mlp_out", batch_size=3,
                rows_per_chunk=8, dtype="float32", padding_side=side, progress=False).store
    texts = s.entities["text"].tolist()
    seqs = [[0] + tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    n = sum(map(len, seqs))
    assert s.ragged and s.n_rows == n and s.n_texts == len(texts) and s.rows_done == n
    np.testing.assert_array_equal(s.text_offsets, np.cumsum([0] + [len(q) for q in seqs]))
    np.testing.assert_array_equal(s.token_ids, np.concatenate(seqs))
    assert s.rows_per_chunk == 8 and n % 8 and max(map(len, seqs)) > 8  # texts cross windows
    for i, ids in enumerate(seqs):
        st = states(tiny_model, ids, [1, 2, 3])
        rows = slice(int(s.text_offsets[i]), int(s.text_offsets[i + 1]))
        close(s.read(rows, site="resid"), st["resid"])
        close(s.read(rows, site="mlp_out"), st["mlp_out"])


def test_position_all_resume_equals_uninterrupted(tmp_path, tiny_model, tiny_tokenizer,
                                                  world_csv):
    lm = (tiny_model, tiny_tokenizer)
    kw = dict(position="all", sites="resid,neurons", batch_size=4, rows_per_chunk=16,
              progress=False)
    full = extract(lm, world_csv, "where_is", tmp_path / "a.zarr", **kw).store
    part = extract(lm, world_csv, "where_is", tmp_path / "b.zarr", stop_after_rows=100, **kw)
    assert part.rows_done == 112 and not part.store.complete
    part.store.close()
    res = extract(lm, world_csv, "where_is", tmp_path / "b.zarr", **kw)
    assert res.resumed_from == 112 and res.store.complete
    n = full.n_rows
    for site in ("resid", "neurons"):
        np.testing.assert_array_equal(res.store.read(slice(0, n), site=site),
                                      full.read(slice(0, n), site=site))
    np.testing.assert_array_equal(res.store.token_ids, full.token_ids)
    # the paper's rows, one per token: each text's last row is its last-entity vector
    last = extract(lm, world_csv, "where_is", tmp_path / "c.zarr", batch_size=4,
                   rows_per_chunk=16, progress=False).store
    ends = full.text_offsets[1:] - 1
    np.testing.assert_allclose(full.layer(3)[ends].astype(np.float32),
                               last.layer(3).astype(np.float32), rtol=2e-3, atol=2e-3)


def test_resume_refuses_another_position_or_sites(tmp_path, tiny_model, tiny_tokenizer,
                                                  world_csv, table_csv):
    lm = (tiny_model, tiny_tokenizer)
    out = tmp_path / "s.zarr"
    kw = dict(limit=8, progress=False)
    extract(lm, world_csv, "coords", out, **kw)
    for change, diff in ((dict(position="mean"), "position: 'last-entity' -> 'mean'"),
                         (dict(sites="resid,mlp_out"),
                          "sites: ['resid'] -> ['resid', 'mlp_out']"),
                         (dict(position="all"), "position: 'last-entity' -> 'all'")):
        with pytest.raises(ExtractError, match="different settings") as ei:
            extract(lm, world_csv, "coords", out, **kw, **change)
        assert diff in str(ei.value)
    own = tmp_path / "own.zarr"
    extract(lm, table_csv, out=own, entity_column="city", template=TEMPLATE, progress=False)
    with pytest.raises(ExtractError, match="table.template"):
        extract(lm, table_csv, out=own, entity_column="city", template="Visit {entity}",
                progress=False)
    assert extract(lm, table_csv, out=own, entity_column="city", template=TEMPLATE,
                   progress=False).rows == 0


def _cli(*args, env=None):
    e = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
             **(env or {}))
    return subprocess.run([sys.executable, "-m", "actstore", *args], cwd=str(REPO), env=e,
                          capture_output=True, text=True, timeout=300)


def test_position_all_kill_9_then_resume_gives_identical_store(tmp_path, tiny_model_dir):
    """A run that dies like kill -9 with a window written but not recorded (the test hook
    ACTSTORE_TEST_CRASH_AFTER_WINDOWS), resumed, equals an uninterrupted run byte for byte."""
    rng = np.random.default_rng(1)
    words = ["Paris", "Lake", "Mount", "River", "Saint", "North", "Bay", "of", "the"]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(2, 12)))) for _ in range(30)]
    csv = tmp_path / "t.csv"
    pd.DataFrame({"sentence": texts, "y": rng.normal(size=30)}).to_csv(csv, index=False)
    args = ["extract", "--model", str(tiny_model_dir), "--dataset", str(csv), "--text-column",
            "sentence", "--targets", "y", "--position", "all", "--sites",
            "resid,attn_out,mlp_out", "--batch-size", "3", "--rows-per-chunk", "8",
            "--no-progress", "--device", "cpu"]
    out, ref = tmp_path / "k.zarr", tmp_path / "ref.zarr"
    for k in (3, 5):
        p = _cli(*args, "--out", str(out), env={"ACTSTORE_TEST_CRASH_AFTER_WINDOWS": f"0:{k}"})
        assert p.returncode == 75, p.stderr
    p = _cli(*args, "--out", str(out))
    assert p.returncode == 0 and "resumed at row" in p.stdout, p.stderr
    p = _cli(*args, "--out", str(ref))
    assert p.returncode == 0, p.stderr
    a, b = actstore.open(out), actstore.open(ref)
    assert a.ragged and a.rows_done == b.rows_done == a.n_rows > 8 * 8
    for site in ("resid", "attn_out", "mlp_out"):
        np.testing.assert_array_equal(a.read(slice(0, a.n_rows), site=site),
                                      b.read(slice(0, b.n_rows), site=site))
    np.testing.assert_array_equal(a.text_offsets, b.text_offsets)
    assert not list(out.rglob("*.partial"))


def test_cli_takes_the_new_options(tmp_path, tiny_model_dir, table_csv, capsys):
    from actstore.cli import build_parser, main
    from actstore.options import from_args
    args = build_parser().parse_args(
        ["extract", "--dataset", "d.csv", "--out", "o", "--text-column", "t", "--targets",
         "a,b:class", "--position", "all", "--sites", "resid,mlp_out", "--neurons"])
    cfg = from_args(ExtractConfig, args)
    assert cfg.targets == "a,b:class" and cfg.position == "all" and cfg.prompt is None
    assert cfg.site_names == ("resid", "mlp_out", "neurons")
    rc = main(["extract", "--model", str(tiny_model_dir), "--dataset", str(table_csv),
               "--entity-column", "city", "--template", TEMPLATE, "--targets", "label",
               "--position", "mean", "--out", str(tmp_path / "c.zarr"), "--no-progress",
               "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    s = actstore.open(tmp_path / "c.zarr")
    assert s.position == "mean" and s.target_kinds == {"label": "class"}
    rc = main(["extract", "--model", str(tiny_model_dir), "--dataset", str(table_csv),
               "--text-column", "sentence", "--prompt", "coords", "--out",
               str(tmp_path / "d.zarr"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--prompt is for the paper datasets" in err and "Traceback" not in err
