"""torch.distributed plumbing shared by distributed extraction and fitting (docs/scale-out.md).

A job is distributed when it runs under ``torchrun`` (or any launcher that sets the
torch.distributed environment: ``WORLD_SIZE`` > 1, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``). :func:`context` then joins the process group once and returns a
:class:`Context`; outside such a launcher it returns None and everything runs as one process.

Work is divided in windows of the store's shards (actstore.store.progress), so two ranks never
write the same file; this module holds the process-group plumbing and the per-rank error
reporting: a status exchange every rank reaches, failed or not (:func:`agree`), and one
line per rank on the command line (:func:`cli_call`).
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta

from actstore.errors import PeerError

# The collective timeout only ends a *hung* job: a rank that fails tells the others through
# the next status exchange (:func:`agree`), and a rank that dies closes its connections, which
# its peers see at once. It must still cover the longest legitimate wait: the other ranks
# wait in a broadcast while rank 0 validates or creates the store after loading the model
# (a large model from a slow file system), and at the end for the slowest rank.
DEFAULT_TIMEOUT_S = 2 * 3600


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the torch.distributed environment (0, 1, 0 without)."""
    def get(name, default):
        try:
            return int(os.environ.get(name, default))
        except ValueError:
            return default
    return get("RANK", 0), get("WORLD_SIZE", 1), get("LOCAL_RANK", 0)


def is_distributed() -> bool:
    """True under a launcher with more than one process (or an initialised group of > 1)."""
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size() > 1
    except ImportError:  # pragma: no cover
        pass
    return env_world()[1] > 1


@dataclass
class Context:
    """This process's place in a distributed job: ``rank`` of ``world`` processes,
    ``local_rank`` on its node (its GPU index)."""
    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (any picklable object)."""
        import torch.distributed as dist
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=_cpu_group())
        return box[0]

    def barrier(self) -> None:
        import torch.distributed as dist
        dist.barrier(group=_cpu_group())

    def all_gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable), by rank, on every rank."""
        import torch.distributed as dist
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=_cpu_group())
        return out


_CPU_GROUP = None


def _cpu_group():
    """A gloo group for control messages (Python objects, counters) when the default group
    is NCCL-only; None (= the default group) when it already speaks gloo."""
    global _CPU_GROUP
    import torch.distributed as dist
    if "gloo" in str(dist.get_backend()):
        return None
    if _CPU_GROUP is None:
        _CPU_GROUP = dist.new_group(backend="gloo")
    return _CPU_GROUP


def _leave() -> None:
    """At exit, tear the process group down ourselves: left to interpreter teardown, gloo's
    threads are sometimes destroyed still joinable and the rank aborts ("terminate called
    without an active exception") after its work is done."""
    import torch.distributed as dist
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - a peer is gone: nothing left to tear down cleanly
        pass


def context(use_cuda: bool | None = None) -> Context | None:
    """Join the torch.distributed job this process was launched in (once) and return its
    :class:`Context`; None when not distributed. ``use_cuda``: bind this rank to GPU
    ``LOCAL_RANK`` and use NCCL for tensors on it (default: when CUDA is available); control
    messages always go over gloo. ``ACTSTORE_DIST_TIMEOUT_S`` sets the collective timeout
    (default :data:`DEFAULT_TIMEOUT_S`)."""
    if not is_distributed():
        return None
    import torch
    import torch.distributed as dist
    rank, world, local = env_world()
    if use_cuda is None:
        use_cuda = torch.cuda.is_available()
    if use_cuda and torch.cuda.is_available():
        torch.cuda.set_device(local % torch.cuda.device_count())
    if not dist.is_initialized():
        timeout = timedelta(seconds=float(os.environ.get("ACTSTORE_DIST_TIMEOUT_S",
                                                         DEFAULT_TIMEOUT_S)))
        backend = "cpu:gloo,cuda:nccl" if use_cuda and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=timeout)
        atexit.register(_leave)
    return Context(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local)


# ----------------------------------------------------------------------------- errors

def describe(exc: BaseException) -> str:
    """One line for an error: the message of our ValueErrors, else 'Type: message'."""
    return str(exc) if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {exc}"


def mark_all_ranks(exc: BaseException) -> BaseException:
    """Note on ``exc`` that every rank of the job is raising an error now (so the CLI may wait
    at a barrier for every rank to print before exiting); returns ``exc``."""
    exc.actstore_all_ranks = True
    return exc


def exchange(ctx: Context, error: BaseException | None, payload=None) -> tuple[list, list]:
    """A status exchange: every rank calls it at the same point of its program, with the error
    it met (None: none) and a picklable ``payload``; returns every rank's error message (None:
    none) and payload, by rank. When the exchange itself fails (a peer died) and this rank has
    an error, that error is raised (it is the one worth reporting)."""
    try:
        status = ctx.all_gather((None if error is None else describe(error), payload))
    except Exception:
        if error is not None:
            raise error from None
        raise
    return [m for m, _ in status], [p for _, p in status]


def raise_failures(ctx: Context, error: BaseException | None, messages: list, copy_type) -> None:
    """After :func:`exchange`: return when no rank failed; otherwise raise on every rank. A
    rank with its own error raises that (ranks other than 0 raise a ``copy_type`` copy, a
    :class:`PeerError`, when it is the same as rank 0's), the others raise
    ``copy_type("rank K failed: ...")`` for the first failed rank K."""
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if not failed:
        return
    if error is not None:
        if ctx.rank != 0 and messages[0] == messages[ctx.rank]:
            raise mark_all_ranks(copy_type(messages[0])) from error
        raise mark_all_ranks(error)
    r, m = failed[0]
    raise mark_all_ranks(copy_type(f"rank {r} failed: {m}"))


def agree(ctx: Context, error: BaseException | None, copy_type, payload=None) -> list:
    """:func:`exchange` then :func:`raise_failures`: returns every rank's ``payload`` when no
    rank met an error, else every rank raises."""
    messages, payloads = exchange(ctx, error, payload)
    raise_failures(ctx, error, messages, copy_type)
    return payloads


def cli_call(fn, *args, prog: str = "actstore", **kwargs):
    """Run a distributed command for its CLI, reporting errors per rank: rank 0 prints its
    error as the CLI always does; rank k > 0 prints its own errors prefixed ``[rank k]`` and
    stays silent for :class:`PeerError` copies (rank 0 reports those). Exit status 2. When
    every rank is failing together, they wait for one another (barrier) after printing, so a
    launcher that stops the job at the first exit loses no message. One process: ``fn`` as is.
    """
    import sys
    if not is_distributed():
        return fn(*args, **kwargs)
    try:
        return fn(*args, **kwargs)
    except (ValueError, OSError) as exc:
        if os.environ.get("ACTSTORE_DEBUG", "") not in ("", "0"):
            raise
        rank = env_world()[0]
        if rank == 0:
            print(f"{prog}: error: {exc}", file=sys.stderr)
        elif not isinstance(exc, PeerError):
            print(f"[rank {rank}] {prog}: error: {exc}", file=sys.stderr)
        sys.stderr.flush()
        if getattr(exc, "actstore_all_ranks", False):
            try:
                import torch.distributed as dist
                if dist.is_initialized():
                    dist.barrier(group=_cpu_group())
            except Exception:  # noqa: BLE001 - a peer is gone: nothing left to wait for
                pass
        raise SystemExit(2) from None


# ----------------------------------------------------------------------------- local launcher

def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, args, rank, world, port, env):
    import sys
    import traceback
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    os.environ.update(env or {})
    code = 0
    try:
        import torch
        torch.set_num_threads(1)   # as torchrun's OMP_NUM_THREADS=1; also fork-safe OpenMP
        fn(*args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported, then the exit status says it
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)   # no interpreter teardown: a peer may be dead, collectives must not wait


def launch_local(fn, world: int, args=(), env: dict | None = None,
                 timeout: float = 300.0) -> list[int]:
    """Run ``fn(*args)`` in ``world`` forked processes on this machine as one torch.distributed
    job (ranks 0..world-1, gloo on CPU), like ``torchrun --nproc-per-node world`` without
    re-importing anything; returns the exit codes by rank. As torchrun does, when one rank
    fails the others are stopped. For tests and notebooks; POSIX only (fork).

    ``fn`` runs with the torchrun environment set (so :func:`context` joins the job) and one
    CPU thread; ``env`` adds variables. Results travel through files (e.g. the store).
    """
    import multiprocessing as mp
    import signal
    import time
    mpc = mp.get_context("fork")
    port = _free_port()
    procs = [mpc.Process(target=_rank_main, args=(fn, args, r, int(world), port, env),
                         daemon=True) for r in range(int(world))]
    for p in procs:
        p.start()
    t0 = time.monotonic()
    try:
        while any(p.exitcode is None for p in procs):
            failed = any(p.exitcode not in (None, 0) for p in procs)
            if failed or time.monotonic() - t0 > timeout:
                for p in procs:
                    if p.exitcode is None:
                        os.kill(p.pid, signal.SIGKILL)
                if not failed:
                    raise TimeoutError(f"launch_local: ranks still running after {timeout} s")
            time.sleep(0.02)
    finally:
        for p in procs:
            p.join(5)
            if p.exitcode is None:
                os.kill(p.pid, signal.SIGKILL)
                p.join()
    return [p.exitcode for p in procs]
