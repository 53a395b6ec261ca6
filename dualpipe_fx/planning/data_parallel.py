"""Data parallelism beside the pipeline, as the planner counts it: each replica's memory and
the step time its reductions add.

**Contract**: ``replicated(memory, dp, mode) -> MemoryPlan`` (one pipeline replica's plan,
its ranks' bytes under ``compile(parallelism=Parallelism(dp_group=<dp ranks>, dp_mode=mode))``)
and ``exposed_seconds(memory, dp, mode, network) -> float`` (what the data-parallel
collectives add to the pipeline's step). ``dp == 1`` changes nothing.

What ``runtime.data_parallel`` holds and runs, per rank (params P, grads G, optimizer state O
of the rank's stages; one stage's share of them, P_s and G_s, is the rank's bytes over its
stage count):

| mode | kept between steps | added during the step |
|---|---|---|
| ``replicate`` (DDP) | P + G + O | the flat buffer one stage's grads are all-reduced in: G_s |
| ``shard`` (ZeRO-3) | (P + G + O) / dp | the gathered params of the rank's stages (every stage of a DualPipeV rank is live through most of the step): P; the full grads until each stage's reduce-scatter: G |
| ``shard_grad_op`` (ZeRO-2) | P (gathered, kept) + (P + G + O) / dp | the full grads: G |

**Expert parallelism** (``ep > 1``, ``expert_bytes``: each rank's bytes of expert parameters
in the replica's plan): the experts are split over ``ep`` of the ``dp`` ranks and never
sharded or gathered over the data-parallel group (``runtime.data_parallel``), so a rank keeps
``1 / ep`` of its expert params, grads and optimizer state in either mode (grads and states
in the params' proportion: the same dtypes), and the table above applies to the rest. Their
grads are all-reduced over the ``dp / ep`` ranks holding the same slice.
``all_to_all_seconds(nbytes, ep, network)``: one dispatch or combine of ``nbytes`` per rank.

Time: each stage's reduction starts right after its last W and overlaps the rank's remaining
actions, so what a step waits for is the reduction of the stage that finishes last (G_s), plus, in the shard modes, the all-gather of the first stage's parameters
before its first F (P_s). Ring collectives on ``network``: all-reduce 2 (dp-1)/dp bytes,
all-gather and reduce-scatter (dp-1)/dp bytes, each with dp-1 latencies per pass.
"""
from __future__ import annotations

import dataclasses

from dualpipe_fx.planning.devices import NetworkModel
from dualpipe_fx.planning.memory import MemoryPlan, RankMemory

__all__ = ["DP_MODES", "replicated", "exposed_seconds", "all_to_all_seconds"]

DP_MODES = ("replicate", "shard", "shard_grad_op")


def _per_stage(rank: RankMemory, total: int) -> int:
    """One stage's share of the rank's ``total`` bytes."""
    return total // max(len(rank.stages), 1)


def _split(rank: RankMemory, experts: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(params, grads, optimizer) of the rank's non-expert and expert parameters (the experts'
    grads and states in their params' proportion)."""
    share = experts / rank.params if rank.params else 0.0
    e = (experts, round(rank.grads * share), round(rank.optimizer * share))
    return (rank.params - e[0], rank.grads - e[1], rank.optimizer - e[2]), e


def _rank(rank: RankMemory, dp: int, mode: str, ep: int = 1, experts: int = 0) -> RankMemory:
    (p, g, o), (ep_p, ep_g, ep_o) = _split(rank, experts)
    mine = [-(-b // ep) for b in (ep_p, ep_g, ep_o)]  # this rank's slice of the experts
    if mode == "replicate":
        return dataclasses.replace(rank, params=p + mine[0], grads=g + mine[1], optimizer=o + mine[2],
                                   intermediates=rank.intermediates + _per_stage(rank, g + mine[1]))
    kept = dict(params=-(-p // dp) + mine[0], grads=-(-g // dp) + mine[1], optimizer=-(-o // dp) + mine[2])
    if mode == "shard":
        return dataclasses.replace(rank, **kept, intermediates=rank.intermediates + p + g)
    kept["params"] += p
    return dataclasses.replace(rank, **kept, intermediates=rank.intermediates + g)


def _check(dp: int, mode: str, ep: int = 1) -> None:
    if dp < 1:
        raise ValueError(f"data parallel degree {dp}; expected >= 1")
    if ep < 1 or dp % ep:
        raise ValueError(f"expert parallel degree {ep} over {dp} data-parallel ranks; expected a divisor of {dp}")
    if dp > 1 and mode not in DP_MODES:
        raise ValueError(f"dp_mode={mode!r}; expected one of {DP_MODES}")


def replicated(memory: MemoryPlan, dp: int, mode: str, ep: int = 1, expert_bytes=None) -> MemoryPlan:
    """``memory`` (one pipeline replica's plan) with each rank's bytes under ``dp`` replicas in
    ``mode`` (see the module's table), the experts split over ``ep`` of them
    (``expert_bytes``: ``{rank: expert parameter bytes}`` in ``memory``)."""
    _check(dp, mode, ep)
    if dp == 1:
        return memory
    experts = expert_bytes or {}
    return dataclasses.replace(memory, ranks=tuple(_rank(r, dp, mode, ep, experts.get(r.rank, 0))
                                                   for r in memory.ranks))


def exposed_seconds(memory: MemoryPlan, dp: int, mode: str, network: NetworkModel, ep: int = 1,
                    expert_bytes=None) -> float:
    """Seconds the slowest rank's step waits for its data-parallel collectives (``memory``: the
    replica's plan before :func:`replicated`; ``ep``, ``expert_bytes`` as there: the experts'
    grads are all-reduced over the ``dp / ep`` ranks holding the same slice)."""
    _check(dp, mode, ep)
    if dp == 1:
        return 0.0
    worst = 0.0
    for rank in memory.ranks:
        (p, g, _), (_, ep_g, _) = _split(rank, (expert_bytes or {}).get(rank.rank, 0))
        wait = network.ring_seconds(_per_stage(rank, g), dp, 2 if mode == "replicate" else 1)
        if ep_g and dp // ep > 1:
            wait += network.ring_seconds(_per_stage(rank, ep_g // ep), dp // ep)
        if mode != "replicate":
            wait += network.ring_seconds(_per_stage(rank, p), dp, 1)
        worst = max(worst, wait)
    return worst


def all_to_all_seconds(nbytes: float, ep: int, network: NetworkModel) -> float:
    """One all_to_all of ``nbytes`` per rank over ``ep`` ranks: each sends ``(ep-1)/ep`` of
    them, to ``ep - 1`` peers at once (pairwise exchanges: one latency per peer)."""
    if ep <= 1:
        return 0.0
    return (ep - 1) / ep * nbytes / network.bandwidth + (ep - 1) * network.latency_s
