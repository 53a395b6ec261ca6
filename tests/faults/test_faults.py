"""Fault injection: ranks that disagree, bad batches, failing steps, killed and stopped peers.

Each case asserts the exception type and the rank it names on every surviving rank, a bound
on the time, and that no process is left behind (the harness joins or kills every rank).
"""
from __future__ import annotations

import math
import multiprocessing as mp
import signal

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.faults import cases
from tests.runtime.dist_harness import pooled_pids, run_ranks, spawn_ranks


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
    for case, own, text in (("device_one_rank", "ValueError", "compile(device='meta')"),
                            ("trace_one_rank", "TraceError", "Python control flow"),
                            ("init_one_rank", "RuntimeError", "injected init failure in Linear")):
        failing, other = results[1][case], results[0][case]
        assert failing["type"] == own and text in failing["message"], (case, failing)
        assert other["type"] == "PeerFailedError" and other["rank"] == 1, (case, other)
        assert other["message"].startswith(f"rank 0: compile() stopped because rank 1 raised {own}: "), other
        assert text in other["message"], (case, other)
        assert failing["seconds"] < 15 and other["seconds"] < 15, (case, failing, other)  # no timeout waited
    for r in results:  # the group is still healthy: the next compile() and step run
        assert r["int_timeout"]["type"] is None, r["int_timeout"]
        assert r["bad_timeout"]["type"] == "TypeError" and "timedelta" in r["bad_timeout"]["message"]


def _same_step(a: dict, b: dict) -> None:
    assert a["loss"] == b["loss"], (a["loss"], b["loss"])
    assert a["grads"].keys() == b["grads"].keys()
    for name in a["grads"]:
        torch.testing.assert_close(a["grads"][name], b["grads"][name], rtol=0, atol=0)


def test_a_step_that_fails_on_one_rank_fails_on_every_rank_and_the_next_is_clean():
    results = run_ranks(cases.step_failures, 2, timeout=300)
    for rank, r in enumerate(results):
        bad = r["bad_batch_one_rank"]
        assert bad["type"] == "ValueError" and bad["message"].startswith("rank 1: step(): batch size 7"), bad
        assert "batch size 7" in bad["message"] and bad["rank"] == 1 and bad["seconds"] < 5, bad
        raised = r["backward_raises"]
        assert raised["type"] == "PipelineStepError" and raised["rank"] == 1, raised
        assert "rank 1 raised RuntimeError in action" in raised["message"], raised
        assert "injected failure in run_backward_input(1)" in raised["message"], raised
        assert raised["seconds"] < 10, raised
        assert r["grads_after_failure"] == {}, "a failed step leaves every grad None"
        assert r["sends_after_failure"] == 0, "a failed step leaves no send pending"
        wild = r["token_out_of_range"]
        assert wild["type"] == "PipelineStepError" and wild["rank"] == 0, wild
        assert "IndexError in action F0.2" in wild["message"], wild
        nan = r["nan_input"]
        assert nan["type"] is None and (nan["value"] is None) == (rank == 1), nan
        if rank == 0:
            assert math.isnan(nan["value"]), nan
        for after in ("after_bad_batch", "after_backward_raises", "after_nan"):
            _same_step(r["before"], r[after])  # no state of the failed step is left
        _same_step(r["tied_before"], r["tied_after"])
    assert results[0]["bad_batch_one_rank"]["message"] == results[1]["bad_batch_one_rank"]["message"]
    assert results[0]["backward_raises"]["message"] == results[1]["backward_raises"]["message"]


class _Branchy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: cannot be traced
            return self.lin(x)
        return x


def test_a_trace_failure_prints_only_our_message(capfd):
    from passes.capture import TraceError, capture
    with pytest.raises(TraceError, match="Python control flow at .*test_faults.py"):
        capture(_Branchy(), lambda out, t: (out - t).sum(), (torch.randn(2, 4),), torch.randn(2, 4))
    _, err = capfd.readouterr()
    assert "def forward" not in err and "Unable to find user code" not in err, err


def test_a_loss_that_needs_a_target_without_example_target_says_so():
    from passes.capture import capture
    with pytest.raises(ValueError, match=r"example_target=None, but loss_fn mse_loss.*pass example_target="):
        capture(torch.nn.Linear(4, 4), torch.nn.functional.mse_loss, (torch.randn(2, 4),))


def test_a_wrong_dtype_at_step_names_the_dtype_not_the_shape():
    from dualpipe_fx.runtime.errors import check_batch
    example = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"has dtype torch.int32, but .* traced for torch.int64 \(its shape is right\)"):
        check_batch("inputs[0]", torch.zeros(8, 3, dtype=torch.int32), example, 4, torch.device("cpu"))


def test_torch_runtime_error_dump_becomes_one_line(capfd, caplog):
    import logging

    from dualpipe_fx.runtime.pipeline import _one_line_errors
    torch_log = logging.getLogger("torch.distributed.pipelining.schedules")
    with caplog.at_level(logging.ERROR, logger="dualpipe_fx.runtime.pipeline"), _one_line_errors(1):
        torch_log.error("_PipelineScheduleRuntime caught exception at step %s when running action %s.  "
                        "Full Schedule:", 7, "1F3")
        torch_log.error("Full Schedule table\n" + "row\n" * 40)
    _, err = capfd.readouterr()
    assert "Full Schedule" not in err, err
    ours = [r.getMessage() for r in caplog.records if r.name == "dualpipe_fx.runtime.pipeline"]
    assert ours == ["rank 1: the step stopped at action 1F3 (time step 7)"], ours


def _check_lost_peer(outcomes, victim: int, signal_name: str, timeout_s: float) -> None:
    left = [p for p in mp.active_children() if p.pid not in pooled_pids()]  # the pools live on purpose
    assert not left, f"a rank process was left behind: {left}"
    assert outcomes[victim].exitcode == -signal.SIGKILL, outcomes[victim]  # killed (itself, or by a survivor)
    for o in outcomes:
        if o.rank == victim:
            continue
        assert o.error is None, o.error
        step, nxt = o.result["step"], o.result["next"]
        assert step["type"] == "PeerTimeoutError" and step["rank"] == o.rank, step
        if signal_name == "SIGKILL":  # told apart from a timeout, and fast: no timeout waited out
            assert o.result["reason"] == "closed" and step["seconds"] < timeout_s / 2, (o.rank, step)
        else:  # a neighbour of the stopped rank waits its timeout; the rest learn of the abort
            assert step["seconds"] < timeout_s + 10, (o.rank, step)
        assert nxt["type"] == "PipelineBrokenError" and "torchrun --max-restarts" in nxt["message"], nxt
        assert nxt["seconds"] < 1, nxt


def _killed_at_a_drawn_action(world: int, data) -> None:
    victim = data.draw(st.integers(0, world - 1), label="victim")
    index = data.draw(st.integers(0, cases.compute_actions(world) - 1), label="action index")
    timeout_s = 30.0
    outcomes = spawn_ranks(cases.lost_peer, world, (victim, index, "SIGKILL", timeout_s), timeout=240)
    _check_lost_peer(outcomes, victim, "SIGKILL", timeout_s)


# each example spawns and compiles on every rank (~10 s for 2 ranks, ~40 s for 4 on 2 CPUs)
@settings(max_examples=2, deadline=None, derandomize=True)
@given(data=st.data())
def test_a_rank_killed_at_any_action_makes_every_survivor_raise_2_ranks(data):
    _killed_at_a_drawn_action(2, data)


@settings(max_examples=1, deadline=None, derandomize=True)
@given(data=st.data())
def test_a_rank_killed_at_any_action_makes_every_survivor_raise_4_ranks(data):
    _killed_at_a_drawn_action(4, data)


def test_a_stopped_rank_makes_every_survivor_raise_after_the_timeout():
    timeout_s = 3.0
    outcomes = spawn_ranks(cases.lost_peer, 2, (1, 3, "SIGSTOP", timeout_s), timeout=240)
    _check_lost_peer(outcomes, 1, "SIGSTOP", timeout_s)
    step = outcomes[0].result["step"]
    assert outcomes[0].result["reason"] == "timeout" and step["seconds"] >= timeout_s, step
    assert "timeout 3s" in step["message"] and "rank 1" in step["message"], step
