"""Baseline schedules on the same IR: GPipe, 1F1B, ZB-H1 (zb1p), ZB-V and interleaved 1F1B.

Each generator produces the compute order torch's schedule of the same name runs
(``torch.distributed.pipelining.schedules``), so the simulator compares like with like;
the tests lower each program and check the equality. Deviations are named in the
generator's docstring.
"""
from __future__ import annotations

from dualpipe_fx.schedules.ir import Action, Program, RankBuilder
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


def _rounds(num_ranks: int, num_microbatches: int) -> int:
    """Micro-batches per round of torch's interleaved schedules: C // max(1, C // N)."""
    return num_microbatches // max(1, num_microbatches // num_ranks)


def _interleaved_rank(rank: int, num_ranks: int, num_microbatches: int, *, local: int,
                      warmup_factor: int, zero_bubble: bool) -> list[Action]:
    """One rank of (zero-bubble) interleaved 1F1B, the order torch's ``_get_1f1b_rank_ops`` yields.

    Local stage ``k`` of rank ``r`` is global stage ``k*N + r``. Forwards walk the local
    stages round by round (``per_round`` micro-batches each), backwards walk them in
    reverse. With ``zero_bubble`` every backward is split and rank ``r`` holds its first
    ``r`` weight gradients back, running them one per later backward and at the end.
    """
    n, per_round = num_ranks, _rounds(num_ranks, num_microbatches)
    total = local * num_microbatches
    warmup = min((local - 1) * per_round + warmup_factor * (n - 1 - rank), total)

    def fwd_stage(step: int) -> int:
        return (step // per_round) % local * n + rank

    def bwd_stage(step: int) -> int:
        return (local - 1 - ((step - warmup) // per_round) % local) * n + rank

    p = RankBuilder()
    # Step 1: nF -- warm-up
    for step in range(warmup):
        p.f(fwd_stage(step))
    # Step 2: nFB (zero bubble: nFIW, the first r Ws held back) -- steady state
    for step in range(warmup, total):
        p.f(fwd_stage(step))
        p.b(bwd_stage(step), split=zero_bubble)
        if zero_bubble and step - warmup >= rank:
            p.w()
    # Step 3: nB (zero bubble: nIW, each W in the wait for the next gradient) -- cool-down
    for step in range(total, total + warmup):
        p.b(bwd_stage(step), split=zero_bubble)
        if zero_bubble and step - warmup >= rank:
            p.w()
    # Step 4: nW -- weight gradients still held back
    while p.pending_w:
        p.w()
    return p.actions


def zb1p(num_ranks: int, num_microbatches: int) -> Program:
    """ZB-H1 zero bubble (Qi et al. 2024): 1F1B with each backward split into I and W (``C >= 1``).

    The W of a backward is deferred so that it fills the waits of the cool-down: rank ``r``
    holds its first ``r`` weight gradients back and runs them in the slots where 1F1B
    idles. Same peak activation memory as 1F1B; bubble ``(N-1)(F+B-2W)`` when the costs
    are equal-ish. The order is torch's ``ScheduleInterleavedZeroBubble`` (its "ZB1P")
    with one stage per rank, the only ZB-H1 torch ships. Torch also applies its interleaved
    "C a multiple of C // N" rule here; with one stage per rank the round size changes
    nothing, so this generator accepts every ``C >= 1``.

    **Contract**: ``(N, C) -> Program``; stage ``r`` on rank ``r``; one I and one W per (stage, mb).

    **Pseudocode**::

        for each rank r: F x (N-1-r); then per remaining F: F I, and W once r Ws wait;
        cool-down: I W per backward; finally the held-back Ws

    Raises:
        ValueError: ``N < 1`` or ``C < 1``.
    """
    check_sizes("zb1p", num_ranks, num_microbatches, min_microbatches=1, rule="C >= 1")
    actions = {r: _interleaved_rank(r, num_ranks, num_microbatches, local=1, warmup_factor=1,
                                    zero_bubble=True) for r in range(num_ranks)}
    return _single_chain(actions, num_ranks, num_microbatches, "zb1p")


def interleaved_1f1b(num_ranks: int, num_microbatches: int) -> Program:
    """Megatron's interleaved 1F1B with two stages per rank, stage ``s`` on rank ``s mod N``.

    The order is torch's ``ScheduleInterleaved1F1B``, including its relaxed rule: rounds
    of ``C // max(1, C // N)`` micro-batches, so ``C`` must be a multiple of ``max(1, C // N)``
    (the original paper asks ``C % N == 0``); ``C < N`` runs one short round.

    **Contract**: ``(N, C) -> Program`` with ``2N`` stages in one chain; rank ``r`` runs
    stages ``r`` and ``N + r``.

    **Pseudocode**::

        per_round = C // max(1, C // N); warmup = per_round + 2(N-1-r)
        for each rank r: F x warmup (stage r, then N+r, one round each)
        steady: F B per step (backwards walk the local stages in reverse); cool-down: B

    Raises:
        ValueError: ``N < 1``, ``C < 1``, or ``C`` not a multiple of ``max(1, C // N)``.
    """
    check_sizes("interleaved_1f1b", num_ranks, num_microbatches, min_microbatches=1,
                rule="C >= 1 and C a multiple of max(1, C // N)")
    rounds = max(1, num_microbatches // num_ranks)
    if num_microbatches % rounds:
        raise ValueError(f"interleaved_1f1b: num_microbatches={num_microbatches} with num_ranks={num_ranks} "
                         f"must be a multiple of C // N = {rounds}; use {rounds * (num_microbatches // rounds)} "
                         f"or a multiple of {num_ranks}")
    actions = {r: _interleaved_rank(r, num_ranks, num_microbatches, local=2, warmup_factor=2,
                                    zero_bubble=False) for r in range(num_ranks)}
    return _single_chain(actions, 2 * num_ranks, num_microbatches, "interleaved_1f1b")


def _zbv_rank(rank: int, num_ranks: int, num_microbatches: int) -> list[Action]:
    """One rank of ZB-V in torch's ``ScheduleZBVZeroBubble`` order, before dropping padding."""
    n = num_ranks
    c0, c1 = rank, 2 * n - 1 - rank  # the V: down on c0, back up on c1
    # torch plans with at least 2N-1 micro-batches and drops the padding ones afterwards
    padded = max(2 * n - 1, num_microbatches)
    cnt = {"f0": 0, "f1": 0, "b0": 0, "b1": 0}
    out: list[Action] = []

    def emit(kind: str, stage: int, key: str, bump: bool = True) -> None:
        out.append(Action(kind, stage, cnt[key]))
        cnt[key] += bump

    # Step 1: nF0
    for _ in range(2 * (n - rank) - 1):
        emit("F", c0, "f0")
    # Step 2: nF1F0
    for _ in range(rank):
        emit("F", c1, "f1")
        emit("F", c0, "f0")
    # Step 3: nF1I1W1
    for _ in range(n - rank):
        emit("F", c1, "f1")
        emit("I", c1, "b1", bump=False)
        emit("W", c1, "b1")
    # Step 4 (main): nF0I0W0F1I1W1
    while cnt["f1"] < cnt["f0"] or cnt["f0"] < padded:
        if cnt["f0"] < padded:
            emit("F", c0, "f0")
        emit("I", c0, "b0", bump=False)
        emit("W", c0, "b0")
        emit("F", c1, "f1")
        emit("I", c1, "b1", bump=False)
        emit("W", c1, "b1")
    cnt["w0"], cnt["w1"] = cnt["b0"], cnt["b1"]
    # Step 5: nI0I1
    for _ in range(rank):
        emit("I", c0, "b0")
        emit("I", c1, "b1")
    # Step 6: nI0W0
    for _ in range(n - rank):
        emit("I", c0, "b0")
        emit("W", c0, "w0")
    # Step 7: nW1 then nW0 -- drain
    while cnt["w1"] < cnt["b1"]:
        emit("W", c1, "w1")
    while cnt["w0"] < cnt["b0"]:
        emit("W", c0, "w0")
    return [a for a in out if a.microbatch < num_microbatches]


def zbv(num_ranks: int, num_microbatches: int) -> Program:
    """ZB-V zero bubble (Qi et al. 2024, section 6): V placement, every backward split (``C >= 1``).

    Same placement as DualPipeV (rank ``r`` holds stages ``r`` and ``2N-1-r``), no overlapped
    pairs; zero bubble when F, I and W cost the same. The order is torch's
    ``ScheduleZBVZeroBubble``, which plans with ``max(2N-1, C)`` micro-batches and drops
    the extra ones, so any ``C >= 1`` is accepted.

    **Contract**: ``(N, C) -> Program`` with ``2N`` stages in one chain.

    **Pseudocode**::

        warm up: F0 x (2(N-r)-1); (F1 F0) x r; (F1 I1 W1) x (N-r)
        steady: (F0 I0 W0 F1 I1 W1) until every micro-batch entered both chunks
        cool-down: (I0 I1) x r; (I0 W0) x (N-r); remaining W1s, then W0s

    Raises:
        ValueError: ``N < 1`` or ``C < 1``.
    """
    check_sizes("zbv", num_ranks, num_microbatches, min_microbatches=1, rule="C >= 1")
    actions = {r: _zbv_rank(r, num_ranks, num_microbatches) for r in range(num_ranks)}
    return _single_chain(actions, 2 * num_ranks, num_microbatches, "zbv")
