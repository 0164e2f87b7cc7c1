"""The store's writer lock (actstore.store.lock): a second writer is refused while a first one
runs (two real processes: the first is forked, or started as the CLI, and paused by the
``ACTSTORE_TEST_PAUSE`` hook), the loser of a race to create a store gets the lock error (not
"use --overwrite"), the lock goes on exit, error and Ctrl-C, and a dead holder's lock is taken
over with a note. The torchrun case is in test_distributed.py."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

import actstore
from actstore.errors import StoreError
from actstore.extract import ExtractError, extract
from actstore.store.lock import LOCK_SUFFIX, StoreLock, _boot_id, _pid_ns, lock_path, read_lock

REPO = Path(__file__).resolve().parents[2]
N = 48
KW = dict(batch_size=4, rows_per_chunk=8, progress=False)


@contextmanager
def one_thread():
    """As the forked writers compute (one thread), so that bytes can be compared."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture()
def csv(tmp_path, make_world_csv):
    return make_world_csv(tmp_path / "w.csv", n=N, seed=2)


def _paused_writer(stage, flag, args, kw):
    """In the forked child: an extraction that pauses at ``stage`` until ``flag`` is deleted."""
    os.environ["ACTSTORE_TEST_PAUSE"] = f"{stage}:{flag}"
    code = 0
    try:
        torch.set_num_threads(1)
        extract(*args, **kw)
    except SystemExit as exc:
        code = exc.code
    except BaseException:  # noqa: BLE001 - the exit status tells the test
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _wait_for(flag: Path, alive, timeout: float = 180.0) -> int:
    """The pid a paused writer wrote into ``flag``, once it is there."""
    t0 = time.time()
    while not flag.exists():
        assert alive(), "the writer ended before it paused"
        assert time.time() - t0 < timeout, "the writer did not pause"
        time.sleep(0.01)
    return int(flag.read_text())


def _start_paused(tmp_path, stage, args, kw):
    """A forked writer paused at ``stage``: (process, flag file, its pid)."""
    flag = tmp_path / f"pause-{stage}"
    p = mp.get_context("fork").Process(target=_paused_writer, args=(stage, flag, args, kw),
                                       daemon=True)
    p.start()
    pid = _wait_for(flag, p.is_alive)
    assert pid == p.pid
    return p, flag, pid


def _resume(p, flag) -> int:
    flag.unlink()
    p.join(180)
    return p.exitcode


def _holder_pattern(pid: int) -> str:
    return rf"is being written by another run \(pid {pid} on {socket.gethostname()} since "


def _rows_done(out: Path) -> int:
    if out.suffix == ".h5":
        import h5py
        with h5py.File(out, "r", locking=False) as f:
            return int(f["rows_done"][0])
    return int(json.loads((out / "zarr.json").read_text())["attributes"]["rows_done"])


# ----------------------------------------------------------------------------- two processes

@pytest.mark.parametrize("name", ["s.zarr", "s.h5"])
def test_a_second_writer_is_refused_while_the_first_runs(tmp_path, tiny_model, tiny_tokenizer,
                                                         csv, name):
    """The issue: a second `extract --overwrite` on a running store's path deleted it and both
    runs reported success. Now the second is refused, naming the first, and the first's store
    comes out whole."""
    lm = (tiny_model, tiny_tokenizer)
    out = tmp_path / name
    p, flag, pid = _start_paused(tmp_path, "window", (lm, csv, "coords", out), KW)
    try:
        assert _rows_done(out) == 8    # one window stored, the run goes on
        assert lock_path(out) == tmp_path / (name + LOCK_SUFFIX) and lock_path(out).exists()
        if out.is_dir():   # beside the store, not one of its entries
            assert not any(LOCK_SUFFIX in e.name for e in out.iterdir())
        for kw in (dict(KW, overwrite=True), KW, dict(KW, prompt="where_is")):
            kw = dict(kw)
            with pytest.raises(ExtractError, match=_holder_pattern(pid)) as ei:
                extract(lm, csv, kw.pop("prompt", "coords"), out, **kw)
            assert "different settings" not in str(ei.value)
        assert out.exists() and _rows_done(out) == 8   # nothing deleted, nothing written
        assert read_lock(out)["pid"] == pid
    finally:
        code = _resume(p, flag)
    assert code == 0
    assert not lock_path(out).exists()
    with one_thread():
        ref = extract(lm, csv, "coords", tmp_path / ("ref" + out.suffix), **KW).store
    s = actstore.open(out)
    assert s.complete and s.rows_done == N
    np.testing.assert_array_equal(s.read(slice(0, N)), ref.read(slice(0, N)))


@pytest.mark.parametrize("name", ["r.zarr", "r.h5"])
def test_the_loser_of_a_race_to_create_gets_the_lock_error(tmp_path, tiny_model, tiny_tokenizer,
                                                          csv, name):
    """Two runs create the same new store: the first holds the lock before the store exists;
    the second is refused with the holder, never told to --overwrite (which would delete the
    winner's store), and creates nothing."""
    lm = (tiny_model, tiny_tokenizer)
    out = tmp_path / name
    p, flag, pid = _start_paused(tmp_path, "locked", (lm, csv, "coords", out), KW)
    try:
        assert not out.exists()
        with pytest.raises(ExtractError, match=_holder_pattern(pid)) as ei:
            extract(lm, csv, "coords", out, **KW)
        assert "--overwrite" not in str(ei.value)
        assert not out.exists()
    finally:
        code = _resume(p, flag)
    assert code == 0 and actstore.open(out).complete and not lock_path(out).exists()


def test_cli_second_overwrite_is_one_line_naming_the_holder(tmp_path, tiny_model_dir, csv,
                                                            capsys):
    """The CLI: the first run (a real `python -m actstore extract`) paused after its first
    window; a second `extract --overwrite` exits 2 with one line naming pid, host, start time
    and command; the first then finishes."""
    from actstore.cli import main
    out, flag = tmp_path / "c.zarr", tmp_path / "pause"
    args = ["extract", "--model", str(tiny_model_dir), "--dataset", str(csv), "--prompt",
            "coords", "--out", str(out), "--batch-size", "4", "--rows-per-chunk", "8",
            "--no-progress", "--device", "cpu"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               ACTSTORE_TEST_PAUSE=f"window:{flag}")
    first = subprocess.Popen([sys.executable, "-m", "actstore", *args], cwd=str(REPO), env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pid = _wait_for(flag, lambda: first.poll() is None)
        assert pid == first.pid
        rc = main(args + ["--overwrite"])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
        assert err.startswith(f"actstore: error: {out} is being written by another run (pid "
                              f"{pid} on {socket.gethostname()} since ")
        assert "python -m actstore extract --model" in err and "wait for it to finish" in err
        assert _rows_done(out) == 8
    finally:
        flag.unlink(missing_ok=True)
        so, se = first.communicate(timeout=300)
    assert first.returncode == 0, se
    assert f"{N}/{N} rows" in so and not lock_path(out).exists()


def test_a_killed_writers_lock_is_taken_over_with_a_note(tmp_path, tiny_model, tiny_tokenizer,
                                                         csv, capsys):
    lm = (tiny_model, tiny_tokenizer)
    out = tmp_path / "k.zarr"
    p, flag, pid = _start_paused(tmp_path, "window", (lm, csv, "coords", out), KW)
    os.kill(pid, signal.SIGKILL)   # no chance to release anything
    p.join(60)
    flag.unlink()
    assert read_lock(out)["pid"] == pid
    capsys.readouterr()
    res = extract(lm, csv, "coords", out, **KW)
    err = capsys.readouterr().err
    assert f"actstore: note: took over the writer lock of {out}: its holder is gone (pid {pid} " \
           f"on {socket.gethostname()} since " in err
    assert res.resumed_from == 8 and res.store.complete and not lock_path(out).exists()


def test_sigterm_writes_what_is_queued_and_releases_the_lock(tmp_path, tiny_model,
                                                             tiny_tokenizer, csv):
    """torchrun stops the other ranks of a failed job with SIGTERM (so do schedulers): the
    writer ends as on Ctrl-C, with its lock released, so the next run (maybe with rank 0 on
    another node, which could not tell whether the holder lives) starts at once."""
    lm = (tiny_model, tiny_tokenizer)
    out = tmp_path / "t.zarr"
    p, flag, pid = _start_paused(tmp_path, "window", (lm, csv, "coords", out), KW)
    os.kill(pid, signal.SIGTERM)
    time.sleep(0.1)
    code = _resume(p, flag)
    assert code == 128 + signal.SIGTERM
    assert not lock_path(out).exists()
    done = actstore.open(out).rows_done
    assert 8 <= done < N
    res = extract(lm, csv, "coords", out, **KW)
    assert res.resumed_from == done and res.store.complete
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # left as it was


# ----------------------------------------------------------------------------- one process

def test_the_lock_goes_on_refusal_error_and_ctrl_c(tmp_path, tiny_model, tiny_tokenizer, csv,
                                                   monkeypatch):
    from actstore.extract.capture import BatchLoop
    lm = (tiny_model, tiny_tokenizer)
    out = tmp_path / "e.zarr"
    extract(lm, csv, "coords", out, stop_after_rows=8, **KW)
    assert not lock_path(out).exists()
    with pytest.raises(ExtractError, match="different settings"):
        extract(lm, csv, "where_is", out, **KW)
    assert not lock_path(out).exists()
    for exc, kind in ((KeyboardInterrupt(), KeyboardInterrupt), (RuntimeError("boom"),
                                                                 RuntimeError)):
        def fail(self, *a, exc=exc):
            raise exc
        monkeypatch.setattr(BatchLoop, "window", fail)
        with pytest.raises(kind):
            extract(lm, csv, "coords", out, **KW)
        assert not lock_path(out).exists()
    monkeypatch.undo()
    assert extract(lm, csv, "coords", out, **KW).store.complete


def test_store_lock_holder_refusals_and_stale_cases(tmp_path):
    s = tmp_path / "s.zarr"
    host = socket.gethostname()
    with StoreLock(s, command="first run") as lk:
        assert lk.held and lock_path(s) == tmp_path / "s.zarr.actstore-lock"
        h = read_lock(s)
        assert h["pid"] == os.getpid() and h["host"] == host and h["command"] == "first run"
        with pytest.raises(StoreError, match=_holder_pattern(os.getpid()) + r".*: first run\)"):
            StoreLock(s).acquire()
    assert not lock_path(s).exists() and read_lock(s) is None

    here = {"host": host, "pid_ns": _pid_ns(), "boot_id": _boot_id()}

    def plant(**fields):
        rec = {"kind": "actstore-writer-lock", "started": "then", "command": "old run",
               "token": "t", **here}
        rec.update(fields)
        lock_path(s).write_text(json.dumps(rec))
        return rec

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    zombie = subprocess.Popen(["sleep", "60"])
    zombie.kill()
    time.sleep(0.2)                                   # exited, not reaped: a zombie
    stale = [dict(pid=dead.pid),                      # gone
             dict(pid=zombie.pid),                    # a zombie
             dict(pid=os.getpid(), pid_start=1),      # pid reused by another process
             dict(pid=os.getpid(), boot_id="an earlier boot")]   # the host rebooted since
    for fields in stale:
        plant(**fields)
        notes = []
        with StoreLock(s, note=notes.append):
            assert read_lock(s)["pid"] == os.getpid()
        assert len(notes) == 1 and f"its holder is gone (pid {fields['pid']} on {host}" in notes[0]
    zombie.wait()
    # alive here, or on another host (whose processes cannot be seen): refused, kept
    live = plant(pid=os.getpid())
    with pytest.raises(StoreError, match=_holder_pattern(os.getpid())):
        StoreLock(s).acquire()
    other = plant(pid=dead.pid, host="elsewhere.example")
    with pytest.raises(StoreError, match=rf"on elsewhere\.example .*another host or in another "
                                         rf"container.*delete {lock_path(s)}"):
        StoreLock(s).acquire()
    assert json.loads(lock_path(s).read_text()) == other != live
    other = plant(pid=dead.pid, pid_ns="pid:[1]")   # another container here: its pids unseen
    with pytest.raises(StoreError, match=rf"another container.*delete {lock_path(s)}"):
        StoreLock(s).acquire()
    assert json.loads(lock_path(s).read_text()) == other
    lock_path(s).write_text("not ours")
    with pytest.raises(StoreError, match="is not an actstore writer lock"):
        StoreLock(s).acquire()
    assert lock_path(s).read_text() == "not ours"


def test_one_store_one_lock_whatever_the_path(tmp_path, monkeypatch):
    real = tmp_path / "data" / "w.zarr"
    real.mkdir(parents=True)
    (tmp_path / "link.zarr").symlink_to(real)
    monkeypatch.chdir(tmp_path / "data")
    assert lock_path("w.zarr") == lock_path(tmp_path / "link.zarr") == \
        real.resolve().parent / "w.zarr.actstore-lock"
    with StoreLock(tmp_path / "link.zarr"):
        with pytest.raises(StoreError, match="being written"):
            StoreLock("w.zarr").acquire()


def test_a_lock_where_the_store_cannot_be_created(tmp_path, tiny_model, tiny_tokenizer, csv):
    lm = (tiny_model, tiny_tokenizer)
    with pytest.raises(ExtractError, match="directory .* does not exist"):
        extract(lm, csv, "coords", tmp_path / "no" / "s.zarr", **KW)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ExtractError, match="cannot create store .*is not a directory"):
        extract(lm, csv, "coords", tmp_path / "afile" / "s.zarr", **KW)
