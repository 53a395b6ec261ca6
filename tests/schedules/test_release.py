"""Sends' release points (``schedules.release``): safe in every interleaving, and the earliest.

For drawn schedules, rank counts, micro-batch counts and receive look-aheads, on the orders
the runtime runs:

- each send's release point comes after its send, and its matching receive is posted before
  it in happens-before: the receive's position on the peer reaches the release point in the
  graph of program order plus message edges (a send's producing action to the compute
  action that completes its receive), searched here directly, not with the module's clocks;
- no earlier compute action after the send has that property (None: none at all, the
  step's end);
- a step run as the runtime runs it (receives posted at RECV, completed before the reading
  action; sends issued at SEND or, early, inside their producing action; the released sends
  waited for after their action, blocking until the peer posted the receive, as gloo's do)
  finishes in every interleaving drawn, with or without early sends.
"""
from __future__ import annotations

from collections import deque

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dualpipe_fx.schedules.lowering import add_comms, hoist_receives, to_torch_actions
from dualpipe_fx.schedules.registry import SCHEDULES, generate
from dualpipe_fx.schedules.lowering import COMPUTE_KINDS
from dualpipe_fx.schedules.release import _Rank, _kind, _peer, send_release_points


def _orders(name: str, n: int, c: int, lookahead: int):
    try:
        program = generate(name, n, c)
    except ValueError:
        assume(False)
    orders = add_comms(to_torch_actions(program), program)
    return program, {r: hoist_receives(o, lookahead) if lookahead else o for r, o in orders.items()}


programs = st.tuples(st.sampled_from(sorted(SCHEDULES)), st.integers(1, 4), st.integers(1, 9),
                     st.sampled_from([0, 2]))


def _edges(program, orders):
    """Happens-before successors of each event ``(rank, index)``: the next action on the rank,
    and for a send, the compute action that completes its receive."""
    ranks = {r: _Rank(o, program) for r, o in orders.items()}
    out = {(r, j): [(r, j + 1)] if j + 1 < len(o) else [] for r, o in orders.items() for j in range(len(o))}
    for a, rk in ranks.items():
        for j, action in enumerate(rk.order):
            for key in rk.received(action):
                q = next(q for q, other in ranks.items() if key in other.sends)
                out[(q, ranks[q].issued_at(key))].append((a, j))
    return ranks, out


def _reach(edges, start) -> set:
    seen, todo = {start}, deque([start])
    while todo:
        for nxt in edges[todo.popleft()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs)
def test_each_release_point_is_the_first_action_that_knows_the_receive_is_posted(drawn):
    name, n, c, lookahead = drawn
    program, orders = _orders(name, n, c, lookahead)
    points = send_release_points(orders, program)
    ranks, edges = _edges(program, orders)
    for a, rk in ranks.items():
        assert set(points[a]) == set(rk.sends)
        for key, j in points[a].items():
            recv = _peer(program, key)
            b = next(q for q, other in ranks.items() if recv in other.posted)
            known = _reach(edges, (b, ranks[b].posted[recv]))
            later = [i for i in range(rk.sends[key] + 1, len(rk.order)) if _kind(rk.order[i]) in COMPUTE_KINDS]
            first = next((i for i in later if (a, i) in known), None)
            assert j == first, (name, n, c, lookahead, a, key, j, first)


def _run(program, orders, points, early: bool, pick) -> None:
    """One interleaving of the step (see the module docstring); fails on a deadlock."""
    ranks = {r: _Rank(o, program) for r, o in orders.items()}
    release = {(a, j): [k for k, i in pts.items() if i == j] for a, pts in points.items() for j in set(pts.values())}
    at = dict.fromkeys(ranks, 0)
    posted, issued = set(), set()

    def step(r) -> bool:
        """Run rank r's next action if it can go on now; whether it did."""
        rk, j = ranks[r], at[r]
        action = rk.order[j]
        kind = _kind(action)
        if kind in ("RECV_F", "RECV_B"):
            posted.add((kind[-1], action.stage_index, action.microbatch_index))
        elif kind in ("SEND_F", "SEND_B"):
            issued.add((kind[-1], action.stage_index, action.microbatch_index))
        elif kind in COMPUTE_KINDS:
            if not all(k in issued for k in rk.received(action)):
                return False  # its input has not been sent yet
            if early:  # an F&B pair's (or any action's) sends start inside it
                issued.update(k for k in rk.sends if rk.issued_at(k) == j)
            if not all(_peer(program, k) in posted for k in release.get((r, j), ())):
                return False  # a gloo send's wait blocks until the receive is posted
        at[r] += 1
        return True

    while any(at[r] < len(ranks[r].order) for r in ranks):
        movable = [r for r in ranks if at[r] < len(ranks[r].order)]
        start = pick(len(movable))
        assert any(step(movable[(start + i) % len(movable)]) for i in range(len(movable))), \
            f"deadlock at {at}"
    # the step's end: every remaining send waits for a receive that is posted by now
    assert all(_peer(program, k) in posted for pts in points.values() for k in pts)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs, st.booleans(), st.randoms(use_true_random=False))
def test_a_step_waiting_at_the_release_points_never_deadlocks(drawn, early, rng):
    name, n, c, lookahead = drawn
    program, orders = _orders(name, n, c, lookahead)
    points = send_release_points(orders, program)
    _run(program, orders, points, early, lambda k: rng.randrange(k))


def test_the_run_model_catches_a_wait_before_the_receive_can_be_posted():
    """The model of a step deadlocks where a rank waits for a send before its peer can post
    the receive: rank 0 of 1F1B waiting for its first send before its first forward ends
    its warm-up waits for rank 1, which waits for that very activation."""
    program, orders = _orders("1f1b", 2, 4, 0)
    rank0 = _Rank(orders[0], program)
    first_f = rank0.made[("F", 0, 0)]
    blocking = {0: {("F", 0, 1): first_f}, 1: {}}  # F0.1's send, waited for at F0.0: not issued yet
    with pytest.raises(AssertionError, match="deadlock|posted"):
        _run(program, orders, blocking, False, lambda k: 0)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_most_sends_are_released_before_the_step_ends(name):
    program, orders = _orders(name, 4, 8, 2)
    points = send_release_points(orders, program)
    released = [j for pts in points.values() for j in pts.values()]
    assert sum(j is not None for j in released) > len(released) / 2, (name, released)
