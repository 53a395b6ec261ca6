"""Spawn N gloo ranks running a top-level function; collect each rank's result or error.

Small and general on purpose (the torchtitan and multiplex tests reuse it)::

    results = run_ranks(my_fn, world_size=2, args=(cfg,))   # -> [rank 0 result, rank 1 result]
    outcomes = spawn_ranks(my_fn, 2)                          # -> [RankOutcome(...)], never raises

``fn(rank, world_size, *args)`` runs in a fresh process (``spawn``) after
``init_process_group("gloo")`` on a free localhost port, with one intra-op thread.
Results travel back through ``torch.save`` bytes, so tensors, dicts and lists are fine.
A hard ``timeout`` kills every straggler, so a hung rank fails the test instead of hanging it.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import socket
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


def _entry(fn, rank, world_size, port, results, args, pg_timeout_s) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=pg_timeout_s))
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
                pg_timeout_s: float = 60.0) -> list[RankOutcome]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; one outcome per rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, results, args, pg_timeout_s))
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


def run_ranks(fn: Callable, world_size: int, args: tuple = (), timeout: float = 240.0) -> list[Any]:
    """Like ``spawn_ranks`` but returns the results, raising if any rank failed."""
    outcomes = spawn_ranks(fn, world_size, args, timeout)
    failed = [o for o in outcomes if not o.ok]
    if failed:
        raise AssertionError("\n".join(f"--- rank {o.rank} (exit {o.exitcode}) ---\n{o.error}" for o in failed))
    return [o.result for o in outcomes]
