"""No transient copies of grads: every weight grad is summed into the parameter's ``.grad`` in
place, from W, B and the F&B pairs, on a step's first micro-batch too.

What it rebuilds: a 2-rank dualpipev step of a stack of 64 x 64 linears (a weight grad is
64x larger than any activation), with the F&B pairs overlapped and run one after the other,
and of a small llama (an embedding, whose grad is summed row by row), from no grads and from
grads zeroed in place. The CPU allocator's events (profiler,
``profile_memory=True``) show each weight grad allocated once, inside the first action that
makes that stage's weight grads, and nothing grad-sized after it; with grads present, nothing
grad-sized at all. The loss and grads equal one process. The same holds on 2 pipeline x 2
data-parallel ranks under each ``dp_mode``.
"""
from __future__ import annotations

import pytest

from tests.runtime import cases
from tests.runtime.dist_harness import run_ranks
from tests.runtime.test_equivalence import check_step

SETTINGS = (("overlap", "wide", {}), ("sequential", "wide", {"overlap": False}),
            ("llama", "llama", {}))  # llama: an embedding, RMSNorm scales; its pairs overlapped


def _first_weight_actions(order, stages):
    """Each stage's first action that makes weight grads: W, B, or an F&B pair whose backward is a B."""
    first = {}
    for action in order:
        for part in action.split("&"):
            kind, stage = part[0], int(part[1:].split(".")[0])
            if kind in "WB" and stage in stages:
                first.setdefault(stage, action)
    return first


def _check(results, settings, dp=False):
    """Each weight grad allocated once, in its stage's first weight-grad action; nothing as large
    after it (llama: its smallest weight, 16 x 16, is larger than any of its activations); with
    grads zeroed in place, nothing as large at all. Data parallel: only the compute actions'
    allocations of a weight grad's size, and a step always starts without grads (the earlier
    ones are set aside)."""
    for name, kind, _ in settings:
        for step in () if dp else ("fresh", "zeroed"):
            check_step([{"dualpipev": r[name]["steps"][step]} for r in results], kind, "dualpipev", 4)
        for rank, r in enumerate(results):
            steps = r[name]["steps"]
            if dp:
                sizes = set(r[name]["weights"])  # not the flat buffers the modes gather parameters into
                steps = {k: {**v, "big": [(b, w) for b, w in v["big"] if w and b in sizes]} for k, v in steps.items()}
            first = _first_weight_actions(steps["fresh"]["order"], r[name]["stages"])
            assert sorted(first) == r[name]["stages"], (name, rank, steps["fresh"]["order"])
            for step in ("fresh", "zeroed") if dp else ("fresh",):
                big = steps[step]["big"]
                assert sorted(b for b, _ in big) == r[name]["weights"], (name, rank, step, big)
                for nbytes, where in big:
                    assert len(where) == 1 and where[0] in first.values(), (name, rank, nbytes, where, first)
            if not dp:
                assert steps["zeroed"]["big"] == [], (name, rank, steps["zeroed"]["big"])


@pytest.mark.timeout(300)
def test_weight_grads_are_allocated_once_and_summed_in_place_after():
    _check(run_ranks(cases.grad_allocations, 2, (SETTINGS,), timeout=240), SETTINGS)


DP_SETTINGS = tuple((mode, "wide", {"dp_mode": mode}) for mode in ("replicate", "shard", "shard_grad_op"))


@pytest.mark.timeout(300)
def test_under_every_data_parallel_mode_the_grads_are_summed_in_place_too():
    """2 pipeline ranks x 2 replicas: inside the compute actions, each stage's weight grads are
    allocated once, in its first weight-grad action (the modes' reductions and gathers, which
    run in their own actions, are test_data_parallel's; it also checks the numerics)."""
    _check(run_ranks(cases.grad_allocations, 4, (DP_SETTINGS,), timeout=240), DP_SETTINGS, dp=True)
