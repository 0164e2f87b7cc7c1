"""Files: the one atomic writer every tool uses, the user cache, and content hashes.

:func:`write_atomic` writes to a temporary ``*.partial`` file beside the target and renames it
into place, so a killed writer leaves the old file or the new one, never a torn one (an
exclusive store open deletes leftover ``*.partial`` files). Imports only the standard library.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Union

__all__ = ["write_atomic", "write_json", "cache_dir", "file_sha256", "PARTIAL_SUFFIX"]

PARTIAL_SUFFIX = ".partial"
Content = Union[bytes, str, Callable[[BinaryIO], None]]


def write_atomic(path, content: Content, *, check: Callable[[Path], None] | None = None,
                 mkdir: bool = False) -> Path:
    """Write ``content`` to ``path`` through a temporary file and a rename.

    Parameters
    ----------
    path : str or Path
        The file to (re)place.
    content : bytes, str or callable
        The bytes, a string (UTF-8), or ``write(file)`` that writes into the open binary file.
    check : callable, optional
        ``check(temporary_path)`` runs before the rename; if it raises, the temporary file is
        deleted and ``path`` is left as it was (e.g. a download that must parse first).
    mkdir : bool
        Create the parent directories first.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
        if check is not None:
            check(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def write_json(path, obj, *, indent: int | None = 1, mkdir: bool = False,
               allow_nan: bool = True) -> Path:
    """:func:`write_atomic` of ``json.dumps(obj, indent=indent)``."""
    return write_atomic(path, json.dumps(obj, indent=indent, allow_nan=allow_nan), mkdir=mkdir)


def cache_dir() -> Path:
    """The user cache: ``$ACTSTORE_CACHE``, else ``$XDG_CACHE_HOME/actstore``, else
    ``~/.cache/actstore``."""
    env = os.environ.get("ACTSTORE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "actstore"


def file_sha256(path) -> str:
    """sha256 of a file, remembered in the cache by (path, size, mtime): big files hash once."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    index = cache_dir() / "sha256.json"
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    known[key] = digest = h.hexdigest()
    try:
        write_json(index, known, indent=0, mkdir=True)
    except OSError:
        pass  # a read-only home only costs re-hashing next time
    return digest
