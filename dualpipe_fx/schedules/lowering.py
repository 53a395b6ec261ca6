"""Lower a compute-only program to torch's ``_Action`` lists (``pipeline_order`` format).

Compute only: the runtime adds sends and receives (torch's ``_prepare_schedule_with_comms``)
when it builds the schedule, never here. The result for ``dualpipev`` equals torch's own
``ScheduleDualPipeV(...).pipeline_order``.
"""
from __future__ import annotations

from dualpipe_fx import _compat
from dualpipe_fx.schedules.ir import Action, Program


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
