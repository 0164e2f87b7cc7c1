"""`actstore datasets list|show|fetch`, and fetch against a local HTTP server."""
from __future__ import annotations

import argparse
import csv
import functools
import http.server
import json
import socket
import threading

import pytest

from actstore.cli import run
from actstore.datasets import DatasetError, add_cli, fetch_dataset, load_dataset


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ACTSTORE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ACTSTORE_DATASETS_URL", raising=False)
    return tmp_path / "cache"


def cli(argv, capsys):
    # the datasets commands alone (the full `actstore` parser also loads other modules)
    parser = argparse.ArgumentParser(prog="actstore")
    add_cli(parser.add_subparsers(dest="command"))
    rc = run(parser, argv, "actstore")
    out, err = capsys.readouterr()
    return rc, out, err


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    """serve(directory) -> base URL of a local HTTP server (127.0.0.1, thread) for it."""
    servers = []

    def start(directory):
        handler = functools.partial(_Quiet, directory=str(directory))
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}/"

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"  # nothing listens there any more


WORLD_HEADER = ["name", "entity_subtype", "country", "latitude", "longitude", "has_thumbnail",
                "page_views", "entity_type", "total_area", "population", "is_test"]


def small_world_csv(path, bad_lat="95"):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(WORLD_HEADER)
        w.writerow(["Paris", "City", "France", "48.85", "2.35", "1", "1", "populated_place", "",
                    "", "False"])
        w.writerow(["Nowhere", "City", "France", bad_lat, "2", "1", "1", "populated_place", "",
                    "", "True"])
    return path


# ----------------------------------------------------------------------------- list / show
def test_list_text_and_json(capsys):
    rc, out, _ = cli(["datasets", "list"], capsys)
    assert rc == 0 and "world_cities" in out and "headline" in out and "fetch" in out
    rc, out, _ = cli(["datasets", "list", "--json"], capsys)
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["us_places"]["kind"] == "us_place" and rows["us_places"]["available"]
    assert rows["world_place"]["source"] == "paper" and not rows["world_place"]["available"]


@pytest.mark.slow
def test_show_world_place_json(paper_data, capsys):
    rc, out, _ = cli(["datasets", "show", str(paper_data / "world_place.csv"), "--json"], capsys)
    s = json.loads(out)
    assert rc == 0 and s["rows"] == 39585 and s["test_rows"] == 7917
    assert s["kind"] == "world_place" and s["entity_types"]["populated_place"] == 30783
    assert -90 <= s["targets"]["latitude"]["min"] < s["targets"]["latitude"]["max"] <= 90
    assert s["group_columns"]["country"] > 100


def test_show_builtin_text(capsys):
    rc, out, _ = cli(["datasets", "show", "nobel"], capsys)
    assert rc == 0 and "kind historical_figure" in out and "physics" in out
    assert "target      year: 1901 .. 2010" in out


def test_show_bad_csv_and_drop_invalid(tmp_path, capsys):
    path = small_world_csv(tmp_path / "w.csv")
    rc, out, err = cli(["datasets", "show", str(path)], capsys)
    assert rc == 2 and out == "" and "Traceback" not in err
    assert f"{path}" in err and "line 3, column 'latitude': 95 is outside [-90, 90]" in err
    rc, out, err = cli(["datasets", "show", str(path), "--drop-invalid", "--json"], capsys)
    s = json.loads(out)
    assert rc == 0 and s["rows"] == 1 and s["n_dropped"] == 1 and s["examples"] == ["Paris"]


def test_show_with_kind(tmp_path, capsys):
    path = small_world_csv(tmp_path / "odd.csv", bad_lat="10")
    rc, out, err = cli(["datasets", "show", str(path), "--kind", "us_place"], capsys)
    assert rc == 2 and "missing column(s) 'state_name', 'timezone'" in err
    rc, out, _ = cli(["datasets", "show", str(path), "--kind", "world_place", "--json"], capsys)
    assert rc == 0 and json.loads(out)["rows"] == 2


def test_help_texts_teach(capsys):
    for argv in (["datasets", "--help"], ["datasets", "show", "--help"],
                 ["datasets", "fetch", "--help"]):
        with pytest.raises(SystemExit) as exc:
            cli(argv, capsys)
        assert exc.value.code == 0
        assert "examples:" in capsys.readouterr().out


# ----------------------------------------------------------------------------- fetch
@pytest.mark.slow
def test_fetch_from_local_server(paper_data, serve, capsys, _private_cache, monkeypatch):
    base = serve(paper_data)
    rc, out, err = cli(["datasets", "fetch", "us_place", "--url", base], capsys)
    assert rc == 0, err
    assert "us_place: downloaded, 29997 rows (5999 test)" in out
    cached = _private_cache / "paper" / "us_place.csv"
    assert cached.read_bytes() == (paper_data / "us_place.csv").read_bytes()
    assert not list(cached.parent.glob(".*part"))  # no temporary files left behind
    meta = json.loads(cached.with_suffix(".json").read_text())
    assert meta["url"] == base + "us_place.csv" and meta["rows"] == 29997
    ds = load_dataset("us_place")
    assert ds.name == "us_place" and len(ds) == 29997 and ds.source == str(cached)
    # a second fetch finds the cache and downloads nothing (the server is gone)
    rc, out, _ = cli(["datasets", "fetch", "us_place", "--url", closed_port_url()], capsys)
    assert rc == 0 and "already cached" in out
    # the environment variable sets the base URL too
    monkeypatch.setenv("ACTSTORE_DATASETS_URL", base)
    rep = fetch_dataset("us_place", force=True)
    assert rep["url"] == base + "us_place.csv" and not rep["cached"] and "note" not in rep


def test_fetch_offline_fails_clearly(capsys, _private_cache):
    rc, out, err = cli(["datasets", "fetch", "world_place", "--url", closed_port_url(),
                        "--timeout", "5"], capsys)
    assert rc == 2 and "Traceback" not in err
    assert "cannot download http://127.0.0.1:" in err and "offline" in err
    assert not (_private_cache / "paper" / "world_place.csv").exists()
    assert not list((_private_cache / "paper").glob("*"))  # no partial file


def test_fetch_http_error_and_invalid_content(tmp_path, serve, _private_cache):
    site = tmp_path / "site"
    site.mkdir()
    small_world_csv(site / "world_place.csv", bad_lat="10")
    (site / "nyc_place.csv").write_text("not,a,dataset\n1,2,3\n")
    base = serve(site)
    with pytest.raises(DatasetError, match=r"HTTP 404"):
        fetch_dataset("art", url=base)
    with pytest.raises(DatasetError, match=r"not a valid nyc_place CSV: .*missing column"):
        fetch_dataset("nyc_place", url=base)
    assert not (_private_cache / "paper" / "nyc_place.csv").exists()
    rep = fetch_dataset("world_place", url=base)
    # the wrong row count of this tiny file is reported, not hidden
    assert rep["rows"] == 2 and "39585" in rep["note"]
    assert load_dataset("world_place").entities == ["Paris", "Nowhere"]
    with pytest.raises(DatasetError, match="unknown paper dataset"):
        fetch_dataset("world_cities", url=base)


def test_fetch_keeps_file_with_invalid_rows_and_says_so(tmp_path, serve, capsys):
    site = tmp_path / "site"
    site.mkdir()
    small_world_csv(site / "world_place.csv", bad_lat="95")
    rc, out, err = cli(["datasets", "fetch", "world_place", "--url", serve(site)], capsys)
    assert rc == 0, err
    assert "2 rows (0 test, 1 invalid rows: load it with --drop-invalid)" in out
    with pytest.raises(DatasetError, match=r"world_place\.csv: 1 invalid row.*\n.*line 3"):
        load_dataset("world_place")
    assert load_dataset("world_place", drop_invalid=True).entities == ["Paris"]
