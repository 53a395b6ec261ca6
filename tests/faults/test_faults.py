"""Fault injection: ranks that disagree, bad batches, failing steps, killed and stopped peers.

Each case asserts the exception type and the rank it names on every surviving rank, a bound
on the time, and that no process is left behind (the harness joins or kills every rank).
"""
from __future__ import annotations

from tests.faults import cases
from tests.runtime.dist_harness import run_ranks


def test_ranks_that_disagree_raise_the_same_value_error_on_every_rank():
    results = run_ranks(cases.disagreements, 2, timeout=300)
    for case, field in (("seed", "parameter checksums"), ("num_microbatches", "num_microbatches"),
                        ("schedule", "schedule"), ("example_shape", "examples")):
        got = [r[case] for r in results]
        assert [g["type"] for g in got] == ["ValueError"] * 2, (case, got)
        assert got[0]["message"] == got[1]["message"], (case, got)
        message = got[0]["message"]
        assert f"disagree on {field}" in message and "rank 0" in message and "rank 1" in message, message
        assert all(g["seconds"] < 15 for g in got), (case, got)  # no timeout waited out
    assert "rank 0 has 4; rank 1 has 8" in results[0]["num_microbatches"]["message"]
    assert "'dualpipev'" in results[0]["schedule"]["message"] and "'1f1b'" in results[0]["schedule"]["message"]
    for r in results:
        assert r["int_timeout"]["type"] is None, r["int_timeout"]
        assert r["bad_timeout"]["type"] == "TypeError" and "timedelta" in r["bad_timeout"]["message"]
