"""Bidirectional DualPipe (DeepSeek-V3): two pipelines, fed from both ends, as per-rank programs.

Stages ``0..N-1`` form the forward-direction pipeline (stage ``s`` on rank ``s``);
stages ``N..2N-1`` form the reverse-direction pipeline (stage ``N+s`` on rank ``N-1-s``,
running model part ``s``: the model is held twice, once per direction). Each direction
gets ``C/2`` micro-batches, numbered ``0..C/2-1``. The order of every rank's actions is
exactly the order DeepSeek's reference (``dualpipe/dualpipe.py``) executes.

Rank ``r``'s "phase 0" chunk is its stage of the direction that *starts* nearest to it
(forward direction for the first half of the ranks, reverse for the second half), so the
two halves run mirror images of the same phase loops, indexed by ``h = min(r, N-1-r)``.
"""
from __future__ import annotations

from dualpipe_fx.schedules.dualpipev import phase_actions
from dualpipe_fx.schedules.ir import Program, RankBuilder
from dualpipe_fx.schedules.validate import check_sizes


def _phase_stages(rank: int, num_ranks: int) -> tuple[int, int]:
    """(phase-0 stage, phase-1 stage) of ``rank``: its near-end direction first."""
    forward, reverse = rank, 2 * num_ranks - 1 - rank
    return (forward, reverse) if rank < num_ranks // 2 else (reverse, forward)


def _rank_actions(rank: int, num_ranks: int, num_microbatches: int) -> RankBuilder:
    """One rank's DualPipe actions: DualPipeV's phase loops on this rank's half of the
    pipeline (``N/2`` ranks, ``C/2`` micro-batches), ``h`` ranks from its nearer end."""
    h = min(rank, num_ranks - 1 - rank)
    s0, s1 = _phase_stages(rank, num_ranks)
    return phase_actions(s0, s1, num_ranks // 2, h, num_microbatches // 2)


def check_dualpipe_sizes(num_ranks: int, num_microbatches: int) -> None:
    """Raise ValueError unless ``N >= 2`` is even and ``C >= 2N`` is even."""
    check_sizes("dualpipe", num_ranks, num_microbatches, min_microbatches=2 * num_ranks,
                rule="C >= 2N, N and C even")
    if num_ranks % 2:
        raise ValueError(f"dualpipe: num_ranks={num_ranks}, expected an even N (the two directions "
                         f"meet in the middle); use {num_ranks + 1} ranks or dualpipev")
    if num_microbatches % 2:
        raise ValueError(f"dualpipe: num_microbatches={num_microbatches}, expected an even C (C/2 per "
                         f"direction); use {num_microbatches + 1}")


def dualpipe(num_ranks: int, num_microbatches: int) -> Program:
    """DeepSeek's bidirectional DualPipe program: ``C/2`` micro-batches enter from each end.

    **Contract**: ``(N, C) -> Program`` with chains ``(0..N-1)`` and ``(N..2N-1)``,
    ``num_microbatches = C/2`` per chain, ``model_part(N+s) = s``; rank ``r`` runs stages
    ``r`` and ``2N-1-r`` in the reference's exact order.

    **Pseudocode**::

        for each rank r, h = min(r, N-1-r), phase 0 = the direction entering nearest r:
            warm up: F0 x 2(N/2-h-1); (F0 F1) x (h+1); (I1 W1 F1) x (N/2-h-1)
            steady:  (F0&B1, F1&B0) x (C/2-N+h+1); (B1, F1&B0) x (N/2-h-1)
            drain:   (B1 B0) x (h+1), second half split; (W I0) x (N/2-h-1); W x (h+1)

    Args:
        num_ranks: pipeline ranks, even, ``N >= 2``.
        num_microbatches: micro-batches per step (both directions together), even, ``C >= 2N``.

    Returns:
        The ``Program`` (name ``"dualpipe"``).

    Raises:
        ValueError: ``N < 1``, odd ``N``, odd ``C`` or ``C < 2N``.
    """
    check_dualpipe_sizes(num_ranks, num_microbatches)
    n = num_ranks
    actions = {r: _rank_actions(r, n, num_microbatches).actions for r in range(n)}
    parts = tuple(range(n)) + tuple(range(n))  # stage N+s mirrors stage s
    return Program(actions, chains=(tuple(range(n)), tuple(range(n, 2 * n))),
                   num_microbatches=num_microbatches // 2, name="dualpipe", model_parts=parts)
