"""Comm lowering: every send has its receive on the peer, in the same order (pure, no processes)."""
from __future__ import annotations

import pytest

from dualpipe_fx import _compat
from dualpipe_fx.runtime.lowering import forward_only
from dualpipe_fx.schedules.lowering import add_send_recv_chains
from dualpipe_fx.schedules import generate
from dualpipe_fx.schedules.lowering import to_torch_actions

CT = _compat.TorchComputationType


def _pairs(lowered, program):
    """Per (sender rank, receiver rank, direction): the sends and the receives, in order."""
    place = program.stage_to_rank()
    sends, recvs = {}, {}
    for rank, actions in lowered.items():
        for a in actions:
            if a.computation_type in (CT.SEND_F, CT.SEND_B):
                peer = program.next_stage(a.stage_index) if a.computation_type == CT.SEND_F \
                    else program.previous_stage(a.stage_index)
                sends.setdefault((rank, place[peer], a.computation_type.value[-1]), []).append(
                    (peer, a.microbatch_index))
            elif a.computation_type in (CT.RECV_F, CT.RECV_B):
                peer = program.previous_stage(a.stage_index) if a.computation_type == CT.RECV_F \
                    else program.next_stage(a.stage_index)
                recvs.setdefault((place[peer], rank, a.computation_type.value[-1]), []).append(
                    (a.stage_index, a.microbatch_index))
    return sends, recvs


@pytest.mark.parametrize("name,ranks,mbs", [("dualpipe", 2, 4), ("dualpipe", 4, 8), ("dualpipev", 4, 8)])
def test_every_send_meets_its_receive_in_order(name, ranks, mbs):
    program = generate(name, ranks, mbs)
    for prog in (program, forward_only(program)):
        lowered = add_send_recv_chains(to_torch_actions(prog), prog)
        sends, recvs = _pairs(lowered, prog)
        assert sends == recvs
        assert sends, "a multi-rank program must communicate"


def test_chain_aware_lowering_equals_torchs_on_a_single_chain():
    program = generate("dualpipev", 2, 4)
    place = program.stage_to_rank()
    ours = add_send_recv_chains(to_torch_actions(program), program)
    torchs = _compat.add_send_recv(to_torch_actions(program), lambda s: place[s], program.num_stages)
    assert {r: [str(a) for a in acts] for r, acts in ours.items()} == \
           {r: [str(a) for a in acts] for r, acts in torchs.items()}


def test_forward_only_keeps_the_forwards_in_order():
    program = generate("dualpipev", 2, 4)
    fwd = forward_only(program)
    for rank in program:
        assert [str(a) for a in fwd[rank]] == [str(p) for p in program.iter_parts(rank) if p.kind == "F"]


@pytest.mark.parametrize("name,ranks,mbs", [("dualpipev", 2, 8), ("dualpipe", 4, 8), ("1f1b", 4, 8)])
@pytest.mark.parametrize("lookahead", [1, 2, 5])
def test_hoisted_receives_keep_their_order_and_move_at_most_lookahead_computes(name, ranks, mbs, lookahead):
    from dualpipe_fx.schedules.lowering import hoist_receives

    program = generate(name, ranks, mbs)
    lowered = add_send_recv_chains(to_torch_actions(program), program)
    hoisted = {r: hoist_receives(acts, lookahead) for r, acts in lowered.items()}
    assert _pairs(hoisted, program) == _pairs(lowered, program)  # every stream's order holds
    compute = ("F", "B", "I", "W", "OVERLAP_F_B")
    for rank, acts in lowered.items():
        new = hoisted[rank]
        assert sorted(map(str, new)) == sorted(map(str, acts))
        assert [str(a) for a in new if a.computation_type.value not in ("RECV_F", "RECV_B")] == \
               [str(a) for a in acts if a.computation_type.value not in ("RECV_F", "RECV_B")]

        def computes_before(order):
            seen, out = 0, {}
            for a in order:
                if a.computation_type.value in compute:
                    seen += 1
                out[str(a)] = seen
            return out
        before, after = computes_before(acts), computes_before(new)
        for a in acts:
            if a.computation_type.value in ("RECV_F", "RECV_B"):
                assert max(0, before[str(a)] - lookahead) == after[str(a)]
