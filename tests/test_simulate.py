"""The simulator rebuilds the DualPipe README table, times small programs as computed by
hand, and on every registered schedule never deadlocks, never overlaps two actions on a
rank, respects every dependency and stays within each schedule's activation bound."""
from __future__ import annotations

import functools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dualpipe_fx.schedules.ir import B, F, FB, I, Program, W
from dualpipe_fx.schedules.registry import SCHEDULES, generate
from dualpipe_fx.planning.simulate import (Costs, ScheduleDeadlockError, ScheduleDependencyError, SimResult,
                                  readme_bubble, simulate)

# ---------------------------------------------------------------- the README table

# Costs under which every README formula is exact (see the simulate docstring):
# B - W = F, W <= F, max(F, B) <= FB <= F + B.
README_COSTS = [
    Costs(F=1, B=2, W=1, FB=2.5),
    Costs(F=2, B=3, W=1, FB=4),
    Costs(F=1.5, B=2, W=0.5),  # FB = F + B: no overlap
]


def _readme(schedule: str, pp: int, c: Costs) -> tuple[float, int]:
    """(bubble, peak activations) as the DualPipe README table writes them, by hand."""
    fb = c.F + c.B if c.FB is None else c.FB
    return {
        "1f1b": ((pp - 1) * (c.F + c.B), pp),
        "zb1p": ((pp - 1) * (c.F + c.B - 2 * c.W), pp),
        "dualpipe": ((pp / 2 - 1) * (fb + c.B - 3 * c.W), pp + 1),
        "dualpipev": ((pp / 2 - 1) * (fb + c.B - 3 * c.W), pp + 1),
    }[schedule]


# PP stages per chain: 1F1B, ZB1P and DualPipe run them on PP ranks, DualPipeV on PP/2.
_RANKS = {"1f1b": lambda pp: pp, "zb1p": lambda pp: pp, "dualpipe": lambda pp: pp, "dualpipev": lambda pp: pp // 2}


@pytest.mark.parametrize("costs", README_COSTS, ids=str)
@pytest.mark.parametrize("pp", [2, 4, 8])
@pytest.mark.parametrize("schedule", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
def test_readme_table_bubble_and_peak(schedule, pp, costs):
    program = generate(schedule, _RANKS[schedule](pp), 20)
    assert len(program.chains[0]) == pp
    sim = simulate(program, costs)
    bubble, peak = _readme(schedule, pp, costs)
    assert sim.bubble == pytest.approx(bubble, abs=1e-12)
    assert sim.max_peak_activations == peak
    assert readme_bubble(schedule, pp, costs) == pytest.approx(bubble)


@pytest.mark.parametrize("costs", [Costs(F=1, B=5, W=0.5), Costs(F=3, B=1, W=1, FB=3.5), Costs(F=0.7, B=0.9, W=0)],
                         ids=str)
@pytest.mark.parametrize("pp", [2, 4, 8])
def test_1f1b_formula_holds_for_any_costs(pp, costs):
    sim = simulate(generate("1f1b", pp, 20), costs)
    assert sim.bubble == pytest.approx((pp - 1) * (costs.F + costs.B))
    assert all(idle == pytest.approx(sim.bubble) for idle in sim.idle.values())


def test_dualpipev_formula_needs_its_cost_assumptions():
    # W > F breaks "W <= F": the table's formula is then not what the schedule does.
    costs = Costs(F=1, B=3, W=2, FB=3.5)
    sim = simulate(generate("dualpipev", 4, 20), costs)
    assert sim.bubble > readme_bubble("dualpipev", 8, costs)


# ---------------------------------------------------------------- by hand

def _one_f_one_b_2x2() -> Program:
    return Program({0: [F(0, 0), F(0, 1), B(0, 0), B(0, 1)], 1: [F(1, 0), B(1, 0), F(1, 1), B(1, 1)]},
                   chains=((0, 1),), num_microbatches=2, name="hand")


def test_small_program_timed_by_hand():
    sim = simulate(_one_f_one_b_2x2(), Costs(F=1, B=2, W=1, comm=0.5))
    got = {(e.rank, str(e.action)): (e.start, e.end) for e in sim.timeline}
    assert got == {
        (0, "F0.0"): (0, 1), (0, "F0.1"): (1, 2),
        (1, "F1.0"): (1.5, 2.5), (1, "B1.0"): (2.5, 4.5), (1, "F1.1"): (4.5, 5.5), (1, "B1.1"): (5.5, 7.5),
        (0, "B0.0"): (5, 7), (0, "B0.1"): (8, 10),  # each waits for the gradient + one hop
    }
    assert sim.makespan == 10 and sim.idle == {0: 4, 1: 4} and sim.bubble == 4
    assert sim.bubble_ratio == pytest.approx(0.4)
    assert sim.peak_activations == {0: 2, 1: 1}


def test_overlapped_pair_costs_and_publishes_both_results():
    # rank 0 holds stages 0 and 3 (a V); its F3.1&B3.0 runs as one action of cost FB.
    program = Program({
        0: [F(0, 0), F(3, 0), F(0, 1), FB(F(3, 1), B(3, 0)), I(0, 0), B(3, 1), B(0, 1), W(0, 0)],
        1: [F(1, 0), F(2, 0), F(1, 1), F(2, 1), I(2, 0), W(2, 0), B(1, 0), B(2, 1), B(1, 1)],
    }, chains=((0, 1, 2, 3),), num_microbatches=2)
    sim = simulate(program, Costs(F=1, B=2, W=0.5, FB=2.5))
    at = {str(e.action): (e.start, e.end) for e in sim.timeline}
    assert at["F3.1&B3.0"] == (7, 9.5)  # waits for F2.1 (ends at 7), then takes FB
    assert at["I2.0"] == (9.5, 11)  # B3.0's gradient is published at the pair's end, not before
    assert at["B3.1"] == (15, 17) and at["W0.0"] == (23, 23.5) and sim.makespan == 23.5
    # rank 0: F0.0 F3.0 F0.1 held, then the pair's F3.1 joins while its B3.0 still holds F3.0;
    # rank 1: four forwards before the first backward (its I2.0 frees nothing until W2.0)
    assert sim.peak_activations == {0: 4, 1: 4}


def test_cost_of_each_kind():
    costs = Costs(F=1, B=2, W=0.5, FB=2.5)
    assert [costs.of(a) for a in (F(0, 0), B(0, 0), I(0, 0), W(0, 0))] == [1, 2, 1.5, 0.5]
    assert costs.of(FB(F(0, 0), B(1, 0))) == 2.5
    assert costs.of(FB(F(0, 0), I(1, 0))) == 2.0  # F&I = FB - W
    assert Costs(F=1, B=2, W=1).of(FB(F(0, 0), B(1, 0))) == 3  # default FB = F + B
    assert Costs(F=1, B=2, W=1).of(FB(F(0, 0), I(1, 0))) == 2  # then F + (B - W)


def test_comm_is_paid_only_between_ranks():
    program = Program({0: [F(0, 0), F(1, 0), B(1, 0), B(0, 0)]}, chains=((0, 1),), num_microbatches=1)
    assert simulate(program, Costs(F=1, B=2, W=1, comm=100)).makespan == 6


# ---------------------------------------------------------------- errors

def test_deadlock_names_each_blocked_action():
    program = Program({0: [B(0, 0), F(0, 0)], 1: [F(1, 0), B(1, 0)]}, chains=((0, 1),), num_microbatches=1)
    with pytest.raises(ScheduleDeadlockError) as err:
        simulate(program, Costs(F=1, B=2, W=1))
    text = str(err.value)
    assert "rank 0 blocked at B0.0" in text and "F0.0 (rank 0)" in text and "B1.0 (rank 1)" in text
    assert "rank 1 blocked at F1.0" in text
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("actions, match", [
    ({0: [F(0, 0), F(0, 0), B(0, 0)]}, "F0.0 on rank 0 duplicates F0.0"),
    ({0: [F(0, 0), B(0, 0), I(0, 0)]}, "I0.0 on rank 0 duplicates B0.0"),
    ({0: [F(0, 0)]}, "backward B or I of stage 0, micro-batch 0"),
    ({0: [F(0, 0), I(0, 0)]}, "has no W0.0"),
    ({0: [F(0, 0), B(0, 0), W(0, 0)]}, "use I0.0 instead of B"),
    ({0: [F(0, 0), B(0, 0), F(0, 1), B(0, 1)]}, "micro-batch 1 is outside 0..0"),
    ({0: [F(0, 0), B(0, 0), F(5, 0)]}, "stage 5 is in no chain"),
    ({0: [FB(F(0, 0), B(0, 0))]}, "one part needs the other's result"),
])
def test_dependency_errors(actions, match):
    with pytest.raises(ScheduleDependencyError, match=match):
        simulate(Program(actions, chains=((0,),), num_microbatches=1), Costs(F=1, B=2, W=1))


def test_stage_on_two_ranks_is_an_error():
    program = Program({0: [F(0, 0), F(1, 0), B(1, 0), B(0, 0)], 1: [F(1, 0)]}, chains=((0, 1),),
                      num_microbatches=1)
    with pytest.raises(ScheduleDependencyError, match="stage 1 already runs on rank 0"):
        simulate(program, Costs(F=1, B=2, W=1))


@pytest.mark.parametrize("kwargs, match", [
    (dict(F=-1, B=2, W=1), r"cost F=-1 is negative"),
    (dict(F=1, B=2, W=1, comm=-0.5), r"cost comm=-0.5 is negative"),
    (dict(F=1, B=2, W=1, FB=-3), r"cost FB=-3 is negative"),
    (dict(F=1, B=1, W=2), r"W=2 > B=1"),
    (dict(F=1, B=2, W=1, FB=1.5), r"FB=1.5 < max\(F, B\)=2"),
])
def test_bad_costs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Costs(**kwargs)


def test_costs_must_be_costs():
    with pytest.raises(TypeError, match="pass Costs"):
        simulate(_one_f_one_b_2x2(), {"F": 1, "B": 2, "W": 1})


# ---------------------------------------------------------------- properties, every schedule

def _peak_bound(name: str, n: int, c: int) -> int:
    """The documented peak (chunk activations on the busiest rank) of each registered schedule."""
    bounds = {
        "dualpipev": 2 * n + 1,
        "dualpipe": n + 1,
        "gpipe": c,
        "1f1b": min(n, c),
        "zb1p": min(n, c),
        "zbv": 2 * min(n, c),
        "interleaved_1f1b": min(2 * c, 2 * (n - 1) + c // max(1, c // n) + 1),
    }
    assert name in bounds, f"schedule {name!r} has no documented activation bound; add it here and in simulate.py"
    return bounds[name]


@functools.lru_cache(maxsize=None)
def _valid_sizes(name: str) -> tuple[tuple[int, int], ...]:
    """Every (N, C) with N <= 8 and C <= 4N + 4 that the schedule accepts."""
    sizes = []
    for n in range(1, 9):
        for c in range(1, 4 * n + 5):
            try:
                SCHEDULES[name].validate(n, c)
            except ValueError:
                continue
            sizes.append((n, c))
    return tuple(sizes)


# Dyadic costs keep every sum exact, so the checks below need no tolerance.
_cost = st.integers(1, 32).map(lambda q: q / 4)


@st.composite
def _costs(draw) -> Costs:
    f, b = draw(_cost), draw(_cost)
    w = b * draw(st.sampled_from([0, 0.25, 0.5, 0.75, 1]))
    fb = draw(st.one_of(st.none(), st.integers(0, 4).map(lambda k: max(f, b) + k * min(f, b) / 4)))
    return Costs(F=f, B=b, W=w, FB=fb, comm=draw(st.sampled_from([0, 0.25, 0.5, 3])))


def _needs(program: Program, part) -> list[tuple[str, int, int]]:
    """The rules of the brief, restated: what each single action waits for ("G" = B or I)."""
    s, m = part.stage, part.microbatch
    if part.kind == "F":
        prev = program.previous_stage(s)
        return [] if prev is None else [("F", prev, m)]
    if part.kind == "W":
        return [("G", s, m)]
    nxt = program.next_stage(s)
    return [("F", s, m)] + ([] if nxt is None else [("G", nxt, m)])


def _check_timeline(program: Program, sim: SimResult, costs: Costs) -> None:
    entries = {e.action: e for e in sim.timeline}
    assert len(entries) == len(sim.timeline) == sum(len(a) for a in program.values())
    end_of = {(p.kind if p.kind in "FW" else "G", p.stage, p.microbatch): (e.end, e.rank)
              for e in sim.timeline for p in e.action.parts()}
    for rank, actions in program.items():
        rows = [entries[a] for a in actions]  # program order
        assert all(r.rank == rank and r.duration == costs.of(r.action) for r in rows)
        assert all(nxt.start >= prev.end for prev, nxt in zip(rows, rows[1:])), "two actions overlap on a rank"
        assert sim.makespan >= sim.busy[rank] == sum(r.duration for r in rows)
        for row in rows:
            for dep in (d for p in row.action.parts() for d in _needs(program, p)):
                end, src = end_of[dep]
                assert row.start >= end + (costs.comm if src != rank else 0), (row, dep)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_schedule_runs_to_the_end(name, data):
    n, c = data.draw(st.sampled_from(_valid_sizes(name)), label="N, C")
    costs = data.draw(_costs(), label="costs")
    program = generate(name, n, c)
    sim = simulate(program, costs)  # raises on deadlock
    _check_timeline(program, sim, costs)
    assert sim.max_peak_activations <= _peak_bound(name, n, c)
    assert 0 <= sim.bubble_ratio <= 1


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_schedule_has_a_documented_bound_that_is_reached(name):
    n, c = max(_valid_sizes(name), key=lambda nc: (nc[0], nc[1]))  # largest N, then C
    assert simulate(generate(name, n, c), Costs(F=1, B=2, W=1)).max_peak_activations == _peak_bound(name, n, c)


def test_stage_costs_simulate_each_stage_at_its_own_cost():
    """A first stage with no input grad to compute (cheap I) leaves its rank idle longer."""
    from dualpipe_fx.planning.simulate import StageCosts, cost_key

    program = generate("dualpipev", 2, 8)
    base = Costs(F=1.0, B=2.0, W=1.0)
    uniform = simulate(program, StageCosts(base, {}))
    assert uniform.makespan == simulate(program, base).makespan and uniform.costs == base
    cheap_i = StageCosts(base, {("I", 0): 0.0, ("B", 0): 1.0})
    sim = simulate(program, cheap_i)
    assert sim.busy[0] < uniform.busy[0] and sim.busy[1] == uniform.busy[1]
    fb = next(a for a in program[0] if a.kind == "FB")
    assert cost_key(fb) == ("FB", fb.forward.stage, fb.backward.kind, fb.backward.stage)
    assert StageCosts(base, {cost_key(fb): 7.0}).of(fb) == 7.0


def test_early_results_publish_each_half_of_a_pair_when_it_is_made():
    program = generate("dualpipev", 2, 8)
    costs = Costs(F=1.0, B=2.0, W=1.0, FB=3.0)
    late, early = simulate(program, costs), simulate(program, costs, early_results=True)
    assert early.makespan < late.makespan
    assert sum(early.busy.values()) == sum(late.busy.values())
    late_start = {str(e.action): e.start for e in late.timeline}
    assert any(e.start < late_start[str(e.action)] for e in early.timeline)
    # no consumer of a pair's forward output starts before the pair has made it
    for pair in (e for e in early.timeline if e.action.kind == "FB"):
        fwd = pair.action.forward
        for e in early.timeline:
            if any(p.kind == "F" and p.stage == fwd.stage + 1 and p.microbatch == fwd.microbatch
                   for p in e.action.parts()):
                assert e.start >= pair.start + costs.F
