"""Lower a compute-only program to torch's ``_Action`` lists (``pipeline_order`` format), and
those lists to lists with the sends and receives between ranks.

``to_torch_actions`` is compute only; its result for ``dualpipev`` equals torch's own
``ScheduleDualPipeV(...).pipeline_order``. ``add_comms`` (with ``add_send_recv_chains`` for
programs of several chains) and ``hoist_receives`` place the sends and receives: pure list
work on torch's action type, no process group, so the runtime (which hands the result to
torch's schedule) and the memory plan (which walks it) lower a program the same way.
"""
from __future__ import annotations

from dualpipe_fx import _compat
from dualpipe_fx.schedules.ir import Action, Program

RECV_LOOKAHEAD = 2  # compute actions (gloo); each posted receive holds one input buffer early


def _kind_map() -> dict:
    return {"F": _compat.FORWARD, "B": _compat.FULL_BACKWARD,
            "I": _compat.BACKWARD_INPUT, "W": _compat.BACKWARD_WEIGHT}


def to_torch_action(action: Action) -> "_compat._Action":
    """One action: ``F3.7 -> _Action(3, F, 7)``; ``F1.4&B2.1 -> _Action(-1, OVERLAP_F_B, None, (1F4, 2B1))``."""
    kinds = _kind_map()
    if action.kind == "FB":
        subs = tuple(_compat._Action(p.stage, kinds[p.kind], p.microbatch) for p in action.parts())
        # torch marks an overlapped pair with stage -1 and no micro-batch (see ScheduleDualPipeV)
        return _compat._Action(-1, _compat.OVERLAP_F_B, None, subs)
    return _compat._Action(action.stage, kinds[action.kind], action.microbatch)


def to_torch_actions(program: Program) -> dict[int, list["_compat._Action"]]:
    """A program as torch's compute-only ``pipeline_order``.

    **Contract**: ``Program -> dict[rank, list[_Action]]``, same ranks, same order, one
    ``_Action`` per ``Action`` (F->FORWARD, B->FULL_BACKWARD, I->BACKWARD_INPUT,
    W->BACKWARD_WEIGHT, FB->OVERLAP_F_B with its two sub-actions); no communication.

    **Pseudocode**::

        for each rank: [to_torch_action(a) for a in program[rank]]

    Args:
        program: any program from the generators.

    Returns:
        ``{rank: [_Action, ...]}``, ranks sorted.
    """
    return {rank: [to_torch_action(a) for a in program[rank]] for rank in sorted(program)}


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
COMPUTE_KINDS = ("F", "B", "I", "W", "OVERLAP_F_B")  # torch action kinds that compute (the rest communicate)


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
        if action.computation_type.value in COMPUTE_KINDS:
            segments.append([])
    posted: list[list] = [[] for _ in segments]
    for j, action in receives:
        posted[max(0, j - lookahead)].append(action)
    return [a for j, seg in enumerate(segments) for a in posted[j] + seg]


def is_single_chain(program: Program) -> bool:
    """Whether the program's stages form one chain 0..S-1 (torch's own lowering handles those)."""
    return len(program.chains) == 1 and program.chains[0] == tuple(range(program.num_stages))


def add_comms(actions: dict, program: Program) -> dict:
    """``actions`` (compute only, ``to_torch_actions``) with the sends and receives between ranks:
    torch's ``_add_send_recv`` for one chain, ``add_send_recv_chains`` for several."""
    if is_single_chain(program):
        place = program.stage_to_rank()
        return _compat.add_send_recv(actions, lambda s: place[s], program.num_stages)
    return add_send_recv_chains(actions, program)
