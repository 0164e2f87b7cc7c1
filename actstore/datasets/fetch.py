"""Download the paper's entity CSVs into the user cache (``actstore datasets fetch NAME``).

Source: github.com/wesg52/world-models, folder data/entity_datasets/, pinned to one commit.
``ACTSTORE_DATASETS_URL`` (or ``--url``) replaces the base URL: http(s) only, file:// only with
``allow_file_url``. Every download is checked against the published file (:data:`PUBLISHED`)
before it enters the cache; a mismatch is refused unless ``allow_unverified``. No message
quotes the downloaded bytes: errors name the URL and the problem.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from actstore.datasets.paper import load_csv, paper_path
from actstore.datasets.table import KINDS, SCHEMAS
from actstore.errors import DatasetError
from actstore.io import write_atomic

__all__ = ["fetch_dataset", "dataset_url", "base_url", "check_base_url", "published_mismatch",
           "git_blob_id", "Published", "PUBLISHED", "PAPER_REPO", "PAPER_COMMIT",
           "DEFAULT_BASE_URL", "EXPECTED_ROWS", "MAX_DOWNLOAD_BYTES"]

PAPER_REPO = "wesg52/world-models"
PAPER_COMMIT = "a572f162948ee185e9c842eb5fa15e23aad3d218"
DEFAULT_BASE_URL = (
    f"https://raw.githubusercontent.com/{PAPER_REPO}/{PAPER_COMMIT}/data/entity_datasets/"
)
# rows of the published files (headline has quoted newlines: 28,389 rows on more lines)
EXPECTED_ROWS = {"world_place": 39585, "us_place": 29997, "nyc_place": 19838,
                 "historical_figure": 37539, "art": 31321, "headline": 28389}
# a download stops here (the published files are a few MB; a mirror cannot fill the disk)
MAX_DOWNLOAD_BYTES = 64 << 20
URL_SCHEMES = ("http", "https")


@dataclass(frozen=True)
class Published:
    """What the published file is: its git blob id at PAPER_COMMIT (sha1 of b"blob SIZE\\0" +
    content, which covers size and content), and its size and sha256 where known."""

    git_blob: str
    size: int | None = None
    sha256: str | None = None


# Blob ids: `git ls-tree -l PAPER_COMMIT data/entity_datasets/` of the paper's repository. Size
# and sha256 were computed from the blobs' content for the four files whose content was at hand
# (the three place CSVs are also the copies in ../shared/datasets/paper). For historical_figure
# and headline only the blob id was available (their content was absent from the snapshot
# read): they are verified by the blob id alone, which is enough (a SHA-1 second preimage of a
# fixed, already published file is out of reach), and capped at MAX_DOWNLOAD_BYTES.
PUBLISHED = {
    "world_place": Published("9711e7849ea28726d8a0beb3bd523c4dd95920d5", 3894740,
                             "b1608f9410b48fe4ca71836d81baa5aa20d34d319cd7f98a725fd8545bdce040"),
    "us_place": Published("ff49a3fa461083436b5302d2859a69aad57f21f9", 2737712,
                          "95af51d5b80ba1a0085c431583294f4917b95628869130d65762a7e8bf6eff6e"),
    "nyc_place": Published("4c00554e2cbd0821ddcc126986326e98446245b4", 4079022,
                           "72558b55c86e0f113fdb35f3cd7ef0dfb439820e36b47e654e5169cb094445cf"),
    "art": Published("d219b7aa1cff37892f61576cf813121a86d6fcd6", 2747096,
                     "37ef497d0c2871c074c166a0c4f229c460aca092a90ecc83bd6f9d0f12bc3b41"),
    "historical_figure": Published("4ed5329f7192b288b0fe784ca57db9bb9cb78010"),
    "headline": Published("94f86281b95e5407f276ea3d663b256349f45f54"),
}


def base_url(url: str | None = None) -> str:
    """``url``, else ``$ACTSTORE_DATASETS_URL``, else the paper's repository (not checked)."""
    return url or os.environ.get("ACTSTORE_DATASETS_URL") or DEFAULT_BASE_URL


def dataset_url(kind: str, url: str | None = None) -> str:
    """Where ``kind``.csv is downloaded from: NAME.csv appended to :func:`base_url`."""
    return base_url(url).rstrip("/") + f"/{kind}.csv"


def check_base_url(url: str | None = None, allow_file_url: bool = False) -> str:
    """The base URL to fetch from, once it is one fetch may read.

    Parameters
    ----------
    url : str, optional
        ``--url``; None: ``$ACTSTORE_DATASETS_URL``, else the paper's repository.
    allow_file_url : bool
        Accept a ``file://`` URL (a local folder holding NAME.csv).

    Returns
    -------
    str
        The base URL.

    Raises
    ------
    DatasetError
        A scheme other than http(s) (file:// without ``allow_file_url``), no host, or a query
        or fragment (NAME.csv is appended to the URL's path, so '?' or '#' would swallow it).
    """
    where = "--url" if url else "$ACTSTORE_DATASETS_URL"
    base = base_url(url)
    parts = urllib.parse.urlsplit(base)
    scheme = parts.scheme.lower()
    if "?" in base or "#" in base:
        raise DatasetError(f"{where} {base!r}: a base URL takes no query or fragment ('?', '#'); "
                           "NAME.csv is appended to its path")
    if scheme == "file" and not allow_file_url:
        raise DatasetError(f"{where} {base!r}: file:// URLs read local files and are refused; "
                           "pass --allow-file-url (allow_file_url=True) to fetch from a local "
                           "folder, or load a CSV by its path")
    if scheme not in (*URL_SCHEMES, "file"):
        raise DatasetError(f"{where} {base!r}: only http:// and https:// URLs are accepted")
    if scheme in URL_SCHEMES and not parts.hostname:
        raise DatasetError(f"{where} {base!r}: no host in the URL")
    return base


def git_blob_id(data: bytes) -> str:
    """Git's object id of a file's bytes: sha1(b"blob <size>\\0" + data)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def published_mismatch(kind: str, data: bytes) -> str | None:
    """None when ``data`` is the published ``kind``.csv, else what differs (sizes and hashes,
    never content)."""
    pub = PUBLISHED[kind]
    if pub.size is not None and len(data) != pub.size:
        return f"{len(data)} bytes, the published file {pub.size}"
    blob = git_blob_id(data)
    if blob != pub.git_blob:
        return f"git blob {blob[:12]}, the published file {pub.git_blob[:12]}"
    if pub.sha256 is not None and hashlib.sha256(data).hexdigest() != pub.sha256:
        return f"sha256 differs from the published file's {pub.sha256[:12]}"
    return None


def fetch_dataset(kind: str, url: str | None = None, force: bool = False,
                  timeout: float = 60.0, progress=None, allow_file_url: bool = False,
                  allow_unverified: bool = False) -> dict:
    """Download ``kind``.csv, check it is the published file and loads, and move it into the
    cache atomically.

    Parameters
    ----------
    kind : str
        One of the paper's six datasets.
    url : str, optional
        Base URL holding NAME.csv (default: ``$ACTSTORE_DATASETS_URL`` or the paper's repository).
    force : bool
        Download even when the cache holds the file.
    timeout : float
        Network timeout in seconds.
    progress : callable, optional
        ``progress(bytes_done, bytes_total)`` while downloading (total 0 when unknown).
    allow_file_url : bool
        Accept a file:// base URL.
    allow_unverified : bool
        Keep a download that is not the published file (an edited mirror); the report and the
        cache's NAME.json record ``verified: false``.

    Returns
    -------
    dict
        kind, path, url, sha256, git_blob, verified, rows, test_rows, n_dropped, cached (True
        when the file was already there and nothing was downloaded), and a "note" when the file
        is not the published one.

    Raises
    ------
    DatasetError
        A refused URL, a failed download, a file that is not the published one (the cache keeps
        what it had), or one that does not load.
    """
    if kind not in KINDS:
        raise DatasetError(f"unknown paper dataset {kind!r}; choose one of {', '.join(KINDS)}")
    dest = paper_path(kind)
    src = dataset_url(kind, check_base_url(url, allow_file_url))
    if dest.exists() and not force:
        data = dest.read_bytes()
        ds = _load(dest, kind, data, f"the cached copy {dest} is unusable ({{}}); download it "
                   f"again with `actstore datasets fetch {kind} --force`")
        return _report(kind, dest, src, ds, data, cached=True)
    pub = PUBLISHED[kind]
    limit = ((pub.size, "the published file's size") if pub.size is not None
             and not allow_unverified else (MAX_DOWNLOAD_BYTES, "the download cap"))
    loaded = {}

    def check(tmp: Path) -> None:
        data = tmp.read_bytes()
        problem = published_mismatch(kind, data)
        if problem is not None and not allow_unverified:
            raise DatasetError(
                f"{src} is not the published {kind}.csv of {PAPER_REPO} at commit "
                f"{PAPER_COMMIT[:12]} ({problem}); refused, the cache is unchanged. A mirror must "
                "serve the published files byte for byte; --allow-unverified "
                "(allow_unverified=True) keeps a different file anyway")
        loaded["ds"] = _load(tmp, kind, data, f"downloaded {src} is not a valid {kind} CSV "
                             "({}); nothing was cached")
        loaded["data"] = data

    write_atomic(dest, lambda out: _download(src, out, timeout, progress, limit), check=check,
                 mkdir=True)
    ds = loaded["ds"]
    ds.source = str(dest)
    report = _report(kind, dest, src, ds, loaded["data"], cached=False)
    meta = {k: report[k] for k in ("url", "sha256", "git_blob", "verified", "rows", "n_dropped")}
    meta["fetched_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_atomic(dest.with_suffix(".json"), json.dumps(meta, indent=1) + "\n")
    return report


def _load(path: Path, kind: str, data: bytes, message: str):
    """load_csv (invalid rows dropped and counted), its failure told without quoting the file:
    ``message`` gets the problem in place of ``{}``."""
    try:
        # real files may hold a few unusable rows; they are dropped (and counted) on load
        return load_csv(path, kind=kind, drop_invalid=True, name=kind)
    except DatasetError:
        raise DatasetError(message.format(_content_problem(data, kind))) from None


def _content_problem(data: bytes, kind: str) -> str:
    """Why ``data`` is not a ``kind`` CSV, in words that quote none of its bytes."""
    if not data.strip():
        return "empty file"
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return "not UTF-8 text"
    records = csv.reader(io.StringIO(text))
    try:
        header = [c.strip() for c in next(records, [])]
        missing = [c for c in SCHEMAS[kind].required if c not in header]
        if missing:
            return f"no column(s) {', '.join(map(repr, missing))}, which a {kind} CSV needs"
        n = 0
        for record in records:
            if len(record) > len(header):
                return f"line {records.line_num} has more fields than the header"
            n += bool(record)
    except csv.Error:
        return f"malformed CSV at line {records.line_num}"
    return f"none of its {n} rows is valid" if n else "no data rows"


def _report(kind, dest: Path, src: str, ds, data: bytes, cached: bool) -> dict:
    problem = published_mismatch(kind, data)
    rep = {"kind": kind, "path": str(dest), "url": src, "sha256": ds.sha256,
           "git_blob": git_blob_id(data), "verified": problem is None,
           "rows": len(ds) + ds.n_dropped, "test_rows": int(ds.is_test.sum()),
           "n_dropped": ds.n_dropped, "cached": cached}
    notes = []
    if problem is not None:
        notes.append(f"not the published file ({problem}); `actstore datasets fetch {kind} "
                     "--force` downloads the published one")
    if rep["rows"] != EXPECTED_ROWS[kind]:
        notes.append(f"the published file has {EXPECTED_ROWS[kind]} rows; this one has "
                     f"{rep['rows']}")
    if notes:
        rep["note"] = "; ".join(notes)
    return rep


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) URLs only (urllib would also follow one to ftp://)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in URL_SCHEMES:
            raise DatasetError(f"{req.full_url} redirects to a {scheme or 'relative'}: URL; "
                               "only http(s) redirects are followed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _download(src: str, out, timeout: float, progress, limit: tuple[int, str]) -> None:
    req = urllib.request.Request(src, headers={"User-Agent": "actstore-datasets"})
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    try:
        with opener.open(req, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0)
            done = 0
            while True:
                chunk = resp.read(1 << 20)
                if not chunk:
                    break
                done += len(chunk)
                if done > limit[0]:
                    raise DatasetError(f"{src}: more than {limit[0]} bytes ({limit[1]}); "
                                       "refused, the cache is unchanged")
                out.write(chunk)
                if progress is not None:
                    progress(done, total)
    except urllib.error.HTTPError as exc:
        raise DatasetError(f"download failed: {src}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DatasetError(
            f"cannot download {src}: {reason}. Are you offline? The built-in datasets "
            f"(world_cities, us_places, nobel, films) need no network; a CSV you copied by hand "
            f"can be passed as a path, or set ACTSTORE_DATASETS_URL to a mirror."
        ) from None
