"""Lowering to torch's ``_Action`` lists: kind by kind, and whole programs equal torch's own orders."""
from types import SimpleNamespace

import pytest
from torch.distributed.pipelining import schedules as torch_schedules

from dualpipe_fx import _compat
from dualpipe_fx.schedules import (Program, dualpipev, gpipe, interleaved_1f1b, one_f_one_b,
                                   to_torch_actions, zb1p, zbv)
from dualpipe_fx.schedules.ir import B, F, FB, I, W
from dualpipe_fx.schedules.lowering import to_torch_action


def _stages(num_ranks, local):
    # torch computes pipeline_order for all ranks in __init__ from these fields only, so
    # namespaces stand in for PipelineStage (no process group, no module).
    return [SimpleNamespace(group_size=num_ranks, group_rank=0, num_stages=num_ranks * local,
                            submod=None, stage_index=k) for k in range(local)]


def _torch_order(cls, num_ranks, num_microbatches, local):
    """Torch's compute-only pipeline_order for a multi-stage schedule, idle slots dropped."""
    order = cls(_stages(num_ranks, local), num_microbatches).pipeline_order
    return {r: [a for a in acts if a is not None] for r, acts in order.items()}


def _single(cls, n, c):
    """Torch's display order for a one-stage-per-rank schedule, idle slots and REDUCE_GRAD dropped."""
    order = cls(_stages(n, 1)[0], c).pipeline_order
    return {r: [a for a in acts if a is not None and a.computation_type != _compat._ComputationType.REDUCE_GRAD]
            for r, acts in order.items()}


def test_each_kind_lowers_to_the_torch_kind():
    assert to_torch_action(F(3, 7)) == _compat._Action(3, _compat.FORWARD, 7)
    assert to_torch_action(B(2, 1)) == _compat._Action(2, _compat.FULL_BACKWARD, 1)
    assert to_torch_action(I(2, 1)) == _compat._Action(2, _compat.BACKWARD_INPUT, 1)
    assert to_torch_action(W(0, 5)) == _compat._Action(0, _compat.BACKWARD_WEIGHT, 5)
    pair = to_torch_action(FB(F(1, 4), B(2, 1)))
    assert pair.computation_type == _compat.OVERLAP_F_B and pair.stage_index == -1
    assert pair.sub_actions == (_compat._Action(1, _compat.FORWARD, 4), _compat._Action(2, _compat.FULL_BACKWARD, 1))
    assert str(pair) == "(1F4;2B1)OVERLAP_F_B"


def test_lowering_keeps_ranks_and_order_and_adds_no_comms():
    program = dualpipev(3, 8)
    lowered = to_torch_actions(program)
    assert sorted(lowered) == [0, 1, 2]
    for rank, acts in program.items():
        assert [str(a) for a in acts] == [_our_str(t) for t in lowered[rank]]
        assert all(t.is_compute_op for t in lowered[rank])


def _our_str(t):
    if t.sub_actions:
        return "&".join(_our_str(s) for s in t.sub_actions)
    return f"{t.computation_type.value}{t.stage_index}.{t.microbatch_index}"


@pytest.mark.parametrize("n, c", [(1, 1), (2, 3), (3, 5), (4, 8), (4, 9)])
def test_gpipe_equals_torch(n, c):
    assert to_torch_actions(gpipe(n, c)) == _single(torch_schedules.ScheduleGPipe, n, c)


@pytest.mark.parametrize("n, c", [(1, 1), (2, 3), (3, 5), (4, 4), (4, 9)])
def test_one_f_one_b_equals_torch(n, c):
    ours, theirs = to_torch_actions(one_f_one_b(n, c)), _single(torch_schedules.Schedule1F1B, n, c)
    for rank in range(n - 1):
        assert ours[rank] == theirs[rank]
    # torch 2.13's Schedule1F1B._get_pipeline_order (only used for display) numbers the last
    # rank's forwards from 1 (F1..FC); the order it *executes* (_step_microbatches) starts at 0.
    last = [a._replace(microbatch_index=a.microbatch_index - (a.computation_type == _compat.FORWARD))
            for a in theirs[n - 1]]
    assert ours[n - 1] in (theirs[n - 1], last)


# torch refuses C not a multiple of max(1, C // N) here (its interleaved rule), so only such C
@pytest.mark.parametrize("n, c", [(1, 3), (2, 2), (2, 6), (3, 9), (4, 4), (4, 10), (5, 3)])
def test_zb1p_equals_torch_interleaved_zero_bubble_with_one_stage_per_rank(n, c):
    assert to_torch_actions(zb1p(n, c)) == _torch_order(torch_schedules.ScheduleInterleavedZeroBubble, n, c, 1)


@pytest.mark.parametrize("n, c", [(1, 1), (2, 2), (2, 7), (3, 4), (3, 9), (4, 16)])
def test_zbv_equals_torch(n, c):
    assert to_torch_actions(zbv(n, c)) == _torch_order(torch_schedules.ScheduleZBVZeroBubble, n, c, 2)


@pytest.mark.parametrize("n, c", [(1, 2), (2, 4), (3, 3), (3, 12), (4, 3), (4, 10), (4, 8)])
def test_interleaved_1f1b_equals_torch(n, c):
    assert to_torch_actions(interleaved_1f1b(n, c)) == _torch_order(torch_schedules.ScheduleInterleaved1F1B, n, c, 2)


@pytest.mark.parametrize("n, c", [(1, 2), (2, 5), (3, 6), (4, 12)])
def test_dualpipev_equals_torch(n, c):
    assert to_torch_actions(dualpipev(n, c)) == _torch_order(torch_schedules.ScheduleDualPipeV, n, c, 2)


def test_a_different_order_does_not_compare_equal():
    program = zbv(2, 4)
    program[0].append(program[0].pop(0))
    assert to_torch_actions(program) != _torch_order(torch_schedules.ScheduleZBVZeroBubble, 2, 4, 2)


def test_empty_program_lowers_to_empty_lists():
    assert to_torch_actions(Program({0: [], 1: []}, chains=((0, 1),), num_microbatches=0)) == {0: [], 1: []}
