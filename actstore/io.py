"""Files: the one atomic writer every tool uses, the user cache, and content hashes.

:func:`write_atomic` writes to a temporary ``*.partial`` file beside the target and renames it
into place, so a killed writer leaves the old file or the new one, never a torn one (an
exclusive store open deletes leftover ``*.partial`` files); a write that fails (a full disk)
raises :class:`WriteError`, naming the file and saying the previous one is unchanged.
``fsync=True`` also makes it survive power loss (:func:`fsync_file`, :func:`fsync_dir`).
Imports only the standard library.
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
           "PARTIAL_SUFFIX", "WriteError"]

PARTIAL_SUFFIX = ".partial"
Content = Union[bytes, str, Callable[[BinaryIO], None]]
_NO_ROOM = tuple(getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EFBIG") if hasattr(errno, n))


class WriteError(OSError):
    """A file :func:`write_atomic` could not write: an OSError (``errno``, ``strerror`` of the
    cause, ``filename`` = the target) whose one-line message names the file and says that the
    previous file, if any, is unchanged (``kept``) and what to do.

    Not an ``ActstoreError`` (a ValueError): code that catches OSError keeps catching it, and
    the CLIs print any OSError as one line.
    """

    def __init__(self, filename, errno_: int | None, strerror: str | None, kept: str):
        super().__init__(errno_, strerror, str(filename))
        self.kept = kept

    def __str__(self) -> str:
        cause = (f"[Errno {self.errno}] {self.strerror}" if self.errno is not None
                 else str(self.strerror))
        hint = ("free some space or write elsewhere" if self.errno in _NO_ROOM
                else "check the folder's permissions or write elsewhere"
                if self.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
                else "write elsewhere")
        return f"cannot write {self.filename}: {cause}; {self.kept} ({hint})"

    def __reduce__(self):
        return type(self), (self.filename, self.errno, self.strerror, self.kept)


def _write_error(path: Path, exc: OSError) -> WriteError:
    """The :class:`WriteError` of a failed write of ``path`` (the rename never happened)."""
    if isinstance(exc, WriteError):
        return exc
    kept = (f"the previous {path.name} is unchanged" if path.exists()
            else f"no {path.name} was written")
    return WriteError(path, exc.errno, exc.strerror or str(exc), kept)


class _Target:
    """The open temporary file as ``content(file)`` sees it: its write errors become
    :class:`WriteError` (naming the target), as does a full disk however the callable met it;
    any other error of the callable (a failed download, say) passes through as it is."""

    def __init__(self, f: BinaryIO, path: Path):
        self._f, self._path = f, path

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            raise _write_error(self._path, exc) from exc

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as exc:
            raise _write_error(self._path, exc) from exc

    def __getattr__(self, name):
        return getattr(self._f, name)


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

    Raises
    ------
    WriteError
        The file could not be written or renamed (a full disk, no permission): the message
        names ``path``; ``path`` is left as it was and no temporary file remains.
    """
    path = Path(path)
    try:
        created = _make_parents(path.parent) if mkdir else []
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                   suffix=PARTIAL_SUFFIX)
    except OSError as exc:
        raise _write_error(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as raw:
            f = _Target(raw, path)
            if callable(content):
                try:
                    content(f)
                except OSError as exc:   # a full disk, whichever way the callable wrote
                    if exc.errno in _NO_ROOM:
                        raise _write_error(path, exc) from exc
                    raise
            else:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
            f.flush()             # a full disk may only show when the buffer is written
            if fsync:
                try:
                    os.fsync(f.fileno())
                except OSError as exc:
                    raise _write_error(path, exc) from exc
        if check is not None:
            check(Path(tmp))
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise _write_error(path, exc) from exc
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
