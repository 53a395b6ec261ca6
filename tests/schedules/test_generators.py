"""Every generator: each (stage, micro-batch) computed once, in dependency order, no deadlock.

The checks are written out here (independently of ``validate_program``), and
``validate_program`` itself is checked to reject broken programs, so both can fail.
"""
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from dualpipe_fx.schedules import SCHEDULES, Program, generate, get_schedule, validate_program
from dualpipe_fx.schedules.ir import F, B, I, W, FB

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _accepts(name, n, c):
    try:
        get_schedule(name).validate(n, c)
        return True
    except ValueError:
        return False


@st.composite
def sizes(draw, name):
    """(N, C) with N <= 8 and C <= 4N+4 that the schedule accepts."""
    spec = SCHEDULES[name]
    n = draw(st.integers(2 if spec.bidirectional else 1, 8).filter(lambda v: not spec.bidirectional or v % 2 == 0))
    options = [c for c in range(spec.min_microbatches(n), 4 * n + 5) if _accepts(name, n, c)]
    return n, draw(st.sampled_from(options))


def _parts(program, rank):
    return [p for a in program[rank] for p in a.parts()]


def _check_exactly_once(program):
    count = Counter((p.kind, p.stage, p.microbatch) for r in program for p in _parts(program, r))
    for chain in program.chains:
        for s in chain:
            for m in range(program.num_microbatches):
                f, b, i, w = (count[(k, s, m)] for k in "FBIW")
                assert f == 1 and b + i == 1 and w == i, (s, m, f, b, i, w)
    assert sum(count.values()) == sum(len(_parts(program, r)) for r in program)
    assert all(count[k] == 1 for k in count)


def _event_replay(program):
    """Ranks run their lists in order; an action runs once its inputs ran. Returns finish order."""
    pos = {r: 0 for r in program}
    done, order = set(), []

    def needs(p):
        if p.kind == "F":
            prev = program.previous_stage(p.stage)
            return [] if prev is None else [{("F", prev, p.microbatch)}]
        if p.kind == "W":
            return [{("I", p.stage, p.microbatch)}]
        nxt = program.next_stage(p.stage)
        own = [{("F", p.stage, p.microbatch)}]
        return own if nxt is None else own + [{("B", nxt, p.microbatch), ("I", nxt, p.microbatch)}]

    moved = True
    while moved:
        moved = False
        for r in sorted(program):
            while pos[r] < len(program[r]):
                parts = program[r][pos[r]].parts()
                if not all(any(k in done for k in alt) for p in parts for alt in needs(p)):
                    break
                done.update((p.kind, p.stage, p.microbatch) for p in parts)
                order.append((r, program[r][pos[r]]))
                pos[r] += 1
                moved = True
    stuck = {r: program[r][i] for r, i in pos.items() if i < len(program[r])}
    assert not stuck, f"deadlock, ranks stuck at {stuck}"
    return order


def _check_placement(program, name, n):
    spec = SCHEDULES[name]
    placement = program.stage_to_rank()
    assert len(placement) == spec.num_stages(n) == program.num_stages
    for rank in program:
        assert sum(1 for s in placement.values() if s == rank) == spec.stages_per_rank
    if name in ("dualpipev", "zbv", "dualpipe"):
        assert all(placement[s] == s and placement[2 * n - 1 - s] == s for s in range(n))
    if name == "interleaved_1f1b":
        assert all(placement[s] == s % n for s in placement)


def _check_program(name, n, c):
    program = generate(name, n, c)
    assert program.name == get_schedule(name).name and program.num_ranks == n
    expected_mb = c // 2 if SCHEDULES[name].bidirectional else c
    assert program.num_microbatches == expected_mb
    _check_exactly_once(program)
    _check_placement(program, name, n)
    _event_replay(program)
    validate_program(program)
    has_fb = any(a.kind == "FB" for acts in program.values() for a in acts)
    assert has_fb == SCHEDULES[name].has_fb


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_generator_properties(name):
    @SETTINGS
    @given(sizes(name))
    def run(nc):
        _check_program(name, *nc)
    run()


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_smallest_accepted_sizes(name):
    spec = SCHEDULES[name]
    for n in ([2, 4] if spec.bidirectional else [1, 2, 3]):
        _check_program(name, n, spec.min_microbatches(n))


def test_fb_backward_is_a_full_backward_in_the_reference_schedules():
    # the reference never defers a W inside an overlapped pair
    for name in ("dualpipev", "dualpipe"):
        program = generate(name, 4, 12)
        assert all(a.backward.kind == "B" for acts in program.values() for a in acts if a.kind == "FB")


def test_model_part():
    p = generate("dualpipe", 4, 8)
    assert [p.model_part(s) for s in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert p.num_model_parts == 4 and p.chains == ((0, 1, 2, 3), (4, 5, 6, 7))
    v = generate("dualpipev", 3, 6)
    assert [v.model_part(s) for s in range(6)] == list(range(6)) and v.num_model_parts == 6
    with pytest.raises(ValueError, match="stage 6"):
        v.model_part(6)


# --- validate_program rejects broken programs (so the property checks can fail) ---

def _two_stage(actions):
    return Program(actions, chains=((0, 1),), num_microbatches=1)


@pytest.mark.parametrize("actions, message", [
    ({0: [F(0, 0), B(0, 0)], 1: [F(1, 0)]}, "stage 1 micro-batch 0"),                       # missing B1.0
    ({0: [F(0, 0), B(0, 0), B(0, 0)], 1: [F(1, 0), B(1, 0)]}, "appears twice"),             # duplicate
    ({0: [F(0, 0), I(0, 0)], 1: [F(1, 0), B(1, 0)]}, "W=0"),                                 # I without W
    ({0: [B(0, 0), F(0, 0)], 1: [F(1, 0), B(1, 0)]}, "B0.0 on rank 0 runs before F0.0"),     # own order
    ({0: [F(0, 0), W(0, 0), I(0, 0)], 1: [F(1, 0), B(1, 0)]}, "W0.0 on rank 0 runs before I0.0"),
    ({0: [F(0, 0), B(0, 0)], 1: [B(1, 0), F(1, 0)]}, "B1.0 on rank 1 runs before F1.0"),
    ({0: [F(0, 0), B(0, 0), F(1, 0)], 1: [B(1, 0)]}, "already runs on rank 0"),              # split stage
    ({0: [F(0, 0), B(0, 0)], 1: [F(1, 1), B(1, 0)]}, "micro-batch in 0..0"),
])
def test_validate_program_rejects(actions, message):
    with pytest.raises(ValueError, match=message):
        validate_program(_two_stage(actions))


def test_validate_program_finds_a_cross_rank_deadlock():
    # each rank's own order is fine, but rank 0 waits for B1.0 before it sends F0.1,
    # and rank 1 waits for F0.1 (its F1.1 comes first) before it runs B1.0
    actions = {0: [F(0, 0), B(0, 0), F(0, 1), B(0, 1)], 1: [F(1, 1), F(1, 0), B(1, 0), B(1, 1)]}
    program = Program(actions, chains=((0, 1),), num_microbatches=2)
    with pytest.raises(ValueError, match="deadlock: B0.0 on rank 0"):
        validate_program(program)


def test_validate_program_rejects_fb_overlapping_its_own_dependency():
    actions = {0: [FB(F(0, 0), B(0, 0))]}
    with pytest.raises(ValueError, match="its own dependency"):
        validate_program(Program(actions, chains=((0,),), num_microbatches=1))


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_swap_of_a_dependent_pair_is_caught(name):
    # move each rank's first backward to the front: it then runs before its own forward
    program = generate(name, 2, SCHEDULES[name].min_microbatches(2) + 2)
    acts = program[1]
    k = next(i for i, a in enumerate(acts) if a.kind != "F")
    acts.insert(0, acts.pop(k))
    with pytest.raises(ValueError):
        validate_program(program)
