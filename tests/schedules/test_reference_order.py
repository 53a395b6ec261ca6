"""DualPipeV and DualPipe rebuild DeepSeek's reference order, action for action.

``reference_orders.py`` holds the per-rank orders the reference ``step()`` executes
(recorded outside this repository, see its docstring); DualPipeV is also checked against
torch's own ``ScheduleDualPipeV.pipeline_order``.
"""
from types import SimpleNamespace

import pytest
from torch.distributed.pipelining import schedules as torch_schedules

from dualpipe_fx.schedules import dualpipe, dualpipev, to_torch_actions, validate_program
from tests.schedules.reference_orders import REFERENCE_ORDERS

GENERATORS = {"dualpipev": dualpipev, "dualpipe": dualpipe}


def _ids(key):
    return f"{key[0]}-N{key[1]}-C{key[2]}"


@pytest.mark.parametrize("key", sorted(REFERENCE_ORDERS), ids=_ids)
def test_generator_order_equals_reference(key):
    kind, n, c = key
    program = GENERATORS[kind](n, c)
    assert sorted(program) == list(range(n))
    for rank, expected in enumerate(REFERENCE_ORDERS[key]):
        got = " ".join(str(a) for a in program[rank])
        assert got == expected, f"{kind} N={n} C={c} rank {rank}"
    validate_program(program)


def test_reference_set_covers_the_advertised_sizes():
    sizes = {(k, n) for k, n, _ in REFERENCE_ORDERS}
    assert {("dualpipev", n) for n in (1, 2, 3, 4, 8)} <= sizes
    assert {("dualpipe", n) for n in (2, 4, 8)} <= sizes


def _torch_dualpipev_order(num_ranks, num_microbatches):
    # torch builds pipeline_order for every rank in __init__; it needs only these stage fields
    # (no process group, no module), so namespaces stand in for PipelineStage.
    stages = [SimpleNamespace(group_size=num_ranks, group_rank=0, num_stages=2 * num_ranks, submod=None)
              for _ in range(2)]
    order = torch_schedules.ScheduleDualPipeV(stages, num_microbatches).pipeline_order
    return {r: [a for a in acts if a is not None] for r, acts in order.items()}


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("extra", [0, 1, 3, 2 * 4 + 1])
def test_dualpipev_lowered_equals_torch_schedule_dualpipev(n, extra):
    c = 2 * n + extra
    assert to_torch_actions(dualpipev(n, c)) == _torch_dualpipev_order(n, c)


def test_torch_comparison_can_fail():
    # a swapped pair on one rank must show up as a difference
    program = dualpipev(2, 4)
    program[1][0], program[1][1] = program[1][1], program[1][0]
    assert to_torch_actions(program) != _torch_dualpipev_order(2, 4)
