"""`actstore run`: extract -> fit -> report on a tiny in-process model, and resumption."""
import json

import pytest

from actstore.cli import main
from probes.errors import PipelineError
from probes.pipeline import run_pipeline


def test_run_writes_report_and_reuses_finished_steps(tmp_path, tiny_model_dir, make_world_csv):
    csv = make_world_csv(tmp_path / "world_place.csv", n=60)
    out = tmp_path / "run"
    logs = []
    report = run_pipeline(out, model=str(tiny_model_dir), datasets=[str(csv)], batch_size=8,
                          device="cpu", progress=False, log=logs.append)
    text = report.read_text()
    assert "| world_place | world_place | " in text
    assert "r2_by_layer.png" in text
    assert (out / "probes" / "world_place" / "r2_by_layer.png").exists()
    results = json.loads((out / "probes" / "world_place" / "results.json").read_text())
    assert results["n_rows"] == 60 and results["targets"] == ["latitude", "longitude"]
    assert len(results["layers"]) == 3  # the tiny model has 3 blocks (no layer 0: recipe probes)
    assert results["control"]["seed"] == 0           # the shuffled-target control, by default
    assert not (out / "controls" / "random-init").exists()  # no random-init: recipe probes
    assert "cannot be compared with layer 0 (embeddings)" in text
    _assert_strict_json_everywhere(out)
    first = (out / "probes" / "world_place" / "results.json").stat().st_mtime_ns

    logs.clear()
    run_pipeline(out, model=str(tiny_model_dir), datasets=[str(csv)], device="cpu",
                 progress=False, log=logs.append)
    assert any("store complete" in m for m in logs)
    assert any(m.startswith("[fit 1/1]") and "up to date" in m for m in logs)
    assert (out / "probes" / "world_place" / "results.json").stat().st_mtime_ns == first

    # another fit option refits; another prompt or limit under the same OUT is refused
    logs.clear()
    run_pipeline(out, model=str(tiny_model_dir), datasets=[str(csv)], device="cpu", cv=3,
                 progress=False, log=logs.append)
    assert any("fitting ridge probes" in m for m in logs)
    assert json.loads((out / "probes" / "world_place" / "results.json").read_text())["cv"] == 3
    # another default alpha grid (a new release) refits instead of reusing the old fit
    logs.clear()
    with pytest.MonkeyPatch.context() as m:
        m.setattr("probes.pipeline.steps.DEFAULT_ALPHAS", "1e-1:1e3:5")
        run_pipeline(out, model=str(tiny_model_dir), datasets=[str(csv)], device="cpu", cv=3,
                     progress=False, log=logs.append)
    assert any("fitting ridge probes" in m for m in logs)
    assert len(json.loads((out / "probes" / "world_place" / "results.json").read_text())[
        "alphas"]) == 5
    with pytest.raises(ValueError, match="prompt"):
        run_pipeline(out, model=str(tiny_model_dir), datasets=[str(csv)], prompt="coords",
                     device="cpu", progress=False, log=logs.append)
    with pytest.raises(ValueError, match="n_rows"):
        run_pipeline(out, model=str(tiny_model_dir), datasets=[str(csv)], limit=30,
                     device="cpu", progress=False, log=logs.append)


def test_run_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path / "o"), "--limit", "2"]) == 2
    assert "--limit must be at least 3" in capsys.readouterr().err
    assert main(["run", "--out", str(tmp_path / "o"), "--datasets", "no_such_dataset"]) == 2
    err = capsys.readouterr().err
    assert "no_such_dataset" in err and "Traceback" not in err


def test_run_help_teaches(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "examples:" in capsys.readouterr().out


def test_cli_debug_env_shows_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("ACTSTORE_DEBUG", "1")
    with pytest.raises(ValueError, match="--limit must be at least 3"):
        main(["run", "--out", str(tmp_path / "o"), "--limit", "2"])


# ----------------------------------------------------------------------------- the paper recipe

def _two_type_world_csv(make_world_csv, path, n):
    """The synthetic world CSV with two entity types (so the entity-type hold-out runs)."""
    import pandas as pd
    make_world_csv(path, n=n)
    df = pd.read_csv(path)
    df["entity_type"] = ["populated_place" if i % 3 else "structure" for i in range(n)]
    df.to_csv(path, index=False)
    return path


def _bare(text):
    raise ValueError(f"bare {text}")


def _assert_strict_json_everywhere(out):
    files = sorted(out.rglob("*.json"))
    assert any(f.name == "source.json" for f in files)      # the step records too
    for f in files:
        json.loads(f.read_text(), parse_constant=_bare)      # no bare NaN / Infinity
    assert not [p for p in out.rglob(".staging-*")]


def _mtimes(root):
    """Every file but the report's own (report.md and its figures, redrawn on every run)."""
    return {p: p.stat().st_mtime_ns for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "report.md" and p.name != "r2_by_layer.png"
            and p.parent != root / "controls"}


def test_paper_recipe_end_to_end_and_resume(tmp_path, tiny_model_dir, make_world_csv):
    csv = _two_type_world_csv(make_world_csv, tmp_path / "world_place.csv", n=90)
    out = tmp_path / "paper"
    logs = []
    kw = dict(model=str(tiny_model_dir), datasets=[str(csv)], prompts="empty,coords",
              device="cpu", cs="1e-2:1e2:5", classify_every=2, progress=False,
              log=logs.append)
    report = run_pipeline(out, recipe="paper", batch_size=16, **kw)
    text = report.read_text()

    # one store and one probe dir per prompt; the main prompt keeps the plain name
    assert (out / "stores" / "world_place.zarr").is_dir()
    assert (out / "stores" / "world_place__coords.zarr").is_dir()
    assert (out / "probes" / "world_place__coords" / "results.json").exists()
    # neurons: projected through the tiny model's MLPs (no stored neurons), with probe cosines
    nj = json.loads((out / "neurons" / "world_place" / "neurons.json").read_text())
    assert nj["method"] == "projection" and nj["targets"] == ["latitude", "longitude"]
    assert "probe_cosine" in nj["top_neurons"]["latitude"][0]
    assert (out / "neurons" / "world_place" / "neuron_latitude.png").exists()
    # every experiment wrote its JSON and plot
    edir = out / "experiments" / "world_place"
    for stem in ("prompts", "holdout_country", "entity_type", "nonlinear", "pca"):
        assert (edir / f"{stem}.json").exists() and (edir / f"{stem}.png").exists(), stem
    ho = json.loads((edir / "holdout_country.json").read_text())
    assert sorted(g["group"] for g in ho["groups"]) == ["Brazil", "France", "Japan"]
    pr = json.loads((edir / "prompts.json").read_text())
    assert pr["prompts"] == ["empty", "coords"]
    # every JSON file of the run is strict (a NaN is null, with its reason), every fit's
    # results.json carries its arrays' digest, and no staging folder is left
    _assert_strict_json_everywhere(out)
    for d in ("world_place", "world_place__coords"):
        assert set(json.loads((out / "probes" / d / "results.json").read_text())[
            "arrays_sha256"]) == {"probes.npz", "predictions_best_layer.csv"}
    # the experiments ran at the main fit's best leave-one-out layer
    res = json.loads((out / "probes" / "world_place" / "results.json").read_text())
    best_loo = max(res["layers"], key=lambda e: (e["cv_score"], -e["position"]))["layer"]
    assert json.loads((edir / "pca.json").read_text())["layer"] == best_loo

    # the classification probe of the place dataset's country column: every 2nd layer, 5 Cs
    cdir = out / "classify" / "world_place"
    cj = json.loads((cdir / "results.json").read_text())
    assert cj["task"] == "classify" and cj["target"] == "country" and cj["rest"] == "drop"
    assert cj["classes"] == ["Brazil", "France", "Japan"] and cj["n_dropped"] == 0
    every = [e["layer"] for e in res["layers"]]          # the ridge fit: every stored layer
    assert len(cj["Cs"]) == 5 and every == [0, 1, 2, 3]    # the paper recipe adds layer 0
    assert [e["layer"] for e in cj["layers"]] == [0, 2, 3]   # every 2nd, and the last
    for png in ("accuracy_by_layer.png", "confusion_best_layer.png"):
        assert (cdir / png).exists(), png
    assert json.loads((cdir / "source.json").read_text())["inputs"]["target"] == "country"
    block = text.split("### Classification probe: `country`")[1].split("###")[0]
    best = next(e for e in cj["layers"] if e["layer"] == cj["best_layer"])
    assert f"**{cj['best_layer']}**" in block and "K = 3 classes" in block
    assert "on layers 0, 2, 3." in block
    assert f"| {best['logistic']['test']['accuracy']:.3f} |" in block
    for row in ("| logistic (C = ", "| mass-mean |", "| LDA (shrinkage ", "| majority class |",
                "| shuffled labels (logistic, same C) |"):
        assert row in block, row
    assert "classify/world_place/accuracy_by_layer.png" in block
    assert "classify/world_place/confusion_best_layer.png" in block

    # the report holds every section, with numbers from those files
    for heading in ("## world_place", "### Neurons", "### Prompt variants", "### Block hold-out",
                    "### Entity-type hold-out", "### Nonlinear (MLP) probe vs linear",
                    "### PCA-k probes", "Experiments at a glance"):
        assert heading in text, heading
    assert "| world_place | world_place | coords |" in text
    assert f"nominal **{ho['summary']['nominal_proximity_error']:.3f}**" in text
    assert "experiments/world_place/pca.png" in text and "map_best_layer.png" in text
    assert (out / "r2_by_layer.png").exists()

    # the controls: layer 0, the random-init model (extracted and fitted the same way), the
    # shuffled-target control; one sentence with their numbers in the dataset's section
    rdir = out / "controls" / "random-init"
    from actstore.store import open_store
    meta = open_store(rdir / "stores" / "world_place.zarr").meta["model"]
    assert meta["source"] == "random-init" and meta["seed"] == 0
    assert meta["base_model"] == str(tiny_model_dir)
    rres = json.loads((rdir / "probes" / "world_place" / "results.json").read_text())
    assert [e["layer"] for e in rres["layers"]] == every
    assert res["control"]["seed"] == 0 and len(res["control"]["layers"]) == 4
    sentence = text.split("## world_place\n\n")[1].split("\n")[0]
    best_r2 = next(e for e in res["layers"] if e["layer"] == res["best_layer"])["test"]["r2"]
    assert sentence.startswith(f"Controls: the probe's best test R² {best_r2:.3f} (layer "
                               f"{res['best_layer']})"), sentence
    for what in ("beat layer 0 (embeddings)", "the random-init model (best layer ",
                 "shuffled targets (", "(the selectivity)"):
        assert what in sentence, what
    assert (out / "controls" / "world_place.png").exists() and "controls/world_place.png" in text
    assert "| world_place | " in text.split("selectivity |")[1]       # the controls table

    # a re-run redoes nothing: every file but the report keeps its timestamp
    before = _mtimes(out)
    logs.clear()
    report2 = run_pipeline(out, recipe="paper", **kw)
    assert _mtimes(out) == before
    # 2 fits, the random-init control's fit, classify, neurons, 5 experiments
    assert sum("up to date" in m for m in logs) == 2 + 1 + 1 + 1 + 5
    assert any(m.startswith("[classify 1/1]") and "up to date" in m for m in logs)
    assert not any("fitting ridge" in m or "most frequent classes" in m for m in logs)
    assert report2.read_text().split("wall time")[1].split("\n", 1)[1] == \
        text.split("wall time")[1].split("\n", 1)[1]

    # a step whose output went missing is redone, and only that one
    (out / "experiments" / "world_place" / "pca.png").unlink()
    logs.clear()
    run_pipeline(out, recipe="paper", **kw)
    assert [m.split(" ...")[0] for m in logs if m.endswith(" ...") and "experiments" in m] == \
        ["[experiments 1/1] world_place pca"]
    assert (out / "experiments" / "world_place" / "pca.png").exists()


def test_paper_recipe_skips_what_a_dataset_lacks(tmp_path, tiny_model_dir, make_world_csv,
                                                 monkeypatch):
    """One prompt, one entity type, one country: notes instead of failures. Also: a run
    interrupted in the neurons step resumes there."""
    import pandas as pd

    import probes.pipeline.steps
    csv = make_world_csv(tmp_path / "blocks.csv", n=40)
    df = pd.read_csv(csv)
    df["country"] = "France"
    df.to_csv(csv, index=False)
    out = tmp_path / "o"
    kw = dict(recipe="paper", model=str(tiny_model_dir), datasets=[str(csv)],
              experiments="prompts,holdout,entity-type", device="cpu", progress=False)

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(probes.pipeline.steps, "neuron_report", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(out, log=lambda m: None, **kw)
    assert not (out / "neurons").exists() and not (out / "report.md").exists()
    logs = []
    report = run_pipeline(out, log=logs.append, **kw)
    assert any("store complete" in m for m in logs)
    assert any(m.startswith("[fit") and "up to date" in m for m in logs)
    assert (out / "neurons" / "blocks" / "neurons.json").exists()
    text = report.read_text()
    assert "Skipped: one prompt only" in text
    assert "Skipped: one entity type (populated_place)" in text
    assert "Skipped: " in text.split("### Block hold-out")[1] and "has only one group" in text
    assert not (out / "experiments" / "blocks" / "nonlinear.source.json").exists()
    assert "### Classification probe\n\nSkipped: fewer than two country classes" in text


def test_majority_baseline_and_classes_line():
    from probes.pipeline.report_md import _classes_line, majority_baseline
    doc = {"n_test": 10, "classes": ["a", "b", "c"], "pooled": ["d", "e"], "rest": "drop",
           "n_dropped": 7, "class_counts": {"train": [5, 9, 9], "test": [2, 3, 5]}}
    base = majority_baseline(doc)       # b and c tie on the train rows: the first, b
    assert base["class"] == "b" and base["accuracy"] == pytest.approx(0.3)
    assert base["balanced_accuracy"] == pytest.approx(1 / 3)
    assert base["macro_f1"] == pytest.approx(2 * 0.3 / 1.3 / 3)   # F1 of b, 0 for a and c
    assert _classes_line(doc) == ("K = 3 classes (the 3 most frequent; 7 rows of the 2 rarer "
                                  "classes dropped: d, e)")


def test_paper_recipe_bad_options_are_clear(tmp_path, capsys):
    out = str(tmp_path / "o")
    assert main(["run", "paper", "--out", out, "--experiments", "pca,bogus"]) == 2
    assert "unknown experiment 'bogus'" in capsys.readouterr().err
    assert main(["run", "--out", out, "--experiments", "pca"]) == 2
    assert "--experiments needs the paper recipe" in capsys.readouterr().err
    assert main(["run", "paper", "--out", out, "--prompts", "empty,nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown prompt 'nope'" in err and "Traceback" not in err
    assert main(["run", "paper", "--out", out, "--prompts", "coords", "--datasets", "nobel"]) == 2
    assert "main prompt 'coords' does not apply to dataset 'nobel'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "papr", "--out", out])
    assert "invalid choice: 'papr'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()   # nothing was started


def test_default_datasets_are_the_offline_builtins(tmp_path, monkeypatch):
    """`make demo` runs every offline built-in, two of them time sets (nobel, films), and the
    default main prompt applies to each."""
    from actstore.datasets import BUILTINS
    from probes.pipeline.config import DEMO_DATASETS
    from probes.pipeline.plan import plan_sections

    monkeypatch.setenv("ACTSTORE_CACHE", str(tmp_path / "cache"))
    assert set(DEMO_DATASETS) == set(BUILTINS)
    sections = plan_sections(tmp_path / "out", DEMO_DATASETS, ["empty"], 50, False)
    assert [s.ds.name for s in sections] == list(DEMO_DATASETS)
    assert {s.ds.kind for s in sections} >= {"historical_figure", "art"}
    assert all(len(s.jobs) == 1 and len(s.ds) == 50 for s in sections)
def test_controls_sentence_says_which_controls_the_probe_beats():
    from types import SimpleNamespace

    from probes.pipeline.report_md import controls_sentence, controls_table

    def result(r2s, control):
        layers = [{"layer": i, "test": {"r2": r}} for i, r in enumerate(r2s)]
        best = max(layers, key=lambda e: e["test"]["r2"])["layer"]
        return {"layers": layers, "best_layer": best, "control": {"layers": [
            {"layer": i, "test_r2": c, "selectivity": r - c}
            for i, (r, c) in enumerate(zip(r2s, control))]}}

    ds = SimpleNamespace(name="world")
    main = SimpleNamespace(result=result([0.2, 0.5, 0.4], [-0.01, -0.02, 0.0]))
    rnd = SimpleNamespace(result=result([0.1, 0.6, 0.3], [0.0, 0.0, 0.0]))
    sec = SimpleNamespace(ds=ds, main=main, random_init=rnd)
    s = controls_sentence(sec)
    assert s == ("Controls: the probe's best test R² 0.500 (layer 1) beats layer 0 (embeddings) "
                 "(0.200) by 0.300, does not beat the random-init model (best layer 1) "
                 "(0.600 ≥ 0.500), and beats shuffled targets (-0.020) by 0.520 (the "
                 "selectivity).")
    sec.random_init = None
    assert "cannot be compared with the random-init model (not run: --controls random)" in \
        controls_sentence(sec)
    table = "\n".join(controls_table([sec]))
    assert "| world | 0.500 (1) | 0.200 | – | -0.020 | 0.520 |" in table


def test_headline_gives_the_error_in_the_targets_units_and_the_papers_scale():
    from types import SimpleNamespace

    from probes.pipeline.report_md import headline

    place = {"r2": 0.41, "spearman": 0.6, "km_error_median": 1234.4, "proximity_error": 0.12,
             "medae_per_target": {"latitude": 9.0, "longitude": 20.0}}
    res = {"best_layer": 3, "layers": [{"layer": 3, "test": place}]}
    sec = SimpleNamespace(ds=SimpleNamespace(name="w", kind="world_place"),
                          main=SimpleNamespace(result=res))
    assert headline(sec) == (
        "Headline: best layer **3**, test R² **0.410**, Spearman 0.600, median error 1234 km, "
        "proximity error 0.120 (0 is perfect). The paper's best-layer test R² on its world "
        "dataset, Llama-2 7B / 13B / 70B: 0.88 / 0.90 / 0.92 (its own entities and all its "
        "rows: a scale, not the same task).")
    res["layers"][0]["test"] = {"r2": 0.2, "spearman": 0.5, "proximity_error": 0.3,
                                "medae_per_target": {"year": 21.5}}
    sec.ds.kind = "my_kind"                  # no paper number for a kind the paper lacks
    assert headline(sec) == ("Headline: best layer **3**, test R² **0.200**, Spearman 0.500, "
                             "median |error| of year 21.5, proximity error 0.300 (0 is "
                             "perfect).")


def test_models_compares_model_sizes(tmp_path, tiny_model_dir, tiny_tokenizer, make_llama,
                                     make_world_csv):
    """--models A,B: A runs as --model would; B is extracted and fitted per dataset under
    OUT/models/B/ with its own random-init control; the report's "Model size" section has the
    table (beside the paper's Llama-2 numbers) and the relative-depth plot."""
    from probes.pipeline.model_size import PAPER_LLAMA2
    deep = tmp_path / "deep-llama"
    make_llama(len(tiny_tokenizer), layers=5, seed=1).save_pretrained(deep)
    tiny_tokenizer.save_pretrained(deep)
    csv = make_world_csv(tmp_path / "world_place.csv", n=60)
    out, logs = tmp_path / "o", []
    kw = dict(models=f"{tiny_model_dir},{deep}", datasets=[str(csv)], controls="random",
              device="cpu", progress=False)
    report = run_pipeline(out, log=logs.append, **kw)
    text = report.read_text()
    # the first model's outputs where --model puts them; the second's under OUT/models/NAME
    first = json.loads((out / "probes" / "world_place" / "results.json").read_text())
    where = out / "models" / "deep-llama"
    second = json.loads((where / "probes" / "world_place" / "results.json").read_text())
    assert [e["layer"] for e in first["layers"]] == [1, 2, 3]
    assert [e["layer"] for e in second["layers"]] == [1, 2, 3, 4, 5]
    from actstore.store import open_store
    assert open_store(where / "stores" / "world_place.zarr").meta["model"]["n_layers"] == 5
    rmeta = open_store(where / "controls" / "random-init" / "stores" /
                       "world_place.zarr").meta["model"]
    assert rmeta["source"] == "random-init" and rmeta["base_model"] == str(deep)
    assert (out / "controls" / "random-init" / "probes" / "world_place" / "results.json").exists()
    # the section: the table row (best R², layer/blocks per model, the paper's numbers)
    section = text.split("## Model size")[1].split("\n## ")[0]
    b1 = next(e for e in first["layers"] if e["layer"] == first["best_layer"])["test"]["r2"]
    b2 = next(e for e in second["layers"] if e["layer"] == second["best_layer"])["test"]["r2"]
    assert (f"| world_place | world | {b1:.3f} ({first['best_layer']}/3) | {b2:.3f} "
            f"({second['best_layer']}/5) | 0.88 | 0.90 | 0.92 |") in section
    assert PAPER_LLAMA2["world_place"][1] == (0.88, 0.90, 0.92)
    assert "The datasets differ" in section and "- world_place: best " in section
    assert f"| world_place | {deep} | {b2:.3f} ({second['best_layer']}) |" in section
    assert (out / "model_size.png").exists() and "](model_size.png)" in section
    # a re-run redoes nothing
    logs.clear()
    run_pipeline(out, log=logs.append, **kw)
    assert not any("fitting ridge" in m for m in logs)
    assert sum("up to date" in m for m in logs) == 4   # 2 models x (probe + random-init)


def test_models_option_errors(tmp_path, tiny_model_dir):
    from probes.pipeline.config import PipelineConfig
    from probes.pipeline.run import model_list, model_slug
    with pytest.raises(PipelineError, match="give --model .* or --models .*, not both"):
        model_list(PipelineConfig(out="o", model="a", models="b,c"))
    with pytest.raises(PipelineError, match="model listed twice: smollm2-135m"):
        model_list(PipelineConfig(out="o", models="smollm2,smollm2-135m"))
    assert model_list(PipelineConfig(out="o", models="smollm2, gemma3")) == [
        "smollm2-135m", "gemma3-270m"]
    assert model_list(PipelineConfig(out="o")) == ["smollm2-135m"]
    assert model_slug("meta-llama/Llama-2-7b-hf") == "meta-llama_Llama-2-7b-hf"
    assert model_slug("random:gemma3-270m") == "random_gemma3-270m"
    assert model_slug(str(tiny_model_dir)) == tiny_model_dir.name
