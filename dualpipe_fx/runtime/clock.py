"""Where a profiled step's times come from: the host clock on CPU, CUDA events on a GPU.

**Contract**: ``clock_for(device) -> HostClock | CudaEventClock``. Per step:
``clock.begin()``, then any number of ``m = clock.mark()`` (a point in the step, opaque),
then ``clock.finish()`` once; after that ``clock.seconds(m)`` is ``m``'s time in seconds
from ``begin()``. The executor and the stages take marks; ``runtime.profile`` resolves them.

**Pseudocode**
    HostClock:      mark = time.perf_counter(); seconds(m) = m - t0
    CudaEventClock: mark = an event recorded on the current stream (no host wait);
                    finish = one synchronize; seconds(m) = t0.elapsed_time(m) / 1000

Why two: CUDA kernels run after the host launched them, so a host stamp around an action
measures its launch, not its work; an event recorded on the stream the action ran on
completes when the work before it did. A wait on NCCL only orders streams, so a wait's
events measure when its data arrived on the GPU, as gloo's host wait does on CPU.
"""
from __future__ import annotations

import time
from typing import Any, Union

import torch


class HostClock:
    """Marks are ``time.perf_counter()`` readings (seconds); nothing to resolve."""

    def __init__(self) -> None:
        self._t0 = 0.0

    def begin(self) -> None:
        self._t0 = time.perf_counter()

    def mark(self) -> float:
        return time.perf_counter()

    def finish(self) -> None:
        """Nothing to wait for: CPU work is done when the call that did it returns."""

    def seconds(self, mark: float) -> float:
        return mark - self._t0


class CudaEventClock:
    """Marks are ``torch.cuda.Event(enable_timing=True)`` recorded on ``device``'s current
    stream; ``finish()`` is the step's one host synchronize, after which they resolve."""

    def __init__(self, device: Union[str, torch.device]) -> None:
        self.device = torch.device(device)
        self._t0: Any = None

    def begin(self) -> None:
        self._t0 = self.mark()

    def mark(self) -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def finish(self) -> None:
        torch.cuda.synchronize(self.device)

    def seconds(self, mark: Any) -> float:
        return self._t0.elapsed_time(mark) / 1e3  # elapsed_time is in ms


def clock_for(device: Union[str, torch.device, None]) -> Union[HostClock, CudaEventClock]:
    """The timing source for a pipeline on ``device``: CUDA events on a CUDA device, else the host clock."""
    if device is not None and torch.device(device).type == "cuda":
        return CudaEventClock(device)
    return HostClock()
