"""runtime.clock: the profile's timing source, the host clock on CPU and CUDA events on a GPU.

A profiled step's busy/overhead/bubble split reads whatever clock the profile was given:
with a clock whose every mark is one tick later, a one-rank DualPipeV step (every action
local, no wait) measures each action as one tick of busy time and one tick of overhead
before it. The CUDA side is checked on a GPU only (skipped here with the reason).
"""
from __future__ import annotations

import pytest
import torch

from dualpipe_fx.runtime.clock import CudaEventClock, HostClock, clock_for
from tests.runtime.dist_harness import run_ranks


class TickClock:
    """Each mark is one second after the previous one: a clock a test can predict."""

    def __init__(self) -> None:
        self.ticks = 0

    def begin(self) -> None:
        self.ticks = 0

    def mark(self) -> int:
        self.ticks += 1
        return self.ticks

    def finish(self) -> None:
        pass

    def seconds(self, mark: int) -> float:
        return float(mark)


def test_the_source_follows_the_pipeline_device():
    assert isinstance(clock_for(torch.device("cpu")), HostClock)
    assert isinstance(clock_for(None), HostClock)
    assert isinstance(clock_for("cuda:0"), CudaEventClock)  # built, not used: no CUDA call yet


def test_host_marks_are_seconds_from_begin():
    clock = HostClock()
    clock.begin()
    a = clock.mark()
    torch.ones(256, 256) @ torch.ones(256, 256)
    b = clock.mark()
    clock.finish()
    assert 0.0 <= clock.seconds(a) <= clock.seconds(b)
    assert clock.seconds(b) - clock.seconds(a) == pytest.approx(b - a)


def profile_with_clocks(rank, world):
    """A one-rank DualPipeV pipeline profiled on the tick clock and on its default clock."""
    from dualpipe_fx.runtime.profile import profile_pipeline
    from tests.runtime.cases import _compile

    pipe, x, y = _compile("linear", "dualpipev", 4)
    ticks = profile_pipeline(pipe, (x,), y, steps=2, clock=TickClock())
    host = profile_pipeline(pipe, (x,), y, steps=1)
    assert pipe._executor.clock.__class__ is HostClock  # restored after profiling
    actions = sum(len(a) for a in pipe.program.values())
    return {"ticks": (ticks.clock, ticks.busy, ticks.overhead, ticks.makespan, actions),
            "host": (host.clock, host.busy, host.overhead, host.bubble_ratio_per_rank, host.makespan)}


def test_the_profile_split_reads_the_chosen_clock():
    (out,) = run_ranks(profile_with_clocks, 1, timeout=240)
    name, busy, overhead, makespan, actions = out["ticks"]
    assert name == "TickClock"
    assert busy == {0: actions} and overhead == {0: actions}  # each action: a tick's gap, a tick's work
    assert makespan == 2 * actions
    name, busy, overhead, bubble, makespan = out["host"]
    assert name == "HostClock"
    assert 0 < busy[0] <= makespan and overhead[0] >= 0
    assert busy[0] + overhead[0] + bubble[0] * makespan == pytest.approx(makespan)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA events need a CUDA device (none here)")
def test_cuda_events_time_the_gpu_work_not_its_launch():
    clock = clock_for("cuda")
    clock.begin()
    a = clock.mark()
    torch.cuda._sleep(50_000_000)  # ~tens of ms of GPU work, launched in microseconds
    b = clock.mark()
    clock.finish()
    assert clock.seconds(b) - clock.seconds(a) > 1e-3
