"""User errors raise a clear ValueError before any communication; dead or hung peers time out."""
from __future__ import annotations

import torch

from tests.runtime import cases
from tests.runtime.dist_harness import run_ranks, spawn_ranks
from tests.runtime.test_equivalence import reference


def test_step_errors_name_the_value_and_leave_the_pipeline_usable():
    results = run_ranks(cases.step_errors, 2, timeout=400)
    for rank, r in enumerate(results):
        errors = r["errors"]
        assert errors["indivisible"].startswith("ValueError") and "batch size 7" in errors["indivisible"]
        assert "num_microbatches=4" in errors["indivisible"], errors["indivisible"]
        assert errors["shape"].startswith("ValueError") and "batch size 10" in errors["shape"], errors["shape"]
        # a new width is a new shape: its program's trace fails, on every rank, naming the shapes
        assert errors["width"].startswith("ValueError") and "[2, 9]" in errors["width"], errors["width"]
        assert errors["device"].startswith("ValueError") and "meta" in errors["device"], errors["device"]
        assert errors["no_target"].startswith("ValueError") and "target" in errors["no_target"]
        few = errors["few_microbatches"]
        assert few.startswith("ValueError") and "num_microbatches=2" in few, few
    # no rank started communicating on a bad call: the next good step is still exact
    ref_loss, ref_grads, _ = reference("linear", 4)
    assert results[0]["loss"] == ref_loss or abs(results[0]["loss"] - ref_loss) <= 1e-6 * abs(ref_loss)
    for r in results:
        for name, grad in r["grads"].items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-6)


def test_world_size_that_does_not_fit_the_schedule():
    (message,) = run_ranks(cases.world_size_error, 1, timeout=200)
    assert message.startswith("ValueError") and "'dualpipe'" in message and "1 rank" in message, message


def test_dead_peer_makes_the_survivor_raise_naming_it():
    outcomes = spawn_ranks(cases.dead_or_hung_peer, 2, ("exit", 20.0), timeout=300)
    assert outcomes[1].exitcode == 3, outcomes[1]
    r = outcomes[0].result
    assert outcomes[0].error is None and r is not None, outcomes[0].error
    assert r["type"] == "PeerTimeoutError" and r["peer"] == 1 and "rank 1" in r["error"], r


def test_hung_peer_makes_the_survivor_raise_after_the_timeout():
    outcomes = spawn_ranks(cases.dead_or_hung_peer, 2, ("hang", 3.0), timeout=300)
    r = outcomes[0].result
    assert outcomes[0].error is None and r is not None, outcomes[0].error
    assert r["type"] == "PeerTimeoutError" and r["peer"] == 1 and "timeout 3s" in r["error"], r
    assert r["seconds"] >= 3.0  # it waited the configured timeout, not the process group's
