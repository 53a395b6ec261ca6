"""Run a pipeline program in simulated time: makespan, bubble, peak activations, timeline.

**Contract**: ``simulate(program: Program, costs: Costs) -> SimResult``. Pure: no torch,
no processes; the same program the runtime executes, with each action taking a fixed
time from ``costs``.

**Pseudocode**
    check the program: every (stage, micro-batch) has one F and one backward, deps exist
    repeat until no rank can move:
        for each rank, while its next action's dependencies are done:
            start = max(rank free, each dependency's end (+ comm if from another rank))
            end = start + cost(action); record a TimelineEntry
    ranks with actions left -> ScheduleDeadlockError naming what each one waits for

Costs (one chunk = one stage of one micro-batch): ``F`` forward, ``B`` full backward,
``W`` weight-grad part of a backward, so an input-grad-only ``I`` costs ``B - W``. An
overlapped pair ``F&B`` costs ``FB`` (default ``F + B``: no overlap); an ``F&I`` pair
costs ``FB - W``. ``comm`` is the latency of every hop between two ranks.

Dependencies: ``F(s,m)`` needs ``F(prev(s),m)``; ``B/I(s,m)`` needs ``F(s,m)`` and
``B/I(next(s),m)`` (a chain's last stage needs only its own ``F``: the loss);
``W(s,m)`` needs ``I(s,m)``. An overlapped pair starts when both parts' dependencies
are done and publishes both results at its end (``early_results=True``: each as soon as
it is made, as the runtime's sends from inside the pair on gloo).

How the figures are counted:

- ``idle[r] = makespan - busy[r]``: time rank ``r`` does not compute before the last
  rank finishes. ``bubble = max(idle)``, the idle time of the least busy rank;
  ``bubble_ratio = bubble / makespan``.
- ``peak_activations[r]``: the most (stage, micro-batch) activations rank ``r`` holds
  at once, in chunks. An activation is held from the start of its ``F`` to the end
  of its last backward part (``B``, or ``W`` after an ``I``, since the weight grad
  still reads the stage inputs). An ``F&B`` pair holds its forward's activation while
  its backward runs, so it counts both. The count depends only on program order.

With these definitions the DualPipe README table ("based on the same number of PP
stages": PP = the stages one micro-batch flows through, i.e. one chain's length; C
micro-batches per chain at least the generator's minimum; ``comm = 0``) comes out
exactly for the generators in ``dualpipe_fx.schedules`` (checked on a grid of costs for
PP up to 8; ``readme_bubble`` computes the formulas):

| schedule (ranks) | bubble | peak | the bubble formula is exact when |
| --- | --- | --- | --- |
| 1f1b (PP) | (PP-1)(F+B) | PP | always |
| zb1p (PP) | (PP-1)(F+B-2W) | PP | W <= F and W <= B-W (e.g. F = B-W = W) |
| dualpipe (PP) | (PP/2-1)(F&B+B-3W) | PP+1 | B-W = F, W <= F, F&B <= F+B |
| dualpipev (PP/2) | (PP/2-1)(F&B+B-3W) | PP+1 | B-W = F, W <= F, F&B <= F+B |

e.g. ``Costs(F=1, B=2, W=1, FB=2.5)`` meets every row. Outside those conditions the
simulator is the ground truth and the formula only an estimate (for a large ``W`` the
DualPipe formula can even turn negative). Peaks hold for any costs; the other schedules
peak at: gpipe C, zbv 2·min(N, C), interleaved_1f1b
min(2C, 2(N-1) + C // max(1, C // N) + 1) (torch's warm-up count, plus one).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

from dualpipe_fx.schedules.ir import Action, DepKey, Program, dependency_key
from dualpipe_fx.planning.timeline import TimelineEntry, busy_time

# A dependency key: ("F" | "G" | "W", stage, micro-batch); "G" is the input grad
# that a B or an I produces (the downstream backward cannot tell them apart).
_Key = DepKey


class ScheduleDeadlockError(ValueError):
    """A program that cannot finish: each blocked rank waits for an action that never runs."""


class ScheduleDependencyError(ValueError):
    """A program that is wrong before it runs: duplicated, missing or impossible actions."""


@dataclass(frozen=True)
class Costs:
    """Time of one chunk of each kind; see the module docstring for the cost model.

    Raises:
        ValueError: a negative cost, ``W > B``, or ``FB`` shorter than ``max(F, B)``.
    """

    F: float
    B: float
    W: float
    FB: Optional[float] = None
    comm: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and value < 0:
                raise ValueError(f"cost {f.name}={value} is negative; every cost must be >= 0")
        if self.W > self.B:
            raise ValueError(f"cost W={self.W} > B={self.B}; the weight-grad part W is a part of the "
                             f"full backward B, so W must be <= B")
        if self.FB is not None and self.FB < max(self.F, self.B):
            raise ValueError(f"cost FB={self.FB} < max(F, B)={max(self.F, self.B)}; an overlapped pair "
                             f"takes at least as long as its longer part, so FB must be >= max(F, B)")

    @property
    def overlapped(self) -> float:
        """The time of an ``F&B`` pair."""
        return self.F + self.B if self.FB is None else self.FB

    def of(self, action: Action) -> float:
        """The time ``action`` takes."""
        if action.kind == "FB":
            return self.overlapped - (self.W if action.backward.kind == "I" else 0.0)
        return {"F": self.F, "B": self.B, "I": self.B - self.W, "W": self.W}[action.kind]


def cost_key(action: Action) -> tuple:
    """Actions that cost alike: one kind on one stage (an F&B pair: on both of its stages)."""
    if action.kind == "FB":
        return ("FB", action.forward.stage, action.backward.kind, action.backward.stage)
    return (action.kind, action.stage)


@dataclass(frozen=True)
class StageCosts:
    """Costs per action, else per (kind, stage) (``cost_key``), else ``base``; e.g.
    measured ones: a first stage computes no input grad and a last one the loss, so their
    actions cost other than the middle ones, and a replay of one measured step gives every
    action its own time. ``comm`` is ``base.comm``."""

    base: Costs
    by_key: dict
    by_action: dict = field(default_factory=dict)

    @property
    def comm(self) -> float:
        return self.base.comm

    def of(self, action: Action) -> float:
        if action in self.by_action:
            return self.by_action[action]
        return self.by_key.get(cost_key(action), self.base.of(action))


@dataclass(frozen=True)
class SimResult:
    """What ``simulate`` measured; see the module docstring for how each figure is counted."""

    makespan: float
    busy: dict[int, float]
    idle: dict[int, float]
    peak_activations: dict[int, int]
    timeline: list[TimelineEntry]
    costs: Optional[Costs] = None
    # Unit of start/end times; a measured profile uses "s" (see dualpipe_fx.visualize).
    time_unit: str = "unit"

    @property
    def bubble(self) -> float:
        """The largest idle time of any rank."""
        return max(self.idle.values(), default=0.0)

    @property
    def bubble_ratio(self) -> float:
        """``bubble / makespan`` (0 for an empty program)."""
        return self.bubble / self.makespan if self.makespan > 0 else 0.0

    @property
    def max_peak_activations(self) -> int:
        """The largest peak of any rank, in chunk activations."""
        return max(self.peak_activations.values(), default=0)


def _name(key: _Key, producers: dict[_Key, tuple[int, Action]]) -> str:
    if key in producers:
        return str(producers[key][1])
    kind, s, m = key
    return f"B{s}.{m}/I{s}.{m}" if kind == "G" else f"{kind}{s}.{m}"


def _index(program: Program) -> dict[_Key, tuple[int, Action]]:
    """Who produces each key; raises on unknown stages, bad micro-batches, duplicates."""
    chain_stages = {s for chain in program.chains for s in chain}
    producers: dict[_Key, tuple[int, Action]] = {}
    placement: dict[int, int] = {}
    for rank, actions in program.items():
        for action in actions:
            for part in action.parts():
                if part.stage not in chain_stages:
                    raise ScheduleDependencyError(f"{part} on rank {rank}: stage {part.stage} is in no chain "
                                                  f"of {program.chains}; use a stage of a chain")
                if not 0 <= part.microbatch < program.num_microbatches:
                    raise ScheduleDependencyError(f"{part} on rank {rank}: micro-batch {part.microbatch} is "
                                                  f"outside 0..{program.num_microbatches - 1}")
                if placement.setdefault(part.stage, rank) != rank:
                    raise ScheduleDependencyError(f"{part} on rank {rank}: stage {part.stage} already runs on "
                                                  f"rank {placement[part.stage]}; a stage lives on one rank")
                key = dependency_key(part)
                if key in producers:
                    raise ScheduleDependencyError(f"{part} on rank {rank} duplicates {producers[key][1]} on "
                                                  f"rank {producers[key][0]}; each runs exactly once")
                producers[key] = (rank, part)
    return producers


def _check_complete(program: Program, producers: dict[_Key, tuple[int, Action]]) -> None:
    """Every stage runs every micro-batch forward and backward; every I has its W."""
    for chain in program.chains:
        for s in chain:
            for m in range(program.num_microbatches):
                for kind, what in (("F", "forward F"), ("G", "backward B or I")):
                    if (kind, s, m) not in producers:
                        raise ScheduleDependencyError(f"no rank runs the {what} of stage {s}, micro-batch "
                                                      f"{m}; every stage runs every micro-batch")
    for key, (rank, part) in producers.items():
        has_w = ("W", key[1], key[2]) in producers
        if part.kind == "I" and not has_w:
            raise ScheduleDependencyError(f"{part} on rank {rank} has no W{key[1]}.{key[2]}; an I needs its W")
        if part.kind == "B" and has_w:
            raise ScheduleDependencyError(f"W{key[1]}.{key[2]} follows a full backward {part}, which already "
                                          f"computed the weight grads; use I{key[1]}.{key[2]} instead of B")


def _dependencies(program: Program, producers: dict[_Key, tuple[int, Action]]) -> dict[Action, list[_Key]]:
    """The keys each (possibly overlapped) action waits for; raises on impossible pairs."""
    deps: dict[Action, list[_Key]] = {}
    for rank, actions in program.items():
        for action in actions:
            own = {dependency_key(p) for p in action.parts()}
            needed = [k for p in action.parts() for k in program.dependencies(p)]
            if own & set(needed):
                raise ScheduleDependencyError(f"overlapped pair {action} on rank {rank}: one part needs the "
                                              f"other's result, so they cannot run at the same time")
            for k in needed:
                assert k in producers, (action, k)  # _check_complete saw every F and G
            deps[action] = needed
    return deps


def _deadlock_message(program: Program, pos: dict[int, int], deps: dict[Action, list[_Key]],
                      done: dict[_Key, tuple[float, int]], producers: dict[_Key, tuple[int, Action]]) -> str:
    lines = []
    for rank in sorted(program):
        if pos[rank] < len(program[rank]):
            action = program[rank][pos[rank]]
            waits = [f"{_name(k, producers)} (rank {producers[k][0]})" for k in deps[action] if k not in done]
            lines.append(f"rank {rank} blocked at {action} (action {pos[rank]}), waiting for " + ", ".join(waits))
    return "program deadlocks; no rank can move:\n  " + "\n  ".join(lines)


def _published(action: Action, start: float, end: float, costs: "Costs | StageCosts",
               early_results: bool) -> dict[_Key, float]:
    """When each part's result is available to other actions.

    By default at the action's end. With ``early_results`` an F&B pair hands over its
    two results as it makes them, the shorter half first (as the multiplexed graph's
    sends go out): the forward output after F, the input grad after the backward's I part.
    """
    if not early_results or action.kind != "FB":
        return {dependency_key(p): end for p in action.parts()}
    fwd, bwd = action.forward, action.backward
    halves = sorted([(costs.of(fwd), fwd), (costs.of(Action("I", bwd.stage, bwd.microbatch)), bwd)],
                    key=lambda h: h[0])
    first = min(end, start + halves[0][0])
    second = min(end, first + halves[1][0])
    return {dependency_key(halves[0][1]): first, dependency_key(halves[1][1]): second}


def _run(program: Program, costs: "Costs | StageCosts", deps: dict[Action, list[_Key]],
         producers: dict[_Key, tuple[int, Action]], early_results: bool = False) -> list[TimelineEntry]:
    """List scheduling in program order; start times do not depend on the visiting order."""
    done: dict[_Key, tuple[float, int]] = {}  # key -> (end time, rank)
    pos = {rank: 0 for rank in program}
    free = {rank: 0.0 for rank in program}
    timeline: list[TimelineEntry] = []
    moved = True
    while moved:
        moved = False
        for rank, actions in program.items():
            while pos[rank] < len(actions) and all(k in done for k in deps[actions[pos[rank]]]):
                action = actions[pos[rank]]
                start = max([free[rank]] + [end + (costs.comm if src != rank else 0.0)
                                            for end, src in (done[k] for k in deps[action])])
                free[rank] = start + costs.of(action)
                timeline.append(TimelineEntry(rank, action, start, free[rank]))
                done.update({k: (t, rank) for k, t in
                             _published(action, start, free[rank], costs, early_results).items()})
                pos[rank] += 1
                moved = True
    if any(pos[rank] < len(actions) for rank, actions in program.items()):
        raise ScheduleDeadlockError(_deadlock_message(program, pos, deps, done, producers))
    return timeline


def _peak_activations(actions: list[Action]) -> int:
    held = peak = 0
    for action in actions:
        held += sum(p.kind == "F" for p in action.parts())
        peak = max(peak, held)
        held -= sum(p.kind in ("B", "W") for p in action.parts())
    return peak


def in_flight_by_part(program: Program) -> dict[int, int]:
    """Per model part: how many micro-batches whose forward ran and whose I (or B) has not its
    rank holds at the moment it holds the most of them (DualPipeV on 8 ranks, 16 micro-batches:
    rank r holds 15-r of stage r and r+1 of stage 15-r); what the stage cut's memory estimate
    multiplies a part's activations by. A part on several ranks (mirrors): the largest."""
    out: dict[int, int] = {}
    for actions in program.values():
        held: dict[int, int] = {}
        best: tuple[int, dict[int, int]] = (0, {})
        for action in actions:
            for part in action.parts():
                model_part = program.model_part(part.stage)
                if part.kind == "F":
                    held[model_part] = held.get(model_part, 0) + 1
                elif part.kind in ("B", "I"):
                    held[model_part] -= 1
            if sum(held.values()) > best[0]:
                best = (sum(held.values()), dict(held))
        for model_part, count in best[1].items():
            out[model_part] = max(out.get(model_part, 0), count)
    return out


def readme_bubble(schedule: str, num_stages: int, costs: Costs) -> Optional[float]:
    """The DualPipe README's bubble formula for ``schedule``, or None if the table has no row.

    ``num_stages`` is the README's PP: the stages one micro-batch flows through (one
    chain's length: N for 1F1B, ZB1P and DualPipe, 2N for DualPipeV on N ranks).
    """
    F, B, W, FB = costs.F, costs.B, costs.W, costs.overlapped
    if schedule == "1f1b":
        return (num_stages - 1) * (F + B)
    if schedule == "zb1p":
        return (num_stages - 1) * (F + B - 2 * W)
    if schedule in ("dualpipe", "dualpipev"):
        return (num_stages / 2 - 1) * (FB + B - 3 * W)
    return None


def simulate(program: Program, costs: "Costs | StageCosts", *, early_results: bool = False) -> SimResult:
    """Simulate ``program`` with ``costs``; see the module docstring for the model.

    Args:
        program: per-rank action lists with their chains (``dualpipe_fx.schedules``).
        costs: the time of each action kind and of one hop between ranks (``Costs``),
            or per (kind, stage) (``StageCosts``).
        early_results: an F&B pair publishes its forward output and its input grad as it
            makes them (the runtime's early sends on gloo), not both at its end.

    Returns:
        SimResult with makespan, per-rank busy and idle time, bubble, peak activations
        and the timeline (one entry per action, an overlapped pair as one entry).

    Raises:
        TypeError: ``costs`` is not a ``Costs``.
        ScheduleDependencyError: duplicated, missing or impossible actions.
        ScheduleDeadlockError: the program waits on itself; names each blocked action.
    """
    if not isinstance(costs, (Costs, StageCosts)):
        raise TypeError(f"costs is a {type(costs).__name__}; pass Costs(F=..., B=..., W=...) or StageCosts")
    producers = _index(program)
    _check_complete(program, producers)
    deps = _dependencies(program, producers)
    timeline = _run(program, costs, deps, producers, early_results)
    makespan = max((e.end for e in timeline), default=0.0)
    busy = {rank: 0.0 for rank in program} | busy_time(timeline)
    return SimResult(
        makespan=makespan,
        busy=busy,
        idle={rank: makespan - b for rank, b in busy.items()},
        peak_activations={rank: _peak_activations(actions) for rank, actions in program.items()},
        timeline=timeline,
        costs=costs.base if isinstance(costs, StageCosts) else costs,
    )
