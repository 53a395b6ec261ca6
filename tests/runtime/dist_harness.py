"""Run a top-level function on N gloo ranks; collect each rank's result or error.

Small and general on purpose (the torchtitan and multiplex tests reuse it)::

    results = run_ranks(my_fn, world_size=2, args=(cfg,))   # -> [rank 0 result, rank 1 result]
    outcomes = spawn_ranks(my_fn, 2)                          # -> [RankOutcome(...)], never raises

``fn(rank, world_size, *args)`` runs after ``init_process_group("gloo")`` on a free
localhost port, with one intra-op thread. Results travel back through ``torch.save`` bytes,
so tensors, dicts and lists are fine. A hard ``timeout`` kills every straggler, so a hung rank
fails the test instead of hanging it.

``spawn_ranks`` starts fresh processes for the one call (for tests that kill or stop a rank).
``run_ranks`` runs the call on a pool of ranks kept alive between calls of the same world
size: starting N interpreters that import torch and join a process group costs seconds per
call, and most tests only need ranks that compute and talk. Before each call the ranks reseed
torch's global RNG non-deterministically (as a fresh process starts) and drop torch.compile's
caches, so a call sees what it would in fresh processes. A call that fails on any rank, times out or is interrupted
closes its pool (its ranks may sit in a collective of that call); the next call starts a new one.
"""
from __future__ import annotations

import atexit
import gc
import io
import multiprocessing as mp
import os
import queue
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Optional

import torch


@dataclass
class RankOutcome:
    rank: int
    result: Any = None
    error: Optional[str] = None   # the rank's traceback, when it raised
    exitcode: Optional[int] = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.exitcode == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ranks fork from one server process that imported these once (multiprocessing's forkserver),
# instead of each starting an interpreter that imports torch and dualpipe_fx (seconds each on
# 2 cores). The server starts no threads and no process group before it forks, so each rank
# is as a fresh process would be; where forkserver is missing, ranks are spawned.
_PRELOAD = ["torch", "torch.distributed", "dualpipe_fx", "tests.runtime.cases"]


def _context():
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _entry(fn, rank, world_size, port, results, args, pg_timeout_s, group=True) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import torch.distributed as dist
    if group:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=pg_timeout_s))
    else:  # the environment torchrun gives its workers: fn joins a group itself (env://)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    try:
        value = fn(rank, world_size, *args)
        buf = io.BytesIO()
        torch.save(value, buf)
        results.put((rank, buf.getvalue(), None))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        results.put((rank, None, traceback.format_exc()))
    # Skip the process group's teardown: gloo's can block on peers that are still
    # running or already gone. Flush the result, then leave.
    results.close()
    results.join_thread()
    os._exit(0)


def spawn_ranks(fn: Callable, world_size: int, args: tuple = (), timeout: float = 240.0,
                pg_timeout_s: float = 60.0, group: bool = True) -> list[RankOutcome]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; one outcome per rank.
    ``group=False``: no process group is made; each rank gets torchrun's environment
    (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ...) to make its own."""
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, results, args, pg_timeout_s, group))
             for r in range(world_size)]
    for p in procs:
        p.start()
    outcomes = {r: RankOutcome(r) for r in range(world_size)}
    reported: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(reported) < world_size and time.monotonic() < deadline:
        try:
            rank, payload, error = results.get(timeout=0.2)
        except queue.Empty:
            if all(not p.is_alive() for p in procs) and results.empty():
                break
            continue
        reported.add(rank)
        outcomes[rank].error = error
        if payload is not None:
            outcomes[rank].result = torch.load(io.BytesIO(payload), weights_only=False)
    for r, p in enumerate(procs):
        # a rank that reported gets a grace period to tear down; a silent one does not
        p.join(timeout=10.0 if r in reported else max(0.1, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
    for r, p in enumerate(procs):
        outcomes[r].exitcode = p.exitcode
        if r not in reported and outcomes[r].error is None:
            outcomes[r].error = f"rank {r} gave no result (exit code {p.exitcode}; killed after {timeout}s?)"
    return [outcomes[r] for r in range(world_size)]


def _pool_entry(rank, world_size, port, tasks, results, pg_timeout_s) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=pg_timeout_s))
    while (task := tasks.get()) is not None:
        call_id, fn, args = task
        torch.seed()  # a non-deterministic seed, as a fresh process starts with
        if "torch._dynamo" in sys.modules:
            torch._dynamo.reset()
        try:
            buf = io.BytesIO()
            torch.save(fn(rank, world_size, *args), buf)
            results.put((call_id, rank, buf.getvalue(), None))
        except BaseException:  # noqa: BLE001 - report every failure to the parent
            results.put((call_id, rank, None, traceback.format_exc()))
        del task, fn, args, buf  # the call's objects go before the next call starts
        gc.collect()
    results.close()
    results.join_thread()
    os._exit(0)


class _RankPool:
    """``world_size`` spawned gloo ranks that run one call after another."""

    def __init__(self, world_size: int, pg_timeout_s: float = 60.0) -> None:
        ctx = _context()
        self.world_size, self.calls = world_size, 0
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        port = free_port()
        self.procs = [ctx.Process(target=_pool_entry, args=(r, world_size, port, self.tasks[r], self.results,
                                                            pg_timeout_s))
                      for r in range(world_size)]
        for p in self.procs:
            p.start()

    def run(self, fn: Callable, args: tuple, timeout: float) -> list[RankOutcome]:
        self.calls += 1
        for q in self.tasks:
            q.put((self.calls, fn, args))
        outcomes = {r: RankOutcome(r) for r in range(self.world_size)}
        reported: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(reported) < self.world_size and time.monotonic() < deadline:
            try:
                call_id, rank, payload, error = self.results.get(timeout=0.2)
            except queue.Empty:
                if any(not p.is_alive() for p in self.procs) and self.results.empty():
                    break
                continue
            if call_id != self.calls:
                continue
            reported.add(rank)
            outcomes[rank].error = error
            if payload is not None:
                outcomes[rank].result = torch.load(io.BytesIO(payload), weights_only=False)
        for r, p in enumerate(self.procs):
            outcomes[r].exitcode = 0 if p.is_alive() else p.exitcode
            if r not in reported and outcomes[r].error is None:
                outcomes[r].error = (f"rank {r} gave no result (exit code {p.exitcode}; "
                                     f"killed after {timeout}s?)")
        return [outcomes[r] for r in range(self.world_size)]

    def close(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join()


class _Pools:
    """The live pools, one per world size (tests alternate between 1, 2 and 4 ranks)."""

    def __init__(self) -> None:
        self.pools: dict[int, _RankPool] = {}
        atexit.register(self.close_all)

    def get(self, world_size: int) -> _RankPool:
        if world_size not in self.pools:
            self.pools[world_size] = _RankPool(world_size)
        return self.pools[world_size]

    def close(self, world_size: int) -> None:
        pool = self.pools.pop(world_size, None)
        if pool is not None:
            pool.close()

    def close_all(self) -> None:
        for world_size in list(self.pools):
            self.close(world_size)


# Session-lived on purpose: the point is to keep ranks alive from one test to the next.
_POOLS = _Pools()


def pooled_pids() -> set[int]:
    """The pids of the live pooled ranks (children that outlive a call on purpose)."""
    return {p.pid for pool in _POOLS.pools.values() for p in pool.procs if p.is_alive()}


def run_ranks(fn: Callable, world_size: int, args: tuple = (), timeout: float = 240.0) -> list[Any]:
    """Like ``spawn_ranks`` but on the pooled ranks, returning the results and raising if
    any rank failed."""
    done = False
    try:
        outcomes = _POOLS.get(world_size).run(fn, args, timeout)
        done = all(o.ok for o in outcomes)
    finally:
        if not done:
            _POOLS.close(world_size)
    failed = [o for o in outcomes if not o.ok]
    if failed:
        raise AssertionError("\n".join(f"--- rank {o.rank} (exit {o.exitcode}) ---\n{o.error}" for o in failed))
    return [o.result for o in outcomes]
