"""Distributed extraction (torch.distributed, gloo on CPU): ranks write disjoint shard-aligned
windows of one store, per-range progress records, restart with another number of ranks after a
rank dies, HDF5 refusal, work division, and lazy reading of the result with xarray/dask.

The ranks are forked by ``actstore.distributed.launch_local`` (a 2-process job costs no new
imports); one slow test drives the real ``torchrun -m actstore extract`` command line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import actstore
from actstore.distributed import launch_local
from actstore.extract import ExtractError, extract
from actstore.store import StoreError, create_store, merge_intervals, open_store
from actstore.store.progress import segments, split_windows, todo_windows

REPO = Path(__file__).resolve().parents[2]
N, R = 70, 8   # 9 windows, the last one partial
KW = dict(batch_size=3, rows_per_chunk=R, progress=False, neurons=True)


@contextmanager
def one_thread():
    """The ranks compute with one thread (as torchrun's OMP_NUM_THREADS=1): so does the
    reference, so that bytes can be compared."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(scope="module")
def csv(tmp_path_factory, make_world_csv):
    return make_world_csv(tmp_path_factory.mktemp("dist") / "w.csv", n=N, seed=4)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, tiny_tokenizer, csv):
    with one_thread():
        return extract((tiny_model, tiny_tokenizer), csv, "coords",
                       tmp_path_factory.mktemp("ref") / "ref.zarr", **KW).store


def _assert_same_store(path, ref):
    s = actstore.open(path)
    assert s.rows_done == s.n_rows == ref.n_rows
    np.testing.assert_array_equal(s.read(slice(0, N)), ref.read(slice(0, N)))
    np.testing.assert_array_equal(s.read(slice(0, N), array="neurons"),
                                  ref.read(slice(0, N), array="neurons"))
    assert s.entities.equals(ref.entities)
    # the finished store has exactly the single-process layout: no records, no extra attributes
    attrs = json.loads((Path(path) / "zarr.json").read_text())["attributes"]
    assert set(attrs) == {"actstore", "rows_done"}
    assert not (Path(path) / "progress").exists() and not list(Path(path).rglob("*.partial"))
    return s


def _extract_rank(model, tok, csv, out, kw):
    res = extract((model, tok), csv, "coords", out, **kw)
    Path(f"{out}.rank{res.rank}.json").write_text(json.dumps(
        {"rows": res.rows, "rows_done": res.rows_done, "processes": res.processes,
         "resumed_from": res.resumed_from}))


def test_two_ranks_write_the_single_process_store(tmp_path, tiny_model, tiny_tokenizer, csv,
                                                  reference):
    out = tmp_path / "d.zarr"
    codes = launch_local(_extract_rank, 2, (tiny_model, tiny_tokenizer, csv, out, KW))
    assert codes == [0, 0]
    _assert_same_store(out, reference)
    r0 = json.loads(Path(f"{out}.rank0.json").read_text())
    assert r0 == {"rows": N, "rows_done": N, "processes": 2, "resumed_from": 0}
    # an unchanged re-run has nothing left to do
    assert launch_local(_extract_rank, 2, (tiny_model, tiny_tokenizer, csv, out, KW)) == [0, 0]
    assert json.loads(Path(f"{out}.rank0.json").read_text())["rows"] == 0


def test_killed_rank_then_restart_with_other_world_sizes(tmp_path, tiny_model, tiny_tokenizer,
                                                         csv, reference):
    out = tmp_path / "k.zarr"
    args = (tiny_model, tiny_tokenizer, csv, out, KW)
    # rank 1 (windows 40..70) dies right after writing its 2nd window, before recording it
    codes = launch_local(_extract_rank, 2, args,
                         env={"ACTSTORE_TEST_CRASH_AFTER_WINDOWS": "1:2"})
    # rank 0 is stopped by the launcher (-9), or had finished (0), or, waiting at the final
    # exchange, saw rank 1's connection close before the launcher stopped it (1)
    assert codes[1] == 75 and codes[0] in (0, 1, -9)
    s = open_store(out)
    records = s.range_records()
    assert (40, 70, 48) in records                # one window recorded, the written one not
    assert s.rows_done < N and not s.complete     # readers see only the prefix
    assert s.read(slice(0, None)).shape[1] == s.rows_done
    done = s.done_intervals()
    assert any(a <= 40 and 48 <= b for a, b in done)
    assert not any(a <= 48 and 56 <= b for a, b in done)   # written, not recorded: redone
    # restart with 3 ranks; rank 2 dies after its first window
    codes = launch_local(_extract_rank, 3, args,
                         env={"ACTSTORE_TEST_CRASH_AFTER_WINDOWS": "2:1"})
    assert codes[2] == 75
    left = todo_windows(N, R, open_store(out).done_intervals())
    assert left and len(left) < 9
    # finish with one process: the exclusive open folds the records, only `left` is redone
    with one_thread():
        res = extract((tiny_model, tiny_tokenizer), csv, "coords", out, **KW)
    assert res.rows == sum(min(N, w + R) - w for w in left) and res.processes == 1
    _assert_same_store(out, reference)


def test_restart_after_partial_run_resumes_only_unfinished(tmp_path, tiny_model, tiny_tokenizer,
                                                           csv, reference):
    """stop_after_rows stops a 2-rank job early (cleanly); 2 ranks finish it."""
    out = tmp_path / "p.zarr"
    kw = dict(KW, stop_after_rows=30)   # windows 0, 8, 16, 24 -> ranks get 2 each
    assert launch_local(_extract_rank, 2, (tiny_model, tiny_tokenizer, csv, out, kw)) == [0, 0]
    s = open_store(out)
    assert s.rows_done == 32 and s.range_records() == []   # folded by rank 0 at the end
    assert launch_local(_extract_rank, 2, (tiny_model, tiny_tokenizer, csv, out, KW)) == [0, 0]
    r0 = json.loads(Path(f"{out}.rank0.json").read_text())
    assert r0["rows"] == N - 32 and r0["resumed_from"] == 32
    _assert_same_store(out, reference)


def _extract_expect_error(model, tok, csv, out, kw):
    try:
        extract((model, tok), csv, "coords", out, **kw)
    except ExtractError as exc:
        Path(f"{out}.err{os.environ['RANK']}").write_text(str(exc))
        return
    raise AssertionError("no error")


def test_hdf5_refused_on_every_rank(tmp_path, tiny_model, tiny_tokenizer, csv):
    out = tmp_path / "d.h5"
    assert launch_local(_extract_expect_error, 2,
                        (tiny_model, tiny_tokenizer, csv, out, KW)) == [0, 0]
    for r in (0, 1):
        msg = Path(f"{out}.err{r}").read_text()
        assert "Zarr stores only" in msg and "HDF5" in msg
    assert not out.exists()
    # an existing HDF5 store is refused too (resume it with one process)
    with one_thread():
        extract((tiny_model, tiny_tokenizer), csv, "coords", out, stop_after_rows=8, **KW)
    launch_local(_extract_expect_error, 2, (tiny_model, tiny_tokenizer, csv, out, KW))
    assert "resume it with one process" in Path(f"{out}.err0").read_text()


def test_a_settings_mismatch_stops_every_rank(tmp_path, tiny_model, tiny_tokenizer, csv,
                                              reference):
    out = tmp_path / "m.zarr"
    with one_thread():
        extract((tiny_model, tiny_tokenizer), csv, "coords", out, stop_after_rows=8, **KW)
    kw = dict(KW, batch_size=5)
    assert launch_local(_extract_expect_error, 2,
                        (tiny_model, tiny_tokenizer, csv, out, kw)) == [0, 0]
    for r in (0, 1):
        assert "batch_size: 3 -> 5" in Path(f"{out}.err{r}").read_text()


def _cli_rank(model, tok, csv, out, fail_rank):
    """`actstore extract` as the CLI runs it, stderr to a file per rank; rank ``fail_rank``'s
    shard writes fail as on a full disk (an error only that rank meets)."""
    import errno
    from contextlib import redirect_stderr

    from actstore.cli import build_parser
    from actstore.extract.cli import _cli
    from actstore.store import ActivationStore
    rank = int(os.environ["RANK"])
    if rank == fail_rank:
        def full(self, *a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")
        ActivationStore.write_rows = full
    args = build_parser().parse_args(
        ["extract", "--dataset", str(csv), "--prompt", "coords", "--out", str(out), "--neurons",
         "--batch-size", "3", "--device", "cpu", "--rows-per-chunk", str(R), "--no-progress"])
    args.model = (model, tok)   # an in-memory model: what --model names, from Python
    with open(f"{out}.stderr{rank}", "w", buffering=1) as f, redirect_stderr(f):
        try:
            code = _cli(args)
        except SystemExit as exc:
            code = exc.code
    raise SystemExit(code)


@pytest.mark.parametrize("fail_rank", [1, 0])
def test_a_rank_local_error_is_reported_and_stops_every_rank(tmp_path, tiny_model,
                                                            tiny_tokenizer, csv, fail_rank):
    """A write error on one rank only: that rank prints it (rank k > 0 prefixed "[rank k]"),
    rank 0 says which rank failed, nobody waits for a collective timeout, and the other
    rank's finished windows are folded into the store (resume redoes only the rest)."""
    out = tmp_path / "e.zarr"
    codes = launch_local(_cli_rank, 2, (tiny_model, tiny_tokenizer, csv, out, fail_rank),
                         timeout=120)
    assert codes == [2, 2]
    err = [Path(f"{out}.stderr{r}").read_text() for r in (0, 1)]
    want = (f"cannot write to {out}: the disk is full. The finished row ranges are recorded "
            "and intact; fix this and re-run the same command to resume")
    if fail_rank == 1:
        assert err[1].strip() == f"[rank 1] actstore: error: {want}"
        assert err[0].strip() == f"actstore: error: rank 1 failed: {want}"
    else:
        assert err[0].strip() == f"actstore: error: {want}"
        assert err[1] == ""            # the copy of rank 0's error is not printed twice
    s = open_store(out)
    ok = (40, 70) if fail_rank == 0 else (0, 40)   # the windows of the rank that did not fail
    assert s.done_intervals() == [ok] and s.range_records() == []
    assert not (out / "progress").exists()


def _extract_rank_seeing_lock(model, tok, csv, out, kw):
    """_extract_rank, noting on each rank who holds the store's writer lock while the ranks
    compute (when the windows are dealt, after rank 0 prepared the store)."""
    import actstore.extract as ex
    from actstore.store.lock import read_lock
    real = ex.assign

    def spy(ctx, store, todo, stop):
        Path(f"{out}.lock-seen{ctx.rank}.json").write_text(json.dumps(
            {"pid": os.getpid(), "holder": read_lock(out)}))
        return real(ctx, store, todo, stop)
    ex.assign = spy
    _extract_rank(model, tok, csv, out, kw)


def test_rank_0_holds_the_writer_lock_for_the_job(tmp_path, tiny_model, tiny_tokenizer, csv,
                                                  reference):
    """Under torchrun rank 0 takes the lock for the job (here over a stale one, whose holder
    is gone: taken over) and releases it at the end; the other ranks never take or break it,
    and a lock held by a live writer stops every rank, rank 0 naming the holder."""
    import socket

    from actstore.store.lock import _pid_ns, lock_path, read_lock
    out = tmp_path / "l.zarr"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = {"kind": "actstore-writer-lock", "pid": gone.pid, "host": socket.gethostname(),
             "pid_ns": _pid_ns(), "started": "earlier", "command": "a killed run", "token": "x"}
    lock_path(out).write_text(json.dumps(stale))
    args = (tiny_model, tiny_tokenizer, csv, out, KW)
    assert launch_local(_extract_rank_seeing_lock, 2, args) == [0, 0]
    seen = [json.loads(Path(f"{out}.lock-seen{r}.json").read_text()) for r in (0, 1)]
    assert seen[0]["holder"]["pid"] == seen[0]["pid"] != seen[1]["pid"]
    assert seen[1]["holder"] == seen[0]["holder"]       # rank 1 relied on rank 0's lock
    assert not lock_path(out).exists()
    _assert_same_store(out, reference)
    # a live writer (this test process) holds the lock: every rank stops, nothing is touched
    live = dict(stale, pid=os.getpid(), command="the other writer")
    lock_path(out).write_text(json.dumps(live))
    assert launch_local(_extract_expect_error, 2, (tiny_model, tiny_tokenizer, csv, out,
                                                   dict(KW, overwrite=True))) == [0, 0]
    for r in (0, 1):
        msg = Path(f"{out}.err{r}").read_text()
        assert f"is being written by another run (pid {os.getpid()} on " in msg
        assert "the other writer" in msg
    assert read_lock(out) == live
    _assert_same_store(out, reference)


# ----------------------------------------------------------------------------- pure parts

def test_work_division():
    assert todo_windows(70, 8, []) == list(range(0, 70, 8))
    assert todo_windows(70, 8, [(0, 16), (24, 40), (64, 70)]) == [16, 40, 48, 56]
    assert todo_windows(70, 8, [(0, 70)]) == []
    assert todo_windows(70, 8, [(0, 12)]) == list(range(8, 70, 8))   # half a window is not done
    assert split_windows([0, 8, 16, 24, 32], 2) == [[0, 8, 16], [24, 32]]
    assert split_windows([0, 8], 3) == [[0], [8], []]
    parts = split_windows(list(range(0, 800, 8)), 7)
    assert sum(parts, []) == list(range(0, 800, 8))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert segments([16, 40, 48, 56], 8, 60) == [(16, 24), (40, 60)]
    assert merge_intervals([(5, 9), (0, 3), (3, 4), (8, 12), (20, 20)]) == [(0, 4), (5, 12)]


def _small_store(path, n=40, d=4, R=8, fmt=None):
    ent = pd.DataFrame({"name": [f"e{i}" for i in range(n)], "entity": [f"e{i}" for i in range(n)],
                        "latitude": np.linspace(-50, 50, n), "is_test": np.arange(n) % 4 == 0})
    return create_store(path, layers=[1, 2], n_rows=n, d_model=d, entities=ent,
                        targets=("latitude",), group_columns=(), meta={}, rows_per_chunk=R,
                        format=fmt)


def test_range_records_fold_into_rows_done(tmp_path):
    s = _small_store(tmp_path / "s.zarr")
    block = np.ones((2, 8, 4), dtype=np.float16)
    s.begin_ranges()
    a = open_store(tmp_path / "s.zarr", mode="a", exclusive=False)   # a second writer
    ra, rb = s.range_record(0, 16), a.range_record(24, 40)
    for w, rec in ((0, ra), (24, rb), (32, rb)):
        (s if rec is ra else a).write_rows(w, block * (w + 1))
        rec.update(w + 8)
    assert sorted(s.range_records()) == [(0, 16, 8), (24, 40, 40)]
    assert s.rows_done == 0 and s.done_intervals() == [(0, 8), (24, 40)]
    # a non-exclusive open leaves the records alone
    open_store(tmp_path / "s.zarr", mode="a", exclusive=False)
    assert (tmp_path / "s.zarr" / "progress").exists()
    # zarr and xarray see a plain group while records exist (no unknown objects in it)
    import warnings

    import zarr
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "progress" in dict(zarr.open_group(str(tmp_path / "s.zarr"), mode="r").members())
    # the exclusive open folds them: prefix + a finished range past it, records gone
    s2 = open_store(tmp_path / "s.zarr", mode="a")
    assert s2.rows_done == 8 and s2.ranges_done == [(24, 40)]
    assert not (tmp_path / "s.zarr" / "progress").exists()
    assert todo_windows(40, 8, s2.done_intervals()) == [8, 16]
    s2.mark_rows(16, 24)                      # a block past the prefix: kept as a range
    assert s2.rows_done == 8 and s2.ranges_done == [(16, 40)]
    s2.mark_rows(8, 16)                       # the gap closes: everything joins the prefix
    assert s2.rows_done == 40 and s2.ranges_done == [] and s2.complete
    attrs = json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())["attributes"]
    assert "ranges_done" not in attrs
    np.testing.assert_array_equal(s2.read(slice(24, 32)), block * 25)
    with pytest.raises(StoreError, match="outside"):
        ra.update(17)


def test_finalize_folds_the_ranges_it_is_given(tmp_path):
    """Distributed: rank 0 folds the ranges the ranks report over the process group, not a
    directory listing (which may miss a record just written on another NFS client)."""
    s = _small_store(tmp_path / "s.zarr")
    s.begin_ranges()
    s.write_rows(0, np.ones((2, 16, 4), dtype=np.float16))
    s.write_rows(24, np.ones((2, 8, 4), dtype=np.float16))
    s.range_record(24, 40).update(32)     # on disk, but not reported: not folded
    assert s.finalize_ranges([(0, 8), (8, 16)]) == 16
    assert s.ranges_done == [] and not (tmp_path / "s.zarr" / "progress").exists()


def test_hdf5_has_no_parallel_writers(tmp_path):
    h = _small_store(tmp_path / "s.h5")
    with pytest.raises(StoreError, match="only Zarr"):
        h.range_record(0, 8)
    h.write_rows(0, np.ones((2, 8, 4), dtype=np.float16))
    h.mark_rows(0, 8)
    assert h.rows_done == 8
    with pytest.raises(StoreError, match="not adjacent"):
        h.mark_rows(16, 24)
    h.close()


# ----------------------------------------------------------------------------- reading

def test_distributed_store_reads_lazily_with_xarray_and_dask(tmp_path, tiny_model,
                                                             tiny_tokenizer, csv, reference):
    xr = pytest.importorskip("xarray")
    da = pytest.importorskip("dask.array")
    out = tmp_path / "x.zarr"
    assert launch_local(_extract_rank, 2, (tiny_model, tiny_tokenizer, csv, out, KW)) == [0, 0]
    want = reference.read(slice(0, N)).astype(np.float64)
    ds = xr.open_zarr(out, consolidated=False)
    assert ds["resid"].dims == ("layer", "row", "dim")
    mean = ds["resid"].sel(layer=2).astype("float64").mean("row").values
    np.testing.assert_allclose(mean, want[1].mean(0), rtol=1e-12)
    got = da.from_zarr(str(out), component="neurons")[2].astype("float64").mean(axis=0).compute()
    np.testing.assert_allclose(got, reference.read(slice(0, N), array="neurons")[2]
                               .astype(np.float64).mean(0), rtol=1e-12)


# ----------------------------------------------------------------------------- torchrun CLI

@pytest.mark.slow
def test_torchrun_cli_kill_and_restart(tmp_path, tiny_model_dir, csv, reference):
    """The documented command: torchrun -m actstore extract; rank 1 dies, torchrun stops the
    job; the same command again completes the store, equal to the one-process reference."""
    out = tmp_path / "t.zarr"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(_port()), "-m", "actstore", "extract", "--model",
           str(tiny_model_dir), "--dataset", str(csv), "--prompt", "coords", "--out", str(out),
           "--batch-size", "3", "--rows-per-chunk", str(R), "--neurons", "--no-progress",
           "--device", "cpu"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               ACTSTORE_TEST_CRASH_AFTER_WINDOWS="1:1")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "exitcode  : 75" in p.stderr
    assert not open_store(out).complete
    env.pop("ACTSTORE_TEST_CRASH_AFTER_WINDOWS")
    cmd[cmd.index("--master-port") + 1] = str(_port())
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("70/70 rows") == 1 and "2 processes" in p.stdout  # rank 0 only
    _assert_same_store(out, reference)


def _port():
    from actstore.distributed import _free_port
    return _free_port()


# ----------------------------------------------------------------------------- device_map

def test_device_map_passes_through_to_transformers(tmp_path, tiny_model_dir, csv, reference):
    """--device-map auto: accelerate places the model (here: all on the CPU); same bytes."""
    pytest.importorskip("accelerate")
    from actstore.models import ModelError, load_model
    lm = load_model(str(tiny_model_dir), device="cpu", device_map="auto")
    assert lm.info["device_map"] == "auto"
    assert {p.device.type for p in lm.model.parameters()} == {"cpu"}
    with one_thread():
        s = extract(lm, csv, "coords", tmp_path / "m.zarr", **KW).store
    np.testing.assert_array_equal(s.read(slice(0, N)), reference.read(slice(0, N)))
    with pytest.raises(ModelError, match="device-map is for Hugging Face models"):
        load_model("smollm2-135m", device_map="auto")
