"""The handlers torch's runtime calls for this rank's compute actions, with timed waits.

**Contract**: ``Executor(stages, timeout).register(schedule)`` registers a handler for
FORWARD, BACKWARD_INPUT, FULL_BACKWARD, BACKWARD_WEIGHT, OVERLAP_F_B and REDUCE_GRAD on
a ``_PipelineScheduleRuntime`` (with ``data_parallel`` set, its UNSHARD, RESHARD and
REDUCE_GRAD handlers); torch runs the SEND/RECV actions itself (the stages issue the sends
and keep their works). Every handler first waits (with ``timeout``) for the receives its
action needs, then computes, then waits for the sends whose release point it is
(``schedule.send_release``, from ``schedules.release``) and drops them with their tensors.

**Pseudocode**
    handler(action): wait for the recv of each part (PeerTimeoutError names the peer)
                     record start; run the graphs; hand outputs to a same-rank stage
                     record end (when profiling)
                     wait for the sends released here (issued earlier; their receives are posted)

When an action raises, the handler keeps the error (``failure``) and every later action of
the step on this rank runs as a stand-in: no compute, zeros sent where a peer waits, and
the receives still waited for, so the peers finish the step and P2P stays matched; the
pipeline then makes every rank raise it (``Pipeline.step``).

If OVERLAP_F_B had no handler, torch would run its parts through its own F/B code and
bypass these handlers, so every compute kind is registered together.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Optional

from dualpipe_fx import _compat
from dualpipe_fx.runtime.clock import HostClock
from dualpipe_fx.runtime.errors import PeerTimeoutError
from dualpipe_fx.runtime.stage import GraphStage
from dualpipe_fx.runtime.sync import wait
from dualpipe_fx.schedules import ir


@dataclass(frozen=True)
class Record:
    """One measured interval: a compute action, or a wait for a peer before one."""

    action: ir.Action
    start: Any  # marks of Executor.clock (runtime.clock): seconds on the host clock, CUDA events
    end: Any
    wait_for: Optional[int] = None  # the peer rank waited for; None for compute


def run_pair_sequentially(executor: "Executor", forward: ir.Action, backward: ir.Action) -> None:
    """An F&B pair as F then B (or I): the default overlap, until a multiplexed graph replaces it."""
    executor.forward(forward.stage, forward.microbatch)
    executor.backward(backward)


class Executor:
    """Runs this rank's compute actions on its ``GraphStage``s.

    ``overlap(executor, forward, backward)`` runs an F&B pair; replace it with a
    multiplexed graph's runner to overlap the two. ``records`` is a list while
    profiling (``None`` otherwise), ``forward_only`` skips keeping backward state.
    """

    def __init__(self, stages: dict[int, GraphStage], rank: int, timeout: timedelta) -> None:
        self.stages = stages
        self.rank = rank
        self.timeout = timeout
        self.overlap: Callable[["Executor", ir.Action, ir.Action], None] = run_pair_sequentially
        self.records: Optional[list[Record]] = None
        self.clock = HostClock()  # what records' marks come from (runtime.clock): CUDA events on a GPU
        self.forward_only = False
        self.failure: Optional[tuple[ir.Action, Exception]] = None  # this step's first error
        # runtime.data_parallel.DataParallel, or None: runs UNSHARD/RESHARD/REDUCE_GRAD, and
        # each compute action first waits (ready) for its stage's parameters
        self.data_parallel = None

    def register(self, schedule) -> None:
        ct = _compat.TorchComputationType
        for kind, handler in ((ct.FORWARD, self._on_single), (ct.BACKWARD_INPUT, self._on_single),
                              (ct.FULL_BACKWARD, self._on_single), (ct.BACKWARD_WEIGHT, self._on_single),
                              (ct.OVERLAP_F_B, self._on_pair)):
            schedule.register_custom_function(kind, handler)
        if self.data_parallel is not None:
            self.data_parallel.register(schedule)
        else:
            schedule.register_custom_function(ct.REDUCE_GRAD, _no_op)

    # -- compute, shared by the handlers and by overlap runners ---------------------

    def forward(self, stage_index: int, mb: int) -> None:
        stage = self.stages[stage_index]
        stage.run_forward(mb, keep_saved=not self.forward_only)
        nxt = stage.place.next_stage
        if nxt in self.stages:  # V placement: hand the activations over, no send
            self.stages[nxt].set_inputs(mb, stage.take_outputs(mb))

    def backward(self, action: ir.Action) -> None:
        """A B (I then W) or an I of ``action.stage``."""
        stage = self.stages[action.stage]
        stage.run_backward_input(action.microbatch)
        prev = stage.place.prev_stage
        if prev in self.stages:
            self.stages[prev].set_grad_outputs(action.microbatch, stage.take_grad_inputs(action.microbatch))
        if action.kind == "B":
            stage.run_backward_weight(action.microbatch)

    def _run(self, action: ir.Action) -> None:
        if action.kind == "F":
            self.forward(action.stage, action.microbatch)
        elif action.kind == "W":
            self.stages[action.stage].run_backward_weight(action.microbatch)
        else:
            self.backward(action)

    # -- handlers --------------------------------------------------------------------

    def _on_single(self, torch_action, ctx) -> None:
        action = _to_ir(torch_action)
        self._wait_inputs(ctx.schedule_ref, action)
        if self.data_parallel is not None:
            self.data_parallel.ready(action.stage)
        if not self._attempt(action, self._run, action):
            self._stand_in(action)
        self._release_sends(ctx.schedule_ref, torch_action)

    def _on_pair(self, torch_action, ctx) -> None:
        forward, backward = (_to_ir(a) for a in torch_action.sub_actions)
        self._wait_inputs(ctx.schedule_ref, forward)
        self._wait_inputs(ctx.schedule_ref, backward)
        if self.data_parallel is not None:
            self.data_parallel.ready(forward.stage)
            self.data_parallel.ready(backward.stage)
        if not self._attempt(ir.FB(forward, backward), self.overlap, self, forward, backward):
            self._stand_in(forward)
            self._stand_in(backward)
        self._release_sends(ctx.schedule_ref, torch_action)

    def _release_sends(self, schedule, torch_action) -> None:
        """Wait for (and drop) the sends released after ``torch_action``: after its compute, so
        that a transfer still running overlaps one more action (``schedules.release``)."""
        for stage, kind, mb in getattr(schedule, "send_release", {}).get(torch_action, ()):
            self.stages[stage].wait_sends(kind, mb, self.timeout)

    def _attempt(self, action: ir.Action, fn, *args) -> bool:
        """Run ``fn`` unless the step already failed here; False (error kept) when it did or does."""
        if self.failure is not None:
            return False
        try:
            self._timed(action, fn, *args)
            return True
        except PeerTimeoutError:
            raise
        except Exception as err:  # noqa: BLE001 - kept, and raised on every rank after the step
            self.failure = (action, err)
            return False

    def _stand_in(self, action: ir.Action) -> None:
        """The action of a failed step: its state dropped, zeros where a peer or a local stage waits."""
        stage = self.stages[action.stage]
        mb = action.microbatch
        if action.kind == "F":
            stage.stand_in_forward(mb)
            if stage.place.next_stage in self.stages:
                self.stages[stage.place.next_stage].set_inputs(mb, stage.take_outputs(mb))
        elif action.kind in ("B", "I"):
            stage.stand_in_backward(mb, weight=action.kind == "B")
            if stage.place.prev_stage in self.stages:
                self.stages[stage.place.prev_stage].set_grad_outputs(mb, stage.take_grad_inputs(mb))
        else:
            stage._saved_w.pop(mb, None)

    def _timed(self, action: ir.Action, fn, *args) -> None:
        if self.records is None:
            fn(*args)
            return
        start = self.clock.mark()
        fn(*args)
        self.records.append(Record(action, start, self.clock.mark()))

    def _wait_inputs(self, schedule, action: ir.Action) -> None:
        """Wait for the receive ``action`` needs (none when its peer stage is local or absent)."""
        stage = self.stages[action.stage]
        key = (action.stage, action.microbatch)
        if action.kind == "F":
            works, peer, what = schedule.fwd_recv_ops.pop(key, None), stage.place.prev_rank, "activations"
        elif action.kind in ("B", "I"):
            works, peer, what = schedule.bwd_recv_ops.pop(key, None), stage.place.next_rank, "gradients"
        else:
            return
        if not works:
            return
        start = self.clock.mark() if self.records is not None else None
        for work in works:
            try:
                wait(work, self.timeout, stage.device)
            except RuntimeError as err:
                raise PeerTimeoutError(self.rank, peer, f"the {what} for {action}", self.timeout, err) from err
        if self.records is not None:
            self.records.append(Record(action, start, self.clock.mark(), wait_for=peer))


def _no_op(action, ctx) -> None:
    """REDUCE_GRAD: grads are already unscaled sums (the loss seed is 1/C), nothing to do."""


def _to_ir(torch_action) -> ir.Action:
    kind = torch_action.computation_type.value  # "F", "B", "I" or "W"
    return ir.Action(kind, torch_action.stage_index, torch_action.microbatch_index)
