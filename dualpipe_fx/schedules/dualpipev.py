"""DualPipeV (DeepSeek): the V-shaped, single-direction DualPipe, as per-rank programs.

Placement: rank ``r`` holds stage ``r`` (its "phase 0" chunk, on the way down the V)
and stage ``2N-1-r`` (its "phase 1" chunk, on the way back up); stage 0, the last stage
and the loss all live on rank 0. The order of every rank's actions is exactly the order
DeepSeek's reference (``dualpipe/dualpipev.py``) executes, including which backwards it
splits (an ``I`` now, its ``W`` later, first in first out) and which forward/backward
pairs it overlaps (``FB``).
"""
from __future__ import annotations

from dualpipe_fx.schedules.ir import Program, RankBuilder
from dualpipe_fx.schedules.validate import check_sizes


def phase_actions(s0: int, s1: int, n: int, r: int, num_microbatches: int) -> RankBuilder:
    """One rank's actions, phase by phase as in the paper's figure.

    ``s0``/``s1`` are the rank's phase-0 and phase-1 stages, ``r`` its distance from the
    end where phase 0 enters, ``n`` the ranks of one V and ``num_microbatches`` per V.
    DualPipeV is one V; bidirectional DualPipe runs these same loops on each half
    (``n = N/2``, ``C/2`` micro-batches), mirrored.
    """
    p = RankBuilder()
    # Step 1: nF0 -- fill the pipe on the way down
    for _ in range((n - r - 1) * 2):
        p.f(s0)
    # Step 2: nF0F1
    for _ in range(r + 1):
        p.f(s0)
        p.f(s1)
    # Step 3: nB1W1F1 -- zero bubble: the W runs at once, in the slot it fills
    for _ in range(n - r - 1):
        p.b(s1, split=True)
        p.w()
        p.f(s1)
    # Step 4 (main): nF0B1F1B0 -- two overlapped pairs per step
    for i in range(num_microbatches - 2 * n + r + 1):
        if i == 0 and r == n - 1:
            p.f(s0)  # not overlapped: at the turn of the V (the middle, in DualPipe) the pair would wait on itself
            p.b(s1)
        else:
            p.fb(s0, s1)
        p.fb(s1, s0)
    # Step 5: nB1F1B0
    for _ in range(n - r - 1):
        p.b(s1)
        p.fb(s1, s0)
    # Step 6: nB1B0 -- the second half of these backwards defer their W
    split = False
    for i in range(r + 1):
        split = split or (i == (r + 1) // 2 and r % 2 == 1)
        p.b(s1, split=split)
        split = split or (i == (r + 1) // 2 and r % 2 == 0)
        p.b(s0, split=split)
    # Step 7: nWB0 -- each deferred W fills the wait for the next gradient
    for _ in range(n - r - 1):
        p.w()
        p.b(s0, split=True)
    # Step 8: nW -- drain the remaining weight gradients
    for _ in range(r + 1):
        p.w()
    assert p.pending_w == 0, (s0, s1, p.pending_w)
    return p


def _rank_actions(rank: int, num_ranks: int, num_microbatches: int) -> RankBuilder:
    """Rank ``r`` of DualPipeV: stage ``r`` down the V, stage ``2N-1-r`` back up."""
    return phase_actions(rank, 2 * num_ranks - 1 - rank, num_ranks, rank, num_microbatches)


def dualpipev(num_ranks: int, num_microbatches: int) -> Program:
    """DeepSeek's DualPipeV program for ``num_ranks`` ranks and ``num_microbatches`` micro-batches.

    **Contract**: ``(N, C) -> Program`` with ``2N`` stages in one chain ``0..2N-1``; rank ``r``
    runs stages ``r`` and ``2N-1-r``; every (stage, micro-batch) gets one F and one B, or
    one I and a later W, in the reference's exact order.

    **Pseudocode**::

        for each rank r (stages r and 2N-1-r):
            warm up: F0 x 2(N-r-1); (F0 F1) x (r+1); (I1 W1 F1) x (N-r-1)
            steady:  (F0&B1, F1&B0) x (C-2N+r+1); (B1, F1&B0) x (N-r-1)
            drain:   (B1 B0) x (r+1), second half split; (W I0) x (N-r-1); W x (r+1)

    Args:
        num_ranks: pipeline ranks ``N >= 1``.
        num_microbatches: micro-batches per step ``C >= 2N``.

    Returns:
        The ``Program`` (name ``"dualpipev"``).

    Raises:
        ValueError: ``N < 1`` or ``C < 2N``.
    """
    check_sizes("dualpipev", num_ranks, num_microbatches, min_microbatches=2 * num_ranks, rule="C >= 2N")
    actions = {r: _rank_actions(r, num_ranks, num_microbatches).actions for r in range(num_ranks)}
    return Program(actions, chains=(tuple(range(2 * num_ranks)),),
                   num_microbatches=num_microbatches, name="dualpipev")
