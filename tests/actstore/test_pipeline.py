"""`actstore run`: extract -> fit -> report on a tiny in-process model, and resumption."""
import json

import pytest

from actstore.cli import main
from actstore.pipeline import run_pipeline


def test_run_writes_report_and_reuses_finished_steps(tmp_path, tiny_model_dir, make_world_csv):
    csv = make_world_csv(tmp_path / "world_place.csv", n=60)
    out = tmp_path / "run"
    logs = []
    report = run_pipeline(out, model=str(tiny_model_dir), datasets=[str(csv)], batch_size=8,
                          device="cpu", progress=False, log=logs.append)
    text = report.read_text()
    assert "| world_place | world_place | " in text
    assert "r2_by_layer.png" in text and (out / "probes" / "world_place" / "r2_by_layer.png").exists()
    results = json.loads((out / "probes" / "world_place" / "results.json").read_text())
    assert results["n_rows"] == 60 and results["targets"] == ["latitude", "longitude"]
    assert len(results["layers"]) == 3  # the tiny model has 3 blocks
    first = (out / "probes" / "world_place" / "results.json").stat().st_mtime_ns

    logs.clear()
    run_pipeline(out, model=str(tiny_model_dir), datasets=[str(csv)], device="cpu",
                 progress=False, log=logs.append)
    assert any("store complete" in m for m in logs)
    assert any("probes up to date" in m for m in logs)
    assert (out / "probes" / "world_place" / "results.json").stat().st_mtime_ns == first

    # another fit option refits; another prompt or limit under the same OUT is refused
    logs.clear()
    run_pipeline(out, model=str(tiny_model_dir), datasets=[str(csv)], device="cpu", cv=3,
                 progress=False, log=logs.append)
    assert any("fitting ridge probes" in m for m in logs)
    assert json.loads((out / "probes" / "world_place" / "results.json").read_text())["cv"] == 3
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
