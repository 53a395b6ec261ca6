"""Give torch's runtime a program: compute actions plus the sends and receives between ranks.

**Contract**: ``load_program(schedule, program)``: ``schedule.pipeline_order_with_comms``
holds every rank's torch ``_Action`` list with SEND_F/RECV_F/SEND_B/RECV_B in place.

**Pseudocode**
    actions = to_torch_actions(program)                        # compute only
    one chain 0..S-1 -> torch's own lowering (_prepare_schedule_with_comms)
    several chains   -> add_send_recv_chains(actions, program)  # torch's algorithm, chain-aware
    send_release = {compute action: sends waited for after it}   # schedules.release
(the send/recv placement and the sends' release points are pure and live in
``schedules.lowering`` and ``schedules.release``, which the memory plan shares)
"""
from __future__ import annotations

from dualpipe_fx import _compat
from dualpipe_fx.schedules.ir import Program
from dualpipe_fx.schedules.lowering import add_comms, add_send_recv_chains, hoist_receives, is_single_chain, to_torch_actions
from dualpipe_fx.schedules.release import send_release_points


def forward_only(program: Program) -> Program:
    """The program's forwards alone, in the same order (F&B pairs keep their F)."""
    actions = {r: [p for a in acts for p in a.parts() if p.kind == "F"] for r, acts in program.items()}
    return Program(actions, chains=program.chains, num_microbatches=program.num_microbatches,
                   name=f"{program.name} (forward only)", model_parts=program.model_parts)


def add_data_parallel(actions: dict, program: Program, forwards_only: bool) -> dict:
    """Each rank's compute actions with UNSHARD/RESHARD around each stage's use and (training)
    REDUCE_GRAD after its last W or B: torch's own passes, which its lowering applies to
    single-chain programs only."""
    out = {r: _compat.add_unshard_reshard(a) for r, a in actions.items()}
    if not forwards_only:
        out = {r: _compat.add_reduce_grad(a, program.num_microbatches) for r, a in out.items()}
    return out


def load_program(schedule, program: Program, forwards_only: bool = False, recv_lookahead: int = 0,
                 data_parallel: bool = False) -> None:
    """Lower ``program`` with communication into ``schedule`` (a _PipelineScheduleRuntime).

    ``forwards_only`` programs skip torch's validation, which insists on one backward per
    forward, and go straight to the same send/recv lowering. ``recv_lookahead > 0``
    posts every receive that many compute actions earlier (``hoist_receives``; gloo only).
    ``data_parallel``: every program gets UNSHARD/RESHARD/REDUCE_GRAD (torch's lowering adds
    them to single-chain training programs anyway; then they are no-ops without data parallelism).
    """
    actions = to_torch_actions(program)
    if data_parallel and (forwards_only or not is_single_chain(program)):
        actions = add_data_parallel(actions, program, forwards_only)
    if forwards_only:
        schedule.stage_index_to_group_rank = program.stage_to_rank()
        schedule.pipeline_order_with_comms = add_comms(actions, program)
    elif is_single_chain(program):
        schedule._prepare_schedule_with_comms(actions)
    else:
        schedule._prepare_schedule_with_comms(add_send_recv_chains(actions, program),
                                              format="compute_comms")
    if recv_lookahead:
        schedule.pipeline_order_with_comms = {
            rank: hoist_receives(order, recv_lookahead) for rank, order in schedule.pipeline_order_with_comms.items()}
    schedule.send_release = send_release(schedule.pipeline_order_with_comms, program, schedule.rank)


def send_release(orders: dict, program: Program, rank: int) -> dict:
    """``{compute action of rank: [(stage, "F"|"B", mb), ...]}``: the sends the executor waits
    for after that action (``schedules.release``); the others at the step's end."""
    out: dict = {}
    for (kind, stage, mb), j in send_release_points(orders, program)[rank].items():
        if j is not None:
            out.setdefault(orders[rank][j], []).append((stage, kind, mb))
    return out
