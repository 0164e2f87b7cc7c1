"""`fastprobe neurons --method projection` and `--probe` on stores extracted from a tiny random
Llama.

* projection vs a float64 numpy reference of the projection (RMS norm with block l's
  post_attention_layernorm, gate/up, SiLU) with numpy Pearson and scipy Spearman;
* exactness case: with every attention output projection zeroed the MLP of block l sees exactly
  the normalised hidden state l, so projection from hidden state l equals the stored neurons of
  layer l+1 (float32 store, same labels);
* probe cosines on planted probe directions with known cosines, and the clear errors.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from actstore.errors import ModelError
from probes.cli import main
from probes.errors import FitError, InputError
from probes.fit import load_results
from probes.neurons import NeuronReportError, load_probe, neuron_report

scipy_stats = pytest.importorskip("scipy.stats")


N = 40
CPU = dict(backend="torch", device="cpu")


def _save(model, tok, d):
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_tokenizer, make_llama, make_world_csv):
    """A model whose attention output projections are zero, its float32 store with neurons
    (extracted by path, so the store names the model), and a float16 copy of its residual
    stream without neurons (the projection method's usual input)."""
    from actstore.extract import extract
    from actstore.store import create_store

    root = tmp_path_factory.mktemp("proj")
    tok = tiny_tokenizer
    csv = make_world_csv(root / "world.csv", n=N)
    model = make_llama(len(tok), seed=1)
    with torch.no_grad():
        for blk in model.model.layers:
            blk.self_attn.o_proj.weight.zero_()
    mdir = _save(model, tok, root / "model")
    s_exact = extract(str(mdir), csv, "coords", root / "exact.zarr", neurons=True,
                      dtype="float32", batch_size=8, rows_per_chunk=16, progress=False,
                      device="cpu").store
    s_plain = create_store(root / "plain.zarr", layers=s_exact.layers, n_rows=N,
                           d_model=s_exact.d_model, entities=s_exact.entities,
                           targets=tuple(s_exact.targets),
                           group_columns=tuple(s_exact.group_columns),
                           meta={**s_exact.meta, "neurons": False,
                                 "created": "2026-01-01T00:00:00Z"}, rows_per_chunk=16)
    s_plain.write_rows(0, s_exact.read(slice(0, N)).astype(np.float16))
    s_plain.mark_done(N)
    # same shapes, other weights: a model the stores were not extracted with
    other = _save(make_llama(len(tok), seed=2), tok, root / "other-model")
    return dict(root=root, tok=tok, model=model, mdir=mdir, other=other,
                s_plain=s_plain, s_exact=s_exact)


def _reference(store, model, layer):
    """float64 projected neurons of block ``layer``, fed by the stored hidden state ``layer``."""
    blk = model.model.layers[layer]
    x = store.layer(layer).astype(np.float64)
    w = blk.post_attention_layernorm.weight.detach().double().numpy()
    eps = blk.post_attention_layernorm.variance_epsilon
    h = x / np.sqrt((x * x).mean(1, keepdims=True) + eps) * w
    g = h @ blk.mlp.gate_proj.weight.detach().double().numpy().T
    u = h @ blk.mlp.up_proj.weight.detach().double().numpy().T
    return g / (1 + np.exp(-g)) * u


def _corr(a, y):
    a = a - a.mean(0)
    y = y - y.mean(0)
    return (a.T @ y) / np.outer(np.linalg.norm(a, axis=0), np.linalg.norm(y, axis=0))


def test_projection_matches_float64_reference(env):
    s = env["s_plain"]
    assert s.d_mlp is None and s.layers == [1, 2, 3]
    res = neuron_report(s, method="projection", top=3, model="store", **CPU)
    # hidden states 1, 2 feed blocks 1, 2, whose neurons write into hidden states 2, 3
    assert res["method"] == "projection" and res["layers"] == [2, 3]
    assert res["source_layers"] == [1, 2] and res["d_mlp"] == 64
    assert res["model"] == str(env["mdir"])
    Y = s.target_array(["latitude", "longitude"])
    P, S = res["arrays"]["pearson"], res["arrays"]["spearman"]
    assert P.shape == S.shape == (2, 64, 2)
    for b, layer in enumerate([1, 2]):
        a = _reference(s, env["model"], layer)
        assert np.abs(a).max() > 1
        assert np.abs(P[b] - _corr(a, Y)).max() < 1e-5
        ranks = np.apply_along_axis(scipy_stats.rankdata, 0, a)
        yr = np.apply_along_axis(scipy_stats.rankdata, 0, Y)
        assert np.abs(S[b] - _corr(ranks, yr)).max() < 1e-5
    best = res["top_neurons"]["latitude"][0]
    assert abs(best["spearman"]) == pytest.approx(np.abs(S[..., 0]).max())
    assert best["layer"] == best["source_layer"] + 1
    assert best["position"] == best["source_layer"] - 1


def test_projection_equals_stored_when_attention_adds_nothing(env):
    s = env["s_exact"]
    assert s.dtype == "float32" and s.d_mlp == 64
    st = neuron_report(s, top=200, **CPU)
    pr = neuron_report(s, method="projection", top=200, model="store", **CPU)
    assert st["method"] == "stored" and st["layers"] == [1, 2, 3] and pr["layers"] == [2, 3]
    for k in ("pearson", "spearman"):
        assert np.abs(pr["arrays"][k] - st["arrays"][k][1:]).max() < 1e-5
    # the activations themselves: projected neuron == stored neuron column
    from probes.neurons import projected_neuron
    a = projected_neuron(s, env["model"], 1, 5)     # block 1, fed by hidden state 1
    want = s.layer(2, array="neurons")[:, 5]       # block 1's neurons are kept as layer 2
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(a, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # same neurons in the same order, once stored layer 1 (no projection source) is left out
    for t in ("latitude", "longitude"):
        keep = [(e["layer"], e["index"]) for e in st["top_neurons"][t] if e["layer"] > 1]
        got = [(e["layer"], e["index"]) for e in pr["top_neurons"][t]][:len(keep)]
        assert got[:10] == keep[:10]


def _fit(store, out):
    from probes.fit import fit_all_layers, write_results
    res = fit_all_layers(store, alphas=[1.0, 10.0], backend="torch", device="cpu")
    write_results(res, out)   # results.json + probes.npz (no plots: store not passed)
    return out


def _plant(fit_dir, model, layer, j, rng):
    """Rewrite probes.npz: at hidden state ``layer`` the latitude probe is 3 * w_j (cosine 1)
    and the longitude probe 0.6 w/|w| + 0.8 u, u a unit vector orthogonal to w (cosine 0.6).
    results.json then records the new file's sha256 (else --probe refuses the pair)."""
    z = dict(np.load(fit_dir / "probes.npz"))
    w = model.model.layers[layer - 1].mlp.down_proj.weight.detach().double().numpy()[:, j]
    u = rng.standard_normal(w.shape)
    u -= (u @ w) / (w @ w) * w
    u /= np.linalg.norm(u)
    i = list(z["layers"]).index(layer)
    z["coef"][i, :, 0] = 3 * w
    z["coef"][i, :, 1] = 0.6 * w / np.linalg.norm(w) + 0.8 * u
    np.savez_compressed(fit_dir / "probes.npz", **z)
    with pytest.raises(FitError, match="probes.npz is not the file .*results.json describes"):
        load_results(fit_dir, arrays=True)         # an edited probes.npz is another fit's
    doc = json.loads((fit_dir / "results.json").read_text())
    doc["arrays_sha256"]["probes.npz"] = hashlib.sha256(
        (fit_dir / "probes.npz").read_bytes()).hexdigest()
    (fit_dir / "results.json").write_text(json.dumps(doc, indent=1))


def test_probe_cosine_planted(env, tmp_path):
    s, model = env["s_plain"], env["model"]
    fit = _fit(s, tmp_path / "fit")
    _plant(fit, model, 3, 11, np.random.default_rng(0))
    res = neuron_report(s, method="projection", top=128, probe_dir=fit, model="store", **CPU)
    assert res["probe"]["layers"] == [1, 2, 3]
    ent = {(e["layer"], e["index"]): e for e in res["top_neurons"]["latitude"]}
    assert len(ent) == 128
    e = ent[(3, 11)]
    assert e["probe_layer"] == 3
    assert e["probe_cosine"]["latitude"] == pytest.approx(1.0, abs=1e-6)
    assert e["probe_cosine"]["longitude"] == pytest.approx(0.6, abs=1e-6)
    # an unplanted neuron against the real fitted probe at hidden state 2
    coef = np.load(fit / "probes.npz")["coef"][1].astype(np.float64)
    w = model.model.layers[1].mlp.down_proj.weight.detach().double().numpy()[:, 40]
    want = coef.T @ w / (np.linalg.norm(coef, axis=0) * np.linalg.norm(w))
    got = ent[(2, 40)]["probe_cosine"]
    assert [got["latitude"], got["longitude"]] == pytest.approx(list(want), abs=1e-9)
    assert abs(want).max() > 1e-3   # a real, non-trivial comparison
    # stored method: layer 2 = block 1's neurons, compared with the probe at hidden state 2
    s2 = env["s_exact"]
    fit2 = _fit(s2, tmp_path / "fit2")
    _plant(fit2, model, 2, 7, np.random.default_rng(1))
    st = neuron_report(s2, top=192, probe_dir=fit2, model="store", **CPU)
    assert st["model"] == str(env["mdir"])
    e = next(e for e in st["top_neurons"]["longitude"] if (e["layer"], e["index"]) == (2, 7))
    assert e["probe_cosine"]["longitude"] == pytest.approx(0.6, abs=1e-6)
    assert e["probe_cosine"]["latitude"] == pytest.approx(1.0, abs=1e-6)


def test_errors(env, tmp_path, make_llama):
    s, s2 = env["s_plain"], env["s_exact"]
    with pytest.raises(NeuronReportError, match="use --method projection .* or re-extract"):
        neuron_report(s, **CPU)
    with pytest.raises(InputError, match="unknown target 'altitude'"):
        neuron_report(s, method="projection", targets="altitude", **CPU)
    with pytest.raises(NeuronReportError, match="unknown method"):
        neuron_report(s, method="gradient", **CPU)
    # probe dir of another store (same model and rows, another creation)
    fit2 = _fit(s2, tmp_path / "fit2")
    with pytest.raises(NeuronReportError, match="was fit on .*exact.zarr.*, not on"):
        load_probe(fit2, s)
    with pytest.raises(NeuronReportError, match="no such results file"):
        load_probe(tmp_path / "nowhere", s)
    # model mismatch: other weights of the same shape, and another width
    with pytest.raises(NeuronReportError, match="model mismatch: .*different weight files"):
        neuron_report(s, method="projection", model=str(env["other"]), **CPU)
    small = make_llama(len(env["tok"]), hidden=16)
    with pytest.raises(NeuronReportError, match="model mismatch: .*d_model 16 vs the store's 32"):
        neuron_report(s, method="projection", model=small, **CPU)
    from actstore.store import create_store
    bare = create_store(tmp_path / "bare.zarr", layers=s.layers, n_rows=N, d_model=s.d_model,
                        entities=s.entities, targets=tuple(s.targets), group_columns=(),
                        meta={}, rows_per_chunk=16)
    bare.write_rows(0, s.read(slice(0, N)))
    bare.mark_done(N)
    with pytest.raises(NeuronReportError, match="records no model; pass .*--model"):
        neuron_report(bare, method="projection", **CPU)
    with pytest.raises(NeuronReportError, match="no-model does not exist; the neuron weights"):
        neuron_report(s, method="projection", model=str(tmp_path / "no-model"), **CPU)
    with pytest.raises(NeuronReportError, match="no stored layer feeds a decoder block"):
        # hidden state 3, the last: it feeds no block
        neuron_report(s, method="projection", layers=[3], model="store", **CPU)
    with pytest.raises(NeuronReportError, match="moments use the torch reference"):
        neuron_report(s, method="projection", model="store", backend="cpu",
                      device="cpu")


def test_store_model_is_loaded_only_when_asked(env, tmp_path, capsys, monkeypatch):
    """The model a store records (here a local directory) is loaded only on --model store /
    model="store": without a model, projection and --probe are a one-line error naming it."""
    import probes.neurons.model as pm

    loads = []
    real = pm.load_model
    monkeypatch.setattr(pm, "load_model", lambda name, **kw: loads.append(name) or real(name,
                                                                                        **kw))
    s, s2 = env["s_plain"], env["s_exact"]
    want = (f"the store records the model in the local directory {env['mdir']}: pass --model "
            "store to load that one, or --model NAME_OR_PATH")
    with pytest.raises(NeuronReportError, match="no model was given") as exc:
        neuron_report(s, method="projection", **CPU)
    assert want in str(exc.value) and "\n" not in str(exc.value)
    fit = _fit(s2, tmp_path / "fit")
    with pytest.raises(NeuronReportError, match="no model was given"):   # --probe needs it too
        neuron_report(s2, probe_dir=fit, **CPU)
    assert main(["neurons", str(s.path), "--method", "projection", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and want in err
    assert loads == []                                  # nothing was loaded unasked
    res = neuron_report(s, method="projection", top=2, model="store", **CPU)
    assert res["model"] == str(env["mdir"]) and loads == [str(env["mdir"])]


def test_unloadable_model_is_one_line_error(env, tmp_path, capsys):
    """A model directory whose weights or config are broken: one line naming the model, not a
    traceback (safetensors, and the size check of from_pretrained)."""
    import shutil

    s = env["s_plain"]
    torn = tmp_path / "torn"
    shutil.copytree(env["mdir"], torn)
    w = torn / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    wide = tmp_path / "wide"
    shutil.copytree(env["mdir"], wide)
    cfg = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    for bad, kind in ((torn, "SafetensorError"), (wide, "RuntimeError")):
        with pytest.raises(NeuronReportError, match=f"cannot load model '{bad}' from the local "
                           f"directory: {kind}: .*the neuron weights need it"):
            neuron_report(s, method="projection", model=str(bad), **CPU)
        assert main(["neurons", str(s.path), "--method", "projection", "--model", str(bad),
                     "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and str(bad) in err


def test_cli_projection_with_probe(env, tmp_path, capsys):
    s = env["s_plain"]
    fit = _fit(s, tmp_path / "fit")
    out = tmp_path / "o"
    assert main(["neurons", str(s.path), "--method", "projection", "--model", "store",
                 "--probe", str(fit), "--top", "3", "--backend", "torch", "--device", "cpu",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "method projection" in text and "cos(probe)" in text
    doc = json.loads((out / "neurons.json").read_text())
    assert doc["method"] == "projection" and doc["layers"] == [2, 3]
    e = doc["top_neurons"]["latitude"][0]
    assert set(e["probe_cosine"]) == {"latitude", "longitude"}
    z = np.load(out / "neurons.npz")
    assert list(z["source_layers"]) == [1, 2] and z["pearson"].shape == (2, 64, 2)
    for t in ("latitude", "longitude"):
        assert (out / f"neuron_{t}.png").read_bytes()[:4] == b"\x89PNG"
    # a store without neurons, no --method: one line naming both ways out
    assert main(["neurons", str(s.path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--method projection" in err and "--neurons" in err


def test_help_shows_both_methods(capsys):
    with pytest.raises(SystemExit):
        main(["neurons", "--help"])
    text = capsys.readouterr().out
    assert "--method projection" in text and "--probe" in text and "--model" in text


@pytest.mark.slow
def test_smollm2_projection_tracks_stored_neurons(tmp_path, make_world_csv):
    """The embedded model by name: the store's model is found and checked (file sha256), and
    the projection's per-neuron correlations follow the stored neurons' (attention skipped:
    not equal, but r ~ 0.95 across the 1536 neurons of layer 7)."""
    from actstore.extract import extract

    csv = make_world_csv(tmp_path / "w.csv", n=32)
    s = extract("smollm2-135m", csv, "coords", tmp_path / "s.zarr", layers="6,7", neurons=True,
                dtype="float32", progress=False, device="cpu").store
    st = neuron_report(s, top=5, **CPU)
    pr = neuron_report(s, method="projection", top=5, model="store", **CPU)
    assert pr["model"] == "smollm2-135m" and pr["layers"] == [7, 8] and st["layers"] == [6, 7]
    for k in ("pearson", "spearman"):
        for t in range(2):
            r = np.corrcoef(pr["arrays"][k][0, :, t], st["arrays"][k][1, :, t])[0, 1]
            assert r > 0.8, (k, t, r)


# ------------------------------------------------------------------ per-architecture pre-MLP norm
def _tiny(arch, seed=0):
    """A tiny random model of ``arch`` (2 blocks, d=32, d_mlp=48) whose attention adds nothing
    (o_proj zeroed), so each block's MLP reads a function of the block input alone."""
    import transformers as tf
    torch.manual_seed(seed)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                  initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg, cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM),
                "olmo2": (tf.Olmo2Config, tf.Olmo2ForCausalLM)}[arch]
    extra = {"head_dim": 8} if arch == "gemma2" else {}
    model = cls(cfg(**common, **extra)).eval()
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        for blk in model.model.layers:
            blk.self_attn.o_proj.weight.zero_()
            for name in ("post_attention_layernorm", "pre_feedforward_layernorm"):
                if hasattr(blk, name):   # non-trivial norm weights
                    getattr(blk, name).weight.normal_(1.0, 0.3)
    return model


@pytest.mark.parametrize("arch", ["llama", "gemma2", "olmo2"])
def test_projection_reads_the_true_mlp_input(arch):
    """The projector applied to a block's input residual equals that block's MLP neurons (the
    down_proj input) computed in float64 from the MLP input the model really feeds it: OLMo 2's
    MLP reads the raw residual (its post_attention_layernorm normalises the attention output),
    Gemma 2's reads pre_feedforward_layernorm(x), Llama's post_attention_layernorm(x)."""
    import copy

    from probes.neurons.projection import _BlockProjector

    model = _tiny(arch)
    blk = model.model.layers[1]
    seen = {}
    h1 = blk.register_forward_pre_hook(
        lambda m, a, kw: seen.__setitem__("x", (a[0] if a else kw["hidden_states"]).detach()),
        with_kwargs=True)
    h2 = blk.mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("mlp_in", a[0].detach()))
    ids = torch.randint(3, 64, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids)
    h1.remove()
    h2.remove()
    x, mlp_in = seen["x"].reshape(-1, 32), seen["mlp_in"].reshape(-1, 32)
    # float64 reference: block.mlp as the model applies it, neurons = its down_proj input
    mlp64 = copy.deepcopy(blk.mlp).double()
    ref = {}
    mlp64.down_proj.register_forward_pre_hook(lambda m, a: ref.__setitem__("a", a[0]))
    with torch.no_grad():
        mlp64(mlp_in.double())
    want = ref["a"].numpy()
    got = _BlockProjector(blk, torch.device("cpu"))(x).double().numpy()
    assert np.abs(want).max() > 0.05
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    from actstore.models import pre_mlp_norm_name
    assert pre_mlp_norm_name(blk) == {"llama": "post_attention_layernorm",
                                      "gemma2": "pre_feedforward_layernorm", "olmo2": None}[arch]


def test_projection_refuses_unknown_block_layout():
    from probes.neurons.projection import _BlockProjector

    class Mlp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj = torch.nn.Linear(8, 12)
            self.up_proj = torch.nn.Linear(8, 12)
            self.down_proj = torch.nn.Linear(12, 8)
            self.act_fn = torch.nn.SiLU()

    class MysteryDecoderLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = Mlp()
            self.post_attention_layernorm = torch.nn.LayerNorm(8)

    with pytest.raises(ModelError, match="does not know which norm feeds the MLP of "
                                                "MysteryDecoderLayer.*refusing to guess"):
        _BlockProjector(MysteryDecoderLayer(), torch.device("cpu"))


def test_probe_cosine_orientation_when_d_model_equals_d_mlp(make_llama):
    """GPT-2's Conv1D stores (in, out): with d_model == d_mlp the shape cannot tell, the module
    type does. A probe planted on neuron j's output direction gets cosine 1 (Conv1D and Linear)."""
    import transformers as tf

    from probes.neurons import add_probe_cosines

    torch.manual_seed(0)
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_inner=32, n_layer=2,
                                            n_head=4, n_positions=64)).eval()
    llama = make_llama(64, layers=2, hidden=32)
    for blk in llama.model.layers:   # a square MLP: d_mlp = d_model = 32
        blk.mlp.down_proj = torch.nn.Linear(32, 32, bias=False)
    cases = ((gpt2, gpt2.transformer.h[0].mlp.c_proj.weight.detach().double().numpy()[5]),
             (llama, llama.model.layers[0].mlp.down_proj.weight.detach().double().numpy()[:, 5]))
    for model, direction in cases:
        coef = np.zeros((1, 32, 1))
        coef[0, :, 0] = 2.0 * direction
        top = {"t": [{"layer": 1, "index": 5}, {"layer": 1, "index": 6}]}
        add_probe_cosines(top, model, {"targets": ["t"], "layers": [1], "coef": coef})
        assert top["t"][0]["probe_cosine"]["t"] == pytest.approx(1.0, abs=1e-9), type(model)
        assert abs(top["t"][1]["probe_cosine"]["t"]) < 0.9


# ------------------------------------------------------------------ probe / store identity
def _copy_store(src, path, prompt, created):
    from actstore.store import create_store

    s = create_store(path, layers=src.layers, n_rows=N, d_model=src.d_model,
                     entities=src.entities, targets=tuple(src.targets),
                     group_columns=tuple(src.group_columns),
                     meta={**src.meta, "neurons": False, "created": created,
                           "prompt": {"name": prompt}}, rows_per_chunk=16)
    s.write_rows(0, src.read(slice(0, N)).astype(np.float16))
    s.mark_done(N)
    return s


def test_probe_identity_catches_a_store_re_extracted_at_the_same_path(env, tmp_path):
    import shutil

    from actstore.store import open_store

    path = tmp_path / "same.zarr"
    s = _copy_store(env["s_plain"], path, "coords", "2026-01-01T00:00:00Z")
    fit = _fit(s, tmp_path / "fit")
    doc = json.loads((fit / "results.json").read_text())
    ident = doc["store_identity"]
    assert ident == {"created": "2026-01-01T00:00:00Z", "prompt": "coords", "n_rows": N,
                     "model_id": str(env["mdir"]),
                     "dataset_sha256": s.meta["dataset"]["sha256"]}
    assert ident["dataset_sha256"]
    assert load_probe(fit, s)["layers"] == [1, 2, 3]
    # a copy elsewhere: same identity, accepted
    shutil.copytree(path, tmp_path / "copy.zarr")
    load_probe(fit, open_store(tmp_path / "copy.zarr"))
    # re-extracted at the same path with another prompt (even with the same timestamp)
    shutil.rmtree(path)
    s2 = _copy_store(env["s_plain"], path, "empty", "2026-01-01T00:00:00Z")
    with pytest.raises(NeuronReportError, match="same path .*prompt 'coords' vs 'empty'"):
        load_probe(fit, s2)
    with pytest.raises(NeuronReportError, match="prompt 'coords' vs 'empty'"):
        neuron_report(s2, method="projection", probe_dir=fit, top=2, **CPU)
    # an old results.json without the identity: today's path-based checks (same path: accepted)
    del doc["store_identity"]
    (fit / "results.json").write_text(json.dumps(doc))
    load_probe(fit, s2)


def test_probe_of_another_site_is_refused(env, tmp_path):
    from probes.fit import fit_all_layers, write_results

    s = env["s_exact"]                   # holds resid and neurons
    res = fit_all_layers(s, site="neurons", alphas=[1.0, 10.0], backend="torch", device="cpu")
    assert res.site == "neurons" and res.d_model == s.d_mlp
    write_results(res, tmp_path / "fit")
    with pytest.raises(NeuronReportError, match="fitted on the 'neurons' array.*without --site"):
        load_probe(tmp_path / "fit", s)
