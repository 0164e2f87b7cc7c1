"""The writer lock of a store: one writing run at a time.

A sidecar file ``<store>.actstore-lock`` beside the store (:func:`lock_path`), created with
O_CREAT|O_EXCL before the store is opened, created or deleted, holds its holder as JSON (pid,
host, start time, command). A second writer is refused with a one-line error naming the holder;
a lock whose holder is known to be gone (its process on this host, in this pid namespace, exited
or its pid was reused; or the host rebooted since) is taken over with a note.
Beside the store, not inside it: it exists before a store does, survives an overwrite's
deletion, and is no entry of the store's format. docs/scale-out.md, "One writer per store".
"""
from __future__ import annotations

import errno
import json
import os
import shlex
import socket
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from actstore.errors import StoreError

__all__ = ["LOCK_SUFFIX", "StoreLock", "lock_path", "read_lock", "describe"]

LOCK_SUFFIX = ".actstore-lock"
_KIND = "actstore-writer-lock"


def lock_path(store) -> Path:
    """The lock file of the store at ``store``: ``<store>.actstore-lock`` beside it (symbolic
    links resolved, so every path to one store names one lock)."""
    p = Path(store).absolute()
    p = p.parent.resolve() / p.name
    if p.is_symlink():
        p = p.resolve()
    return p.with_name(p.name + LOCK_SUFFIX)


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of process ``pid`` from /proc (Linux), or
    None where /proc does not show it. The start time and the pid name one process, so a pid
    reused by a later process is not taken for the holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        return fields[0], int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _ident(path: str, link: bool = False) -> str | None:
    """The boot id (``/proc/sys/kernel/random/boot_id``) or pid namespace
    (``/proc/self/ns/pid``) of this process's machine (Linux), else None."""
    try:
        return os.readlink(path) if link else Path(path).read_text().strip()
    except OSError:
        return None


def _boot_id() -> str | None:
    return _ident("/proc/sys/kernel/random/boot_id")


def _pid_ns() -> str | None:
    return _ident("/proc/self/ns/pid", link=True)


def _visible(holder: dict) -> bool:
    """Whether the holder's process would be visible from here: the same host and the same
    pid namespace (a container on this host has its own pids)."""
    return holder.get("host") == socket.gethostname() and holder.get("pid_ns") == _pid_ns()


def _stale(holder: dict) -> bool:
    """Whether the holder is known to be gone: its host rebooted since, or its process (visible
    from here) exited. A holder that cannot be seen from here is never stale."""
    if holder.get("host") != socket.gethostname():
        return False
    boot = _boot_id()
    if boot is not None and holder.get("boot_id") not in (None, boot):
        return True
    return _visible(holder) and not _alive(holder)


def _alive(holder: dict) -> bool:
    """Whether the holder (a process on this host) still runs."""
    try:
        pid = int(holder["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True   # e.g. another user's process: it exists, and we cannot look closer
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, start = stat
    if state == "Z":
        return False   # a zombie: exited, not yet reaped by its parent
    return holder.get("pid_start") is None or int(holder["pid_start"]) == start


def read_lock(store) -> dict | None:
    """The holder recorded in the store's lock file (a dict), or None when there is none.

    Raises
    ------
    StoreError
        The file exists but is no actstore lock.
    """
    path = lock_path(store)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(raw)
    except ValueError:
        holder = None
    if not isinstance(holder, dict) or holder.get("kind") != _KIND:
        if not raw:   # created, not yet written: its writer is between two system calls
            return {"kind": _KIND, "pid": None, "host": None, "started": "?",
                    "command": "?", "empty": True}
        raise StoreError(f"{path} exists but is not an actstore writer lock; move it away "
                         f"(or choose another --out)")
    return holder


def describe(holder: dict) -> str:
    """'pid P on HOST since TIME: COMMAND' for an error message."""
    cmd = str(holder.get("command") or "?")
    if len(cmd) > 200:
        cmd = cmd[:197] + "..."
    return (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}: "
            f"{cmd}")


def _command_line() -> str:
    """This process's command line (``python -m PACKAGE ...`` for a module run)."""
    argv = list(sys.argv) or ["python"]
    if argv[0].endswith("__main__.py"):
        argv[0:1] = ["python", "-m", Path(argv[0]).parent.name]
    return shlex.join(argv)


def _note(message: str) -> None:
    print(f"actstore: note: {message}", file=sys.stderr)


class StoreLock:
    """The exclusive writer lock of the store at ``store``; :meth:`acquire` takes it,
    :meth:`release` gives it back (also as a context manager). ``command``: what the holder
    runs (default: this process's command line); ``note(message)``: where the takeover of a
    stale lock is told (default: stderr).

    Examples
    --------
    >>> with StoreLock("w.zarr"):           # doctest: +SKIP
    ...     ...                             # create, write, resume the store
    """

    def __init__(self, store, command: str | None = None,
                 note: Callable[[str], None] | None = None):
        self.store = Path(store)
        self.path = lock_path(store)
        self.command = command if command is not None else _command_line()
        self.note = note or _note
        self.held = False
        self._holder: dict | None = None

    def _record(self) -> dict:
        pid = os.getpid()
        stat = _proc_stat(pid)
        return {"kind": _KIND, "pid": pid, "pid_start": None if stat is None else stat[1],
                "host": socket.gethostname(), "boot_id": _boot_id(), "pid_ns": _pid_ns(),
                "user": os.environ.get("USER"),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": self.command,
                "store": str(self.store.absolute()), "token": uuid.uuid4().hex}

    def _create(self) -> bool:
        """Create the lock file with our record; False if it exists. Not through
        actstore.io.write_atomic: its rename would replace another writer's lock."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise self._os_error(exc) from None
        rec = self._record()
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(rec, indent=1))
                f.flush()
                os.fsync(f.fileno())
        except BaseException as exc:
            os.unlink(self.path)
            if isinstance(exc, OSError):   # e.g. a full disk
                raise StoreError(f"cannot write the writer lock {self.path}: "
                                 f"{exc.strerror or exc}") from None
            raise
        self._holder, self.held = rec, True
        return True

    def _os_error(self, exc: OSError) -> StoreError:
        d = self.path.parent
        if isinstance(exc, FileNotFoundError):
            return StoreError(f"cannot create store {self.store}: directory {d} does not exist")
        if isinstance(exc, NotADirectoryError):
            return StoreError(f"cannot create store {self.store}: {d} is not a directory")
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return StoreError(f"cannot write {self.store}: directory {d} is not writable (the "
                              f"writer lock {self.path.name} is created there)")
        return StoreError(f"cannot create the writer lock {self.path}: "
                          f"{exc.strerror or exc}")

    def acquire(self) -> StoreLock:
        """Take the lock, or raise :class:`StoreError` naming its holder. A stale lock (its
        holder was on this host and is gone) is taken over, with a note.

        Returns
        -------
        StoreLock
            self, holding the lock.
        """
        for _ in range(20):
            if self._create():
                return self
            holder = read_lock(self.store)
            if holder is None:
                continue   # released in between: try again
            if holder.get("empty"):
                time.sleep(0.05)   # its writer has not written it yet
                if read_lock(self.store) == holder:
                    raise StoreError(f"{self.store} is locked by an empty lock file {self.path} "
                                     "(its writer died while creating it?); delete it and retry")
                continue
            if not _stale(holder):
                raise self._held_error(holder)
            self._break(holder)
        raise StoreError(f"cannot take the writer lock {self.path}: it keeps changing hands")

    def _held_error(self, holder: dict) -> StoreError:
        unseen = not _visible(holder)
        return StoreError(
            f"{self.store} is being written by another run ({describe(holder)}); wait for it "
            "to finish or stop it"
            + (f"; if it is no longer running (it ran on another host or in another container, "
               f"whose processes this one cannot see), delete {self.path}" if unseen else ""))

    def _break(self, holder: dict) -> None:
        """Remove the stale lock ``holder`` read: rename it to a private name first, so that
        of two processes breaking it only one removes it, and a fresh lock taken meanwhile by
        a third is put back, not deleted."""
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}-{uuid.uuid4().hex}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return   # another process broke it first
        try:
            moved = json.loads(aside.read_bytes())
        except (OSError, ValueError):
            moved = None
        if moved == holder:
            aside.unlink()
            self.note(f"took over the writer lock of {self.store}: its holder is gone "
                      f"({describe(holder)})")
            return
        try:   # a live lock, taken after our read: put it back unless a newer one exists
            os.link(aside, self.path)
        except FileExistsError:
            pass
        except OSError:   # no hard links on this file system
            if not self.path.exists():
                os.replace(aside, self.path)
        aside.unlink(missing_ok=True)

    def release(self) -> None:
        """Give the lock back (no-op unless this process holds it: a forked child does not)."""
        if not self.held or self._holder is None or self._holder["pid"] != os.getpid():
            return
        self.held = False
        try:
            current = json.loads(self.path.read_bytes())
        except (OSError, ValueError):
            return
        if isinstance(current, dict) and current.get("token") == self._holder["token"]:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
