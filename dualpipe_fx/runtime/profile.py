"""Measured profile of a ``Pipeline``: every action's start and end on every rank.

**Contract**: ``profile_pipeline(pipe, inputs, target, steps) -> ProfileResult`` on the
group's rank 0 (``None`` elsewhere); ``Pipeline.profile(...)`` calls it. The result has a
``.timeline`` of ``TimelineEntry`` in seconds, so ``dualpipe_fx.visualize(program, path,
sim=result)`` draws it like a simulated one; ``result.simulated`` is the simulator's run
of the same program with the measured per-action costs, for the side-by-side.

**Pseudocode**
    per step: barrier; mark each handler's wait and compute interval on the device's clock
              (runtime.clock: host on CPU, CUDA events on a GPU); finish; marks -> seconds from t0
    gather every rank's records on rank 0
    per rank: busy = compute, overhead = gaps between records, bubble = the rest (waits, edges)
    cost of each action of the last step = its compute + the gap before it (the runtime's
    time to start it); comm = median (end of a blocked wait - when its transfer could start)
    simulated = simulate(program, those costs): a replay whose idle predicts the bubble

Grads accumulate over the profiled steps, as over any steps: ``zero_grad()`` after.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from dualpipe_fx.runtime.clock import clock_for
from dualpipe_fx.schedules.ir import Action, Program
from dualpipe_fx.planning.simulate import Costs, SimResult, StageCosts, cost_key, simulate
from dualpipe_fx.planning.timeline import TimelineEntry, busy_time


@dataclass(frozen=True)
class ProfileResult:
    """Measured timeline of the last profiled step (seconds), beside the simulator's.

    Each rank's makespan splits three ways, ``busy + overhead + bubble``:
    - ``busy[r]``: computing (the actions' graphs);
    - ``overhead[r]``: the runtime's own time between the rank's actions (posting sends
      and receives, bookkeeping), neither compute nor waiting;
    - ``bubble``: waiting for a peer's data (``waits``), and idle before the rank's first
      or after its last action while other ranks still work.
    ``bubble_ratio_per_rank[r]`` is ``bubble / makespan``. The simulator replays each
    step with each action costing what it measured, including the runtime's time to
    start it, and each hop the measured transfer latency (``costs.comm``), so
    ``simulated_bubble_ratio_per_rank`` is the waiting the schedule itself causes; a
    measured bubble above it is time lost to stalls the model does not know. Both
    ratios are medians over the profiled steps; the timeline, ``busy``, ``overhead``,
    ``waits`` and ``simulated`` (the replay) are the last step's. ``step_times`` are the
    wall times of every profiled step. ``clock`` names the timing source: on a GPU the
    intervals are CUDA events on the compute stream (the GPU's work, not its launch).
    """

    program: Program
    timeline: list[TimelineEntry]
    waits: list[TimelineEntry]
    step_times: list[float]
    makespan: float
    busy: dict[int, float]
    overhead: dict[int, float]
    bubble_ratio_per_rank: dict[int, float]
    simulated_bubble_ratio_per_rank: dict[int, float]
    samples_per_s: float
    costs: Costs
    simulated: SimResult
    time_unit: str = "s"
    clock: str = "HostClock"  # the timing source (runtime.clock): "CudaEventClock" on a GPU

    @property
    def idle(self) -> dict[int, float]:
        """Time each rank does not compute: its overhead plus its bubble."""
        return {r: self.makespan - b for r, b in self.busy.items()}

    @property
    def bubble(self) -> float:
        return max(self.bubble_ratio_per_rank.values(), default=0.0) * self.makespan

    def table(self) -> str:
        """Per rank: busy, overhead and waits (ms, last step), measured and simulated bubble
        ratio (medians over the steps)."""
        sim = self.simulated_bubble_ratio_per_rank
        waited = {r: sum(w.duration for w in self.waits if w.rank == r) for r in self.busy}
        lines = [f"makespan {self.makespan * 1e3:.1f} ms (simulated {self.simulated.makespan * 1e3:.1f}), "
                 f"{self.samples_per_s:.1f} samples/s; costs (ms) F {self.costs.F * 1e3:.2f} "
                 f"B {self.costs.B * 1e3:.2f} W {self.costs.W * 1e3:.2f} F&B {self.costs.overlapped * 1e3:.2f} "
                 f"transfer {self.costs.comm * 1e3:.2f}",
                 "rank  busy ms  overhead ms  waits ms  bubble  simulated bubble"]
        for r in sorted(self.busy):
            lines.append(f"{r:>4}  {self.busy[r] * 1e3:7.1f}  {self.overhead[r] * 1e3:11.1f}  "
                         f"{waited[r] * 1e3:8.1f}  {self.bubble_ratio_per_rank[r]:6.3f}  "
                         f"{sim.get(r, float('nan')):16.3f}")
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
    # a full backward is at least its W (measured apart, noise can say otherwise), and a pair at
    # least its longer part: the simulator refuses costs that break either
    b = max(_median(by_kind.get("B", []), _median(by_kind.get("I", [])) + w), w)
    pairs = by_kind.get("FB", []) + [d + w for d in by_kind.get("FI", [])]
    fb = max(_median(pairs, f + b), f, b) if pairs else None
    return Costs(F=f, B=b, W=w, FB=fb)


def stage_costs(entries: list[TimelineEntry], base: Costs, replay: list[TimelineEntry] = ()) -> StageCosts:
    """The median measured time of each (kind, stage), so uneven stages simulate as they
    ran; each action of ``replay`` (one step) costs exactly its own measured time."""
    groups: dict[tuple, list[float]] = {}
    for e in entries:
        groups.setdefault(cost_key(e.action), []).append(e.duration)
    return StageCosts(base, {k: statistics.median(v) for k, v in groups.items()},
                      {e.action: e.duration for e in replay})


def _record_steps(pipe, inputs: tuple, target, steps: int, clock) -> list[tuple[float, list, list]]:
    """Per step: (wall, [(action, start, end, peer waited for or None)], [(stage, kind, mb,
    time)] of the sends started inside F&B pairs (kind "F"|"B") and of the receives posted
    (kind "recvF"|"recvB")), in seconds from the step's start, read from the pipeline
    clock (``runtime.clock``: CUDA events on a GPU, resolved after one synchronize)."""
    holders = [pipe._executor, *pipe.stages.values()]
    kept = [h.clock for h in holders]
    for h in holders:
        h.clock = clock
    out = []
    try:
        for _ in range(steps):
            clock.finish()  # earlier work (an optimizer step) off the device: wall is this step's
            dist.barrier(group=pipe.group)
            pipe._executor.records = []
            for stage in pipe.stages.values():
                stage.comm_log = []
            t0 = time.perf_counter()
            clock.begin()
            pipe.step(*inputs, target=target)
            clock.finish()
            wall = time.perf_counter() - t0
            out.append(_resolved(clock, wall, pipe))
    finally:
        pipe._executor.records = None
        for h, c in zip(holders, kept):
            h.clock = c
        for stage in pipe.stages.values():
            stage.comm_log = None
    return out


def _resolved(clock, wall: float, pipe) -> tuple[float, list, list]:
    """One step's records with the clock's marks as seconds from its ``begin()``."""
    sec = clock.seconds
    comms = [(st, kind, mb, sec(t)) for stage in pipe.stages.values() for st, kind, mb, t in stage.comm_log]
    return wall, [(r.action, sec(r.start), sec(r.end), r.wait_for) for r in pipe._executor.records], comms


def _published(recs: list, comms: list) -> dict[tuple[str, int, int], float]:
    """When each (kind, stage, mb) result left a rank: its early send, else its action's end;
    and when each ("recvF"|"recvB", stage, mb) receive was posted."""
    out = {}
    for action, _, end, peer in recs:
        if peer is None:
            for part in action.parts():
                out[("F" if part.kind == "F" else "B", part.stage, part.microbatch)] = end
    out.update({(kind, stage, mb): t for stage, kind, mb, t in comms})
    return out


def transfer_latency(program: Program, per_rank: dict[int, list]) -> float:
    """Median time from a transfer's start (its result left the peer, and the receive was
    posted: gloo moves data once both happened) to the end of the wait that blocked on it."""
    times = {(r, i): _published(recs, comms) for r, steps in per_rank.items()
             for i, (_, recs, comms) in enumerate(steps)}
    samples = []
    for r, steps in per_rank.items():
        for i, (_, recs, _) in enumerate(steps):
            for action, start, end, peer in recs:
                # a wait that found its data did not block; the runtime records the part waited for
                if peer is None or end - start < 1e-4 or action.kind not in ("F", "B", "I"):
                    continue
                kind = "F" if action.kind == "F" else "B"
                src = (program.previous_stage if kind == "F" else program.next_stage)(action.stage)
                sent = times[(peer, i)].get((kind, src, action.microbatch))
                begin = max(sent or 0.0, times[(r, i)].get(("recv" + kind, action.stage, action.microbatch), 0.0))
                if sent is not None and end >= begin:
                    samples.append(end - begin)
    return statistics.median(samples) if samples else 0.0


def _split_rank(records: list) -> tuple[float, dict[Action, float]]:
    """A rank's overhead (gaps between the step's start and its records, and between its
    records) and the gap before each compute action."""
    overhead, pending, dispatch, prev_end = 0.0, 0.0, {}, 0.0
    for action, start, end, peer in sorted(records, key=lambda r: (r[1], r[2])):
        gap = max(0.0, start - prev_end)
        overhead += gap
        pending += gap
        if peer is None:
            dispatch[action], pending = pending, 0.0
        prev_end = max(prev_end, end)
    return overhead, dispatch


def _measured_step(per_rank: dict[int, list], i: int) -> tuple:
    """Step ``i``: its compute timeline, waits, makespan, busy, overhead and bubble per rank."""
    recs = {r: steps[i][1] for r, steps in per_rank.items()}
    timeline = [TimelineEntry(r, a, s, e) for r, rr in recs.items() for a, s, e, peer in rr if peer is None]
    waits = [TimelineEntry(r, a, s, e) for r, rr in recs.items() for a, s, e, peer in rr if peer is not None]
    makespan = max((e.end for e in timeline), default=0.0)  # from the step's start (after a barrier)
    busy = {r: 0.0 for r in per_rank} | busy_time(timeline)
    overhead = {r: _split_rank(rr)[0] for r, rr in recs.items()}
    bubble = {r: max(0.0, makespan - busy[r] - overhead.get(r, 0.0)) for r in busy}
    return timeline, waits, makespan, busy, overhead, bubble


def _ratios(idle: dict[int, float], makespan: float) -> dict[int, float]:
    return {r: v / makespan if makespan else 0.0 for r, v in idle.items()}


def _median_per_rank(per_step: list[dict[int, float]]) -> dict[int, float]:
    return {r: statistics.median(d[r] for d in per_step) for r in per_step[0]}


def summarize(program: Program, per_rank: dict[int, list[tuple[float, list, list]]], batch: int,
              early_results: bool = False) -> ProfileResult:
    """Build the ``ProfileResult`` from every rank's recorded steps (rank -> steps)."""
    num_steps = len(next(iter(per_rank.values())))
    # cost of an action = its compute + the runtime's time to start it (gaps before it)
    every, compute_only, replays = [], [], [[] for _ in range(num_steps)]
    for r, steps in per_rank.items():
        for i, (_, recs, _) in enumerate(steps):
            dispatch = _split_rank(recs)[1]
            for a, s, e, peer in recs:
                if peer is None:
                    every.append(TimelineEntry(r, a, s - dispatch.get(a, 0.0), e))
                    compute_only.append(TimelineEntry(r, a, s, e))
                    replays[i].append(every[-1])
    costs = dataclasses.replace(measured_costs(compute_only), comm=transfer_latency(program, per_rank))
    base = dataclasses.replace(measured_costs(every), comm=costs.comm)
    measured, simulated = [], []
    for i in range(num_steps):  # each step beside its own replay
        step = _measured_step(per_rank, i)
        sim = simulate(program, stage_costs(every, base, replays[i]), early_results=early_results)
        measured.append(_ratios(step[5], step[2]))
        simulated.append(_ratios(sim.idle, sim.makespan))
    timeline, waits, makespan, busy, overhead, _ = step
    step_times = [max(steps[i][0] for steps in per_rank.values()) for i in range(num_steps)]
    return ProfileResult(
        program=program, timeline=timeline, waits=waits, step_times=step_times, makespan=makespan, busy=busy,
        overhead=overhead, bubble_ratio_per_rank=_median_per_rank(measured),
        simulated_bubble_ratio_per_rank=_median_per_rank(simulated),
        samples_per_s=batch / statistics.median(step_times), costs=costs, simulated=sim)


def profile_pipeline(pipe, inputs: tuple, target=None, steps: int = 3, clock=None) -> Optional[ProfileResult]:
    """Run ``steps`` steps of ``pipe`` recording every action; the result on rank 0 only.

    ``clock``: the timing source (``runtime.clock``); default ``clock_for(pipe.device)``,
    the host clock on CPU and CUDA events on a GPU."""
    if steps < 1:
        raise ValueError(f"profile(steps={steps}): run at least 1 step")
    pipe._check(tuple(inputs), target, forward_only=False)
    clock = clock_for(pipe.device) if clock is None else clock
    mine = _record_steps(pipe, tuple(inputs), target, steps, clock)
    gathered: Optional[list] = [None] * dist.get_world_size(pipe.group) if pipe.rank == 0 else None
    dist.gather_object((pipe.rank, mine), gathered, group_dst=0, group=pipe.group)
    if pipe.rank != 0:
        return None
    batch = pipe.num_microbatches * pipe.examples[0].shape[0]
    early = any(s.early_sends for s in pipe.stages.values())  # F&B pairs send from inside
    result = summarize(pipe.program, dict(gathered), batch, early_results=early)
    return dataclasses.replace(result, clock=type(clock).__name__)
