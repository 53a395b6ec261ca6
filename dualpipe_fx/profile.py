"""Measured profile of a ``Pipeline``: every action's start and end on every rank.

**Contract**: ``profile_pipeline(pipe, inputs, target, steps) -> ProfileResult`` on the
group's rank 0 (``None`` elsewhere); ``Pipeline.profile(...)`` calls it. The result has a
``.timeline`` of ``TimelineEntry`` in seconds, so ``dualpipe_fx.visualize(program, path,
sim=result)`` draws it like a simulated one; ``result.simulated`` is the simulator's run
of the same program with the measured per-action costs, for the side-by-side.

**Pseudocode**
    per step: barrier; record each handler's wait and compute interval (seconds from t0)
    gather every rank's records on rank 0
    costs = median F, B (or I + W), W, F&B from the records
    measured bubble per rank = (makespan - busy) / makespan of the last step
    simulated = simulate(program, median cost of each (kind, stage) measured)

Grads accumulate over the profiled steps, as over any steps: ``zero_grad()`` after.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from dualpipe_fx.schedules.ir import Action, Program
from dualpipe_fx.simulate import Costs, SimResult, StageCosts, cost_key, simulate
from dualpipe_fx.timeline import TimelineEntry, busy_time


@dataclass(frozen=True)
class ProfileResult:
    """Measured timeline of the last profiled step (seconds), beside the simulator's.

    ``bubble_ratio_per_rank[r]`` is ``(makespan - busy[r]) / makespan`` measured;
    ``simulated_bubble_ratio_per_rank`` the same from ``simulated``. ``waits`` are the
    intervals each rank spent waiting for a peer's data before an action (the action is
    the one that waited). ``step_times`` are the wall times of every profiled step.
    """

    program: Program
    timeline: list[TimelineEntry]
    waits: list[TimelineEntry]
    step_times: list[float]
    makespan: float
    busy: dict[int, float]
    bubble_ratio_per_rank: dict[int, float]
    samples_per_s: float
    costs: Costs
    simulated: SimResult
    time_unit: str = "s"

    @property
    def idle(self) -> dict[int, float]:
        return {r: self.makespan - b for r, b in self.busy.items()}

    @property
    def bubble(self) -> float:
        return max(self.idle.values(), default=0.0)

    @property
    def simulated_bubble_ratio_per_rank(self) -> dict[int, float]:
        span = self.simulated.makespan
        return {r: (span - b) / span if span else 0.0 for r, b in self.simulated.busy.items()}

    def table(self) -> str:
        """Per rank: measured busy, bubble ratio, waits; simulated bubble ratio."""
        sim = self.simulated_bubble_ratio_per_rank
        waited = {r: sum(w.duration for w in self.waits if w.rank == r) for r in self.busy}
        lines = [f"makespan {self.makespan * 1e3:.1f} ms, {self.samples_per_s:.1f} samples/s; costs (ms) "
                 f"F {self.costs.F * 1e3:.2f} B {self.costs.B * 1e3:.2f} W {self.costs.W * 1e3:.2f} "
                 f"F&B {self.costs.overlapped * 1e3:.2f}",
                 "rank  busy ms  waits ms  bubble  simulated bubble"]
        for r in sorted(self.busy):
            lines.append(f"{r:>4}  {self.busy[r] * 1e3:7.1f}  {waited[r] * 1e3:8.1f}  "
                         f"{self.bubble_ratio_per_rank[r]:6.3f}  {sim.get(r, float('nan')):16.3f}")
        return "\n".join(lines)


def _median(values: list[float], default: float = 0.0) -> float:
    return statistics.median(values) if values else default


def measured_costs(entries: list[TimelineEntry]) -> Costs:
    """Median cost of each kind; an I-only program's B is I + W, an F&I pair's F&B is + W."""
    by_kind: dict[str, list[float]] = {}
    for e in entries:
        key = e.action.kind if e.action.kind != "FB" else "F" + e.action.backward.kind
        by_kind.setdefault(key, []).append(e.duration)
    f, w = _median(by_kind.get("F", [])), _median(by_kind.get("W", []))
    b = _median(by_kind.get("B", []), _median(by_kind.get("I", [])) + w)
    pairs = by_kind.get("FB", []) + [d + w for d in by_kind.get("FI", [])]
    fb = max(_median(pairs, f + b), f, b) if pairs else None
    return Costs(F=f, B=max(b, w), W=w, FB=fb)


def stage_costs(entries: list[TimelineEntry], base: Costs) -> StageCosts:
    """The median measured time of each (kind, stage): uneven stages simulate as they ran."""
    groups: dict[tuple, list[float]] = {}
    for e in entries:
        groups.setdefault(cost_key(e.action), []).append(e.duration)
    return StageCosts(base, {k: statistics.median(v) for k, v in groups.items()})


def _record_steps(pipe, inputs: tuple, target, steps: int) -> list[tuple[float, list]]:
    out = []
    for _ in range(steps):
        dist.barrier(group=pipe.group)
        pipe._executor.records = []
        t0 = time.perf_counter()
        pipe.step(*inputs, target=target)
        wall = time.perf_counter() - t0
        out.append((wall, [(r.action, r.start - t0, r.end - t0, r.wait_for)
                           for r in pipe._executor.records]))
    pipe._executor.records = None
    return out


def summarize(program: Program, per_rank: dict[int, list[tuple[float, list]]], batch: int) -> ProfileResult:
    """Build the ``ProfileResult`` from every rank's recorded steps (rank -> steps)."""
    last = {r: steps[-1][1] for r, steps in per_rank.items()}
    timeline = [TimelineEntry(r, a, s, e) for r, recs in last.items() for a, s, e, peer in recs if peer is None]
    waits = [TimelineEntry(r, a, s, e) for r, recs in last.items() for a, s, e, peer in recs if peer is not None]
    every = [TimelineEntry(r, a, s, e) for r, steps in per_rank.items() for _, recs in steps
             for a, s, e, peer in recs if peer is None]
    start = min((e.start for e in timeline), default=0.0)
    makespan = max((e.end for e in timeline), default=0.0) - start
    busy = {r: 0.0 for r in per_rank} | busy_time(timeline)
    step_times = [max(steps[i][0] for steps in per_rank.values()) for i in range(len(next(iter(per_rank.values()))))]
    costs = measured_costs(every)
    return ProfileResult(
        program=program, timeline=timeline, waits=waits, step_times=step_times, makespan=makespan, busy=busy,
        bubble_ratio_per_rank={r: (makespan - b) / makespan if makespan else 0.0 for r, b in busy.items()},
        samples_per_s=batch / statistics.median(step_times), costs=costs,
        simulated=simulate(program, stage_costs(every, costs)))


def profile_pipeline(pipe, inputs: tuple, target=None, steps: int = 3) -> Optional[ProfileResult]:
    """Run ``steps`` steps of ``pipe`` recording every action; the result on rank 0 only."""
    if steps < 1:
        raise ValueError(f"profile(steps={steps}): run at least 1 step")
    pipe._check(tuple(inputs), target, forward_only=False)
    mine = _record_steps(pipe, tuple(inputs), target, steps)
    gathered: Optional[list] = [None] * dist.get_world_size(pipe.group) if pipe.rank == 0 else None
    dist.gather_object((pipe.rank, mine), gathered, group_dst=0, group=pipe.group)
    if pipe.rank != 0:
        return None
    batch = pipe.num_microbatches * pipe.examples[0].shape[0]
    return summarize(pipe.program, dict(gathered), batch)
