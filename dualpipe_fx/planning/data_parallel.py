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

Time: each stage's reduction starts right after its last W and overlaps the rank's remaining
actions, so what a step waits for is the reduction of the stage that finishes last (G_s), plus, in the shard modes, the all-gather of the first stage's parameters
before its first F (P_s). Ring collectives on ``network``: all-reduce 2 (dp-1)/dp bytes,
all-gather and reduce-scatter (dp-1)/dp bytes, each with dp-1 latencies per pass.
"""
from __future__ import annotations

import dataclasses

from dualpipe_fx.planning.devices import NetworkModel
from dualpipe_fx.planning.memory import MemoryPlan, RankMemory

__all__ = ["DP_MODES", "replicated", "exposed_seconds"]

DP_MODES = ("replicate", "shard", "shard_grad_op")


def _per_stage(rank: RankMemory, total: int) -> int:
    """One stage's share of the rank's ``total`` bytes."""
    return total // max(len(rank.stages), 1)


def _rank(rank: RankMemory, dp: int, mode: str) -> RankMemory:
    p, g, o = rank.params, rank.grads, rank.optimizer
    if mode == "replicate":
        return dataclasses.replace(rank, intermediates=rank.intermediates + _per_stage(rank, g))
    kept = dict(params=-(-p // dp), grads=-(-g // dp), optimizer=-(-o // dp))
    if mode == "shard":
        return dataclasses.replace(rank, **kept, intermediates=rank.intermediates + p + g)
    kept["params"] += p
    return dataclasses.replace(rank, **kept, intermediates=rank.intermediates + g)


def _check(dp: int, mode: str) -> None:
    if dp < 1:
        raise ValueError(f"data parallel degree {dp}; expected >= 1")
    if dp > 1 and mode not in DP_MODES:
        raise ValueError(f"dp_mode={mode!r}; expected one of {DP_MODES}")


def replicated(memory: MemoryPlan, dp: int, mode: str) -> MemoryPlan:
    """``memory`` (one pipeline replica's plan) with each rank's bytes under ``dp`` replicas in
    ``mode`` (see the module's table)."""
    _check(dp, mode)
    if dp == 1:
        return memory
    return dataclasses.replace(memory, ranks=tuple(_rank(r, dp, mode) for r in memory.ranks))


def exposed_seconds(memory: MemoryPlan, dp: int, mode: str, network: NetworkModel) -> float:
    """Seconds the slowest rank's step waits for its data-parallel collectives (``memory``: the
    replica's plan before :func:`replicated`)."""
    _check(dp, mode)
    if dp == 1:
        return 0.0
    worst = 0.0
    for rank in memory.ranks:
        grads = _per_stage(rank, rank.grads)
        wait = network.ring_seconds(grads, dp, 2 if mode == "replicate" else 1)
        if mode != "replicate":
            wait += network.ring_seconds(_per_stage(rank, rank.params), dp, 1)
        worst = max(worst, wait)
    return worst
