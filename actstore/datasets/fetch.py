"""Download the paper's entity CSVs into the user cache (``actstore datasets fetch NAME``).

Source: github.com/wesg52/world-models, folder data/entity_datasets/, pinned to one commit so
that a cached file's content never changes under the same name. ``ACTSTORE_DATASETS_URL`` (or
``--url``) replaces the base URL, e.g. a mirror or a local ``http.server`` in tests.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

from actstore.datasets.paper import load_csv, paper_path
from actstore.datasets.table import KINDS
from actstore.errors import DatasetError
from actstore.io import write_atomic

PAPER_REPO = "wesg52/world-models"
PAPER_COMMIT = "a572f162948ee185e9c842eb5fa15e23aad3d218"
DEFAULT_BASE_URL = (
    f"https://raw.githubusercontent.com/{PAPER_REPO}/{PAPER_COMMIT}/data/entity_datasets/"
)
# rows of the published files (headline has quoted newlines: 28,389 rows on more lines)
EXPECTED_ROWS = {"world_place": 39585, "us_place": 29997, "nyc_place": 19838,
                 "historical_figure": 37539, "art": 31321, "headline": 28389}


def base_url(url: str | None = None) -> str:
    return url or os.environ.get("ACTSTORE_DATASETS_URL") or DEFAULT_BASE_URL


def dataset_url(kind: str, url: str | None = None) -> str:
    return base_url(url).rstrip("/") + f"/{kind}.csv"


def fetch_dataset(kind: str, url: str | None = None, force: bool = False,
                  timeout: float = 60.0, progress=None) -> dict:
    """Download ``kind``.csv, check it loads, and move it into the cache atomically.

    Returns a dict: kind, path, url, sha256, rows, test_rows, n_dropped, cached (True when the
    file was already there and nothing was downloaded).
    """
    if kind not in KINDS:
        raise DatasetError(f"unknown paper dataset {kind!r}; choose one of {', '.join(KINDS)}")
    dest = paper_path(kind)
    src = dataset_url(kind, url)
    if dest.exists() and not force:
        try:
            ds = load_csv(dest, kind=kind, drop_invalid=True, name=kind)
        except DatasetError as exc:
            raise DatasetError(f"the cached copy is unusable ({exc}); download it again with "
                               f"`actstore datasets fetch {kind} --force`") from None
        return _report(kind, dest, src, ds, cached=True)
    loaded = {}

    def check(tmp: Path) -> None:
        try:
            # real files may hold a few unusable rows; they are dropped (and counted) on load
            loaded["ds"] = load_csv(tmp, kind=kind, drop_invalid=True, name=kind)
        except DatasetError as exc:
            raise DatasetError(f"downloaded {src} is not a valid {kind} CSV: {exc}") from None

    write_atomic(dest, lambda out: _download(src, out, timeout, progress), check=check,
                 mkdir=True)
    ds = loaded["ds"]
    ds.source = str(dest)
    report = _report(kind, dest, src, ds, cached=False)
    meta = {k: report[k] for k in ("url", "sha256", "rows", "n_dropped")}
    meta["fetched_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_atomic(dest.with_suffix(".json"), json.dumps(meta, indent=1) + "\n")
    return report


def _report(kind, dest: Path, src: str, ds, cached: bool) -> dict:
    rep = {"kind": kind, "path": str(dest), "url": src, "sha256": ds.sha256,
           "rows": len(ds) + ds.n_dropped, "test_rows": int(ds.is_test.sum()),
           "n_dropped": ds.n_dropped, "cached": cached}
    if rep["rows"] != EXPECTED_ROWS[kind]:
        rep["note"] = (f"the published file has {EXPECTED_ROWS[kind]} rows; this one has "
                       f"{rep['rows']}")
    return rep


def _download(src: str, out, timeout: float, progress) -> None:
    req = urllib.request.Request(src, headers={"User-Agent": "actstore-datasets"})
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0)
            done = 0
            while True:
                chunk = resp.read(1 << 20)
                if not chunk:
                    break
                out.write(chunk)
                h.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
    except urllib.error.HTTPError as exc:
        raise DatasetError(f"download failed: {src}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DatasetError(
            f"cannot download {src}: {reason}. Are you offline? The built-in datasets "
            f"(world_cities, us_places, nobel) need no network; a CSV you copied by hand can be "
            f"passed as a path, or set ACTSTORE_DATASETS_URL to a mirror."
        ) from None
