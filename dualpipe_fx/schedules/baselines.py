"""Baseline schedules on the same IR: GPipe, 1F1B, ZB-H1 (zb1p), ZB-V and interleaved 1F1B.

Each generator produces the compute order torch's schedule of the same name runs
(``torch.distributed.pipelining.schedules``), so the simulator compares like with like;
the tests lower each program and check the equality. Deviations are named in the
generator's docstring.
"""
from __future__ import annotations

from typing import Callable

from dualpipe_fx.schedules.ir import Action, F, I, Program, RankBuilder, W
from dualpipe_fx.schedules.validate import check_sizes


def _single_chain(actions: dict[int, list[Action]], num_stages: int, num_microbatches: int,
                  name: str) -> Program:
    return Program(actions, chains=(tuple(range(num_stages)),), num_microbatches=num_microbatches, name=name)


def gpipe(num_ranks: int, num_microbatches: int) -> Program:
    """GPipe: every forward, then every backward, one stage per rank (``C >= 1``).

    **Contract**: ``(N, C) -> Program``; stage ``r`` on rank ``r``; rank order
    ``F r.0 .. F r.C-1, B r.0 .. B r.C-1`` (torch's ``ScheduleGPipe``).

    **Pseudocode**::

        for each rank r: F x C; B x C

    Raises:
        ValueError: ``N < 1`` or ``C < 1``.
    """
    check_sizes("gpipe", num_ranks, num_microbatches, min_microbatches=1, rule="C >= 1")
    actions = {}
    for r in range(num_ranks):
        p = RankBuilder()
        # Step 1: nF
        for _ in range(num_microbatches):
            p.f(r)
        # Step 2: nB
        for _ in range(num_microbatches):
            p.b(r)
        actions[r] = p.actions
    return _single_chain(actions, num_ranks, num_microbatches, "gpipe")


def one_f_one_b(num_ranks: int, num_microbatches: int) -> Program:
    """1F1B (PipeDream-flush): warm up, then one forward and one backward in turn (``C >= N``).

    **Contract**: ``(N, C) -> Program``; stage ``r`` on rank ``r``; the compute order torch's
    ``Schedule1F1B`` executes (its minimum ``C >= N`` too).

    **Pseudocode**::

        for each rank r: F x (N-1-r); (F B) x (C-N+1+r); B x (N-1-r)

    Raises:
        ValueError: ``N < 1`` or ``C < N``.
    """
    check_sizes("1f1b", num_ranks, num_microbatches, min_microbatches=num_ranks, rule="C >= N")
    actions = {}
    for r in range(num_ranks):
        p = RankBuilder()
        warmup = num_ranks - 1 - r
        # Step 1: nF -- warm-up
        for _ in range(warmup):
            p.f(r)
        # Step 2: nFB -- steady state
        for _ in range(num_microbatches - warmup):
            p.f(r)
            p.b(r)
        # Step 3: nB -- cool-down
        for _ in range(warmup):
            p.b(r)
        actions[r] = p.actions
    return _single_chain(actions, num_ranks, num_microbatches, "1f1b")
