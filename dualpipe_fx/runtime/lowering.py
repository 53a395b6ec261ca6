"""Give torch's runtime a program: compute actions plus the sends and receives between ranks.

**Contract**: ``load_program(schedule, program)``: ``schedule.pipeline_order_with_comms``
holds every rank's torch ``_Action`` list with SEND_F/RECV_F/SEND_B/RECV_B in place.

**Pseudocode**
    actions = to_torch_actions(program)                        # compute only
    one chain 0..S-1 -> torch's own lowering (_prepare_schedule_with_comms)
    several chains   -> add_send_recv_chains(actions, program)  # torch's algorithm, chain-aware
"""
from __future__ import annotations

from dualpipe_fx import _compat
from dualpipe_fx.schedules.ir import Program
from dualpipe_fx.schedules.lowering import to_torch_actions


def _comm_pair(action, program: Program, place: dict[int, int]):
    """(send, recv) actions an F/I/B needs, or None when its peer stage is local or absent."""
    ct, A = _compat.TorchComputationType, _compat.TorchAction
    stage, mb = action.stage_index, action.microbatch_index
    if action.computation_type == ct.FORWARD:
        peer, send, recv = program.next_stage(stage), ct.SEND_F, ct.RECV_F
    elif action.computation_type in (ct.BACKWARD_INPUT, ct.FULL_BACKWARD):
        peer, send, recv = program.previous_stage(stage), ct.SEND_B, ct.RECV_B
    else:
        return None
    if peer is None or place[peer] == place[stage]:
        return None
    return A(stage, send, mb), A(peer, recv, mb)


def _ready(action, program: Program, seen: set) -> bool:
    """Whether the inputs of ``action`` were received (or computed locally) already."""
    ct, A = _compat.TorchComputationType, _compat.TorchAction
    stage, mb = action.stage_index, action.microbatch_index
    if action.computation_type == ct.FORWARD:
        prev = program.previous_stage(stage)
        return prev is None or A(stage, ct.RECV_F, mb) in seen or A(prev, ct.FORWARD, mb) in seen
    if action.computation_type in (ct.BACKWARD_INPUT, ct.FULL_BACKWARD):
        nxt = program.next_stage(stage)
        return (nxt is None or A(stage, ct.RECV_B, mb) in seen
                or any(A(nxt, k, mb) in seen for k in (ct.BACKWARD_INPUT, ct.FULL_BACKWARD)))
    return True


def add_send_recv_chains(actions: dict, program: Program) -> dict:
    """torch's ``_add_send_recv`` for programs whose stages form several chains (DualPipe).

    Same algorithm: ranks take turns; a rank places its next compute action once its
    inputs arrived, followed by its sends, and the matching receives go to the peers.
    """
    place = program.stage_to_rank()
    todo = {r: list(a) for r, a in actions.items() if a}
    out: dict = {r: [] for r in actions}
    seen: dict = {r: set() for r in actions}
    while todo:
        progress = False
        for rank in sorted(todo):
            action = todo[rank][0]
            parts = action.sub_actions or (action,)
            if not all(_ready(p, program, seen[rank]) for p in parts):
                continue
            out[rank].append(action)
            for part in parts:
                seen[rank].add(part)
                pair = _comm_pair(part, program, place)
                if pair is not None:
                    out[rank].append(pair[0])
                    seen[rank].add(pair[0])
                    peer_rank = place[pair[1].stage_index]
                    out[peer_rank].append(pair[1])
                    seen[peer_rank].add(pair[1])
            todo[rank].pop(0)
            if not todo[rank]:
                del todo[rank]
            progress = True
        assert progress, "program deadlocks; validate_program should have rejected it"
    return out


_RECEIVES = ("RECV_F", "RECV_B")
_COMPUTE = ("F", "B", "I", "W", "OVERLAP_F_B")


def hoist_receives(order: list, lookahead: int) -> list:
    """``order`` (one rank's torch actions with comms) with each receive posted up to
    ``lookahead`` compute actions earlier than torch placed it.

    torch posts a receive just before the action that needs it; gloo moves the data only
    once both sides posted, so the transfer then happens while the rank waits. Posted
    earlier, it lands during the previous actions' compute. Receives keep their order
    (one tagged stream each); sends and compute keep their places. Only for backends
    whose P2P ops progress on their own and match by tag (gloo): on NCCL an early
    receive would sit in the stream ahead of the sends placed before it.
    """
    segments: list[list] = [[]]  # segment j: what torch put before compute action j, then it
    receives: list[tuple[int, object]] = []
    for action in order:
        if action.computation_type.value in _RECEIVES:
            receives.append((len(segments) - 1, action))
            continue
        segments[-1].append(action)
        if action.computation_type.value in _COMPUTE:
            segments.append([])
    posted: list[list] = [[] for _ in segments]
    for j, action in receives:
        posted[max(0, j - lookahead)].append(action)
    return [a for j, seg in enumerate(segments) for a in posted[j] + seg]


def _is_single_chain(program: Program) -> bool:
    return len(program.chains) == 1 and program.chains[0] == tuple(range(program.num_stages))


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
    if data_parallel and (forwards_only or not _is_single_chain(program)):
        actions = add_data_parallel(actions, program, forwards_only)
    if forwards_only:
        place = program.stage_to_rank()
        schedule.stage_index_to_group_rank = place
        schedule.pipeline_order_with_comms = (
            _compat.add_send_recv(actions, lambda s: place[s], program.num_stages)
            if _is_single_chain(program) else add_send_recv_chains(actions, program))
    elif _is_single_chain(program):
        schedule._prepare_schedule_with_comms(actions)
    else:
        schedule._prepare_schedule_with_comms(add_send_recv_chains(actions, program),
                                              format="compute_comms")
    if recv_lookahead:
        schedule.pipeline_order_with_comms = {
            rank: hoist_receives(order, recv_lookahead) for rank, order in schedule.pipeline_order_with_comms.items()}
