"""No transient copies of grads: every weight grad is summed into the parameter's ``.grad`` in
place, from W, B and the F&B pairs, on a step's first micro-batch too.

What it rebuilds: a 2-rank dualpipev step of a stack of 64 x 64 linears (a weight grad is
64x larger than any activation), with the F&B pairs overlapped and run one after the other,
and of a small llama (an embedding, whose grad is summed row by row), from no grads and from
grads zeroed in place. The CPU allocator's events (profiler,
``profile_memory=True``) show each weight grad allocated once, inside the first action that
makes that stage's weight grads, and nothing grad-sized after it; with grads present, nothing
grad-sized at all. The loss and grads equal one process.
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


@pytest.mark.timeout(300)
def test_weight_grads_are_allocated_once_and_summed_in_place_after():
    results = run_ranks(cases.grad_allocations, 2, (SETTINGS,), timeout=240)
    for name, kind, _ in SETTINGS:
        for step in ("fresh", "zeroed"):
            check_step([{"dualpipev": r[name]["steps"][step]} for r in results], kind, "dualpipev", 4)
        for rank, r in enumerate(results):
            fresh, zeroed = r[name]["steps"]["fresh"], r[name]["steps"]["zeroed"]
            first = _first_weight_actions(fresh["order"], r[name]["stages"])
            assert sorted(first) == r[name]["stages"], (name, rank, fresh["order"])
            # each weight grad once, in its stage's first weight-grad action; nothing as large after
            # (llama: its smallest weight, 16 x 16, is larger than any of its activations)
            assert sorted(b for b, _ in fresh["big"]) == r[name]["weights"], (name, rank, fresh["big"])
            for nbytes, where in fresh["big"]:
                assert len(where) == 1 and where[0] in first.values(), (name, rank, nbytes, where, first)
            assert zeroed["big"] == [], (name, rank, zeroed["big"])
