"""profile.summarize: a step's records split into busy + overhead + bubble, and the
simulator's replay of the same step predicts its bubble.

The records are synthetic: a simulated step in which every action starts ``gap`` after
it could (the runtime's time to post receives and dispatch), with the waits for peers
recorded as the profiler records them. Such a step must come out with overhead == the
gaps, busy == the compute, and a measured bubble equal to the replay's.
"""
from __future__ import annotations

import pytest

from dualpipe_fx.profile import summarize
from dualpipe_fx.schedules.registry import generate
from dualpipe_fx.simulate import Costs, simulate
from dualpipe_fx.timeline import by_rank

GAP = 0.05


def _records(program, costs):
    """Per rank, one step's records: (action, start, end, wait_for) as the runtime writes them."""
    sim = simulate(program, costs)  # each action costs compute + GAP
    out = {}
    for rank, entries in by_rank(sim.timeline).items():
        recs, prev_end = [], 0.0
        for e in entries:
            if e.start > prev_end:  # waited for a peer before this action
                recs.append((e.action, prev_end + GAP, e.start + GAP, 1 - rank))
            recs.append((e.action, e.start + GAP, e.end, None))
            prev_end = e.end
        out[rank] = [(sim.makespan, recs)]
    return sim, out


@pytest.mark.parametrize("schedule", ["dualpipev", "1f1b", "zbv"])
def test_a_step_that_ran_as_simulated_splits_into_busy_overhead_and_the_predicted_bubble(schedule):
    program = generate(schedule, 2, 4)
    costs = Costs(F=1.0 + GAP, B=2.0 + GAP, W=1.0 + GAP, FB=3.0 + GAP)
    sim, records = _records(program, costs)
    prof = summarize(program, records, batch=8)
    for rank, actions in program.items():
        n = len(actions)
        assert prof.busy[rank] == pytest.approx(sim.busy[rank] - n * GAP)
        assert prof.overhead[rank] == pytest.approx(n * GAP)
    assert prof.makespan == pytest.approx(sim.makespan)
    assert prof.simulated.makespan == pytest.approx(sim.makespan)
    for rank in program:
        assert prof.bubble_ratio_per_rank[rank] == pytest.approx(prof.simulated_bubble_ratio_per_rank[rank],
                                                                 abs=1e-9)
