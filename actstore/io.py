"""Files: the one atomic writer every tool uses, the user cache, and content hashes.

:func:`write_atomic` writes to a temporary ``*.partial`` file beside the target and renames it
into place, so a killed writer leaves the old file or the new one, never a torn one (an
exclusive store open deletes leftover ``*.partial`` files); ``fsync=True`` also makes it survive
power loss (:func:`fsync_file`, :func:`fsync_dir`). Imports only the standard library.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Union

__all__ = ["write_atomic", "write_json", "fsync_file", "fsync_dir", "cache_dir", "file_sha256",
           "PARTIAL_SUFFIX"]

PARTIAL_SUFFIX = ".partial"
Content = Union[bytes, str, Callable[[BinaryIO], None]]


def write_atomic(path, content: Content, *, check: Callable[[Path], None] | None = None,
                 mkdir: bool = False, fsync: bool = False) -> Path:
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
    fsync : bool
        Durable against power loss when it returns: the file's bytes are flushed to the disk
        before the rename, and the directory entries (the rename, and any directory ``mkdir``
        created) after it. A store's row blocks and progress records use it.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    created = _make_parents(path.parent) if mkdir else []
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        if check is not None:
            check(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if fsync:
        for d in dict.fromkeys([path.parent] + [c.parent for c in created]):
            fsync_dir(d)
    return path


def _make_parents(d: Path) -> list[Path]:
    """``mkdir -p d``; the directories that were missing, outermost first (their entries are
    synced too, even where another writer made one meanwhile)."""
    missing = []
    while not d.exists():
        missing.append(d)
        d = d.parent
    for m in reversed(missing):
        m.mkdir(exist_ok=True)
    return missing[::-1]


def fsync_file(path) -> None:
    """Flush a file's bytes to the disk (e.g. one another library wrote), then its directory
    entry."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(Path(path).parent)


def fsync_dir(path) -> None:
    """Flush a directory's entries (renames, new files) to the disk. A no-op where directories
    cannot be opened or synced (Windows; some network file systems)."""
    flags = getattr(os, "O_DIRECTORY", None)
    if flags is None:
        return
    try:
        fd = os.open(path, os.O_RDONLY | flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_json(path, obj, *, indent: int | None = 1, mkdir: bool = False,
               allow_nan: bool = True, fsync: bool = False) -> Path:
    """:func:`write_atomic` of ``json.dumps(obj, indent=indent)``."""
    return write_atomic(path, json.dumps(obj, indent=indent, allow_nan=allow_nan), mkdir=mkdir,
                        fsync=fsync)


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
