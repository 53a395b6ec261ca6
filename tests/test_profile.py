"""profile.summarize: a step's records split into busy + overhead + bubble, and the
simulator's replay of the same step predicts its bubble.

The records are synthetic: a simulated step in which every action starts ``GAP`` after
it could (the runtime's time to post receives and dispatch), with the waits for peers
recorded as the profiler records them. Such a step must come out with overhead == the
gaps, busy == the compute, no transfer latency, and a measured bubble equal to the
replay's. A step whose data arrive late gives that lateness as the latency.
"""
from __future__ import annotations

import pytest

from dualpipe_fx.runtime.profile import summarize
from dualpipe_fx.schedules.registry import generate
from dualpipe_fx.planning.simulate import Costs, simulate
from dualpipe_fx.planning.timeline import by_rank

GAP = 0.05


def _records(program, costs):
    """Per rank, one step's records: (action, start, end, wait_for) as the runtime writes them."""
    sim = simulate(program, costs)  # each action costs compute + GAP
    out = {}
    for rank, entries in by_rank(sim.timeline).items():
        recs, prev_end = [], 0.0
        for e in entries:
            if e.start > prev_end:  # waited for a peer's data, which came at e.start
                recs.append((e.action, prev_end, e.start, 1 - rank))
            recs.append((e.action, e.start + GAP, e.end, None))
            prev_end = e.end
        out[rank] = [(sim.makespan, recs, [])]
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


def test_late_data_is_measured_as_the_transfer_latency():
    from dualpipe_fx.runtime.profile import transfer_latency
    from dualpipe_fx.schedules.ir import Action

    program = generate("1f1b", 2, 2)
    f0, f1 = Action("F", 0, 0), Action("F", 1, 0)
    # rank 0's F0.0 ends at 1.0 (its output sent then); rank 1 waits from 0.1 to 1.3
    records = {0: [(2.0, [(f0, 0.0, 1.0, None)], [])],
               1: [(2.0, [(f1, 0.1, 1.3, 0), (f1, 1.3, 2.0, None)], [])]}
    assert transfer_latency(program, records) == pytest.approx(0.3)
    # an early send at 0.6 (inside a pair) is when the data left
    records[0][0][2].append((0, "F", 0, 0.6))
    assert transfer_latency(program, records) == pytest.approx(0.7)
    # gloo moves the data once the receive is posted too: posted at 0.9, it took 0.4
    records[1][0][2].append((1, "recvF", 0, 0.9))
    assert transfer_latency(program, records) == pytest.approx(0.4)


def test_the_bubble_is_the_median_over_the_profiled_steps_and_run_prints_it_so():
    from dualpipe_fx.ui.demo import bubble_line

    program = generate("dualpipev", 2, 4)
    steps = [_records(program, Costs(F=1.0 + GAP, B=b + GAP, W=1.0 + GAP, FB=b + 1.0 + GAP))[1]
             for b in (2.0, 6.0, 3.0)]  # three steps, three different bubbles
    alone = [summarize(program, records, batch=8).bubble_ratio_per_rank for records in steps]
    prof = summarize(program, {r: [records[r][0] for records in steps] for r in program}, batch=8)
    for rank in program:
        ratios = sorted(a[rank] for a in alone)
        assert ratios[0] < ratios[1] < ratios[2], ratios  # the steps really differ
        assert prof.bubble_ratio_per_rank[rank] == pytest.approx(ratios[1])
    line = bubble_line(prof, "measured.png")
    assert line.startswith("measured bubble ratio, median of 3 profiled steps: rank 0 "), line
    assert f"rank 1 {prof.bubble_ratio_per_rank[1]:.3f}" in line, line
